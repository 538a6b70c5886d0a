//! Prompting versus fine-tuning on your own held-out examples: which wins, by
//! how much, and at what cost. Writes report.md, report.html and report.json.
//!
//! ```text
//! cargo run --release --example compare -- --data examples/data --adapter runs/triage
//! ```

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use tuneforge::eval::scaling::ScalingConfig;
use tuneforge::eval::{compare, report, CompareConfig};
use tuneforge::{DeviceSpec, GenerationConfig};

#[derive(Parser)]
#[command(about = "Compare prompting and fine-tuning on held-out examples")]
struct Args {
    /// A held-out .jsonl file, or a folder with test.jsonl (or valid.jsonl) and train.jsonl.
    #[arg(long)]
    data: PathBuf,
    /// A fine-tuned adapter (a finetune run folder or a PEFT adapter); repeat for several.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// The base model.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// The instruction prompt (default: one written from the training answers).
    #[arg(long)]
    system: Option<String>,
    /// Few-shot examples per prompt from the training set: the k most similar by
    /// BM25, and k at random (0 skips the few-shot variants).
    #[arg(long, default_value_t = 5)]
    shots: usize,
    /// Random few-shot draws to score (the report gives their median and range).
    #[arg(long, default_value_t = 3)]
    draws: usize,
    /// The most training examples in the many-shot prompt (default: as many as
    /// fit the context; 0 skips many-shot).
    #[arg(long)]
    max_shots: Option<usize>,
    /// Training-set sizes for the data-scaling curve, e.g. 25,50,100,200,all:
    /// an adapter per size, trained with the --adapter run's settings into
    /// OUT/scaling/n-N (reused on later runs), against retrieved few-shot from
    /// the same examples.
    #[arg(long)]
    scaling: Option<String>,
    /// Evaluate only the first N held-out examples.
    #[arg(long)]
    limit: Option<usize>,
    /// The most tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sample with this temperature instead of decoding greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Seed for sampling and for choosing few-shot examples.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// How many answers decode together; 1 decodes one at a time (the slow way, to compare).
    #[arg(long, default_value_t = tuneforge::generate::DEFAULT_BATCH)]
    batch: usize,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// How the base's linear weights are held: none, keep, q8_0, q4_k or
    /// q4_0 (default: as the first --adapter run trained them, else none).
    #[arg(long)]
    quantize: Option<tuneforge::Quantize>,
    /// The base's precision: auto, f32 or bf16 (default: as the first
    /// --adapter run trained it, else auto).
    #[arg(long)]
    dtype: Option<tuneforge::quantize::BaseDtype>,
    /// The word-level ROUGE-L at which a held-out question counts as a
    /// near-duplicate of a training question (scored apart in the report);
    /// 1 counts only the same words in the same order.
    #[arg(long, default_value_t = tuneforge::eval::overlap::DEFAULT_THRESHOLD)]
    near_duplicate: f64,
    /// Where to write the reports.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
}

fn main() -> Result<()> {
    tuneforge::threads::init();
    let a = Args::parse();
    let generation = GenerationConfig {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        ..Default::default()
    };
    let config = CompareConfig {
        shots: a.shots,
        random_draws: a.draws,
        system_prompt: a.system,
        generation,
        limit: a.limit,
        seed: a.seed,
        progress: true,
        batch: a.batch,
        max_shots: a.max_shots,
        scaling: a
            .scaling
            .map(|sizes| ScalingConfig::new(&sizes, &a.adapter, &a.out))
            .transpose()?,
        quantize: a.quantize,
        dtype: a.dtype,
        near_duplicate: a.near_duplicate,
        ..CompareConfig::default()
    };
    let comparison = compare::compare_files(&a.model, a.device, &a.data, &a.adapter, &config)?;
    print!("{}", report::markdown(&comparison));
    report::write(&comparison, &a.out)?;
    println!(
        "\nReports: {0}/report.md, {0}/report.html, {0}/report.json",
        a.out.display()
    );
    Ok(())
}
