use super::*;
use crate::config::Llama3RopeScaling;

#[test]
fn missing_field_is_named() {
    let err = ModelConfig::from_hf_json(r#"{"model_type":"llama","vocab_size":10}"#).unwrap_err();
    assert!(format!("{err:#}").contains("hidden_size"), "{err:#}");
}

#[test]
fn hf_json_round_trips() {
    for arch in Architecture::ALL {
        let mut c = ModelConfig::tiny(arch);
        c.rope_scaling = Some(Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(back, c);
    }
}

#[test]
fn unsupported_architecture_is_refused() {
    let err = Architecture::parse("gpt_neox").unwrap_err().to_string();
    assert!(err.contains("gpt_neox") && err.contains("llama"), "{err}");
    assert!(err.contains("qwen3") && err.contains("smollm3"), "{err}");
    assert!(Architecture::parse("Qwen3MoeForCausalLM").is_err());
}

/// A Qwen3 config in transformers 5's schema and in the older one.
fn qwen3(rope: &str) -> String {
    format!(
        r#"{{"model_type": "qwen3", "vocab_size": 259, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, {rope}}}"#
    )
}

#[test]
fn both_config_schemas_give_the_rope_base() {
    let new = qwen3(r#""rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}"#);
    let old = qwen3(r#""rope_theta": 1000000.0, "rope_scaling": null"#);
    let (new, old) = (
        ModelConfig::from_hf_json(&new).unwrap(),
        ModelConfig::from_hf_json(&old).unwrap(),
    );
    assert_eq!(new, old);
    assert_eq!(
        (new.architecture, new.rope_theta),
        (Architecture::Qwen3, 1e6)
    );
    let llama3 = qwen3(
        r#""rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
    );
    let c = ModelConfig::from_hf_json(&llama3).unwrap();
    assert_eq!(c.rope_scaling.unwrap().factor, 32.0);
}

#[test]
fn unimplemented_rope_types_name_the_field() {
    for (rope, field) in [
        (
            r#""rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}"#,
            "rope_parameters.rope_type 'yarn'",
        ),
        (
            r#""rope_scaling": {"type": "dynamic", "factor": 2.0}"#,
            "rope_scaling.rope_type 'dynamic'",
        ),
    ] {
        let err = format!("{:#}", ModelConfig::from_hf_json(&qwen3(rope)).unwrap_err());
        assert!(
            err.contains(field) && err.contains("not implemented"),
            "{err}"
        );
    }
}

#[test]
fn gemma_fields_are_read_and_bad_ones_named() {
    let gemma3 = |extra: &str| {
        format!(
            r#"{{"model_type": "gemma3_text", "vocab_size": 259, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 256, "query_pre_attn_scalar": 16,
            "sliding_window": 6, "hidden_activation": "gelu_pytorch_tanh", {extra}}}"#
        )
    };
    let per_type = gemma3(
        r#""layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}"#,
    );
    let c = ModelConfig::from_hf_json(&per_type).unwrap();
    assert_eq!(c.architecture, Architecture::Gemma3);
    assert_eq!((c.rope_theta, c.rope_local_theta), (1e6, Some(1e4)));
    assert_eq!(
        (c.sliding_layers.clone(), c.sliding_window),
        (vec![0, 1], Some(6))
    );
    assert!(c.qk_norm && c.sandwich_norms && c.norm_weight_offset && c.scale_embeddings);
    // The older schema: rope_theta and rope_local_base_freq at the top level.
    let old = gemma3(
        r#""layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0"#,
    );
    assert_eq!(ModelConfig::from_hf_json(&old).unwrap(), c);
    let unknown =
        gemma3(r#""layer_types": ["sliding_attention", "chunked_attention", "full_attention"]"#);
    let err = format!("{:#}", ModelConfig::from_hf_json(&unknown).unwrap_err());
    assert!(err.contains("layer_types[1] 'chunked_attention'"), "{err}");
    let act = gemma3(r#""layer_types": ["full_attention", "full_attention", "full_attention"]"#)
        .replace("gelu_pytorch_tanh", "relu");
    let err = format!("{:#}", ModelConfig::from_hf_json(&act).unwrap_err());
    assert!(err.contains("hidden_activation 'relu'"), "{err}");
}

#[test]
fn smollm3_leaves_rope_out_where_no_rope_layers_says() {
    let base = r#"{"model_type": "smollm3", "vocab_size": 259, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 256"#;
    let given = format!(r#"{base}, "no_rope_layers": [1, 0, 1, 1, 1, 1, 1, 0]}}"#);
    assert_eq!(
        ModelConfig::from_hf_json(&given).unwrap().no_rope_layers,
        [1, 7]
    );
    // Without the list, transformers' default: every fourth layer.
    let default = format!("{base}}}");
    assert_eq!(
        ModelConfig::from_hf_json(&default).unwrap().no_rope_layers,
        [3, 7]
    );
    let wrong = format!(r#"{base}, "no_rope_layers": [1, 0]}}"#);
    let err = format!("{:#}", ModelConfig::from_hf_json(&wrong).unwrap_err());
    assert!(
        err.contains("no_rope_layers") && err.contains("8 layers"),
        "{err}"
    );
}

/// Phi-3 as Phi-4-mini's repo writes it: a partial rotary factor, LongRoPE,
/// and a sliding window on every layer where one is set; a LongRoPE
/// without its long factors is refused, naming the field.
#[test]
fn phi3_reads_partial_rotary_longrope_and_its_window() {
    let phi = |extra: &str| {
        format!(
            r#"{{"model_type": "phi3", "vocab_size": 259, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 1024, "original_max_position_embeddings": 256,
            "partial_rotary_factor": 0.75{extra}}}"#
        )
    };
    let factors = "[1, 1, 1, 1, 1, 1]";
    let c = ModelConfig::from_hf_json(&phi(&format!(
        r#", "sliding_window": 512, "rope_scaling": {{"type": "longrope",
        "short_factor": {factors}, "long_factor": {factors}}}"#
    )))
    .unwrap();
    assert!(c.fused_projections);
    assert_eq!((c.head_dim, c.rotary_dim()), (16, 12));
    assert_eq!(c.sliding_layers, [0, 1]);
    let lr = c.longrope.clone().unwrap();
    assert_eq!(lr.original_max_position_embeddings, 256);
    // √(1 + ln 4 / ln 256) = √1.25
    assert!((lr.attention_factor - 1.25f64.sqrt()).abs() < 1e-12);
    assert_eq!(
        ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap(),
        c
    );
    let err = ModelConfig::from_hf_json(&phi(&format!(
        r#", "rope_scaling": {{"type": "longrope", "short_factor": {factors}}}"#
    )))
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("rope_scaling.long_factor"),
        "{err:#}"
    );
}
