//! LoRA training on a tiny random model: gradients, accumulation, reproducibility,
//! resuming, divergence, adapters and merging, and bad input.

mod common;

use candle_core::{Device, Tensor, Var};
use std::path::Path;
use std::sync::atomic::Ordering;
use tuneforge::data::{plan_epoch, Dataset, Record};
use tuneforge::rng::Rng;
use tuneforge::train::{step_gradients, Event, Outcome, TrainConfig, Trainer};
use tuneforge::{adapter, lora, Architecture, LoadOptions, LoraConfig, Message, Model, Quantize};

fn tiny() -> Model {
    Model::tiny_random(Architecture::Llama, 11).unwrap()
}

/// [`tiny`]'s weights, on `device`.
fn tiny_on(device: &Device) -> Model {
    tiny_held(device, Quantize::None)
}

/// [`tiny`]'s weights, on `device`, the linears held as `quantize` asks.
fn tiny_held(device: &Device, quantize: Quantize) -> Model {
    let config = tuneforge::ModelConfig::tiny(Architecture::Llama);
    Model::random_held(&config, 11, candle_core::DType::F32, device, quantize).unwrap()
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| match i % 3 {
            0 => Record::Completion {
                prompt: format!("ticket {i}: refund please"),
                completion: format!("{{\"label\": \"billing\", \"n\": {i}}}"),
            },
            1 => Record::Chat(vec![
                Message::system("triage"),
                Message::user(format!("app crashed {i}")),
                Message::assistant("bug"),
                Message::user("sure?"),
                Message::assistant(format!("yes {i}")),
            ]),
            _ => Record::Text(format!("plain text example number {i}")),
        })
        .collect()
}

fn data() -> Dataset {
    Dataset {
        train: records(16),
        valid: records(4),
        ..Default::default()
    }
}

fn config() -> TrainConfig {
    TrainConfig {
        batch_size: 4,
        max_steps: Some(6),
        learning_rate: 5e-3,
        progress: false,
        ..Default::default()
    }
}

fn logits(model: &Model) -> Tensor {
    model
        .lm
        .forward(&Tensor::new(&[[1u32, 80, 81, 82, 2, 90]], &Device::Cpu).unwrap())
        .unwrap()
}

/// The first `n` test records, tokenized for `model`.
fn examples(model: &Model, n: usize) -> Vec<tuneforge::data::Example> {
    tuneforge::data::tokenize(&records(n), &model.tokenizer, Default::default(), 64)
        .unwrap()
        .0
}

/// Moves every adapter parameter by `delta`, so that no factor is zero and every
/// gradient path is exercised.
fn shift_adapters(model: &Model, delta: f64) {
    for (_, var) in lora::parameters(&model.lm) {
        var.set(&(var.as_tensor() + delta).unwrap()).unwrap();
    }
}

/// A trainer that has taken one update, with its run in `dir`.
fn trained_one_step(dir: &Path) -> Trainer {
    let config = TrainConfig {
        max_steps: Some(1),
        ..config()
    };
    let mut trainer = Trainer::new(tiny(), LoraConfig::default(), config, dir).unwrap();
    trainer.train(&data()).unwrap();
    trainer
}

fn read_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Event>(l).unwrap())
        .filter_map(|e| match e {
            Event::Step { loss, .. } => Some(loss),
            _ => None,
        })
        .collect()
}

#[test]
fn fresh_adapters_leave_outputs_unchanged() {
    let mut model = tiny();
    let before = logits(&model);
    lora::attach(&mut model.lm, &LoraConfig::default(), 3).unwrap();
    assert_eq!(common::max_abs_diff(&before, &logits(&model)), 0.0);
    assert_eq!(
        lora::parameters(&model.lm).len(),
        2 * 7 * model.lm.layers.len()
    );
}

#[test]
fn every_lora_tensor_gets_a_gradient() {
    let out = tempfile::tempdir().unwrap();
    let trainer = trained_one_step(out.path());
    // After one update B is no longer zero, so both factors receive gradients.
    let (examples, _) = trainer.tokenize(&records(8)).unwrap();
    let plan = plan_epoch(&examples, 8, 1, None, &mut Rng::new(0));
    let update = step_gradients(trainer.model(), &examples, &plan[0], &[0], false).unwrap();
    for ((name, _), g) in trainer.optimizer().params().iter().zip(&update.gradients) {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    for device in common::devices() {
        lora_gradients_match_finite_differences_on(&device);
    }
}

/// The same through frozen weights kept in blocks (QLoRA), and through a
/// bf16 base on the CPU: the input gradient goes through the held weights
/// the forward read. They run their exact f32 products here: the bf16
/// kernel rounds every activation at a frozen product to bf16 (the int8
/// kernel to two 8-bit digits per group), which makes the loss a step
/// function at that resolution, too rough for finite differences; the next
/// test holds the kernels' gradients to these.
#[test]
fn lora_gradients_through_quantized_weights_match_finite_differences() {
    for quantize in [Quantize::Q8_0, Quantize::Q4_0, Quantize::Bf16] {
        let mut model = tiny_held(&Device::Cpu, quantize);
        model.lm.set_low_precision_kernels(false);
        assert!(model.lm.layers[0]
            .linears()
            .iter()
            .all(|(_, l)| l.weight.is_quantized()));
        assert!(
            model.lm.embed_tokens.is_quantized(),
            "{quantize}: embeddings"
        );
        lora_gradients_match_finite_differences_of(model);
    }
}

/// With the low-precision kernels (where the CPU has them), a held base's
/// LoRA gradients are those of its exact f32 products within the kernel's
/// rounding: the bf16 kernel (AVX512_BF16) for a bf16 base (measured: the
/// gradients off by 0.26% of their norm), the int8 kernel (AVX512_VNNI),
/// its activations rounded to two 8-bit digits per group, for Q8_0 and Q4_0
/// blocks (0.002-0.004%).
#[test]
fn low_precision_kernel_gradients_follow_the_exact_ones() {
    let cpu = tuneforge::cpu::features();
    for (quantize, kernel, tolerance, loss_tolerance) in [
        (Quantize::Bf16, cpu.bf16_kernel().is_some(), 0.02, 0.01),
        (Quantize::Q8_0, cpu.int8_kernel().is_some(), 5e-4, 1e-4),
        (Quantize::Q4_0, cpu.int8_kernel().is_some(), 5e-4, 1e-4),
    ] {
        if !kernel {
            eprintln!("skipped {quantize}: this CPU has no kernel for it");
            continue;
        }
        let mut model = tiny_held(&Device::Cpu, quantize);
        attach_checked_adapters(&mut model);
        let examples = examples(&model, 3);
        let plan = plan_epoch(&examples, 3, 1, None, &mut Rng::new(0));
        let flat = |update: tuneforge::train::Update| -> (f64, Vec<f32>) {
            let mut all = Vec::new();
            for g in update.gradients.iter().flatten() {
                all.extend(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            (update.loss, all)
        };
        let (kernel_loss, kernel) =
            flat(step_gradients(&model, &examples, &plan[0], &[0], false).unwrap());
        model.lm.set_low_precision_kernels(false);
        let (exact_loss, exact) =
            flat(step_gradients(&model, &examples, &plan[0], &[0], false).unwrap());
        assert_eq!(kernel.len(), exact.len());
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let diff: Vec<f32> = kernel.iter().zip(&exact).map(|(a, b)| a - b).collect();
        let relative = norm(&diff) / norm(&exact);
        eprintln!(
            "{quantize}: loss {kernel_loss} vs {exact_loss}, gradients off by {relative:.2e} of their norm"
        );
        assert!(relative > 0.0, "{quantize}: the kernel ran");
        assert!(
            relative < tolerance,
            "{quantize}: gradients off by {relative} of their norm"
        );
        assert!(
            (kernel_loss - exact_loss).abs() < loss_tolerance * exact_loss.abs(),
            "{quantize}: {kernel_loss} vs {exact_loss}"
        );
    }
}

/// Rank-2 adapters on every linear, B set to 0.05 so that A's gradient is
/// not zero: what the gradient checks differentiate.
fn attach_checked_adapters(model: &mut Model) {
    lora::attach(
        &mut model.lm,
        &LoraConfig {
            r: 2,
            ..Default::default()
        },
        5,
    )
    .unwrap();
    for (name, var) in lora::parameters(&model.lm) {
        if name.contains("lora_B") {
            var.set(&(var.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                .unwrap();
        }
    }
}

fn lora_gradients_match_finite_differences_on(device: &Device) {
    lora_gradients_match_finite_differences_of(tiny_on(device));
}

fn lora_gradients_match_finite_differences_of(mut model: Model) {
    let device = &model.lm.device().clone();
    attach_checked_adapters(&mut model);
    let examples = examples(&model, 3);
    let plan = plan_epoch(&examples, 3, 1, None, &mut Rng::new(0));
    let params = lora::parameters(&model.lm);
    let update = step_gradients(&model, &examples, &plan[0], &[0], false).unwrap();
    let loss_at = |var: &Var, idx: usize, delta: f32| -> f64 {
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut v = orig.clone();
        v[idx] += delta;
        var.set(&Tensor::from_vec(v, var.as_tensor().shape(), device).unwrap())
            .unwrap();
        let loss = step_gradients(&model, &examples, &plan[0], &[0], false)
            .unwrap()
            .loss;
        var.set(&Tensor::from_vec(orig, var.as_tensor().shape(), device).unwrap())
            .unwrap();
        loss
    };
    // The first and last layers' q_proj and down_proj factors, a few entries each.
    for (i, (name, var)) in params
        .iter()
        .enumerate()
        .filter(|(i, _)| [0, 1, 12, 13, params.len() - 2, params.len() - 1].contains(i))
    {
        let grad = update.gradients[i]
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for idx in [0, grad.len() / 2, grad.len() - 1] {
            let h = 1e-2;
            let numeric = (loss_at(var, idx, h) - loss_at(var, idx, -h)) / (2.0 * h as f64);
            let analytic = grad[idx] as f64;
            assert!(
                (analytic - numeric).abs() < 2e-3 + 0.05 * numeric.abs(),
                "{name}[{idx}] on {device:?}: analytic {analytic} vs numeric {numeric}"
            );
        }
    }
}

#[test]
fn batch_8_equals_batch_2_with_accumulation_4() {
    let model_a = {
        let mut m = tiny();
        lora::attach(&mut m.lm, &LoraConfig::default(), 9).unwrap();
        shift_adapters(&m, 0.01);
        m
    };
    let examples = examples(&model_a, 8);
    let one = plan_epoch(&examples, 8, 1, None, &mut Rng::new(3));
    let four = plan_epoch(&examples, 2, 4, None, &mut Rng::new(3));
    assert_eq!((one[0].len(), four[0].len()), (1, 4));
    let a = step_gradients(&model_a, &examples, &one[0], &[0], false).unwrap();
    let b = step_gradients(&model_a, &examples, &four[0], &[0, 0, 0, 0], false).unwrap();
    assert!((a.loss - b.loss).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
    assert_eq!(a.trained_tokens, b.trained_tokens);
    for (ga, gb) in a.gradients.iter().zip(&b.gradients) {
        let (ga, gb) = (ga.as_ref().unwrap(), gb.as_ref().unwrap());
        let scale: f32 = ga
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max_keepdim(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            common::max_abs_diff(ga, gb) <= 1e-4 * scale.max(1e-3),
            "gradients differ"
        );
    }
}

#[test]
fn same_seed_same_losses() {
    let run = || {
        let out = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(
            tiny(),
            LoraConfig {
                dropout: 0.1,
                ..Default::default()
            },
            config(),
            out.path(),
        )
        .unwrap();
        t.train(&data()).unwrap();
        read_losses(out.path())
    };
    let (a, b) = (run(), run());
    assert_eq!(a.len(), 6);
    assert_eq!(a, b);
    assert!(a[5] < a[0], "the loss goes down: {a:?}");
}

#[test]
fn resuming_continues_exactly() {
    let lora = LoraConfig {
        dropout: 0.1,
        ..Default::default()
    };
    let cfg = TrainConfig {
        eval_every: Some(2),
        ..config()
    };
    let whole = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(), lora.clone(), cfg.clone(), whole.path()).unwrap();
    t.train(&data()).unwrap();
    let want = read_losses(whole.path());

    let split = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(tiny(), lora, cfg, split.path()).unwrap();
    let stop = t.stop_flag();
    t.on_event(move |e| {
        if matches!(e, Event::Step { step: 3, .. }) {
            stop.store(true, Ordering::SeqCst)
        }
    });
    let report = t.train(&data()).unwrap();
    assert_eq!((report.outcome, report.steps), (Outcome::Interrupted, 3));
    assert!(split
        .path()
        .join("checkpoint/optimizer.safetensors")
        .is_file());
    let mut resumed = Trainer::resume(tiny(), split.path()).unwrap();
    let report = resumed.train(&data()).unwrap();
    assert_eq!((report.outcome, report.steps), (Outcome::Finished, 6));
    assert_eq!(read_losses(split.path()), want);
    // The final adapters are the same too.
    let a = candle_core::safetensors::load(whole.path().join(adapter::WEIGHTS_FILE), &Device::Cpu)
        .unwrap();
    let b = candle_core::safetensors::load(split.path().join(adapter::WEIGHTS_FILE), &Device::Cpu)
        .unwrap();
    for (k, t) in &a {
        assert_eq!(common::max_abs_diff(t, &b[k]), 0.0, "{k}");
    }
}

/// bf16 base weights, as on a GPU by default: the adapters and the optimizer's
/// moments stay f32, and training still lowers the validation loss. On the CPU,
/// and on the GPU when one is present.
#[test]
fn bf16_base_trains_with_f32_adapters_and_optimizer_state() {
    for device in common::devices() {
        let out = tempfile::tempdir().unwrap();
        let shape = tuneforge::ModelConfig::tiny(Architecture::Llama);
        let model = Model::random(&shape, 11, candle_core::DType::BF16, &device).unwrap();
        let cfg = TrainConfig {
            eval_every: Some(3),
            ..config()
        };
        let mut t = Trainer::new(model, LoraConfig::default(), cfg, out.path()).unwrap();
        let report = t.train(&data()).unwrap();
        assert!(
            report.final_valid_loss.unwrap() < report.initial_valid_loss.unwrap(),
            "{device:?}: {report:?}"
        );
        for file in [
            "adapter_model.safetensors",
            "checkpoint/optimizer.safetensors",
        ] {
            let saved =
                candle_core::safetensors::load(out.path().join(file), &Device::Cpu).unwrap();
            assert!(!saved.is_empty());
            for (name, t) in saved {
                assert_eq!(
                    t.dtype(),
                    candle_core::DType::F32,
                    "{device:?}: {file} {name}"
                );
            }
        }
    }
}

#[test]
fn run_folder_has_everything() {
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        eval_every: Some(2),
        patience: Some(50),
        ..config()
    };
    let mut t = Trainer::new(tiny(), LoraConfig::default(), cfg, out.path()).unwrap();
    let report = t.train(&data()).unwrap();
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "best/adapter_model.safetensors",
        "checkpoint/trainer_state.json",
        "metrics.jsonl",
        "loss.svg",
        "train_config.toml",
    ] {
        assert!(out.path().join(f).is_file(), "missing {f}");
    }
    assert!(report.final_valid_loss.unwrap() < report.initial_valid_loss.unwrap());
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["peft_type"], "LORA");
    assert_eq!(peft["task_type"], "CAUSAL_LM");
    assert_eq!(peft["base_model_name_or_path"], "tuneforge/tiny-random");
    assert_eq!(peft["r"], 8);
    assert_eq!(peft["bias"], "none");
    assert_eq!(peft["inference_mode"], true);
    assert_eq!(peft["target_modules"].as_array().unwrap().len(), 7);
    let weights =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let a = &weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[8, 32]);
    assert_eq!(b.dims(), &[32, 8]);
    assert!(std::fs::read_to_string(out.path().join("loss.svg"))
        .unwrap()
        .contains("<svg"));

    // The same folder is refused without --overwrite, and accepted after it.
    let err = Trainer::new(tiny(), LoraConfig::default(), config(), out.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already holds a training run"), "{err}");
    Trainer::overwrite(out.path()).unwrap();
    Trainer::new(tiny(), LoraConfig::default(), config(), out.path()).unwrap();
}

#[test]
fn early_stopping_stops() {
    let out = tempfile::tempdir().unwrap();
    // A learning rate so small nothing improves measurably after the first evaluation.
    let cfg = TrainConfig {
        eval_every: Some(1),
        patience: Some(1),
        max_steps: Some(20),
        learning_rate: 1e-12,
        schedule: tuneforge::train::Schedule::Constant,
        ..config()
    };
    let mut t = Trainer::new(tiny(), LoraConfig::default(), cfg, out.path()).unwrap();
    let report = t.train(&data()).unwrap();
    assert_eq!(report.outcome, Outcome::EarlyStopped);
    assert!(report.steps < 20);
}

#[test]
fn divergence_stops_with_a_clear_message_and_keeps_the_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        learning_rate: 1e30,
        clip_grad_norm: None,
        save_every: Some(1),
        schedule: tuneforge::train::Schedule::Constant,
        max_steps: Some(8),
        ..config()
    };
    let mut t = Trainer::new(tiny(), LoraConfig::default(), cfg, out.path()).unwrap();
    let err = t.train(&data()).unwrap_err().to_string();
    assert!(
        err.contains("diverged") && err.contains("checkpoint"),
        "{err}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("checkpoint/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert!(state["step"].as_u64().unwrap() >= 1);
    adapter::load(&mut tiny().lm, &out.path().join("checkpoint")).unwrap();
}

#[test]
fn adapters_load_back_and_merge() {
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(
        tiny(),
        LoraConfig {
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            layers: Some(vec![1]),
            use_rslora: true,
            ..Default::default()
        },
        config(),
        out.path(),
    )
    .unwrap();
    t.train(&data()).unwrap();
    let trained = t.into_model();
    let want = logits(&trained);
    assert!(
        common::max_abs_diff(&want, &logits(&tiny())) > 0.0,
        "training changed the model"
    );

    let mut loaded = tiny();
    let cfg = adapter::load(&mut loaded.lm, out.path()).unwrap();
    assert_eq!(
        cfg.layers_to_transform,
        Some(adapter::LayerList::List(vec![1]))
    );
    assert_eq!(common::max_abs_diff(&want, &logits(&loaded)), 0.0);

    lora::merge(&mut loaded.lm).unwrap();
    assert!(lora::parameters(&loaded.lm).is_empty());
    assert!(common::max_abs_diff(&want, &logits(&loaded)) < 1e-4);
    let merged = tempfile::tempdir().unwrap();
    loaded
        .save_hf(merged.path(), candle_core::DType::F32)
        .unwrap();
    let back = Model::load(merged.path().to_str().unwrap(), &LoadOptions::f32_base()).unwrap();
    assert!(common::max_abs_diff(&want, &logits(&back)) < 1e-4);
}

#[test]
fn bad_lora_settings_are_refused() {
    let out = tempfile::tempdir().unwrap();
    let err = Trainer::new(
        tiny(),
        LoraConfig {
            r: 0,
            ..Default::default()
        },
        config(),
        out.path(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("r = 0"), "{err}");
    let err = Trainer::new(
        tiny(),
        LoraConfig {
            target_modules: vec!["qkv".into()],
            ..Default::default()
        },
        config(),
        out.path(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("'qkv'")
            && err.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        "{err}"
    );
    assert!(
        !out.path().join("train_config.toml").exists(),
        "nothing was written for a refused run"
    );
}

#[test]
fn adapter_for_another_base_model_names_the_tensor() {
    let out = tempfile::tempdir().unwrap();
    trained_one_step(out.path());
    let mut other_config = tuneforge::ModelConfig::tiny(Architecture::Llama);
    other_config.hidden_size = 48;
    other_config.head_dim = 12;
    let mut other =
        tuneforge::CausalLm::random(&other_config, 1, candle_core::DType::F32, &Device::Cpu)
            .unwrap();
    let err = adapter::load(&mut other, out.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
            && err.contains("different base model"),
        "{err}"
    );
    let cfg = adapter::read_config(out.path()).unwrap();
    let err = adapter::check_base_model(
        &cfg,
        out.path(),
        Some("HuggingFaceTB/SmolLM2-135M-Instruct"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tuneforge/tiny-random"), "{err}");
}

#[test]
fn data_folder_without_train_jsonl_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("valid.jsonl"), "{\"text\": \"x\"}\n").unwrap();
    let err = Dataset::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no train.jsonl"), "{err}");
}

#[test]
fn packing_trains_too() {
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(
        tiny(),
        LoraConfig::default(),
        TrainConfig {
            packing: true,
            max_seq_len: 128,
            ..config()
        },
        out.path(),
    )
    .unwrap();
    let report = t.train(&data()).unwrap();
    assert_eq!(report.steps, 6);
    let losses = read_losses(out.path());
    assert!(losses.iter().all(|l| l.is_finite()));
}

#[test]
fn hand_written_backward_equals_autograd() {
    for device in common::devices() {
        hand_written_backward_equals_autograd_on(&device);
    }
}

/// One update's loss and LoRA gradients on the GPU equal the CPU's (f32, with
/// dropout: both devices draw the same masks).
#[test]
fn gpu_and_cpu_take_the_same_update() {
    let Some(gpu) = tuneforge::device::gpu_or_say_why() else {
        return;
    };
    let update_on = |device: &Device| {
        let mut model = tiny_on(device);
        let lora_config = LoraConfig {
            dropout: 0.1,
            ..Default::default()
        };
        lora::attach(&mut model.lm, &lora_config, 3).unwrap();
        shift_adapters(&model, 0.02);
        let examples = examples(&model, 6);
        let plan = plan_epoch(&examples, 3, 1, None, &mut Rng::new(0));
        step_gradients(&model, &examples, &plan[0], &[9], true).unwrap()
    };
    let (cpu, on_gpu) = (update_on(&Device::Cpu), update_on(&gpu));
    assert!(
        (cpu.loss - on_gpu.loss).abs() < 1e-4,
        "{} vs {}",
        cpu.loss,
        on_gpu.loss
    );
    for (i, (c, g)) in cpu.gradients.iter().zip(&on_gpu.gradients).enumerate() {
        let (c, g) = (c.as_ref().unwrap(), g.as_ref().unwrap());
        let g = g.to_device(&Device::Cpu).unwrap();
        let scale = common::max_abs_diff(c, &c.zeros_like().unwrap());
        let diff = common::max_abs_diff(c, &g);
        assert!(
            diff <= 1e-3 * scale + 1e-6,
            "gradient {i}: off by {diff} (scale {scale})"
        );
    }
}

fn hand_written_backward_equals_autograd_on(device: &Device) {
    for arch in Architecture::ALL {
        let config = tuneforge::ModelConfig::tiny(arch);
        let mut model = Model::random(&config, 4, candle_core::DType::F32, device).unwrap();
        lora::attach(
            &mut model.lm,
            &LoraConfig {
                r: 4,
                dropout: 0.2,
                ..Default::default()
            },
            1,
        )
        .unwrap();
        shift_adapters(&model, 0.03);
        let examples = examples(&model, 5);
        // Two packed rows and one plain row, padded: long enough that the backward
        // makes the attention probabilities again. Then two short plain rows, whose
        // probabilities it keeps.
        let mut kept = Vec::new();
        for layout in [
            vec![vec![0, 1], vec![2], vec![3, 4]],
            vec![vec![2], vec![4]],
        ] {
            let batch =
                tuneforge::data::make_batch(&examples, &layout, 0, candle_core::DType::F32, device)
                    .unwrap();
            kept.push(model.lm.layers[0].keeps_probs(batch.targets.dim(1).unwrap()));
            backward_equals_autograd(&model, &batch, &format!("{arch:?} on {device:?}"));
        }
        assert_eq!(
            kept,
            [false, true],
            "both ways of getting the probabilities"
        );
    }
}

/// The hand-written backward's loss and LoRA gradients on `batch` equal candle's
/// autograd's, with dropout, with and without recomputation.
fn backward_equals_autograd(model: &Model, batch: &tuneforge::data::Batch, what: &str) {
    use tuneforge::model::Pass;
    let weight = 1.0 / batch.trained_tokens as f64;

    let mut input = batch.input.clone();
    input.pass = Pass {
        dropout_seed: Some(7),
        autograd: true,
    };
    let hidden = model.lm.forward_hidden(&input, None).unwrap();
    let loss = (tuneforge::train::loss::summed_cross_entropy(
        &model.lm,
        &hidden,
        &batch.targets,
        &batch.trained,
    )
    .unwrap()
        * weight)
        .unwrap();
    let store = loss.backward().unwrap();
    let want_loss = loss.to_scalar::<f32>().unwrap() as f64;

    for recompute in [false, true] {
        let pass = Pass {
            dropout_seed: Some(7),
            autograd: false,
        };
        let (summed, grads) =
            tuneforge::train::step::loss_and_gradients(&model.lm, batch, pass, weight, recompute)
                .unwrap();
        assert!(
            (summed * weight - want_loss).abs() < 1e-5,
            "{what}: loss {} vs {want_loss}",
            summed * weight
        );
        let params = lora::parameters(&model.lm);
        assert_eq!(grads.len(), params.len());
        for ((name, var), got) in params.iter().zip(&grads) {
            let want = store
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("autograd missed {name}"));
            let got = got.as_ref().unwrap();
            let scale = common::max_abs_diff(want, &want.zeros_like().unwrap());
            let diff = common::max_abs_diff(want, got);
            assert!(
                diff <= 1e-4 * scale.max(1e-6) + 1e-7,
                "{what} recompute={recompute} {name}: differs by {diff} (scale {scale})"
            );
        }
    }
}
