//! The activations' rows rounded for the int8 kernels: per group of values
//! that share a weight scale, two 8-bit digits and what the kernels add per
//! group (see the module above for the arithmetic).

/// `m` f32 rows of `k` values (a multiple of `G`) rounded to two digits per
/// group of `G` values, with what the kernel adds per group.
pub(super) struct QuantizedRows {
    /// The rounded values' high digits, `[m, k]`,
    pub(super) high: Vec<i8>,
    /// and their low digits.
    pub(super) low: Vec<i8>,
    /// Per row and group (`[m, k / G]`): the step `s` of the combined
    /// value `q = 256·q₁ + q₂`,
    pub(super) scales: Vec<f32>,
    /// `−z · Σ q`, where the group's integer sums start,
    pub(super) starts: Vec<i32>,
    /// and `s · Σ q`, which multiplies the offsets (formats with a min).
    pub(super) scaled_sums: Vec<f32>,
}

impl QuantizedRows {
    /// `x` (`[m, k]`) rounded in groups of `G` for a weight of zero point
    /// `zero_point`, followed by zero rows up to `rows` rows (at least `m`).
    pub(super) fn new<const G: usize>(x: &[f32], rows: usize, k: usize, zero_point: i32) -> Self {
        let _profile = crate::profile::open(crate::profile::Stage::RoundRows);
        let groups = k / G;
        let mut rows = Self {
            high: vec![0; rows * k],
            low: vec![0; rows * k],
            scales: vec![0.0; rows * groups],
            starts: vec![0; rows * groups],
            scaled_sums: vec![0.0; rows * groups],
        };
        let vector = is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512dq");
        for (i, x) in x.chunks_exact(G).enumerate() {
            let at = i * G..(i + 1) * G;
            let (high, low) = (&mut rows.high[at.clone()], &mut rows.low[at]);
            let (scale, sum) = match vector {
                // SAFETY: checked just above that the CPU has AVX-512 BW and
                // DQ (and so F).
                true => unsafe { quantize_group(x, high, low) },
                false => quantize_group_portable(x, high, low),
            };
            rows.scales[i] = scale;
            rows.starts[i] = -zero_point * sum;
            rows.scaled_sums[i] = scale * sum as f32;
        }
        rows
    }
}

/// Rounds a group of 16 or 32 values to multiples of its scale (largest
/// magnitude over 127), ties to even, into `out`; returns the scale and the
/// sum of the rounded values. A group with an infinity or a NaN gets a NaN
/// scale (its products are NaN, as the f32 product's would be non-finite),
/// and a group whose largest magnitude is below 3.7e-37 (zeros,
/// subnormals, and values so small that `127 / largest` overflows f32) a
/// zero scale: its values count as zero.
#[target_feature(enable = "avx512f,avx512bw,avx512dq")]
unsafe fn round_group(x: &[f32], out: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let wide = x.len() == 32;
    assert!((wide || x.len() == 16) && out.len() == x.len());
    // SAFETY: both slices hold 16 values, or 32 where `wide`, as asserted.
    unsafe {
        let lo = _mm512_loadu_ps(x.as_ptr());
        let hi = match wide {
            true => _mm512_loadu_ps(x.as_ptr().add(16)),
            false => _mm512_setzero_ps(),
        };
        // QNaN, SNaN, +inf, -inf.
        let special = _mm512_fpclass_ps_mask::<0x99>(lo) | _mm512_fpclass_ps_mask::<0x99>(hi);
        let largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        if special != 0 || !(127.0 / largest).is_finite() {
            out.fill(0);
            return (if special != 0 { f32::NAN } else { 0.0 }, 0);
        }
        let inverse = _mm512_set1_ps(127.0 / largest);
        // Rounded to nearest even (the default rounding mode); at most 127.
        let qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
        let qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
        _mm_storeu_si128(out.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(qlo));
        if wide {
            _mm_storeu_si128(out.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(qhi));
        }
        (
            largest / 127.0,
            _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)),
        )
    }
}

/// Rounds a group of 16 or 32 values to two 8-bit digits: `high` as
/// [`round_group`] rounds it (step `s`), `low` the remainder in steps of
/// `s / 256` (at most ±128 of them, saturated to ±127). Returns the step of
/// the combined value `256·high + low`, `s / 256`, and its sum.
#[target_feature(enable = "avx512f,avx512bw,avx512dq")]
unsafe fn quantize_group(x: &[f32], high: &mut [i8], low: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert_eq!(low.len(), x.len());
    // SAFETY: the CPU has the features; `round_group` checks the lengths.
    let (step, high_sum) = unsafe { round_group(x, high) };
    if !(256.0 / step).is_finite() {
        // Zeros (step 0), a non-finite value (step NaN), or a group below
        // 9.6e-35 (its steps of s / 256 not representable): the high
        // digits alone.
        low.fill(0);
        return (step / 256.0, 256 * high_sum);
    }
    let (steps, units) = (_mm512_set1_ps(step), _mm512_set1_ps(256.0 / step));
    let (most, least) = (_mm512_set1_epi32(127), _mm512_set1_epi32(-127));
    let mut low_sum = 0;
    for (x, (h, l)) in x
        .chunks_exact(16)
        .zip(high.chunks_exact(16).zip(low.chunks_exact_mut(16)))
    {
        // SAFETY: each chunk holds 16 values.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr());
            let h = _mm512_cvtepi8_epi32(_mm_loadu_si128(h.as_ptr().cast()));
            // x − s·q₁ with one rounding, then in steps of s / 256.
            let rest = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(h), steps, v);
            let q = _mm512_cvtps_epi32(_mm512_mul_ps(rest, units));
            let q = _mm512_max_epi32(_mm512_min_epi32(q, most), least);
            _mm_storeu_si128(l.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q));
            low_sum += _mm512_reduce_add_epi32(q);
        }
    }
    (step / 256.0, 256 * high_sum + low_sum)
}

/// [`quantize_group`] value by value, bit for bit the same (the same
/// roundings in the same order), for CPUs without AVX-512.
fn quantize_group_portable(x: &[f32], high: &mut [i8], low: &mut [i8]) -> (f32, i32) {
    let largest = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let special = x.iter().any(|v| !v.is_finite());
    if special || !(127.0 / largest).is_finite() {
        high.fill(0);
        low.fill(0);
        return (if special { f32::NAN } else { 0.0 }, 0);
    }
    let (step, inverse) = (largest / 127.0, 127.0 / largest);
    let mut sum = 0;
    for (v, h) in x.iter().zip(high.iter_mut()) {
        *h = (v * inverse).round_ties_even() as i8;
        sum += 256 * *h as i32;
    }
    let units = 256.0 / step;
    if !units.is_finite() {
        low.fill(0);
        return (step / 256.0, sum);
    }
    for ((v, h), l) in x.iter().zip(high.iter()).zip(low.iter_mut()) {
        let rest = (-(*h as f32)).mul_add(step, *v);
        *l = (rest * units).round_ties_even().clamp(-127.0, 127.0) as i8;
        sum += *l as i32;
    }
    (step / 256.0, sum)
}

#[cfg(test)]
mod tests {
    use super::super::tests::runs_here;
    use super::*;

    /// The rows' rounding: ties go to even, the largest magnitude becomes
    /// ±127, and the block's sum is the rounded values'.
    #[test]
    fn groups_round_to_nearest_even() {
        if !runs_here() {
            return;
        }
        for group in [16, 32] {
            let mut x = vec![0f32; group];
            x[0] = -127.0; // scale 1
            x[1] = 2.5; // tie: to 2
            x[2] = 3.5; // tie: to 4
            x[3] = -0.5; // tie: to 0
            x[4] = 126.6;
            x[group - 1] = 9.5; // tie: to 10
            let mut q = vec![0i8; group];
            // SAFETY: checked above that the CPU has the kernel's features.
            let (scale, sum) = unsafe { round_group(&x, &mut q) };
            assert_eq!(scale, 1.0);
            assert_eq!(&q[..5], &[-127, 2, 4, 0, 127]);
            assert_eq!(q[group - 1], 10);
            assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>());
            // Two digits: the remainders in 256ths of the step; a high
            // digit's tie leaves ±128 of them, saturated to ±127.
            x[5] = 0.3; // 76.8 / 256: high 0, low 77
            x[6] = -126.498; // −126 − 127.488 / 256: −126, −127
            x[7] = 0.5; // a tie: high 0, low 128 saturated
            let (mut high, mut low) = (vec![0i8; group], vec![0i8; group]);
            // SAFETY: as above.
            let (step, sum) = unsafe { quantize_group(&x, &mut high, &mut low) };
            assert_eq!(step, 1.0 / 256.0);
            assert_eq!(&high[..8], &[-127, 2, 4, 0, 127, 0, -126, 0]);
            assert_eq!(&low[..8], &[0, 127, -127, -127, -102, 77, -127, 127]);
            assert_eq!(low[group - 1], -127);
            let combined = high
                .iter()
                .zip(&low)
                .map(|(&h, &l)| 256 * h as i32 + l as i32);
            assert_eq!(sum, combined.sum::<i32>());
        }
    }

    /// The value-by-value rounding gives the vector one's digits, steps and
    /// sums bit for bit: random groups at many scales, ties, saturating low
    /// digits, zeros, subnormals, tiny groups, infinities and NaN.
    #[test]
    fn portable_rounding_equals_the_vector_rounding() {
        if !runs_here() {
            return;
        }
        let mut rng = crate::rng::Rng::new(12);
        let mut groups: Vec<Vec<f32>> = Vec::new();
        for group in [16, 32] {
            for scale in [1e-37f32, 1e-30, 1e-3, 1.0, 7.5, 1e4, 3e38] {
                for _ in 0..20 {
                    groups.push((0..group).map(|_| scale * rng.normal()).collect());
                }
            }
            let mut ties = vec![0f32; group];
            ties[..8].copy_from_slice(&[-127.0, 2.5, 3.5, -0.5, 126.6, 0.3, -126.498, 0.5]);
            groups.push(ties);
            groups.push(vec![0.0; group]);
            groups.push(vec![1e-39; group]);
            let mut special = vec![1.0; group];
            special[3] = f32::INFINITY;
            groups.push(special.clone());
            special[3] = f32::NAN;
            groups.push(special);
        }
        for (i, x) in groups.iter().enumerate() {
            let n = x.len();
            let (mut h1, mut l1, mut h2, mut l2) = (vec![9; n], vec![9; n], vec![7; n], vec![7; n]);
            // SAFETY: checked above that the CPU has the features.
            let (s1, sum1) = unsafe { quantize_group(x, &mut h1, &mut l1) };
            let (s2, sum2) = quantize_group_portable(x, &mut h2, &mut l2);
            assert_eq!((h1, l1, sum1), (h2, l2, sum2), "group {i}: {x:?}");
            assert!(
                s1.to_bits() == s2.to_bits() || (s1.is_nan() && s2.is_nan()),
                "group {i}: {s1} against {s2}"
            );
        }
    }
}
