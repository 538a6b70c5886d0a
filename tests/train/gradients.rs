//! The training step's gradients: against finite differences (f32, through
//! quantized weights, on the low-precision kernels), against candle's
//! autograd, across batch splits, and the GPU's against the CPU's.

use super::*;
use tuneforge::model::attention::Spans;

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
/// On a GPU, the blocks stay on the device and each product dequantizes its
/// layer's weight there.
#[test]
fn lora_gradients_through_quantized_weights_match_finite_differences() {
    for device in common::devices() {
        for quantize in [Quantize::Q8_0, Quantize::Q4_0, Quantize::Bf16] {
            let model = held_exactly(&device, quantize);
            lora_gradients_match_finite_differences_of(model);
        }
    }
}

/// [`tiny_held`] with its exact f32 products (no low-precision kernel),
/// checked to hold every linear and the embeddings in blocks on `device`.
fn held_exactly(device: &Device, quantize: Quantize) -> Model {
    let mut model = tiny_held(device, quantize);
    model.lm.set_low_precision_kernels(false);
    for (name, l) in model.lm.layers[0].linears() {
        assert!(l.weight.is_quantized(), "{quantize}: {name} on {device:?}");
    }
    let embeddings = &model.lm.embed_tokens;
    assert!(embeddings.is_quantized(), "{quantize}: embeddings");
    assert!(
        embeddings.device().same_device(device),
        "{quantize} on {device:?}"
    );
    model
}

/// With the low-precision kernels (where the CPU has them), a held base's
/// LoRA gradients are those of its exact f32 products within the kernel's
/// rounding: the bf16 kernel (AVX512_BF16) for a bf16 base (measured: the
/// gradients off by 0.26% of their norm; 1.1% on AMX, where the attention's
/// products run in bf16 too), the int8 kernel (AVX512_VNNI),
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
fn hand_written_backward_equals_autograd() {
    for device in common::devices() {
        hand_written_backward_equals_autograd_on(&device);
    }
}

/// One update's loss and LoRA gradients on the GPU equal the CPU's (f32, with
/// dropout: both devices draw the same masks), with a dense base and with
/// one held in blocks (QLoRA: the GPU dequantizes each layer's weight, the
/// CPU multiplies the same blocks exactly; Q4_K falls back to Q5_0 at the
/// tiny model's rows).
#[test]
fn gpu_and_cpu_take_the_same_update() {
    let Some(gpu) = tuneforge::device::gpu_or_say_why() else {
        return;
    };
    for quantize in [
        Quantize::None,
        Quantize::Q8_0,
        Quantize::Q4K,
        Quantize::Bf16,
    ] {
        let update_on = |device: &Device| {
            let mut model = match quantize {
                Quantize::None => tiny_on(device),
                _ => held_exactly(device, quantize),
            };
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
            "{quantize}: {} vs {}",
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
                "{quantize}: gradient {i} off by {diff} (scale {scale})"
            );
        }
        eprintln!("{quantize}: the GPU's update is the CPU's");
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
        let (mut kept, mut chunked) = (Vec::new(), Vec::new());
        for layout in [
            vec![vec![0, 1], vec![2], vec![3, 4]],
            vec![vec![2], vec![4]],
        ] {
            let batch =
                tuneforge::data::make_batch(&examples, &layout, 0, candle_core::DType::F32, device)
                    .unwrap();
            kept.push(model.lm.layers[0].keeps_probs(batch.targets.dim(1).unwrap()));
            // The long rows' attention goes in chunks of positions on the CPU.
            let spans = Spans::of_mask(&batch.input.mask, Spans::CHUNK).unwrap();
            chunked.push(!spans.is_whole());
            backward_equals_autograd(&model, &batch, &format!("{arch:?} on {device:?}"));
        }
        assert_eq!(
            kept,
            [false, true],
            "both ways of getting the probabilities"
        );
        assert_eq!(chunked[0], device.is_cpu(), "{arch:?}");
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
            // The hand-written passes multiply by LoRA's thin factors in
            // another order than autograd's `gemm` (each product within
            // 3e-8 of its terms' magnitude); Gemma's √d-scaled embeddings
            // make its gradients sums that cancel to ~1e-4 of their terms,
            // so there the orders differ by up to ~1e-3 of the largest.
            let tol = match what.starts_with("Gemma") {
                true => 2e-3,
                false => 1e-4,
            };
            assert!(
                diff <= tol * scale.max(1e-6) + 1e-7,
                "{what} recompute={recompute} {name}: differs by {diff} (scale {scale})"
            );
        }
    }
}
