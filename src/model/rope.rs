//! Rotary position tables: cos/sin per position and frequency, with Llama 3
//! frequency scaling, gathered per token so that packed rows can restart positions.

use crate::config::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};

/// Precomputed cos/sin for every position up to the context length.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    cos: Tensor,
    sin: Tensor,
}

/// The inverse frequencies of a config, `[head_dim / 2]`, with Llama 3 scaling applied
/// (from `rope_scaling`, or from a GGUF's `rope_freqs` factors).
pub fn inverse_frequencies(config: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let d = config.head_dim;
    let mut inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    if let Some(s) = &config.rope_scaling {
        let old = s.original_max_position_embeddings as f64;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        for f in inv.iter_mut() {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= s.factor;
            } else if wavelen >= high_wavelen {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
            }
        }
    }
    if let Some(factors) = freq_factors {
        for (f, k) in inv.iter_mut().zip(factors) {
            *f /= *k as f64;
        }
    }
    inv.into_iter().map(|f| f as f32).collect()
}

impl RotaryTable {
    /// Tables for positions `0..max_positions`.
    pub fn new(
        inv_freq: &[f32],
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let inv = Tensor::from_slice(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// The number of positions covered.
    pub fn len(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// cos and sin for `positions` (`[b, t]`, u32), each `[b, t, head_dim / 2]`.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
        Ok((cos, sin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Architecture, Llama3RopeScaling};

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = ModelConfig::tiny(Architecture::Llama);
        c.head_dim = 64;
        c.rope_theta = 500_000.0;
        let plain = inverse_frequencies(&c, None);
        c.rope_scaling = Some(Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = inverse_frequencies(&c, None);
        let wavelen = |f: f32| 2.0 * std::f32::consts::PI / f;
        for (p, s) in plain.iter().zip(&scaled) {
            if wavelen(*p) < 8192.0 / 4.0 {
                assert_eq!(p, s, "high frequencies are untouched");
            } else if wavelen(*p) > 8192.0 {
                assert!(
                    (p / 32.0 - s).abs() < 1e-12,
                    "low frequencies are divided by the factor"
                );
            } else {
                assert!(*s < *p && *s > p / 32.0, "the band between is interpolated");
            }
        }
        // GGUF's rope_freqs factors divide the same way.
        let factors: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        let from_factors = inverse_frequencies(
            &ModelConfig {
                rope_scaling: None,
                ..c
            },
            Some(&factors),
        );
        for (a, b) in from_factors.iter().zip(&scaled) {
            assert!((a - b).abs() <= 1e-6 * b.abs());
        }
    }
}
