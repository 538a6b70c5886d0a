//! `finetune`'s optimizer and schedule flags: the learning rate and its
//! schedule, batches, epochs and steps, evaluations, checkpoints, early
//! stopping and clipping, each checked in `metrics.jsonl` or the settings.

use super::*;

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
