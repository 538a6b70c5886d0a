//! Products with a bf16 weight on AVX512_BF16: `vdpbf16ps` sums two bf16
//! products into each of 16 f32 lanes per instruction, twice the f32 FMA
//! rate on the CPUs that have it.
//!
//! The f32 rows on the other side (activations forward, gradients backward)
//! are rounded to bf16, to nearest with ties to even, as PyTorch's bf16
//! autocast rounds them; every product of two bf16 values is exact in f32
//! and the sums are f32. So the result is the f32 product of the bf16 weight
//! with the rows rounded to bf16: within bf16's rounding (2⁻⁹ relative per
//! value) of the f32 product.
//!
//! The kernel is the usual blocked GEMM: a block of the weight (up to
//! [`COLUMN_BLOCK`] output columns × [`PAIR_BLOCK`] pairs of the contraction)
//! is repacked so that each step of the micro-kernel loads the two 16-lane
//! registers of bf16 pairs it needs; the micro-kernel then broadcasts one
//! pair of each of [`MR`] rows and accumulates a `MR × 32` tile in 24
//! registers. Repacking reads the weight once per call, against
//! `2 · rows` flops per weight value for the product. The weight itself
//! stays in its row-major bf16 storage, so nothing but the block is copied.

use rayon::prelude::*;

/// Rows of a micro-tile.
const MR: usize = 12;
/// Columns of a micro-tile: two registers of 16 f32 lanes.
const NR: usize = 32;
/// Pairs of the contraction per packed block (256 values): a micro-panel of
/// the packed block is 16 KB, which stays in L1 while the rows stream by.
const PAIR_BLOCK: usize = 128;
/// Output columns per packed block: 512 KB of packed pairs, in L2.
const COLUMN_BLOCK: usize = 1024;
/// Rows whose bf16 pairs are read against one packed block before the next
/// (a multiple of [`MR`]).
const ROW_BLOCK: usize = 8 * MR;

/// Whether this CPU runs the kernel (AVX512_BF16 with AVX-512 F and BW,
/// checked once).
pub(super) fn available() -> bool {
    crate::cpu::features().bf16_kernel() == Some("AVX512_BF16")
}

/// A bf16 weight `W`: `[n, k]` row-major, as stored (each value the high
/// half of an f32).
#[derive(Clone, Copy)]
pub(super) struct Bf16Weight<'a> {
    pub(super) values: &'a [u16],
    pub(super) n: usize,
    pub(super) k: usize,
}

impl Bf16Weight<'_> {
    /// The pair `(W[r, c], W[r + 1, c])` or `(W[r, c], W[r, c + 1])`, as one
    /// u32 (first in the low half), with zero past the weight's edge.
    fn value(&self, r: usize, c: usize) -> u32 {
        match r < self.n && c < self.k {
            true => self.values[r * self.k + c] as u32,
            false => 0,
        }
    }
}

/// `x Wᵀ` (`x`: `[m, k]` → `[m, n]`) or, with `input_gradient`, `dy W`
/// (`dy`: `[m, n]` → `[m, k]`), into `out`, on a CPU with AVX512_BF16.
/// Rows are split over threads when candle runs multi-threaded.
///
/// # Panics
/// If the CPU lacks AVX512_BF16 or the slices' lengths do not match.
pub(super) fn product(x: &[f32], m: usize, w: Bf16Weight, input_gradient: bool, out: &mut [f32]) {
    assert!(available(), "the CPU has no AVX512_BF16");
    let (q, p) = match input_gradient {
        false => (w.k, w.n),
        true => (w.n, w.k),
    };
    assert_eq!(w.values.len(), w.n * w.k, "a [{}, {}] weight", w.n, w.k);
    assert_eq!(x.len(), m * q, "a [{m}, {q}] input");
    assert_eq!(out.len(), m * p, "a [{m}, {p}] output");
    if m == 0 || p == 0 {
        return;
    }
    if q == 0 {
        out.fill(0.0);
        return;
    }
    let threads = candle_core::utils::get_num_threads();
    let rows_per_thread = m.div_ceil(threads).next_multiple_of(MR);
    if threads > 1 && m > MR {
        out.par_chunks_mut(rows_per_thread * p)
            .zip(x.par_chunks(rows_per_thread * q))
            .for_each(|(o, x)| serial(x, o.len() / p, w, input_gradient, o));
    } else {
        serial(x, m, w, input_gradient, out);
    }
}

/// [`product`] on the calling thread: the rows rounded to bf16 pairs once,
/// then for each packed block of the weight, every micro-tile against it.
fn serial(x: &[f32], m: usize, w: Bf16Weight, input_gradient: bool, out: &mut [f32]) {
    let (q, p) = match input_gradient {
        false => (w.k, w.n),
        true => (w.n, w.k),
    };
    let pairs = q.div_ceil(2);
    let mut rows = vec![0u32; m * pairs];
    for (x, r) in x.chunks_exact(q).zip(rows.chunks_exact_mut(pairs)) {
        // SAFETY: `product` checked that the CPU has AVX512_BF16.
        unsafe { to_bf16_pairs(x, r) };
    }
    let mut packed = Vec::new();
    for col in (0..p).step_by(COLUMN_BLOCK) {
        let cols = COLUMN_BLOCK.min(p - col);
        for pair in (0..pairs).step_by(PAIR_BLOCK) {
            let depth = PAIR_BLOCK.min(pairs - pair);
            pack(
                w,
                input_gradient,
                col..col + cols,
                pair..pair + depth,
                &mut packed,
            );
            for row in (0..m).step_by(ROW_BLOCK) {
                let block_rows = ROW_BLOCK.min(m - row);
                for (j, panel) in packed.chunks_exact(depth * NR).enumerate() {
                    let first_col = col + j * NR;
                    let width = NR.min(col + cols - first_col);
                    for r in (row..row + block_rows).step_by(MR) {
                        let tile = Tile {
                            rows: &rows[r * pairs + pair..],
                            row_stride: pairs,
                            panel,
                            depth,
                            out: &mut out[r * p + first_col..],
                            out_stride: p,
                            width,
                            accumulate: pair > 0,
                        };
                        // SAFETY: the CPU has AVX512_BF16 (checked in
                        // `product`); the tile's bounds are checked inside.
                        unsafe { tile.run(MR.min(row + block_rows - r)) };
                    }
                }
            }
        }
    }
}

/// Rounds `x` to bf16, to nearest with ties to even, two values to a u32
/// (the first in the low half), the last pair padded with zero.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_bf16_pairs(x: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::*;
    for (i, o) in out.chunks_mut(16).enumerate() {
        let start = 32 * i;
        let valid = x.len().saturating_sub(start).min(32);
        let lo_mask = low_mask(valid.min(16));
        let hi_mask = low_mask(valid.saturating_sub(16));
        // SAFETY: the masks only read values inside `x`.
        let (lo, hi) = unsafe {
            (
                _mm512_maskz_loadu_ps(lo_mask, x.as_ptr().add(start)),
                _mm512_maskz_loadu_ps(hi_mask, x.as_ptr().add((start + 16).min(x.len()))),
            )
        };
        // The low 16 bf16 are `lo`'s, the high 16 `hi`'s: value 2j in the
        // low half of u32 j, as the kernel reads them.
        let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        // SAFETY: the mask only writes the `o.len()` u32s of `o`.
        unsafe { _mm512_mask_storeu_epi32(o.as_mut_ptr().cast(), low_mask(o.len()), packed) };
    }
}

/// A mask of the lowest `n` of 16 lanes.
fn low_mask(n: usize) -> u16 {
    match n {
        0 => 0,
        n if n >= 16 => u16::MAX,
        n => (1u16 << n) - 1,
    }
}

/// Packs the block of `B` (`[q, p]`: `Wᵀ` forward, `W` for the input
/// gradient) at columns `cols` and pairs of rows `pairs` into `packed`:
/// micro-panels of [`NR`] columns, each `depth` steps of `NR` u32 pairs
/// (`B[2t, c]` low, `B[2t + 1, c]` high); zeros past the edges.
fn pack(
    w: Bf16Weight,
    input_gradient: bool,
    cols: std::ops::Range<usize>,
    pairs: std::ops::Range<usize>,
    packed: &mut Vec<u32>,
) {
    let depth = pairs.len();
    let panels = cols.len().div_ceil(NR);
    packed.clear();
    packed.resize(panels * depth * NR, 0);
    for (j, panel) in packed.chunks_exact_mut(depth * NR).enumerate() {
        let first = cols.start + j * NR;
        let width = NR.min(cols.end - first);
        match (input_gradient, w.k.is_multiple_of(2)) {
            // SAFETY: `product` checked that the CPU has the kernel's
            // features; the panel and the weight's bounds are checked inside.
            (false, true) => unsafe { pack_rows_as_columns(w, first, width, pairs.start, panel) },
            (false, false) => pack_portable(w, false, first, width, pairs.start, panel),
            (true, _) => unsafe { pack_interleaved_rows(w, first, width, pairs.start, panel) },
        }
    }
}

/// One micro-panel of [`pack`], value by value: the reference the vector
/// packers are tested against, and the forward's packer for an odd `k`
/// (where a row's last pair is its last value and a zero).
fn pack_portable(
    w: Bf16Weight,
    input_gradient: bool,
    first: usize,
    width: usize,
    first_pair: usize,
    panel: &mut [u32],
) {
    for (t, step) in panel.chunks_exact_mut(NR).enumerate() {
        let at = 2 * (first_pair + t);
        for (c, s) in step[..width].iter_mut().enumerate() {
            *s = match input_gradient {
                // B[q, p] = W[p, q]: a column of B is a row of W.
                false => w.value(first + c, at) | w.value(first + c, at + 1) << 16,
                // B[q, p] = W[q, p]: a step interleaves two rows of W.
                true => w.value(at, first + c) | w.value(at + 1, first + c) << 16,
            };
        }
    }
}

/// The forward's micro-panel for an even `k`: the pairs of `width` rows of
/// `W` (each row's pairs are contiguous u32s) transposed, 16 rows × 16 pairs
/// at a time in registers.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_as_columns(
    w: Bf16Weight,
    first: usize,
    width: usize,
    first_pair: usize,
    panel: &mut [u32],
) {
    use std::arch::x86_64::*;
    let depth = panel.len() / NR;
    assert!(w.k.is_multiple_of(2) && first + width <= w.n && 2 * (first_pair + depth) <= w.k);
    for half in (0..width).step_by(16) {
        for t0 in (0..depth).step_by(16) {
            let steps = 16.min(depth - t0);
            let rows: [__m512i; 16] = std::array::from_fn(|i| match half + i < width {
                // SAFETY: `steps` pairs from pair `first_pair + t0` are inside
                // row `first + half + i` (asserted above).
                true => unsafe {
                    let row = w.values.as_ptr().add((first + half + i) * w.k);
                    let at = row.add(2 * (first_pair + t0)).cast::<i32>();
                    _mm512_maskz_loadu_epi32(low_mask(steps), at)
                },
                false => _mm512_setzero_si512(),
            });
            let columns = transpose16(rows);
            for (t, column) in columns.iter().take(steps).enumerate() {
                let to = &mut panel[(t0 + t) * NR + half..][..16];
                // SAFETY: `to` holds 16 u32s.
                unsafe { _mm512_storeu_si512(to.as_mut_ptr().cast(), *column) };
            }
        }
    }
}

/// A 16 × 16 transpose of u32s: lane `c` of result `i` is lane `i` of row
/// `c`.
#[target_feature(enable = "avx512f")]
fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // a[2i], a[2i + 1]: rows 2i and 2i + 1 interleaved by u32 (within each
    // 128-bit lane L: elements 4L, 4L + 1, then 4L + 2, 4L + 3).
    let a: [__m512i; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        match i % 2 {
            0 => _mm512_unpacklo_epi32(x, y),
            _ => _mm512_unpackhi_epi32(x, y),
        }
    });
    // b[4g + o]: lane L holds rows 4g..4g + 4 of element 4L + o.
    let b: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, o) = (i / 4, i % 4);
        let (x, y) = (a[4 * g + o / 2], a[4 * g + 2 + o / 2]);
        match o % 2 {
            0 => _mm512_unpacklo_epi64(x, y),
            _ => _mm512_unpackhi_epi64(x, y),
        }
    });
    // c[8h + o]: groups 2h, 2h + 1 of elements o and 8 + o;
    // c[8h + 4 + o]: of elements 4 + o and 12 + o.
    let c: [__m512i; 16] = std::array::from_fn(|i| {
        let (h, upper, o) = (i / 8, (i / 4) % 2, i % 4);
        let (x, y) = (b[8 * h + o], b[8 * h + 4 + o]);
        match upper {
            0 => _mm512_shuffle_i32x4::<0x88>(x, y),
            _ => _mm512_shuffle_i32x4::<0xdd>(x, y),
        }
    });
    // d[i]: all four groups of element i.
    std::array::from_fn(|i| {
        let (high, s, o) = (i / 8, (i / 4) % 2, i % 4);
        let (x, y) = (c[4 * s + o], c[8 + 4 * s + o]);
        match high {
            0 => _mm512_shuffle_i32x4::<0x88>(x, y),
            _ => _mm512_shuffle_i32x4::<0xdd>(x, y),
        }
    })
}

/// The input gradient's micro-panel: each step interleaves `width` values
/// of two rows of `W` (zeros past the last row).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_interleaved_rows(
    w: Bf16Weight,
    first: usize,
    width: usize,
    first_pair: usize,
    panel: &mut [u32],
) {
    use std::arch::x86_64::*;
    assert!(width <= NR && first + width <= w.k);
    let mask = match width {
        32 => u32::MAX,
        n => (1u32 << n) - 1,
    };
    // Halves 0 and 1 of the step: value c of the first row, then of the
    // second, for c in 0..16 and in 16..32.
    let order = |half: i16| -> __m512i {
        let idx: [i16; 32] =
            std::array::from_fn(|i| 16 * half + i as i16 / 2 + 32 * (i as i16 % 2));
        // SAFETY: 32 i16s are one register.
        unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
    };
    let (low_half, high_half) = (order(0), order(1));
    for (t, step) in panel.chunks_exact_mut(NR).enumerate() {
        let r = 2 * (first_pair + t);
        let row = |r: usize| match r < w.n {
            // SAFETY: the mask reads `width` values of row `r`, inside it.
            true => unsafe {
                _mm512_maskz_loadu_epi16(mask, w.values.as_ptr().add(r * w.k + first).cast())
            },
            false => _mm512_setzero_si512(),
        };
        let (lo, hi) = (row(r), row(r + 1));
        // SAFETY: a step holds 32 u32s.
        unsafe {
            let to = step.as_mut_ptr().cast::<__m512i>();
            _mm512_storeu_si512(to, _mm512_permutex2var_epi16(lo, low_half, hi));
            _mm512_storeu_si512(to.add(1), _mm512_permutex2var_epi16(lo, high_half, hi));
        }
    }
}

/// One micro-tile: up to [`MR`] rows of bf16 pairs against one packed
/// micro-panel, into (or added to) `out`.
struct Tile<'a> {
    /// The tile's first row's pairs, from the block's first pair on.
    rows: &'a [u32],
    row_stride: usize,
    panel: &'a [u32],
    depth: usize,
    /// The tile's first output row, from its first column on.
    out: &'a mut [f32],
    out_stride: usize,
    /// Valid columns (at most [`NR`]).
    width: usize,
    /// Add to `out` rather than overwrite it.
    accumulate: bool,
}

impl Tile<'_> {
    /// Runs the tile's first `rows` rows (1 to [`MR`]).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn run(self, rows: usize) {
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
        let (m0, m1) = (
            low_mask(self.width),
            low_mask(self.width.saturating_sub(16)),
        );
        for (i, acc) in acc.iter().enumerate() {
            unsafe {
                let row = self.out.as_mut_ptr().add(i * self.out_stride);
                let (mut v0, mut v1) = (acc[0], acc[1]);
                if self.accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The f64 product of `x` rounded to bf16 with the bf16 weight: what the
    /// kernel computes, up to the order of its f32 sums.
    fn reference(x: &[f32], m: usize, w: Bf16Weight, input_gradient: bool) -> Vec<f64> {
        let (q, p) = match input_gradient {
            false => (w.k, w.n),
            true => (w.n, w.k),
        };
        let weight = |qi: usize, pi: usize| {
            let (r, c) = match input_gradient {
                false => (pi, qi),
                true => (qi, pi),
            };
            f32::from_bits((w.values[r * w.k + c] as u32) << 16) as f64
        };
        let mut out = vec![0f64; m * p];
        for i in 0..m {
            for j in 0..p {
                out[i * p + j] = (0..q)
                    .map(|l| half::bf16::from_f32(x[i * q + l]).to_f64() * weight(l, j))
                    .sum();
            }
        }
        out
    }

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.normal()).collect()
    }

    /// Forward and input gradient against the f64 reference, on sizes below
    /// one tile, odd sizes, sizes across the packed blocks (more than
    /// `COLUMN_BLOCK` columns, more than `PAIR_BLOCK` pairs) and a large
    /// contraction.
    #[test]
    fn products_equal_the_bf16_rounded_products() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let mut rng = Rng::new(3);
        for (m, n, k) in [
            (1, 1, 1),
            (2, 3, 5),
            (13, 33, 7),
            (12, 32, 64),
            (25, 70, 257),
            (97, 1031, 300),
            (5, 17, 4099),
            (130, 40, 33),
        ] {
            let values: Vec<u16> = random(n * k, &mut rng)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let w = Bf16Weight {
                values: &values,
                n,
                k,
            };
            for input_gradient in [false, true] {
                let (q, p) = match input_gradient {
                    false => (k, n),
                    true => (n, k),
                };
                let x = random(m * q, &mut rng);
                let mut out = vec![f32::NAN; m * p];
                product(&x, m, w, input_gradient, &mut out);
                let want = reference(&x, m, w, input_gradient);
                // f32 sums of q exact products: a few ulp of the sum's scale.
                let tol = 4.0 * (q as f64).sqrt() * f32::EPSILON as f64 * 4.0;
                for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                    let diff = (*g as f64 - e).abs();
                    assert!(
                        diff <= tol,
                        "{m}x{q} by {q}x{p} (input gradient: {input_gradient}), value {i}: {g} against {e}"
                    );
                }
            }
        }
    }

    /// Adversarial values: an infinity or a NaN in a row reaches only that
    /// row's outputs, a value past bf16's range rounds to infinity, and
    /// subnormal values (which `vdpbf16ps` may treat as zero) move their
    /// row's outputs by no more than their own size, below 1e-38.
    #[test]
    fn special_values_stay_in_their_rows() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let (m, n, k) = (14, 35, 40);
        let mut rng = Rng::new(9);
        let values: Vec<u16> = random(n * k, &mut rng)
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let w = Bf16Weight {
            values: &values,
            n,
            k,
        };
        let mut x = random(m * k, &mut rng);
        x[3 * k + 5] = f32::INFINITY;
        x[7 * k] = f32::NAN;
        x[9 * k + 2] = 3.4e38; // rounds past bf16's largest finite value
        for v in &mut x[11 * k..12 * k] {
            *v *= 1e-39; // subnormal in f32
        }
        let mut out = vec![0f32; m * n];
        product(&x, m, w, false, &mut out);
        let want = reference(&x, m, w, false);
        for i in 0..m {
            for j in 0..n {
                let (g, e) = (out[i * n + j], want[i * n + j]);
                match i {
                    3 | 9 => assert!(g.is_infinite() || g.is_nan(), "row {i}: {g}"),
                    7 => assert!(g.is_nan(), "row {i}: {g}"),
                    11 => assert!(g.abs() < 1e-36 && e.abs() < 1e-36, "row {i}: {g}"),
                    _ => assert!(
                        (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "row {i}: {g} against {e}"
                    ),
                }
            }
        }
    }

    /// The vector packers lay out exactly what the portable one does, on
    /// partial panels and depths that are not multiples of 16.
    #[test]
    fn vector_packing_equals_the_portable_packing() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let mut rng = Rng::new(5);
        for (n, k) in [(70, 90), (33, 2), (5, 600), (64, 64)] {
            let values: Vec<u16> = (0..n * k)
                .map(|_| (rng.normal().to_bits() >> 16) as u16)
                .collect();
            let w = Bf16Weight {
                values: &values,
                n,
                k,
            };
            for input_gradient in [false, true] {
                let (q, p) = match input_gradient {
                    false => (k, n),
                    true => (n, k),
                };
                let pairs = q.div_ceil(2);
                for (first, first_pair) in [(0, 0), (p.saturating_sub(7), pairs / 3)] {
                    let width = NR.min(p - first);
                    let depth = pairs - first_pair;
                    let mut want = vec![0u32; depth * NR];
                    pack_portable(w, input_gradient, first, width, first_pair, &mut want);
                    let mut got = vec![0u32; depth * NR];
                    // SAFETY: checked above that the CPU has the features.
                    unsafe {
                        match input_gradient {
                            false => pack_rows_as_columns(w, first, width, first_pair, &mut got),
                            true => pack_interleaved_rows(w, first, width, first_pair, &mut got),
                        }
                    }
                    assert_eq!(got, want, "{n}x{k}, input gradient {input_gradient}, from column {first}, pair {first_pair}");
                }
            }
        }
    }

    /// Rounding is to nearest with ties to even, as `half`'s (and PyTorch's)
    /// conversion, including at a tie and for values past the last pair.
    #[test]
    fn rows_round_to_nearest_even() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let tie_down = f32::from_bits(0x3f80_8000); // 1 + 2⁻⁸: ties to 1.0
        let tie_up = f32::from_bits(0x3f81_8000); // ties up to the even 1 + 2⁻⁶
        let x = [tie_down, tie_up, -2.5e-3, 7.0, 1e30, -0.0, 3.3];
        let mut out = [u32::MAX; 4];
        // SAFETY: checked above that the CPU has AVX512_BF16.
        unsafe { to_bf16_pairs(&x, &mut out) };
        for (i, &v) in x.iter().enumerate() {
            let got = (out[i / 2] >> (16 * (i % 2))) as u16;
            assert_eq!(got, half::bf16::from_f32(v).to_bits(), "value {i}: {v}");
        }
        assert_eq!(out[3] >> 16, 0, "the last pair is padded with zero");
    }
}
