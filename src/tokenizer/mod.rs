//! Tokenizers, exactly as the model's authors built them: from `tokenizer.json`
//! (+ `tokenizer_config.json`), or rebuilt from GGUF metadata as llama.cpp
//! runs them (`gguf.rs`, [`GgufVocab`]): a byte-level BPE with the pre-tokenizer that `tokenizer.ggml.pre`
//! names ([`byte_level`]) or a SentencePiece BPE ([`sentencepiece`]).

pub mod byte_level;
mod bytes;
mod gguf;
pub mod sentencepiece;

pub use byte_level::{gpt2_byte_chars, pre_tokenizer, PRE_TOKENIZERS};
pub use gguf::{
    GgufVocab, VocabKind, CONTROL_TYPE, NORMAL_TYPE, UNKNOWN_TYPE, UNUSED_TYPE, USER_DEFINED_TYPE,
};

use crate::chat::{ChatTemplate, Message};
use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The ChatML template (SmolLM2 and Qwen2 style), without a default system turn.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

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
