use super::*;
use crate::rng::Rng;

/// The f64 product of `x` rounded to bf16 with the bf16 weight: what the
/// kernel computes, up to the order of its f32 sums.
pub(super) fn reference(x: &[f32], m: usize, w: Bf16Weight, input_gradient: bool) -> Vec<f64> {
    let (q, p) = w.sides(input_gradient);
    let weight = |qi: usize, pi: usize| {
        let (r, c) = match input_gradient {
            false => (pi, qi),
            true => (qi, pi),
        };
        f32::from_bits((w.values[r * w.k + c] as u32) << 16) as f64
    };
    let mut out = vec![0f64; m * p];
    for i in 0..m {
        for j in 0..p {
            out[i * p + j] = (0..q)
                .map(|l| half::bf16::from_f32(x[i * q + l]).to_f64() * weight(l, j))
                .sum();
        }
    }
    out
}

pub(super) fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
    (0..len).map(|_| rng.normal()).collect()
}

/// `len` random normal values rounded to bf16, as a bf16 weight stores
/// them.
pub(super) fn random_bf16(len: usize, rng: &mut Rng) -> Vec<u16> {
    random(len, rng)
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect()
}

/// [`Ahead`] asks for its rows over the steps it was given, and no
/// further: rows and columns past the weight's edge are left out.
#[test]
fn ahead_covers_its_rows_in_its_steps() {
    let values = vec![0u16; 20 * 70];
    let w = Bf16Weight {
        values: &values,
        n: 20,
        k: 70,
    };
    let mut ahead = Ahead::new(w, 3..17, 40..90, 5);
    assert_eq!((ahead.per_step, ahead.bytes.clone()), (3, 80..140));
    for _ in 0..5 {
        ahead.step();
    }
    assert_eq!(ahead.next, 17);
    ahead.step();
    assert_eq!(ahead.next, 17, "nothing past its rows");
    let past = Ahead::new(w, 18..30, 0..70, 1);
    assert_eq!((past.next, past.end), (18, 20));
}

/// Whether the kernel's tests can run here; says why not where not.
pub(super) fn runs_here() -> bool {
    let here = super::can_run();
    if !here {
        eprintln!("skipped: this CPU has no AVX512_BF16");
    }
    here
}

/// Forward and input gradient of `run` against the f64 reference on
/// `shapes` (`(m, n, k)`).
pub(super) fn check_products(
    run: impl FnMut(&[f32], usize, Bf16Weight, bool, &mut [f32]),
    shapes: &[(usize, usize, usize)],
) {
    check_directions(run, shapes, &[false, true]);
}

/// [`check_products`] of the forward products alone (`[false]`), the
/// input gradients alone (`[true]`) or both.
pub(super) fn check_directions(
    mut run: impl FnMut(&[f32], usize, Bf16Weight, bool, &mut [f32]),
    shapes: &[(usize, usize, usize)],
    directions: &[bool],
) {
    let mut rng = Rng::new(3);
    for &(m, n, k) in shapes {
        let values = random_bf16(n * k, &mut rng);
        let w = Bf16Weight {
            values: &values,
            n,
            k,
        };
        for &input_gradient in directions {
            let (q, p) = w.sides(input_gradient);
            let x = random(m * q, &mut rng);
            let mut out = vec![f32::NAN; m * p];
            // Reused scratch holds NaNs: none may reach the product.
            super::super::simd::poison_pool(1 << 18);
            run(&x, m, w, input_gradient, &mut out);
            let want = reference(&x, m, w, input_gradient);
            // f32 sums of q exact products: a few ulp of the sum's
            // scale, a typical sum's (√q) or this one's if larger.
            let scale = (q as f64).sqrt();
            for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                let diff = (*g as f64 - e).abs();
                let tol = 16.0 * f32::EPSILON as f64 * scale.max(e.abs());
                assert!(
                    diff <= tol,
                    "{m}x{q} by {q}x{p} (input gradient: {input_gradient}), value {i}: {g} against {e}"
                );
            }
        }
    }
}

/// The kernel's products ([`check_products`]) on sizes below one tile,
/// odd sizes, sizes across the packed blocks (more than `COLUMN_BLOCK`
/// columns, more than `PAIR_BLOCK` pairs) and a large contraction.
#[test]
fn products_equal_the_bf16_rounded_products() {
    if !runs_here() {
        return;
    }
    check_products(
        product,
        &[
            (1, 1, 1),
            (2, 3, 5),
            (13, 33, 7),
            (12, 32, 64),
            (25, 70, 257),
            (97, 1031, 300),
            (5, 17, 4099),
            (130, 40, 33),
        ],
    );
}

/// Adversarial values: an infinity or a NaN in a row reaches only that
/// row's outputs, a value past bf16's range rounds to infinity, and
/// subnormal values (which `vdpbf16ps` may treat as zero) move their
/// row's outputs by no more than their own size, below 1e-38.
#[test]
fn special_values_stay_in_their_rows() {
    if !runs_here() {
        return;
    }
    let (m, n, k) = (14, 35, 40);
    let mut rng = Rng::new(9);
    let values = random_bf16(n * k, &mut rng);
    let w = Bf16Weight {
        values: &values,
        n,
        k,
    };
    let mut x = random(m * k, &mut rng);
    x[3 * k + 5] = f32::INFINITY;
    x[7 * k] = f32::NAN;
    x[9 * k + 2] = 3.4e38; // rounds past bf16's largest finite value
    for v in &mut x[11 * k..12 * k] {
        *v *= 1e-39; // subnormal in f32
    }
    let mut out = vec![0f32; m * n];
    product(&x, m, w, false, &mut out);
    let want = reference(&x, m, w, false);
    for i in 0..m {
        for j in 0..n {
            let (g, e) = (out[i * n + j], want[i * n + j]);
            match i {
                3 | 9 => assert!(g.is_infinite() || g.is_nan(), "row {i}: {g}"),
                7 => assert!(g.is_nan(), "row {i}: {g}"),
                11 => assert!(g.abs() < 1e-36 && e.abs() < 1e-36, "row {i}: {g}"),
                _ => assert!(
                    (g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "row {i}: {g} against {e}"
                ),
            }
        }
    }
}

/// Rounding is to nearest with ties to even, as `half`'s (and PyTorch's)
/// conversion, including at a tie and for values past the last pair.
#[test]
fn rows_round_to_nearest_even() {
    let tie_down = f32::from_bits(0x3f80_8000); // 1 + 2⁻⁸: ties to 1.0
    let tie_up = f32::from_bits(0x3f81_8000); // ties up to the even 1 + 2⁻⁶
    let x = [tie_down, tie_up, -2.5e-3, 7.0, 1e30, -0.0, 3.3];
    let check = |out: [u32; 4], how: &str| {
        for (i, &v) in x.iter().enumerate() {
            let got = (out[i / 2] >> (16 * (i % 2))) as u16;
            assert_eq!(
                got,
                half::bf16::from_f32(v).to_bits(),
                "{how}, value {i}: {v}"
            );
        }
        assert_eq!(out[3] >> 16, 0, "{how}: the last pair is padded with zero");
    };
    let mut out = [u32::MAX; 4];
    to_bf16_pairs_portable(&x, &mut out);
    check(out, "portable");
    if !runs_here() {
        return;
    }
    let mut out = [u32::MAX; 4];
    // SAFETY: checked above that the CPU has AVX512_BF16.
    unsafe { to_bf16_pairs(&x, &mut out) };
    check(out, "AVX512_BF16");
}
