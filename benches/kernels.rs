//! Criterion benchmarks of the CPU's products with a quantized frozen
//! weight, per GGML format: the int8 kernel (AVX512_VNNI, where the CPU has
//! it) against the f32 products of dequantized tiles, on one core, at
//! Qwen2.5-1.5B's MLP shapes (512 rows against a `[8960, 1536]` and a
//! `[1536, 8960]` weight). Throughput is in floating-point operations
//! (`2·m·n·k`, shown as elements/s).
//!
//! ```text
//! cargo bench --bench kernels            # every format (about 2 minutes)
//! cargo bench --bench kernels -- Q6_K    # one format
//! ```

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;
use tuneforge::model::quantized::INT8_KERNEL_FORMATS;
use tuneforge::model::QuantizedWeight;
use tuneforge::quantize::format_name;

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
        let mut group = c.benchmark_group(format!("kernels/{rows}x{k} by {n}x{k}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        group.throughput(Throughput::Elements(2 * (rows * n * k) as u64));
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

criterion_group!(benches, products);
criterion_main!(benches);
