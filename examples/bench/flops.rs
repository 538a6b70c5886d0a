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

/// This machine's f32 FMA peak in GFLOP/s over `threads` threads at once,
/// measured: each thread runs independent chains of vector FMAs (as
/// `../shared/tools/cpu_peak.sh` does) for about 0.3 s. `None` where the
/// CPU has no AVX2 FMA.
pub fn f32_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let features = tuneforge::cpu::features();
        let chains = match (features.avx512f, features.avx2_fma) {
            (true, _) => fma_chains_512,
            (false, true) => fma_chains_256,
            (false, false) => return None,
        };
        Some(rate_over_threads(threads, chains))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// This machine's bf16 peak on the instructions a bf16 base's products run
/// on ([`tuneforge::cpu::CpuFeatures::bf16_kernel`]): AMX-BF16's tile
/// products, or AVX512_BF16's `vdpbf16ps` (two multiplies and two adds per
/// f32 lane), measured as [`f32_peak`]; `None` where the CPU has neither.
pub fn bf16_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        match tuneforge::cpu::features().bf16_kernel() {
            Some(tuneforge::cpu::Bf16Kernel::AmxBf16) => {
                Some(rate_over_threads(threads, tile_products))
            }
            Some(_) => Some(rate_over_threads(threads, bf16_dot_chains)),
            None => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// Rounds of independent vector chains: (FLOPs, a value the caller keeps so
/// the work is not optimised away).
#[cfg(target_arch = "x86_64")]
type Chains = unsafe fn(u64) -> (f64, f32);

/// GFLOP/s of `chains` on `threads` threads at once.
#[cfg(target_arch = "x86_64")]
fn rate_over_threads(threads: usize, chains: Chains) -> f64 {
    let per_thread: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| s.spawn(move || rate(chains)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(0.0))
            .collect()
    });
    per_thread.iter().sum::<f64>() / 1e9
}

/// FLOP/s of one thread's chains: the best of several timed rounds of about
/// 0.1 s.
#[cfg(target_arch = "x86_64")]
fn rate(chains: Chains) -> f64 {
    let mut best = 0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        // SAFETY: the callers pick `chains` by the CPU's features.
        let (flops, sink) = unsafe { chains(10_000_000) };
        std::hint::black_box(sink);
        best = best.max(flops / t.elapsed().as_secs_f64());
    }
    best
}

/// Twelve independent chains of 8-wide FMAs, `n` rounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_256(n: u64) -> (f64, f32) {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    let (a, b) = (
        _mm256_set1_ps(black_box(0.999_999)),
        _mm256_set1_ps(black_box(1e-7)),
    );
    let mut acc: [_; 12] = std::array::from_fn(|i| _mm256_set1_ps(black_box(i as f32)));
    for _ in 0..black_box(n) {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for v in acc {
        sum = _mm256_add_ps(sum, v);
    }
    (n as f64 * 12.0 * 16.0, _mm256_cvtss_f32(sum))
}

/// As [`fma_chains_256`], 16-wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_512(n: u64) -> (f64, f32) {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    let (a, b) = (
        _mm512_set1_ps(black_box(0.999_999)),
        _mm512_set1_ps(black_box(1e-7)),
    );
    let mut acc: [_; 12] = std::array::from_fn(|i| _mm512_set1_ps(black_box(i as f32)));
    for _ in 0..black_box(n) {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for v in acc {
        sum = _mm512_add_ps(sum, v);
    }
    (n as f64 * 12.0 * 32.0, _mm512_reduce_add_ps(sum))
}

/// Rounds of four independent AMX-BF16 tile products, a sixteenth of `n`
/// (each is about 16 times a vector instruction's time).
#[cfg(target_arch = "x86_64")]
unsafe fn tile_products(n: u64) -> (f64, f32) {
    (
        tuneforge::cpu::amx_bf16_tile_products(n / 16).unwrap_or(0.0),
        0.0,
    )
}

/// Twelve independent chains of `vdpbf16ps` on 16 f32 lanes (32 bf16
/// products each), `n` rounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_dot_chains(n: u64) -> (f64, f32) {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    let a = _mm512_cvtne2ps_pbh(
        _mm512_set1_ps(black_box(1e-3)),
        _mm512_set1_ps(black_box(1e-3)),
    );
    let mut acc: [_; 12] = std::array::from_fn(|i| _mm512_set1_ps(black_box(i as f32)));
    for _ in 0..black_box(n) {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, a);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for v in acc {
        sum = _mm512_add_ps(sum, v);
    }
    (n as f64 * 12.0 * 64.0, _mm512_reduce_add_ps(sum))
}
