//! Repacking a block of the bf16 weight into the micro-kernel's layout:
//! micro-panels of [`NR`] columns, each step one u32 pair of bf16 values per
//! column (the first of the pair in the low half), so that a step is two
//! 16-lane registers. The forward's block is a transpose of the weight's rows
//! (16 × 16 u32s at a time in registers), the input gradient's an
//! interleave of two rows; a value-by-value packer is the reference.

use super::super::simd::{for_each_packed_block, transpose16, CacheAligned, PackedBlock};
use super::{low_mask, Bf16Weight, COLUMN_BLOCK, NR, PAIR_BLOCK};

/// Packs the block of `B` (`[q, p]`: `Wᵀ` forward, `W` for the input
/// gradient) at columns `cols` and pairs of rows `pairs` into `packed`:
/// micro-panels of [`NR`] columns, each `depth` steps of `NR` u32 pairs
/// (`B[2t, c]` low, `B[2t + 1, c]` high), followed by zero steps up to the
/// next multiple of `whole_steps` (the AMX kernel's tiles take 16 steps at a
/// time); zeros past the edges.
pub(super) fn pack(
    w: Bf16Weight,
    input_gradient: bool,
    cols: std::ops::Range<usize>,
    pairs: std::ops::Range<usize>,
    whole_steps: usize,
    packed: &mut CacheAligned<u32>,
) {
    let depth = pairs.len();
    let padded = depth.next_multiple_of(whole_steps);
    let panels = cols.len().div_ceil(NR);
    let vector = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    let packed = packed.reused(panels * padded * NR);
    for (j, panel) in packed.chunks_exact_mut(padded * NR).enumerate() {
        let (panel, padding) = panel.split_at_mut(depth * NR);
        padding.fill(0);
        let first = cols.start + j * NR;
        let width = NR.min(cols.end - first);
        // The packers write a step's first `width` columns only.
        if width < NR {
            panel.fill(0);
        }
        match (input_gradient, w.k.is_multiple_of(2) && vector, vector) {
            // SAFETY: the CPU has AVX-512 F and BW (checked above); the
            // panel and the weight's bounds are checked inside.
            (false, true, _) => unsafe {
                pack_rows_as_columns(w, first, width, pairs.start, panel)
            },
            (true, _, true) => unsafe {
                pack_interleaved_rows(w, first, width, pairs.start, panel)
            },
            _ => pack_portable(w, input_gradient, first, width, pairs.start, panel),
        }
    }
}

/// Runs `f` on each packed block of the product's weight in turn: up to
/// [`COLUMN_BLOCK`] output columns × [`PAIR_BLOCK`] pairs of the
/// contraction, columns outermost, packed with steps padded to
/// `whole_steps` into one reused buffer.
pub(super) fn for_each_block(
    w: Bf16Weight,
    input_gradient: bool,
    whole_steps: usize,
    f: impl FnMut(PackedBlock<u32>),
) {
    let (q, p) = w.sides(input_gradient);
    for_each_packed_block(
        (p, q.div_ceil(2)),
        (COLUMN_BLOCK, PAIR_BLOCK),
        |cols, pairs, packed| pack(w, input_gradient, cols, pairs, whole_steps, packed),
        f,
    );
}

/// One micro-panel of [`pack`], value by value: the reference the vector
/// packers are tested against, the forward's packer for an odd `k`
/// (where a row's last pair is its last value and a zero), and the packer
/// of CPUs without AVX-512 (where only the tests run the AMX kernel, on its
/// emulator).
fn pack_portable(
    w: Bf16Weight,
    input_gradient: bool,
    first: usize,
    width: usize,
    first_pair: usize,
    panel: &mut [u32],
) {
    for (t, step) in panel.chunks_exact_mut(NR).enumerate() {
        let at = 2 * (first_pair + t);
        for (c, s) in step[..width].iter_mut().enumerate() {
            *s = match input_gradient {
                // B[q, p] = W[p, q]: a column of B is a row of W.
                false => w.value(first + c, at) | w.value(first + c, at + 1) << 16,
                // B[q, p] = W[q, p]: a step interleaves two rows of W.
                true => w.value(at, first + c) | w.value(at + 1, first + c) << 16,
            };
        }
    }
}

/// The forward's micro-panel for an even `k`: the pairs of `width` rows of
/// `W` (each row's pairs are contiguous u32s) transposed, 16 rows × 16 pairs
/// at a time in registers.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_as_columns(
    w: Bf16Weight,
    first: usize,
    width: usize,
    first_pair: usize,
    panel: &mut [u32],
) {
    use std::arch::x86_64::*;
    let depth = panel.len() / NR;
    assert!(w.k.is_multiple_of(2) && first + width <= w.n && 2 * (first_pair + depth) <= w.k);
    for half in (0..width).step_by(16) {
        for t0 in (0..depth).step_by(16) {
            let steps = 16.min(depth - t0);
            let rows: [__m512i; 16] = std::array::from_fn(|i| match half + i < width {
                // SAFETY: `steps` pairs from pair `first_pair + t0` are inside
                // row `first + half + i` (asserted above).
                true => unsafe {
                    let row = w.values.as_ptr().add((first + half + i) * w.k);
                    let at = row.add(2 * (first_pair + t0)).cast::<i32>();
                    _mm512_maskz_loadu_epi32(low_mask(steps), at)
                },
                false => _mm512_setzero_si512(),
            });
            let columns = transpose16(rows);
            for (t, column) in columns.iter().take(steps).enumerate() {
                let to = &mut panel[(t0 + t) * NR + half..][..16];
                // SAFETY: `to` holds 16 u32s.
                unsafe { _mm512_storeu_si512(to.as_mut_ptr().cast(), *column) };
            }
        }
    }
}

/// The input gradient's micro-panel: each step interleaves `width` values
/// of two rows of `W` (zeros past the last row).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_interleaved_rows(
    w: Bf16Weight,
    first: usize,
    width: usize,
    first_pair: usize,
    panel: &mut [u32],
) {
    use std::arch::x86_64::*;
    assert!(width <= NR && first + width <= w.k);
    let mask = match width {
        32 => u32::MAX,
        n => (1u32 << n) - 1,
    };
    // Halves 0 and 1 of the step: value c of the first row, then of the
    // second, for c in 0..16 and in 16..32.
    let order = |half: i16| -> __m512i {
        let idx: [i16; 32] =
            std::array::from_fn(|i| 16 * half + i as i16 / 2 + 32 * (i as i16 % 2));
        // SAFETY: 32 i16s are one register.
        unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
    };
    let (low_half, high_half) = (order(0), order(1));
    for (t, step) in panel.chunks_exact_mut(NR).enumerate() {
        let r = 2 * (first_pair + t);
        let row = |r: usize| match r < w.n {
            // SAFETY: the mask reads `width` values of row `r`, inside it.
            true => unsafe {
                _mm512_maskz_loadu_epi16(mask, w.values.as_ptr().add(r * w.k + first).cast())
            },
            false => _mm512_setzero_si512(),
        };
        let (lo, hi) = (row(r), row(r + 1));
        // SAFETY: a step holds 32 u32s.
        unsafe {
            let to = step.as_mut_ptr().cast::<__m512i>();
            _mm512_storeu_si512(to, _mm512_permutex2var_epi16(lo, low_half, hi));
            _mm512_storeu_si512(to.add(1), _mm512_permutex2var_epi16(lo, high_half, hi));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{random_bf16, runs_here};
    use super::*;
    use crate::rng::Rng;

    /// The vector packers lay out exactly what the portable one does, on
    /// partial panels and depths that are not multiples of 16.
    #[test]
    fn vector_packing_equals_the_portable_packing() {
        if !runs_here() {
            return;
        }
        let mut rng = Rng::new(5);
        for (n, k) in [(70, 90), (33, 2), (5, 600), (64, 64)] {
            let values = random_bf16(n * k, &mut rng);
            let w = Bf16Weight {
                values: &values,
                n,
                k,
            };
            for input_gradient in [false, true] {
                let (q, p) = w.sides(input_gradient);
                let pairs = q.div_ceil(2);
                for (first, first_pair) in [(0, 0), (p.saturating_sub(7), pairs / 3)] {
                    let width = NR.min(p - first);
                    let depth = pairs - first_pair;
                    let mut want = vec![0u32; depth * NR];
                    pack_portable(w, input_gradient, first, width, first_pair, &mut want);
                    let mut got = vec![0u32; depth * NR];
                    // SAFETY: checked above that the CPU has the features.
                    unsafe {
                        match input_gradient {
                            false => pack_rows_as_columns(w, first, width, first_pair, &mut got),
                            true => pack_interleaved_rows(w, first, width, first_pair, &mut got),
                        }
                    }
                    assert_eq!(got, want, "{n}x{k}, input gradient {input_gradient}, from column {first}, pair {first_pair}");
                }
            }
        }
    }
}
