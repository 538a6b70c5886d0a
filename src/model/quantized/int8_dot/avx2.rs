//! The AVX2 micro-kernel, for CPUs without AVX512_VNNI: up to [`MR`] rows
//! against one packed micro-panel of [`NR`] columns. AVX2 has no
//! `vpdpbusd`; `vpmaddubsw` multiplies 32 u8 × i8 pairs and adds each two
//! neighbours into an i16 lane (saturating), two of those (8 values of a
//! column) are added in i16, and `vpmaddwd` by ones widens each column's
//! sums into its i32 lane: 64 multiply-adds in 5 instructions, where 256-bit
//! f32 FMAs do 40. Four products of a 6-bit value by an 8-bit one are at
//! most 4 · 63 · 127 = 32,004, inside i16, so the kernel reads every format
//! whose values fit 6 bits: all of [`super::reads`]' but Q8_0 (8 bits),
//! which stays on the f32 path on these CPUs.
//!
//! The rows are rounded as on AVX512_VNNI ([`quantize_group`]); the result
//! is the same exact integer sums, scaled and added in f32.

use super::pack::{group_panel_bytes, mins_at, scales_at};
use super::tile::Tile;

/// Columns of a micro-tile: two registers of 8 i32 lanes.
pub(super) const NR: usize = 16;
/// Rows of a micro-tile: their integer sums (8 registers) stay in
/// registers with the panel's; the f32 tile is touched once per group.
pub(super) const MR: usize = 4;

/// Rounds a group of 16 or 32 values to multiples of its scale (largest
/// magnitude over 127), ties to even, into `out`, as the AVX512_VNNI
/// kernel's `quantize_group` does; returns the scale and the sum of the
/// rounded values. A group with an infinity or a NaN gets a NaN scale, and a
/// group of zeros and subnormals a zero scale.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_group(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    assert_eq!(x.len(), out.len());
    let special = x.iter().any(|v| !v.is_finite());
    let largest = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if special || largest < f32::MIN_POSITIVE {
        out.fill(0);
        return (if special { f32::NAN } else { 0.0 }, 0);
    }
    let inverse = 127.0 / largest;
    let mut sum = 0;
    for (o, v) in out.iter_mut().zip(x) {
        // At most 127 in magnitude.
        let q = (v * inverse).round_ties_even() as i32;
        *o = q as i8;
        sum += q;
    }
    (largest / 127.0, sum)
}

/// Runs of 4 values whose products are summed in i16 before they are
/// widened: groups of 32 hold values of at most 5 bits on AVX2 (Q4_x, Q5_x,
/// Q4_K, Q5_K), 4 runs of which sum to at most 16 · 31 · 127 / 2 = 31,496
/// per i16 lane; Q6_K's groups of 16 hold 6-bit values, 2 runs of which sum
/// to at most 8 · 63 · 127 / 2 = 32,004.
const fn runs_per_widening(group: usize) -> usize {
    match group {
        32 => 4,
        _ => 2,
    }
}

impl Tile<'_> {
    /// Runs the tile's first `rows` rows (1 to [`MR`]) on a panel of groups
    /// of `G` values packed [`NR`] columns wide.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the panel's values fit 6 bits.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run_avx2<const G: usize>(self, rows: usize) {
        self.check_bounds(rows, group_panel_bytes(G, NR), G);
        // SAFETY: bounds checked above; the CPU has the features.
        unsafe {
            match rows {
                4 => self.avx2_rows::<4, G>(),
                3 => self.avx2_rows::<3, G>(),
                2 => self.avx2_rows::<2, G>(),
                _ => self.avx2_rows::<1, G>(),
            }
        }
    }

    /// # Safety
    /// As [`Self::run_avx2`], for `R` rows.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn avx2_rows<const R: usize, const G: usize>(self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let ones = _mm256_set1_epi16(1);
        let (q, panel) = (self.values.as_ptr(), self.panel.as_ptr());
        let per_group = |v: *const f32, i: usize, b: usize| {
            // SAFETY: inside the bounds `run_avx2` checked.
            unsafe { _mm256_set1_ps(*v.add(i * self.scales_stride + b)) }
        };
        for b in 0..self.depth {
            // SAFETY (this block): every offset is inside the bounds
            // `run_avx2` checked.
            unsafe {
                let w = panel.add(b * group_panel_bytes(G, NR));
                let mut sums = [[_mm256_setzero_si256(); 2]; R];
                for (i, s) in sums.iter_mut().enumerate() {
                    let start = *self.starts.as_ptr().add(i * self.scales_stride + b);
                    *s = [_mm256_set1_epi32(start); 2];
                }
                // `WIDEN` runs of 4 values at a time, summed in i16, then
                // widened into the i32 sums.
                let widen = runs_per_widening(G);
                for first in (0..G / 4).step_by(widen) {
                    let mut p = [[_mm256_setzero_si256(); 2]; R];
                    for run in first..first + widen {
                        let load = |at: usize| _mm256_loadu_si256(w.add(at).cast());
                        let (w0, w1) = (load(run * 4 * NR), load(run * 4 * NR + 32));
                        for (i, p) in p.iter_mut().enumerate() {
                            let x = q.add(i * self.values_stride + b * G + 4 * run);
                            let x = _mm256_set1_epi32(x.cast::<i32>().read_unaligned());
                            p[0] = _mm256_add_epi16(p[0], _mm256_maddubs_epi16(w0, x));
                            p[1] = _mm256_add_epi16(p[1], _mm256_maddubs_epi16(w1, x));
                        }
                    }
                    for (s, p) in sums.iter_mut().zip(&p) {
                        s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(p[0], ones));
                        s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(p[1], ones));
                    }
                }
                let d0 = _mm256_loadu_ps(w.add(scales_at(G, NR)).cast());
                let d1 = _mm256_loadu_ps(w.add(scales_at(G, NR) + 32).cast());
                for (i, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
                    let scale = per_group(self.scales.as_ptr(), i, b);
                    a[0] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_mul_ps(d0, scale), a[0]);
                    a[1] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[1]), _mm256_mul_ps(d1, scale), a[1]);
                }
                if self.with_min {
                    let m0 = _mm256_loadu_ps(w.add(mins_at(G, NR)).cast());
                    let m1 = _mm256_loadu_ps(w.add(mins_at(G, NR) + 32).cast());
                    for (i, a) in acc.iter_mut().enumerate() {
                        let sum = per_group(self.scaled_sums.as_ptr(), i, b);
                        a[0] = _mm256_fmadd_ps(m0, sum, a[0]);
                        a[1] = _mm256_fmadd_ps(m1, sum, a[1]);
                    }
                }
            }
        }
        let mut tile = [[0f32; NR]; R];
        for (t, a) in tile.iter_mut().zip(&acc) {
            // SAFETY: each row of `tile` holds NR = 16 floats.
            unsafe {
                _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
            }
        }
        self.write(&tile);
    }
}
