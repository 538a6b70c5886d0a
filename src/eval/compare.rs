//! Prompting versus fine-tuning, measured on the user's own held-out examples.
//!
//! Each variant answers the same questions: the base model zero-shot, with an
//! instruction, and few-shot; then each fine-tuned adapter, alone and with the
//! instruction. Each is scored (exact match, JSON fields, token F1, the
//! teacher-forced NLL of the reference) and costed (prompt tokens, latency);
//! the one-off training cost is set against the per-query cost of prompting.

use super::metrics::{exact_match, json_score, token_f1};
use super::HeldOut;
use crate::chat::Message;
use crate::data::{tokenize::tokenize_record, LossOn, Record, TurnEnd};
use crate::generate::{generate, GenerationConfig};
use crate::pretrained::Model;
use crate::rng::Rng;
use crate::train::{metrics::Event, summed_loss};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to run a comparison.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Few-shot examples taken from the training set (0 skips the few-shot variant).
    pub shots: usize,
    /// The instruction prompt; by default one is written from the training answers.
    pub system_prompt: Option<String>,
    /// Decoding (greedy by default; sampling with a seed is an option).
    pub generation: GenerationConfig,
    /// Evaluate only the first N held-out examples.
    pub limit: Option<usize>,
    /// Seed for choosing the few-shot examples.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            shots: 5,
            system_prompt: None,
            generation: GenerationConfig::greedy(64),
            limit: None,
            seed: 42,
            progress: true,
        }
    }
}

/// One variant's answer to one question.
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    /// The generated answer.
    pub answer: String,
    /// Whether it matches the reference exactly (after whitespace normalisation).
    pub correct: bool,
}

/// A variant's scores and costs.
#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    /// Its name, e.g. `base, few-shot (k=5)`.
    pub name: String,
    /// The adapter, for fine-tuned variants.
    pub adapter: Option<PathBuf>,
    /// Whether it is a fine-tuned variant.
    pub fine_tuned: bool,
    /// Share of exact matches.
    pub exact_match: f64,
    /// Share of outputs that are valid JSON (JSON targets only).
    pub json_valid: Option<f64>,
    /// Share of reference fields right (JSON targets only).
    pub field_accuracy: Option<f64>,
    /// Mean token F1.
    pub token_f1: f64,
    /// Mean negative log-likelihood per reference token, teacher-forced.
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Mean prompt tokens per query: what the prompt costs on every call.
    pub prompt_tokens: f64,
    /// Mean seconds per query (prompt and generation).
    pub latency_s: f64,
    /// Generated tokens per second.
    pub tokens_per_second: f64,
    /// Every answer, in held-out order.
    pub outputs: Vec<Output>,
}

/// The one-off cost of a fine-tune, read from its run folder's metrics.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingCost {
    /// The adapter.
    pub adapter: PathBuf,
    /// Wall-clock seconds of training.
    pub seconds: f64,
    /// Tokens processed in training.
    pub tokens: usize,
}

/// When a fine-tune has paid for itself against a prompting variant.
#[derive(Debug, Clone, Serialize)]
pub struct BreakEven {
    /// The prompting variant.
    pub prompting: String,
    /// The fine-tuned variant.
    pub fine_tuned: String,
    /// Extra prompt tokens the prompting variant spends per query.
    pub extra_prompt_tokens: f64,
    /// Extra seconds the prompting variant spends per query.
    pub extra_seconds: f64,
    /// Queries after which the training time is recovered (`None`: never, since
    /// prompting is not slower per query).
    pub queries_by_time: Option<f64>,
    /// The same in compute: training counted as 4·N·T FLOPs, each extra prompt
    /// token as 2·N.
    pub queries_by_flops: Option<f64>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The base model.
    pub model: String,
    /// The held-out file(s).
    pub data: String,
    /// The questions and reference answers, in order.
    pub examples: Vec<HeldOut>,
    /// The instruction prompt used.
    pub instruction: String,
    /// Few-shot examples used.
    pub shots: usize,
    /// Every variant.
    pub variants: Vec<VariantReport>,
    /// Training costs, when the adapters' run folders record them.
    pub training: Vec<TrainingCost>,
    /// Break-even points.
    pub break_even: Vec<BreakEven>,
    /// The verdict, in one paragraph.
    pub verdict: String,
}

/// A way of prompting, with or without an adapter.
struct Variant {
    name: String,
    adapter: Option<PathBuf>,
    system: Option<String>,
    shots: Vec<(String, String)>,
}

impl Variant {
    fn prompt(&self, held: &HeldOut) -> Vec<Message> {
        let mut turns = held.prompt.clone();
        let mut messages = Vec::new();
        if let Some(system) = &self.system {
            if turns.first().is_some_and(|m| m.role == "system") {
                let existing = turns.remove(0);
                messages.push(Message::system(format!("{system}\n\n{}", existing.content)));
            } else {
                messages.push(Message::system(system.clone()));
            }
        } else if turns.first().is_some_and(|m| m.role == "system") {
            messages.push(turns.remove(0));
        }
        for (user, assistant) in &self.shots {
            messages.push(Message::user(user.clone()));
            messages.push(Message::assistant(assistant.clone()));
        }
        messages.extend(turns);
        messages
    }
}

/// An instruction describing the task, written from the training answers: for
/// JSON objects, their keys and (when few) their allowed values.
pub fn default_instruction(answers: &[&str]) -> String {
    let objects: Vec<serde_json::Map<String, serde_json::Value>> = answers
        .iter()
        .filter_map(|a| serde_json::from_str(a.trim()).ok())
        .filter_map(|v: serde_json::Value| v.as_object().cloned())
        .collect();
    if objects.is_empty() || objects.len() < answers.len() {
        return "Reply with only the answer, in exactly the expected format, and nothing else."
            .into();
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
    text
}

/// The teacher-forced NLL of `reference` after `prompt`: (sum, tokens).
fn reference_nll(model: &Model, prompt: &[Message], reference: &str) -> Result<(f64, usize)> {
    let mut messages = prompt.to_vec();
    messages.push(Message::assistant(reference));
    let example = tokenize_record(
        &Record::Chat(messages),
        &model.tokenizer,
        LossOn::LastAssistant,
        TurnEnd::EndToken,
    )?;
    summed_loss(model, std::slice::from_ref(&example), &[vec![0]])
}

/// The training cost recorded in an adapter's run folder, if it has one.
fn training_cost(adapter: &Path) -> Result<Option<TrainingCost>> {
    let path = adapter.join("metrics.jsonl");
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (mut seconds, mut tokens) = (0.0, 0);
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let event: Event = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a metrics line", path.display(), i + 1))?;
        if let Event::Step {
            elapsed, tokens: t, ..
        } = event
        {
            seconds = elapsed;
            tokens += t;
        }
    }
    Ok(Some(TrainingCost {
        adapter: adapter.to_path_buf(),
        seconds,
        tokens,
    }))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Runs every variant on `held_out` and scores it. `train` supplies the few-shot
/// examples and the default instruction. Adapters are loaded onto `model` in turn.
pub fn compare(
    model: &mut Model,
    adapters: &[PathBuf],
    held_out: &[HeldOut],
    train: &[HeldOut],
    config: &CompareConfig,
) -> Result<Comparison> {
    let held_out = &held_out[..config.limit.unwrap_or(held_out.len()).min(held_out.len())];
    if held_out.is_empty() {
        bail!("there are no held-out examples to evaluate");
    }
    if config.shots > train.len() {
        bail!(
            "--shots {} is larger than the training set ({} examples{}); lower --shots",
            config.shots,
            train.len(),
            train
                .first()
                .map(|t| format!(
                    " in {}",
                    t.origin.rsplit_once(':').map_or(t.origin.as_str(), |p| p.0)
                ))
                .unwrap_or_default()
        );
    }
    for adapter in adapters {
        let cfg = crate::adapter::read_config(adapter)?;
        crate::adapter::check_base_model(&cfg, adapter, model.repo_id())?;
    }
    let answers: Vec<&str> = if train.is_empty() {
        held_out.iter()
    } else {
        train.iter()
    }
    .map(|h| h.reference.as_str())
    .collect();
    let instruction = config
        .system_prompt
        .clone()
        .unwrap_or_else(|| default_instruction(&answers));
    let mut order: Vec<usize> = (0..train.len()).collect();
    Rng::new(config.seed).shuffle(&mut order);
    let shots: Vec<(String, String)> = order[..config.shots]
        .iter()
        .map(|&i| (train[i].question().to_string(), train[i].reference.clone()))
        .collect();

    let plain = |name: String,
                 adapter: Option<PathBuf>,
                 system: Option<String>,
                 shots: Vec<(String, String)>| Variant {
        name,
        adapter,
        system,
        shots,
    };
    let mut variants = vec![
        plain("base, zero-shot".into(), None, None, vec![]),
        plain(
            "base + instruction".into(),
            None,
            Some(instruction.clone()),
            vec![],
        ),
    ];
    if config.shots > 0 {
        variants.push(plain(
            format!("base, few-shot (k={})", config.shots),
            None,
            None,
            shots,
        ));
    }
    for (i, adapter) in adapters.iter().enumerate() {
        let tag = if adapters.len() > 1 {
            format!(" #{}", i + 1)
        } else {
            String::new()
        };
        variants.push(plain(
            format!("fine-tuned{tag}"),
            Some(adapter.clone()),
            None,
            vec![],
        ));
        variants.push(plain(
            format!("fine-tuned{tag} + instruction"),
            Some(adapter.clone()),
            Some(instruction.clone()),
            vec![],
        ));
    }

    // Every prompt must fit the context window with room for the answer.
    let context = model.config().max_position_embeddings;
    let mut prompts: Vec<Vec<Vec<u32>>> = Vec::new();
    for v in &variants {
        let mut ids = Vec::new();
        for h in held_out {
            let prompt = v.prompt(h);
            let p = model.chat_prompt_ids(&prompt)?;
            // The reference answer is scored after the prompt too (its NLL).
            let mut scored = prompt;
            scored.push(Message::assistant(&h.reference));
            let text = model.tokenizer.apply_chat_template(&scored, false)?;
            let reference = model
                .tokenizer
                .encode(&text, false)?
                .len()
                .saturating_sub(p.len());
            let answer = config.generation.max_new_tokens.max(reference);
            if p.len() + answer > context {
                bail!(
                    "{}: the {} prompt has {} tokens, which with {answer} answer tokens (at most {} \
                     generated, {reference} in the reference answer) exceeds the {context}-token \
                     context window; lower --shots or --max-tokens",
                    h.origin, v.name, p.len(), config.generation.max_new_tokens
                );
            }
            ids.push(p);
        }
        prompts.push(ids);
    }

    let bar = if config.progress {
        indicatif::ProgressBar::new((variants.len() * held_out.len()) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("evaluate [{bar:30}] {pos}/{len} {msg}, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut reports = Vec::new();
    let mut loaded: Option<PathBuf> = None;
    for (v, ids) in variants.iter().zip(&prompts) {
        bar.set_message(v.name.clone());
        if v.adapter != loaded {
            crate::lora::detach(&mut model.lm);
            if let Some(dir) = &v.adapter {
                model.load_adapter(dir)?;
            }
            loaded = v.adapter.clone();
        }
        let (mut outputs, mut f1, mut json, mut nll, mut nll_tokens) =
            (Vec::new(), Vec::new(), Vec::new(), 0.0, 0usize);
        let (mut seconds, mut generated) = (0.0, 0usize);
        for (h, prompt_ids) in held_out.iter().zip(ids) {
            let start = Instant::now();
            let g = generate(
                &model.lm,
                &model.tokenizer,
                prompt_ids,
                &config.generation,
                &mut |_| {},
            )?;
            seconds += start.elapsed().as_secs_f64();
            generated += g.ids.len();
            let (sum, n) = reference_nll(model, &v.prompt(h), &h.reference)?;
            nll += sum;
            nll_tokens += n;
            f1.push(token_f1(&g.text, &h.reference));
            json.push(json_score(&g.text, &h.reference));
            outputs.push(Output {
                correct: exact_match(&g.text, &h.reference),
                answer: g.text,
            });
            bar.inc(1);
        }
        let scored: Vec<_> = json.iter().flatten().collect();
        let nll = nll / nll_tokens.max(1) as f64;
        reports.push(VariantReport {
            name: v.name.clone(),
            adapter: v.adapter.clone(),
            fine_tuned: v.adapter.is_some(),
            exact_match: mean(outputs.iter().map(|o| o.correct as u8 as f64)),
            json_valid: (!scored.is_empty())
                .then(|| mean(scored.iter().map(|s| s.valid as u8 as f64))),
            field_accuracy: (!scored.is_empty())
                .then(|| mean(scored.iter().map(|s| s.fields_right))),
            token_f1: mean(f1.into_iter()),
            nll,
            perplexity: nll.exp(),
            prompt_tokens: mean(ids.iter().map(|p| p.len() as f64)),
            latency_s: seconds / held_out.len() as f64,
            tokens_per_second: generated as f64 / seconds.max(1e-9),
            outputs,
        });
    }
    bar.finish_and_clear();
    crate::lora::detach(&mut model.lm);

    let training = adapters
        .iter()
        .map(|a| training_cost(a))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    let break_even = break_even(&reports, &training);
    let mut comparison = Comparison {
        model: model.repo_id().unwrap_or(&model.source.name).to_string(),
        data: held_out
            .first()
            .map(|h| {
                h.origin
                    .rsplit_once(':')
                    .map_or(h.origin.clone(), |p| p.0.to_string())
            })
            .unwrap_or_default(),
        examples: held_out.to_vec(),
        instruction,
        shots: config.shots,
        variants: reports,
        training,
        break_even,
        verdict: String::new(),
    };
    comparison.verdict = verdict(&comparison);
    Ok(comparison)
}

fn break_even(reports: &[VariantReport], training: &[TrainingCost]) -> Vec<BreakEven> {
    let mut out = Vec::new();
    for ft in reports
        .iter()
        .filter(|r| r.fine_tuned && !r.name.ends_with("instruction"))
    {
        let Some(cost) = training
            .iter()
            .find(|c| Some(&c.adapter) == ft.adapter.as_ref())
        else {
            continue;
        };
        for p in reports.iter().filter(|r| !r.fine_tuned) {
            let extra_prompt_tokens = p.prompt_tokens - ft.prompt_tokens;
            let extra_seconds = p.latency_s - ft.latency_s;
            out.push(BreakEven {
                prompting: p.name.clone(),
                fine_tuned: ft.name.clone(),
                extra_prompt_tokens,
                extra_seconds,
                queries_by_time: (extra_seconds > 0.0).then(|| cost.seconds / extra_seconds),
                queries_by_flops: (extra_prompt_tokens > 0.0)
                    .then(|| 4.0 * cost.tokens as f64 / (2.0 * extra_prompt_tokens)),
            });
        }
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Orders variants by exact match, then field accuracy, then token F1; on a tie
/// the cheaper one (fewer prompt tokens) ranks higher.
fn better(a: &VariantReport, b: &VariantReport) -> std::cmp::Ordering {
    let key = |r: &VariantReport| {
        (
            r.exact_match,
            r.field_accuracy.unwrap_or(0.0),
            r.token_f1,
            -r.prompt_tokens,
        )
    };
    key(a)
        .partial_cmp(&key(b))
        .unwrap_or(std::cmp::Ordering::Equal)
}

fn verdict(c: &Comparison) -> String {
    let best = |fine_tuned: bool| {
        c.variants
            .iter()
            .filter(|r| r.fine_tuned == fine_tuned)
            .max_by(|a, b| better(a, b))
    };
    let winner = c
        .variants
        .iter()
        .max_by(|a, b| better(a, b))
        .expect("at least one variant");
    let mut text = format!(
        "On {} held-out examples, \"{}\" wins with {} exact match.",
        c.examples.len(),
        winner.name,
        pct(winner.exact_match)
    );
    let (Some(ft), Some(pr)) = (best(true), best(false)) else {
        text.push_str(" No adapter was given, so only prompting variants were compared.");
        return text;
    };
    let gap = 100.0 * (ft.exact_match - pr.exact_match);
    if gap > 0.0 {
        text.push_str(&format!(" Fine-tuning beats the best prompting variant (\"{}\", {}) by {gap:.1} points of exact match.", pr.name, pct(pr.exact_match)));
    } else if gap < 0.0 {
        text.push_str(&format!(" The best prompting variant (\"{}\", {}) beats fine-tuning (\"{}\", {}) by {:.1} points: prompting is enough for this data.", pr.name, pct(pr.exact_match), ft.name, pct(ft.exact_match), -gap));
    } else {
        text.push_str(&format!(
            " Fine-tuning and the best prompting variant (\"{}\") tie on exact match.",
            pr.name
        ));
    }
    let plain = c
        .variants
        .iter()
        .find(|r| r.fine_tuned && !r.name.ends_with("instruction"));
    let instructed = c
        .variants
        .iter()
        .find(|r| r.fine_tuned && r.name.ends_with("instruction"));
    if let (Some(p), Some(i)) = (plain, instructed) {
        let d = 100.0 * (i.exact_match - p.exact_match);
        text.push_str(&match d {
            d if d > 0.0 => format!(" Adding the instruction prompt to the fine-tuned model helps (+{d:.1} points)."),
            d if d < 0.0 => format!(" Adding the instruction prompt to the fine-tuned model hurts ({d:.1} points): the fine-tune already knows the task."),
            _ => " Adding the instruction prompt to the fine-tuned model changes nothing.".to_string(),
        });
    }
    if let Some(b) = c
        .break_even
        .iter()
        .filter(|b| b.prompting == pr.name)
        .find_map(|b| b.queries_by_flops.map(|q| (b, q)))
    {
        text.push_str(&format!(
            " The fine-tune cost {:.0} s of training; against \"{}\", which spends {:.0} extra prompt tokens per query, it pays for itself in compute after about {:.0} queries.",
            c.training.first().map_or(0.0, |t| t.seconds), b.0.prompting, b.0.extra_prompt_tokens, b.1
        ));
    }
    text
}

/// The comparison as the `compare` example runs it: loads `model`, reads the
/// held-out examples (a file, or a folder's test.jsonl or valid.jsonl) and the
/// folder's train.jsonl for few-shot examples, then compares.
pub fn compare_files(
    model: &str,
    device: crate::device::DeviceSpec,
    data: &Path,
    adapters: &[PathBuf],
    config: &CompareConfig,
) -> Result<Comparison> {
    let (held_out_path, train_path) = super::data_files(data)?;
    let held_out = super::read_held_out(&held_out_path)?;
    let train = match &train_path {
        Some(p) => super::read_held_out(p)?,
        None => Vec::new(),
    };
    if config.shots > 0 && train.is_empty() {
        bail!("the few-shot variant needs a training set: pass a data folder with train.jsonl, or --shots 0");
    }
    let mut model = Model::load(
        model,
        &crate::pretrained::LoadOptions {
            device,
            dtype: None,
        },
    )?;
    compare(&mut model, adapters, &held_out, &train, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_instruction_lists_keys_and_values() {
        let text = default_instruction(&[r#"{"a": "x", "b": "y"}"#, r#"{"a": "z", "b": "y"}"#]);
        assert!(
            text.contains("keys a, b") && text.contains("\"a\" is one of: x, z"),
            "{text}"
        );
        assert!(default_instruction(&["plain"]).contains("exactly the expected format"));
    }
}
