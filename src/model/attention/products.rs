//! The products of one attention on the CPU, behind one trait: exact f32
//! ones through `gemm` ([`Exact`]), or bf16 ones on AMX tiles
//! (`tiles.rs`), which the loops of `cpu.rs` run a kv head at a time and
//! span by span within it.

use super::cpu::{Dims, Head};
use crate::model::strided::{product, View};

/// Which pass a kv head's products are for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Forward,
    /// The backward, with the forward's probabilities kept or (not) made again.
    Backward {
        probs_kept: bool,
    },
}

/// The products of one attention, a kv head at a time and span by span
/// within it: [`Exact`] f32 ones, or bf16 ones on AMX tiles (`tiles.rs`).
pub(super) trait Products {
    /// Makes ready for kv head `bh`'s spans.
    fn head(&mut self, bh: usize, phase: Phase);
    /// The span's scores `q kᵀ` into `p` (`rows × keys`).
    fn scores(&mut self, head: &Head, p: &mut [f32]);
    /// The span's output `p v` into its rows of `out`.
    fn weighted(&mut self, head: &Head, p: &[f32], out: &mut [f32]);
    /// The gradient of the span's probabilities, `d_out vᵀ`, into `dp`.
    fn probs_gradient(&mut self, head: &Head, dp: &mut [f32]);
    /// From the span's probabilities `p` and the gradient of its scores
    /// `ds`: its rows of `dq` (`ds k`), and its keys' shares of `dk` (`dsᵀ q`)
    /// and `dv` (`pᵀ d_out`).
    fn gradients(
        &mut self,
        head: &Head,
        p_ds: [&[f32]; 2],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    );
    /// Ends kv head `bh`'s backward: whatever it kept of `dk` and `dv` written out.
    fn head_done(&mut self, _bh: usize, _dk: &mut [f32], _dv: &mut [f32]) {}
}

/// The attention's inputs, as f32 values.
#[derive(Clone, Copy)]
pub(super) struct Inputs<'a> {
    pub(super) d: Dims,
    pub(super) q: &'a [f32],
    pub(super) k: &'a [f32],
    pub(super) v: &'a [f32],
    /// The output's gradient (the backward's; empty in the forward).
    pub(super) d_out: &'a [f32],
}

/// The f32 products, through `gemm`: each span's operands read in place.
pub(super) struct Exact<'a>(pub(super) Inputs<'a>);

impl Products for Exact<'_> {
    fn head(&mut self, _bh: usize, _phase: Phase) {}

    fn scores(&mut self, head: &Head, p: &mut [f32]) {
        let Inputs { d, q, k, .. } = self.0;
        product(p, head.keys, false, head.rows(q, d), head.keys(k, d).t());
    }

    fn weighted(&mut self, head: &Head, p: &[f32], out: &mut [f32]) {
        let d = self.0.d;
        let p = View::rows(p, head.rows, head.keys);
        product(
            head.rows_mut(out, d),
            d.hd,
            false,
            p,
            head.keys(self.0.v, d),
        );
    }

    fn probs_gradient(&mut self, head: &Head, dp: &mut [f32]) {
        let Inputs { d, v, d_out, .. } = self.0;
        product(
            dp,
            head.keys,
            false,
            head.rows(d_out, d),
            head.keys(v, d).t(),
        );
    }

    fn gradients(
        &mut self,
        head: &Head,
        [p, ds]: [&[f32]; 2],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let Inputs { d, q, k, d_out, .. } = self.0;
        let (p, ds) = (
            View::rows(p, head.rows, head.keys),
            View::rows(ds, head.rows, head.keys),
        );
        product(&mut dv[head.k..], d.hd, true, p.t(), head.rows(d_out, d));
        product(head.rows_mut(dq, d), d.hd, false, ds, head.keys(k, d));
        product(&mut dk[head.k..], d.hd, true, ds.t(), head.rows(q, d));
    }
}
