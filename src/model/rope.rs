//! Rotary position tables: cos/sin per position and frequency, with Llama 3
//! or LongRoPE frequency scaling, gathered per token so that packed rows can
//! restart positions.

use crate::config::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};

/// Precomputed cos/sin for every position up to the context length.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    cos: Tensor,
    sin: Tensor,
}

/// The inverse frequencies of a config, `[rotary_dim / 2]`, with Llama 3 scaling
/// applied (from `rope_scaling`), and divided by `freq_factors` where given (a
/// GGUF's `rope_freqs`, or LongRoPE's short or long factors).
pub fn inverse_frequencies(config: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f32> {
    let d = config.rotary_dim();
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
    /// Tables for positions `0..max_positions`, cos and sin multiplied by
    /// `attention_factor` (LongRoPE's; 1 otherwise).
    pub fn new(
        inv_freq: &[f32],
        max_positions: usize,
        attention_factor: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let inv = Tensor::from_slice(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = pos.broadcast_mul(&inv)?;
        let scaled = |t: Tensor| match attention_factor {
            1.0 => t.to_dtype(dtype),
            f => (t * f)?.to_dtype(dtype),
        };
        Ok(Self {
            cos: scaled(angles.cos()?)?,
            sin: scaled(angles.sin()?)?,
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

    /// cos and sin for `positions` (`[b, t]`, u32), each `[b, t, rotary_dim / 2]`.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
        Ok((cos, sin))
    }
}

/// cos and sin, each `[b, t, rotary_dim / 2]`.
pub type CosSin = (Tensor, Tensor);

/// A model's rope tables: the main one, LongRoPE's table for sequences longer
/// than the pretrained context, and the sliding-window layers' own (Gemma 3).
#[derive(Debug, Clone)]
pub struct Rotaries {
    main: RotaryTable,
    /// The long table, and the pretrained context beyond which it serves.
    long: Option<(RotaryTable, usize)>,
    local: Option<RotaryTable>,
}

impl Rotaries {
    /// The tables of `config`; `freq_factors` are a GGUF's Llama 3 `rope_freqs`.
    pub fn new(
        config: &ModelConfig,
        freq_factors: Option<&[f32]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = config.max_position_embeddings;
        let table = |factors: Option<&[f32]>, scale: f64| {
            RotaryTable::new(
                &inverse_frequencies(config, factors),
                n,
                scale,
                dtype,
                device,
            )
        };
        let (main, long) = match &config.longrope {
            Some(lr) => {
                let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
                let (short, long) = (f32s(&lr.short_factor), f32s(&lr.long_factor));
                let scale = lr.attention_factor;
                (
                    table(Some(&short), scale)?,
                    Some((
                        table(Some(&long), scale)?,
                        lr.original_max_position_embeddings,
                    )),
                )
            }
            None => (table(freq_factors, 1.0)?, None),
        };
        let local = match config.rope_local_theta {
            Some(theta) => {
                let local = ModelConfig {
                    rope_theta: theta,
                    rope_scaling: None,
                    ..config.clone()
                };
                let inv = inverse_frequencies(&local, None);
                Some(RotaryTable::new(&inv, n, 1.0, dtype, device)?)
            }
            None => None,
        };
        Ok(Self { main, long, local })
    }

    /// The number of positions covered.
    pub fn len(&self) -> usize {
        self.main.len()
    }

    /// Whether the tables are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// cos and sin for `positions` (`[b, t]`) whose largest is `max_position`,
    /// and the sliding-window layers' own where they have them. As transformers
    /// does, LongRoPE's long factors serve every position once a sequence
    /// outgrows the pretrained context.
    pub fn gather(
        &self,
        positions: &Tensor,
        max_position: usize,
    ) -> Result<(CosSin, Option<CosSin>)> {
        let main = match &self.long {
            Some((long, original)) if max_position + 1 > *original => long,
            _ => &self.main,
        };
        let local = self
            .local
            .as_ref()
            .map(|t| t.gather(positions))
            .transpose()?;
        Ok((main.gather(positions)?, local))
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
