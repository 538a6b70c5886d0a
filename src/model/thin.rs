//! Products with a thin side: LoRA's factors have rank `r` (8 or 16 as a
//! rule), so of its products, `x Aᵀ` and `dy B` have `r` output columns,
//! and `low Bᵀ` and `d_low A` a contraction of `r`. `gemm` blocks for
//! square-ish shapes and runs these at a third of the f32 FMA rate; here
//! they are a loop over the rows with the thin side held in registers, on
//! CPUs with AVX-512, in f32, with f32 sums.
//!
//! - [`rows_by_thin_t`]: `out = x wᵀ` for `w`: `[r, q]`, two rows of `x` at a
//!   time against 8 rows of `w`: 16 sums in registers, over blocks of the
//!   contraction whose part of `w` stays in L1.
//! - [`add_thin_by_rows`]: `out += α · low w` for `low`: `[m, r]`, `w`: `[r, p]`,
//!   two rows of `out` at a time with their 16 coefficients in registers,
//!   over blocks of columns whose part of `w` stays in L1.

use candle_core::{Result, Tensor};

/// The widest thin side the kernels take: a rank up to 64.
pub const THIN: usize = 64;

/// `x wᵀ` for `x`: `[m, q]` and a thin `w`: `[r, q]` (`r` ≤ [`THIN`]): on
/// [`rows_by_thin_t`] where the CPU has AVX-512 and both are contiguous f32
/// CPU tensors, else candle's matmul. Records no autograd graph on the
/// kernel: for the hand-written passes.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let ((m, q), (r, q2)) = (x.dims2()?, w.dims2()?);
    if available() && r <= THIN && q == q2 {
        let out = super::fused::with_values(&[x, w], |v| {
            let mut out = vec![0f32; m * r];
            rows_by_thin_t(v[0], v[1], (m, q, r), &mut out);
            out
        });
        if let Some(out) = out {
            return Tensor::from_vec(out, (m, r), x.device());
        }
    }
    x.matmul(&w.t()?)
}

/// Whether this CPU runs the kernels (AVX-512 F, unless `TUNEFORGE_MAX_ISA`
/// caps it).
pub fn available() -> bool {
    crate::cpu::features().avx512f
}

/// `x wᵀ` (`x`: `[m, q]`, `w`: `[r, q]`, both row-major) into `out` (`[m, r]`).
///
/// # Panics
/// If the CPU lacks AVX-512 F or the slices' lengths do not match.
pub fn rows_by_thin_t(x: &[f32], w: &[f32], (m, q, r): (usize, usize, usize), out: &mut [f32]) {
    assert!(available(), "the CPU has no AVX-512");
    assert!(x.len() == m * q && w.len() == r * q && out.len() == m * r);
    // SAFETY: the CPU has AVX-512 F; the lengths are checked.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512::rows_by_thin_t(x, w, (m, q, r), out)
    }
}

/// `out += alpha · low w` (`low`: `[m, r]`, `w`: `[r, p]`, `out`: `[m, p]`,
/// all row-major).
///
/// # Panics
/// If the CPU lacks AVX-512 F or the slices' lengths do not match.
pub fn add_thin_by_rows(
    low: &[f32],
    w: &[f32],
    (m, r, p): (usize, usize, usize),
    alpha: f32,
    out: &mut [f32],
) {
    assert!(available(), "the CPU has no AVX-512");
    assert!(low.len() == m * r && w.len() == r * p && out.len() == m * p);
    // SAFETY: the CPU has AVX-512 F; the lengths are checked.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        avx512::add_thin_by_rows(low, w, (m, r, p), alpha, out)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::model::quantized::low_mask;
    use std::arch::x86_64::*;

    /// Rows of `w` (the thin side) per pass.
    const W_ROWS: usize = 8;
    /// Lanes of a register.
    const LANES: usize = 16;
    /// Values of the contraction per block of [`rows_by_thin_t`], and
    /// columns per block of [`add_thin_by_rows`].
    const Q_BLOCK: usize = 512;

    /// See [`super::rows_by_thin_t`]: two rows of `x` against 8 rows of `w`
    /// at a time, 16 sums in registers, over [`Q_BLOCK`] values of the
    /// contraction (so that those of `w`, 16 KB, stay in L1 across all the
    /// rows), each block's sums added to the last's.
    ///
    /// # Safety
    /// The CPU has AVX-512 F; the lengths match the shape.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_by_thin_t(
        x: &[f32],
        w: &[f32],
        (m, q, r): (usize, usize, usize),
        out: &mut [f32],
    ) {
        for w0 in (0..r).step_by(W_ROWS) {
            let wn = W_ROWS.min(r - w0);
            for qb in (0..q).step_by(Q_BLOCK) {
                let qe = (qb + Q_BLOCK).min(q);
                for i in (0..m).step_by(2) {
                    let two = i + 1 < m;
                    let mut acc = [[_mm512_setzero_ps(); W_ROWS]; 2];
                    for c in (qb..qe).step_by(LANES) {
                        let k = low_mask(qe - c);
                        // SAFETY: the mask reads values `c..qe` of rows inside
                        // `x` and `w` only (lengths checked by the caller).
                        unsafe {
                            let x0 = _mm512_maskz_loadu_ps(k, x.as_ptr().add(i * q + c));
                            let x1 = match two {
                                true => _mm512_maskz_loadu_ps(k, x.as_ptr().add((i + 1) * q + c)),
                                false => _mm512_setzero_ps(),
                            };
                            let [acc0, acc1] = &mut acc;
                            for (j, (a0, a1)) in acc0.iter_mut().zip(acc1).enumerate().take(wn) {
                                let wj = _mm512_maskz_loadu_ps(k, w.as_ptr().add((w0 + j) * q + c));
                                *a0 = _mm512_fmadd_ps(x0, wj, *a0);
                                *a1 = _mm512_fmadd_ps(x1, wj, *a1);
                            }
                        }
                    }
                    for (row, acc) in acc.iter().enumerate().take(1 + two as usize) {
                        for (j, a) in acc.iter().enumerate().take(wn) {
                            let o = &mut out[(i + row) * r + w0 + j];
                            let sum = _mm512_reduce_add_ps(*a);
                            *o = if qb == 0 { sum } else { *o + sum };
                        }
                    }
                }
            }
        }
    }

    /// See [`super::add_thin_by_rows`]: two rows of `out` at a time, their
    /// 2 × 8 coefficients in registers, over blocks of [`Q_BLOCK`] columns
    /// (whose part of `w`'s 8 rows, 16 KB, stays in L1 across all rows).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; the lengths match the shape.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_thin_by_rows(
        low: &[f32],
        w: &[f32],
        (m, r, p): (usize, usize, usize),
        alpha: f32,
        out: &mut [f32],
    ) {
        for j0 in (0..r).step_by(W_ROWS) {
            let jn = W_ROWS.min(r - j0);
            for cb in (0..p).step_by(Q_BLOCK) {
                let ce = (cb + Q_BLOCK).min(p);
                for i in (0..m).step_by(2) {
                    let two = i + 1 < m;
                    let coefficient = |row: usize, j: usize| match j < jn && (row == 0 || two) {
                        true => _mm512_set1_ps(alpha * low[(i + row) * r + j0 + j]),
                        false => _mm512_setzero_ps(),
                    };
                    let c0: [__m512; W_ROWS] = std::array::from_fn(|j| coefficient(0, j));
                    let c1: [__m512; W_ROWS] = std::array::from_fn(|j| coefficient(1, j));
                    for c in (cb..ce).step_by(LANES) {
                        let k = low_mask(ce - c);
                        // SAFETY: the mask keeps every access inside rows
                        // `i` and `i + 1` of `out` (the second only where
                        // there is one) and rows `j0..j0 + jn` of `w`.
                        unsafe {
                            let at = out.as_mut_ptr().add(i * p + c);
                            let mut a0 = _mm512_maskz_loadu_ps(k, at);
                            let mut a1 = match two {
                                true => _mm512_maskz_loadu_ps(k, at.add(p)),
                                false => _mm512_setzero_ps(),
                            };
                            for j in 0..jn {
                                let wj = _mm512_maskz_loadu_ps(k, w.as_ptr().add((j0 + j) * p + c));
                                a0 = _mm512_fmadd_ps(c0[j], wj, a0);
                                a1 = _mm512_fmadd_ps(c1[j], wj, a1);
                            }
                            _mm512_mask_storeu_ps(at, k, a0);
                            if two {
                                _mm512_mask_storeu_ps(at.add(p), k, a1);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.normal()).collect()
    }

    /// Shapes: ranks below, at and above one pass of 8, odd row counts
    /// and widths below, at and past a register.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (2, 16, 8),
        (3, 17, 8),
        (5, 40, 3),
        (64, 576, 8),
        (7, 33, 16),
        (9, 100, 12),
        (6, 1100, 8),
    ];

    /// `x wᵀ` against the f64 product.
    #[test]
    fn thin_transposed_products_equal_the_f64_products() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut rng = Rng::new(4);
        for &(m, q, r) in SHAPES {
            let (x, w) = (random(m * q, &mut rng), random(r * q, &mut rng));
            let mut out = vec![f32::NAN; m * r];
            rows_by_thin_t(&x, &w, (m, q, r), &mut out);
            for i in 0..m {
                for j in 0..r {
                    let want: f64 = (0..q)
                        .map(|c| x[i * q + c] as f64 * w[j * q + c] as f64)
                        .sum();
                    let got = out[i * r + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (q as f64).sqrt() * (1.0 + want.abs()),
                        "{m}x{q} by {q}x{r}, [{i}, {j}]: {got} against {want}"
                    );
                }
            }
        }
    }

    /// `out += α low w` against the f64 sum, adding to what `out` held.
    #[test]
    fn thin_products_add_the_f64_products() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let mut rng = Rng::new(5);
        for &(m, p, r) in SHAPES {
            let (low, w) = (random(m * r, &mut rng), random(r * p, &mut rng));
            let before = random(m * p, &mut rng);
            let mut out = before.clone();
            add_thin_by_rows(&low, &w, (m, r, p), 0.5, &mut out);
            for i in 0..m {
                for c in 0..p {
                    let want = before[i * p + c] as f64
                        + 0.5
                            * (0..r)
                                .map(|j| low[i * r + j] as f64 * w[j * p + c] as f64)
                                .sum::<f64>();
                    let got = out[i * p + c] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m}x{r} by {r}x{p}, [{i}, {c}]: {got} against {want}"
                    );
                }
            }
        }
    }
}
