//! The model's non-matmul ops, each with a gradient that is never silently lost.
//!
//! candle's fast kernels for rms_norm, softmax and rope record no backward pass.
//! Each op here uses the fast kernel only when no input tracks a gradient
//! (inference), and otherwise a path built from differentiable candle ops.
//! Tests check the two paths agree and the gradients match finite differences.

use candle_core::{DType, Result, Tensor, D};

fn tracks(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`, computed in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !tracks(&[x, weight]) {
        return candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xf.broadcast_mul(&inv_rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !tracks(&[x]) {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    // The max shift does not change the value, so its gradient path is cut.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotary embedding in HF layout (rotate-half), `x`: `[b, heads, t, head_dim]`,
/// `cos`/`sin`: `[b, t, head_dim / 2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if !tracks(&[x, cos, sin]) {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    let half = x.dim(D::Minus1)? / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::testing::randn(shape, seed)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn differentiable_paths_agree_with_fast_kernels() {
        let x = randn(&[2, 3, 5, 8], 1);
        let w = randn(&[8], 2);
        let cos = randn(&[2, 5, 4], 3);
        let sin = randn(&[2, 5, 4], 4);
        let xv = Var::from_tensor(&x).unwrap();
        let xt = xv.as_tensor();
        assert!(
            max_diff(
                &rms_norm(&x, &w, 1e-5).unwrap(),
                &rms_norm(xt, &w, 1e-5).unwrap()
            ) < 1e-5
        );
        assert!(
            max_diff(
                &softmax_last_dim(&x).unwrap(),
                &softmax_last_dim(xt).unwrap()
            ) < 1e-6
        );
        assert!(
            max_diff(
                &rope(&x, &cos, &sin).unwrap(),
                &rope(xt, &cos, &sin).unwrap()
            ) < 1e-5
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let cos = randn(&[1, 3, 2], 5);
        let sin = randn(&[1, 3, 2], 6);
        let w = randn(&[4], 7);
        crate::testing::check_gradient(&[1, 2, 3, 4], 8, |x| rms_norm(x, &w, 1e-5));
        crate::testing::check_gradient(&[4], 9, |wv| rms_norm(&randn(&[2, 3, 4], 10), wv, 1e-5));
        crate::testing::check_gradient(&[2, 3, 5], 11, softmax_last_dim);
        crate::testing::check_gradient(&[1, 2, 3, 4], 12, |x| rope(x, &cos, &sin));
        let _ = Device::Cpu;
    }
}
