//! The main job, end to end: load a model and a dataset, train a LoRA adapter
//! into a run folder, and show that the model learned (validation loss and a
//! few test answers, before and after). The `finetune` example is a thin
//! command line over this.

use crate::data::Dataset;
use crate::device::DeviceSpec;
use crate::eval::{self, HeldOut};
use crate::generate::{GenerationConfig, DEFAULT_BATCH};
use crate::lora::LoraConfig;
use crate::pretrained::{LoadOptions, Model};
use crate::train::{RunConfig, TrainConfig, TrainReport, Trainer};
use crate::Message;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Everything a fine-tuning job needs: what a `--config` TOML file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// A name from models.toml, an HF-layout folder or a .gguf file.
    pub model: String,
    /// A .jsonl file or a folder with train.jsonl (and valid.jsonl, test.jsonl).
    pub data: PathBuf,
    /// The run folder.
    pub out: PathBuf,
    /// cpu, cuda, cuda:N, metal or auto.
    pub device: String,
    /// Test answers to show before and after training.
    pub samples: usize,
    /// The adapter.
    pub lora: LoraConfig,
    /// The training.
    pub train: TrainConfig,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            model: "smollm2-135m-instruct".into(),
            data: Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data"),
            out: PathBuf::from("runs/triage"),
            device: "auto".into(),
            samples: 4,
            lora: LoraConfig::default(),
            train: TrainConfig {
                learning_rate: 1e-3,
                epochs: 2,
                batch_size: 8,
                warmup_steps: 5,
                eval_every: Some(25),
                save_every: Some(25),
                ..TrainConfig::default()
            },
        }
    }
}

impl JobConfig {
    /// Reads a job from TOML; fields not given keep their defaults.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// The job that continues the run in `out`: its saved adapter and training
    /// settings (`train_config.toml`), with the defaults for the rest (the
    /// model, the data and the device are not saved, so give them again).
    pub fn of_run(out: &Path) -> Result<Self> {
        let run = RunConfig::read(out)?;
        Ok(Self {
            out: out.to_path_buf(),
            lora: run.lora,
            train: run.train,
            ..Self::default()
        })
    }
}

/// The adapter and training settings of `job` that differ from those saved for
/// `run`, as `key (saved X, given Y)`.
fn changed_settings(run: &RunConfig, job: &JobConfig) -> Result<Vec<String>> {
    fn diff(path: &str, saved: &Value, given: &Value, out: &mut Vec<String>) {
        match (saved, given) {
            (Value::Object(a), Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let (x, y) = (&a.get(k), &b.get(k));
                    let (x, y) = (x.unwrap_or(&Value::Null), y.unwrap_or(&Value::Null));
                    diff(&format!("{path}.{k}"), x, y, out);
                }
            }
            (a, b) if a != b => out.push(format!("{path} (saved {a}, given {b})")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    use serde_json::to_value as value;
    diff("lora", &value(&run.lora)?, &value(&job.lora)?, &mut out);
    diff("train", &value(&run.train)?, &value(&job.train)?, &mut out);
    Ok(out)
}

/// What to do when the run folder already holds a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existing {
    /// Refuse (the default: nothing is ever lost by accident).
    #[default]
    Refuse,
    /// Replace it.
    Overwrite,
    /// Continue it from its checkpoint.
    Resume,
}

/// One test question answered before and after training.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// The user's message.
    pub question: String,
    /// The reference answer.
    pub reference: String,
    /// The base model's answer.
    pub before: String,
    /// The fine-tuned model's answer.
    pub after: String,
}

/// What a job did.
#[derive(Debug, Clone, Serialize)]
pub struct JobReport {
    /// The run folder.
    pub out: PathBuf,
    /// The training summary.
    pub train: TrainReport,
    /// Test answers before and after.
    pub samples: Vec<Sample>,
    /// How the base's linear weights were held, and what loading noted.
    pub base: Vec<String>,
}

/// Runs a job. `stop`, when raised (Ctrl-C), checkpoints and ends training early.
pub fn run(
    job: &JobConfig,
    existing: Existing,
    stop: Option<Arc<AtomicBool>>,
) -> Result<JobReport> {
    let data = Dataset::load(&job.data)?;
    let device: DeviceSpec = job.device.parse()?;
    let model = Model::load(
        &job.model,
        &LoadOptions {
            device,
            dtype: None,
            quantize: job.train.quantize,
            base_dtype: job.train.dtype,
        },
    )?;
    // The run records the precision used, `auto` resolved.
    let mut job = job.clone();
    job.train.dtype = job.train.dtype.resolve(model.lm.device());
    let job = &job;
    let (linears, vocabulary) = crate::quantize::base_bytes(&model.lm);
    let mut base = vec![format!(
        "{} base ({}); linear weights held as --quantize {} ({:.0} MB), embeddings and output {:.0} MB",
        job.train.dtype,
        job.train.dtype.arithmetic(model.lm.device()),
        job.train.quantize,
        linears as f64 / 1e6,
        vocabulary as f64 / 1e6
    )];
    base.extend(crate::quantize::block_arithmetic(&model.lm));
    base.extend(model.notes.iter().cloned());
    let mut trainer = match existing {
        Existing::Resume => {
            let trainer = Trainer::resume(model, &job.out)?;
            let mut saved = trainer.run_config().clone();
            // A run saved before `dtype` was recorded says `auto`.
            saved.train.dtype = saved.train.dtype.resolve(trainer.model().lm.device());
            let changed = changed_settings(&saved, job)?;
            if !changed.is_empty() {
                bail!(
                    "--resume continues the run in {} with the settings it was started with, \
                     but these were given otherwise: {}. Resume without changing them, or start \
                     a new run (another --out, or --overwrite).",
                    job.out.display(),
                    changed.join(", ")
                );
            }
            trainer
        }
        Existing::Overwrite => {
            Trainer::overwrite(&job.out)?;
            Trainer::new(model, job.lora.clone(), job.train.clone(), &job.out)?
        }
        Existing::Refuse => Trainer::new(model, job.lora.clone(), job.train.clone(), &job.out)?,
    };
    if let Some(stop) = stop {
        trainer.set_stop_flag(stop);
    }
    let held_out: Vec<HeldOut> = data
        .test
        .iter()
        .chain(&data.valid)
        .filter_map(|r| HeldOut::from_record(r).ok())
        .take(job.samples)
        .collect();
    let greedy = GenerationConfig::greedy(48);
    let prompts: Vec<Vec<Message>> = held_out.iter().map(|h| h.prompt.clone()).collect();
    let answers = |model: &Model| -> Result<Vec<String>> {
        Ok(model
            .chat_batch(&prompts, &greedy, DEFAULT_BATCH)?
            .into_iter()
            .map(|g| g.text)
            .collect())
    };
    // Fresh adapters (B = 0) leave the base model unchanged, so this is the base model.
    let before = if existing == Existing::Resume {
        Vec::new()
    } else {
        answers(trainer.model())?
    };
    let report = trainer.train(&data)?;
    let after = answers(trainer.model())?;
    let samples = held_out
        .iter()
        .zip(after)
        .enumerate()
        .map(|(i, (h, after))| {
            Ok(Sample {
                question: h
                    .prompt
                    .last()
                    .map(|m| m.content.clone())
                    .unwrap_or_default(),
                reference: h.reference.clone(),
                before: before.get(i).cloned().unwrap_or_default(),
                after,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(JobReport {
        out: job.out.clone(),
        train: report,
        samples,
        base,
    })
}

impl fmt::Display for JobReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.train;
        writeln!(f, "Run folder: {}", self.out.display())?;
        for line in &self.base {
            writeln!(f, "Base: {line}")?;
        }
        writeln!(
            f,
            "Outcome: {:?} after {} steps, {:.0} s, {} tokens ({:.0} tokens/s)",
            t.outcome,
            t.steps,
            t.elapsed,
            t.tokens,
            t.tokens as f64 / t.elapsed.max(1e-9)
        )?;
        writeln!(
            f,
            "Training data: {} records, {} truncated, {} dropped with no trained token",
            t.train_data.records, t.train_data.truncated, t.train_data.dropped
        )?;
        match (t.initial_valid_loss, t.final_valid_loss) {
            (Some(a), Some(b)) => writeln!(
                f,
                "Validation loss: {a:.4} before, {b:.4} after (best {:.4})",
                t.best_valid_loss.unwrap_or(b)
            )?,
            (None, Some(b)) => writeln!(f, "Validation loss: {b:.4} after")?,
            _ => {}
        }
        if !self.samples.is_empty() {
            let right = |pick: fn(&Sample) -> &str| {
                self.samples
                    .iter()
                    .filter(|s| eval::metrics::exact_match(pick(s), &s.reference))
                    .count()
            };
            writeln!(
                f,
                "\nTest answers (exact match: {}/{n} before, {}/{n} after):",
                right(|s| &s.before),
                right(|s| &s.after),
                n = self.samples.len()
            )?;
            for s in &self.samples {
                writeln!(f, "\n  Q:        {}", s.question)?;
                writeln!(f, "  expected: {}", s.reference)?;
                if !s.before.is_empty() {
                    writeln!(f, "  before:   {}", one_line(&s.before))?;
                }
                writeln!(f, "  after:    {}", one_line(&s.after))?;
            }
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    let s = eval::metrics::normalize(s);
    if s.chars().count() > 100 {
        format!("{}...", s.chars().take(100).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_config_file_parses_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        let text = "model = \"smollm2-135m-instruct\"\ndata = \"my_data\"\nout = \"runs/mine\"\n\n[lora]\nr = 16\nalpha = 32.0\ntarget_modules = [\"q_proj\", \"v_proj\"]\n\n[train]\nlearning_rate = 5e-4\nepochs = 3\nbatch_size = 8\neval_every = 25\npatience = 3\n";
        std::fs::write(&path, text).unwrap();
        let job = JobConfig::from_toml_file(&path).unwrap();
        assert_eq!(
            (job.lora.r, job.train.epochs, job.train.patience),
            (16, 3, Some(3))
        );
        assert_eq!(job.samples, JobConfig::default().samples);
        std::fs::write(&path, "[train]\nlearnign_rate = 1.0\n").unwrap();
        let err = format!("{:#}", JobConfig::from_toml_file(&path).unwrap_err());
        assert!(
            err.contains("job.toml") && err.contains("learnign_rate"),
            "{err}"
        );
    }
}
