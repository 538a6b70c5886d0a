//! The AVX512_VNNI micro-kernel: up to [`MR`] rows against one packed
//! micro-panel of [`NR`] columns, `vpdpbusd` summing four u8 × i8 products
//! into each of 16 i32 lanes per instruction (64 multiply-adds where an f32
//! FMA does 16); and the rows' rounding to 8-bit groups, vectorised.
//! The `MR × NR` tile and its integer sums stay in registers.

use super::super::simd::store_tile;
use super::pack::{group_panel_bytes, mins_at, scales_at};
use super::tile::Tile;

/// Columns of a micro-tile: two registers of 16 i32 lanes.
pub(super) const NR: usize = 32;
/// Rows of a micro-tile.
pub(super) const MR: usize = 6;

/// Rounds a group of 16 or 32 values to multiples of its scale (largest
/// magnitude over 127), ties to even, into `out`; returns the scale and the
/// sum of the rounded values. A group with an infinity or a NaN gets a NaN
/// scale (its products are NaN, as the f32 product's would be non-finite),
/// and a group of zeros and subnormals (below 1.2e-38) a zero scale.
///
/// # Safety
/// The CPU has AVX-512 F, BW and DQ.
#[target_feature(enable = "avx512f,avx512bw,avx512dq")]
pub(super) unsafe fn quantize_group(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let wide = x.len() == 32;
    assert!((wide || x.len() == 16) && out.len() == x.len());
    // SAFETY: both slices hold 16 values, or 32 where `wide`, as asserted.
    unsafe {
        let lo = _mm512_loadu_ps(x.as_ptr());
        let hi = match wide {
            true => _mm512_loadu_ps(x.as_ptr().add(16)),
            false => _mm512_setzero_ps(),
        };
        // QNaN, SNaN, +inf, -inf.
        let special = _mm512_fpclass_ps_mask::<0x99>(lo) | _mm512_fpclass_ps_mask::<0x99>(hi);
        let largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        if special != 0 || largest < f32::MIN_POSITIVE {
            out.fill(0);
            return (if special != 0 { f32::NAN } else { 0.0 }, 0);
        }
        let inverse = _mm512_set1_ps(127.0 / largest);
        // Rounded to nearest even (the default rounding mode); at most 127.
        let qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
        let qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
        _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(qlo));
        if wide {
            _mm_storeu_si128(out.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(qhi));
        }
        (
            largest / 127.0,
            _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)),
        )
    }
}

impl Tile<'_> {
    /// Runs the tile's first `rows` rows (1 to [`MR`]) on a panel of groups
    /// of `G` values packed [`NR`] columns wide.
    ///
    /// # Safety
    /// The CPU has AVX512_VNNI, F, BW and DQ.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    pub(super) unsafe fn run_vnni<const G: usize>(self, rows: usize) {
        self.check_bounds(rows, group_panel_bytes(G, NR), G);
        // SAFETY: bounds checked above; the CPU has the features.
        unsafe {
            match rows {
                6 => self.vnni_rows::<6, G>(),
                5 => self.vnni_rows::<5, G>(),
                4 => self.vnni_rows::<4, G>(),
                3 => self.vnni_rows::<3, G>(),
                2 => self.vnni_rows::<2, G>(),
                _ => self.vnni_rows::<1, G>(),
            }
        }
    }

    /// # Safety
    /// As [`Self::run_vnni`], for `R` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn vnni_rows<const R: usize, const G: usize>(self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (q, panel) = (self.values.as_ptr(), self.panel.as_ptr());
        let per_group = |v: *const f32, i: usize, b: usize| {
            // SAFETY: inside the bounds `run_vnni` checked.
            unsafe { _mm512_set1_ps(*v.add(i * self.scales_stride + b)) }
        };
        for b in 0..self.depth {
            // SAFETY (this block and the stores below): every offset is
            // inside the bounds `run_vnni` checked.
            unsafe {
                let w = panel.add(b * group_panel_bytes(G, NR));
                let mut sums = [[_mm512_setzero_si512(); 2]; R];
                for (i, s) in sums.iter_mut().enumerate() {
                    let start = *self.starts.as_ptr().add(i * self.scales_stride + b);
                    *s = [_mm512_set1_epi32(start); 2];
                }
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
                let d0 = _mm512_loadu_ps(w.add(scales_at(G, NR)).cast());
                let d1 = _mm512_loadu_ps(w.add(scales_at(G, NR) + 64).cast());
                for (i, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
                    let scale = per_group(self.scales.as_ptr(), i, b);
                    a[0] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0]), _mm512_mul_ps(d0, scale), a[0]);
                    a[1] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[1]), _mm512_mul_ps(d1, scale), a[1]);
                }
                if self.with_min {
                    let m0 = _mm512_loadu_ps(w.add(mins_at(G, NR)).cast());
                    let m1 = _mm512_loadu_ps(w.add(mins_at(G, NR) + 64).cast());
                    for (i, a) in acc.iter_mut().enumerate() {
                        let sum = per_group(self.scaled_sums.as_ptr(), i, b);
                        a[0] = _mm512_fmadd_ps(m0, sum, a[0]);
                        a[1] = _mm512_fmadd_ps(m1, sum, a[1]);
                    }
                }
            }
        }
        // SAFETY: `run_vnni` checked that `out` holds the tile's rows.
        unsafe { store_tile(&acc, self.out, self.out_stride, self.width, self.accumulate) };
    }
}
