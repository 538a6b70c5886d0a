//! The verdict: which variant scores highest, whether the best fine-tuned
//! variant beats the best prompting variant beyond what chance explains on
//! this many examples, and what the instruction and the break-even add.

use super::comparison::{BreakEven, Comparison, TrainingCost, VariantReport};
use super::stats::PairedComparison;
use serde::Serialize;

/// The best fine-tuned variant against the best prompting variant.
#[derive(Debug, Clone, Serialize)]
pub struct Significance {
    /// The fine-tuned variant.
    pub fine_tuned: String,
    /// The prompting variant.
    pub prompting: String,
    /// Fine-tuned minus prompting, exact match, paired over the examples.
    pub comparison: PairedComparison,
    /// "fine-tuning is better", "prompting is better" or "no clear difference".
    pub conclusion: String,
}

/// Paired bootstrap draws for the verdict's interval.
const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// The query volume at which each fine-tune has paid for itself against each
/// prompting variant.
pub(super) fn break_even(reports: &[VariantReport], training: &[TrainingCost]) -> Vec<BreakEven> {
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
            let extra_uncached = p.cost.seconds_uncached() - ft.latency_s;
            out.push(BreakEven {
                prompting: p.name.clone(),
                fine_tuned: ft.name.clone(),
                extra_prompt_tokens,
                extra_seconds,
                queries_by_time: (extra_seconds > 0.0).then(|| cost.seconds / extra_seconds),
                queries_by_time_uncached: (extra_uncached > 0.0)
                    .then(|| cost.seconds / extra_uncached),
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
pub(super) fn better(a: &VariantReport, b: &VariantReport) -> std::cmp::Ordering {
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

/// The best variant of each kind, by [`better`].
fn best(variants: &[VariantReport], fine_tuned: bool) -> Option<&VariantReport> {
    variants
        .iter()
        .filter(|r| r.fine_tuned == fine_tuned)
        .max_by(|a, b| better(a, b))
}

/// The best fine-tuned variant against the best prompting variant, paired
/// over the examples both answered.
pub(super) fn significance(variants: &[VariantReport], seed: u64) -> Option<Significance> {
    let (ft, pr) = (best(variants, true)?, best(variants, false)?);
    let right = |v: &VariantReport| v.outputs.iter().map(|o| o.correct).collect::<Vec<_>>();
    let comparison = PairedComparison::new(&right(ft), &right(pr), BOOTSTRAP_RESAMPLES, seed);
    let conclusion = match comparison.winner() {
        1 => "fine-tuning is better".to_string(),
        -1 => "prompting is better".to_string(),
        _ => format!("no clear difference on {} examples", comparison.n),
    };
    Some(Significance {
        fine_tuned: ft.name.clone(),
        prompting: pr.name.clone(),
        comparison,
        conclusion,
    })
}

pub(super) fn verdict(c: &Comparison) -> String {
    let winner = c
        .variants
        .iter()
        .max_by(|a, b| better(a, b))
        .expect("at least one variant");
    let mut text = format!(
        "On {} held-out examples, \"{}\" scores highest, with {} exact match.",
        c.examples.len(),
        winner.name,
        pct(winner.exact_match)
    );
    let (Some(ft), Some(pr), Some(sig)) = (
        best(&c.variants, true),
        best(&c.variants, false),
        c.significance.as_ref(),
    ) else {
        text.push_str(" No adapter was given, so only prompting variants were compared.");
        return text;
    };
    let p = &sig.comparison;
    let points = |x: f64| format!("{:.1}", 100.0 * x);
    let difference = format!("{:+.1}", 100.0 * p.difference);
    text.push_str(&format!(
        " Verdict: {}. The best fine-tuned variant (\"{}\", {}) against the best prompting \
         variant (\"{}\", {}): {} points of exact match (paired bootstrap 95% interval {} to \
         {}; {} examples right only when fine-tuned, {} only when prompted; McNemar's exact \
         p = {:.3}). {} examples can detect a difference of about {} points (5% level, 80% power).",
        sig.conclusion,
        ft.name,
        pct(ft.exact_match),
        pr.name,
        pct(pr.exact_match),
        difference,
        points(p.interval.0),
        points(p.interval.1),
        p.only_first,
        p.only_second,
        p.p_value,
        p.n,
        points(p.detectable),
    ));
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
    if let Some(sc) = &c.scaling {
        let tried: Vec<String> = sc.points.iter().map(|p| p.n.to_string()).collect();
        text.push_str(&match sc.crossover {
            Some(n) => format!(
                " On the scaling curve (n = {}), fine-tuning is first ahead of retrieved \
                 few-shot from the same examples at n = {n}.",
                tried.join(", ")
            ),
            None => format!(
                " On the scaling curve (n = {}), fine-tuning is not ahead of retrieved \
                 few-shot from the same examples at any n.",
                tried.join(", ")
            ),
        });
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::comparison::{Output, QueryCost};

    fn variant(name: &str, fine_tuned: bool, right: &[bool]) -> VariantReport {
        let share = right.iter().filter(|&&r| r).count() as f64 / right.len() as f64;
        VariantReport {
            name: name.into(),
            adapter: None,
            fine_tuned,
            exact_match: share,
            exact_match_interval: (0.0, 1.0),
            json_valid: None,
            field_accuracy: None,
            field_accuracy_valid: None,
            token_f1: share,
            nll: 1.0,
            perplexity: 1.0f64.exp(),
            prompt_tokens: 10.0,
            latency_s: 0.1,
            tokens_per_second: 10.0,
            cost: QueryCost::default(),
            note: None,
            outputs: right
                .iter()
                .map(|&correct| Output {
                    answer: String::new(),
                    correct,
                })
                .collect(),
        }
    }

    /// The three outcomes on constructed score vectors, each against the
    /// best variant of the other kind.
    #[test]
    fn the_verdict_has_three_outcomes() {
        let n = 60;
        let half: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let more: Vec<bool> = (0..n).map(|i| i % 2 == 0 || i % 3 != 0).collect();
        let mut one_more = half.clone();
        one_more[1] = true;
        let weak: Vec<bool> = vec![false; n];
        for (tuned, prompted, want) in [
            (&more, &half, "fine-tuning is better".to_string()),
            (&half, &more, "prompting is better".to_string()),
            (
                &one_more,
                &half,
                format!("no clear difference on {n} examples"),
            ),
        ] {
            let variants = [
                variant("zero-shot", false, &weak),
                variant("few-shot", false, prompted),
                variant("fine-tuned", true, tuned),
                variant("fine-tuned, worse", true, &weak),
            ];
            let s = significance(&variants, 3).unwrap();
            assert_eq!(s.conclusion, want);
            assert_eq!(
                (s.fine_tuned.as_str(), s.prompting.as_str()),
                ("fine-tuned", "few-shot")
            );
        }
        assert!(significance(&[variant("zero-shot", false, &weak)], 3).is_none());
    }
}
