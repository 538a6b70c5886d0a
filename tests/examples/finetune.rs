//! `finetune`: each flag's effect on the run folder (the resolved settings in
//! `train_config.toml`, the steps and evaluations in `metrics.jsonl`, the
//! adapter) or on what it prints.

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

pub fn rank(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-rank", &["--rank", "4"]);
    assert_eq!(int(setting(&out, "lora.r")), 4);
    assert_eq!(adapter_config(&out)["r"], 4);
    for (name, t) in adapter_tensors(&out) {
        let r = if name.contains("lora_A") {
            t.dims()[0]
        } else {
            t.dims()[1]
        };
        assert_eq!(r, 4, "{name}");
    }
}

pub fn alpha(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-alpha", &["--alpha", "3"]);
    assert_eq!(float(setting(&out, "lora.alpha")), 3.0);
    assert_eq!(adapter_config(&out)["lora_alpha"], 3.0);
    assert_ne!(
        losses(&out)[1..],
        losses(baseline(fx))[1..],
        "the scale changes training"
    );
}

pub fn dropout(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-dropout", &["--dropout", "0.3"]);
    assert_eq!(float(setting(&out, "lora.dropout")), 0.3);
    assert_eq!(adapter_config(&out)["lora_dropout"], 0.3);
    // B starts at zero, so the first loss is the base model's either way.
    assert_ne!(losses(&out)[1..], losses(baseline(fx))[1..]);
}

pub fn targets(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-targets", &["--targets", "q_proj,v_proj"]);
    let tensors = adapter_tensors(&out);
    let layers = adapter_tensors(baseline(fx)).len() / (2 * 7);
    assert_eq!(tensors.len(), 2 * 2 * layers);
    assert!(tensors
        .keys()
        .all(|k| k.contains("q_proj") || k.contains("v_proj")));
    let err = run::fails(
        "finetune",
        &[
            "--targets",
            "qkv",
            "--model",
            fx.model_arg(),
            "--out",
            fx.path("x").to_str().unwrap(),
        ],
    );
    assert!(err.contains("qkv") && err.contains("q_proj"), "{err}");
}

pub fn rslora(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-rslora", &["--rslora"]);
    assert_eq!(
        setting(&out, "lora.use_rslora"),
        Some(toml::Value::Boolean(true))
    );
    assert_eq!(adapter_config(&out)["use_rslora"], true);
    assert_ne!(losses(&out)[1..], losses(baseline(fx))[1..]);
}

pub fn lr(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-lr", &["--lr", "0.05"]);
    assert_eq!(float(setting(&out, "train.learning_rate")), 0.05);
    assert_eq!(
        steps(&out)[0].1,
        0.05,
        "with no warmup the first update uses the peak"
    );
}

pub fn schedule(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-schedule", &["--schedule", "constant"]);
    assert_eq!(text(setting(&out, "train.schedule")), "constant");
    let lrs: Vec<f64> = steps(&out).iter().map(|s| s.1).collect();
    assert!(lrs.iter().all(|&l| l == lrs[0]), "{lrs:?}");
    let cosine: Vec<f64> = steps(baseline(fx)).iter().map(|s| s.1).collect();
    assert!(cosine[3] < cosine[0], "the default decays: {cosine:?}");
    let err = run::fails("finetune", &["--schedule", "zigzag"]);
    assert!(err.contains("--schedule zigzag"), "{err}");
}

pub fn warmup(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-warmup", &["--warmup", "3"]);
    assert_eq!(int(setting(&out, "train.warmup_steps")), 3);
    let lrs: Vec<f64> = steps(&out).iter().map(|s| s.1).collect();
    assert!(lrs[0] < lrs[1] && lrs[1] < lrs[2], "{lrs:?}");
}

pub fn weight_decay(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-weight-decay", &["--weight-decay", "0.5"]);
    assert_eq!(float(setting(&out, "train.optimizer.weight_decay")), 0.5);
    assert!(!same_adapter(&out, baseline(fx)));
}

pub fn batch_size(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-batch-size", &["--batch-size", "2"]);
    assert_eq!(int(setting(&out, "train.batch_size")), 2);
    assert_eq!(steps(&out).len(), 8, "16 records in batches of 2");
}

pub fn grad_accum(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-grad-accum", &["--grad-accum", "2"]);
    assert_eq!(int(setting(&out, "train.grad_accum")), 2);
    assert_eq!(steps(&out).len(), 2, "two micro-batches per update");
}

pub fn epochs(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-epochs", &["--epochs", "2"]);
    assert_eq!(int(setting(&out, "train.epochs")), 2);
    assert_eq!(steps(&out).len(), 8);
}

pub fn max_steps(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-max-steps", &["--max-steps", "3"]);
    assert_eq!(int(setting(&out, "train.max_steps")), 3);
    assert_eq!(steps(&out).len(), 3);
    let (out, _) = finetune(fx, "finetune-max-steps-0", &["--max-steps", "0"]);
    assert_eq!(
        setting(&out, "train.max_steps"),
        None,
        "0: the epochs decide"
    );
    assert_eq!(steps(&out).len(), 4);
}

pub fn max_seq_len(fx: &Fixture) {
    let (out, run) = finetune(fx, "finetune-max-seq-len", &["--max-seq-len", "48"]);
    assert_eq!(int(setting(&out, "train.max_seq_len")), 48);
    assert!(
        run.stdout.contains("16 records, 16 truncated"),
        "{}",
        run.stdout
    );
}

pub fn loss_on(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-loss-on", &["--loss-on", "all"]);
    assert_eq!(text(setting(&out, "train.loss_on")), "all");
    let (all, default) = (steps(&out)[0].2, steps(baseline(fx))[0].2);
    assert!(
        all > 2 * default,
        "every token is trained: {all} vs {default}"
    );
    let err = run::fails("finetune", &["--loss-on", "everything"]);
    assert!(err.contains("--loss-on everything"), "{err}");
}

/// The default stops each turn's loss at its end-of-turn token; `rendered`
/// also trains the newline ChatML writes after it: one more token per example.
pub fn turn_end(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-turn-end", &["--turn-end", "rendered"]);
    assert_eq!(text(setting(&out, "train.turn_end")), "rendered");
    assert_eq!(text(setting(baseline(fx), "train.turn_end")), "end-token");
    let (rendered, default) = (steps(&out)[0].2, steps(baseline(fx))[0].2);
    assert_eq!(
        rendered,
        default + 4,
        "one newline more for each of the 4 examples"
    );
}

pub fn packing(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-packing", &["--packing"]);
    assert_eq!(
        setting(&out, "train.packing"),
        Some(toml::Value::Boolean(true))
    );
    assert_eq!(
        steps(&out).len(),
        1,
        "16 short records pack into one batch of rows"
    );
}

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

pub fn eval_every(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-eval-every", &["--eval-every", "1"]);
    assert_eq!(
        evals(&out),
        5,
        "before training and after each of 4 updates"
    );
    assert_eq!(evals(baseline(fx)), 2, "the default: before and after");
    let (out, _) = finetune(fx, "finetune-eval-every-0", &["--eval-every", "0"]);
    assert_eq!(setting(&out, "train.eval_every"), None);
    assert_eq!(evals(&out), 2);
}

/// A hard kill loses at most `--save-every` updates: the checkpoint is there.
pub fn save_every(fx: &Fixture) {
    for (every, name) in [("1", "finetune-save-every"), ("0", "finetune-save-every-0")] {
        let out = fx.path(name);
        let extra = [
            "--max-steps",
            "100000",
            "--batch-size",
            "2",
            "--save-every",
            every,
        ];
        let mut child = run::spawn("finetune", &args(fx, &out, &extra));
        wait_for_steps(&out, 3);
        child.kill().unwrap();
        child.wait().unwrap();
        // A kill between save_checkpoint's two renames leaves the last one aside.
        let state = ["checkpoint", "checkpoint.old"]
            .map(|d| out.join(d).join("trainer_state.json"))
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_default();
        if every == "1" {
            let text = std::fs::read_to_string(&state).expect("a checkpoint");
            let saved: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(saved["step"].as_u64().unwrap() >= 2, "{text}");
        } else {
            assert!(!state.is_file(), "0: no checkpoint until the end");
        }
    }
}

pub fn patience(fx: &Fixture) {
    // A learning rate too small to move the loss: evaluations soon stop improving.
    let (out, run) = finetune(
        fx,
        "finetune-patience",
        &["--patience", "1", "--eval-every", "1", "--lr", "1e-12"],
    );
    assert_eq!(int(setting(&out, "train.patience")), 1);
    assert!(
        run.stdout.contains("Outcome: EarlyStopped"),
        "{}",
        run.stdout
    );
    assert!(
        steps(&out).len() < 4,
        "stopped before the epoch's 4 updates"
    );
}

pub fn clip(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-clip", &["--clip", "0.000001"]);
    assert_eq!(float(setting(&out, "train.clip_grad_norm")), 0.000001);
    assert!(!same_adapter(&out, baseline(fx)));
    let (out, _) = finetune(fx, "finetune-clip-0", &["--clip", "0"]);
    assert_eq!(
        setting(&out, "train.clip_grad_norm"),
        None,
        "0 turns clipping off"
    );
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
/// AMX-BF16 tile or AVX512_BF16 dot products where the CPU has them, else
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
