//! The bf16 product on AMX tiles: the same rounding of the rows to bf16
//! pairs and the same packed blocks of the weight as the AVX512_BF16
//! micro-kernel, multiplied 16 × 16 outputs at a time by `tdpbf16ps`.
//!
//! Tiles hold 16 rows of 16 pairs, so the operands are padded with zeros to
//! whole tiles: the rows to a multiple of 16 rows of a multiple of 16 pairs,
//! each packed panel to a multiple of 16 steps, and the output to a multiple
//! of 16 rows and columns (in a scratch buffer where it is not one
//! already). Every tile's rows start on cache lines: the rows and the packed
//! panels are in buffers that do, and the output is moved to one where it
//! does not. A block of 2 × 2 output tiles (32 rows × 32 columns, one packed
//! panel) stays in tiles 0-3 across a packed block's depth, with the rows in
//! tiles 4-5 and the panel's two halves in tiles 6-7: four tile products for
//! four tile loads.
//!
//! The blocking constants are the AVX512_BF16 kernel's; they are not tuned
//! for AMX, which no machine this was written on had.

use super::super::amx::{load, store, with_padded_output, Tiles, TILE_ROWS};
use super::super::simd::CacheAligned;
use super::pack::for_each_block;
use super::{to_bf16_rows, Bf16Weight, NR};

/// Rows of a block of output tiles: the rows' share of a thread is a
/// multiple of it.
pub(super) const ROW_TILES: usize = 2 * TILE_ROWS;
/// Pairs of the contraction in a tile's row.
const TILE_PAIRS: usize = 16;

/// `x Wᵀ` or, with `input_gradient`, `dy W` into `out`, on `tiles`: what
/// [`super::product`] computes on one thread.
pub(super) fn serial(
    tiles: &mut impl Tiles,
    x: &[f32],
    m: usize,
    w: Bf16Weight,
    input_gradient: bool,
    out: &mut [f32],
) {
    let (q, p) = w.sides(input_gradient);
    let pairs = q.div_ceil(2);
    let (rows_padded, row_stride) = (
        m.next_multiple_of(TILE_ROWS),
        pairs.next_multiple_of(TILE_PAIRS),
    );
    let out_stride = p.next_multiple_of(TILE_ROWS);
    let mut buffer = CacheAligned::new();
    let rows = buffer.zeroed(rows_padded * row_stride);
    to_bf16_rows(x, q, row_stride, rows);
    let rows = &*rows;
    with_padded_output(out, (m, p), (rows_padded, out_stride), |acc| {
        for_each_block(w, input_gradient, TILE_PAIRS, |packed| {
            let steps = packed.depth.div_ceil(TILE_PAIRS);
            for row in (0..rows_padded).step_by(ROW_TILES) {
                let two_rows = row + ROW_TILES <= rows_padded;
                for (j, panel) in packed
                    .panels
                    .chunks_exact(steps * TILE_PAIRS * NR)
                    .enumerate()
                {
                    let first_col = packed.col + j * NR;
                    let block = Block {
                        rows,
                        a: row * row_stride + packed.first,
                        row_stride,
                        panel,
                        steps,
                        c: row * out_stride + first_col,
                        out_stride,
                        accumulate: packed.first > 0,
                    };
                    match (two_rows, first_col + NR <= out_stride) {
                        (true, true) => block.run::<_, true, true>(tiles, acc),
                        (true, false) => block.run::<_, true, false>(tiles, acc),
                        (false, true) => block.run::<_, false, true>(tiles, acc),
                        (false, false) => block.run::<_, false, false>(tiles, acc),
                    }
                }
            }
        });
    });
}

/// One block of output tiles: 16 or 32 rows × 16 or 32 columns (one packed
/// panel) over one packed block's depth.
struct Block<'a> {
    /// The rows as bf16 pairs, padded; the block's first row's first pair is
    /// at `a`.
    rows: &'a [u32],
    a: usize,
    row_stride: usize,
    /// The packed panel: `steps · 16` steps of [`NR`] column pairs.
    panel: &'a [u32],
    steps: usize,
    /// The block's first output at `c` of the (padded) output.
    c: usize,
    out_stride: usize,
    /// Add to the output rather than overwrite it.
    accumulate: bool,
}

impl Block<'_> {
    /// Runs the block: two row tiles where `TWO_ROWS`, two column tiles
    /// (the panel's halves) where `TWO_COLS`.
    #[inline(always)]
    fn run<U: Tiles, const TWO_ROWS: bool, const TWO_COLS: bool>(
        &self,
        t: &mut U,
        out: &mut [f32],
    ) {
        let (c, cs) = (self.c, self.out_stride);
        let c_below = c + TILE_ROWS * cs;
        match self.accumulate {
            true => {
                load::<_, 0, _>(t, out, c, cs);
                if TWO_COLS {
                    load::<_, 1, _>(t, out, c + 16, cs);
                }
                if TWO_ROWS {
                    load::<_, 2, _>(t, out, c_below, cs);
                    if TWO_COLS {
                        load::<_, 3, _>(t, out, c_below + 16, cs);
                    }
                }
            }
            false => {
                t.zero::<0>();
                t.zero::<1>();
                t.zero::<2>();
                t.zero::<3>();
            }
        }
        let a_below = self.a + TILE_ROWS * self.row_stride;
        for s in 0..self.steps {
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
        store::<_, 0, _>(t, out, c, cs);
        if TWO_COLS {
            store::<_, 1, _>(t, out, c + 16, cs);
        }
        if TWO_ROWS {
            store::<_, 2, _>(t, out, c_below, cs);
            if TWO_COLS {
                store::<_, 3, _>(t, out, c_below + 16, cs);
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

    /// [`serial`] on `tiles`, for [`check_products`].
    fn on(tiles: &mut impl Tiles) -> impl FnMut(&[f32], usize, Bf16Weight, bool, &mut [f32]) + '_ {
        |x, m, w, input_gradient, out| serial(tiles, x, m, w, input_gradient, out)
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
        serial(
            &mut Emulator::new(TileConfig::full()),
            &x,
            m,
            w,
            false,
            &mut out,
        );
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
