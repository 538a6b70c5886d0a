//! Parity with transformers (float32, eager attention) on tiny random models of
//! the newer architectures: one folder per architecture under
//! `tests/fixtures/archs` (see its README), each an HF-layout model with a PEFT
//! adapter, a GGUF that llama.cpp's converter wrote from it, and what
//! transformers computed (`reference.json`). `TUNEFORGE_ARCH_FIXTURES` points
//! the tests at other folders made the same way.

mod common;

use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::PathBuf;
use tuneforge::data::{Dataset, Example, Record};
use tuneforge::train::{TrainConfig, Trainer};
use tuneforge::{lora, GenerationConfig, LoadOptions, LoraConfig, Message, Model};

/// The architectures with fixtures.
const ARCHS: [&str; 5] = ["qwen3", "smollm3", "gemma3", "gemma2", "phi3"];
const LOGIT_TOL: f64 = 1e-3;
const LOSS_TOL: f64 = 1e-4;

fn fixture_dir(arch: &str) -> PathBuf {
    let root = std::env::var_os("TUNEFORGE_ARCH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/archs"));
    root.join(arch)
}

fn reference(arch: &str) -> Value {
    let path = fixture_dir(arch).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The fixture model from its HF folder, or from the GGUF llama.cpp wrote.
fn load(arch: &str, gguf: bool) -> Model {
    let dir = fixture_dir(arch);
    let path = if gguf { dir.join("model.gguf") } else { dir };
    Model::load(path.to_str().unwrap(), &LoadOptions::f32_base())
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

fn with_adapter(arch: &str) -> Model {
    let mut model = load(arch, false);
    model
        .load_adapter(&fixture_dir(arch).join("adapter"))
        .unwrap();
    model
}

/// The reference batch's rows without their right padding.
fn rows(r: &Value) -> Vec<Vec<u32>> {
    let ids = r["input_ids"].as_array().unwrap();
    let mask = r["attention_mask"].as_array().unwrap();
    ids.iter()
        .zip(mask)
        .map(|(ids, mask)| {
            let n = mask
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m.as_u64() == Some(1))
                .count();
            common::ids(ids)[..n].to_vec()
        })
        .collect()
}

/// Logits of each row at its real positions against the reference's.
fn check_logits(arch: &str, what: &str, model: &Model, want: &Value) {
    for (i, row) in rows(&reference(arch)).iter().enumerate() {
        let ids = Tensor::new(row.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = model.lm.forward(&ids).unwrap().squeeze(0).unwrap();
        let want: Vec<Vec<f32>> = want[i].as_array().unwrap()[..row.len()]
            .iter()
            .map(|p| common::floats(p).iter().map(|&x| x as f32).collect())
            .collect();
        let want = Tensor::new(want, &Device::Cpu).unwrap();
        let diff = common::max_abs_diff(&got, &want) as f64;
        assert!(
            diff <= LOGIT_TOL,
            "{arch} {what} row {i}: logits off by {diff}"
        );
    }
}

/// Examples of the reference rows, trained where `labels` is not -100 (or on
/// every real position after the first).
fn examples(arch: &str, labels: Option<&Value>) -> Vec<Example> {
    rows(&reference(arch))
        .into_iter()
        .enumerate()
        .map(|(i, ids)| {
            let trained = (0..ids.len())
                .map(|p| match labels {
                    Some(l) => l[i][p].as_i64() != Some(-100),
                    None => p > 0,
                })
                .collect();
            Example { ids, trained }
        })
        .collect()
}

/// The mean next-token loss over the trained positions of `examples`.
fn mean_loss(model: &Model, examples: &[Example]) -> f64 {
    let rows: Vec<Vec<usize>> = (0..examples.len()).map(|i| vec![i]).collect();
    let (sum, n) = tuneforge::train::summed_loss(model, examples, &rows).unwrap();
    sum / n as f64
}

fn assert_loss(arch: &str, what: &str, got: f64, want: &Value) {
    let want = want.as_f64().unwrap();
    assert!(
        (got - want).abs() <= LOSS_TOL,
        "{arch} {what}: loss {got}, reference {want}"
    );
}

/// 16 greedy tokens after `prompt`, not stopping at end of turn, as the reference made them.
fn greedy(model: &Model, prompt: &[u32]) -> Vec<u32> {
    let config = GenerationConfig {
        max_new_tokens: 16,
        stop_at_eos: false,
        ..GenerationConfig::greedy(16)
    };
    tuneforge::generate::generate(&model.lm, &model.tokenizer, prompt, &config, &mut |_| {})
        .unwrap()
        .ids
}

#[test]
fn the_chat_prompt_renders_and_tokenizes_as_the_reference() {
    for arch in ARCHS {
        let chat = &reference(arch)["chat"];
        let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        for gguf in [false, true] {
            let model = load(arch, gguf);
            let rendered = model
                .tokenizer
                .apply_chat_template(&messages, true)
                .unwrap();
            assert_eq!(
                rendered,
                chat["rendered"].as_str().unwrap(),
                "{arch} gguf={gguf}"
            );
            assert_eq!(
                model.chat_prompt_ids(&messages).unwrap(),
                common::ids(&chat["ids"])
            );
        }
    }
}

#[test]
fn logits_and_loss_match_from_safetensors_and_gguf() {
    for arch in ARCHS {
        let r = reference(arch);
        for gguf in [false, true] {
            let model = load(arch, gguf);
            let what = if gguf { "GGUF" } else { "safetensors" };
            check_logits(arch, what, &model, &r["logits"]);
            assert_loss(
                arch,
                what,
                mean_loss(&model, &examples(arch, None)),
                &r["loss"],
            );
        }
    }
}

#[test]
fn the_peft_adapter_gives_the_reference_logits_losses_and_gradients() {
    for arch in ARCHS {
        let r = reference(arch);
        let lora_ref = &r["lora"];
        let model = with_adapter(arch);
        check_logits(arch, "with the adapter", &model, &lora_ref["logits"]);
        assert_loss(
            arch,
            "with the adapter",
            mean_loss(&model, &examples(arch, None)),
            &lora_ref["loss"],
        );
        let masked = examples(arch, Some(&lora_ref["masked_labels"]));
        assert_loss(
            arch,
            "masked",
            mean_loss(&model, &masked),
            &lora_ref["masked_loss"],
        );

        let group = vec![(0..masked.len()).map(|i| vec![i]).collect::<Vec<_>>()];
        let update =
            tuneforge::train::step_gradients(&model, &masked, &group, &[0], false).unwrap();
        let params = lora::parameters(&model.lm);
        assert_eq!(params.len(), lora_ref["grad_l2"].as_object().unwrap().len());
        for ((name, _), grad) in params.iter().zip(&update.gradients) {
            let got = grad.as_ref().unwrap().sqr().unwrap().sum_all().unwrap();
            let got = got.to_scalar::<f32>().unwrap().sqrt() as f64;
            let want = lora_ref["grad_l2"][name]
                .as_f64()
                .unwrap_or_else(|| panic!("no {name}"));
            assert!(
                (got - want).abs() <= 0.01 * want,
                "{arch} {name}: |grad| {got}, reference {want}"
            );
        }
    }
}

#[test]
fn greedy_tokens_match_for_the_base_and_the_merged_model() {
    for arch in ARCHS {
        let r = reference(arch);
        let prefix = &rows(&r)[0][..8];
        let model = load(arch, false);
        assert_eq!(
            greedy(&model, prefix),
            common::ids(&r["greedy_row0_prefix8"]),
            "{arch}"
        );
        let chat = common::ids(&r["chat"]["ids"]);
        assert_eq!(
            greedy(&model, &chat),
            common::ids(&r["chat"]["greedy_ids"]),
            "{arch} chat"
        );
        let mut merged = with_adapter(arch);
        merged.merge_adapters().unwrap();
        assert_eq!(
            greedy(&merged, prefix),
            common::ids(&r["lora"]["merged_greedy_row0_prefix8"]),
            "{arch} merged"
        );
        let gguf = load(arch, true);
        assert_eq!(
            greedy(&gguf, prefix),
            common::ids(&r["greedy_row0_prefix8"]),
            "{arch} GGUF"
        );
    }
}

/// Saved in HF layout and loaded back, the model computes the same logits.
#[test]
fn save_hf_round_trips() {
    for arch in ARCHS {
        let model = load(arch, true);
        let dir = tempfile::tempdir().unwrap();
        model.save_hf(dir.path(), candle_core::DType::F32).unwrap();
        let back = Model::load(dir.path().to_str().unwrap(), &LoadOptions::f32_base()).unwrap();
        assert_eq!(back.config(), model.config(), "{arch}");
        let ids = Tensor::new(&[[1u32, 80, 81, 82, 2, 90]], &Device::Cpu).unwrap();
        let diff = common::max_abs_diff(
            &model.lm.forward(&ids).unwrap(),
            &back.lm.forward(&ids).unwrap(),
        );
        assert!(diff < 1e-5, "{arch}: {diff}");
    }
}

/// A few training steps lower the loss and write an adapter under the same
/// PEFT names as the fixture adapter.
#[test]
fn training_lowers_the_loss_and_writes_peft_names() {
    for arch in ARCHS {
        let model = load(arch, false);
        let record = |i: usize| Record::Completion {
            prompt: format!("ticket {i}"),
            completion: format!("label {}", i % 2),
        };
        let data = Dataset {
            train: (0..8).map(record).collect(),
            valid: (8..12).map(record).collect(),
            ..Default::default()
        };
        let config = TrainConfig {
            max_steps: Some(8),
            batch_size: 4,
            learning_rate: 1e-2,
            progress: false,
            ..Default::default()
        };
        let out = tempfile::tempdir().unwrap();
        let mut trainer = Trainer::new(model, LoraConfig::default(), config, out.path()).unwrap();
        let report = trainer.train(&data).unwrap();
        let (before, after) = (
            report.initial_valid_loss.unwrap(),
            report.final_valid_loss.unwrap(),
        );
        assert!(
            after < before,
            "{arch}: validation loss {before} -> {after}"
        );
        let keys = |dir: PathBuf| {
            let mut k: Vec<String> =
                candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
                    .unwrap()
                    .into_keys()
                    .collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(out.path().to_path_buf()),
            keys(fixture_dir(arch).join("adapter")),
            "{arch}"
        );
    }
}

/// An adapter made for another architecture is refused, naming the first of its
/// modules this model lacks: Phi-3's fused `gate_up_proj` on a Qwen3 model (its
/// `down_proj`, `o_proj` shapes fit, so only the names tell).
#[test]
fn an_adapter_for_another_architecture_names_the_missing_module() {
    let mut model = load("qwen3", false);
    let phi3 = fixture_dir("phi3").join("adapter");
    let err = format!("{:#}", model.load_adapter(&phi3).unwrap_err());
    assert!(
        err.contains("gate_up_proj") && err.contains("matches no layer"),
        "{err}"
    );
    // Gemma 3's adapter has the same module names but a third layer.
    let err = format!(
        "{:#}",
        model
            .load_adapter(&fixture_dir("gemma3").join("adapter"))
            .unwrap_err()
    );
    assert!(err.contains("layers.2."), "{err}");
}

/// `compare` runs on every architecture: prompting variants and the fixture
/// adapter, each scored.
#[test]
fn compare_scores_every_variant() {
    use tuneforge::eval::{compare, CompareConfig, HeldOut};
    let held = |range: std::ops::Range<usize>| -> Vec<HeldOut> {
        range
            .map(|i| {
                let record = Record::Completion {
                    prompt: format!("ticket {i}"),
                    completion: format!("label {}", i % 2),
                };
                HeldOut::from_record(&record).unwrap()
            })
            .collect()
    };
    let config = CompareConfig {
        shots: 1,
        generation: GenerationConfig::greedy(4),
        progress: false,
        ..Default::default()
    };
    for arch in ARCHS {
        let mut model = load(arch, false);
        let adapter = fixture_dir(arch).join("adapter");
        let c = compare(&mut model, &[adapter], &held(0..2), &held(10..14), &config).unwrap();
        // Zero-shot, instruction, retrieved, 3 random draws, many-shot, and
        // the adapter alone and with the instruction; these plain-text answers
        // get no JSON-constrained variant.
        assert_eq!(c.variants.len(), 9, "{arch}");
        assert!(
            c.variants.iter().any(|v| v.name.contains("many-shot")),
            "{arch}"
        );
        assert!(
            c.variants
                .iter()
                .all(|v| v.outputs.len() == 2 && v.nll.is_finite()),
            "{arch}"
        );
    }
}

/// Phi-3's LongRoPE in the older config.json schema that Phi-3 and Phi-4-mini
/// repos carry (`rope_scaling` of type longrope, `partial_rotary_factor` and
/// `original_max_position_embeddings` at the top level): the fixture's weights
/// with a pretrained context of 16 extended to 64 give transformers' logits on
/// a sequence within the pretrained context (short factors) and on one beyond
/// it (long factors at every position), so the long factors are not just read
/// but used, with the attention factor on cos and sin.
#[test]
fn phi3_longrope_matches_transformers_within_and_beyond_the_pretrained_context() {
    let src = fixture_dir("phi3");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("longrope.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let config_map = config.as_object_mut().unwrap();
    config_map.remove("rope_parameters");
    config_map.insert("rope_theta".into(), 10_000.0.into());
    for (k, v) in reference["config_overrides"].as_object().unwrap() {
        config_map.insert(k.clone(), v.clone());
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let model = Model::load(dir.path().to_str().unwrap(), &LoadOptions::f32_base()).unwrap();
    let lr = model.lm.config.longrope.as_ref().expect("longrope is read");
    assert_eq!(lr.original_max_position_embeddings, 16);
    assert_eq!(model.lm.config.rotary_dim, Some(12));
    for row in ["short", "long"] {
        let ids = common::ids(&reference[row]["ids"]);
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let got = model.lm.forward(&ids).unwrap().squeeze(0).unwrap();
        let want: Vec<Vec<f32>> = reference[row]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| common::floats(p).iter().map(|&x| x as f32).collect())
            .collect();
        let diff = common::max_abs_diff(&got, &Tensor::new(want, &Device::Cpu).unwrap()) as f64;
        assert!(diff <= LOGIT_TOL, "longrope {row}: logits off by {diff}");
    }
}
