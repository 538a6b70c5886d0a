//! A frozen weight's CPU storage starting on a cache line.
//!
//! candle keeps a quantized tensor's CPU blocks in a `Vec<T>`, which the
//! system allocator aligns to 16 bytes: glibc puts a large allocation 16
//! bytes past a page's start. A row of an AMX tile (64 bytes) or an
//! AVX-512 load at a multiple of 64 bytes into such a weight then straddles
//! two cache lines, and reads both. Measured on a Xeon with AMX, the bf16
//! forward product ran at a quarter to two thirds of its speed on a weight
//! 16 bytes off a line. [`AlignedBlocks`] holds the same blocks in whole
//! cache lines, and implements candle's [`QuantizedType`] the way candle's
//! `Vec<T>` does, so that a `QTensor` over it is an ordinary one to candle.

use candle_core::quantized::{k_quants, GgmlDType, GgmlType, QuantizedType};
use candle_core::{CpuStorage, Result};
use half::f16;
use std::marker::PhantomData;

/// The bytes of a cache line, and of an AMX tile's row.
pub(super) const CACHE_LINE: usize = 64;

/// One cache line of storage.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; CACHE_LINE]);

/// `len` blocks of `T`, zeroed on creation, from the start of a cache line.
pub(super) struct AlignedBlocks<T> {
    lines: Vec<Line>,
    len: usize,
    blocks: PhantomData<T>,
}

impl<T: GgmlType> AlignedBlocks<T> {
    /// `len` blocks of zero bytes.
    pub(super) fn zeroed(len: usize) -> Self {
        const { assert!(std::mem::align_of::<T>() <= CACHE_LINE) };
        let bytes = len * std::mem::size_of::<T>();
        Self {
            lines: vec![Line([0; CACHE_LINE]); bytes.div_ceil(CACHE_LINE)],
            len,
            blocks: PhantomData,
        }
    }

    /// The blocks.
    pub(super) fn blocks(&self) -> &[T] {
        // SAFETY: the lines hold `len` blocks' bytes, aligned for `T` (at
        // most 64, checked in `zeroed`); GGML blocks and bf16 values are
        // plain data, valid for any bits.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    /// The blocks, to fill.
    pub(super) fn blocks_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `blocks`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }

    /// The blocks' bytes, to fill.
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        let bytes = self.len * std::mem::size_of::<T>();
        // SAFETY: the lines hold at least `bytes` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), bytes) }
    }
}

/// What candle's `impl QuantizedType for Vec<T>` does, on the aligned
/// blocks.
impl<T: GgmlType + Send + Sync> QuantizedType for AlignedBlocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul_t(&self, mkn: (usize, usize, usize), lhs: &[f32], dst: &mut [f32]) -> Result<()> {
        k_quants::matmul(mkn, lhs, self.blocks(), dst)
    }

    fn matmul_t_f16(&self, mkn: (usize, usize, usize), lhs: &[f16], dst: &mut [f16]) -> Result<()> {
        k_quants::matmul_f16(mkn, lhs, self.blocks(), dst)
    }

    fn embedding(&self, ids: &[u32], rows: usize, hidden: usize) -> Result<CpuStorage> {
        if !hidden.is_multiple_of(T::BLCK_SIZE) {
            candle_core::bail!(
                "a quantized embedding's hidden size {hidden} is not whole blocks of {}",
                T::BLCK_SIZE
            )
        }
        let row_blocks = hidden / T::BLCK_SIZE;
        if self.len != rows * row_blocks {
            candle_core::bail!("{} blocks for {rows} rows of {row_blocks} blocks", self.len)
        }
        let mut out = vec![0f32; ids.len() * hidden];
        for (id, o) in ids.iter().zip(out.chunks_exact_mut(hidden.max(1))) {
            let row = *id as usize;
            if row >= rows {
                candle_core::bail!("embedding id {row} is out of range for {rows} rows")
            }
            T::to_float(&self.blocks()[row * row_blocks..][..row_blocks], o);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> Result<CpuStorage> {
        let mut values = vec![0f32; elem_count];
        T::to_float(self.blocks(), &mut values);
        Ok(CpuStorage::F32(values))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    fn as_ptr(&self) -> *const u8 {
        self.lines.as_ptr().cast()
    }

    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }

    fn from_float(&mut self, xs: &[f32]) {
        T::from_float(xs, self.blocks_mut())
    }

    fn from_float_imatrix(&mut self, xs: &[f32], imatrix_weights: &[f32], n_per_row: usize) {
        T::from_float_imatrix(xs, self.blocks_mut(), imatrix_weights, n_per_row)
    }

    fn size(&self) -> usize {
        self.storage_size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::{Device, Tensor};

    /// The blocks start on a cache line, and a tensor over them quantizes,
    /// dequantizes, multiplies and looks rows up as candle's own storage
    /// does.
    #[test]
    fn aligned_blocks_behave_as_candles_own() {
        let (rows, cols) = (6, 64);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let candles = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let mut blocks = AlignedBlocks::<k_quants::BlockQ8_0>::zeroed(rows * cols / 32);
        assert!((blocks.as_ptr() as usize).is_multiple_of(CACHE_LINE));
        blocks.from_float(&values);
        let ours = QTensor::new(QStorage::Cpu(Box::new(blocks)), (rows, cols)).unwrap();
        assert_eq!(ours.data().unwrap(), candles.data().unwrap());
        let same = |a: &Tensor, b: &Tensor| {
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        };
        let device = Device::Cpu;
        same(
            &ours.dequantize(&device).unwrap(),
            &candles.dequantize(&device).unwrap(),
        );
        let x = Tensor::randn(0f32, 1.0, (3, cols), &device).unwrap();
        let product = |q: QTensor| {
            let m = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
            candle_core::Module::forward(&m, &x).unwrap()
        };
        same(&product(ours), &product(candles));
    }

    /// Row lookups take the rows asked for, and refuse an id past the rows.
    #[test]
    fn embedding_rows_are_the_dequantized_rows() {
        let (rows, cols) = (5, 32);
        let values: Vec<f32> = (0..rows * cols).map(|i| i as f32 / 7.0).collect();
        let mut blocks = AlignedBlocks::<half::bf16>::zeroed(rows * cols);
        blocks.from_float(&values);
        let CpuStorage::F32(looked) = blocks.embedding(&[4, 0], rows, cols).unwrap() else {
            panic!("f32 rows")
        };
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        assert_eq!(looked[0], round(values[4 * cols]));
        assert_eq!(looked[cols + 3], round(values[3]));
        assert!(blocks.embedding(&[5], rows, cols).is_err());
    }
}
