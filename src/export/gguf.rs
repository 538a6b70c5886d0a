//! A model as one GGUF file in llama.cpp's layout: its architecture's metadata
//! keys, its tensors under llama.cpp's names, with the fix-ups llama.cpp's
//! converter applies (q and k rows permuted for Llama-family models, Gemma's
//! norms stored as `1 + w`, rope factors as tensors), quantized as asked.

use super::quant::{is_output, Quant};
use crate::config::{Architecture, ModelConfig};
use crate::model::rope::inverse_frequencies;
use crate::pretrained::Model;
use crate::quantize::fallback;
use crate::weights::{gguf_name, permute, permuted_heads};
use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// A tensor that its row length kept from the type the quantization wanted.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    /// The tensor's GGUF name.
    pub tensor: String,
    /// The type the quantization wanted.
    pub wanted: GgmlDType,
    /// The type it got.
    pub got: GgmlDType,
}

/// llama.cpp's name for an architecture (`general.architecture`).
pub fn gguf_architecture(architecture: Architecture) -> &'static str {
    match architecture {
        // llama.cpp runs Mistral's dense models as Llama.
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::SmolLm3 => "smollm3",
        Architecture::Gemma3 => "gemma3",
        Architecture::Gemma2 => "gemma2",
        Architecture::Phi3 => "phi3",
    }
}

/// The `{arch}.*` and `general.*` keys of a model of `c`.
pub fn model_metadata(c: &ModelConfig, name: &str, quant: Quant) -> Vec<(String, Value)> {
    let arch = gguf_architecture(c.architecture);
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (key("vocab_size"), u32_of(c.vocab_size)),
        (key("context_length"), u32_of(c.max_position_embeddings)),
        (key("embedding_length"), u32_of(c.hidden_size)),
        (key("feed_forward_length"), u32_of(c.intermediate_size)),
        (key("block_count"), u32_of(c.num_hidden_layers)),
        (key("attention.head_count"), u32_of(c.num_attention_heads)),
        (
            key("attention.head_count_kv"),
            u32_of(c.num_key_value_heads),
        ),
        (key("attention.key_length"), u32_of(c.head_dim)),
        (key("attention.value_length"), u32_of(c.head_dim)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (key("rope.dimension_count"), u32_of(c.rotary_dim())),
    ];
    if let Some(w) = c.sliding_window {
        md.push((key("attention.sliding_window"), u32_of(w)));
        let flags = (0..c.num_hidden_layers)
            .map(|i| Value::Bool(c.sliding_layers.contains(&i)))
            .collect();
        md.push((key("attention.sliding_window_pattern"), Value::Array(flags)));
    } else if c.architecture == Architecture::Phi3 {
        // llama.cpp tells Phi-4 from Phi-3 by a window of 0.
        md.push((key("attention.sliding_window"), Value::U32(0)));
    }
    if let Some(theta) = c.rope_local_theta {
        md.push((key("rope.freq_base_swa"), Value::F32(theta as f32)));
    }
    for (k, v) in [
        ("attn_logit_softcapping", c.attn_logit_softcapping),
        ("final_logit_softcapping", c.final_logit_softcapping),
    ] {
        if let Some(v) = v {
            md.push((key(k), Value::F32(v as f32)));
        }
    }
    if let Some(lr) = &c.longrope {
        md.push((
            key("rope.scaling.original_context_length"),
            u32_of(lr.original_max_position_embeddings),
        ));
        md.push((
            key("rope.scaling.attn_factor"),
            Value::F32(lr.attention_factor as f32),
        ));
    }
    md
}

/// The model's tensors under llama.cpp's names and in its layout, f32 on the CPU.
pub fn gguf_tensors(model: &crate::model::CausalLm) -> Result<Vec<(String, Tensor)>> {
    let c = &model.config;
    let arch = c.architecture;
    let mut out = Vec::new();
    for (hf, t) in model.named_weights()? {
        let name = gguf_name(&hf, arch)
            .with_context(|| format!("{hf} has no llama.cpp name for {arch:?}"))?;
        let mut t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        if let Some(heads) = permuted_heads(&hf, c) {
            t = permute(&t, heads)?;
        } else if c.norm_weight_offset && name.ends_with("norm.weight") {
            t = (t + 1.0)?;
        }
        out.push((name, t));
    }
    let f32s = |v: &[f32]| Tensor::new(v, &Device::Cpu);
    if c.rope_scaling.is_some() {
        // Llama 3's scaled frequencies, as the factors that divide the plain ones.
        let plain = ModelConfig {
            rope_scaling: None,
            ..c.clone()
        };
        let factors: Vec<f32> = inverse_frequencies(&plain, None)
            .iter()
            .zip(inverse_frequencies(c, None))
            .map(|(p, s)| p / s)
            .collect();
        out.push(("rope_freqs.weight".into(), f32s(&factors)?));
    }
    if let Some(lr) = &c.longrope {
        for (name, factors) in [
            ("rope_factors_short.weight", &lr.short_factor),
            ("rope_factors_long.weight", &lr.long_factor),
        ] {
            let v: Vec<f32> = factors.iter().map(|&x| x as f32).collect();
            out.push((name.into(), f32s(&v)?));
        }
    }
    Ok(out)
}

/// Writes `model` (with any adapter merged in beforehand) to `path` as one
/// GGUF, quantized to `quant`, with its tokenizer and chat template. Returns
/// the tensors that fell back to another type.
pub fn write_model(model: &Model, name: &str, quant: Quant, path: &Path) -> Result<Vec<Fallback>> {
    let c = &model.lm.config;
    let mut metadata = model_metadata(c, name, quant);
    metadata.extend(super::tokenizer::metadata(model)?);
    let mut fallbacks = Vec::new();
    let mut tensors = Vec::new();
    for (name, t) in gguf_tensors(&model.lm)? {
        let dtype = match t.rank() {
            // Norms and rope factors stay f32, as llama.cpp keeps them.
            1 => GgmlDType::F32,
            _ => {
                let wanted = quant.tensor_type(&name, c.num_hidden_layers, c.tie_word_embeddings);
                let output = is_output(&name, c.tie_word_embeddings);
                match fallback(wanted, t.dim(1)?, output) {
                    Some(got) => {
                        fallbacks.push(Fallback {
                            tensor: name.clone(),
                            wanted,
                            got,
                        });
                        got
                    }
                    None => wanted,
                }
            }
        };
        let q = QTensor::quantize(&t, dtype)
            .with_context(|| format!("quantizing {name} to {dtype:?}"))?;
        tensors.push((name, q));
    }
    write(path, &metadata, &tensors)?;
    Ok(fallbacks)
}

/// Writes a GGUF file atomically.
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    candle_core::quantized::gguf_file::write(&mut bytes, &md, &ts)
        .with_context(|| format!("writing the GGUF {}", path.display()))?;
    let mut bytes = bytes.into_inner();
    for (key, value) in metadata {
        if matches!(value, Value::Array(v) if v.is_empty()) && STRING_ARRAYS.contains(&key.as_str())
        {
            type_empty_array_as_strings(&mut bytes, key)?;
        }
    }
    crate::atomic::write(path, &bytes)
}

/// The metadata arrays that llama.cpp reads only as arrays of strings.
const STRING_ARRAYS: [&str; 2] = ["tokenizer.ggml.merges", "tokenizer.ggml.tokens"];

/// candle writes an empty array as an array of u32 (it has no element to tell
/// the type by), and llama.cpp refuses merges that are not strings, even
/// none (a vocabulary of single bytes has no merges). This sets the element
/// type of the empty array under `key` to string: same size, no elements.
fn type_empty_array_as_strings(bytes: &mut [u8], key: &str) -> Result<()> {
    const ARRAY: u32 = 9;
    const U32: u32 = 4;
    const STRING: u32 = 8;
    let mut pattern = (key.len() as u64).to_le_bytes().to_vec();
    pattern.extend(key.as_bytes());
    pattern.extend(ARRAY.to_le_bytes());
    pattern.extend(U32.to_le_bytes());
    pattern.extend(0u64.to_le_bytes());
    let at = bytes
        .windows(pattern.len())
        .position(|w| w == pattern.as_slice())
        .with_context(|| format!("the empty array {key} is not where a GGUF keeps it"))?;
    let type_at = at + 8 + key.len() + 4;
    bytes[type_at..type_at + 4].copy_from_slice(&STRING.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;

    /// An empty list of merges reads back as an array of strings.
    #[test]
    fn empty_merges_are_an_array_of_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let md = vec![
            ("tokenizer.ggml.merges".to_string(), Value::Array(vec![])),
            ("other".to_string(), Value::Array(vec![])),
        ];
        write(&path, &md, &[]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let types = |key: &str| {
            let at = bytes
                .windows(key.len())
                .position(|w| w == key.as_bytes())
                .unwrap()
                + key.len();
            (
                u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()),
                u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()),
            )
        };
        assert_eq!(types("tokenizer.ggml.merges"), (9, 8));
        assert_eq!(types("other"), (9, 4));
        let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        assert!(content.metadata["tokenizer.ggml.merges"]
            .to_vec()
            .unwrap()
            .is_empty());
    }
}
