//! Byte-level BPE (GPT-2's scheme; llama.cpp's `gpt2` tokenizer model): every
//! byte has a printable stand-in character, a regex splits text into words and
//! merges join symbols within a word. SmolLM, Llama 3, Qwen and Phi-4 use it;
//! `tokenizer.ggml.pre` names the splitting regex.

use super::gguf::{BpeModel, Pipeline};
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// GPT-2's split regex, as used by byte-level BPEs with `use_regex`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// o200k's regex (GPT-4o, Phi-4-mini): case-aware words with their contractions.
const GPT4O_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizers of the byte-level BPE tokenizers llama.cpp names, by
/// its `tokenizer.ggml.pre` names.
pub const PRE_TOKENIZERS: [&str; 5] = ["smollm", "llama-bpe", "qwen2", "gpt-4o", "gpt-2"];

/// GPT-2's printable stand-ins for the 256 byte values, in byte order.
pub fn gpt2_byte_chars() -> Vec<String> {
    let mut n = 0;
    (0u32..256)
        .map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                b
            } else {
                n += 1;
                255 + n
            };
            char::from_u32(c).expect("valid code point").to_string()
        })
        .collect()
}

/// The `tokenizers` pre-tokenizer of llama.cpp's pre-tokenizer `pre`, and
/// whether its BPE ignores merges (Llama 3's does).
pub fn pre_tokenizer(pre: &str) -> Result<(Value, bool)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false)]})
    };
    Ok(match pre {
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" => (split(LLAMA3_REGEX), true),
        "qwen2" => (split(QWEN2_REGEX), false),
        "gpt-4o" => (split(GPT4O_REGEX), false),
        "gpt-2" | "gpt2" | "default" => (byte_level(true), false),
        other => bail!(
            "GGUF pre-tokenizer '{other}' is not supported (known: {}). \
             Use the model's HF-layout folder instead.",
            PRE_TOKENIZERS.join(", ")
        ),
    })
}

/// The `tokenizers` pipeline of a byte-level BPE with these merges (`"a b"`,
/// by priority) and llama.cpp's pre-tokenizer `pre`.
pub(super) fn pipeline(merges: &[String], pre: &str) -> Result<Pipeline> {
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre)?;
    // Each merge is two tokens separated by one space, as `tokenizers` reads them.
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
            [left, right] => Ok((left.to_string(), right.to_string())),
            _ => bail!("merge {i} ('{m}') is not two tokens separated by a space"),
        })
        .collect::<Result<_>>()?;
    Ok(Pipeline {
        normalizer: Value::Null,
        pre_tokenizer,
        decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        model: BpeModel {
            merges,
            unk_token: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{PreTokenizedString, PreTokenizer, PreTokenizerWrapper};

    /// The words `pre` splits `text` into (in GPT-2's byte alphabet).
    fn words(pre: &str, text: &str) -> Vec<String> {
        let splitter: PreTokenizerWrapper =
            serde_json::from_value(pre_tokenizer(pre).unwrap().0).unwrap();
        let mut s = PreTokenizedString::from(text);
        splitter.pre_tokenize(&mut s).unwrap();
        s.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(w, _, _)| w.replace('Ġ', " "))
        .collect()
    }

    #[test]
    fn each_named_regex_splits_as_its_model_does() {
        // o200k (gpt-4o) splits at case changes and keeps contractions with their word.
        assert_eq!(
            words("gpt-4o", "HelloWorld's 12345"),
            ["Hello", "World's", " ", "123", "45"]
        );
        // Llama 3 keeps words whole, and contractions apart.
        assert_eq!(
            words("llama-bpe", "HelloWorld's 12345"),
            ["HelloWorld", "'s", " ", "123", "45"]
        );
        // Qwen2 splits every digit.
        assert_eq!(words("qwen2", "a 123"), ["a", " ", "1", "2", "3"]);
    }

    /// A merge that is not two tokens separated by one space is refused,
    /// naming its index.
    #[test]
    fn malformed_merges_are_refused_by_index() {
        let merges = ["a b", "ab c d"].map(String::from);
        let err = pipeline(&merges, "gpt-2")
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("merge 1 ('ab c d')"), "{err}");
        assert!(pipeline(&merges[..1], "gpt-2").is_ok());
    }
}
