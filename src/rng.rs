//! A seeded, portable random number generator whose state can be saved and
//! restored, so that runs are reproducible and resumable.

use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// ChaCha8, seeded; its full state serialises for checkpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rng(ChaCha8Rng);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A uniform float in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        self.0.random::<f32>()
    }

    /// A standard normal float (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.0.random::<f64>()).max(f64::MIN_POSITIVE);
        let u2 = self.0.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// A uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// A raw 64-bit value (for seeding other generators).
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Shuffles a slice in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}
