//! A decoder block, forward and backward.
//!
//! The forward serves inference and training alike; asked to, it returns what
//! the backward needs ([`BlockSaved`]). The backward is written out by hand, op
//! by op: it yields the input gradient and the LoRA gradients, never a gradient
//! for a frozen weight, and never builds an autograd graph. Tests check it
//! against candle's autograd and against finite differences.

use super::attention::{self, Attend, Spans};
use super::linear::LoraGrad;
use super::{ops, Linear, Pass, Projections};
use crate::config::Activation;
use anyhow::{ensure, Result};
use candle_core::Tensor;

/// Self-attention with grouped-query heads.
#[derive(Debug, Clone)]
pub struct Attention {
    /// The query, key and value projections (`q_proj`, `k_proj`, `v_proj`, or
    /// Phi-3's fused `qkv_proj`).
    pub qkv: Projections,
    /// Output projection.
    pub o_proj: Linear,
    /// Per-head RMSNorm weight on q before rope (`[head_dim]`, Qwen3, Gemma 3).
    pub q_norm: Option<Tensor>,
    /// Per-head RMSNorm weight on k before rope (`[head_dim]`, Qwen3, Gemma 3).
    pub k_norm: Option<Tensor>,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Scores are `scale · q·k` (`1/√head_dim`, or Gemma's `1/√query_pre_attn_scalar`).
    pub(crate) scale: f64,
    /// Scores become `c · tanh(s / c)` before the mask (Gemma 2).
    pub(crate) softcap: Option<f64>,
}

/// The gated MLP: SwiGLU, or GeGLU (Gemma).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// The gate and up projections (`gate_proj`, `up_proj`, or Phi-3's fused
    /// `gate_up_proj`).
    pub gate_up: Projections,
    /// Down projection.
    pub down_proj: Linear,
    /// The activation on the gate.
    pub act: Activation,
}

/// One decoder block: pre-norm attention and pre-norm MLP, each with a
/// residual, and with Gemma's sandwich norms a norm on each one's output too.
/// Norm weights are kept as the factor applied (Gemma's `1 + w`).
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm before attention.
    pub input_layernorm: Tensor,
    /// Attention.
    pub self_attn: Attention,
    /// Norm on the attention's output (Gemma's `post_attention_layernorm`).
    pub attn_out_norm: Option<Tensor>,
    /// Norm before the MLP (HF's `post_attention_layernorm`; Gemma's
    /// `pre_feedforward_layernorm`).
    pub post_attention_layernorm: Tensor,
    /// MLP.
    pub mlp: Mlp,
    /// Norm on the MLP's output (Gemma's `post_feedforward_layernorm`).
    pub mlp_out_norm: Option<Tensor>,
    /// Whether attention sees only a sliding window of past positions.
    pub sliding: bool,
    /// Whether q and k are rotated by position (SmolLM3 leaves some layers without).
    pub use_rope: bool,
}

/// What every block of one forward pass shares, made by [`super::CausalLm::context`].
#[derive(Debug, Clone)]
pub struct BlockContext {
    /// Rope cos and sin, each `[b, t, rotary_dim / 2]`.
    pub rope: (Tensor, Tensor),
    /// The sliding-window layers' own rope cos and sin, where their base differs (Gemma 3).
    pub local_rope: Option<(Tensor, Tensor)>,
    /// Additive attention mask.
    pub mask: Tensor,
    /// The mask of the sliding-window layers: `mask` and the window.
    pub sliding_mask: Option<Tensor>,
    /// How `mask`'s queries go in chunks, each with the keys it can see.
    pub spans: Spans,
    /// The same for `sliding_mask`.
    pub sliding_spans: Option<Spans>,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Dropout and autograd settings.
    pub pass: Pass,
}

/// The activations a block's backward pass reads. What is cheap to compute
/// again (the two norms' outputs, the MLP's product) is not kept, nor what only
/// an adapter would read where there is none (the attention output). The
/// attention probabilities grow with the square of the sequence: they are kept
/// only while no larger than the rest (see [`Block::keeps_probs`]), else made
/// again from q and k, which costs about 5% more compute at 1024 tokens.
#[derive(Debug, Clone)]
pub struct BlockSaved {
    x: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// q and k as projected, before their norms (kept only when there are norms).
    q_raw: Option<Tensor>,
    k_raw: Option<Tensor>,
    /// The attention's and the MLP's outputs before their norms (sandwich norms only).
    attn_out: Option<Tensor>,
    mlp_out: Option<Tensor>,
    probs: Option<Vec<Tensor>>,
    attn: Option<Tensor>,
    x2: Tensor,
    gate: Tensor,
    up: Tensor,
    lows: KeptLows,
}

/// The adapters' rank-r products `dropout(x) Aᵀ` from the forward
/// ([`Linear::forward_keeping`]), by linear (`None` where one has no
/// adapter): the backward reads them rather than multiplying again.
#[derive(Debug, Clone)]
struct KeptLows {
    qkv: Vec<Option<Tensor>>,
    o: Option<Tensor>,
    gate_up: Vec<Option<Tensor>>,
    down: Option<Tensor>,
}

/// `norm(x)` where there is a norm, else `x`.
fn maybe_norm(x: Tensor, weight: Option<&Tensor>, eps: f64) -> candle_core::Result<Tensor> {
    match weight {
        Some(w) => ops::rms_norm(&x, w, eps),
        None => Ok(x),
    }
}

/// The gradient through [`maybe_norm`], from its saved input.
fn maybe_norm_backward(
    x: Option<&Tensor>,
    weight: Option<&Tensor>,
    eps: f64,
    dy: &Tensor,
) -> candle_core::Result<Tensor> {
    match (x, weight) {
        (Some(x), Some(w)) => ops::rms_norm_backward(x, w, eps, dy),
        _ => Ok(dy.clone()),
    }
}

/// `[b, t, n]` → `[b·t, n]`.
fn rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, n) = x.dims3()?;
    x.reshape((b * t, n))
}

impl Block {
    /// The block's linears with their module paths (`self_attn.q_proj`, ...), in
    /// a fixed order: q, k, v (or qkv), o, gate, up (or gate_up), down.
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let mut out: Vec<(&'static str, &Linear)> =
            a.qkv.linears.iter().map(|(p, l)| (*p, l)).collect();
        out.push(("self_attn.o_proj", &a.o_proj));
        out.extend(m.gate_up.linears.iter().map(|(p, l)| (*p, l)));
        out.push(("mlp.down_proj", &m.down_proj));
        out
    }

    /// The block's linears, mutable, with their module paths, in [`Block::linears`] order.
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let mut out: Vec<(&'static str, &mut Linear)> =
            a.qkv.linears.iter_mut().map(|(p, l)| (*p, l)).collect();
        out.push(("self_attn.o_proj", &mut a.o_proj));
        out.extend(m.gate_up.linears.iter_mut().map(|(p, l)| (*p, l)));
        out.push(("mlp.down_proj", &mut m.down_proj));
        out
    }

    /// Rotates q or k (`[b, heads, t, head_dim]`) by position, on layers with rope.
    fn rotate(&self, x: &Tensor, ctx: &BlockContext) -> candle_core::Result<Tensor> {
        match self.use_rope {
            true => {
                let (cos, sin) = self.rope_tables(ctx);
                ops::rope(x, cos, sin)
            }
            false => x.contiguous(),
        }
    }

    /// The gradient through [`Block::rotate`].
    fn rotate_backward(&self, dy: &Tensor, ctx: &BlockContext) -> candle_core::Result<Tensor> {
        match self.use_rope {
            true => {
                let (cos, sin) = self.rope_tables(ctx);
                ops::rope_backward(dy, cos, sin)
            }
            false => Ok(dy.clone()),
        }
    }

    /// This layer's rope tables: the local ones on sliding-window layers that have them.
    fn rope_tables<'c>(&self, ctx: &'c BlockContext) -> (&'c Tensor, &'c Tensor) {
        let (cos, sin) = match (&ctx.local_rope, self.sliding) {
            (Some(local), true) => local,
            _ => &ctx.rope,
        };
        (cos, sin)
    }

    /// This layer's attention of the scaled, grouped queries `q` over `k`
    /// and `v` (and a `shared` prefix), under its mask and spans: the
    /// sliding window's on sliding-window layers.
    fn attend<'a>(
        &'a self,
        ctx: &'a BlockContext,
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        shared: Option<&'a (Tensor, Tensor)>,
    ) -> Attend<'a> {
        let (mask, spans) = match (&ctx.sliding_mask, &ctx.sliding_spans, self.sliding) {
            (Some(m), Some(spans), true) => (m, spans),
            _ => (&ctx.mask, &ctx.spans),
        };
        let a = &self.self_attn;
        Attend {
            q,
            k,
            v,
            shared,
            mask,
            spans,
            softcap: a.softcap,
            groups: a.n_heads / a.n_kv_heads,
            // A bf16 base multiplied in bf16: its attention may be too.
            low_precision: a.o_proj.weight.uses_bf16_kernel(),
        }
    }

    /// Whether a training forward over `t` positions keeps the attention
    /// probabilities for the backward pass: while their `heads · t` values per
    /// position (a bound: the CPU's chunks keep about half of them, see
    /// [`attention`]) are no more than the block's other saved activations per
    /// position.
    pub fn keeps_probs(&self, t: usize) -> bool {
        let a = &self.self_attn;
        let (d, kvd) = (a.o_proj.out_features(), a.n_kv_heads * a.head_dim);
        let f = self.mlp.gate_up.width(1);
        a.n_heads * t <= 3 * d + 2 * kvd + 2 * f
    }

    /// Applies the block to `x` (`[b, t, hidden]`). With `save`, also returns the
    /// activations [`Block::backward`] needs.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &BlockContext,
        cache: Option<super::LayerCache>,
        save: bool,
    ) -> Result<(Tensor, Option<BlockSaved>)> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (
            self.self_attn.n_heads,
            self.self_attn.n_kv_heads,
            self.self_attn.head_dim,
        );
        let pass = ctx.pass;
        let a = &self.self_attn;
        let h1 = ops::rms_norm(x, &self.input_layernorm, ctx.eps)?;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
        let (qkv, qkv_lows) = a.qkv.forward_keeping(&h1, pass)?;
        let [q_raw, k_raw, v]: [Tensor; 3] = qkv
            .try_into()
            .map_err(|_| anyhow::anyhow!("attention needs three projections: q, k and v"))?;
        let q_raw = heads(q_raw, h)?.contiguous()?;
        let k_raw = heads(k_raw, kv)?.contiguous()?;
        let q = self.rotate(&maybe_norm(q_raw.clone(), a.q_norm.as_ref(), ctx.eps)?, ctx)?;
        let mut k = self.rotate(&maybe_norm(k_raw.clone(), a.k_norm.as_ref(), ctx.eps)?, ctx)?;
        let mut v = heads(v, kv)?.contiguous()?;
        let mut shared = None;
        if let Some(super::LayerCache {
            own: slot,
            shared: prefix,
        }) = cache
        {
            ensure!(
                !(save && prefix.is_some()),
                "the backward pass does not run through a shared prefix"
            );
            shared = prefix;
            if let Some((pk, pv)) = slot.as_ref() {
                // candle's cat of views along an inner axis can return a
                // strided result, which the attention matmul refuses.
                k = Tensor::cat(&[pk, &k], 2)?.contiguous()?;
                v = Tensor::cat(&[pv, &v], 2)?.contiguous()?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        // Grouped-query attention without copying k/v (see `attention`).
        // The 1/√d scale goes on q, which is smaller than the scores.
        let q = attention::group_queries(&q, kv, a.scale)?;
        let timer = crate::profile::open(crate::profile::Stage::Attention);
        let attend = self.attend(ctx, &q, &k, &v, shared);
        let (out, probs) = attend.forward()?;
        drop(timer);
        let attn = attention::merge_heads(&out, t)?;
        let (attn_out, o_low) = a.o_proj.forward_keeping(&attn, pass)?;
        let x2 = (x + maybe_norm(attn_out.clone(), self.attn_out_norm.as_ref(), ctx.eps)?)?;

        let m = &self.mlp;
        let h2 = ops::rms_norm(&x2, &self.post_attention_layernorm, ctx.eps)?;
        let (gate_up, gate_up_lows) = m.gate_up.forward_keeping(&h2, pass)?;
        let [gate, up]: [Tensor; 2] = gate_up
            .try_into()
            .map_err(|_| anyhow::anyhow!("the MLP needs two projections: gate and up"))?;
        // A fused projection's parts are views: the backward reads them whole.
        let (gate, up) = (gate.contiguous()?, up.contiguous()?);
        let act = ops::gated(&gate, &up, m.act)?;
        let (mlp_out, down_low) = m.down_proj.forward_keeping(&act, pass)?;
        let y = (&x2 + maybe_norm(mlp_out.clone(), self.mlp_out_norm.as_ref(), ctx.eps)?)?;
        let saved = save.then(|| BlockSaved {
            x: x.clone(),
            q,
            k,
            v,
            q_raw: a.q_norm.is_some().then_some(q_raw),
            k_raw: a.k_norm.is_some().then_some(k_raw),
            attn_out: self.attn_out_norm.is_some().then_some(attn_out),
            mlp_out: self.mlp_out_norm.is_some().then_some(mlp_out),
            probs: self.keeps_probs(t).then_some(probs),
            attn: a.o_proj.needs_input().then_some(attn),
            x2,
            gate,
            up,
            lows: KeptLows {
                qkv: qkv_lows,
                o: o_low,
                gate_up: gate_up_lows,
                down: down_low,
            },
        });
        Ok((y, saved))
    }

    /// Backpropagates `dy` (`[b, t, hidden]`) through the block whose forward
    /// saved `saved`. Returns `dx` and the LoRA gradients of the block's linears,
    /// in [`Block::linears`] order (`None` where a linear has no adapter).
    pub fn backward(
        &self,
        saved: &BlockSaved,
        dy: &Tensor,
        ctx: &BlockContext,
    ) -> Result<(Tensor, Vec<Option<LoraGrad>>)> {
        let s = saved;
        let (b, t, d) = dy.dims3()?;
        let (h, kv, hd) = (
            self.self_attn.n_heads,
            self.self_attn.n_kv_heads,
            self.self_attn.head_dim,
        );
        let len = s.k.dim(2)?;
        ensure!(
            len == t,
            "the hand-written backward does not support a KV cache"
        );
        let seed = ctx.pass.dropout_seed;
        let (a, m) = (&self.self_attn, &self.mlp);

        // MLP: y = x2 + norm?(down(act(gate(h2)) · up(h2))).
        let d_mlp_out =
            maybe_norm_backward(s.mlp_out.as_ref(), self.mlp_out_norm.as_ref(), ctx.eps, dy)?;
        let act = match m.down_proj.needs_input() {
            true => Some(rows(&ops::gated(&s.gate, &s.up, m.act)?)?),
            false => None,
        };
        let (d_act, g_down) =
            m.down_proj
                .backward(act.as_ref(), &rows(&d_mlp_out)?, seed, s.lows.down.as_ref())?;
        drop(act);
        let d_act = d_act.reshape((b, t, ()))?;
        let (d_gate, d_up) = ops::gated_backward(&s.gate, &s.up, m.act, &d_act)?;
        let h2 = match m.gate_up.needs_input() {
            true => Some(rows(&ops::rms_norm(
                &s.x2,
                &self.post_attention_layernorm,
                ctx.eps,
            )?)?),
            false => None,
        };
        let d_gate_up = [rows(&d_gate)?, rows(&d_up)?];
        let (dh2, g_gate_up) =
            m.gate_up
                .backward(h2.as_ref(), &d_gate_up, seed, &s.lows.gate_up)?;
        drop(h2);
        let dh2 = dh2.reshape((b, t, d))?;
        let dx2 =
            (dy + ops::rms_norm_backward(&s.x2, &self.post_attention_layernorm, ctx.eps, &dh2)?)?;

        // Attention: x2 = x + norm?(o(attend(rope(q(h1)), rope(k(h1)), v(h1)))).
        let d_attn_out = maybe_norm_backward(
            s.attn_out.as_ref(),
            self.attn_out_norm.as_ref(),
            ctx.eps,
            &dx2,
        )?;
        let attn = s.attn.as_ref().map(rows).transpose()?;
        let (d_attn, g_o) =
            a.o_proj
                .backward(attn.as_ref(), &rows(&d_attn_out)?, seed, s.lows.o.as_ref())?;
        let d_out = attention::split_heads(&d_attn.reshape((b, t, h * hd))?, kv, hd)?;
        // scores = (q·scale) kᵀ, and the scaled q was saved.
        let timer = crate::profile::open(crate::profile::Stage::Attention);
        let attend = self.attend(ctx, &s.q, &s.k, &s.v, None);
        let (dq, dk, dv) = attend.backward(s.probs.as_deref(), &d_out)?;
        let dq = attention::ungroup_queries(&dq, t, a.scale)?;
        drop(timer);
        let (dq, dk) = (
            self.rotate_backward(&dq, ctx)?,
            self.rotate_backward(&dk, ctx)?,
        );
        let dq = maybe_norm_backward(s.q_raw.as_ref(), a.q_norm.as_ref(), ctx.eps, &dq)?;
        let dk = maybe_norm_backward(s.k_raw.as_ref(), a.k_norm.as_ref(), ctx.eps, &dk)?;
        let flat = |x: Tensor, n: usize| x.transpose(1, 2)?.reshape((b * t, n * hd));
        let h1 = match a.qkv.needs_input() {
            true => Some(rows(&ops::rms_norm(&s.x, &self.input_layernorm, ctx.eps)?)?),
            false => None,
        };
        let d_qkv = [flat(dq, h)?, flat(dk, kv)?, flat(dv, kv)?];
        let (dh1, g_qkv) = a.qkv.backward(h1.as_ref(), &d_qkv, seed, &s.lows.qkv)?;
        let dh1 = dh1.reshape((b, t, d))?;
        let dx = (&dx2 + ops::rms_norm_backward(&s.x, &self.input_layernorm, ctx.eps, &dh1)?)?;
        let mut grads = g_qkv;
        grads.push(g_o);
        grads.extend(g_gate_up);
        grads.push(g_down);
        Ok((dx, grads))
    }
}
