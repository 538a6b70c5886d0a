//! The forward product `x Wᵀ` on AMX tiles, reading the weight's own rows.
//!
//! A bf16 weight's rows are already what `tdpbf16ps` wants for its first
//! operand: 16 rows of 32 contiguous values of the contraction. So the
//! weight is not repacked at all; its tiles are loaded from its storage.
//! The second operand is `x`'s rows rounded to bf16 and laid out as pairs
//! across 16 rows (the "VNNI" layout), a copy the size of `x` made once per
//! call. The tiles' products are then `W xᵀ`, `[n, m]`, transposed 16 × 16
//! as they are written out.
//!
//! A block of 2 × 2 output tiles (32 of `W`'s rows × 32 of `x`'s) stays in
//! tiles 0-3 across the whole contraction, with `W`'s two row tiles in
//! tiles 4-5 and `x`'s two in tiles 6-7, and is written out once.
//!
//! It takes weights whose rows are whole tile rows (`k` a multiple of 32)
//! and whose row count is a multiple of 16, as every model's projections
//! are ([`reads_rows`]); others go to the packed kernel (`amx.rs`).

use super::super::amx::{load, store, StoredTiles, Tiles, TILE_PAIRS, TILE_ROWS};
use super::super::simd::{OutColumns, Pooled};
use super::{bf16_bits, Ahead, Bf16Weight};
use std::ops::Range;

/// Values of the contraction in a tile's row.
const TILE_VALUES: usize = 2 * TILE_PAIRS;
/// The weight's rows multiplied with each 32 rows of `x` in turn: over a
/// contraction of 576 they are 288 KB, read from L2 while `x`'s 32 rows
/// stay in L1, and the output is written 256 columns of 32 rows at a time.
const WEIGHT_ROWS: usize = 256;

/// Whether [`forward`] takes `w`: rows of whole tile rows, whole row tiles.
pub(super) fn reads_rows(w: &Bf16Weight) -> bool {
    w.k.is_multiple_of(TILE_VALUES) && w.n.is_multiple_of(TILE_ROWS) && w.k > 0
}

/// `x Wᵀ` (`x`: `[m, k]`) into `out`'s columns (of `[m, n]`) on `tiles`,
/// on the calling thread: the weight's rows of those columns against all
/// of `x`.
///
/// # Panics
/// If `w` does not pass [`reads_rows`], `out`'s columns are not whole row
/// tiles of it, or the lengths do not match.
pub(super) fn forward(
    tiles: &mut impl Tiles,
    x: &[f32],
    m: usize,
    w: Bf16Weight,
    out: &mut OutColumns,
) {
    assert!(reads_rows(&w), "a [{}, {}] weight in whole tiles", w.n, w.k);
    let (n, k, cols) = (w.n, w.k, out.cols());
    assert!(x.len() == m * k && out.rows() == m && cols.end <= n);
    assert!(cols.start.is_multiple_of(TILE_ROWS) && cols.end.is_multiple_of(TILE_ROWS));
    let pairs = k / 2;
    let blocks = m.div_ceil(TILE_ROWS);
    let mut buffer = Pooled::take();
    let columns = buffer.reused(blocks * pairs * TILE_ROWS);
    // The weight's first rows (read from memory while `x` is rounded).
    let first = cols.start..(cols.start + WEIGHT_ROWS).min(cols.end);
    let mut ahead = Ahead::new(w, first, 0..k, blocks);
    to_pair_columns(x, m, k, columns, &mut ahead);
    let columns = &*columns;
    let steps = k / TILE_VALUES;
    // Each block's tiles are stored to one of two buffers and written out
    // (transposed) a tile at a time between the next block's tile products,
    // which run on the tile unit meanwhile.
    let mut written = [StoredTiles::new(), StoredTiles::new()];
    let mut pending: Option<Stored> = None;
    for rows in cols.clone().step_by(WEIGHT_ROWS) {
        let rows = rows..(rows + WEIGHT_ROWS).min(cols.end);
        // The next rows of the weight, whole, while these multiply.
        let next = rows.end..(rows.end + WEIGHT_ROWS).min(cols.end);
        let runs = blocks.div_ceil(2) * rows.len().div_ceil(2 * TILE_ROWS);
        let mut ahead = Ahead::new(w, next, 0..k, runs * steps);
        for block in (0..blocks).step_by(2) {
            let two_blocks = block + 2 <= blocks;
            for row in rows.clone().step_by(2 * TILE_ROWS) {
                let two_rows = row + 2 * TILE_ROWS <= rows.end;
                let tiles_block = Block {
                    w: w.values,
                    a: row * k,
                    k,
                    columns,
                    b: block * pairs * TILE_ROWS,
                    pairs,
                    steps,
                };
                let buffer = pending.as_ref().map_or(0, |p| 1 - p.buffer);
                let (first, second) = written.split_at_mut(1);
                let (into, before) = match buffer {
                    0 => (&mut first[0], &second[0]),
                    _ => (&mut second[0], &first[0]),
                };
                let mut write_before = |t: usize| {
                    if let Some(done) = &pending {
                        done.write_tile(t, before, out, m);
                    }
                };
                let interleaved = &mut write_before;
                match (two_rows, two_blocks) {
                    (true, true) => {
                        tiles_block.run::<_, true, true>(tiles, into, interleaved, &mut ahead)
                    }
                    (true, false) => {
                        tiles_block.run::<_, true, false>(tiles, into, interleaved, &mut ahead)
                    }
                    (false, true) => {
                        tiles_block.run::<_, false, true>(tiles, into, interleaved, &mut ahead)
                    }
                    (false, false) => {
                        tiles_block.run::<_, false, false>(tiles, into, interleaved, &mut ahead)
                    }
                }
                let stored = Stored {
                    buffer,
                    row,
                    x_row: block * TILE_ROWS,
                    two_rows,
                    two_blocks,
                };
                pending = Some(stored);
            }
        }
    }
    if let Some(done) = pending {
        for t in 0..4 {
            done.write_tile(t, &written[done.buffer], out, m);
        }
    }
}

/// A block's output tiles, stored in one of the two buffers (each tile
/// `[w row][x row]`).
struct Stored {
    buffer: usize,
    /// The block's first row of the weight and of `x`.
    row: usize,
    x_row: usize,
    two_rows: bool,
    two_blocks: bool,
}

impl Stored {
    /// Writes the block's tile `t` (0-3) from `written` into `out` (of `m`
    /// rows), transposed, where the block has that tile.
    fn write_tile(&self, t: usize, written: &StoredTiles, out: &mut OutColumns, m: usize) {
        let (r, b) = (t / 2, t % 2);
        if (r == 1 && !self.two_rows) || (b == 1 && !self.two_blocks) {
            return;
        }
        let x_rows = self.x_row + b * TILE_ROWS;
        write_transposed(
            &written.tiles[t],
            out,
            x_rows..(x_rows + TILE_ROWS).min(m),
            self.row + r * TILE_ROWS,
        );
    }
}

/// One block of output tiles: 16 or 32 of the weight's rows × 16 or 32 of
/// `x`'s rows, over the whole contraction.
struct Block<'a> {
    /// The weight's values; the block's first row starts at `a`.
    w: &'a [u16],
    a: usize,
    k: usize,
    /// `x`'s pair columns; the block's first 16 rows' start at `b`.
    columns: &'a [u32],
    b: usize,
    pairs: usize,
    steps: usize,
}

impl Block<'_> {
    /// Runs the block into `written`: tile `2r + b` holds the product of
    /// the weight's row tile `r` and `x`'s row tile `b`. Two of the
    /// weight's row tiles where `TWO_ROWS`, two of `x`'s where `TWO_BLOCKS`.
    /// `interleaved(i)` runs for i in 0..4, spread over the contraction's
    /// steps (other work for the vector units while the tiles multiply).
    #[inline(always)]
    fn run<U: Tiles, const TWO_ROWS: bool, const TWO_BLOCKS: bool>(
        &self,
        t: &mut U,
        written: &mut StoredTiles,
        interleaved: &mut impl FnMut(usize),
        ahead: &mut Ahead,
    ) {
        t.zero::<0>();
        t.zero::<1>();
        t.zero::<2>();
        t.zero::<3>();
        let (k, a_below) = (self.k, self.a + TILE_ROWS * self.k);
        let b_next = self.b + self.pairs * TILE_ROWS;
        let every = (self.steps / 4).max(1);
        let mut done = 0;
        for s in 0..self.steps {
            if s % every == every - 1 && done < 4 {
                interleaved(done);
                done += 1;
            }
            ahead.step();
            let (a, b) = (s * TILE_VALUES, s * TILE_ROWS * TILE_ROWS);
            load::<_, 4, _>(t, self.w, self.a + a, k);
            load::<_, 6, _>(t, self.columns, self.b + b, TILE_ROWS);
            t.dot_bf16::<0, 4, 6>();
            if TWO_BLOCKS {
                load::<_, 7, _>(t, self.columns, b_next + b, TILE_ROWS);
                t.dot_bf16::<1, 4, 7>();
            }
            if TWO_ROWS {
                load::<_, 5, _>(t, self.w, a_below + a, k);
                t.dot_bf16::<2, 5, 6>();
                if TWO_BLOCKS {
                    t.dot_bf16::<3, 5, 7>();
                }
            }
        }
        for i in done..4 {
            interleaved(i);
        }
        let [t0, t1, t2, t3] = &mut written.tiles;
        store::<_, 0, _>(t, t0, 0, TILE_ROWS);
        if TWO_BLOCKS {
            store::<_, 1, _>(t, t1, 0, TILE_ROWS);
        }
        if TWO_ROWS {
            store::<_, 2, _>(t, t2, 0, TILE_ROWS);
            if TWO_BLOCKS {
                store::<_, 3, _>(t, t3, 0, TILE_ROWS);
            }
        }
    }
}

/// `x`'s `m` rows of `k` values rounded to bf16 pairs, in blocks of 16 rows
/// (the last padded with zero rows), written over every value of `columns`
/// (with a step of `ahead` per block): pair `s` of block `b`'s row `c` at
/// `(b · k/2 + s) · 16 + c`, so that 16 pairs of a block are one tile.
fn to_pair_columns(x: &[f32], m: usize, k: usize, columns: &mut [u32], ahead: &mut Ahead) {
    let _profile = crate::profile::open(crate::profile::Stage::RoundRows);
    let pairs = k / 2;
    for (b, block) in columns.chunks_exact_mut(pairs * TILE_ROWS).enumerate() {
        ahead.step();
        let rows = &x[b * TILE_ROWS * k..((b + 1) * TILE_ROWS).min(m) * k];
        if super::vector_rounding() {
            // SAFETY: the CPU has AVX512_BF16 (checked just above).
            unsafe { to_pair_columns_avx512(rows, k, block) };
        } else {
            block.fill(0);
            for (c, row) in rows.chunks_exact(k).enumerate() {
                for (s, pair) in row.chunks_exact(2).enumerate() {
                    block[s * TILE_ROWS + c] = bf16_bits(pair[0]) | bf16_bits(pair[1]) << 16;
                }
            }
        }
    }
}

/// One block of [`to_pair_columns`]: up to 16 rows, 16 pairs of each
/// rounded at a time and transposed in registers.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_pair_columns_avx512(rows: &[f32], k: usize, block: &mut [u32]) {
    use std::arch::x86_64::*;
    let count = rows.len() / k;
    for s0 in (0..k / 2).step_by(TILE_ROWS) {
        let pairs: [__m512i; 16] = std::array::from_fn(|c| match c < count {
            // SAFETY: 32 values from `2 · s0` are inside row `c` (k is a
            // multiple of 32).
            true => unsafe {
                let at = rows.as_ptr().add(c * k + 2 * s0);
                let (lo, hi) = (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)));
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
            },
            false => _mm512_setzero_si512(),
        });
        let columns = super::super::simd::transpose16(pairs);
        for (s, column) in columns.iter().enumerate() {
            let to = &mut block[(s0 + s) * TILE_ROWS..][..TILE_ROWS];
            // SAFETY: `to` holds 16 u32s.
            unsafe { _mm512_storeu_si512(to.as_mut_ptr().cast(), *column) };
        }
    }
}

/// Writes a stored output tile (`[w row][x row]`, 16 × 16) transposed: its
/// first columns as `out`'s rows `x_rows`, 16 values from column `col`.
fn write_transposed(
    tile: &[f32; TILE_ROWS * TILE_ROWS],
    out: &mut OutColumns,
    x_rows: Range<usize>,
    col: usize,
) {
    let cols = col..col + TILE_ROWS;
    if super::vector_rounding() {
        // SAFETY: the CPU has AVX-512 F (checked just above).
        unsafe { write_transposed_avx512(tile, out, x_rows, cols) };
    } else {
        for (i, r) in x_rows.enumerate() {
            for (j, o) in out.row_mut(r, cols.clone()).iter_mut().enumerate() {
                *o = tile[j * TILE_ROWS + i];
            }
        }
    }
}

/// [`write_transposed`] in registers: the tile's 16 rows transposed, then
/// each written as a row of `out` (at columns `cols`, 16 of them).
#[target_feature(enable = "avx512f")]
fn write_transposed_avx512(
    tile: &[f32; TILE_ROWS * TILE_ROWS],
    out: &mut OutColumns,
    x_rows: Range<usize>,
    cols: Range<usize>,
) {
    use std::arch::x86_64::*;
    let rows: [__m512i; 16] = std::array::from_fn(|r| {
        // SAFETY: row `r` of the tile is 16 values.
        unsafe { _mm512_loadu_si512(tile.as_ptr().add(r * TILE_ROWS).cast()) }
    });
    let columns = super::super::simd::transpose16(rows);
    for (column, r) in columns.iter().zip(x_rows) {
        let to = out.row_mut(r, cols.clone());
        assert_eq!(to.len(), TILE_ROWS);
        // SAFETY: `to` holds 16 values.
        unsafe { _mm512_storeu_si512(to.as_mut_ptr().cast(), *column) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::amx::{emulator::Emulator, Amx, TileConfig};
    use super::super::tests::check_directions;
    use super::*;

    /// [`forward`] on `tiles`, for [`check_directions`].
    /// Its output's columns in three parts of whole row tiles where the
    /// weight has three.
    fn on(tiles: &mut impl Tiles) -> impl FnMut(&[f32], usize, Bf16Weight, bool, &mut [f32]) + '_ {
        |x, m, w, _, out| {
            let n = w.n;
            let cuts = [0, (n / 48) * 16, (n / 24) * 16, n];
            let ranges = cuts.windows(2).map(|c| c[0]..c[1]);
            for mut part in OutColumns::split(out, (m, n), ranges) {
                forward(tiles, x, m, w, &mut part);
            }
        }
    }

    /// Shapes the kernel takes: one or two row tiles of each side, odd row
    /// counts of `x`, one step and many.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 16, 32),
        (5, 48, 64),
        (16, 32, 32),
        (17, 16, 96),
        (33, 80, 64),
        (64, 64, 320),
        (47, 96, 1024),
    ];

    /// The kernel's layout, padding and loops, on the emulated tiles: runs
    /// on every CPU.
    #[test]
    fn emulated_row_tile_products_equal_the_bf16_rounded_products() {
        check_directions(on(&mut Emulator::new(TileConfig::full())), SHAPES, &[false]);
    }

    /// The same on the CPU's tiles, where it has AMX-BF16, with a model's
    /// shape too.
    #[test]
    fn amx_row_tile_products_equal_the_bf16_rounded_products() {
        let Some(mut tiles) =
            Amx::new(TileConfig::full()).filter(|_| crate::cpu::features().amx_bf16)
        else {
            eprintln!("skipped: this CPU has no AMX-BF16, or the system does not permit it");
            return;
        };
        check_directions(on(&mut tiles), SHAPES, &[false]);
        check_directions(
            on(&mut tiles),
            &[(130, 1536, 576), (256, 576, 1536)],
            &[false],
        );
    }

    /// Which weights the kernel takes.
    #[test]
    fn takes_whole_tiles_only() {
        let values = vec![0u16; 64 * 64];
        let w = |n, k| Bf16Weight {
            values: &values[..n * k],
            n,
            k,
        };
        assert!(reads_rows(&w(16, 32)) && reads_rows(&w(48, 64)));
        assert!(!reads_rows(&w(16, 48)) && !reads_rows(&w(8, 32)) && !reads_rows(&w(0, 0)));
    }
}
