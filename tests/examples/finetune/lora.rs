//! `finetune`'s LoRA flags: the rank, alpha, dropout, target modules and rsLoRA,
//! each checked in the adapter's `adapter_config.json` and tensors.

use super::*;

pub fn rank(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-rank", &["--rank", "4"]);
    assert_eq!(int(setting(&out, "lora.r")), 4);
    assert_eq!(adapter_config(&out)["r"], 4);
    for (name, t) in adapter_tensors(&out) {
        let r = if name.contains("lora_A") {
            t.dims()[0]
        } else {
            t.dims()[1]
        };
        assert_eq!(r, 4, "{name}");
    }
}

pub fn alpha(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-alpha", &["--alpha", "3"]);
    assert_eq!(float(setting(&out, "lora.alpha")), 3.0);
    assert_eq!(adapter_config(&out)["lora_alpha"], 3.0);
    assert_ne!(
        losses(&out)[1..],
        losses(baseline(fx))[1..],
        "the scale changes training"
    );
}

pub fn dropout(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-dropout", &["--dropout", "0.3"]);
    assert_eq!(float(setting(&out, "lora.dropout")), 0.3);
    assert_eq!(adapter_config(&out)["lora_dropout"], 0.3);
    // B starts at zero, so the first loss is the base model's either way.
    assert_ne!(losses(&out)[1..], losses(baseline(fx))[1..]);
}

pub fn targets(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-targets", &["--targets", "q_proj,v_proj"]);
    let tensors = adapter_tensors(&out);
    let layers = adapter_tensors(baseline(fx)).len() / (2 * 7);
    assert_eq!(tensors.len(), 2 * 2 * layers);
    assert!(tensors
        .keys()
        .all(|k| k.contains("q_proj") || k.contains("v_proj")));
    let err = run::fails(
        "finetune",
        &[
            "--targets",
            "qkv",
            "--model",
            fx.model_arg(),
            "--out",
            fx.path("x").to_str().unwrap(),
        ],
    );
    assert!(err.contains("qkv") && err.contains("q_proj"), "{err}");
}

pub fn rslora(fx: &Fixture) {
    let (out, _) = finetune(fx, "finetune-rslora", &["--rslora"]);
    assert_eq!(
        setting(&out, "lora.use_rslora"),
        Some(toml::Value::Boolean(true))
    );
    assert_eq!(adapter_config(&out)["use_rslora"], true);
    assert_ne!(losses(&out)[1..], losses(baseline(fx))[1..]);
}
