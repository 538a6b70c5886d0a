//! Where a step's time goes, when asked ([`enable`]): the thread-seconds
//! spent in each [`Stage`] (the frozen products and the parts of them that
//! are not arithmetic, LoRA, attention, norms, rope, the MLP's activation,
//! the loss, the optimizer), each
//! stage's own time only, without the stages it calls. It needs no
//! profiler, so it runs wherever tuneforge does (`bench --profile`).
//!
//! Time is counted per thread: a stage running on a helper thread (a
//! product whose rows are split over threads) counts there, while the
//! thread that waits for it counts the wait in its own stage. Training
//! splits the batch into shards, one per thread, whose stages do not
//! overlap like this.
//!
//! ```
//! use std::time::Duration;
//! use tuneforge::profile::{self, Stage};
//! let ms = Duration::from_millis;
//! profile::enable(true);
//! profile::time(Stage::Loss, || {
//!     std::thread::sleep(ms(10));
//!     // The vocabulary's product inside the loss counts as a frozen product.
//!     profile::time(Stage::FrozenForward, || std::thread::sleep(ms(100)));
//!     std::thread::sleep(ms(10));
//! });
//! profile::enable(false);
//! profile::time(Stage::Optimizer, || std::thread::sleep(ms(10))); // not counted
//! let spent: std::collections::HashMap<_, _> = profile::take().into_iter().collect();
//! assert!(spent[&Stage::FrozenForward] >= ms(100));
//! assert!(spent[&Stage::Loss] >= ms(20) && spent[&Stage::Loss] < ms(90));
//! assert!(spent[&Stage::Optimizer].is_zero());
//! assert!(profile::take().iter().all(|(_, t)| t.is_zero()), "the counts restart");
//! ```

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A part of a step that [`time`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// A frozen weight's forward product `x Wᵀ` (its arithmetic, and
    /// whatever of it no finer stage counts).
    FrozenForward,
    /// A frozen weight's input gradient `dy W`.
    FrozenInputGradient,
    /// Rounding a product's rows to bf16 or to int8 digits.
    RoundRows,
    /// Repacking blocks of a held weight into a kernel's layout.
    RepackWeight,
    /// Dequantizing tiles of a held weight to f32 for `gemm`.
    DequantizeTiles,
    /// The LoRA adapters' products, forward and backward.
    Lora,
    /// Attention's scores, softmax and weighted values, forward and backward.
    Attention,
    /// RMSNorm, forward and backward.
    Norms,
    /// Rotary position embeddings, forward and backward.
    Rope,
    /// The MLP's gated activation, forward and backward.
    Activation,
    /// The cross-entropy over the vocabulary, forward and backward.
    Loss,
    /// The optimizer's update.
    Optimizer,
}

impl Stage {
    /// Every stage, in the order reports list them.
    pub const ALL: [Stage; 12] = [
        Stage::FrozenForward,
        Stage::FrozenInputGradient,
        Stage::RoundRows,
        Stage::RepackWeight,
        Stage::DequantizeTiles,
        Stage::Lora,
        Stage::Attention,
        Stage::Norms,
        Stage::Rope,
        Stage::Activation,
        Stage::Loss,
        Stage::Optimizer,
    ];

    /// How a report names it.
    pub fn name(self) -> &'static str {
        match self {
            Stage::FrozenForward => "frozen products, forward",
            Stage::FrozenInputGradient => "frozen products, input gradient",
            Stage::RoundRows => "rounding rows",
            Stage::RepackWeight => "repacking weights",
            Stage::DequantizeTiles => "dequantizing tiles",
            Stage::Lora => "LoRA products",
            Stage::Attention => "attention",
            Stage::Norms => "norms",
            Stage::Rope => "rope",
            Stage::Activation => "activation",
            Stage::Loss => "loss",
            Stage::Optimizer => "optimizer",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Stage::ALL.len()] = [const { AtomicU64::new(0) }; Stage::ALL.len()];

thread_local! {
    /// This thread's open stages, innermost last, each with the instant
    /// from which its own time runs.
    static OPEN: RefCell<Vec<(Stage, Instant)>> = const { RefCell::new(Vec::new()) };
}

/// Turns counting on or off (off by default: [`time`] then only calls its
/// closure).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether counting is on.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

fn add(stage: Stage, d: Duration) {
    NANOS[stage as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
}

/// Runs `f`, counting its time in `stage` less the time of the stages it
/// opens in turn (while counting is on).
pub fn time<T>(stage: Stage, f: impl FnOnce() -> T) -> T {
    let _open = open(stage);
    f()
}

/// Counts the time until the returned guard drops in `stage` (see
/// [`time`]); `None` while counting is off.
pub fn open(stage: Stage) -> Option<Open> {
    if !is_enabled() {
        return None;
    }
    let now = Instant::now();
    OPEN.with(|open| {
        let mut open = open.borrow_mut();
        if let Some((outer, since)) = open.last() {
            add(*outer, now - *since);
        }
        open.push((stage, now));
    });
    Some(Open)
}

/// A stage being counted: it closes when this drops.
pub struct Open;

impl Drop for Open {
    fn drop(&mut self) {
        let now = Instant::now();
        OPEN.with(|open| {
            let mut open = open.borrow_mut();
            if let Some((stage, since)) = open.pop() {
                add(stage, now - since);
            }
            if let Some((_, since)) = open.last_mut() {
                *since = now;
            }
        });
    }
}

/// The time counted in each stage since the last call, every stage listed;
/// the counts restart from zero.
pub fn take() -> Vec<(Stage, Duration)> {
    Stage::ALL
        .iter()
        .map(|&s| {
            let nanos = NANOS[s as usize].swap(0, Ordering::Relaxed);
            (s, Duration::from_nanos(nanos))
        })
        .collect()
}
