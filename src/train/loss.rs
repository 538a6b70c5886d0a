//! Masked next-token cross-entropy, computed only at trained positions.
//!
//! The hidden states of trained positions are gathered first. The output
//! matrix is then read a tile of vocabulary rows at a time: each tile's
//! logits for every row are made, folded into a running softmax (the row's
//! largest logit so far and its sum of exponentials, rescaled when the
//! largest grows, as flash attention does), and dropped. The gradient with
//! respect to the hidden states, `softmax · W − W[label]`, is accumulated in
//! the same pass and divided by the sum at the end. So neither the
//! `[tokens, vocab]` logits nor a chunk of them ever exists, the output
//! matrix is read once per pass (a quantized one is dequantized one tile at a
//! time), and it gets no gradient.

use crate::model::autograd::{apply, Function};
use crate::model::{CausalLm, FrozenWeight};
use candle_core::{DType, Result, Tensor};
use std::ops::Range;

/// Output-matrix values read per tile on the CPU (4 MB of f32).
const CPU_TILE_VALUES: usize = 1 << 20;
/// A CPU tile's vocabulary rows are a multiple of this many (two AMX tiles'
/// rows), where there are more.
const CPU_TILE_ALIGN: usize = 32;
/// Logits of one tile at most on the CPU (32 MB of f32).
const CPU_TILE_LOGITS: usize = 8 << 20;
/// Logits of one tile on a GPU (256 MB of f32): large matmuls, few launches.
const GPU_TILE_LOGITS: usize = 64 << 20;

/// The summed cross-entropy of `targets` at trained positions.
///
/// `hidden`: `[b, t, d]` final hidden states; `targets`: `[b, t]` u32 next tokens;
/// `trained`: the flat indices (`row * t + col`) of positions that count.
/// Returns a scalar (f32): the sum, not the mean, so callers can weight by tokens.
pub fn summed_cross_entropy(
    lm: &CausalLm,
    hidden: &Tensor,
    targets: &Tensor,
    trained: &Tensor,
) -> Result<Tensor> {
    let (b, t, d) = hidden.dims3()?;
    let flat = hidden.reshape((b * t, d))?;
    let picked = flat.index_select(trained, 0)?;
    let labels = targets.flatten_all()?.index_select(trained, 0)?;
    let softcap = lm.config.final_logit_softcapping;
    per_row_cross_entropy(&picked, lm.output_weight(), &labels, softcap)?.sum_all()
}

/// Cross-entropy of each row of `hidden` (`[n, d]`) against `labels` (`[n]`),
/// with logits `hidden · weightᵀ` (weight `[vocab, d]`, frozen, dense or in
/// blocks), soft-capped at `softcap` (Gemma 2). Returns `[n]` f32.
pub fn per_row_cross_entropy(
    hidden: &Tensor,
    weight: &FrozenWeight,
    labels: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let _profile = crate::profile::open(crate::profile::Stage::Loss);
    apply(hidden, TiledCrossEntropy::new(weight, labels, softcap)?)
}

/// Each row's cross-entropy (`[n]`, f32) and the gradient of their sum with
/// respect to `hidden` (`[n, d]`), in one pass over the output matrix.
pub fn cross_entropy_and_grad(
    hidden: &Tensor,
    weight: &FrozenWeight,
    labels: &Tensor,
    softcap: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let _profile = crate::profile::open(crate::profile::Stage::Loss);
    let ce = TiledCrossEntropy::new(weight, labels, softcap)?;
    let (losses, grad) = ce.run(hidden, true, ce.tile_rows(hidden.dim(0)?))?;
    Ok((losses, grad.expect("asked for the gradient")))
}

struct TiledCrossEntropy {
    weight: FrozenWeight,
    labels: Tensor,
    softcap: Option<f64>,
}

/// Logits soft-capped at `cap` (`c · tanh(z / c)`) and the cap's slope at
/// each (`1 − tanh²`); without a cap, the logits and no slope.
fn capped(raw: Tensor, cap: Option<f64>) -> Result<(Tensor, Option<Tensor>)> {
    match cap {
        Some(c) => {
            let th = (raw / c)?.tanh()?;
            Ok(((&th * c)?, Some((1.0 - th.sqr()?)?)))
        }
        None => Ok((raw, None)),
    }
}

impl TiledCrossEntropy {
    fn new(weight: &FrozenWeight, labels: &Tensor, softcap: Option<f64>) -> Result<Self> {
        // A GPU dequantizes a quantized matrix whole: once here, not per tile.
        let weight = match weight {
            FrozenWeight::Quantized(q) if !q.device().is_cpu() => q.dequantize()?.into(),
            w => w.clone(),
        };
        Ok(Self {
            weight,
            labels: labels.detach(),
            softcap,
        })
    }

    /// Vocabulary rows per tile for `n` rows of hidden states: on the CPU a
    /// multiple of [`CPU_TILE_ALIGN`] where it is larger, so that a bf16
    /// weight's tiles are whole AMX tiles.
    fn tile_rows(&self, n: usize) -> usize {
        let (vocab, d) = self.weight.dims();
        let rows = match self.weight.device().is_cpu() {
            true => {
                let rows = (CPU_TILE_VALUES / d.max(1)).min(CPU_TILE_LOGITS / n.max(1));
                match rows > CPU_TILE_ALIGN {
                    true => rows - rows % CPU_TILE_ALIGN,
                    false => rows,
                }
            }
            false => GPU_TILE_LOGITS / n.max(1),
        };
        rows.clamp(1, vocab.max(1))
    }

    /// Each row's loss (`[n]`, f32) and, with `grad`, the gradient of their
    /// sum with respect to `hidden`, in `hidden`'s dtype; `per_tile`
    /// vocabulary rows at a time.
    fn run(
        &self,
        hidden: &Tensor,
        grad: bool,
        per_tile: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (n, d) = hidden.dims2()?;
        let (vocab, _) = self.weight.dims();
        let device = hidden.device();
        let h = hidden.detach().to_dtype(self.weight.dtype())?;
        // The running largest logit of each row, its sum of exponentials
        // relative to it, and Σ exp(logit − largest) · slope · W[v].
        let mut largest = Tensor::full(f32::NEG_INFINITY, (n, 1), device)?;
        let mut sum = Tensor::zeros((n, 1), DType::F32, device)?;
        let mut acc = Tensor::zeros((n, d), DType::F32, device)?;
        // Each row's label logit, read off the tile that holds it: the same
        // product as the logits it is compared with (with a bf16 kernel, a
        // separate f32 dot product would differ by its rounding, and a
        // confident row's loss could come out below zero).
        let labels = self.labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= vocab) {
            candle_core::bail!("label {bad} of a vocabulary of {vocab}");
        }
        let mut label_raw = vec![0f32; n];
        for start in (0..vocab).step_by(per_tile) {
            let tile = start..(start + per_tile).min(vocab);
            let raw = self.weight.matmul_t_rows(&h, tile.clone())?;
            let raw = raw.to_dtype(DType::F32)?;
            read_labels(&raw, &labels, &tile, &mut label_raw)?;
            let (logits, slope) = capped(raw, self.softcap)?;
            let (grown, e, e_sum) = match crate::model::fused::exp_shifted(&logits, &largest)? {
                Some(fused) => fused,
                None => {
                    let grown = largest.maximum(&logits.max_keepdim(1)?)?;
                    let e = logits.broadcast_sub(&grown)?.exp()?;
                    let e_sum = e.sum_keepdim(1)?;
                    (grown, e, e_sum)
                }
            };
            let rescale = (&largest - &grown)?.exp()?;
            sum = (sum.mul(&rescale)? + e_sum)?;
            if grad {
                let weighted = match &slope {
                    Some(s) => (&e * s)?,
                    None => e,
                };
                let weighted = weighted.to_dtype(self.weight.dtype())?;
                let part = self.weight.matmul_rows(&weighted, tile)?;
                acc = (acc.broadcast_mul(&rescale)? + part.to_dtype(DType::F32)?)?;
            }
            largest = grown;
        }
        // The label's own logit, and the slope of the cap there.
        let raw = Tensor::from_vec(label_raw, (n, 1), device)?;
        let (label_logit, label_slope) = capped(raw, self.softcap)?;
        let losses = ((largest + sum.log()?)? - label_logit)?.squeeze(1)?;
        if !grad {
            return Ok((losses, None));
        }
        let label_rows = self.weight.rows(&self.labels)?;
        let label_part = match label_slope {
            Some(s) => label_rows.to_dtype(DType::F32)?.broadcast_mul(&s)?,
            None => label_rows.to_dtype(DType::F32)?,
        };
        let g = (acc.broadcast_div(&sum)? - label_part)?;
        Ok((losses, Some(g.to_dtype(hidden.dtype())?)))
    }
}

/// Copies into `out[i]` the raw logit `raw[i, labels[i] − tile.start]` of
/// each row whose label is in `tile` (`raw`: `[rows, tile.len()]`).
fn read_labels(raw: &Tensor, labels: &[u32], tile: &Range<usize>, out: &mut [f32]) -> Result<()> {
    let width = tile.len();
    let (rows, at): (Vec<usize>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| tile.contains(&(l as usize)))
        .map(|(i, &l)| (i, (i * width + l as usize - tile.start) as u32))
        .unzip();
    if rows.is_empty() {
        return Ok(());
    }
    let at = Tensor::new(at, raw.device())?;
    let values = raw.flatten_all()?.index_select(&at, 0)?.to_vec1::<f32>()?;
    for (i, v) in rows.into_iter().zip(values) {
        out[i] = v;
    }
    Ok(())
}

impl Function for TiledCrossEntropy {
    fn name(&self) -> &'static str {
        "tiled_cross_entropy"
    }

    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.run(hidden, false, self.tile_rows(hidden.dim(0)?))?.0)
    }

    fn backward(&self, hidden: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let tile = self.tile_rows(hidden.dim(0)?);
        let g = self
            .run(hidden, true, tile)?
            .1
            .expect("asked for the gradient");
        let scale = grad.unsqueeze(1)?.to_dtype(hidden.dtype())?;
        g.broadcast_mul(&scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, devices, randn, randn_on};
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    fn dense(w: &Tensor) -> FrozenWeight {
        w.clone().into()
    }

    /// `n` labels `i · step mod vocab`.
    fn labels(n: usize, step: u32, vocab: u32, device: &Device) -> Tensor {
        let ids: Vec<u32> = (0..n as u32).map(|i| i * step % vocab).collect();
        Tensor::from_vec(ids, n, device).unwrap()
    }

    /// A confident row's loss is the log-sum-exp of its logits minus the
    /// label's logit taken from the same products, so it is never below
    /// zero, whatever arithmetic the output matrix's products use (here a
    /// bf16 matrix: the bf16 kernel where the CPU takes it). A label
    /// past the vocabulary is refused.
    #[test]
    fn confident_losses_are_never_negative() {
        let (vocab, d, n) = (300, 64, 100);
        let w = randn(&[vocab, d], 41);
        let held = crate::model::QuantizedWeight::quantize(&w, GgmlDType::BF16).unwrap();
        let labels = labels(n, 7, vocab as u32, &Device::Cpu);
        // Each hidden state points hard at its label's row.
        let h = (w.index_select(&labels, 0).unwrap() * 4.0).unwrap();
        let h = (h + (randn(&[n, d], 42) * 0.01).unwrap()).unwrap();
        let held: FrozenWeight = held.into();
        let losses = per_row_cross_entropy(&h, &held, &labels, None).unwrap();
        let losses = losses.to_vec1::<f32>().unwrap();
        assert!(losses.iter().all(|&l| l >= 0.0), "{losses:?}");
        assert!(losses.iter().all(|&l| l < 1e-3), "confident: {losses:?}");
        let bad = Tensor::new(&[vocab as u32], &Device::Cpu).unwrap();
        let err = per_row_cross_entropy(&h.narrow(0, 0, 1).unwrap(), &held, &bad, None);
        let err = err.unwrap_err().to_string();
        assert!(err.contains("label 300 of a vocabulary of 300"), "{err}");
    }

    /// However many vocabulary rows a tile holds (one, a few, a last short
    /// tile, the whole vocabulary), the losses and gradients are the same,
    /// with and without soft-capping.
    #[test]
    fn tiles_of_any_size_give_the_same_losses() {
        let h = (randn(&[37, 8], 31) * 2.0).unwrap();
        let w = dense(&randn(&[50, 8], 32));
        let labels = labels(37, 11, 50, &Device::Cpu);
        for softcap in [None, Some(1.5)] {
            let ce = TiledCrossEntropy::new(&w, &labels, softcap).unwrap();
            let (want, want_grad) = ce.run(&h, true, 50).unwrap();
            for per_tile in [1, 7, 16, 49] {
                let (got, grad) = ce.run(&h, true, per_tile).unwrap();
                let diff = crate::testing::max_abs_diff(&got, &want);
                assert!(diff < 1e-5, "{per_tile} per tile: {diff}");
                let diff =
                    crate::testing::max_abs_diff(&grad.unwrap(), want_grad.as_ref().unwrap());
                assert!(diff < 1e-5, "{per_tile} per tile: gradient {diff}");
            }
        }
    }

    /// With the output matrix in blocks (a quantized base's tied embeddings),
    /// losses and gradients are those of its dequantized matrix (its exact
    /// f32 products; the int8 kernel's are within its rounding); the gradient
    /// matches finite differences.
    #[test]
    fn a_quantized_output_matrix_gives_its_dequantized_losses() {
        let q = crate::model::QuantizedWeight::quantize(&randn(&[300, 64], 21), GgmlDType::Q8_0)
            .unwrap();
        let fast = FrozenWeight::from(q.clone());
        let mut blocks = fast.clone();
        blocks.set_low_precision_kernels(false);
        let flat = dense(&q.dequantize().unwrap());
        let n = 261;
        let h = randn(&[n, 64], 22);
        let labels = labels(n, 13, 300, &Device::Cpu);
        for softcap in [None, Some(3.0)] {
            let (loss, grad) = cross_entropy_and_grad(&h, &blocks, &labels, softcap).unwrap();
            let (want_loss, want_grad) =
                cross_entropy_and_grad(&h, &flat, &labels, softcap).unwrap();
            assert!(crate::testing::max_abs_diff(&loss, &want_loss) < 1e-5);
            assert!(crate::testing::max_abs_diff(&grad, &want_grad) < 1e-5);
            let (loss, grad) = cross_entropy_and_grad(&h, &fast, &labels, softcap).unwrap();
            // Each logit is off by the rows' rounding (up to ~0.2 here), the
            // errors unbiased: the mean loss moves far less than one row's;
            // the gradient moves about 1% of its norm (measured 0.9-1.1%).
            let row_diff = crate::testing::max_abs_diff(&loss, &want_loss);
            let mean = |l: &Tensor| l.mean_all().unwrap().to_scalar::<f32>().unwrap();
            let mean_diff = (mean(&loss) - mean(&want_loss)).abs();
            assert!(
                row_diff < 0.3 && mean_diff < 0.01,
                "{softcap:?}: {row_diff}, {mean_diff}"
            );
            let norm = |g: &Tensor| g.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
            let relative = (norm(&(&grad - &want_grad).unwrap()) / norm(&want_grad))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(relative < 0.05, "{softcap:?}: gradient off by {relative}");
        }
        let labels = Tensor::new(&[1u32, 299, 0, 4, 4], &Device::Cpu).unwrap();
        check_gradient(&Device::Cpu, &[5, 64], 4, |h| {
            per_row_cross_entropy(h, &blocks, &labels, None)
        });
    }

    #[test]
    fn matches_plain_cross_entropy() {
        let h = randn(&[300, 6], 1);
        let w = randn(&[11, 6], 2);
        let labels = labels(300, 7, 11, &Device::Cpu);
        let want =
            candle_nn::loss::cross_entropy(&h.matmul(&w.t().unwrap()).unwrap(), &labels).unwrap();
        let got = per_row_cross_entropy(&h, &dense(&w), &labels, None)
            .unwrap()
            .mean_all()
            .unwrap();
        let (a, b): (f32, f32) = (want.to_scalar().unwrap(), got.to_scalar().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn huge_losses_stay_exact() {
        // A label whose probability underflows f32: the loss is still the log-softmax one.
        let h = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[200f32, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let loss: f32 = per_row_cross_entropy(&h, &dense(&w), &labels, None)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((loss - 200.0).abs() < 1e-3, "{loss}");
    }

    #[test]
    fn fused_gradient_equals_the_autograd_one() {
        let h = randn(&[300, 6], 5);
        let w = randn(&[11, 6], 6);
        let labels = labels(300, 5, 11, &Device::Cpu);
        for softcap in [None, Some(2.0)] {
            let (losses, grad) = cross_entropy_and_grad(&h, &dense(&w), &labels, softcap).unwrap();
            let v = candle_core::Var::from_tensor(&h).unwrap();
            let auto = per_row_cross_entropy(v.as_tensor(), &dense(&w), &labels, softcap).unwrap();
            let want = auto
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(v.as_tensor())
                .unwrap()
                .clone();
            assert!(crate::testing::max_abs_diff(&losses, &auto) < 1e-6);
            assert!(crate::testing::max_abs_diff(&grad, &want) < 1e-6);
        }
    }

    /// Soft-capped logits (Gemma 2): the loss is the plain cross-entropy of
    /// `c · tanh(z / c)`, and its gradient matches finite differences.
    #[test]
    fn softcapped_cross_entropy_caps_the_logits() {
        let h = randn(&[7, 4], 11);
        let w = (randn(&[9, 4], 12) * 3.0).unwrap();
        let labels = Tensor::new(&[1u32, 8, 0, 4, 4, 2, 6], &Device::Cpu).unwrap();
        let capped = crate::model::ops::softcap(&h.matmul(&w.t().unwrap()).unwrap(), 2.0).unwrap();
        let want = candle_nn::loss::cross_entropy(&capped, &labels).unwrap();
        let got = per_row_cross_entropy(&h, &dense(&w), &labels, Some(2.0))
            .unwrap()
            .mean_all()
            .unwrap();
        assert!(crate::testing::max_abs_diff(&got, &want) < 1e-5);
        for device in devices() {
            let w = randn_on(&[9, 4], 3, &device);
            let labels = Tensor::new(&[1u32, 8, 0, 4, 4], &device).unwrap();
            check_gradient(&device, &[5, 4], 4, |h| {
                per_row_cross_entropy(h, &dense(&w), &labels, Some(0.7))
            });
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for device in devices() {
            let w = randn_on(&[9, 4], 3, &device);
            let labels = Tensor::new(&[1u32, 8, 0, 4, 4], &device).unwrap();
            check_gradient(&device, &[5, 4], 4, |h| {
                per_row_cross_entropy(h, &dense(&w), &labels, None)
            });
        }
    }

    #[test]
    fn bf16_losses_and_gradients_follow_f32() {
        for device in devices() {
            let labels = labels(40, 7, 300, &device);
            // The loss per row (f32 in both cases) and the hidden states' gradient.
            let run = |dtype: DType| {
                let h = randn_on(&[40, 16], 1, &device).to_dtype(dtype).unwrap();
                let w = (randn_on(&[300, 16], 2, &device) * 0.3)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let (losses, grad) = cross_entropy_and_grad(&h, &dense(&w), &labels, None).unwrap();
                (losses, grad.to_dtype(DType::F32).unwrap())
            };
            let ((want_loss, want_grad), (loss, grad)) = (run(DType::F32), run(DType::BF16));
            let loss_diff = crate::testing::max_abs_diff(&want_loss, &loss);
            let grad_diff = crate::testing::max_abs_diff(&want_grad, &grad);
            assert!(
                loss_diff < 0.05,
                "{device:?}: bf16 losses off by {loss_diff}"
            );
            assert!(
                grad_diff < 0.01,
                "{device:?}: bf16 gradient off by {grad_diff}"
            );
        }
    }
}
