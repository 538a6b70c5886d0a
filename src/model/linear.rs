//! A linear layer `y = x Wᵀ + b` over the last dimension, HF layout (`W`: `[out, in]`).
//! The base weight is frozen: gradients flow to the input only. It is dense,
//! or kept quantized ([`super::quantized`]).

use super::quantized::QuantizedWeight;
use super::Pass;
use crate::lora::LoraLayer;
use crate::profile::{self, Stage};
use candle_core::{DType, Device, Result, Tensor};

/// A frozen `[out, in]` weight: dense, or in a GGML block format.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    /// A dense tensor in the model's dtype.
    Dense(Tensor),
    /// Quantized blocks, dequantized as products read them.
    Quantized(QuantizedWeight),
}

impl From<Tensor> for FrozenWeight {
    fn from(t: Tensor) -> Self {
        Self::Dense(t)
    }
}

impl From<QuantizedWeight> for FrozenWeight {
    fn from(q: QuantizedWeight) -> Self {
        Self::Quantized(q)
    }
}

impl FrozenWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Dense(t) => t.dims2().unwrap_or((0, 0)),
            Self::Quantized(q) => q.dims(),
        }
    }

    /// The dtype its products run in.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Quantized(q) => q.dtype(),
        }
    }

    /// Where it is.
    pub fn device(&self) -> Device {
        match self {
            Self::Dense(t) => t.device().clone(),
            Self::Quantized(q) => q.device(),
        }
    }

    /// Whether it is kept quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized(_))
    }

    /// The bytes it holds.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_bytes(),
        }
    }

    /// The weight as a dense tensor (a quantized one dequantized).
    pub fn to_dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quantized(q) => q.dequantize(),
        }
    }

    /// `x Wᵀ` for `x`: `[rows, in]`, without gradient.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = profile::open(Stage::FrozenForward);
        match self {
            Self::Dense(w) if super::gemv::applies(x, w) => super::gemv::matmul_t(x, w),
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Quantized(q) => q.matmul_t(x),
        }
    }

    /// `dy W` for `dy`: `[rows, out]`: the input gradient of [`Self::matmul_t`].
    pub fn matmul(&self, dy: &Tensor) -> Result<Tensor> {
        let _profile = profile::open(Stage::FrozenInputGradient);
        match self {
            Self::Dense(w) => dy.matmul(w),
            Self::Quantized(q) => q.matmul(dy),
        }
    }

    /// Whether its many-row products run on the CPU's bf16 kernel (a bf16
    /// weight with low-precision kernels on, on a CPU that has one).
    pub fn uses_bf16_kernel(&self) -> bool {
        matches!(self, Self::Quantized(q) if q.uses_bf16_kernel())
    }

    /// For a held weight (bf16 or blocks): whether its many-row products use
    /// the CPU's low-precision kernels where it has them
    /// ([`QuantizedWeight::set_low_precision_kernels`]); nothing for a
    /// dense weight.
    pub fn set_low_precision_kernels(&mut self, on: bool) {
        if let Self::Quantized(q) = self {
            q.set_low_precision_kernels(on);
        }
    }

    /// `x W[range]ᵀ` for `x`: `[rows, in]`: the product with the weight's
    /// rows `range` alone, `[rows, range.len()]` (a tile of the logits).
    pub fn matmul_t_rows(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        let _profile = profile::open(Stage::FrozenForward);
        match self {
            Self::Dense(w) => x.matmul(&w.narrow(0, range.start, range.len())?.t()?),
            Self::Quantized(q) => q.matmul_t_rows(x, range),
        }
    }

    /// `dy W[range]` for `dy`: `[rows, range.len()]`, the input gradient of
    /// [`Self::matmul_t_rows`]: `[rows, in]`.
    pub fn matmul_rows(&self, dy: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        let _profile = profile::open(Stage::FrozenInputGradient);
        match self {
            Self::Dense(w) => dy.matmul(&w.narrow(0, range.start, range.len())?),
            Self::Quantized(q) => q.matmul_rows(dy, range),
        }
    }

    /// The rows `ids` (u32, `[len]`): `[len, in]`, dense (an embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.index_select(ids, 0),
            Self::Quantized(q) => q.rows(ids),
        }
    }

    /// `W + delta` (a merged adapter); a quantized weight is requantized
    /// into its format.
    pub fn add(&self, delta: &Tensor) -> Result<Self> {
        Ok(match self {
            Self::Dense(w) => Self::Dense((w + delta.to_dtype(w.dtype())?)?),
            Self::Quantized(q) => Self::Quantized(q.add_requantized(delta)?),
        })
    }
}

/// A frozen linear layer, optionally with a trainable LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: FrozenWeight,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Tensor>,
    /// The adapter, when one is attached.
    pub lora: Option<LoraLayer>,
}

impl Linear {
    /// A layer from its weight (a dense tensor or quantized blocks) and
    /// optional bias.
    pub fn new(weight: impl Into<FrozenWeight>, bias: Option<Tensor>) -> Self {
        Self {
            weight: weight.into(),
            bias,
            lora: None,
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// Applies the layer to `x` of shape `[..., in]` (no dropout, no autograd).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, Pass::default())
    }

    /// Applies the layer under `pass`'s dropout and autograd settings.
    pub fn forward_t(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        Ok(self.forward_keeping(x, pass)?.0)
    }

    /// [`Linear::forward_t`], and for an adapter its rank-r product
    /// `dropout(x) Aᵀ` (`[rows, r]`), for [`Linear::backward`] to read
    /// instead of computing it again.
    pub fn forward_keeping(&self, x: &Tensor, pass: Pass) -> Result<(Tensor, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let flat = x.reshape((rows, dims[dims.len() - 1]))?;
        let mut y = super::ops::frozen_matmul_t(&flat, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut low = None;
        if let Some(lora) = &self.lora {
            let (sum, kept) = lora.add_to(y, &flat, pass.dropout_seed, pass.autograd)?;
            (y, low) = (sum, Some(kept));
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features();
        Ok((y.reshape(out_dims)?, low))
    }
}

/// The gradients of one linear's adapter: `(dA, dB)`.
pub type LoraGrad = (Tensor, Tensor);

impl Linear {
    /// Backpropagates `dy` (`[rows, out]`) through the layer applied to `x`
    /// (`[rows, in]`): `dx`, and the adapter's gradients if it has one. The frozen
    /// weight and bias get none, so `x` is read only for an adapter: pass `None`
    /// for a layer without one (see [`Linear::needs_input`]). `low` is the
    /// adapter's rank-r product that [`Linear::forward_keeping`] kept, if it
    /// was.
    pub fn backward(
        &self,
        x: Option<&Tensor>,
        dy: &Tensor,
        dropout_seed: Option<u64>,
        low: Option<&Tensor>,
    ) -> Result<(Tensor, Option<LoraGrad>)> {
        let dx = self.weight.matmul(dy)?;
        match &self.lora {
            Some(lora) => {
                let x = x.ok_or_else(|| {
                    candle_core::Error::Msg("an adapted linear's backward needs its input".into())
                })?;
                let (dx, da, db) = lora.backward(dx, x, dy, dropout_seed, low)?;
                Ok((dx, Some((da, db))))
            }
            None => Ok((dx, None)),
        }
    }

    /// Whether [`Linear::backward`] reads the layer's input: only for an adapter.
    pub fn needs_input(&self) -> bool {
        self.lora.is_some()
    }
}
