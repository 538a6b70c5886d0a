//! Training a LoRA adapter: the loop, and the run folder it writes.
//!
//! A run folder holds the final adapter (`adapter_model.safetensors`,
//! `adapter_config.json`), the best one by validation loss (`best/`), a
//! checkpoint to resume from (`checkpoint/`), `metrics.jsonl`, the loss curve
//! (`loss.svg`) and the resolved configuration (`train_config.toml`).
//!
//! ```
//! use tuneforge::data::{Dataset, Record};
//! use tuneforge::train::{TrainConfig, Trainer};
//! use tuneforge::{Architecture, LoraConfig, Model};
//!
//! let model = Model::tiny_random(Architecture::Llama, 0)?;
//! let data = Dataset {
//!     train: vec![Record::Completion { prompt: "2+2?".into(), completion: "4".into() }; 8],
//!     ..Default::default()
//! };
//! let out = tempfile::tempdir()?;
//! let config = TrainConfig { max_steps: Some(3), batch_size: 4, learning_rate: 1e-2, progress: false, ..Default::default() };
//! let mut trainer = Trainer::new(model, LoraConfig::default(), config, out.path())?;
//! trainer.on_event(|event| println!("{event:?}"));
//! let report = trainer.train(&data)?;
//! assert_eq!(report.steps, 3);
//! assert!(out.path().join("adapter_model.safetensors").is_file());
//! # anyhow::Ok(())
//! ```

pub mod loss;
pub mod metrics;
pub mod optim;
mod run_folder;
pub mod schedule;
mod settings;
pub mod step;
mod update;

pub use metrics::Event;
pub use optim::AdamWConfig;
use run_folder::TrainState;
pub use run_folder::{holds_run, run_folder_of};
pub use schedule::Schedule;
pub use settings::{RunConfig, TrainConfig};
pub use update::{evaluate, step_gradients, summed_loss, Update};

use crate::adapter::{self, AdapterConfig};
use crate::data::{plan_epoch, tokenize, Dataset, Example, TokenizeReport};
use crate::lora::{self, LoraConfig};
use crate::pretrained::Model;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use metrics::MetricsLog;
use optim::AdamW;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How training ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// It ran all its steps.
    Finished,
    /// Validation loss stopped improving.
    EarlyStopped,
    /// The stop flag was raised (Ctrl-C); a checkpoint was saved.
    Interrupted,
}

/// A summary of a training run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Updates taken in total.
    pub steps: usize,
    /// The last update's loss.
    pub final_train_loss: Option<f64>,
    /// Validation loss before training (fresh runs with a validation set).
    pub initial_valid_loss: Option<f64>,
    /// Validation loss at the end.
    pub final_valid_loss: Option<f64>,
    /// The best validation loss seen.
    pub best_valid_loss: Option<f64>,
    /// Seconds spent training (resumed runs include earlier time).
    pub elapsed: f64,
    /// Non-padding tokens processed.
    pub tokens: usize,
    /// What tokenizing the training set did.
    pub train_data: TokenizeReport,
    /// What tokenizing the validation set did.
    pub valid_data: TokenizeReport,
}

/// A function called with each training event.
pub type EventCallback = Box<dyn FnMut(&Event)>;

/// Trains a LoRA adapter on a model.
pub struct Trainer {
    model: Model,
    run: RunConfig,
    out_dir: PathBuf,
    optimizer: AdamW,
    state: TrainState,
    stop: Arc<AtomicBool>,
    callbacks: Vec<EventCallback>,
    resumed: bool,
}

impl Trainer {
    /// Attaches fresh adapters to `model` and prepares a new run in `out_dir`.
    /// Refuses a folder that already holds a run: use [`Trainer::overwrite`] first,
    /// or [`Trainer::resume`].
    pub fn new(
        mut model: Model,
        lora: LoraConfig,
        config: TrainConfig,
        out_dir: &Path,
    ) -> Result<Self> {
        config.validate()?;
        lora.validate(&model.lm.config)?;
        if holds_run(out_dir) {
            bail!(
                "{} already holds a training run; refusing to overwrite it. Pass --overwrite to replace it, \
                 --resume to continue it, or choose another --out folder.",
                out_dir.display()
            );
        }
        lora::attach(&mut model.lm, &lora, config.seed)?;
        let base_model = model.repo_id().unwrap_or(&model.source.name).to_string();
        let run = RunConfig {
            base_model,
            lora,
            train: config,
        };
        std::fs::create_dir_all(out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        crate::atomic::write(
            &out_dir.join(settings::RUN_CONFIG_FILE),
            toml::to_string_pretty(&run)?.as_bytes(),
        )?;
        Self::assemble(model, run, out_dir, None)
    }

    /// Removes a previous run's files from `out_dir` (and nothing else).
    pub fn overwrite(out_dir: &Path) -> Result<()> {
        run_folder::remove_run(out_dir)
    }

    /// Continues the run in `out_dir` from its checkpoint: adapter, optimizer state,
    /// schedule, random state and position in the data are all restored.
    pub fn resume(mut model: Model, out_dir: &Path) -> Result<Self> {
        let run = RunConfig::read(out_dir)?;
        let checkpoint = run_folder::latest_checkpoint(out_dir);
        let base = model.repo_id().unwrap_or(&model.source.name).to_string();
        if !base.eq_ignore_ascii_case(&run.base_model) {
            bail!(
                "the run in {} trains {}, but the model given is {base}",
                out_dir.display(),
                run.base_model
            );
        }
        adapter::load(&mut model.lm, &checkpoint)
            .with_context(|| format!("loading the checkpoint in {}", checkpoint.display()))?;
        let state = run_folder::read_state(&checkpoint)?;
        let mut trainer = Self::assemble(model, run, out_dir, Some(state))?;
        let step = trainer.state.step;
        trainer
            .optimizer
            .load(&checkpoint.join("optimizer.safetensors"), step)?;
        trainer.resumed = true;
        Ok(trainer)
    }

    fn assemble(
        model: Model,
        run: RunConfig,
        out_dir: &Path,
        state: Option<TrainState>,
    ) -> Result<Self> {
        let optimizer = AdamW::new(lora::parameters(&model.lm), run.train.optimizer)?;
        let state = state.unwrap_or_else(|| TrainState::new(run.train.seed));
        Ok(Self {
            model,
            run,
            out_dir: out_dir.to_path_buf(),
            optimizer,
            state,
            stop: Arc::default(),
            callbacks: Vec::new(),
            resumed: false,
        })
    }

    /// A flag that, once raised (say from a Ctrl-C handler), makes training save a
    /// checkpoint and return [`Outcome::Interrupted`] after the current update.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Uses `flag` as the stop flag (for example one a Ctrl-C handler raises).
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = flag;
    }

    /// Calls `f` with every step and evaluation event.
    pub fn on_event(&mut self, f: impl FnMut(&Event) + 'static) {
        self.callbacks.push(Box::new(f));
    }

    /// The model, with its adapters.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Gives the model back, with its trained adapters.
    pub fn into_model(self) -> Model {
        self.model
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The run's configuration.
    pub fn run_config(&self) -> &RunConfig {
        &self.run
    }

    fn adapter_config(&self) -> Result<AdapterConfig> {
        AdapterConfig::new(
            &self.run.lora,
            &self.model.lm.config,
            Some(&self.run.base_model),
        )
    }

    /// Tokenizes records with this run's settings.
    pub fn tokenize(
        &self,
        records: &[crate::data::Record],
    ) -> Result<(Vec<Example>, TokenizeReport)> {
        tokenize(
            records,
            &self.model.tokenizer,
            (self.run.train.loss_on, self.run.train.turn_end),
            self.run.train.max_seq_len,
        )
    }

    /// Mean cross-entropy per trained token over `examples`, without dropout.
    pub fn evaluate(&self, examples: &[Example]) -> Result<f64> {
        evaluate(&self.model, examples, self.run.train.batch_size)
    }

    fn emit(&mut self, log: &mut MetricsLog, event: Event) -> Result<()> {
        for f in self.callbacks.iter_mut() {
            f(&event);
        }
        log.push(event)
    }

    /// Trains on `data.train`, evaluating on `data.valid`.
    pub fn train(&mut self, data: &Dataset) -> Result<TrainReport> {
        let cfg = self.run.train.clone();
        let (train, train_data) = self
            .tokenize(&data.train)
            .map_err(|e| data.origins.train.locate(e))?;
        let (valid, valid_data) = self
            .tokenize(&data.valid)
            .map_err(|e| data.origins.valid.locate(e))?;
        if train.is_empty() {
            bail!("no training example is left after tokenizing ({} records, {} dropped with no trained token)", train_data.records, train_data.dropped);
        }
        let packing = cfg.packing.then_some(cfg.max_seq_len);
        let epoch_plan = |epoch: usize| {
            plan_epoch(
                &train,
                cfg.batch_size,
                cfg.grad_accum,
                packing,
                &mut Rng::new(cfg.seed.wrapping_add(1 + epoch as u64)),
            )
        };
        let steps_per_epoch = epoch_plan(0).len();
        let total = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch);
        let mut log = MetricsLog::open(
            &self.out_dir.join("metrics.jsonl"),
            self.resumed.then_some(self.state.step),
        )?;

        let mut initial_valid_loss = None;
        if !self.resumed && !valid.is_empty() {
            let v = self.evaluate(&valid)?;
            initial_valid_loss = Some(v);
            self.emit(
                &mut log,
                Event::Eval {
                    step: 0,
                    valid_loss: v,
                },
            )?;
        }
        let bar = progress_bar(cfg.progress, total, self.state.step);
        let start = Instant::now() - std::time::Duration::from_secs_f64(self.state.elapsed);
        let mut outcome = Outcome::Finished;
        let mut final_train_loss = None;
        let mut last_eval_step = if self.resumed { None } else { Some(0) };
        let mut plan = epoch_plan(self.state.epoch);

        while self.state.step < total {
            if self.state.step_in_epoch >= plan.len() {
                self.state.epoch += 1;
                self.state.step_in_epoch = 0;
                plan = epoch_plan(self.state.epoch);
            }
            if self.stop.load(Ordering::SeqCst) {
                outcome = Outcome::Interrupted;
                break;
            }
            let t0 = Instant::now();
            let group = &plan[self.state.step_in_epoch];
            let seeds: Vec<u64> = group.iter().map(|_| self.state.rng.next_u64()).collect();
            let update = step_gradients(&self.model, &train, group, &seeds, cfg.recompute)?;
            let (step_loss, grads, tokens, trained_tokens) = (
                update.loss,
                update.gradients,
                update.tokens,
                update.trained_tokens,
            );
            if !step_loss.is_finite() {
                bar.abandon();
                bail!(
                    "training diverged at step {}: the loss is {step_loss}. The last good checkpoint in {} is intact; \
                     lower the learning rate or enable clip_grad_norm, then resume or restart.",
                    self.state.step + 1,
                    self.out_dir.join("checkpoint").display()
                );
            }
            let grad_norm = AdamW::grad_norm(&grads)?;
            let scale = match cfg.clip_grad_norm {
                Some(max) if grad_norm > max => max / grad_norm,
                _ => 1.0,
            };
            let lr = cfg
                .schedule
                .lr(cfg.learning_rate, self.state.step, cfg.warmup_steps, total);
            self.optimizer.step(&grads, lr, scale)?;
            self.state.step += 1;
            self.state.step_in_epoch += 1;
            self.state.tokens += tokens;
            self.state.elapsed = start.elapsed().as_secs_f64();
            final_train_loss = Some(step_loss);
            let tokens_per_second = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(self.state.step as u64);
            bar.set_message(format!(
                "loss {step_loss:.4} lr {lr:.2e} {tokens_per_second:.0} tok/s"
            ));
            let step = self.state.step;
            self.emit(
                &mut log,
                Event::Step {
                    step,
                    epoch: self.state.epoch,
                    loss: step_loss,
                    lr,
                    grad_norm,
                    trained_tokens,
                    tokens,
                    tokens_per_second,
                    elapsed: self.state.elapsed,
                },
            )?;
            if cfg.eval_every.is_some_and(|n| step.is_multiple_of(n))
                && !valid.is_empty()
                && step < total
            {
                last_eval_step = Some(step);
                if self.validate(&valid, &mut log)? {
                    outcome = Outcome::EarlyStopped;
                    break;
                }
            }
            if cfg.save_every.is_some_and(|n| step.is_multiple_of(n)) {
                self.save_checkpoint()?;
            }
        }
        bar.finish_and_clear();
        let mut final_valid_loss = None;
        if !valid.is_empty() && outcome != Outcome::Interrupted {
            if last_eval_step != Some(self.state.step) {
                self.validate(&valid, &mut log)?;
            }
            final_valid_loss = log.events().iter().rev().find_map(|e| match e {
                Event::Eval { valid_loss, .. } => Some(*valid_loss),
                _ => None,
            });
        }
        self.save_checkpoint()?;
        if outcome != Outcome::Interrupted {
            adapter::save(&self.model.lm, &self.adapter_config()?, &self.out_dir)?;
        }
        log.plot(&self.out_dir.join("loss.svg"))?;
        Ok(TrainReport {
            outcome,
            steps: self.state.step,
            final_train_loss,
            initial_valid_loss,
            final_valid_loss,
            best_valid_loss: self.state.best_valid_loss,
            elapsed: self.state.elapsed,
            tokens: self.state.tokens,
            train_data,
            valid_data,
        })
    }

    /// Evaluates, keeps the best adapter, and says whether patience ran out.
    fn validate(&mut self, valid: &[Example], log: &mut MetricsLog) -> Result<bool> {
        let v = self.evaluate(valid)?;
        self.emit(
            log,
            Event::Eval {
                step: self.state.step,
                valid_loss: v,
            },
        )?;
        if self.state.best_valid_loss.is_none_or(|b| v < b) {
            self.state.best_valid_loss = Some(v);
            self.state.evals_since_best = 0;
            adapter::save(
                &self.model.lm,
                &self.adapter_config()?,
                &self.out_dir.join("best"),
            )?;
        } else {
            self.state.evals_since_best += 1;
        }
        Ok(self
            .run
            .train
            .patience
            .is_some_and(|p| self.state.evals_since_best >= p))
    }

    /// Writes `checkpoint/` whole or not at all.
    fn save_checkpoint(&self) -> Result<()> {
        let adapter = self.adapter_config()?;
        run_folder::save_checkpoint(&self.out_dir, |fresh| {
            adapter::save(&self.model.lm, &adapter, fresh)?;
            self.optimizer.save(&fresh.join("optimizer.safetensors"))?;
            crate::atomic::write(
                &fresh.join("trainer_state.json"),
                serde_json::to_string_pretty(&self.state)?.as_bytes(),
            )
        })
    }
}

fn progress_bar(show: bool, total: usize, done: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "train [{bar:30}] {pos}/{len} steps, {msg}, ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(done as u64);
    bar
}
