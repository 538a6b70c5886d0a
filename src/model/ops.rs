//! The model's non-matmul ops, each with a gradient that is never silently lost.
//!
//! Forward passes use candle's fast kernels; each op supplies its own backward
//! (see [`super::autograd`]). Tests check every gradient against finite differences.

use super::autograd::{apply, Function};
use super::fused;
use super::linear::FrozenWeight;
use candle_core::{DType, Result, Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
/// The weight is frozen: only `x` receives a gradient.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let _profile = crate::profile::open(crate::profile::Stage::Norms);
    apply(
        x,
        RmsNorm {
            weight: weight.detach(),
            eps,
        },
    )
}

/// The gradient of [`rms_norm`] with respect to `x`, given the output gradient `dy`.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, eps: f64, dy: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::open(crate::profile::Stage::Norms);
    if let Some(dx) = fused::rms_norm_backward(x, weight, eps, dy)? {
        return Ok(dx);
    }
    // With r = 1/rms(x) and u = dy·w: dx = r·u − x·r³·mean(u·x).
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let u = dy
        .to_dtype(DType::F32)?
        .broadcast_mul(&weight.to_dtype(DType::F32)?)?;
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let mean_ux = (&u * &x)?.mean_keepdim(D::Minus1)?;
    let dx = (u.broadcast_mul(&r)? - x.broadcast_mul(&(r.powf(3.0)? * mean_ux)?)?)?;
    dx.to_dtype(dtype)
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
        let x = x.contiguous()?;
        match fused::rms_norm(&x, &self.weight, self.eps)? {
            Some(y) => Ok(y),
            None => candle_nn::ops::rms_norm(&x, &self.weight, self.eps as f32),
        }
    }

    fn backward(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        rms_norm_backward(x, &self.weight, self.eps, grad)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    apply(x, Softmax)
}

/// The gradient of a softmax over the last dimension, from its output `y` and the
/// output gradient `dy`: `y · (dy − Σ dy·y)`.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if let Some(dx) = fused::softmax_backward(y, dy)? {
        return Ok(dx);
    }
    let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
    y * dy.broadcast_sub(&dot)?
}

struct Softmax;

impl Function for Softmax {
    fn name(&self) -> &'static str {
        "softmax_last_dim"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        match fused::softmax_last_dim(&x)? {
            Some(y) => Ok(y),
            None => candle_nn::ops::softmax_last_dim(&x),
        }
    }

    fn backward(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        softmax_backward(y, grad)
    }
}

/// Rotary embedding in HF layout (rotate-half), `x`: `[b, heads, t, head_dim]`,
/// `cos`/`sin`: `[b, t, rotary_dim / 2]` (constants: no gradient flows to them).
/// With a partial rotary factor (Phi-3) only the first `rotary_dim` features of
/// each head turn; the rest pass through.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::open(crate::profile::Stage::Rope);
    on_rotary_part(x, cos, |rot| {
        apply(
            rot,
            Rope {
                cos: cos.detach(),
                sin: sin.detach(),
            },
        )
    })
}

/// The gradient of [`rope`] with respect to `x`: rope rotates each pair by an
/// angle, and its transpose rotates back.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let _profile = crate::profile::open(crate::profile::Stage::Rope);
    on_rotary_part(dy, cos, |rot| rotate(rot, cos, sin, true))
}

/// Rope on `x` (forward, or with `back` its inverse), by the fused kernel
/// where it applies.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, back: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    if let Some(y) = fused::rope(&x, cos, sin, back)? {
        return Ok(y);
    }
    match back {
        false => candle_nn::rotary_emb::rope(&x, cos, sin),
        true => candle_nn::rotary_emb::rope(&x, cos, &sin.neg()?),
    }
}

/// Applies `f` to the first `2 · cos.dim(-1)` features of `x`'s last axis and
/// leaves the rest as they are.
fn on_rotary_part(
    x: &Tensor,
    cos: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (hd, rd) = (x.dim(D::Minus1)?, 2 * cos.dim(D::Minus1)?);
    if rd == hd {
        return f(x);
    }
    let last = x.rank() - 1;
    let rotated = f(&x.narrow(last, 0, rd)?.contiguous()?)?;
    Tensor::cat(&[&rotated, &x.narrow(last, rd, hd - rd)?], last)
}

/// The gradient of SiLU, `x·σ(x)`, given its input `x` and output gradient `dy`.
pub fn silu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    // d/dx x·σ(x) = σ(x) · (1 + x·(1 − σ(x)))
    let s = candle_nn::ops::sigmoid(x)?;
    let inner = ((x * (1.0 - &s)?)? + 1.0)?;
    dy * (s * inner)?
}

/// The MLP's activation on the gate: SiLU, or GELU's tanh approximation.
pub fn activation(x: &Tensor, act: crate::config::Activation) -> Result<Tensor> {
    match act {
        crate::config::Activation::Silu => x.silu(),
        crate::config::Activation::GeluTanh => apply(x, GeluTanh),
    }
}

/// The gradient of [`activation`], given its input `x` and output gradient `dy`.
pub fn activation_backward(
    x: &Tensor,
    act: crate::config::Activation,
    dy: &Tensor,
) -> Result<Tensor> {
    match act {
        crate::config::Activation::Silu => silu_backward(x, dy),
        crate::config::Activation::GeluTanh => gelu_tanh_backward(x, dy),
    }
}

/// The gated activation of the MLP, `activation(gate) · up`. Where neither
/// input tracks a gradient (the hand-written backward's path), it runs on the
/// CPU as one fused kernel.
pub fn gated(gate: &Tensor, up: &Tensor, act: crate::config::Activation) -> Result<Tensor> {
    let _profile = crate::profile::open(crate::profile::Stage::Activation);
    if !(gate.track_op() || up.track_op()) {
        if let Some(y) = fused::gated(gate, up, act)? {
            return Ok(y);
        }
    }
    activation(gate, act)? * up
}

/// The gradients of [`gated`] with respect to `gate` and `up`, given the
/// output gradient `d`.
pub fn gated_backward(
    gate: &Tensor,
    up: &Tensor,
    act: crate::config::Activation,
    d: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let _profile = crate::profile::open(crate::profile::Stage::Activation);
    if let Some(grads) = fused::gated_backward(gate, up, act, d)? {
        return Ok(grads);
    }
    let d_up = (d * activation(gate, act)?)?;
    let d_gate = activation_backward(gate, act, &(d * up)?)?;
    Ok((d_gate, d_up))
}

/// √(2/π), of GELU's tanh approximation.
const GELU_K: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

/// The gradient of GELU's tanh approximation `½x(1 + tanh(u))`, `u = k(x + c·x³)`:
/// `½(1 + tanh u) + ½x(1 − tanh² u)·k(1 + 3c·x²)`.
pub fn gelu_tanh_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let x2 = x.sqr()?;
    let u = ((&x + (&x * &x2)? * GELU_C)? * GELU_K)?;
    let th = u.tanh()?;
    let left = ((&th + 1.0)? * 0.5)?;
    let du = ((&x2 * (3.0 * GELU_C))? + 1.0)? * GELU_K;
    let right = ((&x * 0.5)? * (1.0 - th.sqr()?)?)?.mul(&du?)?;
    (dy.to_dtype(DType::F32)? * (left + right)?)?.to_dtype(dtype)
}

struct GeluTanh;

impl Function for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu_tanh"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (`gelu_erf` is the exact one).
        x.gelu()
    }

    fn backward(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        gelu_tanh_backward(x, grad)
    }
}

/// Soft-capping: `c · tanh(x / c)` (Gemma 2's attention scores and logits).
pub fn softcap(x: &Tensor, c: f64) -> Result<Tensor> {
    apply(x, Softcap { c })
}

/// The gradient of [`softcap`] from its input `x`: `dy · (1 − tanh²(x / c))`.
pub fn softcap_backward(x: &Tensor, c: f64, dy: &Tensor) -> Result<Tensor> {
    let th = (x / c)?.tanh()?;
    dy * (1.0 - th.sqr()?)?
}

struct Softcap {
    c: f64,
}

impl Function for Softcap {
    fn name(&self) -> &'static str {
        "softcap"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        (x / self.c)?.tanh()? * self.c
    }

    fn backward(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        softcap_backward(x, self.c, grad)
    }
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
        rotate(x, &self.cos, &self.sin, false)
    }

    fn backward(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        rope_backward(grad, &self.cos, &self.sin)
    }
}

/// `x Wᵀ` for a frozen `W` (`[out, in]`), `x`: `[rows, in]`. Only `x` gets a
/// gradient: no weight gradient is ever computed for frozen weights.
pub fn frozen_matmul_t(x: &Tensor, weight: &FrozenWeight) -> Result<Tensor> {
    let weight = match weight {
        FrozenWeight::Dense(w) => FrozenWeight::Dense(w.detach()),
        quantized => quantized.clone(),
    };
    apply(x, FrozenMatmul { weight })
}

struct FrozenMatmul {
    weight: FrozenWeight,
}

impl Function for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen_matmul"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.matmul_t(x)
    }

    fn backward(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Tensor> {
        self.weight.matmul(grad)
    }
}

#[cfg(test)]
mod tests;
