//! `make_triage_data`: it writes the bundled dataset, byte for byte, and no
//! message stands in two places (a test question seen in training would
//! measure recall).

use crate::fixture::Fixture;
use crate::run;

pub fn out(fx: &Fixture) {
    let out = fx.fresh("triage-data");
    run::ok("make_triage_data", &["--out", out.to_str().unwrap()]);
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        let (made, shipped) = (
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(bundled.join(file)).unwrap(),
        );
        assert!(made == shipped, "{file} differs from the bundled one");
    }
    let mut seen = std::collections::HashMap::new();
    for file in ["train.jsonl", "valid.jsonl", "test.jsonl"] {
        let text = std::fs::read_to_string(bundled.join(file)).unwrap();
        for (i, line) in text.lines().enumerate() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let prompt = record["prompt"].as_str().unwrap().to_string();
            let here = format!("{file}:{}", i + 1);
            if let Some(first) = seen.insert(prompt, here.clone()) {
                panic!("{here} repeats the message of {first}");
            }
        }
    }
}
