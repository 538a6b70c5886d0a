//! `compare`: each flag's effect on the reports it writes (`report.json`).

use crate::fixture::{record, Fixture};
use crate::run;
use serde_json::Value;
use std::path::Path;

/// `compare`'s arguments for reports into `out`: the tiny model and the
/// fixture data, 2 held-out examples, 1 shot, answers of at most 4 tokens;
/// `extra` adds flags or overrides these.
fn args<'a>(fx: &'a Fixture, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut base = fx.on_tiny().to_vec();
    base.extend(["--out", out.to_str().unwrap(), "--limit", "2"]);
    base.extend(["--shots", "1", "--max-tokens", "4"]);
    run::with_overrides(&base, extra)
}

/// Runs `compare` (see [`args`]) with the fixture adapter; returns report.json.
fn compare(fx: &Fixture, name: &str, extra: &[&str]) -> Value {
    let out = fx.path(name);
    let adapter = ["--adapter", fx.adapter.to_str().unwrap()];
    let extra = if extra.contains(&"--adapter") {
        extra.to_vec()
    } else {
        [&adapter[..], extra].concat()
    };
    run::ok("compare", &args(fx, &out, &extra));
    report(&out)
}

fn report(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("report.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn names(report: &Value) -> Vec<String> {
    report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn answers(report: &Value) -> Vec<String> {
    report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["outputs"].as_array().unwrap().clone())
        .map(|o| o["answer"].as_str().unwrap().to_string())
        .collect()
}

/// Each variant's mean teacher-forced NLL of the references.
fn nlls(report: &Value) -> Vec<f64> {
    report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["nll"].as_f64().unwrap())
        .collect()
}

fn baseline(fx: &Fixture) -> &'static Value {
    static BASELINE: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    BASELINE.get_or_init(|| compare(fx, "compare-baseline", &[]))
}

pub fn data(fx: &Fixture) {
    let r = compare(fx, "compare-data", &["--limit", "100"]);
    assert_eq!(
        r["examples"].as_array().unwrap().len(),
        4,
        "test.jsonl's 4 records"
    );
    assert!(
        r["data"].as_str().unwrap().contains("data"),
        "{}",
        r["data"]
    );
    let err = run::fails(
        "compare",
        &["--data", "no-such-data", "--model", fx.model_arg()],
    );
    assert!(err.contains("no-such-data"), "{err}");
    let notes = |r: &Value| r["notes"].to_string();
    assert_eq!(r["seen_in_training"], serde_json::json!([]));
    assert!(!notes(&r).contains("has no test.jsonl"), "{}", notes(&r));

    // A folder without test.jsonl falls back to valid.jsonl, and says what
    // that costs; a held-out question that is also a training record is
    // named in the notes, the verdict and report.json.
    let folder = fx.path("compare-valid-only");
    std::fs::create_dir_all(&folder).unwrap();
    let lines = |ids: &[usize]| ids.iter().map(|&i| record(i) + "\n").collect::<String>();
    std::fs::write(
        folder.join("train.jsonl"),
        lines(&(0..16).collect::<Vec<_>>()),
    )
    .unwrap();
    std::fs::write(folder.join("valid.jsonl"), lines(&[100, 101, 3, 102])).unwrap();
    let r = compare(
        fx,
        "compare-valid-only-out",
        &["--data", folder.to_str().unwrap(), "--limit", "100"],
    );
    assert!(
        r["data"].as_str().unwrap().ends_with("valid.jsonl"),
        "{}",
        r["data"]
    );
    assert!(notes(&r).contains("has no test.jsonl"), "{}", notes(&r));
    assert_eq!(r["seen_in_training"], serde_json::json!([2]));
    assert!(
        notes(&r).contains("1 of the 4 held-out questions also stand in the training pool"),
        "{}",
        notes(&r)
    );
    let verdict = r["verdict"].as_str().unwrap();
    assert!(
        verdict.contains("Caution: 1 of these 4 questions"),
        "{verdict}"
    );
}

pub fn adapter(fx: &Fixture) {
    let with = baseline(fx);
    assert!(
        names(with).contains(&"fine-tuned".to_string()),
        "{:?}",
        names(with)
    );
    let two = compare(
        fx,
        "compare-adapter-twice",
        &[
            "--adapter",
            fx.adapter.to_str().unwrap(),
            "--adapter",
            fx.adapter.to_str().unwrap(),
        ],
    );
    assert_eq!(
        names(&two)
            .iter()
            .filter(|n| n.starts_with("fine-tuned"))
            .count(),
        4,
        "{:?}",
        names(&two)
    );
    // A run's best/ adapter is charged its whole run's training.
    let best = fx.adapter.join("best");
    let from_best = compare(
        fx,
        "compare-adapter-best",
        &["--adapter", best.to_str().unwrap()],
    );
    let tokens = |r: &Value| r["training"][0]["tokens"].as_u64();
    assert!(tokens(with).is_some_and(|t| t > 0), "{}", with["training"]);
    assert_eq!(
        tokens(&from_best),
        tokens(with),
        "{}",
        from_best["training"]
    );
    assert!(!from_best["break_even"].as_array().unwrap().is_empty());
    let out = fx.path("compare-no-adapter");
    run::ok("compare", &args(fx, &out, &[]));
    assert!(names(&report(&out)).iter().all(|n| n.starts_with("base")));
}

pub fn batch(fx: &Fixture) {
    // Every variant's answers, decoded one at a time and three at a time, are
    // those of the default batch, and so are the references' scores (scored
    // apart one at a time; in the pass that prefills the prompt when batched).
    let all = ["--limit", "100"];
    let default = compare(fx, "compare-batch-default", &all);
    for n in ["1", "3"] {
        let r = compare(
            fx,
            &format!("compare-batch-{n}"),
            &[&all[..], &["--batch", n]].concat(),
        );
        assert_eq!(answers(&r), answers(&default), "--batch {n}");
        for (a, b) in nlls(&r).into_iter().zip(nlls(&default)) {
            assert!(
                (a - b).abs() < 1e-4 * b.max(1.0),
                "--batch {n}: NLL {a} vs {b}"
            );
        }
    }
    let out = fx.path("compare-batch-0");
    let err = run::fails("compare", &args(fx, &out, &["--batch", "0"]));
    assert!(err.contains("batch size must be at least 1"), "{err}");
}

pub fn model(fx: &Fixture) {
    let r = compare(
        fx,
        "compare-model",
        &["--adapter", fx.adapter.to_str().unwrap()],
    );
    assert_eq!(r["model"].as_str().unwrap(), fx.model_arg());
    let other = compare(
        fx,
        "compare-model-other",
        &["--model", fx.other_model.to_str().unwrap()],
    );
    assert_eq!(
        other["model"].as_str().unwrap(),
        fx.other_model.to_str().unwrap()
    );
    assert_ne!(
        answers(&other),
        answers(&r),
        "another model answers otherwise"
    );
}

pub fn system(fx: &Fixture) {
    let r = compare(
        fx,
        "compare-system",
        &["--system", "Answer with JSON only."],
    );
    assert_eq!(r["instruction"], "Answer with JSON only.");
    assert!(baseline(fx)["instruction"]
        .as_str()
        .unwrap()
        .contains("category"));
}

pub fn shots(fx: &Fixture) {
    let names_of = |r: &Value| names(r);
    let base = names_of(baseline(fx));
    assert!(
        base.contains(&"base, retrieved few-shot (k=1, BM25)".to_string()),
        "{base:?}"
    );
    assert!(
        base.contains(&"base, random few-shot (k=1, draw 1)".to_string()),
        "{base:?}"
    );
    let none = compare(fx, "compare-shots-0", &["--shots", "0"]);
    assert!(
        !names(&none).iter().any(|n| n.contains("few-shot")),
        "{:?}",
        names(&none)
    );
    let two = compare(fx, "compare-shots-2", &["--shots", "2"]);
    assert!(names(&two).contains(&"base, retrieved few-shot (k=2, BM25)".to_string()));
    // The tiny model's context holds 256 tokens: 12 shots do not fit.
    let out = fx.path("compare-shots-12");
    let args = args(fx, &out, &["--shots", "12"]);
    let err = run::fails("compare", &args);
    assert!(
        err.contains("few-shot (k=12") && err.contains("lower --shots"),
        "{err}"
    );
}

pub fn draws(fx: &Fixture) {
    let random = |r: &Value| {
        names(r)
            .into_iter()
            .filter(|n| n.contains("random few-shot"))
            .count()
    };
    assert_eq!(random(baseline(fx)), 3, "three draws by default");
    assert!(baseline(fx)["random_few_shot"]["median"].is_number());
    let one = compare(fx, "compare-draws-1", &["--draws", "1"]);
    assert_eq!(random(&one), 1);
    assert_eq!(one["random_few_shot"]["draws"], 1);
    let none = compare(fx, "compare-draws-0", &["--draws", "0"]);
    assert_eq!(random(&none), 0);
    assert!(none["random_few_shot"].is_null());
}

pub fn limit(fx: &Fixture) {
    let one = compare(fx, "compare-limit", &["--limit", "1"]);
    for v in one["variants"].as_array().unwrap() {
        assert_eq!(v["outputs"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        baseline(fx)["variants"][0]["outputs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

pub fn max_tokens(fx: &Fixture) {
    let short = compare(fx, "compare-max-tokens", &["--max-tokens", "2"]);
    // The tiny model's tokenizer has one token per byte.
    assert!(
        answers(&short).iter().all(|a| a.len() <= 2),
        "{:?}",
        answers(&short)
    );
    assert!(answers(baseline(fx)).iter().any(|a| a.len() > 2));
    // References longer than the cap cannot be matched: the notes say so, and
    // each variant says how many of its answers the cap stopped.
    let notes = short["notes"].to_string();
    assert!(
        notes.contains("2 of the 2 reference answers are longer than --max-tokens (2 tokens)"),
        "{notes}"
    );
    let variant_notes: Vec<&str> = short["variants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["note"].as_str())
        .collect();
    assert!(
        variant_notes
            .iter()
            .any(|n| n.contains("of 2 answers stopped at --max-tokens (2)")),
        "{variant_notes:?}"
    );
    let long = compare(fx, "compare-max-tokens-long", &["--max-tokens", "40"]);
    assert!(
        !long["notes"]
            .to_string()
            .contains("reference answers are longer"),
        "{}",
        long["notes"]
    );
}

pub fn temperature(fx: &Fixture) {
    let sampled = compare(fx, "compare-temperature", &["--temperature", "1.5"]);
    assert_ne!(answers(&sampled), answers(baseline(fx)));
}

pub fn seed(fx: &Fixture) {
    let with = |s: &str| {
        answers(&compare(
            fx,
            &format!("compare-seed-{s}"),
            &["--temperature", "1.5", "--seed", s],
        ))
    };
    assert_ne!(with("1"), with("2"));
}

pub fn device(fx: &Fixture) {
    let r = compare(fx, "compare-device", &["--device", "cpu"]);
    assert_eq!(answers(&r), answers(baseline(fx)));
    let err = run::fails(
        "compare",
        &["--device", "tpu", "--data", fx.data.to_str().unwrap()],
    );
    assert!(err.contains("unknown device 'tpu'"), "{err}");
}

pub fn out(fx: &Fixture) {
    let out = fx.path("compare-out");
    compare(fx, "compare-out", &[]);
    for file in ["report.md", "report.html", "report.json"] {
        assert!(out.join(file).is_file(), "{file}");
    }
}

pub fn max_shots(fx: &Fixture) {
    let many = |r: &Value| names(r).into_iter().find(|n| n.contains("many-shot"));
    // By default, as many training examples as fit the tiny model's context.
    let fitted = baseline(fx)["many_shots"].as_u64().unwrap();
    assert!(fitted >= 2, "{fitted}");
    let two = compare(fx, "compare-max-shots-2", &["--max-shots", "2"]);
    assert_eq!(two["many_shots"], 2);
    assert_eq!(
        many(&two).unwrap(),
        "base, many-shot (k=2, at most 2, one shuffled order)"
    );
    let prompt = |r: &Value| {
        r["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str().unwrap().contains("many-shot"))
            .unwrap()["prompt_tokens"]
            .as_f64()
            .unwrap()
    };
    assert!(prompt(&two) < prompt(baseline(fx)) || fitted == 2);
    let none = compare(fx, "compare-max-shots-0", &["--max-shots", "0"]);
    assert_eq!(many(&none), None, "{:?}", names(&none));
    assert!(none["many_shots"].is_null());
}

pub fn scaling(fx: &Fixture) {
    let out = fx.path("compare-scaling");
    let flags = ["--scaling", "4,99,all"];
    let adapter = ["--adapter", fx.adapter.to_str().unwrap()];
    run::ok(
        "compare",
        &args(fx, &out, &[&adapter[..], &flags[..]].concat()),
    );
    let r = report(&out);
    let points = r["scaling"]["points"].as_array().unwrap();
    let sizes: Vec<u64> = points.iter().map(|p| p["n"].as_u64().unwrap()).collect();
    assert_eq!(
        sizes,
        [4, 16],
        "4 and all 16; 99 is more than the training set"
    );
    assert!(r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().contains("n=99 skipped")));
    assert!(
        r["scaling"].get("clearly_from").is_some(),
        "{}",
        r["scaling"]
    );
    assert!(
        r["verdict"]
            .as_str()
            .unwrap()
            .contains("On the scaling curve (n = 4, 16), fine-tuning is"),
        "{}",
        r["verdict"]
    );
    for p in points {
        assert!(p["paired"]["p_value"].is_number(), "{p}");
        let run = std::path::PathBuf::from(p["run"].as_str().unwrap());
        assert!(run.starts_with(out.join("scaling")), "{run:?}");
        assert!(run.join("adapter_model.safetensors").is_file());
        assert_eq!(p["reused"], false);
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Data scaling"), "{md}");
    // Run again: the runs are reused.
    run::ok(
        "compare",
        &args(fx, &out, &[&adapter[..], &flags[..]].concat()),
    );
    let again = report(&out);
    assert!(again["scaling"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["reused"] == true));
    // Without a run folder to take settings from, --scaling is refused.
    let err = run::fails(
        "compare",
        &args(fx, &fx.path("compare-scaling-none"), &flags),
    );
    assert!(
        err.contains("--scaling needs a fine-tuning run folder"),
        "{err}"
    );
    let err = run::fails(
        "compare",
        &args(
            fx,
            &fx.path("compare-scaling-bad"),
            &[&adapter[..], &["--scaling", "4,x"]].concat(),
        ),
    );
    assert!(err.contains("'x' is not a training-set size"), "{err}");
}

fn notes(r: &Value) -> Vec<String> {
    (r["notes"].as_array().unwrap().iter())
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

pub fn quantize(fx: &Fixture) {
    let r = compare(fx, "compare-quantize", &["--quantize", "q8_0"]);
    assert!(
        notes(&r).iter().any(|n| n.contains("--quantize q8_0")),
        "{:?}",
        notes(&r)
    );
    // Not given: as the adapter's run trained it (dense, for the fixture run).
    assert!(!notes(baseline(fx)).iter().any(|n| n.contains("--quantize")));
}

/// `--dtype bf16` runs the base in bf16 and the report says so; not given,
/// the adapter's run's precision.
pub fn dtype(fx: &Fixture) {
    let r = compare(fx, "compare-dtype", &["--dtype", "bf16"]);
    assert!(
        notes(&r)
            .iter()
            .any(|n| n == "the base ran in bf16 (--dtype bf16)"),
        "{:?}",
        notes(&r)
    );
    let trained = match tuneforge::cpu::features().has_bf16_arithmetic() {
        true => "bf16",
        false => "f32",
    };
    let want = format!("the base ran in {trained} (--dtype {trained})");
    assert!(
        notes(baseline(fx)).contains(&want),
        "{:?}",
        notes(baseline(fx))
    );
    let f32 = compare(fx, "compare-dtype-f32", &["--dtype", "f32"]);
    assert_ne!(nlls(&r), nlls(&f32), "bf16 weights score otherwise");
}

/// The fixture's questions ("ticket N about LABEL") differ from training
/// ones of the same label in one word of four: ROUGE-L 0.75, near-duplicates
/// at the default 0.7, and none at 0.9.
pub fn near_duplicate(fx: &Fixture) {
    let r = baseline(fx);
    let near = r["near_duplicates"].as_array().unwrap();
    assert_eq!(near.len(), 2, "{near:?}");
    assert_eq!(r["near_duplicate_threshold"], 0.7);
    for n in near {
        assert_eq!(n["similarity"], 0.75, "{n}");
        assert!(
            n["training"].as_str().unwrap().contains("train.jsonl:"),
            "{n}"
        );
    }
    assert!(
        r["verdict"]
            .as_str()
            .unwrap()
            .contains("Caution: every held-out question has a near-duplicate"),
        "{}",
        r["verdict"]
    );
    let strict = compare(fx, "compare-near-duplicate", &["--near-duplicate", "0.9"]);
    assert_eq!(strict["near_duplicates"], serde_json::json!([]));
    assert!(!strict["notes"].to_string().contains("near-duplicate"));
    let err = run::fails(
        "compare",
        &args(fx, &fx.path("compare-near-0"), &["--near-duplicate", "0"]),
    );
    assert!(err.contains("--near-duplicate 0"), "{err}");
}
