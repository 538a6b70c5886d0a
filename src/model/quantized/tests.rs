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

/// Where the CPU takes a bf16 kernel (AMX-BF16, or AVX512_BF16 whose dot
/// products outrun f32), a bf16 weight's many-row products (forward and
/// input gradient, the loss's row ranges too) run on the bf16 kernel: the
/// other side is rounded to bf16 first.
#[test]
fn bf16_many_row_products_take_the_bf16_kernel_where_the_cpu_has_it() {
    let kernel = crate::cpu::features().bf16_kernel().is_some();
    if !kernel {
        eprintln!("skipped: this CPU takes no bf16 kernel (no AMX-BF16, and no AVX512_BF16 that outruns its f32 FMAs)");
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
