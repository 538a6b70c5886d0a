//! Products of matrices laid over slices with any strides, through the
//! `gemm` crate's kernel, checked: the one safe door to `gemm::gemm` for
//! the code that multiplies parts of whole buffers in place.

use super::add_matmul::parallelism;

/// A matrix over a slice: value `(i, j)` at `i · row_stride + j · col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    values: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// `rows` rows of `cols` contiguous values at the start of `values`.
    pub(crate) fn rows(values: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            values,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The `rows × cols` matrix at the start of `values` whose rows and
    /// columns are `strides` apart (`[row, column]`, as a candle layout's).
    pub(crate) fn strided(
        values: &'a [f32],
        (rows, cols): (usize, usize),
        strides: [usize; 2],
    ) -> Self {
        Self {
            values,
            rows,
            cols,
            row_stride: strides[0],
            col_stride: strides[1],
        }
    }

    /// The transpose (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every value of the matrix lies inside `values`.
    fn inside(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.values.len()
    }
}

/// `a · b` into the `a.rows × b.cols` matrix at the start of `dst` (rows
/// `dst_stride` apart), added to what is there with `accumulate`.
///
/// # Panics
/// If the shapes do not chain or a matrix reaches past its slice.
pub(crate) fn product(dst: &mut [f32], dst_stride: usize, accumulate: bool, a: View, b: View) {
    scaled_product(dst, dst_stride, accumulate, 1.0, a, b)
}

/// [`product`] of `scale · a · b`.
///
/// # Panics
/// As [`product`].
pub(crate) fn scaled_product(
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    scale: f32,
    a: View,
    b: View,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(b.rows, k, "a [{m}, {k}] · [{}, {n}] product", b.rows);
    assert!(
        a.inside() && b.inside(),
        "a product's operand past its values"
    );
    let out = View {
        values: dst,
        rows: m,
        cols: n,
        row_stride: dst_stride,
        col_stride: 1,
    };
    assert!(out.inside(), "a product's output past its values");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every index of the three matrices was checked just above to
    // lie inside its slice, and `dst` is borrowed mutably, apart from `a`
    // and `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            a.values.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.values.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of transposed operands and accumulation against a
    /// value-by-value product, into rows of a wider buffer.
    #[test]
    fn strided_products_equal_the_plain_ones() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want = |i: usize, j: usize| (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f32>();
        let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let b_t: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let a_views = [View::rows(&a, m, k), View::rows(&a_t, k, m).t()];
        let b_views = [View::rows(&b, k, n), View::rows(&b_t, n, k).t()];
        for (a, b) in a_views
            .iter()
            .flat_map(|a| b_views.iter().map(move |b| (*a, *b)))
        {
            for accumulate in [false, true] {
                let stride = n + 2;
                let mut out = vec![1.0f32; m * stride];
                product(&mut out, stride, accumulate, a, b);
                for i in 0..m {
                    for j in 0..stride {
                        let got = out[i * stride + j];
                        let expected = match j < n {
                            true => want(i, j) + if accumulate { 1.0 } else { 0.0 },
                            false => 1.0,
                        };
                        assert!(
                            (got - expected).abs() < 1e-4,
                            "({i}, {j}): {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic]
    fn an_operand_past_its_values_is_refused() {
        let a = [0f32; 6];
        let mut out = [0f32; 4];
        product(
            &mut out,
            2,
            false,
            View::rows(&a, 2, 4),
            View::rows(&a, 4, 2),
        );
    }
}
