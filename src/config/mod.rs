//! A model's architecture hyperparameters, read from an HF `config.json`
//! (`config/hf.rs`) or from GGUF metadata (`config/gguf.rs`), and written back as
//! `config.json` for merged models. Each architecture's differences are
//! switches here, which the model reads.

mod gguf;
mod hf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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
    /// Phi-3 and Phi-4-mini: Llama with fused `qkv_proj` and `gate_up_proj`,
    /// rope on part of each head, and LongRoPE scaling.
    Phi3,
}

/// The architectures tuneforge runs, as config.json's `model_type` and GGUF name them.
pub const ARCHITECTURES: [&str; 8] = [
    "llama", "qwen2", "mistral", "qwen3", "smollm3", "gemma3", "gemma2", "phi3",
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
    pub const ALL: [Architecture; 8] = [
        Self::Llama,
        Self::Qwen2,
        Self::Mistral,
        Self::Qwen3,
        Self::SmolLm3,
        Self::Gemma3,
        Self::Gemma2,
        Self::Phi3,
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
        } else if n.starts_with("phi3") {
            Self::Phi3
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
            Self::Phi3 => "Phi3ForCausalLM",
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
            Self::Phi3 => "phi3",
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

/// LongRoPE frequency scaling (Phi-3 128k, Phi-4-mini): each rotary frequency
/// is divided by a factor of its own, the short factors while a sequence fits
/// the pretrained context and the long ones beyond it, and cos/sin are scaled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongRope {
    /// Per-frequency divisors within the pretrained context (`rotary_dim / 2`).
    pub short_factor: Vec<f64>,
    /// Per-frequency divisors beyond it.
    pub long_factor: Vec<f64>,
    /// The context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
    /// The factor on cos and sin.
    pub attention_factor: f64,
}

impl LongRope {
    /// The attention factor transformers and llama.cpp derive when none is given:
    /// `√(1 + ln s / ln original)` for the context extension `s`.
    pub fn default_attention_factor(max_positions: usize, original: usize) -> f64 {
        let s = max_positions as f64 / original as f64;
        match s > 1.0 {
            true => (1.0 + s.ln() / (original as f64).ln()).sqrt(),
            false => 1.0,
        }
    }
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
    /// Rope turns only the first `rotary_dim` features of each head (Phi-3's
    /// partial rotary factor); `None`: the whole head.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    /// LongRoPE scaling (Phi-3, Phi-4-mini), if any.
    #[serde(default)]
    pub longrope: Option<LongRope>,
    /// q, k and v come from one fused linear, and gate and up from another
    /// (Phi-3's `qkv_proj` and `gate_up_proj`).
    #[serde(default)]
    pub fused_projections: bool,
}

impl ModelConfig {
    /// How many features of each head rope turns.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim)
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
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            no_rope_layers: match architecture {
                Architecture::SmolLm3 => vec![1],
                _ => Vec::new(),
            },
            // Phi-4-mini's partial rotary factor, 0.75, and its own lm_head.
            rotary_dim: (architecture == Architecture::Phi3).then_some(6),
            tie_word_embeddings: architecture != Architecture::Phi3,
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
            rotary_dim: None,
            longrope: None,
            fused_projections: architecture == Architecture::Phi3,
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

    /// Qwen2.5-1.5B's shapes (q/k/v biases, two kv heads of 128), for
    /// benchmarks with random weights.
    pub fn qwen2_5_1_5b() -> Self {
        Self {
            hidden_size: 1536,
            intermediate_size: 8960,
            num_hidden_layers: 28,
            num_attention_heads: 12,
            num_key_value_heads: 2,
            head_dim: 128,
            ..Self::qwen2_5_0_5b()
        }
    }

    /// Llama-3.2-3B's shapes (a 128,256-token vocabulary tied to the
    /// embeddings, eight kv heads of 128), for benchmarks with random weights.
    pub fn llama3_2_3b() -> Self {
        Self {
            vocab_size: 128_256,
            hidden_size: 3072,
            intermediate_size: 8192,
            num_hidden_layers: 28,
            num_attention_heads: 24,
            num_key_value_heads: 8,
            head_dim: 128,
            rope_theta: 500_000.0,
            max_position_embeddings: 131_072,
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001, 128_009],
            ..Self::smollm2_135m()
        }
    }
}
