//! The micro-kernel on 256-bit registers, for CPUs with AVX-VNNI but no
//! AVX-512 (Intel's cores from Alder Lake on, in most of today's laptops):
//! the panels and the arithmetic of `tile.rs`, on each half of a panel (16
//! columns, two registers) in turn, up to [`ROWS`] rows at a time so that
//! the tile, its integer sums and the operands fit in 16 registers. Every
//! integer sum is exact and the f32 steps are `tile.rs`'s, in its order, so
//! the products are that kernel's bit for bit.
//!
//! `vpdpbusd` on 256-bit registers has two encodings: VEX (AVX-VNNI), which
//! the kernel runs on, and EVEX (AVX512_VNNI with VL), with which its tests
//! run it on CPUs with AVX-512.

use super::pack::{group_panel_bytes, mins_at, scales_at};
use super::tile::Tile;
use super::NR;
use std::arch::x86_64::*;

/// Rows of a 256-bit micro-tile: 2 accumulators and 2 sums per row, plus
/// two panel registers and a broadcast row, in 16 registers.
const ROWS: usize = 3;

/// An encoding of `vpdpbusd` on 256-bit registers: `acc + Σ` of four
/// products of `w`'s unsigned bytes with `x`'s signed ones per i32 lane.
pub(super) trait Dot256 {
    /// # Safety
    /// The CPU has the encoding's instruction set.
    unsafe fn dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
}

/// The VEX encoding (AVX-VNNI).
pub(super) struct AvxVnni;

impl Dot256 for AvxVnni {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller's CPU has AVX-VNNI.
        unsafe { _mm256_dpbusd_avx_epi32(acc, w, x) }
    }
}

/// The EVEX encoding (AVX512_VNNI with AVX512_VL).
#[cfg(test)]
pub(super) struct Avx512Vl;

#[cfg(test)]
impl Dot256 for Avx512Vl {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller's CPU has AVX512_VNNI and AVX512_VL.
        unsafe { _mm256_dpbusd_epi32(acc, w, x) }
    }
}

impl Tile<'_> {
    /// Runs the tile's first `rows` rows (1 to [`MR`](super::MR)) on
    /// 256-bit registers with AVX-VNNI.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and AVX-VNNI.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub(super) unsafe fn run_avx_vnni<const G: usize>(self, rows: usize) {
        // SAFETY: the CPU has what `AvxVnni` needs.
        unsafe { self.run_256::<G, AvxVnni>(rows) }
    }

    /// [`Self::run_avx_vnni`] with the EVEX encoding.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, AVX512_VNNI and AVX512_VL.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub(super) unsafe fn run_avx512_vl<const G: usize>(self, rows: usize) {
        // SAFETY: the CPU has what `Avx512Vl` needs.
        unsafe { self.run_256::<G, Avx512Vl>(rows) }
    }

    /// # Safety
    /// Inlined into a function whose target features include AVX2, FMA
    /// and `D`'s.
    #[inline(always)]
    unsafe fn run_256<const G: usize, D: Dot256>(mut self, rows: usize) {
        self.check_bounds::<G>(rows);
        for half in 0..2 {
            if 16 * half >= self.width {
                break;
            }
            for first in (0..rows).step_by(ROWS) {
                // SAFETY: bounds checked above; the features are the caller's.
                unsafe {
                    match ROWS.min(rows - first) {
                        3 => self.rows_of_256::<3, G, D>(first, half),
                        2 => self.rows_of_256::<2, G, D>(first, half),
                        _ => self.rows_of_256::<1, G, D>(first, half),
                    }
                }
            }
        }
    }

    /// Rows `first..first + R` against half `half` of the panel.
    ///
    /// # Safety
    /// As [`Self::run_256`], and `check_bounds` holds for `first + R` rows.
    #[inline(always)]
    unsafe fn rows_of_256<const R: usize, const G: usize, D: Dot256>(
        &mut self,
        first: usize,
        half: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let out = self.out.as_mut_ptr();
        let (vs, ss) = (self.values_stride, self.scales_stride);
        // SAFETY (throughout): every offset is inside the bounds that
        // `check_bounds` asserted for the tile's rows.
        unsafe {
            let (high, low) = (
                self.high.as_ptr().add(first * vs),
                self.low.as_ptr().add(first * vs),
            );
            let at = |v: *const f32, i: usize, b: usize| *v.add((first + i) * ss + b);
            for b in 0..self.depth {
                let group = self.panel.as_ptr().add(b * group_panel_bytes(G));
                let w = group.add(64 * half);
                let digit = |sums: &mut [[__m256i; 2]; R], q: *const i8| {
                    for g in 0..G / 4 {
                        let w0 = _mm256_loadu_si256(w.add(g * 4 * NR).cast());
                        let w1 = _mm256_loadu_si256(w.add(g * 4 * NR + 32).cast());
                        for (i, s) in sums.iter_mut().enumerate() {
                            let four = q.add(i * vs + b * G + 4 * g).cast::<i32>().read_unaligned();
                            let xv = _mm256_set1_epi32(four);
                            s[0] = D::dot(s[0], w0, xv);
                            s[1] = D::dot(s[1], w1, xv);
                        }
                    }
                };
                let mut sums = [[_mm256_setzero_si256(); 2]; R];
                digit(&mut sums, high);
                for (i, s) in sums.iter_mut().enumerate() {
                    s[0] = _mm256_slli_epi32::<8>(s[0]);
                    s[1] = _mm256_slli_epi32::<8>(s[1]);
                    if self.with_start {
                        let start =
                            _mm256_set1_epi32(*self.starts.as_ptr().add((first + i) * ss + b));
                        s[0] = _mm256_add_epi32(s[0], start);
                        s[1] = _mm256_add_epi32(s[1], start);
                    }
                }
                digit(&mut sums, low);
                let d = group.add(scales_at(G) + 64 * half).cast::<f32>();
                let (d0, d1) = (_mm256_loadu_ps(d), _mm256_loadu_ps(d.add(8)));
                for (i, (a, s)) in acc.iter_mut().zip(&sums).enumerate() {
                    let scale = _mm256_set1_ps(at(self.scales.as_ptr(), i, b));
                    a[0] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[0]), _mm256_mul_ps(d0, scale), a[0]);
                    a[1] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[1]), _mm256_mul_ps(d1, scale), a[1]);
                }
                if self.with_min {
                    let m = group.add(mins_at(G) + 64 * half).cast::<f32>();
                    let (m0, m1) = (_mm256_loadu_ps(m), _mm256_loadu_ps(m.add(8)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let sum = _mm256_set1_ps(at(self.scaled_sums.as_ptr(), i, b));
                        a[0] = _mm256_fmadd_ps(m0, sum, a[0]);
                        a[1] = _mm256_fmadd_ps(m1, sum, a[1]);
                    }
                }
            }
            let width = (self.width - 16 * half).min(16);
            for (i, a) in acc.iter().enumerate() {
                let row = out.add((first + i) * self.out_stride + 16 * half);
                let mut values = [0f32; 16];
                _mm256_storeu_ps(values.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(values.as_mut_ptr().add(8), a[1]);
                for (c, v) in values.iter().take(width).enumerate() {
                    match self.accumulate {
                        true => *row.add(c) += v,
                        false => *row.add(c) = *v,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::pack::group_size;
    use super::super::tests::{check_products, runs_here, weight};
    use super::super::{product, serial, Int8Weight, Micro};
    use crate::rng::Rng;

    /// [`serial`] with `micro`, for the weight's groups.
    fn on(micro: Micro) -> impl FnMut(&[f32], usize, Int8Weight, &mut [f32]) {
        move |x, m, w, out| match group_size(w.rows.format) {
            16 => serial::<16>(x, m, w, micro, out),
            _ => serial::<32>(x, m, w, micro, out),
        }
    }

    /// Whether the EVEX encoding runs here: the 512-bit kernel's CPU, with
    /// AVX512_VL.
    fn evex_runs_here() -> bool {
        runs_here() && is_x86_feature_detected!("avx512vl")
    }

    /// Every format on 256-bit registers (EVEX-encoded) against the f64
    /// product of the rounded rows, on odd shapes, partial panels (widths
    /// below 16 and between 16 and 32) and row counts that are not
    /// multiples of 3.
    #[test]
    fn ymm_products_equal_the_products_of_the_rounded_rows() {
        if !evex_runs_here() {
            return;
        }
        check_products(
            on(Micro::YmmEvex),
            &[
                (1, 1, 32),
                (2, 3, 64),
                (13, 33, 96),
                (7, 45, 512),
                (25, 70, 288),
                (19, 1029, 768),
            ],
        );
    }

    /// On 256-bit registers the products are the 512-bit kernel's bit for
    /// bit.
    #[test]
    fn ymm_products_equal_the_zmm_kernels_exactly() {
        if !evex_runs_here() {
            return;
        }
        let mut rng = Rng::new(14);
        for format in crate::model::quantized::INT8_KERNEL_FORMATS {
            let (m, n, k) = (20, 61, 512);
            let w = weight(format, n, k, &mut rng);
            let rows = w.cpu_rows().unwrap().unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let (mut zmm, mut ymm) = (vec![0f32; m * n], vec![1f32; m * n]);
            product(&x, m, Int8Weight { rows, n }, &mut zmm);
            on(Micro::YmmEvex)(&x, m, Int8Weight { rows, n }, &mut ymm);
            assert_eq!(zmm, ymm, "{format:?}");
        }
    }

    /// The VEX encoding, where the CPU has AVX-VNNI, against the f64
    /// product of the rounded rows.
    #[test]
    fn avx_vnni_products_equal_the_products_of_the_rounded_rows() {
        if !crate::cpu::features().avx_vnni {
            eprintln!("skipped: this CPU has no AVX-VNNI");
            return;
        }
        check_products(
            on(Micro::Ymm),
            &[(1, 1, 32), (13, 33, 96), (25, 70, 288), (19, 1029, 768)],
        );
    }
}
