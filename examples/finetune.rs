//! Fine-tunes a model with LoRA on JSONL examples.
//!
//! ```text
//! cargo run --release --example finetune                      # default model, bundled data
//! cargo run --release --example finetune -- --data my_data/ --out runs/mine --epochs 3
//! cargo run --release --example finetune -- --config job.toml --resume
//! ```
//!
//! Flags override the config file, which overrides the defaults. Ctrl-C saves a
//! checkpoint; `--resume` continues from it.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tuneforge::data::{LossOn, TurnEnd};
use tuneforge::finetune::{self, Existing, JobConfig};
use tuneforge::train::Schedule;

#[derive(Parser)]
#[command(about = "Fine-tune a model with LoRA on JSONL examples")]
struct Args {
    /// A TOML job file (see `tuneforge::finetune::JobConfig`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A name from models.toml, an HF-layout folder or a .gguf file.
    #[arg(long)]
    model: Option<String>,
    /// A .jsonl file, or a folder with train.jsonl (valid.jsonl, test.jsonl optional).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The run folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long)]
    device: Option<String>,
    /// Replace a run already in --out.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Continue the run in --out from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// LoRA rank.
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    dropout: Option<f64>,
    /// Target modules, comma-separated (q_proj,...,down_proj; Phi-3: qkv_proj,
    /// o_proj, gate_up_proj, down_proj; or all-linear, the default).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Use rsLoRA scaling.
    #[arg(long)]
    rslora: bool,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// constant, linear or cosine.
    #[arg(long)]
    schedule: Option<String>,
    /// Warmup updates.
    #[arg(long)]
    warmup: Option<usize>,
    /// Weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Examples per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per update.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many updates (0: after --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Cut examples to this many tokens.
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// assistant-turns, last-assistant or all.
    #[arg(long)]
    loss_on: Option<String>,
    /// Where the loss on an assistant turn ends: end-token (at its end-of-turn
    /// token, inclusive) or rendered (also the template's text after it).
    #[arg(long)]
    turn_end: Option<String>,
    /// Pack several examples per row.
    #[arg(long)]
    packing: bool,
    /// Recompute each block's activations in the backward pass instead of
    /// keeping them: less memory, about a third more compute.
    #[arg(long)]
    recompute: bool,
    /// Evaluate every N updates (0: only before and after training).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Checkpoint every N updates (0: only at the end or on Ctrl-C).
    #[arg(long)]
    save_every: Option<usize>,
    /// Early-stopping patience, in evaluations (0: never stop early).
    #[arg(long)]
    patience: Option<usize>,
    /// Clip the gradient norm (0 turns clipping off).
    #[arg(long)]
    clip: Option<f64>,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Test answers to show before and after.
    #[arg(long)]
    samples: Option<usize>,
    /// How the frozen base's linear weights are held (QLoRA): none (dense),
    /// keep (a GGUF's blocks as stored), q8_0, q4_k or q4_0.
    #[arg(long)]
    quantize: Option<tuneforge::Quantize>,
    /// The frozen base's precision: auto (bf16 on GPUs and on CPUs whose
    /// bf16 products outrun f32: AMX-BF16, or AVX512_BF16 on AMD's Zen 4 and
    /// later; else f32), f32 or bf16 (on the CPU: the base held in bf16,
    /// half the memory, multiplied in f32 where the CPU has no fast bf16).
    #[arg(long)]
    dtype: Option<tuneforge::quantize::BaseDtype>,
}

/// A flag's value as the job config's enum, e.g. `--schedule cosine`.
fn parse<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string()))
        .with_context(|| format!("--{flag} {value}"))
}

fn main() -> Result<()> {
    tuneforge::threads::init();
    let a = Args::parse();
    // Settings come from the config file, else (resuming) from the run itself,
    // else the defaults; flags override them. Resuming refuses changed settings.
    let mut job = match (&a.config, a.resume) {
        (Some(path), _) => JobConfig::from_toml_file(path)?,
        (None, true) => JobConfig::of_run(a.out.as_deref().unwrap_or(&JobConfig::default().out))?,
        (None, false) => JobConfig::default(),
    };
    macro_rules! set {
        ($($flag:expr => $field:expr),* $(,)?) => { $(if let Some(v) = $flag { $field = v; })* };
    }
    set!(a.model => job.model, a.data => job.data, a.out => job.out, a.device => job.device, a.samples => job.samples,
        a.rank => job.lora.r, a.alpha => job.lora.alpha, a.dropout => job.lora.dropout, a.targets => job.lora.target_modules,
        a.lr => job.train.learning_rate, a.warmup => job.train.warmup_steps, a.weight_decay => job.train.optimizer.weight_decay,
        a.batch_size => job.train.batch_size, a.grad_accum => job.train.grad_accum, a.epochs => job.train.epochs,
        a.max_seq_len => job.train.max_seq_len, a.seed => job.train.seed);
    if a.rslora {
        job.lora.use_rslora = true;
    }
    if a.packing {
        job.train.packing = true;
    }
    if a.recompute {
        job.train.recompute = true;
    }
    if let Some(s) = &a.schedule {
        job.train.schedule = parse::<Schedule>("schedule", s)?;
    }
    if let Some(s) = &a.loss_on {
        job.train.loss_on = parse::<LossOn>("loss-on", s)?;
    }
    if let Some(s) = &a.turn_end {
        job.train.turn_end = parse::<TurnEnd>("turn-end", s)?;
    }
    if let Some(q) = a.quantize {
        job.train.quantize = q;
    }
    if let Some(d) = a.dtype {
        job.train.dtype = d;
    }
    // For these, 0 turns the setting off.
    let off_at_zero = |flag: Option<usize>, current| flag.map_or(current, |n| (n > 0).then_some(n));
    job.train.max_steps = off_at_zero(a.max_steps, job.train.max_steps);
    job.train.eval_every = off_at_zero(a.eval_every, job.train.eval_every);
    job.train.save_every = off_at_zero(a.save_every, job.train.save_every);
    job.train.patience = off_at_zero(a.patience, job.train.patience);
    if let Some(c) = a.clip {
        job.train.clip_grad_norm = (c > 0.0).then_some(c);
    }
    job.train.progress = true;
    let existing = match (a.overwrite, a.resume) {
        (true, _) => Existing::Overwrite,
        (_, true) => Existing::Resume,
        _ => Existing::Refuse,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        eprintln!("\nstopping: saving a checkpoint (resume with --resume)");
        flag.store(true, Ordering::SeqCst);
    })?;
    let report = finetune::run(&job, existing, Some(stop))?;
    println!("{report}");
    Ok(())
}
