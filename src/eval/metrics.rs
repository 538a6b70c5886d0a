//! Scoring an answer against its reference: exact match after whitespace
//! normalisation, token-level F1, and for JSON targets, validity and the share
//! of fields that are right.

use serde_json::Value;
use std::collections::HashMap;

/// Collapses runs of whitespace and trims.
pub fn normalize(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Exact match after whitespace normalisation.
pub fn exact_match(answer: &str, reference: &str) -> bool {
    normalize(answer) == normalize(reference)
}

/// SQuAD-style token F1 over lower-cased whitespace tokens (1 when both are empty).
pub fn token_f1(answer: &str, reference: &str) -> f64 {
    let tokens = |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_lowercase).collect() };
    let (a, r) = (tokens(answer), tokens(reference));
    if a.is_empty() || r.is_empty() {
        return if a.is_empty() && r.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &r {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0;
    for t in &a {
        if let Some(c) = counts.get_mut(t.as_str()).filter(|c| **c > 0) {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (p, rec) = (
        common as f64 / a.len() as f64,
        common as f64 / r.len() as f64,
    );
    2.0 * p * rec / (p + rec)
}

/// How an answer scores against a JSON-object reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JsonScore {
    /// The answer parses as JSON.
    pub valid: bool,
    /// The share of the reference's fields the answer gets right.
    pub fields_right: f64,
}

/// Scores `answer` against `reference` when the reference is a JSON object;
/// `None` otherwise.
pub fn json_score(answer: &str, reference: &str) -> Option<JsonScore> {
    let Ok(Value::Object(want)) = serde_json::from_str::<Value>(reference.trim()) else {
        return None;
    };
    let got = serde_json::from_str::<Value>(answer.trim()).ok();
    let right = match &got {
        Some(Value::Object(got)) => want.iter().filter(|(k, v)| got.get(*k) == Some(v)).count(),
        _ => 0,
    };
    Some(JsonScore {
        valid: got.is_some(),
        fields_right: if want.is_empty() {
            1.0
        } else {
            right as f64 / want.len() as f64
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores() {
        assert!(exact_match(" a\n b ", "a b"));
        assert!(!exact_match("a b.", "a b"));
        assert_eq!(token_f1("the cat sat", "the cat sat"), 1.0);
        assert!((token_f1("the cat", "the cat sat") - 0.8).abs() < 1e-12);
        assert_eq!(token_f1("dog", "cat"), 0.0);
        let r = r#"{"category": "billing", "priority": "high"}"#;
        assert_eq!(
            json_score(r#"{"priority":"high","category":"billing"}"#, r),
            Some(JsonScore {
                valid: true,
                fields_right: 1.0
            })
        );
        assert_eq!(
            json_score(r#"{"category": "bug", "priority": "high"}"#, r),
            Some(JsonScore {
                valid: true,
                fields_right: 0.5
            })
        );
        assert_eq!(
            json_score("billing, high", r),
            Some(JsonScore {
                valid: false,
                fields_right: 0.0
            })
        );
        assert_eq!(json_score("x", "plain text"), None);
    }
}
