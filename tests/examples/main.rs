//! Every flag of every example, run the way a user runs it. [`ROWS`] names each
//! flag with the check that shows its effect: on what the example prints, the
//! files it writes or the configuration it resolves. A flag that an example's
//! `--help` lists without a row fails `every_flag_has_a_row`, so a new flag
//! cannot land untested.
//!
//! The examples run on tiny random models saved as HF folders (see
//! [`fixture::Fixture`]), so most runs take a moment; one test runs the real
//! default model end to end (`finetune`, then `generate --adapter`).

#[path = "../common/mod.rs"]
mod common;

mod bench;
mod compare;
mod export;
mod finetune;
mod fixture;
mod generate;
mod merge;
mod run;
mod triage;

use fixture::{fixture, Fixture};
use std::collections::BTreeSet;

/// How a row shows its flag's effect.
enum Check {
    /// Runs the example and asserts what the flag changed.
    Runs(fn(&Fixture)),
    /// The effect cannot be shown by running the example here (say, it needs
    /// hardware the test machine lacks): why. Every flag is run today.
    #[allow(dead_code)]
    Cannot(&'static str),
}

/// One flag of one example and its check.
struct Row {
    example: &'static str,
    flag: &'static str,
    check: Check,
}

macro_rules! rows {
    ($($example:literal $flag:literal => $check:expr,)*) => {
        &[$(Row { example: $example, flag: $flag, check: $check }),*]
    };
}

use Check::Runs;

/// Every flag of every example. `--help` (and `--version`) come from clap.
const ROWS: &[Row] = rows![
    "finetune" "--config" => Runs(finetune::config),
    "finetune" "--model" => Runs(finetune::model),
    "finetune" "--data" => Runs(finetune::data),
    "finetune" "--out" => Runs(finetune::out),
    "finetune" "--device" => Runs(finetune::device),
    "finetune" "--overwrite" => Runs(finetune::overwrite),
    "finetune" "--resume" => Runs(finetune::resume),
    "finetune" "--rank" => Runs(finetune::rank),
    "finetune" "--alpha" => Runs(finetune::alpha),
    "finetune" "--dropout" => Runs(finetune::dropout),
    "finetune" "--targets" => Runs(finetune::targets),
    "finetune" "--rslora" => Runs(finetune::rslora),
    "finetune" "--lr" => Runs(finetune::lr),
    "finetune" "--schedule" => Runs(finetune::schedule),
    "finetune" "--warmup" => Runs(finetune::warmup),
    "finetune" "--weight-decay" => Runs(finetune::weight_decay),
    "finetune" "--batch-size" => Runs(finetune::batch_size),
    "finetune" "--grad-accum" => Runs(finetune::grad_accum),
    "finetune" "--epochs" => Runs(finetune::epochs),
    "finetune" "--max-steps" => Runs(finetune::max_steps),
    "finetune" "--max-seq-len" => Runs(finetune::max_seq_len),
    "finetune" "--loss-on" => Runs(finetune::loss_on),
    "finetune" "--turn-end" => Runs(finetune::turn_end),
    "finetune" "--packing" => Runs(finetune::packing),
    "finetune" "--recompute" => Runs(finetune::recompute),
    "finetune" "--eval-every" => Runs(finetune::eval_every),
    "finetune" "--save-every" => Runs(finetune::save_every),
    "finetune" "--patience" => Runs(finetune::patience),
    "finetune" "--clip" => Runs(finetune::clip),
    "finetune" "--seed" => Runs(finetune::seed),
    "finetune" "--samples" => Runs(finetune::samples),
    "finetune" "--quantize" => Runs(finetune::quantize),
    "finetune" "--dtype" => Runs(finetune::dtype),
    "generate" "--prompt" => Runs(generate::prompt),
    "generate" "--model" => Runs(generate::model),
    "generate" "--adapter" => Runs(generate::adapter),
    "generate" "--system" => Runs(generate::system),
    "generate" "--device" => Runs(generate::device),
    "generate" "--max-tokens" => Runs(generate::max_tokens),
    "generate" "--temperature" => Runs(generate::temperature),
    "generate" "--top-k" => Runs(generate::top_k),
    "generate" "--top-p" => Runs(generate::top_p),
    "generate" "--seed" => Runs(generate::seed),
    "generate" "--quantize" => Runs(generate::quantize),
    "generate" "--dtype" => Runs(generate::dtype),
    "compare" "--data" => Runs(compare::data),
    "compare" "--adapter" => Runs(compare::adapter),
    "compare" "--model" => Runs(compare::model),
    "compare" "--system" => Runs(compare::system),
    "compare" "--shots" => Runs(compare::shots),
    "compare" "--draws" => Runs(compare::draws),
    "compare" "--max-shots" => Runs(compare::max_shots),
    "compare" "--scaling" => Runs(compare::scaling),
    "compare" "--limit" => Runs(compare::limit),
    "compare" "--max-tokens" => Runs(compare::max_tokens),
    "compare" "--temperature" => Runs(compare::temperature),
    "compare" "--seed" => Runs(compare::seed),
    "compare" "--device" => Runs(compare::device),
    "compare" "--batch" => Runs(compare::batch),
    "compare" "--out" => Runs(compare::out),
    "compare" "--quantize" => Runs(compare::quantize),
    "compare" "--dtype" => Runs(compare::dtype),
    "compare" "--near-duplicate" => Runs(compare::near_duplicate),
    "merge" "--adapter" => Runs(merge::adapter),
    "merge" "--model" => Runs(merge::model),
    "merge" "--out" => Runs(merge::out),
    "merge" "--bf16" => Runs(merge::bf16),
    "export" "--adapter" => Runs(export::adapter),
    "export" "--model" => Runs(export::model),
    "export" "--out" => Runs(export::out),
    "export" "--merge" => Runs(export::merge),
    "export" "--quant" => Runs(export::quant),
    "export" "--overwrite" => Runs(export::overwrite),
    "bench" "--suite" => Runs(bench::suite),
    "bench" "--device" => Runs(bench::device),
    "bench" "--model" => Runs(bench::model),
    "bench" "--json" => Runs(bench::json),
    "bench" "--reps" => Runs(bench::reps),
    "bench" "--only" => Runs(bench::only),
    "bench" "--row" => Runs(bench::row),
    "bench" "--random-weights" => Runs(bench::random_weights),
    "bench" "--profile" => Runs(bench::profile),
    "make_triage_data" "--out" => Runs(triage::out),
];

/// The examples that take flags, as `cargo run --example NAME` names them.
const EXAMPLES: [&str; 7] = [
    "finetune",
    "generate",
    "compare",
    "merge",
    "export",
    "bench",
    "make_triage_data",
];

/// The long flags an example's `--help` lists, clap's own left out.
fn documented_flags(example: &str) -> BTreeSet<String> {
    let help = run::ok(example, &["--help"]).stdout;
    help.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let first = words.next()?;
            let flag = if first.ends_with(',') {
                words.next()?
            } else {
                first
            };
            flag.starts_with("--")
                .then(|| flag.trim_end_matches(',').to_string())
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn every_flag_has_a_row() {
    let mut problems = Vec::new();
    for example in EXAMPLES {
        let tabled: BTreeSet<String> = ROWS
            .iter()
            .filter(|r| r.example == example)
            .map(|r| r.flag.to_string())
            .collect();
        let documented = documented_flags(example);
        assert!(!documented.is_empty(), "{example} --help lists no flag");
        for flag in documented.difference(&tabled) {
            problems.push(format!(
                "{example} {flag} has no row in tests/examples/main.rs ROWS"
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for r in ROWS {
        assert!(
            EXAMPLES.contains(&r.example),
            "{} is not an example",
            r.example
        );
        if !seen.insert((r.example, r.flag)) {
            problems.push(format!("{} {} has two rows", r.example, r.flag));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Runs the rows of one example, reporting every failing row, not just the first.
fn check_rows(example: &str) {
    let fx = fixture();
    let mut failures = Vec::new();
    for row in ROWS.iter().filter(|r| r.example == example) {
        match row.check {
            Check::Runs(check) => {
                let result = std::panic::catch_unwind(|| check(fx));
                if let Err(e) = result {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{example} {}: {msg}", row.flag));
                }
            }
            Check::Cannot(why) => eprintln!("{example} {}: not run here: {why}", row.flag),
        }
    }
    assert!(
        failures.is_empty(),
        "{} row(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn finetune_flags() {
    check_rows("finetune");
}

#[test]
fn generate_flags() {
    check_rows("generate");
}

#[test]
fn compare_flags() {
    check_rows("compare");
}

#[test]
fn merge_flags() {
    check_rows("merge");
}

#[test]
fn export_flags() {
    check_rows("export");
}

#[test]
fn bench_and_data_flags() {
    check_rows("bench");
    check_rows("make_triage_data");
}

/// The issue this file was written for: `finetune` on the real default model,
/// then `generate --adapter` on the run folder answers what `finetune` showed
/// after training, not what the base model says.
#[test]
fn generate_with_the_adapter_answers_as_finetune_showed() {
    let fx = fixture();
    let out = fx.fresh("real-run");
    let args = [
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "12",
        "--lr",
        "3e-3",
        "--samples",
        "1",
        "--eval-every",
        "0",
    ];
    let run = run::ok("finetune", &args);
    let field = |name: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(name))
            .unwrap_or_else(|| panic!("no '{name}' line in:\n{}", run.stdout))
            .trim()
            .to_string()
    };
    let (question, before, after) = (field("Q:"), field("before:"), field("after:"));
    assert_ne!(before, after, "training changed the answer");
    let with = run::ok(
        "generate",
        &[
            "--adapter",
            out.to_str().unwrap(),
            "--prompt",
            &question,
            "--max-tokens",
            "48",
        ],
    );
    let answer = run::one_line(&with.stdout);
    match after.strip_suffix("...") {
        Some(start) => assert!(answer.starts_with(start), "{answer} vs {after}"),
        None => assert_eq!(answer, after),
    }
    assert!(with.stderr.contains("[adapter "), "{}", with.stderr);
    let without = run::ok("generate", &["--prompt", &question, "--max-tokens", "48"]);
    let base = run::one_line(&without.stdout);
    match before.strip_suffix("...") {
        Some(start) => assert!(base.starts_with(start), "{base} vs {before}"),
        None => assert_eq!(base, before),
    }
}
