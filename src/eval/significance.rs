//! Whether the best fine-tuned variant beats the best prompting variant
//! beyond what chance explains on this many examples, with the pick of each
//! side's best on those same examples allowed for.

use super::comparison::VariantReport;
use super::stats::PairedComparison;
use serde::Serialize;
use std::cmp::Ordering;

/// The best fine-tuned variant against the best prompting variant, and the
/// conclusion drawn with the choice of both on the same examples allowed for.
#[derive(Debug, Clone, Serialize)]
pub struct Significance {
    /// The fine-tuned variant.
    pub fine_tuned: String,
    /// The prompting variant.
    pub prompting: String,
    /// Fine-tuned minus prompting, exact match, paired over the examples, at
    /// the usual 95%.
    pub comparison: PairedComparison,
    /// Fine-tuned variants the best was picked from.
    pub fine_tuned_variants: usize,
    /// Prompting variants the best was picked from.
    pub prompting_variants: usize,
    /// The test a "better" conclusion had to pass, or failed: the side that
    /// scores higher against each variant of the other side.
    pub test: WinnerTest,
    /// "fine-tuning is better", "prompting is better" or "no clear difference".
    pub conclusion: String,
}

/// The test behind a "better" conclusion. The best of several variants, picked
/// on the same examples that judge it, looks better than it is, so the
/// leading side must beat **each** variant of the other side, every paired
/// test at the family-wise 5% level divided by the number of variants its
/// leader was picked from (Bonferroni for the pick; requiring every test to
/// pass needs no further correction).
#[derive(Debug, Clone, Serialize)]
pub struct WinnerTest {
    /// The variant that scores highest, whose side leads.
    pub leader: String,
    /// The level each paired test must reach: 0.05 over the leader's
    /// candidates.
    pub threshold: f64,
    /// The variant of the other side the leader comes closest to not
    /// beating (the highest p-value).
    pub hardest: String,
    /// The leader against `hardest`, at `1 - threshold`.
    pub against_hardest: PairedComparison,
    /// Whether the leader beats every variant of the other side.
    pub passed: bool,
}

/// The family-wise significance level of the verdict.
const ALPHA: f64 = 0.05;

/// Paired bootstrap draws for each interval of a difference.
pub(super) const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// Orders variants by exact match, then field accuracy, then token F1; on a tie
/// the cheaper one (fewer prompt tokens) ranks higher.
pub(super) fn better(a: &VariantReport, b: &VariantReport) -> Ordering {
    let key = |r: &VariantReport| {
        (
            r.exact_match,
            r.field_accuracy.unwrap_or(0.0),
            r.token_f1,
            -r.prompt_tokens,
        )
    };
    key(a).partial_cmp(&key(b)).unwrap_or(Ordering::Equal)
}

/// Where the best variant of a kind is, by [`better`]; of variants that
/// tie on every count, the first.
pub(super) fn best_index(variants: &[VariantReport], fine_tuned: bool) -> Option<usize> {
    (0..variants.len())
        .filter(|&i| variants[i].fine_tuned == fine_tuned)
        .max_by(|&a, &b| better(&variants[a], &variants[b]).then(b.cmp(&a)))
}

/// The best variant of each kind ([`best_index`]).
pub(super) fn best(variants: &[VariantReport], fine_tuned: bool) -> Option<&VariantReport> {
    best_index(variants, fine_tuned).map(|i| &variants[i])
}

/// Whether each example was answered right.
pub(super) fn right(v: &VariantReport) -> Vec<bool> {
    v.outputs.iter().map(|o| o.correct).collect()
}

/// [`WinnerTest`]: `leader`, the best of `candidates` variants of its side,
/// against each of `others`.
fn winner_test(
    leader: &VariantReport,
    candidates: usize,
    others: &[&VariantReport],
    seed: u64,
) -> WinnerTest {
    let threshold = ALPHA / candidates.max(1) as f64;
    let leader_right = right(leader);
    let (hardest, against_hardest) = others
        .iter()
        .map(|o| {
            let c = PairedComparison::new(
                &leader_right,
                &right(o),
                BOOTSTRAP_RESAMPLES,
                seed,
                1.0 - threshold,
            );
            (o.name.clone(), c)
        })
        .max_by(|a, b| {
            // A test that fails is harder than any that passes.
            let key = |c: &PairedComparison| (c.winner() == 1, -c.p_value);
            key(&b.1).partial_cmp(&key(&a.1)).unwrap_or(Ordering::Equal)
        })
        .expect("the other side has a variant");
    WinnerTest {
        leader: leader.name.clone(),
        threshold,
        passed: against_hardest.winner() == 1,
        hardest,
        against_hardest,
    }
}

/// The best fine-tuned variant against the best prompting variant, paired
/// over the examples both answered, and whether the leading side beats each
/// variant of the other with its pick allowed for ([`WinnerTest`]).
pub(super) fn significance(variants: &[VariantReport], seed: u64) -> Option<Significance> {
    let side = |fine_tuned: bool| -> Vec<&VariantReport> {
        variants
            .iter()
            .filter(|r| r.fine_tuned == fine_tuned)
            .collect()
    };
    let (fine_tuned, prompting) = (side(true), side(false));
    let (ft, pr) = (best(variants, true)?, best(variants, false)?);
    let comparison = PairedComparison::new(&right(ft), &right(pr), BOOTSTRAP_RESAMPLES, seed, 0.95);
    let ft_leads = better(ft, pr) != Ordering::Less;
    let test = match ft_leads {
        true => winner_test(ft, fine_tuned.len(), &prompting, seed),
        false => winner_test(pr, prompting.len(), &fine_tuned, seed),
    };
    let conclusion = match (test.passed, ft_leads) {
        (true, true) => "fine-tuning is better".to_string(),
        (true, false) => "prompting is better".to_string(),
        _ => format!("no clear difference on {} examples", comparison.n),
    };
    Some(Significance {
        fine_tuned: ft.name.clone(),
        prompting: pr.name.clone(),
        comparison,
        fine_tuned_variants: fine_tuned.len(),
        prompting_variants: prompting.len(),
        test,
        conclusion,
    })
}

/// One sentence on the [`WinnerTest`] when either side had several
/// candidates: what the leader had to beat, at what level, and whether it did.
pub(super) fn winner_test_sentence(sig: &Significance) -> Option<String> {
    let t = &sig.test;
    let (fine_tuned, prompting) = (sig.fine_tuned_variants, sig.prompting_variants);
    if fine_tuned <= 1 && prompting <= 1 {
        return None;
    }
    let (leader_side, other_side, candidates, others) = match t.leader == sig.fine_tuned {
        true => ("fine-tuned", "prompting", fine_tuned, prompting),
        false => ("prompting", "fine-tuned", prompting, fine_tuned),
    };
    let c = &t.against_hardest;
    let outcome = match t.passed {
        true => format!(
            "and it does; its closest call is \"{}\" ({})",
            t.hardest,
            p_is(c.p_value)
        ),
        false => format!(
            "and it does not against \"{}\" ({:+.1} points, {})",
            t.hardest,
            100.0 * c.difference,
            p_is(c.p_value)
        ),
    };
    let count = |n: usize, side: &str| match n {
        1 => format!("1 {side} variant"),
        n => format!("{n} {side} variants"),
    };
    let each = match others {
        1 => format!("the {other_side} variant"),
        n => format!("each of the {n} {other_side} variants"),
    };
    let level = match candidates {
        1 => "5%, the only one of its side".to_string(),
        n => format!("5% over the {n} {leader_side} variants it was picked from"),
    };
    Some(format!(
        " Each side's best was picked on these same examples ({} and {}), which flatters \
         it, so the leader \"{}\" must beat {each} at p < {} ({level}), {outcome}.",
        count(fine_tuned, "fine-tuned"),
        count(prompting, "prompting"),
        t.leader,
        probability(t.threshold),
    ))
}

/// A probability to two significant digits (0.05, 0.025, 0.0071, 0.00012),
/// or "< 0.0001" below that.
pub fn probability(x: f64) -> String {
    if x < 1e-4 {
        return "< 0.0001".to_string();
    }
    let digits = (-x.log10()).floor().max(0.0) as usize + 2;
    let s = format!("{x:.digits$}");
    let s = s.trim_end_matches('0');
    s.strip_suffix('.').unwrap_or(s).to_string()
}

/// "p = 0.031" or "p < 0.0001".
pub(super) fn p_is(p: f64) -> String {
    match probability(p) {
        s if s.starts_with('<') => format!("p {s}"),
        s => format!("p = {s}"),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::eval::comparison::{Output, QueryCost};

    /// A variant with `right` as its answers' correctness.
    pub(crate) fn variant(name: &str, fine_tuned: bool, right: &[bool]) -> VariantReport {
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

    /// The best of a kind: the highest by [`better`] (fewer prompt tokens
    /// break an exact-match tie), and of full ties the first, so that the
    /// constrained variant and the verdict name the same one.
    #[test]
    fn the_best_variant_is_the_first_of_full_ties() {
        let mut variants = vec![
            variant("fine-tuned", true, &[true, true]),
            variant("zero-shot", false, &[true, false]),
            variant("few-shot", false, &[true, false]),
            variant("long", false, &[true, false]),
            variant("worse", false, &[false, false]),
        ];
        variants[3].prompt_tokens = 500.0;
        assert_eq!(best_index(&variants, false), Some(1));
        assert_eq!(
            best(&variants, false).map(|v| v.name.as_str()),
            Some("zero-shot")
        );
        variants[2].prompt_tokens = 5.0;
        assert_eq!(best_index(&variants, false), Some(2));
        assert_eq!(best_index(&variants, true), Some(0));
        assert_eq!(best_index(&variants[1..], true), None);
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

    /// A gain that is clear for one pair at 5% is not once the leader was
    /// picked from several variants on the same examples.
    #[test]
    fn the_pick_of_the_best_of_several_raises_the_bar() {
        let n = 60;
        let base: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let mut six_more = base.clone();
        for i in [1, 3, 5, 7, 9, 11] {
            six_more[i] = true;
        }
        // Six examples right only when prompted: McNemar's p = 2/64 = 0.031.
        let alone = [
            variant("few-shot", false, &six_more),
            variant("fine-tuned", true, &base),
        ];
        let s = significance(&alone, 3).unwrap();
        assert_eq!(s.conclusion, "prompting is better");
        assert!((s.test.against_hardest.p_value - 2.0 / 64.0).abs() < 1e-12);
        assert_eq!(winner_test_sentence(&s), None);

        // The same pair, the few-shot variant now the best of three.
        let weak = vec![false; n];
        let picked = [
            variant("zero-shot", false, &weak),
            variant("instruction", false, &base),
            alone[0].clone(),
            alone[1].clone(),
        ];
        let s = significance(&picked, 3).unwrap();
        assert_eq!(s.conclusion, format!("no clear difference on {n} examples"));
        assert!(
            s.comparison.winner() == -1,
            "clear at 5% for the pair alone"
        );
        let t = &s.test;
        assert_eq!(
            (t.leader.as_str(), t.hardest.as_str()),
            ("few-shot", "fine-tuned")
        );
        assert!((t.threshold - 0.05 / 3.0).abs() < 1e-12 && !t.passed);
        assert_eq!(t.against_hardest.level, 1.0 - 0.05 / 3.0);
        let sentence = winner_test_sentence(&s).unwrap();
        assert!(
            sentence.contains("(1 fine-tuned variant and 3 prompting variants)")
                && sentence.contains("\"few-shot\" must beat the fine-tuned variant at p < 0.017")
                && sentence.contains("does not against \"fine-tuned\" (+10.0 points, p = 0.031)"),
            "{sentence}"
        );
    }

    /// A fine-tune clearly ahead of the best prompting variant is not judged
    /// better while another prompting variant is not clearly behind it.
    #[test]
    fn the_leader_must_beat_each_variant_of_the_other_side() {
        let n = 60;
        let right_on = |ranges: &[(usize, usize)]| -> Vec<bool> {
            (0..n)
                .map(|i| ranges.iter().any(|&(from, to)| (from..to).contains(&i)))
                .collect()
        };
        let variants = [
            variant("fine-tuned", true, &right_on(&[(0, 40)])),
            // 30 right, all of them the fine-tune's too: p = 2/1024.
            variant("few-shot", false, &right_on(&[(0, 30)])),
            // 28 right, 10 of them ones the fine-tune misses: p ≈ 0.05.
            variant("retrieved", false, &right_on(&[(0, 18), (40, 50)])),
        ];
        let s = significance(&variants, 3).unwrap();
        assert_eq!(s.prompting, "few-shot");
        assert_eq!(s.comparison.winner(), 1, "clear against the best alone");
        assert_eq!(s.conclusion, format!("no clear difference on {n} examples"));
        assert_eq!(s.test.hardest, "retrieved");
        let sentence = winner_test_sentence(&s).unwrap();
        assert!(
            sentence.contains(
                "\"fine-tuned\" must beat each of the 2 prompting variants at p < 0.05 \
                 (5%, the only one of its side)"
            ),
            "{sentence}"
        );
    }

    #[test]
    fn probabilities_read_to_two_significant_digits() {
        let read: Vec<String> = [0.05, 0.025, 0.05 / 7.0, 0.5, 1.0, 0.031_25, 3e-5]
            .iter()
            .map(|&p| probability(p))
            .collect();
        assert_eq!(
            read,
            ["0.05", "0.025", "0.0071", "0.5", "1", "0.031", "< 0.0001"]
        );
        assert_eq!(p_is(3e-5), "p < 0.0001");
    }
}
