//! The decoder: Llama-family and Gemma blocks (Llama, SmolLM2/3, Qwen2/3,
//! Mistral, Gemma 2/3) in HF layout, written so that every linear can carry a
//! LoRA adapter and every op backpropagates.

pub mod add_matmul;
pub mod attention;
pub mod autograd;
pub mod block;
mod build;
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
mod strided;
pub mod thin;

pub use block::{Attention, Block, BlockContext, BlockSaved, Mlp};
pub use cache::{KvCache, LayerCache};
pub use linear::{FrozenWeight, Linear};
pub use projections::Projections;
pub use quantized::QuantizedWeight;

use crate::config::ModelConfig;
use anyhow::Result;
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

impl CausalLm {
    /// Whether the frozen matrices held in bf16 or blocks multiply with the
    /// CPU's low-precision kernels where it has them (the default: the bf16
    /// kernel rounds the other side of each product to bf16, the int8 kernel
    /// for Q8_0, Q4_x, Q5_x and Q2_K to Q6_K rounds the activations to two
    /// 8-bit digits per group), or, with `false`, widen to f32 and multiply exactly, as
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
        let chunk = attention::Spans::CHUNK;
        let sliding_spans = match &sliding_mask {
            Some(m) => Some(attention::Spans::of_mask(m, chunk)?),
            None => None,
        };
        Ok(BlockContext {
            rope,
            local_rope,
            spans: attention::Spans::of_mask(&input.mask, chunk)?,
            mask: input.mask.clone(),
            sliding_mask,
            sliding_spans,
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
