//! One update's loss and gradients over its micro-batches, and scoring without
//! gradients: both sharded over [`crate::threads`]' workers.

use super::optim::{accumulate, Gradients};
use super::{loss, step};
use crate::data::{make_batch, plan_epoch, Example};
use crate::pretrained::Model;
use crate::rng::Rng;
use anyhow::{bail, Result};

/// The loss and summed gradients of one update.
pub struct Update {
    /// Mean cross-entropy per trained token over the whole update.
    pub loss: f64,
    /// Gradients of that loss, aligned with the optimizer's parameters.
    pub gradients: Gradients,
    /// Non-padding tokens.
    pub tokens: usize,
    /// Trained tokens.
    pub trained_tokens: usize,
}

/// Runs forward and backward over the micro-batches of one update. Each
/// micro-batch's summed loss is divided by the trained tokens of the whole
/// update, so the result does not depend on how the update is split.
/// `dropout_seeds` holds one seed per micro-batch. Micro-batches are cut into
/// [shards](crate::data::shards) that run on [`crate::threads`]' workers.
pub fn step_gradients(
    model: &Model,
    examples: &[Example],
    micro_batches: &[Vec<crate::data::batch::Row>],
    dropout_seeds: &[u64],
    recompute: bool,
) -> Result<Update> {
    let lm = &model.lm;
    let mut shards = Vec::new();
    for (rows, &seed) in micro_batches.iter().zip(dropout_seeds) {
        for (i, rows) in crate::data::shards(examples, rows, lm.device())
            .iter()
            .enumerate()
        {
            let batch = make_batch(
                examples,
                rows,
                model.tokenizer.pad_id(),
                lm.dtype(),
                lm.device(),
            )?;
            // The first shard keeps the micro-batch's seed; the others get their own.
            let seed = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            shards.push((batch, seed));
        }
    }
    let trained_tokens: usize = shards.iter().map(|(b, _)| b.trained_tokens).sum();
    let tokens: usize = shards.iter().map(|(b, _)| b.real_tokens).sum();
    let weight = 1.0 / trained_tokens.max(1) as f64;
    let (loss, gradients) = crate::threads::fold_in_waves(
        lm.device(),
        &shards,
        (0.0, Gradients::new()),
        |_, (batch, seed)| {
            if batch.trained_tokens == 0 {
                return Ok(None);
            }
            let pass = crate::model::Pass {
                dropout_seed: Some(*seed),
                autograd: false,
            };
            step::loss_and_gradients(lm, batch, pass, weight, recompute).map(Some)
        },
        |(loss, mut gradients), shard| {
            let Some((summed, grads)) = shard else {
                return Ok((loss, gradients));
            };
            accumulate(&mut gradients, grads)?;
            Ok((loss + summed * weight, gradients))
        },
    )?;
    Ok(Update {
        loss,
        gradients,
        tokens,
        trained_tokens,
    })
}

/// The summed cross-entropy over the trained positions of `rows` of
/// `examples`, and how many positions that is. A forward pass only, sharded
/// over [`crate::threads`]' workers like training.
pub fn summed_loss(
    model: &Model,
    examples: &[Example],
    rows: &[crate::data::batch::Row],
) -> Result<(f64, usize)> {
    let lm = &model.lm;
    let shards = crate::data::shards(examples, rows, lm.device());
    crate::threads::fold_in_waves(
        lm.device(),
        &shards,
        (0.0, 0),
        |_, rows| {
            let batch = make_batch(
                examples,
                rows,
                model.tokenizer.pad_id(),
                lm.dtype(),
                lm.device(),
            )?;
            if batch.trained_tokens == 0 {
                return Ok((0.0, 0));
            }
            let hidden = lm.forward_hidden(&batch.input, None)?.detach();
            let summed = loss::summed_cross_entropy(lm, &hidden, &batch.targets, &batch.trained)?;
            Ok((summed.to_scalar::<f32>()? as f64, batch.trained_tokens))
        },
        |(total, count), (summed, n)| Ok((total + summed, count + n)),
    )
}

/// Mean cross-entropy per trained token of `model` over `examples`.
pub fn evaluate(model: &Model, examples: &[Example], batch_size: usize) -> Result<f64> {
    if examples.is_empty() {
        bail!("nothing to evaluate on");
    }
    let (mut total, mut count) = (0.0, 0);
    // One micro-batch at a time, as in training: a GPU takes each in one piece.
    for rows in plan_epoch(examples, batch_size, 1, None, &mut Rng::new(0))
        .iter()
        .flatten()
    {
        let (summed, n) = summed_loss(model, examples, rows)?;
        total += summed;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}
