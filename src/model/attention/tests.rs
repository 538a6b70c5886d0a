use super::*;
use crate::model::mask;
use crate::testing::{max_abs_diff, randn};
use candle_core::DType;

#[test]
fn spans_of_a_causal_mask_stop_at_each_chunks_last_query() {
    let mask = mask::causal(70, 0, DType::F32, &Device::Cpu).unwrap();
    let spans = Spans::of_mask(&mask, 32).unwrap();
    let got: Vec<_> = spans
        .iter()
        .map(|s| (s.queries.clone(), s.keys.clone()))
        .collect();
    assert_eq!(got, vec![(0..32, 0..32), (32..64, 0..64), (64..70, 0..70)]);
    // After cached positions, and within a sliding window.
    let mask = mask::causal(64, 10, DType::F32, &Device::Cpu).unwrap();
    let window = mask::window(64, 10, 16, DType::F32, &Device::Cpu).unwrap();
    let spans = Spans::of_mask(&mask.broadcast_add(&window).unwrap(), 32).unwrap();
    let keys: Vec<_> = spans.iter().map(|s| s.keys.clone()).collect();
    assert_eq!(keys, vec![0..42, 27..74]);
}

#[test]
fn a_chunk_with_a_query_that_sees_nothing_keeps_every_key() {
    let queries = vec![(0..40u32)
        .map(|p| (p >= 4).then_some(p))
        .collect::<Vec<_>>()];
    let mask = mask::from_positions(&queries, &queries, None, DType::F32, &Device::Cpu).unwrap();
    let spans = Spans::of_mask(&mask, 32).unwrap();
    let keys: Vec<_> = spans.iter().map(|s| s.keys.clone()).collect();
    assert_eq!(keys, vec![0..40, 4..40]);
    assert!(Spans::of_mask(&mask, 64).unwrap().is_whole());
}

/// The chunked attention and its gradients equal one whole span's, for
/// causal, packed and sliding masks, grouped heads and soft-capping.
#[test]
fn chunks_give_the_whole_squares_result_and_gradients() {
    let (b, kv, g, t, hd) = (2, 2, 3, 77, 8);
    let segments: Vec<Vec<u32>> = vec![
        (0..t as u32).map(|i| 1 + i / 30).collect(),
        (0..t as u32).map(|i| if i < 70 { 1 } else { 0 }).collect(),
    ];
    let packed = mask::segments(&segments, DType::F32, &Device::Cpu).unwrap();
    let causal = mask::causal(t, 0, DType::F32, &Device::Cpu).unwrap();
    let window = mask::window(t, 0, 20, DType::F32, &Device::Cpu).unwrap();
    let sliding = causal.broadcast_add(&window).unwrap();
    for (mask, softcap) in [(&causal, None), (&packed, Some(5.0)), (&sliding, None)] {
        let q = randn(&[b, kv, t * g, hd], 1);
        let k = randn(&[b, kv, t, hd], 2);
        let v = randn(&[b, kv, t, hd], 3);
        let d_out = randn(&[b, kv, t * g, hd], 4);
        let chunked = Spans::of_mask(mask, 16).unwrap();
        assert!(!chunked.is_whole());
        let whole = Spans::whole(t, t);
        let run = |spans: &Spans| {
            let attend = Attend {
                softcap,
                ..Attend::plain([&q, &k, &v], mask, spans, g)
            };
            let (out, probs) = attend.forward().unwrap();
            let kept = attend.backward(Some(&probs), &d_out).unwrap();
            let again = attend.backward(None, &d_out).unwrap();
            (out, kept, again)
        };
        let (out, kept, again) = run(&chunked);
        let (out_w, (dq_w, dk_w, dv_w), _) = run(&whole);
        assert!(max_abs_diff(&out, &out_w) < 1e-5);
        for (dq, dk, dv) in [kept, again] {
            assert!(max_abs_diff(&dq, &dq_w) < 1e-5);
            assert!(max_abs_diff(&dk, &dk_w) < 1e-5);
            assert!(max_abs_diff(&dv, &dv_w) < 1e-5);
        }
    }
}

#[test]
fn query_layouts_round_trip() {
    let (b, h, kv, t, hd) = (2, 6, 2, 5, 4);
    let q = randn(&[b, h, t, hd], 5);
    let grouped = group_queries(&q, kv, 2.0).unwrap();
    // Row τ·g + j of kv head i is head i·g + j at position τ.
    let row = grouped
        .get(1)
        .unwrap()
        .get(1)
        .unwrap()
        .get(4 * 3 + 2)
        .unwrap();
    let head = (q.get(1).unwrap().get(5).unwrap().get(4).unwrap() * 2.0).unwrap();
    assert_eq!(max_abs_diff(&row, &head), 0.0);
    assert_eq!(
        max_abs_diff(&ungroup_queries(&grouped, t, 0.5).unwrap(), &q),
        0.0
    );
    // The one-pass copies equal candle's strided ones.
    let g = h / kv;
    let by_candle = (q
        .reshape((b, kv, g, t, hd))
        .unwrap()
        .transpose(2, 3)
        .unwrap()
        * 2.0)
        .unwrap()
        .reshape((b, kv, t * g, hd))
        .unwrap();
    assert_eq!(max_abs_diff(&grouped, &by_candle), 0.0);
    let merged = merge_heads(&grouped, t).unwrap();
    assert_eq!(merged.dims(), &[b, t, h * hd]);
    let by_candle = grouped
        .reshape((b, kv, t, g, hd))
        .unwrap()
        .permute((0, 2, 1, 3, 4))
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b, t, h * hd))
        .unwrap();
    assert_eq!(max_abs_diff(&merged, &by_candle), 0.0);
    assert_eq!(
        max_abs_diff(&split_heads(&merged, kv, hd).unwrap(), &grouped),
        0.0
    );
}
