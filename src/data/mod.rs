//! Training data: JSONL files ([`records`]), tokenized with loss masks
//! ([`tokenize`](mod@tokenize)) and laid out in batches ([`batch`]).

pub mod batch;
pub mod records;
pub mod tokenize;

pub use batch::{make_batch, plan_epoch, shards, Batch};
pub use records::{read_jsonl, DataError, Record};
pub use tokenize::{tokenize, Example, LossOn, RecordError, TokenizeReport, TurnEnd};

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
    /// Where each split's records were read ([`Dataset::load`]); empty for
    /// records made in code.
    pub origins: Origins,
}

/// Where each split of a [`Dataset`] was read.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// The training records'.
    pub train: Origin,
    /// The validation records'.
    pub valid: Origin,
    /// The test records'.
    pub test: Origin,
}

/// A file of records and each record's 1-based line in it.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The file (empty for records made in code).
    pub path: PathBuf,
    /// The line of each record, in order.
    pub lines: Vec<usize>,
}

impl Origin {
    /// Reads a JSONL file's records and where each one stands.
    fn read(path: &Path) -> Result<(Vec<Record>, Self)> {
        let (lines, records) = records::read_jsonl_located(path)?.into_iter().unzip();
        let origin = Self {
            path: path.to_path_buf(),
            lines,
        };
        Ok((records, origin))
    }

    /// A [`RecordError`] from [`tokenize()`] made a [`DataError`] at its
    /// record's file and line, where they are known (else left as it is,
    /// naming the record by its number); any other error as it is.
    pub fn locate(&self, error: anyhow::Error) -> anyhow::Error {
        let error = match error.downcast::<RecordError>() {
            Ok(error) => error,
            Err(other) => return other,
        };
        match self.lines.get(error.index) {
            Some(&line) => DataError {
                path: self.path.clone(),
                line: Some(line),
                field: None,
                message: error.message,
            }
            .into(),
            None => error.into(),
        }
    }
}

impl Dataset {
    /// Loads one JSONL file (all training data) or a folder holding `train.jsonl`
    /// and optionally `valid.jsonl` and `test.jsonl`.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_file() {
            let (train, origin) = Origin::read(path)?;
            return Ok(Self {
                train,
                source: path.to_path_buf(),
                origins: Origins {
                    train: origin,
                    ..Default::default()
                },
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
        let optional = |name: &str| -> Result<(Vec<Record>, Origin)> {
            let p = path.join(name);
            match p.is_file() {
                true => Origin::read(&p),
                false => Ok(Default::default()),
            }
        };
        let (train, train_origin) = Origin::read(&train)?;
        let (valid, valid_origin) = optional("valid.jsonl")?;
        let (test, test_origin) = optional("test.jsonl")?;
        Ok(Self {
            train,
            valid,
            test,
            source: path.to_path_buf(),
            origins: Origins {
                train: train_origin,
                valid: valid_origin,
                test: test_origin,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record the tokenizer refuses is named by its file and line (blank
    /// lines counted), in each split of a data folder.
    #[test]
    fn a_record_that_fails_to_tokenize_is_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let opening = r#"{"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}"#;
        let good = r#"{"prompt": "a", "completion": "b"}"#;
        std::fs::write(
            dir.path().join("train.jsonl"),
            format!("{good}\n\n{opening}\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("valid.jsonl"), format!("{opening}\n")).unwrap();
        let data = Dataset::load(dir.path()).unwrap();
        let tok = crate::Tokenizer::byte_level_chatml().unwrap();
        let options = (LossOn::AssistantTurns, TurnEnd::EndToken);
        for (records, origin, file, line) in [
            (&data.train, &data.origins.train, "train.jsonl", 3),
            (&data.valid, &data.origins.valid, "valid.jsonl", 1),
        ] {
            let error = tokenize(records, &tok, options, 64).unwrap_err();
            let located = origin.locate(error).downcast::<DataError>().unwrap();
            assert_eq!(located.path, dir.path().join(file));
            assert_eq!(located.line, Some(line));
            assert!(located.message.contains("opens with an assistant turn"));
        }
        // Records made in code have no file: the error keeps the record's index.
        let error = tokenize(&data.valid, &tok, options, 64).unwrap_err();
        let unplaced = Origin::default().locate(error);
        assert!(unplaced.downcast_ref::<RecordError>().is_some());
        assert!(unplaced.to_string().starts_with("record 1: "), "{unplaced}");
        // Other errors pass through as they are.
        let other = Origin::default().locate(anyhow::anyhow!("disk full"));
        assert_eq!(other.to_string(), "disk full");
    }
}
