//! Numerical parity with the reference implementation (transformers 5.23, float32)
//! on SmolLM2-135M-Instruct's Q4_1 GGUF, fetched through the library's sources.

mod common;

use candle_core::{Device, IndexOp, Tensor, D};
use common::{floats, ids, reference, smollm2};
use tuneforge::{GenerationConfig, Message};

const TOL: f64 = 1e-3;
/// f32 on a GPU: cuBLAS sums in another order than the CPU.
const GPU_F32_TOL: f64 = 2e-3;
/// bf16 weights and activations: 2.5 times the worst error seen on the CPU
/// (0.63 on a logit, 0.062 on a mean loss).
const BF16_LOGIT_TOL: f64 = 1.5;
const BF16_LOSS_TOL: f64 = 0.15;

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, reference {w} (tolerance {tol})"
        );
    }
}

#[test]
fn token_ids_match() {
    let model = smollm2();
    for s in reference()["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer.encode(text, false).unwrap(),
            ids(&s["input_ids"]),
            "{text:?}"
        );
        // add_special_tokens adds nothing for SmolLM2.
        assert_eq!(
            model.tokenizer.encode(text, true).unwrap(),
            ids(&s["input_ids"]),
            "{text:?}"
        );
    }
}

#[test]
fn chat_prompt_renders_byte_identically() {
    let rendered = smollm2()
        .tokenizer
        .apply_chat_template(&[Message::user("What is LoRA?")], true)
        .unwrap();
    assert_eq!(
        rendered,
        reference()["chat_template_rendered"].as_str().unwrap()
    );
}

#[test]
fn logits_and_losses_match() {
    check_logits_and_losses(smollm2(), TOL, TOL);
}

/// The reference strings' logits (first and last positions, top 5, argmax, mean)
/// and mean losses, against the reference within `logit_tol` and `loss_tol`.
fn check_logits_and_losses(model: &tuneforge::Model, logit_tol: f64, loss_tol: f64) {
    let (device, dtype) = (model.lm.device(), model.lm.dtype());
    for s in reference()["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let input = Tensor::new(ids(&s["input_ids"]).as_slice(), device)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.lm.forward(&input).unwrap().squeeze(0).unwrap();
        let t = logits.dim(0).unwrap();
        let row = |i: usize| -> Vec<f64> {
            logits
                .i(i)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (first, last) = (row(0), row(t - 1));
        assert_close(
            &format!("{text:?} first-position logits ({dtype:?} on {device:?})"),
            &first[..5],
            &floats(&s["first_pos_first5_logits"]),
            logit_tol,
        );
        assert_close(
            &format!("{text:?} last-position logits ({dtype:?} on {device:?})"),
            &last[..5],
            &floats(&s["last_pos_first5_logits"]),
            logit_tol,
        );
        let top: Vec<f64> = ids(&s["last_pos_top5_ids"])
            .iter()
            .map(|&i| last[i as usize])
            .collect();
        assert_close(
            &format!("{text:?} top-5 logits ({dtype:?} on {device:?})"),
            &top,
            &floats(&s["last_pos_top5_logits"]),
            logit_tol,
        );
        let argmax = logits
            .i(t - 1)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        assert_eq!(argmax as u64, s["last_pos_argmax"].as_u64().unwrap());
        let mean = last.iter().sum::<f64>() / last.len() as f64;
        assert!(
            (mean - s["last_pos_logits_mean"].as_f64().unwrap()).abs() < logit_tol,
            "{text:?} logit mean {mean} ({dtype:?} on {device:?})"
        );
        let loss = model
            .lm
            .causal_lm_loss(&input)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        assert_close(
            &format!("{text:?} loss ({dtype:?} on {device:?})"),
            &[loss],
            &[s["mean_loss"].as_f64().unwrap()],
            loss_tol,
        );
    }
}

#[test]
fn batched_loss_on_synthetic_tokens_matches() {
    let model = smollm2();
    let b = &reference()["synthetic_batches"][0];
    let (batch, seq) = (
        b["batch"].as_u64().unwrap() as usize,
        b["seq"].as_u64().unwrap() as usize,
    );
    let tokens = common::splitmix_batch(batch, seq, b["seed"].as_u64().unwrap(), 49152);
    assert_eq!(&tokens[..8], ids(&b["first8"]).as_slice());
    assert_eq!(
        tokens.iter().map(|&t| t as u64).sum::<u64>(),
        b["sum"].as_u64().unwrap()
    );
    let input = Tensor::from_vec(tokens, (batch, seq), &Device::Cpu).unwrap();
    let losses = model
        .lm
        .causal_lm_loss(&input)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mean = losses.iter().map(|&l| l as f64).sum::<f64>() / batch as f64;
    assert_close(
        "synthetic batch loss",
        &[mean],
        &[b["base_mean_loss"].as_f64().unwrap()],
        TOL,
    );
}

#[test]
fn dequantized_tensors_match_checksums() {
    use candle_core::quantized::gguf_file;
    let tuneforge::source::ModelFiles::Gguf(path) = &smollm2().source.files else {
        panic!("the default model should come from its GGUF mirror here")
    };
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let config = tuneforge::ModelConfig::from_gguf(&content).unwrap();
    let weights = tuneforge::weights::Weights::from_gguf(
        path,
        &content,
        &config,
        candle_core::DType::F32,
        &Device::Cpu,
        tuneforge::Quantize::None,
    )
    .unwrap();
    for check in reference()["dequant_checks"].as_array().unwrap() {
        let name = check["hf"].as_str().unwrap();
        let t = weights
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        let shape: Vec<usize> = ids(&check["shape"]).iter().map(|&d| d as usize).collect();
        assert_eq!(t.dims(), shape.as_slice(), "{name} shape");
        let v: Vec<f64> = t
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let sum: f64 = v.iter().sum();
        let mean_abs = v.iter().map(|x| x.abs()).sum::<f64>() / v.len() as f64;
        assert_close(
            &format!("{name} first5"),
            &v[..5],
            &floats(&check["first5"]),
            1e-12,
        );
        assert_close(
            &format!("{name} sum"),
            &[sum],
            &[check["sum_f64"].as_f64().unwrap()],
            1e-6 * (1.0 + sum.abs()),
        );
        assert_close(
            &format!("{name} mean |x|"),
            &[mean_abs],
            &[check["mean_abs_f64"].as_f64().unwrap()],
            1e-9,
        );
    }
}

#[test]
fn greedy_generation_matches_64_tokens() {
    check_greedy_generation(smollm2());
}

fn check_greedy_generation(model: &tuneforge::Model) {
    let g = &reference()["greedy_generation"];
    let prompt = ids(&reference()["strings"][2]["input_ids"]);
    let mut streamed = String::new();
    let out = tuneforge::generate::generate(
        &model.lm,
        &model.tokenizer,
        &prompt,
        &GenerationConfig::greedy(64),
        &mut |piece| streamed.push_str(piece),
    )
    .unwrap();
    assert_eq!(out.ids, ids(&g["ids"]));
    assert_eq!(out.text, g["text"].as_str().unwrap());
    assert_eq!(streamed, out.text, "the streamed pieces add up to the text");
}

/// The GGUF's blocks kept as stored (`--quantize keep`, QLoRA): every block
/// linear is held in blocks, at a fifth of the bytes or less, and the logits,
/// the losses and the greedy generation are transformers' on the same GGUF,
/// as with dequantized weights. Requantized to Q8_0 as they load, they stay
/// within bf16's bounds.
#[test]
fn quantized_bases_match_the_reference() {
    use tuneforge::quantize::base_bytes;
    let load = |quantize| {
        let options = tuneforge::LoadOptions {
            quantize,
            ..tuneforge::LoadOptions::f32_base()
        };
        tuneforge::Model::load("smollm2-135m-instruct", &options).unwrap()
    };
    let dense = base_bytes(&smollm2().lm).0;
    for (quantize, logit_tol, loss_tol) in [
        (tuneforge::Quantize::Keep, TOL, TOL),
        (tuneforge::Quantize::Q8_0, BF16_LOGIT_TOL, BF16_LOSS_TOL),
    ] {
        let model = load(quantize);
        for layer in &model.lm.layers {
            for (name, l) in layer.linears() {
                assert!(l.weight.is_quantized(), "{quantize}: {name} is dense");
            }
        }
        // The tied embeddings: the GGUF's Q8_0 blocks (keep), or Q8_0 again.
        assert!(
            model.lm.embed_tokens.is_quantized(),
            "{quantize}: embeddings"
        );
        let held = base_bytes(&model.lm).0;
        assert!(held * 3 < dense, "{quantize}: {held} bytes against {dense}");
        check_logits_and_losses(&model, logit_tol, loss_tol);
        if quantize == tuneforge::Quantize::Keep {
            check_greedy_generation(&model);
        }
    }
}

/// A bf16 base on the CPU (`--dtype bf16`): every block linear and the
/// embeddings held in bf16 at half the f32 bytes, multiplied in f32 on
/// f32 activations; the logits and losses within bf16's bounds.
#[test]
fn a_bf16_base_on_the_cpu_stays_close() {
    use tuneforge::quantize::{base_bytes, BaseDtype};
    let options = tuneforge::LoadOptions {
        base_dtype: BaseDtype::Bf16,
        device: tuneforge::DeviceSpec::Cpu,
        ..Default::default()
    };
    let model = tuneforge::Model::load("smollm2-135m-instruct", &options).unwrap();
    for layer in &model.lm.layers {
        for (name, l) in layer.linears() {
            assert!(l.weight.is_quantized(), "{name} is not held in bf16");
        }
    }
    assert!(model.lm.embed_tokens.is_quantized(), "embeddings");
    let (dense, held) = (base_bytes(&smollm2().lm), base_bytes(&model.lm));
    assert_eq!(2 * held.0, dense.0, "linears at half the bytes");
    assert_eq!(2 * held.1, dense.1, "embeddings at half the bytes");
    assert_eq!(model.lm.dtype(), candle_core::DType::F32, "f32 activations");
    check_logits_and_losses(&model, BF16_LOGIT_TOL, BF16_LOSS_TOL);
}

/// bf16 keeps 8 bits of mantissa, so logits of size ~20 move by about 0.1: the
/// bf16 model stays within looser bounds of the f32 reference, on the CPU and, when
/// one is present, on the GPU.
#[test]
fn bf16_logits_and_losses_stay_close() {
    let mut specs = vec![tuneforge::DeviceSpec::Cpu];
    if tuneforge::device::gpu_or_say_why().is_some() {
        specs.push(tuneforge::DeviceSpec::Auto);
    }
    for spec in specs {
        let model = common::smollm2_as(spec, candle_core::DType::BF16);
        check_logits_and_losses(&model, BF16_LOGIT_TOL, BF16_LOSS_TOL);
    }
}

/// On a GPU in f32: the reference's logits and losses, and its greedy generation.
#[test]
fn f32_on_the_gpu_matches_the_reference() {
    if tuneforge::device::gpu_or_say_why().is_none() {
        return;
    }
    let model = common::smollm2_as(tuneforge::DeviceSpec::Auto, candle_core::DType::F32);
    check_logits_and_losses(&model, GPU_F32_TOL, GPU_F32_TOL);
    let g = &reference()["greedy_generation"];
    let prompt = ids(&reference()["strings"][2]["input_ids"]);
    let out = tuneforge::generate::generate(
        &model.lm,
        &model.tokenizer,
        &prompt,
        &GenerationConfig::greedy(64),
        &mut |_| {},
    )
    .unwrap();
    // Summation order differs on a GPU: a near-tie late in the text may break the
    // other way, so the first half must match exactly.
    assert_eq!(out.ids[..32], ids(&g["ids"])[..32]);
}

/// The training loss mask and the masked loss on fixed conversations, against
/// transformers' own assistant-token mask (`tests/fixtures/smollm2-masked-loss.json`,
/// made by `make_masked_loss_reference.py` beside it): each assistant turn is
/// trained through its `<|im_end|>`, not the newline after it.
#[test]
fn loss_mask_and_masked_loss_match_the_reference() {
    use tuneforge::data::tokenize::tokenize_record;
    use tuneforge::data::{LossOn, Record, TurnEnd};
    let model = smollm2();
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2-masked-loss.json")).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let record = match &messages[..] {
            [user, answer] if user.role == "user" => Record::Completion {
                prompt: user.content.clone(),
                completion: answer.content.clone(),
            },
            _ => Record::Chat(messages.clone()),
        };
        let tokenize =
            |turn_end| tokenize_record(&record, &model.tokenizer, LossOn::AssistantTurns, turn_end);
        let example = tokenize(TurnEnd::EndToken).unwrap();
        assert_eq!(example.ids, ids(&case["input_ids"]));
        let want: Vec<bool> = case["assistant_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_u64() == Some(1))
            .collect();
        assert_eq!(example.trained, want, "{messages:?}");
        let (sum, n) =
            tuneforge::train::summed_loss(model, std::slice::from_ref(&example), &[vec![0]])
                .unwrap();
        assert_eq!(n as u64, case["trained_tokens"].as_u64().unwrap());
        let loss = sum / n as f64;
        let want = case["masked_loss"].as_f64().unwrap();
        assert!(
            (loss - want).abs() <= TOL,
            "masked loss {loss}, reference {want}"
        );

        let turns = messages.iter().filter(|m| m.role == "assistant").count();
        let rendered = tokenize(TurnEnd::Rendered).unwrap();
        assert_eq!(
            rendered.trained_tokens(),
            n + turns,
            "and each turn's newline"
        );
    }
}

/// Batched decoding on the real model: the first 16 bundled test questions,
/// asked alone and after a shared 3-shot block, answered 16 at a time, get the
/// answers that one-at-a-time decoding gives (f32, greedy, 32 tokens).
#[test]
fn batched_greedy_answers_equal_one_at_a_time() {
    tuneforge::threads::init();
    let model = smollm2();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let test = tuneforge::eval::read_held_out(&data.join("test.jsonl")).unwrap();
    let train = tuneforge::eval::read_held_out(&data.join("train.jsonl")).unwrap();
    let shots: Vec<Message> = train[..3]
        .iter()
        .flat_map(|t| {
            [
                Message::user(t.question()),
                Message::assistant(t.reference.clone()),
            ]
        })
        .collect();
    let config = GenerationConfig::greedy(32);
    for prefix in [vec![], shots] {
        let prompts: Vec<Vec<u32>> = test[..16]
            .iter()
            .map(|h| {
                let mut messages = prefix.clone();
                messages.push(Message::user(h.question()));
                model.chat_prompt_ids(&messages).unwrap()
            })
            .collect();
        let answers = |batch| -> Vec<Vec<u32>> {
            model
                .generate_batch(&prompts, &config, batch)
                .unwrap()
                .into_iter()
                .map(|g| g.ids)
                .collect()
        };
        assert_eq!(answers(16), answers(1), "{} shots", prefix.len() / 2);
    }
}

/// The int8 kernel (where the CPU has AVX512_VNNI) on the kept GGUF: a batch
/// long enough for its many-row path (the reference strings' tokens, 4 rows
/// of 80) gives logits within the rounding of the activations to two 8-bit
/// digits per group of the exact products', the same next token almost
/// everywhere, and the same loss within 0.02% (`common::Int8Departure::assert_small`).
#[test]
fn the_int8_kernel_stays_close_to_the_exact_products() {
    let Some(kernel) = tuneforge::cpu::features().int8_kernel() else {
        eprintln!("skipped: this CPU has no int8 kernel (AVX512_VNNI)");
        return;
    };
    let options = tuneforge::LoadOptions {
        quantize: tuneforge::Quantize::Keep,
        ..tuneforge::LoadOptions::f32_base()
    };
    let mut model = tuneforge::Model::load("smollm2-135m-instruct", &options).unwrap();
    let tokens: Vec<u32> = reference()["strings"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| ids(&s["input_ids"]))
        .cycle()
        .take(4 * 80)
        .collect();
    let input = Tensor::from_vec(tokens, (4, 80), &Device::Cpu).unwrap();
    common::Int8Departure::measure(&mut model, &input).assert_small(kernel.name());
}
