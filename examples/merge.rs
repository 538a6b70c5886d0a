//! Merges a LoRA adapter into its base model and saves an HF-layout model
//! (`model.safetensors`, `config.json`, tokenizer files) that any HF-compatible
//! tool loads, tuneforge included.
//!
//! ```text
//! cargo run --release --example merge -- --adapter runs/triage --out merged/
//! ```

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use tuneforge::{DeviceSpec, LoadOptions, Model};

#[derive(Parser)]
#[command(about = "Merge a LoRA adapter into its base model")]
struct Args {
    /// The adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// The base model (a name from models.toml or a path).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Where to write the merged model.
    #[arg(long)]
    out: PathBuf,
    /// Save the weights as bf16 instead of f32.
    #[arg(long)]
    bf16: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // The exact f32 weights, whatever bf16 arithmetic the CPU has: the sum
    // is rounded once, to the dtype saved.
    let mut model = Model::load(
        &args.model,
        &LoadOptions {
            device: DeviceSpec::Cpu,
            ..LoadOptions::f32_base()
        },
    )?;
    model.load_adapter(&args.adapter)?;
    let merged = model.merge_adapters()?;
    let dtype = if args.bf16 {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    };
    model.save_hf(&args.out, dtype)?;
    println!(
        "merged {merged} adapted linears into {}",
        args.out.display()
    );
    Ok(())
}
