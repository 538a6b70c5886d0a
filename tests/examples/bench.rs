//! `bench`: which rows run, on which model, how often, and where they go.
//! Rows run on the tiny model; the timings themselves are not checked.

use crate::fixture::Fixture;
use crate::run;
use serde_json::Value;

/// A row whose name no other row's contains.
const FORWARD: &str = "forward, no grad, 4 x 128, bf16 base";

/// Runs `bench` on the tiny model, the forward row only, once, with the rows
/// saved as JSON; returns them.
fn bench(fx: &Fixture, name: &str, extra: &[&str]) -> (Vec<Value>, String) {
    let json = fx.fresh(name).join("rows.json");
    let base = [
        "--model",
        fx.model_arg(),
        "--only",
        FORWARD,
        "--reps",
        "1",
        "--json",
        json.to_str().unwrap(),
    ];
    let run = run::ok("bench", &run::with_overrides(&base, extra));
    let rows = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (rows, run.stdout)
}

pub fn suite(fx: &Fixture) {
    let (rows, _) = bench(fx, "bench-suite", &["--suite", "cpu"]);
    assert_eq!(rows[0]["name"], FORWARD);
    // The gpu suite's rows train at sizes a CPU takes minutes over; its row list shows it was chosen.
    let err = run::fails("bench", &["--suite", "gpu", "--only", "no such row"]);
    assert!(err.contains("qwen2.5-0.5b, all-7 r=16, 16 x 1024"), "{err}");
    // The qlora suite: its load row, on the fixture model, kept as stored.
    let only = ["--suite", "qlora", "--only", "model file, load, keep"];
    let (rows, _) = bench(fx, "bench-suite-qlora", &only);
    assert_eq!(rows[0]["name"], "model file, load, keep");
    assert!(rows[0]["peak_rss_mb"].as_f64().unwrap() > 0.0);
    let err = run::fails(
        "bench",
        &[
            "--suite",
            "cpu",
            "--only",
            "no such row",
            "--model",
            fx.model_arg(),
        ],
    );
    assert!(
        err.contains("greedy decoding") && !err.contains("qwen2.5"),
        "{err}"
    );
}

pub fn device(fx: &Fixture) {
    let (rows, _) = bench(fx, "bench-device", &["--device", "cpu"]);
    assert_eq!(rows.len(), 1);
    let err = run::fails("bench", &["--device", "tpu"]);
    assert!(err.contains("unknown device 'tpu'"), "{err}");
}

pub fn model(fx: &Fixture) {
    let (rows, _) = bench(
        fx,
        "bench-model",
        &["--model", fx.other_model.to_str().unwrap()],
    );
    assert_eq!(rows[0]["model"], fx.other_model.to_str().unwrap());
}

pub fn json(fx: &Fixture) {
    let (rows, stdout) = bench(fx, "bench-json", &[]);
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(
        stdout.contains(FORWARD),
        "the table is printed too: {stdout}"
    );
    assert!(
        stdout.contains("measured peaks: f32 FMA ") && stdout.contains(" peak |"),
        "the machine's peaks and each row's share of one: {stdout}"
    );
    // The bf16 peak (of AMX tiles, or of AVX512_BF16 dot products) is
    // measured where the CPU has a bf16 kernel, and bf16 base rows are held
    // against it there.
    let kernel = tuneforge::cpu::features().bf16_kernel();
    assert_eq!(stdout.contains("bf16 dot -"), kernel.is_none(), "{stdout}");
    let peak = match kernel {
        Some(tuneforge::cpu::Bf16Kernel::AmxBf16) => {
            "their share is of the bf16 tiles (AMX-BF16) peak"
        }
        _ => "their share is of the bf16 dot peak",
    };
    assert_eq!(stdout.contains(peak), kernel.is_some(), "{stdout}");
}

pub fn reps(fx: &Fixture) {
    let (rows, _) = bench(fx, "bench-reps", &["--reps", "2"]);
    assert_eq!(rows[0]["reps"], 2);
}

pub fn only(fx: &Fixture) {
    let (rows, _) = bench(fx, "bench-only", &["--only", "train, q+v, r=8, 4 x 128"]);
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "train, q+v, r=8, 4 x 128",
            "train, q+v, r=8, 4 x 128, bf16 base"
        ]
    );
    let bases: Vec<&str> = rows.iter().map(|r| r["base"].as_str().unwrap()).collect();
    assert_eq!(bases, ["f32", "bf16"], "each row's base precision");
}

/// The hidden flag each row's own process is started with.
pub fn row(fx: &Fixture) {
    let run = run::ok(
        "bench",
        &["--row", FORWARD, "--model", fx.model_arg(), "--reps", "1"],
    );
    let row: Value = serde_json::from_str(run.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(row["name"], FORWARD);
}

/// Random weights at SmolLM2-135M's shapes, with no model to fetch: the
/// forward and training rows only, each saying what it ran on.
pub fn random_weights(fx: &Fixture) {
    let json = fx.fresh("bench-random-weights").join("rows.json");
    let only = ["--random-weights", "--only", FORWARD, "--reps", "1"];
    run::ok(
        "bench",
        &[&only[..], &["--json", json.to_str().unwrap()]].concat(),
    );
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["model"], "random weights, SmolLM2-135M's shapes");
    assert_eq!(rows[0]["base"], "bf16");
    assert!(rows[0]["tokens_per_second"].as_f64().unwrap() > 0.0);
    let err = run::fails("bench", &["--random-weights", "--only", "greedy"]);
    assert!(
        err.contains("matches no row") && err.contains("train, q+v"),
        "{err}"
    );
    let err = run::fails("bench", &["--random-weights", "--model", fx.model_arg()]);
    assert!(err.contains("SmolLM2-135M's shapes"), "{err}");
}

/// Each row's time by stage: the frozen products, the bf16 kernel's
/// repacking and the loss counted, the shares printed under the table.
pub fn profile(fx: &Fixture) {
    let (rows, stdout) = bench(fx, "bench-profile", &["--profile"]);
    let profile = &rows[0]["profile"];
    let stage = |name: &str| -> f64 {
        let stages = profile["stages"].as_array().unwrap();
        let found = stages.iter().find(|s| s[0] == name);
        found.unwrap_or_else(|| panic!("no {name}: {profile}"))[1]
            .as_f64()
            .unwrap()
    };
    assert!(stage("frozen products, forward") > 0.0, "{profile}");
    assert!(stage("loss") > 0.0, "{profile}");
    let repacks = tuneforge::cpu::features().bf16_kernel().is_some();
    assert_eq!(stage("repacking weights") > 0.0, repacks, "{profile}");
    let counted: f64 = ["frozen products, forward", "loss", "repacking weights"]
        .map(stage)
        .iter()
        .sum();
    assert!(
        counted <= profile["thread_seconds"].as_f64().unwrap() * 1.05,
        "{profile}"
    );
    assert!(
        stdout.contains(&format!("{FORWARD}: "))
            && stdout.contains("thread-seconds per call: frozen products, forward"),
        "{stdout}"
    );
    let (rows, stdout) = bench(fx, "bench-no-profile", &[]);
    assert!(
        rows[0]["profile"].is_null() && !stdout.contains("thread-seconds"),
        "{stdout}"
    );
}
