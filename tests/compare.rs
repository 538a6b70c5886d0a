//! The prompting-versus-fine-tuning comparison on a tiny model: every variant,
//! the reports, the errors for bad input, and report.html in headless Chromium.

use std::path::{Path, PathBuf};
use tuneforge::data::{Dataset, Record};
use tuneforge::eval::{compare, report, CompareConfig, HeldOut};
use tuneforge::train::{TrainConfig, Trainer};
use tuneforge::{Architecture, GenerationConfig, LoraConfig, Model};

fn tiny() -> Model {
    Model::tiny_random(Architecture::Llama, 21).unwrap()
}

fn record(i: usize) -> Record {
    let label = ["billing", "bug", "account"][i % 3];
    Record::Completion {
        prompt: format!("ticket {i} about {label}"),
        completion: format!("{{\"category\": \"{label}\"}}"),
    }
}

fn held(records: &[Record], file: &str) -> Vec<HeldOut> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| HeldOut {
            origin: format!("{file}:{}", i + 1),
            ..HeldOut::from_record(r).unwrap()
        })
        .collect()
}

fn trained_adapter(dir: &Path) -> PathBuf {
    let data = Dataset {
        train: (0..12).map(record).collect(),
        ..Default::default()
    };
    let config = TrainConfig {
        max_steps: Some(4),
        batch_size: 4,
        learning_rate: 1e-2,
        progress: false,
        ..Default::default()
    };
    Trainer::new(tiny(), LoraConfig::default(), config, dir)
        .unwrap()
        .train(&data)
        .unwrap();
    dir.to_path_buf()
}

fn config(shots: usize) -> CompareConfig {
    CompareConfig {
        shots,
        generation: GenerationConfig::greedy(12),
        progress: false,
        ..Default::default()
    }
}

#[test]
fn every_variant_is_scored_and_reported() {
    let run = tempfile::tempdir().unwrap();
    let adapter = trained_adapter(run.path());
    let train = held(&(0..12).map(record).collect::<Vec<_>>(), "train.jsonl");
    let test = held(&(12..18).map(record).collect::<Vec<_>>(), "test.jsonl");
    let c = compare(&mut tiny(), &[adapter], &test, &train, &config(2)).unwrap();
    let names: Vec<&str> = c.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "base, zero-shot",
            "base + instruction",
            "base, retrieved few-shot (k=2, BM25)",
            "base, random few-shot (k=2, draw 1)",
            "base, random few-shot (k=2, draw 2)",
            "base, random few-shot (k=2, draw 3)",
            "fine-tuned",
            "fine-tuned + instruction"
        ]
    );
    for v in &c.variants {
        assert_eq!(v.outputs.len(), 6);
        assert!(
            v.json_valid.is_some() && v.field_accuracy.is_some(),
            "JSON targets are scored as JSON"
        );
        assert!(v.nll.is_finite() && v.perplexity >= 1.0 && v.prompt_tokens > 0.0);
    }
    let few = &c.variants[2];
    assert!(
        few.prompt_tokens > c.variants[0].prompt_tokens,
        "few-shot prompts cost more tokens"
    );
    assert!(c.instruction.contains("category"), "{}", c.instruction);
    assert_eq!(c.training.len(), 1);
    assert!(c.training[0].tokens > 0);
    assert!(!c.break_even.is_empty());
    for v in &c.variants {
        let (lo, hi) = v.exact_match_interval;
        assert!(
            lo <= v.exact_match && v.exact_match <= hi && hi - lo > 0.1,
            "{v:?}"
        );
    }
    // The best fine-tuned variant against the best prompting one, paired.
    let sig = c.significance.as_ref().expect("an adapter was given");
    assert_eq!(sig.comparison.n, 6);
    let (lo, hi) = sig.comparison.interval;
    assert!(lo <= sig.comparison.difference && sig.comparison.difference <= hi);
    assert!((0.0..=1.0).contains(&sig.comparison.p_value));
    assert!(
        c.verdict.contains(&format!("Verdict: {}.", sig.conclusion))
            && c.verdict.contains("McNemar")
            && c.verdict.contains("can detect a difference of about"),
        "{}",
        c.verdict
    );
    let md = report::markdown(&c);
    assert!(md.contains("| variant | exact match (95% CI) |") && md.contains(&c.verdict));

    let out = tempfile::tempdir().unwrap();
    report::write(&c, out.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["variants"].as_array().unwrap().len(), 8);
    assert_eq!(json["random_few_shot"]["draws"], 3);
    assert!(json["variants"][0]["exact_match_interval"].is_array());
    assert!(json["significance"]["comparison"]["p_value"].is_number());
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("class=\"wrong\"")
            || html.contains("class=\"right\"")
    );
    check_in_chromium(&out.path().join("report.html"));
}

#[test]
fn bad_input_is_reported_clearly() {
    let run = tempfile::tempdir().unwrap();
    let adapter = trained_adapter(run.path());
    let train = held(&(0..3).map(record).collect::<Vec<_>>(), "train.jsonl");
    let test = held(&(3..5).map(record).collect::<Vec<_>>(), "test.jsonl");

    let err = compare(&mut tiny(), &[], &test, &train, &config(10))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--shots 10 is larger than the training set (3 examples in train.jsonl)"),
        "{err}"
    );

    let mut other = tiny();
    other.source.repo = Some("someone/other-model".into());
    let err = compare(&mut other, &[adapter], &test, &train, &config(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("trained on tuneforge/tiny-random") && err.contains("someone/other-model"),
        "{err}"
    );

    // The tiny model's context is 256 tokens: three long shots do not fit.
    let long: Vec<Record> = (0..3)
        .map(|i| Record::Completion {
            prompt: "x".repeat(120),
            completion: format!("{i}").repeat(60),
        })
        .collect();
    let err = compare(
        &mut tiny(),
        &[],
        &test,
        &held(&long, "train.jsonl"),
        &config(3),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("test.jsonl:1") && err.contains("context window"),
        "{err}"
    );
}

/// Opens the report in headless Chromium, checks it loads without console
/// errors, and that the accuracy chart's bars show in a screenshot. Skipped with
/// a message where Chromium is absent, unless TUNEFORGE_REQUIRE_CHROMIUM is set
/// (CI installs Chromium and sets it).
fn check_in_chromium(html: &Path) {
    let Some(chromium) = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    else {
        assert!(
            std::env::var_os("TUNEFORGE_REQUIRE_CHROMIUM").is_none(),
            "Chromium is required but not installed"
        );
        eprintln!("skipping the report.html browser check: Chromium is not installed (apt-get install chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("shot.png");
    let url = format!("file://{}", html.display());
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
    ];
    let profile = format!("--user-data-dir={}", dir.path().join("profile").display());
    let out = std::process::Command::new(chromium)
        .args(common)
        .arg(&profile)
        .arg("--window-size=1200,2000")
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {log}");
    assert!(
        !log.contains("Uncaught") && !log.contains(":CONSOLE"),
        "the page logged errors: {log}"
    );
    let dom = std::process::Command::new(chromium)
        .args(common)
        .arg(&profile)
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("id=\"accuracy-chart\"") && dom.contains("<svg"),
        "the chart is not in the loaded page"
    );

    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let count = |rgb: (u8, u8, u8)| {
        buf[..info.buffer_size()]
            .chunks(channels)
            .filter(|p| (p[0], p[1], p[2]) == rgb)
            .count()
    };
    // The accuracy chart's keys are blue and green (its bars may be empty for a
    // random model); the cost chart's bars are orange and never empty.
    let (blue, green, orange) = (
        count((68, 102, 204)),
        count((102, 187, 106)),
        count((230, 140, 40)),
    );
    assert!(
        blue > 50 && green > 50,
        "the accuracy chart is not visible in the screenshot ({blue} blue, {green} green pixels)"
    );
    assert!(
        orange > 2000,
        "the cost chart's bars are not visible in the screenshot ({orange} orange pixels)"
    );
    eprintln!("report.html rendered in {chromium}: chart pixels visible ({blue} blue, {green} green, {orange} orange)");
}
