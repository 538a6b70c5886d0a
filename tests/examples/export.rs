//! `export`: the GGUF files it writes load back into tuneforge and answer as
//! the base with the adapter does; each flag changes what is written.

use crate::fixture::Fixture;
use crate::merge::{self, adapted_logits};
use crate::run;
use candle_core::quantized::gguf_file;
use candle_core::Tensor;
use std::path::{Path, PathBuf};

fn export(fx: &Fixture, name: &str, extra: &[&str]) -> (PathBuf, String) {
    let out = fx.path(name);
    let stdout = run::ok(
        "export",
        &run::with_overrides(&fx.adapter_args(&out), extra),
    )
    .stdout;
    (out, stdout)
}

/// The logits of a saved model, on the prompt `merge`'s checks use.
fn logits(path: &Path) -> Tensor {
    merge::logits(&merge::load(path))
}

fn metadata(path: &Path) -> gguf_file::Content {
    let mut file = std::fs::File::open(path).unwrap();
    gguf_file::Content::read(&mut file).unwrap()
}

pub fn adapter(fx: &Fixture) {
    let (out, stdout) = export(fx, "export-adapter", &[]);
    let gguf = metadata(&out.join("adapter.gguf"));
    let text = |k: &str| gguf.metadata[k].to_string().unwrap().clone();
    assert_eq!(text("general.type"), "adapter");
    assert_eq!(text("adapter.type"), "lora");
    // The fixture adapter: r = 8, alpha = 16, on all seven linears of two layers.
    assert_eq!(gguf.metadata["adapter.lora.alpha"].to_f32().unwrap(), 16.0);
    assert_eq!(gguf.tensor_infos.len(), 2 * 7 * 2);
    assert!(gguf
        .tensor_infos
        .contains_key("blk.1.ffn_down.weight.lora_b"));
    assert!(stdout.contains("14 adapted linears"), "{stdout}");
    assert!(!out.join("model.gguf").exists());
    let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    assert!(modelfile.contains("ADAPTER ./adapter.gguf"), "{modelfile}");
}

pub fn model(fx: &Fixture) {
    let other = fx.other_model.to_str().unwrap();
    let (out, _) = export(
        fx,
        "export-model",
        &["--model", other, "--merge", "--quant", "f32"],
    );
    let diff = crate::common::max_abs_diff(
        &logits(&out.join("model.gguf")),
        &adapted_logits(fx, &fx.other_model),
    );
    assert!(diff < 1e-4, "merged onto the other base: {diff}");
}

pub fn out(fx: &Fixture) {
    let (out, _) = export(fx, "export-out", &[]);
    for file in ["adapter.gguf", "Modelfile"] {
        assert!(out.join(file).is_file(), "{file}");
    }
}

pub fn merge(fx: &Fixture) {
    let (out, stdout) = export(fx, "export-merge", &["--merge", "--quant", "f32"]);
    let diff = crate::common::max_abs_diff(
        &logits(&out.join("model.gguf")),
        &adapted_logits(fx, &fx.model),
    );
    assert!(diff < 1e-4, "merged GGUF vs base + adapter: {diff}");
    let modelfile = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    assert!(
        modelfile.starts_with("# Made by tuneforge") && modelfile.contains("FROM ./model.gguf")
    );
    assert!(
        modelfile.contains("PARAMETER stop \"<|im_end|>\""),
        "{modelfile}"
    );
    assert!(stdout.contains("model.gguf (f32"), "{stdout}");
}

pub fn quant(fx: &Fixture) {
    let size = |q: &str| {
        let (out, _) = export(fx, &format!("export-quant-{q}"), &["--merge", "--quant", q]);
        let gguf = metadata(&out.join("model.gguf"));
        let dtype = gguf.tensor_infos["blk.0.attn_q.weight"].ggml_dtype;
        (
            std::fs::metadata(out.join("model.gguf")).unwrap().len(),
            dtype,
        )
    };
    let (f32_size, f32_type) = size("f32");
    let (q8_size, q8_type) = size("q8_0");
    assert_eq!(format!("{f32_type:?}"), "F32");
    assert_eq!(format!("{q8_type:?}"), "Q8_0");
    assert!(q8_size * 2 < f32_size, "q8_0 {q8_size} vs f32 {f32_size}");
    let err = run::fails(
        "export",
        &["--adapter", "x", "--out", "y", "--quant", "q3_k"],
    );
    assert!(err.contains("q3_k") && err.contains("q4_k_m"), "{err}");
}

pub fn overwrite(fx: &Fixture) {
    let (out, _) = export(fx, "export-overwrite", &[]);
    let args = fx.adapter_args(&out);
    let err = run::fails("export", &args);
    assert!(
        err.contains("already holds an export") && err.contains("--overwrite"),
        "{err}"
    );
    run::ok("export", &run::with_overrides(&args, &["--overwrite"]));
}
