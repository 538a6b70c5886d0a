//! The prompt prefix that many sequences share (an instruction, a block of
//! worked examples), prefilled once, and the batches of sequences that follow it.
//!
//! The prefix is prefilled in chunks, with a batch of one, and every row
//! attends to its one KV cache ([`KvCache::after_shared`]): a many-shot
//! prefix of thousands of tokens costs its memory once, not once per row. The
//! rest of each sequence is left-padded so that every row ends in the same
//! column, and a batch is run in one pass per thread. Masks are built from
//! each cache column's position, so padding is invisible and sliding windows
//! count positions, not columns.

use crate::model::{mask, CausalLm, ForwardInput, KvCache, Pass};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rayon::prelude::*;
use std::time::{Duration, Instant};

/// The length of the prefix that every sequence shares, leaving each at least
/// one token of its own (whose logits start its answer).
pub fn common_prefix_len(sequences: &[&[u32]]) -> usize {
    let Some(first) = sequences.first() else {
        return 0;
    };
    let common = sequences[1..].iter().fold(first.len(), |n, p| {
        n.min(
            first
                .iter()
                .zip(p.iter())
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    let shortest = sequences.iter().map(|s| s.len()).min().unwrap_or(0);
    common.min(shortest.saturating_sub(1))
}

/// Prefix tokens prefilled per pass: a long prefix in one pass would hold
/// scores for every pair of its positions.
const PREFIX_CHUNK: usize = 512;

/// A prompt prefix, prefilled once (a batch of one), that sequences which
/// start with it decode or score after ([`super::generate_batch_after`],
/// [`super::summed_nll_after`]).
#[derive(Debug, Clone)]
pub struct SharedPrefix {
    ids: Vec<u32>,
    cache: KvCache,
    time: Duration,
}

impl SharedPrefix {
    /// Prefills `ids` (possibly none) with `lm`, in chunks.
    pub fn prefill(lm: &CausalLm, ids: &[u32]) -> Result<Self> {
        let start = Instant::now();
        let workers = match lm.device().is_cpu() {
            true => crate::threads::workers(),
            false => 1,
        };
        let cache = lm.prefill_cache(ids, PREFIX_CHUNK, workers)?;
        Ok(Self {
            ids: ids.to_vec(),
            cache,
            time: start.elapsed(),
        })
    }

    /// The prefix that every one of `sequences` shares, prefilled.
    pub fn of(lm: &CausalLm, sequences: &[&[u32]]) -> Result<Self> {
        let n = common_prefix_len(sequences);
        Self::prefill(lm, sequences.first().map_or(&[][..], |s| &s[..n]))
    }

    /// Its length in tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// How long its prefill took.
    pub fn prefill_time(&self) -> Duration {
        self.time
    }

    /// Refuses a sequence that does not start with the prefix and go past it.
    pub(super) fn check(&self, sequences: &[&[u32]]) -> Result<()> {
        for (i, s) in sequences.iter().enumerate() {
            if s.len() <= self.len() || !s.starts_with(&self.ids) {
                bail!(
                    "sequence {i} does not start with the shared prefix of {} tokens and go past it",
                    self.len()
                );
            }
        }
        Ok(())
    }

    /// An empty cache for rows that follow this prefix.
    fn rows_cache(&self) -> Result<KvCache> {
        Ok(match self.ids.len() {
            0 => KvCache::default(),
            _ => KvCache::after_shared(&self.cache)?,
        })
    }
}

/// A batch of sequences run after the shared prefix.
pub(super) struct Prefilled {
    pub cache: KvCache,
    /// Final-normed hidden states, `[rows, width, hidden]`.
    pub hidden: Tensor,
    /// Each row's cache columns' positions (`None` for padding), the
    /// prefix's first.
    pub keys: Vec<Vec<Option<u32>>>,
    /// The column of each row's first token after the prefix.
    pub starts: Vec<usize>,
    /// Every row's head ends in column `head_width - 1`.
    pub head_width: usize,
}

impl Prefilled {
    /// The column of row `r`'s token `t` (counted from the sequence's start,
    /// the prefix's `p` tokens included).
    pub fn column(&self, r: usize, p: usize, t: usize) -> usize {
        self.starts[r] + t - p
    }

    /// Drops every row's tail (see [`prefill_split`]): keeps the cache and
    /// the key positions of the heads only, after a prefix of `p` tokens.
    pub fn keep_heads(&mut self, p: usize) -> Result<()> {
        self.cache = self.cache.keep_columns(self.head_width)?;
        self.keys
            .iter_mut()
            .for_each(|k| k.truncate(p + self.head_width));
        Ok(())
    }
}

/// Runs `sequences` (each starting with the prefix) after the prefilled
/// prefix, left-padded with `pad` so that every row ends in the same column,
/// in one shard per thread.
pub(super) fn prefill(
    lm: &CausalLm,
    pad: u32,
    prefix: &SharedPrefix,
    sequences: &[&[u32]],
) -> Result<Prefilled> {
    let heads: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
    prefill_split(lm, pad, prefix, sequences, &heads)
}

/// [`prefill`], with each row's first `heads[r]` tokens (its head: a prompt)
/// ending in one column, left-padded, and the rest of the row (its tail: the
/// prompt's reference answer) after that column, right-padded. The cache's
/// first [`Prefilled::head_width`] columns are then the heads' cache, the
/// one a decoding of the prompts would have prefilled.
pub(super) fn prefill_split(
    lm: &CausalLm,
    pad: u32,
    prefix: &SharedPrefix,
    sequences: &[&[u32]],
    heads: &[usize],
) -> Result<Prefilled> {
    let (device, p, b) = (lm.device(), prefix.len(), sequences.len());
    let head_width = heads.iter().map(|h| h - p).max().unwrap_or(0);
    let width = sequences
        .iter()
        .zip(heads)
        .map(|(s, h)| head_width + s.len() - h)
        .max()
        .unwrap_or(0);
    let (mut ids, mut positions, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    let (mut queries, mut keys) = (Vec::new(), Vec::new());
    for (sequence, head) in sequences.iter().zip(heads) {
        let own = &sequence[p..];
        let gap = head_width - (head - p);
        let after = width - gap - own.len();
        ids.extend(
            std::iter::repeat_n(pad, gap)
                .chain(own.iter().copied())
                .chain(std::iter::repeat_n(pad, after)),
        );
        let query: Vec<Option<u32>> = std::iter::repeat_n(None, gap)
            .chain((p..sequence.len()).map(|i| Some(i as u32)))
            .chain(std::iter::repeat_n(None, after))
            .collect();
        positions.extend(query.iter().map(|q| q.unwrap_or(0)));
        keys.push(
            (0..p as u32)
                .map(Some)
                .chain(query.iter().copied())
                .collect(),
        );
        queries.push(query);
        starts.push(gap);
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
        starts,
        head_width,
    })
}

/// The forward input of `ids` at `positions` (`[rows, t]`), whose queries sit
/// at the positions `queries` and whose cache columns are at `keys`.
pub(super) fn step_input(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;
    use crate::generate::{generate_batch, GenerationConfig};
    use crate::testing::tiny_with_window;

    #[test]
    fn the_shared_prefix_leaves_each_prompt_a_token() {
        assert_eq!(common_prefix_len(&[&[1, 2, 3], &[1, 2, 4, 5]]), 2);
        assert_eq!(common_prefix_len(&[&[1, 2], &[1, 2, 3]]), 1);
        assert_eq!(common_prefix_len(&[&[7, 8, 9]]), 2);
        assert_eq!(common_prefix_len(&[&[1], &[2]]), 0);
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
            let model = tiny_with_window(arch, 11, Some(2048));
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
            // One at a time: the old path, `generate` per prompt.
            let alone: Vec<Vec<u32>> = model
                .generate_batch(&prompts, &config, 1)
                .unwrap()
                .into_iter()
                .map(|g| g.ids)
                .collect();
            let together: Vec<Vec<u32>> =
                generate_batch(&model.lm, &model.tokenizer, &prompts, &config, 3)
                    .unwrap()
                    .into_iter()
                    .map(|g| g.ids)
                    .collect();
            assert_eq!(together, alone, "{arch:?}");
            let shared = SharedPrefix::prefill(&model.lm, &prefix).unwrap();
            let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let (own, kept) = prefill(&model.lm, 0, &shared, &rows).unwrap().cache.bytes();
            // Three rows of at most 3 own columns against one prefix of 1061.
            assert!(
                own * 100 < kept,
                "{arch:?}: {own} bytes per row set, {kept} shared"
            );
        }
    }
}
