//! How the frozen base's matrices are held while training and generating
//! (QLoRA): dense in the model's dtype (`none`), in the block format the
//! GGUF file stores them in (`keep`), or quantized as they load: the decoder
//! blocks' linears to Q8_0, Q4_K or Q4_0, and the embeddings and an untied
//! output matrix to Q8_0 whatever the target (higher precision, as QLoRA
//! keeps them; a vocabulary matrix is the largest tensor of a small model,
//! so it is not left in f32). A matrix whose rows are not whole blocks of
//! the target takes the format llama.cpp's quantizer falls back to (Q4_K →
//! Q5_0), or stays dense where none fits (`holding.rs`). The norms and
//! biases stay dense. LoRA's parameters, gradients and optimizer state are
//! f32 whatever the base.
//!
//! On the CPU the base can also be held in bf16 ([`BaseDtype`], `--dtype`):
//! the same matrices in half an f32's bytes, multiplied with AMX-BF16 tile
//! products where the CPU has them, or AVX512_BF16 dot products where
//! those outrun its f32 FMAs (the other side rounded to bf16), and in f32
//! elsewhere; with a block format, what it leaves dense is
//! held in bf16.

mod holding;

pub use holding::{describe as describe_fallbacks, fallback, Fallback, Holding};

use crate::cpu::Bf16Kernel;
use crate::model::FrozenWeight;
use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// How the frozen base's matrices are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Quantize {
    /// Dense in the model's dtype (a GGUF's blocks dequantized on load).
    #[default]
    #[serde(rename = "none")]
    None,
    /// A GGUF's weights in the block format they are stored in, never
    /// dequantized as a whole model; weights stored as floats stay dense
    /// (in bf16 on a bf16 base).
    #[serde(rename = "keep")]
    Keep,
    /// Linears and vocabulary matrices quantized to Q8_0 (blocks of 32) as
    /// they load.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Linears quantized to Q4_K (super-blocks of 256) as they load; the
    /// vocabulary matrices to Q8_0.
    #[serde(rename = "q4_k")]
    Q4K,
    /// Linears quantized to Q4_0 (blocks of 32) as they load; the
    /// vocabulary matrices to Q8_0.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// Linears and vocabulary matrices in bf16 (their products with bf16
    /// dot products where the CPU has them, else in f32): a
    /// bf16 base on the CPU, asked for with [`BaseDtype::Bf16`] (`--dtype
    /// bf16`) rather than named on `--quantize`.
    #[serde(rename = "bf16")]
    Bf16,
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

    /// Its name (on the command line, but for `bf16`, which `--dtype` names).
    pub fn name(self) -> &'static str {
        match self {
            Quantize::Bf16 => "bf16",
            _ => name_of(&Self::ALL, self),
        }
    }

    /// The format the linears are quantized to as they load, if any.
    pub fn target(self) -> Option<GgmlDType> {
        match self {
            Quantize::Q8_0 => Some(GgmlDType::Q8_0),
            Quantize::Q4K => Some(GgmlDType::Q4K),
            Quantize::Q4_0 => Some(GgmlDType::Q4_0),
            Quantize::Bf16 => Some(GgmlDType::BF16),
            Quantize::None | Quantize::Keep => None,
        }
    }

    /// The format the HF tensor `name` is quantized to as it loads, if any:
    /// the target for a block's linear; for a vocabulary matrix, Q8_0 (bf16
    /// for a bf16 base).
    pub fn target_for(self, name: &str) -> Option<GgmlDType> {
        let target = self.target()?;
        match (is_block_linear(name), is_vocabulary_matrix(name)) {
            (true, _) => Some(target),
            (_, true) if self == Quantize::Bf16 => Some(target),
            (_, true) => Some(GgmlDType::Q8_0),
            _ => None,
        }
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
        parse_choice(&Self::ALL, s, "quantization")
    }
}

/// The frozen base's precision on the CPU (`--dtype`): LoRA's parameters,
/// gradients and optimizer state stay f32 whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BaseDtype {
    /// bf16 on a CPU that multiplies bf16 faster than f32 (AMX-BF16, or
    /// AVX512_BF16 whose dot products outrun its f32 FMAs:
    /// [`crate::cpu::CpuFeatures::has_bf16_arithmetic`]) and on a GPU; f32
    /// elsewhere.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// f32: exact, and the CPU's f32 FMA kernels.
    #[serde(rename = "f32")]
    F32,
    /// bf16: on the CPU the base's matrices are held in bf16 (half the
    /// memory) and multiplied with bf16 tile or dot products where the CPU has them
    /// ([`crate::cpu::CpuFeatures::bf16_kernel`]), in f32 elsewhere; on a
    /// GPU the compute dtype.
    #[serde(rename = "bf16")]
    Bf16,
}

impl BaseDtype {
    /// Every choice, with its name on the command line.
    pub const ALL: [(BaseDtype, &'static str); 3] = [
        (BaseDtype::Auto, "auto"),
        (BaseDtype::F32, "f32"),
        (BaseDtype::Bf16, "bf16"),
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }

    /// The precision used on `device`: `Auto` becomes bf16 on a GPU and on
    /// a CPU with bf16 arithmetic ([`crate::cpu::CpuFeatures`]), f32
    /// elsewhere; `F32` and `Bf16` stay.
    pub fn resolve(self, device: &Device) -> BaseDtype {
        match self {
            BaseDtype::Auto if !device.is_cpu() => BaseDtype::Bf16,
            BaseDtype::Auto if crate::cpu::features().has_bf16_arithmetic() => BaseDtype::Bf16,
            BaseDtype::Auto => BaseDtype::F32,
            chosen => chosen,
        }
    }

    /// The compute dtype on `device`: on a GPU this precision (resolved),
    /// on the CPU f32 (the activations stay f32 with a bf16 base).
    pub fn compute_dtype(self, device: &Device) -> DType {
        match self.resolve(device) {
            BaseDtype::F32 => DType::F32,
            _ => crate::device::default_dtype(device),
        }
    }

    /// How the dense base's products run on `device`, in words: for a bf16
    /// base on the CPU, the bf16 kernel's instruction set (the other side
    /// rounded to bf16) or f32 arithmetic on the bf16 values.
    pub fn arithmetic(self, device: &Device) -> String {
        match (self.resolve(device), device.is_cpu()) {
            (BaseDtype::F32, _) => "f32 products".into(),
            (_, false) => "bf16 products".into(),
            (_, true) => match crate::cpu::features().bf16_kernel() {
                Some(Bf16Kernel::AmxBf16) => {
                    "AMX-BF16 tile products, activations rounded to bf16".into()
                }
                Some(kernel) => format!("{kernel} bf16 dot products, activations rounded to bf16"),
                None => "f32 products of the bf16 values".into(),
            },
        }
    }
}

impl std::fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BaseDtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        parse_choice(&Self::ALL, s, "dtype")
    }
}

/// The command-line name of `choice` in `all`.
fn name_of<T: PartialEq>(all: &[(T, &'static str)], choice: T) -> &'static str {
    all.iter()
        .find(|(c, _)| *c == choice)
        .map_or("", |(_, n)| n)
}

/// The choice in `all` named `s` (any case), or an error that lists them.
fn parse_choice<T: Copy>(all: &[(T, &'static str)], s: &str, what: &str) -> Result<T> {
    match all.iter().find(|(_, n)| n.eq_ignore_ascii_case(s)) {
        Some((c, _)) => Ok(*c),
        None => {
            let names: Vec<&str> = all.iter().map(|(_, n)| *n).collect();
            bail!("unknown {what} {s:?}: choose one of {}", names.join(", "))
        }
    }
}

/// Whether the HF tensor `name` is a decoder block's linear weight.
pub fn is_block_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

/// Whether the HF tensor `name` is the token embeddings or the lm_head.
pub fn is_vocabulary_matrix(name: &str) -> bool {
    matches!(name, "model.embed_tokens.weight" | "lm_head.weight")
}

/// Whether a quantized base holds the HF tensor `name` in blocks: a block's
/// linear or a vocabulary matrix.
pub fn is_held_in_blocks(name: &str) -> bool {
    is_block_linear(name) || is_vocabulary_matrix(name)
}

/// How the frozen base's blocks are multiplied, where a low-precision kernel
/// reads some of them: e.g. "forward products of Q4_1 and Q8_0 blocks on
/// AVX512_VNNI int8 dot products, activations rounded to two 8-bit digits
/// per group".
/// `None` where none of them is.
pub fn block_arithmetic(lm: &crate::CausalLm) -> Option<String> {
    let matrices = lm
        .layers
        .iter()
        .flat_map(|b| b.linears().into_iter().map(|(_, l)| &l.weight))
        .chain([&lm.embed_tokens])
        .chain(lm.lm_head.as_ref());
    let mut formats: Vec<String> = matrices
        .filter_map(|w| match w {
            FrozenWeight::Quantized(q) if q.uses_int8_kernel() => Some(format_name(q.format())),
            _ => None,
        })
        .collect();
    formats.sort();
    formats.dedup();
    let kernel = crate::cpu::features().int8_kernel()?;
    let (last, rest) = formats.split_last()?;
    let formats = match rest.is_empty() {
        true => last.clone(),
        false => format!("{} and {last}", rest.join(", ")),
    };
    let products = match kernel.on_tiles() {
        true => "tile",
        false => "int8 dot",
    };
    Some(format!(
        "forward products of {formats} blocks on {kernel} {products} products, activations \
         rounded to two 8-bit digits per group"
    ))
}

/// A GGML block format's name as llama.cpp writes it: `Q4_K`, `Q8_0`.
pub fn format_name(format: GgmlDType) -> String {
    let debug = format!("{format:?}");
    match debug.strip_suffix('K') {
        Some(stem) if !stem.contains('_') => format!("{stem}_K"),
        _ => debug,
    }
}

/// The bytes of the frozen base's matrices as held: `(block linears,
/// embeddings and lm_head)`.
pub fn base_bytes(lm: &crate::CausalLm) -> (usize, usize) {
    let linears = lm
        .layers
        .iter()
        .flat_map(|b| b.linears())
        .map(|(_, l)| l.weight.storage_bytes())
        .sum();
    let rest = lm.embed_tokens.storage_bytes()
        + lm.lm_head.as_ref().map_or(0, FrozenWeight::storage_bytes);
    (linears, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats are named as llama.cpp names them.
    #[test]
    fn formats_have_llama_cpp_names() {
        for (format, name) in [
            (GgmlDType::Q4K, "Q4_K"),
            (GgmlDType::Q6K, "Q6_K"),
            (GgmlDType::Q8K, "Q8_K"),
            (GgmlDType::Q8_0, "Q8_0"),
            (GgmlDType::Q5_1, "Q5_1"),
            (GgmlDType::BF16, "BF16"),
        ] {
            assert_eq!(format_name(format), name);
        }
    }

    /// The reports name the int8 kernel for Q8_0 and Q4_0 blocks where the
    /// CPU has it, and nothing for a dense base or with the low-precision
    /// kernels off.
    #[test]
    fn block_arithmetic_names_the_int8_kernel_where_it_runs() {
        let config = crate::ModelConfig::tiny(crate::Architecture::Llama);
        let held = |quantize| {
            let (dtype, device) = (candle_core::DType::F32, candle_core::Device::Cpu);
            crate::Model::random_held(&config, 1, dtype, &device, quantize).unwrap()
        };
        let kernel = crate::cpu::features().int8_kernel();
        for (quantize, format) in [(Quantize::Q8_0, "Q8_0"), (Quantize::Q4_0, "Q4_0")] {
            let mut model = held(quantize);
            let said = block_arithmetic(&model.lm);
            match kernel {
                Some(kernel) => {
                    let said = said.unwrap();
                    assert!(
                        said.contains(format) && said.contains(kernel.name()),
                        "{said}"
                    );
                }
                None => assert_eq!(said, None),
            }
            model.lm.set_low_precision_kernels(false);
            assert_eq!(block_arithmetic(&model.lm), None);
        }
        assert_eq!(block_arithmetic(&held(Quantize::None).lm), None);
        // The tiny model's rows are not whole Q4_K blocks (256): its linears
        // fall back to Q5_0, as llama.cpp's do, beside its Q8_0 embeddings.
        let q4k = held(Quantize::Q4K);
        assert!(
            q4k.notes.iter().any(|n| n.contains("Q4_K → Q5_0")),
            "{:?}",
            q4k.notes
        );
        let said = block_arithmetic(&q4k.lm);
        assert_eq!(said.is_some(), kernel.is_some());
        assert!(
            said.is_none_or(|s| s.contains("of Q5_0 and Q8_0 blocks")),
            "Q5_0 and Q8_0"
        );
    }

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_choices() {
        for (q, name) in Quantize::ALL {
            assert_eq!(name.parse::<Quantize>().unwrap(), q);
            assert_eq!(q.to_string(), name);
        }
        let err = "q3_k".parse::<Quantize>().unwrap_err().to_string();
        assert!(err.contains("none, keep, q8_0, q4_k, q4_0"), "{err}");
    }

    /// The linears go to the target; the vocabulary matrices to Q8_0.
    #[test]
    fn vocabulary_matrices_are_held_in_q8_0() {
        let linear = "model.layers.3.self_attn.q_proj.weight";
        assert_eq!(Quantize::Q4K.target_for(linear), Some(GgmlDType::Q4K));
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            assert_eq!(Quantize::Q4_0.target_for(name), Some(GgmlDType::Q8_0));
            assert_eq!(Quantize::Keep.target_for(name), None);
        }
        assert_eq!(Quantize::Q4K.target_for("model.norm.weight"), None);
    }

    /// A bf16 base holds every matrix a quantized base would in bf16, and
    /// only on the CPU; `auto` follows the CPU's bf16 arithmetic.
    #[test]
    fn a_bf16_base_holds_its_matrices_in_bf16_on_the_cpu() {
        let cpu = Device::Cpu;
        for name in ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"] {
            assert_eq!(Quantize::Bf16.target_for(name), Some(GgmlDType::BF16));
        }
        assert_eq!(Quantize::Bf16.target_for("model.norm.weight"), None);
        let holding = |quantize, bf16| Holding { quantize, bf16 };
        assert_eq!(
            BaseDtype::Bf16.holding(Quantize::None, &cpu),
            holding(Quantize::Bf16, true)
        );
        assert_eq!(
            BaseDtype::Bf16.holding(Quantize::Q4K, &cpu),
            holding(Quantize::Q4K, true)
        );
        assert_eq!(
            BaseDtype::F32.holding(Quantize::None, &cpu),
            holding(Quantize::None, false)
        );
        assert_eq!(Holding::from(Quantize::Bf16), holding(Quantize::Bf16, true));
        assert_eq!(BaseDtype::Bf16.compute_dtype(&cpu), DType::F32);
        let auto = match crate::cpu::features().has_bf16_arithmetic() {
            true => BaseDtype::Bf16,
            false => BaseDtype::F32,
        };
        assert_eq!(BaseDtype::Auto.resolve(&cpu), auto);
        for (d, name) in BaseDtype::ALL {
            assert_eq!(name.parse::<BaseDtype>().unwrap(), d);
            assert_eq!(d.to_string(), name);
        }
        let err = "f16".parse::<BaseDtype>().unwrap_err().to_string();
        assert!(err.contains("auto, f32, bf16"), "{err}");
        let err = "bf16".parse::<Quantize>().unwrap_err().to_string();
        assert!(err.contains("none, keep"), "--dtype names bf16: {err}");
    }
}
