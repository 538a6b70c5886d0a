//! What the CPU kernels (`bf16_dot/`, `int8_dot/`) share: lane masks, the
//! write-back of an f32 micro-tile, buffers that start on a cache line, the
//! walk over a weight's packed blocks, and the split of a product's rows
//! over threads.

use rayon::prelude::*;
use std::arch::x86_64::__m512;
use std::ops::Range;

/// A mask of the lowest `n` of 16 lanes.
pub(crate) fn low_mask(n: usize) -> u16 {
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

pub(super) use super::aligned::CACHE_LINE;

/// Whether `values` starts on a cache line.
pub(super) fn on_a_line<T>(values: &[T]) -> bool {
    (values.as_ptr() as usize).is_multiple_of(CACHE_LINE)
}

/// A reusable buffer of zeros whose first value starts on a cache line, so
/// that a 64-byte load (an AVX-512 register, an AMX tile's row) at a
/// multiple of 64 bytes into it never straddles two lines: a straddling
/// load reads both lines. (The allocator aligns a `Vec` to 16 bytes only.)
pub(crate) struct CacheAligned<T> {
    storage: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> CacheAligned<T> {
    /// An empty buffer; nothing is allocated until [`Self::zeroed`].
    pub(crate) fn new() -> Self {
        Self {
            storage: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    /// `len` zeros (`T::default()`) starting on a cache line, reusing the
    /// buffer's memory where it is large enough.
    pub(crate) fn zeroed(&mut self, len: usize) -> &mut [T] {
        let values = self.reused(len);
        values.fill(T::default());
        values
    }

    /// `len` values starting on a cache line, reusing the buffer's memory
    /// and leaving in it whatever was there (zeros where it grew): for a
    /// caller that writes every value.
    pub(crate) fn reused(&mut self, len: usize) -> &mut [T] {
        let slack = CACHE_LINE / std::mem::size_of::<T>().max(1);
        if self.storage.len() < len + slack {
            self.storage.resize(len + slack, T::default());
        }
        // `T`'s alignment divides 64 for the integer and float types the
        // kernels use, so the offset is below `slack`; were it not, the
        // buffer would start unaligned, which is slower but correct.
        self.start = match self.storage.as_ptr().align_offset(CACHE_LINE) {
            offset if offset < slack => offset,
            _ => 0,
        };
        self.len = len;
        &mut self.storage[self.start..self.start + len]
    }

    /// The values [`Self::zeroed`] returned last, as the caller left them.
    pub(crate) fn values(&self) -> &[T] {
        &self.storage[self.start..self.start + self.len]
    }
}

/// A [`CacheAligned`] buffer of u32s taken from this thread's pool and
/// given back when dropped, so that a kernel called again and again (every
/// product of a training step) writes into memory it wrote before, still in
/// the cache, instead of a new allocation.
pub(crate) struct Pooled(Option<CacheAligned<u32>>);

thread_local! {
    /// This thread's buffers not in use, the last given back on top.
    static POOL: std::cell::RefCell<Vec<CacheAligned<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers a thread keeps: more are dropped when given back.
const POOLED: usize = 4;

impl Pooled {
    /// A buffer from this thread's pool (an empty one where none is free).
    pub(crate) fn take() -> Self {
        // (`try_with`: while the thread's locals are being torn down, a
        // new buffer.)
        let pooled = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        Self(Some(pooled.unwrap_or_else(CacheAligned::new)))
    }
}

/// Fills every buffer this thread's pool can hold with NaN pairs, `len`
/// of them each: a kernel that reads a value it did not write then gets NaN
/// where it expected a zero, which its tests see.
#[cfg(test)]
pub(crate) fn poison_pool(len: usize) {
    let buffers: Vec<Pooled> = (0..POOLED).map(|_| Pooled::take()).collect();
    for mut buffer in buffers {
        buffer.reused(len).fill(0x7fc0_7fc0);
    }
}

impl std::ops::Deref for Pooled {
    type Target = CacheAligned<u32>;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buffer) = self.0.take() {
            // Dropped, not pooled, while the thread's locals are torn down.
            let _ = POOL.try_with(|p| {
                let mut pool = p.borrow_mut();
                if pool.len() < POOLED {
                    pool.push(buffer);
                }
            });
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
/// reused buffer that starts on a cache line (counted as [`crate::profile::Stage::RepackWeight`]).
pub(super) fn for_each_packed_block<T: Copy + Default>(
    (cols, depth): (usize, usize),
    (col_block, depth_block): (usize, usize),
    mut pack: impl FnMut(Range<usize>, Range<usize>, &mut CacheAligned<T>),
    mut f: impl FnMut(PackedBlock<T>),
) {
    let mut packed = CacheAligned::new();
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
                panels: packed.values(),
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

/// One thread's columns of a product's output (`rows` rows of `stride`
/// f32 values): the products on tiles split their output by columns, so
/// that each thread reads only its share of the weight (and packs only
/// that), while every thread reads all of the other side's rows.
pub(super) struct OutColumns<'a> {
    out: *mut f32,
    rows: usize,
    stride: usize,
    cols: Range<usize>,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: an `OutColumns` writes only its own columns of the output it
// borrows mutably, and no two of them share a column (`OutColumns::split`).
unsafe impl Send for OutColumns<'_> {}

impl<'a> OutColumns<'a> {
    /// `out` (`rows` rows of `stride` values) as the column ranges
    /// `ranges`, which must be increasing, disjoint and inside a row.
    pub(super) fn split(
        out: &'a mut [f32],
        (rows, stride): (usize, usize),
        ranges: impl IntoIterator<Item = Range<usize>>,
    ) -> Vec<Self> {
        assert_eq!(out.len(), rows * stride, "a [{rows}, {stride}] output");
        let mut end = 0;
        ranges
            .into_iter()
            .map(|cols| {
                assert!(end <= cols.start && cols.start <= cols.end && cols.end <= stride);
                end = cols.end;
                Self {
                    out: out.as_mut_ptr(),
                    rows,
                    stride,
                    cols,
                    _out: std::marker::PhantomData,
                }
            })
            .collect()
    }

    /// The output's rows.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// This thread's columns.
    pub(super) fn cols(&self) -> Range<usize> {
        self.cols.clone()
    }

    /// Row `r`'s values at columns `cols`, which are this thread's.
    ///
    /// # Panics
    /// If `r` is past the last row or `cols` are not all this thread's.
    pub(super) fn row_mut(&mut self, r: usize, cols: Range<usize>) -> &mut [f32] {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert!(
            self.cols.start <= cols.start && cols.start <= cols.end && cols.end <= self.cols.end,
            "columns {cols:?} outside {:?}",
            self.cols
        );
        // SAFETY: the values are inside the borrowed output (row and
        // columns checked), in this value's own columns, which no other
        // `OutColumns` writes; `&mut self` lends them one slice at a time.
        unsafe {
            std::slice::from_raw_parts_mut(self.out.add(r * self.stride + cols.start), cols.len())
        }
    }
}

impl OutColumns<'_> {
    /// The address of row `rows.start`'s value at column `cols.start`, and
    /// the stride of the rows (in values): a tile store may write `rows` ×
    /// `cols` values through it, all of them this thread's own, while no
    /// slice of [`Self::row_mut`] is alive (`&mut self` is held for it).
    ///
    /// # Panics
    /// If `rows` are not inside the output or `cols` not this thread's.
    pub(super) fn region(&mut self, rows: Range<usize>, cols: Range<usize>) -> (*mut f32, usize) {
        assert!(
            rows.start < rows.end && rows.end <= self.rows,
            "rows {rows:?} of {}",
            self.rows
        );
        let first = self.row_mut(rows.start, cols).as_mut_ptr();
        (first, self.stride)
    }
}

/// Runs `serial` on column ranges of `out` (`rows` rows of `stride`
/// values), split over threads in runs of whole `align` columns when candle
/// runs multi-threaded (one range, all columns, otherwise).
pub(super) fn split_columns(
    out: &mut [f32],
    (rows, stride): (usize, usize),
    align: usize,
    serial: impl Fn(OutColumns) + Sync,
) {
    let threads = candle_core::utils::get_num_threads().max(1);
    let per_thread = stride.div_ceil(threads).next_multiple_of(align).max(1);
    let ranges = (0..stride)
        .step_by(per_thread)
        .map(|c| c..(c + per_thread).min(stride));
    let mut parts = OutColumns::split(out, (rows, stride), ranges);
    match parts.len() {
        1 => serial(parts.pop().expect("one part")),
        _ => parts.into_par_iter().for_each(&serial),
    }
}

/// A 16 × 16 transpose of u32s: lane `c` of result `i` is lane `i` of row
/// `c`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // a[2i], a[2i + 1]: rows 2i and 2i + 1 interleaved by u32 (within each
    // 128-bit lane L: elements 4L, 4L + 1, then 4L + 2, 4L + 3).
    let a: [__m512i; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        match i % 2 {
            0 => _mm512_unpacklo_epi32(x, y),
            _ => _mm512_unpackhi_epi32(x, y),
        }
    });
    // b[4g + o]: lane L holds rows 4g..4g + 4 of element 4L + o.
    let b: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, o) = (i / 4, i % 4);
        let (x, y) = (a[4 * g + o / 2], a[4 * g + 2 + o / 2]);
        match o % 2 {
            0 => _mm512_unpacklo_epi64(x, y),
            _ => _mm512_unpackhi_epi64(x, y),
        }
    });
    // c[8h + o]: groups 2h, 2h + 1 of elements o and 8 + o;
    // c[8h + 4 + o]: of elements 4 + o and 12 + o.
    let c: [__m512i; 16] = std::array::from_fn(|i| {
        let (h, upper, o) = (i / 8, (i / 4) % 2, i % 4);
        let (x, y) = (b[8 * h + o], b[8 * h + 4 + o]);
        match upper {
            0 => _mm512_shuffle_i32x4::<0x88>(x, y),
            _ => _mm512_shuffle_i32x4::<0xdd>(x, y),
        }
    });
    // d[i]: all four groups of element i.
    std::array::from_fn(|i| {
        let (high, s, o) = (i / 8, (i / 4) % 2, i % 4);
        let (x, y) = (c[4 * s + o], c[8 + 4 * s + o]);
        match high {
            0 => _mm512_shuffle_i32x4::<0x88>(x, y),
            _ => _mm512_shuffle_i32x4::<0xdd>(x, y),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer given back is the next one taken on the same thread, with
    /// its memory and its values; other threads have their own; and the
    /// pool keeps at most [`POOLED`] buffers.
    #[test]
    fn a_buffer_given_back_is_taken_again() {
        let mut first = Pooled::take();
        first.reused(100).fill(7);
        let at = first.values().as_ptr();
        drop(first);
        let mut again = Pooled::take();
        assert_eq!(again.reused(100).as_ptr(), at);
        assert!(again.values().iter().all(|&v| v == 7));
        std::thread::scope(|s| {
            s.spawn(|| assert!(Pooled::take().values().is_empty()));
        });
        drop(again);
        let many: Vec<Pooled> = (0..POOLED + 3).map(|_| Pooled::take()).collect();
        drop(many);
        assert_eq!(POOL.with(|p| p.borrow().len()), POOLED);
    }

    /// Every buffer starts on a cache line and holds zeros, whatever the
    /// element's size and length, and again when it is reused with values
    /// left in it.
    #[test]
    fn aligned_buffers_start_on_a_line_and_hold_zeros() {
        fn check<T: Copy + Default + PartialEq + std::fmt::Debug>(fill: T) {
            let mut buffer = CacheAligned::<T>::new();
            for len in [1, 3, 16, 17, 1000, 5, 70_000] {
                let values = buffer.zeroed(len);
                assert_eq!(values.len(), len);
                assert!(on_a_line(values), "{len} values");
                assert!(values.iter().all(|v| *v == T::default()), "{len} values");
                values.fill(fill);
                assert_eq!(buffer.values().len(), len);
                assert!(buffer.values().iter().all(|v| *v == fill));
            }
        }
        check(7u8);
        check(7u32);
        check(7i32);
        check(7f32);
    }

    /// Each column of an output is one part's, in parts of whole `align`
    /// columns (but the last), and a part writes only its own columns.
    #[test]
    fn column_parts_cover_every_column_once() {
        let (rows, stride) = (3, 70);
        let mut out = vec![0f32; rows * stride];
        split_columns(&mut out, (rows, stride), 32, |mut part| {
            let cols = part.cols();
            assert!(cols.start % 32 == 0 && (cols.end % 32 == 0 || cols.end == stride));
            for r in 0..rows {
                for (c, v) in cols.clone().zip(part.row_mut(r, cols.clone())) {
                    *v += (r * stride + c) as f32;
                }
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32));
        let mut parts = OutColumns::split(&mut out, (rows, stride), [0..32, 32..70]);
        let outside = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            parts[0].row_mut(0, 16..48).len()
        }));
        assert!(outside.is_err(), "columns of another part");
    }

    /// Parts that share a column are refused.
    #[test]
    #[should_panic]
    fn overlapping_column_parts_are_refused() {
        let mut out = vec![0f32; 10];
        OutColumns::split(&mut out, (1, 10), [0..6, 5..10]);
    }
}
