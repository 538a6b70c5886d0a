//! GGUF export, checked against tuneforge itself for every architecture and
//! against real llama.cpp on the default model fine-tuned on the bundled data.
//!
//! llama.cpp comes from `llama-cpp-python` on PyPI, built from source once per
//! machine by `tests/llama_cpp/install.sh` (about 10 minutes, cached outside
//! the clone); `tests/llama_cpp/run.py` runs a GGUF in it.

#[path = "../common/mod.rs"]
mod common;

mod llama_cpp;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use tuneforge::eval::HeldOut;
use tuneforge::export::{export, ExportOptions, Quant};
use tuneforge::finetune::{run, Existing, JobConfig};
use tuneforge::model::FrozenWeight;
use tuneforge::quantize::format_name;
use tuneforge::{GenerationConfig, LoadOptions, Model, Quantize};

fn arch_fixture(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/archs")
        .join(arch)
}

fn load(path: &Path) -> Model {
    Model::load(path.to_str().unwrap(), &LoadOptions::f32_base())
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

/// The architectures with tiny reference models.
const ARCHS: [&str; 5] = ["qwen3", "smollm3", "gemma3", "gemma2", "phi3"];

/// Exports a reference model with its PEFT adapter, merged in f32, into a
/// fresh temporary folder.
fn export_fixture(arch: &str) -> (tempfile::TempDir, tuneforge::export::ExportReport) {
    let dir = arch_fixture(arch);
    let out = tempfile::tempdir().unwrap();
    let options = ExportOptions {
        merge: true,
        quant: Quant::F32,
        overwrite: false,
    };
    let report = export(load(&dir), &dir.join("adapter"), out.path(), &options)
        .unwrap_or_else(|e| panic!("{arch}: {e:#}"));
    (out, report)
}

fn gguf(path: &Path) -> gguf_file::Content {
    let mut file = std::fs::File::open(path).unwrap();
    gguf_file::Content::read(&mut file).unwrap()
}

/// The default model fine-tuned for 30 steps on the bundled data.
fn fine_tuned() -> &'static PathBuf {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    // As `finetune` does: candle's ops on the calling thread, whole shards on
    // tuneforge's pool (set before any test starts candle's pool).
    tuneforge::threads::init();
    RUN.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("export-run");
        let job = JobConfig {
            out: out.clone(),
            device: "cpu".into(),
            samples: 0,
            train: tuneforge::train::TrainConfig {
                learning_rate: 3e-3,
                max_steps: Some(30),
                eval_every: None,
                save_every: None,
                // The same adapter on every CPU, bf16 arithmetic or not.
                dtype: tuneforge::BaseDtype::F32,
                ..JobConfig::default().train
            },
            ..JobConfig::default()
        };
        run(&job, Existing::Overwrite, None).unwrap();
        out
    })
}

/// Exports the fine-tuned default model into a folder of its own.
fn exported(name: &str, merge: bool, quant: Quant) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("export-{name}"));
    let options = ExportOptions {
        merge,
        quant,
        overwrite: true,
    };
    let report = export(
        common::smollm2_as(tuneforge::DeviceSpec::Cpu, candle_core::DType::F32),
        fine_tuned(),
        &out,
        &options,
    )
    .unwrap();
    eprint!("{}", report.summary());
    out
}

/// The bundled test examples as chat prompts.
fn test_prompts() -> Vec<HeldOut> {
    let data = tuneforge::data::Dataset::load(&JobConfig::default().data).unwrap();
    data.test
        .iter()
        .map(|r| HeldOut::from_record(r).unwrap())
        .collect()
}

/// Every architecture exports: its merged GGUF (f32, under llama.cpp's names
/// and metadata keys) loads back into tuneforge with the logits of the base
/// with the PEFT adapter, and its adapter GGUF holds every adapted linear.
#[test]
fn every_architecture_exports_and_loads_back() {
    tuneforge::threads::init();
    for arch in ARCHS {
        let dir = arch_fixture(arch);
        let (out, report) = export_fixture(arch);
        let mut want = load(&dir);
        want.load_adapter(&dir.join("adapter")).unwrap();
        let ids = Tensor::new(&[[1u32, 80, 81, 82, 2, 90, 91]], &Device::Cpu).unwrap();
        let got = load(&out.path().join("model.gguf"));
        let diff = common::max_abs_diff(
            &got.lm.forward(&ids).unwrap(),
            &want.lm.forward(&ids).unwrap(),
        );
        assert!(diff < 1e-4, "{arch}: merged GGUF logits off by {diff}");
        // GGUF keeps floats as f32.
        let eps = (got.lm.config.rms_norm_eps, want.lm.config.rms_norm_eps);
        assert!((eps.0 - eps.1).abs() < 1e-6 * eps.1, "{arch}: {eps:?}");
        let got_config = tuneforge::ModelConfig {
            rms_norm_eps: eps.1,
            ..got.lm.config.clone()
        };
        assert_eq!(got_config, want.lm.config, "{arch}");
        let adapter = gguf(&report.adapter);
        let linears = want.lm.layers.len() * want.lm.layers[0].linears().len();
        assert_eq!(report.adapted_linears, linears, "{arch}");
        assert_eq!(adapter.tensor_infos.len(), 2 * linears, "{arch}");
        assert_eq!(
            adapter.metadata["general.architecture"]
                .to_string()
                .unwrap(),
            &gguf(&out.path().join("model.gguf")).metadata["general.architecture"]
                .to_string()
                .unwrap()
                .clone()
        );
    }
}

/// The merged GGUF trains again: a few steps from it lower the loss.
#[test]
fn the_merged_gguf_trains_again() {
    tuneforge::threads::init();
    let dir = arch_fixture("qwen3");
    let out = tempfile::tempdir().unwrap();
    let options = ExportOptions {
        merge: true,
        quant: Quant::F16,
        overwrite: false,
    };
    export(load(&dir), &dir.join("adapter"), out.path(), &options).unwrap();
    let data = out.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lines: String = (0..8)
        .map(|i| format!("{{\"prompt\": \"q{i}\", \"completion\": \"answer {i}\"}}\n"))
        .collect();
    std::fs::write(data.join("train.jsonl"), lines).unwrap();
    let job = JobConfig {
        model: out.path().join("model.gguf").display().to_string(),
        data,
        out: out.path().join("run"),
        device: "cpu".into(),
        samples: 0,
        train: tuneforge::train::TrainConfig {
            learning_rate: 1e-2,
            max_steps: Some(6),
            batch_size: 4,
            eval_every: None,
            save_every: None,
            ..Default::default()
        },
        ..JobConfig::default()
    };
    run(&job, Existing::Refuse, None).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(job.out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| match serde_json::from_str(l).unwrap() {
            tuneforge::train::Event::Step { loss, .. } => Some(loss),
            _ => None,
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(
        losses.last().unwrap() < losses.first().unwrap(),
        "{losses:?}"
    );
}

/// A K-quant export (q4_k_m: Q4_K and Q6_K, and Q5_0 and Q8_0 where
/// SmolLM2's 576-value rows are not whole 256-value blocks, as llama.cpp
/// falls back) loads with `--quantize keep` in its own blocks: its exact
/// products give the logits of the same file loaded dense, and the int8
/// kernel (where the CPU has it) stays within its rounding of them.
#[test]
fn a_k_quant_export_is_kept_in_its_blocks() {
    tuneforge::threads::init();
    let path = exported("q4_k_m-kept", true, Quant::Q4KM).join("model.gguf");
    let load_as = |quantize| {
        let options = LoadOptions {
            quantize,
            ..LoadOptions::f32_base()
        };
        Model::load(path.to_str().unwrap(), &options).unwrap()
    };
    let (mut kept, dense) = (load_as(Quantize::Keep), load_as(Quantize::None));
    let mut formats: Vec<String> = kept
        .lm
        .layers
        .iter()
        .flat_map(|b| b.linears())
        .filter_map(|(_, l)| match &l.weight {
            FrozenWeight::Quantized(q) => Some(format_name(q.format())),
            _ => None,
        })
        .collect();
    formats.sort();
    formats.dedup();
    assert_eq!(formats, ["Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
    let prompts: Vec<u32> = test_prompts()
        .iter()
        .flat_map(|h| kept.chat_prompt_ids(&h.prompt).unwrap())
        .take(4 * 80)
        .collect();
    let input = Tensor::from_vec(prompts, (4, 80), &Device::Cpu).unwrap();
    kept.lm.set_low_precision_kernels(false);
    let exact = kept.lm.forward(&input).unwrap();
    let diff = common::max_abs_diff(&exact, &dense.lm.forward(&input).unwrap());
    assert!(diff < 1e-3, "kept and dense logits differ by {diff}");
    match tuneforge::cpu::features().int8_kernel() {
        Some(kernel) => common::Int8Departure::measure(&mut kept, &input)
            .assert_small(&format!("q4_k_m export on {kernel}")),
        None => eprintln!("no int8 kernel on this CPU (AVX512_VNNI): its check skipped"),
    }
}

/// An adapter made for another base model is refused, naming both.
#[test]
fn an_adapter_for_another_base_is_refused() {
    tuneforge::threads::init();
    let dir = arch_fixture("qwen3");
    let adapter = tempfile::tempdir().unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(dir.join("adapter").join(file), adapter.path().join(file)).unwrap();
    }
    let config = adapter.path().join("adapter_config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["base_model_name_or_path"] = json!("someone/other-model");
    std::fs::write(&config, c.to_string()).unwrap();
    let mut base = load(&dir);
    base.source.repo = Some("Qwen/Qwen3-0.6B".into());
    let out = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        export(base, adapter.path(), out.path(), &ExportOptions::default()).unwrap_err()
    );
    assert!(
        err.contains("someone/other-model") && err.contains("Qwen/Qwen3-0.6B"),
        "{err}"
    );
}
