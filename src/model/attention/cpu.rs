//! [`Attend`] on the CPU over the f32 values themselves: each kv head's
//! span of query rows goes through `gemm` and the fused softmax kernels
//! straight from and into whole buffers, with the mask's rows added inside
//! the softmax. The tensor path does the same arithmetic through candle's
//! ops, which copy each span's operands, add the mask as a broadcast
//! tensor, and pad and add every span's key gradients into the whole; at
//! 8 × 256 those copies cost as much as the products.
//!
//! It takes attentions without a shared prefix or soft-capping, on f32 CPU
//! tensors that no autograd graph runs through; the others go the tensor
//! path.

use super::{Attend, Span};
use crate::model::fused::{masked_softmax_rows, softmax_backward_rows, with_values};
use crate::model::strided::{product, View};
use candle_core::{DType, Result, Tensor};

/// An attention's sizes.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    kv: usize,
    /// Query heads per kv head.
    g: usize,
    /// Query positions.
    t: usize,
    /// Keys.
    s: usize,
    hd: usize,
    /// Whether the mask has one row per batch row (else one for all).
    mask_per_row: bool,
}

impl Dims {
    /// `attend`'s sizes, where this path takes it.
    fn of(attend: &Attend) -> Option<Self> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let tensors = [attend.q, attend.k, attend.v, attend.mask];
        // Its results carry no autograd graph: where one runs through the
        // inputs, the tensor path records it.
        let plain = |t: &Tensor| cpu_f32(t) && !t.track_op();
        if attend.shared.is_some() || attend.softcap.is_some() || !tensors.iter().all(|t| plain(t))
        {
            return None;
        }
        // Shapes it does not know go the tensor path, which says what is wrong.
        let (&[b, kv, rows, hd], &[_, _, s, _], &[mb, 1, t, ms]) =
            (attend.q.dims(), attend.k.dims(), attend.mask.dims())
        else {
            return None;
        };
        let g = attend.groups;
        let fits = attend.k.dims() == [b, kv, s, hd]
            && attend.v.dims() == [b, kv, s, hd]
            && (mb == 1 || mb == b)
            && ms == s
            && s > 0
            && g > 0
            && rows == t * g;
        fits.then_some(Self {
            b,
            kv,
            g,
            t,
            s,
            hd,
            mask_per_row: mb == b && b > 1,
        })
    }
}

/// One kv head's part of one span: where its values start in each buffer.
struct Head {
    /// The span's first query row in `q`, `d_out`, `out` and `dq`.
    q: usize,
    /// The span's first key in `k`, `v`, `dk` and `dv`.
    k: usize,
    /// The mask's row of the span's first position, at its first key.
    mask: usize,
    /// Query rows and keys of the span.
    rows: usize,
    keys: usize,
}

impl Head {
    fn new(d: Dims, bh: usize, span: &Span) -> Self {
        let mask_batch = if d.mask_per_row { bh / d.kv } else { 0 };
        Self {
            q: (bh * d.t + span.queries.start) * d.g * d.hd,
            k: (bh * d.s + span.keys.start) * d.hd,
            mask: (mask_batch * d.t + span.queries.start) * d.s + span.keys.start,
            rows: span.queries.len() * d.g,
            keys: span.keys.len(),
        }
    }

    /// The span's queries (`rows × hd`) in `x`, or its rows of anything in
    /// the queries' layout.
    fn rows<'a>(&self, x: &'a [f32], d: Dims) -> View<'a> {
        View::rows(&x[self.q..], self.rows, d.hd)
    }

    /// The span's keys (`keys × hd`) in `x`, or its rows of the values.
    fn keys<'a>(&self, x: &'a [f32], d: Dims) -> View<'a> {
        View::rows(&x[self.k..], self.keys, d.hd)
    }

    /// The span's probabilities (`rows × keys`) into `p`: `q kᵀ`, plus the
    /// mask's row of each position, then each row's softmax.
    fn probs(&self, d: Dims, [q, k, mask]: [&[f32]; 3], p: &mut [f32]) {
        product(p, self.keys, false, self.rows(q, d), self.keys(k, d).t());
        for (i, rows) in p.chunks_exact_mut(d.g * self.keys).enumerate() {
            let mask = &mask[self.mask + i * d.s..][..self.keys];
            masked_softmax_rows(rows, mask, self.keys);
        }
    }
}

/// [`Attend::forward`] on this path, where it takes `attend`.
pub(super) fn forward(attend: &Attend) -> Result<Option<(Tensor, Vec<Tensor>)>> {
    let Some(d) = Dims::of(attend) else {
        return Ok(None);
    };
    let inputs = contiguous(&[attend.q, attend.k, attend.v, attend.mask])?;
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let spans: Vec<&Span> = attend.spans.iter().collect();
    let computed = with_values(&refs, |x| {
        let (q, k, v, mask) = (x[0], x[1], x[2], x[3]);
        let mut out = vec![0f32; q.len()];
        let mut all_probs = Vec::with_capacity(spans.len());
        for span in &spans {
            let size = span.queries.len() * d.g * span.keys.len();
            let mut probs = vec![0f32; d.b * d.kv * size];
            for bh in 0..d.b * d.kv {
                let p = &mut probs[bh * size..][..size];
                let head = Head::new(d, bh, span);
                head.probs(d, [q, k, mask], p);
                let p = View::rows(p, head.rows, head.keys);
                product(&mut out[head.q..], d.hd, false, p, head.keys(v, d));
            }
            all_probs.push(probs);
        }
        (out, all_probs)
    });
    let Some((out, all_probs)) = computed else {
        return Ok(None);
    };
    let device = attend.q.device();
    let probs = spans
        .iter()
        .zip(all_probs)
        .map(|(span, p)| {
            let shape = (d.b, d.kv, span.queries.len() * d.g, span.keys.len());
            Tensor::from_vec(p, shape, device)
        })
        .collect::<Result<_>>()?;
    Ok(Some((
        Tensor::from_vec(out, attend.q.shape(), device)?,
        probs,
    )))
}

/// [`Attend::backward`] on this path, where it takes `attend`: the
/// gradients of the scaled queries, the keys and the values.
pub(super) fn backward(
    attend: &Attend,
    probs: Option<&[Tensor]>,
    d_out: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(d) = Dims::of(attend) else {
        return Ok(None);
    };
    let spans: Vec<&Span> = attend.spans.iter().collect();
    // Saved probabilities of other spans go the tensor path, which says so.
    let saved_fit = |p: &[Tensor]| {
        p.len() == spans.len()
            && p.iter()
                .zip(&spans)
                .all(|(p, span)| p.dims() == [d.b, d.kv, span.queries.len() * d.g, span.keys.len()])
    };
    if !probs.is_none_or(saved_fit) || d_out.shape() != attend.q.shape() {
        return Ok(None);
    }
    let mut tensors = vec![attend.q, attend.k, attend.v, attend.mask, d_out];
    tensors.extend(probs.into_iter().flatten());
    let inputs = contiguous(&tensors)?;
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let computed = with_values(&refs, |x| {
        let (q, k, v, mask, d_out) = (x[0], x[1], x[2], x[3], x[4]);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let (mut scratch, mut d_scores) = (Vec::new(), Vec::new());
        for (i, span) in spans.iter().enumerate() {
            let size = span.queries.len() * d.g * span.keys.len();
            for bh in 0..d.b * d.kv {
                let head = Head::new(d, bh, span);
                let p = match x.get(5 + i) {
                    Some(saved) => &saved[bh * size..][..size],
                    None => {
                        scratch.resize(size, 0.0);
                        head.probs(d, [q, k, mask], &mut scratch);
                        &scratch[..]
                    }
                };
                let p_view = View::rows(p, head.rows, head.keys);
                let d_o = head.rows(d_out, d);
                // dv += pᵀ · d_out
                product(&mut dv[head.k..], d.hd, true, p_view.t(), d_o);
                // d_scores = softmax′(p, d_out · vᵀ)
                d_scores.resize(size, 0.0);
                product(&mut d_scores, head.keys, false, d_o, head.keys(v, d).t());
                softmax_backward_rows(p, &mut d_scores, head.keys.max(1));
                let ds = View::rows(&d_scores, head.rows, head.keys);
                // dq = d_scores · k, dk += d_scoresᵀ · q
                product(&mut dq[head.q..], d.hd, false, ds, head.keys(k, d));
                product(&mut dk[head.k..], d.hd, true, ds.t(), head.rows(q, d));
            }
        }
        (dq, dk, dv)
    });
    let Some((dq, dk, dv)) = computed else {
        return Ok(None);
    };
    let device = attend.q.device();
    Ok(Some((
        Tensor::from_vec(dq, attend.q.shape(), device)?,
        Tensor::from_vec(dk, attend.k.shape(), device)?,
        Tensor::from_vec(dv, attend.v.shape(), device)?,
    )))
}

/// Each tensor, contiguous (a copy only of those that are not).
fn contiguous(tensors: &[&Tensor]) -> Result<Vec<Tensor>> {
    tensors.iter().map(|t| t.contiguous()).collect()
}

#[cfg(test)]
mod tests {
    use super::super::Spans;
    use super::*;
    use crate::model::mask;
    use crate::testing::{max_abs_diff, randn};
    use candle_core::Device;

    /// This path's output, probabilities and gradients equal the tensor
    /// path's: causal, packed (one mask per batch row, a padded tail) and
    /// sliding masks, in chunks and whole, grouped heads, cached keys
    /// before the queries, strided keys and values, and the probabilities
    /// kept or computed again.
    #[test]
    fn values_path_equals_the_tensor_path() {
        let (b, kv, g, t, hd) = (2, 2, 3, 77, 8);
        let cpu = &Device::Cpu;
        let segments: Vec<Vec<u32>> = vec![
            (0..t as u32).map(|i| 1 + i / 30).collect(),
            (0..t as u32).map(|i| if i < 70 { 1 } else { 0 }).collect(),
        ];
        let packed = mask::segments(&segments, DType::F32, cpu).unwrap();
        let causal = mask::causal(t, 0, DType::F32, cpu).unwrap();
        let window = mask::window(t, 0, 20, DType::F32, cpu).unwrap();
        let sliding = causal.broadcast_add(&window).unwrap();
        let cached = mask::causal(t, 5, DType::F32, cpu).unwrap();
        for (mask, chunk) in [
            (&causal, 16),
            (&packed, 32),
            (&sliding, 16),
            (&causal, 128),
            (&cached, 16),
        ] {
            let s = mask.dim(3).unwrap();
            let q = randn(&[b, kv, t * g, hd], 1);
            // Strided keys and values, as a transpose leaves them.
            let k = randn(&[b, s, kv, hd], 2).transpose(1, 2).unwrap();
            let v = randn(&[b, s, kv, hd], 3).transpose(1, 2).unwrap();
            let d_out = randn(&[b, kv, t * g, hd], 4);
            let spans = Spans::of_mask(mask, chunk).unwrap();
            let attend = Attend {
                q: &q,
                k: &k,
                v: &v,
                shared: None,
                mask,
                spans: &spans,
                softcap: None,
                groups: g,
            };
            let (k_c, v_c) = (k.contiguous().unwrap(), v.contiguous().unwrap());
            let tensors = Attend {
                k: &k_c,
                v: &v_c,
                ..attend
            };
            let (out, probs) = forward(&attend).unwrap().expect("this path takes it");
            let (out_t, probs_t) = tensors.forward_tensors().unwrap();
            assert!(max_abs_diff(&out, &out_t) < 1e-5, "chunk {chunk}");
            assert_eq!(probs.len(), probs_t.len());
            for (p, p_t) in probs.iter().zip(&probs_t) {
                assert_eq!(p.dims(), p_t.dims());
                assert!(max_abs_diff(p, p_t) < 1e-6);
            }
            let want = tensors.backward_tensors(Some(&probs_t), &d_out).unwrap();
            for kept in [Some(&probs[..]), None] {
                let (dq, dk, dv) = backward(&attend, kept, &d_out).unwrap().unwrap();
                assert!(max_abs_diff(&dq, &want.0) < 1e-5, "dq, chunk {chunk}");
                assert!(max_abs_diff(&dk, &want.1) < 1e-5, "dk, chunk {chunk}");
                assert!(max_abs_diff(&dv, &want.2) < 1e-5, "dv, chunk {chunk}");
            }
        }
    }

    /// Soft-capping, other dtypes and autograd go the tensor path.
    #[test]
    fn declines_what_it_does_not_compute() {
        let (q, k) = (randn(&[1, 1, 4, 8], 1), randn(&[1, 1, 4, 8], 2));
        let mask = mask::causal(4, 0, DType::F32, &Device::Cpu).unwrap();
        let spans = Spans::whole(4, 4);
        fn attend<'a>(
            q: &'a Tensor,
            k: &'a Tensor,
            mask: &'a Tensor,
            spans: &'a Spans,
            softcap: Option<f64>,
        ) -> Attend<'a> {
            Attend {
                q,
                k,
                v: k,
                shared: None,
                mask,
                spans,
                softcap,
                groups: 1,
            }
        }
        let half = q.to_dtype(DType::BF16).unwrap();
        assert!(forward(&attend(&q, &k, &mask, &spans, None))
            .unwrap()
            .is_some());
        assert!(forward(&attend(&q, &k, &mask, &spans, Some(5.0)))
            .unwrap()
            .is_none());
        assert!(forward(&attend(&half, &k, &mask, &spans, None))
            .unwrap()
            .is_none());
        let tracked = candle_core::Var::from_tensor(&q).unwrap();
        let tracked = tracked.as_tensor();
        assert!(forward(&attend(tracked, &k, &mask, &spans, None))
            .unwrap()
            .is_none());
    }
}
