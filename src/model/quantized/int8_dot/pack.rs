//! Unpacking a block of the weight into micro-panels laid out as the
//! micro-kernel reads them. A panel holds [`NR`] columns (the weight's rows)
//! over a run of groups of `G` values (32, or 16 for Q2_K, Q3_K and Q6_K);
//! per group:
//! - `G / 4` runs of 4 values: for each, `NR` columns × 4 unsigned bytes,
//!   the two registers one `vpdpbusd` step reads (column `c`'s 4 values in
//!   lane `c`);
//! - the `NR` columns' scales `d`, f32;
//! - their offsets `min` (Q4_1, Q5_1 and the K formats' sub-blocks with a
//!   min: Q2_K, Q4_K, Q5_K; zero for the others), f32.
//!
//! Columns past the weight's edge are zeros (scale 0).

use super::super::blocks::Rows;
use super::super::simd::{for_each_packed_block, CacheAligned, PackedBlock};
use super::{COLUMN_BLOCK, DEPTH, NR};
use candle_core::quantized::GgmlDType;
use std::ops::Range;

/// Bytes of one group of `G` values of a panel: values, scales, offsets.
pub(super) const fn group_panel_bytes(group: usize) -> usize {
    group * NR + 2 * 4 * NR
}

/// Where a group's scales start in its panel bytes.
pub(super) const fn scales_at(group: usize) -> usize {
    group * NR
}

/// Where a group's offsets start in its panel bytes.
pub(super) const fn mins_at(group: usize) -> usize {
    group * NR + 4 * NR
}

/// The values per scale of `format`'s blocks, as the kernel reads them.
pub(super) fn group_size(format: GgmlDType) -> usize {
    match format {
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q6K => 16,
        _ => 32,
    }
}

/// The zero point `z` of `format`'s unsigned values.
pub(super) fn zero_point(format: GgmlDType) -> i32 {
    match format {
        GgmlDType::Q8_0 => 128,
        GgmlDType::Q6K => 32,
        GgmlDType::Q5_0 => 16,
        GgmlDType::Q4_0 => 8,
        GgmlDType::Q3K => 4,
        _ => 0,
    }
}

/// Whether `format`'s groups have an offset `min` (zero for the others).
pub(super) fn has_min(format: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(format, Q4_1 | Q5_1 | Q2K | Q4K | Q5K)
}

/// A format's value `l` of a 16-byte run of nibbles holding 32 values:
/// value `l` in the low nibble of byte `l`, value `l + 16` in its high one.
fn nibble(qs: &[u8], l: usize) -> u8 {
    (qs[l % 16] >> (4 * (l / 16))) & 0x0f
}

/// A K format's 6-bit scale and min of sub-block `j` of 8, from the 12 bytes
/// that pack them (llama.cpp's `get_scale_min_k4`).
fn scale_min_k4(scales: &[u8], j: usize) -> (f32, f32) {
    let (scale, min) = match j < 4 {
        true => (scales[j] & 63, scales[j + 4] & 63),
        false => (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        ),
    };
    (scale as f32, min as f32)
}

/// Q3_K's 6-bit scale of sub-block `j` of 16, stored +32, from the 12 bytes
/// that pack them: the low 4 bits of scales 0-7 in the nibbles of bytes
/// 0-7 (low nibbles first), of scales 8-15 in their high nibbles; the high 2
/// bits in bytes 8-11, two bits per scale (llama.cpp's `kmask` unpacking).
fn q3k_scale(scales: &[u8], j: usize) -> i32 {
    let low = (scales[j % 8] >> (4 * (j / 8))) & 15;
    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    (low | (high << 4)) as i32
}

/// Where a format's groups lie in a stored row: the bytes of its blocks
/// and the groups per block (one for blocks of 32 values; a K format's
/// super-block of 256 holds 8 or 16). Read once per packing, off the hot
/// loop.
#[derive(Clone, Copy)]
struct Blocks {
    format: GgmlDType,
    bytes: usize,
    groups: usize,
}

impl Blocks {
    fn of(format: GgmlDType) -> Self {
        let groups = format.block_size() / group_size(format);
        Self {
            format,
            bytes: format.type_size(),
            groups,
        }
    }
}

/// Group `g` of a stored row: its unsigned values `u` written to `u`
/// (`group_size(format)` of them); returns the scale `d` and offset `min`
/// with which value `l` is `d · (u_l − z) + min`.
fn unpack(blocks: Blocks, row: &[u8], g: usize, u: &mut [u8]) -> (f32, f32) {
    let (format, size, per_block) = (blocks.format, blocks.bytes, blocks.groups);
    let (block, j) = (&row[g / per_block * size..][..size], g % per_block);
    let f16 = |at: usize| half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
    // Q5_0 and Q5_1: value `l` ORed with bit `l` of the little-endian u32
    // at `at` (the values' fifth bits), as the value's bit 4.
    let add_fifth_bits = |at: usize, u: &mut [u8]| {
        let bits = u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]]);
        for (l, u) in u.iter_mut().enumerate() {
            *u |= (((bits >> l) & 1) << 4) as u8;
        }
    };
    match format {
        // d (f16), 32 i8 values, read as u = q + 128.
        GgmlDType::Q8_0 => {
            for (u, &q) in u.iter_mut().zip(&block[2..34]) {
                *u = q ^ 0x80;
            }
            (f16(0), 0.0)
        }
        // d (f16), 16 bytes of nibbles.
        GgmlDType::Q4_0 => {
            (0..32).for_each(|l| u[l] = nibble(&block[2..18], l));
            (f16(0), 0.0)
        }
        // d, min (f16), 16 bytes of nibbles.
        GgmlDType::Q4_1 => {
            (0..32).for_each(|l| u[l] = nibble(&block[4..20], l));
            (f16(0), f16(2))
        }
        // d (f16), the fifth bits, 16 bytes of nibbles; zero point 16.
        GgmlDType::Q5_0 => {
            (0..32).for_each(|l| u[l] = nibble(&block[6..22], l));
            add_fifth_bits(2, u);
            (f16(0), 0.0)
        }
        // d, min (f16), the fifth bits, 16 bytes of nibbles.
        GgmlDType::Q5_1 => {
            (0..32).for_each(|l| u[l] = nibble(&block[8..24], l));
            add_fifth_bits(4, u);
            (f16(0), f16(2))
        }
        // d, dmin (f16), 12 bytes of eight 6-bit scales and mins, 128 bytes
        // of nibbles: each 64 values' 32 bytes hold the first 32 in their low
        // nibbles, the next 32 in their high ones. Value `l` of sub-block `j`
        // is `d · scale_j · q_l − dmin · min_j`.
        GgmlDType::Q4K => {
            let (scale, min) = scale_min_k4(&block[4..16], j);
            let qs = &block[16 + 32 * (j / 2)..][..32];
            for (u, &q) in u.iter_mut().zip(qs) {
                *u = (q >> (4 * (j % 2))) & 0x0f;
            }
            (f16(0) * scale, -f16(2) * min)
        }
        // Q4_K's layout with 32 bytes of fifth bits before the nibbles:
        // sub-block `j`'s are bit `j` of each.
        GgmlDType::Q5K => {
            let (scale, min) = scale_min_k4(&block[4..16], j);
            let (qh, qs) = (&block[16..48], &block[48 + 32 * (j / 2)..][..32]);
            for (l, u) in u.iter_mut().enumerate() {
                *u = ((qs[l] >> (4 * (j % 2))) & 0x0f) | (((qh[l] >> j) & 1) << 4);
            }
            (f16(0) * scale, -f16(2) * min)
        }
        // 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 i8 scales (one
        // per 16 values), d (f16); zero point 32. Value `v` of each 128 (half
        // `h`) is in run `t = v / 32` at `l = v % 32`: its low bits in the
        // nibble `t / 2` of `ql[64h + 32(t % 2) + l]`, its high ones at bit
        // `2t` of `qh[32h + l]`.
        GgmlDType::Q6K => {
            let (ql, qh) = (&block[..128], &block[128..192]);
            let (h, t, first) = (j / 8, (j % 8) / 2, 16 * (j % 2));
            for (i, u) in u.iter_mut().enumerate() {
                let l = first + i;
                let low = (ql[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2))) & 0x0f;
                *u = low | (((qh[32 * h + l] >> (2 * t)) & 3) << 4);
            }
            (f16(208) * block[192 + j] as i8 as f32, 0.0)
        }
        // 16 bytes of 4-bit scales (low nibble) and mins (high nibble), one
        // pair per 16 values, 64 bytes of 2-bit values, d and dmin (f16).
        // Value `v` of each 128 (half `h`) is in run `t = v / 32` at `l = v %
        // 32`: its bits at `2t` of `qs[32h + l]`.
        GgmlDType::Q2K => {
            let (h, t, first) = (j / 8, (j % 8) / 2, 16 * (j % 2));
            let qs = &block[16 + 32 * h + first..][..16];
            for (u, &q) in u.iter_mut().zip(qs) {
                *u = (q >> (2 * t)) & 3;
            }
            let sc = block[j];
            (f16(80) * (sc & 15) as f32, -f16(82) * (sc >> 4) as f32)
        }
        // 32 bytes of high bits, 64 bytes of 2-bit values, 12 bytes of
        // sixteen 6-bit scales (stored +32), d (f16); zero point 4. Value `v`
        // of each 128 (half `h`) is in run `t = v / 32` at `l = v % 32`: its
        // low bits at `2t` of `qs[32h + l]`, its high bit at bit `4h + t` of
        // `hmask[l]`.
        GgmlDType::Q3K => {
            let (h, t, first) = (j / 8, (j % 8) / 2, 16 * (j % 2));
            let (hmask, qs) = (&block[first..][..16], &block[32 + 32 * h + first..][..16]);
            for (i, u) in u.iter_mut().enumerate() {
                let high = (hmask[i] >> (4 * h + t)) & 1;
                *u = ((qs[i] >> (2 * t)) & 3) | (high << 2);
            }
            (f16(108) * (q3k_scale(&block[96..108], j) - 32) as f32, 0.0)
        }
        other => unreachable!("no int8 kernel for {other:?}"),
    }
}

/// Runs `f` on each packed block of the weight's `n` rows in turn: up to
/// [`COLUMN_BLOCK`] columns × [`DEPTH`] values of the contraction, columns
/// outermost, packed into one reused buffer.
pub(super) fn for_each_block<const G: usize>(rows: Rows, n: usize, f: impl FnMut(PackedBlock<u8>)) {
    for_each_packed_block(
        (n, rows.k / G),
        (COLUMN_BLOCK, DEPTH / G),
        |cols, groups, packed| pack::<G>(rows, cols, groups, packed),
        f,
    );
}

/// Packs groups `groups` (of `G` values) of the weight's rows `cols` into
/// `out`, one panel of [`NR`] columns after another (the last padded with
/// zero columns).
fn pack<const G: usize>(
    rows: Rows,
    cols: Range<usize>,
    groups: Range<usize>,
    out: &mut CacheAligned<u8>,
) {
    let (group_bytes, scales, mins) = (group_panel_bytes(G), scales_at(G), mins_at(G));
    let panel_bytes = groups.len() * group_bytes;
    let out = out.zeroed(cols.len().div_ceil(NR) * panel_bytes);
    let mut u = [0u8; G];
    let blocks = Blocks::of(rows.format);
    for (j, panel) in out.chunks_exact_mut(panel_bytes).enumerate() {
        for c in 0..NR.min(cols.len() - j * NR) {
            let row = cols.start + j * NR + c;
            let stored = &rows.bytes[row * rows.row_bytes..(row + 1) * rows.row_bytes];
            for (g, dst) in groups.clone().zip(panel.chunks_exact_mut(group_bytes)) {
                let (d, min) = unpack(blocks, stored, g, &mut u);
                for (run, four) in u.chunks_exact(4).enumerate() {
                    dst[run * 4 * NR + 4 * c..][..4].copy_from_slice(four);
                }
                dst[scales + 4 * c..][..4].copy_from_slice(&d.to_le_bytes());
                dst[mins + 4 * c..][..4].copy_from_slice(&min.to_le_bytes());
            }
        }
    }
}
