//! One micro-batch's forward and backward through the whole model, written out:
//! embeddings → blocks → final norm → cross-entropy, then back again, block by
//! block, with [`Block::backward`](crate::model::Block::backward).
//!
//! With `recompute` (activation checkpointing) only each block's input is kept
//! during the forward pass, and the block is run again just before its
//! backward: less memory for about a third more compute.

use super::loss::cross_entropy_and_grad;
use super::optim::Gradients;
use crate::data::Batch;
use crate::model::linear::LoraGrad;
use crate::model::{ops, CausalLm, ForwardInput, Pass};
use anyhow::Result;
use candle_core::Tensor;

/// The summed loss of a micro-batch and the gradients of `weight × loss`,
/// aligned with [`crate::lora::parameters`].
pub fn loss_and_gradients(
    lm: &CausalLm,
    batch: &Batch,
    pass: Pass,
    weight: f64,
    recompute: bool,
) -> Result<(f64, Gradients)> {
    let input = &batch.input;
    let (b, t) = input.ids.dims2()?;
    let d = lm.config.hidden_size;
    let ctx = lm.context(
        &ForwardInput {
            pass,
            ..input.clone()
        },
        0,
    )?;

    let mut x = lm.embed(&input.ids)?;
    let mut inputs = Vec::with_capacity(lm.layers.len());
    let mut saved = Vec::with_capacity(lm.layers.len());
    for layer in &lm.layers {
        let (y, s) = layer.forward(&x, &ctx, None, !recompute)?;
        if recompute {
            inputs.push(x);
        } else {
            saved.push(s);
        }
        x = y;
    }

    let normed = ops::rms_norm(&x, &lm.norm, ctx.eps)?;
    let rows = normed
        .reshape((b * t, d))?
        .index_select(&batch.trained, 0)?;
    let labels = batch
        .targets
        .flatten_all()?
        .index_select(&batch.trained, 0)?;
    let (losses, d_rows) = cross_entropy_and_grad(
        &rows,
        lm.output_weight(),
        &labels,
        lm.config.final_logit_softcapping,
    )?;
    let loss: f64 = losses.sum_all()?.to_scalar::<f32>()? as f64;
    let d_normed = Tensor::zeros((b * t, d), x.dtype(), x.device())?
        .index_add(&batch.trained, &(d_rows * weight)?, 0)?
        .reshape((b, t, d))?;
    let mut g = ops::rms_norm_backward(&x, &lm.norm, ctx.eps, &d_normed)?;

    let mut per_layer: Vec<Vec<Option<LoraGrad>>> = Vec::with_capacity(lm.layers.len());
    for (i, layer) in lm.layers.iter().enumerate().rev() {
        let s = match saved.pop().flatten() {
            Some(s) => s,
            None => layer
                .forward(&inputs[i], &ctx, None, true)?
                .1
                .expect("saved activations"),
        };
        let (dx, grads) = layer.backward(&s, &g, &ctx)?;
        per_layer.push(grads);
        g = dx;
    }
    per_layer.reverse();
    let gradients = per_layer
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|(da, db)| [Some(da), Some(db)])
        .collect();
    Ok((loss, gradients))
}
