//! Training runs: reproducibility, resuming, a bf16 base, the run folder,
//! early stopping, divergence and packing.

use super::*;

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
