//! One variant's score: its answers to the held-out questions, decoded in
//! batches that share a prompt prefix, scored against the references (exact
//! match with its interval, JSON fields, token F1, the reference's
//! teacher-forced NLL) and costed (prompt tokens, prefill and decode time).

use super::compare::CompareConfig;
use super::comparison::{Output, QueryCost, VariantReport};
use super::metrics::{exact_match, json_score, token_f1};
use super::stats::wilson;
use super::variants::Variant;
use super::HeldOut;
use crate::chat::Message;
use crate::data::Example;
use crate::data::{tokenize::tokenize_record, LossOn, Record, TurnEnd};
use crate::generate::{generate_and_score_after, Generation, GenerationConfig, SharedPrefix};
use crate::pretrained::Model;
use crate::train::summed_loss;
use anyhow::Result;
use std::collections::BTreeMap;

/// Each reference answer after its prompt, tokenized for teacher-forced
/// scoring (the answer's tokens trained).
fn reference_examples(model: &Model, cases: &[(Vec<Message>, &str)]) -> Result<Vec<Example>> {
    cases
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
        .collect()
}

/// Decodes `prompts` and scores `references` (the summed teacher-forced NLL
/// and its token count): `batch` at a time after one shared prefix, each
/// prompt prefilled once for its decoding and its reference's scoring; or one
/// at a time with a batch of 1 (the old way: decode, then score apart).
fn answer_and_score(
    model: &Model,
    prompts: &[Vec<u32>],
    references: &[Example],
    generation: &GenerationConfig,
    batch: usize,
) -> Result<(Vec<Generation>, f64, usize)> {
    let (generations, scores) = match batch {
        1 => (
            model.generate_batch(prompts, generation, 1)?,
            references
                .iter()
                .map(|e| summed_loss(model, std::slice::from_ref(e), &[vec![0]]))
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => {
            let heads = references.iter().filter_map(crate::generate::nll::head);
            let sequences: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).chain(heads).collect();
            let prefix = SharedPrefix::of(&model.lm, &sequences)?;
            let (lm, tokenizer) = (&model.lm, &model.tokenizer);
            let references = Some(references);
            generate_and_score_after(
                lm, tokenizer, &prefix, prompts, references, generation, batch,
            )?
        }
    };
    let (sum, tokens) = scores
        .into_iter()
        .fold((0.0, 0), |(s, n), (x, m)| (s + x, n + m));
    Ok((generations, sum, tokens))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

pub(super) fn progress_bar(show: bool, len: usize) -> indicatif::ProgressBar {
    let bar = match show {
        true => indicatif::ProgressBar::new(len as u64),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("evaluate [{bar:30}] {pos}/{len} {msg}, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Answers every held-out question with variant `v` (on the adapter now
/// loaded) and scores the answers. Questions that share a prompt prefix
/// decode together, `config.batch` at a time.
pub(super) fn score(
    model: &Model,
    v: &Variant,
    held_out: &[HeldOut],
    config: &CompareConfig,
    bar: &indicatif::ProgressBar,
) -> Result<VariantReport> {
    bar.set_message(v.name.clone());
    let generation = GenerationConfig {
        json_schema: v.json_schema.clone(),
        ..config.generation.clone()
    };
    let n = held_out.len();
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        groups.entry(v.group(i)).or_default().push(i);
    }
    let mut generations: Vec<Option<Generation>> = vec![None; n];
    let (mut nll, mut nll_tokens) = (0.0, 0);
    let mut prompt_tokens = vec![0usize; n];
    let mut costs = vec![QueryCost::default(); n];
    for members in groups.values() {
        let prompts: Vec<Vec<Message>> =
            members.iter().map(|&i| v.prompt(i, &held_out[i])).collect();
        let ids = prompts
            .iter()
            .map(|p| model.chat_prompt_ids(p))
            .collect::<Result<Vec<_>>>()?;
        for (&i, p) in members.iter().zip(&ids) {
            prompt_tokens[i] = p.len();
        }
        let cases: Vec<(Vec<Message>, &str)> = members
            .iter()
            .zip(prompts)
            .map(|(&i, p)| (p, held_out[i].reference.as_str()))
            .collect();
        let references = reference_examples(model, &cases)?;
        let (answers, sum, tokens) =
            answer_and_score(model, &ids, &references, &generation, config.batch)?;
        nll += sum;
        nll_tokens += tokens;
        let together = members.len() as f64;
        for (&i, g) in members.iter().zip(answers) {
            // Each answer's share of its batch's time; the shared prefix's
            // time and tokens split among the group's questions.
            let (prefill, prefix) = (g.prefill.as_secs_f64(), g.shared_prefix_time.as_secs_f64());
            let own = (g.prompt_tokens - g.shared_prefix_tokens) as f64;
            costs[i] = QueryCost {
                prefill_tokens: own + g.shared_prefix_tokens as f64 / together,
                prefill_tokens_uncached: g.prompt_tokens as f64,
                prefill_s: prefill,
                prefill_s_uncached: prefill - prefix / together + prefix,
                decode_tokens: g.ids.len() as f64,
                decode_s: g.decode.as_secs_f64(),
            };
            generations[i] = Some(g);
            bar.inc(1);
        }
    }
    let cut_off = generations
        .iter()
        .flatten()
        .filter(|g| !g.stopped_at_eos && config.generation.stop_at_eos)
        .count();
    let cap = (cut_off > 0).then(|| {
        format!(
            "{cut_off} of {n} answers stopped at --max-tokens ({}) before ending their turn",
            config.generation.max_new_tokens
        )
    });
    let note = match (v.note.clone(), cap) {
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        (a, b) => a.or(b),
    };
    let (mut outputs, mut f1, mut json) = (Vec::new(), Vec::new(), Vec::new());
    for (h, g) in held_out.iter().zip(generations.into_iter().flatten()) {
        f1.push(token_f1(&g.text, &h.reference));
        json.push(json_score(&g.text, &h.reference));
        outputs.push(Output {
            correct: exact_match(&g.text, &h.reference),
            answer: g.text,
        });
    }
    let average = |f: fn(&QueryCost) -> f64| mean(costs.iter().map(f));
    let cost = QueryCost {
        prefill_tokens: average(|c| c.prefill_tokens),
        prefill_tokens_uncached: average(|c| c.prefill_tokens_uncached),
        prefill_s: average(|c| c.prefill_s),
        prefill_s_uncached: average(|c| c.prefill_s_uncached),
        decode_tokens: average(|c| c.decode_tokens),
        decode_s: average(|c| c.decode_s),
    };
    let scored: Vec<_> = json.iter().flatten().collect();
    let valid: Vec<_> = scored.iter().filter(|s| s.valid).collect();
    let nll = nll / nll_tokens.max(1) as f64;
    Ok(VariantReport {
        name: v.name.clone(),
        adapter: v.adapter.clone(),
        fine_tuned: v.adapter.is_some(),
        exact_match: mean(outputs.iter().map(|o| o.correct as u8 as f64)),
        exact_match_interval: wilson(outputs.iter().filter(|o| o.correct).count(), n),
        json_valid: (!scored.is_empty()).then(|| mean(scored.iter().map(|s| s.valid as u8 as f64))),
        field_accuracy: (!scored.is_empty()).then(|| mean(scored.iter().map(|s| s.fields_right))),
        field_accuracy_valid: (!valid.is_empty())
            .then(|| mean(valid.iter().map(|s| s.fields_right))),
        token_f1: mean(f1.into_iter()),
        nll,
        perplexity: nll.exp(),
        prompt_tokens: mean(prompt_tokens.iter().map(|&p| p as f64)),
        latency_s: cost.seconds(),
        tokens_per_second: cost.decode_tokens / cost.decode_s.max(1e-9),
        cost,
        note,
        outputs,
    })
}
