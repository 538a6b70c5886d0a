//! How each frozen matrix is held as it loads ([`Holding`]): in the
//! format `--quantize` asks for; where its rows are not whole blocks of that
//! format, in the format llama.cpp's quantizer falls back to ([`fallback`]);
//! and where none fits, or nothing was asked, in bf16 on a bf16 base or as
//! loaded. The matrices that fell back are summed up a line per kind
//! ([`describe`]).

use super::{is_held_in_blocks, BaseDtype, Quantize};
use crate::model::quantized::is_held_format;
use crate::model::{FrozenWeight, QuantizedWeight};
use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// How the frozen base's matrices are held as they load: `quantize`'s
/// format (or llama.cpp's fallback for it), and whatever that leaves
/// dense in bf16 where `bf16` (a bf16 base on the CPU), else as loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// The block format asked for.
    pub quantize: Quantize,
    /// Whether the matrices left dense are held in bf16.
    pub bf16: bool,
}

impl From<Quantize> for Holding {
    /// `quantize` alone: the matrices it leaves dense stay as loaded, but
    /// for [`Quantize::Bf16`], which holds them in bf16.
    fn from(quantize: Quantize) -> Self {
        Self {
            quantize,
            bf16: quantize == Quantize::Bf16,
        }
    }
}

impl BaseDtype {
    /// How the base's matrices are held on `device` given `quantize`: on
    /// the CPU, a bf16 base holds in bf16 what `quantize` leaves dense
    /// ([`Quantize::Bf16`] where it asks for nothing); otherwise `quantize`
    /// as it is.
    pub fn holding(self, quantize: Quantize, device: &Device) -> Holding {
        let bf16 = device.is_cpu() && self.resolve(device) == BaseDtype::Bf16;
        Holding {
            quantize: match (bf16, quantize) {
                (true, Quantize::None) => Quantize::Bf16,
                _ => quantize,
            },
            bf16,
        }
    }
}

/// A matrix held in another format than the one asked for, as its rows are
/// not whole blocks of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    /// The HF name.
    pub name: String,
    /// Its row length.
    pub row_len: usize,
    /// The format asked for.
    pub wanted: GgmlDType,
    /// The format it is held in: a block format, or BF16 on a bf16 base
    /// (`None`: dense, as loaded).
    pub held: Option<GgmlDType>,
}

impl Holding {
    /// The dense matrix `w` (`[out, in]`, HF name `name`) held as asked: in
    /// [`Quantize::target_for`]'s format; where its rows are not whole
    /// blocks of it, in llama.cpp's fallback format ([`fallback`]) or,
    /// where even that does not fit, dense (either way pushed onto
    /// `fallbacks`); with no format asked for, dense. Dense matrices that a
    /// quantized base would hold in blocks ([`is_held_in_blocks`]) are in
    /// bf16 where [`Holding::bf16`].
    pub fn hold(
        self,
        name: &str,
        w: Tensor,
        fallbacks: &mut Vec<Fallback>,
    ) -> Result<FrozenWeight> {
        // Where a dense matrix goes: bf16, or as it is.
        let dense = (self.bf16 && is_held_in_blocks(name)).then_some(GgmlDType::BF16);
        let Some(wanted) = self.quantize.target_for(name) else {
            return held_as(w, dense);
        };
        let row_len = w.dims2()?.1;
        let Some(next) = fallback(wanted, row_len, false) else {
            return held_as(w, Some(wanted));
        };
        let held = Some(next).filter(|&f| is_held_format(f)).or(dense);
        fallbacks.push(Fallback {
            name: name.to_string(),
            row_len,
            wanted,
            held,
        });
        held_as(w, held)
    }

    /// What happens to the matrices it holds dense, in words: `stay dense`,
    /// or `are held in bf16`.
    pub fn dense_words(self) -> &'static str {
        match self.bf16 {
            true => "are held in bf16",
            false => "stay dense",
        }
    }
}

/// `w` in `format`, or as it is.
fn held_as(w: Tensor, format: Option<GgmlDType>) -> Result<FrozenWeight> {
    Ok(match format {
        Some(format) => QuantizedWeight::quantize(&w, format)?.into(),
        None => w.into(),
    })
}

/// `fallbacks` in a line per kind: the format asked for and the one taken,
/// how many matrices and which (the part of their names after the layer,
/// with the layers' count), and why.
pub fn describe(fallbacks: &[Fallback]) -> Vec<String> {
    type Kind = (String, String, usize, usize);
    let mut kinds: BTreeMap<Kind, BTreeMap<String, usize>> = BTreeMap::new();
    for f in fallbacks {
        let took = match f.held {
            Some(format) => super::format_name(format),
            None => "dense".to_string(),
        };
        let (wanted, block) = (super::format_name(f.wanted), f.wanted.block_size());
        *kinds
            .entry((wanted, took, f.row_len, block))
            .or_default()
            .entry(strip_layer(&f.name))
            .or_default() += 1;
    }
    kinds
        .into_iter()
        .map(|((wanted, took, row_len, block), names)| {
            let count: usize = names.values().sum();
            let names: Vec<String> = names
                .into_iter()
                .map(|(n, layers)| match layers {
                    1 => n,
                    layers => format!("{n} in {layers} layers"),
                })
                .collect();
            let (noun, their) = match count {
                1 => ("matrix", "its"),
                _ => ("matrices", "their"),
            };
            format!(
                "{wanted} → {took} for {count} {noun} ({}): {their} rows of {row_len} values \
                 are not whole {wanted} blocks of {block}, as llama.cpp's quantizer falls back",
                names.join(", ")
            )
        })
        .collect()
}

/// `model.layers.12.mlp.up_proj.weight` → `mlp.up_proj`; other names
/// without `.weight`.
fn strip_layer(name: &str) -> String {
    let name = name.strip_suffix(".weight").unwrap_or(name);
    match name.strip_prefix("model.layers.") {
        Some(rest) => rest.split_once('.').map_or(rest, |(_, r)| r).to_string(),
        None => name.to_string(),
    }
}

/// The type a tensor whose rows hold `row_len` values can take instead of
/// `wanted`, as llama.cpp falls back (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
/// and f16 where even those blocks do not fit); `None` when `wanted` fits.
/// The output tensor falls back to Q8_0, as llama.cpp's does.
pub fn fallback(wanted: GgmlDType, row_len: usize, output: bool) -> Option<GgmlDType> {
    let fits = |t: GgmlDType| row_len.is_multiple_of(t.block_size());
    if fits(wanted) {
        return None;
    }
    let next = match (output, wanted) {
        (true, _) => GgmlDType::Q8_0,
        (_, GgmlDType::Q4K) => GgmlDType::Q5_0,
        (_, GgmlDType::Q5K) => GgmlDType::Q5_1,
        (_, GgmlDType::Q6K) => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    Some(if fits(next) { next } else { GgmlDType::F16 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;

    /// The format each matrix is held in (`None`: dense).
    fn format(held: &FrozenWeight) -> Option<GgmlDType> {
        match held {
            FrozenWeight::Quantized(q) => Some(q.format()),
            FrozenWeight::Dense(_) => None,
        }
    }

    /// Rows that are not whole Q4_K blocks take Q5_0, as llama.cpp's; rows
    /// that are not whole blocks of 32 either stay dense (in bf16 on a bf16
    /// base); what asks for no blocks gets none; and each fallback is
    /// counted in one line per kind.
    #[test]
    fn rows_that_are_not_whole_blocks_fall_back_as_llama_cpp_does() {
        let mut fallbacks = Vec::new();
        let q4k = Holding::from(Quantize::Q4K);
        let mut hold = |holding: Holding, name: &str, k: usize| {
            let held = holding.hold(name, randn(&[4, k], 1), &mut fallbacks);
            format(&held.unwrap())
        };
        let down = |layer: usize| format!("model.layers.{layer}.mlp.down_proj.weight");
        assert_eq!(hold(q4k, &down(0), 256), Some(GgmlDType::Q4K));
        assert_eq!(hold(q4k, &down(0), 96), Some(GgmlDType::Q5_0));
        assert_eq!(hold(q4k, &down(1), 96), Some(GgmlDType::Q5_0));
        assert_eq!(hold(q4k, &down(2), 40), None);
        let bf16 = Holding {
            quantize: Quantize::Q4K,
            bf16: true,
        };
        assert_eq!(hold(bf16, &down(3), 40), Some(GgmlDType::BF16));
        assert_eq!(hold(bf16, "model.norm.weight", 40), None);
        let q8 = Holding::from(Quantize::Q8_0);
        assert_eq!(hold(q8, "x", 96), None, "not a matrix held in blocks");
        assert_eq!(hold(q8, "lm_head.weight", 96), Some(GgmlDType::Q8_0));
        let lines = describe(&fallbacks);
        assert_eq!(
            lines,
            [
                "Q4_K → BF16 for 1 matrix (mlp.down_proj): its rows of 40 values are not \
                 whole Q4_K blocks of 256, as llama.cpp's quantizer falls back",
                "Q4_K → Q5_0 for 2 matrices (mlp.down_proj in 2 layers): their rows of 96 \
                 values are not whole Q4_K blocks of 256, as llama.cpp's quantizer falls back",
                "Q4_K → dense for 1 matrix (mlp.down_proj): its rows of 40 values are not \
                 whole Q4_K blocks of 256, as llama.cpp's quantizer falls back",
            ]
        );
    }

    #[test]
    fn rows_the_blocks_do_not_fit_fall_back_as_llama_cpp_does() {
        // SmolLM2's rows of 576 fit blocks of 32, not of 256.
        assert_eq!(fallback(GgmlDType::Q4K, 576, false), Some(GgmlDType::Q5_0));
        assert_eq!(fallback(GgmlDType::Q6K, 576, false), Some(GgmlDType::Q8_0));
        assert_eq!(fallback(GgmlDType::Q6K, 576, true), Some(GgmlDType::Q8_0));
        assert_eq!(fallback(GgmlDType::Q4K, 1536, false), None);
        assert_eq!(fallback(GgmlDType::Q8_0, 40, false), Some(GgmlDType::F16));
    }
}
