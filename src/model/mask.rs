//! Attention masks: causal, with padding, and block-diagonal for packed rows
//! (each example attends only to itself).

use candle_core::{DType, Device, Result, Tensor};

/// The additive value for a masked-out score: finite, so a row that is fully
/// masked (padding) gives a uniform softmax instead of NaN.
pub const MASKED: f32 = -1e9;

/// A causal mask `[1, 1, t, past + t]` for `t` new tokens after `past` cached ones.
pub fn causal(t: usize, past: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let s = past + t;
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { MASKED }))
        .collect();
    Tensor::from_vec(v, (1, 1, t, s), device)?.to_dtype(dtype)
}

/// The sliding window, `[1, 1, t, past + t]`, to add to another mask: query
/// `past + i` sees key `j` only when `past + i − j < window`, as transformers'
/// sliding-window layers do.
pub fn window(
    t: usize,
    past: usize,
    window: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let s = past + t;
    let v: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if past + i >= j + window { MASKED } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, t, s), device)?.to_dtype(dtype)
}

/// A mask `[b, 1, t, t]` from per-token segment ids (`[b][t]`): a token attends to
/// earlier tokens of the same segment. Segment 0 marks padding, which attends only
/// to itself.
pub fn segments(segment_ids: &[Vec<u32>], dtype: DType, device: &Device) -> Result<Tensor> {
    let b = segment_ids.len();
    let t = segment_ids.first().map_or(0, Vec::len);
    let mut v = vec![MASKED; b * t * t];
    for (r, row) in segment_ids.iter().enumerate() {
        for i in 0..t {
            for j in 0..=i {
                let visible = if row[i] == 0 {
                    i == j
                } else {
                    row[j] == row[i]
                };
                if visible {
                    v[(r * t + i) * t + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, t, t), device)?.to_dtype(dtype)
}

/// A mask `[b, 1, t, s]` from positions: row r's query i (at position
/// `queries[r][i]`) sees the key in column j when that key has a position
/// (`keys[r][j]`; padding has none) no later than the query's and, with a
/// `window`, less than `window` before it. A padding query sees nothing.
pub fn from_positions(
    queries: &[Vec<Option<u32>>],
    keys: &[Vec<Option<u32>>],
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let (b, t, s) = (
        queries.len(),
        queries.first().map_or(0, Vec::len),
        keys.first().map_or(0, Vec::len),
    );
    let mut v = vec![MASKED; b * t * s];
    for (r, (qs, ks)) in queries.iter().zip(keys).enumerate() {
        for (i, q) in qs.iter().enumerate() {
            let Some(q) = *q else { continue };
            for (j, k) in ks.iter().enumerate() {
                let visible =
                    k.is_some_and(|k| k <= q && window.is_none_or(|w| ((q - k) as usize) < w));
                if visible {
                    v[(r * t + i) * s + j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, t, s), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_attend_within_their_example() {
        let m = segments(&[vec![1, 1, 2, 0]], DType::F32, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let visible: Vec<Vec<bool>> = m
            .iter()
            .map(|r| r.iter().map(|&x| x == 0.0).collect())
            .collect();
        assert_eq!(
            visible,
            vec![
                vec![true, false, false, false],
                vec![true, true, false, false],
                vec![false, false, true, false],
                vec![false, false, false, true],
            ]
        );
    }

    #[test]
    fn masks_from_positions_equal_the_causal_and_window_masks() {
        let (dev, f) = (Device::Cpu, DType::F32);
        // Two queries at positions 3 and 4 after three cached keys: causal.
        let keys = vec![(0..5).map(Some).collect::<Vec<_>>()];
        let queries = vec![vec![Some(3), Some(4)]];
        let m = from_positions(&queries, &keys, None, f, &dev).unwrap();
        let want = causal(2, 3, f, &dev).unwrap();
        let diff = (m - &want).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let m = from_positions(&queries, &keys, Some(2), f, &dev).unwrap();
        let want = want
            .broadcast_add(&window(2, 3, 2, f, &dev).unwrap())
            .unwrap();
        let visible = |m: &Tensor| -> Vec<Vec<bool>> {
            let m: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
            m.iter()
                .map(|r| r.iter().map(|&x| x == 0.0).collect())
                .collect()
        };
        assert_eq!(visible(&m), visible(&want));
        // Padding columns are hidden, and a padding query sees nothing.
        let keys = vec![vec![Some(0), None, Some(1)]];
        let m = from_positions(&[vec![Some(1), None]], &keys, None, f, &dev).unwrap();
        assert_eq!(visible(&m), vec![vec![true, false, true], vec![false; 3]]);
    }

    #[test]
    fn causal_mask_sees_the_cache() {
        let m = causal(2, 3, DType::F32, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0, MASKED]);
        assert_eq!(m[1], vec![0.0; 5]);
    }
}
