//! The `tokenizer.*` metadata of an exported GGUF, which llama.cpp needs to run
//! the file as a chat model: copied as they are from a GGUF base, or written
//! from an HF folder's tokenizer as llama.cpp's converter writes them (tokens,
//! token types, merges, the pre-tokenizer's name, special ids, add-bos, chat template).

use crate::pretrained::Model;
use crate::source::ModelFiles;
use crate::tokenizer::{pre_tokenizer, PRE_TOKENIZERS};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use serde_json::Value as Json;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

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

/// The metadata of an HF folder's byte-level BPE tokenizer.
fn from_hf(model: &Model) -> Result<Vec<(String, Value)>> {
    let tok = &model.tokenizer;
    let spec: Json = serde_json::from_str(
        &tok.inner()
            .to_string(false)
            .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?,
    )?;
    let bpe = &spec["model"];
    if bpe["type"] != "BPE" || spec["decoder"]["type"] != "ByteLevel" {
        bail!(
            "the tokenizer is not byte-level BPE (model {}, decoder {}): tuneforge writes GGUF \
             tokenizers of that kind only; convert this model with llama.cpp's convert_hf_to_gguf.py",
            bpe["type"],
            spec["decoder"]["type"]
        );
    }
    let vocab_size = model.lm.config.vocab_size.max(tok.vocab_size());
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![NORMAL; vocab_size];
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
                Some(true) => CONTROL,
                _ => USER_DEFINED,
            };
        }
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = UNUSED;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    // tokenizers writes merges as "a b" or, lately, as ["a", "b"].
    let merges: Vec<Value> = bpe["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            other => Err(anyhow!(
                "a BPE merge that is neither a string nor a pair: {other}"
            )),
        })
        .map(|m| m.map(Value::String))
        .collect::<Result<_>>()?;
    let pre = pre_name(&spec["pre_tokenizer"], merges.is_empty())?;
    let id_of = |text: &Option<String>| text.as_deref().and_then(|t| tok.token_to_id(t));
    let bos = id_of(&tok.bos_token);
    let add_bos = match bos {
        Some(b) => tok.encode("a", true)?.first() == Some(&b),
        None => false,
    };
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(tok.pad_id()),
        ),
    ];
    // llama.cpp wants the key even for a vocabulary of single bytes, which has none.
    out.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
    if let Some(b) = bos {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = id_of(&tok.eos_token).as_ref().or(tok.eos_ids().first()) {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = tok.chat_template_source() {
        out.push(("tokenizer.chat_template".into(), Value::String(t.into())));
    }
    Ok(out)
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
