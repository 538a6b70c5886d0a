//! A run's settings: the training hyperparameters, and what a run folder's
//! `train_config.toml` holds (they, the adapter's settings and the base model).

use super::{AdamWConfig, Schedule};
use crate::data::{LossOn, TurnEnd};
use crate::lora::LoraConfig;
use crate::quantize::{BaseDtype, Quantize};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Training hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Shape of the learning rate after warmup.
    pub schedule: Schedule,
    /// Updates of linear warmup.
    pub warmup_steps: usize,
    /// AdamW settings.
    pub optimizer: AdamWConfig,
    /// Examples (or packed rows) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Passes over the training set (unless `max_steps` is set).
    pub epochs: usize,
    /// Stop after this many updates.
    pub max_steps: Option<usize>,
    /// Examples are cut to this many tokens.
    pub max_seq_len: usize,
    /// Which tokens the loss falls on.
    pub loss_on: LossOn,
    /// Where the loss on an assistant turn ends: at its end-of-turn token (the
    /// default) or at the end of the template's rendering of the turn.
    pub turn_end: TurnEnd,
    /// Pack several examples into each row.
    pub packing: bool,
    /// Evaluate on the validation set every N updates (and always at the end).
    pub eval_every: Option<usize>,
    /// Save a checkpoint every N updates (and always at the end).
    pub save_every: Option<usize>,
    /// Stop when validation loss has not improved for this many evaluations.
    pub patience: Option<usize>,
    /// Clip the global gradient norm to this.
    pub clip_grad_norm: Option<f64>,
    /// Seed for LoRA initialisation, data order and dropout.
    pub seed: u64,
    /// Recompute each block's activations during the backward pass instead of
    /// keeping them (activation checkpointing): less memory, more compute.
    pub recompute: bool,
    /// How the frozen base's linear weights are held (QLoRA): `none` (dense),
    /// `keep` (a GGUF's blocks as stored), `q8_0`, `q4_k` or `q4_0`.
    pub quantize: Quantize,
    /// The frozen base's precision: `auto`, `f32` or `bf16` ([`BaseDtype`]).
    /// A run folder's `train_config.toml` records the one used.
    pub dtype: BaseDtype,
    /// Show a progress bar.
    #[serde(skip)]
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            optimizer: AdamWConfig::default(),
            batch_size: 8,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            max_seq_len: 512,
            loss_on: LossOn::AssistantTurns,
            turn_end: TurnEnd::EndToken,
            packing: false,
            eval_every: None,
            save_every: None,
            patience: None,
            clip_grad_norm: Some(1.0),
            seed: 42,
            recompute: false,
            quantize: Quantize::None,
            dtype: BaseDtype::Auto,
            progress: true,
        }
    }
}

impl TrainConfig {
    pub(super) fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            bail!("batch_size and grad_accum must be at least 1");
        }
        if self.max_seq_len < 2 {
            bail!("max_seq_len must be at least 2");
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            bail!(
                "learning_rate must be a positive number (got {})",
                self.learning_rate
            );
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            bail!("set epochs or max_steps to at least 1");
        }
        for (name, value) in [
            ("eval_every", self.eval_every),
            ("save_every", self.save_every),
            ("patience", self.patience),
            ("max_steps", self.max_steps),
        ] {
            if value == Some(0) {
                bail!("{name} must be at least 1 (leave it unset to turn it off)");
            }
        }
        Ok(())
    }
}

/// The file in a run folder that holds its [`RunConfig`].
pub(super) const RUN_CONFIG_FILE: &str = "train_config.toml";

/// What a run folder's `train_config.toml` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// The base model's Hub repo id, or the name it was loaded by.
    pub base_model: String,
    /// The adapter settings.
    pub lora: LoraConfig,
    /// The training settings.
    pub train: TrainConfig,
}

impl RunConfig {
    /// Reads the `train_config.toml` of the run in `out_dir`.
    pub fn read(out_dir: &Path) -> Result<Self> {
        let path = out_dir.join(RUN_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}: is {} a run folder?",
                path.display(),
                out_dir.display()
            )
        })?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}
