//! The `tokenizer.*` metadata of an exported GGUF, which llama.cpp needs to run
//! the file as a chat model: copied as they are from a GGUF base, or written
//! from an HF folder's tokenizer as llama.cpp's converter writes them (tokens,
//! token types, merges or scores, the pre-tokenizer's name, special ids,
//! add-bos, chat template).

use crate::pretrained::Model;
use crate::source::ModelFiles;
use crate::tokenizer::sentencepiece::{self, BYTE_TYPE};
use crate::tokenizer::{
    pre_tokenizer, CONTROL_TYPE, NORMAL_TYPE, PRE_TOKENIZERS, UNKNOWN_TYPE, UNUSED_TYPE,
    USER_DEFINED_TYPE,
};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use serde_json::Value as Json;

/// The `tokenizer.*` keys for `model`, its vocabulary padded to `vocab_size` rows.
pub fn metadata(model: &Model) -> Result<Vec<(String, Value)>> {
    match &model.source.files {
        ModelFiles::Gguf(path) => {
            let mut file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let content = gguf_file::Content::read(&mut file)
                .with_context(|| format!("reading the metadata of {}", path.display()))?;
            let mut keys: Vec<(String, Value)> = content
                .metadata
                .into_iter()
                .filter(|(k, _)| k.starts_with("tokenizer."))
                .collect();
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(keys)
        }
        ModelFiles::HfDir { .. } => from_hf(model),
    }
}

/// The metadata of an HF folder's tokenizer: a byte-level BPE (llama.cpp's
/// `gpt2` model) or a SentencePiece-style BPE with byte fallback (`llama`).
fn from_hf(model: &Model) -> Result<Vec<(String, Value)>> {
    let tok = &model.tokenizer;
    let spec: Json = serde_json::from_str(
        &tok.inner()
            .to_string(false)
            .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?,
    )?;
    let bpe = &spec["model"];
    let space_prefix = sentencepiece::space_prefix_of(&spec)?;
    if space_prefix.is_none() && (bpe["type"] != "BPE" || spec["decoder"]["type"] != "ByteLevel") {
        bail!(
            "the tokenizer is neither byte-level BPE nor SentencePiece BPE (model {}, decoder {}): \
             tuneforge writes GGUF tokenizers of those kinds only; convert this model with \
             llama.cpp's convert_hf_to_gguf.py",
            bpe["type"],
            spec["decoder"]["type"]
        );
    }
    let vocab_size = model.lm.config.vocab_size.max(tok.vocab_size());
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL_TYPE; vocab_size];
    for (text, id) in tok.inner().get_vocab(false) {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(text);
        }
    }
    for added in spec["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().unwrap_or(u64::MAX) as usize;
        if let (Some(slot), Some(text)) = (tokens.get_mut(id), added["content"].as_str()) {
            *slot = Some(text.to_string());
            types[id] = match added["special"].as_bool() {
                Some(true) => CONTROL_TYPE,
                _ => USER_DEFINED_TYPE,
            };
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = UNUSED_TYPE;
                format!("[PAD{i}]")
            })
        })
        .collect();
    // tokenizers writes merges as "a b" or, lately, as ["a", "b"].
    let merges: Vec<(String, String)> = bpe["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .ok_or_else(|| anyhow!("a BPE merge without a space: {s:?}")),
            Json::Array(pair) if pair.len() == 2 => Ok((
                pair[0].as_str().unwrap_or_default().to_string(),
                pair[1].as_str().unwrap_or_default().to_string(),
            )),
            other => Err(anyhow!(
                "a BPE merge that is neither a string nor a pair: {other}"
            )),
        })
        .collect::<Result<_>>()?;
    let id_of = |text: Option<&str>| text.and_then(|t| tok.token_to_id(t));
    let bos = id_of(tok.bos_token.as_deref());
    let add_bos = match bos {
        Some(b) => tok.encode("a", true)?.first() == Some(&b),
        None => false,
    };
    let mut out = vec![];
    match space_prefix {
        None => {
            let pre = pre_name(&spec["pre_tokenizer"], merges.is_empty())?;
            let merges = merges
                .into_iter()
                .map(|(l, r)| Value::String(format!("{l} {r}")));
            out.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
            out.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
            // llama.cpp wants the key even for a vocabulary of single bytes, which has none.
            out.push((
                "tokenizer.ggml.merges".into(),
                Value::Array(merges.collect()),
            ));
        }
        Some(add_space_prefix) => {
            let unk = id_of(bpe["unk_token"].as_str());
            for (i, t) in tokens.iter().enumerate() {
                if types[i] == NORMAL_TYPE && is_byte_token(t) {
                    types[i] = BYTE_TYPE;
                }
            }
            if let Some(u) = unk {
                types[u as usize] = UNKNOWN_TYPE;
                out.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(u)));
            }
            let scores =
                sentencepiece::scores_from_merges(&tokens, &merges, |i| types[i] != NORMAL_TYPE);
            out.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
            out.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
            out.push((
                "tokenizer.ggml.scores".into(),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ));
            out.push((
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(add_space_prefix),
            ));
        }
    }
    out.extend([
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(tok.pad_id()),
        ),
    ]);
    if let Some(b) = bos {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = id_of(tok.eos_token.as_deref())
        .as_ref()
        .or(tok.eos_ids().first())
    {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = tok.chat_template_source() {
        out.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(out)
}

/// A byte-fallback token: `<0x00>` to `<0xFF>`.
fn is_byte_token(text: &str) -> bool {
    text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && text[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// llama.cpp's name for a `tokenizers` pre-tokenizer: the one whose pre-tokenizer
/// tuneforge builds for that name ([`pre_tokenizer`]). A plain byte-level
/// pre-tokenizer without its regex is llama.cpp's `gpt-2` only where there are
/// no merges, so that every byte is a token whatever the splitting.
fn pre_name(pre: &Json, no_merges: bool) -> Result<&'static str> {
    let same = |a: &Json, b: &Json| {
        let strip = |v: &Json| {
            let mut v = v.clone();
            strip_flags(&mut v);
            v
        };
        strip(a) == strip(b)
    };
    for name in PRE_TOKENIZERS {
        if same(&pre_tokenizer(name)?.0, pre) {
            return Ok(name);
        }
    }
    if no_merges && pre["type"] == "ByteLevel" {
        return Ok("gpt-2");
    }
    bail!(
        "the tokenizer's pre-tokenizer is none that llama.cpp names here ({}): {pre}",
        PRE_TOKENIZERS.join(", ")
    )
}

/// Drops the flags that do not change how text splits (`add_prefix_space` is
/// kept: it does), so that tokenizers' defaults compare equal.
fn strip_flags(v: &mut Json) {
    match v {
        Json::Object(map) => {
            map.remove("trim_offsets");
            map.values_mut().for_each(strip_flags);
        }
        Json::Array(items) => items.iter_mut().for_each(strip_flags),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_pre_tokenizer_is_recognised_and_others_are_refused() {
        for name in PRE_TOKENIZERS {
            assert_eq!(
                pre_name(&pre_tokenizer(name).unwrap().0, false).unwrap(),
                name
            );
        }
        let plain =
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "use_regex": false});
        assert_eq!(pre_name(&plain, true).unwrap(), "gpt-2");
        assert!(pre_name(&plain, false).is_err());
        let other = serde_json::json!({"type": "Metaspace"});
        let err = pre_name(&other, true).unwrap_err().to_string();
        assert!(
            err.contains("Metaspace") && err.contains("llama-bpe"),
            "{err}"
        );
    }
}
