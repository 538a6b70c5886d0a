//! Frozen weights kept quantized, as QLoRA keeps them: a linear's `[out, in]`
//! weight in a GGML block format (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and the
//! other GGUF formats candle reads), never held as f32. A bf16 base on the
//! CPU (`--dtype bf16`) is held here too, in GGML's BF16 format: half an
//! f32's bytes, decoded exactly; its many-row products run on the bf16
//! kernel (`bf16_dot/`) where the CPU has AMX-BF16 tiles (`amx/`) or
//! AVX512_BF16, in f32 elsewhere.
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
//!   A bf16 weight with AMX-BF16 or AVX512_BF16 is instead read by the bf16 kernel,
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
    /// on a CPU with AMX-BF16 or AVX512_BF16, low-precision kernels on
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
mod tests {
    use super::*;
    use crate::testing::{max_abs_diff, randn};

    use super::INT8_KERNEL_FORMATS as FORMATS;

    /// Checks `w`'s forward on `m` random rows and its input gradient
    /// against its dequantized f32 copy's, within `tol` and `dx_tol`.
    fn check_products(w: &QuantizedWeight, m: usize, seed: u64, tol: f32, dx_tol: f32) {
        let (n, k) = w.dims();
        let what = format!("{:?} {n}x{k}, {m} rows", w.format());
        let dense = w.dequantize().unwrap();
        let x = randn(&[m, k], seed);
        let want = x.matmul(&dense.t().unwrap()).unwrap();
        let diff = max_abs_diff(&w.matmul_t(&x).unwrap(), &want);
        assert!(diff < tol, "{what}: {diff}");
        let dy = randn(&[m, n], seed + 1);
        let want = dy.matmul(&dense).unwrap();
        let diff = max_abs_diff(&w.matmul(&dy).unwrap(), &want);
        assert!(diff < dx_tol, "{what}: dx {diff}");
    }

    /// The products of a quantized weight are those of its dequantized f32
    /// copy, forward (few rows and many) and input gradient, on odd shapes:
    /// exactly with the low-precision kernels off, and within the rounding
    /// of the rows to two 8-bit digits per group where the int8 kernel runs.
    #[test]
    fn products_equal_the_dequantized_weights() {
        for format in FORMATS {
            let k = 2 * format.block_size();
            for (n, m) in [(3, 1), (37, 5), (70, 65), (17, 130)] {
                let mut w = QuantizedWeight::quantize(&randn(&[n, k], 1), format).unwrap();
                let int8 = w.uses_int8_kernel();
                // Every format of the list has the kernel where the CPU does.
                assert_eq!(int8, crate::cpu::features().int8_kernel().is_some());
                // Normal rows: a block's largest value is about 2.5, its
                // step 2.5/127, each value off by up to half of it (standard
                // deviation step/√12); the errors add up as a random walk:
                // the bound is about 7 of its standard deviations.
                let tol = match int8 {
                    true => 2.0 * 2.5 / 127.0 * (k as f32).sqrt(),
                    false => 1e-4,
                };
                check_products(&w, m, 2, tol, 1e-4);
                w.set_low_precision_kernels(false);
                assert!(!w.uses_int8_kernel());
                check_products(&w, m, 2, 1e-4, 1e-4);
            }
        }
    }

    /// A weight larger than one tile is multiplied a tile at a time, and
    /// its products are still the dequantized weight's.
    #[test]
    fn products_over_several_tiles_equal_the_dequantized_weights() {
        for format in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            // 1,024 rows per tile of 2^20 values: two tiles, the last partial.
            let (n, k, m) = (1100, 1024, 67);
            let mut w = QuantizedWeight::quantize(&randn(&[n, k], 7), format).unwrap();
            w.set_low_precision_kernels(false);
            check_products(&w, m, 8, 1e-4, 1e-3);
        }
    }

    /// A bf16 weight's products are those of its f32 values, exactly as
    /// decoded (in f32) or within the rounding of the other side to bf16
    /// (the AVX512_BF16 kernel), on odd shapes, shapes below one tile,
    /// across tiles and with a large K; and within bf16's rounding (8 bits
    /// of mantissa) of the f32 weight it was rounded from.
    #[test]
    fn bf16_products_equal_the_f32_products_within_bf16_rounding() {
        let kernel = crate::cpu::features().bf16_kernel().is_some();
        for (n, k, m) in [
            (1, 1, 1),
            (3, 5, 2),
            (37, 61, 5),
            (70, 33, 65),
            (17, 4099, 130),
            (1100, 1031, 67),
        ] {
            let f32_weight = randn(&[n, k], 11);
            let w = QuantizedWeight::quantize(&f32_weight, GgmlDType::BF16).unwrap();
            assert_eq!(w.format(), GgmlDType::BF16);
            assert_eq!(w.storage_bytes(), 2 * n * k, "two bytes a value");
            let decoded = w.dequantize().unwrap();
            let rounded = f32_weight.to_dtype(DType::BF16).unwrap();
            let rounded = rounded.to_dtype(DType::F32).unwrap();
            assert_eq!(max_abs_diff(&decoded, &rounded), 0.0, "decoding is exact");
            // Sums of k (or n) random products: f32's rounding, or the
            // other side's rounding to bf16 (2⁻⁹ relative) with the kernel.
            let per_value = if kernel { 4.0 / 256.0 } else { 2e-5 };
            let (scale, dx_scale) = ((k as f32).sqrt(), (n as f32).sqrt());
            check_products(&w, m, 12, per_value * scale, per_value * dx_scale);
            // Against the unrounded weight: bf16's relative rounding, 2^-8,
            // over sums of k random products.
            let x = randn(&[m, k], 13);
            let want = x.matmul(&f32_weight.t().unwrap()).unwrap();
            let diff = max_abs_diff(&w.matmul_t(&x).unwrap(), &want);
            assert!(diff < 4.0 * scale / 256.0, "{n}x{k}, {m} rows: {diff}");
        }
    }

    /// Where the CPU has AMX-BF16 or AVX512_BF16, a bf16 weight's many-row products
    /// (forward and input gradient, the loss's row ranges too) run on the
    /// bf16 kernel: the other side is rounded to bf16 first.
    #[test]
    fn bf16_many_row_products_take_the_bf16_kernel_where_the_cpu_has_it() {
        let kernel = crate::cpu::features().bf16_kernel().is_some();
        if !kernel {
            eprintln!("skipped: this CPU has no AVX512_BF16 or AMX-BF16");
            return;
        }
        let (n, k, m) = (40, 96, 100);
        let w = QuantizedWeight::quantize(&randn(&[n, k], 21), GgmlDType::BF16).unwrap();
        let x = randn(&[m, k], 22);
        let x_rounded = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let dense = w.dequantize().unwrap();
        let want = x_rounded.matmul(&dense.t().unwrap()).unwrap();
        assert!(max_abs_diff(&w.matmul_t(&x).unwrap(), &want) < 1e-4);
        let part = w.matmul_t_rows(&x, 5..29).unwrap();
        let want_part = want.narrow(1, 5, 24).unwrap();
        assert!(max_abs_diff(&part, &want_part) < 1e-4);
        let dy = randn(&[m, 24], 23);
        let dy_rounded = dy
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let want = dy_rounded.matmul(&dense.narrow(0, 5, 24).unwrap()).unwrap();
        assert!(max_abs_diff(&w.matmul_rows(&dy, 5..29).unwrap(), &want) < 1e-4);
        // Not the f32 product of the unrounded rows: the rounding shows.
        let exact = x.matmul(&dense.t().unwrap()).unwrap();
        assert!(max_abs_diff(&w.matmul_t(&x).unwrap(), &exact) > 1e-4);
    }

    /// A weight's CPU storage starts on a cache line however it was made:
    /// quantized, its rows reordered, moved, requantized.
    #[test]
    fn cpu_weights_start_on_a_cache_line() {
        let w = randn(&[48, 64], 4);
        for format in [GgmlDType::BF16, GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let q = QuantizedWeight::quantize(&w, format).unwrap();
            let reordered = q.select_rows(&[5, 1, 40]).unwrap();
            let requantized = q.add_requantized(&w).unwrap();
            for weight in [&q, &reordered, &requantized] {
                let data = weight.blocks.data().unwrap();
                assert!(data.as_ptr().align_offset(64) == 0, "{format:?}");
            }
            let moved = filled_blocks(format, (48, 64), &Device::Cpu, &mut |b: &mut [u8]| {
                b.copy_from_slice(&q.blocks.data()?);
                Ok(())
            })
            .unwrap();
            assert_eq!(moved.data().unwrap(), q.blocks.data().unwrap());
            assert!(moved.data().unwrap().as_ptr().align_offset(64) == 0);
        }
    }

    /// An embedding lookup reads the dequantized rows; an id past the last
    /// row is refused.
    #[test]
    fn looked_up_rows_are_the_dequantized_rows() {
        let w = QuantizedWeight::quantize(&randn(&[50, 64], 10), GgmlDType::Q8_0).unwrap();
        let ids = Tensor::new(&[3u32, 49, 0, 3], &Device::Cpu).unwrap();
        let want = w.dequantize().unwrap().index_select(&ids, 0).unwrap();
        assert_eq!(max_abs_diff(&w.rows(&ids).unwrap(), &want), 0.0);
        let bad = Tensor::new(&[50u32], &Device::Cpu).unwrap();
        let err = w.rows(&bad).unwrap_err().to_string();
        assert!(err.contains("row 50 of a weight of 50 rows"), "{err}");
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
            GgmlDType::Q3K => 0.2,
            GgmlDType::Q2K => 0.3,
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
