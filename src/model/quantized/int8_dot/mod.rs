//! Products with Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K to Q6_K weights
//! on AVX512_VNNI: `vpdpbusd` sums four u8 × i8 products into each of 16 i32
//! lanes per instruction, 64 multiply-adds where an f32 FMA does 16.
//!
//! The f32 rows on the other side (the activations) are rounded per group
//! of values that share a weight scale (32, or 16 for Q2_K, Q3_K and Q6_K)
//! to two 8-bit digits: a group's step `s` is its largest magnitude over
//! 127, each value's high digit `q₁` the nearest multiple of it (ties to
//! even), and its low digit `q₂` the remainder in steps of `s / 256`, so
//! that `x̂ = (s / 256) · (256·q₁ + q₂)`, within 1/32,512 of the group's
//! largest value. Each digit takes one `vpdpbusd` pass and the high sums are
//! shifted by 8 bits before the low ones add: twice llama.cpp's integer
//! work (it rounds to the high digit alone), for products as close to the
//! f32 ones as bf16 is not. That is what training needs: with 8-bit rows
//! the bundled fine-tune's validation loss moved by −3% to +18% from the
//! f32 run's as the seed changed; with two digits it follows the f32 run.
//! The weight's own blocks are used as stored. So the result is the exact
//! product of the stored weight with the rounded rows: every integer sum of
//! a group is exact, and the groups' sums are scaled and added in f32.
//!
//! Every format is read as `W = d · (u − z) + min` per group: `u` the
//! stored unsigned value (2 to 6 bits, or a Q8_0 byte plus 128), `z` the
//! format's zero point (4 for Q3_K, 8 for Q4_0, 16 for Q5_0, 32 for Q6_K,
//! 128 for Q8_0, else 0), `min` the offset of Q4_1, Q5_1 and of Q2_K's,
//! Q4_K's and Q5_K's sub-blocks (0 for the others); a K format sub-block's
//! `d` is its super-block's scale times its own. A group of a row `x̂ = s · q` then
//! contributes `s · (d · (Σ u·q − z·Σ q) + min · Σ q)` (here `s` the step of
//! the combined `q = 256·q₁ + q₂`): the rows carry
//! `−z·Σ q` (the integer sums' starting value) and `s·Σ q` per group beside
//! their scale.
//!
//! The kernel is a blocked GEMM as the bf16 one ([`super::bf16_dot`]): a
//! block of the weight (up to [`COLUMN_BLOCK`] output columns × [`DEPTH`]
//! values of the contraction) is unpacked into micro-panels of [`NR`]
//! columns laid out as `vpdpbusd` reads them (`pack.rs`), and the
//! micro-kernel (`tile.rs`) runs up to [`MR`] rows against a panel, the
//! `MR × NR` tile in registers. Only the forward product `x Wᵀ` runs here;
//! the input gradient's contraction runs along the weight's output rows,
//! across its blocks' scales, and stays on the f32 path.
//!
//! On a CPU with AMX-INT8, the same rounded rows and packed panels are
//! multiplied on tiles instead (`amx.rs`), a group's sums 16 × 16 at a time;
//! on a CPU with AVX-VNNI but no AVX-512, on 256-bit registers
//! (`tile256.rs`). Both give the 512-bit kernel's products bit for bit.

mod amx;
mod pack;
mod rows;
mod tile;
mod tile256;

use super::blocks::Rows;
use super::simd::split_rows;
use crate::cpu::Int8Kernel;
use candle_core::quantized::GgmlDType;
use pack::{for_each_block, group_panel_bytes, group_size, has_min, zero_point};
use rows::QuantizedRows;
use tile::Tile;

/// Rows of a micro-tile.
const MR: usize = 6;
/// Columns of a micro-tile: two registers of 16 i32 lanes.
const NR: usize = 32;
/// Values of the contraction per packed block: a micro-panel is 10 KB (12
/// KB for Q6_K's groups of 16), which stays in L1 while the rows stream by.
const DEPTH: usize = 256;
/// Output columns per packed block: 320 KB of packed panels, in L2.
const COLUMN_BLOCK: usize = 1024;
/// Rows read against one packed block before the next (a multiple of [`MR`]).
const ROW_BLOCK: usize = 16 * MR;

/// Whether this CPU runs the kernel (AVX512_VNNI with AVX-512 F, BW and DQ,
/// checked once).
pub(super) fn available() -> bool {
    crate::cpu::features().int8_kernel().is_some()
}

/// Whether the kernel reads `format`'s blocks.
pub(super) fn reads(format: GgmlDType) -> bool {
    super::INT8_KERNEL_FORMATS.contains(&format)
}

/// A weight `[n, k]` of a format the kernel reads, as stored.
#[derive(Clone, Copy)]
pub(super) struct Int8Weight<'a> {
    pub(super) rows: Rows<'a>,
    pub(super) n: usize,
}

/// `x Wᵀ` (`x`: `[m, k]` → `out`: `[m, n]`), the rows of `x` rounded to
/// two 8-bit digits per group, on a CPU with AVX512_VNNI (on its AMX-INT8
/// tiles where it has them too), or AVX-VNNI (on 256-bit registers): the
/// same result, bit for bit. Rows are split over threads when candle runs
/// multi-threaded.
///
/// # Panics
/// If the CPU lacks the kernel's features, the weight's format is not one
/// it reads, or the slices' lengths do not match.
pub(super) fn product(x: &[f32], m: usize, w: Int8Weight, out: &mut [f32]) {
    assert!(available(), "the CPU has no AVX512_VNNI");
    let (n, k) = (w.n, w.rows.k);
    assert!(
        reads(w.rows.format),
        "no int8 kernel for {:?}",
        w.rows.format
    );
    assert!(
        k.is_multiple_of(w.rows.format.block_size()),
        "rows of {k} values"
    );
    assert_eq!(
        w.rows.bytes.len(),
        n * w.rows.row_bytes,
        "a [{n}, {k}] weight"
    );
    assert_eq!(x.len(), m * k, "a [{m}, {k}] input");
    assert_eq!(out.len(), m * n, "a [{m}, {n}] output");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let kernel = crate::cpu::features().int8_kernel();
    let micro = match kernel {
        Some(Int8Kernel::AvxVnni) => Micro::Ymm,
        _ => Micro::Zmm,
    };
    let on_tiles = kernel.is_some_and(Int8Kernel::on_tiles);
    let tile_rows = if on_tiles { super::amx::TILE_ROWS } else { MR };
    split_rows(x, m, (k, n), tile_rows, out, |x, m, out| {
        let group = group_size(w.rows.format);
        match (
            on_tiles
                .then(|| super::amx::Amx::new(amx::config(group)))
                .flatten(),
            group,
        ) {
            (Some(mut tiles), 16) => amx::serial::<16>(&mut tiles, x, m, w, out),
            (Some(mut tiles), _) => amx::serial::<32>(&mut tiles, x, m, w, out),
            (None, 16) => serial::<16>(x, m, w, micro, out),
            (None, _) => serial::<32>(x, m, w, micro, out),
        }
    });
}

/// The micro-kernel a product's tiles run on.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Micro {
    /// 512-bit registers (AVX512_VNNI, `tile.rs`).
    Zmm,
    /// 256-bit registers, VEX-encoded (AVX-VNNI, `tile256.rs`).
    Ymm,
    /// 256-bit registers, EVEX-encoded (AVX512_VNNI with VL): the AVX-VNNI
    /// kernel's tests on CPUs with AVX-512.
    #[cfg(test)]
    YmmEvex,
}

/// [`product`] on the calling thread for a format with groups of `G`
/// values: the rows quantized once, then for each packed block of the
/// weight, every micro-tile against it.
fn serial<const G: usize>(x: &[f32], m: usize, w: Int8Weight, micro: Micro, out: &mut [f32]) {
    let (n, k) = (w.n, w.rows.k);
    let groups = k / G;
    let rows = QuantizedRows::new::<G>(x, m, k, zero_point(w.rows.format));
    let (with_min, with_start) = (has_min(w.rows.format), zero_point(w.rows.format) != 0);
    for_each_block::<G>(w.rows, n, |block| {
        let (col, first, depth) = (block.col, block.first, block.depth);
        for row in (0..m).step_by(ROW_BLOCK) {
            let block_rows = ROW_BLOCK.min(m - row);
            for (j, panel) in block
                .panels
                .chunks_exact(depth * group_panel_bytes(G))
                .enumerate()
            {
                let first_col = col + j * NR;
                let width = NR.min(col + block.cols - first_col);
                for r in (row..row + block_rows).step_by(MR) {
                    let scale_at = r * groups + first;
                    let tile = Tile {
                        high: &rows.high[r * k + first * G..],
                        low: &rows.low[r * k + first * G..],
                        values_stride: k,
                        scales: &rows.scales[scale_at..],
                        starts: &rows.starts[scale_at..],
                        scaled_sums: &rows.scaled_sums[scale_at..],
                        scales_stride: groups,
                        panel,
                        depth,
                        with_min,
                        with_start,
                        out: &mut out[r * n + first_col..],
                        out_stride: n,
                        width,
                        accumulate: first > 0,
                    };
                    let rows = MR.min(row + block_rows - r);
                    // SAFETY: the CPU has the micro-kernel's features
                    // (`product` checked them, or the tests); the tile's
                    // bounds are checked inside.
                    unsafe {
                        match micro {
                            Micro::Zmm => tile.run::<G>(rows),
                            Micro::Ymm => tile.run_avx_vnni::<G>(rows),
                            #[cfg(test)]
                            Micro::YmmEvex => tile.run_avx512_vl::<G>(rows),
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::QuantizedWeight;
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Tensor};

    use super::super::INT8_KERNEL_FORMATS as FORMATS;

    /// Whether the kernel's tests can run here; says why not where not.
    pub(super) fn runs_here() -> bool {
        let here = available();
        if !here {
            eprintln!("skipped: this CPU has no AVX512_VNNI (with AVX-512 F, BW and DQ)");
        }
        here
    }

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.normal()).collect()
    }

    /// A random `[n, k]` weight quantized to `format`.
    pub(super) fn weight(format: GgmlDType, n: usize, k: usize, rng: &mut Rng) -> QuantizedWeight {
        let w = Tensor::from_vec(random(n * k, rng), (n, k), &Device::Cpu).unwrap();
        QuantizedWeight::quantize(&w, format).unwrap()
    }

    /// A row rounded to two digits per group of `group` values, value by
    /// value.
    fn rounded(x: &[f32], group: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for block in x.chunks_exact(group) {
            let largest = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            if !(127.0 / largest).is_finite() {
                out.extend(block.iter().map(|_| 0.0));
                continue;
            }
            let (step, inverse) = (largest / 127.0, 127.0 / largest);
            out.extend(block.iter().map(|&v| {
                let high = (v * inverse).round_ties_even();
                let rest = (-high).mul_add(step, v);
                let low = (rest * (256.0 / step))
                    .round_ties_even()
                    .clamp(-127.0, 127.0);
                (256.0 * high as f64 + low as f64) * (step / 256.0) as f64
            }));
        }
        out
    }

    /// `x` (rounded as the kernel rounds it where `round`) times the
    /// dequantized weight, in f64.
    fn reference(x: &[f32], m: usize, w: &QuantizedWeight, round: bool) -> Vec<f64> {
        let (n, k) = w.dims();
        let dense = w.dequantize().unwrap().to_vec2::<f32>().unwrap();
        let mut out = vec![0f64; m * n];
        for (i, x) in x.chunks_exact(k).enumerate() {
            let x = match round {
                true => rounded(x, group_size(w.format())),
                false => x.iter().map(|&v| v as f64).collect(),
            };
            for (j, row) in dense.iter().enumerate() {
                out[i * n + j] = x.iter().zip(row).map(|(a, &b)| a * b as f64).sum();
            }
        }
        out
    }

    /// Each format: `run`'s products against the f64 product of the rows
    /// rounded as the kernel rounds them with the dequantized weight, on
    /// `shapes` (`(m, n, k)`, those whose `k` the format's blocks divide);
    /// and within the rows' rounding of the unrounded product.
    pub(super) fn check_products(
        mut run: impl FnMut(&[f32], usize, Int8Weight, &mut [f32]),
        shapes: &[(usize, usize, usize)],
    ) {
        let mut rng = Rng::new(5);
        for format in FORMATS {
            for &(m, n, k) in shapes {
                if !k.is_multiple_of(format.block_size()) {
                    continue;
                }
                let w = weight(format, n, k, &mut rng);
                let rows = w.cpu_rows().unwrap().unwrap();
                let x = random(m * k, &mut rng);
                let mut out = vec![f32::NAN; m * n];
                run(&x, m, Int8Weight { rows, n }, &mut out);
                let want = reference(&x, m, &w, true);
                let exact = reference(&x, m, &w, false);
                // f32 sums over groups of exact integer sums: a few ulp of
                // the sum's scale; the rows' rounding: at most a step of
                // 1/32,512 of the group's largest value per value (the low
                // digit saturating), about √k such errors adding.
                let tol = 16.0 * (k as f64).sqrt() * f32::EPSILON as f64 * 4.0;
                let rounding = 1.0 / 32_512.0 * 4.0 * (k as f64).sqrt() * 4.0;
                for (i, ((g, e), x)) in out.iter().zip(&want).zip(&exact).enumerate() {
                    let g = *g as f64;
                    assert!(
                        (g - e).abs() <= tol,
                        "{format:?} {m}x{k} by {n}x{k}, value {i}: {g} against {e}"
                    );
                    assert!(
                        (g - x).abs() <= rounding,
                        "{format:?}, value {i}: {g} against unrounded {x}"
                    );
                }
            }
        }
    }

    /// The kernel's products ([`check_products`]) on sizes below one tile,
    /// odd sizes, sizes across the packed blocks (more than `COLUMN_BLOCK`
    /// columns, more than `DEPTH` blocks) and a large contraction.
    #[test]
    fn products_equal_the_products_of_the_rounded_rows() {
        if !runs_here() {
            return;
        }
        check_products(
            product,
            &[
                (1, 1, 32usize),
                (2, 3, 64),
                (13, 33, 96),
                (6, 32, 256),
                (25, 70, 288),
                (7, 45, 512),
                (97, 1031, 320),
                (19, 1029, 768),
                (5, 17, 4096),
                (130, 40, 32),
            ],
        );
    }

    /// Adversarial rows: an infinity or a NaN makes only its row's outputs
    /// NaN, a row of subnormals or of values below 3.7e-37 counts as zero, a
    /// row of zeros gives zeros,
    /// and huge values near f32's largest stay finite.
    #[test]
    fn special_values_stay_in_their_rows() {
        if !runs_here() {
            return;
        }
        let (m, n, k) = (14, 35, 256);
        let mut rng = Rng::new(9);
        for format in FORMATS {
            let w = weight(format, n, k, &mut rng);
            let rows = w.cpu_rows().unwrap().unwrap();
            let mut x = random(m * k, &mut rng);
            x[3 * k + 5] = f32::INFINITY;
            x[7 * k + 40] = f32::NAN;
            x[9 * k..10 * k].fill(0.0);
            for v in &mut x[11 * k..12 * k] {
                *v *= 1e-39; // subnormal in f32
            }
            for v in &mut x[5 * k..6 * k] {
                *v *= 5e-38; // normal, but 127 / largest overflows
            }
            for v in &mut x[12 * k..13 * k] {
                *v *= 1e36;
            }
            let mut out = vec![0f32; m * n];
            product(&x, m, Int8Weight { rows, n }, &mut out);
            let want = reference(&x, m, &w, true);
            for i in 0..m {
                // f32 sums of terms this large: within a few ulp of the
                // row's scale (an output that cancels to a small value is
                // off by as much as a large one).
                let row_scale = want[i * n..(i + 1) * n]
                    .iter()
                    .fold(0f64, |a, v| a.max(v.abs()));
                for j in 0..n {
                    let (g, e) = (out[i * n + j], want[i * n + j]);
                    match i {
                        3 | 7 => assert!(g.is_nan(), "{format:?} row {i}: {g}"),
                        5 | 9 | 11 => assert_eq!(g, 0.0, "{format:?} row {i}"),
                        _ => assert!(
                            (g as f64 - e).abs() <= 1e-5 * (1.0 + row_scale),
                            "{format:?} row {i}: {g} against {e}"
                        ),
                    }
                }
            }
        }
    }
}
