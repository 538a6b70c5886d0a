//! The variants a comparison runs: how each prompts the model (an
//! instruction, worked examples chosen one way or another, a JSON grammar)
//! and with which adapter. Every option a variant takes is in its name.

use super::compare::CompareConfig;
use super::retrieve::Retriever;
use super::HeldOut;
use crate::chat::Message;
use crate::generate::json::JsonSchema;
use crate::pretrained::Model;
use crate::rng::Rng;
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

/// A worked example: a question and its answer.
pub(super) type Shot = (String, String);

/// A way of prompting, with or without an adapter.
#[derive(Debug, Clone)]
pub(super) struct Variant {
    pub name: String,
    pub adapter: Option<PathBuf>,
    pub system: Option<String>,
    pub shots: Shots,
    /// Answers are constrained to this JSON shape.
    pub json_schema: Option<Arc<JsonSchema>>,
    /// What the report should say about how it ran.
    pub note: Option<String>,
}

/// The worked examples a variant puts before the question.
#[derive(Debug, Clone)]
pub(super) enum Shots {
    /// The same examples before every question.
    Fixed(Vec<Shot>),
    /// Examples chosen for each question, by its index in the held-out set.
    PerQuestion(Vec<Vec<Shot>>),
    /// The first `counts[i]` of `examples` before question i (many-shot:
    /// the same block for every question that fits it).
    Leading {
        examples: Vec<Shot>,
        counts: Vec<usize>,
    },
}

impl Variant {
    /// A variant with no constraint and nothing to note.
    pub fn new(
        name: String,
        adapter: Option<PathBuf>,
        system: Option<String>,
        shots: Shots,
    ) -> Self {
        Self {
            name,
            adapter,
            system,
            shots,
            json_schema: None,
            note: None,
        }
    }

    /// The prompt of held-out question `index`, `held`.
    pub fn prompt(&self, index: usize, held: &HeldOut) -> Vec<Message> {
        let shots = match &self.shots {
            Shots::Fixed(shots) => shots.as_slice(),
            Shots::PerQuestion(each) => each[index].as_slice(),
            Shots::Leading { examples, counts } => &examples[..counts[index]],
        };
        prompt_with(self.system.as_deref(), shots, held)
    }

    /// Questions that share a prompt prefix decode together: the group of
    /// question `index` (many-shot questions with fewer shots form their own).
    pub fn group(&self, index: usize) -> usize {
        match &self.shots {
            Shots::Leading { counts, .. } => counts[index],
            _ => 0,
        }
    }
}

/// The prompt of `held` with the instruction `system` and the worked examples `shots`.
fn prompt_with(system: Option<&str>, shots: &[Shot], held: &HeldOut) -> Vec<Message> {
    let mut turns = held.prompt.clone();
    let mut messages = Vec::new();
    if let Some(system) = system {
        if turns.first().is_some_and(|m| m.role == "system") {
            let existing = turns.remove(0);
            messages.push(Message::system(format!("{system}\n\n{}", existing.content)));
        } else {
            messages.push(Message::system(system));
        }
    } else if turns.first().is_some_and(|m| m.role == "system") {
        messages.push(turns.remove(0));
    }
    for (user, assistant) in shots {
        messages.push(Message::user(user.clone()));
        messages.push(Message::assistant(assistant.clone()));
    }
    messages.extend(turns);
    messages
}

/// Retrieved few-shot: before each held-out question, the `k` examples of
/// the retriever's pool whose questions are most similar to it by BM25;
/// named `name`.
pub(super) fn retrieved_few_shot(
    name: String,
    retriever: &Retriever,
    held_out: &[HeldOut],
    k: usize,
) -> Variant {
    let pool = retriever.pool();
    let chosen = held_out
        .iter()
        .map(|h| {
            retriever
                .nearest(h.question(), k)
                .into_iter()
                .map(|i| (pool[i].question().to_string(), pool[i].reference.clone()))
                .collect()
        })
        .collect();
    Variant::new(name, None, None, Shots::PerQuestion(chosen))
}

/// How the many-shot variant chose its examples.
pub(super) struct ManyShot {
    pub variant: Variant,
    /// Shots before a question that fits the context.
    pub shots: usize,
}

/// The many-shot variant: the training examples in one shuffled order (the
/// same for every question), as many as fit the context with room for the
/// answer for the median question, at most `max_shots`. A longer question
/// gets fewer, and the variant's note says how many. `None` when no example fits.
pub(super) fn many_shot(
    model: &Model,
    train: &[HeldOut],
    held_out: &[HeldOut],
    max_shots: Option<usize>,
    answer_tokens: usize,
    seed: u64,
) -> Result<Option<ManyShot>> {
    let mut order: Vec<usize> = (0..train.len()).collect();
    Rng::new(seed ^ 0x6d61_6e79).shuffle(&mut order);
    let examples: Vec<Shot> = order
        .iter()
        .map(|&i| (train[i].question().to_string(), train[i].reference.clone()))
        .collect();
    let context = model.config().max_position_embeddings;
    let reference: Vec<usize> = held_out
        .iter()
        .map(|h| Ok(model.tokenizer.encode(&h.reference, false)?.len()))
        .collect::<Result<_>>()?;
    // Whether question i fits after n shots: its prompt, its longest answer
    // and a margin for the turn's closing tokens.
    let fits = |i: usize, n: usize| -> Result<bool> {
        let prompt = model.chat_prompt_ids(&prompt_with(None, &examples[..n], &held_out[i]))?;
        Ok(prompt.len() + answer_tokens.max(reference[i]) + 8 <= context)
    };
    // The most shots (at most `cap`) before which question i fits.
    let most = |i: usize, cap: usize| -> Result<usize> {
        let (mut lo, mut hi) = (0, cap);
        if !fits(i, 0)? {
            return Ok(0);
        }
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            match fits(i, mid)? {
                true => lo = mid,
                false => hi = mid - 1,
            }
        }
        Ok(lo)
    };
    let cap = max_shots.unwrap_or(train.len()).min(train.len());
    let mut by_length: Vec<usize> = (0..held_out.len()).collect();
    by_length.sort_by_key(|&i| held_out[i].question().len());
    let Some(&median) = by_length.get(by_length.len() / 2) else {
        return Ok(None);
    };
    let shots = most(median, cap)?;
    if shots == 0 {
        return Ok(None);
    }
    let counts = (0..held_out.len())
        .map(|i| match fits(i, shots)? {
            true => Ok(shots),
            false => most(i, shots),
        })
        .collect::<Result<Vec<usize>>>()?;
    let fewer: Vec<usize> = counts.iter().copied().filter(|&c| c < shots).collect();
    let note = (!fewer.is_empty()).then(|| {
        format!(
            "{} of {} questions are too long for {shots} shots and got {} to {} to fit the \
             {context}-token context",
            fewer.len(),
            held_out.len(),
            fewer.iter().min().unwrap_or(&0),
            fewer.iter().max().unwrap_or(&0)
        )
    });
    let limit = match max_shots {
        Some(m) if m == shots => format!("at most {m}"),
        _ => "as many as fit".to_string(),
    };
    let mut variant = Variant::new(
        format!("base, many-shot (k={shots}, {limit}, one shuffled order)"),
        None,
        None,
        Shots::Leading { examples, counts },
    );
    variant.note = note;
    Ok(Some(ManyShot { variant, shots }))
}

/// The variant `best` with its answers constrained to `schema`.
pub(super) fn constrained(best: &Variant, schema: &JsonSchema) -> Variant {
    let mut v = best.clone();
    v.name = format!("{} + JSON constraint", best.name);
    v.json_schema = Some(Arc::new(schema.clone()));
    let keys: Vec<&str> = schema.fields.iter().map(|f| f.key.as_str()).collect();
    let note = format!(
        "answers constrained to a JSON object with the keys seen in training ({}); a key's \
         values limited to those seen where there are at most {}",
        keys.join(", "),
        crate::generate::json::MAX_CHOICES
    );
    v.note = Some(match &best.note {
        Some(n) => format!("{n}; {note}"),
        None => note,
    });
    v
}

/// An instruction describing the task, written from the training answers: for
/// JSON objects, their keys and (when few) their allowed values; and a real
/// answer as an example of the format.
pub fn default_instruction(answers: &[&str]) -> String {
    let objects: Vec<serde_json::Map<String, serde_json::Value>> = answers
        .iter()
        .filter_map(|a| serde_json::from_str(a.trim()).ok())
        .filter_map(|v: serde_json::Value| v.as_object().cloned())
        .collect();
    // A real answer shows the format.
    let shown = answers
        .iter()
        .map(|a| a.trim())
        .find(|a| !a.is_empty() && a.len() <= 300)
        .map_or(String::new(), |a| format!(" For example:\n{a}"));
    if objects.is_empty() || objects.len() < answers.len() {
        return format!(
            "Reply with only the answer, in exactly the expected format, and nothing else.{shown}"
        );
    }
    let mut values: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for o in &objects {
        for (k, v) in o {
            values
                .entry(k)
                .or_default()
                .insert(v.as_str().map_or_else(|| v.to_string(), str::to_string));
        }
    }
    let keys: Vec<&str> = values.keys().copied().collect();
    let mut text = format!(
        "Reply with only a JSON object with the keys {}.",
        keys.join(", ")
    );
    for (k, vs) in &values {
        if vs.len() <= 12 {
            text.push_str(&format!(
                " \"{k}\" is one of: {}.",
                vs.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    text.push_str(" Write nothing else.");
    text.push_str(&shown);
    text
}
/// The prompting variants: zero-shot, the instruction, retrieved few-shot,
/// random few-shot over the draws, and many-shot; and the many-shot count.
pub(super) fn prompting_variants(
    model: &Model,
    held_out: &[HeldOut],
    retriever: &Retriever,
    config: &CompareConfig,
    instruction: &str,
    notes: &mut Vec<String>,
) -> Result<(Vec<Variant>, Option<usize>)> {
    let train = retriever.pool();
    let example = |i: usize| (train[i].question().to_string(), train[i].reference.clone());
    let none = || Shots::Fixed(Vec::new());
    let mut variants = vec![
        Variant::new("base, zero-shot".into(), None, None, none()),
        Variant::new(
            "base + instruction".into(),
            None,
            Some(instruction.to_string()),
            none(),
        ),
    ];
    let k = config.shots;
    if k > 0 {
        variants.push(retrieved_few_shot(
            format!("base, retrieved few-shot (k={k}, BM25)"),
            retriever,
            held_out,
            k,
        ));
        for draw in 0..config.random_draws {
            let mut order: Vec<usize> = (0..train.len()).collect();
            Rng::new(config.seed + draw as u64).shuffle(&mut order);
            variants.push(Variant::new(
                format!("base, random few-shot (k={k}, draw {})", draw + 1),
                None,
                None,
                Shots::Fixed(order[..k].iter().map(|&i| example(i)).collect()),
            ));
        }
    }
    let mut many_shots = None;
    if config.max_shots != Some(0) && !train.is_empty() {
        let answer = config.generation.max_new_tokens;
        match many_shot(
            model,
            train,
            held_out,
            config.max_shots,
            answer,
            config.seed,
        )? {
            Some(m) => {
                many_shots = Some(m.shots);
                variants.push(m.variant);
            }
            None => notes.push(
                "many-shot skipped: not one training example fits the context beside the \
                 median question and its answer"
                    .to_string(),
            ),
        }
    }
    Ok((variants, many_shots))
}

/// Each adapter, alone and with the instruction.
pub(super) fn fine_tuned_variants(adapters: &[PathBuf], instruction: &str) -> Vec<Variant> {
    let mut variants = Vec::new();
    for (i, adapter) in adapters.iter().enumerate() {
        let tag = match adapters.len() {
            1 => String::new(),
            _ => format!(" #{}", i + 1),
        };
        let none = || Shots::Fixed(Vec::new());
        let a = Some(adapter.clone());
        variants.push(Variant::new(
            format!("fine-tuned{tag}"),
            a.clone(),
            None,
            none(),
        ));
        variants.push(Variant::new(
            format!("fine-tuned{tag} + instruction"),
            a,
            Some(instruction.to_string()),
            none(),
        ));
    }
    variants
}
