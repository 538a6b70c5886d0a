//! LoRA adapters on disk in PEFT's format, which PEFT, vLLM, llama.cpp's
//! converter and mistral.rs load: `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`[r, in]`)
//! and `...lora_B.weight` (`[out, r]`), beside `adapter_config.json`.

use crate::config::ModelConfig;
use crate::lora::{self, LoraConfig, LoraLayer};
use crate::model::CausalLm;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The weights file of an adapter.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The config file of an adapter.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// PEFT's `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// `CAUSAL_LM` in ours; PEFT leaves it null for adapters made on a bare model.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The Hub repo id of the base model.
    pub base_model_name_or_path: Option<String>,
    /// The rank.
    pub r: usize,
    /// The scaling numerator.
    pub lora_alpha: f64,
    /// Dropout used in training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Adapted module names.
    pub target_modules: TargetModules,
    /// Always `none`.
    #[serde(default = "none_bias")]
    pub bias: String,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// Always false.
    #[serde(default)]
    pub use_dora: bool,
    /// Always false.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Always true for saved adapters.
    #[serde(default = "yes")]
    pub inference_mode: bool,
    /// Always null.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The adapted layers (all when null).
    #[serde(default)]
    pub layers_to_transform: Option<LayerList>,
}

fn none_bias() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}

/// PEFT writes target modules as a list, or sometimes as one regex string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A list of module names.
    List(Vec<String>),
    /// A single name or regex.
    One(String),
}

/// PEFT writes layers as a list or a single index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerList {
    /// Several layers.
    List(Vec<usize>),
    /// One layer.
    One(usize),
}

impl AdapterConfig {
    /// The PEFT config for a LoRA config on a model of `model` (whose linears
    /// `all-linear` names), from the base model `base_model`.
    pub fn new(lora: &LoraConfig, model: &ModelConfig, base_model: Option<&str>) -> Result<Self> {
        Ok(Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base_model.map(str::to_string),
            r: lora.r,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            target_modules: TargetModules::List(
                lora.targets(crate::model::linear_names(model))?
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            bias: none_bias(),
            use_rslora: lora.use_rslora,
            use_dora: false,
            fan_in_fan_out: false,
            inference_mode: true,
            modules_to_save: None,
            layers_to_transform: lora.layers.clone().map(LayerList::List),
        })
    }

    /// The scale the adapter's output is multiplied by.
    pub fn scale(&self) -> f64 {
        lora_config(self).scale()
    }
}

/// Saves the model's adapters and their config into `dir` (each file atomically).
pub fn save(model: &CausalLm, config: &AdapterConfig, dir: &Path) -> Result<()> {
    let params = lora::parameters(model);
    if params.is_empty() {
        bail!("the model has no LoRA adapters to save");
    }
    let tensors: Vec<(String, Tensor)> = params
        .into_iter()
        .map(|(k, v)| {
            Ok((
                k,
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    crate::weights::save_safetensors(&dir.join(WEIGHTS_FILE), &tensors)?;
    crate::atomic::write(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )
}

/// Reads an adapter's config. A path that is not an adapter folder is
/// refused with what to pass instead.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let what_to_pass =
        "pass an adapter folder (a finetune run's --out, or a PEFT adapter's folder)";
    if !dir.is_dir() {
        bail!("{} is not a folder: {what_to_pass}", dir.display());
    }
    if !path.is_file() {
        bail!("{} holds no {CONFIG_FILE}: {what_to_pass}", dir.display());
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: AdapterConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    if config.peft_type != "LORA" {
        bail!(
            "{}: peft_type is {}, but only LORA adapters are supported",
            path.display(),
            config.peft_type
        );
    }
    if config.use_dora {
        bail!("{}: DoRA adapters are not supported", path.display());
    }
    Ok(config)
}

/// Checks that an adapter was made for `repo` (when both are known).
pub fn check_base_model(config: &AdapterConfig, dir: &Path, repo: Option<&str>) -> Result<()> {
    if let (Some(base), Some(repo)) = (&config.base_model_name_or_path, repo) {
        if !base.eq_ignore_ascii_case(repo) {
            bail!(
                "the adapter in {} was trained on {base}, but the model is {repo}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Loads an adapter (ours or any PEFT LoRA adapter for this architecture) onto the
/// model's linears, replacing any attached ones. Every tensor's shape is checked.
pub fn load(model: &mut CausalLm, dir: &Path) -> Result<AdapterConfig> {
    let config = read_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let device = model.device().clone();
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        // Some PEFT versions keep the adapter name in the key.
        .map(|(k, t)| {
            (
                k.replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B."),
                t,
            )
        })
        .collect();
    lora::detach(model);
    let scale = config.scale();
    let mut attached = 0;
    let mut stream = 0;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (module_path, linear) in layer.linears_mut() {
            let prefix = lora::peft_prefix(i, module_path);
            let (ka, kb) = (
                format!("{prefix}.lora_A.weight"),
                format!("{prefix}.lora_B.weight"),
            );
            let (Some(a), Some(b)) = (tensors.remove(&ka), tensors.remove(&kb)) else {
                continue;
            };
            let (inp, out) = (linear.in_features(), linear.out_features());
            if a.dims() != [config.r, inp] {
                bail!("adapter tensor {ka} in {} has shape {:?}, but this model needs [{}, {inp}]: the adapter was made for a different base model", path.display(), a.dims(), config.r);
            }
            if b.dims() != [out, config.r] {
                bail!("adapter tensor {kb} in {} has shape {:?}, but this model needs [{out}, {}]: the adapter was made for a different base model", path.display(), b.dims(), config.r);
            }
            stream += 1;
            let a = Var::from_tensor(&a.to_dtype(DType::F32)?.to_device(&device)?)?;
            let b = Var::from_tensor(&b.to_dtype(DType::F32)?.to_device(&device)?)?;
            linear.lora = Some(LoraLayer::new(a, b, scale, config.lora_dropout, stream));
            attached += 1;
        }
    }
    if let Some(extra) = tensors.keys().min() {
        bail!("adapter tensor {extra} in {} matches no layer of this model: the adapter was made for a different base model", path.display());
    }
    if attached == 0 {
        bail!("{} holds no LoRA tensors", path.display());
    }
    Ok(config)
}

/// The LoRA settings recorded in an adapter config.
pub fn lora_config(config: &AdapterConfig) -> LoraConfig {
    LoraConfig {
        r: config.r,
        alpha: config.lora_alpha,
        dropout: config.lora_dropout,
        target_modules: match &config.target_modules {
            TargetModules::List(l) => l.clone(),
            TargetModules::One(s) => vec![s.clone()],
        },
        layers: match &config.layers_to_transform {
            Some(LayerList::List(l)) => Some(l.clone()),
            Some(LayerList::One(l)) => Some(vec![*l]),
            None => None,
        },
        use_rslora: config.use_rslora,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that is not an adapter folder says so, and what to pass.
    #[test]
    fn a_path_that_is_not_an_adapter_folder_is_refused_plainly() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-run");
        let err = read_config(&missing).unwrap_err().to_string();
        assert!(
            err.contains("no-such-run is not a folder") && err.contains("adapter folder"),
            "{err}"
        );
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = read_config(&empty).unwrap_err().to_string();
        assert!(err.contains("holds no adapter_config.json"), "{err}");
    }
}
