//! [`ModelConfig`] from a GGUF file's metadata (`{arch}.block_count` and
//! friends), with what llama.cpp assumes where its converter writes nothing.

use super::{Architecture, LongRope, ModelConfig};
use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;

impl ModelConfig {
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
        // Phi-3's rope.dimension_count is the rotary part of a head only.
        let phi3 = architecture == Architecture::Phi3;
        let rope_dims = usize_of("rope.dimension_count").ok();
        let head_dim = match (phi3, rope_dims) {
            (false, Some(d)) => Ok(d),
            _ => usize_of("attention.key_length"),
        }
        .unwrap_or(hidden_size / num_attention_heads);
        let rotary_dim = rope_dims.filter(|&r| r < head_dim);
        // LongRoPE's factors are tensors, which the model reads with the weights.
        let longrope = match content
            .tensor_infos
            .contains_key("rope_factors_long.weight")
        {
            true => {
                let original = usize_of("rope.scaling.original_context_length")?;
                let context = usize_of("context_length")?;
                let attention_factor = match get("rope.scaling.attn_factor") {
                    Ok(v) => v.to_f32()? as f64,
                    Err(_) => LongRope::default_attention_factor(context, original),
                };
                Some(LongRope {
                    short_factor: Vec::new(),
                    long_factor: Vec::new(),
                    original_max_position_embeddings: original,
                    attention_factor,
                })
            }
            false => None,
        };
        let f32_of = |k: &str| get(k).ok().map(|v| v.to_f32()).transpose();
        let gemma = architecture.is_gemma();
        // As llama.cpp reads Gemma: sliding layers from an optional pattern (an
        // array of flags, or one full layer in every N: 6 for Gemma 3, 2 for Gemma 2),
        // the local rope base (10,000 unless given), and the attention scale
        // 1/√head_dim (1/√(hidden/heads) for the 27B models).
        // Phi-3 slides on every layer where its window (0: none) is shorter than the context.
        let sliding_window = usize_of("attention.sliding_window")
            .ok()
            .filter(|&w| gemma || (phi3 && w > 0 && w < usize_of("context_length").unwrap_or(0)));
        let sliding_layers = match (sliding_window, get("attention.sliding_window_pattern")) {
            (None, _) => Vec::new(),
            (Some(_), _) if phi3 => (0..num_hidden_layers).collect(),
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
            rotary_dim,
            longrope,
            // The architecture's fixed switches: q/k norms, Gemma's norms and GeGLU.
            ..Self::switches_of(architecture, num_hidden_layers, head_dim)
        })
    }
}
