//! Batched decoding: many prompts decoded together, each row with its own
//! positions, its own sampler and its own end.
//!
//! The prefix that every prompt shares (an instruction, a fixed block of
//! examples) is prefilled once, in chunks, and every row attends to its one
//! KV cache ([`KvCache::after_shared`]): a many-shot prefix of thousands of
//! tokens costs its memory once, not once per row. The
//! rest of each prompt is left-padded so that every row's last prompt token
//! sits in the same column, and the batch is prefilled in one pass. Then each
//! step feeds one token per row; a row that ends leaves the batch. Masks are
//! built from each cache column's position, so padding is invisible and
//! sliding windows count positions, not columns.

use super::json::{self, JsonMatcher};
use super::{Generation, GenerationConfig};
use crate::model::{mask, CausalLm, ForwardInput, KvCache, Pass};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_transformers::generation::LogitsProcessor;
use rayon::prelude::*;
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
    crate::threads::pool().install(|| {
        let start = Instant::now();
        let prefix = Prefix::prefill(lm, &prompts[0][..shared_prefix(prompts)])?;
        let prefix_time = start.elapsed();
        let prefix_share = prefix_time / prompts.len() as u32;
        let token_bytes = match config.json_schema {
            Some(_) => tokenizer.token_bytes(),
            None => Vec::new(),
        };
        // Prompts of similar lengths decode together, with less padding.
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        for rows in order.chunks(batch) {
            let chunk: Vec<&[u32]> = rows.iter().map(|&i| prompts[i].as_slice()).collect();
            let generations =
                Chunk::new(lm, tokenizer, &prefix, &chunk, config, &token_bytes)?.run()?;
            for (&i, mut g) in rows.iter().zip(generations) {
                g.prefill += prefix_share;
                g.shared_prefix_tokens = prefix.len;
                g.shared_prefix_time = prefix_time;
                out[i] = Some(g);
            }
        }
        Ok(out.into_iter().flatten().collect())
    })
}

/// The length of the prefix every prompt shares, leaving each at least one
/// token of its own (whose logits start its answer).
fn shared_prefix(prompts: &[Vec<u32>]) -> usize {
    let first = &prompts[0];
    let common = prompts[1..].iter().fold(first.len(), |n, p| {
        n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count())
    });
    let shortest = prompts.iter().map(Vec::len).min().unwrap_or(0);
    common.min(shortest.saturating_sub(1))
}

/// Prefix tokens prefilled per pass: a long prefix in one pass would hold
/// scores for every pair of its positions.
const PREFIX_CHUNK: usize = 512;

/// The shared prefix, prefilled once (batch of one).
struct Prefix {
    len: usize,
    cache: KvCache,
}

impl Prefix {
    fn prefill(lm: &CausalLm, ids: &[u32]) -> Result<Self> {
        let mut cache = KvCache::default();
        for chunk in ids.chunks(PREFIX_CHUNK) {
            let past = cache.len();
            let chunk = Tensor::new(chunk, lm.device())?.unsqueeze(0)?;
            let input = ForwardInput::causal(&chunk, past, lm.dtype())?;
            lm.forward_hidden(&input, Some(&mut cache))?;
        }
        Ok(Self {
            len: ids.len(),
            cache,
        })
    }

    /// An empty cache for rows that follow this prefix.
    fn rows_cache(&self) -> Result<KvCache> {
        Ok(match self.len {
            0 => KvCache::default(),
            _ => KvCache::after_shared(&self.cache)?,
        })
    }
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

/// A batch of sequences run after the shared prefix.
struct Prefilled {
    cache: KvCache,
    /// Final-normed hidden states, `[rows, width, hidden]`; row r's sequence
    /// ends in the last column.
    hidden: Tensor,
    /// Each row's cache columns' positions (`None` for padding).
    keys: Vec<Vec<Option<u32>>>,
}

/// Runs `sequences` (each starting with the prefix) after the prefilled
/// prefix, left-padded with `pad` to one width, in one shard per thread.
fn prefill(lm: &CausalLm, pad: u32, prefix: &Prefix, sequences: &[&[u32]]) -> Result<Prefilled> {
    let (device, p, b) = (lm.device(), prefix.len, sequences.len());
    let width = sequences.iter().map(|x| x.len() - p).max().unwrap_or(0);
    let (mut ids, mut positions) = (Vec::new(), Vec::new());
    let (mut queries, mut keys) = (Vec::new(), Vec::new());
    for sequence in sequences {
        let own = &sequence[p..];
        let gap = width - own.len();
        ids.extend(std::iter::repeat_n(pad, gap).chain(own.iter().copied()));
        let query: Vec<Option<u32>> = std::iter::repeat_n(None, gap)
            .chain((p..sequence.len()).map(|i| Some(i as u32)))
            .collect();
        positions.extend(query.iter().map(|q| q.unwrap_or(0)));
        keys.push(
            (0..p as u32)
                .map(Some)
                .chain(query.iter().copied())
                .collect(),
        );
        queries.push(query);
    }
    let shards: Vec<std::ops::Range<usize>> = {
        let per = b.div_ceil(crate::threads::workers().max(1));
        (0..b).step_by(per).map(|s| s..(s + per).min(b)).collect()
    };
    let parts = shards
        .par_iter()
        .map(|range| -> Result<(KvCache, Tensor)> {
            let n = range.len();
            let mut cache = prefix.rows_cache()?;
            let cells = range.start * width..range.end * width;
            let ids = Tensor::new(&ids[cells.clone()], device)?.reshape((n, width))?;
            let positions = Tensor::new(&positions[cells], device)?.reshape((n, width))?;
            let input = step_input(
                lm,
                ids,
                positions,
                &queries[range.clone()],
                &keys[range.clone()],
            )?;
            let hidden = lm.forward_hidden(&input, Some(&mut cache))?;
            Ok((cache, hidden))
        })
        .collect::<Result<Vec<_>>>()?;
    let (caches, hidden): (Vec<KvCache>, Vec<Tensor>) = parts.into_iter().unzip();
    Ok(Prefilled {
        cache: KvCache::cat_rows(&caches)?,
        hidden: Tensor::cat(&hidden, 0)?,
        keys,
    })
}

/// The forward input of `ids` at `positions` (`[rows, t]`), whose queries sit
/// at the positions `queries` and whose cache columns are at `keys`.
fn step_input(
    lm: &CausalLm,
    ids: Tensor,
    positions: Tensor,
    queries: &[Vec<Option<u32>>],
    keys: &[Vec<Option<u32>>],
) -> Result<ForwardInput> {
    let (dtype, device) = (lm.dtype(), lm.device());
    let sliding_mask = lm
        .sliding_window()
        .map(|w| mask::from_positions(queries, keys, Some(w), dtype, device))
        .transpose()?;
    Ok(ForwardInput {
        ids,
        positions,
        mask: mask::from_positions(queries, keys, None, dtype, device)?,
        sliding_mask,
        pass: Pass::default(),
    })
}

/// The teacher-forced negative log-likelihood of each example's trained
/// tokens, summed, and their count: `batch` examples at a time, the prefix
/// that every example's untrained start shares prefilled once. The sums of
/// [`crate::train::summed_loss`] on each example alone, within float rounding.
pub fn summed_nll(
    lm: &CausalLm,
    pad: u32,
    examples: &[crate::data::Example],
    batch: usize,
) -> Result<Vec<(f64, usize)>> {
    if batch == 0 {
        bail!("the batch size must be at least 1");
    }
    let context = lm.config.max_position_embeddings;
    if let Some(long) = examples.iter().find(|e| e.ids.len() > context) {
        bail!(
            "an example has {} tokens, more than the model's context window of {context}",
            long.ids.len()
        );
    }
    // Only examples with a trained token count; their parts before it.
    let scored: Vec<usize> = (0..examples.len())
        .filter(|&i| examples[i].trained.iter().skip(1).any(|&t| t))
        .collect();
    let heads: Vec<Vec<u32>> = scored
        .iter()
        .map(|&i| {
            let e = &examples[i];
            let first = e.trained.iter().skip(1).position(|&t| t).unwrap_or(0) + 1;
            e.ids[..first].to_vec()
        })
        .collect();
    let mut out = vec![(0.0, 0); examples.len()];
    if scored.is_empty() {
        return Ok(out);
    }
    crate::threads::pool().install(|| {
        let prefix = Prefix::prefill(lm, &heads[0][..shared_prefix(&heads)])?;
        let mut order = scored.clone();
        order.sort_by_key(|&i| examples[i].ids.len());
        for rows in order.chunks(batch) {
            let sequences: Vec<&[u32]> = rows.iter().map(|&i| examples[i].ids.as_slice()).collect();
            let run = prefill(lm, pad, &prefix, &sequences)?;
            let width = run.hidden.dim(1)?;
            // The hidden state before each trained token, and the token.
            let (mut cells, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
            for (r, &i) in rows.iter().enumerate() {
                let e = &examples[i];
                let last = width - 1;
                for t in (1..e.ids.len()).filter(|&t| e.trained[t]) {
                    let column = last - (e.ids.len() - t);
                    cells.push((r * width + column) as u32);
                    targets.push(e.ids[t]);
                    owner.push(i);
                }
            }
            if cells.is_empty() {
                continue;
            }
            let device = lm.device();
            let flat = run.hidden.flatten_to(1)?;
            let picked = flat.index_select(&Tensor::new(cells.as_slice(), device)?, 0)?;
            let logits = lm.logits(&picked)?.to_dtype(DType::F32)?;
            let logp = candle_nn::ops::log_softmax(&logits, 1)?;
            let targets = Tensor::new(targets.as_slice(), device)?.unsqueeze(1)?;
            let nll: Vec<f32> = logp.gather(&targets, 1)?.squeeze(1)?.neg()?.to_vec1()?;
            for (i, x) in owner.into_iter().zip(nll) {
                out[i].0 += x as f64;
                out[i].1 += 1;
            }
        }
        Ok(out)
    })
}

impl<'a> Chunk<'a> {
    /// Prefills every prompt after the shared prefix.
    fn new(
        lm: &'a CausalLm,
        tokenizer: &'a Tokenizer,
        prefix: &Prefix,
        prompts: &[&[u32]],
        config: &'a GenerationConfig,
        token_bytes: &'a [Option<Vec<u8>>],
    ) -> Result<Self> {
        let start = Instant::now();
        let run = prefill(lm, tokenizer.pad_id(), prefix, prompts)?;
        let width = run.hidden.dim(1)?;
        let logits = lm
            .logits(&run.hidden.narrow(1, width - 1, 1)?)?
            .squeeze(1)?;
        let share = start.elapsed() / prompts.len() as u32;
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
mod tests {
    use super::*;
    use crate::config::{Architecture, ModelConfig};
    use crate::generate::generate;

    /// A tiny random model of `arch` whose sliding window, where it has one,
    /// is shorter than the test prompts; with `context` as its context window.
    fn tiny(arch: Architecture, seed: u64, context: Option<usize>) -> crate::Model {
        let mut config = ModelConfig::tiny(arch);
        if config.sliding_window.is_some() {
            config.sliding_window = Some(5);
        }
        if let Some(c) = context {
            config.max_position_embeddings = c;
        }
        crate::Model::random(&config, seed, DType::F32, &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn the_shared_prefix_leaves_each_prompt_a_token() {
        assert_eq!(shared_prefix(&[vec![1, 2, 3], vec![1, 2, 4, 5]]), 2);
        assert_eq!(shared_prefix(&[vec![1, 2], vec![1, 2, 3]]), 1);
        assert_eq!(shared_prefix(&[vec![7, 8, 9]]), 2);
        assert_eq!(shared_prefix(&[vec![1], vec![2]]), 0);
    }

    /// Batched answers equal one-at-a-time answers for every architecture
    /// (sliding windows shorter than the prompts included), at every batch
    /// size, with a shared prefix and rows that end at different steps.
    #[test]
    fn batched_greedy_answers_equal_one_at_a_time() {
        for arch in Architecture::ALL {
            // A short context, so that longer prompts get fewer new tokens
            // and rows leave the batch at different steps.
            let model = tiny(arch, 5, Some(20));
            let prefix: Vec<u32> = vec![3, 17, 40, 8, 99];
            let shared: Vec<Vec<u32>> = [vec![5u32], vec![6, 7, 8], vec![60, 61], vec![]]
                .into_iter()
                .map(|own| prefix.iter().copied().chain(own).collect())
                .collect();
            let mut unshared = shared.clone();
            unshared.push(vec![200, 201, 202]);
            for (prompts, stop_at_eos, max_new_tokens) in [
                (&shared, false, 9),
                (&shared, true, 30),
                (&unshared, false, 30),
            ] {
                let config = GenerationConfig {
                    max_new_tokens,
                    stop_at_eos,
                    ..GenerationConfig::greedy(0)
                };
                let alone: Vec<Vec<u32>> = prompts
                    .iter()
                    .map(|p| {
                        generate(&model.lm, &model.tokenizer, p, &config, &mut |_| {})
                            .unwrap()
                            .ids
                    })
                    .collect();
                for batch in [1, 2, 5] {
                    let together: Vec<Vec<u32>> =
                        generate_batch(&model.lm, &model.tokenizer, prompts, &config, batch)
                            .unwrap()
                            .into_iter()
                            .map(|g| g.ids)
                            .collect();
                    assert_eq!(together, alone, "{arch:?}, batch {batch}");
                }
            }
        }
    }

    /// A prefix longer than one prefill chunk (a many-shot block) is prefilled
    /// in chunks and kept once, not per row; the answers stay those of
    /// one-at-a-time decoding, sliding windows included.
    #[test]
    fn a_long_shared_prefix_is_kept_once() {
        for arch in [
            Architecture::Llama,
            Architecture::Gemma2,
            Architecture::Phi3,
        ] {
            let model = tiny(arch, 11, Some(2048));
            let prefix: Vec<u32> = (0..PREFIX_CHUNK as u32 * 2 + 37)
                .map(|i| 3 + i % 200)
                .collect();
            let prompts: Vec<Vec<u32>> = [vec![5u32], vec![6, 7, 8], vec![60, 61]]
                .into_iter()
                .map(|own| prefix.iter().copied().chain(own).collect())
                .collect();
            let config = GenerationConfig {
                stop_at_eos: false,
                ..GenerationConfig::greedy(6)
            };
            let alone: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| {
                    generate(&model.lm, &model.tokenizer, p, &config, &mut |_| {})
                        .unwrap()
                        .ids
                })
                .collect();
            let together: Vec<Vec<u32>> =
                generate_batch(&model.lm, &model.tokenizer, &prompts, &config, 3)
                    .unwrap()
                    .into_iter()
                    .map(|g| g.ids)
                    .collect();
            assert_eq!(together, alone, "{arch:?}");
            let shared = Prefix::prefill(&model.lm, &prefix).unwrap();
            let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let (own, kept) = prefill(&model.lm, 0, &shared, &rows).unwrap().cache.bytes();
            // Three rows of at most 3 own columns against one prefix of 1061.
            assert!(
                own * 100 < kept,
                "{arch:?}: {own} bytes per row set, {kept} shared"
            );
        }
    }

    /// Answers constrained to JSON fit the schema, ended or not, and batched
    /// constrained answers equal one-at-a-time ones, greedy and sampled.
    #[test]
    fn constrained_answers_fit_the_schema() {
        use crate::generate::json::{JsonMatcher, JsonSchema};
        let enums = JsonSchema::from_answers(&[
            r#"{"category": "billing", "priority": "low"}"#,
            r#"{"category": "account", "priority": "high", "n": 12}"#,
        ])
        .unwrap();
        let free = JsonSchema::from_answers(&[r#"{"note": [1, {"a": "x"}], "ok": true}"#]).unwrap();
        let model = tiny(Architecture::Llama, 3, Some(400));
        let prompts: Vec<Vec<u32>> = vec![vec![5, 6, 7], vec![5, 6, 9, 10], vec![40]];
        for (schema, must_end) in [(enums, true), (free, false)] {
            for temperature in [0.0, 1.0] {
                let config = GenerationConfig {
                    max_new_tokens: 150,
                    temperature,
                    json_schema: Some(std::sync::Arc::new(schema.clone())),
                    ..GenerationConfig::default()
                };
                let alone: Vec<crate::generate::Generation> = prompts
                    .iter()
                    .map(|p| {
                        generate(&model.lm, &model.tokenizer, p, &config, &mut |_| {}).unwrap()
                    })
                    .collect();
                let together =
                    generate_batch(&model.lm, &model.tokenizer, &prompts, &config, 3).unwrap();
                for (a, b) in alone.iter().zip(&together) {
                    assert_eq!(a.ids, b.ids, "temperature {temperature}");
                    let mut m = JsonMatcher::new(&schema);
                    assert!(m.feed(a.text.as_bytes()), "{}", a.text);
                    if must_end {
                        assert!(a.stopped_at_eos && m.is_done(), "{}", a.text);
                        serde_json::from_str::<serde_json::Value>(&a.text).unwrap();
                    }
                }
            }
        }
    }

    /// Batched teacher-forced scoring gives each example's loss alone, for
    /// every architecture, with a shared prefix and an example with nothing
    /// trained.
    #[test]
    fn batched_nll_equals_each_example_alone() {
        use crate::data::Example;
        for arch in Architecture::ALL {
            let model = tiny(arch, 9, None);
            let example = |own: &[u32], trained_from: usize| {
                let ids: Vec<u32> = [3u32, 17, 40, 8].iter().chain(own).copied().collect();
                let trained = (0..ids.len()).map(|i| i >= trained_from).collect();
                Example { ids, trained }
            };
            let examples = vec![
                example(&[5, 6, 7], 5),
                example(&[9, 10, 11, 12, 13, 14], 6),
                example(&[20], 99),
                example(&[21, 22], 3),
            ];
            let together = summed_nll(&model.lm, 0, &examples, 2).unwrap();
            for (e, (sum, n)) in examples.iter().zip(together) {
                let (want, m) =
                    crate::train::summed_loss(&model, std::slice::from_ref(e), &[vec![0]]).unwrap();
                assert_eq!(n, m, "{arch:?}");
                assert!((sum - want).abs() < 1e-4, "{arch:?}: {sum} vs {want}");
            }
        }
    }

    #[test]
    fn empty_and_overlong_prompts_are_refused() {
        let model = crate::Model::tiny_random(Architecture::Llama, 0).unwrap();
        let config = GenerationConfig::greedy(4);
        let err = generate_batch(&model.lm, &model.tokenizer, &[vec![1], vec![]], &config, 4)
            .unwrap_err();
        assert!(err.to_string().contains("prompt 1 is empty"), "{err}");
        let long = vec![1; model.config().max_position_embeddings];
        let err = generate_batch(&model.lm, &model.tokenizer, &[long], &config, 4).unwrap_err();
        assert!(err.to_string().contains("context window"), "{err}");
    }
}
