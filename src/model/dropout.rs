//! Dropout masks that are a pure function of a seed and each element's index.
//!
//! The backward pass draws a layer's mask again from the same seed rather than
//! keeping it, and every device draws the same mask: on the CPU in Rust, on an
//! NVIDIA GPU with a kernel of ours (`src/kernels/dropout.cu`), so nothing is
//! generated on the host for the GPU or crosses the bus. Metal has no kernel
//! here: its masks are drawn on the CPU and copied over, which is said once.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// An f32 tensor shaped like `like`, on its device: `1 / keep` where an element
/// is kept (with probability `keep`), `0` where it is dropped.
pub fn mask(like: &Tensor, seed: u64, keep: f32) -> Result<Tensor> {
    let op = Mask { seed, keep };
    if !like.device().is_metal() {
        return like.apply_op1_no_bwd(&op);
    }
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!("tuneforge: on Metal, LoRA dropout masks are drawn on the CPU and copied over")
    });
    let on_cpu = Tensor::zeros(
        like.shape(),
        candle_core::DType::U8,
        &candle_core::Device::Cpu,
    )?;
    on_cpu.apply_op1_no_bwd(&op)?.to_device(like.device())
}

/// Whether element `index` is kept: the top 24 bits of splitmix64 of the seed
/// advanced `index + 1` steps, as a uniform number in [0, 1), fall below `keep`.
/// The CUDA kernel computes exactly this.
fn kept(seed: u64, index: u64, keep: f32) -> bool {
    let mut z = seed.wrapping_add((index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32) * (1.0 / 16_777_216.0) < keep
}

struct Mask {
    seed: u64,
    keep: f32,
}

impl CustomOp1 for Mask {
    fn name(&self) -> &'static str {
        "dropout_mask"
    }

    fn cpu_fwd(&self, _: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let scale = 1.0 / self.keep;
        let values = (0..layout.shape().elem_count() as u64)
            .map(|i| match kept(self.seed, i, self.keep) {
                true => scale,
                false => 0.0,
            })
            .collect();
        Ok((CpuStorage::F32(values), layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let device = storage.device().clone();
        let n = layout.shape().elem_count();
        let func =
            device.get_or_load_custom_func("dropout_mask", "tuneforge_dropout", ptx::DROPOUT)?;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { device.alloc::<f32>(n)? };
        let (count, scale) = (n as u64, 1.0 / self.keep);
        let mut launch = func.builder();
        launch.arg(&out);
        launch.arg(&count);
        launch.arg(&self.seed);
        launch.arg(&self.keep);
        launch.arg(&scale);
        // SAFETY: the arguments match the kernel's signature, and `out` holds `n` floats.
        unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.w()?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, device),
            layout.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::devices;

    #[test]
    fn every_device_draws_the_same_mask() {
        let like =
            Tensor::zeros((64, 96), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let want: Vec<f32> = mask(&like, 42, 0.75)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for device in devices() {
            let like = like.to_device(&device).unwrap();
            let got: Vec<f32> = mask(&like, 42, 0.75)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{device:?}");
        }
    }

    #[test]
    fn keeps_the_asked_share_without_patterns() {
        let like =
            Tensor::zeros(100_000, candle_core::DType::U8, &candle_core::Device::Cpu).unwrap();
        let m: Vec<f32> = mask(&like, 7, 0.9).unwrap().to_vec1().unwrap();
        let kept: Vec<bool> = m.iter().map(|&v| v > 0.0).collect();
        let share = kept.iter().filter(|&&k| k).count() as f64 / m.len() as f64;
        assert!((share - 0.9).abs() < 0.005, "kept {share}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        // Neighbours are independent: a drop is followed by a drop about 10% of the time.
        let drops = kept.iter().filter(|&&k| !k).count();
        let both = kept.windows(2).filter(|w| !w[0] && !w[1]).count();
        let follow = both as f64 / drops as f64;
        assert!(
            (follow - 0.1).abs() < 0.02,
            "a drop follows a drop {follow}"
        );
        // Another seed gives another mask.
        let other: Vec<f32> = mask(&like, 8, 0.9).unwrap().to_vec1().unwrap();
        assert_ne!(m, other);
    }
}
