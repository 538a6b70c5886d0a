//! The micro-kernel: up to [`MR`](super::MR) rounded rows against one
//! packed micro-panel of [`NR`] columns. Per group of `G` values (32, or
//! 16), each row's integer sums take `G / 4` `vpdpbusd` steps (4 values
//! each) per register over the high digits, are shifted left by 8 bits,
//! take as many over the low digits, and start at `−z · Σ q`; they are
//! then scaled (`s · d`) into the f32 tile, with the offsets'
//! `min · s · Σ q` added (formats with a min). The `MR × NR` tile and its
//! integer sums stay in registers.

use super::super::simd::store_tile;
use super::pack::{group_panel_bytes, mins_at, scales_at};
use super::NR;

/// One micro-tile: up to [`MR`](super::MR) quantized rows against one
/// packed micro-panel, into (or added to) `out`.
pub(super) struct Tile<'a> {
    /// The tile's first row's rounded values' high digits, from the panel's
    /// first group on,
    pub(super) high: &'a [i8],
    /// and their low digits.
    pub(super) low: &'a [i8],
    pub(super) values_stride: usize,
    /// The first row's per-group scales, integer sums' starts and scaled
    /// sums, from the panel's first group on.
    pub(super) scales: &'a [f32],
    pub(super) starts: &'a [i32],
    pub(super) scaled_sums: &'a [f32],
    pub(super) scales_stride: usize,
    pub(super) panel: &'a [u8],
    /// Groups in the panel.
    pub(super) depth: usize,
    /// Add the panel's offsets (formats with a min).
    pub(super) with_min: bool,
    /// Start the integer sums at the rows' `−z · Σ q` (formats with a
    /// zero point; the others' starts are zero).
    pub(super) with_start: bool,
    /// The tile's first output row, from its first column on.
    pub(super) out: &'a mut [f32],
    pub(super) out_stride: usize,
    /// Valid columns (at most [`NR`]).
    pub(super) width: usize,
    /// Add to `out` rather than overwrite it.
    pub(super) accumulate: bool,
}

impl Tile<'_> {
    /// Runs the tile's first `rows` rows (1 to [`MR`](super::MR)) on a
    /// panel of groups of `G` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    pub(super) unsafe fn run<const G: usize>(self, rows: usize) {
        self.check_bounds::<G>(rows);
        // SAFETY: bounds asserted above; the CPU has the features.
        unsafe {
            match rows {
                6 => self.rows_of::<6, G>(),
                5 => self.rows_of::<5, G>(),
                4 => self.rows_of::<4, G>(),
                3 => self.rows_of::<3, G>(),
                2 => self.rows_of::<2, G>(),
                _ => self.rows_of::<1, G>(),
            }
        }
    }

    /// Asserts that the tile's first `rows` rows (1 to [`MR`](super::MR))
    /// and its panel lie inside its slices.
    pub(super) fn check_bounds<const G: usize>(&self, rows: usize) {
        assert!((1..=super::MR).contains(&rows) && self.width <= NR);
        let (last_values, last_scales) = (
            (rows - 1) * self.values_stride,
            (rows - 1) * self.scales_stride,
        );
        assert!(self.panel.len() >= self.depth * group_panel_bytes(G));
        for digits in [self.high, self.low] {
            assert!(digits.len() >= last_values + self.depth * G);
        }
        for per_group in [self.scales.len(), self.starts.len(), self.scaled_sums.len()] {
            assert!(per_group >= last_scales + self.depth);
        }
        assert!(self.out.len() >= (rows - 1) * self.out_stride + self.width);
    }

    /// # Safety
    /// The CPU has AVX512_VNNI, F, BW and DQ, and `run`'s bounds hold for
    /// `R` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn rows_of<const R: usize, const G: usize>(self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (high, low, panel) = (self.high.as_ptr(), self.low.as_ptr(), self.panel.as_ptr());
        let per_group = |v: *const f32, i: usize, b: usize| {
            // SAFETY: inside the bounds `run` asserted.
            unsafe { _mm512_set1_ps(*v.add(i * self.scales_stride + b)) }
        };
        for b in 0..self.depth {
            // SAFETY (this block and the stores below): every offset is
            // inside the bounds `run` asserted.
            unsafe {
                let w = panel.add(b * group_panel_bytes(G));
                let digit = |sums: &mut [[__m512i; 2]; R], q: *const i8| {
                    for g in 0..G / 4 {
                        let w0 = _mm512_loadu_si512(w.add(g * 4 * NR).cast());
                        let w1 = _mm512_loadu_si512(w.add(g * 4 * NR + 64).cast());
                        for (i, s) in sums.iter_mut().enumerate() {
                            let four = q
                                .add(i * self.values_stride + b * G + 4 * g)
                                .cast::<i32>()
                                .read_unaligned();
                            let xv = _mm512_set1_epi32(four);
                            s[0] = _mm512_dpbusd_epi32(s[0], w0, xv);
                            s[1] = _mm512_dpbusd_epi32(s[1], w1, xv);
                        }
                    }
                };
                // 256 · (the high digits' sums) + the start + the low digits' sums.
                let mut sums = [[_mm512_setzero_si512(); 2]; R];
                digit(&mut sums, high);
                for (i, s) in sums.iter_mut().enumerate() {
                    s[0] = _mm512_slli_epi32::<8>(s[0]);
                    s[1] = _mm512_slli_epi32::<8>(s[1]);
                    if self.with_start {
                        let at = self.starts.as_ptr().add(i * self.scales_stride + b);
                        let start = _mm512_set1_epi32(*at);
                        s[0] = _mm512_add_epi32(s[0], start);
                        s[1] = _mm512_add_epi32(s[1], start);
                    }
                }
                digit(&mut sums, low);
                let d0 = _mm512_loadu_ps(w.add(scales_at(G)).cast());
                let d1 = _mm512_loadu_ps(w.add(scales_at(G) + 64).cast());
                for (i, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
                    let scale = per_group(self.scales.as_ptr(), i, b);
                    a[0] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0]), _mm512_mul_ps(d0, scale), a[0]);
                    a[1] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[1]), _mm512_mul_ps(d1, scale), a[1]);
                }
                if self.with_min {
                    let m0 = _mm512_loadu_ps(w.add(mins_at(G)).cast());
                    let m1 = _mm512_loadu_ps(w.add(mins_at(G) + 64).cast());
                    for (i, a) in acc.iter_mut().enumerate() {
                        let sum = per_group(self.scaled_sums.as_ptr(), i, b);
                        a[0] = _mm512_fmadd_ps(m0, sum, a[0]);
                        a[1] = _mm512_fmadd_ps(m1, sum, a[1]);
                    }
                }
            }
        }
        // SAFETY: `run` asserted that `out` holds the tile's rows.
        unsafe { store_tile(&acc, self.out, self.out_stride, self.width, self.accumulate) };
    }
}
