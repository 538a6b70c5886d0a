//! A pretrained model ready to use: the decoder, its tokenizer and where it came
//! from, loaded in one call from a name in `models.toml` or a path.

use crate::chat::Message;
use crate::config::ModelConfig;
use crate::device::DeviceSpec;
use crate::generate::{generate, Generation, GenerationConfig};
use crate::model::CausalLm;
use crate::quantize::{BaseDtype, Holding, Quantize};
use crate::source::{self, ModelFiles, ResolvedModel};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use std::path::Path;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Where to run.
    pub device: DeviceSpec,
    /// The compute dtype; by default f32 on CPU and, on a GPU, the base's
    /// precision (bf16 unless `base_dtype` is f32).
    pub dtype: Option<DType>,
    /// How the frozen base's linear weights are held (QLoRA); dense by default.
    pub quantize: Quantize,
    /// The frozen base's precision (`--dtype`). On the CPU, bf16 holds the
    /// matrices `quantize` leaves dense in bf16 (multiplied with bf16 dot
    /// products where the CPU has them, else in f32); `Auto`
    /// (the default) picks bf16 on CPUs with bf16 arithmetic and f32 elsewhere
    /// ([`BaseDtype::resolve`]). On a GPU it is the compute dtype.
    pub base_dtype: BaseDtype,
}

impl LoadOptions {
    /// The defaults with an f32 base ([`BaseDtype::F32`]) on every CPU: the
    /// exact weights, whatever bf16 arithmetic the CPU has.
    pub fn f32_base() -> Self {
        Self {
            base_dtype: BaseDtype::F32,
            ..Self::default()
        }
    }
}

/// A loaded model: decoder, tokenizer and provenance.
#[derive(Debug, Clone)]
pub struct Model {
    /// The decoder.
    pub lm: CausalLm,
    /// The tokenizer with its chat template.
    pub tokenizer: Tokenizer,
    /// Where the files came from.
    pub source: ResolvedModel,
    /// What loading did that a user should know (weights left dense).
    pub notes: Vec<String>,
}

impl Model {
    /// Loads a model by registry name (see `models.toml`) or path, trying each source
    /// in turn: a local path, the Hub cache, a Hub download, then mirrors.
    pub fn load(name: &str, options: &LoadOptions) -> Result<Self> {
        let source = source::resolve(name)?;
        let device = options.device.open()?;
        let dtype = options
            .dtype
            .unwrap_or_else(|| options.base_dtype.compute_dtype(&device));
        let quantize = options.base_dtype.holding(options.quantize, &device);
        Self::from_files(source, dtype, &device, quantize)
    }

    /// Loads a model from already-resolved files, its frozen matrices held as
    /// `holding` asks (a [`Quantize`], or [`BaseDtype::holding`]'s).
    pub fn from_files(
        source: ResolvedModel,
        dtype: DType,
        device: &Device,
        holding: impl Into<Holding>,
    ) -> Result<Self> {
        let holding = holding.into();
        let (lm, tokenizer, notes) = match &source.files {
            ModelFiles::Gguf(path) => {
                let mut file = std::fs::File::open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                let mut content = gguf_file::Content::read(&mut file).with_context(|| {
                    format!("{} is not a readable GGUF file (truncated, or an unsupported version or quantization)", path.display())
                })?;
                let config = ModelConfig::from_gguf(&content)
                    .with_context(|| format!("reading the config of {}", path.display()))?;
                let tokenizer = Tokenizer::from_gguf(&content)
                    .with_context(|| format!("reading the tokenizer of {}", path.display()))?;
                // The metadata (the vocabulary's strings) has been read, and
                // building the tokenizer left freed scraps: hand both back
                // before the weights arrive.
                content.metadata.clear();
                crate::memory::release_freed();
                let mut w = Weights::from_gguf(path, &content, &config, dtype, device, holding)?;
                let notes = w.take_notes();
                (CausalLm::new(&config, w, dtype, device)?, tokenizer, notes)
            }
            ModelFiles::HfDir {
                config,
                tokenizer,
                tokenizer_config,
                weights,
            } => {
                let cfg = ModelConfig::from_hf_file(config)?;
                let tok = Tokenizer::from_hf_files(
                    tokenizer,
                    tokenizer_config.as_deref(),
                    &cfg.eos_token_ids,
                )?;
                let mut w = Weights::from_safetensors(weights, dtype, device, holding)?;
                let notes = w.take_notes();
                (CausalLm::new(&cfg, w, dtype, device)?, tok, notes)
            }
        };
        Ok(Self {
            lm,
            tokenizer,
            source,
            notes,
        })
    }

    /// A tiny randomly initialised model ([`ModelConfig::tiny`]) with a byte-level
    /// ChatML tokenizer: fast and download-free, for tests, docs and benchmarks.
    ///
    /// ```
    /// let model = tuneforge::Model::tiny_random(tuneforge::Architecture::Llama, 0)?;
    /// assert_eq!(model.config().vocab_size, model.tokenizer.vocab_size());
    /// # anyhow::Ok(())
    /// ```
    pub fn tiny_random(architecture: crate::config::Architecture, seed: u64) -> Result<Self> {
        let mut model = Self::random(
            &ModelConfig::tiny(architecture),
            seed,
            DType::F32,
            &Device::Cpu,
        )?;
        model.source.name = "tiny-random".into();
        model.source.repo = Some("tuneforge/tiny-random".into());
        Ok(model)
    }

    /// A randomly initialised model of any shape ([`CausalLm::random`]) with a
    /// byte-level ChatML tokenizer: for benchmarks at a real model's shapes with
    /// nothing downloaded. Token ids past the tokenizer's 259 still train.
    pub fn random(config: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::random_held(config, seed, dtype, device, Quantize::None)
    }

    /// [`Model::random`] with the linears held as `holding` asks (a
    /// [`Quantize`], or [`BaseDtype::holding`]'s; [`CausalLm::random_held`]).
    pub fn random_held(
        config: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        holding: impl Into<Holding>,
    ) -> Result<Self> {
        let mut notes = Vec::new();
        let lm = CausalLm::random_held(config, seed, dtype, device, holding, &mut notes)?;
        Ok(Self {
            lm,
            tokenizer: Tokenizer::byte_level_chatml()?,
            source: ResolvedModel {
                name: "random".into(),
                repo: Some("tuneforge/random".into()),
                files: ModelFiles::Gguf("random".into()),
            },
            notes,
        })
    }

    /// The architecture hyperparameters.
    pub fn config(&self) -> &ModelConfig {
        &self.lm.config
    }

    /// The Hub repo id, when known (adapters record it as their base model).
    pub fn repo_id(&self) -> Option<&str> {
        self.source.repo.as_deref()
    }

    /// Saves the model in HF layout: `model.safetensors` (in `dtype`), `config.json`,
    /// `tokenizer.json` and `tokenizer_config.json`. Each file is written atomically.
    pub fn save_hf(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tensors = self
            .lm
            .named_weights()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join("model.safetensors");
        crate::weights::save_safetensors(&path, &tensors)?;
        let mut config = self.config().to_hf_json();
        config["torch_dtype"] = dtype_name(dtype).into();
        crate::atomic::write(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        self.tokenizer
            .save_hf(dir, self.tokenizer.chat_template_source())
    }

    /// Loads a LoRA adapter (a tuneforge run folder or any PEFT LoRA adapter) onto
    /// the model, after checking it was made for this base model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<crate::adapter::AdapterConfig> {
        let config = crate::adapter::read_config(dir)?;
        crate::adapter::check_base_model(&config, dir, self.repo_id())?;
        crate::adapter::load(&mut self.lm, dir)
    }

    /// Folds the attached adapters into the base weights; returns how many.
    pub fn merge_adapters(&mut self) -> Result<usize> {
        crate::lora::merge(&mut self.lm)
    }

    /// The token ids of a chat prompt ending with the assistant header.
    pub fn chat_prompt_ids(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.tokenizer.apply_chat_template(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Answers a conversation, streaming text to `on_text`.
    pub fn chat(
        &self,
        messages: &[Message],
        config: &GenerationConfig,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let ids = self.chat_prompt_ids(messages)?;
        generate(&self.lm, &self.tokenizer, &ids, config, on_text)
    }

    /// Generates from many prompts (token ids), `batch` sequences at a time,
    /// with the prefix they share prefilled once: the answers of
    /// [`crate::generate::generate`] on each, much faster
    /// ([`crate::generate::batched`]). A `batch` of 1 decodes one prompt at a
    /// time, without prefix sharing, as [`Model::chat`] does.
    ///
    /// ```
    /// let model = tuneforge::Model::tiny_random(tuneforge::Architecture::Llama, 0)?;
    /// let prompts = vec![vec![1, 10, 11], vec![1, 10, 12, 13]];
    /// let config = tuneforge::GenerationConfig::greedy(4);
    /// let answers = model.generate_batch(&prompts, &config, 16)?;
    /// assert_eq!(answers[1].ids, model.generate_batch(&prompts[1..], &config, 1)?[0].ids);
    /// # anyhow::Ok(())
    /// ```
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        batch: usize,
    ) -> Result<Vec<Generation>> {
        match batch {
            1 => prompts
                .iter()
                .map(|p| generate(&self.lm, &self.tokenizer, p, config, &mut |_| {}))
                .collect(),
            _ => crate::generate::generate_batch(&self.lm, &self.tokenizer, prompts, config, batch),
        }
    }

    /// Answers many conversations, `batch` at a time ([`Model::generate_batch`]).
    pub fn chat_batch(
        &self,
        conversations: &[Vec<Message>],
        config: &GenerationConfig,
        batch: usize,
    ) -> Result<Vec<Generation>> {
        let prompts = conversations
            .iter()
            .map(|m| self.chat_prompt_ids(m))
            .collect::<Result<Vec<_>>>()?;
        self.generate_batch(&prompts, config, batch)
    }
}

/// The HF name of a dtype, for `torch_dtype`.
fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}
