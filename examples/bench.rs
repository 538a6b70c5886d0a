//! Speed and memory of the real model on this machine: load, forward, full LoRA
//! training steps (forward, backward, AdamW) and greedy decoding. Prints a
//! table and optionally writes the rows as JSON so runs can be compared.
//!
//! ```text
//! cargo run --release --example bench
//! cargo run --release --example bench -- --json bench.json --reps 5
//! ```

use anyhow::Result;
use clap::Parser;
use std::time::Instant;
use tuneforge::data::Example;
use tuneforge::train::optim::AdamW;
use tuneforge::{
    lora, memory, DeviceSpec, GenerationConfig, LoadOptions, LoraConfig, Message, Model,
};

/// Parameters of SmolLM2-135M with the tied lm_head counted once.
const N_PARAMS: f64 = 134.5e6;

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
    /// Only these rows (substring match on the name).
    #[arg(long)]
    only: Option<String>,
    /// Run one row in this process and print it as JSON (used internally).
    #[arg(long, hide = true)]
    row: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Row {
    name: String,
    seconds: f64,
    tokens_per_second: Option<f64>,
    peak_rss_mb: Option<f64>,
    gflops: Option<f64>,
}

fn peak_mb() -> Option<f64> {
    memory::peak_rss_bytes().map(|b| b as f64 / 1e6)
}

/// A synthetic batch of `b` rows of `s` tokens, every token trained.
fn synthetic(b: usize, s: usize) -> Vec<Example> {
    (0..b)
        .map(|r| Example {
            ids: (0..s)
                .map(|i| ((r * s + i) * 7919 % 49152) as u32)
                .collect(),
            trained: (0..s).map(|i| i > 0).collect(),
        })
        .collect()
}

fn train_row(
    model: &mut Model,
    name: &str,
    lora_config: &LoraConfig,
    b: usize,
    s: usize,
    reps: usize,
) -> Result<Row> {
    lora::attach(&mut model.lm, lora_config, 0)?;
    let mut opt = AdamW::new(lora::parameters(&model.lm), Default::default())?;
    let examples = synthetic(b, s);
    let group = vec![(0..b).map(|i| vec![i]).collect::<Vec<_>>()];
    let step = |opt: &mut AdamW| -> Result<()> {
        let update = tuneforge::train::step_gradients(model, &examples, &group, &[0], false)?;
        opt.step(&update.gradients, 1e-4, 1.0)
    };
    step(&mut opt)?;
    let t = Instant::now();
    for _ in 0..reps {
        step(&mut opt)?;
    }
    let sec = t.elapsed().as_secs_f64() / reps as f64;
    let tokens = (b * s) as f64;
    Ok(Row {
        name: name.into(),
        seconds: sec,
        tokens_per_second: Some(tokens / sec),
        peak_rss_mb: peak_mb(),
        gflops: Some(4.0 * N_PARAMS * tokens / sec / 1e9),
    })
}

/// The rows, in order; each runs in its own process so its peak RSS is its own.
const ROWS: [&str; 6] = [
    "load (cached GGUF)",
    "forward, no grad, 4 x 128",
    "train, all-7, r=8, 4 x 128",
    "train, all-7, r=8, 8 x 256",
    "train, q+v, r=8, 4 x 128",
    "greedy decoding, 64 tokens",
];

fn run_row(name: &str, model_name: &str, reps: usize) -> Result<Row> {
    let t = Instant::now();
    let mut model = Model::load(
        model_name,
        &LoadOptions {
            device: DeviceSpec::Cpu,
            dtype: None,
        },
    )?;
    let load = t.elapsed().as_secs_f64();
    let all7 = LoraConfig::default();
    let qv = LoraConfig {
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..Default::default()
    };
    Ok(match name {
        "load (cached GGUF)" => Row {
            name: name.into(),
            seconds: load,
            tokens_per_second: None,
            peak_rss_mb: peak_mb(),
            gflops: None,
        },
        "forward, no grad, 4 x 128" => {
            let examples = synthetic(4, 128);
            let rows: Vec<Vec<usize>> = (0..4).map(|i| vec![i]).collect();
            // Scores every position, as an evaluation pass does.
            let forward = || tuneforge::train::summed_loss(&model, &examples, &rows).map(|_| ());
            forward()?;
            let t = Instant::now();
            for _ in 0..reps {
                forward()?;
            }
            let sec = t.elapsed().as_secs_f64() / reps as f64;
            Row {
                name: name.into(),
                seconds: sec,
                tokens_per_second: Some(512.0 / sec),
                peak_rss_mb: peak_mb(),
                gflops: Some(2.0 * N_PARAMS * 512.0 / sec / 1e9),
            }
        }
        "train, all-7, r=8, 4 x 128" => train_row(&mut model, name, &all7, 4, 128, reps)?,
        "train, all-7, r=8, 8 x 256" => train_row(&mut model, name, &all7, 8, 256, reps)?,
        "train, q+v, r=8, 4 x 128" => train_row(&mut model, name, &qv, 4, 128, reps)?,
        "greedy decoding, 64 tokens" => {
            let config = GenerationConfig {
                max_new_tokens: 64,
                stop_at_eos: false,
                ..Default::default()
            };
            let g = model.chat(&[Message::user("What is LoRA?")], &config, &mut |_| {})?;
            Row {
                name: name.into(),
                seconds: g.decode.as_secs_f64() / 63.0,
                tokens_per_second: Some(g.tokens_per_second()),
                peak_rss_mb: peak_mb(),
                gflops: None,
            }
        }
        other => anyhow::bail!("unknown row '{other}'"),
    })
}

fn main() -> Result<()> {
    tuneforge::threads::init();
    let args = Args::parse();
    if let Some(row) = &args.row {
        println!(
            "{}",
            serde_json::to_string(&run_row(row, &args.model, args.reps)?)?
        );
        return Ok(());
    }
    // Make sure the file is cached, so that every row's load is a pure load.
    tuneforge::source::resolve(&args.model)?;
    let mut rows: Vec<Row> = Vec::new();
    for name in ROWS
        .iter()
        .filter(|n| args.only.as_ref().is_none_or(|o| n.contains(o.as_str())))
    {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args([
                "--row",
                name,
                "--model",
                &args.model,
                "--reps",
                &args.reps.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "row '{name}' failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout)?;
        rows.push(serde_json::from_str(
            text.lines().last().unwrap_or_default(),
        )?);
    }

    println!(
        "| {:<28} | {:>8} | {:>9} | {:>13} | {:>8} |",
        "configuration", "s/step", "tokens/s", "peak RSS (MB)", "GFLOP/s"
    );
    println!(
        "|{:-<30}|{:->10}|{:->11}|{:->15}|{:->10}|",
        "", "", "", "", ""
    );
    let show =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for r in &rows {
        println!(
            "| {:<28} | {:>8.3} | {:>9} | {:>13} | {:>8} |",
            r.name,
            r.seconds,
            show(r.tokens_per_second, 1),
            show(r.peak_rss_mb, 0),
            show(r.gflops, 1)
        );
    }
    if let Some(path) = args.json {
        tuneforge::atomic::write(&path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    Ok(())
}
