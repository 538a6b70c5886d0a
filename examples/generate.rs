//! Streams a chat answer from a model.
//!
//! ```text
//! cargo run --release --example generate -- --prompt "What is LoRA?"
//! cargo run --release --example generate -- --model path/to/model.gguf --prompt "Hi" --temperature 0.7 --top-p 0.9
//! cargo run --release --example generate -- --adapter runs/triage --prompt "My card was billed twice."
//! ```
//!
//! The answer goes to stdout; what was used (the adapter, the prompt's length)
//! and the speed go to stderr.

use anyhow::Result;
use clap::Parser;
use std::io::Write;
use tuneforge::{DeviceSpec, GenerationConfig, LoadOptions, Message, Model};

#[derive(Parser)]
#[command(about = "Generate a chat answer with a local model")]
struct Args {
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// A name from models.toml, an HF-layout folder or a .gguf file.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// A LoRA adapter folder (a finetune run folder or a PEFT adapter).
    #[arg(long)]
    adapter: Option<std::path::PathBuf>,
    /// An optional system message.
    #[arg(long)]
    system: Option<String>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// How the base's linear weights are held (QLoRA): none, keep (a GGUF's
    /// blocks as stored), q8_0, q4_k or q4_0.
    #[arg(long, default_value = "none")]
    quantize: tuneforge::Quantize,
    /// The base's precision: auto (bf16 on GPUs and on CPUs whose bf16
    /// products outrun f32: AMX-BF16, or AVX512_BF16 on AMD's Zen 4 and
    /// later; else f32), f32 or bf16.
    #[arg(long, default_value = "auto")]
    dtype: tuneforge::quantize::BaseDtype,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Top-k sampling.
    #[arg(long)]
    top_k: Option<usize>,
    /// Top-p (nucleus) sampling.
    #[arg(long)]
    top_p: Option<f64>,
    /// Sampling seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() -> Result<()> {
    tuneforge::threads::init();
    let args = Args::parse();
    let mut model = Model::load(
        &args.model,
        &LoadOptions {
            device: args.device,
            dtype: None,
            quantize: args.quantize,
            base_dtype: args.dtype,
        },
    )?;
    let (linears, _) = tuneforge::quantize::base_bytes(&model.lm);
    eprintln!(
        "[base: {}, linear weights held as --quantize {} ({:.0} MB)]",
        args.dtype.resolve(model.lm.device()),
        args.quantize,
        linears as f64 / 1e6
    );
    for note in &model.notes {
        eprintln!("[{note}]");
    }
    if let Some(dir) = &args.adapter {
        let adapter = model.load_adapter(dir)?;
        eprintln!(
            "[adapter {}: r={}, alpha={}, on {} linears]",
            dir.display(),
            adapter.r,
            adapter.lora_alpha,
            tuneforge::lora::parameters(&model.lm).len() / 2
        );
    }
    let mut messages = Vec::new();
    if let Some(system) = args.system {
        messages.push(Message::system(system));
    }
    messages.push(Message::user(args.prompt));
    let config = GenerationConfig {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_at_eos: true,
        ..Default::default()
    };
    let mut stdout = std::io::stdout();
    let out = model.chat(&messages, &config, &mut |piece| {
        print!("{piece}");
        let _ = stdout.flush();
    })?;
    eprintln!(
        "\n[prompt {} tokens; answer {} tokens, {:.1} tokens/s{}]",
        out.prompt_tokens,
        out.ids.len(),
        out.tokens_per_second(),
        if out.stopped_at_eos {
            ", ended at end of turn"
        } else {
            ""
        }
    );
    Ok(())
}
