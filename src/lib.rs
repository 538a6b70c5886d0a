//! # tuneforge
//!
//! Fine-tune small open-weight language models (SmolLM2, Qwen2.5, Llama 3.2
//! class) locally with LoRA, on candle: on a laptop CPU, a CUDA GPU or Apple Metal.
//!
//! The modules follow the data's path:
//! [`source`] (where a model comes from) → [`weights`] (tensors in HF layout) →
//! [`model`] (the decoder) → [`tokenizer`] and [`chat`] → [`generate`].
//!
//! On the CPU, call [`threads::init`] first thing in `main`: it sets up one
//! thread per core the way training on a few cores runs fastest.
//!
//! ```no_run
//! use tuneforge::{GenerationConfig, LoadOptions, Message, Model};
//!
//! let model = Model::load("smollm2-135m-instruct", &LoadOptions::default())?;
//! let answer = model.chat(
//!     &[Message::user("What is LoRA?")],
//!     &GenerationConfig::greedy(64),
//!     &mut |piece| print!("{piece}"),
//! )?;
//! println!("\n{} tokens", answer.ids.len());
//! # anyhow::Ok(())
//! ```

pub mod adapter;
pub mod atomic;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod data;
pub mod device;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod generate;
pub mod lora;
pub mod memory;
pub mod model;
pub mod pretrained;
pub mod profile;
pub mod quantize;
pub mod rng;
pub mod source;
#[cfg(test)]
mod testing;
pub mod threads;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use chat::Message;
pub use config::{Architecture, ModelConfig};
pub use device::DeviceSpec;
pub use generate::{Generation, GenerationConfig};
pub use lora::LoraConfig;
pub use model::CausalLm;
pub use pretrained::{LoadOptions, Model};
pub use quantize::{BaseDtype, Quantize};
pub use tokenizer::Tokenizer;

/// The README's Rust examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
