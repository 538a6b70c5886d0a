//! The micro-kernel: up to [`MR`](super::MR) rows of bf16 pairs against one packed
//! micro-panel of [`NR`] columns, a `vdpbf16ps` per row and register per
//! step, the `MR × NR` f32 tile held in registers.

use super::super::simd::store_tile;
use super::NR;

/// One micro-tile: up to [`MR`](super::MR) rows of bf16 pairs against one packed
/// micro-panel, into (or added to) `out`.
pub(super) struct Tile<'a> {
    /// The tile's first row's pairs, from the block's first pair on.
    pub(super) rows: &'a [u32],
    pub(super) row_stride: usize,
    pub(super) panel: &'a [u32],
    pub(super) depth: usize,
    /// The tile's first output row, from its first column on.
    pub(super) out: &'a mut [f32],
    pub(super) out_stride: usize,
    /// Valid columns (at most [`NR`]).
    pub(super) width: usize,
    /// Add to `out` rather than overwrite it.
    pub(super) accumulate: bool,
}

impl Tile<'_> {
    /// Runs the tile's first `rows` rows (1 to [`MR`](super::MR)).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn run(self, rows: usize) {
        assert!(self.panel.len() >= self.depth * NR);
        assert!(self.rows.len() >= (rows - 1) * self.row_stride + self.depth);
        assert!(self.out.len() >= (rows - 1) * self.out_stride + self.width);
        // SAFETY: bounds asserted above; the CPU has the features.
        unsafe {
            match rows {
                12 => self.rows_of::<12>(),
                11 => self.rows_of::<11>(),
                10 => self.rows_of::<10>(),
                9 => self.rows_of::<9>(),
                8 => self.rows_of::<8>(),
                7 => self.rows_of::<7>(),
                6 => self.rows_of::<6>(),
                5 => self.rows_of::<5>(),
                4 => self.rows_of::<4>(),
                3 => self.rows_of::<3>(),
                2 => self.rows_of::<2>(),
                _ => self.rows_of::<1>(),
            }
        }
    }

    /// # Safety
    /// The CPU has AVX512_BF16, and `run`'s bounds hold for `R` rows.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn rows_of<const R: usize>(self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (a, b) = (self.rows.as_ptr(), self.panel.as_ptr());
        for t in 0..self.depth {
            // SAFETY (this block and the stores below): every offset is
            // inside the bounds `run` asserted.
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(t * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(t * NR + 16).cast()));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pair = *a.add(i * self.row_stride + t) as i32;
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                }
            }
        }
        // SAFETY: `run` asserted that `out` holds the tile's rows.
        unsafe { store_tile(&acc, self.out, self.out_stride, self.width, self.accumulate) };
    }
}
