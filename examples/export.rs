//! Exports a fine-tuned adapter for llama.cpp, Ollama and LM Studio: the
//! adapter as a GGUF LoRA adapter, with `--merge` the base and adapter as one
//! quantized GGUF, and a `Modelfile` for `ollama create`.
//!
//! ```text
//! cargo run --release --example export -- --adapter runs/triage --out exported/
//! cargo run --release --example export -- --adapter runs/triage --out exported/ --merge --quant q4_k_m
//! ```

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use tuneforge::export::{export, ExportOptions, Quant};
use tuneforge::{DeviceSpec, LoadOptions, Model};

#[derive(Parser)]
#[command(about = "Export a LoRA adapter (and a merged model) as GGUF for llama.cpp and Ollama")]
struct Args {
    /// The adapter folder (a finetune run).
    #[arg(long)]
    adapter: PathBuf,
    /// The base model the adapter was trained on (a name from models.toml or a path).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Where to write adapter.gguf, model.gguf and the Modelfile.
    #[arg(long)]
    out: PathBuf,
    /// Also write the base with the adapter merged in, as model.gguf.
    #[arg(long)]
    merge: bool,
    /// The merged model's quantization: f32, f16, bf16, q8_0, q4_0, q4_k_m or q6_k.
    #[arg(long, default_value = "q8_0", value_parser = Quant::parse)]
    quant: Quant,
    /// Replace an earlier export in the folder.
    #[arg(long)]
    overwrite: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let base = Model::load(
        &args.model,
        // The exact f32 weights, whatever bf16 arithmetic the CPU has: a
        // merge is rounded once, to `--quant`.
        &LoadOptions {
            device: DeviceSpec::Cpu,
            dtype: Some(candle_core::DType::F32),
            ..LoadOptions::f32_base()
        },
    )?;
    let options = ExportOptions {
        merge: args.merge,
        quant: args.quant,
        overwrite: args.overwrite,
    };
    let report = export(base, &args.adapter, &args.out, &options)?;
    print!("{}", report.summary());
    Ok(())
}
