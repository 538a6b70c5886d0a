//! SentencePiece BPE (llama.cpp's `llama` tokenizer model: Llama 2, Mistral,
//! Phi-3, Gemma): spaces become `▁`, optionally with one prepended; the pair of
//! symbols whose joined text is the highest-scoring token merges first; a
//! character with no token falls back to its bytes (`<0x41>`).
//!
//! GGUF stores scores, `tokenizers` stores merges. Each is derived from the
//! other as transformers derives a fast tokenizer from a SentencePiece model:
//! every token that splits into two tokens gives a merge, ranked by its score.

use super::gguf::{BpeModel, Pipeline};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::HashMap;

/// SentencePiece's stand-in for a space.
pub const SPACE: &str = "▁";

/// llama.cpp's token type of a byte-fallback token (`<0x41>`).
pub const BYTE_TYPE: i32 = 6;

/// The `tokenizers` pipeline of a SentencePiece BPE vocabulary.
pub(super) fn pipeline(
    tokens: &[String],
    scores: &[f32],
    unk: Option<&str>,
    add_space_prefix: bool,
) -> Result<Pipeline> {
    if scores.len() != tokens.len() {
        bail!(
            "a SentencePiece vocabulary needs one score per token: {} tokens, {} scores",
            tokens.len(),
            scores.len()
        );
    }
    let merges = merges_from_scores(tokens, scores)
        .into_iter()
        .map(|(l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect();
    let mut decoder = vec![
        json!({"type": "Replace", "pattern": {"String": SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoder.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(Pipeline {
        normalizer: normalizer(add_space_prefix),
        pre_tokenizer: Value::Null,
        decoder: json!({"type": "Sequence", "decoders": decoder}),
        model: BpeModel {
            merges,
            unk_token: unk.map(String::from),
            fuse_unk: true,
            byte_fallback: true,
            ignore_merges: false,
        },
    })
}

/// Spaces to `▁`, after prepending one to each stretch of text between
/// special tokens when `add_space_prefix` is set, as llama.cpp does.
fn normalizer(add_space_prefix: bool) -> Value {
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPACE});
    if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace]})
    } else {
        replace
    }
}

/// The merges (pairs of token ids) that reproduce SentencePiece's BPE: one for
/// each way a token splits into two tokens, ranked by the joined token's score,
/// highest first (ties by the parts' ids).
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(usize, usize)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (joined, text) in tokens.iter().enumerate() {
        for (cut, _) in text.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&text[..cut]), ids.get(&text[cut..])) {
                merges.push((joined, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        scores[b.0]
            .total_cmp(&scores[a.0])
            .then((a.1, a.2).cmp(&(b.1, b.2)))
    });
    merges.into_iter().map(|(_, l, r)| (l, r)).collect()
}

/// Scores that rank tokens as `merges` (pairs of texts, by priority) do: a
/// token made by the merge of rank r (from 0) scores -(r + 1), so that llama.cpp merges in
/// the same order. Tokens no merge makes (single characters, bytes, special
/// tokens) score below every merge, or 0 for those in `unscored`.
pub fn scores_from_merges(
    tokens: &[String],
    merges: &[(String, String)],
    unscored: impl Fn(usize) -> bool,
) -> Vec<f32> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let floor = merges.len() as f32 + 1.0;
    let mut scores: Vec<f32> = (0..tokens.len())
        .map(|i| if unscored(i) { 0.0 } else { -floor - i as f32 })
        .collect();
    let mut seen = vec![false; tokens.len()];
    for (rank, (l, r)) in merges.iter().enumerate() {
        if let Some(&id) = ids.get(format!("{l}{r}").as_str()) {
            if !seen[id] {
                seen[id] = true;
                scores[id] = -(rank as f32) - 1.0;
            }
        }
    }
    scores
}

/// Whether a `tokenizers` pipeline (as JSON) is SentencePiece BPE, and if so
/// whether it prepends a space: `Ok(None)` when it is another kind, an error
/// when it is SentencePiece-like but splits text in a way llama.cpp cannot.
pub fn space_prefix_of(spec: &Value) -> Result<Option<bool>> {
    let model = &spec["model"];
    if model["type"] != "BPE" || model["byte_fallback"] != true {
        return Ok(None);
    }
    let (normalizer, pre) = (&spec["normalizer"], &spec["pre_tokenizer"]);
    if pre.is_null() {
        for prefix in [true, false] {
            if *normalizer == self::normalizer(prefix) {
                return Ok(Some(prefix));
            }
        }
    } else if normalizer.is_null()
        && pre["type"] == "Metaspace"
        && pre["split"] == false
        && pre["replacement"] == SPACE
    {
        return Ok(Some(pre["prepend_scheme"] != "never"));
    }
    bail!(
        "the tokenizer is a byte-fallback BPE, but its text splitting (normalizer {normalizer}, \
         pre-tokenizer {pre}) is not SentencePiece's, which llama.cpp's 'llama' tokenizer applies"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merges_follow_scores_and_scores_follow_merges() {
        let tokens = strings(&["<unk>", "a", "b", "c", "ab", "bc", "abc"]);
        let scores = [0.0, -10.0, -11.0, -12.0, -2.0, -1.0, -3.0];
        let merges = merges_from_scores(&tokens, &scores);
        let text = |(l, r): (usize, usize)| (tokens[l].clone(), tokens[r].clone());
        let named: Vec<_> = merges.iter().map(|&m| text(m)).collect();
        let pair = |l: &str, r: &str| (l.to_string(), r.to_string());
        // bc (-1) before ab (-2) before abc (-3), whose two splits keep id order.
        assert_eq!(
            named,
            vec![
                pair("b", "c"),
                pair("a", "b"),
                pair("a", "bc"),
                pair("ab", "c")
            ]
        );
        let back = scores_from_merges(&tokens, &named, |i| i == 0);
        assert_eq!(back[0], 0.0);
        assert_eq!(&back[4..], &[-2.0, -1.0, -3.0]);
        // Characters score below every merge, in id order.
        assert!(back[1] < -4.0 && back[2] < back[1]);
        assert_eq!(merges_from_scores(&tokens, &back), merges);
    }

    #[test]
    fn space_prefix_is_read_from_either_form() {
        let spec = |normalizer: Value, pre: Value| json!({"model": {"type": "BPE", "byte_fallback": true}, "normalizer": normalizer, "pre_tokenizer": pre});
        assert_eq!(
            space_prefix_of(&spec(normalizer(true), Value::Null)).unwrap(),
            Some(true)
        );
        assert_eq!(
            space_prefix_of(&spec(normalizer(false), Value::Null)).unwrap(),
            Some(false)
        );
        let meta = |scheme: &str, split: bool| json!({"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme, "split": split});
        assert_eq!(
            space_prefix_of(&spec(Value::Null, meta("first", false))).unwrap(),
            Some(true)
        );
        assert_eq!(
            space_prefix_of(&spec(Value::Null, meta("never", false))).unwrap(),
            Some(false)
        );
        let err = space_prefix_of(&spec(Value::Null, meta("always", true)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Metaspace"), "{err}");
        let byte_level = json!({"model": {"type": "BPE", "byte_fallback": false}});
        assert_eq!(space_prefix_of(&byte_level).unwrap(), None);
    }
}
