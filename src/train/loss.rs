//! Masked next-token cross-entropy, computed only at trained positions.
//!
//! The hidden states of trained positions are gathered first; logits are then
//! made in chunks of rows and dropped at once, and the backward pass makes them
//! again, chunk by chunk. So the full `[tokens, vocab]` logits never exist, and
//! the frozen output matrix gets no gradient.

use crate::model::autograd::{apply, Function};
use crate::model::CausalLm;
use candle_core::{DType, Result, Tensor, D};

/// Rows of logits made at once.
const CHUNK_ROWS: usize = 256;

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
    let out = lm.lm_head.as_ref().map_or(&lm.embed_tokens, |h| &h.weight);
    per_row_cross_entropy(&picked, out, &labels)?.sum_all()
}

/// Cross-entropy of each row of `hidden` (`[n, d]`) against `labels` (`[n]`),
/// with logits `hidden · weightᵀ` (weight `[vocab, d]`, frozen). Returns `[n]` f32.
pub fn per_row_cross_entropy(hidden: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Tensor> {
    apply(
        hidden,
        ChunkedCrossEntropy {
            weight: weight.detach(),
            labels: labels.detach(),
        },
    )
}

struct ChunkedCrossEntropy {
    weight: Tensor,
    labels: Tensor,
}

impl ChunkedCrossEntropy {
    /// Log-probabilities and labels of rows `start..start + len`.
    fn chunk(&self, hidden: &Tensor, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let h = hidden.narrow(0, start, len)?;
        let logits = h.matmul(&self.weight.t()?)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok((logp, self.labels.narrow(0, start, len)?.unsqueeze(1)?))
    }
}

impl Function for ChunkedCrossEntropy {
    fn name(&self) -> &'static str {
        "chunked_cross_entropy"
    }

    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let n = hidden.dim(0)?;
        let mut parts = Vec::new();
        for start in (0..n).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(n - start);
            let (logp, labels) = self.chunk(hidden, start, len)?;
            parts.push(logp.gather(&labels, 1)?.squeeze(1)?.neg()?);
        }
        if parts.is_empty() {
            return Tensor::zeros(0, DType::F32, hidden.device());
        }
        Tensor::cat(&parts, 0)
    }

    fn backward(&self, hidden: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // d loss_i / d logits_i = softmax_i − onehot(label_i); then through the matmul.
        let n = hidden.dim(0)?;
        let mut parts = Vec::new();
        for start in (0..n).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(n - start);
            let (logp, labels) = self.chunk(hidden, start, len)?;
            let onehot = Tensor::zeros(logp.shape(), DType::F32, logp.device())?.scatter_add(
                &labels,
                &Tensor::ones((len, 1), DType::F32, logp.device())?,
                1,
            )?;
            let dlogits = (logp.exp()? - onehot)?
                .broadcast_mul(&grad.narrow(0, start, len)?.unsqueeze(1)?)?;
            parts.push(
                dlogits
                    .to_dtype(self.weight.dtype())?
                    .matmul(&self.weight)?,
            );
        }
        if parts.is_empty() {
            return hidden.zeros_like();
        }
        Tensor::cat(&parts, 0)?.to_dtype(hidden.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, randn};
    use candle_core::Device;

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
        let got = per_row_cross_entropy(&h, &w, &labels)
            .unwrap()
            .mean_all()
            .unwrap();
        let (a, b): (f32, f32) = (want.to_scalar().unwrap(), got.to_scalar().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let w = randn(&[9, 4], 3);
        let labels = Tensor::new(&[1u32, 8, 0, 4, 4], &Device::Cpu).unwrap();
        check_gradient(&[5, 4], 4, |h| per_row_cross_entropy(h, &w, &labels));
    }
}
