//! Export for llama.cpp, Ollama and LM Studio: a fine-tuned adapter as a GGUF
//! LoRA adapter (`adapter.gguf`), optionally the base with the adapter merged
//! in as one quantized GGUF (`model.gguf`), and an Ollama `Modelfile`.
//!
//! ```no_run
//! use tuneforge::export::{export, ExportOptions, Quant};
//! use tuneforge::{LoadOptions, Model};
//! use std::path::Path;
//!
//! let base = Model::load("smollm2-135m-instruct", &LoadOptions::default())?;
//! let options = ExportOptions { merge: true, quant: Quant::Q8_0, overwrite: false };
//! let report = export(base, Path::new("runs/triage"), Path::new("exported"), &options)?;
//! println!("{}", report.summary());
//! # anyhow::Ok(())
//! ```

mod adapter;
pub mod gguf;
mod modelfile;
pub mod quant;
mod tokenizer;

pub use adapter::write_adapter;
pub use gguf::{write_model, Fallback};
pub use modelfile::{modelfile, Weights};
pub use quant::Quant;

use crate::pretrained::Model;
use crate::source::ModelFiles;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The adapter's file in an export folder.
pub const ADAPTER_FILE: &str = "adapter.gguf";
/// The merged model's file in an export folder.
pub const MODEL_FILE: &str = "model.gguf";
/// Ollama's recipe in an export folder.
pub const MODELFILE: &str = "Modelfile";

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Also write the base with the adapter merged in, as `model.gguf`.
    pub merge: bool,
    /// The merged model's quantization.
    pub quant: Quant,
    /// Replace an earlier export in the same folder.
    pub overwrite: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            merge: false,
            quant: Quant::Q8_0,
            overwrite: false,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// `adapter.gguf`.
    pub adapter: PathBuf,
    /// How many linears the adapter holds.
    pub adapted_linears: usize,
    /// `model.gguf`, with `merge`.
    pub model: Option<PathBuf>,
    /// The merged model's quantization.
    pub quant: Quant,
    /// The tensors whose rows kept them from the asked type, and what they got.
    pub fallbacks: Vec<Fallback>,
    /// The `Modelfile`.
    pub modelfile: PathBuf,
}

impl ExportReport {
    /// A few lines for the user: the files, and each fallback.
    pub fn summary(&self) -> String {
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len()) as f64 / 1e6;
        let mut out = format!(
            "wrote {} ({} adapted linears, {:.1} MB)\n",
            self.adapter.display(),
            self.adapted_linears,
            size(&self.adapter)
        );
        if let Some(m) = &self.model {
            out += &format!(
                "wrote {} ({}, {:.1} MB)\n",
                m.display(),
                self.quant.name(),
                size(m)
            );
        }
        for f in &self.fallbacks {
            out += &format!(
                "  {}: its rows do not fit {:?} blocks, so it is {:?} (as llama.cpp's quantizer does)\n",
                f.tensor, f.wanted, f.got
            );
        }
        out += &format!("wrote {}\n", self.modelfile.display());
        out
    }
}

/// Exports the adapter in `adapter_dir`, made for `base`, into `out`: see the
/// module's documentation. An adapter made for another base is refused, and so
/// is a folder that holds an export already, unless `overwrite`.
pub fn export(
    mut base: Model,
    adapter_dir: &Path,
    out: &Path,
    options: &ExportOptions,
) -> Result<ExportReport> {
    let files = [ADAPTER_FILE, MODEL_FILE, MODELFILE].map(|f| out.join(f));
    if !options.overwrite {
        if let Some(existing) = files.iter().find(|p| p.exists()) {
            bail!(
                "{} already holds an export ({}): pass --overwrite to replace it",
                out.display(),
                existing.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    base.load_adapter(adapter_dir)
        .with_context(|| format!("loading the adapter in {}", adapter_dir.display()))?;
    let name = adapter_dir
        .file_name()
        .map_or("tuneforge".into(), |n| n.to_string_lossy().into_owned());
    let [adapter, model, modelfile_path] = files;
    let adapted_linears = write_adapter(&base.lm, &name, &adapter)?;
    let mut fallbacks = Vec::new();
    let weights = match options.merge {
        true => {
            base.merge_adapters()?;
            fallbacks = write_model(&base, &name, options.quant, &model)?;
            Weights::Merged(format!("./{MODEL_FILE}"))
        }
        false => Weights::BaseWithAdapter {
            base: match &base.source.files {
                ModelFiles::Gguf(p) => p.display().to_string(),
                ModelFiles::HfDir { config, .. } => {
                    crate::atomic::parent_dir(config).display().to_string()
                }
            },
            adapter: format!("./{ADAPTER_FILE}"),
        },
    };
    if !options.merge && options.overwrite && model.exists() {
        // An earlier merged model would not match this adapter.
        std::fs::remove_file(&model).with_context(|| format!("removing {}", model.display()))?;
    }
    crate::atomic::write(
        &modelfile_path,
        modelfile(&weights, &base.tokenizer)?.as_bytes(),
    )?;
    Ok(ExportReport {
        adapter,
        adapted_linears,
        model: options.merge.then_some(model),
        quant: options.quant,
        fallbacks,
        modelfile: modelfile_path,
    })
}
