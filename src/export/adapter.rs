//! A LoRA adapter in llama.cpp's adapter format (`llama-cli --lora`, Ollama's
//! `ADAPTER`): `general.type = adapter`, `adapter.type = lora`, the alpha, the
//! base's architecture, and each adapted linear's factors named after the base
//! tensor with `.lora_a` / `.lora_b`.

use super::gguf::{gguf_architecture, write};
use crate::model::CausalLm;
use crate::weights::{gguf_name, permute, permuted_heads};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device};
use std::path::Path;

/// Writes the adapters attached to `model` to `path`. llama.cpp scales an
/// adapter by `alpha / rank`, so the alpha written is `scale · rank`, which is
/// the trained alpha for plain LoRA and carries rsLoRA's `alpha / √r` too.
/// Returns how many linears it holds.
pub fn write_adapter(model: &CausalLm, name: &str, path: &Path) -> Result<usize> {
    let c = &model.config;
    let arch = c.architecture;
    let mut tensors = Vec::new();
    let mut scale_rank = None;
    for (i, layer) in model.layers.iter().enumerate() {
        for (module, linear) in layer.linears() {
            let Some(lora) = &linear.lora else { continue };
            let hf = format!("model.layers.{i}.{module}.weight");
            let base = gguf_name(&hf, arch)
                .with_context(|| format!("{hf} has no llama.cpp name for {arch:?}"))?;
            let (r, _) = lora.a.dims2()?;
            let alpha = lora.scale * r as f64;
            match scale_rank {
                None => scale_rank = Some((lora.scale, r, alpha)),
                Some((s, rank, _)) if (s - lora.scale).abs() > 1e-12 || rank != r => bail!(
                    "llama.cpp's adapter format holds one alpha and rank, but {hf} has \
                     rank {r} and scale {} where others have rank {rank} and scale {s}",
                    lora.scale
                ),
                Some(_) => {}
            }
            let cpu = |t: &candle_core::Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
            let a = cpu(lora.a.as_tensor())?;
            let mut b = cpu(lora.b.as_tensor())?;
            // B's rows are the base's output rows: permuted where llama.cpp permutes q and k.
            if let Some(heads) = permuted_heads(&hf, c) {
                b = permute(&b, heads)?;
            }
            let f32 = candle_core::quantized::GgmlDType::F32;
            tensors.push((format!("{base}.lora_a"), QTensor::quantize(&a, f32)?));
            tensors.push((format!("{base}.lora_b"), QTensor::quantize(&b, f32)?));
        }
    }
    let Some((_, _, alpha)) = scale_rank else {
        bail!("the model has no LoRA adapters to export");
    };
    let metadata = vec![
        ("general.type".to_string(), Value::String("adapter".into())),
        (
            "general.architecture".to_string(),
            Value::String(gguf_architecture(arch).into()),
        ),
        ("general.name".to_string(), Value::String(name.into())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
    ];
    write(path, &metadata, &tensors)?;
    Ok(tensors.len() / 2)
}
