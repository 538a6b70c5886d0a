//! The floor every variant should clear: always giving the training pool's
//! most common answer. On a task with few distinct answers (labels, a fixed
//! JSON object) it can score well above zero, and a variant at or below it
//! has learned no more than how often each answer comes up.

use super::metrics::normalize;
use super::stats::wilson;
use super::HeldOut;
use serde::Serialize;
use std::collections::HashMap;

/// Always the most common training answer, scored on the held-out examples.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MajorityAnswer {
    /// The answer (whitespace normalised): of equally common ones, the first
    /// in training order.
    pub answer: String,
    /// The training examples that give it.
    pub count: usize,
    /// The training examples.
    pub of: usize,
    /// Its exact match on the held-out examples.
    pub exact_match: f64,
    /// The Wilson 95% interval of `exact_match`.
    pub interval: (f64, f64),
}

/// The most common answer in `train` scored on `held_out` (exact match after
/// whitespace normalisation, as the variants are); `None` when no answer
/// comes up twice, where always giving one answer is no baseline.
pub fn majority_answer(train: &[HeldOut], held_out: &[HeldOut]) -> Option<MajorityAnswer> {
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, t) in train.iter().enumerate() {
        counts.entry(normalize(&t.reference)).or_insert((0, i)).0 += 1;
    }
    let (answer, (count, _)) = counts
        .into_iter()
        .max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.1 .1.cmp(&a.1 .1)))?;
    if count < 2 {
        return None;
    }
    let right = held_out
        .iter()
        .filter(|h| normalize(&h.reference) == answer)
        .count();
    Some(MajorityAnswer {
        answer,
        count,
        of: train.len(),
        exact_match: right as f64 / held_out.len().max(1) as f64,
        interval: wilson(right, held_out.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Record;

    fn held(answers: &[&str]) -> Vec<HeldOut> {
        answers
            .iter()
            .map(|a| {
                HeldOut::from_record(&Record::Completion {
                    prompt: "q".into(),
                    completion: a.to_string(),
                })
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn the_most_common_answer_is_scored_and_ties_go_to_the_first() {
        let train = held(&["b", "a", "a ", "b", "c"]);
        let test = held(&["a", "b", "b", "b"]);
        let m = majority_answer(&train, &test).unwrap();
        // "a" and "b" both twice ("a " normalised): "b" comes first.
        assert_eq!((m.answer.as_str(), m.count, m.of), ("b", 2, 5));
        assert_eq!(m.exact_match, 0.75);
        assert_eq!(m.interval, wilson(3, 4));
        // All answers distinct: no baseline.
        assert_eq!(majority_answer(&held(&["x", "y"]), &test), None);
        assert_eq!(majority_answer(&[], &test), None);
    }
}
