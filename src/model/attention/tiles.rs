//! Attention's products in bf16 on AMX tiles, for a bf16 base whose
//! low-precision kernels are on ([`super::Attend::low_precision`]).
//!
//! Its four products per span (the scores `q kᵀ`, the output `p v`, and
//! backward `d_out vᵀ`, `ds k`, `dsᵀ q`, `pᵀ d_out`) multiply two
//! activations, with a contraction of only `hd` (64) or a span's keys or
//! rows, so on f32 FMA they take a seventh of a bf16 training step. Here
//! each operand is rounded to bf16 and packed once for its side of the
//! tile product (`quantized/amx/packed.rs`): a kv head's queries, keys,
//! values and output gradient when the head starts, each span's
//! probabilities and score gradients as they are made. The sums stay f32,
//! and so do the mask, the softmax and its gradient: the products are
//! within bf16's rounding of the f32 ones (2⁻⁹ relative per operand), as
//! PyTorch's attention over a bf16 model is (it keeps even the softmax's
//! output in bf16).
//!
//! The key and value gradients are summed over the spans in transposed
//! buffers (`dkᵀ`, `dvᵀ`: `hd` rows of every key), which the tiles add
//! into in place, and written out once per kv head.

use super::cpu::{Dims, Head};
use super::products::{Inputs, Phase, Products};
use super::Span;
use crate::model::quantized::amx::packed::{product, transpose_f32, Operand, Packed, Rows};
use crate::model::quantized::amx::{Amx, TileConfig, Tiles, TILE_ROWS};
// The attention goes on the tiles where the weights' products do.
use crate::model::quantized::bf16_dot::on_tiles;

/// A size rounded up to whole tiles.
fn whole(n: usize) -> usize {
    n.next_multiple_of(TILE_ROWS)
}

/// [`Products`] in bf16 on tiles: this thread's AMX tiles, or (in tests)
/// the emulator's.
pub(super) struct TileProducts<'a, T = Amx> {
    tiles: T,
    inputs: Inputs<'a>,
    /// The kv head's operands: `q`'s rows and `kᵀ` for the scores, `v`'s
    /// row pairs for the output; backward, `d_out`'s rows and `vᵀ` for the
    /// probabilities' gradient, `k`'s row pairs for `dq`, and `qᵀ` and
    /// `d_outᵀ` (as left sides) for `dkᵀ` and `dvᵀ`.
    q_rows: Packed,
    k_columns: Packed,
    v_pairs: Packed,
    d_out_rows: Packed,
    v_columns: Packed,
    k_pairs: Packed,
    q_columns: Packed,
    d_out_columns: Packed,
    /// A span's probabilities or score gradients, as rows and as row pairs.
    span_rows: Packed,
    span_pairs: Packed,
    /// What a transposed operand is packed from.
    untransposed: Packed,
    /// A product's whole output tiles.
    out: Vec<f32>,
    /// `dkᵀ` and `dvᵀ` of the kv head: `whole(hd)` rows of [`Self::width`].
    dk_t: Vec<f32>,
    dv_t: Vec<f32>,
}

impl<'a> TileProducts<'a> {
    /// The products of an attention over `inputs` in `spans`, where this
    /// thread may use AMX-BF16 tiles and every span starts on an even row.
    pub(super) fn new(inputs: Inputs<'a>, spans: &[&Span]) -> Option<Self> {
        if !on_tiles() {
            return None;
        }
        Self::on(Amx::new(TileConfig::full())?, inputs, spans)
    }
}

impl<'a, T: Tiles> TileProducts<'a, T> {
    /// The products on `tiles` (configured full), where every span starts
    /// on an even row and the queries fill a tile's rows: a decoding step's
    /// few rows would cost more to pack (all the keys and values, at every
    /// step) than to multiply in f32.
    pub(super) fn on(tiles: T, inputs: Inputs<'a>, spans: &[&Span]) -> Option<Self> {
        let Dims { t, g, .. } = inputs.d;
        if t * g < TILE_ROWS || spans.iter().any(|s| (s.queries.start * g) % 2 == 1) {
            return None;
        }
        Some(Self {
            tiles,
            inputs,
            q_rows: Packed::new(),
            k_columns: Packed::new(),
            v_pairs: Packed::new(),
            d_out_rows: Packed::new(),
            v_columns: Packed::new(),
            k_pairs: Packed::new(),
            q_columns: Packed::new(),
            d_out_columns: Packed::new(),
            span_rows: Packed::new(),
            span_pairs: Packed::new(),
            untransposed: Packed::new(),
            out: Vec::new(),
            dk_t: Vec::new(),
            dv_t: Vec::new(),
        })
    }

    /// Columns of `dkᵀ` and `dvᵀ`: every key, and a tile's slack past the
    /// last, which a span's whole tiles of keys may reach.
    fn width(&self) -> usize {
        whole(self.inputs.d.s) + TILE_ROWS
    }

    /// `x`'s rows of kv head `bh` (`rows` of `hd` values each).
    fn of_head(&self, x: &'a [f32], bh: usize, rows: usize) -> Rows<'a> {
        let hd = self.inputs.d.hd;
        Rows {
            values: &x[bh * rows * hd..][..rows * hd],
            rows,
            cols: hd,
            stride: hd,
        }
    }
}

/// The product of `left` and `right` over all of `left`'s pairs from
/// `left.at`, `rows × cols` values, into `to` (rows `cols` apart): straight
/// from the tiles where both are whole tiles, else through `scratch`.
fn product_into(
    tiles: &mut impl Tiles,
    scratch: &mut Vec<f32>,
    [left, right]: [Operand; 2],
    (rows, cols): (usize, usize),
    to: &mut [f32],
) {
    let pairs = left.packed.width() - left.at;
    let (whole_rows, whole_cols) = (whole(rows), whole(cols));
    if (whole_rows, whole_cols) == (rows, cols) {
        return product(tiles, left, right, (rows, cols, pairs), to, cols, false);
    }
    if scratch.len() < whole_rows * whole_cols {
        scratch.resize(whole_rows * whole_cols, 0.0);
    }
    let sizes = (whole_rows, whole_cols, pairs);
    product(tiles, left, right, sizes, scratch, whole_cols, false);
    for (to, from) in to
        .chunks_exact_mut(cols)
        .zip(scratch.chunks_exact(whole_cols))
    {
        to.copy_from_slice(&from[..cols]);
    }
}

/// `rows · columns` over the kv head's values (`hd`): `rows` from the
/// span's first row, `columns` from its first key, into `to` (the span's
/// `rows × keys` scores or their gradient).
fn over_head(
    tiles: &mut impl Tiles,
    scratch: &mut Vec<f32>,
    [rows, columns]: [&Packed; 2],
    head: &Head,
    to: &mut [f32],
) {
    let sides = [
        Operand::from(rows, head.first_row, 0),
        Operand::from(columns, 0, head.first_key),
    ];
    product_into(tiles, scratch, sides, (head.rows, head.keys), to);
}

/// `span · pairs` over the span's keys: the span's probabilities or score
/// gradients packed as rows (from its first pair of keys), by a kv head's
/// values or keys packed as row pairs, into `to` (the span's `rows × hd`).
fn over_keys(
    tiles: &mut impl Tiles,
    scratch: &mut Vec<f32>,
    [span, pairs]: [&Packed; 2],
    head: &Head,
    to: &mut [f32],
) {
    let hd = to.len() / head.rows.max(1);
    let sides = [
        Operand::from(span, 0, 0),
        Operand::from(pairs, first_pair(head).0, 0),
    ];
    product_into(tiles, scratch, sides, (head.rows, hd), to);
}

/// The span's first key rounded down to an even one, and how far below
/// the span that is: products over its keys start at a whole pair of the
/// keys' row pairs.
fn first_pair(head: &Head) -> (usize, usize) {
    let lead = head.first_key % 2;
    ((head.first_key - lead) / 2, lead)
}

/// A span's `rows × keys` values (its probabilities or their gradients).
fn span_values<'v>(head: &Head, values: &'v [f32]) -> Rows<'v> {
    Rows {
        values,
        rows: head.rows,
        cols: head.keys,
        stride: head.keys,
    }
}

impl<T: Tiles> Products for TileProducts<'_, T> {
    fn head(&mut self, bh: usize, phase: Phase) {
        let Dims { t, g, s, .. } = self.inputs.d;
        let (all, inputs) = (t * g, self.inputs);
        let (q, k, v) = (
            self.of_head(inputs.q, bh, all),
            self.of_head(inputs.k, bh, s),
            self.of_head(inputs.v, bh, s),
        );
        // Lines to spare past the last row or key: a span's whole tiles may
        // reach past it.
        let slack = 2 * TILE_ROWS;
        if phase != (Phase::Backward { probs_kept: true }) {
            self.q_rows.rows(q, 0, all + slack);
            self.untransposed.rows(k, 0, s + slack);
            self.k_columns.transposed(&self.untransposed);
        }
        if phase == Phase::Forward {
            self.v_pairs.row_pairs(v, s.div_ceil(2) + slack);
            return;
        }
        let d_out = self.of_head(inputs.d_out, bh, all);
        self.d_out_rows.rows(d_out, 0, all + slack);
        self.untransposed.rows(v, 0, s + slack);
        self.v_columns.transposed(&self.untransposed);
        self.k_pairs.row_pairs(k, s.div_ceil(2) + slack);
        self.untransposed.row_pairs(q, all.div_ceil(2) + slack);
        self.q_columns.transposed(&self.untransposed);
        self.untransposed.row_pairs(d_out, all.div_ceil(2) + slack);
        self.d_out_columns.transposed(&self.untransposed);
        let size = whole(inputs.d.hd) * self.width();
        for sums in [&mut self.dk_t, &mut self.dv_t] {
            sums.clear();
            sums.resize(size, 0.0);
        }
    }

    fn scores(&mut self, head: &Head, p: &mut [f32]) {
        let sides = [&self.q_rows, &self.k_columns];
        over_head(&mut self.tiles, &mut self.out, sides, head, p);
    }

    fn weighted(&mut self, head: &Head, p: &[f32], out: &mut [f32]) {
        self.span_rows
            .rows(span_values(head, p), first_pair(head).1, head.rows);
        let out = head.rows_mut(out, self.inputs.d);
        let sides = [&self.span_rows, &self.v_pairs];
        over_keys(&mut self.tiles, &mut self.out, sides, head, out);
    }

    fn probs_gradient(&mut self, head: &Head, dp: &mut [f32]) {
        let sides = [&self.d_out_rows, &self.v_columns];
        over_head(&mut self.tiles, &mut self.out, sides, head, dp);
    }

    fn gradients(
        &mut self,
        head: &Head,
        [p, ds]: [&[f32]; 2],
        dq: &mut [f32],
        _dk: &mut [f32],
        _dv: &mut [f32],
    ) {
        // dq = ds k
        self.span_rows
            .rows(span_values(head, ds), first_pair(head).1, head.rows);
        let dq = head.rows_mut(dq, self.inputs.d);
        let sides = [&self.span_rows, &self.k_pairs];
        over_keys(&mut self.tiles, &mut self.out, sides, head, dq);
        // dkᵀ += qᵀ ds and dvᵀ += d_outᵀ p, over the span's rows, into the
        // span's keys' columns.
        let (hd, width) = (whole(self.inputs.d.hd), self.width());
        for (values, columns, sums) in [
            (ds, &self.q_columns, &mut self.dk_t),
            (p, &self.d_out_columns, &mut self.dv_t),
        ] {
            let pairs = &mut self.span_pairs;
            pairs.row_pairs(span_values(head, values), head.rows.div_ceil(2));
            let left = Operand::from(columns, 0, head.first_row / 2);
            let right = Operand::from(pairs, 0, 0);
            let sizes = (hd, whole(head.keys), pairs.lines());
            let out = &mut sums[head.first_key..];
            product(&mut self.tiles, left, right, sizes, out, width, true);
        }
    }

    fn head_done(&mut self, bh: usize, dk: &mut [f32], dv: &mut [f32]) {
        let Dims { s, hd, .. } = self.inputs.d;
        let width = self.width();
        for (sums, to) in [(&self.dk_t, dk), (&self.dv_t, dv)] {
            let to = &mut to[bh * s * hd..][..s * hd];
            if whole(s) == s && whole(hd) == hd {
                transpose_f32(sums, width, to, hd, (hd, s));
                continue;
            }
            for (key, row) in to.chunks_exact_mut(hd).enumerate() {
                for (c, value) in row.iter_mut().enumerate() {
                    *value = sums[c * width + key];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::cpu::{backward_on, forward_on};
    use super::super::products::Exact;
    use super::super::{Attend, Spans};
    use super::*;
    use crate::model::mask;
    use crate::model::quantized::amx::emulator::Emulator;
    use crate::testing::randn;
    use candle_core::{DType, Device, Tensor};

    type MakeProducts = for<'v> fn(Inputs<'v>, &[&Span]) -> Box<dyn Products + 'v>;

    fn exact<'v>(inputs: Inputs<'v>, _: &[&Span]) -> Box<dyn Products + 'v> {
        Box::new(Exact(inputs))
    }

    fn emulated<'v>(inputs: Inputs<'v>, spans: &[&Span]) -> Box<dyn Products + 'v> {
        let tiles = Emulator::new(TileConfig::full());
        Box::new(TileProducts::on(tiles, inputs, spans).expect("spans on even rows"))
    }

    fn on_amx<'v>(inputs: Inputs<'v>, spans: &[&Span]) -> Box<dyn Products + 'v> {
        Box::new(TileProducts::new(inputs, spans).expect("AMX tiles"))
    }

    /// The largest difference between `a` and `b` over `b`'s largest value.
    fn relative(a: &Tensor, b: &Tensor) -> f32 {
        let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let diff = max(&(a - b).unwrap()).to_scalar::<f32>().unwrap();
        diff / max(b).to_scalar::<f32>().unwrap()
    }

    /// On the emulator's tiles, and on the CPU's where it has AMX-BF16, the
    /// bf16 products give the exact f32 products' output, probabilities and
    /// gradients within bf16's rounding: causal, packed and sliding masks
    /// (whose spans start at odd keys), in chunks and whole, grouped heads,
    /// cached keys before the queries, a head size below a tile, and the
    /// probabilities kept or made again.
    #[test]
    fn tile_products_follow_the_exact_ones() {
        let amx = on_tiles();
        if !amx {
            eprintln!("this CPU has no usable AMX-BF16: the products run on the emulator only");
        }
        let cpu = &Device::Cpu;
        // Head sizes below a tile, of whole tiles, odd and whole counts of keys.
        for (b, kv, g, t, hd) in [(2, 2, 3, 77, 8), (1, 1, 2, 40, 64), (1, 2, 2, 48, 16)] {
            let segments: Vec<Vec<u32>> = (0..b)
                .map(|r| (0..t as u32).map(|i| (i + r as u32 * 7) / 30 + 1).collect())
                .collect();
            let causal = mask::causal(t, 0, DType::F32, cpu).unwrap();
            let window = mask::window(t, 0, 19, DType::F32, cpu).unwrap();
            let masks = [
                (causal.clone(), 16),
                (mask::segments(&segments, DType::F32, cpu).unwrap(), 32),
                (causal.broadcast_add(&window).unwrap(), 16),
                (causal.clone(), 128),
                (mask::causal(t, 5, DType::F32, cpu).unwrap(), 16),
            ];
            for (mask, chunk) in &masks {
                let s = mask.dim(3).unwrap();
                // Scaled queries, as the attention gets them.
                let q = (randn(&[b, kv, t * g, hd], 1) / (hd as f64).sqrt()).unwrap();
                let (k, v) = (randn(&[b, kv, s, hd], 2), randn(&[b, kv, s, hd], 3));
                let d_out = randn(&[b, kv, t * g, hd], 4);
                let spans = Spans::of_mask(mask, *chunk).unwrap();
                let attend = Attend {
                    low_precision: true,
                    ..Attend::plain([&q, &k, &v], mask, &spans, g)
                };
                let (out, probs) = forward_on(&attend, exact).unwrap().unwrap();
                let want = backward_on(&attend, Some(&probs), &d_out, exact)
                    .unwrap()
                    .unwrap();
                let mut runs: Vec<MakeProducts> = vec![emulated];
                if amx {
                    runs.push(on_amx);
                }
                for on in runs {
                    let case = format!("{b}x{kv}x{g}, t {t}, hd {hd}, chunk {chunk}, {s} keys");
                    let (got, got_probs) = forward_on(&attend, on).unwrap().unwrap();
                    let off = relative(&got, &out);
                    eprintln!("{case}: output off by {off:.1e}");
                    assert!(
                        off < 1e-2,
                        "output, {case}: off by {off} of its largest value"
                    );
                    for (p, want_p) in got_probs.iter().zip(&probs) {
                        assert!(relative(p, want_p) < 1e-2, "probabilities, {case}");
                    }
                    for kept in [Some(&got_probs[..]), None] {
                        let grads = backward_on(&attend, kept, &d_out, on).unwrap().unwrap();
                        for (name, got, want) in [
                            ("dq", &grads.0, &want.0),
                            ("dk", &grads.1, &want.1),
                            ("dv", &grads.2, &want.2),
                        ] {
                            let off = relative(got, want);
                            assert!(
                                off < 1e-2,
                                "{name}, {case}: off by {off} of its largest value"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A decoding step's queries (fewer rows than a tile) stay on the f32
    /// products, as do spans that start on an odd row; others go on tiles.
    #[test]
    fn takes_queries_that_fill_a_tile() {
        let dims = |t, g| Dims::for_tests(1, 1, g, t, 64, 64);
        let values = vec![0f32; 64 * 64 * 4];
        let inputs = |d| Inputs {
            d,
            q: &values,
            k: &values,
            v: &values,
            d_out: &[],
        };
        let span = |start| Span {
            queries: start..start + 1,
            keys: 0..64,
        };
        let tiles = || Emulator::new(TileConfig::full());
        assert!(TileProducts::on(tiles(), inputs(dims(1, 3)), &[&span(0)]).is_none());
        assert!(TileProducts::on(tiles(), inputs(dims(20, 3)), &[&span(0)]).is_some());
        assert!(TileProducts::on(tiles(), inputs(dims(20, 3)), &[&span(0), &span(3)]).is_none());
    }
}
