//! An Ollama `Modelfile` for an export: `FROM` the merged model (or the base
//! with an `ADAPTER`), the chat format as a Go template where it is one Ollama
//! writes that way (ChatML, Gemma, Llama 3, Phi-3), the default system prompt
//! the template adds, and a `stop` for each end-of-turn token.

use crate::chat::Message;
use crate::tokenizer::Tokenizer;
use anyhow::Result;

/// What the Modelfile runs.
#[derive(Debug, Clone)]
pub enum Weights {
    /// One merged GGUF, by its path relative to the Modelfile.
    Merged(String),
    /// A base GGUF (a path as the user gave it) and an adapter GGUF beside the Modelfile.
    BaseWithAdapter {
        /// The base model's GGUF.
        base: String,
        /// The adapter's GGUF.
        adapter: String,
    },
}

/// The chat formats Ollama writes as Go templates, told by a marker of their Jinja.
const FORMATS: [(&str, &str); 4] = [
    (
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    (
        "<start_of_turn>",
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ),
    (
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    (
        "<|end|>",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    ),
];

/// The Modelfile's text.
pub fn modelfile(weights: &Weights, tokenizer: &Tokenizer) -> Result<String> {
    let mut out = String::from("# Made by tuneforge: ollama create NAME -f Modelfile\n");
    match weights {
        Weights::Merged(path) => out += &format!("FROM {path}\n"),
        Weights::BaseWithAdapter { base, adapter } => {
            out += &format!("FROM {base}\nADAPTER {adapter}\n");
        }
    }
    let jinja = tokenizer.chat_template_source().unwrap_or_default();
    match FORMATS.iter().find(|(marker, _)| jinja.contains(marker)) {
        Some((_, go)) => {
            out += &format!("TEMPLATE \"\"\"{go}\"\"\"\n");
            if let Some(system) = default_system_prompt(tokenizer)? {
                out += &format!("SYSTEM \"\"\"{system}\"\"\"\n");
            }
        }
        None => out += "# The chat template is the one in the GGUF file.\n",
    }
    for id in tokenizer.eos_ids() {
        let stop = tokenizer.decode(&[*id], false)?;
        if !stop.is_empty() {
            out += &format!("PARAMETER stop \"{}\"\n", stop.replace('"', "\\\""));
        }
    }
    Ok(out)
}

/// The system prompt the chat template adds when a conversation has none
/// (SmolLM2's "You are a helpful AI assistant named SmolLM..."), which a Go
/// template would otherwise leave out: the text between the rendered prompt's
/// start and the user turn, as a ChatML system turn.
fn default_system_prompt(tokenizer: &Tokenizer) -> Result<Option<String>> {
    if !tokenizer.has_chat_template() {
        return Ok(None);
    }
    let rendered = tokenizer.apply_chat_template(&[Message::user("\u{1}")], true)?;
    let system = rendered
        .split_once("<|im_start|>system\n")
        .and_then(|(_, rest)| rest.split_once("<|im_end|>"))
        .map(|(s, _)| s.to_string());
    Ok(system)
}
