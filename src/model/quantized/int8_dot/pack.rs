//! Unpacking a block of the weight into micro-panels laid out as the
//! micro-kernel reads them. A panel holds [`NR`] columns (the weight's rows)
//! over a run of blocks; per block of 32 values:
//! - 8 groups of 4 values: for each, `NR` columns × 4 unsigned bytes, the
//!   two registers one `vpdpbusd` step reads (column `c`'s 4 values in lane
//!   `c`);
//! - the `NR` columns' scales `d`, f32;
//! - their offsets `min` (Q4_1, Q4_K; zero for the others), f32.
//!
//! Columns past the weight's edge are zeros (scale 0).

use super::super::blocks::Rows;
use super::{BLOCK, NR};
use candle_core::quantized::GgmlDType;
use std::ops::Range;

/// Bytes of the unsigned values of one block of a panel.
const VALUE_BYTES: usize = BLOCK * NR;
/// Bytes of one block of a panel: values, scales, offsets.
pub(super) const BLOCK_PANEL_BYTES: usize = VALUE_BYTES + 2 * 4 * NR;
/// Where a block's scales start in its panel bytes.
pub(super) const SCALES_AT: usize = VALUE_BYTES;
/// Where a block's offsets start in its panel bytes.
pub(super) const MINS_AT: usize = VALUE_BYTES + 4 * NR;

/// Block `b` (of 32 values) of a stored row: its unsigned values `u`, scale
/// `d` and offset `min`.
fn unpack(format: GgmlDType, row: &[u8], b: usize) -> ([u8; BLOCK], f32, f32) {
    let mut u = [0u8; BLOCK];
    if format == GgmlDType::Q4K {
        return unpack_q4k(row, b, &mut u);
    }
    let size = format.type_size();
    let block = &row[b * size..(b + 1) * size];
    let f16 = |at: usize| half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
    let nibbles = |qs: &[u8], u: &mut [u8; BLOCK]| {
        for (j, &b) in qs.iter().enumerate() {
            u[j] = b & 0x0f;
            u[j + BLOCK / 2] = b >> 4;
        }
    };
    match format {
        // d (f16), 32 i8 values, read as u = q + 128.
        GgmlDType::Q8_0 => {
            for (u, &q) in u.iter_mut().zip(&block[2..2 + BLOCK]) {
                *u = q ^ 0x80;
            }
            (u, f16(0), 0.0)
        }
        // d (f16), 16 bytes: value j in the low nibble of byte j, value
        // j + 16 in its high nibble.
        GgmlDType::Q4_0 => {
            nibbles(&block[2..2 + BLOCK / 2], &mut u);
            (u, f16(0), 0.0)
        }
        // d, min (f16), 16 bytes of nibbles as Q4_0's.
        GgmlDType::Q4_1 => {
            nibbles(&block[4..4 + BLOCK / 2], &mut u);
            (u, f16(0), f16(2))
        }
        other => unreachable!("no int8 kernel for {other:?}"),
    }
}

/// Block `b` of 32 values of a Q4_K row. A Q4_K block of 256 values holds
/// `d` and `dmin` (f16), 12 bytes of eight 6-bit scales and mins, and 128
/// bytes of nibbles: each 64 values' 32 bytes hold the first 32 in their low
/// nibbles, the next 32 in their high ones. Value `l` of sub-block `j` is
/// `d · scale_j · q_l − dmin · min_j`: for the kernel, `d · scale_j` and
/// `−dmin · min_j`.
fn unpack_q4k(row: &[u8], b: usize, u: &mut [u8; BLOCK]) -> ([u8; BLOCK], f32, f32) {
    const SIZE: usize = 144;
    let (block, j) = (&row[b / 8 * SIZE..(b / 8 + 1) * SIZE], b % 8);
    let f16 = |at: usize| half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
    let scales = &block[4..16];
    // llama.cpp's get_scale_min_k4.
    let (scale, min) = match j < 4 {
        true => (scales[j] & 63, scales[j + 4] & 63),
        false => (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        ),
    };
    let qs = &block[16 + 32 * (j / 2)..16 + 32 * (j / 2 + 1)];
    let shift = 4 * (j % 2);
    for (u, &q) in u.iter_mut().zip(qs) {
        *u = (q >> shift) & 0x0f;
    }
    (*u, f16(0) * scale as f32, -f16(2) * min as f32)
}

/// Packs blocks `blocks` of the weight's rows `cols` into `out`, one panel
/// of [`NR`] columns after another (the last padded with zero columns).
pub(super) fn pack(rows: Rows, cols: Range<usize>, blocks: Range<usize>, out: &mut Vec<u8>) {
    let panel_bytes = blocks.len() * BLOCK_PANEL_BYTES;
    out.clear();
    out.resize(cols.len().div_ceil(NR) * panel_bytes, 0);
    for (j, panel) in out.chunks_exact_mut(panel_bytes).enumerate() {
        for c in 0..NR.min(cols.len() - j * NR) {
            let row = cols.start + j * NR + c;
            let stored = &rows.bytes[row * rows.row_bytes..(row + 1) * rows.row_bytes];
            for (b, dst) in blocks
                .clone()
                .zip(panel.chunks_exact_mut(BLOCK_PANEL_BYTES))
            {
                let (u, d, min) = unpack(rows.format, stored, b);
                for (g, four) in u.chunks_exact(4).enumerate() {
                    dst[g * 4 * NR + 4 * c..][..4].copy_from_slice(four);
                }
                dst[SCALES_AT + 4 * c..][..4].copy_from_slice(&d.to_le_bytes());
                dst[MINS_AT + 4 * c..][..4].copy_from_slice(&min.to_le_bytes());
            }
        }
    }
}
