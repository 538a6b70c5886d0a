//! Records to token ids with a loss mask. Chat and prompt/completion records go
//! through the model's chat template; the trained spans (assistant turns and
//! their end-of-turn token) come from rendering the conversation's prefixes and
//! mapping those byte ranges onto the tokens' offsets. No string is searched.
//!
//! A turn's span as the template renders it often goes on past the end-of-turn
//! token (ChatML writes `<|im_end|>` and then a newline). By default the loss
//! stops at that token, inclusive ([`TurnEnd::EndToken`], Axolotl's
//! `train_on_eos: turn`): the model learns to end its answer, and nothing of
//! what the template writes between turns.

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

/// Where the loss on an assistant turn ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TurnEnd {
    /// At the turn's end-of-turn token (one of the tokenizer's
    /// [`eos_ids`](Tokenizer::eos_ids), which generation stops at), inclusive:
    /// the default. A turn that renders no such token is trained to its end.
    #[default]
    EndToken,
    /// At the end of everything the template renders for the turn, text after
    /// the end-of-turn token included (ChatML's newline): tuneforge 0.1's mask.
    Rendered,
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
    if chosen.first() == Some(&0) {
        bail!("the conversation opens with an assistant turn: start it with a user (or system) turn, as chat templates expect, or train on every token with loss_on = \"all\"");
    }
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
pub fn tokenize_record(
    record: &Record,
    tok: &Tokenizer,
    loss_on: LossOn,
    turn_end: TurnEnd,
) -> Result<Example> {
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
            let stop_at_end_token = turn_end == TurnEnd::EndToken && loss_on != LossOn::All;
            let mut trained = vec![false; enc.ids.len()];
            for (a, b) in spans {
                for (i, &(start, _)) in enc.offsets.iter().enumerate().skip(1) {
                    if start < a || start >= b {
                        continue;
                    }
                    trained[i] = true;
                    if stop_at_end_token && tok.eos_ids().contains(&enc.ids[i]) {
                        break;
                    }
                }
            }
            (enc.ids, trained)
        }
    };
    Ok(Example { ids, trained })
}

/// A record that could not be tokenized: its index among the records given
/// to [`tokenize`] and why (the chat template failed on it, say). A caller
/// that knows where the records came from names the file and line
/// ([`crate::data::Origin::locate`]).
#[derive(Debug)]
pub struct RecordError {
    /// The record's 0-based index.
    pub index: usize,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "record {}: {}", self.index + 1, self.message)
    }
}

impl std::error::Error for RecordError {}

/// Tokenizes records, truncating to `max_seq_len` and dropping examples left
/// with no trained token. A record that fails is reported as a
/// [`RecordError`].
pub fn tokenize(
    records: &[Record],
    tok: &Tokenizer,
    (loss_on, turn_end): (LossOn, TurnEnd),
    max_seq_len: usize,
) -> Result<(Vec<Example>, TokenizeReport)> {
    let mut report = TokenizeReport {
        records: records.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        let mut ex = tokenize_record(record, tok, loss_on, turn_end).map_err(|e| RecordError {
            index,
            message: format!("{e:#}"),
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_of_ten_characters(loss_on: LossOn, turn_end: TurnEnd) -> Example {
        let tok = Tokenizer::byte_level_chatml().unwrap();
        let record = Record::Completion {
            prompt: "2+2?".into(),
            completion: "four, sure".into(),
        };
        tokenize_record(&record, &tok, loss_on, turn_end).unwrap()
    }

    #[test]
    fn the_loss_stops_at_the_end_of_turn_token() {
        let ex = answer_of_ten_characters(LossOn::AssistantTurns, TurnEnd::EndToken);
        // One byte token per character, then <|im_end|> (id 2); not the newline after it.
        assert_eq!(ex.trained_tokens(), 11);
        let last = ex.trained.iter().rposition(|&t| t).unwrap();
        assert_eq!(ex.ids[last], 2);
        assert_eq!(
            last + 2,
            ex.ids.len(),
            "only the template's newline follows"
        );
        let first = ex.trained.iter().position(|&t| t).unwrap();
        assert_eq!(ex.ids[first], u32::from(b'f') + 3);
    }

    #[test]
    fn the_rendered_turn_end_also_trains_the_text_after_the_token() {
        let ex = answer_of_ten_characters(LossOn::AssistantTurns, TurnEnd::Rendered);
        assert_eq!(ex.trained_tokens(), 12);
        assert!(*ex.trained.last().unwrap(), "the newline after <|im_end|>");
    }

    /// A conversation that opens with the assistant is refused as the
    /// record it is (its index), with what to do, and trains on every token
    /// with `loss_on = "all"`.
    #[test]
    fn an_opening_assistant_turn_names_its_record() {
        let tok = Tokenizer::byte_level_chatml().unwrap();
        let good = Record::Completion {
            prompt: "a".into(),
            completion: "b".into(),
        };
        let opening = Record::Chat(vec![
            crate::chat::Message::assistant("hello"),
            crate::chat::Message::user("hi"),
        ]);
        let records = [good.clone(), good, opening];
        let options = (LossOn::AssistantTurns, TurnEnd::EndToken);
        let error = tokenize(&records, &tok, options, 64).unwrap_err();
        let error = error.downcast::<RecordError>().unwrap();
        assert_eq!(error.index, 2);
        assert!(
            error.message.contains("opens with an assistant turn"),
            "{error}"
        );
        assert!(error.to_string().starts_with("record 3: "), "{error}");
        let (all, _) = tokenize(&records, &tok, (LossOn::All, TurnEnd::EndToken), 64).unwrap();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn every_assistant_turn_ends_at_its_own_token() {
        let tok = Tokenizer::byte_level_chatml().unwrap();
        let m = crate::chat::Message::assistant;
        let record = Record::Chat(vec![
            crate::chat::Message::user("a"),
            m("bc"),
            crate::chat::Message::user("d"),
            m("ef"),
        ]);
        let ex = tokenize_record(&record, &tok, LossOn::AssistantTurns, TurnEnd::EndToken).unwrap();
        assert_eq!(ex.trained_tokens(), 6, "2 + end token, twice");
        let last =
            tokenize_record(&record, &tok, LossOn::LastAssistant, TurnEnd::EndToken).unwrap();
        assert_eq!(last.trained_tokens(), 3);
        let all = tokenize_record(&record, &tok, LossOn::All, TurnEnd::EndToken).unwrap();
        assert_eq!(
            all.trained_tokens(),
            all.ids.len() - 1,
            "`all` ignores turn ends"
        );
    }
}
