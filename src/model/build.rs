//! The model built from its HF-named weights (every shape checked against
//! the config), drawn at random for tests and benchmarks, and its weights
//! named again for saving and merging.

use super::rope::Rotaries;
use super::{Attention, Block, CausalLm, FrozenWeight, Linear, Mlp, Projections};
use crate::config::ModelConfig;
use crate::weights::{Weights, LONGROPE_FACTORS, ROPE_FREQS};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// The HF names of a block's norms (under `model.layers.N.`), by architecture.
struct NormNames {
    before_attn: &'static str,
    attn_out: Option<&'static str>,
    before_mlp: &'static str,
    mlp_out: Option<&'static str>,
}

impl NormNames {
    fn of(c: &ModelConfig) -> Self {
        match c.sandwich_norms {
            true => Self {
                before_attn: "input_layernorm",
                attn_out: Some("post_attention_layernorm"),
                before_mlp: "pre_feedforward_layernorm",
                mlp_out: Some("post_feedforward_layernorm"),
            },
            false => Self {
                before_attn: "input_layernorm",
                attn_out: None,
                before_mlp: "post_attention_layernorm",
                mlp_out: None,
            },
        }
    }
}

impl CausalLm {
    /// Builds the model from HF-named weights, checking every shape against the config.
    pub fn new(
        config: &ModelConfig,
        mut w: Weights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let c = config;
        let (d, v, f) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let bias = c.architecture.has_qkv_bias();
        fn linear(
            w: &mut Weights,
            name: &str,
            out: usize,
            inp: usize,
            bias: bool,
        ) -> Result<Linear> {
            let weight = w.take_frozen(&format!("{name}.weight"), [out, inp])?;
            let bias = if bias {
                Some(w.take(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(Linear::new(weight, bias))
        }
        // Norms are kept as the factor they apply: Gemma stores `w` for `1 + w`.
        let offset = if c.norm_weight_offset { 1.0 } else { 0.0 };
        let norm = |w: &mut Weights, name: &str, n: usize| -> Result<Tensor> {
            Ok((w.take(&format!("{name}.weight"), &[n])? + offset)?)
        };
        let qk_norm = |w: &mut Weights, name: &str| -> Result<Option<Tensor>> {
            c.qk_norm.then(|| norm(w, name, c.head_dim)).transpose()
        };
        let names = NormNames::of(c);
        let scale = 1.0 / c.query_pre_attn_scalar.unwrap_or(c.head_dim as f64).sqrt();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let path = |module: &str| format!("{p}.{module}");
            let qkv = match c.fused_projections {
                true => Projections::fused(
                    "self_attn.qkv_proj",
                    linear(&mut w, &path("self_attn.qkv_proj"), qd + 2 * kvd, d, bias)?,
                    vec![qd, kvd, kvd],
                )?,
                false => Projections::separate(vec![
                    (
                        "self_attn.q_proj",
                        linear(&mut w, &path("self_attn.q_proj"), qd, d, bias)?,
                    ),
                    (
                        "self_attn.k_proj",
                        linear(&mut w, &path("self_attn.k_proj"), kvd, d, bias)?,
                    ),
                    (
                        "self_attn.v_proj",
                        linear(&mut w, &path("self_attn.v_proj"), kvd, d, bias)?,
                    ),
                ]),
            };
            let gate_up = match c.fused_projections {
                true => Projections::fused(
                    "mlp.gate_up_proj",
                    linear(&mut w, &path("mlp.gate_up_proj"), 2 * f, d, false)?,
                    vec![f, f],
                )?,
                false => Projections::separate(vec![
                    (
                        "mlp.gate_proj",
                        linear(&mut w, &path("mlp.gate_proj"), f, d, false)?,
                    ),
                    (
                        "mlp.up_proj",
                        linear(&mut w, &path("mlp.up_proj"), f, d, false)?,
                    ),
                ]),
            };
            let self_attn = Attention {
                qkv,
                o_proj: linear(&mut w, &path("self_attn.o_proj"), d, qd, false)?,
                q_norm: qk_norm(&mut w, &path("self_attn.q_norm"))?,
                k_norm: qk_norm(&mut w, &path("self_attn.k_norm"))?,
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                scale,
                softcap: c.attn_logit_softcapping,
            };
            let mlp = Mlp {
                gate_up,
                down_proj: linear(&mut w, &path("mlp.down_proj"), d, f, false)?,
                act: c.hidden_act,
            };
            let sandwich = |w: &mut Weights, name: Option<&str>| -> Result<Option<Tensor>> {
                name.map(|n| norm(w, &format!("{p}.{n}"), d)).transpose()
            };
            layers.push(Block {
                input_layernorm: norm(&mut w, &format!("{p}.{}", names.before_attn), d)?,
                self_attn,
                attn_out_norm: sandwich(&mut w, names.attn_out)?,
                post_attention_layernorm: norm(&mut w, &format!("{p}.{}", names.before_mlp), d)?,
                mlp,
                mlp_out_norm: sandwich(&mut w, names.mlp_out)?,
                sliding: c.sliding_layers.contains(&i),
                use_rope: c.layer_uses_rope(i),
            });
        }
        let embed_tokens = w.take_frozen("model.embed_tokens.weight", [v, d])?;
        let norm = norm(&mut w, "model.norm", d)?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w.take_frozen("lm_head.weight", [v, d])?)
        };
        let freq_factors = match w.get(ROPE_FREQS) {
            Some(t) => Some(t.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        let mut config = c.clone();
        if let Some(lr) = config.longrope.as_mut() {
            // A GGUF keeps LongRoPE's factors as tensors, which its metadata lacks.
            for (factors, name) in [
                (&mut lr.short_factor, LONGROPE_FACTORS[0]),
                (&mut lr.long_factor, LONGROPE_FACTORS[1]),
            ] {
                if let (true, Some(t)) = (factors.is_empty(), w.get(name)) {
                    *factors = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                }
            }
            let half = config.rotary_dim.unwrap_or(config.head_dim) / 2;
            for (what, factors) in [("short", &lr.short_factor), ("long", &lr.long_factor)] {
                if factors.len() != half {
                    anyhow::bail!(
                        "LongRoPE's {what}_factor has {} entries, but the rotary part of a head needs {half}",
                        factors.len()
                    );
                }
            }
        }
        let rotary = Rotaries::new(&config, freq_factors.as_deref(), dtype, device)
            .context("building the rope tables")?;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            dtype,
        })
    }

    /// A model with random weights (std 0.02, norms at 1), for tests and benchmarks.
    pub fn random(config: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::random_held(
            config,
            seed,
            dtype,
            device,
            crate::Quantize::None,
            &mut Vec::new(),
        )
    }

    /// [`CausalLm::random`] with the decoder blocks' linears held as
    /// `holding` asks ([`crate::quantize::Holding`]), each quantized as it
    /// is drawn (no dense copy of the model is ever held; `keep` keeps them
    /// dense, as there is no file). Weights that fell back get a line in
    /// `notes`.
    pub fn random_held(
        config: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        holding: impl Into<crate::quantize::Holding>,
        notes: &mut Vec<String>,
    ) -> Result<Self> {
        let holding = holding.into();
        let mut rng = crate::rng::Rng::new(seed);
        let mut weights = Weights::new(Default::default(), "random init");
        // Norms are neutral: 1, or 0 where they are stored as offsets from 1.
        let neutral = if config.norm_weight_offset { 0.0 } else { 1.0 };
        let mut put = |name: String, shape: &[usize], norm: bool| -> Result<()> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| if norm { neutral } else { 0.02 * rng.normal() })
                .collect();
            let t = Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?;
            weights.hold(name, t, holding)
        };
        let c = config;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        put(
            "model.embed_tokens.weight".into(),
            &[c.vocab_size, d],
            false,
        )?;
        put("model.norm.weight".into(), &[d], true)?;
        if !c.tie_word_embeddings {
            put("lm_head.weight".into(), &[c.vocab_size, d], false)?;
        }
        let linears: Vec<(&str, usize, usize)> = match c.fused_projections {
            true => vec![
                ("self_attn.qkv_proj", qd + 2 * kvd, d),
                ("self_attn.o_proj", d, qd),
                ("mlp.gate_up_proj", 2 * f, d),
                ("mlp.down_proj", d, f),
            ],
            false => vec![
                ("self_attn.q_proj", qd, d),
                ("self_attn.k_proj", kvd, d),
                ("self_attn.v_proj", kvd, d),
                ("self_attn.o_proj", d, qd),
                ("mlp.gate_proj", f, d),
                ("mlp.up_proj", f, d),
                ("mlp.down_proj", d, f),
            ],
        };
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for &(name, out, inp) in &linears {
                put(format!("{p}.{name}.weight"), &[out, inp], false)?;
                if c.architecture.has_qkv_bias()
                    && ["q_proj", "k_proj", "v_proj"]
                        .iter()
                        .any(|s| name.ends_with(s))
                {
                    put(format!("{p}.{name}.bias"), &[out], false)?;
                }
            }
            let names = NormNames::of(c);
            for name in [
                Some(names.before_attn),
                names.attn_out,
                Some(names.before_mlp),
                names.mlp_out,
            ]
            .into_iter()
            .flatten()
            {
                put(format!("{p}.{name}.weight"), &[d], true)?;
            }
            if c.qk_norm {
                put(format!("{p}.self_attn.q_norm.weight"), &[c.head_dim], true)?;
                put(format!("{p}.self_attn.k_norm.weight"), &[c.head_dim], true)?;
            }
        }
        notes.append(&mut weights.take_notes());
        Self::new(config, weights, dtype, device)
    }

    /// Every weight under its HF name and in HF layout (Gemma's norms as offsets
    /// from 1; quantized weights dequantized); a tied lm_head is not repeated.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let offset = if self.config.norm_weight_offset {
            1.0
        } else {
            0.0
        };
        let hf_norm = |w: &Tensor| (w - offset).expect("a norm weight");
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.embed_tokens.to_dense()?,
            ),
            ("model.norm.weight".to_string(), hf_norm(&self.norm)),
        ];
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.to_dense()?));
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let names = NormNames::of(&self.config);
            let a = &layer.self_attn;
            for (name, norm) in [
                (Some(names.before_attn), Some(&layer.input_layernorm)),
                (names.attn_out, layer.attn_out_norm.as_ref()),
                (
                    Some(names.before_mlp),
                    Some(&layer.post_attention_layernorm),
                ),
                (names.mlp_out, layer.mlp_out_norm.as_ref()),
                (Some("self_attn.q_norm"), a.q_norm.as_ref()),
                (Some("self_attn.k_norm"), a.k_norm.as_ref()),
            ] {
                if let (Some(name), Some(w)) = (name, norm) {
                    out.push((format!("{p}.{name}.weight"), hf_norm(w)));
                }
            }
            for (name, linear) in layer.linears() {
                out.push((format!("{p}.{name}.weight"), linear.weight.to_dense()?));
                if let Some(b) = &linear.bias {
                    out.push((format!("{p}.{name}.bias"), b.clone()));
                }
            }
        }
        Ok(out)
    }

    /// The number of base weights (a tied output matrix counted once), without
    /// dequantizing any.
    pub fn parameter_count(&self) -> usize {
        let linear = |l: &Linear| {
            let (out, inp) = l.weight.dims();
            out * inp + l.bias.as_ref().map_or(0, Tensor::elem_count)
        };
        let block = |b: &Block| {
            let a = &b.self_attn;
            let norms = [
                Some(&b.input_layernorm),
                b.attn_out_norm.as_ref(),
                Some(&b.post_attention_layernorm),
                b.mlp_out_norm.as_ref(),
                a.q_norm.as_ref(),
                a.k_norm.as_ref(),
            ];
            let norms: usize = norms.into_iter().flatten().map(Tensor::elem_count).sum();
            norms
                + b.linears()
                    .into_iter()
                    .map(|(_, l)| linear(l))
                    .sum::<usize>()
        };
        let matrix = |w: &FrozenWeight| w.dims().0 * w.dims().1;
        matrix(&self.embed_tokens)
            + self.norm.elem_count()
            + self.lm_head.as_ref().map_or(0, matrix)
            + self.layers.iter().map(block).sum::<usize>()
    }
}
