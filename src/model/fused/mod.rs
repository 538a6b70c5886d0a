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

mod math;

use crate::config::Activation;
use candle_core::{DType, Result, Storage, Tensor};
use math::{dot, exp, gelu_tanh, max, silu, sum};
use rayon::prelude::*;

/// Defines `$name` to run `$body` compiled for AVX-512 or AVX2+FMA where the
/// CPU has them (checked once, [`crate::cpu::features`]), else as portable
/// code: the same source, which the compiler vectorises for each. The body is
/// a plain function, inlined into each variant, so that nothing in the loop
/// is left outside the wider instruction set (a closure would be, and its
/// `mul_add` would become a call to libm).
macro_rules! kernel {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                let cpu = crate::cpu::features();
                // SAFETY: the CPU has the features each variant is compiled for.
                if cpu.avx512f && cpu.avx2_fma {
                    return unsafe { avx512($($arg),*) };
                }
                if cpu.avx2_fma {
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

kernel! {
    /// `out = act(g) · u`, element by element, with SiLU or (`gelu`) GELU-tanh.
    fn gated_kernel(g: &[f32], u: &[f32], out: &mut [f32], gelu: bool) {
        let values = out.iter_mut().zip(g).zip(u);
        match gelu {
            false => values.for_each(|((o, &g), &u)| *o = silu(g).0 * u),
            true => values.for_each(|((o, &g), &u)| *o = gelu_tanh(g).0 * u),
        }
    }
}

kernel! {
    /// The gradients of `act(g) · u` from the output gradient `d`:
    /// `d·u·act'(g)` and `d·act(g)`.
    fn gated_backward_kernel(
        g: &[f32],
        u: &[f32],
        d: &[f32],
        d_gate: &mut [f32],
        d_up: &mut [f32],
        gelu: bool,
    ) {
        // Each activation as its own loop: a function pointer chosen here
        // would not be inlined, nor vectorised.
        match gelu {
            false => gated_backward_with(silu, g, u, d, d_gate, d_up),
            true => gated_backward_with(gelu_tanh, g, u, d, d_gate, d_up),
        }
    }
}

/// [`gated_backward_kernel`]'s loop for the activation `act` (value, slope).
#[inline(always)]
fn gated_backward_with(
    act: impl Fn(f32) -> (f32, f32),
    g: &[f32],
    u: &[f32],
    d: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    let grads = d_gate.iter_mut().zip(d_up.iter_mut());
    for ((dg, du), ((&g, &u), &d)) in grads.zip(g.iter().zip(u).zip(d)) {
        let (a, slope) = act(g);
        *du = d * a;
        *dg = d * u * slope;
    }
}

kernel! {
    /// Softmax of each `w`-wide row of `x` into `y`.
    fn softmax_kernel(x: &[f32], y: &mut [f32], w: usize) {
        for (x, y) in x.chunks_exact(w).zip(y.chunks_exact_mut(w)) {
            let m = max(x);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = exp(x - m);
            }
            let scale = 1.0 / sum(y);
            for y in y.iter_mut() {
                *y *= scale;
            }
        }
    }
}

kernel! {
    /// Each `w`-wide row of `scores` plus `mask` (one row of `w`, the same
    /// for every row), then its softmax, in place: the attention's
    /// probabilities for the queries of one position.
    pub(crate) fn masked_softmax_rows(scores: &mut [f32], mask: &[f32], w: usize) {
        let (mask16, mask_rest) = mask[..w].as_chunks::<16>();
        for y in scores.chunks_exact_mut(w) {
            // The mask added and the largest value found in one pass, the
            // exponentials and their sum in another, then the scaling.
            let (y16, y_rest) = y.as_chunks_mut::<16>();
            let mut lanes = [f32::NEG_INFINITY; 16];
            for (y, m) in y16.iter_mut().zip(mask16) {
                for l in 0..16 {
                    y[l] += m[l];
                    lanes[l] = lanes[l].max(y[l]);
                }
            }
            let mut largest = f32::NEG_INFINITY;
            for (y, &m) in y_rest.iter_mut().zip(mask_rest) {
                *y += m;
                largest = largest.max(*y);
            }
            for l in lanes {
                largest = largest.max(l);
            }
            let mut lanes = [0f32; 16];
            for y in y16.iter_mut() {
                for l in 0..16 {
                    y[l] = exp(y[l] - largest);
                    lanes[l] += y[l];
                }
            }
            let mut total = 0.0;
            for y in y_rest.iter_mut() {
                *y = exp(*y - largest);
                total += *y;
            }
            for l in lanes {
                total += l;
            }
            let scale = 1.0 / total;
            for y in y.iter_mut() {
                *y *= scale;
            }
        }
    }
}

kernel! {
    /// The softmax gradient `y · (dy − Σ dy·y)` of each `w`-wide row, in
    /// place of `dy`.
    pub(crate) fn softmax_backward_rows(y: &[f32], dy: &mut [f32], w: usize) {
        for (y, dy) in y.chunks_exact(w).zip(dy.chunks_exact_mut(w)) {
            let s = dot(y, dy);
            for (dy, &y) in dy.iter_mut().zip(y) {
                *dy = y * (*dy - s);
            }
        }
    }
}

kernel! {
    /// Rope (rotate-half) of each `2·c.len()`-wide row of `x`, the row's
    /// two halves turned by the angles whose cosines and sines are `c` and
    /// `s` (`s` negated: turned back, rope's gradient).
    fn rope_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32], back: bool) {
        let half = c.len();
        let (x1, x2) = x.split_at(half);
        let (y1, y2) = y.split_at_mut(half);
        let sign = if back { -1.0 } else { 1.0 };
        let parts = y1.iter_mut().zip(y2).zip(x1.iter().zip(x2));
        for (((y1, y2), (&x1, &x2)), (&c, &s)) in parts.zip(c.iter().zip(s)) {
            let s = s * sign;
            *y1 = x1 * c - x2 * s;
            *y2 = x1 * s + x2 * c;
        }
    }
}

kernel! {
    /// RMSNorm `x · weight / √(mean(x²) + eps)` of each row.
    fn rms_norm_kernel(x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) {
        let w = weight.len();
        for (x, y) in x.chunks_exact(w).zip(y.chunks_exact_mut(w)) {
            let r = 1.0 / (dot(x, x) / w as f32 + eps).sqrt();
            for ((y, &x), &wt) in y.iter_mut().zip(x).zip(weight) {
                *y = x * r * wt;
            }
        }
    }
}

kernel! {
    /// The RMSNorm gradient `r·u − x·r³·mean(u·x)`, u = dy·weight, of each row.
    fn rms_norm_backward_kernel(x: &[f32], weight: &[f32], dy: &[f32], dx: &mut [f32], eps: f32) {
        let w = weight.len();
        let mut u = vec![0f32; w];
        let rows = x.chunks_exact(w).zip(dy.chunks_exact(w));
        for ((x, dy), dx) in rows.zip(dx.chunks_exact_mut(w)) {
            for ((u, &dy), &wt) in u.iter_mut().zip(dy).zip(weight) {
                *u = dy * wt;
            }
            let r = 1.0 / (dot(x, x) / w as f32 + eps).sqrt();
            let c = r * r * r * dot(&u, x) / w as f32;
            for ((dx, &u), &x) in dx.iter_mut().zip(&u).zip(x) {
                *dx = r * u - x * c;
            }
        }
    }
}

kernel! {
    /// For each `w`-wide row of `x`: its shift grown to the row's largest
    /// value (`shift[r] = max(shift[r], max(x[r]))`), `e = exp(x − shift)`,
    /// and the sum of `e` into `sums`.
    fn exp_shifted_kernel(x: &[f32], shift: &mut [f32], e: &mut [f32], sums: &mut [f32], w: usize) {
        let rows = x.chunks_exact(w).zip(e.chunks_exact_mut(w));
        for (((x, e), m), sum) in rows.zip(shift.iter_mut()).zip(sums.iter_mut()) {
            let (x16, x_rest) = x.as_chunks::<16>();
            let mut lanes = [*m; 16];
            for x in x16 {
                for l in 0..16 {
                    // `>` rather than `max`: one instruction, and a NaN
                    // reaches the sum through `exp` all the same.
                    lanes[l] = if x[l] > lanes[l] { x[l] } else { lanes[l] };
                }
            }
            for &v in x_rest.iter().chain(&lanes) {
                if v > *m {
                    *m = v;
                }
            }
            let m = *m;
            let mut lanes = [0f32; 16];
            let (e16, e_rest) = e.as_chunks_mut::<16>();
            for (x, e) in x16.iter().zip(e16) {
                for l in 0..16 {
                    e[l] = exp(x[l] - m);
                    lanes[l] += e[l];
                }
            }
            let mut s = 0.0;
            for (e, &x) in e_rest.iter_mut().zip(x_rest) {
                *e = exp(x - m);
                s += *e;
            }
            for l in lanes {
                s += l;
            }
            *sum = s;
        }
    }
}

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

#[cfg(test)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, randn};

    /// Odd widths, widths below and above the 16 lanes, and enough rows to
    /// split into several tasks.
    const SHAPES: [&[usize]; 5] = [&[1], &[3, 7], &[2, 5, 17], &[40, 600], &[3, 2, 1000]];

    fn close(name: &str, shape: &[usize], want: &Tensor, got: &Tensor) {
        let scale = max_abs_diff(want, &want.zeros_like().unwrap()).max(1.0);
        let diff = max_abs_diff(want, got);
        assert!(
            diff <= 1e-5 * scale,
            "{name} {shape:?}: differs from candle's ops by {diff} (scale {scale})"
        );
    }

    #[test]
    fn kernels_match_candles_ops() {
        for (i, &shape) in SHAPES.iter().enumerate() {
            let seed = 10 * i as u64;
            let (a, b, c) = (
                (randn(shape, seed) * 3.0).unwrap(),
                randn(shape, seed + 1),
                randn(shape, seed + 2),
            );
            let w = *shape.last().unwrap();
            let weight = randn(&[w], seed + 3);

            for act in [Activation::Silu, Activation::GeluTanh] {
                let name = format!("gated {act:?}");
                let composite = |g: &Tensor| super::super::ops::activation(g, act).unwrap();
                let want = (composite(&a) * &b).unwrap();
                close(&name, shape, &want, &gated(&a, &b, act).unwrap().unwrap());
                let (dg, du) = gated_backward(&a, &b, act, &c).unwrap().unwrap();
                let want_dg =
                    super::super::ops::activation_backward(&a, act, &(&c * &b).unwrap()).unwrap();
                close(&format!("{name} backward (gate)"), shape, &want_dg, &dg);
                close(
                    &format!("{name} backward (up)"),
                    shape,
                    &(&c * composite(&a)).unwrap(),
                    &du,
                );
            }

            let want = candle_nn::ops::softmax_last_dim(&a).unwrap();
            let y = softmax_last_dim(&a).unwrap().unwrap();
            close("softmax", shape, &want, &y);

            let dot = (&c * &y).unwrap().sum_keepdim(shape.len() - 1).unwrap();
            let want = (&y * c.broadcast_sub(&dot).unwrap()).unwrap();
            close(
                "softmax_backward",
                shape,
                &want,
                &softmax_backward(&y, &c).unwrap().unwrap(),
            );

            let rows = a.reshape(((), w)).unwrap();
            // A running largest value below some rows' largest and above
            // the others'.
            let (n, _) = rows.dims2().unwrap();
            let largest = Tensor::from_vec(
                (0..n).map(|i| [f32::NEG_INFINITY, 0.5][i % 2]).collect(),
                (n, 1),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let (grown, e, sums) = exp_shifted(&rows, &largest).unwrap().unwrap();
            let shift = largest.maximum(&rows.max_keepdim(1).unwrap()).unwrap();
            close("exp_shifted (shift)", shape, &shift, &grown);
            let want = rows.broadcast_sub(&shift).unwrap().exp().unwrap();
            close("exp_shifted", shape, &want, &e);
            close(
                "exp_shifted (sums)",
                shape,
                &want.sum_keepdim(1).unwrap(),
                &sums,
            );

            let x = &b;
            let u = c.broadcast_mul(&weight).unwrap();
            let r = (x.sqr().unwrap().mean_keepdim(shape.len() - 1).unwrap() + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            let mean_ux = (&u * x).unwrap().mean_keepdim(shape.len() - 1).unwrap();
            let want = (u.broadcast_mul(&r).unwrap()
                - x.broadcast_mul(&(r.powf(3.0).unwrap() * mean_ux).unwrap())
                    .unwrap())
            .unwrap();
            let got = rms_norm_backward(x, &weight, 1e-5, &c).unwrap().unwrap();
            close("rms_norm_backward", shape, &want, &got);
            if let [t, .., w] = *shape {
                if w % 2 == 0 && shape.len() > 1 {
                    let heads = randn(&[2, 3, t, w], seed + 4);
                    let angles = randn(&[2, t, w / 2], seed + 5);
                    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
                    for back in [false, true] {
                        let s = match back {
                            false => sin.clone(),
                            true => sin.neg().unwrap(),
                        };
                        let want = candle_nn::rotary_emb::rope(&heads, &cos, &s).unwrap();
                        let got = rope(&heads, &cos, &sin, back).unwrap().unwrap();
                        close("rope", shape, &want, &got);
                    }
                    let (cos, sin) = (cos.get(1).unwrap(), sin.get(1).unwrap());
                    let want = candle_nn::rotary_emb::rope(&heads, &cos, &sin).unwrap();
                    let got = rope(&heads, &cos, &sin, false).unwrap().unwrap();
                    close("rope, one table for all rows", shape, &want, &got);
                }
            }
            let want = candle_nn::ops::rms_norm(x, &weight, 1e-5).unwrap();
            close(
                "rms_norm",
                shape,
                &want,
                &rms_norm(x, &weight, 1e-5).unwrap().unwrap(),
            );
        }
    }

    #[test]
    fn softmax_gives_masked_positions_exactly_zero() {
        let x = Tensor::new(
            &[[0.5f32, f32::NEG_INFINITY, -1.0, f32::NEG_INFINITY]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let y: Vec<f32> = softmax_last_dim(&x)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!((y[1], y[3]), (0.0, 0.0));
        assert!((y[0] + y[2] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn kernels_decline_what_they_do_not_handle() {
        let a = randn(&[4, 6], 1);
        let strided = a.t().unwrap();
        assert!(softmax_last_dim(&strided).unwrap().is_none());
        assert!(softmax_last_dim(&a.to_dtype(DType::BF16).unwrap())
            .unwrap()
            .is_none());
        let silu = Activation::Silu;
        assert!(gated(&a, &randn(&[6, 4], 2), silu).unwrap().is_none());
        // A view that starts mid-buffer is contiguous, and is read from its start.
        let rows = a.narrow(0, 1, 2).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&rows).unwrap();
        close(
            "softmax of a view",
            &[2, 6],
            &want,
            &softmax_last_dim(&rows).unwrap().unwrap(),
        );
    }
}
