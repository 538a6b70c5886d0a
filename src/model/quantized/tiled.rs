//! Products of many rows with a quantized weight on the CPU, a tile of the
//! weight's rows at a time: each tile is dequantized into one reused f32
//! buffer and the `gemm` kernel takes it from there, so no f32 copy of the
//! whole weight is ever made. A bf16 weight on a CPU with a bf16 kernel goes
//! to the bf16 kernel instead ([`super::bf16_dot`]), and the forward product
//! of the blocks it reads (Q8_0, Q4_x, Q5_x, Q2_K to Q6_K) on a CPU with
//! AMX-INT8, AVX512_VNNI or AVX-VNNI to the int8 kernel
//! ([`super::int8_dot`]).

use super::super::gemv;
use super::super::strided::{product, View};
use super::blocks::Rows;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use std::ops::Range;

/// Weight values a many-row product dequantizes at a time (4 MB of f32).
const TILE_VALUES: usize = 1 << 20;

/// The row ranges of a weight of `n` rows of `k` values that a product
/// dequantizes in turn.
fn tiles(n: usize, k: usize) -> impl Iterator<Item = Range<usize>> {
    let per_tile = (TILE_VALUES / k.max(1)).max(1);
    (0..n)
        .step_by(per_tile)
        .map(move |start| start..(start + per_tile).min(n))
}

/// A many-row product of f32 CPU rows with a quantized weight, a tile of the
/// weight's rows at a time: `x Wᵀ` (`[m, in]` → `[m, out]`), or with
/// `input_gradient`, `dy W` (`[m, out]` → `[m, in]`).
pub(super) struct TiledProduct<'a> {
    pub(super) rows: Rows<'a>,
    pub(super) n: usize,
    pub(super) input_gradient: bool,
    /// A bf16 weight may use the bf16 kernel, the blocks the int8 kernel
    /// reads that kernel (forward).
    pub(super) low_precision_kernels: bool,
}

impl CustomOp1 for TiledProduct<'_> {
    fn name(&self) -> &'static str {
        "tuneforge-quantized-product"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = gemv::contiguous(storage, layout)?;
        let (m, width) = layout.shape().dims2()?;
        let (n, k) = (self.n, self.rows.k);
        let (want, out_width) = match self.input_gradient {
            false => (k, n),
            true => (n, k),
        };
        if width != want {
            candle_core::bail!("a [{m}, {width}] input for a [{n}, {k}] quantized weight");
        }
        let mut out = vec![0f32; m * out_width];
        #[cfg(target_arch = "x86_64")]
        if let (Some(values), true) = (
            self.rows.bf16_values(),
            self.low_precision_kernels && super::bf16_dot::available(),
        ) {
            let w = super::bf16_dot::Bf16Weight { values, n, k };
            super::bf16_dot::product(x, m, w, self.input_gradient, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((m, out_width))));
        }
        #[cfg(target_arch = "x86_64")]
        if self.low_precision_kernels
            && !self.input_gradient
            && super::int8_dot::reads(self.rows.format)
            && super::int8_dot::available()
        {
            let w = super::int8_dot::Int8Weight { rows: self.rows, n };
            super::int8_dot::product(x, m, w, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((m, out_width))));
        }
        let mut tile = Vec::new();
        for (i, r) in tiles(n, k).enumerate() {
            tile.resize(r.len() * k, 0.0);
            crate::profile::time(crate::profile::Stage::DequantizeTiles, || {
                self.rows.decode_parallel(r.clone(), &mut tile)
            });
            let tile = View::rows(&tile, r.len(), k);
            match self.input_gradient {
                // Columns `r` of `out` get `x · tileᵀ`.
                false => product(&mut out[r.start..], n, false, View::rows(x, m, k), tile.t()),
                // `out` gets `dy[:, r] · tile` added.
                true => {
                    let dy = View::strided(&x[r.start..], (m, r.len()), [n, 1]);
                    product(&mut out, k, i > 0, dy, tile)
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, out_width))))
    }
}
