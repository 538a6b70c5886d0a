//! Weights in HF layout, whatever file they came from: safetensors (f32, bf16,
//! f16) or GGUF (dequantized, with llama.cpp's q/k row permutation undone), so
//! that everything downstream (rope, adapters, merging) sees one layout. The
//! decoder blocks' linear weights may be held in GGML blocks instead
//! ([`Quantize`]): kept as a GGUF stores them, or quantized as they load.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{Architecture, ModelConfig};
use crate::model::{FrozenWeight, QuantizedWeight};
use crate::quantize::{is_held_in_blocks, Fallback, Holding, Quantize};

/// Named tensors in HF layout (`model.layers.0.self_attn.q_proj.weight`, ...).
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Linear weights held in GGML blocks.
    quantized: HashMap<String, QuantizedWeight>,
    origin: String,
    /// What loading did that a user should know (tensors left dense).
    pub notes: Vec<String>,
    /// The matrices held in another format than the one asked for.
    pub fallbacks: Vec<Fallback>,
}

impl Weights {
    /// Wraps a map of HF-named tensors; `origin` names their source in errors.
    pub fn new(tensors: HashMap<String, Tensor>, origin: impl Into<String>) -> Self {
        Self {
            tensors,
            origin: origin.into(),
            ..Self::default()
        }
    }

    /// Takes a frozen matrix (a linear weight, the embeddings, the lm_head)
    /// out by HF name, checking its shape: its blocks where it is held
    /// quantized, else the dense tensor.
    pub fn take_frozen(&mut self, name: &str, shape: [usize; 2]) -> Result<FrozenWeight> {
        let Some(q) = self.quantized.remove(name) else {
            return Ok(self.take(name, &shape)?.into());
        };
        let (out, inp) = q.dims();
        self.check_shape(name, &[out, inp], &shape)?;
        Ok(q.into())
    }

    /// What loading did that a user should know: the notes, then the
    /// matrices that fell back ([`crate::quantize::describe_fallbacks`]).
    pub fn take_notes(&mut self) -> Vec<String> {
        let mut notes = std::mem::take(&mut self.notes);
        notes.extend(crate::quantize::describe_fallbacks(&std::mem::take(
            &mut self.fallbacks,
        )));
        notes
    }

    /// Adds the tensor `t` named `name`, held as `holding` asks
    /// ([`Holding::hold`]).
    pub(crate) fn hold(&mut self, name: String, t: Tensor, holding: Holding) -> Result<()> {
        let held = holding.hold(&name, t, &mut self.fallbacks)?;
        match held {
            FrozenWeight::Quantized(q) => {
                self.quantized.insert(name, q);
            }
            FrozenWeight::Dense(t) => {
                self.tensors.insert(name, t);
            }
        }
        Ok(())
    }

    /// Takes a tensor out by HF name, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .with_context(|| format!("{} has no tensor {name}", self.origin))?;
        self.check_shape(name, t.dims(), shape)?;
        Ok(t)
    }

    /// Refuses tensor `name` of shape `dims` where the config asks for `shape`.
    fn check_shape(&self, name: &str, dims: &[usize], shape: &[usize]) -> Result<()> {
        if dims != shape {
            bail!(
                "tensor {name} in {} has shape {dims:?}, but the config asks for {shape:?}",
                self.origin
            );
        }
        Ok(())
    }

    /// Takes a tensor if present (optional weights such as biases or an untied lm_head).
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.tensors.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reads a tensor without taking it.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The names of the tensors not taken yet.
    pub fn remaining(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// Loads HF-layout safetensors files, converting to `dtype`; with a
    /// `quantize` target, each decoder-block linear is quantized as it loads,
    /// one tensor at a time ([`Holding`]).
    pub fn from_safetensors(
        paths: &[PathBuf],
        dtype: DType,
        device: &Device,
        holding: impl Into<Holding>,
    ) -> Result<Self> {
        let holding = holding.into();
        let origin = paths
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut weights = Self::new(HashMap::new(), origin);
        for path in paths {
            // SAFETY: the file is mapped read-only and not modified while mapped.
            let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                .with_context(|| format!("reading safetensors {}", path.display()))?;
            for (name, _) in file.tensors() {
                let t = file
                    .load(&name, &Device::Cpu)
                    .with_context(|| format!("reading tensor {name} from {}", path.display()))?
                    .to_dtype(dtype)?
                    .to_device(device)?;
                weights.hold(name, t, holding)?;
            }
        }
        if holding.quantize == Quantize::Keep {
            weights.notes.push(format!(
                "--quantize keep: {} stores floats, so its weights {} \
                 (q8_0, q4_k or q4_0 quantize them as they load)",
                weights.origin,
                holding.dense_words()
            ));
        }
        Ok(weights)
    }

    /// Loads a GGUF file's tensors into HF names and layout, dequantized, or
    /// with the decoder blocks' linears held as `quantize` asks (`keep`: in
    /// the file's blocks, rows reordered where llama.cpp permuted them; a
    /// target format: dequantized and quantized again, one tensor at a time).
    pub fn from_gguf(
        path: &Path,
        content: &gguf_file::Content,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
        holding: impl Into<Holding>,
    ) -> Result<Self> {
        let holding = holding.into();
        check_gguf_size(path, content)?;
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut weights = Self::new(HashMap::new(), path.display().to_string());
        let mut stored_as_floats = Vec::new();
        let mut rope_tables = Vec::new();
        // Largest first: the scraps of reading one tensor are reused by the
        // next ones rather than left below them on the heap.
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort_by_key(|n| {
            (
                std::cmp::Reverse(tensor_bytes(&content.tensor_infos[*n])),
                *n,
            )
        });
        for name in names {
            if let Some(kept) = rope_table_name(name) {
                rope_tables.push((name.clone(), kept));
                continue;
            }
            let hf = hf_name(name, config.architecture).with_context(|| {
                format!(
                    "{}: unexpected tensor {name} for a {:?} model",
                    path.display(),
                    config.architecture
                )
            })?;
            let q = read_tensor(&mut file, content, name)
                .with_context(|| format!("reading tensor {name} from {}", path.display()))?;
            let keep = holding.quantize == Quantize::Keep && is_held_in_blocks(&hf);
            if keep && !crate::model::quantized::is_block_format(q.dtype()) {
                stored_as_floats.push(name.clone());
            } else if keep {
                let mut w = QuantizedWeight::new(q, dtype)
                    .with_context(|| format!("keeping tensor {name} quantized"))?;
                if let Some(heads) = permuted_heads(&hf, config) {
                    w = w.select_rows(&unpermuted_order(w.dims().0, heads)?)?;
                }
                weights.quantized.insert(hf, w.to_device(device)?);
                continue;
            }
            let mut t = q
                .dequantize(&Device::Cpu)
                .with_context(|| format!("dequantizing tensor {name} ({:?})", q.dtype()))?;
            if let Some(heads) = permuted_heads(&hf, config) {
                t = unpermute(&t, heads)?;
            } else if config.norm_weight_offset && hf.ends_with("norm.weight") {
                // llama.cpp stores Gemma's norms as 1 + w; HF layout keeps w.
                t = (t - 1.0)?;
            }
            weights.hold(hf, t.to_dtype(dtype)?.to_device(device)?, holding)?;
        }
        for (name, kept) in rope_tables {
            let t = content
                .tensor(&mut file, &name, &Device::Cpu)
                .with_context(|| format!("reading tensor {name} from {}", path.display()))?
                .dequantize(&Device::Cpu)?;
            weights.tensors.insert(kept.to_string(), t);
        }
        if let Some(first) = stored_as_floats.iter().min() {
            weights.notes.push(format!(
                "--quantize keep: {} weights ({first}, ...) are stored as floats in {} \
                 and {}",
                stored_as_floats.len(),
                path.display(),
                holding.dense_words()
            ));
        }
        Ok(weights)
    }
}

/// Reads tensor `name` of a GGUF file onto the CPU: a matrix of blocks
/// straight into its storage (one allocation), anything else through candle
/// (which reads the bytes, then copies them).
fn read_tensor(
    file: &mut std::fs::File,
    content: &gguf_file::Content,
    name: &str,
) -> candle_core::Result<candle_core::quantized::QTensor> {
    use std::io::{Read, Seek, SeekFrom};
    if let Some(info) = content.tensor_infos.get(name) {
        if let Ok(dims) = info.shape.dims2() {
            let start = content.tensor_data_offset + info.offset;
            let mut read = |buf: &mut [u8]| {
                file.seek(SeekFrom::Start(start))?;
                file.read_exact(buf)?;
                Ok(())
            };
            if let Some(t) = crate::model::quantized::cpu_blocks(info.ggml_dtype, dims, &mut read)?
            {
                return Ok(t);
            }
        }
    }
    content.tensor(file, name, &Device::Cpu)
}

/// Writes named tensors to a safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
        .with_context(|| format!("serialising {}", path.display()))?;
    crate::atomic::write(path, &bytes)
}

/// Where Llama 3 GGUFs' rope frequency factors are kept among the weights.
pub const ROPE_FREQS: &str = "rope_freqs";

/// Where Phi-3 GGUFs' LongRoPE short and long factors are kept among the weights.
pub const LONGROPE_FACTORS: [&str; 2] = ["rope_factors_short", "rope_factors_long"];

/// The name under which a GGUF's rope-frequency tensor is kept, for the tensors
/// that are rope tables rather than weights.
fn rope_table_name(gguf: &str) -> Option<&'static str> {
    match gguf {
        "rope_freqs.weight" => Some(ROPE_FREQS),
        "rope_factors_short.weight" => Some(LONGROPE_FACTORS[0]),
        "rope_factors_long.weight" => Some(LONGROPE_FACTORS[1]),
        _ => None,
    }
}

/// The bytes a GGUF tensor's data takes in the file.
fn tensor_bytes(info: &gguf_file::TensorInfo) -> usize {
    crate::model::quantized::block_bytes(info.ggml_dtype, info.shape.elem_count())
}

/// Fails with a clear message when the file is shorter than its tensor table says.
fn check_gguf_size(path: &Path, content: &gguf_file::Content) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    let needed = content
        .tensor_infos
        .values()
        .map(|t| content.tensor_data_offset + t.offset + tensor_bytes(t) as u64)
        .max()
        .unwrap_or(0);
    if len < needed {
        bail!(
            "{} is truncated: its tensors need {needed} bytes but the file has {len}. \
             Delete it and download it again.",
            path.display()
        );
    }
    Ok(())
}

/// The GGUF and HF names of a block's modules (under `blk.N.` and
/// `model.layers.N.`) for `architecture`: Gemma's norms around attention and
/// MLP are named apart, and Phi-3's `ffn_up` is the fused `gate_up_proj`.
fn block_modules(architecture: Architecture) -> [(&'static str, &'static str); 15] {
    let gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
    let phi3 = architecture == Architecture::Phi3;
    [
        ("attn_norm", "input_layernorm"),
        (
            "ffn_norm",
            match gemma {
                true => "pre_feedforward_layernorm",
                false => "post_attention_layernorm",
            },
        ),
        (
            match gemma {
                true => "post_attention_norm",
                false => "-",
            },
            "post_attention_layernorm",
        ),
        ("post_ffw_norm", "post_feedforward_layernorm"),
        ("attn_qkv", "self_attn.qkv_proj"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("ffn_gate", "mlp.gate_proj"),
        (
            "ffn_up",
            match phi3 {
                true => "mlp.gate_up_proj",
                false => "mlp.up_proj",
            },
        ),
        ("ffn_down", "mlp.down_proj"),
        ("-", "-"),
    ]
}

/// The GGUF and HF names of the tensors outside the blocks.
const TOP_LEVEL: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Maps a GGUF tensor name to its HF name for `architecture`.
pub fn hf_name(gguf: &str, architecture: Architecture) -> Option<String> {
    translate(gguf, architecture, "blk.", "model.layers.", false)
}

/// Maps an HF tensor name to the name llama.cpp gives it for `architecture`.
pub fn gguf_name(hf: &str, architecture: Architecture) -> Option<String> {
    translate(hf, architecture, "model.layers.", "blk.", true)
}

/// One direction of the GGUF ↔ HF name map: `to_gguf` reads the table's HF side.
fn translate(
    name: &str,
    architecture: Architecture,
    from_prefix: &str,
    to_prefix: &str,
    to_gguf: bool,
) -> Option<String> {
    let pick = |(g, h): (&'static str, &'static str)| if to_gguf { (h, g) } else { (g, h) };
    if let Some((_, to)) = TOP_LEVEL.into_iter().map(pick).find(|(f, _)| *f == name) {
        return Some(to.to_string());
    }
    let rest = name.strip_prefix(from_prefix)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, to) = block_modules(architecture)
        .into_iter()
        .map(pick)
        .find(|(f, t)| *f == module && *t != "-")?;
    Some(format!("{to_prefix}{layer}.{to}.{kind}"))
}

/// The heads by which llama.cpp's converter permutes the rows of the tensor
/// with HF name `hf`: q and k of its Llama-family models; `None` for any other.
pub fn permuted_heads(hf: &str, config: &ModelConfig) -> Option<usize> {
    if !config.architecture.gguf_permutes_qk() {
        return None;
    }
    if hf.ends_with("self_attn.q_proj.weight") {
        Some(config.num_attention_heads)
    } else if hf.ends_with("self_attn.k_proj.weight") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's row permutation of q_proj/k_proj: GGUF interleaves the
/// two rotary halves of each head; HF keeps them as contiguous halves.
pub fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_heads / 2;
    Ok(w.reshape((n_heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The row order [`unpermute`] gives a tensor of `rows` rows: row `r` of the
/// result is row `order[r]` of the GGUF's.
pub fn unpermuted_order(rows: usize, n_heads: usize) -> Result<Vec<usize>> {
    let index = Tensor::arange(0u32, rows as u32, &Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((rows, 1))?;
    let order = unpermute(&index, n_heads)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(order.into_iter().map(|r| r as usize).collect())
}

/// The inverse of [`unpermute`], as llama.cpp's converter applies it.
pub fn permute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / n_heads / 2;
    Ok(w.reshape((n_heads, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests;
