//! After `threads::init`, a training update's shards run side by side on
//! tuneforge's pool. This binary holds one test, because `init` changes the
//! process environment. The parallel update must equal the one computed shard
//! by shard on this thread, bit for bit.

use candle_core::Tensor;
use tuneforge::data::{make_batch, shards, Example};
use tuneforge::model::Pass;
use tuneforge::train::{step, step_gradients};
use tuneforge::{lora, threads, Architecture, LoraConfig, Model};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn parallel_shards_equal_sequential_shards_bit_for_bit() {
    threads::init();
    if threads::workers() < 2 {
        eprintln!(
            "skipped: this machine gives tuneforge one worker thread, so nothing runs in parallel"
        );
        return;
    }
    let mut model = Model::tiny_random(Architecture::Qwen2, 5).unwrap();
    lora::attach(&mut model.lm, &LoraConfig::default(), 3).unwrap();
    for (_, var) in lora::parameters(&model.lm) {
        var.set(&(var.as_tensor() + 0.02).unwrap()).unwrap();
    }
    // Ten rows of different lengths: several shards, unequal in size.
    let examples: Vec<Example> = (0..10)
        .map(|r| {
            let len = 60 + 17 * r;
            Example {
                ids: (0..len)
                    .map(|i| ((r * 31 + i * 7) % 250 + 3) as u32)
                    .collect(),
                trained: (0..len).map(|i| i % 3 != 0).collect(),
            }
        })
        .collect();
    let rows: Vec<Vec<usize>> = (0..10).map(|i| vec![i]).collect();
    let parts = shards(&examples, &rows, model.lm.device());
    assert!(parts.len() >= 3, "{} shards", parts.len());
    assert_eq!(parts.concat(), rows);
    // No core waits through a last, lone shard.
    assert_eq!(parts.len() % threads::workers(), 0, "{parts:?}");

    let parallel = step_gradients(&model, &examples, &[rows], &[0], false).unwrap();

    let batches: Vec<_> = parts
        .iter()
        .map(|rows| make_batch(&examples, rows, 0, model.lm.dtype(), model.lm.device()).unwrap())
        .collect();
    let total: usize = batches.iter().map(|b| b.trained_tokens).sum();
    let weight = 1.0 / total as f64;
    let (mut loss, mut grads): (f64, Vec<Option<Tensor>>) = (0.0, Vec::new());
    for batch in &batches {
        let pass = Pass {
            dropout_seed: Some(0),
            autograd: false,
        };
        let (summed, g) = step::loss_and_gradients(&model.lm, batch, pass, weight, false).unwrap();
        loss += summed * weight;
        tuneforge::train::optim::accumulate(&mut grads, g).unwrap();
    }

    assert_eq!(parallel.trained_tokens, total);
    assert_eq!(parallel.loss, loss);
    assert_eq!(parallel.gradients.len(), grads.len());
    for (p, s) in parallel.gradients.iter().zip(&grads) {
        assert_eq!(values(p.as_ref().unwrap()), values(s.as_ref().unwrap()));
    }
}
