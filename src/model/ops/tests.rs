use super::*;
use crate::testing::{check_gradient, devices, max_abs_diff, randn, randn_on};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Var};

/// SiLU with its hand-written backward, as the block backward uses it.
struct Silu;

impl Function for Silu {
    fn name(&self) -> &'static str {
        "silu"
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.silu()
    }
    fn backward(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        silu_backward(x, dy)
    }
}

/// The SwiGLU product through [`gated`] and [`gated_backward`], as a
/// function of the gate (`wrt_gate`) or of up, the other held fixed.
struct Gated {
    other: Tensor,
    wrt_gate: bool,
    act: crate::config::Activation,
}

impl Function for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.wrt_gate {
            true => gated(x, &self.other, self.act),
            false => gated(&self.other, x, self.act),
        }
    }
    fn backward(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Tensor> {
        Ok(match self.wrt_gate {
            true => gated_backward(x, &self.other, self.act, dy)?.0,
            false => gated_backward(&self.other, x, self.act, dy)?.1,
        })
    }
}

/// [`Gated`] as an op of the tests' list.
fn gated_op(other: Tensor, wrt_gate: bool, act: crate::config::Activation) -> Op {
    Box::new(move |x| {
        let other = other.clone();
        apply(
            x,
            Gated {
                other,
                wrt_gate,
                act,
            },
        )
    })
}

/// Each op with its gradient-free inputs made on `device` in `dtype`:
/// (name, input shape, op).
type Op = Box<dyn Fn(&Tensor) -> Result<Tensor>>;
fn ops_on(device: &Device, dtype: DType) -> Vec<(&'static str, Vec<usize>, Op)> {
    let constant = |shape: &[usize], seed| randn_on(shape, seed, device).to_dtype(dtype).unwrap();
    let (cos, sin) = (constant(&[1, 3, 2], 5), constant(&[1, 3, 2], 6));
    let (w, weight) = (constant(&[4], 7), constant(&[5, 4], 13).into());
    // A Q8_0 weight (one block per row) on the CPU, where blocks are kept.
    let quantized: Option<FrozenWeight> = device.is_cpu().then(|| {
        super::super::quantized::QuantizedWeight::quantize(&constant(&[5, 32], 14), GgmlDType::Q8_0)
            .unwrap()
            .into()
    });
    vec![
        (
            "rms_norm",
            vec![1, 2, 3, 4],
            Box::new(move |x| rms_norm(x, &w, 1e-5)),
        ),
        ("softmax", vec![2, 3, 5], Box::new(softmax_last_dim)),
        (
            "rope",
            vec![1, 2, 3, 4],
            Box::new({
                let (cos, sin) = (cos.clone(), sin.clone());
                move |x| rope(x, &cos, &sin)
            }),
        ),
        (
            "partial_rope",
            vec![1, 2, 3, 6],
            Box::new(move |x| rope(x, &cos, &sin)),
        ),
        (
            "frozen_matmul",
            vec![3, 4],
            Box::new(move |x| frozen_matmul_t(x, &weight)),
        ),
        (
            "frozen_matmul, Q8_0 weight",
            vec![3, 32],
            Box::new(move |x| match &quantized {
                Some(q) => frozen_matmul_t(x, q),
                None => Ok(x.clone()),
            }),
        ),
        ("silu", vec![2, 5], Box::new(|x| apply(x, Silu))),
        (
            "gated silu, wrt gate",
            vec![3, 20],
            gated_op(
                constant(&[3, 20], 15),
                true,
                crate::config::Activation::Silu,
            ),
        ),
        (
            "gated silu, wrt up",
            vec![3, 20],
            gated_op(
                constant(&[3, 20], 16),
                false,
                crate::config::Activation::Silu,
            ),
        ),
        (
            "gated gelu_tanh, wrt gate",
            vec![3, 20],
            gated_op(
                constant(&[3, 20], 17),
                true,
                crate::config::Activation::GeluTanh,
            ),
        ),
        (
            "gated gelu_tanh, wrt up",
            vec![3, 20],
            gated_op(
                constant(&[3, 20], 18),
                false,
                crate::config::Activation::GeluTanh,
            ),
        ),
        (
            "gelu_tanh",
            vec![2, 5],
            Box::new(|x| activation(x, crate::config::Activation::GeluTanh)),
        ),
        ("softcap", vec![2, 5], Box::new(|x| softcap(x, 1.5))),
    ]
}

#[test]
fn gradients_match_finite_differences() {
    for device in devices() {
        for (seed, (_, shape, op)) in ops_on(&device, DType::F32).into_iter().enumerate() {
            check_gradient(&device, &shape, 8 + seed as u64, op);
        }
    }
}

#[test]
fn bf16_outputs_and_gradients_follow_f32() {
    for device in devices() {
        let (f32_ops, bf16_ops) = (ops_on(&device, DType::F32), ops_on(&device, DType::BF16));
        for (seed, ((name, shape, f32_op), (_, _, bf16_op))) in
            f32_ops.into_iter().zip(bf16_ops).enumerate()
        {
            // The op's output and input gradient at one input, in a given dtype.
            let run = |dtype: DType| {
                let op = if dtype == DType::F32 {
                    &f32_op
                } else {
                    &bf16_op
                };
                let x = randn_on(&shape, 40 + seed as u64, &device);
                let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
                let y = op(x.as_tensor()).unwrap();
                let probe = randn_on(y.dims(), 80, &device).to_dtype(y.dtype()).unwrap();
                let grads = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(x.as_tensor()).unwrap().clone();
                [y, dx].map(|t| t.to_dtype(DType::F32).unwrap())
            };
            let (want, got) = (run(DType::F32), run(DType::BF16));
            for (what, w, g) in [
                ("output", &want[0], &got[0]),
                ("gradient", &want[1], &got[1]),
            ] {
                let scale = max_abs_diff(w, &w.zeros_like().unwrap());
                let diff = max_abs_diff(w, g);
                assert!(
                    diff <= 0.03 * scale + 1e-3,
                    "{name} {what} on {device:?}: bf16 differs from f32 by {diff} (scale {scale})"
                );
            }
        }
    }
}

/// `rope_backward`, which the block's backward calls, equals autograd's
/// gradient through `rope`, for a full and a partial rotary part.
#[test]
fn rope_backward_matches_autograd() {
    let (cos, sin) = (randn(&[1, 3, 2], 5), randn(&[1, 3, 2], 6));
    for head_dim in [4, 6] {
        let x = Var::from_tensor(&randn(&[1, 2, 3, head_dim], 7)).unwrap();
        let dy = randn(&[1, 2, 3, head_dim], 8);
        let y = rope(x.as_tensor(), &cos, &sin).unwrap();
        let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let want = grads.get(x.as_tensor()).unwrap();
        let got = rope_backward(&dy, &cos, &sin).unwrap();
        assert!(max_abs_diff(want, &got) < 1e-5, "head_dim {head_dim}");
    }
}

#[test]
fn ops_work_on_strided_and_offset_inputs() {
    // A transposed view and a view that starts mid-buffer.
    let base = randn(&[6, 4], 20);
    let w = randn(&[4], 21);
    for x in [
        base.t().unwrap().t().unwrap(),
        base.narrow(0, 2, 3).unwrap(),
    ] {
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let tracked = rms_norm(&(v.as_tensor() * 1.0).unwrap(), &w, 1e-5).unwrap();
        let plain = rms_norm(&x, &w, 1e-5).unwrap();
        let diff: f32 = (tracked - plain)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max(1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-6);
    }
}

#[test]
fn frozen_weights_get_no_gradient() {
    let w = candle_core::Var::from_tensor(&randn(&[5, 4], 1)).unwrap();
    let x = candle_core::Var::from_tensor(&randn(&[3, 4], 2)).unwrap();
    let frozen = FrozenWeight::Dense(w.as_tensor().clone());
    let grads = frozen_matmul_t(x.as_tensor(), &frozen)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(w.as_tensor()).is_none());
}
