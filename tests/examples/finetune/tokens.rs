//! `finetune`'s flags for what trains: the sequence length, which tokens
//! the loss is on, how a turn ends, and packing.

use super::*;

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
