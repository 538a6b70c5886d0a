//! The linears that read one input and whose outputs a block splits into parts:
//! attention's q | k | v and the MLP's gate | up.
//!
//! Llama-family checkpoints keep one linear per part (`q_proj`, `k_proj`,
//! `v_proj`); Phi-3 keeps one fused linear for all of them (`qkv_proj`,
//! `gate_up_proj`). A LoRA adapter on a fused linear spans every part (one `A`,
//! one tall `B`), as PEFT trains it, so the fusion is kept as the checkpoint has it.

use super::linear::LoraGrad;
use super::{Linear, Pass};
use candle_core::{Result, Tensor};

/// One input, several output parts: one linear per part, or one fused linear.
#[derive(Debug, Clone)]
pub struct Projections {
    /// The linears with their module paths (`self_attn.q_proj`, ...), in output order.
    pub linears: Vec<(&'static str, Linear)>,
    /// The width of each part.
    parts: Vec<usize>,
}

impl Projections {
    /// One linear per part: the part widths are the linears' output widths.
    pub fn separate(linears: Vec<(&'static str, Linear)>) -> Self {
        let parts = linears.iter().map(|(_, l)| l.out_features()).collect();
        Self { linears, parts }
    }

    /// One fused linear whose output is the parts end to end.
    pub fn fused(path: &'static str, linear: Linear, parts: Vec<usize>) -> Result<Self> {
        let total: usize = parts.iter().sum();
        if linear.out_features() != total {
            candle_core::bail!(
                "{path} has {} outputs, but its parts {parts:?} need {total}",
                linear.out_features()
            );
        }
        Ok(Self {
            linears: vec![(path, linear)],
            parts,
        })
    }

    /// Whether one linear computes every part.
    pub fn is_fused(&self) -> bool {
        self.linears.len() == 1 && self.parts.len() > 1
    }

    /// The width of part `i`.
    pub fn width(&self, i: usize) -> usize {
        self.parts[i]
    }

    /// The parts for `x` (`[..., in]`), each `[..., width]`.
    pub fn forward_t(&self, x: &Tensor, pass: Pass) -> Result<Vec<Tensor>> {
        Ok(self.forward_keeping(x, pass)?.0)
    }

    /// [`Projections::forward_t`], and each linear's kept rank-r product
    /// ([`Linear::forward_keeping`]), in order.
    pub fn forward_keeping(
        &self,
        x: &Tensor,
        pass: Pass,
    ) -> Result<(Vec<Tensor>, Vec<Option<Tensor>>)> {
        if !self.is_fused() {
            return self
                .linears
                .iter()
                .map(|(_, l)| l.forward_keeping(x, pass))
                .collect::<Result<Vec<_>>>()
                .map(|outs| outs.into_iter().unzip());
        }
        let (y, low) = self.linears[0].1.forward_keeping(x, pass)?;
        let last = y.rank() - 1;
        let mut start = 0;
        let mut out = Vec::with_capacity(self.parts.len());
        for &w in &self.parts {
            out.push(y.narrow(last, start, w)?);
            start += w;
        }
        Ok((out, vec![low]))
    }

    /// Whether [`Projections::backward`] reads the input: only for an adapter.
    pub fn needs_input(&self) -> bool {
        self.linears.iter().any(|(_, l)| l.needs_input())
    }

    /// Backpropagates the parts' gradients `d_parts` (each `[rows, width]`)
    /// through the linears applied to `x` (`[rows, in]`, needed only with an
    /// adapter): the input gradient, and each linear's LoRA gradients in order.
    /// `lows` are the linears' kept rank-r products
    /// ([`Projections::forward_keeping`]), or empty where none were kept.
    pub fn backward(
        &self,
        x: Option<&Tensor>,
        d_parts: &[Tensor],
        dropout_seed: Option<u64>,
        lows: &[Option<Tensor>],
    ) -> Result<(Tensor, Vec<Option<LoraGrad>>)> {
        let fused_dy;
        let dys: Vec<&Tensor> = match self.is_fused() {
            true => {
                fused_dy = Tensor::cat(d_parts, 1)?;
                vec![&fused_dy]
            }
            false => d_parts.iter().collect(),
        };
        let mut dx: Option<Tensor> = None;
        let mut grads = Vec::with_capacity(self.linears.len());
        for (i, ((_, linear), dy)) in self.linears.iter().zip(dys).enumerate() {
            let low = lows.get(i).and_then(Option::as_ref);
            let (d, g) = linear.backward(x, dy, dropout_seed, low)?;
            dx = Some(match dx {
                Some(sum) => (sum + d)?,
                None => d,
            });
            grads.push(g);
        }
        let dx = dx.ok_or_else(|| candle_core::Error::Msg("projections without linears".into()))?;
        Ok((dx, grads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LoraLayer;
    use candle_core::{Device, Var};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A fused linear equals its parts as separate linears, forward and backward
    /// (without adapters: a fused adapter shares its `A` across the parts).
    #[test]
    fn fused_and_separate_linears_agree() {
        let (q, k, inp, rows) = (6, 4, 5, 3);
        let (wq, wk) = (random((q, inp), 1), random((k, inp), 2));
        let fused = Projections::fused(
            "qk",
            Linear::new(Tensor::cat(&[&wq, &wk], 0).unwrap(), None),
            vec![q, k],
        )
        .unwrap();
        let separate = Projections::separate(vec![
            ("q", Linear::new(wq, None)),
            ("k", Linear::new(wk, None)),
        ]);
        let x = random((rows, inp), 3);
        let (a, b) = (
            fused.forward_t(&x, Pass::default()).unwrap(),
            separate.forward_t(&x, Pass::default()).unwrap(),
        );
        for (a, b) in a.iter().zip(&b) {
            assert!(crate::testing::max_abs_diff(a, b) < 1e-6);
        }
        let d = [random((rows, q), 4), random((rows, k), 5)];
        let (dxa, _) = fused.backward(None, &d, None, &[]).unwrap();
        let (dxb, _) = separate.backward(None, &d, None, &[]).unwrap();
        assert!(crate::testing::max_abs_diff(&dxa, &dxb) < 1e-5);
    }

    /// The fused linear's adapter gradients equal candle's autograd through the split.
    #[test]
    fn fused_adapter_gradients_match_autograd() {
        let (q, k, inp, rows, r) = (6, 4, 5, 3, 2);
        let mut linear = Linear::new(random((q + k, inp), 1), None);
        let a = Var::from_tensor(&random((r, inp), 2)).unwrap();
        let b = Var::from_tensor(&random((q + k, r), 3)).unwrap();
        linear.lora = Some(LoraLayer::new(a.clone(), b.clone(), 0.5, 0.0, 1));
        let p = Projections::fused("qk", linear, vec![q, k]).unwrap();
        let x = random((rows, inp), 4);
        let d = [random((rows, q), 5), random((rows, k), 6)];
        let pass = Pass {
            dropout_seed: None,
            autograd: true,
        };
        let parts = p.forward_t(&x, pass).unwrap();
        let loss = ((&parts[0] * &d[0]).unwrap().sum_all().unwrap()
            + (&parts[1] * &d[1]).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let (_, got) = p.backward(Some(&x), &d, None, &[]).unwrap();
        let (da, db) = got[0].clone().unwrap();
        for (want, got) in [(grads.get(&a).unwrap(), da), (grads.get(&b).unwrap(), db)] {
            assert!(crate::testing::max_abs_diff(want, &got) < 1e-5);
        }
    }

    /// The backward reading the rank-r products the forward kept equals the
    /// one that multiplies them again, under dropout (same seed, same mask),
    /// for separate linears with adapters and one without.
    #[test]
    fn kept_rank_r_products_give_the_same_gradients() {
        let (inp, rows, r) = (7, 5, 3);
        let adapted = |out: usize, seed: u64| {
            let mut linear = Linear::new(random((out, inp), seed), None);
            let a = Var::from_tensor(&random((r, inp), seed + 1)).unwrap();
            let b = Var::from_tensor(&random((out, r), seed + 2)).unwrap();
            linear.lora = Some(LoraLayer::new(a, b, 0.5, 0.25, seed));
            linear
        };
        let plain = Linear::new(random((2, inp), 9), None);
        let p = Projections::separate(vec![
            ("q", adapted(4, 1)),
            ("k", plain),
            ("v", adapted(3, 5)),
        ]);
        let x = random((rows, inp), 10);
        let pass = Pass {
            dropout_seed: Some(11),
            autograd: false,
        };
        let (parts, lows) = p.forward_keeping(&x, pass).unwrap();
        assert_eq!(parts.len(), 3);
        assert!(lows[0].is_some() && lows[1].is_none() && lows[2].is_some());
        let d: Vec<Tensor> = [4, 2, 3]
            .iter()
            .zip(12..)
            .map(|(&w, seed)| random((rows, w), seed))
            .collect();
        let (dx_kept, kept) = p.backward(Some(&x), &d, Some(11), &lows).unwrap();
        let (dx_again, again) = p.backward(Some(&x), &d, Some(11), &[]).unwrap();
        assert!(crate::testing::max_abs_diff(&dx_kept, &dx_again) < 1e-6);
        for (k, a) in kept.iter().zip(&again) {
            match (k, a) {
                (Some((ka, kb)), Some((aa, ab))) => {
                    assert!(crate::testing::max_abs_diff(ka, aa) < 1e-6);
                    assert!(crate::testing::max_abs_diff(kb, ab) < 1e-6);
                }
                (None, None) => {}
                _ => panic!("an adapter's gradients on one side only"),
            }
        }
    }
}
