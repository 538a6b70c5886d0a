//! GGML blocks (and bf16 values) on the CPU: decoding a weight's rows to
//! f32, and fresh storage of a format's blocks filled in place (read from a
//! file, or rows copied), without the copy candle's `QStorage::from_data`
//! makes.

use super::super::gemv::WeightRows;
use super::aligned::AlignedBlocks;
use candle_core::quantized::{k_quants, GgmlDType, GgmlType, QStorage, QTensor, QuantizedType};
use candle_core::Result;
use rayon::prelude::*;
use std::ops::Range;

/// Weight values dequantized per parallel task.
const DEQUANTIZE_TASK_VALUES: usize = 1 << 16;

/// Dequantizes whole blocks of one format: `bytes` holds a row range's blocks.
pub(super) type Decode = fn(&[u8], &mut [f32]);

fn decode<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let n = bytes.len() / std::mem::size_of::<T>();
    // SAFETY: `bytes` is a whole number of `T` blocks cut at block boundaries
    // from candle's CPU storage of `T`s, whose alignment `QuantizedWeight::new`
    // checked; GGML blocks are plain data, valid for any bits.
    let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) };
    T::to_float(blocks, out)
}

/// bf16 values to f32: the 16 bits become an f32's high half, exactly (a
/// shift, which the compiler turns into vector instructions).
fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

/// Fills a byte buffer: reads a tensor's blocks, or copies rows into it.
pub type Fill<'a> = &'a mut dyn FnMut(&mut [u8]) -> Result<()>;

/// What a block format's CPU code needs: its decoder, its blocks' alignment,
/// and fresh storage of its blocks filled in place.
pub(super) struct Format {
    pub(super) decode: Decode,
    pub(super) align: usize,
    filled: fn(usize, Fill) -> Result<Box<dyn QuantizedType>>,
}

/// `bytes` bytes of `T` blocks, zeroed, then filled by `fill`: one
/// allocation, on whole cache lines, where going through candle's
/// `QStorage::from_data` copies into storage that is not.
fn filled<T: GgmlType + Send + Sync + 'static>(
    bytes: usize,
    fill: Fill,
) -> Result<Box<dyn QuantizedType>> {
    let size = std::mem::size_of::<T>();
    if !bytes.is_multiple_of(size) {
        candle_core::bail!("{bytes} bytes are not whole blocks of {size}");
    }
    let mut blocks = AlignedBlocks::<T>::zeroed(bytes / size);
    fill(blocks.bytes_mut())?;
    Ok(Box::new(blocks))
}

/// The CPU code of `format`, for the block formats it has and bf16.
pub(super) fn format_code(format: GgmlDType) -> Option<Format> {
    fn of<T: GgmlType + Send + Sync + 'static>() -> Format {
        Format {
            decode: decode::<T>,
            align: std::mem::align_of::<T>(),
            filled: filled::<T>,
        }
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
        GgmlDType::BF16 => Format {
            decode: decode_bf16,
            ..of::<half::bf16>()
        },
        _ => return None,
    })
}

/// The bytes `values` values take in `format` (whole blocks).
pub fn block_bytes(format: GgmlDType, values: usize) -> usize {
    values / format.block_size() * format.type_size()
}

/// A `[rows, cols]` CPU tensor of `format` blocks, filled in place by
/// `fill` (`rows · cols / block size · block bytes` bytes), where the format
/// has CPU code; `None` otherwise.
pub fn cpu_blocks(
    format: GgmlDType,
    (rows, cols): (usize, usize),
    fill: Fill,
) -> Result<Option<QTensor>> {
    let Some(code) = format_code(format) else {
        return Ok(None);
    };
    let bytes = block_bytes(format, rows * cols);
    let storage = QStorage::Cpu((code.filled)(bytes, fill)?);
    QTensor::new(storage, (rows, cols)).map(Some)
}

/// `values` (`[rows, cols]`) quantized into `format`'s blocks on the CPU,
/// where the format has CPU code; `None` otherwise.
pub(super) fn cpu_quantized(
    format: GgmlDType,
    (rows, cols): (usize, usize),
    values: &[f32],
) -> Result<Option<QTensor>> {
    let Some(code) = format_code(format) else {
        return Ok(None);
    };
    if values.len() != rows * cols || !cols.is_multiple_of(format.block_size()) {
        candle_core::bail!(
            "{} values as [{rows}, {cols}] in whole {format:?} blocks",
            values.len()
        );
    }
    // The same fresh storage as `cpu_blocks`, quantized into in place.
    let mut storage = (code.filled)(block_bytes(format, values.len()), &mut |_| Ok(()))?;
    storage.from_float(values);
    QTensor::new(QStorage::Cpu(storage), (rows, cols)).map(Some)
}

/// Whether `format` is a block format (not f32, f16 or bf16).
pub fn is_block_format(format: GgmlDType) -> bool {
    !matches!(format, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Whether a frozen weight can be held in `format`: a block format, or bf16
/// (half an f32's bytes).
pub fn is_held_format(format: GgmlDType) -> bool {
    is_block_format(format) || format == GgmlDType::BF16
}

/// The CPU blocks of a weight, read a row range at a time.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub(super) format: GgmlDType,
    pub(super) bytes: &'a [u8],
    pub(super) row_bytes: usize,
    pub(super) k: usize,
    pub(super) decode: Decode,
}

impl<'a> Rows<'a> {
    /// The weight's rows `range` alone.
    pub(super) fn slice(&self, range: Range<usize>) -> Rows<'a> {
        Rows {
            bytes: &self.bytes[range.start * self.row_bytes..range.end * self.row_bytes],
            ..*self
        }
    }

    /// The values of a bf16 weight, as stored.
    pub(super) fn bf16_values(&self) -> Option<&'a [u16]> {
        if self.format != GgmlDType::BF16 {
            return None;
        }
        let bytes = self.bytes;
        // SAFETY: a bf16 weight's bytes are candle's storage of `half::bf16`
        // (two-byte values, aligned as `QuantizedWeight::new` checked), and
        // any bits are a valid u16.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<u16>(), bytes.len() / 2) })
    }

    /// Rows `range` dequantized into `out`.
    pub(super) fn decode_into(&self, range: Range<usize>, out: &mut [f32]) {
        (self.decode)(self.slice(range).bytes, out)
    }

    /// Rows `range` dequantized into `out`, in parallel tasks.
    pub(super) fn decode_parallel(&self, range: Range<usize>, out: &mut [f32]) {
        let k = self.k.max(1);
        let per_task = (DEQUANTIZE_TASK_VALUES / k).max(1);
        crate::threads::pool().install(|| {
            out.par_chunks_mut(per_task * k)
                .enumerate()
                .for_each(|(t, o)| {
                    let first = range.start + t * per_task;
                    self.decode_into(first..first + o.len() / k, o)
                })
        });
    }
}

impl WeightRows for Rows<'_> {
    fn rows<'a>(&'a self, range: Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.resize(range.len() * self.k, 0.0);
        self.decode_into(range, scratch);
        scratch
    }
}
