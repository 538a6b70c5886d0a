//! Prompting versus fine-tuning, measured on the user's own held-out examples.
//!
//! Each variant ([`super::variants`]) answers the same questions: the base
//! model zero-shot; with an instruction written from the training answers;
//! with the k training examples most similar to each question (BM25); with k
//! random ones, over several draws; with as many as fit the context
//! (many-shot); the best of these again with its answers held to the
//! training answers' JSON shape; then each fine-tuned adapter, alone and with
//! the instruction. Each is scored (exact match with its interval, JSON fields,
//! token F1, the teacher-forced NLL of the reference) and costed (prompt
//! tokens, latency); the one-off training cost is set against the per-query
//! cost of prompting, and [`super::verdict`] says which wins.

pub use super::comparison::{
    BreakEven, Comparison, DrawSummary, Output, QueryCost, TrainingCost, VariantReport,
};
pub use super::variants::default_instruction;

use super::baseline::majority_answer;
use super::overlap::{near_duplicates, seen_in};
use super::retrieve::Retriever;
use super::scaling::ScalingConfig;
use super::score::{progress_bar, score};
use super::significance::significance;
use super::variants::{constrained, fine_tuned_variants, prompting_variants, Variant};
use super::verdict::{break_even, verdict};
use super::HeldOut;
use crate::chat::Message;
use crate::generate::json::JsonSchema;
use crate::generate::{GenerationConfig, DEFAULT_BATCH};
use crate::pretrained::Model;
use crate::quantize::{BaseDtype, Quantize};
use crate::train::metrics::Event;
use crate::train::{run_folder_of, RunConfig};
use anyhow::{bail, Context, Result};
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
    /// The most worked examples in the many-shot prompt (`None`: as many
    /// as fit the context; 0 skips it).
    pub max_shots: Option<usize>,
    /// Run the best prompting variant again with its answers constrained to
    /// the training answers' JSON shape (skipped, with a note, when the
    /// answers are not JSON objects).
    pub constrain_json: bool,
    /// The data-scaling curve ([`super::scaling`]), run by [`compare_files`].
    pub scaling: Option<ScalingConfig>,
    /// How [`compare_files`] holds the base's linear weights (QLoRA); `None`:
    /// as the first adapter's run folder trained them (its
    /// `train_config.toml`), else dense.
    pub quantize: Option<Quantize>,
    /// The base's precision in [`compare_files`]; `None`: as the first
    /// adapter's run trained it, else `auto`.
    pub dtype: Option<BaseDtype>,
    /// The word-level ROUGE-L at which a held-out question counts as a
    /// near-duplicate of a training question ([`super::overlap`]); 1 counts
    /// only the same words in the same order.
    pub near_duplicate: f64,
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
            max_shots: None,
            constrain_json: true,
            scaling: None,
            quantize: None,
            dtype: None,
            near_duplicate: super::overlap::DEFAULT_THRESHOLD,
        }
    }
}

/// The training cost recorded in an adapter's run folder, if it comes from
/// one ([`run_folder_of`]: a `best/` adapter is charged its whole run).
fn training_cost(adapter: &Path) -> Result<Option<TrainingCost>> {
    let Some(run) = run_folder_of(adapter) else {
        return Ok(None);
    };
    let path = run.join("metrics.jsonl");
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
    // A run folder without its settings (copied by hand) counts as trained
    // without recompute, the default.
    let recompute = RunConfig::read(&run).is_ok_and(|run| run.train.recompute);
    Ok(Some(TrainingCost {
        adapter: adapter.to_path_buf(),
        seconds,
        tokens,
        recompute,
    }))
}

/// Runs every variant on `held_out` and scores it. `train` supplies the
/// worked examples, the default instruction and the JSON shape. Adapters are
/// loaded onto `model` in turn.
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
    if !(config.near_duplicate > 0.0 && config.near_duplicate <= 1.0) {
        bail!(
            "--near-duplicate {}: the ROUGE-L threshold must be above 0 and at most 1",
            config.near_duplicate
        );
    }
    // The training pool's file, for messages: " in train.jsonl".
    let pool_file = train
        .first()
        .map(|t| format!(" in {}", file_of(&t.origin)))
        .unwrap_or_default();
    if config.shots > train.len() {
        bail!(
            "--shots {} is larger than the training set ({} examples{pool_file}); lower --shots",
            config.shots,
            train.len(),
        );
    }
    for adapter in adapters {
        let cfg = crate::adapter::read_config(adapter)?;
        crate::adapter::check_base_model(&cfg, adapter, model.repo_id())?;
    }
    let mut notes = Vec::new();
    if held_out.len() < MIN_FOR_INTERVALS {
        notes.push(format!(
            "only {} held-out examples: the intervals are wide and the verdict can detect \
             only large differences; {MIN_FOR_INTERVALS} or more are needed for a useful one",
            held_out.len()
        ));
    }
    let cap = config.generation.max_new_tokens;
    let mut too_long = Vec::new();
    for h in held_out {
        if model.tokenizer.encode(&h.reference, false)?.len() > cap {
            too_long.push(h.origin.as_str());
        }
    }
    if let Some(first) = too_long.first() {
        notes.push(format!(
            "{} of the {} reference answers are longer than --max-tokens ({cap} tokens), so no \
             variant can match them exactly: raise --max-tokens (first: {first})",
            too_long.len(),
            held_out.len()
        ));
    }
    let seen_in_training = seen_in(held_out, train);
    if !seen_in_training.is_empty() {
        notes.push(format!(
            "{} of the {} held-out questions also stand in the training pool{pool_file}, word \
             for word: a fine-tune on it may recall their answers and retrieved few-shot can \
             copy them, so on those the scores measure recall, not generalisation (first: {})",
            seen_in_training.len(),
            held_out.len(),
            held_out[seen_in_training[0]].origin
        ));
    }
    let retriever = Retriever::new(train);
    let near = near_duplicates(held_out, &retriever, config.near_duplicate);
    if let Some(closest) = near
        .iter()
        .max_by(|a, b| a.similarity.total_cmp(&b.similarity))
    {
        notes.push(format!(
            "{} of the {} held-out questions have a near-duplicate in the training pool{pool_file} \
             (word-level ROUGE-L at least {}): a fine-tune may have learned those questions \
             rather than the task, so the report scores the other {} apart (closest: {} and {}, \
             {:.2})",
            near.len(),
            held_out.len(),
            config.near_duplicate,
            held_out.len() - near.len(),
            closest.held_out,
            closest.training,
            closest.similarity
        ));
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
    let (prompting, many_shots) = prompting_variants(
        model,
        held_out,
        &retriever,
        config,
        &instruction,
        &mut notes,
    )?;
    let fine_tuned = fine_tuned_variants(adapters, &instruction);
    for v in prompting.iter().chain(&fine_tuned) {
        check_context(model, v, held_out, config)?;
    }

    let bar = progress_bar(
        config.progress,
        (prompting.len() + 1 + fine_tuned.len()) * held_out.len(),
    );
    let mut reports = Vec::new();
    crate::lora::detach(&mut model.lm);
    for v in &prompting {
        reports.push(score(model, v, held_out, config, &bar)?);
    }
    // The best prompting arm again, its answers held to the JSON shape of
    // the training answers: a grammar's valid JSON is not fine-tuning's credit.
    let schema = JsonSchema::from_answers(&answers);
    match (&schema, super::significance::best_index(&reports, false)) {
        (Some(schema), Some(best)) if config.constrain_json => {
            let v = constrained(&prompting[best], schema);
            reports.push(score(model, &v, held_out, config, &bar)?);
        }
        (None, _) if config.constrain_json => notes
            .push("constrained decoding skipped: the answers are not all JSON objects".to_string()),
        _ => {}
    }
    let mut loaded: Option<PathBuf> = None;
    for v in &fine_tuned {
        if v.adapter != loaded {
            crate::lora::detach(&mut model.lm);
            if let Some(dir) = &v.adapter {
                model.load_adapter(dir)?;
            }
            loaded = v.adapter.clone();
        }
        reports.push(score(model, v, held_out, config, &bar)?);
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
            .map(|h| file_of(&h.origin).to_string())
            .unwrap_or_default(),
        examples: held_out.to_vec(),
        instruction,
        shots: config.shots,
        many_shots,
        json_schema: schema.filter(|_| config.constrain_json),
        variants: reports,
        training,
        break_even,
        random_few_shot,
        significance: None,
        verdict: String::new(),
        notes,
        seen_in_training,
        near_duplicates: near,
        near_duplicate_threshold: config.near_duplicate,
        majority_answer: majority_answer(train, held_out),
        scaling: None,
    };
    comparison.significance = significance(&comparison.variants, config.seed);
    comparison.verdict = verdict(&comparison);
    Ok(comparison)
}

/// Below this many held-out examples the report says the intervals are too wide to tell much.
const MIN_FOR_INTERVALS: usize = 20;

/// The file part of a `file:line` origin.
fn file_of(origin: &str) -> &str {
    origin.rsplit_once(':').map_or(origin, |p| p.0)
}

/// Refuses a variant whose prompt, with room for the answer, exceeds the context.
fn check_context(
    model: &Model,
    v: &Variant,
    held_out: &[HeldOut],
    config: &CompareConfig,
) -> Result<()> {
    let context = model.config().max_position_embeddings;
    for (i, h) in held_out.iter().enumerate() {
        let prompt = v.prompt(i, h);
        let p = model.chat_prompt_ids(&prompt)?.len();
        // The reference answer is scored after the prompt too (its NLL).
        let mut scored = prompt;
        scored.push(Message::assistant(&h.reference));
        let text = model.tokenizer.apply_chat_template(&scored, false)?;
        let reference = model
            .tokenizer
            .encode(&text, false)?
            .len()
            .saturating_sub(p);
        let answer = config.generation.max_new_tokens.max(reference);
        if p + answer > context {
            bail!(
                "{}: the {} prompt has {p} tokens, which with {answer} answer tokens (at most {} \
                 generated, {reference} in the reference answer) exceeds the {context}-token \
                 context window; lower --shots or --max-tokens",
                h.origin,
                v.name,
                config.generation.max_new_tokens
            );
        }
    }
    Ok(())
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
    if config.scaling.is_some() && train_path.is_none() {
        bail!("--scaling needs a training set: pass a data folder with train.jsonl");
    }
    let trained_as = adapters
        .first()
        .and_then(|a| run_folder_of(a))
        .and_then(|run| RunConfig::read(&run).ok())
        .map(|run| (run.train.quantize, run.train.dtype));
    let quantize = config
        .quantize
        .or(trained_as.map(|t| t.0))
        .unwrap_or_default();
    let dtype = config.dtype.or(trained_as.map(|t| t.1)).unwrap_or_default();
    let mut model = Model::load(
        model,
        &crate::pretrained::LoadOptions {
            device,
            dtype: None,
            quantize,
            base_dtype: dtype,
        },
    )?;
    let mut comparison = compare(&mut model, adapters, &held_out, &train, config)?;
    comparison.notes.push(format!(
        "the base ran in {} (--dtype {dtype})",
        dtype.resolve(model.lm.device())
    ));
    if quantize != Quantize::None {
        comparison.notes.push(format!(
            "the base's linear weights were held quantized (--quantize {quantize})"
        ));
    }
    if held_out_path
        .file_name()
        .is_some_and(|f| f == "valid.jsonl")
    {
        comparison.notes.push(format!(
            "the held-out examples are {} ({} has no test.jsonl): a fine-tune trained on this \
             folder was evaluated on them, so a run stopped early by --patience, or its best/ \
             adapter, was chosen on them, which flatters it; keep examples no run has seen in \
             test.jsonl",
            held_out_path.display(),
            data.display()
        ));
    }
    comparison.notes.extend(model.notes.iter().cloned());
    if let Some(scaling) = &config.scaling {
        let dataset = crate::data::Dataset::load(data)?;
        let held_out = &comparison.examples.clone();
        let curve = super::scaling::scaling(
            &mut model,
            &dataset,
            held_out,
            scaling,
            config,
            &mut comparison.notes,
        )?;
        comparison.scaling = Some(curve);
        comparison.verdict = verdict(&comparison);
    }
    Ok(comparison)
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
