//! A tokenizer rebuilt from its vocabulary as GGUF metadata holds it
//! (`tokenizer.ggml.*`), as llama.cpp runs it: the token types, the
//! vocabulary, and the `tokenizers` pipeline assembled from them, its stages
//! made by [`super::byte_level`] or [`super::sentencepiece`].

use super::{byte_level, gpt2_byte_chars, sentencepiece, Tokenizer, CHATML};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub const NORMAL_TYPE: i32 = 1;
/// An unknown-token placeholder (`<unk>`).
pub const UNKNOWN_TYPE: i32 = 2;
/// A control token (`<s>`, `<|im_end|>`), special in text and skipped on decode.
pub const CONTROL_TYPE: i32 = 3;
/// A user-defined token, matched whole in text.
pub const USER_DEFINED_TYPE: i32 = 4;
/// A row with no token (vocabulary padding).
pub const UNUSED_TYPE: i32 = 5;

/// A tokenizer's vocabulary as GGUF metadata holds it (`tokenizer.ggml.*`).
#[derive(Debug, Clone)]
pub struct GgufVocab<'a> {
    /// Token texts, by id.
    pub tokens: &'a [String],
    /// llama.cpp's token types by id ([`NORMAL_TYPE`], [`CONTROL_TYPE`], ...).
    pub types: &'a [i32],
    /// How text becomes tokens.
    pub kind: VocabKind<'a>,
    /// The BOS token id.
    pub bos_id: Option<u32>,
    /// The EOS token id.
    pub eos_id: Option<u32>,
    /// The unknown token id.
    pub unk_id: Option<u32>,
    /// Whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    /// The Jinja chat template.
    pub chat_template: Option<String>,
}

/// The tokenizer models llama.cpp runs.
#[derive(Debug, Clone)]
pub enum VocabKind<'a> {
    /// Byte-level BPE (`gpt2`): merges `"a b"` by priority, and the name of the
    /// regex that splits words (`tokenizer.ggml.pre`).
    ByteLevel {
        /// Merges, `"a b"`, by priority.
        merges: &'a [String],
        /// The pre-tokenizer name.
        pre: &'a str,
    },
    /// SentencePiece BPE (`llama`): scores rank the merges.
    SentencePiece {
        /// One score per token; the highest-scoring pair merges first.
        scores: &'a [f32],
        /// Whether a space is prepended to text (after each special token too).
        add_space_prefix: bool,
    },
}

/// The stages of a `tokenizers` pipeline that differ between tokenizer models
/// (`tokenizers`' JSON for the small ones, `Null` for none).
pub(super) struct Pipeline {
    pub(super) normalizer: Value,
    pub(super) pre_tokenizer: Value,
    pub(super) decoder: Value,
    pub(super) model: BpeModel,
}

/// A BPE model's merges and switches; its vocabulary is the tokens by id.
/// Built directly rather than through `tokenizers`' JSON, whose text and
/// values for 50,000 tokens would leave the heap fragmented around the
/// tables kept (about 4 MB more resident for SmolLM2's vocabulary).
pub(super) struct BpeModel {
    pub(super) merges: Vec<(String, String)>,
    pub(super) unk_token: Option<String>,
    pub(super) fuse_unk: bool,
    pub(super) byte_fallback: bool,
    pub(super) ignore_merges: bool,
}

impl BpeModel {
    /// The `tokenizers` BPE model of `tokens` (by id) with these merges.
    pub(super) fn build(self, tokens: &[String]) -> Result<tokenizers::models::bpe::BPE> {
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut builder = tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(vocab, self.merges)
            .fuse_unk(self.fuse_unk)
            .byte_fallback(self.byte_fallback)
            .ignore_merges(self.ignore_merges);
        if let Some(unk) = self.unk_token {
            builder = builder.unk_token(unk);
        }
        builder
            .build()
            .map_err(|e| anyhow!("building the BPE model from its vocabulary: {e}"))
    }
}

/// A pipeline stage from `tokenizers`' JSON for it; `Null` is none.
fn stage<T: serde::de::DeserializeOwned>(json: Value, what: &str) -> Result<Option<T>> {
    match json {
        Value::Null => Ok(None),
        json => serde_json::from_value(json)
            .map(Some)
            .with_context(|| format!("building the tokenizer's {what}")),
    }
}

impl Tokenizer {
    /// Rebuilds the tokenizer from a GGUF file's `tokenizer.*` metadata:
    /// byte-level BPE (`gpt2`) or SentencePiece BPE (`llama`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |k: &str| {
            md.get(k)
                .with_context(|| format!("GGUF metadata has no {k}"))
        };
        let strings = |k: &str| -> Result<Vec<String>> {
            Ok(get(k)?
                .to_vec()?
                .iter()
                .map(|v| v.to_string().cloned())
                .collect::<candle_core::Result<_>>()?)
        };
        let model = get("tokenizer.ggml.model")?.to_string()?.clone();
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32())
                .collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
        // A vocabulary of single bytes has no merges, and llama.cpp writes no key then.
        let merges = match md.get("tokenizer.ggml.merges") {
            Some(_) => strings("tokenizer.ggml.merges")?,
            None => Vec::new(),
        };
        let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|s| s.to_f32())
                .collect::<candle_core::Result<_>>()?,
            None => Vec::new(),
        };
        let kind = match model.as_str() {
            "gpt2" => VocabKind::ByteLevel {
                merges: &merges,
                pre: md
                    .get("tokenizer.ggml.pre")
                    .and_then(|v| v.to_string().ok())
                    .map(String::as_str)
                    .unwrap_or("default"),
            },
            // llama.cpp prepends a space unless the file says otherwise (Gemma's does).
            "llama" => VocabKind::SentencePiece {
                scores: &scores,
                add_space_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            },
            other => bail!(
                "GGUF tokenizer type '{other}' is not supported: tuneforge rebuilds byte-level BPE \
                 ('gpt2') and SentencePiece BPE ('llama') tokenizers. Use the model's HF-layout \
                 folder (with tokenizer.json) instead."
            ),
        };
        let token_id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        Self::from_vocab(GgufVocab {
            tokens: &tokens,
            types: &types,
            kind,
            bos_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_id: token_id("tokenizer.ggml.eos_token_id"),
            unk_id: token_id("tokenizer.ggml.unknown_token_id"),
            add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(model == "llama"),
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
        })
    }

    /// Builds a tokenizer from its vocabulary, as GGUF stores it.
    pub fn from_vocab(v: GgufVocab<'_>) -> Result<Self> {
        let tokens = v.tokens;
        let name_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let pipeline = match v.kind {
            VocabKind::ByteLevel { merges, pre } => byte_level::pipeline(merges, pre)?,
            VocabKind::SentencePiece {
                scores,
                add_space_prefix,
            } => sentencepiece::pipeline(
                tokens,
                scores,
                name_of(v.unk_id).as_deref(),
                add_space_prefix,
            )?,
        };
        let post_processor = match (v.add_bos, name_of(v.bos_id)) {
            (true, Some(bos)) => json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [v.bos_id], "tokens": [bos]}}}),
            _ => Value::Null,
        };
        let mut inner = tokenizers::Tokenizer::new(pipeline.model.build(tokens)?);
        inner
            .with_normalizer(stage::<tokenizers::NormalizerWrapper>(
                pipeline.normalizer,
                "normalizer",
            )?)
            .map_err(|e| anyhow!("setting the tokenizer's normalizer: {e}"))?;
        inner
            .with_pre_tokenizer(stage::<tokenizers::PreTokenizerWrapper>(
                pipeline.pre_tokenizer,
                "pre-tokenizer",
            )?)
            .with_decoder(stage::<tokenizers::DecoderWrapper>(
                pipeline.decoder,
                "decoder",
            )?)
            .with_post_processor(stage::<tokenizers::PostProcessorWrapper>(
                post_processor,
                "post-processor",
            )?);
        // Unknown, control and user-defined tokens are matched whole in text.
        let added = tokens
            .iter()
            .zip(v.types)
            .filter(|(_, &ty)| matches!(ty, UNKNOWN_TYPE | CONTROL_TYPE | USER_DEFINED_TYPE))
            .map(|(t, &ty)| {
                tokenizers::AddedToken::from(t.clone(), ty != USER_DEFINED_TYPE)
                    .single_word(false)
                    .lstrip(false)
                    .rstrip(false)
                    .normalized(false)
            });
        inner
            .add_tokens(added)
            .map_err(|e| anyhow!("adding the special tokens: {e}"))?;
        let eos_ids: Vec<u32> = v.eos_id.into_iter().collect();
        Self::assemble(
            inner,
            v.chat_template,
            name_of(v.bos_id),
            name_of(v.eos_id),
            &eos_ids,
        )
    }

    /// A tokenizer with one token per byte plus ChatML's special tokens
    /// (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`: ids 0, 1, 2) and a ChatML
    /// template: 259 tokens, for tiny test models.
    pub fn byte_level_chatml() -> Result<Self> {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .map(String::from)
            .to_vec();
        tokens.extend(gpt2_byte_chars());
        let mut types = vec![3; 3];
        types.extend(std::iter::repeat_n(1, 256));
        Self::from_vocab(GgufVocab {
            tokens: &tokens,
            types: &types,
            kind: VocabKind::ByteLevel {
                merges: &[],
                pre: "gpt-2",
            },
            bos_id: None,
            eos_id: Some(2),
            unk_id: None,
            add_bos: false,
            chat_template: Some(CHATML.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use gguf_file::Value as V;

    fn tiny_gguf(pre: &str, add_bos: bool) -> gguf_file::Content {
        let mut tokens = vec!["<s>".to_string(), "</s>".to_string()];
        tokens.extend(gpt2_byte_chars());
        tokens.push("12".to_string());
        let mut types = vec![3i32, 3];
        types.extend(std::iter::repeat_n(1, tokens.len() - 2));
        let strings = |v: &[String]| V::Array(v.iter().map(|s| V::String(s.clone())).collect());
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("tokenizer.ggml.model".into(), V::String("gpt2".into()));
        metadata.insert("tokenizer.ggml.pre".into(), V::String(pre.into()));
        metadata.insert("tokenizer.ggml.tokens".into(), strings(&tokens));
        metadata.insert(
            "tokenizer.ggml.token_type".into(),
            V::Array(types.into_iter().map(V::I32).collect()),
        );
        metadata.insert(
            "tokenizer.ggml.merges".into(),
            strings(&["1 2".to_string()]),
        );
        metadata.insert("tokenizer.ggml.bos_token_id".into(), V::U32(0));
        metadata.insert("tokenizer.ggml.eos_token_id".into(), V::U32(1));
        metadata.insert("tokenizer.ggml.add_bos_token".into(), V::Bool(add_bos));
        metadata.insert(
            "tokenizer.chat_template".into(),
            V::String(
                "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
                    .into(),
            ),
        );
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    fn pieces(t: &Tokenizer, text: &str) -> Vec<String> {
        let ids = t.encode(text, false).unwrap();
        ids.iter()
            .map(|&i| t.inner().id_to_token(i).unwrap())
            .collect()
    }

    #[test]
    fn pre_tokenizers_split_digits_as_their_models_do() {
        let id_12 = 2 + 256;
        // llama3 keeps up to three digits together, so the "12" merge applies.
        let llama3 = Tokenizer::from_gguf(&tiny_gguf("llama-bpe", true)).unwrap();
        assert_eq!(pieces(&llama3, "12"), vec!["12"]);
        // qwen2 and smollm split every digit, so it cannot.
        for pre in ["qwen2", "smollm"] {
            let t = Tokenizer::from_gguf(&tiny_gguf(pre, false)).unwrap();
            assert_eq!(pieces(&t, "12"), vec!["1", "2"], "{pre}");
            assert!(!t.encode("12", true).unwrap().contains(&(id_12 as u32)));
        }
    }

    #[test]
    fn bos_special_tokens_and_template_come_from_metadata() {
        let t = Tokenizer::from_gguf(&tiny_gguf("llama-bpe", true)).unwrap();
        assert_eq!(
            t.encode("a", true).unwrap()[0],
            0,
            "add_bos_token prepends BOS"
        );
        assert_eq!(t.encode("a", false).unwrap().len(), 1);
        // Special tokens in text are matched whole and skipped on decode.
        assert_eq!(t.encode("a</s>", false).unwrap().last(), Some(&1));
        assert_eq!(
            t.decode(&t.encode("a</s>", false).unwrap(), true).unwrap(),
            "a"
        );
        assert_eq!(t.eos_ids(), &[1]);
        assert_eq!(
            t.apply_chat_template(&[Message::user("hi")], false)
                .unwrap(),
            "<s>hi</s>"
        );
        let none = Tokenizer::from_gguf(&tiny_gguf("smollm", false)).unwrap();
        assert_ne!(none.encode("a", true).unwrap()[0], 0);
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused() {
        let err = Tokenizer::from_gguf(&tiny_gguf("mystery", false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mystery") && err.contains("qwen2"), "{err}");
    }
}
