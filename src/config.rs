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
    /// Qwen3: Llama with a per-head RMSNorm on q and k before rope.
    Qwen3,
    /// SmolLM3: Llama with rope left out on the layers `no_rope_layers` marks.
    #[serde(rename = "smollm3")]
    SmolLm3,
    /// Gemma 3: Gemma 2's block with q/k norms and a rope base of its own on
    /// the sliding-window layers.
    Gemma3,
    /// Gemma 2: scaled embeddings, `(1 + w)` norms around attention and MLP,
    /// GeGLU, sliding-window layers, soft-capped attention and logits.
    Gemma2,
}

/// The architectures tuneforge runs, as config.json's `model_type` and GGUF name them.
pub const ARCHITECTURES: [&str; 7] = [
    "llama", "qwen2", "mistral", "qwen3", "smollm3", "gemma3", "gemma2",
];

/// The MLP's activation: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU.
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Architecture {
    /// Every architecture tuneforge runs.
    pub const ALL: [Architecture; 7] = [
        Self::Llama,
        Self::Qwen2,
        Self::Mistral,
        Self::Qwen3,
        Self::SmolLm3,
        Self::Gemma3,
        Self::Gemma2,
    ];

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
        } else if n.starts_with("qwen3")
            && !n.starts_with("qwen3moe")
            && !n.starts_with("qwen3_moe")
        {
            Self::Qwen3
        } else if n.starts_with("smollm3") {
            Self::SmolLm3
        } else if n.starts_with("gemma3") && !n.starts_with("gemma3n") {
            Self::Gemma3
        } else if n.starts_with("gemma2") {
            Self::Gemma2
        } else {
            bail!(
                "unsupported architecture '{name}': tuneforge runs {}",
                ARCHITECTURES.join(", ")
            )
        })
    }

    /// The HF class name, for config.json.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::SmolLm3 => "SmolLM3ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
            Self::Gemma2 => "Gemma2ForCausalLM",
        }
    }

    /// The HF `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Mistral => "mistral",
            Self::Qwen3 => "qwen3",
            Self::SmolLm3 => "smollm3",
            Self::Gemma3 => "gemma3_text",
            Self::Gemma2 => "gemma2",
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Gemma2)
    }

    /// Whether llama.cpp's converter permutes the rows of q and k for this
    /// architecture (its Llama-family models), which loading undoes.
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Self::Llama | Self::Mistral | Self::SmolLm3)
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
    /// Layers that apply no rope to q and k (SmolLM3's `no_rope_layers` zeros).
    #[serde(default)]
    pub no_rope_layers: Vec<usize>,
    /// A per-head RMSNorm on q and k before rope (`q_norm`, `k_norm`: Qwen3, Gemma 3).
    #[serde(default)]
    pub qk_norm: bool,
    /// RMSNorms on the attention's and the MLP's outputs too, before each
    /// residual sum (Gemma's sandwich norms).
    #[serde(default)]
    pub sandwich_norms: bool,
    /// RMSNorm weights are stored as offsets from one, `x̂ · (1 + w)` (Gemma).
    #[serde(default)]
    pub norm_weight_offset: bool,
    /// Embeddings are multiplied by √hidden (Gemma).
    #[serde(default)]
    pub scale_embeddings: bool,
    /// The MLP's activation.
    #[serde(default)]
    pub hidden_act: Activation,
    /// Attention scores are scaled by `1/√query_pre_attn_scalar` instead of
    /// `1/√head_dim` (Gemma).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// The window of the sliding-window layers: a query sees itself and the
    /// `window - 1` positions before it.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// The layers with sliding-window attention (`layer_types`).
    #[serde(default)]
    pub sliding_layers: Vec<usize>,
    /// The rope base of the sliding-window layers, where it differs (Gemma 3).
    #[serde(default)]
    pub rope_local_theta: Option<f64>,
    /// Attention scores become `c · tanh(s / c)` (Gemma 2).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Logits become `c · tanh(z / c)` (Gemma 2).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
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
    /// The older schema: the rope base and scaling at the top level.
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5: `{rope_theta, rope_type, ...}`.
    rope_parameters: Option<serde_json::Value>,
    no_rope_layers: Option<Vec<u8>>,
    no_rope_layer_interval: Option<usize>,
    rope_local_base_freq: Option<f64>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    #[serde(rename = "_sliding_window_pattern", alias = "sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
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
        // transformers 5 keeps the rope base and any scaling in `rope_parameters`;
        // older configs keep `rope_theta` and `rope_scaling` at the top level.
        // Gemma 3 gives each layer type its own: the sliding layers' base is local.
        let per_type = c
            .rope_parameters
            .as_ref()
            .filter(|p| p.get("full_attention").is_some());
        let (rope_field, rope) = match (per_type, &c.rope_parameters, &c.rope_scaling) {
            (Some(p), _, _) => ("rope_parameters.full_attention", p.get("full_attention")),
            (_, Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
            (_, _, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
            _ => ("rope_scaling", None),
        };
        let rope_local_theta = match per_type.and_then(|p| p.get("sliding_attention")) {
            Some(local) => {
                let kind = local
                    .get("rope_type")
                    .and_then(|t| t.as_str())
                    .unwrap_or("default");
                if kind != "default" {
                    bail!("rope_parameters.sliding_attention.rope_type '{kind}': not implemented (tuneforge implements default there)");
                }
                Some(
                    local
                        .get("rope_theta")
                        .and_then(|t| t.as_f64())
                        .context("rope_parameters.sliding_attention has no rope_theta")?,
                )
            }
            None => c.rope_local_base_freq,
        };
        let rope_type = rope.and_then(|v| v.get("rope_type").or(v.get("type")));
        let rope_scaling = match rope_type.map(|t| t.as_str()) {
            None | Some(Some("default")) => None,
            Some(Some("llama3")) => Some(
                serde_json::from_value(rope.cloned().unwrap_or_default())
                    .with_context(|| format!("reading {rope_field}"))?,
            ),
            Some(t) => bail!(
                "{rope_field}.rope_type {}: not implemented (tuneforge implements default and llama3)",
                t.map_or("(not a string)".into(), |t| format!("'{t}'"))
            ),
        };
        let rope_theta = match rope.and_then(|v| v.get("rope_theta")) {
            Some(v) => Some(
                v.as_f64()
                    .context("rope_parameters.rope_theta is not a number")?,
            ),
            None => c.rope_theta,
        };
        let no_rope_layers = match (&c.no_rope_layers, architecture) {
            (Some(flags), _) => {
                if flags.len() != c.num_hidden_layers || flags.iter().any(|&f| f > 1) {
                    bail!(
                        "no_rope_layers must hold a 0 or 1 for each of the {} layers, not {flags:?}",
                        c.num_hidden_layers
                    );
                }
                (0..flags.len()).filter(|&i| flags[i] == 0).collect()
            }
            // transformers' default: rope is left out of every interval-th layer.
            (None, Architecture::SmolLm3) => {
                let every = c.no_rope_layer_interval.unwrap_or(4).max(1);
                (0..c.num_hidden_layers)
                    .filter(|i| (i + 1) % every == 0)
                    .collect()
            }
            (None, _) => Vec::new(),
        };
        let gemma = architecture.is_gemma();
        let hidden_act = match (c.hidden_activation.as_deref(), c.hidden_act.as_deref()) {
            (Some("gelu_pytorch_tanh"), _) | (None, Some("gelu_pytorch_tanh")) => {
                Activation::GeluTanh
            }
            (Some("silu"), _) | (None, Some("silu")) => Activation::Silu,
            (None, None) if gemma => Activation::GeluTanh,
            (None, None) => Activation::Silu,
            (Some(other), _) => {
                bail!("hidden_activation '{other}': not implemented (silu, gelu_pytorch_tanh)")
            }
            (None, Some(other)) => {
                bail!("hidden_act '{other}': not implemented (silu, gelu_pytorch_tanh)")
            }
        };
        let sliding_layers = match (&c.layer_types, c.sliding_window) {
            (_, None) => Vec::new(),
            (Some(types), Some(_)) => {
                if types.len() != c.num_hidden_layers {
                    bail!(
                        "layer_types has {} entries for {} layers",
                        types.len(),
                        c.num_hidden_layers
                    );
                }
                let mut sliding = Vec::new();
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "sliding_attention" => sliding.push(i),
                        "full_attention" => {}
                        other => bail!("layer_types[{i}] '{other}': not implemented (sliding_attention, full_attention)"),
                    }
                }
                sliding
            }
            // transformers' defaults: Gemma 2 alternates, Gemma 3 has one full layer in six.
            (None, Some(_)) if gemma => {
                let every = match architecture {
                    Architecture::Gemma2 => 2,
                    _ => c.sliding_window_pattern.unwrap_or(6).max(1),
                };
                (0..c.num_hidden_layers)
                    .filter(|i| (i + 1) % every != 0)
                    .collect()
            }
            // Mistral's window is not applied (see [`Architecture::Mistral`]).
            (None, Some(_)) => Vec::new(),
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
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids,
            no_rope_layers,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            sandwich_norms: gemma,
            norm_weight_offset: gemma,
            scale_embeddings: gemma,
            hidden_act,
            query_pre_attn_scalar: c.query_pre_attn_scalar.filter(|_| gemma),
            sliding_window: c.sliding_window.filter(|_| !sliding_layers.is_empty()),
            sliding_layers,
            rope_local_theta: rope_local_theta.filter(|_| architecture == Architecture::Gemma3),
            attn_logit_softcapping: c.attn_logit_softcapping.filter(|_| gemma),
            final_logit_softcapping: c.final_logit_softcapping.filter(|_| gemma),
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
        let num_hidden_layers = usize_of("block_count")?;
        // llama.cpp runs SmolLM3 without rope on every fourth layer, as
        // transformers' default does; its converter writes no key for it.
        let no_rope_layers = match architecture {
            Architecture::SmolLm3 => (0..num_hidden_layers)
                .filter(|i| (i + 1) % 4 == 0)
                .collect(),
            _ => Vec::new(),
        };
        let head_dim = usize_of("rope.dimension_count")
            .or_else(|_| usize_of("attention.key_length"))
            .unwrap_or(hidden_size / num_attention_heads);
        let f32_of = |k: &str| get(k).ok().map(|v| v.to_f32()).transpose();
        let gemma = architecture.is_gemma();
        // As llama.cpp reads Gemma: sliding layers from an optional pattern (an
        // array of flags, or one full layer in every N: 6 for Gemma 3, 2 for Gemma 2),
        // the local rope base (10,000 unless given), and the attention scale
        // 1/√head_dim (1/√(hidden/heads) for the 27B models).
        let sliding_window = usize_of("attention.sliding_window").ok().filter(|_| gemma);
        let sliding_layers = match (sliding_window, get("attention.sliding_window_pattern")) {
            (None, _) => Vec::new(),
            (Some(_), Ok(gguf_file::Value::Array(flags))) => (0..num_hidden_layers)
                .filter(|&i| flags.get(i).and_then(|f| f.to_bool().ok()).unwrap_or(false))
                .collect(),
            (Some(_), pattern) => {
                let default = if architecture == Architecture::Gemma2 {
                    2
                } else {
                    6
                };
                let every = pattern
                    .ok()
                    .and_then(|p| p.to_u32().ok())
                    .map_or(default, |p| p as usize);
                (0..num_hidden_layers)
                    .filter(|i| (i + 1) % every.max(1) != 0)
                    .collect()
            }
        };
        let big = matches!(
            (architecture, num_hidden_layers),
            (Architecture::Gemma3, 62) | (Architecture::Gemma2, 46)
        );
        let query_pre_attn_scalar = gemma.then_some(if big {
            (hidden_size / num_attention_heads) as f64
        } else {
            head_dim as f64
        });
        Ok(Self {
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            sandwich_norms: gemma,
            norm_weight_offset: gemma,
            scale_embeddings: gemma,
            hidden_act: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            query_pre_attn_scalar,
            sliding_window: sliding_window.filter(|_| !sliding_layers.is_empty()),
            sliding_layers,
            rope_local_theta: (architecture == Architecture::Gemma3)
                .then(|| f32_of("rope.freq_base_swa").map(|v| v.unwrap_or(10_000.0) as f64))
                .transpose()?,
            attn_logit_softcapping: f32_of("attn_logit_softcapping")?
                .map(f64::from)
                .filter(|&c| c > 0.0),
            final_logit_softcapping: f32_of("final_logit_softcapping")?
                .map(f64::from)
                .filter(|&c| c > 0.0),
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: usize_of("attention.head_count_kv").unwrap_or(num_attention_heads),
            head_dim,
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
            no_rope_layers,
        })
    }

    /// The HF `config.json` for this model, as written beside merged weights.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
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
        if self.hidden_act == Activation::GeluTanh {
            v["hidden_act"] = "gelu_pytorch_tanh".into();
            v["hidden_activation"] = "gelu_pytorch_tanh".into();
        }
        if let Some(w) = self.sliding_window {
            v["sliding_window"] = w.into();
            let types: Vec<&str> = (0..self.num_hidden_layers)
                .map(|i| match self.sliding_layers.contains(&i) {
                    true => "sliding_attention",
                    false => "full_attention",
                })
                .collect();
            v["layer_types"] = types.into();
        }
        for (key, value) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("rope_local_base_freq", self.rope_local_theta),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(x) = value {
                v[key] = x.into();
            }
        }
        if self.architecture == Architecture::SmolLm3 {
            let flags: Vec<u8> = (0..self.num_hidden_layers)
                .map(|i| u8::from(!self.no_rope_layers.contains(&i)))
                .collect();
            v["no_rope_layers"] = flags.into();
        }
        v
    }

    /// Whether layer `i` applies rope to q and k.
    pub fn layer_uses_rope(&self, i: usize) -> bool {
        !self.no_rope_layers.contains(&i)
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
            no_rope_layers: match architecture {
                Architecture::SmolLm3 => vec![1],
                _ => Vec::new(),
            },
            ..Self::switches_of(architecture, 2, 8)
        }
    }

    /// The architecture's own switches for a model of `layers` blocks and
    /// `head_dim`, as transformers' defaults set them (Gemma: a sliding window of
    /// 4 on all but every other layer in tiny models): a base for the
    /// shape constructors.
    fn switches_of(architecture: Architecture, layers: usize, head_dim: usize) -> Self {
        let gemma = architecture.is_gemma();
        let sliding_layers: Vec<usize> = match gemma {
            true => (0..layers).filter(|i| (i + 1) % 2 != 0).collect(),
            false => Vec::new(),
        };
        Self {
            architecture,
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_hidden_layers: layers,
            num_attention_heads: 0,
            num_key_value_heads: 0,
            head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 0,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            no_rope_layers: Vec::new(),
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            sandwich_norms: gemma,
            norm_weight_offset: gemma,
            scale_embeddings: gemma,
            hidden_act: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            query_pre_attn_scalar: gemma.then_some(head_dim as f64),
            sliding_window: gemma.then_some(4),
            sliding_layers,
            rope_local_theta: (architecture == Architecture::Gemma3).then_some(10_000.0),
            attn_logit_softcapping: (architecture == Architecture::Gemma2).then_some(50.0),
            final_logit_softcapping: (architecture == Architecture::Gemma2).then_some(30.0),
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
            no_rope_layers: Vec::new(),
            ..Self::switches_of(Architecture::Llama, 30, 64)
        }
    }

    /// Qwen3-0.6B's shapes (q/k norms, 128-wide heads), for benchmarks with random weights.
    pub fn qwen3_0_6b() -> Self {
        Self {
            vocab_size: 151_936,
            hidden_size: 1024,
            intermediate_size: 3072,
            num_attention_heads: 16,
            num_key_value_heads: 8,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40_960,
            eos_token_ids: vec![151_645],
            ..Self::switches_of(Architecture::Qwen3, 28, 128)
        }
    }

    /// Gemma-3-270M's shapes (a 262,144-token vocabulary, one kv head of 256,
    /// five sliding-window layers of 512 in every six), for benchmarks with random weights.
    pub fn gemma3_270m() -> Self {
        let layers = 18;
        Self {
            vocab_size: 262_144,
            hidden_size: 640,
            intermediate_size: 2048,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32_768,
            bos_token_id: Some(2),
            eos_token_ids: vec![1, 106],
            sliding_window: Some(512),
            sliding_layers: (0..layers).filter(|i| (i + 1) % 6 != 0).collect(),
            ..Self::switches_of(Architecture::Gemma3, layers, 256)
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
            no_rope_layers: Vec::new(),
            ..Self::switches_of(Architecture::Qwen2, 24, 64)
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
        for arch in Architecture::ALL {
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
        assert!(err.contains("qwen3") && err.contains("smollm3"), "{err}");
        assert!(Architecture::parse("Qwen3MoeForCausalLM").is_err());
    }

    /// A Qwen3 config in transformers 5's schema and in the older one.
    fn qwen3(rope: &str) -> String {
        format!(
            r#"{{"model_type": "qwen3", "vocab_size": 259, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 256, {rope}}}"#
        )
    }

    #[test]
    fn both_config_schemas_give_the_rope_base() {
        let new = qwen3(r#""rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}"#);
        let old = qwen3(r#""rope_theta": 1000000.0, "rope_scaling": null"#);
        let (new, old) = (
            ModelConfig::from_hf_json(&new).unwrap(),
            ModelConfig::from_hf_json(&old).unwrap(),
        );
        assert_eq!(new, old);
        assert_eq!(
            (new.architecture, new.rope_theta),
            (Architecture::Qwen3, 1e6)
        );
        let llama3 = qwen3(
            r#""rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        let c = ModelConfig::from_hf_json(&llama3).unwrap();
        assert_eq!(c.rope_scaling.unwrap().factor, 32.0);
    }

    #[test]
    fn unimplemented_rope_types_name_the_field() {
        for (rope, field) in [
            (
                r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}"#,
                "rope_parameters.rope_type 'yarn'",
            ),
            (
                r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#,
                "rope_scaling.rope_type 'dynamic'",
            ),
        ] {
            let err = format!("{:#}", ModelConfig::from_hf_json(&qwen3(rope)).unwrap_err());
            assert!(
                err.contains(field) && err.contains("not implemented"),
                "{err}"
            );
        }
    }

    #[test]
    fn gemma_fields_are_read_and_bad_ones_named() {
        let gemma3 = |extra: &str| {
            format!(
                r#"{{"model_type": "gemma3_text", "vocab_size": 259, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
                "max_position_embeddings": 256, "query_pre_attn_scalar": 16,
                "sliding_window": 6, "hidden_activation": "gelu_pytorch_tanh", {extra}}}"#
            )
        };
        let per_type = gemma3(
            r#""layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}"#,
        );
        let c = ModelConfig::from_hf_json(&per_type).unwrap();
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
        assert_eq!(
            (c.sliding_layers.clone(), c.sliding_window),
            (vec![0, 1], Some(6))
        );
        assert!(c.qk_norm && c.sandwich_norms && c.norm_weight_offset && c.scale_embeddings);
        // The older schema: rope_theta and rope_local_base_freq at the top level.
        let old = gemma3(
            r#""layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0"#,
        );
        assert_eq!(ModelConfig::from_hf_json(&old).unwrap(), c);
        let unknown = gemma3(
            r#""layer_types": ["sliding_attention", "chunked_attention", "full_attention"]"#,
        );
        let err = format!("{:#}", ModelConfig::from_hf_json(&unknown).unwrap_err());
        assert!(err.contains("layer_types[1] 'chunked_attention'"), "{err}");
        let act =
            gemma3(r#""layer_types": ["full_attention", "full_attention", "full_attention"]"#)
                .replace("gelu_pytorch_tanh", "relu");
        let err = format!("{:#}", ModelConfig::from_hf_json(&act).unwrap_err());
        assert!(err.contains("hidden_activation 'relu'"), "{err}");
    }

    #[test]
    fn smollm3_leaves_rope_out_where_no_rope_layers_says() {
        let base = r#"{"model_type": "smollm3", "vocab_size": 259, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 256"#;
        let given = format!(r#"{base}, "no_rope_layers": [1, 0, 1, 1, 1, 1, 1, 0]}}"#);
        assert_eq!(
            ModelConfig::from_hf_json(&given).unwrap().no_rope_layers,
            [1, 7]
        );
        // Without the list, transformers' default: every fourth layer.
        let default = format!("{base}}}");
        assert_eq!(
            ModelConfig::from_hf_json(&default).unwrap().no_rope_layers,
            [3, 7]
        );
        let wrong = format!(r#"{base}, "no_rope_layers": [1, 0]}}"#);
        let err = format!("{:#}", ModelConfig::from_hf_json(&wrong).unwrap_err());
        assert!(
            err.contains("no_rope_layers") && err.contains("8 layers"),
            "{err}"
        );
    }
}
