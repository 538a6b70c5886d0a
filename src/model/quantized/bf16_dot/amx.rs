//! The bf16 product on AMX tiles with the weight repacked: the same
//! rounding of the rows to bf16 pairs and the same packed panels of the
//! weight as the AVX512_BF16 micro-kernel, multiplied 16 × 16 outputs at a
//! time by `tdpbf16ps`. It takes the input gradient `dy W`, whose weight
//! side must be interleaved in pairs of rows, and the forward products
//! whose weight is not in whole tiles (the others read the weight's rows
//! as they are: `amx_rows.rs`).
//!
//! A thread takes a range of the output's columns and packs only those,
//! [`COLUMN_BLOCK`] at a time over the whole contraction. Tiles hold 16
//! rows of 16 pairs, so the rows are padded with zeros to a multiple of 16
//! rows of a multiple of 16 pairs, and each packed panel to a multiple of
//! 16 steps. A block of 2 × 2 output tiles (32 rows × 32 columns, one packed
//! panel) stays in tiles 0-3 across the whole contraction, with the rows
//! in tiles 4-5 and the panel's two halves in tiles 6-7 (four tile products
//! for four tile loads), and is written out once, through a stored copy,
//! so that the output needs no padding.

use super::super::amx::{load, store, StoredTiles, Tiles, TILE_PAIRS, TILE_ROWS};
use super::super::simd::{OutColumns, Pooled};
use super::pack::pack;
use super::{to_bf16_rows, Ahead, Bf16Weight, NR};
use std::ops::Range;

/// Output columns packed at a time (two panels): a thread's share of the
/// columns is a multiple of it. Over a contraction of 1536 the packed
/// block is 192 KB, in L2.
pub(super) const COLUMN_BLOCK: usize = 2 * NR;

/// `x Wᵀ` or, with `input_gradient`, `dy W`, into `out`'s columns, on
/// `tiles`: what [`super::product`] computes on one thread.
pub(super) fn serial(
    tiles: &mut impl Tiles,
    x: &[f32],
    m: usize,
    w: Bf16Weight,
    input_gradient: bool,
    out: &mut OutColumns,
) {
    let q = w.sides(input_gradient).0;
    let pairs = q.div_ceil(2);
    let (rows_padded, row_stride) = (
        m.next_multiple_of(TILE_ROWS),
        pairs.next_multiple_of(TILE_PAIRS),
    );
    assert_eq!(out.rows(), m);
    let mut buffer = Pooled::take();
    let rows = buffer.reused(rows_padded * row_stride);
    // Rounded 16 rows at a time, while the input gradient's first block of
    // the weight is asked for.
    let cols = out.cols();
    let first = cols.start..(cols.start + COLUMN_BLOCK).min(cols.end);
    let mut ahead = block_ahead(w, input_gradient, first, m.div_ceil(TILE_ROWS));
    for (x, rows) in x
        .chunks(TILE_ROWS * q)
        .zip(rows.chunks_mut(TILE_ROWS * row_stride))
    {
        to_bf16_rows(x, q, row_stride, rows);
        ahead.step();
    }
    // Zeros past each row's pairs and in the rows past `m`.
    let (written_rows, padding_rows) = rows.split_at_mut(m * row_stride);
    for row in written_rows.chunks_exact_mut(row_stride) {
        row[pairs..].fill(0);
    }
    padding_rows.fill(0);
    let rows = &*rows;
    let steps = pairs.div_ceil(TILE_PAIRS);
    let mut packed = Pooled::take();
    let mut written = StoredTiles::new();
    let runs_per_block = rows_padded.div_ceil(2 * TILE_ROWS) * COLUMN_BLOCK.div_ceil(NR);
    for col in cols.clone().step_by(COLUMN_BLOCK) {
        let block_cols = col..(col + COLUMN_BLOCK).min(cols.end);
        let next_cols = block_cols.end..(block_cols.end + COLUMN_BLOCK).min(cols.end);
        let mut ahead = block_ahead(w, input_gradient, next_cols, runs_per_block * steps);
        crate::profile::time(crate::profile::Stage::RepackWeight, || {
            pack(
                w,
                input_gradient,
                block_cols.clone(),
                0..pairs,
                TILE_PAIRS,
                &mut packed,
            )
        });
        let panels = packed.values();
        for row in (0..rows_padded).step_by(2 * TILE_ROWS) {
            let two_rows = row + 2 * TILE_ROWS <= rows_padded;
            for (j, panel) in panels.chunks_exact(steps * TILE_PAIRS * NR).enumerate() {
                let first_col = col + j * NR;
                let width = NR.min(block_cols.end - first_col);
                let block = Block {
                    rows,
                    a: row * row_stride,
                    row_stride,
                    panel,
                    steps,
                };
                // Whole tiles inside the output are stored there directly,
                // the others through `written`.
                let end = first_col + width;
                let direct: [Option<(*mut f32, usize)>; 4] = std::array::from_fn(|t| {
                    let (r, c) = (row + (t / 2) * TILE_ROWS, first_col + (t % 2) * TILE_ROWS);
                    (r + TILE_ROWS <= m && c + TILE_ROWS <= end)
                        .then(|| out.region(r..r + TILE_ROWS, c..c + TILE_ROWS))
                });
                let sink = Sink {
                    written: &mut written,
                    direct,
                };
                match (two_rows, width > TILE_ROWS) {
                    (true, true) => block.run::<_, true, true>(tiles, sink, &mut ahead),
                    (true, false) => block.run::<_, true, false>(tiles, sink, &mut ahead),
                    (false, true) => block.run::<_, false, true>(tiles, sink, &mut ahead),
                    (false, false) => block.run::<_, false, false>(tiles, sink, &mut ahead),
                }
                for (t, tile) in written.tiles.iter().enumerate() {
                    let (r, c) = (row + (t / 2) * TILE_ROWS, first_col + (t % 2) * TILE_ROWS);
                    if r >= m || c >= end || direct[t].is_some() {
                        continue;
                    }
                    let (tile_rows, tile_cols) =
                        (TILE_ROWS.min(m - r), TILE_ROWS.min(first_col + width - c));
                    for (i, values) in tile.chunks_exact(TILE_ROWS).take(tile_rows).enumerate() {
                        out.row_mut(r + i, c..c + tile_cols)
                            .copy_from_slice(&values[..tile_cols]);
                    }
                }
            }
        }
    }
}

/// The lines the input gradient's packing of the column block `cols` reads
/// (those columns of every row of the weight), over `steps` steps. The
/// forward products packed here, of weights not in whole tiles, ask for
/// nothing.
fn block_ahead<'a>(
    w: Bf16Weight<'a>,
    input_gradient: bool,
    cols: Range<usize>,
    steps: usize,
) -> Ahead<'a> {
    match input_gradient {
        true => Ahead::new(w, 0..w.n, cols, steps),
        false => Ahead::new(w, 0..0, 0..0, steps),
    }
}

/// Where a block's four output tiles go: tile `t` straight into the output
/// where `direct[t]` gives its place (its first value's address and the
/// rows' stride, in values), into `written.tiles[t]` otherwise (tile
/// `2r + c` is row tile `r`'s product with the panel's half `c`).
struct Sink<'a> {
    written: &'a mut StoredTiles,
    direct: [Option<(*mut f32, usize)>; 4],
}

impl Sink<'_> {
    /// Stores tile `T` (`T` in 0-3) where it goes.
    #[inline(always)]
    fn store<U: Tiles, const T: u8>(&mut self, t: &mut U) {
        match self.direct[T as usize] {
            // SAFETY: `OutColumns::region` gave a place for a whole tile
            // of this thread's own output, which nothing else holds now.
            Some((to, stride)) => unsafe {
                t.store_raw::<T>(to.cast(), stride * std::mem::size_of::<f32>())
            },
            None => store::<_, T, _>(t, &mut self.written.tiles[T as usize], 0, TILE_ROWS),
        }
    }
}

/// One block of output tiles: 16 or 32 rows × 16 or 32 columns (one packed
/// panel) over the whole contraction.
struct Block<'a> {
    /// The rows as bf16 pairs, padded; the block's first row's first pair is
    /// at `a`.
    rows: &'a [u32],
    a: usize,
    row_stride: usize,
    /// The packed panel: `steps · 16` steps of [`NR`] column pairs.
    panel: &'a [u32],
    steps: usize,
}

impl Block<'_> {
    /// Runs the block into `sink`: two row tiles where `TWO_ROWS`, two
    /// column tiles (the panel's halves) where `TWO_COLS`.
    #[inline(always)]
    fn run<U: Tiles, const TWO_ROWS: bool, const TWO_COLS: bool>(
        &self,
        t: &mut U,
        mut sink: Sink,
        ahead: &mut Ahead,
    ) {
        t.zero::<0>();
        t.zero::<1>();
        t.zero::<2>();
        t.zero::<3>();
        let a_below = self.a + TILE_ROWS * self.row_stride;
        for s in 0..self.steps {
            ahead.step();
            let (a, b) = (s * TILE_PAIRS, s * TILE_PAIRS * NR);
            load::<_, 4, _>(t, self.rows, self.a + a, self.row_stride);
            load::<_, 6, _>(t, self.panel, b, NR);
            t.dot_bf16::<0, 4, 6>();
            if TWO_COLS {
                load::<_, 7, _>(t, self.panel, b + 16, NR);
                t.dot_bf16::<1, 4, 7>();
            }
            if TWO_ROWS {
                load::<_, 5, _>(t, self.rows, a_below + a, self.row_stride);
                t.dot_bf16::<2, 5, 6>();
                if TWO_COLS {
                    t.dot_bf16::<3, 5, 7>();
                }
            }
        }
        sink.store::<_, 0>(t);
        if TWO_COLS {
            sink.store::<_, 1>(t);
        }
        if TWO_ROWS {
            sink.store::<_, 2>(t);
            if TWO_COLS {
                sink.store::<_, 3>(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::amx::{emulator::Emulator, Amx, TileConfig};
    use super::super::tests::{check_products, random, random_bf16, reference};
    use super::*;
    use crate::rng::Rng;

    /// [`serial`] on `tiles`, for [`check_products`]: the output's first
    /// [`COLUMN_BLOCK`] columns as one thread's part, the rest as another's.
    fn on(tiles: &mut impl Tiles) -> impl FnMut(&[f32], usize, Bf16Weight, bool, &mut [f32]) + '_ {
        |x, m, w, input_gradient, out| {
            let p = w.sides(input_gradient).1;
            let cut = COLUMN_BLOCK.min(p);
            for mut part in OutColumns::split(out, (m, p), [0..cut, cut..p]) {
                serial(tiles, x, m, w, input_gradient, &mut part);
            }
        }
    }

    /// The kernel's layout, padding and loops, on the emulated tiles: runs
    /// on every CPU.
    #[test]
    fn emulated_tile_products_equal_the_bf16_rounded_products() {
        check_products(
            on(&mut Emulator::new(TileConfig::full())),
            &[
                (1, 1, 1),
                (2, 3, 5),
                (16, 16, 32),
                (13, 33, 7),
                (32, 32, 64),
                (40, 70, 257),
                (33, 1040, 34),
                (17, 20, 600),
            ],
        );
    }

    /// The same on the CPU's tiles, where it has AMX-BF16, with larger
    /// shapes.
    #[test]
    fn amx_tile_products_equal_the_bf16_rounded_products() {
        let Some(mut tiles) =
            Amx::new(TileConfig::full()).filter(|_| crate::cpu::features().amx_bf16)
        else {
            eprintln!("skipped: this CPU has no AMX-BF16, or the system does not permit it");
            return;
        };
        check_products(
            on(&mut tiles),
            &[
                (1, 1, 1),
                (2, 3, 5),
                (13, 33, 7),
                (32, 32, 64),
                (97, 1031, 300),
                (5, 17, 4099),
                (130, 40, 33),
                (256, 576, 1536),
            ],
        );
    }

    /// Special values stay in their rows on the emulated tiles: an
    /// infinity or a NaN reaches only its row, padding never meets it, and
    /// subnormal values count as zero.
    #[test]
    fn emulated_special_values_stay_in_their_rows() {
        let (m, n, k) = (18, 35, 40);
        let mut rng = Rng::new(9);
        let values = random_bf16(n * k, &mut rng);
        let w = Bf16Weight {
            values: &values,
            n,
            k,
        };
        let mut x = random(m * k, &mut rng);
        x[3 * k + 39] = f32::INFINITY; // the row's last value, beside padding
        x[17 * k] = f32::NAN; // the last row, beside padded rows
        for v in &mut x[11 * k..12 * k] {
            *v *= 1e-39;
        }
        let mut out = vec![0f32; m * n];
        on(&mut Emulator::new(TileConfig::full()))(&x, m, w, false, &mut out);
        let want = reference(&x, m, w, false);
        for i in 0..m {
            for j in 0..n {
                let (g, e) = (out[i * n + j], want[i * n + j]);
                match i {
                    3 => assert!(g.is_infinite() || g.is_nan(), "row {i}: {g}"),
                    17 => assert!(g.is_nan(), "row {i}: {g}"),
                    11 => assert!(g.abs() < 1e-36, "row {i}: {g}"),
                    _ => assert!(
                        (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "row {i}: {g} against {e}"
                    ),
                }
            }
        }
    }
}
