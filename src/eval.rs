//! Evaluating a model on held-out examples: greedy answers scored against the
//! reference answers.

use crate::chat::Message;
use crate::data::Record;
use crate::generate::{Generation, GenerationConfig};
use crate::pretrained::Model;
use anyhow::{bail, Result};
use serde::Serialize;

/// A held-out question: the conversation up to the answer, and the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeldOut {
    /// The turns before the reference answer.
    pub prompt: Vec<Message>,
    /// The reference answer (the last assistant turn).
    pub reference: String,
}

impl HeldOut {
    /// Splits a record into prompt and reference. Text records have no answer.
    pub fn from_record(record: &Record) -> Result<Self> {
        let Some(mut messages) = record.messages() else {
            bail!("a text record has no answer to compare with: use prompt/completion or messages records");
        };
        match messages.pop() {
            Some(last) if last.role == "assistant" => Ok(Self {
                prompt: messages,
                reference: last.content,
            }),
            _ => bail!("the last turn is not an assistant answer"),
        }
    }
}

/// Collapses runs of whitespace and trims.
pub fn normalize(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Exact match after whitespace normalisation.
pub fn exact_match(answer: &str, reference: &str) -> bool {
    normalize(answer) == normalize(reference)
}

/// The model's greedy answer to a held-out prompt.
pub fn answer(model: &Model, prompt: &[Message], config: &GenerationConfig) -> Result<Generation> {
    model.chat(prompt, config, &mut |_| {})
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
        assert!(exact_match(" a\n b ", "a b"));
        assert!(!exact_match("a b.", "a b"));
    }
}
