//! How the frozen base's linear weights are held while training and
//! generating (QLoRA): dense in the model's dtype (`none`), in the block
//! format the GGUF file stores them in (`keep`), or quantized to Q8_0, Q4_K
//! or Q4_0 as they load. The embeddings, the norms and an untied output
//! matrix stay dense, as QLoRA keeps them; LoRA's parameters, gradients and
//! optimizer state are f32 whatever the base.

use crate::model::{FrozenWeight, QuantizedWeight};
use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// How the frozen base's linear weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Quantize {
    /// Dense in the model's dtype (a GGUF's blocks dequantized on load).
    #[default]
    #[serde(rename = "none")]
    None,
    /// A GGUF's weights in the block format they are stored in, never
    /// dequantized as a whole model; weights stored as floats stay dense.
    #[serde(rename = "keep")]
    Keep,
    /// Quantized to Q8_0 (blocks of 32) as they load.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Quantized to Q4_K (super-blocks of 256) as they load.
    #[serde(rename = "q4_k")]
    Q4K,
    /// Quantized to Q4_0 (blocks of 32) as they load.
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl Quantize {
    /// Every choice, with its name on the command line.
    pub const ALL: [(Quantize, &'static str); 5] = [
        (Quantize::None, "none"),
        (Quantize::Keep, "keep"),
        (Quantize::Q8_0, "q8_0"),
        (Quantize::Q4K, "q4_k"),
        (Quantize::Q4_0, "q4_0"),
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(q, _)| *q == self)
            .map_or("none", |(_, n)| n)
    }

    /// The format weights are quantized to as they load, if any.
    pub fn target(self) -> Option<GgmlDType> {
        match self {
            Quantize::Q8_0 => Some(GgmlDType::Q8_0),
            Quantize::Q4K => Some(GgmlDType::Q4K),
            Quantize::Q4_0 => Some(GgmlDType::Q4_0),
            Quantize::None | Quantize::Keep => None,
        }
    }

    /// A dense linear weight (`[out, in]`, HF name `name`) held as this choice
    /// asks: quantized to the target format, or dense where there is none or
    /// the rows are not whole blocks (then a note names the tensor).
    pub fn dense(self, name: &str, w: Tensor, notes: &mut Vec<String>) -> Result<FrozenWeight> {
        let Some(format) = self.target() else {
            return Ok(w.into());
        };
        let k = w.dims2()?.1;
        if k % format.block_size() != 0 {
            notes.push(format!(
                "{name} stays dense: its rows of {k} values are not whole {} blocks of {}",
                self.name(),
                format.block_size()
            ));
            return Ok(w.into());
        }
        Ok(QuantizedWeight::quantize(&w, format)?.into())
    }
}

impl std::fmt::Display for Quantize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantize {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let names: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
        match Self::ALL.iter().find(|(_, n)| n.eq_ignore_ascii_case(s)) {
            Some((q, _)) => Ok(*q),
            None => bail!(
                "unknown quantization {s:?}: choose one of {}",
                names.join(", ")
            ),
        }
    }
}

/// Whether the HF tensor `name` is a decoder block's linear weight, which a
/// quantized base holds in blocks.
pub fn is_block_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// The bytes of the frozen base's weights as held: `(linears, everything
/// else)`.
pub fn base_bytes(lm: &crate::CausalLm) -> (usize, usize) {
    let linears = lm
        .layers
        .iter()
        .flat_map(|b| b.linears())
        .map(|(_, l)| l.weight.storage_bytes())
        .sum();
    let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let rest = dense(&lm.embed_tokens) + lm.lm_head.as_ref().map_or(0, dense);
    (linears, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_choices() {
        for (q, name) in Quantize::ALL {
            assert_eq!(name.parse::<Quantize>().unwrap(), q);
            assert_eq!(q.to_string(), name);
        }
        let err = "q3_k".parse::<Quantize>().unwrap_err().to_string();
        assert!(err.contains("none, keep, q8_0, q4_k, q4_0"), "{err}");
    }

    #[test]
    fn rows_that_are_not_whole_blocks_stay_dense_with_a_note() {
        let mut notes = Vec::new();
        let w = crate::testing::randn(&[4, 96], 1);
        let q = Quantize::Q4K.dense("model.layers.0.mlp.down_proj.weight", w.clone(), &mut notes);
        assert!(!q.unwrap().is_quantized());
        assert!(
            notes[0].contains("mlp.down_proj") && notes[0].contains("96"),
            "{notes:?}"
        );
        let q = Quantize::Q8_0.dense("x", w, &mut notes).unwrap();
        assert!(q.is_quantized() && notes.len() == 1);
    }
}
