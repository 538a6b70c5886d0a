//! The fused kernels against candle's ops, which stay their reference.

use super::*;
use crate::testing::{max_abs_diff, randn};

/// Odd widths, widths below and above the 16 lanes, and enough rows to
/// split into several tasks.
const SHAPES: [&[usize]; 5] = [&[1], &[3, 7], &[2, 5, 17], &[40, 600], &[3, 2, 1000]];

fn close(name: &str, shape: &[usize], want: &Tensor, got: &Tensor) {
    let scale = max_abs_diff(want, &want.zeros_like().unwrap()).max(1.0);
    let diff = max_abs_diff(want, got);
    assert!(
        diff <= 1e-5 * scale,
        "{name} {shape:?}: differs from candle's ops by {diff} (scale {scale})"
    );
}

#[test]
fn kernels_match_candles_ops() {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let seed = 10 * i as u64;
        let (a, b, c) = (
            (randn(shape, seed) * 3.0).unwrap(),
            randn(shape, seed + 1),
            randn(shape, seed + 2),
        );
        let w = *shape.last().unwrap();
        let weight = randn(&[w], seed + 3);

        for act in [Activation::Silu, Activation::GeluTanh] {
            let name = format!("gated {act:?}");
            let composite = |g: &Tensor| super::super::ops::activation(g, act).unwrap();
            let want = (composite(&a) * &b).unwrap();
            close(&name, shape, &want, &gated(&a, &b, act).unwrap().unwrap());
            let (dg, du) = gated_backward(&a, &b, act, &c).unwrap().unwrap();
            let want_dg =
                super::super::ops::activation_backward(&a, act, &(&c * &b).unwrap()).unwrap();
            close(&format!("{name} backward (gate)"), shape, &want_dg, &dg);
            close(
                &format!("{name} backward (up)"),
                shape,
                &(&c * composite(&a)).unwrap(),
                &du,
            );
        }

        let want = candle_nn::ops::softmax_last_dim(&a).unwrap();
        let y = softmax_last_dim(&a).unwrap().unwrap();
        close("softmax", shape, &want, &y);

        let dot = (&c * &y).unwrap().sum_keepdim(shape.len() - 1).unwrap();
        let want = (&y * c.broadcast_sub(&dot).unwrap()).unwrap();
        close(
            "softmax_backward",
            shape,
            &want,
            &softmax_backward(&y, &c).unwrap().unwrap(),
        );

        let rows = a.reshape(((), w)).unwrap();
        // A running largest value below some rows' largest and above
        // the others'.
        let (n, _) = rows.dims2().unwrap();
        let largest = Tensor::from_vec(
            (0..n).map(|i| [f32::NEG_INFINITY, 0.5][i % 2]).collect(),
            (n, 1),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (grown, e, sums) = exp_shifted(&rows, &largest).unwrap().unwrap();
        let shift = largest.maximum(&rows.max_keepdim(1).unwrap()).unwrap();
        close("exp_shifted (shift)", shape, &shift, &grown);
        let want = rows.broadcast_sub(&shift).unwrap().exp().unwrap();
        close("exp_shifted", shape, &want, &e);
        close(
            "exp_shifted (sums)",
            shape,
            &want.sum_keepdim(1).unwrap(),
            &sums,
        );

        let x = &b;
        let u = c.broadcast_mul(&weight).unwrap();
        let r = (x.sqr().unwrap().mean_keepdim(shape.len() - 1).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let mean_ux = (&u * x).unwrap().mean_keepdim(shape.len() - 1).unwrap();
        let want = (u.broadcast_mul(&r).unwrap()
            - x.broadcast_mul(&(r.powf(3.0).unwrap() * mean_ux).unwrap())
                .unwrap())
        .unwrap();
        let got = rms_norm_backward(x, &weight, 1e-5, &c).unwrap().unwrap();
        close("rms_norm_backward", shape, &want, &got);
        if let [t, .., w] = *shape {
            if w % 2 == 0 && shape.len() > 1 {
                let heads = randn(&[2, 3, t, w], seed + 4);
                let angles = randn(&[2, t, w / 2], seed + 5);
                let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
                for back in [false, true] {
                    let s = match back {
                        false => sin.clone(),
                        true => sin.neg().unwrap(),
                    };
                    let want = candle_nn::rotary_emb::rope(&heads, &cos, &s).unwrap();
                    let got = rope(&heads, &cos, &sin, back).unwrap().unwrap();
                    close("rope", shape, &want, &got);
                }
                let (cos, sin) = (cos.get(1).unwrap(), sin.get(1).unwrap());
                let want = candle_nn::rotary_emb::rope(&heads, &cos, &sin).unwrap();
                let got = rope(&heads, &cos, &sin, false).unwrap().unwrap();
                close("rope, one table for all rows", shape, &want, &got);
            }
        }
        let want = candle_nn::ops::rms_norm(x, &weight, 1e-5).unwrap();
        close(
            "rms_norm",
            shape,
            &want,
            &rms_norm(x, &weight, 1e-5).unwrap().unwrap(),
        );
    }
}

#[test]
fn softmax_gives_masked_positions_exactly_zero() {
    let x = Tensor::new(
        &[[0.5f32, f32::NEG_INFINITY, -1.0, f32::NEG_INFINITY]],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let y: Vec<f32> = softmax_last_dim(&x)
        .unwrap()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!((y[1], y[3]), (0.0, 0.0));
    assert!((y[0] + y[2] - 1.0).abs() < 1e-6);
}

#[test]
fn kernels_decline_what_they_do_not_handle() {
    let a = randn(&[4, 6], 1);
    let strided = a.t().unwrap();
    assert!(softmax_last_dim(&strided).unwrap().is_none());
    assert!(softmax_last_dim(&a.to_dtype(DType::BF16).unwrap())
        .unwrap()
        .is_none());
    let silu = Activation::Silu;
    assert!(gated(&a, &randn(&[6, 4], 2), silu).unwrap().is_none());
    // A view that starts mid-buffer is contiguous, and is read from its start.
    let rows = a.narrow(0, 1, 2).unwrap();
    let want = candle_nn::ops::softmax_last_dim(&rows).unwrap();
    close(
        "softmax of a view",
        &[2, 6],
        &want,
        &softmax_last_dim(&rows).unwrap().unwrap(),
    );
}
