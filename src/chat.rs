//! Chat messages and chat templates, rendered with minijinja under the same
//! rules as Hugging Face transformers (trim_blocks, lstrip_blocks, Python-style
//! string methods, `raise_exception`, `bos_token`/`eos_token`).

use anyhow::{Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl Message {
    /// A turn with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    /// A system turn.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An assistant turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template with the special tokens it refers to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a Jinja chat template.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> Result<String, Error> {
            // Templates use this for "today's date"; a fixed date keeps renders reproducible.
            Ok(fmt
                .replace("%d", "26")
                .replace("%b", "Jul")
                .replace("%B", "July")
                .replace("%Y", "2024"))
        });
        env.add_template_owned("chat", source.to_string())
            .context("compiling the chat template")?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .context("rendering the chat template")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_surfaces_as_an_error() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}ok",
            "", "",
        )
        .unwrap();
        assert_eq!(t.render(&[Message::user("hi")], false).unwrap(), "ok");
        let err = format!(
            "{:#}",
            t.render(&[Message::assistant("hi")], false).unwrap_err()
        );
        assert!(err.contains("first turn must be user"), "{err}");
    }

    #[test]
    fn python_string_methods_and_block_trimming_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n    {% if m %}{{ bos_token }}{{ m.content.strip() }}|\n    {% endif %}\n{% endfor %}",
            "<s>", "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::user("  a "), Message::user("b")], false)
                .unwrap(),
            "<s>a|\n<s>b|\n"
        );
    }
}
