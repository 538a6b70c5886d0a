//! What the rows run on: two tiny random models saved as HF folders, a small
//! JSON-answer dataset and an adapter trained on it, made once per test run
//! under cargo's scratch folder for tests.

use crate::run;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tuneforge::train::Event;
use tuneforge::{Architecture, Model};

pub struct Fixture {
    root: PathBuf,
    /// A tiny random Llama in an HF folder.
    pub model: PathBuf,
    /// The same shape with other weights: `model` with `adapter` merged in,
    /// so that it answers otherwise (random tiny models all ramble alike).
    pub other_model: PathBuf,
    /// `train.jsonl` (16 records), `valid.jsonl` and `test.jsonl` (4 each).
    pub data: PathBuf,
    /// A `finetune` run on `model` whose adapter changes its answers.
    pub adapter: PathBuf,
}

/// Training records that answer with a JSON object, as the bundled data does.
pub fn record(i: usize) -> String {
    let label = ["billing", "bug", "account"][i % 3];
    serde_json::json!({
        "prompt": format!("ticket {i} about {label}"),
        "completion": format!("{{\"category\": \"{label}\"}}"),
    })
    .to_string()
}

/// Writes a data folder with `train` training records and 4 validation and test records.
pub fn write_data(dir: &Path, train: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let lines = |range: std::ops::Range<usize>| range.map(|i| record(i) + "\n").collect::<String>();
    std::fs::write(dir.join("train.jsonl"), lines(0..train)).unwrap();
    std::fs::write(dir.join("valid.jsonl"), lines(100..104)).unwrap();
    std::fs::write(dir.join("test.jsonl"), lines(200..204)).unwrap();
}

/// The shared fixture, made on first use.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("examples-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fx = Fixture {
            model: root.join("tiny"),
            other_model: root.join("tiny-other"),
            data: root.join("data"),
            adapter: root.join("adapter"),
            root,
        };
        Model::tiny_random(Architecture::Llama, 5)
            .unwrap()
            .save_hf(&fx.model, DType::F32)
            .unwrap();
        write_data(&fx.data, 16);
        run::ok(
            "finetune",
            &[
                "--model",
                fx.model.to_str().unwrap(),
                "--data",
                fx.data.to_str().unwrap(),
                "--out",
                fx.adapter.to_str().unwrap(),
                "--max-steps",
                "4",
                "--lr",
                "0.02",
                "--samples",
                "0",
            ],
        );
        let mut other = Model::load(fx.model_arg(), &Default::default()).unwrap();
        other.load_adapter(&fx.adapter).unwrap();
        other.merge_adapters().unwrap();
        other.save_hf(&fx.other_model, DType::F32).unwrap();
        fx
    })
}

impl Fixture {
    /// An empty folder for one check (emptied if an earlier run left it).
    pub fn fresh(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A path for one check's output, not yet created.
    pub fn path(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    pub fn model_arg(&self) -> &str {
        self.model.to_str().unwrap()
    }

    /// `--model` the tiny model, `--adapter` the fixture run, `--out` `out`:
    /// the arguments of `merge` and `export`.
    pub fn adapter_args<'a>(&'a self, out: &'a Path) -> [&'a str; 6] {
        [
            "--model",
            self.model_arg(),
            "--adapter",
            self.adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
    }

    /// `--model` the tiny model, `--data` the fixture data.
    pub fn on_tiny(&self) -> [&str; 4] {
        [
            "--model",
            self.model_arg(),
            "--data",
            self.data.to_str().unwrap(),
        ]
    }
}

/// A run folder's `train_config.toml`, the resolved settings.
pub fn run_config(out: &Path) -> toml::Value {
    let text = std::fs::read_to_string(out.join("train_config.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

/// A value of `train_config.toml` by dotted path (`lora.r`), or `None` when absent.
pub fn setting(out: &Path, key: &str) -> Option<toml::Value> {
    let config = run_config(out);
    key.split('.').try_fold(&config, |v, k| v.get(k)).cloned()
}

/// The events of a run folder's `metrics.jsonl`.
pub fn events(out: &Path) -> Vec<Event> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The step events: (loss, lr, trained tokens).
pub fn steps(out: &Path) -> Vec<(f64, f64, usize)> {
    events(out)
        .into_iter()
        .filter_map(|e| match e {
            Event::Step {
                loss,
                lr,
                trained_tokens,
                ..
            } => Some((loss, lr, trained_tokens)),
            _ => None,
        })
        .collect()
}

/// How many evaluations a run logged.
pub fn evals(out: &Path) -> usize {
    events(out)
        .iter()
        .filter(|e| matches!(e, Event::Eval { .. }))
        .count()
}

/// An adapter's tensors by PEFT name.
pub fn adapter_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// An adapter's `adapter_config.json`.
pub fn adapter_config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}

/// Whether two adapters hold the same tensors.
pub fn same_adapter(a: &Path, b: &Path) -> bool {
    let (a, b) = (adapter_tensors(a), adapter_tensors(b));
    a.len() == b.len()
        && a.iter().all(|(k, t)| {
            b.get(k)
                .is_some_and(|u| t.dims() == u.dims() && crate::common::max_abs_diff(t, u) == 0.0)
        })
}
