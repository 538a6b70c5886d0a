//! Scalar math written so that a loop over it vectorises: `exp` and `tanh`
//! without branches or libm calls, the gated activations and their
//! derivatives, and a dot product and a maximum in 16 independent lanes.
//! The fused kernels ([`super`]) are built from these.

/// `eˣ` within 2 ulp wherever the result is a normal f32 (0 below −104, ∞
/// above ln(f32::MAX), NaN for NaN), without branches, so that a loop over it
/// vectorises. Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ½ln 2, eʳ by a
/// degree-7 polynomial, and 2ⁿ made from its exponent bits, in two halves so
/// that neither overflows.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const MAX: f32 = 88.722_84;
    const MIN: f32 = -104.0;
    let xc = x.clamp(MIN, MAX);
    let t = xc.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let k = t.to_bits() as i32 - ROUND.to_bits() as i32;
    // r = x − n·ln 2, with ln 2 in two parts so that n·ln 2 is exact enough.
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    let (k1, k2) = (k >> 1, k - (k >> 1));
    let two_to = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = y * two_to(k1) * two_to(k2);
    if x > MAX {
        f32::INFINITY
    } else if x < MIN {
        0.0
    } else {
        y
    }
}

/// SiLU `x·σ(x)` and its derivative `σ(x)·(1 + x·(1 − σ(x)))`.
#[inline(always)]
pub(super) fn silu(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-x));
    (x * s, s * x.mul_add(1.0 - s, 1.0))
}

/// `tanh u` within 3 ulp, branch-free: near 0 its odd Taylor series to u⁹
/// (the next term is below 1e-8 relative for |u| < ¼), elsewhere
/// `1 − 2 / (e^{2|u|} + 1)` with u's sign, which loses little to
/// cancellation once |tanh u| > ¼ and is exactly ±1 where e^{2|u|} overflows.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    let u2 = u * u;
    let mut p = 62.0 / 2835.0;
    p = p * u2 - 17.0 / 315.0;
    p = p * u2 + 2.0 / 15.0;
    p = p * u2 - 1.0 / 3.0;
    let near = u + u * u2 * p;
    let far = (1.0 - 2.0 / (exp(2.0 * u.abs()) + 1.0)).copysign(u);
    if u.abs() < 0.25 {
        near
    } else {
        far
    }
}

/// GELU's tanh approximation `½x(1 + tanh u)`, u = k(x + c·x³), and its
/// derivative `½(1 + tanh u) + ½x(1 − tanh² u)·k(1 + 3c·x²)`.
#[inline(always)]
pub(super) fn gelu_tanh(x: f32) -> (f32, f32) {
    const K: f32 = 0.797_884_6; // √(2/π)
    const C: f32 = 0.044_715;
    let x2 = x * x;
    let u = K * x * C.mul_add(x2, 1.0);
    let th = tanh(u);
    let value = 0.5 * x * (1.0 + th);
    let slope = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * K * (3.0 * C).mul_add(x2, 1.0);
    (value, slope)
}

/// `Σ aᵢ·bᵢ`, in 16 independent lanes so that it vectorises.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, a_rest) = a.as_chunks::<16>();
    let (b16, b_rest) = b.as_chunks::<16>();
    for (x, y) in a16.iter().zip(b16) {
        for l in 0..16 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    let mut sum = 0.0;
    for (x, y) in a_rest.iter().zip(b_rest) {
        sum += x * y;
    }
    for l in lanes {
        sum += l;
    }
    sum
}

/// `Σ aᵢ`, in 16 independent lanes so that it vectorises (a plain sum is
/// one chain of dependent scalar adds).
#[inline(always)]
pub(super) fn sum(a: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, rest) = a.as_chunks::<16>();
    for x in a16 {
        for l in 0..16 {
            lanes[l] += x[l];
        }
    }
    lanes.iter().chain(rest).sum()
}

/// The largest of `a` (−∞ when empty), in 16 lanes.
#[inline(always)]
pub(super) fn max(a: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let (a16, rest) = a.as_chunks::<16>();
    for x in a16 {
        for l in 0..16 {
            lanes[l] = lanes[l].max(x[l]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(rest) {
        m = m.max(x);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if want >= f32::MIN_POSITIVE as f64 {
                let ulp = f32::EPSILON as f64 * (want as f32).abs() as f64;
                worst = worst.max((got - want).abs() / ulp);
            } else {
                // Subnormal results: within one step of the smallest subnormal.
                assert!(
                    (got - want).abs() <= 2.0 * 1.5e-45,
                    "exp({x}) = {got}, want {want}"
                );
            }
            x += 0.000_37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(88.8), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn lane_sums_and_maxima_match_plain_ones() {
        for n in [0, 1, 15, 16, 17, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let plain: f64 = a.iter().map(|&x| x as f64).sum();
            assert!((sum(&a) as f64 - plain).abs() < 1e-5, "{n}");
            let plain = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), plain, "{n}");
        }
    }

    #[test]
    fn tanh_is_within_three_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        let mut u = -12.0f32;
        while u < 12.0 {
            let want = (u as f64).tanh();
            let ulp = f32::EPSILON as f64 * (want as f32).abs().max(f32::MIN_POSITIVE) as f64;
            worst = worst.max((tanh(u) as f64 - want).abs() / ulp);
            u += 0.000_13;
        }
        assert!(worst <= 3.0, "worst error {worst} ulp");
        assert_eq!((tanh(0.0), tanh(100.0), tanh(-100.0)), (0.0, 1.0, -1.0));
    }
}
