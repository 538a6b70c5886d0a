//! Rotary positions: cos/sin per position and frequency, with Llama 3
//! or LongRoPE frequency scaling, gathered per token so that packed rows can
//! restart positions.

use crate::config::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};

/// cos/sin of the positions up to the context length, computed for the
/// positions a batch asks for rather than held as a table: a table for Llama
/// 3's 131,072 positions would take 64 MB, and the angles `position ·
/// frequency` are the same f32 products either way.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    /// The inverse frequencies, `[1, rotary_dim / 2]`, f32.
    inv_freq: Tensor,
    max_positions: usize,
    attention_factor: f64,
    dtype: DType,
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
    /// Positions `0..max_positions`, cos and sin multiplied by
    /// `attention_factor` (LongRoPE's; 1 otherwise), in `dtype`.
    pub fn new(
        inv_freq: &[f32],
        max_positions: usize,
        attention_factor: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            inv_freq: Tensor::from_slice(inv_freq, (1, inv_freq.len()), device)?,
            max_positions,
            attention_factor,
            dtype,
        })
    }

    /// The number of positions covered.
    pub fn len(&self) -> usize {
        self.max_positions
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// cos and sin for `positions` (`[b, t]`, u32), each `[b, t, rotary_dim / 2]`.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let half = self.inv_freq.dim(1)?;
        let angles = positions
            .flatten_all()?
            .to_dtype(DType::F32)?
            .reshape((b * t, 1))?
            .broadcast_mul(&self.inv_freq)?;
        let scaled = |t: Tensor| match self.attention_factor {
            1.0 => t.to_dtype(self.dtype),
            f => (t * f)?.to_dtype(self.dtype),
        };
        let cos = scaled(angles.cos()?)?.reshape((b, t, half))?;
        let sin = scaled(angles.sin()?)?.reshape((b, t, half))?;
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
    fn gathered_angles_are_the_positions_times_the_frequencies() -> Result<()> {
        let inv = [1.0f32, 0.1, 1e-4];
        let table = RotaryTable::new(&inv, 8192, 2.0, DType::F32, &Device::Cpu)?;
        let positions = Tensor::new(&[[0u32, 5, 8191], [7, 7, 1]], &Device::Cpu)?;
        let (cos, sin) = table.gather(&positions)?;
        assert_eq!(cos.dims(), [2, 3, 3]);
        let (cos, sin) = (cos.to_vec3::<f32>()?, sin.to_vec3::<f32>()?);
        for (i, row) in positions.to_vec2::<u32>()?.iter().enumerate() {
            for (j, &p) in row.iter().enumerate() {
                for (k, f) in inv.iter().enumerate() {
                    let angle = (p as f32 * f) as f64;
                    assert!((cos[i][j][k] as f64 - 2.0 * angle.cos()).abs() < 1e-6);
                    assert!((sin[i][j][k] as f64 - 2.0 * angle.sin()).abs() < 1e-6);
                }
            }
        }
        Ok(())
    }

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
