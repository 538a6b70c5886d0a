//! Fused element-wise kernels for f32 tensors on the CPU.
//!
//! As chains of candle ops, the training step's element-wise work (the MLP's
//! gated activation and its gradient, the softmax, and the gradients of the
//! softmax and of RMSNorm) makes one pass over memory and one new tensor per
//! op, and calls libm's scalar `expf` once per element: together about a sixth
//! of a SmolLM2 step on 2 cores. Here each is one pass, written as plain loops
//! that the compiler vectorises for the instructions the CPU has (AVX2+FMA or
//! AVX-512, chosen at run time), with an `exp` that vectorises too. RMSNorm's
//! forward and rope are here as well, though candle has each as one op:
//! candle's RMSNorm sums each row's squares in a chain of dependent scalar
//! adds (sums here go in 16 lanes), and its rope indexes every element
//! through a computed offset, which keeps it scalar.
//!
//! Each function returns `None` where it does not apply (another device or
//! dtype, or a strided input), and its caller in [`super::ops`] runs candle's
//! ops instead: those stay the reference that the tests hold these kernels to.

mod loops;
mod math;
#[cfg(test)]
mod tests;

use crate::config::Activation;
use candle_core::{DType, Result, Storage, Tensor};
use loops::{
    exp_shifted_kernel, gated_backward_kernel, gated_kernel, rms_norm_backward_kernel,
    rms_norm_kernel, rope_row, softmax_kernel,
};
pub(crate) use loops::{masked_softmax_rows, softmax_backward_rows};
use rayon::prelude::*;

/// Values per parallel task: below this, splitting costs more than it saves.
const TASK: usize = 1 << 14;

/// Splits `outs` (each `width` values a row, all of one length) into chunks
/// of whole rows and calls `f(first_value, chunks)` on each. The chunks run in
/// parallel only when candle runs its own ops on several threads: after
/// [`crate::threads::init`], tuneforge's shards already fill the cores.
fn by_rows<const N: usize>(
    outs: [&mut [f32]; N],
    width: usize,
    f: impl Fn(usize, [&mut [f32]; N]) + Sync,
) {
    let len = outs[0].len();
    let step = (TASK / width.max(1)).max(1) * width.max(1);
    let mut tasks: Vec<(usize, [&mut [f32]; N])> = Vec::with_capacity(len.div_ceil(step));
    let mut rest = outs;
    let mut at = 0;
    while at < len {
        let n = step.min(len - at);
        let heads = std::array::from_fn(|i| {
            let (head, tail) = std::mem::take(&mut rest[i]).split_at_mut(n);
            rest[i] = tail;
            head
        });
        tasks.push((at, heads));
        at += n;
    }
    if candle_core::utils::get_num_threads() > 1 && tasks.len() > 1 {
        tasks.into_par_iter().for_each(|(at, chunks)| f(at, chunks));
    } else {
        tasks.into_iter().for_each(|(at, chunks)| f(at, chunks));
    }
}

/// Calls `f` with the values of `tensors`, where every one is a contiguous f32
/// tensor on the CPU; else returns `None`.
pub(crate) fn with_values<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    if tensors
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32)
    {
        return None;
    }
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut values = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return None;
        };
        values.push(super::gemv::contiguous(cpu, layout).ok()?);
    }
    Some(f(&values))
}

/// A tensor of `like`'s shape holding `values`.
fn shaped(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, like.shape(), like.device())
}

/// The last dimension of `t` (1 for a scalar).
fn width(t: &Tensor) -> usize {
    t.dims().last().copied().unwrap_or(1)
}

/// `act(gate) · up`, the MLP's gated activation (SwiGLU, or GeGLU with
/// GELU's tanh approximation).
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Option<Tensor>> {
    if gate.shape() != up.shape() {
        return Ok(None);
    }
    let gelu = act == Activation::GeluTanh;
    let out = with_values(&[gate, up], |v| {
        let (g, u) = (v[0], v[1]);
        let mut out = vec![0f32; g.len()];
        by_rows([&mut out], 1, |at, [out]| {
            let r = at..at + out.len();
            gated_kernel(&g[r.clone()], &u[r], out, gelu)
        });
        out
    });
    out.map(|v| shaped(v, gate)).transpose()
}

/// The gradients of [`gated`] with respect to `gate` and `up`, given the
/// output gradient `d`: `d·up·act'(gate)` and `d·act(gate)`.
pub fn gated_backward(
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
    d: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    if gate.shape() != up.shape() || gate.shape() != d.shape() {
        return Ok(None);
    }
    let gelu = act == Activation::GeluTanh;
    let out = with_values(&[gate, up, d], |v| {
        let (g, u, d) = (v[0], v[1], v[2]);
        let n = g.len();
        // Both gradients in one buffer, split into the two tensors' halves.
        let mut out = vec![0f32; 2 * n];
        let (d_gate, d_up) = out.split_at_mut(n);
        by_rows([d_gate, d_up], 1, |at, [dg, du]| {
            let r = at..at + dg.len();
            gated_backward_kernel(&g[r.clone()], &u[r.clone()], &d[r], dg, du, gelu)
        });
        out
    });
    let Some(out) = out else {
        return Ok(None);
    };
    let both = Tensor::from_vec(out, (2, gate.elem_count()), gate.device())?;
    let part = |i: usize| both.get(i)?.reshape(gate.shape());
    Ok(Some((part(0)?, part(1)?)))
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    let w = width(x);
    let out = with_values(&[x], |v| {
        let x = v[0];
        let mut out = vec![0f32; x.len()];
        by_rows([&mut out], w, |at, [y]| {
            softmax_kernel(&x[at..at + y.len()], y, w)
        });
        out
    });
    out.map(|v| shaped(v, x)).transpose()
}

/// The gradient of a softmax over the last dimension from its output `y` and
/// the output gradient `dy`: `y · (dy − Σ dy·y)`.
pub fn softmax_backward(y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
    if y.shape() != dy.shape() {
        return Ok(None);
    }
    let w = width(y);
    let out = with_values(&[y, dy], |v| {
        let (y, dy) = (v[0], v[1]);
        let mut out = dy.to_vec();
        by_rows([&mut out], w, |at, [dx]| {
            softmax_backward_rows(&y[at..at + dx.len()], dx, w)
        });
        out
    });
    out.map(|v| shaped(v, y)).transpose()
}

/// The cross-entropy's running softmax, one tile of the vocabulary at a
/// time: for `x` (`[n, w]`) and each row's largest value so far `largest`
/// (`[n, 1]`), the rows' grown largest values `shift = max(largest,
/// max(x))`, `exp(x − shift)` and the sum of each row of it (`[n, 1]`).
pub fn exp_shifted(x: &Tensor, largest: &Tensor) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let (n, w) = x.dims2()?;
    if largest.dims() != [n, 1] {
        return Ok(None);
    }
    let out = with_values(&[x, largest], |v| {
        let (x, mut shift) = (v[0], v[1].to_vec());
        let (mut e, mut sums) = (vec![0f32; x.len()], vec![0f32; n]);
        // Rows are split by hand: `by_rows` takes outputs of one width.
        let rows = (TASK / w.max(1)).max(1);
        let tasks = e.chunks_mut(rows * w.max(1)).zip(sums.chunks_mut(rows));
        for (i, ((e, sums), shift)) in tasks.zip(shift.chunks_mut(rows)).enumerate() {
            let r = i * rows..i * rows + sums.len();
            exp_shifted_kernel(&x[r.start * w..r.end * w], shift, e, sums, w);
        }
        (shift, e, sums)
    });
    let Some((shift, e, sums)) = out else {
        return Ok(None);
    };
    Ok(Some((
        Tensor::from_vec(shift, (n, 1), x.device())?,
        Tensor::from_vec(e, (n, w), x.device())?,
        Tensor::from_vec(sums, (n, 1), x.device())?,
    )))
}

/// `x`'s values as `[outer, a, b, row]` with the middle axes swapped,
/// `[outer, b, a, row]`, times `scale`, shaped `shape`: the attention's
/// regrouping of heads and positions in one pass (candle's strided copy
/// goes value by value, and its scaling is a second pass).
pub fn swap_middle(
    x: &Tensor,
    (outer, a, b, row): (usize, usize, usize, usize),
    scale: f32,
    shape: &[usize],
) -> Result<Option<Tensor>> {
    let sizes_fit =
        x.elem_count() == outer * a * b * row && shape.iter().product::<usize>() == x.elem_count();
    // The copy carries no autograd graph: where one runs through `x`,
    // candle's ops record it.
    if !sizes_fit || x.track_op() {
        return Ok(None);
    }
    let out = with_values(&[x], |v| {
        let x = v[0];
        let mut out = vec![0f32; x.len()];
        let block = a * b * row;
        for (x, out) in x.chunks_exact(block).zip(out.chunks_exact_mut(block)) {
            for i in 0..a {
                for j in 0..b {
                    let from = &x[(i * b + j) * row..][..row];
                    let to = &mut out[(j * a + i) * row..][..row];
                    if scale == 1.0 {
                        to.copy_from_slice(from);
                    } else {
                        for (t, &f) in to.iter_mut().zip(from) {
                            *t = f * scale;
                        }
                    }
                }
            }
        }
        out
    });
    out.map(|v| Tensor::from_vec(v, shape, x.device()))
        .transpose()
}

/// Rope in HF's rotate-half layout on `x` (`[b, h, t, d]`) with `cos` and
/// `sin` (`[b, t, d / 2]`, or `[t, d / 2]` for every row), or with `back`
/// its inverse (its gradient). candle's kernel indexes every element
/// through a computed offset, which keeps it scalar.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, back: bool) -> Result<Option<Tensor>> {
    let Ok((b, h, t, d)) = x.dims4() else {
        return Ok(None);
    };
    let half = d / 2;
    let batched = match cos.dims() {
        [cb, ct, ch] if (*cb, *ct, *ch) == (b, t, half) => true,
        [ct, ch] if (*ct, *ch) == (t, half) => false,
        _ => return Ok(None),
    };
    if d % 2 != 0 || sin.shape() != cos.shape() {
        return Ok(None);
    }
    let out = with_values(&[x, cos, sin], |v| {
        let (x, cos, sin) = (v[0], v[1], v[2]);
        let mut out = vec![0f32; x.len()];
        by_rows([&mut out], d, |at, [y]| {
            for (i, y) in y.chunks_exact_mut(d).enumerate() {
                let row = at / d + i;
                let (position, batch) = (row % t, row / (h * t));
                let angles = match batched {
                    true => (batch * t + position) * half,
                    false => position * half,
                };
                let (c, s) = (&cos[angles..][..half], &sin[angles..][..half]);
                rope_row(&x[row * d..][..d], c, s, y, back);
            }
        });
        out
    });
    out.map(|v| shaped(v, x)).transpose()
}

/// RMSNorm over the last dimension, `x / rms(x) · weight`: candle's sums
/// each row's squares in one chain of scalar adds.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let w = width(x);
    if weight.dims() != [w] {
        return Ok(None);
    }
    let out = with_values(&[x, weight], |v| {
        let (x, weight) = (v[0], v[1]);
        let mut out = vec![0f32; x.len()];
        by_rows([&mut out], w, |at, [y]| {
            rms_norm_kernel(&x[at..at + y.len()], weight, y, eps as f32)
        });
        out
    });
    out.map(|v| shaped(v, x)).transpose()
}

/// The gradient of RMSNorm (`x / rms(x) · weight` over the last dimension)
/// with respect to `x`, given the output gradient `dy`: with r = 1/rms(x) and
/// u = dy·weight, `r·u − x·r³·mean(u·x)`.
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    dy: &Tensor,
) -> Result<Option<Tensor>> {
    let w = width(x);
    if x.shape() != dy.shape() || weight.dims() != [w] {
        return Ok(None);
    }
    let out = with_values(&[x, weight, dy], |v| {
        let (x, weight, dy) = (v[0], v[1], v[2]);
        let mut out = vec![0f32; x.len()];
        by_rows([&mut out], w, |at, [dx]| {
            let r = at..at + dx.len();
            rms_norm_backward_kernel(&x[r.clone()], weight, &dy[r], dx, eps as f32)
        });
        out
    });
    out.map(|v| shaped(v, x)).transpose()
}
