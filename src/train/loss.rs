//! Masked next-token cross-entropy, computed only at trained positions.
//!
//! The hidden states of trained positions are gathered first; logits are then
//! made in chunks of rows and dropped at once, and the backward pass makes them
//! again, chunk by chunk. So the full `[tokens, vocab]` logits never exist, and
//! the frozen output matrix gets no gradient.

use crate::model::autograd::{apply, Function};
use crate::model::{CausalLm, FrozenWeight};
use candle_core::{DType, Result, Tensor, D};

/// Rows of logits made at once on the CPU (128 × 49152 f32 is 25 MB).
const CPU_CHUNK_ROWS: usize = 128;
/// Logits made at once on a GPU, in elements (256 MB of f32): large matmuls, and
/// few of the host reads that a chunk's loss needs.
const GPU_CHUNK_LOGITS: usize = 64 << 20;

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
    apply(
        hidden,
        ChunkedCrossEntropy {
            weight: weight.clone(),
            labels: labels.detach(),
            softcap,
        },
    )
}

/// One chunk's logits (f32), softmax and labels, and with soft-capping the
/// derivative of the cap at each logit.
struct Chunk {
    logits: Tensor,
    probs: Tensor,
    labels: Tensor,
    cap_slope: Option<Tensor>,
}

struct ChunkedCrossEntropy {
    weight: FrozenWeight,
    labels: Tensor,
    softcap: Option<f64>,
}

impl ChunkedCrossEntropy {
    /// Logits, probabilities and labels of rows `start..start + len`.
    fn chunk(&self, hidden: &Tensor, start: usize, len: usize) -> Result<Chunk> {
        let h = hidden.narrow(0, start, len)?;
        let raw = match &self.weight {
            // candle's matmul for every chunk, however few its rows, so a
            // row's loss does not depend on the chunk it falls in.
            FrozenWeight::Dense(w) => h.matmul(&w.t()?)?,
            blocks => blocks.matmul_t(&h.contiguous()?)?,
        }
        .to_dtype(DType::F32)?;
        let (logits, cap_slope) = match self.softcap {
            Some(c) => {
                let th = (&raw / c)?.tanh()?;
                ((&th * c)?, Some((1.0 - th.sqr()?)?))
            }
            None => (raw, None),
        };
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        Ok(Chunk {
            logits,
            probs,
            labels: self.labels.narrow(0, start, len)?,
            cap_slope,
        })
    }

    /// Each row's loss, `−log p(label)`. Taken from the softmax when the label's
    /// probability is representable, else (losses above ~87) from log-softmax.
    fn chunk_loss(c: &Chunk) -> Result<Tensor> {
        let labels = c.labels.unsqueeze(1)?;
        let p = c.probs.gather(&labels, 1)?.squeeze(1)?;
        if p.flatten_all()?.min(0)?.to_scalar::<f32>()? > 0.0 {
            return p.log()?.neg();
        }
        candle_nn::ops::log_softmax(&c.logits, D::Minus1)?
            .gather(&labels, 1)?
            .squeeze(1)?
            .neg()
    }

    /// The gradient of each row's loss with respect to its hidden state:
    /// `(softmax − onehot(label)) · W = softmax · W − W[label]`.
    /// With soft-capping, each logit's gradient is scaled by the cap's slope first.
    fn chunk_grad(&self, c: &Chunk, dtype: DType) -> Result<Tensor> {
        if let Some(slope) = &c.cap_slope {
            let vocab = c.probs.dim(1)?;
            let onehot = candle_nn::encoding::one_hot(c.labels.clone(), vocab, 1f32, 0f32)?;
            let d_logits = ((&c.probs - onehot)? * slope)?.to_dtype(self.weight.dtype())?;
            return self.weight.matmul(&d_logits)?.to_dtype(dtype);
        }
        let probs = c.probs.to_dtype(self.weight.dtype())?;
        (self.weight.matmul(&probs)? - self.weight.rows(&c.labels)?)?.to_dtype(dtype)
    }

    /// `(start, len)` of each chunk of `hidden`'s rows.
    fn chunks(&self, hidden: &Tensor) -> Result<impl Iterator<Item = (usize, usize)>> {
        let rows = if hidden.device().is_cpu() {
            CPU_CHUNK_ROWS
        } else {
            (GPU_CHUNK_LOGITS / self.weight.dims().0.max(1)).max(CPU_CHUNK_ROWS)
        };
        let n = hidden.dim(0)?;
        Ok((0..n)
            .step_by(rows)
            .map(move |start| (start, rows.min(n - start))))
    }
}

impl Function for ChunkedCrossEntropy {
    fn name(&self) -> &'static str {
        "chunked_cross_entropy"
    }

    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let mut parts = vec![Tensor::zeros(0, DType::F32, hidden.device())?];
        for (start, len) in self.chunks(hidden)? {
            parts.push(Self::chunk_loss(&self.chunk(hidden, start, len)?)?);
        }
        Tensor::cat(&parts, 0)
    }

    fn backward(&self, hidden: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let mut parts = vec![Tensor::zeros(
            (0, hidden.dim(1)?),
            hidden.dtype(),
            hidden.device(),
        )?];
        for (start, len) in self.chunks(hidden)? {
            let chunk = self.chunk(hidden, start, len)?;
            let scale = grad
                .narrow(0, start, len)?
                .unsqueeze(1)?
                .to_dtype(hidden.dtype())?;
            parts.push(
                self.chunk_grad(&chunk, hidden.dtype())?
                    .broadcast_mul(&scale)?,
            );
        }
        Tensor::cat(&parts, 0)
    }
}

/// Each row's cross-entropy (`[n]`, f32) and the gradient of their sum with
/// respect to `hidden` (`[n, d]`), in one pass: the logits of each chunk are made
/// once and dropped.
pub fn cross_entropy_and_grad(
    hidden: &Tensor,
    weight: &FrozenWeight,
    labels: &Tensor,
    softcap: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let ce = ChunkedCrossEntropy {
        weight: weight.clone(),
        labels: labels.detach(),
        softcap,
    };
    let mut losses = vec![Tensor::zeros(0, DType::F32, hidden.device())?];
    let mut grads = vec![Tensor::zeros(
        (0, hidden.dim(1)?),
        hidden.dtype(),
        hidden.device(),
    )?];
    for (start, len) in ce.chunks(hidden)? {
        let chunk = ce.chunk(hidden, start, len)?;
        losses.push(ChunkedCrossEntropy::chunk_loss(&chunk)?);
        grads.push(ce.chunk_grad(&chunk, hidden.dtype())?);
    }
    Ok((Tensor::cat(&losses, 0)?, Tensor::cat(&grads, 0)?))
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

    /// With the output matrix in blocks (a quantized base's tied embeddings),
    /// losses and gradients are those of its dequantized matrix, over several
    /// chunks and a last short one; the gradient matches finite differences.
    #[test]
    fn a_quantized_output_matrix_gives_its_dequantized_losses() {
        let q = crate::model::QuantizedWeight::quantize(&randn(&[300, 64], 21), GgmlDType::Q8_0)
            .unwrap();
        let blocks = FrozenWeight::from(q.clone());
        let flat = dense(&q.dequantize().unwrap());
        let n = 2 * CPU_CHUNK_ROWS + 5;
        let h = randn(&[n, 64], 22);
        let labels = Tensor::from_vec(
            (0..n as u32).map(|i| i * 13 % 300).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )
        .unwrap();
        for softcap in [None, Some(3.0)] {
            let (loss, grad) = cross_entropy_and_grad(&h, &blocks, &labels, softcap).unwrap();
            let (want_loss, want_grad) =
                cross_entropy_and_grad(&h, &flat, &labels, softcap).unwrap();
            assert!(crate::testing::max_abs_diff(&loss, &want_loss) < 1e-5);
            assert!(crate::testing::max_abs_diff(&grad, &want_grad) < 1e-5);
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
        let labels = Tensor::from_vec(
            (0..300u32).map(|i| i * 7 % 11).collect::<Vec<_>>(),
            300,
            &Device::Cpu,
        )
        .unwrap();
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
        let labels = Tensor::from_vec(
            (0..300u32).map(|i| i * 5 % 11).collect::<Vec<_>>(),
            300,
            &Device::Cpu,
        )
        .unwrap();
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
            let labels = Tensor::from_vec(
                (0..40u32).map(|i| i * 7 % 300).collect::<Vec<_>>(),
                40,
                &device,
            )
            .unwrap();
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
