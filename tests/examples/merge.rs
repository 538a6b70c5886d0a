//! `merge`: the merged folder answers as the base with the adapter does.

use crate::fixture::Fixture;
use crate::run;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tuneforge::{LoadOptions, Model};

fn merge(fx: &Fixture, name: &str, extra: &[&str]) -> PathBuf {
    let out = fx.path(name);
    run::ok("merge", &run::with_overrides(&fx.adapter_args(&out), extra));
    out
}

pub fn load(path: &Path) -> Model {
    Model::load(path.to_str().unwrap(), &LoadOptions::f32_base()).unwrap()
}

pub fn logits(model: &Model) -> Tensor {
    let ids = Tensor::new(&[[1u32, 80, 81, 82, 2, 90]], &Device::Cpu).unwrap();
    model.lm.forward(&ids).unwrap()
}

/// The logits of `base` with the fixture adapter on top, unmerged.
pub fn adapted_logits(fx: &Fixture, base: &Path) -> Tensor {
    let mut model = load(base);
    model.load_adapter(&fx.adapter).unwrap();
    logits(&model)
}

pub fn adapter(fx: &Fixture) {
    let merged = logits(&load(&merge(fx, "merge-adapter", &[])));
    let diff = crate::common::max_abs_diff(&merged, &adapted_logits(fx, &fx.model));
    assert!(diff < 1e-4, "merged vs adapted: {diff}");
    assert!(crate::common::max_abs_diff(&merged, &logits(&load(&fx.model))) > 1e-3);
}

pub fn model(fx: &Fixture) {
    let out = merge(
        fx,
        "merge-model",
        &["--model", fx.other_model.to_str().unwrap()],
    );
    let diff =
        crate::common::max_abs_diff(&logits(&load(&out)), &adapted_logits(fx, &fx.other_model));
    assert!(diff < 1e-4, "merged onto the other base: {diff}");
}

pub fn out(fx: &Fixture) {
    let out = merge(fx, "merge-out", &[]);
    for file in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    run::ok(
        "generate",
        &[
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ],
    );
}

pub fn bf16(fx: &Fixture) {
    let out = merge(fx, "merge-bf16", &["--bf16"]);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(file
        .tensors()
        .iter()
        .all(|(_, t)| t.dtype() == safetensors::Dtype::BF16));
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(config.contains("bfloat16"), "{config}");
    let f32_size = std::fs::metadata(merge(fx, "merge-f32", &[]).join("model.safetensors"))
        .unwrap()
        .len();
    assert!((bytes.len() as u64) < f32_size * 6 / 10, "half the bytes");
}
