//! One long sequence prefilled into a KV cache (a many-shot prompt prefix),
//! on every core.
//!
//! A single sequence gives its cores no batch rows to split, so it is cut
//! into chunks that run as a pipeline: chunk c runs layer l as soon as chunk
//! c - 1 has written that layer's keys and values, so one core works on one
//! chunk while another works on the next, a layer behind. Each chunk attends
//! to the cache so far, as incremental decoding does; the result is the
//! cache a one-pass prefill gives.

use super::{CausalLm, ForwardInput, KvCache, LayerCache};
use anyhow::Result;
use candle_core::Tensor;
use std::sync::{Condvar, Mutex};

/// Each chunk's progress: how many layers it has finished.
struct Progress {
    layers_done: Mutex<Vec<usize>>,
    changed: Condvar,
}

impl Progress {
    fn wait_for(&self, chunk: usize, layers: usize) {
        let mut done = self.layers_done.lock().expect("progress lock");
        while done[chunk] < layers {
            done = self.changed.wait(done).expect("progress lock");
        }
    }

    fn finish(&self, chunk: usize, layer: usize) {
        self.layers_done.lock().expect("progress lock")[chunk] = layer + 1;
        self.changed.notify_all();
    }
}

impl CausalLm {
    /// The KV cache of `ids` (one sequence), prefilled `chunk` tokens at a
    /// time on `workers` threads (chunk c on thread c mod workers).
    pub fn prefill_cache(&self, ids: &[u32], chunk: usize, workers: usize) -> Result<KvCache> {
        let chunks: Vec<&[u32]> = ids.chunks(chunk.max(1)).collect();
        let depth = self.layers.len();
        let slots: Vec<Mutex<Option<(Tensor, Tensor)>>> =
            (0..depth).map(|_| Mutex::new(None)).collect();
        let progress = Progress {
            layers_done: Mutex::new(vec![0; chunks.len()]),
            changed: Condvar::new(),
        };
        let run = |c: usize| -> Result<()> {
            let tokens = Tensor::new(chunks[c], self.device())?.unsqueeze(0)?;
            let input = ForwardInput::causal(&tokens, c * chunk, self.dtype())?;
            let ctx = self.context(&input, c * chunk)?;
            let mut x = self.embed(&tokens)?;
            for (l, layer) in self.layers.iter().enumerate() {
                if c > 0 {
                    // The previous chunk's keys and values of this layer.
                    progress.wait_for(c - 1, l + 1);
                }
                let mut slot = slots[l].lock().expect("cache lock");
                let cache = LayerCache {
                    own: &mut slot,
                    shared: None,
                };
                x = layer.forward(&x, &ctx, Some(cache), false)?.0;
                drop(slot);
                progress.finish(c, l);
            }
            Ok(())
        };
        let workers = workers.clamp(1, chunks.len().max(1));
        let count = chunks.len();
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let run = &run;
                    let progress = &progress;
                    scope.spawn(move || -> Result<()> {
                        for c in (w..count).step_by(workers) {
                            if let Err(e) = run(c) {
                                // Let the chunks that wait on this one go on and fail.
                                let mut done = progress.layers_done.lock().expect("progress lock");
                                done.iter_mut().skip(c).for_each(|d| *d = usize::MAX);
                                progress.changed.notify_all();
                                return Err(e);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("prefill thread")?;
            }
            Ok(())
        })?;
        let layers = slots
            .into_iter()
            .map(|s| s.into_inner().expect("cache lock"))
            .collect();
        Ok(KvCache::from_layers(layers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Architecture, ModelConfig};
    use candle_core::{DType, Device};

    /// The pipelined cache is the one-pass cache, sliding windows included,
    /// for chunks that do and do not divide the sequence.
    #[test]
    fn pipelined_prefill_equals_one_pass() {
        for arch in [
            Architecture::Llama,
            Architecture::Gemma2,
            Architecture::Phi3,
        ] {
            let mut config = ModelConfig::tiny(arch);
            if config.sliding_window.is_some() {
                config.sliding_window = Some(5);
            }
            let m = CausalLm::random(&config, 4, DType::F32, &Device::Cpu).unwrap();
            let ids: Vec<u32> = (0..23).map(|i| 3 + (i * 7) % 90).collect();
            let mut whole = KvCache::default();
            let t = Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            m.forward_last(&t, &mut whole).unwrap();
            for (chunk, workers) in [(4, 2), (5, 3), (23, 2), (1, 2)] {
                let piped = m.prefill_cache(&ids, chunk, workers).unwrap();
                let diff = whole.max_abs_diff(&piped);
                assert!(diff < 1e-5, "{arch:?}, chunk {chunk}: {diff}");
            }
        }
    }
}
