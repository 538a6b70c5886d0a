//! Speed and memory of the real model on this machine: load time and peak RSS,
//! forward throughput, and decoding speed. Prints a table and writes JSON rows.
//!
//! ```text
//! cargo run --release --example bench
//! cargo run --release --example bench -- --json bench.json
//! ```

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Parser;
use std::time::Instant;
use tuneforge::{memory, GenerationConfig, LoadOptions, Message, Model};

#[derive(Parser)]
struct Args {
    /// The model to measure.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Where to write the rows as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Timed repetitions per row.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(serde::Serialize)]
struct Row {
    name: String,
    seconds: f64,
    tokens_per_second: Option<f64>,
    peak_rss_mb: Option<f64>,
}

fn mb(b: Option<u64>) -> Option<f64> {
    b.map(|b| b as f64 / 1e6)
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Make sure the file is cached, so that the load below is a pure load.
    tuneforge::source::resolve(&args.model)?;
    let mut rows = Vec::new();

    memory::reset_peak_rss();
    let t = Instant::now();
    let model = Model::load(
        &args.model,
        &LoadOptions {
            device: tuneforge::DeviceSpec::Cpu,
            dtype: None,
        },
    )?;
    rows.push(Row {
        name: "load (cached)".into(),
        seconds: t.elapsed().as_secs_f64(),
        tokens_per_second: None,
        peak_rss_mb: mb(memory::peak_rss_bytes()),
    });

    let (b, s) = (4, 128);
    let ids: Vec<u32> = (0..b * s).map(|i| (i * 7919 % 49152) as u32).collect();
    let input = Tensor::from_vec(ids, (b, s), &Device::Cpu)?;
    let _ = model.lm.forward_hidden(
        &tuneforge::model::ForwardInput::causal(&input, 0, model.lm.dtype())?,
        None,
    )?;
    let t = Instant::now();
    for _ in 0..args.reps {
        let hidden = model.lm.forward_hidden(
            &tuneforge::model::ForwardInput::causal(&input, 0, model.lm.dtype())?,
            None,
        )?;
        // Logits of every position, as a forward pass for scoring would.
        let _ = model.lm.logits(&hidden)?;
    }
    let sec = t.elapsed().as_secs_f64() / args.reps as f64;
    rows.push(Row {
        name: format!("forward {b}x{s}, no grad"),
        seconds: sec,
        tokens_per_second: Some((b * s) as f64 / sec),
        peak_rss_mb: mb(memory::peak_rss_bytes()),
    });

    let g = model.chat(
        &[Message::user("What is LoRA?")],
        &GenerationConfig {
            max_new_tokens: 64,
            stop_at_eos: false,
            ..Default::default()
        },
        &mut |_| {},
    )?;
    rows.push(Row {
        name: "greedy decoding, 64 tokens".into(),
        seconds: g.decode.as_secs_f64(),
        tokens_per_second: Some(g.tokens_per_second()),
        peak_rss_mb: mb(memory::peak_rss_bytes()),
    });

    println!(
        "| {:<32} | {:>9} | {:>10} | {:>13} |",
        "measurement", "seconds", "tokens/s", "peak RSS (MB)"
    );
    println!("|{:-<34}|{:->11}|{:->12}|{:->15}|", "", "", "", "");
    for r in &rows {
        let tps = r
            .tokens_per_second
            .map_or("-".into(), |v| format!("{v:.1}"));
        let rss = r.peak_rss_mb.map_or("-".into(), |v| format!("{v:.0}"));
        println!(
            "| {:<32} | {:>9.3} | {:>10} | {:>13} |",
            r.name, r.seconds, tps, rss
        );
    }
    if let Some(path) = args.json {
        tuneforge::atomic::write(&path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    Ok(())
}
