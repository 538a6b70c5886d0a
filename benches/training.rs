//! Criterion benchmarks of training steps at SmolLM2-135M's real shapes, with
//! random weights so that nothing is downloaded: forward, forward+backward, and
//! a full optimizer step, at batch 4 × 128 and 8 × 256, with LoRA r=8 on all
//! seven linears and on q_proj and v_proj only. Throughput is in tokens (shown
//! as elements/s). A tiny configuration gives a quick smoke run:
//!
//! ```text
//! cargo bench                 # everything (several minutes on 2 cores)
//! cargo bench -- tiny         # the tiny configuration only
//! cargo bench -- decoding     # batched against one-at-a-time decoding
//! ```

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tuneforge::data::Example;
use tuneforge::pretrained::Model;
use tuneforge::train::{optim::AdamW, step_gradients, summed_loss};
use tuneforge::{lora, LoraConfig, ModelConfig};

fn model(config: &ModelConfig) -> Model {
    Model::random(
        config,
        0,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

/// The model groups' tags, the first part of every benchmark id.
const TAGS: [&str; 5] = [
    "tiny",
    "smollm2-135m",
    "qwen3-0.6b",
    "gemma3-270m",
    "decoding",
];

/// Whether the command line's filter (`cargo bench -- tiny`) names another
/// group's tag: then this group's model, gigabytes at real shapes, is not built.
fn filtered_out(tag: &str) -> bool {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .any(|f| TAGS.iter().any(|t| f.starts_with(t)) && !f.starts_with(tag))
}

fn bench_config(c: &mut Criterion, tag: &str, config: &ModelConfig, shapes: &[(usize, usize)]) {
    if filtered_out(tag) {
        return;
    }
    tuneforge::threads::init();
    let mut m = model(config);
    let all7 = LoraConfig::default();
    let qv = LoraConfig {
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..Default::default()
    };
    for &(b, s) in shapes {
        let examples = Example::synthetic(b, s, config.vocab_size);
        let rows: Vec<Vec<usize>> = (0..b).map(|i| vec![i]).collect();
        let mut group = c.benchmark_group(format!("{tag}/{b}x{s}"));
        group
            .throughput(Throughput::Elements((b * s) as u64))
            .sample_size(10);
        lora::detach(&mut m.lm);
        // A forward pass that scores every position, sharded over the threads like training.
        group.bench_function("forward", |bench| {
            bench.iter(|| summed_loss(&m, &examples, &rows).unwrap())
        });
        for (name, lora_config) in [("all-7", &all7), ("q+v", &qv)] {
            lora::detach(&mut m.lm);
            lora::attach(&mut m.lm, lora_config, 0).unwrap();
            let group_rows = vec![rows.clone()];
            group.bench_function(format!("forward+backward/lora-{name}-r8"), |bench| {
                bench.iter(|| step_gradients(&m, &examples, &group_rows, &[0], false).unwrap())
            });
            let mut opt = AdamW::new(lora::parameters(&m.lm), Default::default()).unwrap();
            group.bench_function(format!("optimizer-step/lora-{name}-r8"), |bench| {
                bench.iter(|| {
                    let update = step_gradients(&m, &examples, &group_rows, &[0], false).unwrap();
                    opt.step(&update.gradients, 1e-4, 1.0).unwrap();
                })
            });
        }
        group.finish();
    }
}

fn tiny(c: &mut Criterion) {
    bench_config(
        c,
        "tiny",
        &ModelConfig::tiny(tuneforge::Architecture::Llama),
        &[(4, 32)],
    );
}

fn smollm2(c: &mut Criterion) {
    bench_config(
        c,
        "smollm2-135m",
        &ModelConfig::smollm2_135m(),
        &[(4, 128), (8, 256)],
    );
}

/// The newer blocks at their real shapes: Qwen3 (q/k norms) and Gemma 3
/// (sandwich norms, GeGLU, sliding windows), to set beside the Llama block.
fn newer_blocks(c: &mut Criterion) {
    bench_config(
        c,
        "qwen3-0.6b",
        &ModelConfig::qwen3_0_6b(),
        &[(4, 128), (8, 256)],
    );
    bench_config(
        c,
        "gemma3-270m",
        &ModelConfig::gemma3_270m(),
        &[(4, 128), (8, 256)],
    );
}

/// Greedy decoding at SmolLM2-135M's shapes: 16 prompts of 40 to 55 tokens
/// that share their first 32 (an instruction), 16 new tokens each, decoded
/// together ([`Model::generate_batch`]) and one at a time. Throughput is in
/// generated tokens.
fn decoding(c: &mut Criterion) {
    if filtered_out("decoding") {
        return;
    }
    tuneforge::threads::init();
    let m = model(&ModelConfig::smollm2_135m());
    let prompts: Vec<Vec<u32>> = (0..16u32)
        .map(|i| {
            (0..32 + 8 + i)
                .map(|t| 1 + (t * 7919 + i * (t > 31) as u32 * 104729) % 49000)
                .collect()
        })
        .collect();
    let config = tuneforge::GenerationConfig {
        max_new_tokens: 16,
        stop_at_eos: false,
        ..tuneforge::GenerationConfig::greedy(16)
    };
    let mut group = c.benchmark_group("decoding/smollm2-135m");
    group
        .throughput(Throughput::Elements(16 * 16))
        .sample_size(10);
    for (name, batch) in [
        ("batched", tuneforge::generate::DEFAULT_BATCH),
        ("one at a time", 1),
    ] {
        group.bench_function(name, |bench| {
            bench.iter(|| m.generate_batch(&prompts, &config, batch).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, tiny, smollm2, newer_blocks, decoding);
criterion_main!(benches);
