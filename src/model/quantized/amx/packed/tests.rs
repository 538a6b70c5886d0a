use super::super::emulator::Emulator;
use super::super::{Amx, TileConfig};
use super::*;
use crate::rng::Rng;

/// `rows × cols` random values, rows `stride` apart, and the same
/// matrix transposed (`cols × rows`, contiguous).
fn random(rows: usize, cols: usize, stride: usize, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..(rows.max(1) - 1) * stride + cols)
        .map(|_| rng.normal())
        .collect();
    let t = (0..cols * rows)
        .map(|i| x[(i % rows) * stride + i / rows])
        .collect();
    (x, t)
}

/// `left · right` on `tiles` over the whole packed matrices, into
/// `out` (`rows × cols`, its whole tiles).
fn run(tiles: &mut impl Tiles, [left, right]: [&Packed; 2], out: &mut [f32], accumulate: bool) {
    let (rows, cols) = (left.lines(), right.width());
    let side = |packed| Operand {
        packed,
        line: 0,
        at: 0,
    };
    let pairs = left.width().min(right.lines());
    product(
        tiles,
        side(left),
        side(right),
        (rows, cols, pairs),
        out,
        cols,
        accumulate,
    );
}

/// Every product of two row-major matrices `a` (`[m, k]`, strided) and
/// `b` (`[k, n]`), each side packed each way it can be (`a`'s rows, or
/// `aᵀ`'s row pairs transposed; `b`'s row pairs, or `bᵀ`'s rows
/// transposed), with and without a leading zero in the contraction,
/// written and accumulated, on the emulator's tiles and the CPU's where
/// it has them: the f64 product of the values rounded to bf16. Odd
/// sizes, sizes below a tile, a contraction of several tile steps.
#[test]
fn packed_products_equal_the_rounded_products() {
    let mut amx = Amx::new(TileConfig::full()).filter(|_| crate::cpu::features().amx_bf16);
    if amx.is_none() {
        eprintln!("this CPU has no usable AMX-BF16: the products run on the emulator only");
    }
    let mut emulator = Emulator::new(TileConfig::full());
    let mut rng = Rng::new(7);
    let rounded = |x: f32| half::bf16::from_f32(x).to_f64();
    for (m, n, k) in [
        (1, 1, 1),
        (5, 7, 3),
        (16, 16, 32),
        (33, 40, 70),
        (96, 64, 300),
    ] {
        let (a, at) = random(m, k, k + 3, &mut rng);
        let (b, bt) = random(k, n, n, &mut rng);
        for lead in [0, 1] {
            // With a lead, `b` gets a row of zeros on top, which `a`'s
            // leading zero meets.
            let b_lead: Vec<f32> = [vec![0.0; lead * n], b.clone()].concat();
            let (rows, cols) = (m.next_multiple_of(16), n.next_multiple_of(16));
            let mut left = [Packed::new(), Packed::new(), Packed::new()];
            left[0].rows(
                Rows {
                    values: &a,
                    rows: m,
                    cols: k,
                    stride: k + 3,
                },
                lead,
                rows,
            );
            let at_rows = Rows {
                values: &at,
                rows: k,
                cols: m,
                stride: m,
            };
            left[1].row_pairs(at_rows, k.div_ceil(2));
            let [by_rows, pairs_of_at, by_columns] = &mut left;
            by_columns.transposed(pairs_of_at);
            let mut right = [Packed::new(), Packed::new(), Packed::new()];
            let b_rows = Rows {
                values: &b_lead,
                rows: k + lead,
                cols: n,
                stride: n,
            };
            right[0].row_pairs(b_rows, (k + lead).div_ceil(2));
            right[1].rows(
                Rows {
                    values: &bt,
                    rows: n,
                    cols: k,
                    stride: k,
                },
                lead,
                cols,
            );
            let [pairs_of_b, bt_rows, transposed] = &mut right;
            transposed.transposed(bt_rows);
            let mut sides = vec![[&*by_rows, &*pairs_of_b], [&*by_rows, &*transposed]];
            if lead == 0 {
                sides.extend([[&*by_columns, &*pairs_of_b], [&*by_columns, &*transposed]]);
            }
            let start: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32).collect();
            for (side, accumulate) in sides.into_iter().zip([false, true].into_iter().cycle()) {
                let mut outs = vec![start.clone()];
                run(&mut emulator, side, &mut outs[0], accumulate);
                if let Some(amx) = amx.as_mut() {
                    outs.push(start.clone());
                    run(amx, side, &mut outs[1], accumulate);
                }
                for out in &outs {
                    for (r, c) in (0..m).flat_map(|r| (0..n).map(move |c| (r, c))) {
                        let sum: f64 = (0..k)
                            .map(|i| rounded(a[r * (k + 3) + i]) * rounded(b[i * n + c]))
                            .sum();
                        let want = sum
                            + if accumulate {
                                start[r * cols + c] as f64
                            } else {
                                0.0
                            };
                        let got = out[r * cols + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m} x {n} x {k}, lead {lead}: ({r}, {c}) {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}
