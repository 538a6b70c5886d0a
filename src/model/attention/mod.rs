//! Scaled dot-product attention for grouped-query heads, forward and
//! backward, computed chunk by chunk of query positions.
//!
//! The `g` query heads that share a kv head are interleaved along time:
//! queries are `[b, kv, t·g, hd]`, row `τ·g + j` holding position `τ` of the
//! group's head `j`, so that every head of a kv group is one product against
//! its keys, with no copy of the keys per head. A run of positions is then a
//! run of rows, and the attention goes one [`Span`] of positions at a time,
//! each against only the keys that its mask leaves visible: under a causal
//! mask the first chunk of 32 positions meets 32 keys and the last all of
//! them, so about half the square of scores (the masked half) is never
//! multiplied, nor exponentiated, nor stored. The keys left out are those the
//! mask sets to [`MASKED`] for every query of the chunk, whose weights are
//! exactly zero after the softmax, so the result is the whole square's.

mod cpu;
mod products;
#[cfg(target_arch = "x86_64")]
mod tiles;

use super::mask::MASKED;
use super::{fused, ops};
use candle_core::{Device, Result, Tensor};
use std::ops::Range;

/// A chunk of query positions and the key columns its mask leaves visible to
/// some of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The chunk's query positions.
    pub queries: Range<usize>,
    /// The key columns the chunk attends to; outside them, every query of
    /// the chunk is masked.
    pub keys: Range<usize>,
}

/// The chunks of one mask's query positions, each with its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spans(Vec<Span>);

impl Spans {
    /// Query positions per chunk: few enough that a causal mask's chunks skip
    /// most of the masked half, enough that each product stays large.
    pub const CHUNK: usize = 32;

    /// One chunk of `t` queries against all `s` keys.
    pub fn whole(t: usize, s: usize) -> Self {
        Self(vec![Span {
            queries: 0..t,
            keys: 0..s,
        }])
    }

    /// The chunks of `chunk` query positions of an additive `mask`
    /// (`[b or 1, 1, t, s]`), each narrowed to the key columns that some
    /// query of the chunk, in some row of the batch, can see. A chunk with a
    /// query that sees nothing (padding, whose softmax is uniform over every
    /// key) keeps all the keys.
    ///
    /// Only on the CPU, where the mask is at hand; elsewhere, and for a mask
    /// of another shape, one chunk of all keys.
    pub fn of_mask(mask: &Tensor, chunk: usize) -> Result<Self> {
        let dims = mask.dims();
        let [batch, 1, t, s] = *dims else {
            candle_core::bail!("an attention mask is [b, 1, t, s], not {dims:?}")
        };
        if !matches!(mask.device(), Device::Cpu) || t <= chunk {
            return Ok(Self::whole(t, s));
        }
        let values = mask.flatten_all()?.to_dtype(candle_core::DType::F32)?;
        let values = values.to_vec1::<f32>()?;
        let visible = |v: &f32| *v > MASKED / 2.0;
        let mut spans = Vec::with_capacity(t.div_ceil(chunk));
        for start in (0..t).step_by(chunk) {
            let queries = start..(start + chunk).min(t);
            let mut keys = s..0;
            'rows: for r in 0..batch {
                for q in queries.clone() {
                    let row = &values[(r * t + q) * s..][..s];
                    match (row.iter().position(visible), row.iter().rposition(visible)) {
                        (Some(first), Some(last)) => {
                            keys = keys.start.min(first)..keys.end.max(last + 1);
                        }
                        _ => {
                            keys = 0..s;
                            break 'rows;
                        }
                    }
                }
            }
            spans.push(Span { queries, keys });
        }
        Ok(Self(spans))
    }

    /// The chunks, in order of their queries.
    pub fn iter(&self) -> impl Iterator<Item = &Span> {
        self.0.iter()
    }

    /// Whether there is one chunk of every query against every key.
    pub fn is_whole(&self) -> bool {
        self.0.len() == 1
    }
}

/// One attention's inputs.
pub struct Attend<'a> {
    /// The scaled queries, `[b, kv, t·g, hd]`, heads interleaved along time.
    pub q: &'a Tensor,
    /// The keys and values, each `[b, kv, s', hd]`.
    pub k: &'a Tensor,
    /// See `k`.
    pub v: &'a Tensor,
    /// A prefix of keys and values (`[1, kv, p, hd]` each) that every row
    /// shares, before the rows' own (`s = p + s'`). Every query sees the
    /// prefix, so with one the queries go in one span, whatever `spans` says.
    pub shared: Option<&'a (Tensor, Tensor)>,
    /// The additive mask, `[b or 1, 1, t, s]`.
    pub mask: &'a Tensor,
    /// How the queries go in chunks.
    pub spans: &'a Spans,
    /// Scores become `c · tanh(s / c)` before the mask (Gemma 2).
    pub softcap: Option<f64>,
    /// Query heads per kv head.
    pub groups: usize,
    /// Whether the products may round their operands to bf16 (a bf16
    /// base whose low-precision kernels are on): on the CPU they then run
    /// on AMX-BF16 tiles where it has them (`tiles.rs`), else in f32.
    pub low_precision: bool,
}

#[cfg(test)]
impl<'a> Attend<'a> {
    /// A plain attention for tests: no shared prefix, no soft-capping, f32.
    pub(crate) fn plain(
        [q, k, v]: [&'a Tensor; 3],
        mask: &'a Tensor,
        spans: &'a Spans,
        groups: usize,
    ) -> Self {
        Self {
            q,
            k,
            v,
            shared: None,
            mask,
            spans,
            softcap: None,
            groups,
            low_precision: false,
        }
    }
}

impl Attend<'_> {
    /// The attention output, `[b, kv, t·g, hd]` in the queries' layout, and
    /// each span's probabilities (`[b, kv, rows, keys]`) for the backward.
    pub fn forward(&self) -> Result<(Tensor, Vec<Tensor>)> {
        match cpu::forward(self)? {
            Some(done) => Ok(done),
            None => self.forward_tensors(),
        }
    }

    /// [`Attend::forward`] through candle's ops, on any device.
    fn forward_tensors(&self) -> Result<(Tensor, Vec<Tensor>)> {
        let whole;
        let spans = match self.shared {
            Some(_) => {
                whole = Spans::whole(self.q.dim(2)? / self.groups, self.k.dim(2)?);
                &whole
            }
            None => self.spans,
        };
        let mut outs = Vec::new();
        let mut all_probs = Vec::new();
        for span in spans.iter() {
            let probs = self.probs(span)?;
            outs.push(self.apply(&probs, span)?);
            all_probs.push(probs);
        }
        Ok((Tensor::cat(&outs, 2)?, all_probs))
    }

    /// The gradients of the scaled queries, the keys and the values from the
    /// output's `d_out` (`[b, kv, t·g, hd]`), with the probabilities
    /// [`Attend::forward`] returned, or else computed again.
    pub fn backward(
        &self,
        probs: Option<&[Tensor]>,
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if self.shared.is_some() {
            candle_core::bail!("the backward pass does not run through a shared prefix");
        }
        match cpu::backward(self, probs, d_out)? {
            Some(done) => Ok(done),
            None => self.backward_tensors(probs, d_out),
        }
    }

    /// [`Attend::backward`] through candle's ops, on any device.
    fn backward_tensors(
        &self,
        probs: Option<&[Tensor]>,
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let len = self.k.dim(2)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
        for (i, span) in self.spans.iter().enumerate() {
            let probs = match probs {
                Some(p) => p.get(i).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{} saved attention probabilities for more spans",
                        p.len()
                    ))
                })?,
                None => self.probs(span)?,
            };
            let (q, k, v) = self.operands(span)?;
            let d_out = self.rows(d_out, span)?;
            let d_probs = d_out.matmul(&v.t()?)?;
            let dv_span = probs.t()?.matmul(&d_out)?;
            let d_scores = ops::softmax_backward(&probs, &d_probs)?;
            drop(probs);
            let d_scores = match self.softcap {
                Some(c) => ops::softcap_backward(&q.matmul(&k.t()?)?, c, &d_scores)?,
                None => d_scores,
            };
            dq.push(d_scores.matmul(&k)?);
            let dk_span = d_scores.t()?.matmul(&q)?;
            dk = Some(accumulate(dk, dk_span, &span.keys, len)?);
            dv = Some(accumulate(dv, dv_span, &span.keys, len)?);
        }
        let zeros = || self.k.zeros_like();
        Ok((
            Tensor::cat(&dq, 2)?,
            dk.map_or_else(zeros, Ok)?,
            dv.map_or_else(zeros, Ok)?,
        ))
    }

    /// `span`'s queries, keys and values.
    fn operands(&self, span: &Span) -> Result<(Tensor, Tensor, Tensor)> {
        let n = span.keys.len();
        Ok((
            self.rows(self.q, span)?,
            self.k.narrow(2, span.keys.start, n)?,
            self.v.narrow(2, span.keys.start, n)?,
        ))
    }

    /// The rows of `x` (`[b, kv, t·g, _]`) that hold `span`'s queries.
    fn rows(&self, x: &Tensor, span: &Span) -> Result<Tensor> {
        let g = self.groups;
        x.narrow(2, span.queries.start * g, span.queries.len() * g)
    }

    /// `span`'s probabilities, `[b, kv, rows, keys]`: the softmax of its
    /// scores, soft-capped, plus the mask.
    fn probs(&self, span: &Span) -> Result<Tensor> {
        let (q, k, _) = self.operands(span)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match self.shared {
            Some((prefix, _)) => Tensor::cat(&[&matmul_shared(&q, &prefix.t()?)?, &scores], 3)?,
            None => scores,
        };
        let scores = match self.softcap {
            Some(c) => ops::softcap(&scores, c)?,
            None => scores,
        };
        let (b, kv, rows, s) = scores.dims4()?;
        let t = span.queries.len();
        let first_key = span.keys.start;
        let mask = self
            .mask
            .narrow(2, span.queries.start, t)?
            .narrow(3, first_key, s)?
            .unsqueeze(3)?;
        let scores = scores
            .reshape((b, kv, t, rows / t, s))?
            .broadcast_add(&mask)?;
        ops::softmax_last_dim(&scores.reshape((b, kv, rows, s))?)
    }

    /// `span`'s probabilities applied to the shared prefix's values, where
    /// there are some, and then to the rows' own.
    fn apply(&self, probs: &Tensor, span: &Span) -> Result<Tensor> {
        let (_, _, v) = self.operands(span)?;
        match self.shared {
            Some((_, prefix)) => {
                let (p, s) = (prefix.dim(2)?, probs.dim(3)?);
                let own = probs.narrow(3, p, s - p)?.contiguous()?.matmul(&v)?;
                matmul_shared(&probs.narrow(3, 0, p)?, prefix)? + own
            }
            None => probs.matmul(&v),
        }
    }
}

/// `sum` plus `part`, the gradient of the keys (or values) in `keys`, as a
/// gradient of all `len` of them.
fn accumulate(
    sum: Option<Tensor>,
    part: Tensor,
    keys: &Range<usize>,
    len: usize,
) -> Result<Tensor> {
    let part = match keys.len() == len {
        true => part,
        false => part.pad_with_zeros(2, keys.start, len - keys.end)?,
    };
    match sum {
        Some(sum) => sum + part,
        None => Ok(part),
    }
}

/// `x · w` per kv head, where `x` is `[b, kv, m, n]` and `w` (`[1, kv, n, p]`)
/// is one matrix per head that every row shares: the rows are stacked into one
/// product per head, `[kv, b·m, n] · [kv, n, p]`, rather than `b` thin ones.
fn matmul_shared(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, kv, m, n) = x.dims4()?;
    let p = w.dim(3)?;
    let stacked = x.transpose(0, 1)?.contiguous()?.reshape((kv, b * m, n))?;
    stacked
        .matmul(&w.squeeze(0)?)?
        .reshape((kv, b, m, p))?
        .transpose(0, 1)?
        .contiguous()
}

/// Queries `[b, h, t, hd]` as [`Attend`] takes them, `[b, kv, t·g, hd]`,
/// times `scale` (one pass: the scaling makes the copy).
pub fn group_queries(q: &Tensor, kv: usize, scale: f64) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let g = h / kv;
    let shape = [b, kv, t * g, hd];
    if let Some(done) = fused::swap_middle(q, (b * kv, g, t, hd), scale as f32, &shape)? {
        return Ok(done);
    }
    (q.reshape((b, kv, g, t, hd))?.transpose(2, 3)? * scale)?.reshape(&shape[..])
}

/// The inverse of [`group_queries`] (without the scale): `[b, kv, t·g, hd]`
/// back to `[b, h, t, hd]`, times `scale`.
pub fn ungroup_queries(x: &Tensor, t: usize, scale: f64) -> Result<Tensor> {
    let (b, kv, rows, hd) = x.dims4()?;
    let g = rows / t;
    let shape = [b, kv * g, t, hd];
    if let Some(done) = fused::swap_middle(x, (b * kv, t, g, hd), scale as f32, &shape)? {
        return Ok(done);
    }
    (x.reshape((b, kv, t, g, hd))?.transpose(2, 3)? * scale)?.reshape(&shape[..])
}

/// An output in the queries' layout, `[b, kv, t·g, hd]`, as the output
/// projection takes it: `[b, t, h·hd]`.
pub fn merge_heads(x: &Tensor, t: usize) -> Result<Tensor> {
    let (b, kv, rows, hd) = x.dims4()?;
    let g = rows / t;
    let shape = [b, t, kv * g * hd];
    if let Some(done) = fused::swap_middle(x, (b, kv, t, g * hd), 1.0, &shape)? {
        return Ok(done);
    }
    x.reshape((b, kv, t, g, hd))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?
        .reshape(&shape[..])
}

/// The inverse of [`merge_heads`]: `[b, t, h·hd]` to `[b, kv, t·g, hd]`.
pub fn split_heads(x: &Tensor, kv: usize, hd: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let g = width / (kv * hd);
    let shape = [b, kv, t * g, hd];
    if let Some(done) = fused::swap_middle(x, (b, t, kv, g * hd), 1.0, &shape)? {
        return Ok(done);
    }
    x.reshape((b, t, kv, g, hd))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?
        .reshape(&shape[..])
}

#[cfg(test)]
mod tests;
