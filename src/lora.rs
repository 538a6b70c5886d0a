//! LoRA: low-rank adapters on the frozen linears of a model.
//!
//! Each adapted linear computes `x Wᵀ + scale · dropout(x) Aᵀ Bᵀ`, with `A`
//! (`[r, in]`) initialised kaiming-uniform and `B` (`[out, r]`) at zero, as PEFT
//! does, so a fresh adapter leaves the model unchanged. `scale` is `alpha / r`,
//! or `alpha / √r` with rsLoRA. Only `A` and `B` are trained.

use crate::config::ModelConfig;
use crate::model::add_matmul::add_matmul;
use crate::model::{linear_names, CausalLm};
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Which linears to adapt, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// The rank.
    pub r: usize,
    /// The scaling numerator.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Module names (`q_proj`, ..., `down_proj`; Phi-3: `qkv_proj`, `o_proj`,
    /// `gate_up_proj`, `down_proj`) or `all-linear` (the default).
    pub target_modules: Vec<String>,
    /// The layers to adapt (all when `None`).
    pub layers: Option<Vec<usize>>,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["all-linear".to_string()],
            layers: None,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The target module names among a model's linears `modules` (see
    /// [`linear_names`]), with `all-linear` expanded; names the model lacks are
    /// errors that list its linears.
    pub fn targets(&self, modules: &[&'static str]) -> Result<Vec<&'static str>> {
        let valid = || format!("{}, or all-linear", modules.join(", "));
        let mut out = Vec::new();
        for t in &self.target_modules {
            if t == "all-linear" {
                return Ok(modules.to_vec());
            }
            match modules.iter().find(|n| *n == t) {
                Some(n) => out.push(*n),
                None => bail!(
                    "unknown LoRA target module '{t}': this model's linears are {}",
                    valid()
                ),
            }
        }
        if out.is_empty() {
            bail!("LoRA target_modules is empty. Valid modules: {}", valid());
        }
        Ok(out)
    }

    /// Checks the settings against a model of `config`.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1 (got r = 0)");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout must be in [0, 1) (got {})", self.dropout);
        }
        if let Some(layers) = &self.layers {
            if let Some(bad) = layers.iter().find(|&&l| l >= config.num_hidden_layers) {
                bail!(
                    "LoRA layer {bad} does not exist: the model has layers 0..{}",
                    config.num_hidden_layers - 1
                );
            }
        }
        self.targets(linear_names(config))?;
        Ok(())
    }

    fn adapts_layer(&self, layer: usize) -> bool {
        self.layers.as_ref().is_none_or(|l| l.contains(&layer))
    }
}

/// The trainable low-rank update of one linear.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// The output scale.
    pub scale: f64,
    /// Input dropout while training.
    pub dropout: f64,
    /// Distinguishes this layer's dropout masks from the others'.
    stream: u64,
}

impl LoraLayer {
    /// A layer from its factors.
    pub fn new(a: Var, b: Var, scale: f64, dropout: f64, stream: u64) -> Self {
        Self {
            a,
            b,
            scale,
            dropout,
            stream,
        }
    }

    /// The factors as tensors: tracked by candle's autograd, or detached.
    fn factors(&self, autograd: bool) -> (Tensor, Tensor) {
        if autograd {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        }
    }

    /// The scaled dropout mask for `h`, a pure function of the seed and this
    /// layer (see [`crate::model::dropout`]); `None` without dropout.
    fn dropout_mask(&self, h: &Tensor, seed: Option<u64>) -> candle_core::Result<Option<Tensor>> {
        let (Some(seed), true) = (seed, self.dropout > 0.0) else {
            return Ok(None);
        };
        let seed = seed ^ self.stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        crate::model::dropout::mask(h, seed, 1.0 - self.dropout as f32).map(Some)
    }

    /// The adapter's input after dropout, in the parameters' dtype.
    fn dropped(&self, x: &Tensor, seed: Option<u64>) -> candle_core::Result<Tensor> {
        let h = x.to_dtype(self.a.dtype())?;
        match self.dropout_mask(&h, seed)? {
            Some(mask) => h * mask,
            None => Ok(h),
        }
    }

    /// Adds the adapter's contribution for `x` (`[rows, in]`) to the base output
    /// `y` (`[rows, out]`). `dropout_seed` is set while training; the mask is a
    /// pure function of it. With `autograd`, candle records the graph to the factors.
    /// Returns the sum and the rank-r product `dropout(x) Aᵀ` (`[rows, r]`),
    /// which [`LoraLayer::backward`] reads again.
    pub fn add_to(
        &self,
        y: Tensor,
        x: &Tensor,
        dropout_seed: Option<u64>,
        autograd: bool,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let _profile = crate::profile::open(crate::profile::Stage::Lora);
        let (a, b) = self.factors(autograd);
        let dropped = self.dropped(x, dropout_seed)?;
        let low = match autograd {
            true => dropped.matmul(&a.t()?)?,
            false => crate::model::thin::matmul_t(&dropped, &a)?,
        };
        // Scaling the rank-r intermediate is cheaper than scaling the output.
        let scaled = (&low * self.scale)?.to_dtype(y.dtype())?;
        let bt = b.t()?.to_dtype(scaled.dtype())?;
        Ok((add_matmul(y, &scaled, &bt, 1.0, !autograd)?, low))
    }

    /// Backpropagates through the adapter: adds its share of the input gradient
    /// to `dx` (the base layer's), and returns it with `dA` and `dB`, for the input
    /// `x` (`[rows, in]`) and output gradient `dy` (`[rows, out]`). `low` is
    /// the forward's `dropout(x) Aᵀ` ([`LoraLayer::add_to`]) where it was
    /// kept; without it, it is computed again.
    pub fn backward(
        &self,
        dx: Tensor,
        x: &Tensor,
        dy: &Tensor,
        dropout_seed: Option<u64>,
        low: Option<&Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let _profile = crate::profile::open(crate::profile::Stage::Lora);
        let (a, b) = self.factors(false);
        let h = x.to_dtype(a.dtype())?;
        let mask = self.dropout_mask(&h, dropout_seed)?;
        let h = match &mask {
            Some(m) => (h * m)?,
            None => h,
        };
        // The scale is applied to the small rank-r products, never to `dy` itself.
        let dy = dy.to_dtype(a.dtype())?;
        let low = match low {
            // Detached: a forward under autograd kept it with its graph.
            Some(low) => low.detach().to_dtype(a.dtype())?,
            None => crate::model::thin::matmul_t(&h, &a)?,
        };
        let d_low = (crate::model::thin::matmul_t(&dy, &b.t()?.contiguous()?)? * self.scale)?;
        // dB = dyᵀ·low, made as (lowᵀ·dy)ᵀ: `gemm` runs the rank-r side as
        // rows twice as fast as as columns (SmolLM2's MLP: 63 against 130 µs).
        let db = (low.t()?.matmul(&dy)?.t()? * self.scale)?;
        let da = d_low.t()?.matmul(&h)?;
        let dx = match &mask {
            // Dropout sits between x and A: its mask multiplies the adapter's share only.
            Some(m) => (dx + (d_low.matmul(&a)? * m)?.to_dtype(x.dtype())?)?,
            None => {
                let (d_low, a) = (d_low.to_dtype(x.dtype())?, a.to_dtype(x.dtype())?);
                add_matmul(dx, &d_low, &a, 1.0, true)?
            }
        };
        Ok((dx, da, db))
    }

    /// The dense update `scale · B A`, `[out, in]`.
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale
    }
}

/// The PEFT key prefix of a block's linear: `base_model.model.model.layers.{i}.{module}`.
pub fn peft_prefix(layer: usize, module_path: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{module_path}")
}

/// Adds fresh adapters (A kaiming-uniform, B zero) to the targeted linears.
/// Parameters are f32 whatever the base dtype. Returns how many linears were adapted.
pub fn attach(model: &mut CausalLm, config: &LoraConfig, seed: u64) -> Result<usize> {
    config.validate(&model.config)?;
    let targets = config.targets(linear_names(&model.config))?;
    let device = model.device().clone();
    let mut rng = Rng::new(seed);
    let mut count = 0;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        if !config.adapts_layer(i) {
            continue;
        }
        for (path, linear) in layer.linears_mut() {
            let module = path.rsplit('.').next().unwrap_or(path);
            if !targets.contains(&module) {
                continue;
            }
            let (inp, out) = (linear.in_features(), linear.out_features());
            // kaiming_uniform_(a=√5): bound = √(6 / ((1 + 5) · fan_in)) = 1/√fan_in.
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..config.r * inp)
                .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                .collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (config.r, inp), &device)?)?;
            let b = Var::zeros((out, config.r), DType::F32, &device)?;
            linear.lora = Some(LoraLayer::new(
                a,
                b,
                config.scale(),
                config.dropout,
                count as u64 + 1,
            ));
            count += 1;
        }
    }
    Ok(count)
}

/// Every adapter parameter with its PEFT key, in a stable order.
pub fn parameters(model: &CausalLm) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (path, linear) in layer.linears() {
            if let Some(l) = &linear.lora {
                let p = peft_prefix(i, path);
                out.push((format!("{p}.lora_A.weight"), l.a.clone()));
                out.push((format!("{p}.lora_B.weight"), l.b.clone()));
            }
        }
    }
    out
}

/// Folds every adapter into its base weight (`W += scale · B A`) and removes
/// it. A quantized base weight is requantized into its format
/// ([`crate::model::FrozenWeight::add`]).
pub fn merge(model: &mut CausalLm) -> Result<usize> {
    let mut merged = 0;
    for layer in model.layers.iter_mut() {
        for (_, linear) in layer.linears_mut() {
            if let Some(l) = linear.lora.take() {
                linear.weight = linear.weight.add(&l.delta()?)?;
                merged += 1;
            }
        }
    }
    Ok(merged)
}

/// Removes every adapter without merging.
pub fn detach(model: &mut CausalLm) {
    for layer in model.layers.iter_mut() {
        for (_, linear) in layer.linears_mut() {
            linear.lora = None;
        }
    }
}
