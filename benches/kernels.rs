//! Criterion benchmarks of the CPU's products with a frozen weight, on one
//! core:
//! - per GGML format, the int8 kernel (AVX512_VNNI, where the CPU has it)
//!   against the f32 products of dequantized tiles, at Qwen2.5-1.5B's MLP
//!   shapes (512 rows against a `[8960, 1536]` and a `[1536, 8960]`
//!   weight);
//! - `BF16`: a bf16 base's products, forward (`x Wᵀ`) and input gradient
//!   (`dy W`), on the bf16 kernel (AMX-BF16 or AVX512_BF16, where the CPU
//!   has one) against the f32 base's product (`gemm`), at SmolLM2-135M's
//!   shapes for one shard of a training step (256 rows against its
//!   `[1536, 576]` MLP and `[576, 576]` attention weights). The repacking
//!   of the weight on every call is inside the bf16 kernel's time.
//!
//! - `attention`: one layer's causal attention, forward and backward with
//!   the probabilities kept, at SmolLM2-135M's heads (9 query heads on 3 kv
//!   heads of 64) for one shard (a row of 256 positions), in chunks of
//!   positions that skip the masked keys against the whole square.
//!
//! Throughput is in floating-point operations (`2·m·n·k`, shown as
//! elements/s; for attention the useful ones, the masked half not counted).
//!
//! ```text
//! cargo bench --bench kernels            # every format (about 3 minutes)
//! cargo bench --bench kernels -- Q6_K    # one format
//! cargo bench --bench kernels -- BF16    # the bf16 kernel alone
//! cargo bench --bench kernels -- attention
//! ```

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use tuneforge::model::quantized::INT8_KERNEL_FORMATS;
use tuneforge::model::QuantizedWeight;
use tuneforge::quantize::format_name;

/// The timing settings every group shares: ten samples of about three
/// seconds.
fn timed_group<'a>(
    c: &'a mut Criterion,
    name: String,
    flops: usize,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(flops as u64));
    group
}

fn products(c: &mut Criterion) {
    tuneforge::threads::init();
    let rows = 512;
    let int8 = tuneforge::cpu::features().int8_kernel();
    if int8.is_none() {
        eprintln!("this CPU has no int8 kernel (AVX512_VNNI, AVX-VNNI or AMX-INT8): only the f32 tiles run");
    }
    for (n, k) in [(8960, 1536), (1536, 8960)] {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
        let x = Tensor::randn(0f32, 1.0, (rows, k), &device).unwrap();
        let mut group = timed_group(
            c,
            format!("kernels/{rows}x{k} by {n}x{k}"),
            2 * rows * n * k,
        );
        for format in INT8_KERNEL_FORMATS {
            let name = format_name(format);
            if !criterion_filter_allows(&name) {
                continue;
            }
            let mut q = QuantizedWeight::quantize(&w, format).unwrap();
            let kernels = int8.map(|kernel| (format!("int8 ({kernel})"), true));
            for (path, on) in kernels
                .into_iter()
                .chain([("f32 tiles".to_string(), false)])
            {
                q.set_low_precision_kernels(on);
                group.bench_function(BenchmarkId::new(&name, path), |b| {
                    b.iter(|| q.matmul_t(&x).unwrap())
                });
            }
        }
        group.finish();
    }
}

/// A bf16 base's products against the f32 base's, forward and input
/// gradient.
fn bf16_products(c: &mut Criterion) {
    if !criterion_filter_allows("BF16") {
        return;
    }
    tuneforge::threads::init();
    let rows = 256;
    let kernel = tuneforge::cpu::features().bf16_kernel();
    if kernel.is_none() {
        eprintln!(
            "this CPU has no bf16 kernel (AMX-BF16 or AVX512_BF16): only the f32 products run"
        );
    }
    let device = Device::Cpu;
    for (n, k) in [(1536, 576), (576, 576)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &device).unwrap();
        let mut q = QuantizedWeight::quantize(&w, GgmlDType::BF16).unwrap();
        q.set_low_precision_kernels(true);
        // The f32 base holds the bf16 values too, so both sides multiply
        // the same weight.
        let f32_weight = q.dequantize().unwrap();
        let f32_transposed = f32_weight.t().unwrap();
        for input_gradient in [false, true] {
            let (q_len, direction) = match input_gradient {
                false => (k, "forward"),
                true => (n, "input gradient"),
            };
            let x = Tensor::randn(0f32, 1.0, (rows, q_len), &device).unwrap();
            let mut group = timed_group(
                c,
                format!("kernels/BF16 {direction}, {rows} rows by {n}x{k}"),
                2 * rows * n * k,
            );
            if let Some(kernel) = kernel {
                group.bench_function(BenchmarkId::new("bf16", kernel), |b| {
                    b.iter(|| match input_gradient {
                        false => q.matmul_t(&x).unwrap(),
                        true => q.matmul(&x).unwrap(),
                    })
                });
            }
            group.bench_function(BenchmarkId::new("f32", "gemm"), |b| {
                b.iter(|| match input_gradient {
                    false => x.matmul(&f32_transposed).unwrap(),
                    true => x.matmul(&f32_weight).unwrap(),
                })
            });
            group.finish();
        }
    }
}

/// One layer's causal attention, forward and backward, in chunks of
/// positions and as one whole square.
fn attention(c: &mut Criterion) {
    use tuneforge::model::attention::{Attend, Spans};
    tuneforge::threads::init();
    let (kv, g, t, hd) = (3, 3, 256, 64);
    let device = Device::Cpu;
    let random = |rows| Tensor::randn(0f32, 1.0, (1, kv, rows, hd), &device).unwrap();
    let (q, k, v, d_out) = (random(t * g), random(t), random(t), random(t * g));
    let mask = tuneforge::model::mask::causal(t, 0, candle_core::DType::F32, &device).unwrap();
    // QKᵀ and PV forward, four products backward, over the keys each query sees.
    let flops = 12 * (t * (t + 1) / 2) * g * kv * hd;
    let mut group = timed_group(
        c,
        format!("attention/1 x {t}, {g}x{kv} heads of {hd}"),
        flops,
    );
    let chunks = || Spans::of_mask(&mask, Spans::CHUNK).unwrap();
    // With low precision, the products run in bf16 on AMX tiles where the
    // CPU has them (in f32 elsewhere, as the other rows).
    for (name, spans, low_precision) in [
        ("chunks", chunks(), false),
        ("chunks, bf16 tiles", chunks(), true),
        ("whole", Spans::whole(t, t), false),
    ] {
        let attend = Attend {
            q: &q,
            k: &k,
            v: &v,
            shared: None,
            mask: &mask,
            spans: &spans,
            softcap: None,
            groups: g,
            low_precision,
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let (_, probs) = attend.forward().unwrap();
                attend.backward(Some(&probs), &d_out).unwrap()
            })
        });
    }
    group.finish();
}

/// Whether the command line's filter (`cargo bench --bench kernels -- Q6_K`)
/// leaves `format`'s benchmarks in: quantizing a weight takes a second, so
/// formats filtered out are not quantized.
fn criterion_filter_allows(format: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| f.contains(format) || format.contains(f))
}

criterion_group!(benches, products, bf16_products, attention);
criterion_main!(benches);
