//! The arithmetic peak of this CPU's units, measured as peak benchmarks
//! measure it: independent chains of one instruction, timed on the calling
//! thread. The bench holds its rows against these peaks, and
//! [`super::CpuFeatures::bf16_kernel`] asks one question of them: whether
//! `vdpbf16ps` outruns f32 FMAs here. It does not everywhere that has it:
//! AMD's Zen 4 runs it at twice the FMAs' flops, Intel's cores (an Emerald
//! Rapids Xeon, measured) at half, and there a bf16 base multiplied with it
//! trains slower than an f32 one.

use std::sync::OnceLock;

/// An arithmetic unit whose peak [`flops_per_second`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// f32 FMAs on 256-bit registers (AVX2 + FMA).
    Fma256,
    /// f32 FMAs on 512-bit registers (AVX-512 F).
    Fma512,
    /// `vdpbf16ps` (AVX512_BF16): 32 bf16 products summed pairwise into
    /// 16 f32 lanes, 64 flops an instruction.
    Bf16Dot,
    /// AMX-BF16 tile products (`tdpbf16ps`), 16,384 flops each.
    AmxBf16,
}

/// How much faster than 512-bit FMAs `vdpbf16ps` must run for a bf16
/// base's products to take it: the kernel also rounds the activations to
/// bf16 and packs the weight, and below this the f32 products (of the bf16
/// weight widened exactly) are as fast and more exact.
const BF16_DOT_MARGIN: f64 = 1.25;

/// Whether `vdpbf16ps` does at least 1.25 times the flops
/// per second of 512-bit f32 FMAs on this CPU: measured once per process
/// (about 5 ms, the two alternated and each side's best kept, so a busy
/// moment on a shared host lowers both). `false` where the CPU lacks either.
pub fn bf16_dot_outruns_fma() -> bool {
    static OUTRUNS: OnceLock<bool> = OnceLock::new();
    *OUTRUNS.get_or_init(|| {
        let (mut dot, mut fma) = (0f64, 0f64);
        for _ in 0..5 {
            dot = dot.max(flops_per_second(Unit::Bf16Dot, 100_000, 1).unwrap_or(0.0));
            fma = fma.max(flops_per_second(Unit::Fma512, 100_000, 1).unwrap_or(0.0));
        }
        outruns(dot, fma)
    })
}

/// The rule of [`bf16_dot_outruns_fma`] on measured rates.
fn outruns(dot: f64, fma: f64) -> bool {
    fma > 0.0 && dot >= BF16_DOT_MARGIN * fma
}

/// FLOP/s of `unit` on the calling thread: the best of `rounds` timed runs
/// of `n` iterations of twelve independent chains of its instruction (of
/// four tile products, `n / 16` times, for AMX). `None` where the CPU (or,
/// for AMX, the system) does not let this process run it.
pub fn flops_per_second(unit: Unit, n: u64, rounds: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let chains: Chains = match unit {
            Unit::Fma256 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
                fma_chains_256
            }
            Unit::Fma512 if is_x86_feature_detected!("avx512f") => fma_chains_512,
            Unit::Bf16Dot
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bf16") =>
            {
                bf16_dot_chains
            }
            Unit::AmxBf16 => {
                return best_of(rounds, || {
                    crate::model::quantized::tile_product_rounds(n / 16)
                });
            }
            _ => return None,
        };
        // SAFETY: each chain runs only where the CPU has its instructions
        // (checked just above).
        best_of(rounds, || Some(unsafe { chains(n) }.0))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (unit, n, rounds);
        None
    }
}

/// The highest rate of `rounds` timed calls of `run` (which returns the
/// flops it did); `None` where it returns `None`.
#[cfg(target_arch = "x86_64")]
fn best_of(rounds: usize, mut run: impl FnMut() -> Option<f64>) -> Option<f64> {
    let mut best = 0f64;
    for _ in 0..rounds.max(1) {
        let t = std::time::Instant::now();
        let flops = run()?;
        best = best.max(flops / t.elapsed().as_secs_f64().max(1e-9));
    }
    Some(best)
}

/// `n` rounds of independent vector chains: (flops, a value kept so that
/// the work is not optimised away).
#[cfg(target_arch = "x86_64")]
type Chains = unsafe fn(u64) -> (f64, f32);

/// Defines `$name`, twelve independent chains of one instruction compiled
/// for `$features`, `n` rounds: each chain starts at its index (`start`),
/// takes `step` once a round, and the chains' sum is kept (`sum`); `setup`
/// makes the constant operands, black-boxed so that nothing folds.
macro_rules! chains {
    ($(#[$doc:meta])* $name:ident, $features:literal, $flops:expr,
     setup: { $($setup:tt)* }, start: |$i:ident| $start:expr,
     step: |$v:ident| $step:expr, sum: |$all:ident| $sum:expr $(,)?) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(n: u64) -> (f64, f32) {
            use std::arch::x86_64::*;
            use std::hint::black_box;
            $($setup)*
            let mut acc: [_; 12] = std::array::from_fn(|$i| $start);
            for _ in 0..black_box(n) {
                for $v in acc.iter_mut() {
                    *$v = $step;
                }
            }
            let $all = acc;
            (n as f64 * 12.0 * $flops, $sum)
        }
    };
}

chains! {
    /// Twelve independent chains of 8-wide FMAs (16 flops each).
    fma_chains_256, "avx2,fma", 16.0,
    setup: {
        let (a, b) = (_mm256_set1_ps(black_box(0.999_999)), _mm256_set1_ps(black_box(1e-7)));
    },
    start: |i| _mm256_set1_ps(black_box(i as f32)),
    step: |v| _mm256_fmadd_ps(*v, a, b),
    sum: |all| _mm256_cvtss_f32(all.into_iter().fold(_mm256_setzero_ps(), |s, v| _mm256_add_ps(s, v))),
}

chains! {
    /// As [`fma_chains_256`], 16-wide (32 flops each).
    fma_chains_512, "avx512f", 32.0,
    setup: {
        let (a, b) = (_mm512_set1_ps(black_box(0.999_999)), _mm512_set1_ps(black_box(1e-7)));
    },
    start: |i| _mm512_set1_ps(black_box(i as f32)),
    step: |v| _mm512_fmadd_ps(*v, a, b),
    sum: |all| _mm512_reduce_add_ps(all.into_iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, v))),
}

chains! {
    /// Twelve independent chains of `vdpbf16ps` on 16 f32 lanes (32 bf16
    /// products summed pairwise: 64 flops each).
    bf16_dot_chains, "avx512f,avx512bf16", 64.0,
    setup: {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(black_box(1e-3)), _mm512_set1_ps(black_box(1e-3)));
    },
    start: |i| _mm512_set1_ps(black_box(i as f32)),
    step: |v| _mm512_dpbf16_ps(*v, a, a),
    sum: |all| _mm512_reduce_add_ps(all.into_iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, v))),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel takes `vdpbf16ps` only with a clear margin over FMAs:
    /// Zen 4's 2× does, Emerald Rapids' 0.5× and a tie do not.
    #[test]
    fn the_dot_kernel_needs_a_clear_margin() {
        assert!(outruns(234.0, 117.0));
        assert!(!outruns(112.0, 222.0));
        assert!(!outruns(100.0, 100.0) && !outruns(1.0, 0.0));
    }

    /// Each unit the CPU has reads a positive rate, and one it lacks
    /// none; [`bf16_dot_outruns_fma`] is false where either side is
    /// missing.
    #[test]
    fn measured_units_read_positive_rates() {
        let units = [Unit::Fma256, Unit::Fma512, Unit::Bf16Dot, Unit::AmxBf16];
        for unit in units {
            match flops_per_second(unit, 10_000, 2) {
                Some(rate) => assert!(rate > 1e8, "{unit:?}: {rate} flop/s"),
                None => eprintln!("{unit:?}: not on this CPU"),
            }
        }
        let dot = flops_per_second(Unit::Bf16Dot, 10_000, 1);
        let fma = flops_per_second(Unit::Fma512, 10_000, 1);
        if dot.is_none() || fma.is_none() {
            assert!(!bf16_dot_outruns_fma());
        }
    }
}
