//! The quantization of an exported GGUF: one type for the file, and the type
//! each tensor gets, as llama.cpp's own quantizer chooses it (its `Q4_K_M` mix
//! gives the output, half of the `attn_v` and `ffn_down` layers and a fused
//! `attn_qkv` more bits), with its fallbacks for rows a type's blocks do not fit.

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;

/// The quantization of an exported model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit blocks of 32.
    Q4_0,
    /// llama.cpp's 4-bit K-quant mix (Q4_K, with Q6_K where it matters most).
    Q4KM,
    /// 6-bit K-quants.
    Q6K,
}

impl Quant {
    /// Every quantization, by the name `--quant` takes.
    pub const ALL: [(&'static str, Quant); 7] = [
        ("f32", Self::F32),
        ("f16", Self::F16),
        ("bf16", Self::Bf16),
        ("q8_0", Self::Q8_0),
        ("q4_0", Self::Q4_0),
        ("q4_k_m", Self::Q4KM),
        ("q6_k", Self::Q6K),
    ];

    /// Parses a `--quant` name; an unknown one is an error that lists the known.
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        match Self::ALL.iter().find(|(n, _)| *n == lower) {
            Some((_, q)) => Ok(*q),
            None => bail!(
                "unknown quantization '{name}': use one of {}",
                Self::ALL.map(|(n, _)| n).join(", ")
            ),
        }
    }

    /// The name `--quant` takes.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, q)| *q == self)
            .map_or("?", |(n, _)| n)
    }

    /// llama.cpp's `general.file_type` for the file.
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q6K => 18,
            Self::Bf16 => 32,
        }
    }

    /// The type a 2-D weight named `gguf_name` (`blk.3.attn_v.weight`, ...) gets
    /// in a model of `layers` blocks, before any fallback.
    pub fn tensor_type(self, gguf_name: &str, layers: usize, tied_output: bool) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q4KM => q4_k_m_type(gguf_name, layers, tied_output),
        }
    }
}

/// Whether the tensor named `name` projects to the vocabulary: `output.weight`,
/// or the embeddings when the output is tied to them.
pub fn is_output(name: &str, tied_output: bool) -> bool {
    name == "output.weight" || (tied_output && name == "token_embd.weight")
}

/// llama.cpp's choice for `Q4_K_M` (`llama_tensor_get_type`, dense models).
fn q4_k_m_type(name: &str, layers: usize, tied_output: bool) -> GgmlDType {
    // The first and last eighth of the layers, and every third one between.
    let more_bits = |i: usize| {
        let n = layers as i64;
        let i = i as i64;
        i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
    };
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    match (is_output(name, tied_output), layer) {
        (true, _) => GgmlDType::Q6K,
        (false, Some(i)) if name.contains(".attn_v.") || name.contains(".ffn_down.") => {
            match more_bits(i) {
                true => GgmlDType::Q6K,
                false => GgmlDType::Q4K,
            }
        }
        (false, Some(_)) if name.contains(".attn_qkv.") => GgmlDType::Q5K,
        _ => GgmlDType::Q4K,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_unknown_ones_list_the_known() {
        for (name, q) in Quant::ALL {
            assert_eq!(Quant::parse(name).unwrap(), q);
            assert_eq!(q.name(), name);
        }
        let err = Quant::parse("q3_k_s").unwrap_err().to_string();
        assert!(
            err.contains("q3_k_s") && err.contains("q4_k_m, q6_k"),
            "{err}"
        );
    }

    /// Q4_K_M as llama.cpp mixes it on a 30-layer model (SmolLM2-135M).
    #[test]
    fn q4_k_m_gives_more_bits_where_llama_cpp_does() {
        let t = |name: &str| Quant::Q4KM.tensor_type(name, 30, true);
        assert_eq!(t("token_embd.weight"), GgmlDType::Q6K);
        assert_eq!(t("blk.0.attn_v.weight"), GgmlDType::Q6K);
        assert_eq!(t("blk.3.attn_v.weight"), GgmlDType::Q4K);
        assert_eq!(t("blk.5.ffn_down.weight"), GgmlDType::Q6K);
        assert_eq!(t("blk.29.ffn_down.weight"), GgmlDType::Q6K);
        assert_eq!(t("blk.4.attn_q.weight"), GgmlDType::Q4K);
        assert_eq!(t("blk.4.attn_qkv.weight"), GgmlDType::Q5K);
    }
}
