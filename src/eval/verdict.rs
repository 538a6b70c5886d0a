//! The verdict: which variant scores highest, whether fine-tuning beat
//! prompting ([`super::significance`]), and what the instruction and the
//! break-even add.

use super::comparison::{BreakEven, Comparison, TrainingCost, VariantReport};
use super::overlap::{correct_where, share, NearDuplicate};
use super::significance::{best, better, p_is, probability, winner_test_sentence};
use super::stats::{discordant, mcnemar_exact};

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
            let extra_answer_tokens = p.cost.decode_tokens - ft.cost.decode_tokens;
            let extra_tokens = extra_prompt_tokens + extra_answer_tokens;
            let extra_seconds = p.latency_s - ft.latency_s;
            let extra_uncached = p.cost.seconds_uncached() - ft.cost.seconds_uncached();
            let after = |extra: f64, one_off: f64| (extra > 0.0).then(|| one_off / extra);
            out.push(BreakEven {
                prompting: p.name.clone(),
                fine_tuned: ft.name.clone(),
                extra_prompt_tokens,
                extra_answer_tokens,
                extra_seconds,
                queries_by_time: after(extra_seconds, cost.seconds),
                queries_by_time_uncached: after(extra_uncached, cost.seconds),
                queries_by_flops: after(2.0 * extra_tokens, cost.flops_per_parameter()),
            });
        }
    }
    out
}

/// "253 more prompt tokens and 4 fewer answer tokens": what a prompting
/// variant spends per query beyond the fine-tune, the parts that differ.
fn extra_tokens(b: &BreakEven) -> String {
    let part = |extra: f64, what: &str| {
        let n = extra.round();
        (n != 0.0).then(|| {
            let more = if n > 0.0 { "more" } else { "fewer" };
            format!("{} {more} {what} tokens", n.abs())
        })
    };
    let parts: Vec<String> = [
        part(b.extra_prompt_tokens, "prompt"),
        part(b.extra_answer_tokens, "answer"),
    ]
    .into_iter()
    .flatten()
    .collect();
    match parts.is_empty() {
        true => "as many tokens".to_string(),
        false => parts.join(" and "),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
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
    if let Some(sentence) = majority_sentence(c) {
        text.push_str(&sentence);
    }
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
         {}). {} examples can detect a difference of about {} points (5% level, 80% power).",
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
        p_is(p.p_value),
        p.n,
        points(p.detectable),
    ));
    if let Some(sentence) = winner_test_sentence(sig) {
        text.push_str(&sentence);
    }
    if !c.seen_in_training.is_empty() {
        text.push_str(&format!(
            " Caution: {} of these {} questions also stand in the training pool, word for \
             word, so the scores flatter whatever saw them (see the notes).",
            c.seen_in_training.len(),
            c.examples.len()
        ));
    }
    let near = (
        &c.near_duplicates[..],
        c.examples.len(),
        c.near_duplicate_threshold,
    );
    if let Some(sentence) = near_duplicate_sentence(near, ft, pr) {
        text.push_str(&sentence);
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
            " The fine-tune cost {:.0} s of training; against \"{}\", which spends {} per query, it pays for itself in compute after about {:.0} queries.",
            c.training.first().map_or(0.0, |t| t.seconds), b.0.prompting, extra_tokens(b.0), b.1
        ));
    }
    if let Some(sc) = &c.scaling {
        text.push(' ');
        text.push_str(&sc.summary());
    }
    text
}

/// The variants that score no better than always giving the most common
/// training answer, named.
fn majority_sentence(c: &Comparison) -> Option<String> {
    let m = c.majority_answer.as_ref()?;
    let below: Vec<String> = c
        .variants
        .iter()
        .filter(|v| v.exact_match <= m.exact_match)
        .map(|v| format!("\"{}\"", v.name))
        .collect();
    if below.is_empty() {
        return None;
    }
    let (verb, noun) = match below.len() {
        1 => ("does", "variant"),
        _ => ("do", "variants"),
    };
    Some(format!(
        " Always giving the most common training answer would score {}; {} {noun} {verb} no \
         better: {}.",
        pct(m.exact_match),
        below.len(),
        below.join(", ")
    ))
}

/// The caution on near-duplicates (`near` of `total` held-out questions at
/// ROUGE-L `threshold`): how many, and the best fine-tuned and prompting
/// variants on the other questions, paired.
fn near_duplicate_sentence(
    (near, total, threshold): (&[NearDuplicate], usize, f64),
    ft: &VariantReport,
    pr: &VariantReport,
) -> Option<String> {
    if near.is_empty() {
        return None;
    }
    let n = near.len();
    let at = probability(threshold);
    if n == total {
        return Some(format!(
            " Caution: every held-out question has a near-duplicate in the training pool \
             (word-level ROUGE-L at least {at}), so these scores cannot tell learning the task \
             from learning those questions; hold out questions unlike the training ones."
        ));
    }
    let (ft_right, pr_right) = (
        correct_where(ft, near, false),
        correct_where(pr, near, false),
    );
    let (only_fine_tuned, only_prompted) = discordant(&ft_right, &pr_right);
    let p_value = mcnemar_exact(only_fine_tuned, only_prompted);
    let (ft_share, pr_share) = (share(&ft_right)?, share(&pr_right)?);
    Some(format!(
        " {n} of the {total} held-out questions have a near-duplicate in the training pool \
         (word-level ROUGE-L at least {at}); on the other {} alone, \"{}\" scores {} and \
         \"{}\" {} ({:+.1} points, McNemar's exact {}).",
        total - n,
        ft.name,
        pct(ft_share),
        pr.name,
        pct(pr_share),
        100.0 * (ft_share - pr_share),
        p_is(p_value)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::comparison::{QueryCost, TrainingCost};
    use crate::eval::significance::tests::variant;

    /// A variant answering in `prompt` prompt tokens and `answer` generated
    /// tokens, at `(prefill, prefill without the cache, decode)` seconds.
    fn costed(
        name: &str,
        fine_tuned: bool,
        tokens: (f64, f64),
        s: (f64, f64, f64),
    ) -> VariantReport {
        let cost = QueryCost {
            prefill_tokens: tokens.0,
            prefill_tokens_uncached: tokens.0,
            prefill_s: s.0,
            prefill_s_uncached: s.1,
            decode_tokens: tokens.1,
            decode_s: s.2,
        };
        VariantReport {
            adapter: fine_tuned.then(|| "runs/ft".into()),
            prompt_tokens: tokens.0,
            latency_s: cost.seconds(),
            cost,
            ..variant(name, fine_tuned, &[true])
        }
    }

    /// The near-duplicate caution scores the other questions apart, paired.
    #[test]
    fn near_duplicates_are_set_apart_in_the_verdict() {
        let near = |i: usize| NearDuplicate {
            example: i,
            held_out: format!("test.jsonl:{}", i + 1),
            training: "train.jsonl:7".into(),
            similarity: 0.8,
        };
        // Six questions, the first two near-duplicates; on the other four
        // the fine-tune gets 4 right, prompting 1.
        let ft = variant("fine-tuned", true, &[true, true, true, true, true, true]);
        let pr = variant("few-shot", false, &[true, true, false, true, false, false]);
        let sentence = near_duplicate_sentence((&[near(0), near(1)], 6, 0.7), &ft, &pr).unwrap();
        assert_eq!(
            sentence,
            " 2 of the 6 held-out questions have a near-duplicate in the training pool \
             (word-level ROUGE-L at least 0.7); on the other 4 alone, \"fine-tuned\" scores \
             100.0% and \"few-shot\" 25.0% (+75.0 points, McNemar's exact p = 0.25)."
        );
        let all: Vec<NearDuplicate> = (0..6).map(near).collect();
        let sentence = near_duplicate_sentence((&all, 6, 0.7), &ft, &pr).unwrap();
        assert!(
            sentence.contains("every held-out question has a near-duplicate"),
            "{sentence}"
        );
        assert_eq!(near_duplicate_sentence((&[], 6, 0.7), &ft, &pr), None);
    }

    /// Each break-even divides the one-off training cost by what prompting
    /// spends per query beyond the fine-tune: its prompt and its answer
    /// tokens in compute, seconds with the cache, seconds with neither
    /// variant using it.
    #[test]
    fn break_even_counts_prompt_and_answer_tokens_and_like_for_like_seconds() {
        let reports = [
            costed("fine-tuned", true, (10.0, 10.0), (0.01, 0.05, 0.1)),
            costed("few-shot", false, (110.0, 40.0), (0.02, 0.3, 0.4)),
            costed("terse", false, (10.0, 5.0), (0.01, 0.05, 0.05)),
        ];
        let mut training = TrainingCost {
            adapter: "runs/ft".into(),
            seconds: 31.0,
            tokens: 1000,
            recompute: false,
        };
        let found = break_even(&reports, std::slice::from_ref(&training));
        assert_eq!(found.len(), 2);
        let b = &found[0];
        assert_eq!(
            (b.prompting.as_str(), b.fine_tuned.as_str()),
            ("few-shot", "fine-tuned")
        );
        assert_eq!(
            (b.extra_prompt_tokens, b.extra_answer_tokens),
            (100.0, 30.0)
        );
        let close = |a: Option<f64>, want: f64| (a.unwrap() - want).abs() < 1e-9 * want;
        assert!(close(b.queries_by_time, 31.0 / 0.31));
        // 0.7 s against the fine-tune's own 0.15 s without the cache.
        assert!(close(b.queries_by_time_uncached, 31.0 / 0.55));
        // 4·N per trained token, 2·N per prompt or answer token.
        assert!(close(b.queries_by_flops, 4000.0 / 260.0));
        assert_eq!(
            extra_tokens(b),
            "100 more prompt tokens and 30 more answer tokens"
        );
        // Cheaper than the fine-tune per query: it never pays for itself.
        let t = &found[1];
        assert_eq!(
            (
                t.queries_by_time,
                t.queries_by_time_uncached,
                t.queries_by_flops
            ),
            (None, None, None)
        );
        assert_eq!(extra_tokens(t), "5 fewer answer tokens");

        training.recompute = true;
        let b = &break_even(&reports, &[training])[0];
        assert!(close(b.queries_by_flops, 6000.0 / 260.0));
    }
}
