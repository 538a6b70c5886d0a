//! What a comparison found: each variant's scores and costs, the training
//! cost, the break-even points, the verdict and the data-scaling curve, as the
//! reports show them and `report.json` holds them.

use super::significance::Significance;
use super::HeldOut;
use crate::generate::json::JsonSchema;
use serde::Serialize;
use std::path::PathBuf;

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
    /// Share of reference fields right among the valid JSON outputs only.
    pub field_accuracy_valid: Option<f64>,
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
    /// Per query: prefill and decode, with and without the shared-prefix cache.
    pub cost: QueryCost,
    /// What else to know about how it ran: fewer shots for long questions,
    /// answers stopped by `--max-tokens`.
    pub note: Option<String>,
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
    /// Whether it ran with activation checkpointing (`--recompute`): each
    /// block's forward pass then runs twice.
    pub recompute: bool,
}

impl TrainingCost {
    /// Training compute in FLOPs per parameter of the base: `4·T` for the
    /// `T` [`tokens`](Self::tokens) it processed (the forward pass, `2·N·T`, and the frozen weights'
    /// input gradient, `2·N·T`; the frozen weights get no weight gradient),
    /// `6·T` with recompute. LoRA's own products are left out: they are a
    /// fraction of a percent at these ranks.
    pub fn flops_per_parameter(&self) -> f64 {
        let passes = if self.recompute { 6.0 } else { 4.0 };
        passes * self.tokens as f64
    }
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
    /// Extra tokens it generates per query (negative where its answers are
    /// shorter than the fine-tune's).
    pub extra_answer_tokens: f64,
    /// Extra seconds the prompting variant spends per query.
    pub extra_seconds: f64,
    /// Queries after which the training time is recovered (`None`: never, since
    /// prompting is not slower per query).
    pub queries_by_time: Option<f64>,
    /// The same with both variants run without the shared-prefix cache (each
    /// query prefilling its whole prompt).
    pub queries_by_time_uncached: Option<f64>,
    /// The same in compute: training counted as
    /// [`TrainingCost::flops_per_parameter`] `· N`, and every token a query
    /// reads or generates as `2·N` (every prompt token counts, as without a
    /// prefix cache). `None`: prompting costs no more per query.
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
    /// The many-shot variant's number of examples, when it ran.
    pub many_shots: Option<usize>,
    /// The JSON shape the constrained variant was held to, when it ran.
    pub json_schema: Option<JsonSchema>,
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
    /// What was skipped or limited, and why.
    pub notes: Vec<String>,
    /// The held-out examples (indices into `examples`) whose prompt stands
    /// in the training pool too, word for word: a fine-tune on that pool may
    /// recall their answers, and retrieved few-shot can copy them.
    pub seen_in_training: Vec<usize>,
    /// The held-out questions with a near-duplicate in the training pool
    /// (word-level ROUGE-L at least `near_duplicate_threshold`), the
    /// exact ones included ([`super::overlap`]).
    pub near_duplicates: Vec<super::overlap::NearDuplicate>,
    /// The ROUGE-L at which a question counted as a near-duplicate.
    pub near_duplicate_threshold: f64,
    /// Always giving the training pool's most common answer, scored: the
    /// floor every variant should clear (none when no answer repeats).
    pub majority_answer: Option<super::baseline::MajorityAnswer>,
    /// Accuracy against the number of training examples, when asked for.
    pub scaling: Option<super::scaling::Scaling>,
}

/// What one query costs, averaged over the held-out examples. With the cache,
/// the prefix that every query of a variant shares is prefilled once and its
/// time and tokens are split among the queries; without it, each query
/// prefills the whole prompt (its time is the measured prefill of the query's
/// own tokens plus the prefix's measured prefill time).
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueryCost {
    /// Prompt tokens prefilled per query, with the cache.
    pub prefill_tokens: f64,
    /// Prompt tokens prefilled per query, without it.
    pub prefill_tokens_uncached: f64,
    /// Prefill seconds per query, with the cache.
    pub prefill_s: f64,
    /// Prefill seconds per query, without it.
    pub prefill_s_uncached: f64,
    /// Generated tokens per query.
    pub decode_tokens: f64,
    /// Decode seconds per query.
    pub decode_s: f64,
}

impl QueryCost {
    /// Seconds per query with the cache.
    pub fn seconds(&self) -> f64 {
        self.prefill_s + self.decode_s
    }

    /// Seconds per query without it.
    pub fn seconds_uncached(&self) -> f64 {
        self.prefill_s_uncached + self.decode_s
    }
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
    pub(super) fn of(mut values: Vec<f64>) -> Option<Self> {
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
