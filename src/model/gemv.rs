//! A kernel for decoding: `x Wᵀ` for a few rows of `x` (one per sequence
//! being decoded).
//!
//! candle's matmul (the `gemm` crate) reaches about a third of this machine's
//! memory bandwidth when `x` has one row, and with a few rows it spends most
//! of its time packing `W`, which it does on every call. This kernel streams
//! each weight row once, reading it against every row of `x`, split over
//! threads: four weight rows against three rows of `x` at a time, in registers.
//!
//! Each output element is computed the same way whatever the number of rows
//! (one 8-lane accumulator over `k`, then a fixed reduction), so a sequence
//! decoded in a batch gets bit for bit the logits it gets alone. It has no
//! backward pass, so [`super::Linear`] uses it only for f32 CPU inputs that
//! track no gradient.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The most rows of `x` the kernel takes; larger inputs go to candle's matmul.
pub const MAX_ROWS: usize = 64;

/// Weight rows handled per task.
const ROWS_PER_TASK: usize = 16;

/// Weight rows per register block.
const W_BLOCK: usize = 4;
/// Rows of `x` per register block.
const X_BLOCK: usize = 3;

struct Gemv;

/// The f32 values of a contiguous CPU storage.
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("gemv takes f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("gemv takes contiguous inputs")
    };
    Ok(&v[a..b])
}

/// The dot products of `R` weight rows with `C` rows of `x` (each of length
/// `k`): AVX2+FMA when the CPU has it (checked once at run time), else a
/// portable loop. Either way, each product's arithmetic depends on its two
/// rows only.
fn dots<const R: usize, const C: usize>(w: [&[f32]; R], x: [&[f32]; C]) -> [[f32; C]; R] {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS_AVX2_FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *HAS_AVX2_FMA
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dots_avx2_fma(w, x) };
        }
    }
    dots_portable(w, x)
}

/// The products of the elements past the last full 8-lane chunk, in order.
fn tail(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).fold(0.0, |s, (a, b)| s + a * b)
}

/// Sums 8 lanes in a fixed order.
fn reduce(lanes: [f32; 8]) -> f32 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2_fma<const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    let k = w[0].len();
    let full = k / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut i = 0;
    while i < full {
        let mut xs = [_mm256_setzero_ps(); C];
        for c in 0..C {
            xs[c] = _mm256_loadu_ps(x[c].as_ptr().add(i));
        }
        for r in 0..R {
            let wv = _mm256_loadu_ps(w[r].as_ptr().add(i));
            for c in 0..C {
                acc[r][c] = _mm256_fmadd_ps(wv, xs[c], acc[r][c]);
            }
        }
        i += 8;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
            out[r][c] = reduce(lanes) + tail(&w[r][full..], &x[c][full..k]);
        }
    }
    out
}

fn dots_portable<const R: usize, const C: usize>(w: [&[f32]; R], x: [&[f32]; C]) -> [[f32; C]; R] {
    let k = w[0].len();
    let full = k / 8 * 8;
    let mut acc = [[[0f32; 8]; C]; R];
    for i in (0..full).step_by(8) {
        for r in 0..R {
            for c in 0..C {
                for l in 0..8 {
                    acc[r][c][l] += w[r][i + l] * x[c][i + l];
                }
            }
        }
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            out[r][c] = reduce(acc[r][c]) + tail(&w[r][full..], &x[c][full..k]);
        }
    }
    out
}

/// Fills `out[r][i] = w[r] · x[i]` for the weight rows `w` of one task.
fn task(w: &[f32], x: &[f32], k: usize, m: usize, out: &mut [f32]) {
    let wrow = |r: usize| &w[r * k..(r + 1) * k];
    let xrow = |i: usize| &x[i * k..(i + 1) * k];
    let rows = out.len() / m;
    let mut r = 0;
    while r < rows {
        let block = if r + W_BLOCK <= rows { W_BLOCK } else { 1 };
        let mut i = 0;
        while i < m {
            let pair = i + X_BLOCK <= m;
            match (block, pair) {
                (W_BLOCK, true) => {
                    let ws: [&[f32]; W_BLOCK] = std::array::from_fn(|j| wrow(r + j));
                    let d = dots(ws, [xrow(i), xrow(i + 1), xrow(i + 2)]);
                    for (j, d) in d.iter().enumerate() {
                        out[(r + j) * m + i..(r + j) * m + i + 3].copy_from_slice(d);
                    }
                }
                (W_BLOCK, false) => {
                    let ws: [&[f32]; W_BLOCK] = std::array::from_fn(|j| wrow(r + j));
                    let d = dots(ws, [xrow(i)]);
                    for (j, d) in d.iter().enumerate() {
                        out[(r + j) * m + i] = d[0];
                    }
                }
                (_, true) => {
                    let d = dots([wrow(r)], [xrow(i), xrow(i + 1), xrow(i + 2)]);
                    out[r * m + i..r * m + i + 3].copy_from_slice(&d[0]);
                }
                (_, false) => out[r * m + i] = dots([wrow(r)], [xrow(i)])[0][0],
            }
            i += if pair { X_BLOCK } else { 1 };
        }
        r += block;
    }
}

/// Where a task reads its weight rows from: a dense `W`, or blocks that it
/// dequantizes into `scratch` ([`super::quantized`]).
pub(super) trait WeightRows: Sync {
    /// Rows `range` of `W`, row after row (`k` values each).
    fn rows<'a>(&'a self, range: std::ops::Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32];
}

/// A dense row-major `W` with rows of `k` values.
struct Dense<'w> {
    w: &'w [f32],
    k: usize,
}

impl WeightRows for Dense<'_> {
    fn rows<'a>(&'a self, range: std::ops::Range<usize>, _: &'a mut Vec<f32>) -> &'a [f32] {
        &self.w[range.start * self.k..range.end * self.k]
    }
}

/// `x Wᵀ` (`[m, n]`, row-major) for `x`: `[m, k]` and the `n` rows of `w`,
/// each task reading its block of weight rows once against every row of `x`.
pub(super) fn products(x: &[f32], m: usize, k: usize, n: usize, w: &impl WeightRows) -> Vec<f32> {
    // out_t[j][i] = W[j] · x[i]; each task owns a block of weight rows.
    let mut out_t = vec![0f32; n * m];
    crate::threads::pool().install(|| {
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (t, block)| {
                let first = t * ROWS_PER_TASK;
                let rows = w.rows(first..first + block.len() / m, scratch);
                task(rows, x, k, m, block)
            })
    });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "tuneforge-gemv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous(xs, xl)?, contiguous(ws, wl)?);
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("gemv: x has {k} columns but W has {k2}");
        }
        let out = products(x, m, k, n, &Dense { w, k });
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Whether the kernel takes `x` (`[rows, in]`): f32 on the CPU, at most
/// [`MAX_ROWS`] rows, tracking no gradient (whatever `W` is: dense here,
/// or blocks in [`super::quantized`]).
pub fn takes(x: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && x.dim(0).is_ok_and(|r| r <= MAX_ROWS)
        && !x.track_op()
}

/// Whether [`matmul_t`] applies to `x` (`[rows, in]`) and `w` (`[out, in]`).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    takes(x)
        && w.dtype() == candle_core::DType::F32
        && x.is_contiguous()
        && w.is_contiguous()
        && !w.track_op()
}

/// `x Wᵀ` for `x`: `[rows, in]`, `W`: `[out, in]`, without gradient.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &Gemv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_portable_dots_agree() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dots([&a], [&b])[0][0] as f64 - exact).abs() < 1e-4);
        assert!((dots_portable([&a], [&b])[0][0] as f64 - exact).abs() < 1e-4);
    }

    #[test]
    fn each_product_is_the_same_in_any_block() {
        let x = crate::testing::randn(&[5, 77], 1);
        let w = crate::testing::randn(&[23, 77], 2);
        let all = matmul_t(&x, &w).unwrap();
        for i in 0..5 {
            let one = matmul_t(&x.narrow(0, i, 1).unwrap(), &w).unwrap();
            let row = all.narrow(0, i, 1).unwrap();
            let diff = (one - row).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "row {i}");
        }
    }

    #[test]
    fn agrees_with_candle_matmul() {
        for rows in [1, 2, 3, 8, 17, MAX_ROWS] {
            let x = crate::testing::randn(&[rows, 70], 1);
            let w = crate::testing::randn(&[130, 70], 2);
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = matmul_t(&x, &w).unwrap();
            let diff = crate::testing::max_abs_diff(&want, &got);
            assert!(diff < 1e-4, "{rows} rows: {diff}");
        }
    }
}
