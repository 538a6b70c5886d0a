//! The KV cache of incremental decoding, with an optional shared prefix.
//!
//! Batched decoding runs many sequences after one prompt prefix (an
//! instruction, a block of worked examples). That prefix's keys and values
//! are kept once, with a batch of one, and every row attends to them before
//! its own columns: a many-shot prefix of thousands of tokens then costs its
//! memory once, not once per row, and the rows' scores against it are one
//! product per head rather than one per row.

use candle_core::{Result, Tensor};

/// Per-layer cached keys and values (`[b, kv_heads, columns, head_dim]`), and
/// the shared prefix's (`[1, kv_heads, prefix, head_dim]`) that every row
/// attends to first.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    shared: Vec<Option<(Tensor, Tensor)>>,
}

/// One layer's part of a [`KvCache`], as a block's forward pass uses it.
#[derive(Debug)]
pub struct LayerCache<'a> {
    /// The rows' own keys and values; the forward appends its new ones.
    pub own: &'a mut Option<(Tensor, Tensor)>,
    /// The shared prefix's keys and values, which come before `own`.
    pub shared: Option<&'a (Tensor, Tensor)>,
}

impl KvCache {
    /// A cache of the given layers' keys and values.
    pub(crate) fn from_layers(layers: Vec<Option<(Tensor, Tensor)>>) -> Self {
        Self {
            layers,
            shared: Vec::new(),
        }
    }

    /// The largest difference between two caches' own keys and values.
    #[cfg(test)]
    pub(crate) fn max_abs_diff(&self, other: &KvCache) -> f32 {
        let pairs = self.layers.iter().zip(&other.layers);
        pairs
            .map(|(a, b)| match (a, b) {
                (Some((ka, va)), Some((kb, vb))) => {
                    crate::testing::max_abs_diff(ka, kb).max(crate::testing::max_abs_diff(va, vb))
                }
                _ => f32::INFINITY,
            })
            .fold(0.0, f32::max)
    }

    /// An empty cache whose rows all follow `prefix` (a cache of one row),
    /// which is kept once and not copied per row.
    pub fn after_shared(prefix: &KvCache) -> Result<Self> {
        if prefix
            .layers
            .iter()
            .flatten()
            .any(|(k, _)| k.dim(0).ok() != Some(1))
        {
            candle_core::bail!("a shared prefix must be a cache of one row");
        }
        let shared = match prefix.shared.is_empty() {
            true => prefix.layers.clone(),
            // A prefix that itself follows a shared prefix: join the two.
            false => (prefix.shared.iter().zip(&prefix.layers))
                .map(|pair| match pair {
                    (Some((sk, sv)), Some((k, v))) => Ok(Some((
                        Tensor::cat(&[sk, k], 2)?.contiguous()?,
                        Tensor::cat(&[sv, v], 2)?.contiguous()?,
                    ))),
                    (a, b) => Ok(a.clone().or_else(|| b.clone())),
                })
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            layers: Vec::new(),
            shared,
        })
    }

    /// How many positions each row sees: the shared prefix's and its own.
    pub fn len(&self) -> usize {
        let columns = |layers: &[Option<(Tensor, Tensor)>]| {
            layers
                .first()
                .and_then(|l| l.as_ref())
                .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
        };
        columns(&self.shared) + columns(&self.layers)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layer `i`'s part, for its forward pass.
    pub fn layer(&mut self, i: usize) -> LayerCache<'_> {
        if self.layers.len() <= i {
            self.layers.resize(i + 1, None);
        }
        LayerCache {
            own: &mut self.layers[i],
            shared: self.shared.get(i).and_then(Option::as_ref),
        }
    }

    /// The cache of the batch rows `rows` only, in that order (a row may
    /// repeat); the shared prefix stays shared.
    pub fn select_rows(&self, rows: &[u32]) -> Result<Self> {
        self.map_own(|t| {
            let index = Tensor::new(rows, t.device())?;
            t.index_select(&index, 0)?.contiguous()
        })
    }

    /// The cache of every row's first `columns` own columns only (the shared
    /// prefix stays shared): a teacher-forced continuation dropped.
    pub fn keep_columns(&self, columns: usize) -> Result<Self> {
        self.map_own(|t| t.narrow(2, 0, columns)?.contiguous())
    }

    /// Every layer's own keys and values through `f`; the shared prefix
    /// stays shared.
    fn map_own(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|(k, v)| Ok((f(k)?, f(v)?))).transpose())
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            shared: self.shared.clone(),
        })
    }

    /// The caches of several batches, one after another along the batch axis
    /// (each must cover the same columns, after the same shared prefix).
    pub fn cat_rows(parts: &[KvCache]) -> Result<Self> {
        let depth = parts.iter().map(|p| p.layers.len()).max().unwrap_or(0);
        let layers = (0..depth)
            .map(|i| {
                let present: Vec<&(Tensor, Tensor)> = parts
                    .iter()
                    .filter_map(|p| p.layers.get(i).and_then(Option::as_ref))
                    .collect();
                if present.is_empty() {
                    return Ok(None);
                }
                let ks: Vec<&Tensor> = present.iter().map(|(k, _)| k).collect();
                let vs: Vec<&Tensor> = present.iter().map(|(_, v)| v).collect();
                Ok(Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            shared: parts.first().map(|p| p.shared.clone()).unwrap_or_default(),
        })
    }

    /// Bytes held by the rows' own keys and values, and by the shared prefix's.
    pub fn bytes(&self) -> (usize, usize) {
        let size = |layers: &[Option<(Tensor, Tensor)>]| {
            layers
                .iter()
                .flatten()
                .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
                .sum()
        };
        (size(&self.layers), size(&self.shared))
    }
}
