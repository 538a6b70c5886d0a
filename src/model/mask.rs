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
    fn causal_mask_sees_the_cache() {
        let m = causal(2, 3, DType::F32, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0, MASKED]);
        assert_eq!(m[1], vec![0.0; 5]);
    }
}
