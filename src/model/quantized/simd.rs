//! What the CPU kernels (`bf16_dot/`, `int8_dot/`) share: lane masks, the
//! write-back of an f32 micro-tile, the walk over a weight's packed blocks,
//! and the split of a product's rows over threads.

use rayon::prelude::*;
use std::arch::x86_64::__m512;
use std::ops::Range;

/// A mask of the lowest `n` of 16 lanes.
pub(super) fn low_mask(n: usize) -> u16 {
    match n {
        0 => 0,
        n if n >= 16 => u16::MAX,
        n => (1u16 << n) - 1,
    }
}

/// Writes (or, with `accumulate`, adds) an `R × 32` f32 tile held in two
/// registers per row into `out`: row `i` at `i · out_stride`, its first
/// `width` (at most 32) values.
///
/// # Safety
/// The CPU has AVX-512 F, and `out` holds `(R − 1) · out_stride + width`
/// values.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn store_tile<const R: usize>(
    acc: &[[__m512; 2]; R],
    out: &mut [f32],
    out_stride: usize,
    width: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = (low_mask(width), low_mask(width.saturating_sub(16)));
    for (i, acc) in acc.iter().enumerate() {
        // SAFETY: the masks keep every access inside row `i`'s `width`
        // values, which the caller guarantees are in `out`.
        unsafe {
            let row = out.as_mut_ptr().add(i * out_stride);
            let (mut v0, mut v1) = (acc[0], acc[1]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
            }
            _mm512_mask_storeu_ps(row, m0, v0);
            _mm512_mask_storeu_ps(row.add(16), m1, v1);
        }
    }
}

/// A packed block of a product's weight: its first output column and its
/// columns, its first unit of the contraction (a pair of values for the
/// bf16 kernel, a group for the int8 one) and its units, and the packed
/// micro-panels.
pub(super) struct PackedBlock<'a, T> {
    pub(super) col: usize,
    pub(super) cols: usize,
    pub(super) first: usize,
    pub(super) depth: usize,
    pub(super) panels: &'a [T],
}

/// Runs `f` on each block of a weight of `cols` output columns and `depth`
/// units of the contraction, up to `col_block` × `depth_block` at a time,
/// columns outermost: each packed by `pack(columns, units, buffer)` into one
/// reused buffer (counted as [`crate::profile::Stage::RepackWeight`]).
pub(super) fn for_each_packed_block<T>(
    (cols, depth): (usize, usize),
    (col_block, depth_block): (usize, usize),
    mut pack: impl FnMut(Range<usize>, Range<usize>, &mut Vec<T>),
    mut f: impl FnMut(PackedBlock<T>),
) {
    let mut packed = Vec::new();
    for col in (0..cols).step_by(col_block) {
        let block_cols = col_block.min(cols - col);
        for first in (0..depth).step_by(depth_block) {
            let block_depth = depth_block.min(depth - first);
            crate::profile::time(crate::profile::Stage::RepackWeight, || {
                pack(
                    col..col + block_cols,
                    first..first + block_depth,
                    &mut packed,
                )
            });
            f(PackedBlock {
                col,
                cols: block_cols,
                first,
                depth: block_depth,
                panels: &packed,
            });
        }
    }
}

/// Runs `serial(x, rows, out)` on `m` rows of `x` (`q` values each) into
/// `out` (`p` values each), split over threads in runs of whole `tile_rows`
/// when candle runs multi-threaded, on the calling thread otherwise.
pub(super) fn split_rows(
    x: &[f32],
    m: usize,
    (q, p): (usize, usize),
    tile_rows: usize,
    out: &mut [f32],
    serial: impl Fn(&[f32], usize, &mut [f32]) + Sync,
) {
    let threads = candle_core::utils::get_num_threads();
    let rows_per_thread = m.div_ceil(threads).next_multiple_of(tile_rows);
    if threads > 1 && m > tile_rows {
        out.par_chunks_mut(rows_per_thread * p)
            .zip(x.par_chunks(rows_per_thread * q))
            .for_each(|(o, x)| serial(x, o.len() / p, o));
    } else {
        serial(x, m, out);
    }
}
