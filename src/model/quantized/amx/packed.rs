//! The product of two bf16 matrices that both change from call to call
//! (attention's scores and weighted values, and their gradients), each
//! packed once into the layout its side of `tdpbf16ps` reads.
//!
//! A tile operand is 16 lines of 16 u32s, each u32 two bf16 values (the
//! first in the low half). The left side's lines are the output's rows,
//! each holding its row's pairs of the contraction; the right side's lines
//! are the contraction's pairs, each holding the pair of every output
//! column. [`Packed`] holds either, zero past the values it was made from
//! and both sizes whole tiles, so that a product reads whole tiles and
//! needs no edge cases. Three ways to pack cover every product of two
//! row-major matrices: [`Packed::rows`] (a matrix contracted over its
//! columns, as the left side), [`Packed::row_pairs`] (contracted over its
//! rows, as the right side), and [`Packed::transposed`] of either (the
//! other side of the same contraction).

use super::super::simd::CacheAligned;
use super::{load, store, Tiles, TILE_PAIRS, TILE_ROWS};

/// A bf16 matrix laid out for one side of a tile product: `lines` lines of
/// `width` u32 pairs, both multiples of 16, zero past the packed values.
pub(crate) struct Packed {
    buffer: CacheAligned<u32>,
    lines: usize,
    width: usize,
}

impl Default for Packed {
    fn default() -> Self {
        Self::new()
    }
}

/// A row-major f32 matrix: `rows` rows of `cols` values, `stride` apart.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub(crate) values: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) stride: usize,
}

impl Rows<'_> {
    /// Row `i`'s values.
    fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.stride..][..self.cols]
    }
}

impl Packed {
    /// An empty matrix; memory comes with the first packing and is reused.
    pub(crate) fn new() -> Self {
        Self {
            buffer: CacheAligned::new(),
            lines: 0,
            width: 0,
        }
    }

    /// Lines of u32 pairs.
    pub(crate) fn lines(&self) -> usize {
        self.lines
    }

    /// u32 pairs per line.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// The packed pairs, line after line.
    pub(crate) fn values(&self) -> &[u32] {
        self.buffer.values()
    }

    /// Room for `lines` lines of `width` pairs (rounded up to whole
    /// tiles), holding whatever it held: the packing writes every value.
    fn reset(&mut self, lines: usize, width: usize) -> &mut [u32] {
        self.lines = lines.next_multiple_of(TILE_ROWS);
        self.width = width.next_multiple_of(TILE_PAIRS);
        self.buffer.reused(self.lines * self.width)
    }

    /// `x`'s rows rounded to bf16, each a line of pairs of its values,
    /// after `lead` zeros (0 or 1: a product whose contraction starts one
    /// value before `x`'s first column), over at least `lines` lines: the
    /// left side of a product over `x`'s columns.
    pub(crate) fn rows(&mut self, x: Rows, lead: usize, lines: usize) {
        assert!(lead <= 1 && lines >= x.rows);
        let pairs = (lead + x.cols).div_ceil(2);
        let width = pairs.next_multiple_of(TILE_PAIRS);
        let out = self.reset(lines, width);
        out[x.rows * width..].fill(0);
        let mut shifted = Vec::new();
        for i in 0..x.rows {
            let row = match lead {
                0 => x.row(i),
                _ => {
                    shifted.clear();
                    shifted.push(0.0);
                    shifted.extend_from_slice(x.row(i));
                    &shifted[..]
                }
            };
            let line = &mut out[i * width..][..width];
            super::super::bf16_dot::round_pairs(row, &mut line[..pairs]);
            line[pairs..].fill(0);
        }
    }

    /// Pairs of `x`'s rows rounded to bf16, line `j` holding rows `2j` and
    /// `2j + 1` interleaved value by value, over at least `lines` lines: the
    /// right side of a product over `x`'s rows.
    pub(crate) fn row_pairs(&mut self, x: Rows, lines: usize) {
        assert!(2 * lines >= x.rows);
        let width = x.cols.next_multiple_of(TILE_PAIRS);
        let out = self.reset(lines, width);
        let pairs = x.rows.div_ceil(2);
        out[pairs * width..].fill(0);
        for j in 0..pairs {
            let second = (2 * j + 1 < x.rows).then(|| x.row(2 * j + 1));
            let line = &mut out[j * width..][..width];
            interleave(x.row(2 * j), second, &mut line[..x.cols]);
            line[x.cols..].fill(0);
        }
    }

    /// `from`'s transpose as u32s: line `i` holds pair `i` of each of
    /// `from`'s lines. The left side of a product over `x`'s columns so
    /// becomes the right side of one over them, and the right side of one
    /// over `x`'s rows the left side of one over its rows.
    pub(crate) fn transposed(&mut self, from: &Packed) {
        let (lines, width) = (from.width, from.lines);
        let out = self.reset(lines, width);
        transpose_blocks(
            from.values(),
            from.width,
            out,
            width,
            (from.lines, from.width),
        );
    }
}

/// One side of a product: a packed matrix from line `line`, u32 `at` of
/// each line on.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub(crate) packed: &'a Packed,
    pub(crate) line: usize,
    pub(crate) at: usize,
}

impl<'a> Operand<'a> {
    /// `packed` from line `line`, u32 `at` of each line on.
    pub(crate) fn from(packed: &'a Packed, line: usize, at: usize) -> Self {
        Self { packed, line, at }
    }
}

/// `out = left · right` (or `+=` with `accumulate`): `rows × cols` outputs
/// (rows `out_stride` values apart), summed over `pairs` pairs of the
/// contraction, all three multiples of 16. `left`'s lines are the
/// output's rows, from u32 `left.at`; `right`'s lines are the
/// contraction's pairs, from column `right.at`.
///
/// # Panics
/// If a size is not whole tiles or a tile reaches past its matrix.
pub(crate) fn product(
    tiles: &mut impl Tiles,
    left: Operand,
    right: Operand,
    (rows, cols, pairs): (usize, usize, usize),
    out: &mut [f32],
    out_stride: usize,
    accumulate: bool,
) {
    for size in [rows, cols, pairs] {
        assert!(size.is_multiple_of(TILE_ROWS), "{size} is not whole tiles");
    }
    assert!(left.line + rows <= left.packed.lines && left.at + pairs <= left.packed.width);
    assert!(right.line + pairs <= right.packed.lines && right.at + cols <= right.packed.width);
    for r in (0..rows).step_by(2 * TILE_ROWS) {
        let two_rows = r + 2 * TILE_ROWS <= rows;
        for c in (0..cols).step_by(2 * TILE_ROWS) {
            let block = Block {
                left: Operand {
                    line: left.line + r,
                    ..left
                },
                right: Operand {
                    at: right.at + c,
                    ..right
                },
                steps: pairs / TILE_PAIRS,
                out: r * out_stride + c,
                out_stride,
                accumulate,
            };
            match (two_rows, c + 2 * TILE_ROWS <= cols) {
                (true, true) => block.run::<_, true, true>(tiles, out),
                (true, false) => block.run::<_, true, false>(tiles, out),
                (false, true) => block.run::<_, false, true>(tiles, out),
                (false, false) => block.run::<_, false, false>(tiles, out),
            }
        }
    }
}

/// Up to 2 × 2 output tiles, kept in tiles 0-3 over the whole contraction:
/// the left side's row tiles in 4-5, the right side's column tiles in 6-7.
struct Block<'a> {
    left: Operand<'a>,
    right: Operand<'a>,
    steps: usize,
    /// The first output's index in `out`.
    out: usize,
    out_stride: usize,
    accumulate: bool,
}

impl Block<'_> {
    #[inline(always)]
    fn run<U: Tiles, const TWO_ROWS: bool, const TWO_COLS: bool>(
        &self,
        t: &mut U,
        out: &mut [f32],
    ) {
        let (o, os) = (self.out, self.out_stride);
        let below = o + TILE_ROWS * os;
        match self.accumulate {
            true => {
                load::<_, 0, _>(t, out, o, os);
                if TWO_COLS {
                    load::<_, 1, _>(t, out, o + TILE_ROWS, os);
                }
                if TWO_ROWS {
                    load::<_, 2, _>(t, out, below, os);
                }
                if TWO_ROWS && TWO_COLS {
                    load::<_, 3, _>(t, out, below + TILE_ROWS, os);
                }
            }
            false => {
                t.zero::<0>();
                t.zero::<1>();
                t.zero::<2>();
                t.zero::<3>();
            }
        }
        let (l, r) = (self.left.packed, self.right.packed);
        let (lw, rw) = (l.width, r.width);
        let (lv, rv) = (l.values(), r.values());
        for s in 0..self.steps {
            let a = self.left.line * lw + self.left.at + s * TILE_PAIRS;
            let b = (self.right.line + s * TILE_PAIRS) * rw + self.right.at;
            load::<_, 4, _>(t, lv, a, lw);
            load::<_, 6, _>(t, rv, b, rw);
            t.dot_bf16::<0, 4, 6>();
            if TWO_COLS {
                load::<_, 7, _>(t, rv, b + TILE_ROWS, rw);
                t.dot_bf16::<1, 4, 7>();
            }
            if TWO_ROWS {
                load::<_, 5, _>(t, lv, a + TILE_ROWS * lw, lw);
                t.dot_bf16::<2, 5, 6>();
            }
            if TWO_ROWS && TWO_COLS {
                t.dot_bf16::<3, 5, 7>();
            }
        }
        store::<_, 0, _>(t, out, o, os);
        if TWO_COLS {
            store::<_, 1, _>(t, out, o + TILE_ROWS, os);
        }
        if TWO_ROWS {
            store::<_, 2, _>(t, out, below, os);
        }
        if TWO_ROWS && TWO_COLS {
            store::<_, 3, _>(t, out, below + TILE_ROWS, os);
        }
    }
}

/// Rows `first` and `second` (or zeros) rounded to bf16 and interleaved:
/// `out[c]` holds `first[c]` in its low half and `second[c]` in its high.
fn interleave(first: &[f32], second: Option<&[f32]>, out: &mut [u32]) {
    if super::super::bf16_dot::vector_rounding() {
        // SAFETY: the CPU has AVX-512 F and AVX512_BF16 (checked just above).
        return unsafe { interleave_avx512(first, second, out) };
    }
    let bits = super::super::bf16_dot::bf16_bits;
    for (c, o) in out.iter_mut().enumerate() {
        *o = bits(first[c]) | second.map_or(0, |s| bits(s[c]) << 16);
    }
}

/// [`interleave`], 16 values of each row at a time.
#[target_feature(enable = "avx512f,avx512bf16")]
fn interleave_avx512(first: &[f32], second: Option<&[f32]>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    assert!(first.len() >= n && second.is_none_or(|s| s.len() >= n));
    for c in (0..n).step_by(16) {
        let mask = super::super::simd::low_mask(n - c);
        // SAFETY: the mask keeps every access inside the first `n` values
        // of each slice (checked above).
        unsafe {
            let widen = |row: &[f32]| {
                let v = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(c));
                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                    _mm512_cvtneps_pbh(v),
                ))
            };
            let mut pairs = widen(first);
            if let Some(second) = second {
                pairs = _mm512_or_si512(pairs, _mm512_slli_epi32::<16>(widen(second)));
            }
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(c).cast(), mask, pairs);
        }
    }
}

/// The transpose of `from`'s first `rows` lines' first `cols` values (lines
/// `from_width` f32s long) into `to` (`cols` lines of `to_width`): both
/// sizes whole 16 × 16 blocks.
pub(crate) fn transpose_f32(
    from: &[f32],
    from_width: usize,
    to: &mut [f32],
    to_width: usize,
    (rows, cols): (usize, usize),
) {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit
    // pattern is a valid value of both.
    let (from, to) = unsafe {
        (
            std::slice::from_raw_parts(from.as_ptr().cast::<u32>(), from.len()),
            std::slice::from_raw_parts_mut(to.as_mut_ptr().cast::<u32>(), to.len()),
        )
    };
    transpose_blocks(from, from_width, to, to_width, (rows, cols));
}

/// The transpose of `from`'s first `rows` lines' first `cols` u32s (lines
/// `from_width` long) into `to`'s first `cols` lines (`to_width` long):
/// both sizes whole 16 × 16 blocks.
fn transpose_blocks(
    from: &[u32],
    from_width: usize,
    to: &mut [u32],
    to_width: usize,
    (rows, cols): (usize, usize),
) {
    assert!(rows.is_multiple_of(16) && cols.is_multiple_of(16));
    assert!(cols <= from_width && rows <= to_width);
    let vector = is_x86_feature_detected!("avx512f");
    for i in (0..rows).step_by(16) {
        for j in (0..cols).step_by(16) {
            // Block (i, j) of `from` (lines i.., u32s j..) to block (j, i).
            match vector {
                // SAFETY: the CPU has AVX-512 F (checked above).
                true => unsafe { transpose_block_avx512(from, from_width, to, to_width, i, j) },
                false => {
                    for a in 0..16 {
                        for b in 0..16 {
                            to[(j + b) * to_width + i + a] = from[(i + a) * from_width + j + b];
                        }
                    }
                }
            }
        }
    }
}

/// One 16 × 16 block of [`transpose_blocks`] in registers.
#[target_feature(enable = "avx512f")]
fn transpose_block_avx512(
    from: &[u32],
    from_width: usize,
    to: &mut [u32],
    to_width: usize,
    i: usize,
    j: usize,
) {
    use std::arch::x86_64::*;
    let lines: [__m512i; 16] = std::array::from_fn(|a| {
        let line = &from[(i + a) * from_width + j..][..16];
        // SAFETY: `line` holds 16 u32s.
        unsafe { _mm512_loadu_si512(line.as_ptr().cast()) }
    });
    for (b, column) in super::super::simd::transpose16(lines).iter().enumerate() {
        let line = &mut to[(j + b) * to_width + i..][..16];
        // SAFETY: `line` holds 16 u32s.
        unsafe { _mm512_storeu_si512(line.as_mut_ptr().cast(), *column) };
    }
}

#[cfg(test)]
mod tests;
