//! Held-out questions the training pool already holds. Word for word (every
//! turn of the prompt, whitespace normalised), a fine-tune may recall the
//! answer. Nearly (a training question with most of the same words in the
//! same order: a template filled the same way, a greeting changed), it may
//! have learned that one question rather than the task. Either way the
//! held-out score flatters whatever saw the pool, so the report scores the
//! questions without a near-duplicate apart.
//!
//! Nearness is word-level ROUGE-L F1, `2 · LCS / (|a| + |b|)` over the
//! lowercased words (the longest common subsequence from the `similar`
//! crate's diff); Self-Instruct drops a generated instruction as a
//! near-duplicate of another at ROUGE-L above 0.7. Each held-out question is
//! measured against the [`CANDIDATES`] training questions BM25 ranks closest
//! ([`Retriever`]), which holds the cost to a few milliseconds per question
//! on a large pool.

use super::comparison::VariantReport;
use super::retrieve::Retriever;
use super::HeldOut;
use serde::Serialize;

/// The default threshold: Self-Instruct's ROUGE-L for a near-duplicate.
pub const DEFAULT_THRESHOLD: f64 = 0.7;

/// Training questions, closest by BM25 first, that each held-out question
/// is measured against.
pub const CANDIDATES: usize = 50;

/// The indices of the `held_out` examples whose prompt (every turn before
/// the answer, whitespace normalised) is also a prompt in `train`.
pub fn seen_in(held_out: &[HeldOut], train: &[HeldOut]) -> Vec<usize> {
    let key = |h: &HeldOut| -> Vec<(String, String)> {
        h.prompt
            .iter()
            .map(|m| (m.role.clone(), super::normalize(&m.content)))
            .collect()
    };
    let pool: std::collections::HashSet<_> = train.iter().map(key).collect();
    (0..held_out.len())
        .filter(|&i| pool.contains(&key(&held_out[i])))
        .collect()
}

/// A held-out question with a training question nearly the same.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NearDuplicate {
    /// The held-out example: its index among the comparison's examples.
    pub example: usize,
    /// The held-out example's `file:line`.
    pub held_out: String,
    /// The closest training example's `file:line`.
    pub training: String,
    /// The two questions' word-level ROUGE-L F1.
    pub similarity: f64,
}

/// The lowercased words of `text` (runs of letters and digits).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Word-level ROUGE-L F1 of two texts: twice their longest common
/// subsequence of words over their total number of words (1: the same
/// words in the same order; 0: none in common, or no words).
pub fn similarity(a: &str, b: &str) -> f64 {
    rouge_l(&words(a), &words(b))
}

fn rouge_l(a: &[String], b: &[String]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let ops = similar::capture_diff_slices(similar::Algorithm::Myers, a, b);
    similar::diff_ratio(&ops, a.len(), b.len()) as f64
}

/// The held-out questions whose closest question in the retriever's pool
/// (of the [`CANDIDATES`] BM25 ranks closest) reaches `threshold`, in
/// held-out order.
pub fn near_duplicates(
    held_out: &[HeldOut],
    retriever: &Retriever,
    threshold: f64,
) -> Vec<NearDuplicate> {
    let train = retriever.pool();
    if train.is_empty() {
        return Vec::new();
    }
    let train_words: Vec<Vec<String>> = train.iter().map(|t| words(t.question())).collect();
    held_out
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let question = words(h.question());
            let (closest, score) = retriever
                .nearest(h.question(), CANDIDATES)
                .into_iter()
                .map(|j| (j, rouge_l(&question, &train_words[j])))
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))?;
            (score >= threshold).then(|| NearDuplicate {
                example: i,
                held_out: h.origin.clone(),
                training: train[closest].origin.clone(),
                similarity: score,
            })
        })
        .collect()
}

/// Whether `variant` got each question right, of the near-duplicates
/// (`near_ones`) or of the others, in held-out order.
pub fn correct_where(
    variant: &VariantReport,
    near: &[NearDuplicate],
    near_ones: bool,
) -> Vec<bool> {
    variant
        .outputs
        .iter()
        .enumerate()
        .filter(|(i, _)| near.iter().any(|n| n.example == *i) == near_ones)
        .map(|(_, o)| o.correct)
        .collect()
}

/// The share of `right` that is true (`None` when empty).
pub fn share(right: &[bool]) -> Option<f64> {
    (!right.is_empty()).then(|| right.iter().filter(|&&c| c).count() as f64 / right.len() as f64)
}

/// A variant's exact match on the near-duplicates and on the other
/// questions (`None` where there are none).
pub fn split_exact_match(
    variant: &VariantReport,
    near: &[NearDuplicate],
) -> (Option<f64>, Option<f64>) {
    (
        share(&correct_where(variant, near, true)),
        share(&correct_where(variant, near, false)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use crate::data::Record;

    fn held(question: &str, origin: &str) -> HeldOut {
        let mut h = HeldOut::from_record(&Record::Completion {
            prompt: question.into(),
            completion: "x".into(),
        })
        .unwrap();
        h.origin = origin.into();
        h
    }

    /// A held-out prompt counts as seen when every turn before the answer
    /// matches a training prompt's, up to whitespace; the answers do not matter.
    #[test]
    fn held_out_questions_seen_in_training_are_found() {
        let turns = |turns: &[(&str, &str)], answer: &str| HeldOut {
            prompt: turns.iter().map(|&(r, c)| Message::new(r, c)).collect(),
            reference: answer.into(),
            origin: String::new(),
        };
        let train = [
            turns(&[("user", "Where is  my order?")], "shipping"),
            turns(&[("system", "Be brief."), ("user", "Refund me")], "billing"),
        ];
        let held_out = [
            turns(&[("user", "Where is my order? ")], "something else"),
            turns(&[("user", "Refund me")], "billing"),
            turns(
                &[("system", "Be brief."), ("user", "Refund\nme")],
                "billing",
            ),
            turns(&[("assistant", "Where is my order?")], "shipping"),
        ];
        assert_eq!(seen_in(&held_out, &train), vec![0, 2]);
        assert!(seen_in(&held_out, &[]).is_empty());
    }

    #[test]
    fn rouge_l_counts_words_in_order() {
        assert_eq!(similarity("The cat sat.", "the CAT sat"), 1.0);
        // LCS "a c" (2 words) of 3 + 3: 4/6.
        assert!((similarity("a b c", "a c d") - 4.0 / 6.0).abs() < 1e-6);
        // Order matters: the LCS of "a b" and "b a" is one word.
        assert!((similarity("a b", "b a") - 0.5).abs() < 1e-6);
        assert_eq!(similarity("", "anything"), 0.0);
        assert_eq!(similarity("x y", "z"), 0.0);
    }

    #[test]
    fn a_changed_greeting_is_a_near_duplicate_and_a_new_question_is_not() {
        let train = [
            held(
                "Why was my card billed again after I cancelled? Thanks!",
                "train.jsonl:1",
            ),
            held("The app crashes when I open settings.", "train.jsonl:2"),
            held("Please add a dark mode to the app.", "train.jsonl:3"),
        ];
        let test = [
            held(
                "My parcel never came and support ignores me.",
                "test.jsonl:1",
            ),
            held(
                "Hello team, why was my card billed again after I cancelled?",
                "test.jsonl:2",
            ),
            held("Please add a dark mode to the app.", "test.jsonl:3"),
        ];
        let found = near_duplicates(&test, &Retriever::new(&train), DEFAULT_THRESHOLD);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(
            (
                found[0].example,
                found[0].held_out.as_str(),
                found[0].training.as_str()
            ),
            (1, "test.jsonl:2", "train.jsonl:1")
        );
        // 9 words in common, of 11 and 10.
        assert!(
            (found[0].similarity - 18.0 / 21.0).abs() < 1e-6,
            "{found:?}"
        );
        assert_eq!((found[1].example, found[1].similarity), (2, 1.0));
        assert_eq!(seen_in(&test, &train), vec![2]);
        // A threshold of 1 keeps only the same words in the same order.
        assert_eq!(
            near_duplicates(&test, &Retriever::new(&train), 1.0).len(),
            1
        );
        assert!(near_duplicates(&test, &Retriever::new(&[]), DEFAULT_THRESHOLD).is_empty());
    }
}
