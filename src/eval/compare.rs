//! Prompting versus fine-tuning, measured on the user's own held-out examples.
//!
//! Each variant answers the same questions: the base model zero-shot; with an
//! instruction written from the training answers; with the k training
//! examples most similar to each question (BM25); with k random ones, over
//! several draws; then each fine-tuned adapter, alone and with the
//! instruction. Each is scored (exact match with its interval, JSON fields,
//! token F1, the teacher-forced NLL of the reference) and costed (prompt
//! tokens, latency); the one-off training cost is set against the per-query
//! cost of prompting, and [`super::verdict`] says which wins.

use super::metrics::{exact_match, json_score, token_f1};
use super::stats::wilson;
use super::verdict::{break_even, significance, verdict, Significance};
use super::HeldOut;
use crate::chat::Message;
use crate::data::{tokenize::tokenize_record, LossOn, Record, TurnEnd};
use crate::generate::{GenerationConfig, DEFAULT_BATCH};
use crate::pretrained::Model;
use crate::rng::Rng;
use crate::train::{metrics::Event, summed_loss};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// How to run a comparison.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Worked examples from the training set per few-shot prompt (0 skips
    /// the few-shot variants): the k most similar by BM25, and k at random.
    pub shots: usize,
    /// How many random draws of few-shot examples to score.
    pub random_draws: usize,
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
    /// How many answers decode together ([`Model::generate_batch`]); 1
    /// decodes one at a time, the slow way, for comparison.
    pub batch: usize,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            shots: 5,
            random_draws: 3,
            system_prompt: None,
            generation: GenerationConfig::greedy(64),
            limit: None,
            seed: 42,
            progress: true,
            batch: DEFAULT_BATCH,
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
    /// Its Wilson 95% interval.
    pub exact_match_interval: (f64, f64),
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
    /// The random few-shot draws' exact match: median, lowest and highest.
    pub random_few_shot: Option<DrawSummary>,
    /// Every variant.
    pub variants: Vec<VariantReport>,
    /// Training costs, when the adapters' run folders record them.
    pub training: Vec<TrainingCost>,
    /// Break-even points.
    pub break_even: Vec<BreakEven>,
    /// The best fine-tuned variant against the best prompting variant on the
    /// same examples (exact match), when there are both.
    pub significance: Option<Significance>,
    /// The verdict, in one paragraph.
    pub verdict: String,
}

/// Exact match over the random few-shot draws.
#[derive(Debug, Clone, Serialize)]
pub struct DrawSummary {
    /// How many draws.
    pub draws: usize,
    /// The median exact match.
    pub median: f64,
    /// The lowest.
    pub min: f64,
    /// The highest.
    pub max: f64,
}

impl DrawSummary {
    fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n % 2 {
            1 => values[n / 2],
            _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Some(Self {
            draws: n,
            median,
            min: values[0],
            max: values[n - 1],
        })
    }
}

/// A way of prompting, with or without an adapter.
struct Variant {
    name: String,
    adapter: Option<PathBuf>,
    system: Option<String>,
    shots: Shots,
}

/// The worked examples a variant puts before the question.
enum Shots {
    /// The same examples before every question.
    Fixed(Vec<(String, String)>),
    /// Examples chosen for each question, by its index in the held-out set.
    PerQuestion(Vec<Vec<(String, String)>>),
}

impl Variant {
    /// The prompt of held-out question `index`, `held`.
    fn prompt(&self, index: usize, held: &HeldOut) -> Vec<Message> {
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
        let shots = match &self.shots {
            Shots::Fixed(shots) => shots.as_slice(),
            Shots::PerQuestion(each) => each[index].as_slice(),
        };
        for (user, assistant) in shots {
            messages.push(Message::user(user.clone()));
            messages.push(Message::assistant(assistant.clone()));
        }
        messages.extend(turns);
        messages
    }
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

/// The summed teacher-forced NLL of each reference answer after its prompt,
/// and the number of answer tokens: `batch` examples at a time with their
/// shared prefix computed once, or one at a time with a batch of 1.
fn reference_nll(
    model: &Model,
    cases: &[(Vec<Message>, &str)],
    batch: usize,
) -> Result<(f64, usize)> {
    let examples = cases
        .iter()
        .map(|(prompt, reference)| {
            let mut messages = prompt.clone();
            messages.push(Message::assistant(*reference));
            tokenize_record(
                &Record::Chat(messages),
                &model.tokenizer,
                LossOn::LastAssistant,
                TurnEnd::EndToken,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let scores = match batch {
        1 => examples
            .iter()
            .map(|e| summed_loss(model, std::slice::from_ref(e), &[vec![0]]))
            .collect::<Result<Vec<_>>>()?,
        _ => crate::generate::batched::summed_nll(
            &model.lm,
            model.tokenizer.pad_id(),
            &examples,
            batch,
        )?,
    };
    Ok(scores
        .into_iter()
        .fold((0.0, 0), |(s, n), (x, m)| (s + x, n + m)))
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
    if config.batch == 0 {
        bail!("--batch 0: the batch size must be at least 1");
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
    let example = |i: usize| (train[i].question().to_string(), train[i].reference.clone());
    let plain =
        |name: String, adapter: Option<PathBuf>, system: Option<String>, shots: Shots| Variant {
            name,
            adapter,
            system,
            shots,
        };
    let none = || Shots::Fixed(Vec::new());
    let mut variants = vec![
        plain("base, zero-shot".into(), None, None, none()),
        plain(
            "base + instruction".into(),
            None,
            Some(instruction.clone()),
            none(),
        ),
    ];
    let k = config.shots;
    if k > 0 {
        let retriever = super::retrieve::Retriever::new(train);
        let retrieved = held_out
            .iter()
            .map(|h| {
                retriever
                    .nearest(h.question(), k)
                    .into_iter()
                    .map(example)
                    .collect()
            })
            .collect();
        variants.push(plain(
            format!("base, retrieved few-shot (k={k}, BM25)"),
            None,
            None,
            Shots::PerQuestion(retrieved),
        ));
        for draw in 0..config.random_draws {
            let mut order: Vec<usize> = (0..train.len()).collect();
            Rng::new(config.seed + draw as u64).shuffle(&mut order);
            variants.push(plain(
                format!("base, random few-shot (k={k}, draw {})", draw + 1),
                None,
                None,
                Shots::Fixed(order[..k].iter().map(|&i| example(i)).collect()),
            ));
        }
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
            none(),
        ));
        variants.push(plain(
            format!("fine-tuned{tag} + instruction"),
            Some(adapter.clone()),
            Some(instruction.clone()),
            none(),
        ));
    }

    // Every prompt must fit the context window with room for the answer.
    let context = model.config().max_position_embeddings;
    let mut prompts: Vec<Vec<Vec<u32>>> = Vec::new();
    for v in &variants {
        let mut ids = Vec::new();
        for (i, h) in held_out.iter().enumerate() {
            let prompt = v.prompt(i, h);
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
        let (mut outputs, mut f1, mut json) = (Vec::new(), Vec::new(), Vec::new());
        let (mut seconds, mut generated) = (0.0, 0usize);
        let generations = model.generate_batch(ids, &config.generation, config.batch)?;
        let cases: Vec<(Vec<Message>, &str)> = held_out
            .iter()
            .enumerate()
            .map(|(i, h)| (v.prompt(i, h), h.reference.as_str()))
            .collect();
        let (nll, nll_tokens) = reference_nll(model, &cases, config.batch)?;
        for (h, g) in held_out.iter().zip(generations) {
            // Each answer's share of its batch's time.
            seconds += (g.prefill + g.decode).as_secs_f64();
            generated += g.ids.len();
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
            exact_match_interval: wilson(
                outputs.iter().filter(|o| o.correct).count(),
                outputs.len(),
            ),
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
    let random_few_shot = DrawSummary::of(
        reports
            .iter()
            .filter(|r| r.name.contains("random few-shot"))
            .map(|r| r.exact_match)
            .collect(),
    );
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
        random_few_shot,
        significance: None,
        verdict: String::new(),
    };
    comparison.significance = significance(&comparison.variants, config.seed);
    comparison.verdict = verdict(&comparison);
    Ok(comparison)
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
        assert!(
            text.ends_with("For example:\n{\"a\": \"x\", \"b\": \"y\"}"),
            "{text}"
        );
        let plain = default_instruction(&["plain", "other"]);
        assert!(plain.contains("exactly the expected format"), "{plain}");
        assert!(plain.ends_with("For example:\nplain"), "{plain}");
    }
}
