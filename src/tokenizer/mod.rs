//! Tokenizers, exactly as the model's authors built them: from `tokenizer.json`
//! (+ `tokenizer_config.json`), or rebuilt from GGUF metadata as llama.cpp
//! runs them: a byte-level BPE with the pre-tokenizer that `tokenizer.ggml.pre`
//! names ([`byte_level`]) or a SentencePiece BPE ([`sentencepiece`]).

pub mod byte_level;
mod bytes;
pub mod sentencepiece;

pub use byte_level::{gpt2_byte_chars, pre_tokenizer, PRE_TOKENIZERS};

use crate::chat::{ChatTemplate, Message};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde_json::{json, Value};
use std::path::Path;

/// The ChatML template (SmolLM2 and Qwen2 style), without a default system turn.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

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
struct Pipeline {
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    model: BpeModel,
}

/// A BPE model's merges and switches; its vocabulary is the tokens by id.
/// Built directly rather than through `tokenizers`' JSON, whose text and
/// values for 50,000 tokens would leave the heap fragmented around the
/// tables kept (about 4 MB more resident for SmolLM2's vocabulary).
struct BpeModel {
    merges: Vec<(String, String)>,
    unk_token: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
}

impl BpeModel {
    /// The `tokenizers` BPE model of `tokens` (by id) with these merges.
    fn build(self, tokens: &[String]) -> Result<tokenizers::models::bpe::BPE> {
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

/// A tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<ChatTemplate>,
    /// The beginning-of-sequence token text, if the model has one.
    pub bos_token: Option<String>,
    /// The end-of-sequence token text.
    pub eos_token: Option<String>,
    eos_ids: Vec<u32>,
    pad_id: u32,
}

/// A tokenized text with each token's byte span in it.
#[derive(Debug, Clone)]
pub struct Encoding {
    /// Token ids.
    pub ids: Vec<u32>,
    /// `(start, end)` byte offsets of each token in the text.
    pub offsets: Vec<(usize, usize)>,
}

fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, with the chat template and special tokens from
    /// `tokenizer_config.json` (or a `chat_template.jinja` beside it) when present.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        eos_ids: &[u32],
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow!("loading tokenizer {}: {e}", tokenizer_json.display()))?;
        let config: Value = match tokenizer_config {
            Some(p) => serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
            None => Value::Null,
        };
        let bos_token = config.get("bos_token").and_then(token_text);
        let eos_token = config.get("eos_token").and_then(token_text);
        let mut template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        if template.is_none() {
            let jinja = crate::atomic::parent_dir(tokenizer_json).join("chat_template.jinja");
            if jinja.is_file() {
                template = Some(
                    std::fs::read_to_string(&jinja)
                        .with_context(|| format!("reading {}", jinja.display()))?,
                );
            }
        }
        Self::assemble(inner, template, bos_token, eos_token, eos_ids)
    }

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

    fn assemble(
        inner: tokenizers::Tokenizer,
        template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        config_eos: &[u32],
    ) -> Result<Self> {
        let chat = template
            .map(|t| {
                ChatTemplate::new(
                    &t,
                    bos_token.as_deref().unwrap_or(""),
                    eos_token.as_deref().unwrap_or(""),
                )
            })
            .transpose()?;
        let mut eos_ids: Vec<u32> = config_eos.to_vec();
        // Chat models end a turn with an end-of-turn token; generation stops there too.
        for t in [
            eos_token.as_deref(),
            Some("<|im_end|>"),
            Some("<|eot_id|>"),
            Some("<|endoftext|>"),
            Some("<end_of_turn>"),
            Some("<|end|>"),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(id) = inner.token_to_id(t) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let pad_id = eos_ids.first().copied().unwrap_or(0);
        Ok(Self {
            inner,
            chat,
            bos_token,
            eos_token,
            eos_ids,
            pad_id,
        })
    }

    /// Token ids of `text`. `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.ids)
    }

    /// Token ids of `text` with each token's byte span.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<Encoding> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(Encoding {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// The text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Tokens that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The token used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat
            .as_ref()
            .context("this model has no chat template")?
            .render(messages, add_generation_prompt)
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat.as_ref().map(ChatTemplate::source)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` holding the chat template
    /// and special tokens, for a merged HF-layout model.
    pub fn save_hf(&self, dir: &Path, chat_template: Option<&str>) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
        crate::atomic::write(&dir.join("tokenizer.json"), json.as_bytes())?;
        let config = json!({
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "chat_template": chat_template, "tokenizer_class": "PreTrainedTokenizerFast",
        });
        crate::atomic::write(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
