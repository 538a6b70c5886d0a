//! Speed and memory of training on this machine. Each row runs in its own
//! process, so its peak memory is its own. Prints a table and optionally writes
//! the rows as JSON so runs can be compared.
//!
//! Two suites:
//! - `cpu` (the default): the real SmolLM2-135M-Instruct: load, a forward pass,
//!   LoRA training steps (forward, backward, AdamW), greedy decoding, and the
//!   bundled `compare` (every held-out example, every variant, with an
//!   adapter) batched and one answer at a time, its many-shot prompt capped
//!   at 16 examples, and batched with many-shot filling the context.
//! - `qlora`: the frozen base held in GGML blocks (`--quantize`) beside the
//!   dense base: the real SmolLM2-135M from its Q4_1 GGUF kept as stored, and
//!   Qwen2.5-1.5B's and Llama-3.2-3B's shapes quantized to Q4_K
//!   ([`qlora`]): peak memory and training speed.
//! - `gpu`: training steps with random weights at SmolLM2-135M's and
//!   Qwen2.5-0.5B's shapes, batch 8 × 512 and 16 × 1024, LoRA r=16 on all seven
//!   linears, in the device's default dtype (bf16 on a GPU); and at Qwen3-0.6B's
//!   and Gemma-3-270M's shapes, batch 4 × 128 and 8 × 256, r=8 (these also run on
//!   a CPU: `--suite gpu --only 3-`; [`gpu`]). Peak GPU memory is
//!   the device's used memory, sampled through NVML every 2 ms, above what it
//!   was before the row opened the GPU: the CUDA context included, as
//!   `benches/peft_reference.py` measures PyTorch + PEFT.
//!
//! ```text
//! cargo run --release --example bench
//! cargo run --release --example bench -- --json bench.json --reps 5
//! cargo run --release --example bench -- --suite qlora --reps 1
//! cargo run --release --features cuda --example bench -- --suite gpu --device cuda
//! ```

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use std::time::Instant;
use tuneforge::data::Example;
use tuneforge::quantize::BaseDtype;
use tuneforge::train::optim::AdamW;
use tuneforge::{
    lora, DeviceSpec, GenerationConfig, LoadOptions, LoraConfig, Message, Model, ModelConfig,
};

mod flops;
mod gpu;
mod qlora;
mod table;

use table::Row;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    /// The real default model: load, forward, training steps, decoding.
    Cpu,
    /// Random weights at SmolLM2-135M and Qwen2.5-0.5B shapes, large batches.
    Gpu,
    /// A quantized frozen base (QLoRA) beside the dense one: memory and speed.
    Qlora,
}

#[derive(Parser)]
pub struct Args {
    /// Which rows.
    #[arg(long, value_enum, default_value_t = Suite::Cpu)]
    suite: Suite,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// The model the `cpu` suite measures.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Where to write the rows as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Timed repetitions per row; each row reports its fastest.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Only these rows (substring match on the name).
    #[arg(long)]
    only: Option<String>,
    /// The `cpu` suite's forward and training rows on random weights at
    /// SmolLM2-135M's shapes, as `benches/peft_cpu_reference.py` measures
    /// PyTorch: for a machine that cannot fetch the model (same arithmetic).
    #[arg(long)]
    random_weights: bool,
    /// Also print where each forward or training row's time goes, by stage
    /// (`tuneforge::profile`).
    #[arg(long)]
    profile: bool,
    /// Run one row in this process and print it as JSON (used internally).
    #[arg(long, hide = true)]
    row: Option<String>,
}

/// The rows of the `cpu` suite, in order. Rows that end in [`BF16_BASE`]
/// hold the frozen base in bf16; the others in f32.
const CPU_ROWS: [&str; 15] = [
    "load (cached GGUF)",
    "forward, no grad, 4 x 128",
    "train, all-7, r=8, 4 x 128",
    "train, all-7, r=8, 8 x 256",
    "train, q+v, r=8, 4 x 128",
    "train, q+v, r=8, 8 x 256",
    "forward, no grad, 4 x 128, bf16 base",
    "train, all-7, r=8, 4 x 128, bf16 base",
    "train, all-7, r=8, 8 x 256, bf16 base",
    "train, q+v, r=8, 4 x 128, bf16 base",
    "train, q+v, r=8, 8 x 256, bf16 base",
    "greedy decoding, 64 tokens",
    "compare, bundled data, many-shot k<=16, batched",
    "compare, bundled data, many-shot k<=16, one at a time",
    "compare, bundled data, many-shot to the context, batched",
];

/// The many-shot cap of the compare rows that set one: one at a time, a
/// many-shot prompt as long as the context (about 8,000 tokens) would take
/// hours, prefilled again for every question.
const BENCH_MAX_SHOTS: usize = 16;

/// The model the `cpu` suite measures unless `--model` names another; the
/// one whose shapes `--random-weights` draws.
const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// The suffix of the `cpu` suite's rows with a bf16 base.
const BF16_BASE: &str = ", bf16 base";

/// Seconds of the fastest of `reps` calls of `f` after one warm-up, each
/// timed with the device's queue drained. The fastest, not the mean: on a
/// shared host the other tenants only ever add time. With `--profile`, also
/// where the timed calls' time went, per call.
fn time(
    model: &Model,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, Option<table::Profile>)> {
    f()?;
    tuneforge::profile::take();
    let (mut best, mut total) = (f64::INFINITY, 0.0);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        model.lm.device().synchronize()?;
        let seconds = t.elapsed().as_secs_f64();
        best = best.min(seconds);
        total += seconds;
    }
    let profile = tuneforge::profile::is_enabled()
        .then(|| table::Profile::per_call(tuneforge::profile::take(), reps.max(1), total));
    Ok((best, profile))
}

/// Full LoRA training steps (forward, backward, AdamW) on one batch of `b` × `s`,
/// recomputing each block's activations in the backward pass with `recompute`.
fn train_row(
    model: &mut Model,
    name: &str,
    lora_config: &LoraConfig,
    (b, s): (usize, usize),
    reps: usize,
    recompute: bool,
) -> Result<Row> {
    lora::attach(&mut model.lm, lora_config, 0)?;
    let mut opt = AdamW::new(lora::parameters(&model.lm), Default::default())?;
    let examples = Example::synthetic(b, s, model.config().vocab_size);
    let group = vec![(0..b).map(|i| vec![i]).collect::<Vec<_>>()];
    let (seconds, profile) = time(model, reps, || {
        let update = tuneforge::train::step_gradients(model, &examples, &group, &[0], recompute)?;
        opt.step(&update.gradients, 1e-4, 1.0)
    })?;
    Ok(Row {
        profile,
        ..Row::throughput(name, seconds, b * s, flops::per_token(model, s, true))
    })
}

fn cpu_row(row_name: &str, args: &Args) -> Result<Row> {
    let (name, base) = match row_name.strip_suffix(BF16_BASE) {
        Some(name) => (name, BaseDtype::Bf16),
        None => (row_name, BaseDtype::F32),
    };
    let t = Instant::now();
    let mut model = match args.random_weights {
        true => {
            let device = args.device.open()?;
            let holding = base.holding(tuneforge::Quantize::None, &device);
            let shape = ModelConfig::smollm2_135m();
            Model::random_held(&shape, 0, candle_core::DType::F32, &device, holding)?
        }
        false => Model::load(
            &args.model,
            &LoadOptions {
                device: args.device,
                dtype: None,
                base_dtype: base,
                ..Default::default()
            },
        )?,
    };
    let mut row = cpu_row_of(&mut model, name, args, t.elapsed().as_secs_f64())?;
    row.name = row_name.into();
    row.base = base.to_string();
    if args.random_weights {
        row.model = "random weights, SmolLM2-135M's shapes".into();
    }
    Ok(row)
}

/// Runs the `cpu` suite's row `name` on `model`, loaded in `load` seconds.
fn cpu_row_of(model: &mut Model, name: &str, args: &Args, load: f64) -> Result<Row> {
    let all7 = LoraConfig::default();
    let qv = LoraConfig {
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..Default::default()
    };
    Ok(match name {
        "load (cached GGUF)" => Row::new(name, load),
        "forward, no grad, 4 x 128" => {
            let examples = Example::synthetic(4, 128, model.config().vocab_size);
            let rows: Vec<Vec<usize>> = (0..4).map(|i| vec![i]).collect();
            // Scores every position, as an evaluation pass does.
            let (seconds, profile) = time(model, args.reps, || {
                tuneforge::train::summed_loss(model, &examples, &rows).map(|_| ())
            })?;
            Row {
                profile,
                ..Row::throughput(name, seconds, 512, flops::per_token(model, 128, false))
            }
        }
        "train, all-7, r=8, 4 x 128" => train_row(model, name, &all7, (4, 128), args.reps, false)?,
        "train, all-7, r=8, 8 x 256" => train_row(model, name, &all7, (8, 256), args.reps, false)?,
        "train, q+v, r=8, 4 x 128" => train_row(model, name, &qv, (4, 128), args.reps, false)?,
        "train, q+v, r=8, 8 x 256" => train_row(model, name, &qv, (8, 256), args.reps, false)?,
        "greedy decoding, 64 tokens" => {
            let config = GenerationConfig {
                max_new_tokens: 64,
                stop_at_eos: false,
                ..Default::default()
            };
            let g = model.chat(&[Message::user("What is LoRA?")], &config, &mut |_| {})?;
            Row {
                tokens_per_second: Some(g.tokens_per_second()),
                ..Row::new(name, g.decode.as_secs_f64() / 63.0)
            }
        }
        "compare, bundled data, many-shot k<=16, batched" => compare_row(
            model,
            name,
            tuneforge::generate::DEFAULT_BATCH,
            Some(BENCH_MAX_SHOTS),
        )?,
        "compare, bundled data, many-shot k<=16, one at a time" => {
            compare_row(model, name, 1, Some(BENCH_MAX_SHOTS))?
        }
        "compare, bundled data, many-shot to the context, batched" => {
            compare_row(model, name, tuneforge::generate::DEFAULT_BATCH, None)?
        }
        other => anyhow::bail!("unknown row '{other}'"),
    })
}

/// The bundled comparison (`examples/data`: every held-out example, every
/// variant, with an adapter of the default settings; many-shot capped at
/// `max_shots`), once, answering `batch` at a time. Tokens per second counts the answers' tokens.
fn compare_row(
    model: &mut Model,
    name: &str,
    batch: usize,
    max_shots: Option<usize>,
) -> Result<Row> {
    let dir = tempfile::tempdir()?;
    let lora_config = LoraConfig::default();
    lora::attach(&mut model.lm, &lora_config, 0)?;
    let adapter =
        tuneforge::adapter::AdapterConfig::new(&lora_config, model.config(), model.repo_id())?;
    tuneforge::adapter::save(&model.lm, &adapter, dir.path())?;
    lora::detach(&mut model.lm);
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let (test, train) = (data.join("test.jsonl"), data.join("train.jsonl"));
    let held_out = tuneforge::eval::read_held_out(&test)?;
    let train = tuneforge::eval::read_held_out(&train)?;
    let config = tuneforge::eval::CompareConfig {
        progress: false,
        batch,
        max_shots,
        ..Default::default()
    };
    let t = Instant::now();
    let c = tuneforge::eval::compare::compare(
        model,
        &[dir.path().to_path_buf()],
        &held_out,
        &train,
        &config,
    )?;
    let seconds = t.elapsed().as_secs_f64();
    let answers: usize = c.variants.iter().map(|v| v.outputs.len()).sum();
    let tokens: f64 = c
        .variants
        .iter()
        .map(|v| v.cost.decode_tokens * v.outputs.len() as f64)
        .sum();
    eprintln!("{name}: {answers} answers in {seconds:.1} s");
    Ok(Row {
        tokens_per_second: Some(tokens / seconds),
        ..Row::new(name, seconds)
    })
}

fn run_row(name: &str, args: &Args) -> Result<Row> {
    tuneforge::profile::enable(args.profile);
    let gpu_memory = match args.device {
        DeviceSpec::Cuda(n) => gpu::Memory::start(n as u32),
        DeviceSpec::Auto => gpu::Memory::start(0),
        _ => None,
    };
    let mut row = match (
        gpu::ROWS.iter().find(|r| r.0 == name),
        qlora::ROWS.iter().find(|r| r.0 == name),
    ) {
        (Some(gpu), _) => gpu::row(gpu, args)?,
        (_, Some(q)) => qlora::row(q, args)?,
        _ => cpu_row(name, args)?,
    };
    row.peak_gpu_mb = gpu_memory.map(gpu::Memory::finish);
    row.reps = args.reps;
    if row.model.is_empty() {
        row.model = args.model.clone();
    }
    Ok(row)
}

fn main() -> Result<()> {
    tuneforge::threads::init();
    let args = Args::parse();
    if let Some(row) = &args.row {
        println!("{}", serde_json::to_string(&run_row(row, &args)?)?);
        return Ok(());
    }
    let names: Vec<&str> = match args.suite {
        Suite::Cpu if args.random_weights => {
            if args.model != DEFAULT_MODEL {
                anyhow::bail!(
                    "--random-weights measures SmolLM2-135M's shapes, not {}",
                    args.model
                );
            }
            CPU_ROWS
                .iter()
                .copied()
                .filter(|n| n.starts_with("forward") || n.starts_with("train"))
                .collect()
        }
        Suite::Cpu => CPU_ROWS.to_vec(),
        Suite::Gpu => gpu::ROWS.iter().map(|r| r.0).collect(),
        Suite::Qlora => qlora::ROWS.iter().map(|r| r.0).collect(),
    };
    let chosen: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| args.only.as_ref().is_none_or(|o| n.contains(o.as_str())))
        .collect();
    if chosen.is_empty() {
        anyhow::bail!(
            "--only '{}' matches no row of this suite; its rows are: {}",
            args.only.as_deref().unwrap_or_default(),
            names.join("; ")
        );
    }
    let loads_the_model = match args.suite {
        Suite::Cpu => !args.random_weights,
        Suite::Gpu => false,
        Suite::Qlora => chosen.iter().any(|n| n.starts_with("model file")),
    };
    if loads_the_model {
        // Make sure the file is cached, so that every row's load is a pure load.
        tuneforge::source::resolve(&args.model)?;
    }
    // The peaks the rows' GFLOP/s are held against: the best of a reading
    // before the rows and one after, as other load on the machine lowers it.
    let measure_peaks = || match args.device {
        DeviceSpec::Cpu => {
            let threads = tuneforge::threads::workers();
            (flops::f32_peak(threads), flops::bf16_peak(threads))
        }
        _ => (None, None),
    };
    let before = measure_peaks();
    let device = args.device.to_string();
    let mut rows: Vec<Row> = Vec::new();
    for name in chosen {
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--row", name, "--model", &args.model, "--device", &device])
            .args(["--reps", &args.reps.to_string()])
            .args(args.random_weights.then_some("--random-weights"))
            .args(args.profile.then_some("--profile"))
            .output()
            .context("starting a row's process")?;
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

    let after = measure_peaks();
    let best = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let peaks = (best(before.0, after.0), best(before.1, after.1));
    table::print(&rows, args.suite == Suite::Qlora, peaks);
    if let Some(path) = args.json {
        tuneforge::atomic::write(&path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    Ok(())
}
