//! The `gpu` suite: training steps with random weights at the real shapes of
//! larger models, in the device's default dtype, and the peak GPU memory a
//! row uses (NVML).

use super::{train_row, Args, Row};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tuneforge::{device, LoraConfig, Model, ModelConfig};

/// The rows of the `gpu` suite: name, model shape, batch rows, tokens per row,
/// LoRA rank (on all seven linears).
pub type GpuRow = (&'static str, fn() -> ModelConfig, usize, usize, usize);
pub const ROWS: [GpuRow; 8] = [
    (
        "smollm2-135m, all-7 r=16, 8 x 512",
        ModelConfig::smollm2_135m,
        8,
        512,
        16,
    ),
    (
        "smollm2-135m, all-7 r=16, 16 x 1024",
        ModelConfig::smollm2_135m,
        16,
        1024,
        16,
    ),
    (
        "qwen2.5-0.5b, all-7 r=16, 8 x 512",
        ModelConfig::qwen2_5_0_5b,
        8,
        512,
        16,
    ),
    (
        "qwen2.5-0.5b, all-7 r=16, 16 x 1024",
        ModelConfig::qwen2_5_0_5b,
        16,
        1024,
        16,
    ),
    // The newer blocks at their real shapes, at the CPU suite's batch sizes.
    (
        "qwen3-0.6b, all-7 r=8, 4 x 128",
        ModelConfig::qwen3_0_6b,
        4,
        128,
        8,
    ),
    (
        "qwen3-0.6b, all-7 r=8, 8 x 256",
        ModelConfig::qwen3_0_6b,
        8,
        256,
        8,
    ),
    (
        "gemma3-270m, all-7 r=8, 4 x 128",
        ModelConfig::gemma3_270m,
        4,
        128,
        8,
    ),
    (
        "gemma3-270m, all-7 r=8, 8 x 256",
        ModelConfig::gemma3_270m,
        8,
        256,
        8,
    ),
];

pub fn row(&(name, shape, b, s, r): &GpuRow, args: &Args) -> Result<Row> {
    let device = args.device.open()?;
    let mut model = Model::random(&shape(), 0, device::default_dtype(&device), &device)?;
    let lora_config = LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        ..Default::default()
    };
    let mut row = train_row(&mut model, name, &lora_config, (b, s), args.reps, false)?;
    row.model = "random weights".into();
    Ok(row)
}

/// Peak GPU memory in use while a row runs: NVML's reading of the device's used
/// memory, sampled every 2 ms, above the reading taken before the row opened the
/// GPU. Assumes nothing else runs on that GPU meanwhile.
pub struct Memory {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    baseline: u64,
    sampler: std::thread::JoinHandle<()>,
}

impl Memory {
    /// Starts sampling NVML device `index`; `None` where NVML cannot be loaded.
    pub fn start(index: u32) -> Option<Self> {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                let nvml = nvml_wrapper::Nvml::init().ok();
                let gpu = nvml.as_ref().and_then(|n| n.device_by_index(index).ok());
                let used = || {
                    gpu.as_ref()
                        .and_then(|g| g.memory_info().ok())
                        .map(|m| m.used)
                };
                let _ = tx.send(used());
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(used().unwrap_or(0), Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        let baseline = rx.recv().ok().flatten()?;
        Some(Self {
            stop,
            peak,
            baseline,
            sampler,
        })
    }

    /// Stops sampling; the peak above the baseline, in MB.
    pub fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.sampler.join();
        self.peak
            .load(Ordering::Relaxed)
            .saturating_sub(self.baseline) as f64
            / 1e6
    }
}
