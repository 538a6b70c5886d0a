//! `finetune`: each flag's effect on the run folder (the resolved settings in
//! `train_config.toml`, the steps and evaluations in `metrics.jsonl`, the
//! adapter) or on what it prints.

mod base;
mod lora;
mod schedule;
mod tokens;

pub use base::{dtype, quantize, recompute};
pub use lora::{alpha, dropout, rank, rslora, targets};
pub use schedule::{
    batch_size, clip, epochs, eval_every, grad_accum, lr, max_steps, patience, save_every,
    schedule, warmup, weight_decay,
};
pub use tokens::{loss_on, max_seq_len, packing, turn_end};

use crate::fixture::{
    adapter_config, adapter_tensors, evals, same_adapter, setting, steps, write_data, Fixture,
};
use crate::run;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `finetune`'s arguments for a run into `out`: the tiny model on the fixture
/// data, one epoch of 4 updates (16 records, batch 4), no warmup, no samples;
/// `extra` adds flags or overrides these.
fn args<'a>(fx: &'a Fixture, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut base = fx.on_tiny().to_vec();
    base.extend(["--out", out.to_str().unwrap(), "--epochs", "1"]);
    base.extend(["--batch-size", "4", "--warmup", "0", "--samples", "0"]);
    run::with_overrides(&base, extra)
}

/// Waits until a running `finetune` has logged `n` updates into `out`.
fn wait_for_steps(out: &Path, n: usize) {
    let start = std::time::Instant::now();
    while steps(out).len() < n {
        assert!(
            start.elapsed().as_secs() < 300,
            "no {n} updates in 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Runs `finetune` (see [`args`]) into a fresh folder named `name`.
fn finetune(fx: &Fixture, name: &str, extra: &[&str]) -> (PathBuf, run::Run) {
    let out = fx.path(name);
    let run = run::ok("finetune", &args(fx, &out, extra));
    (out, run)
}

/// The run with no extra flag, which the others are set against.
fn baseline(fx: &Fixture) -> &'static PathBuf {
    static BASELINE: OnceLock<PathBuf> = OnceLock::new();
    BASELINE.get_or_init(|| finetune(fx, "finetune-baseline", &[]).0)
}

fn int(v: Option<toml::Value>) -> i64 {
    v.and_then(|v| v.as_integer()).expect("an integer setting")
}

fn float(v: Option<toml::Value>) -> f64 {
    v.and_then(|v| v.as_float()).expect("a float setting")
}

fn text(v: Option<toml::Value>) -> String {
    v.and_then(|v| v.as_str().map(str::to_string))
        .expect("a string setting")
}

fn losses(out: &std::path::Path) -> Vec<f64> {
    steps(out).iter().map(|s| s.0).collect()
}

pub fn config(fx: &Fixture) {
    let dir = fx.fresh("finetune-config-file");
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        "[lora]\nr = 3\nalpha = 6.0\n\n[train]\nlearning_rate = 0.02\n",
    )
    .unwrap();
    let (out, _) = finetune(
        fx,
        "finetune-config",
        &["--config", job.to_str().unwrap(), "--rank", "5"],
    );
    assert_eq!(int(setting(&out, "lora.r")), 5, "a flag overrides the file");
    assert_eq!(
        float(setting(&out, "lora.alpha")),
        6.0,
        "the file overrides the default"
    );
    assert_eq!(float(setting(&out, "train.learning_rate")), 0.02);
    std::fs::write(&job, "[train]\nlearnign_rate = 0.02\n").unwrap();
    let err = run::fails("finetune", &["--config", job.to_str().unwrap()]);
    assert!(
        err.contains("job.toml") && err.contains("learnign_rate"),
        "{err}"
    );
}

pub fn model(fx: &Fixture) {
    let (out, _) = finetune(
        fx,
        "finetune-model",
        &["--model", fx.other_model.to_str().unwrap()],
    );
    assert_eq!(
        text(setting(&out, "base_model")),
        fx.other_model.to_str().unwrap()
    );
    let err = run::fails(
        "finetune",
        &[
            "--model",
            "no-such-model",
            "--out",
            fx.path("x").to_str().unwrap(),
        ],
    );
    assert!(err.contains("no-such-model"), "{err}");
}

pub fn data(fx: &Fixture) {
    let small = fx.fresh("finetune-data-small");
    write_data(&small, 8);
    let (out, run) = finetune(fx, "finetune-data", &["--data", small.to_str().unwrap()]);
    assert!(
        run.stdout.contains("Training data: 8 records"),
        "{}",
        run.stdout
    );
    assert_eq!(steps(&out).len(), 2, "8 records in batches of 4");
    // A record that parses but cannot be tokenized is named by file and line.
    let opening = fx.fresh("finetune-data-opening");
    let train = opening.join("train.jsonl");
    std::fs::write(
        &train,
        concat!(
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n",
            "{\"messages\": [{\"role\": \"assistant\", \"content\": \"hi\"}]}\n"
        ),
    )
    .unwrap();
    let err = run::fails(
        "finetune",
        &[
            "--data",
            opening.to_str().unwrap(),
            "--out",
            fx.path("finetune-data-opening-run").to_str().unwrap(),
        ],
    );
    let at = format!(
        "{}:2: the conversation opens with an assistant turn",
        train.display()
    );
    assert!(err.contains(&at), "{err}");
}

pub fn out(fx: &Fixture) {
    let out = baseline(fx);
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "train_config.toml",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint/optimizer.safetensors",
        "best/adapter_model.safetensors",
    ] {
        assert!(
            out.join(file).is_file(),
            "{file} is missing from {}",
            out.display()
        );
    }
}

pub fn device(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-device", &["--device", "cpu"]);
    assert_eq!(steps(&out).len(), 4);
    let err = run::fails("finetune", &["--device", "tpu"]);
    assert!(err.contains("unknown device 'tpu'"), "{err}");
    if cfg!(not(feature = "cuda")) {
        let x = fx.path("x");
        let err = run::fails("finetune", &args(fx, &x, &["--device", "cuda"]));
        assert!(err.contains("--features cuda"), "{err}");
    }
}

pub fn overwrite(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-overwrite", &[]);
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let args = args(fx, &out, &["--max-steps", "1"]);
    let err = run::fails("finetune", &args);
    assert!(err.contains("already holds a training run"), "{err}");
    assert_eq!(
        steps(&out).len(),
        4,
        "the refused run left the old one alone"
    );
    let mut again = args.to_vec();
    again.push("--overwrite");
    run::ok("finetune", &again);
    assert_eq!(steps(&out).len(), 1, "the new run replaced the old one");
    assert!(
        out.join("notes.txt").is_file(),
        "files that are not the run's are kept"
    );
}

/// Ctrl-C checkpoints; `--resume` then ends with the same losses as a run that
/// was never stopped, and refuses to change the run's settings.
pub fn resume(fx: &Fixture) {
    let extra = [
        "--max-steps",
        "150",
        "--batch-size",
        "2",
        "--eval-every",
        "0",
    ];
    let (whole, _) = finetune(fx, "finetune-resume-whole", &extra);
    let out = fx.path("finetune-resume");
    let args = args(fx, &out, &extra);
    let child = run::spawn("finetune", &args);
    wait_for_steps(&out, 3);
    run::signal(&child, libc::SIGINT);
    let stopped = run::wait_ok("finetune", &args, child);
    assert!(
        stopped.stdout.contains("Outcome: Interrupted"),
        "{}",
        stopped.stdout
    );
    let done = steps(&out).len();
    assert!(done < 150, "Ctrl-C stopped the run ({done} steps)");
    assert!(out.join("checkpoint/trainer_state.json").is_file());

    let mut resume = fx.on_tiny().to_vec();
    resume.extend(["--out", out.to_str().unwrap(), "--samples", "0", "--resume"]);
    let err = run::fails("finetune", &[&resume[..], &["--lr", "0.5"]].concat());
    assert!(err.contains("train.learning_rate"), "{err}");
    let resumed = run::ok("finetune", &resume);
    assert!(
        resumed.stdout.contains("Outcome: Finished after 150 steps"),
        "{}",
        resumed.stdout
    );
    assert_eq!(
        losses(&out),
        losses(&whole),
        "resumed losses equal the uninterrupted run's"
    );
    assert!(same_adapter(&out, &whole));
}

pub fn seed(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-seed", &["--seed", "7"]);
    assert_eq!(int(setting(&out, "train.seed")), 7);
    assert!(!same_adapter(&out, baseline(fx)), "another initialisation");
    let (again, _) = finetune(fx, "finetune-seed-again", &["--seed", "7"]);
    assert!(
        same_adapter(&out, &again),
        "the same seed trains the same adapter"
    );
}

pub fn samples(fx: &Fixture) {
    let (_, run) = finetune(fx, "finetune-samples", &["--samples", "2"]);
    assert!(
        run.stdout.contains("/2 before") && run.stdout.contains("/2 after"),
        "{}",
        run.stdout
    );
    assert_eq!(run.stdout.matches("  Q: ").count(), 2);
    assert_eq!(run.stdout.matches("  after: ").count(), 2);
}
