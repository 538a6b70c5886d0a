//! Products with Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights
//! in 8-bit integer arithmetic, on the best of two instruction sets the CPU
//! has ([`Isa`]): AVX512_VNNI, whose `vpdpbusd` sums four u8 × i8 products
//! into each of 16 i32 lanes per instruction, 64 multiply-adds where an f32
//! FMA does 16 (`vnni.rs`); or AVX2, with `vpmaddubsw` and `vpmaddwd`, for
//! every format but Q8_0 (`avx2.rs`). Both give the same bits.
//!
//! As llama.cpp does for these formats, the f32 rows on the other side
//! (the activations) are quantized to 8 bits per group of values that
//! share a weight scale (32, or 16 for Q6_K): a group's scale is its
//! largest magnitude over 127, and each value is rounded to the nearest
//! multiple of it (ties to even). The weight's own blocks are used as
//! stored. So the result is the exact product of the stored weight with
//! the rows rounded to 8-bit groups: every integer sum of a group is exact,
//! and the groups' sums are scaled and added in f32.
//!
//! Every format is read as `W = d · (u − z) + min` per group: `u` the
//! stored unsigned value (4, 5 or 6 bits, or a Q8_0 byte plus 128), `z` the
//! format's zero point (8 for Q4_0, 16 for Q5_0, 32 for Q6_K, 128 for Q8_0,
//! else 0), `min` the offset of Q4_1, Q5_1 and of Q4_K's and Q5_K's
//! sub-blocks (0 for the others); a K format sub-block's `d` is its
//! super-block's scale times its own. A group of a row `x̂ = s · q` then
//! contributes `s · (d · (Σ u·q − z·Σ q) + min · Σ q)`: the rows carry
//! `−z·Σ q` (the integer sums' starting value) and `s·Σ q` per group beside
//! their scale.
//!
//! The kernel is a blocked GEMM as the bf16 one ([`super::bf16_dot`]): a
//! block of the weight (up to [`COLUMN_BLOCK`] output columns × [`DEPTH`]
//! values of the contraction) is unpacked into micro-panels of `NR`
//! columns laid out as the micro-kernel reads them (`pack.rs`), and the
//! micro-kernel runs up to `MR` rows against a panel ([`tile::Tile`]), the
//! `MR × NR` tile in registers. Only the forward product `x Wᵀ` runs here;
//! the input gradient's contraction runs along the weight's output rows,
//! across its blocks' scales, and stays on the f32 path.

mod avx2;
mod pack;
mod tile;
mod vnni;

use super::blocks::Rows;
use super::simd::split_rows;
use candle_core::quantized::GgmlDType;
use pack::{group_panel_bytes, group_size, pack};
use tile::Tile;

/// Values of the contraction per packed block: a micro-panel is 10 KB (12
/// KB for Q6_K's groups of 16) on AVX512_VNNI, half that on AVX2, and
/// stays in L1 while the rows stream by.
const DEPTH: usize = 256;
/// Output columns per packed block: 320 KB of packed panels, in L2.
const COLUMN_BLOCK: usize = 1024;

/// The instruction sets the kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// `vpdpbusd` on 512-bit registers (with AVX-512 F, BW and DQ).
    Avx512Vnni,
    /// `vpmaddubsw` and `vpmaddwd` on 256-bit registers (with FMA).
    Avx2,
}

impl Isa {
    /// The best of them this CPU has ([`crate::cpu::CpuFeatures::int8_kernel`]).
    pub(super) fn best() -> Option<Self> {
        match crate::cpu::features().int8_kernel()? {
            "AVX512_VNNI" => Some(Self::Avx512Vnni),
            _ => Some(Self::Avx2),
        }
    }

    /// Whether the kernel reads `format`'s blocks on this instruction set:
    /// AVX2's i16 sums hold products of 6-bit values, not Q8_0's 8-bit ones.
    pub(super) fn reads(self, format: GgmlDType) -> bool {
        super::INT8_KERNEL_FORMATS.contains(&format)
            && (self == Self::Avx512Vnni || format != GgmlDType::Q8_0)
    }

    /// Columns of a micro-tile.
    fn nr(self) -> usize {
        match self {
            Self::Avx512Vnni => vnni::NR,
            Self::Avx2 => avx2::NR,
        }
    }

    /// Rows of a micro-tile.
    fn mr(self) -> usize {
        match self {
            Self::Avx512Vnni => vnni::MR,
            Self::Avx2 => avx2::MR,
        }
    }

    /// Rounds a group of 16 or 32 values to 8 bits: the scale and the sum
    /// of the rounded values (`quantize_group` of `vnni.rs`, `avx2.rs`).
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn quantize_group(self, x: &[f32], out: &mut [i8]) -> (f32, i32) {
        // SAFETY: the caller guarantees the instruction set.
        unsafe {
            match self {
                Self::Avx512Vnni => vnni::quantize_group(x, out),
                Self::Avx2 => avx2::quantize_group(x, out),
            }
        }
    }

    /// Runs a micro-tile of `rows` rows on a panel of groups of `G`.
    ///
    /// # Safety
    /// The CPU has the instruction set, and the panel is packed for it.
    unsafe fn run<const G: usize>(self, tile: Tile, rows: usize) {
        // SAFETY: the caller guarantees the instruction set and the panel.
        unsafe {
            match self {
                Self::Avx512Vnni => tile.run_vnni::<G>(rows),
                Self::Avx2 => tile.run_avx2::<G>(rows),
            }
        }
    }
}

/// Whether this CPU's kernel reads `format`'s blocks (none where it has no
/// kernel: neither AVX512_VNNI with AVX-512 F, BW and DQ, nor AVX2 with FMA).
pub(super) fn reads(format: GgmlDType) -> bool {
    Isa::best().is_some_and(|isa| isa.reads(format))
}

/// The zero point `z` of `format`'s unsigned values.
fn zero_point(format: GgmlDType) -> i32 {
    match format {
        GgmlDType::Q8_0 => 128,
        GgmlDType::Q6K => 32,
        GgmlDType::Q5_0 => 16,
        GgmlDType::Q4_0 => 8,
        _ => 0,
    }
}

/// `m` f32 rows of `k` values (a multiple of `G`) quantized to 8-bit
/// groups of `G` values, with what the kernel adds per group.
struct QuantizedRows {
    /// The rounded values, `[m, k]`.
    values: Vec<i8>,
    /// Per row and group (`[m, k / G]`): the scale `s`,
    scales: Vec<f32>,
    /// `−z · Σ q`, where the group's integer sums start,
    starts: Vec<i32>,
    /// and `s · Σ q`, which multiplies the offsets (formats with a min).
    scaled_sums: Vec<f32>,
}

impl QuantizedRows {
    /// `x` (`[m, k]`) quantized in groups of `G` for a weight of zero point
    /// `zero_point`.
    ///
    /// # Safety
    /// The CPU has `isa`.
    unsafe fn new<const G: usize>(
        isa: Isa,
        x: &[f32],
        m: usize,
        k: usize,
        zero_point: i32,
    ) -> Self {
        let groups = k / G;
        let mut rows = Self {
            values: vec![0; m * k],
            scales: vec![0.0; m * groups],
            starts: vec![0; m * groups],
            scaled_sums: vec![0.0; m * groups],
        };
        for (i, x) in x.chunks_exact(G).enumerate() {
            let sum;
            // SAFETY: the caller guarantees `isa`.
            (rows.scales[i], sum) =
                unsafe { isa.quantize_group(x, &mut rows.values[i * G..(i + 1) * G]) };
            rows.starts[i] = -zero_point * sum;
            rows.scaled_sums[i] = rows.scales[i] * sum as f32;
        }
        rows
    }
}

/// A weight `[n, k]` of a format the kernel reads, as stored.
#[derive(Clone, Copy)]
pub(super) struct Int8Weight<'a> {
    pub(super) rows: Rows<'a>,
    pub(super) n: usize,
}

/// `x Wᵀ` (`x`: `[m, k]` → `out`: `[m, n]`), the rows of `x` quantized to
/// 8-bit groups, on the best instruction set this CPU has for it. Rows are
/// split over threads when candle runs multi-threaded.
///
/// # Panics
/// If the CPU has no kernel for the weight's format, or the slices' lengths
/// do not match.
pub(super) fn product(x: &[f32], m: usize, w: Int8Weight, out: &mut [f32]) {
    let isa = Isa::best().expect("the CPU has no int8 kernel");
    product_on(isa, x, m, w, out)
}

/// [`product`] on `isa`.
///
/// # Panics
/// If the CPU lacks `isa`, `isa` does not read the weight's format, or the
/// slices' lengths do not match.
fn product_on(isa: Isa, x: &[f32], m: usize, w: Int8Weight, out: &mut [f32]) {
    let (n, k) = (w.n, w.rows.k);
    assert!(
        isa_runs_here(isa) && isa.reads(w.rows.format),
        "no int8 kernel for {:?} on {isa:?} here",
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
    split_rows(x, m, (k, n), isa.mr(), out, |x, m, out| {
        // SAFETY: checked above that the CPU has `isa` and that it reads
        // the format.
        unsafe {
            match group_size(w.rows.format) {
                16 => serial::<16>(isa, x, m, w, out),
                _ => serial::<32>(isa, x, m, w, out),
            }
        }
    });
}

/// Whether this CPU has `isa` (the best one, or AVX2 under AVX512_VNNI).
fn isa_runs_here(isa: Isa) -> bool {
    let features = crate::cpu::features();
    match isa {
        Isa::Avx512Vnni => Isa::best() == Some(Isa::Avx512Vnni),
        Isa::Avx2 => features.avx2_fma,
    }
}

/// [`product`] on the calling thread for a format with groups of `G`
/// values: the rows quantized once, then for each packed block of the
/// weight, every micro-tile against it.
///
/// # Safety
/// The CPU has `isa`, and `isa` reads the weight's format.
unsafe fn serial<const G: usize>(isa: Isa, x: &[f32], m: usize, w: Int8Weight, out: &mut [f32]) {
    use GgmlDType::*;
    let (n, k) = (w.n, w.rows.k);
    let (nr, mr) = (isa.nr(), isa.mr());
    let (groups, depth_groups, row_block) = (k / G, DEPTH / G, 16 * mr);
    // SAFETY: the caller guarantees `isa`.
    let rows = unsafe { QuantizedRows::new::<G>(isa, x, m, k, zero_point(w.rows.format)) };
    let with_min = matches!(w.rows.format, Q4_1 | Q5_1 | Q4K | Q5K);
    let mut packed = Vec::new();
    for col in (0..n).step_by(COLUMN_BLOCK) {
        let cols = COLUMN_BLOCK.min(n - col);
        for first in (0..groups).step_by(depth_groups) {
            let depth = depth_groups.min(groups - first);
            pack::<G>(
                w.rows,
                col..col + cols,
                first..first + depth,
                nr,
                &mut packed,
            );
            let panel_bytes = depth * group_panel_bytes(G, nr);
            for row in (0..m).step_by(row_block) {
                let block_rows = row_block.min(m - row);
                for (j, panel) in packed.chunks_exact(panel_bytes).enumerate() {
                    let first_col = col + j * nr;
                    let width = nr.min(col + cols - first_col);
                    for r in (row..row + block_rows).step_by(mr) {
                        let scale_at = r * groups + first;
                        let tile = Tile {
                            values: &rows.values[r * k + first * G..],
                            values_stride: k,
                            scales: &rows.scales[scale_at..],
                            starts: &rows.starts[scale_at..],
                            scaled_sums: &rows.scaled_sums[scale_at..],
                            scales_stride: groups,
                            panel,
                            depth,
                            with_min,
                            out: &mut out[r * n + first_col..],
                            out_stride: n,
                            width,
                            accumulate: first > 0,
                        };
                        // SAFETY: the caller guarantees `isa`; the panel
                        // was packed for it; the tile's bounds are checked
                        // inside.
                        unsafe { isa.run::<G>(tile, mr.min(row + block_rows - r)) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::QuantizedWeight;
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Tensor};

    use super::super::INT8_KERNEL_FORMATS as FORMATS;

    /// The instruction sets the kernel's tests can run on here (AVX2 also on
    /// an AVX512_VNNI CPU); says which not and why.
    fn isas_here() -> Vec<Isa> {
        let here: Vec<Isa> = [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .filter(|&isa| isa_runs_here(isa))
            .collect();
        if !here.contains(&Isa::Avx512Vnni) {
            eprintln!("skipped on AVX512_VNNI: this CPU has no AVX512_VNNI (with F, BW and DQ)");
        }
        if !here.contains(&Isa::Avx2) {
            eprintln!("skipped on AVX2: this CPU has no AVX2 with FMA");
        }
        here
    }

    fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
        (0..len).map(|_| rng.normal()).collect()
    }

    /// A random `[n, k]` weight quantized to `format`.
    fn weight(format: GgmlDType, n: usize, k: usize, rng: &mut Rng) -> QuantizedWeight {
        let w = Tensor::from_vec(random(n * k, rng), (n, k), &Device::Cpu).unwrap();
        QuantizedWeight::quantize(&w, format).unwrap()
    }

    /// A row rounded to 8-bit groups of `group` values, value by value.
    fn rounded(x: &[f32], group: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(x.len());
        for block in x.chunks_exact(group) {
            let largest = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (scale, inverse) = match largest < f32::MIN_POSITIVE {
                true => (0.0, 0.0),
                false => (largest / 127.0, 127.0 / largest),
            };
            out.extend(
                block
                    .iter()
                    .map(|v| (v * inverse).round_ties_even() as f64 * scale as f64),
            );
        }
        out
    }

    /// `x` (rounded to 8-bit groups of the weight's when `round`) times the
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

    /// Each format against the f64 product of the rows rounded to 8-bit
    /// blocks with the dequantized weight, on sizes below one tile, odd
    /// sizes, sizes across the packed blocks (more than `COLUMN_BLOCK`
    /// columns, more than `DEPTH` blocks) and a large contraction; and
    /// within the rows' rounding of the unrounded product.
    #[test]
    fn products_equal_the_products_of_the_rounded_rows() {
        let mut rng = Rng::new(5);
        for (isa, format) in isas_here()
            .into_iter()
            .flat_map(|isa| FORMATS.map(|f| (isa, f)))
            .filter(|(isa, f)| isa.reads(*f))
        {
            for (m, n, k) in [
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
            ] {
                if !k.is_multiple_of(format.block_size()) {
                    continue;
                }
                let w = weight(format, n, k, &mut rng);
                let rows = w.cpu_rows().unwrap().unwrap();
                let x = random(m * k, &mut rng);
                let mut out = vec![f32::NAN; m * n];
                product_on(isa, &x, m, Int8Weight { rows, n }, &mut out);
                let want = reference(&x, m, &w, true);
                let exact = reference(&x, m, &w, false);
                // f32 sums over blocks of exact integer sums: a few ulp of the
                // sum's scale; the rows' rounding: half a step per value.
                let tol = 16.0 * (k as f64).sqrt() * f32::EPSILON as f64 * 4.0;
                let rounding = 0.5 / 127.0 * 4.0 * (k as f64).sqrt() * 4.0;
                for (i, ((g, e), x)) in out.iter().zip(&want).zip(&exact).enumerate() {
                    let g = *g as f64;
                    assert!(
                        (g - e).abs() <= tol,
                        "{isa:?} {format:?} {m}x{k} by {n}x{k}, value {i}: {g} against {e}"
                    );
                    assert!(
                        (g - x).abs() <= rounding,
                        "{isa:?} {format:?}, value {i}: {g} against unrounded {x}"
                    );
                }
            }
        }
    }

    /// Adversarial rows: an infinity or a NaN makes only its row's outputs
    /// NaN, a row of subnormals counts as zero, a row of zeros gives zeros,
    /// and huge values near f32's largest stay finite.
    #[test]
    fn special_values_stay_in_their_rows() {
        let (m, n, k) = (14, 35, 256);
        let mut rng = Rng::new(9);
        for (isa, format) in isas_here()
            .into_iter()
            .flat_map(|isa| FORMATS.map(|f| (isa, f)))
            .filter(|(isa, f)| isa.reads(*f))
        {
            let w = weight(format, n, k, &mut rng);
            let rows = w.cpu_rows().unwrap().unwrap();
            let mut x = random(m * k, &mut rng);
            x[3 * k + 5] = f32::INFINITY;
            x[7 * k + 40] = f32::NAN;
            x[9 * k..10 * k].fill(0.0);
            for v in &mut x[11 * k..12 * k] {
                *v *= 1e-39; // subnormal in f32
            }
            for v in &mut x[12 * k..13 * k] {
                *v *= 1e36;
            }
            let mut out = vec![0f32; m * n];
            product_on(isa, &x, m, Int8Weight { rows, n }, &mut out);
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
                        3 | 7 => assert!(g.is_nan(), "{isa:?} {format:?} row {i}: {g}"),
                        9 | 11 => assert_eq!(g, 0.0, "{isa:?} {format:?} row {i}"),
                        _ => assert!(
                            (g as f64 - e).abs() <= 1e-5 * (1.0 + row_scale),
                            "{isa:?} {format:?} row {i}: {g} against {e}"
                        ),
                    }
                }
            }
        }
    }

    /// AVX2 and AVX512_VNNI give the same bits: the same rounded rows, the
    /// same exact integer sums, scaled and added in the same order.
    #[test]
    fn both_instruction_sets_give_the_same_products() {
        let isas = isas_here();
        if isas.len() < 2 {
            eprintln!("skipped: this CPU runs one instruction set of the two");
            return;
        }
        let mut rng = Rng::new(11);
        let (m, n, k) = (29, 1100, 512);
        for format in FORMATS.into_iter().filter(|&f| Isa::Avx2.reads(f)) {
            let w = weight(format, n, k, &mut rng);
            let rows = w.cpu_rows().unwrap().unwrap();
            let x = random(m * k, &mut rng);
            let outs: Vec<Vec<f32>> = isas
                .iter()
                .map(|&isa| {
                    let mut out = vec![f32::NAN; m * n];
                    product_on(isa, &x, m, Int8Weight { rows, n }, &mut out);
                    out
                })
                .collect();
            assert!(outs[0] == outs[1], "{format:?}");
        }
    }

    /// The rows' rounding: ties go to even, the largest magnitude becomes
    /// ±127, and the block's sum is the rounded values'.
    #[test]
    fn groups_round_to_nearest_even() {
        for (isa, group) in isas_here()
            .into_iter()
            .flat_map(|isa| [(isa, 16), (isa, 32)])
        {
            let mut x = vec![0f32; group];
            x[0] = -127.0; // scale 1
            x[1] = 2.5; // tie: to 2
            x[2] = 3.5; // tie: to 4
            x[3] = -0.5; // tie: to 0
            x[4] = 126.6;
            x[group - 1] = 9.5; // tie: to 10
            let mut q = vec![0i8; group];
            // SAFETY: checked above that the CPU has the kernel's features.
            let (scale, sum) = unsafe { isa.quantize_group(&x, &mut q) };
            assert_eq!(scale, 1.0);
            assert_eq!(&q[..5], &[-127, 2, 4, 0, 127]);
            assert_eq!(q[group - 1], 10);
            assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>());
        }
    }
}
