//! What the bench holds its speeds against: the arithmetic a row does (its
//! FLOPs, counted from the model's shapes) and this machine's measured peak.
//!
//! How FLOPs are counted, per token, for `L` layers:
//! - the frozen matmuls (every block linear and the output matrix, `N`
//!   weights): 2·N forward, and 2·N more for the input gradient in training
//!   (a frozen weight gets no weight gradient), so 4·N for a training step;
//! - attention: `QKᵀ` and `PV` are 4·s̄·d FLOPs forward per layer, with `d`
//!   the query heads' width and s̄ = (s + 1) / 2 the keys a causal query sees
//!   on average (the useful work: the masked half is not counted); the
//!   backward's four products twice that: 12·s̄·d·L for a training step;
//! - LoRA, per adapted `[out, in]` linear of rank r: 2·r·(in + out) forward,
//!   twice that backward (input gradient, and A's and B's gradients).
//!
//! Norms, rope, softmax and the optimizer are not counted.

use tuneforge::cpu::{peak, peak::Unit, Bf16Kernel};
use tuneforge::Model;

/// FLOPs per token of a forward pass (`training`: false) or a training
/// step over rows of `seq` tokens.
pub fn per_token(model: &Model, seq: usize, training: bool) -> f64 {
    let lm = &model.lm;
    let config = model.config();
    let (mut frozen, mut adapters) = (0.0, 0.0);
    for block in &lm.layers {
        for (_, linear) in block.linears() {
            let (out, inp) = linear.weight.dims();
            frozen += (out * inp) as f64;
            if let Some(l) = &linear.lora {
                adapters += 2.0 * (l.a.dims()[0] * (inp + out)) as f64;
            }
        }
    }
    frozen += (config.vocab_size * config.hidden_size) as f64;
    let keys = (seq as f64 + 1.0) / 2.0;
    let width = (config.num_attention_heads * config.head_dim) as f64;
    let attention = 4.0 * keys * width * config.num_hidden_layers as f64;
    match training {
        true => 4.0 * frozen + 3.0 * attention + 3.0 * adapters,
        false => 2.0 * frozen + attention + adapters,
    }
}

/// This machine's f32 FMA peak in GFLOP/s over `threads` threads at once:
/// each thread runs independent chains of vector FMAs (as
/// `../shared/tools/cpu_peak.sh` does, [`peak::flops_per_second`]) for
/// about 0.3 s, on 512-bit registers where tuneforge's kernels use them.
/// `None` where the CPU has no AVX2 FMA.
pub fn f32_peak(threads: usize) -> Option<f64> {
    let features = tuneforge::cpu::features();
    let unit = match (features.avx512f, features.avx2_fma) {
        (true, _) => Unit::Fma512,
        (false, true) => Unit::Fma256,
        (false, false) => return None,
    };
    rate_over_threads(threads, unit)
}

/// This machine's bf16 peak on the instructions a bf16 base's products run
/// on ([`tuneforge::cpu::CpuFeatures::bf16_kernel`]): AMX-BF16's tile
/// products, or AVX512_BF16's `vdpbf16ps` (two multiplies and two adds per
/// f32 lane), measured as [`f32_peak`]; `None` where they run on neither.
pub fn bf16_peak(threads: usize) -> Option<f64> {
    match tuneforge::cpu::features().bf16_kernel()? {
        Bf16Kernel::AmxBf16 => rate_over_threads(threads, Unit::AmxBf16),
        Bf16Kernel::Avx512Bf16 => rate_over_threads(threads, Unit::Bf16Dot),
    }
}

/// GFLOP/s of `unit` on `threads` threads at once, each its best of three
/// rounds of about 0.1 s.
fn rate_over_threads(threads: usize, unit: Unit) -> Option<f64> {
    let per_thread: Vec<Option<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| s.spawn(move || peak::flops_per_second(unit, 10_000_000, 3)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().flatten())
            .collect()
    });
    let total: Option<f64> = per_thread.into_iter().sum();
    total.map(|t| t / 1e9)
}
