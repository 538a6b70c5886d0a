//! Learning-rate schedules with linear warmup.

use serde::{Deserialize, Serialize};

/// The shape of the learning rate after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Linear decay to zero.
    Linear,
    /// Cosine decay to zero.
    #[default]
    Cosine,
}

impl Schedule {
    /// The learning rate for update `step` (0-based) of `total`.
    pub fn lr(self, peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return peak * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        match self {
            Self::Constant => peak,
            Self::Linear => peak * (1.0 - progress),
            Self::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        for s in [Schedule::Constant, Schedule::Linear, Schedule::Cosine] {
            assert!((s.lr(1.0, 0, 4, 20) - 0.25).abs() < 1e-12);
            assert!((s.lr(1.0, 3, 4, 20) - 1.0).abs() < 1e-12);
            assert!((s.lr(1.0, 4, 4, 20) - 1.0).abs() < 1e-12);
        }
        assert!((Schedule::Linear.lr(1.0, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 12, 4, 20) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(1.0, 19, 4, 20), 1.0);
    }
}
