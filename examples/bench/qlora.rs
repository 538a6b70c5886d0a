//! The `qlora` suite: training with the frozen base's linears held in GGML
//! blocks (`--quantize`), beside the dense f32 base at the same shapes. The
//! real SmolLM2-135M from its Q4_1 GGUF (`keep`: the file's blocks as stored),
//! and random weights at Qwen2.5-1.5B's and Llama-3.2-3B's shapes quantized to
//! Q4_K as they are drawn; batch 4 × 512, LoRA r=16 on all seven linears,
//! activations recomputed in the backward pass for the large shapes (and in
//! two SmolLM2 rows, for its memory).

use super::{train_row, Args, Row};
use anyhow::Result;
use std::time::Instant;
use tuneforge::{LoadOptions, LoraConfig, Model, ModelConfig, Quantize};

/// Where a row's base comes from.
#[derive(Clone, Copy)]
pub enum Base {
    /// The `--model` GGUF (the real default model).
    File,
    /// Random weights at a model's shapes.
    Shape(fn() -> ModelConfig),
}

/// A row: name, base, how its linears are held, whether it trains (4 × 512,
/// r=16) or only loads, and whether activations are recomputed.
pub type QloraRow = (&'static str, Base, Quantize, bool, bool);

/// The rows of the `qlora` suite, in order.
pub const ROWS: [QloraRow; 10] = [
    (
        "model file, load, none",
        Base::File,
        Quantize::None,
        false,
        false,
    ),
    (
        "model file, load, keep",
        Base::File,
        Quantize::Keep,
        false,
        false,
    ),
    (
        "model file, none, all-7 r=16, 4 x 512",
        Base::File,
        Quantize::None,
        true,
        false,
    ),
    (
        "model file, keep, all-7 r=16, 4 x 512",
        Base::File,
        Quantize::Keep,
        true,
        false,
    ),
    (
        "model file, keep, all-7 r=16, 4 x 512, recompute",
        Base::File,
        Quantize::Keep,
        true,
        true,
    ),
    (
        "model file, none, all-7 r=16, 4 x 512, recompute",
        Base::File,
        Quantize::None,
        true,
        true,
    ),
    (
        "qwen2.5-1.5b shapes, none, all-7 r=16, 4 x 512, recompute",
        Base::Shape(ModelConfig::qwen2_5_1_5b),
        Quantize::None,
        true,
        true,
    ),
    (
        "qwen2.5-1.5b shapes, q4_k, all-7 r=16, 4 x 512, recompute",
        Base::Shape(ModelConfig::qwen2_5_1_5b),
        Quantize::Q4K,
        true,
        true,
    ),
    (
        "llama-3.2-3b shapes, none, all-7 r=16, 4 x 512, recompute",
        Base::Shape(ModelConfig::llama3_2_3b),
        Quantize::None,
        true,
        true,
    ),
    (
        "llama-3.2-3b shapes, q4_k, all-7 r=16, 4 x 512, recompute",
        Base::Shape(ModelConfig::llama3_2_3b),
        Quantize::Q4K,
        true,
        true,
    ),
];

/// Runs one row of the suite.
pub fn row(&(name, base, quantize, trains, recompute): &QloraRow, args: &Args) -> Result<Row> {
    let before = tuneforge::memory::rss_bytes();
    let t = Instant::now();
    let device = args.device.open()?;
    let (mut model, what) = match base {
        Base::File => {
            let options = LoadOptions {
                device: args.device,
                quantize,
                ..LoadOptions::f32_base()
            };
            (Model::load(&args.model, &options)?, args.model.clone())
        }
        Base::Shape(shape) => (
            Model::random_held(&shape(), 0, candle_core::DType::F32, &device, quantize)?,
            "random weights".to_string(),
        ),
    };
    let load = t.elapsed().as_secs_f64();
    let (linears, rest) = tuneforge::quantize::base_bytes(&model.lm);
    eprintln!(
        "{name}: base linears {:.0} MB, embeddings and output {:.0} MB",
        linears as f64 / 1e6,
        rest as f64 / 1e6
    );
    for note in &model.notes {
        eprintln!("{name}: {note}");
    }
    let mut row = match trains {
        false => Row {
            note: load_note(name, &model, before),
            ..Row::new(name, load)
        },
        true => {
            let lora = LoraConfig {
                r: 16,
                alpha: 32.0,
                ..Default::default()
            };
            train_row(&mut model, name, &lora, (4, 512), args.reps, recompute)?
        }
    };
    row.model = what;
    Ok(row)
}

/// What a load row's peak RSS holds: the process before the load (the
/// program), and what the load added against the file's size.
fn load_note(name: &str, model: &Model, before: Option<u64>) -> Option<String> {
    let tuneforge::source::ModelFiles::Gguf(path) = &model.source.files else {
        return None;
    };
    let file = std::fs::metadata(path).ok()?.len() as f64 / 1e6;
    let (before, peak) = (
        before? as f64 / 1e6,
        tuneforge::memory::peak_rss_bytes()? as f64 / 1e6,
    );
    Some(format!(
        "{name}: the process held {before:.1} MB before loading and peaked at {peak:.1} MB: \
         the load added {:.1} MB, {:.2}x the {file:.1} MB file",
        peak - before,
        (peak - before) / file
    ))
}
