//! AdamW with decoupled weight decay, whose state can be saved and restored
//! (candle's own AdamW keeps its state private), and clipping by global norm.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Gradients aligned with an optimizer's parameters (`None` where none reached one).
pub type Gradients = Vec<Option<Tensor>>;

/// Adds `more` into `acc`, parameter by parameter (gradient accumulation).
pub fn accumulate(acc: &mut Gradients, more: Gradients) -> Result<()> {
    if acc.is_empty() {
        *acc = more;
        return Ok(());
    }
    for (a, m) in acc.iter_mut().zip(more) {
        *a = match (a.take(), m) {
            (Some(x), Some(y)) => Some((x + y)?),
            (x, y) => x.or(y),
        };
    }
    Ok(())
}

/// AdamW over named parameters.
pub struct AdamW {
    params: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Updates taken so far.
    pub step: usize,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimizer with zeroed moments.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let exp_avg = params
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let exp_avg_sq = exp_avg.clone();
        Ok(Self {
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
            config,
        })
    }

    /// The parameters, by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The parameters' gradients in `store`, in parameter order.
    pub fn gradients(&self, store: &GradStore) -> Gradients {
        self.params
            .iter()
            .map(|(_, v)| store.get(v.as_tensor()).cloned())
            .collect()
    }

    /// The global L2 norm of the gradients. Summed on their device in f32 and read
    /// back once: one wait for a GPU per update rather than one per tensor, and
    /// no f64, which Metal lacks.
    pub fn grad_norm(grads: &Gradients) -> Result<f64> {
        let squares = grads
            .iter()
            .flatten()
            .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        if squares.is_empty() {
            return Ok(0.0);
        }
        let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok((total as f64).sqrt())
    }

    /// One update with learning rate `lr`, scaling gradients by `grad_scale` first
    /// (for clipping). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &Gradients, lr: f64, grad_scale: f64) -> Result<()> {
        let _profile = crate::profile::open(crate::profile::Stage::Optimizer);
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let g = (g.to_dtype(DType::F32)? * grad_scale)?;
            let m = ((&self.exp_avg[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let p = var.as_tensor();
            let decayed = (p * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }

    /// Saves the moments (safetensors); the step count is kept by the caller.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            tensors.push((
                format!("{name}.exp_avg"),
                self.exp_avg[i].to_device(&Device::Cpu)?,
            ));
            tensors.push((
                format!("{name}.exp_avg_sq"),
                self.exp_avg_sq[i].to_device(&Device::Cpu)?,
            ));
        }
        crate::weights::save_safetensors(path, &tensors)
    }

    /// Restores the moments saved by [`AdamW::save`], and the step count.
    pub fn load(&mut self, path: &Path, step: usize) -> Result<()> {
        let mut saved: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            let device = var.as_tensor().device();
            let mut take = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = saved
                    .remove(&key)
                    .with_context(|| format!("{} has no {key}", path.display()))?;
                Ok(t.to_device(device)?)
            };
            self.exp_avg[i] = take("exp_avg")?;
            self.exp_avg_sq[i] = take("exp_avg_sq")?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
        let w = Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone())],
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let loss = (w.as_tensor() * Tensor::new(&[2.0f32, -1.0, 0.5], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = opt.gradients(&loss.backward().unwrap());
        opt.step(&grads, 0.01, 1.0).unwrap();
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        // Bias-corrected Adam moves by lr·sign(g) on the first step; decay by lr·wd·w.
        let want = [
            1.0 * (1.0 - 0.001) - 0.01,
            -2.0 * (1.0 - 0.001) + 0.01,
            3.0 * (1.0 - 0.001) - 0.01,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
    }
}
