//! The fused kernels' loops over plain slices, each compiled for AVX-512,
//! AVX2+FMA or portable code and chosen at run time (`kernel!`).

use super::math::{dot, exp, gelu_tanh, max, silu, sum};

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
    pub(super) fn gated_kernel(g: &[f32], u: &[f32], out: &mut [f32], gelu: bool) {
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
    pub(super) fn gated_backward_kernel(
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
    pub(super) fn softmax_kernel(x: &[f32], y: &mut [f32], w: usize) {
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
    pub(super) fn rope_row(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32], back: bool) {
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
    pub(super) fn rms_norm_kernel(x: &[f32], weight: &[f32], y: &mut [f32], eps: f32) {
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
    pub(super) fn rms_norm_backward_kernel(x: &[f32], weight: &[f32], dy: &[f32], dx: &mut [f32], eps: f32) {
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
    pub(super) fn exp_shifted_kernel(x: &[f32], shift: &mut [f32], e: &mut [f32], sums: &mut [f32], w: usize) {
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
