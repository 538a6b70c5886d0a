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
//!
//! On a CPU with AMX-BF16, the same rounded rows and packed blocks are
//! multiplied on tiles instead (`amx.rs`), 16 × 16 outputs per instruction.
//! There the arithmetic outruns memory: a training step reads every weight
//! from memory once per product, so the tile kernels ask for the weight's
//! next block while the tiles multiply ([`Ahead`]), and take their scratch
//! (rounded rows, packed blocks) from a per-thread pool that is still in
//! the cache from the previous product.

mod amx;
mod amx_rows;
mod pack;
mod tile;

use super::simd::{low_mask, split_columns, split_rows, OutColumns};
use pack::for_each_block;
use tile::Tile;

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

/// Whether a bf16 base's products take the kernel on this CPU (checked
/// once): it runs here, on the AMX tiles or with dot products that outrun
/// f32 FMAs ([`crate::cpu::CpuFeatures::bf16_kernel`]).
pub(super) fn available() -> bool {
    crate::cpu::features().bf16_kernel().is_some()
}

/// Whether this CPU can run the kernel (AVX512_BF16 with AVX-512 F and
/// BW), taken for products or not: [`product`]'s condition, and its tests'.
pub(super) fn can_run() -> bool {
    crate::cpu::features().runs_bf16_dot_kernel()
}

/// Whether this CPU runs the kernel on its AMX-BF16 tiles: where a bf16
/// base's products go to `amx.rs` and `amx_rows.rs`, and its attention's
/// to the tiles as well.
pub(crate) fn on_tiles() -> bool {
    crate::cpu::features()
        .bf16_kernel()
        .is_some_and(crate::cpu::Bf16Kernel::on_tiles)
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
    /// `(q, p)`: the contraction's length and the output's width of the
    /// forward product `x Wᵀ` (`(k, n)`), or with `input_gradient` of
    /// `dy W` (`(n, k)`).
    pub(super) fn sides(&self, input_gradient: bool) -> (usize, usize) {
        match input_gradient {
            false => (self.k, self.n),
            true => (self.n, self.k),
        }
    }

    /// The pair `(W[r, c], W[r + 1, c])` or `(W[r, c], W[r, c + 1])`, as one
    /// u32 (first in the low half), with zero past the weight's edge.
    pub(super) fn value(&self, r: usize, c: usize) -> u32 {
        match r < self.n && c < self.k {
            true => self.values[r * self.k + c] as u32,
            false => 0,
        }
    }
}

/// Lines of a weight that a product will read next, asked for (into L2) a
/// few rows at a time between the tile products of what it reads now: a
/// weight comes from memory once per product, and its next block then
/// arrives while the tiles multiply rather than while the packer or the
/// tiles wait for it.
pub(super) struct Ahead<'a> {
    w: Bf16Weight<'a>,
    /// The rows to ask for: the next one, the end, and how many per step.
    next: usize,
    end: usize,
    per_step: usize,
    /// The columns to ask for, in bytes from a row's start.
    bytes: std::ops::Range<usize>,
}

impl<'a> Ahead<'a> {
    /// `w`'s columns `cols` in its rows `rows`, spread over `steps` calls of
    /// [`Ahead::step`].
    pub(super) fn new(
        w: Bf16Weight<'a>,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        steps: usize,
    ) -> Self {
        let size = std::mem::size_of::<u16>();
        let rows = rows.start.min(w.n)..rows.end.min(w.n);
        Self {
            w,
            next: rows.start,
            end: rows.end,
            per_step: rows.len().div_ceil(steps.max(1)),
            bytes: cols.start.min(w.k) * size..cols.end.min(w.k) * size,
        }
    }

    /// Asks for the lines of the next few rows.
    #[inline(always)]
    pub(super) fn step(&mut self) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let end = (self.next + self.per_step).min(self.end);
        for r in self.next..end {
            let row = self.w.values[r * self.w.k..].as_ptr().cast::<u8>();
            for at in self.bytes.clone().step_by(super::simd::CACHE_LINE) {
                // SAFETY: an address inside the weight's row; a prefetch
                // reads nothing.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(row.add(at).cast()) };
            }
        }
        self.next = end;
    }
}

/// `x Wᵀ` (`x`: `[m, k]` → `[m, n]`) or, with `input_gradient`, `dy W`
/// (`dy`: `[m, n]` → `[m, k]`), into `out`, on a CPU with AVX512_BF16 (on
/// its AMX-BF16 tiles where it has them too). Rows are split over threads
/// when candle runs multi-threaded.
///
/// # Panics
/// If the CPU lacks AVX512_BF16 or the slices' lengths do not match.
pub(super) fn product(x: &[f32], m: usize, w: Bf16Weight, input_gradient: bool, out: &mut [f32]) {
    assert!(can_run(), "the CPU has no AVX512_BF16");
    let (q, p) = w.sides(input_gradient);
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
    if on_tiles() {
        let rows_as_tiles = !input_gradient && amx_rows::reads_rows(&w);
        let align = match rows_as_tiles {
            true => 2 * super::amx::TILE_ROWS,
            false => amx::COLUMN_BLOCK,
        };
        split_columns(out, (m, p), align, |mut out| {
            match super::amx::Amx::new(super::amx::TileConfig::full()) {
                Some(mut tiles) if rows_as_tiles => {
                    amx_rows::forward(&mut tiles, x, m, w, &mut out)
                }
                Some(mut tiles) => amx::serial(&mut tiles, x, m, w, input_gradient, &mut out),
                None => serial_columns(x, m, w, input_gradient, &mut out),
            }
        });
        return;
    }
    split_rows(x, m, (q, p), MR, out, |x, m, out| {
        serial(x, m, w, input_gradient, out)
    });
}

/// `m` rows of `x` (`q` values each) rounded to bf16 pairs into `rows`, row
/// `i` at `i · stride` (the rest of each row left as it is).
fn to_bf16_rows(x: &[f32], q: usize, stride: usize, rows: &mut [u32]) {
    let _profile = crate::profile::open(crate::profile::Stage::RoundRows);
    let pairs = q.div_ceil(2);
    for (x, r) in x.chunks_exact(q).zip(rows.chunks_mut(stride)) {
        round_pairs(x, &mut r[..pairs]);
    }
}

/// `x` rounded to bf16 (to nearest, ties to even), two values to a u32
/// (the first in the low half), into `out`; the last pair padded with zero.
pub(crate) fn round_pairs(x: &[f32], out: &mut [u32]) {
    match vector_rounding() {
        // SAFETY: the CPU has AVX512_BF16 and AVX-512 F (checked just above).
        true => unsafe { to_bf16_pairs(x, out) },
        false => to_bf16_pairs_portable(x, out),
    }
}

/// Whether this CPU rounds rows to bf16 in vectors (AVX512_BF16 with
/// AVX-512 F): elsewhere only the tests run the AMX kernels, on their
/// emulator, and round value by value.
pub(crate) fn vector_rounding() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// `v` rounded to bf16 (to nearest, ties to even), its 16 bits in the low
/// half of a u32: the value-by-value rounding every portable path and the
/// tests' references share.
pub(crate) fn bf16_bits(v: f32) -> u32 {
    half::bf16::from_f32(v).to_bits() as u32
}

/// [`to_bf16_pairs`] value by value, for CPUs without AVX512_BF16 (where
/// only the tests run the AMX kernel, on its emulator).
fn to_bf16_pairs_portable(x: &[f32], out: &mut [u32]) {
    let bits = |i: usize| x.get(i).map_or(0, |&v| bf16_bits(v));
    for (j, o) in out.iter_mut().enumerate() {
        *o = bits(2 * j) | bits(2 * j + 1) << 16;
    }
}

/// [`serial`]'s product, of which `out`'s columns are kept: for a thread
/// whose tiles could not be configured (which [`crate::cpu::amx_permitted`]
/// rules out before the tiles are chosen).
fn serial_columns(x: &[f32], m: usize, w: Bf16Weight, input_gradient: bool, out: &mut OutColumns) {
    let p = w.sides(input_gradient).1;
    let mut whole = vec![0f32; m * p];
    serial(x, m, w, input_gradient, &mut whole);
    let cols = out.cols();
    for (r, row) in whole.chunks_exact(p).enumerate() {
        out.row_mut(r, cols.clone())
            .copy_from_slice(&row[cols.clone()]);
    }
}

/// [`product`] on the calling thread: the rows rounded to bf16 pairs once,
/// then for each packed block of the weight, every micro-tile against it.
fn serial(x: &[f32], m: usize, w: Bf16Weight, input_gradient: bool, out: &mut [f32]) {
    let (q, p) = w.sides(input_gradient);
    let pairs = q.div_ceil(2);
    let mut rows = vec![0u32; m * pairs];
    to_bf16_rows(x, q, pairs, &mut rows);
    for_each_block(w, input_gradient, 1, |block| {
        let (col, pair, depth) = (block.col, block.first, block.depth);
        for row in (0..m).step_by(ROW_BLOCK) {
            let block_rows = ROW_BLOCK.min(m - row);
            for (j, panel) in block.panels.chunks_exact(depth * NR).enumerate() {
                let first_col = col + j * NR;
                let width = NR.min(col + block.cols - first_col);
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
    });
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

#[cfg(test)]
mod tests;
