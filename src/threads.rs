//! CPU threads.
//!
//! Candle splits every op over all cores. At this model's sizes on a laptop's
//! few cores the fork and join around each of the thousands of ops in a
//! training step cost about as much as the work: on 2 cores a 4 × 128 step ran
//! only 13% faster than on one. After [`init`], candle runs each op on the
//! calling thread instead, and tuneforge spreads whole shards of work (rows of
//! a batch) over its own pool, so each core runs long uninterrupted stretches.
//!
//! Without [`init`], candle keeps its own per-op threading and tuneforge runs
//! shards one after another: correct, just slower on the CPU.

use anyhow::Result;
use rayon::prelude::*;
use std::sync::OnceLock;

static POOL_SIZE: OnceLock<usize> = OnceLock::new();
static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// Sets up threads for CPU work: candle ops single-threaded (by setting
/// `RAYON_NUM_THREADS=1` unless the user set it) and a tuneforge pool with one
/// thread per core, or `TUNEFORGE_THREADS`. Also tunes the allocator
/// ([`crate::memory::tune_allocator`]).
///
/// Call it first thing in `main`, before any other thread starts: it changes
/// the process environment.
///
/// ```
/// // First thing in `main`:
/// tuneforge::threads::init();
/// // ... then load, train, generate.
/// assert!(tuneforge::threads::workers() >= 1);
/// ```
pub fn init() {
    crate::memory::tune_allocator();
    // Read before RAYON_NUM_THREADS changes: the cores candle would have used.
    let size =
        *POOL_SIZE.get_or_init(|| requested().unwrap_or_else(candle_core::utils::get_num_threads));
    // Child processes inherit the environment, and with it the same choice.
    if requested().is_none() {
        std::env::set_var("TUNEFORGE_THREADS", size.to_string());
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

fn requested() -> Option<usize> {
    std::env::var("TUNEFORGE_THREADS")
        .ok()?
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// tuneforge's own thread pool: [`init`]'s size, otherwise `TUNEFORGE_THREADS`
/// or candle's thread count.
pub fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        let size = *POOL_SIZE
            .get_or_init(|| requested().unwrap_or_else(candle_core::utils::get_num_threads));
        rayon::ThreadPoolBuilder::new()
            .num_threads(size)
            .thread_name(|i| format!("tuneforge-{i}"))
            .build()
            .expect("tuneforge thread pool")
    })
}

/// How many CPU shards run at once: the pool's size when candle runs ops
/// single-threaded, else 1 (candle's per-op threads already use the cores).
pub fn workers() -> usize {
    if candle_core::utils::get_num_threads() == 1 {
        pool().current_num_threads()
    } else {
        1
    }
}

/// `f` over `items`, [`workers`] at a time on the CPU and one at a time on
/// other devices, whose kernels already fill them. Each wave's results are
/// folded into `acc` in the order of `items`, so the outcome does not depend
/// on the number of workers, and at most one wave's results are held.
pub fn fold_in_waves<T: Sync, R: Send, A>(
    device: &candle_core::Device,
    items: &[T],
    init: A,
    f: impl Fn(usize, &T) -> Result<R> + Sync,
    mut fold: impl FnMut(A, R) -> Result<A>,
) -> Result<A> {
    let workers = if device.is_cpu() { workers() } else { 1 };
    let mut acc = init;
    for (wave, chunk) in items.chunks(workers.max(1)).enumerate() {
        let first = wave * workers;
        let results: Vec<R> = if chunk.len() == 1 {
            vec![f(first, &chunk[0])?]
        } else {
            pool().install(|| {
                chunk
                    .par_iter()
                    .enumerate()
                    .map(|(i, item)| f(first + i, item))
                    .collect::<Result<_>>()
            })?
        };
        for r in results {
            acc = fold(acc, r)?;
        }
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn folds_in_item_order() {
        let items: Vec<usize> = (0..7).collect();
        let order = fold_in_waves(
            &Device::Cpu,
            &items,
            Vec::new(),
            |i, &x| Ok((i, x * 10)),
            |mut v, r| {
                v.push(r);
                Ok(v)
            },
        )
        .unwrap();
        assert_eq!(order, (0..7).map(|i| (i, i * 10)).collect::<Vec<_>>());
    }

    #[test]
    fn the_first_error_wins() {
        let items = [1, 2, 3];
        let err = fold_in_waves(
            &Device::Cpu,
            &items,
            0,
            |_, &x| {
                anyhow::ensure!(x != 2, "item {x} failed");
                Ok(x)
            },
            |a, r| Ok(a + r),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "item 2 failed");
    }
}
