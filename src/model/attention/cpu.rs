//! [`Attend`] on the CPU over the f32 values themselves: each kv head's
//! span of query rows goes through the products (`products.rs`: `gemm`'s
//! f32, or bf16 on AMX tiles for a bf16 base) and the fused softmax
//! kernels straight from and into whole buffers, with the mask's rows added
//! inside the softmax. The tensor path does the same arithmetic through
//! candle's ops, which copy each span's operands, add the mask as a
//! broadcast tensor, and pad and add every span's key gradients into the
//! whole; at 8 × 256 those copies cost as much as the products.
//!
//! It takes attentions without a shared prefix or soft-capping, on f32 CPU
//! tensors that no autograd graph runs through; the others go the tensor
//! path.

use super::products::{Exact, Inputs, Phase, Products};
use super::{Attend, Span};
use crate::model::fused::{masked_softmax_rows, softmax_backward_rows, with_values};
use crate::model::strided::View;
use candle_core::{DType, Result, Tensor};

/// An attention's sizes.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    b: usize,
    kv: usize,
    /// Query heads per kv head.
    pub(super) g: usize,
    /// Query positions.
    pub(super) t: usize,
    /// Keys.
    pub(super) s: usize,
    pub(super) hd: usize,
    /// Whether the mask has one row per batch row (else one for all).
    mask_per_row: bool,
}

impl Dims {
    /// Sizes for tests: `b` rows, `kv` heads of `hd`, `g` queries per kv
    /// head, `t` positions, `s` keys, one mask for all rows.
    #[cfg(test)]
    pub(super) fn for_tests(b: usize, kv: usize, g: usize, t: usize, s: usize, hd: usize) -> Self {
        Self {
            b,
            kv,
            g,
            t,
            s,
            hd,
            mask_per_row: false,
        }
    }

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
pub(super) struct Head {
    /// The span's first query row in `q`, `d_out`, `out` and `dq`.
    q: usize,
    /// The span's first key in `k`, `v`, `dk` and `dv`.
    pub(super) k: usize,
    /// The mask's row of the span's first position, at its first key.
    mask: usize,
    /// The span's first query row and first key within its kv head.
    pub(super) first_row: usize,
    pub(super) first_key: usize,
    /// Query rows and keys of the span.
    pub(super) rows: usize,
    pub(super) keys: usize,
}

impl Head {
    fn new(d: Dims, bh: usize, span: &Span) -> Self {
        let mask_batch = if d.mask_per_row { bh / d.kv } else { 0 };
        Self {
            q: (bh * d.t + span.queries.start) * d.g * d.hd,
            k: (bh * d.s + span.keys.start) * d.hd,
            mask: (mask_batch * d.t + span.queries.start) * d.s + span.keys.start,
            first_row: span.queries.start * d.g,
            first_key: span.keys.start,
            rows: span.queries.len() * d.g,
            keys: span.keys.len(),
        }
    }

    /// The span's queries (`rows × hd`) in `x`, or its rows of anything in
    /// the queries' layout.
    pub(super) fn rows<'a>(&self, x: &'a [f32], d: Dims) -> View<'a> {
        View::rows(&x[self.q..], self.rows, d.hd)
    }

    /// The span's keys (`keys × hd`) in `x`, or its rows of the values.
    pub(super) fn keys<'a>(&self, x: &'a [f32], d: Dims) -> View<'a> {
        View::rows(&x[self.k..], self.keys, d.hd)
    }

    /// The span's rows of `x` (in the queries' layout), to write.
    pub(super) fn rows_mut<'a>(&self, x: &'a mut [f32], d: Dims) -> &'a mut [f32] {
        &mut x[self.q..][..self.rows * d.hd]
    }

    /// The span's probabilities (`rows × keys`) into `p`: its scores from
    /// `products`, plus the mask's row of each position, then each row's
    /// softmax.
    fn probs(&self, d: Dims, products: &mut dyn Products, mask: &[f32], p: &mut [f32]) {
        products.scores(self, p);
        for (i, rows) in p.chunks_exact_mut(d.g * self.keys).enumerate() {
            let mask = &mask[self.mask + i * d.s..][..self.keys];
            masked_softmax_rows(rows, mask, self.keys);
        }
    }
}

/// The products `attend` runs on: bf16 ones on tiles where it asks for low
/// precision and the CPU has them, else exact f32 ones.
fn products<'a>(attend: &Attend, inputs: Inputs<'a>, spans: &[&Span]) -> Box<dyn Products + 'a> {
    #[cfg(target_arch = "x86_64")]
    if attend.low_precision {
        if let Some(tiles) = super::tiles::TileProducts::new(inputs, spans) {
            return Box::new(tiles);
        }
    }
    let _ = (attend, spans);
    Box::new(Exact(inputs))
}

/// [`Attend::forward`] on this path, where it takes `attend`.
pub(super) fn forward(attend: &Attend) -> Result<Option<(Tensor, Vec<Tensor>)>> {
    forward_on(attend, |inputs, spans| products(attend, inputs, spans))
}

/// [`forward`] on the products `on` makes.
pub(super) fn forward_on(
    attend: &Attend,
    on: impl for<'v> FnOnce(Inputs<'v>, &[&Span]) -> Box<dyn Products + 'v>,
) -> Result<Option<(Tensor, Vec<Tensor>)>> {
    let Some(d) = Dims::of(attend) else {
        return Ok(None);
    };
    let inputs = contiguous(&[attend.q, attend.k, attend.v, attend.mask])?;
    let refs: Vec<&Tensor> = inputs.iter().collect();
    let spans: Vec<&Span> = attend.spans.iter().collect();
    let computed = with_values(&refs, |x| {
        let (q, k, v, mask) = (x[0], x[1], x[2], x[3]);
        let inputs = Inputs {
            d,
            q,
            k,
            v,
            d_out: &[],
        };
        let mut products = on(inputs, &spans);
        let mut out = vec![0f32; q.len()];
        let sizes: Vec<usize> = spans
            .iter()
            .map(|s| s.queries.len() * d.g * s.keys.len())
            .collect();
        let mut all_probs: Vec<Vec<f32>> = sizes
            .iter()
            .map(|size| vec![0f32; d.b * d.kv * size])
            .collect();
        for bh in 0..d.b * d.kv {
            products.head(bh, Phase::Forward);
            for ((span, size), probs) in spans.iter().zip(&sizes).zip(&mut all_probs) {
                let p = &mut probs[bh * size..][..*size];
                let head = Head::new(d, bh, span);
                head.probs(d, &mut *products, mask, p);
                products.weighted(&head, p, &mut out);
            }
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
    backward_on(attend, probs, d_out, |inputs, spans| {
        products(attend, inputs, spans)
    })
}

/// [`backward`] on the products `on` makes.
pub(super) fn backward_on(
    attend: &Attend,
    probs: Option<&[Tensor]>,
    d_out: &Tensor,
    on: impl for<'v> FnOnce(Inputs<'v>, &[&Span]) -> Box<dyn Products + 'v>,
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
        let inputs = Inputs { d, q, k, v, d_out };
        let mut products = on(inputs, &spans);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let (mut scratch, mut d_scores) = (Vec::new(), Vec::new());
        let phase = Phase::Backward {
            probs_kept: probs.is_some(),
        };
        for bh in 0..d.b * d.kv {
            products.head(bh, phase);
            for (i, span) in spans.iter().enumerate() {
                let size = span.queries.len() * d.g * span.keys.len();
                let head = Head::new(d, bh, span);
                let p = match x.get(5 + i) {
                    Some(saved) => &saved[bh * size..][..size],
                    None => {
                        scratch.resize(size, 0.0);
                        head.probs(d, &mut *products, mask, &mut scratch);
                        &scratch[..]
                    }
                };
                // d_scores = softmax′(p, d_out · vᵀ)
                d_scores.resize(size, 0.0);
                products.probs_gradient(&head, &mut d_scores);
                softmax_backward_rows(p, &mut d_scores, head.keys.max(1));
                products.gradients(&head, [p, &d_scores], &mut dq, &mut dk, &mut dv);
            }
            products.head_done(bh, &mut dk, &mut dv);
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
            let attend = Attend::plain([&q, &k, &v], mask, &spans, g);
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
                low_precision: false,
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
