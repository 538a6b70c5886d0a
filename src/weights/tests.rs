use super::*;

#[test]
fn gguf_names_map_to_hf() {
    assert_eq!(
        hf_name("blk.3.attn_q.weight", Architecture::Llama).unwrap(),
        "model.layers.3.self_attn.q_proj.weight"
    );
    assert_eq!(
        hf_name("blk.2.attn_q_norm.weight", Architecture::Llama).unwrap(),
        "model.layers.2.self_attn.q_norm.weight"
    );
    assert_eq!(
        hf_name("blk.0.attn_k.bias", Architecture::Llama).unwrap(),
        "model.layers.0.self_attn.k_proj.bias"
    );
    assert_eq!(
        hf_name("token_embd.weight", Architecture::Llama).unwrap(),
        "model.embed_tokens.weight"
    );
    assert!(hf_name("blk.0.mystery.weight", Architecture::Llama).is_none());
}

/// Every weight of every architecture maps to a GGUF name and back.
#[test]
fn gguf_names_invert_hf_names() {
    for arch in Architecture::ALL {
        let model = crate::model::CausalLm::random(
            &crate::config::ModelConfig::tiny(arch),
            1,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        for (hf, _) in model.named_weights().unwrap() {
            let gguf = gguf_name(&hf, arch).unwrap_or_else(|| panic!("{arch:?} {hf}"));
            assert_eq!(hf_name(&gguf, arch).as_deref(), Some(hf.as_str()), "{gguf}");
        }
    }
    assert_eq!(
        gguf_name("model.layers.1.mlp.gate_up_proj.weight", Architecture::Phi3).unwrap(),
        "blk.1.ffn_up.weight"
    );
    assert_eq!(
        gguf_name(
            "model.layers.0.post_attention_layernorm.weight",
            Architecture::Gemma3
        )
        .unwrap(),
        "blk.0.post_attention_norm.weight"
    );
}

#[test]
fn unpermute_inverts_permute() {
    let w = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 3))
        .unwrap();
    let p = permute(&w, 2).unwrap();
    assert_ne!(p.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    // Head 0 rows [0,1,2,3] are interleaved as [0,2,1,3] by llama.cpp.
    assert_eq!(
        p.get(1).unwrap().to_vec1::<f32>().unwrap(),
        w.get(2).unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(
        unpermute(&p, 2).unwrap().to_vec2::<f32>().unwrap(),
        w.to_vec2::<f32>().unwrap()
    );
}
