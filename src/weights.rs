//! Weights in HF layout, whatever file they came from: safetensors (f32, bf16,
//! f16) or GGUF (dequantized, with llama.cpp's q/k row permutation undone), so
//! that everything downstream (rope, adapters, merging) sees one layout.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{Architecture, ModelConfig};

/// Named tensors in HF layout (`model.layers.0.self_attn.q_proj.weight`, ...).
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    origin: String,
}

impl Weights {
    /// Wraps a map of HF-named tensors; `origin` names their source in errors.
    pub fn new(tensors: HashMap<String, Tensor>, origin: impl Into<String>) -> Self {
        Self {
            tensors,
            origin: origin.into(),
        }
    }

    /// Takes a tensor out by HF name, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .with_context(|| format!("{} has no tensor {name}", self.origin))?;
        if t.dims() != shape {
            bail!(
                "tensor {name} in {} has shape {:?}, but the config asks for {shape:?}",
                self.origin,
                t.dims()
            );
        }
        Ok(t)
    }

    /// Takes a tensor if present (optional weights such as biases or an untied lm_head).
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reads a tensor without taking it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The names of the tensors not taken yet.
    pub fn remaining(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// Loads HF-layout safetensors files, converting to `dtype`.
    pub fn from_safetensors(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            let loaded = candle_core::safetensors::load(path, &Device::Cpu)
                .with_context(|| format!("reading safetensors {}", path.display()))?;
            for (name, t) in loaded {
                let t = t.to_dtype(dtype)?.to_device(device)?;
                tensors.insert(name, t);
            }
        }
        let origin = paths
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(Self::new(tensors, origin))
    }

    /// Loads and dequantizes a GGUF file's tensors into HF names and layout.
    pub fn from_gguf(
        path: &Path,
        content: &gguf_file::Content,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_gguf_size(path, content)?;
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let permuted = config.architecture.gguf_permutes_qk();
        let mut tensors = HashMap::new();
        let mut rope_freqs = None;
        for name in content.tensor_infos.keys() {
            if name == "rope_freqs.weight" {
                rope_freqs = Some(name.clone());
                continue;
            }
            let hf = hf_name(name, config.architecture).with_context(|| {
                format!(
                    "{}: unexpected tensor {name} for a {:?} model",
                    path.display(),
                    config.architecture
                )
            })?;
            let q = content
                .tensor(&mut file, name, &Device::Cpu)
                .with_context(|| format!("reading tensor {name} from {}", path.display()))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .with_context(|| format!("dequantizing tensor {name} ({:?})", q.dtype()))?;
            if permuted && hf.ends_with("q_proj.weight") {
                t = unpermute(&t, config.num_attention_heads)?;
            } else if permuted && hf.ends_with("k_proj.weight") {
                t = unpermute(&t, config.num_key_value_heads)?;
            } else if config.norm_weight_offset && hf.ends_with("norm.weight") {
                // llama.cpp stores Gemma's norms as 1 + w; HF layout keeps w.
                t = (t - 1.0)?;
            }
            tensors.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
        }
        if let Some(name) = rope_freqs {
            let t = content
                .tensor(&mut file, &name, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            tensors.insert(ROPE_FREQS.to_string(), t);
        }
        Ok(Self::new(tensors, path.display().to_string()))
    }
}

/// Writes named tensors to a safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .with_context(|| format!("serialising {}", path.display()))?;
    crate::atomic::write(path, &bytes)
}

/// Where Llama 3 GGUFs' rope frequency factors are kept among the weights.
pub const ROPE_FREQS: &str = "rope_freqs";

/// Fails with a clear message when the file is shorter than its tensor table says.
fn check_gguf_size(path: &Path, content: &gguf_file::Content) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    let needed = content
        .tensor_infos
        .values()
        .map(|t| {
            let bytes = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
            content.tensor_data_offset + t.offset + bytes as u64
        })
        .max()
        .unwrap_or(0);
    if len < needed {
        bail!(
            "{} is truncated: its tensors need {needed} bytes but the file has {len}. \
             Delete it and download it again.",
            path.display()
        );
    }
    Ok(())
}

/// Maps a GGUF tensor name to its HF name for `architecture` (Gemma's norms
/// around attention and MLP are named apart).
pub fn hf_name(gguf: &str, architecture: Architecture) -> Option<String> {
    let gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's row permutation of q_proj/k_proj: GGUF interleaves the
/// two rotary halves of each head; HF keeps them as contiguous halves.
pub fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_heads / 2;
    Ok(w.reshape((n_heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of [`unpermute`], as llama.cpp's converter applies it.
pub fn permute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_heads / 2;
    Ok(w.reshape((n_heads, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight", Architecture::Llama).unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.2.attn_q_norm.weight", Architecture::Llama).unwrap(),
            "model.layers.2.self_attn.q_norm.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias", Architecture::Llama).unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("token_embd.weight", Architecture::Llama).unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.0.mystery.weight", Architecture::Llama).is_none());
    }

    #[test]
    fn unpermute_inverts_permute() {
        let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let p = permute(&w, 2).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        // Head 0 rows [0,1,2,3] are interleaved as [0,2,1,3] by llama.cpp.
        assert_eq!(
            p.get(1).unwrap().to_vec1::<f32>().unwrap(),
            w.get(2).unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            unpermute(&p, 2).unwrap().to_vec2::<f32>().unwrap(),
            w.to_vec2::<f32>().unwrap()
        );
    }
}
