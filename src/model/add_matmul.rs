//! `dst += α · lhs · rhs`, in place.
//!
//! A LoRA linear adds a rank-r product to the base output: done as a separate
//! matmul and add, it writes and reads a whole extra `[rows, out]` tensor per
//! linear per pass. On the CPU this accumulates straight into the base output
//! with the same `gemm` kernel candle uses. Elsewhere, or where candle's autograd
//! must see the sum, it is the plain matmul and add.

use super::strided::{scaled_product, View};
use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};

struct AddMatmul {
    alpha: f32,
}

impl InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "tuneforge-add-matmul"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        ld: &Layout,
        lhs: &CpuStorage,
        ll: &Layout,
        rhs: &CpuStorage,
        lr: &Layout,
    ) -> Result<()> {
        let (CpuStorage::F32(d), CpuStorage::F32(a), CpuStorage::F32(b)) = (dst, lhs, rhs) else {
            candle_core::bail!("add_matmul takes f32")
        };
        let ((m, n), (m2, k), (k2, n2)) = (
            ld.shape().dims2()?,
            ll.shape().dims2()?,
            lr.shape().dims2()?,
        );
        if m != m2 || n != n2 || k != k2 || !ld.is_contiguous() {
            candle_core::bail!(
                "add_matmul: shapes {:?} += {:?} x {:?}",
                ld.shape(),
                ll.shape(),
                lr.shape()
            );
        }
        let (sa, sb) = (ll.stride(), lr.stride());
        if k <= super::thin::THIN && super::thin::available() {
            let lhs = rows(&a[ll.start_offset()..], (m, k), sa);
            let rhs = rows(&b[lr.start_offset()..], (k, n), sb);
            let dst = &mut d[ld.start_offset()..][..m * n];
            super::thin::add_thin_by_rows(&lhs, &rhs, (m, k, n), self.alpha, dst);
            return Ok(());
        }
        let lhs = View::strided(&a[ll.start_offset()..], (m, k), [sa[0], sa[1]]);
        let rhs = View::strided(&b[lr.start_offset()..], (k, n), [sb[0], sb[1]]);
        scaled_product(&mut d[ld.start_offset()..], n, true, self.alpha, lhs, rhs);
        Ok(())
    }
}

/// The `[rows, cols]` matrix at `values` with `strides`, row-major: borrowed
/// where it already is, else gathered (the thin side of a LoRA product is a
/// few thousand values).
fn rows<'a>(
    values: &'a [f32],
    (rows, cols): (usize, usize),
    strides: &[usize],
) -> std::borrow::Cow<'a, [f32]> {
    match strides {
        [s, 1] if *s == cols => std::borrow::Cow::Borrowed(&values[..rows * cols]),
        _ => (0..rows)
            .flat_map(|i| (0..cols).map(move |j| values[i * strides[0] + j * strides[1]]))
            .collect(),
    }
}

/// `gemm`'s threading, as candle's own matmul threads: over candle's thread
/// count, so single-threaded after `threads::init`.
pub(crate) fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        threads if threads > 1 => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// `dst + alpha · lhs · rhs` for `dst`: `[m, n]`, `lhs`: `[m, k]`, `rhs`: `[k, n]`.
/// With `in_place` (only when no autograd graph runs through `dst`), a contiguous
/// f32 CPU `dst` is updated in place and returned.
pub fn add_matmul(
    dst: Tensor,
    lhs: &Tensor,
    rhs: &Tensor,
    alpha: f64,
    in_place: bool,
) -> Result<Tensor> {
    let fits = in_place
        && dst.device().is_cpu()
        && [&dst, lhs, rhs]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.rank() == 2)
        && dst.is_contiguous()
        && !dst.track_op();
    if fits {
        dst.inplace_op3(
            lhs,
            rhs,
            &AddMatmul {
                alpha: alpha as f32,
            },
        )?;
        return Ok(dst);
    }
    let product = lhs.matmul(rhs)?;
    let product = if alpha == 1.0 {
        product
    } else {
        (product * alpha)?
    };
    let product = product.to_dtype(dst.dtype())?;
    dst + product
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;

    #[test]
    fn in_place_equals_matmul_and_add() {
        let (d, a, b) = (randn(&[5, 7], 1), randn(&[5, 3], 2), randn(&[7, 3], 3));
        let want = (&d + (a.matmul(&b.t().unwrap()).unwrap() * 0.5).unwrap()).unwrap();
        let got = add_matmul(d.copy().unwrap(), &a, &b.t().unwrap(), 0.5, true).unwrap();
        let diff = crate::testing::max_abs_diff(&want, &got);
        assert!(diff < 1e-5);
    }

    /// The same with a wide contraction (`gemm`) and a thin one (the thin
    /// kernel where the CPU has AVX-512), from transposed and contiguous
    /// factors.
    #[test]
    fn in_place_equals_matmul_and_add_thin_and_wide() {
        for (m, k, n) in [(9, 8, 70), (4, 3, 17), (6, 80, 20)] {
            let (d, a, b) = (randn(&[m, n], 4), randn(&[m, k], 5), randn(&[n, k], 6));
            let want = (&d + (a.matmul(&b.t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
            for rhs in [b.t().unwrap(), b.t().unwrap().contiguous().unwrap()] {
                let got = add_matmul(d.copy().unwrap(), &a, &rhs, 2.0, true).unwrap();
                let diff = crate::testing::max_abs_diff(&want, &got);
                assert!(diff < 1e-4, "{m}x{k} by {k}x{n}: {diff}");
            }
        }
    }
}
