//! The statistics behind a verdict on a few dozen examples: Wilson intervals
//! for each accuracy, and for two variants answering the same examples a
//! paired bootstrap interval of the difference, McNemar's exact test and the
//! smallest difference that many examples could detect.

use crate::rng::Rng;
use serde::Serialize;
use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Normal};

/// The standard normal quantile of `p`.
fn normal_quantile(p: f64) -> f64 {
    Normal::standard().inverse_cdf(p)
}

/// The normal quantile of a two-sided 95% interval.
fn z95() -> f64 {
    normal_quantile(0.975)
}

/// The Wilson score 95% interval of `successes` out of `n` (`(0, 1)` for none).
pub fn wilson(successes: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (n, p, z) = (n as f64, successes as f64 / n as f64, z95());
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    // At 0 or n successes the bound is exactly 0 or 1; rounding must not move it.
    let lo = if successes == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if successes as f64 == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    (lo, hi)
}

/// McNemar's exact two-sided p-value for `b` examples that only the first
/// variant gets right and `c` that only the second does.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = (b + c) as u64;
    if n == 0 {
        return 1.0;
    }
    let fair = Binomial::new(0.5, n).expect("p = 1/2 is a probability");
    (2.0 * fair.cdf(b.min(c) as u64)).min(1.0)
}

/// The examples only `first` gets right and those only `second` does (over
/// the examples both answered): McNemar's discordant pairs.
pub fn discordant(first: &[bool], second: &[bool]) -> (usize, usize) {
    let only = |a: &[bool], b: &[bool]| a.iter().zip(b).filter(|(x, y)| **x && !**y).count();
    (only(first, second), only(second, first))
}

/// Two variants' answers to the same examples, compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedComparison {
    /// Examples compared.
    pub n: usize,
    /// Accuracy of the first variant minus the second's.
    pub difference: f64,
    /// The confidence level of `interval`, and one minus the significance
    /// level of [`Self::winner`]: 0.95, or more where a verdict allows for
    /// picking the best of several variants.
    pub level: f64,
    /// The paired bootstrap interval of the difference, at `level`.
    pub interval: (f64, f64),
    /// Examples only the first variant gets right.
    pub only_first: usize,
    /// Examples only the second variant gets right.
    pub only_second: usize,
    /// McNemar's exact two-sided p-value.
    pub p_value: f64,
    /// The smallest difference these examples could detect (two-sided, at
    /// `level`, 80% power), at the share of examples on which the variants
    /// disagree.
    pub detectable: f64,
}

impl PairedComparison {
    /// Compares `first` and `second` (whether each got each example right),
    /// with `resamples` bootstrap draws from `seed`, at confidence `level`
    /// (0.95 for the usual 5% test).
    pub fn new(first: &[bool], second: &[bool], resamples: usize, seed: u64, level: f64) -> Self {
        let n = first.len().min(second.len());
        let diffs: Vec<i32> = (0..n).map(|i| first[i] as i32 - second[i] as i32).collect();
        let (only_first, only_second) = discordant(first, second);
        let difference = diffs.iter().sum::<i32>() as f64 / n.max(1) as f64;
        let mut rng = Rng::new(seed);
        let mut draws: Vec<f64> = (0..resamples)
            .map(|_| {
                let sum: i32 = (0..n).map(|_| diffs[rng.below(n)]).sum();
                sum as f64 / n.max(1) as f64
            })
            .collect();
        draws.sort_by(f64::total_cmp);
        let at = |q: f64| {
            draws
                .get(((q * resamples as f64) as usize).min(resamples.saturating_sub(1)))
                .copied()
                .unwrap_or(difference)
        };
        let tail = (1.0 - level) / 2.0;
        // Connor's approximation for McNemar's test: δ = (z_α + z_β)·√(p_d / n),
        // with the discordant share p_d at least one example's worth.
        let discordant =
            ((only_first + only_second) as f64 / n.max(1) as f64).max(1.0 / n.max(1) as f64);
        Self {
            n,
            difference,
            level,
            interval: (at(tail), at(1.0 - tail)),
            only_first,
            only_second,
            p_value: mcnemar_exact(only_first, only_second),
            detectable: (normal_quantile(1.0 - tail) + normal_quantile(0.8))
                * (discordant / n.max(1) as f64).sqrt(),
        }
    }

    /// Whether the first variant is better (+1), the second (-1), or neither is
    /// clearly (0): the interval excludes zero and McNemar's p is below one
    /// minus `level` (0.05 at 95%).
    pub fn winner(&self) -> i32 {
        let clear = self.p_value < 1.0 - self.level;
        match (self.interval.0 > 0.0, self.interval.1 < 0.0) {
            (true, _) if clear => 1,
            (_, true) if clear => -1,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_the_textbook_values() {
        // 8 of 10: (0.4902, 0.9433), the textbook Wilson interval.
        let (lo, hi) = wilson(8, 10);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0, 20);
        assert!(lo == 0.0 && (hi - 0.1611).abs() < 1e-4, "{hi}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }

    #[test]
    fn mcnemar_exact_matches_the_binomial_tail() {
        // b = 1, c = 9: 2·P(X ≤ 1 | n = 10) = 2·11/1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // Large counts stay finite: 2·P(X ≤ 200 | n = 1000) is tiny.
        assert!(mcnemar_exact(200, 800) < 1e-80);
    }

    #[test]
    fn a_clear_gain_wins_and_a_small_one_does_not() {
        let n = 60;
        let second: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let first: Vec<bool> = (0..n).map(|i| i % 2 == 0 || i % 3 != 0).collect();
        let c = PairedComparison::new(&first, &second, 2000, 1, 0.95);
        assert_eq!((c.only_first, c.only_second), (20, 0));
        assert!((c.difference - 1.0 / 3.0).abs() < 1e-12);
        assert!(
            c.interval.0 > 0.15 && c.interval.1 < 0.5,
            "{:?}",
            c.interval
        );
        assert_eq!(c.winner(), 1);
        let reversed = PairedComparison::new(&second, &first, 2000, 1, 0.95);
        assert_eq!(reversed.winner(), -1);
        let mut close = second.clone();
        close[1] = true;
        let c = PairedComparison::new(&close, &second, 2000, 1, 0.95);
        assert_eq!(c.winner(), 0);
        assert!((c.p_value - 1.0).abs() < 1e-12 && c.detectable > c.difference);
    }
}
