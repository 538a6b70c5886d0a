//! Text generation: KV-cached greedy or sampled decoding (temperature, top-k,
//! top-p, seed), streaming text to a callback as it is produced.

pub mod batched;
pub mod json;
pub mod nll;
pub mod prefix;

pub use batched::{generate_and_score_after, generate_batch, generate_batch_after, DEFAULT_BATCH};
pub use nll::{summed_nll, summed_nll_after, Score};
pub use prefix::SharedPrefix;

use crate::model::{CausalLm, KvCache};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How to decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens when sampling.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p when sampling.
    pub top_p: Option<f64>,
    /// The sampling seed.
    pub seed: u64,
    /// Stop at an end-of-sequence token.
    pub stop_at_eos: bool,
    /// Constrain each answer to a JSON object of this shape ([`json`]).
    #[serde(skip)]
    pub json_schema: Option<std::sync::Arc<json::JsonSchema>>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 42,
            stop_at_eos: true,
            json_schema: None,
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    fn sampling(&self) -> Sampling {
        if self.temperature <= 0.0 {
            return Sampling::ArgMax;
        }
        let temperature = self.temperature;
        match (self.top_k, self.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated ids (the EOS token excluded).
    pub ids: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Whether decoding ended at an EOS token.
    pub stopped_at_eos: bool,
    /// Time to process the prompt.
    pub prefill: Duration,
    /// Time spent producing tokens after the prompt.
    pub decode: Duration,
    /// The prompt's leading tokens that were read from a prefix cache shared
    /// with other prompts ([`generate_batch`]), not prefilled for this one.
    pub shared_prefix_tokens: usize,
    /// That shared prefix's whole prefill time, of which `prefill` holds
    /// this prompt's share.
    pub shared_prefix_time: Duration,
}

impl Generation {
    /// Decoding speed, tokens per second (the first token's prefill excluded).
    pub fn tokens_per_second(&self) -> f64 {
        let n = self.ids.len().saturating_sub(1).max(1);
        n as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generates from `prompt_ids`, calling `on_text` with each new piece of text.
pub fn generate(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    config: &GenerationConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        bail!("cannot generate from an empty prompt");
    }
    let context = lm.config.max_position_embeddings;
    if prompt_ids.len() >= context {
        bail!(
            "the prompt has {} tokens, more than the model's context window of {context}",
            prompt_ids.len()
        );
    }
    let max_new = config.max_new_tokens.min(context - prompt_ids.len());
    let mut processor = LogitsProcessor::from_sampling(config.seed, config.sampling());
    let token_bytes = config.json_schema.as_ref().map(|_| tokenizer.token_bytes());
    let mut matcher = config.json_schema.as_deref().map(json::JsonMatcher::new);
    let mut cache = KvCache::default();
    let device = lm.device();
    let start = Instant::now();
    // Each forward runs on a pool thread: its parallel matrix-vector kernels
    // then share work with the pool's other threads instead of waking them
    // from outside each time (36 rather than 31 tokens/s on 2 cores).
    let mut forward = |ids: &[u32]| {
        let ids = Tensor::new(ids, device)?.unsqueeze(0)?;
        crate::threads::pool().install(|| lm.forward_last(&ids, &mut cache))
    };
    let mut next_logits = forward(prompt_ids)?;
    let mut prefill = Duration::ZERO;
    let mut ids: Vec<u32> = Vec::new();
    let mut emitted = String::new();
    let mut stopped_at_eos = false;
    for step in 0..max_new {
        let logits = next_logits.squeeze(0)?.to_dtype(DType::F32)?;
        let next = match (&mut matcher, &token_bytes) {
            (Some(m), Some(bytes)) => json::choose(
                &logits,
                &mut processor,
                config.temperature <= 0.0,
                m,
                bytes,
                tokenizer.eos_ids(),
            )?,
            _ => processor.sample(&logits)?,
        };
        if step == 0 {
            prefill = start.elapsed();
        }
        if config.stop_at_eos && tokenizer.eos_ids().contains(&next) {
            stopped_at_eos = true;
            break;
        }
        ids.push(next);
        let text = tokenizer.decode(&ids, true)?;
        // Emit only whole characters: a multi-byte character may span tokens.
        if text.len() > emitted.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&emitted) {
            on_text(&text[emitted.len()..]);
            emitted = text;
        }
        if step + 1 < max_new {
            next_logits = forward(&[next])?;
        }
    }
    let text = tokenizer.decode(&ids, true)?;
    if text.len() > emitted.len() && text.starts_with(&emitted) {
        on_text(&text[emitted.len()..]);
    }
    Ok(Generation {
        ids,
        text,
        prompt_tokens: prompt_ids.len(),
        stopped_at_eos,
        prefill,
        decode: start.elapsed().saturating_sub(prefill),
        shared_prefix_tokens: 0,
        shared_prefix_time: Duration::ZERO,
    })
}
