//! `make_triage_data`: it writes the bundled dataset, byte for byte.

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
}
