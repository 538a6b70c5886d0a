//! Batched decoding: many prompts decoded together, each row with its own
//! positions, its own sampler and its own end.
//!
//! The prefix that every prompt shares is prefilled once and kept once
//! ([`super::prefix`]); the rest of each prompt is prefilled in one pass per
//! thread. Then each step feeds one token per row, at the row's own position;
//! a row that ends leaves the batch.

use super::json::{self, JsonMatcher};
use super::nll::{check_context, head, nll_of_rows, Score};
use super::prefix::{prefill_split, step_input, Prefilled, SharedPrefix};
use super::{Generation, GenerationConfig};
use crate::data::Example;
use crate::model::{CausalLm, KvCache};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_transformers::generation::LogitsProcessor;
use std::time::{Duration, Instant};

/// How many sequences decode together unless told otherwise.
pub const DEFAULT_BATCH: usize = 32;

/// Generates from every prompt, `batch` sequences at a time. The answers are
/// those of [`super::generate`] on each prompt alone (each row's sampler is
/// seeded as that call seeds it). Each generation's `prefill` and `decode`
/// are its share of the batch's time: the shared prefix's prefill split among
/// all prompts, each step's time among the rows it served.
pub fn generate_batch(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    batch: usize,
) -> Result<Vec<Generation>> {
    if batch == 0 {
        bail!("the batch size must be at least 1");
    }
    let context = lm.config.max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            bail!("prompt {i} is empty: cannot generate from an empty prompt");
        }
        if p.len() >= context {
            bail!(
                "prompt {i} has {} tokens, more than the model's context window of {context}",
                p.len()
            );
        }
    }
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let sequences: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let prefix = SharedPrefix::of(lm, &sequences)?;
    generate_batch_after(lm, tokenizer, &prefix, prompts, config, batch)
}

/// [`generate_batch`] after `prefix`, which every prompt must start with and
/// go past. Each generation's `prefill` holds its share of the prefix's
/// prefill time (split among `prompts`).
pub fn generate_batch_after(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    prefix: &SharedPrefix,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    batch: usize,
) -> Result<Vec<Generation>> {
    Ok(generate_and_score_after(lm, tokenizer, prefix, prompts, None, config, batch)?.0)
}

/// [`generate_batch_after`], and with `references` (one per prompt: the
/// prompt followed by its reference answer, trained tokens marked) the
/// summed teacher-forced negative log-likelihood of each reference and its
/// token count, as [`super::summed_nll_after`] gives them.
///
/// A reference that continues its prompt is scored in the pass that
/// prefills the prompt for decoding: its answer's tokens sit in the columns
/// after the prompt's, and are dropped from the cache before decoding. Each
/// prompt is then run once, not once to decode and again to score. A
/// reference that does not continue its prompt is scored on its own. The
/// prefill time of a combined pass is split between decoding and scoring by
/// their columns; each generation's `prefill` holds the decoding's share.
pub fn generate_and_score_after(
    lm: &CausalLm,
    tokenizer: &Tokenizer,
    prefix: &SharedPrefix,
    prompts: &[Vec<u32>],
    references: Option<&[Example]>,
    config: &GenerationConfig,
    batch: usize,
) -> Result<(Vec<Generation>, Vec<Score>)> {
    if batch == 0 {
        bail!("the batch size must be at least 1");
    }
    let sequences: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    prefix.check(&sequences)?;
    if let Some(references) = references {
        if references.len() != prompts.len() {
            bail!(
                "{} references for {} prompts: one reference per prompt",
                references.len(),
                prompts.len()
            );
        }
        check_context(lm, references)?;
    }
    let continues = |i: usize| -> Option<&Example> {
        let e = &references?[i];
        let head = head(e)?;
        (head.len() >= prompts[i].len() && e.ids.starts_with(&prompts[i])).then_some(e)
    };
    let prefix_share = prefix.prefill_time() / prompts.len().max(1) as u32;
    let token_bytes = match config.json_schema {
        Some(_) => tokenizer.token_bytes(),
        None => Vec::new(),
    };
    let (p, pad) = (prefix.len(), tokenizer.pad_id());
    let mut scores = vec![(0.0, 0); references.map_or(0, <[Example]>::len)];
    let generations = crate::threads::pool().install(|| -> Result<Vec<Generation>> {
        // Prompts of similar lengths decode together, with less padding.
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        for rows in order.chunks(batch) {
            let start = Instant::now();
            let mut scored = Vec::new();
            let rows_ids: Vec<&[u32]> = rows
                .iter()
                .enumerate()
                .map(|(r, &i)| match continues(i) {
                    Some(e) => {
                        scored.push((r, e));
                        e.ids.as_slice()
                    }
                    None => prompts[i].as_slice(),
                })
                .collect();
            let heads: Vec<usize> = rows.iter().map(|&i| prompts[i].len()).collect();
            let mut run = prefill_split(lm, pad, prefix, &rows_ids, &heads)?;
            let share = start
                .elapsed()
                .mul_f64(run.head_width as f64 / run.hidden.dim(1)?.max(1) as f64);
            for ((r, _), score) in scored.iter().zip(nll_of_rows(lm, &run, p, &scored)?) {
                scores[rows[*r]] = score;
            }
            run.keep_heads(p)?;
            let chunk: Vec<&[u32]> = rows.iter().map(|&i| prompts[i].as_slice()).collect();
            let generations =
                Chunk::new(lm, tokenizer, run, share, &chunk, config, &token_bytes)?.run()?;
            for (&i, mut g) in rows.iter().zip(generations) {
                g.prefill += prefix_share;
                g.shared_prefix_tokens = prefix.len();
                g.shared_prefix_time = prefix.prefill_time();
                out[i] = Some(g);
            }
        }
        Ok(out.into_iter().flatten().collect())
    })?;
    // References that do not continue their prompts, scored on their own.
    if let Some(references) = references {
        let alone: Vec<usize> = (0..prompts.len())
            .filter(|&i| continues(i).is_none() && head(&references[i]).is_some())
            .collect();
        if !alone.is_empty() {
            let examples: Vec<Example> = alone.iter().map(|&i| references[i].clone()).collect();
            let sums = super::summed_nll_after(lm, tokenizer.pad_id(), prefix, &examples, batch)?;
            for (i, score) in alone.into_iter().zip(sums) {
                scores[i] = score;
            }
        }
    }
    Ok((generations, scores))
}

/// One sequence of a batch.
struct Row<'a> {
    /// Its index in the chunk.
    index: usize,
    prompt_tokens: usize,
    /// The position of the next token fed.
    next_position: u32,
    /// Each cache column's position (`None` for padding).
    keys: Vec<Option<u32>>,
    ids: Vec<u32>,
    sampler: LogitsProcessor,
    /// Where its answer is in the JSON object, when answers are constrained.
    json: Option<JsonMatcher<'a>>,
    max_new: usize,
    stopped_at_eos: bool,
    prefill: Duration,
    decode: Duration,
}

/// A batch of prompts decoding together.
struct Chunk<'a> {
    lm: &'a CausalLm,
    tokenizer: &'a Tokenizer,
    config: &'a GenerationConfig,
    /// Each token's bytes, when answers are constrained to JSON.
    token_bytes: &'a [Option<Vec<u8>>],
    cache: KvCache,
    rows: Vec<Row<'a>>,
    /// Logits of each active row's next token, `[rows, vocab]`.
    logits: Tensor,
}

impl<'a> Chunk<'a> {
    /// The batch of `prompts` from their prefilled heads (`run`, whose
    /// prefill took `prefill`).
    fn new(
        lm: &'a CausalLm,
        tokenizer: &'a Tokenizer,
        run: Prefilled,
        prefill: Duration,
        prompts: &[&[u32]],
        config: &'a GenerationConfig,
        token_bytes: &'a [Option<Vec<u8>>],
    ) -> Result<Self> {
        let start = Instant::now();
        let logits = lm
            .logits(&run.hidden.narrow(1, run.head_width - 1, 1)?)?
            .squeeze(1)?;
        let share = (prefill + start.elapsed()) / prompts.len() as u32;
        let context = lm.config.max_position_embeddings;
        let rows = prompts
            .iter()
            .zip(run.keys)
            .enumerate()
            .map(|(index, (prompt, keys))| Row {
                index,
                prompt_tokens: prompt.len(),
                next_position: prompt.len() as u32,
                keys,
                ids: Vec::new(),
                sampler: LogitsProcessor::from_sampling(config.seed, config.sampling()),
                json: config.json_schema.as_deref().map(JsonMatcher::new),
                max_new: config.max_new_tokens.min(context - prompt.len()),
                stopped_at_eos: false,
                prefill: share,
                decode: Duration::ZERO,
            })
            .collect();
        Ok(Self {
            lm,
            tokenizer,
            config,
            token_bytes,
            cache: run.cache,
            rows,
            logits: logits.to_dtype(DType::F32)?,
        })
    }

    /// Decodes until every row has ended; the generations in prompt order.
    fn run(mut self) -> Result<Vec<Generation>> {
        let mut done: Vec<Row<'a>> = Vec::new();
        let eos = self.tokenizer.eos_ids().to_vec();
        loop {
            let step = Instant::now();
            let mut feed = Vec::new();
            let mut keep = Vec::new();
            for (r, row) in self.rows.iter_mut().enumerate() {
                if row.ids.len() >= row.max_new {
                    continue;
                }
                let logits = self.logits.get(r)?;
                let next = match &mut row.json {
                    Some(matcher) => json::choose(
                        &logits,
                        &mut row.sampler,
                        self.config.temperature <= 0.0,
                        matcher,
                        self.token_bytes,
                        &eos,
                    )?,
                    None => row.sampler.sample(&logits)?,
                };
                if self.config.stop_at_eos && eos.contains(&next) {
                    row.stopped_at_eos = true;
                    continue;
                }
                row.ids.push(next);
                if row.ids.len() < row.max_new {
                    keep.push(r as u32);
                    feed.push(next);
                }
            }
            if keep.len() < self.rows.len() {
                let rows = std::mem::take(&mut self.rows);
                for (r, row) in rows.into_iter().enumerate() {
                    match keep.contains(&(r as u32)) {
                        true => self.rows.push(row),
                        false => done.push(row),
                    }
                }
                if !keep.is_empty() {
                    self.cache = self.cache.select_rows(&keep)?;
                }
            }
            if self.rows.is_empty() {
                break;
            }
            let device = self.lm.device();
            let b = self.rows.len();
            let mut queries = Vec::with_capacity(b);
            let mut positions = Vec::with_capacity(b);
            for row in &mut self.rows {
                row.keys.push(Some(row.next_position));
                queries.push(vec![Some(row.next_position)]);
                positions.push(row.next_position);
                row.next_position += 1;
            }
            let ids = Tensor::from_vec(feed, (b, 1), device)?;
            let positions = Tensor::from_vec(positions, (b, 1), device)?;
            let keys: Vec<Vec<Option<u32>>> = self.rows.iter().map(|r| r.keys.clone()).collect();
            let input = step_input(self.lm, ids, positions, &queries, &keys)?;
            let hidden = self.lm.forward_hidden(&input, Some(&mut self.cache))?;
            self.logits = self.lm.logits(&hidden)?.squeeze(1)?.to_dtype(DType::F32)?;
            let share = step.elapsed() / b as u32;
            self.rows.iter_mut().for_each(|r| r.decode += share);
        }
        done.sort_by_key(|r| r.index);
        done.into_iter()
            .map(|row| {
                Ok(Generation {
                    text: self.tokenizer.decode(&row.ids, true)?,
                    ids: row.ids,
                    prompt_tokens: row.prompt_tokens,
                    stopped_at_eos: row.stopped_at_eos,
                    prefill: row.prefill,
                    decode: row.decode,
                    shared_prefix_tokens: 0,
                    shared_prefix_time: Duration::ZERO,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
