//! Teacher-forced scoring in batches: the negative log-likelihood of each
//! example's trained tokens (a reference answer after its prompt), with the
//! prefix that every example shares run once.

use super::prefix::{prefill, Prefilled, SharedPrefix};
use crate::data::Example;
use crate::model::CausalLm;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// An example's teacher-forced score: the negative log-likelihood of its
/// trained tokens, summed, and their count.
pub type Score = (f64, usize);

/// The teacher-forced negative log-likelihood of each example's trained
/// tokens, summed, and their count: `batch` examples at a time, the prefix
/// that every example's untrained start shares prefilled once. The sums of
/// [`crate::train::summed_loss`] on each example alone, within float rounding.
pub fn summed_nll(
    lm: &CausalLm,
    pad: u32,
    examples: &[Example],
    batch: usize,
) -> Result<Vec<Score>> {
    let heads: Vec<&[u32]> = examples.iter().filter_map(head).collect();
    let prefix = SharedPrefix::of(lm, &heads)?;
    summed_nll_after(lm, pad, &prefix, examples, batch)
}

/// The part of an example before its first trained token (none when nothing
/// after the first token is trained: it is not scored).
pub(crate) fn head(e: &Example) -> Option<&[u32]> {
    let first = e.trained.iter().skip(1).position(|&t| t)? + 1;
    Some(&e.ids[..first])
}

/// [`summed_nll`] after `prefix`, which every scored example's part before
/// its first trained token must start with and go past (as
/// [`SharedPrefix::of`] their heads and any other sequences gives).
pub fn summed_nll_after(
    lm: &CausalLm,
    pad: u32,
    prefix: &SharedPrefix,
    examples: &[Example],
    batch: usize,
) -> Result<Vec<Score>> {
    if batch == 0 {
        bail!("the batch size must be at least 1");
    }
    check_context(lm, examples)?;
    // Only examples with a trained token count.
    let scored: Vec<usize> = (0..examples.len())
        .filter(|&i| head(&examples[i]).is_some())
        .collect();
    let heads: Vec<&[u32]> = scored.iter().filter_map(|&i| head(&examples[i])).collect();
    prefix.check(&heads)?;
    let mut out = vec![(0.0, 0); examples.len()];
    crate::threads::pool().install(|| {
        let mut order = scored.clone();
        order.sort_by_key(|&i| examples[i].ids.len());
        for rows in order.chunks(batch) {
            let sequences: Vec<&[u32]> = rows.iter().map(|&i| examples[i].ids.as_slice()).collect();
            let run = prefill(lm, pad, prefix, &sequences)?;
            let members: Vec<(usize, &Example)> = rows
                .iter()
                .enumerate()
                .map(|(r, &i)| (r, &examples[i]))
                .collect();
            for (&i, score) in rows
                .iter()
                .zip(nll_of_rows(lm, &run, prefix.len(), &members)?)
            {
                out[i] = score;
            }
        }
        Ok(out)
    })
}

/// Refuses an example longer than the model's context window.
pub(super) fn check_context(lm: &CausalLm, examples: &[Example]) -> Result<()> {
    let context = lm.config.max_position_embeddings;
    if let Some(long) = examples.iter().find(|e| e.ids.len() > context) {
        bail!(
            "an example has {} tokens, more than the model's context window of {context}",
            long.ids.len()
        );
    }
    Ok(())
}

/// The summed negative log-likelihood of each example's trained tokens and
/// their count, from `run`, in which row `r` of each `(r, example)` in
/// `members` holds the example after a prefix of `p` tokens.
pub(super) fn nll_of_rows(
    lm: &CausalLm,
    run: &Prefilled,
    p: usize,
    members: &[(usize, &Example)],
) -> Result<Vec<Score>> {
    let mut out = vec![(0.0, 0); members.len()];
    let width = run.hidden.dim(1)?;
    // The hidden state before each trained token, and the token.
    let (mut cells, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (m, &(r, e)) in members.iter().enumerate() {
        for t in (1..e.ids.len()).filter(|&t| e.trained[t]) {
            cells.push((r * width + run.column(r, p, t - 1)) as u32);
            targets.push(e.ids[t]);
            owner.push(m);
        }
    }
    if cells.is_empty() {
        return Ok(out);
    }
    let device = lm.device();
    let flat = run.hidden.flatten_to(1)?;
    let picked = flat.index_select(&Tensor::new(cells.as_slice(), device)?, 0)?;
    let logits = lm.logits(&picked)?.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, 1)?;
    let targets = Tensor::new(targets.as_slice(), device)?.unsqueeze(1)?;
    let nll: Vec<f32> = logp.gather(&targets, 1)?.squeeze(1)?.neg()?.to_vec1()?;
    for (m, x) in owner.into_iter().zip(nll) {
        out[m].0 += x as f64;
        out[m].1 += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;
    use crate::testing::tiny_with_window;

    /// Batched teacher-forced scoring gives each example's loss alone, for
    /// every architecture, with a shared prefix and an example with nothing
    /// trained.
    #[test]
    fn batched_nll_equals_each_example_alone() {
        use crate::data::Example;
        for arch in Architecture::ALL {
            let model = tiny_with_window(arch, 9, None);
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
}
