//! The decoder: Llama-family and Gemma blocks (Llama, SmolLM2/3, Qwen2/3,
//! Mistral, Gemma 2/3) in HF layout, written so that every linear can carry a
//! LoRA adapter and every op backpropagates.

pub mod add_matmul;
pub mod autograd;
pub mod block;
mod cache;
pub mod dropout;
pub mod fused;
mod gemv;
pub mod linear;
pub mod mask;
pub mod ops;
mod prefill;
pub mod projections;
pub mod quantized;
pub mod rope;

pub use block::{Attention, Block, BlockContext, BlockSaved, Mlp};
pub use cache::{KvCache, LayerCache};
pub use linear::{FrozenWeight, Linear};
pub use projections::Projections;
pub use quantized::QuantizedWeight;

use crate::config::ModelConfig;
use crate::weights::{Weights, LONGROPE_FACTORS, ROPE_FREQS};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use rope::Rotaries;

/// The seven linears of a Llama-family decoder block, by their HF names.
pub const LINEAR_NAMES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The four linears of a block with fused projections (Phi-3), by their HF names.
pub const FUSED_LINEAR_NAMES: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// The HF names of the linears of a block of `config`'s architecture.
pub fn linear_names(config: &ModelConfig) -> &'static [&'static str] {
    match config.fused_projections {
        true => &FUSED_LINEAR_NAMES,
        false => &LINEAR_NAMES,
    }
}

/// The inputs of one forward pass.
#[derive(Debug, Clone)]
pub struct ForwardInput {
    /// Token ids, `[b, t]` u32.
    pub ids: Tensor,
    /// Rope positions, `[b, t]` u32 (they restart per example in packed rows).
    pub positions: Tensor,
    /// Additive attention mask, `[b or 1, 1, t, past + t]`.
    pub mask: Tensor,
    /// The sliding-window layers' mask, where the caller builds it (as batched
    /// decoding does, whose cache columns are not positions); otherwise it is
    /// `mask` with the window applied by column.
    pub sliding_mask: Option<Tensor>,
    /// Dropout and autograd settings.
    pub pass: Pass,
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Set while training: seeds the adapters' dropout masks.
    pub dropout_seed: Option<u64>,
    /// Record candle's autograd graph through the adapters. Training uses the
    /// hand-written backward instead ([`Block::backward`]), so this is off by default.
    pub autograd: bool,
}

impl ForwardInput {
    /// Plain causal input for `ids` (`[b, t]`) following `past` cached tokens.
    pub fn causal(ids: &Tensor, past: usize, dtype: DType) -> candle_core::Result<Self> {
        let (b, t) = ids.dims2()?;
        let device = ids.device();
        let positions = Tensor::arange(past as u32, (past + t) as u32, device)?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        Ok(Self {
            ids: ids.clone(),
            positions,
            mask: mask::causal(t, past, dtype, device)?,
            sliding_mask: None,
            pass: Pass::default(),
        })
    }
}

/// A decoder-only causal language model.
#[derive(Debug, Clone)]
pub struct CausalLm {
    /// The architecture hyperparameters.
    pub config: ModelConfig,
    /// Token embeddings, `[vocab, hidden]`: dense, or in GGML blocks with a
    /// quantized base (rows dequantized as a lookup reads them).
    pub embed_tokens: FrozenWeight,
    /// The decoder blocks.
    pub layers: Vec<Block>,
    /// Final norm weight.
    pub norm: Tensor,
    /// The output projection (`[vocab, hidden]`), held like the embeddings;
    /// `None` when tied to them.
    pub lm_head: Option<FrozenWeight>,
    rotary: Rotaries,
    dtype: DType,
}

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
    /// Whether the frozen matrices held in bf16 or blocks multiply with the
    /// CPU's low-precision kernels where it has them (the default: the bf16
    /// kernel rounds the other side of each product to bf16, the int8 kernel
    /// for Q8_0, Q4_x, Q5_x and Q2_K to Q6_K rounds the activations to
    /// 8-bit groups), or, with `false`, widen to f32 and multiply exactly, as
    /// on CPUs without them. Dense matrices are unaffected.
    ///
    /// ```
    /// # use tuneforge::{Architecture, ModelConfig, Model, Quantize};
    /// let config = ModelConfig::tiny(Architecture::Llama);
    /// let device = candle_core::Device::Cpu;
    /// let dtype = candle_core::DType::F32;
    /// let mut model = Model::random_held(&config, 1, dtype, &device, Quantize::Bf16)?;
    /// model.lm.set_low_precision_kernels(false); // exact f32 products of the held weights
    /// # anyhow::Ok(())
    /// ```
    pub fn set_low_precision_kernels(&mut self, on: bool) {
        for block in &mut self.layers {
            for (_, linear) in block.linears_mut() {
                linear.weight.set_low_precision_kernels(on);
            }
        }
        self.embed_tokens.set_low_precision_kernels(on);
        if let Some(head) = &mut self.lm_head {
            head.set_low_precision_kernels(on);
        }
    }

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
    /// `quantize` asks, each quantized as it is drawn (no dense copy of the
    /// model is ever held; `keep` keeps them dense, as there is no file).
    /// Weights left dense get a line in `notes`.
    pub fn random_held(
        config: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        quantize: crate::Quantize,
        notes: &mut Vec<String>,
    ) -> Result<Self> {
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
            weights.hold(name, t, quantize)
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
        notes.append(&mut weights.notes);
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

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.norm.device()
    }

    /// The output matrix: the lm_head, or the tied embeddings.
    pub fn output_weight(&self) -> &FrozenWeight {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Token embeddings of `ids` (`[b, t]`), `[b, t, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.embed_tokens.rows(&ids.flatten_all()?)?.reshape((
            b,
            t,
            self.config.hidden_size,
        ))?;
        Ok(match self.config.scale_embeddings {
            true => (x * (self.config.hidden_size as f64).sqrt())?,
            false => x,
        })
    }

    /// Rope cos/sin for `positions` (`[b, t]`), checking them against the
    /// context window, and the sliding-window layers' own where they differ.
    pub fn rotary_for(&self, positions: &Tensor) -> Result<(rope::CosSin, Option<rope::CosSin>)> {
        let max_pos = positions
            .max_keepdim(1)?
            .max(0)?
            .to_vec1::<u32>()?
            .first()
            .map_or(0, |&p| p as usize);
        if max_pos >= self.rotary.len() {
            anyhow::bail!(
                "position {max_pos} is beyond the model's context window of {} tokens",
                self.rotary.len()
            );
        }
        Ok(self.rotary.gather(positions, max_pos)?)
    }

    /// The sliding window, if any layer attends through one.
    pub fn sliding_window(&self) -> Option<usize> {
        self.config
            .sliding_window
            .filter(|_| self.layers.iter().any(|l| l.sliding))
    }

    /// What every block of a forward pass over `input` shares, `past` cached
    /// positions before it: rope tables, masks, settings.
    pub fn context(&self, input: &ForwardInput, past: usize) -> Result<BlockContext> {
        let (rope, local_rope) = self.rotary_for(&input.positions)?;
        let sliding_mask = match self.config.sliding_window {
            _ if input.sliding_mask.is_some() => input.sliding_mask.clone(),
            Some(w) if self.sliding_window().is_some() => {
                let t = input.ids.dim(1)?;
                let window = mask::window(t, past, w, input.mask.dtype(), input.mask.device())?;
                Some(input.mask.broadcast_add(&window)?)
            }
            _ => None,
        };
        Ok(BlockContext {
            rope,
            local_rope,
            mask: input.mask.clone(),
            sliding_mask,
            eps: self.config.rms_norm_eps,
            pass: input.pass,
        })
    }

    /// Runs the decoder and returns the final-normed hidden states, `[b, t, hidden]`.
    /// Pass a cache to decode incrementally.
    pub fn forward_hidden(
        &self,
        input: &ForwardInput,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let past = cache.as_deref().map_or(0, |c| c.len());
        let ctx = self.context(input, past)?;
        let mut x = self.embed(&input.ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer(i));
            x = layer.forward(&x, &ctx, slot, false)?.0;
        }
        Ok(ops::rms_norm(&x, &self.norm, ctx.eps)?)
    }

    /// Projects hidden states (`[..., hidden]`) to vocabulary logits (`[..., vocab]`).
    /// Pass only the positions you need: the vocabulary is wide.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = Linear::new(self.output_weight().clone(), None).forward(hidden)?;
        Ok(match self.config.final_logit_softcapping {
            Some(c) => ops::softcap(&logits, c)?,
            None => logits,
        })
    }

    /// Logits for every position of a plain causal batch, `[b, t, vocab]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let input = ForwardInput::causal(ids, 0, self.dtype)?;
        self.logits(&self.forward_hidden(&input, None)?)
    }

    /// Logits of the last position, `[b, vocab]`, decoding incrementally with `cache`.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let input = ForwardInput::causal(ids, cache.len(), self.dtype)?;
        let hidden = self.forward_hidden(&input, Some(cache))?;
        let t = hidden.dim(1)?;
        Ok(self.logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1)?)
    }

    /// Mean next-token cross-entropy of each row of `ids` (labels are the inputs shifted by one).
    pub fn causal_lm_loss(&self, ids: &Tensor) -> Result<Tensor> {
        let logits = self.forward(ids)?.to_dtype(DType::F32)?;
        let t = ids.dim(1)?;
        let pred = logits.narrow(1, 0, t - 1)?;
        let target = ids.narrow(1, 1, t - 1)?.contiguous()?;
        let logp = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
        let picked = logp
            .gather(&target.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?;
        Ok(picked.neg()?.mean(D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    #[test]
    fn cached_decoding_matches_a_full_forward() {
        for arch in Architecture::ALL {
            let c = ModelConfig::tiny(arch);
            let m = CausalLm::random(&c, 7, DType::F32, &Device::Cpu).unwrap();
            let ids = Tensor::new(&[[3u32, 17, 42, 5, 9, 60]], &Device::Cpu).unwrap();
            let full = m.forward(&ids).unwrap().squeeze(0).unwrap();
            let mut cache = KvCache::default();
            let first = m
                .forward_last(&ids.narrow(1, 0, 4).unwrap(), &mut cache)
                .unwrap();
            let a = m
                .forward_last(&ids.narrow(1, 4, 1).unwrap(), &mut cache)
                .unwrap();
            let b = m
                .forward_last(&ids.narrow(1, 5, 1).unwrap(), &mut cache)
                .unwrap();
            for (row, got) in [(3, first), (4, a), (5, b)] {
                let want = full.get(row).unwrap();
                let diff = crate::testing::max_abs_diff(&want, &got.squeeze(0).unwrap());
                assert!(diff < 1e-4, "{arch:?} row {row}: {diff}");
            }
        }
    }

    #[test]
    fn packed_rows_equal_separate_rows() {
        let c = ModelConfig::tiny(Architecture::Llama);
        let m = CausalLm::random(&c, 3, DType::F32, &Device::Cpu).unwrap();
        let dev = Device::Cpu;
        let a = [5u32, 6, 7];
        let b = [8u32, 9];
        let packed = ForwardInput {
            ids: Tensor::new(&[[5u32, 6, 7, 8, 9, 0]], &dev).unwrap(),
            positions: Tensor::new(&[[0u32, 1, 2, 0, 1, 0]], &dev).unwrap(),
            mask: mask::segments(&[vec![1, 1, 1, 2, 2, 0]], DType::F32, &dev).unwrap(),
            sliding_mask: None,
            pass: Pass::default(),
        };
        let hp = m.forward_hidden(&packed, None).unwrap().squeeze(0).unwrap();
        let ha = m
            .forward_hidden(
                &ForwardInput::causal(&Tensor::new(&[a], &dev).unwrap(), 0, DType::F32).unwrap(),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let hb = m
            .forward_hidden(
                &ForwardInput::causal(&Tensor::new(&[b], &dev).unwrap(), 0, DType::F32).unwrap(),
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap();
        let sep = Tensor::cat(&[ha, hb], 0).unwrap();
        let diff = crate::testing::max_abs_diff(&hp.narrow(0, 0, 5).unwrap(), &sep);
        assert!(diff < 1e-5, "{diff}");
    }
}
