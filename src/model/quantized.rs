//! Frozen weights kept quantized, as QLoRA keeps them: a linear's `[out, in]`
//! weight in a GGML block format (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and the
//! other GGUF formats candle reads), never held as f32.
//!
//! A product dequantizes the blocks to f32 as it goes and runs the f32
//! arithmetic, so its result is the dequantized weight's f32 product: the
//! forward `x Wᵀ` and the input gradient `dy W` read the same blocks, and the
//! weight gets no gradient.
//! - A few rows of `x` (decoding): the [`super::gemv`] kernel, each task
//!   dequantizing its block of weight rows into a scratch buffer and reading
//!   it against every row of `x`, bit for bit the dense kernel's arithmetic.
//! - Many rows (training, prefill) and the input gradient: the weight is
//!   dequantized in parallel into a transient f32 copy that lives for the one
//!   product (one linear's f32 at a time, never the model's), and the f32
//!   matmul runs on it. Dequantizing costs one pass over the weight, against
//!   `2·rows` flops per weight element for the product.
//! - On a GPU, candle dequantizes a layer's weight on the device the same way.

use super::gemv::{self, WeightRows};
use candle_core::quantized::{k_quants, GgmlDType, GgmlType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

/// A frozen `[out, in]` weight in a GGML block format; products run in `dtype`.
#[derive(Clone)]
pub struct QuantizedWeight {
    blocks: Arc<QTensor>,
    dtype: DType,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedWeight({:?}, {:?})", self.format(), self.dims())
    }
}

/// Dequantizes whole blocks of one format: `bytes` holds a row range's blocks.
type Decode = fn(&[u8], &mut [f32]);

fn decode<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let n = bytes.len() / std::mem::size_of::<T>();
    // SAFETY: `bytes` is a whole number of `T` blocks cut at block boundaries
    // from candle's CPU storage of `T`s, whose alignment `QuantizedWeight::new`
    // checked; GGML blocks are plain data, valid for any bits.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) };
    T::to_float(blocks, out)
}

/// The block decoder and the block's alignment for `format`.
fn decoder(format: GgmlDType) -> Option<(Decode, usize)> {
    fn of<T: GgmlType>() -> (Decode, usize) {
        (decode::<T>, std::mem::align_of::<T>())
    }
    Some(match format {
        GgmlDType::Q4_0 => of::<k_quants::BlockQ4_0>(),
        GgmlDType::Q4_1 => of::<k_quants::BlockQ4_1>(),
        GgmlDType::Q5_0 => of::<k_quants::BlockQ5_0>(),
        GgmlDType::Q5_1 => of::<k_quants::BlockQ5_1>(),
        GgmlDType::Q8_0 => of::<k_quants::BlockQ8_0>(),
        GgmlDType::Q2K => of::<k_quants::BlockQ2K>(),
        GgmlDType::Q3K => of::<k_quants::BlockQ3K>(),
        GgmlDType::Q4K => of::<k_quants::BlockQ4K>(),
        GgmlDType::Q5K => of::<k_quants::BlockQ5K>(),
        GgmlDType::Q6K => of::<k_quants::BlockQ6K>(),
        _ => return None,
    })
}

/// Whether `format` is a block format (not f32, f16 or bf16).
pub fn is_block_format(format: GgmlDType) -> bool {
    !matches!(format, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The CPU blocks of a weight, read a row range at a time.
struct Rows<'a> {
    bytes: &'a [u8],
    row_bytes: usize,
    k: usize,
    decode: Decode,
}

impl Rows<'_> {
    fn decode_into(&self, range: Range<usize>, out: &mut [f32]) {
        let bytes = &self.bytes[range.start * self.row_bytes..range.end * self.row_bytes];
        (self.decode)(bytes, out)
    }
}

impl WeightRows for Rows<'_> {
    fn rows<'a>(&'a self, range: Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.resize(range.len() * self.k, 0.0);
        self.decode_into(range, scratch);
        scratch
    }
}

/// Weight rows dequantized per parallel task.
const DEQUANTIZE_TASK_VALUES: usize = 1 << 16;

impl QuantizedWeight {
    /// A weight from a 2-D quantized tensor (`[out, in]`); products run in
    /// `dtype`.
    pub fn new(blocks: QTensor, dtype: DType) -> Result<Self> {
        let (_, k) = blocks.shape().dims2()?;
        let format = blocks.dtype();
        if !is_block_format(format) {
            candle_core::bail!("a {format:?} tensor is not quantized");
        }
        if k % format.block_size() != 0 {
            candle_core::bail!(
                "rows of {k} values are not whole {format:?} blocks of {}",
                format.block_size()
            );
        }
        if let (true, Some((_, align))) = (blocks.device().is_cpu(), decoder(format)) {
            if blocks.data()?.as_ptr() as usize % align != 0 {
                candle_core::bail!("the {format:?} blocks are not aligned in memory");
            }
        }
        Ok(Self {
            blocks: Arc::new(blocks),
            dtype,
        })
    }

    /// Quantizes `w` (`[out, in]`, any float dtype) into `format`, on its
    /// device; products run in `w`'s dtype. Each row must be whole blocks.
    pub fn quantize(w: &Tensor, format: GgmlDType) -> Result<Self> {
        let (_, k) = w.dims2()?;
        if k % format.block_size() != 0 {
            candle_core::bail!(
                "rows of {k} values are not whole {format:?} blocks of {}",
                format.block_size()
            );
        }
        let f32 = w.to_dtype(DType::F32)?;
        let blocks = QTensor::quantize_onto(&f32, format, w.device())?;
        Self::new(blocks, w.dtype())
    }

    /// The block format.
    pub fn format(&self) -> GgmlDType {
        self.blocks.dtype()
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        self.blocks.shape().dims2().unwrap_or((0, 0))
    }

    /// The dtype products run in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the blocks are.
    pub fn device(&self) -> Device {
        self.blocks.device()
    }

    /// The same blocks on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        if device.same_device(&self.device()) {
            return Ok(self.clone());
        }
        let storage = QStorage::from_data(self.blocks.data()?, device, self.format())?;
        let blocks = QTensor::new(storage, self.blocks.shape().clone())?;
        Self::new(blocks, self.dtype)
    }

    /// The blocks' size in bytes.
    pub fn storage_bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    /// The CPU blocks, for a format with a decoder.
    fn cpu_rows(&self) -> Result<Option<Rows<'_>>> {
        let format = self.format();
        let (Some((decode, _)), true) = (decoder(format), self.device().is_cpu()) else {
            return Ok(None);
        };
        let bytes = match self.blocks.data()? {
            Cow::Borrowed(b) => b,
            Cow::Owned(_) => return Ok(None),
        };
        let k = self.dims().1;
        Ok(Some(Rows {
            bytes,
            row_bytes: k / format.block_size() * format.type_size(),
            k,
            decode,
        }))
    }

    /// The weight dequantized, `[out, in]` in the products' dtype.
    pub fn dequantize(&self) -> Result<Tensor> {
        let (n, k) = self.dims();
        let w = match self.cpu_rows()? {
            Some(rows) => {
                let mut out = vec![0f32; n * k];
                let per_task = (DEQUANTIZE_TASK_VALUES / k.max(1)).max(1);
                crate::threads::pool().install(|| {
                    out.par_chunks_mut(per_task * k)
                        .enumerate()
                        .for_each(|(t, o)| {
                            let first = t * per_task;
                            rows.decode_into(first..first + o.len() / k, o)
                        })
                });
                Tensor::from_vec(out, (n, k), &Device::Cpu)?
            }
            None => self.blocks.dequantize(&self.device())?,
        };
        w.to_dtype(self.dtype)
    }

    /// `x Wᵀ` for `x`: `[rows, in]`.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if gemv::takes(x) {
            if let Some(rows) = self.cpu_rows()? {
                let x = x.contiguous()?;
                let (m, k) = x.dims2()?;
                let n = self.dims().0;
                let data = x.flatten_all()?.to_vec1::<f32>()?;
                let out = gemv::products(&data, m, k, n, &rows);
                return Tensor::from_vec(out, (m, n), x.device());
            }
        }
        x.matmul(&self.dequantize()?.t()?)
    }

    /// `dy W` for `dy`: `[rows, out]` (the input gradient of [`Self::matmul_t`]).
    pub fn matmul(&self, dy: &Tensor) -> Result<Tensor> {
        dy.matmul(&self.dequantize()?)
    }

    /// The weight with its rows reordered: row `r` of the result is row
    /// `order[r]` of this one. Blocks run along rows, so no value changes.
    pub fn select_rows(&self, order: &[usize]) -> Result<Self> {
        let (n, k) = self.dims();
        let format = self.format();
        let row_bytes = k / format.block_size() * format.type_size();
        let data = self.blocks.data()?;
        let mut bytes = Vec::with_capacity(data.len());
        for &r in order {
            if r >= n {
                candle_core::bail!("row {r} of a weight of {n} rows");
            }
            bytes.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &self.device(), format)?;
        Self::new(QTensor::new(storage, (order.len(), k))?, self.dtype)
    }

    /// `W + delta` requantized into this weight's format (a merged adapter):
    /// the sum is rounded to the format again.
    pub fn add_requantized(&self, delta: &Tensor) -> Result<Self> {
        let sum = (self.dequantize()?.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
        let mut merged = Self::quantize(&sum, self.format())?;
        merged.dtype = self.dtype;
        Ok(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, randn};

    const FORMATS: [GgmlDType; 6] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// The products of a quantized weight are those of its dequantized f32
    /// copy, forward (few rows and many) and input gradient, on odd shapes.
    #[test]
    fn products_equal_the_dequantized_weights() {
        for format in FORMATS {
            let k = 2 * format.block_size();
            for (n, m) in [(3, 1), (37, 5), (70, 65), (17, 130)] {
                let w = QuantizedWeight::quantize(&randn(&[n, k], 1), format).unwrap();
                let dense = w.dequantize().unwrap();
                let x = randn(&[m, k], 2);
                let want = x.matmul(&dense.t().unwrap()).unwrap();
                let diff = max_abs_diff(&w.matmul_t(&x).unwrap(), &want);
                assert!(diff < 1e-4, "{format:?} {n}x{k}, {m} rows: {diff}");
                let dy = randn(&[m, n], 3);
                let want = dy.matmul(&dense).unwrap();
                let diff = max_abs_diff(&w.matmul(&dy).unwrap(), &want);
                assert!(diff < 1e-4, "{format:?} {n}x{k}, {m} rows: dx {diff}");
            }
        }
    }

    /// Dequantizing in parallel gives candle's values, and they are within
    /// the format's rounding of the weight quantized.
    #[test]
    fn dequantized_values_are_candles_within_the_formats_rounding() {
        // The largest error relative to the row's largest magnitude.
        let rounding = |f: GgmlDType| match f {
            GgmlDType::Q8_0 => 0.01,
            GgmlDType::Q6K => 0.03,
            GgmlDType::Q5K => 0.06,
            _ => 0.15,
        };
        for format in FORMATS {
            let w = randn(&[300, 512], 4);
            let q = QuantizedWeight::quantize(&w, format).unwrap();
            let ours = q.dequantize().unwrap();
            let candles = q.blocks.dequantize(&Device::Cpu).unwrap();
            assert_eq!(max_abs_diff(&ours, &candles), 0.0, "{format:?}");
            let scale = w
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(&ours, &w);
            assert!(diff < rounding(format) * scale, "{format:?}: {diff}");
        }
    }

    /// A row reordering moves rows and changes no value; rows that are not
    /// whole blocks are refused.
    #[test]
    fn rows_reorder_exactly_and_partial_blocks_are_refused() {
        let w = QuantizedWeight::quantize(&randn(&[6, 64], 5), GgmlDType::Q4_0).unwrap();
        let order = [5, 0, 3, 1, 4, 2];
        let moved = w.select_rows(&order).unwrap().dequantize().unwrap();
        let dense = w.dequantize().unwrap();
        for (r, &from) in order.iter().enumerate() {
            let a = moved.get(r).unwrap();
            let b = dense.get(from).unwrap();
            assert_eq!(max_abs_diff(&a, &b), 0.0, "row {r}");
        }
        let err = QuantizedWeight::quantize(&randn(&[4, 40], 6), GgmlDType::Q4K).unwrap_err();
        assert!(err.to_string().contains("not whole Q4K blocks"), "{err}");
    }
}
