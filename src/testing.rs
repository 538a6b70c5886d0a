//! Helpers shared by the unit tests: seeded random tensors and a finite-difference
//! gradient checker.

#![cfg(test)]

use candle_core::{DType, Device, Tensor, Var};

/// A seeded standard-normal tensor in f32 on the CPU.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    randn_on(shape, seed, &Device::Cpu)
}

/// A seeded standard-normal tensor in f32 on `device` (the same values on every device).
pub fn randn_on(shape: &[usize], seed: u64, device: &Device) -> Tensor {
    let mut rng = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, device).unwrap()
}

/// The devices that device-generic tests run on: the CPU, and the GPU when one
/// is compiled in and present ([`crate::device::gpu_or_say_why`]).
pub fn devices() -> Vec<Device> {
    let mut all = vec![Device::Cpu];
    all.extend(crate::device::gpu_or_say_why());
    all
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Checks the gradient of `sum(f(x) * probe)` with respect to `x` against central
/// finite differences in f64, for a random `x` of `shape`,
/// with `x` and `f` on `device`, in f32.
pub fn check_gradient(
    device: &Device,
    shape: &[usize],
    seed: u64,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) {
    let x64 = randn(shape, seed).to_dtype(DType::F64).unwrap();
    let x =
        Var::from_tensor(&x64.to_dtype(DType::F32).unwrap().to_device(device).unwrap()).unwrap();
    let y = f(x.as_tensor()).unwrap();
    let probe = randn_on(y.dims(), seed + 1000, device);
    let loss = (y * &probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let analytic: Vec<f32> = grads
        .get(x.as_tensor())
        .expect("no gradient reached the input")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x64.flatten_all().unwrap().to_vec1().unwrap();
    // Sums in f64 on the CPU (Metal has no f64).
    let probe = probe
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let eval = |v: &[f64]| -> f64 {
        let t = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(device)
            .unwrap();
        let y = f(&t)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        (y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-2;
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let numeric = (eval(&plus) - eval(&minus)) / (2.0 * h);
        let a = analytic[i] as f64;
        let tol = 2e-2 * (1.0 + numeric.abs());
        assert!(
            (a - numeric).abs() < tol,
            "gradient {i} on {device:?}: analytic {a} vs finite difference {numeric}"
        );
    }
}

/// A tiny random model of `arch` whose sliding window, where it has one, is
/// 5 positions (shorter than the test prompts); with `context` as its context window.
pub fn tiny_with_window(
    arch: crate::config::Architecture,
    seed: u64,
    context: Option<usize>,
) -> crate::Model {
    let mut config = crate::config::ModelConfig::tiny(arch);
    if config.sliding_window.is_some() {
        config.sliding_window = Some(5);
    }
    if let Some(c) = context {
        config.max_position_embeddings = c;
    }
    crate::Model::random(&config, seed, candle_core::DType::F32, &Device::Cpu).unwrap()
}
