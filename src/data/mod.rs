//! Training data: JSONL files ([`records`]), tokenized with loss masks
//! ([`tokenize`](mod@tokenize)) and laid out in batches ([`batch`]).

pub mod batch;
pub mod records;
pub mod tokenize;

pub use batch::{make_batch, plan_epoch, shards, Batch};
pub use records::{read_jsonl, DataError, Record};
pub use tokenize::{tokenize, Example, LossOn, TokenizeReport, TurnEnd};

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The splits of a dataset.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// Training records.
    pub train: Vec<Record>,
    /// Validation records, if any.
    pub valid: Vec<Record>,
    /// Test records, if any.
    pub test: Vec<Record>,
    /// Where the data came from.
    pub source: PathBuf,
}

impl Dataset {
    /// Loads one JSONL file (all training data) or a folder holding `train.jsonl`
    /// and optionally `valid.jsonl` and `test.jsonl`.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Ok(Self {
                train: read_jsonl(path)?,
                source: path.to_path_buf(),
                ..Default::default()
            });
        }
        if !path.is_dir() {
            bail!(
                "{} does not exist: pass a .jsonl file or a folder holding train.jsonl",
                path.display()
            );
        }
        let train = path.join("train.jsonl");
        if !train.is_file() {
            bail!("{} has no train.jsonl: a data folder holds train.jsonl, and optionally valid.jsonl and test.jsonl", path.display());
        }
        let optional = |name: &str| -> Result<Vec<Record>> {
            let p = path.join(name);
            Ok(if p.is_file() {
                read_jsonl(&p)?
            } else {
                Vec::new()
            })
        };
        Ok(Self {
            train: read_jsonl(&train)?,
            valid: optional("valid.jsonl")?,
            test: optional("test.jsonl")?,
            source: path.to_path_buf(),
        })
    }
}
