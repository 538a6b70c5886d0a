//! The model's non-matmul ops, each with a gradient that is never silently lost.
//!
//! Forward passes use candle's fast kernels; each op supplies its own backward
//! (see [`super::autograd`]). Tests check every gradient against finite differences.

use super::autograd::{apply, Function};
use candle_core::{DType, Result, Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
/// The weight is frozen: only `x` receives a gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    apply(
        x,
        RmsNorm {
            weight: weight.detach(),
            eps,
        },
    )
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl Function for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }

    fn backward(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // With r = 1/rms(x) and u = grad·w: dx = r·u − x·r³·mean(u·x).
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let u = grad
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let mean_ux = (&u * &x)?.mean_keepdim(D::Minus1)?;
        let dx = (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * mean_ux)?)?)?;
        dx.to_dtype(dtype)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    apply(x, Softmax)
}

struct Softmax;

impl Function for Softmax {
    fn name(&self) -> &'static str {
        "softmax_last_dim"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }

    fn backward(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // dx = y · (g − Σ g·y)
        let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
        y * grad.broadcast_sub(&dot)?
    }
}

/// Rotary embedding in HF layout (rotate-half), `x`: `[b, heads, t, head_dim]`,
/// `cos`/`sin`: `[b, t, head_dim / 2]` (constants: no gradient flows to them).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(
        x,
        Rope {
            cos: cos.detach(),
            sin: sin.detach(),
        },
    )
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Function for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)
    }

    fn backward(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        // Rope rotates each pair by an angle; its transpose rotates back.
        candle_nn::rotary_emb::rope(&grad.contiguous()?, &self.cos, &self.sin.neg()?)
    }
}

/// `x Wᵀ` for a frozen `W` (`[out, in]`), `x`: `[rows, in]`. Only `x` gets a
/// gradient: no weight gradient is ever computed for frozen weights.
pub fn frozen_matmul_t(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    apply(
        x,
        FrozenMatmul {
            weight: weight.detach(),
        },
    )
}

struct FrozenMatmul {
    weight: Tensor,
}

impl Function for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen_matmul"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::gemv::applies(x, &self.weight) {
            return super::gemv::matmul_t(x, &self.weight);
        }
        x.matmul(&self.weight.t()?)
    }

    fn backward(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        grad.matmul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, randn};

    #[test]
    fn gradients_match_finite_differences() {
        let cos = randn(&[1, 3, 2], 5);
        let sin = randn(&[1, 3, 2], 6);
        let w = randn(&[4], 7);
        check_gradient(&[1, 2, 3, 4], 8, |x| rms_norm(x, &w, 1e-5));
        check_gradient(&[2, 3, 5], 11, softmax_last_dim);
        check_gradient(&[1, 2, 3, 4], 12, |x| rope(x, &cos, &sin));
        let weight = randn(&[5, 4], 13);
        check_gradient(&[3, 4], 14, |x| frozen_matmul_t(x, &weight));
    }

    #[test]
    fn ops_work_on_strided_and_offset_inputs() {
        // A transposed view and a view that starts mid-buffer.
        let base = randn(&[6, 4], 20);
        let w = randn(&[4], 21);
        for x in [
            base.t().unwrap().t().unwrap(),
            base.narrow(0, 2, 3).unwrap(),
        ] {
            let v = candle_core::Var::from_tensor(&x).unwrap();
            let tracked = rms_norm(&(v.as_tensor() * 1.0).unwrap(), &w, 1e-5).unwrap();
            let plain = rms_norm(&x, &w, 1e-5).unwrap();
            let diff: f32 = (tracked - plain)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(0)
                .unwrap()
                .max(1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-6);
        }
    }

    #[test]
    fn frozen_weights_get_no_gradient() {
        let w = candle_core::Var::from_tensor(&randn(&[5, 4], 1)).unwrap();
        let x = candle_core::Var::from_tensor(&randn(&[3, 4], 2)).unwrap();
        let grads = frozen_matmul_t(x.as_tensor(), w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(w.as_tensor()).is_none());
    }
}
