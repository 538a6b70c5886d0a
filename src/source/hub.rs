//! The Hugging Face Hub: its local cache (HF_HOME) and downloads (HF_ENDPOINT),
//! through the `hf-hub` crate, with a quick reachability probe so that an
//! unreachable Hub fails in seconds rather than minutes.

use super::ModelFiles;
use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};
use std::path::PathBuf;
use std::time::Duration;

/// The files of an HF-layout model, besides the weights.
const FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

fn repo(id: &str, revision: &str) -> Repo {
    Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string())
}

/// Whether `HF_HUB_OFFLINE` asks us not to touch the network.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string())
}

/// The model's files from the local Hub cache, if a complete snapshot is there.
pub fn from_cache(id: &str, revision: &str) -> Result<ModelFiles> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.repo(repo(id, revision));
    let get = |name: &str| {
        repo.get(name).with_context(|| {
            format!(
                "{name} of {id}@{revision} is not in the Hub cache at {}",
                cache.path().display()
            )
        })
    };
    hf_files(get)
}

/// An HF-layout model's files, each fetched by `get`: the config and tokenizer
/// files, then `model.safetensors` or, failing that, the shards of its index.
fn hf_files(get: impl Fn(&str) -> Result<PathBuf>) -> Result<ModelFiles> {
    let [config, tokenizer, tokenizer_config] = FILES.map(&get);
    let (config, tokenizer, tokenizer_config) = (config?, tokenizer?, tokenizer_config?);
    let weights = match get(SINGLE) {
        Ok(p) => vec![p],
        Err(_) => {
            let index = get(INDEX)?;
            shard_names(&index)?
                .iter()
                .map(|s| get(s))
                .collect::<Result<Vec<_>>>()?
        }
    };
    Ok(ModelFiles::HfDir {
        config,
        tokenizer,
        tokenizer_config: Some(tokenizer_config),
        weights,
    })
}

/// Downloads the model's files from the Hub into the cache, with progress bars.
pub fn download(id: &str, revision: &str) -> Result<ModelFiles> {
    if offline() {
        bail!("HF_HUB_OFFLINE is set, so the Hub was not contacted");
    }
    probe()?;
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .context("setting up the Hub client")?;
    let repo = api.repo(repo(id, revision));
    let get = |name: &str| {
        repo.get(name)
            .with_context(|| format!("downloading {name} of {id}@{revision} from the Hub"))
    };
    hf_files(get)
}

/// Fails within seconds when the Hub endpoint cannot be reached at all.
fn probe() -> Result<()> {
    let url = endpoint();
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build();
    match agent.head(&url).call() {
        Ok(_) | Err(ureq::Error::Status(..)) => Ok(()),
        Err(e) => bail!("the Hub at {url} cannot be reached: {e}"),
    }
}

/// The shard files named by a `model.safetensors.index.json`, in order, without repeats.
pub fn shard_names(index: &std::path::Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map object", index.display()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The weight files of an HF-layout folder: `model.safetensors` or the shards of its index.
pub fn local_weights(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX);
    if index.is_file() {
        return Ok(shard_names(&index)?
            .into_iter()
            .map(|s| dir.join(s))
            .collect());
    }
    bail!("{} holds neither {SINGLE} nor {INDEX}", dir.display())
}
