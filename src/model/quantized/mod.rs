//! Frozen weights kept quantized, as QLoRA keeps them: a linear's `[out, in]`
//! weight in a GGML block format (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and the
//! other GGUF formats candle reads), never held as f32. A bf16 base on the
//! CPU (`--dtype bf16`) is held here too, in GGML's BF16 format: half an
//! f32's bytes, decoded exactly; its many-row products run on the bf16
//! kernel (`bf16_dot/`) where the CPU has AMX-BF16 tiles (`amx/`) or
//! AVX512_BF16 dot products that outrun its f32 FMAs, in f32 elsewhere.
//!
//! A product dequantizes the blocks to f32 as it goes and runs the f32
//! arithmetic, so its result is the dequantized weight's f32 product: the
//! forward `x Wᵀ` and the input gradient `dy W` read the same blocks, and the
//! weight gets no gradient.
//! - A few rows of `x` (decoding): the `gemv` kernel, each task
//!   dequantizing its block of weight rows into a scratch buffer and reading
//!   it against every row of `x`, bit for bit the dense kernel's arithmetic.
//! - Many rows (training, prefill, the loss's logits) and the input gradient:
//!   a tile of the weight's rows (4 MB of f32) is dequantized in parallel,
//!   the `gemm` kernel multiplies it into its columns of the output (or adds
//!   its share of the input gradient), and the next tile reuses the buffer.
//!   No f32 copy of a whole weight is made, so a quantized vocabulary matrix
//!   costs its blocks and one tile. Dequantizing costs one pass over the
//!   weight, against `2·rows` flops per weight element for the product.
//!   A bf16 weight on a CPU with a bf16 kernel (AMX-BF16, or AVX512_BF16
//!   whose dot products outrun f32 FMAs) is instead read by that kernel,
//!   which rounds `x` (or `dy`) to bf16: its result is within bf16's
//!   rounding of the f32 product, as PyTorch's bf16 autocast's is.
//! - An embedding lookup dequantizes only the rows it reads.
//! - On a GPU, candle dequantizes a layer's weight on the device.
//!
//! On the CPU the blocks start on a cache line (`aligned.rs`), however the
//! weight was made, so that the kernels' 64-byte loads never straddle two
//! lines.

mod aligned;
#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16_dot;
mod blocks;
#[cfg(target_arch = "x86_64")]
mod int8_dot;
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd;
pub(crate) use simd::low_mask;
mod tiled;

#[cfg(target_arch = "x86_64")]
pub(crate) use amx::tile_product_rounds;
pub use blocks::{block_bytes, cpu_blocks, is_block_format, is_held_format, Fill};

use super::gemv;
use blocks::{format_code, Format, Rows};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;
use tiled::TiledProduct;

/// The block formats the int8 kernel reads, on CPUs with AVX512_VNNI
/// ([`QuantizedWeight::uses_int8_kernel`]); others take f32 products.
pub const INT8_KERNEL_FORMATS: [GgmlDType; 10] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A frozen `[out, in]` weight in a GGML block format or bf16; products run
/// in `dtype`.
#[derive(Clone)]
pub struct QuantizedWeight {
    blocks: Arc<QTensor>,
    dtype: DType,
    /// Whether many-row products may use a low-precision kernel (bf16 or
    /// int8, rounding the other side) where the CPU has one.
    low_precision_kernels: bool,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedWeight({:?}, {:?})", self.format(), self.dims())
    }
}

impl QuantizedWeight {
    /// A weight from a 2-D quantized tensor (`[out, in]`); products run in
    /// `dtype`.
    pub fn new(blocks: QTensor, dtype: DType) -> Result<Self> {
        let (_, k) = blocks.shape().dims2()?;
        let format = blocks.dtype();
        if !is_held_format(format) {
            candle_core::bail!("a {format:?} tensor is not quantized");
        }
        if k % format.block_size() != 0 {
            candle_core::bail!(
                "rows of {k} values are not whole {format:?} blocks of {}",
                format.block_size()
            );
        }
        if let (true, Some(code)) = (blocks.device().is_cpu(), format_code(format)) {
            if !(blocks.data()?.as_ptr() as usize).is_multiple_of(code.align) {
                candle_core::bail!("the {format:?} blocks are not aligned in memory");
            }
        }
        Ok(Self {
            blocks: Arc::new(blocks),
            dtype,
            low_precision_kernels: true,
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
        Self::new(blocks_of(w, format)?, w.dtype())
    }

    /// A weight of `blocks` with this one's settings (products' dtype, bf16
    /// arithmetic).
    fn with_blocks(&self, blocks: QTensor) -> Result<Self> {
        Ok(Self {
            low_precision_kernels: self.low_precision_kernels,
            ..Self::new(blocks, self.dtype)?
        })
    }

    /// Whether many-row products use the CPU's low-precision kernels where
    /// it has them (the default): the bf16 kernel for a bf16 weight (the
    /// other side rounded to bf16), the int8 kernel for Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1 and Q2_K to Q6_K blocks (the activations rounded to two
    /// 8-bit digits per group, within 1/32,512 of the group's largest value).
    /// With `false`, the weight is widened to f32 and multiplied exactly, as
    /// on other CPUs.
    pub fn set_low_precision_kernels(&mut self, on: bool) {
        self.low_precision_kernels = on;
    }

    /// Whether its many-row products run on the bf16 kernel: a bf16 weight
    /// on a CPU with a bf16 kernel ([`crate::cpu::CpuFeatures::bf16_kernel`]), low-precision kernels on
    /// ([`Self::set_low_precision_kernels`]).
    pub fn uses_bf16_kernel(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.low_precision_kernels
            && self.device().is_cpu()
            && self.format() == GgmlDType::BF16
            && bf16_dot::available();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    /// Whether its forward products with many rows run on the int8 kernel:
    /// Q8_0, Q4_0 or Q4_1 blocks on a CPU with AVX512_VNNI, low-precision
    /// kernels on ([`Self::set_low_precision_kernels`]).
    pub fn uses_int8_kernel(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self.low_precision_kernels
            && self.device().is_cpu()
            && int8_dot::reads(self.format())
            && int8_dot::available();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
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
        let data = self.blocks.data()?;
        let blocks = match device.is_cpu() {
            // Onto the CPU through `filled_blocks`, to start on a cache line.
            true => {
                let mut copy = |bytes: &mut [u8]| {
                    bytes.copy_from_slice(&data);
                    Ok(())
                };
                filled_blocks(self.format(), self.dims(), device, &mut copy)?
            }
            false => {
                let storage = QStorage::from_data(data, device, self.format())?;
                QTensor::new(storage, self.blocks.shape().clone())?
            }
        };
        self.with_blocks(blocks)
    }

    /// The blocks' size in bytes.
    pub fn storage_bytes(&self) -> usize {
        self.blocks.storage_size_in_bytes()
    }

    /// The CPU blocks, for a format with a decoder.
    fn cpu_rows(&self) -> Result<Option<Rows<'_>>> {
        let format = self.format();
        let (Some(Format { decode, .. }), true) = (format_code(format), self.device().is_cpu())
        else {
            return Ok(None);
        };
        let bytes = match self.blocks.data()? {
            Cow::Borrowed(b) => b,
            Cow::Owned(_) => return Ok(None),
        };
        let k = self.dims().1;
        Ok(Some(Rows {
            format,
            bytes,
            row_bytes: block_bytes(format, k),
            k,
            decode,
        }))
    }

    /// The weight dequantized, `[out, in]` in the products' dtype.
    pub fn dequantize(&self) -> Result<Tensor> {
        self.dequantize_rows(0..self.dims().0)
    }

    /// Rows `range` dequantized, `[len, in]` in the products' dtype (on a
    /// GPU, through the whole weight dequantized).
    pub fn dequantize_rows(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        let (n, k) = self.dims();
        if range.start > range.end || range.end > n {
            candle_core::bail!("rows {range:?} of a weight of {n} rows");
        }
        let w = match self.cpu_rows()? {
            Some(rows) => {
                let mut out = vec![0f32; range.len() * k];
                let len = range.len();
                rows.decode_parallel(range, &mut out);
                Tensor::from_vec(out, (len, k), &Device::Cpu)?
            }
            None => self
                .blocks
                .dequantize(&self.device())?
                .narrow(0, range.start, range.len())?,
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
        self.matmul_t_rows(x, 0..self.dims().0)
    }

    /// `dy W` for `dy`: `[rows, out]` (the input gradient of [`Self::matmul_t`]).
    pub fn matmul(&self, dy: &Tensor) -> Result<Tensor> {
        self.matmul_rows(dy, 0..self.dims().0)
    }

    /// `x W[range]ᵀ` for `x`: `[rows, in]`: the product with the weight's
    /// rows `range` alone (`[rows, range.len()]`).
    pub fn matmul_t_rows(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        match self.tiled(x, range.clone(), false)? {
            Some(y) => Ok(y),
            None => x.matmul(&self.dequantize_rows(range)?.t()?),
        }
    }

    /// `dy W[range]` for `dy`: `[rows, range.len()]`: the input gradient of
    /// [`Self::matmul_t_rows`] (`[rows, in]`).
    pub fn matmul_rows(&self, dy: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        match self.tiled(dy, range.clone(), true)? {
            Some(dx) => Ok(dx),
            None => dy.matmul(&self.dequantize_rows(range)?),
        }
    }

    /// The tiled product ([`TiledProduct`]) of 2-D f32 CPU rows `x` with the
    /// weight's rows `range`, where the weight's products run in f32 on the
    /// CPU.
    fn tiled(
        &self,
        x: &Tensor,
        range: std::ops::Range<usize>,
        input_gradient: bool,
    ) -> Result<Option<Tensor>> {
        let n = self.dims().0;
        if range.start > range.end || range.end > n {
            candle_core::bail!("rows {range:?} of a weight of {n} rows");
        }
        let takes = x.dtype() == DType::F32 && self.dtype == DType::F32 && x.rank() == 2;
        let rows = match takes {
            true => self.cpu_rows()?,
            false => None,
        };
        let Some(rows) = rows else {
            return Ok(None);
        };
        let op = TiledProduct {
            rows: rows.slice(range.clone()),
            n: range.len(),
            input_gradient,
            low_precision_kernels: self.low_precision_kernels,
        };
        x.contiguous()?.apply_op1_no_bwd(&op).map(Some)
    }

    /// The rows `ids` (u32, `[len]`) of the weight, dequantized: `[len, in]`
    /// in the products' dtype (an embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let (n, k) = self.dims();
        let Some(rows) = self.cpu_rows()? else {
            return self.dequantize()?.index_select(ids, 0);
        };
        let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
            candle_core::bail!("row {bad} of a weight of {n} rows");
        }
        let mut out = vec![0f32; ids.len() * k];
        crate::threads::pool().install(|| {
            out.par_chunks_mut(k.max(1))
                .zip(&ids)
                .for_each(|(o, &id)| rows.decode_into(id as usize..id as usize + 1, o))
        });
        Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?.to_dtype(self.dtype)
    }

    /// The weight with its rows reordered: row `r` of the result is row
    /// `order[r]` of this one. Blocks run along rows, so no value changes.
    pub fn select_rows(&self, order: &[usize]) -> Result<Self> {
        let (n, k) = self.dims();
        let format = self.format();
        let row_bytes = block_bytes(format, k);
        if let Some(&r) = order.iter().find(|&&r| r >= n) {
            candle_core::bail!("row {r} of a weight of {n} rows");
        }
        let data = self.blocks.data()?;
        let mut copy_rows = |out: &mut [u8]| {
            for (to, &r) in out.chunks_exact_mut(row_bytes).zip(order) {
                to.copy_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
            }
            Ok(())
        };
        let blocks = filled_blocks(format, (order.len(), k), &self.device(), &mut copy_rows)?;
        self.with_blocks(blocks)
    }

    /// `W + delta` requantized into this weight's format (a merged adapter):
    /// the sum is rounded to the format again.
    pub fn add_requantized(&self, delta: &Tensor) -> Result<Self> {
        let sum = (self.dequantize()?.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
        self.with_blocks(blocks_of(&sum, self.format())?)
    }
}

/// A `[rows, cols]` tensor of `format` blocks on `device`, filled by `fill`:
/// in place on the CPU ([`cpu_blocks`], on whole cache lines), through a
/// copy elsewhere.
fn filled_blocks(
    format: GgmlDType,
    (rows, cols): (usize, usize),
    device: &Device,
    fill: Fill,
) -> Result<QTensor> {
    if device.is_cpu() {
        if let Some(blocks) = cpu_blocks(format, (rows, cols), fill)? {
            return Ok(blocks);
        }
    }
    let mut bytes = vec![0u8; block_bytes(format, rows * cols)];
    fill(&mut bytes)?;
    let storage = QStorage::from_data(Cow::Owned(bytes), device, format)?;
    QTensor::new(storage, (rows, cols))
}

/// `w` quantized into `format`'s blocks on `w`'s device. candle quantizes
/// on the CPU only: a GPU's matrix goes there in f32 and comes back in
/// blocks.
fn blocks_of(w: &Tensor, format: GgmlDType) -> Result<QTensor> {
    let f32 = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    if let (true, Ok(dims)) = (w.device().is_cpu(), f32.dims2()) {
        let quantized =
            super::fused::with_values(&[&f32], |v| blocks::cpu_quantized(format, dims, v[0]));
        if let Some(blocks) = quantized.transpose()?.flatten() {
            return Ok(blocks);
        }
    }
    QTensor::quantize_onto(&f32, format, w.device())
}

#[cfg(test)]
mod tests;
