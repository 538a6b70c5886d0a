//! Evaluation on held-out examples: greedy answers scored against reference
//! answers ([`metrics`]), and the prompting-versus-fine-tuning comparison
//! ([`compare`](mod@compare)) with its reports ([`report`]).

pub mod baseline;
mod charts;
pub mod compare;
pub mod comparison;
pub mod metrics;
pub mod overlap;
pub mod report;
pub mod retrieve;
pub mod scaling;
mod score;
pub mod significance;
pub mod stats;
pub mod variants;
pub mod verdict;

pub use compare::{compare, CompareConfig, Comparison};
pub use metrics::{exact_match, normalize};

use crate::chat::Message;
use crate::data::records::{read_jsonl_located, DataError};
use crate::data::Record;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A held-out question: the conversation up to the answer, and the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldOut {
    /// The turns before the reference answer.
    pub prompt: Vec<Message>,
    /// The reference answer (the last assistant turn).
    pub reference: String,
    /// Where it was read from (`file:line`), for errors.
    pub origin: String,
}

impl HeldOut {
    /// Splits a record into prompt and reference. Text records have no answer.
    pub fn from_record(record: &Record) -> Result<Self> {
        let Some(mut messages) = record.messages() else {
            bail!("a text record has no answer to compare with: use prompt/completion or messages records");
        };
        let Some(last) = messages.pop().filter(|m| m.role == "assistant") else {
            bail!("the last turn is not an assistant answer");
        };
        if messages.first().is_none_or(|m| m.role == "assistant") {
            bail!("the conversation opens with an assistant turn: open it with a user (or system) turn");
        }
        Ok(Self {
            prompt: messages,
            reference: last.content,
            origin: String::new(),
        })
    }

    /// The last user message.
    pub fn question(&self) -> &str {
        self.prompt
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str())
    }
}

/// Reads held-out examples from a JSONL file; every record must carry an answer.
pub fn read_held_out(path: &Path) -> Result<Vec<HeldOut>> {
    let mut out = Vec::new();
    for (line, record) in read_jsonl_located(path)? {
        let mut held = HeldOut::from_record(&record).map_err(|e| DataError {
            path: path.to_path_buf(),
            line: Some(line),
            field: None,
            message: format!("{e}; a held-out set needs an answer on every line"),
        })?;
        held.origin = format!("{}:{line}", path.display());
        out.push(held);
    }
    Ok(out)
}

/// The held-out file of a data path: the file itself, or a folder's test.jsonl
/// (else valid.jsonl); and the folder's train.jsonl, if any.
pub fn data_files(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if path.is_file() {
        return Ok((path.to_path_buf(), None));
    }
    if !path.is_dir() {
        bail!(
            "{} does not exist: pass a .jsonl file or a folder holding test.jsonl",
            path.display()
        );
    }
    let train = Some(path.join("train.jsonl")).filter(|p| p.is_file());
    for name in ["test.jsonl", "valid.jsonl"] {
        if path.join(name).is_file() {
            return Ok((path.join(name), train));
        }
    }
    bail!(
        "{} has neither test.jsonl nor valid.jsonl to evaluate on",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_splits_off_the_last_answer() {
        let r = Record::Completion {
            prompt: "p".into(),
            completion: "c".into(),
        };
        let h = HeldOut::from_record(&r).unwrap();
        assert_eq!(
            (h.prompt, h.reference.as_str()),
            (vec![Message::user("p")], "c")
        );
        assert!(HeldOut::from_record(&Record::Text("t".into())).is_err());
        for opening in [
            vec![Message::assistant("a")],
            vec![
                Message::assistant("a"),
                Message::user("u"),
                Message::assistant("b"),
            ],
        ] {
            let err = HeldOut::from_record(&Record::Chat(opening)).unwrap_err();
            assert!(
                err.to_string().contains("opens with an assistant turn"),
                "{err}"
            );
        }
        // A lone user turn has no answer, whichever turn opens it.
        let err = HeldOut::from_record(&Record::Chat(vec![Message::user("u")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("the last turn is not an assistant answer"),
            "{err}"
        );
    }

    #[test]
    fn a_test_set_without_answers_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"text\": \"no answer\"}\n",
        )
        .unwrap();
        let err = read_held_out(&path).unwrap_err().to_string();
        assert!(
            err.contains("test.jsonl:3") && err.contains("no answer to compare"),
            "{err}"
        );
    }
}
