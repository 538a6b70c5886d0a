//! Records to token ids with a loss mask. Chat and prompt/completion records go
//! through the model's chat template; the trained spans (assistant turns and
//! their end-of-turn token) come from rendering the conversation's prefixes and
//! mapping those byte ranges onto the tokens' offsets. No string is searched.

use super::records::Record;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which tokens the loss falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossOn {
    /// Every assistant turn and its end-of-turn token (the default).
    #[default]
    AssistantTurns,
    /// Only the last assistant turn.
    LastAssistant,
    /// Every token of the sequence.
    All,
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether the loss falls on predicting token `i` (always false for token 0).
    pub trained: Vec<bool>,
}

impl Example {
    /// How many tokens the loss falls on.
    pub fn trained_tokens(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }

    /// `rows` examples of `len` tokens each, every prediction trained, with ids
    /// spread over `vocab`: a fixed workload for benchmarks.
    pub fn synthetic(rows: usize, len: usize, vocab: usize) -> Vec<Self> {
        (0..rows)
            .map(|r| Self {
                ids: (0..len)
                    .map(|i| ((r * len + i) * 7919 % vocab) as u32)
                    .collect(),
                trained: (0..len).map(|i| i > 0).collect(),
            })
            .collect()
    }
}

/// What tokenizing a set of records did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TokenizeReport {
    /// Records read.
    pub records: usize,
    /// Examples cut to the maximum length.
    pub truncated: usize,
    /// Examples dropped because no trained token was left.
    pub dropped: usize,
}

/// Byte ranges of the rendered conversation that the loss falls on.
fn trained_spans(
    tok: &Tokenizer,
    messages: &[crate::chat::Message],
    loss_on: LossOn,
) -> Result<(String, Vec<(usize, usize)>)> {
    let full = tok.apply_chat_template(messages, false)?;
    if loss_on == LossOn::All {
        return Ok((full.clone(), vec![(0, full.len())]));
    }
    let assistant: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
        .map(|(i, _)| i)
        .collect();
    let chosen: &[usize] = match loss_on {
        LossOn::LastAssistant => &assistant[assistant.len().saturating_sub(1)..],
        _ => &assistant,
    };
    let mut spans = Vec::new();
    for &i in chosen {
        let before = tok.apply_chat_template(&messages[..i], true)?;
        let through = tok.apply_chat_template(&messages[..=i], false)?;
        if !full.starts_with(&through) || !through.starts_with(&before) {
            bail!("the chat template does not render conversations prefix by prefix, so assistant turns cannot be located; use loss_on = \"all\"");
        }
        spans.push((before.len(), through.len()));
    }
    Ok((full, spans))
}

/// Tokenizes one record. Returns the example before truncation.
pub fn tokenize_record(record: &Record, tok: &Tokenizer, loss_on: LossOn) -> Result<Example> {
    let (ids, trained) = match record.messages() {
        None => {
            let Record::Text(text) = record else {
                unreachable!()
            };
            let mut ids = tok.encode(text, true)?;
            ids.push(tok.eos_ids().first().copied().unwrap_or(0));
            let trained = (0..ids.len()).map(|i| i > 0).collect();
            (ids, trained)
        }
        Some(messages) => {
            let (text, spans) = trained_spans(tok, &messages, loss_on)?;
            let enc = tok.encode_with_offsets(&text, false)?;
            let trained = enc
                .offsets
                .iter()
                .enumerate()
                .map(|(i, &(start, _))| {
                    i > 0 && spans.iter().any(|&(a, b)| start >= a && start < b)
                })
                .collect();
            (enc.ids, trained)
        }
    };
    Ok(Example { ids, trained })
}

/// Tokenizes records, truncating to `max_seq_len` and dropping examples left
/// with no trained token.
pub fn tokenize(
    records: &[Record],
    tok: &Tokenizer,
    loss_on: LossOn,
    max_seq_len: usize,
) -> Result<(Vec<Example>, TokenizeReport)> {
    let mut report = TokenizeReport {
        records: records.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        let mut ex = tokenize_record(record, tok, loss_on)?;
        if ex.ids.len() > max_seq_len {
            ex.ids.truncate(max_seq_len);
            ex.trained.truncate(max_seq_len);
            report.truncated += 1;
        }
        if ex.trained_tokens() == 0 {
            report.dropped += 1;
            continue;
        }
        out.push(ex);
    }
    Ok((out, report))
}
