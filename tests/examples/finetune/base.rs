//! `finetune`'s flags for the frozen base: recomputation, `--quantize` and
//! `--dtype`, each checked in the settings and in what the run prints.

use super::*;

pub fn recompute(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-recompute", &["--recompute"]);
    assert_eq!(
        setting(&out, "train.recompute"),
        Some(toml::Value::Boolean(true))
    );
    let (kept, recomputed) = (losses(baseline(fx)), losses(&out));
    assert_eq!(kept.len(), recomputed.len());
    for (a, b) in kept.iter().zip(&recomputed) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "recomputing activations changes no loss: {kept:?} vs {recomputed:?}"
        );
    }
}

pub fn quantize(fx: &Fixture) {
    let (out, run) = finetune(fx, "finetune-quantize", &["--quantize", "q8_0"]);
    let saved = setting(&out, "train.quantize");
    assert_eq!(saved.as_ref().and_then(|v| v.as_str()), Some("q8_0"));
    assert!(
        run.stdout
            .contains("linear weights held as --quantize q8_0"),
        "{}",
        run.stdout
    );
    assert!(
        !same_adapter(&out, baseline(fx)),
        "a base in Q8_0 blocks trains another adapter"
    );
    // The tiny model's rows (32 and 64 values) are not whole Q4_K blocks of
    // 256: they fall back to Q5_0, as llama.cpp's do, in one line.
    let (_, run) = finetune(fx, "finetune-quantize-q4k", &["--quantize", "q4_k"]);
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains("Q4_K → Q5_0 for"))
        .collect();
    assert!(
        lines.len() == 2 && lines.iter().all(|l| l.contains("in 2 layers")),
        "one line per row length: {}",
        run.stdout
    );
    let bad = fx.path("finetune-quantize-bad");
    let err = run::fails("finetune", &args(fx, &bad, &["--quantize", "q3"]));
    assert!(err.contains("none, keep, q8_0, q4_k, q4_0"), "{err}");
}

/// `--dtype bf16` holds the base in bf16 (on the CPU, multiplied with
/// AMX-BF16 tile or AVX512_BF16 dot products where the CPU takes them, else
/// in f32), trains
/// another adapter than `--dtype f32`, and the run records which and says
/// how it multiplied; `auto` is recorded as what it resolved to on this CPU.
pub fn dtype(fx: &Fixture) {
    let text = |out: &std::path::Path| {
        let v = setting(out, "train.dtype");
        v.and_then(|v| v.as_str().map(str::to_string))
    };
    let (bf16, run) = finetune(fx, "finetune-dtype-bf16", &["--dtype", "bf16"]);
    assert_eq!(text(&bf16).as_deref(), Some("bf16"));
    let arithmetic = match tuneforge::cpu::features().bf16_kernel() {
        Some(tuneforge::cpu::Bf16Kernel::AmxBf16) => {
            "bf16 base (AMX-BF16 tile products, activations rounded to bf16);"
        }
        Some(_) => "bf16 base (AVX512_BF16 bf16 dot products, activations rounded to bf16);",
        None => "bf16 base (f32 products of the bf16 values);",
    };
    assert!(run.stdout.contains(arithmetic), "{}", run.stdout);
    let (f32, run) = finetune(fx, "finetune-dtype-f32", &["--dtype", "f32"]);
    assert_eq!(text(&f32).as_deref(), Some("f32"));
    assert!(
        run.stdout.contains("f32 base (f32 products);"),
        "{}",
        run.stdout
    );
    assert!(
        !same_adapter(&bf16, &f32),
        "a bf16 base trains another adapter"
    );
    let auto = match tuneforge::cpu::features().has_bf16_arithmetic() {
        true => "bf16",
        false => "f32",
    };
    assert_eq!(text(baseline(fx)).as_deref(), Some(auto), "auto, resolved");
    let bad = fx.path("finetune-dtype-bad");
    let err = run::fails("finetune", &args(fx, &bad, &["--dtype", "f16"]));
    assert!(err.contains("auto, f32, bf16"), "{err}");
}
