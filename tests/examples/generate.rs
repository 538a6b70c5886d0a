//! `generate`: each flag's effect on the answer (stdout) or on what it reports
//! on stderr (`[prompt N tokens; answer M tokens, ...]`, the adapter used).

use crate::fixture::Fixture;
use crate::run;
use tuneforge::{GenerationConfig, LoadOptions, Message, Model};

/// An answer and the counts `generate` reported.
#[derive(Debug, PartialEq)]
struct Answer {
    text: String,
    prompt_tokens: usize,
    answer_tokens: usize,
    stderr: String,
}

/// Runs `generate` on the tiny model with a fixed prompt and at most 8 tokens;
/// `extra` adds flags or overrides these.
fn generate(fx: &Fixture, extra: &[&str]) -> Answer {
    let base = [
        "--model",
        fx.model_arg(),
        "--prompt",
        "ticket 7 about billing",
        "--max-tokens",
        "8",
    ];
    let run = run::ok("generate", &run::with_overrides(&base, extra));
    let count = |before: &str| -> usize {
        let rest = &run.stderr[run
            .stderr
            .find(before)
            .unwrap_or_else(|| panic!("{}", run.stderr))
            + before.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    Answer {
        text: run.stdout.clone(),
        prompt_tokens: count("[prompt "),
        answer_tokens: count("answer "),
        stderr: run.stderr.clone(),
    }
}

fn library_answer(model: &Model, messages: &[Message]) -> String {
    model
        .chat(messages, &GenerationConfig::greedy(8), &mut |_| {})
        .unwrap()
        .text
}

fn load(path: &std::path::Path) -> Model {
    Model::load(path.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

pub fn prompt(fx: &Fixture) {
    let short = generate(fx, &["--prompt", "hi"]);
    let long = generate(fx, &["--prompt", "hello there"]);
    assert_eq!(
        long.prompt_tokens,
        short.prompt_tokens + 9,
        "one token per byte"
    );
    let model = load(&fx.model);
    assert_eq!(short.text, library_answer(&model, &[Message::user("hi")]));
}

pub fn model(fx: &Fixture) {
    let other = generate(fx, &["--model", fx.other_model.to_str().unwrap()]);
    let model = load(&fx.other_model);
    assert_eq!(
        other.text,
        library_answer(&model, &[Message::user("ticket 7 about billing")])
    );
    assert_ne!(other.text, generate(fx, &[]).text);
    let err = run::fails("generate", &["--model", "no-such-model", "--prompt", "hi"]);
    assert!(err.contains("no-such-model"), "{err}");
}

/// The bug this table was made for: `--adapter` was parsed and never used.
pub fn adapter(fx: &Fixture) {
    let with = generate(fx, &["--adapter", fx.adapter.to_str().unwrap()]);
    let mut model = load(&fx.model);
    let plain = library_answer(&model, &[Message::user("ticket 7 about billing")]);
    model.load_adapter(&fx.adapter).unwrap();
    let tuned = library_answer(&model, &[Message::user("ticket 7 about billing")]);
    assert_ne!(plain, tuned, "the fixture adapter changes the answer");
    assert_eq!(with.text, tuned);
    assert!(
        with.stderr.contains("[adapter ") && with.stderr.contains("r=8"),
        "{}",
        with.stderr
    );
    let err = run::fails(
        "generate",
        &[
            "--model",
            fx.model_arg(),
            "--prompt",
            "hi",
            "--adapter",
            "no-such-run",
        ],
    );
    assert!(
        err.contains("no-such-run is not a folder") && err.contains("pass an adapter folder"),
        "{err}"
    );
}

pub fn system(fx: &Fixture) {
    let with = generate(fx, &["--system", "Be brief."]);
    let model = load(&fx.model);
    let messages = [
        Message::system("Be brief."),
        Message::user("ticket 7 about billing"),
    ];
    assert_eq!(
        with.prompt_tokens,
        model.chat_prompt_ids(&messages).unwrap().len()
    );
    assert!(with.prompt_tokens > generate(fx, &[]).prompt_tokens);
    assert_eq!(with.text, library_answer(&model, &messages));
}

pub fn device(fx: &Fixture) {
    assert_eq!(
        generate(fx, &["--device", "cpu"]).text,
        generate(fx, &[]).text
    );
    let err = run::fails("generate", &["--device", "tpu", "--prompt", "hi"]);
    assert!(err.contains("unknown device 'tpu'"), "{err}");
}

pub fn max_tokens(fx: &Fixture) {
    let (three, eight) = (generate(fx, &["--max-tokens", "3"]), generate(fx, &[]));
    assert!(
        three.answer_tokens <= 3 && eight.answer_tokens > 3,
        "{three:?} {eight:?}"
    );
    assert!(eight.text.starts_with(&three.text));
}

pub fn temperature(fx: &Fixture) {
    let sampled = generate(fx, &["--temperature", "1.5"]);
    assert_ne!(
        sampled.text,
        generate(fx, &[]).text,
        "sampling is not greedy"
    );
}

pub fn top_k(fx: &Fixture) {
    let one = generate(fx, &["--temperature", "1.5", "--top-k", "1"]);
    assert_eq!(
        one.text,
        generate(fx, &[]).text,
        "sampling from the top token is greedy"
    );
}

pub fn top_p(fx: &Fixture) {
    let tiny_p = generate(fx, &["--temperature", "1.5", "--top-p", "0.000001"]);
    assert_eq!(
        tiny_p.text,
        generate(fx, &[]).text,
        "the nucleus is the top token"
    );
}

pub fn seed(fx: &Fixture) {
    let with = |s: &str| generate(fx, &["--temperature", "1.5", "--seed", s]).text;
    assert_eq!(with("1"), with("1"), "a seed repeats");
    assert_ne!(with("1"), with("2"), "another seed samples otherwise");
}

pub fn quantize(fx: &Fixture) {
    let q8 = generate(fx, &["--quantize", "q8_0"]);
    let options = LoadOptions {
        quantize: tuneforge::Quantize::Q8_0,
        ..Default::default()
    };
    let model = Model::load(fx.model_arg(), &options).unwrap();
    let want = library_answer(&model, &[Message::user("ticket 7 about billing")]);
    assert_eq!(q8.text, want, "the answer of the base in Q8_0 blocks");
    assert!(
        q8.stderr.contains("linear weights held as --quantize q8_0"),
        "{}",
        q8.stderr
    );
    // The fixture model is safetensors: nothing to keep, and it says so.
    let kept = generate(fx, &["--quantize", "keep"]);
    assert_eq!(kept.text, generate(fx, &[]).text);
    assert!(kept.stderr.contains("stores floats"), "{}", kept.stderr);
    let err = run::fails("generate", &["--quantize", "q3", "--prompt", "hi"]);
    assert!(err.contains("none, keep, q8_0, q4_k, q4_0"), "{err}");
}

/// `--dtype bf16`: the answer of the library's bf16 base, and it says so.
pub fn dtype(fx: &Fixture) {
    let bf16 = generate(fx, &["--dtype", "bf16"]);
    let options = LoadOptions {
        base_dtype: tuneforge::quantize::BaseDtype::Bf16,
        ..Default::default()
    };
    let model = Model::load(fx.model_arg(), &options).unwrap();
    let want = library_answer(&model, &[Message::user("ticket 7 about billing")]);
    assert_eq!(bf16.text, want, "the answer of the base in bf16");
    assert!(bf16.stderr.contains("[base: bf16,"), "{}", bf16.stderr);
    let f32 = generate(fx, &["--dtype", "f32"]);
    assert!(f32.stderr.contains("[base: f32,"), "{}", f32.stderr);
    let err = run::fails("generate", &["--dtype", "f16", "--prompt", "hi"]);
    assert!(err.contains("auto, f32, bf16"), "{err}");
}
