//! LoRA training on a tiny random model: gradients, accumulation, reproducibility,
//! resuming, divergence, adapters and merging, and bad input.

#[path = "../common/mod.rs"]
mod common;

mod adapters;
mod gradients;
mod runs;

use candle_core::{Device, Tensor, Var};
use std::path::Path;
use std::sync::atomic::Ordering;
use tuneforge::data::{plan_epoch, Dataset, Record};
use tuneforge::rng::Rng;
use tuneforge::train::{step_gradients, Event, Outcome, TrainConfig, Trainer};
use tuneforge::{adapter, lora, Architecture, LoadOptions, LoraConfig, Message, Model, Quantize};

fn tiny() -> Model {
    Model::tiny_random(Architecture::Llama, 11).unwrap()
}

/// [`tiny`]'s weights, on `device`.
fn tiny_on(device: &Device) -> Model {
    tiny_held(device, Quantize::None)
}

/// [`tiny`]'s weights, on `device`, the linears held as `quantize` asks.
fn tiny_held(device: &Device, quantize: Quantize) -> Model {
    let config = tuneforge::ModelConfig::tiny(Architecture::Llama);
    Model::random_held(&config, 11, candle_core::DType::F32, device, quantize).unwrap()
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| match i % 3 {
            0 => Record::Completion {
                prompt: format!("ticket {i}: refund please"),
                completion: format!("{{\"label\": \"billing\", \"n\": {i}}}"),
            },
            1 => Record::Chat(vec![
                Message::system("triage"),
                Message::user(format!("app crashed {i}")),
                Message::assistant("bug"),
                Message::user("sure?"),
                Message::assistant(format!("yes {i}")),
            ]),
            _ => Record::Text(format!("plain text example number {i}")),
        })
        .collect()
}

fn data() -> Dataset {
    Dataset {
        train: records(16),
        valid: records(4),
        ..Default::default()
    }
}

fn config() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        max_steps: Some(6),
        learning_rate: 5e-3,
        progress: false,
        ..Default::default()
    }
}

fn logits(model: &Model) -> Tensor {
    model
        .lm
        .forward(&Tensor::new(&[[1u32, 80, 81, 82, 2, 90]], &Device::Cpu).unwrap())
        .unwrap()
}

/// The first `n` test records, tokenized for `model`.
fn examples(model: &Model, n: usize) -> Vec<tuneforge::data::Example> {
    tuneforge::data::tokenize(&records(n), &model.tokenizer, Default::default(), 64)
        .unwrap()
        .0
}

/// Moves every adapter parameter by `delta`, so that no factor is zero and every
/// gradient path is exercised.
fn shift_adapters(model: &Model, delta: f64) {
    for (_, var) in lora::parameters(&model.lm) {
        var.set(&(var.as_tensor() + delta).unwrap()).unwrap();
    }
}

/// A trainer that has taken one update, with its run in `dir`.
fn trained_one_step(dir: &Path) -> Trainer {
    let config = TrainConfig {
        max_steps: Some(1),
        ..config()
    };
    let mut trainer = Trainer::new(tiny(), LoraConfig::default(), config, dir).unwrap();
    trainer.train(&data()).unwrap();
    trainer
}

fn read_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Event>(l).unwrap())
        .filter_map(|e| match e {
            Event::Step { loss, .. } => Some(loss),
            _ => None,
        })
        .collect()
}
