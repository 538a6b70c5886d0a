//! The run folder's own files: which they are (a new run refuses a folder
//! that holds them, `--overwrite` removes only them), and the checkpoint,
//! written whole or not at all.

use super::settings::RUN_CONFIG_FILE;
use crate::adapter;
use crate::rng::Rng;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a run stands; saved in checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TrainState {
    pub(super) step: usize,
    pub(super) epoch: usize,
    pub(super) step_in_epoch: usize,
    pub(super) rng: Rng,
    pub(super) best_valid_loss: Option<f64>,
    pub(super) evals_since_best: usize,
    pub(super) elapsed: f64,
    pub(super) tokens: usize,
}

impl TrainState {
    /// A fresh run's state.
    pub(super) fn new(seed: u64) -> Self {
        Self {
            step: 0,
            epoch: 0,
            step_in_epoch: 0,
            rng: Rng::new(seed ^ 0x5EED),
            best_valid_loss: None,
            evals_since_best: 0,
            elapsed: 0.0,
            tokens: 0,
        }
    }
}

/// The files and folders a run writes.
const RUN_FILES: [&str; 9] = [
    RUN_CONFIG_FILE,
    "metrics.jsonl",
    "loss.svg",
    adapter::WEIGHTS_FILE,
    adapter::CONFIG_FILE,
    "checkpoint",
    "checkpoint.old",
    "checkpoint.partial",
    "best",
];

/// The run folder an adapter folder comes from: the folder itself when it
/// holds a run's `train_config.toml`, or the run around it when it is that
/// run's `best/` or `checkpoint/` adapter. `None` for an adapter from
/// elsewhere (a PEFT download, a copied folder).
pub fn run_folder_of(adapter: &Path) -> Option<PathBuf> {
    let holds_settings = |dir: &Path| dir.join(RUN_CONFIG_FILE).is_file();
    if holds_settings(adapter) {
        return Some(adapter.to_path_buf());
    }
    let name = adapter.file_name()?;
    let run = adapter.parent()?;
    let inside = ["best", "checkpoint", "checkpoint.old"]
        .iter()
        .any(|n| name == *n);
    (inside && holds_settings(run)).then(|| run.to_path_buf())
}

/// Whether `dir` already holds a training run.
pub fn holds_run(dir: &Path) -> bool {
    RUN_FILES.iter().any(|f| dir.join(f).exists())
}

/// Removes a run's files from `out_dir`, and nothing else.
pub(super) fn remove_run(out_dir: &Path) -> Result<()> {
    for f in RUN_FILES {
        let p = out_dir.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// The checkpoint to resume from: `checkpoint/`, or, after a hard kill
/// between the two renames of [`save_checkpoint`], the previous one moved
/// aside (still whole).
pub(super) fn latest_checkpoint(out_dir: &Path) -> PathBuf {
    [out_dir.join("checkpoint"), out_dir.join("checkpoint.old")]
        .into_iter()
        .find(|p| p.join("trainer_state.json").is_file())
        .unwrap_or_else(|| out_dir.join("checkpoint"))
}

/// The state saved in `checkpoint`.
pub(super) fn read_state(checkpoint: &Path) -> Result<TrainState> {
    let path = checkpoint.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Writes `out_dir/checkpoint/` whole or not at all: `write` fills a fresh
/// folder, which then replaces the previous checkpoint by two renames. On
/// an error the previous checkpoint is kept.
pub(super) fn save_checkpoint(
    out_dir: &Path,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let fresh = out_dir.join("checkpoint.partial");
    let old = out_dir.join("checkpoint.old");
    let target = out_dir.join("checkpoint");
    let written = (|| {
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh)
                .with_context(|| format!("removing {}", fresh.display()))?;
        }
        write(&fresh)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&fresh);
        return Err(e.context(format!(
            "saving a checkpoint in {} (the previous checkpoint is kept)",
            out_dir.display()
        )));
    }
    if target.exists() {
        std::fs::rename(&target, &old)
            .with_context(|| format!("moving {} aside", target.display()))?;
    }
    std::fs::rename(&fresh, &target)
        .with_context(|| format!("renaming {} to {}", fresh.display(), target.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder is found from itself and from its best/ and checkpoint/
    /// adapters; an adapter folder outside a run has none.
    #[test]
    fn an_adapter_finds_its_run_folder() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("run");
        for dir in ["best", "checkpoint", "other"] {
            std::fs::create_dir_all(run.join(dir)).unwrap();
        }
        assert_eq!(run_folder_of(&run), None, "no train_config.toml yet");
        std::fs::write(run.join("train_config.toml"), "").unwrap();
        assert_eq!(run_folder_of(&run), Some(run.clone()));
        assert_eq!(run_folder_of(&run.join("best")), Some(run.clone()));
        assert_eq!(run_folder_of(&run.join("checkpoint")), Some(run.clone()));
        assert_eq!(run_folder_of(&run.join("other")), None);
        assert_eq!(run_folder_of(root.path()), None);
    }
}
