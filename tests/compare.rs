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
            "base, many-shot (k=3, as many as fit, one shuffled order)",
            "base, zero-shot + JSON constraint",
            "fine-tuned",
            "fine-tuned + instruction"
        ]
    );
    // Many-shot: as many training examples as fit the tiny model's 256-token
    // context, the same block before every question.
    assert_eq!(c.many_shots, Some(3));
    assert!(c.variants[6].prompt_tokens > c.variants[2].prompt_tokens);
    // The best prompting variant again, held to the training answers' JSON.
    let constrained = &c.variants[7];
    assert!(
        constrained
            .note
            .as_deref()
            .unwrap()
            .contains("keys seen in training (category)"),
        "{constrained:?}"
    );
    assert_eq!(c.json_schema.as_ref().unwrap().fields[0].key, "category");
    for v in &c.variants {
        let q = &v.cost;
        assert!(
            q.prefill_s > 0.0 && q.decode_tokens > 0.0 && q.prefill_tokens > 0.0,
            "{v:?}"
        );
        assert!(
            q.prefill_tokens <= q.prefill_tokens_uncached + 1e-9,
            "{v:?}"
        );
        assert!((q.prefill_tokens_uncached - v.prompt_tokens).abs() < 1e-9);
    }
    // Questions sharing a prompt prefix (here: the many-shot block) read it
    // from the cache; without the cache each would prefill it again.
    let many = &c.variants[6].cost;
    assert!(
        many.prefill_tokens < many.prefill_tokens_uncached / 2.0,
        "{many:?}"
    );
    assert!(many.prefill_s < many.prefill_s_uncached, "{many:?}");
    assert!(
        c.notes
            .iter()
            .any(|n| n.contains("only 6 held-out examples")),
        "{:?}",
        c.notes
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
    // Prompting's extra cost per query counts its answers' tokens too, and
    // the fine-tune's own cost on the same footing (cached or not).
    assert!(!c.training[0].recompute);
    let by_name = |name: &str| c.variants.iter().find(|v| v.name == name).unwrap();
    for b in &c.break_even {
        let (p, ft) = (by_name(&b.prompting), by_name(&b.fine_tuned));
        let answer = p.cost.decode_tokens - ft.cost.decode_tokens;
        assert!((b.extra_answer_tokens - answer).abs() < 1e-9, "{b:?}");
        let tokens = b.extra_prompt_tokens + answer;
        let flops = (tokens > 0.0).then(|| 4.0 * c.training[0].tokens as f64 / (2.0 * tokens));
        assert_eq!(b.queries_by_flops, flops, "{b:?}");
        let uncached = p.cost.seconds_uncached() - ft.cost.seconds_uncached();
        let seconds = c.training[0].seconds;
        assert_eq!(
            b.queries_by_time_uncached,
            (uncached > 0.0).then(|| seconds / uncached)
        );
    }
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
    // The leader, picked from its side's variants, is tested against each
    // variant of the other side at 5% over its side's number.
    let t = &sig.test;
    let leader = c.variants.iter().find(|v| v.name == t.leader).unwrap();
    let side = c
        .variants
        .iter()
        .filter(|v| v.fine_tuned == leader.fine_tuned)
        .count();
    assert!((t.threshold - 0.05 / side as f64).abs() < 1e-12, "{t:?}");
    assert!(c
        .variants
        .iter()
        .any(|v| v.name == t.hardest && v.fine_tuned != leader.fine_tuned));
    assert_eq!(t.passed, !sig.conclusion.starts_with("no clear"));
    assert!(c.verdict.contains(&format!(
        "the leader \"{}\" must beat each of the",
        t.leader
    )));
    assert!(
        c.verdict.contains(&format!("Verdict: {}.", sig.conclusion))
            && c.verdict.contains("McNemar")
            && c.verdict.contains("can detect a difference of about"),
        "{}",
        c.verdict
    );
    // "ticket 12 about billing" shares 3 of 4 words with "ticket 0 about
    // billing": ROUGE-L 0.75, a near-duplicate at the default 0.7.
    assert_eq!(c.near_duplicates.len(), 6);
    assert!(c.near_duplicates.iter().all(|n| n.similarity == 0.75));
    assert!(c
        .verdict
        .contains("Caution: every held-out question has a near-duplicate"));
    // 4 of the 12 training answers are billing, the first of three equal
    // labels; 2 of the 6 held-out ones are.
    let m = c.majority_answer.as_ref().expect("answers repeat");
    assert_eq!(
        (m.answer.as_str(), m.count, m.of, m.exact_match),
        ("{\"category\": \"billing\"}", 4, 12, 2.0 / 6.0)
    );
    // The tiny random base answers no question right: its variants are all
    // below that floor, and the verdict names them.
    let floor: Vec<&str> = c
        .variants
        .iter()
        .filter(|v| v.exact_match <= m.exact_match)
        .map(|v| v.name.as_str())
        .collect();
    assert!(floor.contains(&"base, zero-shot"), "{floor:?}");
    assert!(
        c.verdict.contains(&format!(
            "Always giving the most common training answer would score 33.3%; {} variant",
            floor.len()
        )),
        "{}",
        c.verdict
    );
    let md = report::markdown(&c);
    assert!(md.contains("Always the most common training answer (4 of 12: `{\"category\": \"billing\"}`): 33.3% exact match"), "{md}");
    assert!(
        md.contains("| variant | near-duplicates (6) | the others (0) |"),
        "{md}"
    );
    assert!(md.contains("| variant | exact match (95% CI) |") && md.contains(&c.verdict));
    assert!(md.contains("| extra answer tokens/query |"), "{md}");

    let out = tempfile::tempdir().unwrap();
    report::write(&c, out.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(json["variants"].as_array().unwrap().len(), 10);
    assert_eq!(json["many_shots"], 3);
    assert!(json["variants"][6]["cost"]["prefill_s_uncached"].is_number());
    assert!(
        json["break_even"][0]["queries_by_time_uncached"].is_number()
            || json["break_even"][0]["queries_by_time_uncached"].is_null()
    );
    assert_eq!(json["random_few_shot"]["draws"], 3);
    assert!(json["variants"][0]["exact_match_interval"].is_array());
    assert!(json["significance"]["comparison"]["p_value"].is_number());
    assert!(json["significance"]["test"]["threshold"].is_number());
    let html = std::fs::read_to_string(out.path().join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("class=\"wrong\"")
            || html.contains("class=\"right\"")
    );
    assert!(html.contains(
        "<table id=\"near-duplicates\"><tr><th>variant</th><th>near-duplicates (6)</th><th>the others (0)</th></tr>"
    ));
    assert!(
        html.contains("<li id=\"majority-answer\">Always the most common training answer (4 of 12")
    );
    assert!(html.contains("id=\"costs\"") && html.contains("id=\"break-even-chart\"><svg"));
    check_in_chromium(&out.path().join("report.html"));
}

/// Answers constrained to the training answers' JSON are all valid JSON with
/// the training keys and values, whatever the model would have written.
#[test]
fn constrained_answers_are_valid_json() {
    let train = held(&(0..12).map(record).collect::<Vec<_>>(), "train.jsonl");
    let test = held(&(12..18).map(record).collect::<Vec<_>>(), "test.jsonl");
    let config = CompareConfig {
        max_shots: Some(0),
        generation: GenerationConfig::greedy(80),
        system_prompt: Some("JSON.".into()),
        ..config(0)
    };
    let c = compare(&mut tiny(), &[], &test, &train, &config).unwrap();
    let constrained = c.variants.last().unwrap();
    assert!(
        constrained.name.ends_with("+ JSON constraint"),
        "{}",
        constrained.name
    );
    assert_eq!(
        constrained.json_valid,
        Some(1.0),
        "{:?}",
        constrained.outputs
    );
    for o in &constrained.outputs {
        let v: serde_json::Value = serde_json::from_str(&o.answer).unwrap();
        let label = v["category"].as_str().unwrap();
        assert!(
            ["billing", "bug", "account"].contains(&label),
            "{}",
            o.answer
        );
    }
    // Field accuracy among valid outputs is reported beside the overall one.
    assert!(constrained.field_accuracy_valid.is_some());
    let free = &c.variants[0];
    assert!(
        free.json_valid < Some(1.0),
        "the random model writes no JSON unconstrained"
    );
}

/// Non-JSON answers skip the constrained variant with a note; a question too
/// long for the many-shot block gets fewer shots, and the report says so.
#[test]
fn limits_are_noted_not_errors() {
    let plain = |i: usize| Record::Completion {
        prompt: format!("ticket {i}"),
        completion: format!("answer {i}"),
    };
    let train = held(&(0..20).map(plain).collect::<Vec<_>>(), "train.jsonl");
    let mut questions: Vec<Record> = (20..25).map(plain).collect();
    questions.push(Record::Completion {
        prompt: "a long question ".repeat(9),
        completion: "answer".into(),
    });
    let test = held(&questions, "test.jsonl");
    let short = CompareConfig {
        system_prompt: Some("Answer.".into()),
        ..config(1)
    };
    let c = compare(&mut tiny(), &[], &test, &train, &short).unwrap();
    assert!(
        c.notes
            .iter()
            .any(|n| n.contains("constrained decoding skipped")),
        "{:?}",
        c.notes
    );
    assert!(c
        .variants
        .iter()
        .all(|v| !v.name.contains("JSON constraint")));
    let many = c
        .variants
        .iter()
        .find(|v| v.name.contains("many-shot"))
        .unwrap();
    let k = c.many_shots.unwrap();
    let note = many.note.as_deref().unwrap();
    assert!(
        note.starts_with(&format!(
            "1 of 6 questions are too long for {k} shots and got"
        )),
        "{note}"
    );
    // --max-shots caps the block.
    let capped = CompareConfig {
        max_shots: Some(2),
        ..short
    };
    let c = compare(&mut tiny(), &[], &test, &train, &capped).unwrap();
    assert_eq!(c.many_shots, Some(2));
    assert!(c
        .variants
        .iter()
        .any(|v| v.name == "base, many-shot (k=2, at most 2, one shuffled order)"));
}

/// The data-scaling curve on a tiny model: an adapter per size with the
/// run's settings, retrieved few-shot from the same examples, sizes larger
/// than the training set skipped with a note, and run folders reused.
#[test]
fn scaling_trains_each_size_and_reuses_its_run() {
    use tuneforge::eval::scaling::{scaling, ScalingConfig, Size};
    let run = tempfile::tempdir().unwrap();
    let adapter = trained_adapter(run.path());
    let data = Dataset {
        train: (0..12).map(record).collect(),
        valid: (12..14).map(record).collect(),
        ..Default::default()
    };
    let test = held(&(14..18).map(record).collect::<Vec<_>>(), "test.jsonl");
    let out = tempfile::tempdir().unwrap();
    let curve = ScalingConfig {
        sizes: vec![Size::Count(4), Size::Count(50), Size::All],
        run: adapter,
        dir: out.path().join("scaling"),
    };
    let mut model = tiny();
    let mut notes = Vec::new();
    let first = scaling(&mut model, &data, &test, &curve, &config(2), &mut notes).unwrap();
    let sizes: Vec<usize> = first.points.iter().map(|p| p.n).collect();
    assert_eq!(sizes, [4, 12]);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("n=50 skipped") && n.contains("only 12 examples")),
        "{notes:?}"
    );
    for p in &first.points {
        assert!(!p.reused);
        assert!(p.run.join("adapter_model.safetensors").is_file());
        let saved = tuneforge::train::RunConfig::read(&p.run).unwrap();
        assert_eq!(saved.train.max_steps, Some(4), "the run's own settings");
        let (lo, hi) = p.fine_tuned.interval;
        assert!(lo <= p.fine_tuned.exact_match && p.fine_tuned.exact_match <= hi);
    }
    // The crossover is where fine-tuning's lead holds to the largest size,
    // and a clear lead comes no earlier than a lead.
    let lead_from = first
        .points
        .iter()
        .rev()
        .take_while(|p| p.fine_tuned.exact_match > p.retrieved.exact_match)
        .last()
        .map(|p| p.n);
    assert_eq!(first.crossover, lead_from);
    assert!(first
        .clearly_from
        .is_none_or(|n| first.crossover.is_some_and(|c| c <= n)));
    for p in &first.points {
        let d = p.fine_tuned.exact_match - p.retrieved.exact_match;
        assert!((p.paired.difference - d).abs() < 1e-9, "{p:?}");
    }
    let again = scaling(
        &mut model,
        &data,
        &test,
        &curve,
        &config(2),
        &mut Vec::new(),
    )
    .unwrap();
    assert!(again.points.iter().all(|p| p.reused));
    for (a, b) in first.points.iter().zip(&again.points) {
        assert_eq!(a.fine_tuned.exact_match, b.fine_tuned.exact_match);
    }
    // The reports carry the curve.
    let mut c = compare(
        &mut model,
        &[],
        &test,
        &held(&data.train, "train.jsonl"),
        &config(2),
    )
    .unwrap();
    c.scaling = Some(again);
    let md = report::markdown(&c);
    assert!(
        md.contains("Data scaling") && md.contains("(reused)") && md.contains("| McNemar p |"),
        "{md}"
    );
    let html = report::html(&c, 4).unwrap();
    assert!(html.contains("id=\"scaling-chart\"><svg"));
    // The curve's sentence, the same as the verdict's.
    let summary = c.scaling.as_ref().unwrap().summary();
    assert!(html.contains(&format!("<p>{summary}</p>")), "{html}");
    // Each size's p-value through the template's `probability` filter.
    let p = &c.scaling.as_ref().unwrap().points[0].paired.p_value;
    assert!(
        html.contains("<th>McNemar p</th>")
            && html.contains(&format!(
                "<td>{}</td><td><code>",
                tuneforge::eval::significance::probability(*p)
            )),
        "{html}"
    );
    report::write(&c, out.path()).unwrap();
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
        .arg("--window-size=1200,4000")
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
