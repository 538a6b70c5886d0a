//! A linear layer `y = x Wᵀ + b` over the last dimension, HF layout (`W`: `[out, in]`).
//! The base weight is frozen: gradients flow to the input only.

use super::Pass;
use crate::lora::LoraLayer;
use candle_core::{Result, Tensor};

/// A frozen linear layer, optionally with a trainable LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Tensor>,
    /// The adapter, when one is attached.
    pub lora: Option<LoraLayer>,
}

impl Linear {
    /// A layer from its weight and optional bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Applies the layer to `x` of shape `[..., in]` (no dropout, no autograd).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, Pass::default())
    }

    /// Applies the layer under `pass`'s dropout and autograd settings.
    pub fn forward_t(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let flat = x.reshape((rows, dims[dims.len() - 1]))?;
        let mut y = super::ops::frozen_matmul_t(&flat, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(lora) = &self.lora {
            y = lora.add_to(y, &flat, pass.dropout_seed, pass.autograd)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features();
        y.reshape(out_dims)
    }
}

/// The gradients of one linear's adapter: `(dA, dB)`.
pub type LoraGrad = (Tensor, Tensor);

impl Linear {
    /// Backpropagates `dy` (`[rows, out]`) through the layer applied to `x`
    /// (`[rows, in]`): `dx`, and the adapter's gradients if it has one. The frozen
    /// weight and bias get none, so `x` is read only for an adapter: pass `None`
    /// for a layer without one (see [`Linear::needs_input`]).
    pub fn backward(
        &self,
        x: Option<&Tensor>,
        dy: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Tensor, Option<LoraGrad>)> {
        let dx = dy.matmul(&self.weight)?;
        match &self.lora {
            Some(lora) => {
                let x = x.ok_or_else(|| {
                    candle_core::Error::Msg("an adapted linear's backward needs its input".into())
                })?;
                let (dx, da, db) = lora.backward(dx, x, dy, dropout_seed)?;
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
