use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &(m, k, n, tr) in &[
        (512usize, 576usize, 1536usize, true),
        (512, 1536, 576, true),
        (512, 576, 576, true),
        (512, 1536, 576, false),
        (512, 576, 1536, false),
        (512, 576, 8192, true),
        (512, 8192, 576, false),
    ] {
        let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = if tr {
            Tensor::randn(0f32, 1., (n, k), &dev)?
        } else {
            Tensor::randn(0f32, 1., (k, n), &dev)?
        };
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            let y = if tr {
                x.matmul(&w.t()?)?
            } else {
                x.matmul(&w)?
            };
            let _ = y.dtype();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{m}x{k}x{n} tr={tr}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / best / 1e9
        );
    }
    let _ = DType::F32;
    Ok(())
}
