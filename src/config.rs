//! A model's architecture hyperparameters, read from an HF `config.json` or
//! from GGUF metadata, and written back as `config.json` for merged models.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The decoder architectures tuneforge runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM, and other Llama-family models.
    Llama,
    /// Qwen2 / Qwen2.5: Llama with q/k/v biases.
    Qwen2,
    /// Mistral: Llama with sliding-window attention (the window is not applied).
    Mistral,
}

impl Architecture {
    /// Parses an architecture name as found in config.json (`LlamaForCausalLM`),
    /// `model_type` (`llama`) or GGUF (`llama`).
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.to_ascii_lowercase();
        Ok(if n.starts_with("llama") {
            Self::Llama
        } else if n.starts_with("qwen2") {
            Self::Qwen2
        } else if n.starts_with("mistral") {
            Self::Mistral
        } else {
            bail!(
                "unsupported architecture '{name}': tuneforge runs llama, qwen2 and mistral models"
            )
        })
    }

    /// The HF class name, for config.json.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Mistral => "MistralForCausalLM",
        }
    }

    /// Whether the architecture has q/k/v biases.
    pub fn has_qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// Llama 3 rope frequency scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Overall factor.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// Architecture hyperparameters of a decoder-only model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rope base.
    pub rope_theta: f64,
    /// Llama 3 rope scaling, if any.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
}

/// The subset of an HF config.json we read. Missing required fields are errors.
#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
}

impl ModelConfig {
    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_hf_json(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses the text of an HF `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text)
            .context("config.json is missing a required field or has a wrong type")?;
        let arch_name = c
            .model_type
            .clone()
            .or_else(|| c.architectures.as_ref().and_then(|a| a.first().cloned()))
            .context("config.json names no architecture (model_type or architectures)")?;
        let architecture = Architecture::parse(&arch_name)?;
        let rope_scaling = match &c.rope_scaling {
            Some(v)
                if v.get("rope_type")
                    .or(v.get("type"))
                    .and_then(|t| t.as_str())
                    == Some("llama3") =>
            {
                Some(serde_json::from_value(v.clone()).context("reading rope_scaling")?)
            }
            Some(serde_json::Value::Null) | None => None,
            Some(v) => bail!("unsupported rope_scaling {v}: only llama3 scaling is supported"),
        };
        let eos_token_ids = match &c.eos_token_id {
            Some(serde_json::Value::Number(n)) => vec![n.as_u64().context("eos_token_id")? as u32],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        };
        Ok(Self {
            architecture,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids,
        })
    }

    /// Reads the config from GGUF metadata (`{arch}.block_count` and friends).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .context("GGUF has no general.architecture")?
            .to_string()?
            .clone();
        let architecture = Architecture::parse(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let get = |k: &str| -> Result<&gguf_file::Value> {
            md.get(&key(k))
                .with_context(|| format!("GGUF metadata has no {}", key(k)))
        };
        let usize_of = |k: &str| -> Result<usize> { Ok(get(k)?.to_u64()? as usize) };
        let num_attention_heads = usize_of("attention.head_count")?;
        let hidden_size = usize_of("embedding_length")?;
        let vocab_size = match get("vocab_size") {
            Ok(v) => v.to_u64()? as usize,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .context("GGUF has neither a vocab_size nor tokenizer.ggml.tokens")?
                .to_vec()?
                .len(),
        };
        let token = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let has_output = content.tensor_infos.contains_key("output.weight");
        Ok(Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads,
            num_key_value_heads: usize_of("attention.head_count_kv").unwrap_or(num_attention_heads),
            head_dim: usize_of("rope.dimension_count")
                .or_else(|_| usize_of("attention.key_length"))
                .unwrap_or(hidden_size / num_attention_heads),
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta: get("rope.freq_base")
                .map(|v| v.to_f32())
                .unwrap_or(Ok(10_000.0))? as f64,
            // Llama 3 GGUFs carry the scaled frequencies as a `rope_freqs.weight` tensor instead.
            rope_scaling: None,
            max_position_embeddings: usize_of("context_length")?,
            tie_word_embeddings: !has_output,
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_ids: token("tokenizer.ggml.eos_token_id").into_iter().collect(),
        })
    }

    /// The HF `config.json` for this model, as written beside merged weights.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": serde_json::to_value(self.architecture).unwrap(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
        });
        if let Some(s) = &self.rope_scaling {
            let mut s = serde_json::to_value(s).unwrap();
            s["rope_type"] = "llama3".into();
            v["rope_scaling"] = s;
        }
        if self.architecture.has_qkv_bias() {
            v["attention_bias"] = true.into();
        }
        v
    }

    /// A tiny randomly-initialisable config for fast tests and benchmarks.
    pub fn tiny(architecture: Architecture) -> Self {
        Self {
            architecture,
            vocab_size: 259,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// SmolLM2-135M's shapes, for benchmarks with random weights.
    pub fn smollm2_135m() -> Self {
        Self {
            architecture: Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// Qwen2.5-0.5B's shapes (q/k/v biases, a 151,936-token vocabulary), for
    /// benchmarks with random weights.
    pub fn qwen2_5_0_5b() -> Self {
        Self {
            architecture: Architecture::Qwen2,
            vocab_size: 151_936,
            hidden_size: 896,
            intermediate_size: 4864,
            num_hidden_layers: 24,
            num_attention_heads: 14,
            num_key_value_heads: 2,
            head_dim: 64,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: None,
            max_position_embeddings: 32_768,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![151_645],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_field_is_named() {
        let err =
            ModelConfig::from_hf_json(r#"{"model_type":"llama","vocab_size":10}"#).unwrap_err();
        assert!(format!("{err:#}").contains("hidden_size"), "{err:#}");
    }

    #[test]
    fn hf_json_round_trips() {
        for arch in [
            Architecture::Llama,
            Architecture::Qwen2,
            Architecture::Mistral,
        ] {
            let mut c = ModelConfig::tiny(arch);
            c.rope_scaling = Some(Llama3RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            });
            let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn unsupported_architecture_is_refused() {
        let err = Architecture::parse("gpt_neox").unwrap_err().to_string();
        assert!(err.contains("gpt_neox") && err.contains("llama"), "{err}");
    }
}
