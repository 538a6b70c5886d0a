//! Adapters written by training: loading them back and merging, and the bad
//! settings and inputs that are refused.

use super::*;

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
    let refused = |lora: LoraConfig| {
        Trainer::new(tiny(), lora, config(), out.path())
            .err()
            .unwrap()
            .to_string()
    };
    let err = refused(LoraConfig {
        r: 0,
        ..Default::default()
    });
    assert!(err.contains("r = 0"), "{err}");
    let err = refused(LoraConfig {
        target_modules: vec!["qkv".into()],
        ..Default::default()
    });
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

/// Merging an adapter into a base held in blocks requantizes each merged
/// weight into its format, on every device; the GPU's merged blocks are the
/// CPU's (but for a rounding step where the two products of the adapter
/// land on either side of one).
#[test]
fn merging_into_blocks_requantizes_on_every_device() {
    // Q8_0's rounding step for a block holding the matrix's largest value.
    let q8_step = |w: &Tensor| {
        let largest: f32 = w.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        largest / 127.0
    };
    let merged_on = |device: &Device| {
        let mut model = tiny_held(device, Quantize::Q8_0);
        let before = model.lm.layers[0].linears()[0].1.weight.to_dense().unwrap();
        lora::attach(&mut model.lm, &LoraConfig::default(), 3).unwrap();
        shift_adapters(&model, 0.02);
        let delta = model.lm.layers[0].linears()[0]
            .1
            .lora
            .as_ref()
            .unwrap()
            .delta()
            .unwrap();
        assert_eq!(lora::merge(&mut model.lm).unwrap(), 2 * 7);
        let weight = &model.lm.layers[0].linears()[0].1.weight;
        let tuneforge::model::FrozenWeight::Quantized(q) = weight else {
            panic!("the merged weight left its blocks on {device:?}");
        };
        assert_eq!(q.format(), candle_core::quantized::GgmlDType::Q8_0);
        let after = weight.to_dense().unwrap();
        let want = (&before + &delta).unwrap();
        // Within half a Q8_0 step of the matrix's largest value (a block's
        // step is at most that).
        assert!(
            common::max_abs_diff(&after, &want) <= 0.51 * q8_step(&want),
            "{device:?}"
        );
        assert!(common::max_abs_diff(&after, &before) > 0.0, "{device:?}");
        after.to_device(&Device::Cpu).unwrap()
    };
    let on_cpu = merged_on(&Device::Cpu);
    if let Some(gpu) = tuneforge::device::gpu_or_say_why() {
        let on_gpu = merged_on(&gpu);
        assert!(common::max_abs_diff(&on_cpu, &on_gpu) <= 1.01 * q8_step(&on_cpu));
    }
}
