//! [`ModelConfig`] from and to an HF `config.json`: transformers 5's schema
//! (`rope_parameters`, per layer type for Gemma 3) and the older one
//! (`rope_theta`, `rope_scaling`, `rope_local_base_freq` at the top level).

use super::{Activation, Architecture, LongRope, ModelConfig};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

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
    /// Phi-3: the pretrained context that LongRoPE extends.
    original_max_position_embeddings: Option<usize>,
    /// The older schema: the share of each head that rope turns.
    partial_rotary_factor: Option<f64>,
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
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        let partial =
            match rope.and_then(|v| v.get("partial_rotary_factor")) {
                Some(v) => Some(v.as_f64().with_context(|| {
                    format!("{rope_field}.partial_rotary_factor is not a number")
                })?),
                None => c.partial_rotary_factor,
            };
        let rotary_dim = match partial {
            Some(p) if !(p > 0.0 && p <= 1.0) => {
                bail!("partial_rotary_factor {p} is not in (0, 1]")
            }
            // As transformers rounds it: int(head_dim · factor).
            // (The small nudge keeps a factor written as r / head_dim exact.)
            Some(p) => Some((head_dim as f64 * p + 1e-9) as usize).filter(|&r| r < head_dim),
            None => None,
        };
        let rope_type = rope.and_then(|v| v.get("rope_type").or(v.get("type")));
        let mut longrope = None;
        let rope_scaling = match rope_type.map(|t| t.as_str()) {
            None | Some(Some("default")) => None,
            Some(Some("llama3")) => Some(
                serde_json::from_value(rope.cloned().unwrap_or_default())
                    .with_context(|| format!("reading {rope_field}"))?,
            ),
            Some(Some("longrope" | "su")) => {
                let r = rope.cloned().unwrap_or_default();
                longrope = Some(read_longrope(&r, rope_field, &c)?);
                None
            }
            Some(t) => bail!(
                "{rope_field}.rope_type {}: not implemented (tuneforge implements default, llama3 and longrope)",
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
            // Phi-3 slides the window on every layer, as transformers does.
            (None, Some(w)) if architecture == Architecture::Phi3 => {
                match w < c.max_position_embeddings {
                    true => (0..c.num_hidden_layers).collect(),
                    false => Vec::new(),
                }
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
            head_dim,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids,
            no_rope_layers,
            hidden_act,
            query_pre_attn_scalar: c.query_pre_attn_scalar.filter(|_| gemma),
            sliding_window: c.sliding_window.filter(|_| !sliding_layers.is_empty()),
            sliding_layers,
            rope_local_theta: rope_local_theta.filter(|_| architecture == Architecture::Gemma3),
            attn_logit_softcapping: c.attn_logit_softcapping.filter(|_| gemma),
            final_logit_softcapping: c.final_logit_softcapping.filter(|_| gemma),
            rotary_dim,
            longrope,
            // The architecture's fixed switches: q/k norms and Gemma's norms.
            ..Self::switches_of(architecture, c.num_hidden_layers, 0)
        })
    }
}

/// LongRoPE's settings from `rope` (`rope_parameters` or `rope_scaling`, named
/// `field` in errors); the pretrained context comes from the top level first, as
/// transformers reads it for Phi-3.
fn read_longrope(rope: &serde_json::Value, field: &str, c: &HfConfig) -> Result<LongRope> {
    let factors = |key: &str| -> Result<Vec<f64>> {
        rope.get(key)
            .and_then(|v| v.as_array())
            .with_context(|| format!("{field}.{key} is missing or not a list of numbers"))?
            .iter()
            .map(|x| {
                x.as_f64()
                    .with_context(|| format!("{field}.{key} holds a non-number"))
            })
            .collect()
    };
    let original = c
        .original_max_position_embeddings
        .or_else(|| {
            rope.get("original_max_position_embeddings")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        })
        .with_context(|| {
            format!("longrope needs original_max_position_embeddings (top level or {field})")
        })?;
    let attention_factor = match rope.get("attention_factor").and_then(|v| v.as_f64()) {
        Some(a) => a,
        None => match rope.get("factor").and_then(|v| v.as_f64()) {
            Some(f) if f > 1.0 => (1.0 + f.ln() / (original as f64).ln()).sqrt(),
            Some(_) => 1.0,
            None => LongRope::default_attention_factor(c.max_position_embeddings, original),
        },
    };
    Ok(LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

impl ModelConfig {
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
        if let Some(lr) = &self.longrope {
            v["original_max_position_embeddings"] = lr.original_max_position_embeddings.into();
            v["rope_scaling"] = serde_json::json!({
                "rope_type": "longrope",
                "short_factor": lr.short_factor,
                "long_factor": lr.long_factor,
                "attention_factor": lr.attention_factor,
            });
        }
        if let Some(r) = self.rotary_dim {
            v["partial_rotary_factor"] = (r as f64 / self.head_dim as f64).into();
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
        }
        if let (Some(_), false) = (self.sliding_window, self.architecture == Architecture::Phi3) {
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
}

#[cfg(test)]
mod tests;
