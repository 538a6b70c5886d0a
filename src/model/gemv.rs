//! A matrix-vector kernel for decoding: `x Wᵀ` for a handful of rows of `x`.
//!
//! candle's matmul (the `gemm` crate) reaches about a third of this machine's
//! memory bandwidth when `x` has one row, which makes token-by-token decoding
//! slow. This kernel streams each weight row once, reading it against every row
//! of `x`, split over threads. It has no backward pass, so [`super::Linear`]
//! uses it only for f32 CPU inputs that track no gradient.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The most rows of `x` the kernel takes; larger inputs go to candle's matmul.
pub const MAX_ROWS: usize = 8;

/// Weight rows handled per task.
const ROWS_PER_TASK: usize = 16;

struct Gemv;

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("gemv takes f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("gemv takes contiguous inputs")
    };
    Ok(&v[a..b])
}

/// Dot product: AVX2+FMA when the CPU has it (checked once at run time), else a
/// portable loop the compiler vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS_AVX2_FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *HAS_AVX2_FMA
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            let off = i + 8 * j;
            *acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(off)),
                _mm256_loadu_ps(pb.add(off)),
                *acc,
            );
        }
        i += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum::<f32>() + dot_portable(&a[i..n], &b[i..n])
}

/// Dot product with independent accumulators, so that the compiler vectorises it.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
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
        // out_t[j][i] = W[j] · x[i]; each task owns a block of weight rows.
        let mut out_t = vec![0f32; n * m];
        crate::threads::pool().install(|| {
            out_t
                .par_chunks_mut(ROWS_PER_TASK * m)
                .enumerate()
                .for_each(|(task, block)| {
                    let first = task * ROWS_PER_TASK;
                    for (r, out_row) in block.chunks_mut(m).enumerate() {
                        let wrow = &w[(first + r) * k..(first + r + 1) * k];
                        for (i, o) in out_row.iter_mut().enumerate() {
                            *o = dot(wrow, &x[i * k..(i + 1) * k]);
                        }
                    }
                })
        });
        let out = if m == 1 {
            out_t
        } else {
            let mut out = vec![0f32; m * n];
            for j in 0..n {
                for i in 0..m {
                    out[i * n + j] = out_t[j * m + i];
                }
            }
            out
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Whether [`matmul_t`] applies to `x` (`[rows, in]`) and `w` (`[out, in]`).
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.dim(0).is_ok_and(|r| r <= MAX_ROWS)
        && x.is_contiguous()
        && w.is_contiguous()
        && !x.track_op()
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
        assert!((dot(&a, &b) as f64 - exact).abs() < 1e-4);
        assert!((dot_portable(&a, &b) as f64 - exact).abs() < 1e-4);
    }

    #[test]
    fn agrees_with_candle_matmul() {
        for rows in [1, 3, 8] {
            let x = crate::testing::randn(&[rows, 70], 1);
            let w = crate::testing::randn(&[130, 70], 2);
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = matmul_t(&x, &w).unwrap();
            let diff = crate::testing::max_abs_diff(&want, &got);
            assert!(diff < 1e-4, "{rows} rows: {diff}");
        }
    }
}
