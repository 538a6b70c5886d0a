//! Batches: examples grouped by length and padded, or packed several to a row
//! with attention kept inside each example and positions restarting per example.

use super::tokenize::Example;
use crate::model::{mask, ForwardInput};
use crate::rng::Rng;
use candle_core::{DType, Device, Result, Tensor};

/// A batch ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Ids, positions and mask.
    pub input: ForwardInput,
    /// Next-token targets, `[b, t]` u32 (0 where nothing is trained).
    pub targets: Tensor,
    /// Flat indices (`row * t + col`) of positions whose target is trained.
    pub trained: Tensor,
    /// How many positions are trained.
    pub trained_tokens: usize,
    /// Non-padding tokens.
    pub real_tokens: usize,
    /// Rows × columns, padding included.
    pub padded_tokens: usize,
}

/// A row of one example (padding) or several (packing).
pub type Row = Vec<usize>;

/// A row's width in tokens: its examples end to end.
fn row_width(examples: &[Example], row: &Row) -> usize {
    row.iter().map(|&i| examples[i].ids.len()).sum()
}

/// How one epoch's examples are laid out: steps, each of micro-batches, each of rows.
pub type EpochPlan = Vec<Vec<Vec<Row>>>;

/// Plans an epoch. Examples are sorted by length and cut into steps of
/// `batch_size × grad_accum` examples whose order is shuffled by `rng`, so each
/// step sees the same examples whatever the split into micro-batches. With
/// `packing`, examples are shuffled and packed into rows of `max_seq_len` first.
pub fn plan_epoch(
    examples: &[Example],
    batch_size: usize,
    grad_accum: usize,
    packing: Option<usize>,
    rng: &mut Rng,
) -> EpochPlan {
    let rows: Vec<Row> = match packing {
        None => {
            let mut order: Vec<usize> = (0..examples.len()).collect();
            order.sort_by_key(|&i| (examples[i].ids.len(), i));
            order.into_iter().map(|i| vec![i]).collect()
        }
        Some(max_len) => {
            let mut order: Vec<usize> = (0..examples.len()).collect();
            rng.shuffle(&mut order);
            let mut rows: Vec<Row> = Vec::new();
            let mut used = 0;
            for i in order {
                let len = examples[i].ids.len();
                match rows.last_mut() {
                    Some(row) if used + len <= max_len => {
                        row.push(i);
                        used += len;
                    }
                    _ => {
                        rows.push(vec![i]);
                        used = len;
                    }
                }
            }
            rows.sort_by_key(|r| (row_width(examples, r), r[0]));
            rows
        }
    };
    let per_step = batch_size * grad_accum;
    let mut steps: Vec<Vec<Vec<Row>>> = rows
        .chunks(per_step)
        .map(|s| s.chunks(batch_size).map(<[Row]>::to_vec).collect())
        .collect();
    rng.shuffle(&mut steps);
    steps
}

/// Padded tokens a shard aims at: enough for the matmuls to run near peak on
/// one core, few enough that activations stay small.
pub const SHARD_TOKENS: usize = 256;

/// Splits rows, in order, into shards that run on separate threads
/// ([`crate::threads`]); their gradients add up to the micro-batch's. On the
/// CPU a shard holds at most [`SHARD_TOKENS`] padded tokens (or one row, where
/// a row is longer), and since only the shards in flight hold activations, a
/// large batch needs no more memory than a small one. The shard count is
/// rounded up to a multiple of the worker count where there are rows enough,
/// so that no core waits through a last, lone shard.
///
/// On a GPU, which wants large matmuls, the whole micro-batch is one shard.
pub fn shards(examples: &[Example], rows: &[Row], device: &Device) -> Vec<Vec<Row>> {
    if !device.is_cpu() || rows.is_empty() {
        return vec![rows.to_vec()];
    }
    let mut fewest: Vec<Vec<Row>> = Vec::new();
    let mut widest = 0;
    for row in rows {
        let w = row_width(examples, row);
        match fewest.last_mut() {
            Some(shard) if (shard.len() + 1) * widest.max(w) <= SHARD_TOKENS => {
                shard.push(row.clone());
                widest = widest.max(w);
            }
            _ => {
                fewest.push(vec![row.clone()]);
                widest = w;
            }
        }
    }
    let workers = crate::threads::workers().max(1);
    let n = fewest.len().next_multiple_of(workers).min(rows.len());
    if n == fewest.len() {
        return fewest;
    }
    // n even shards, in order, whose sizes differ by at most one row.
    let (size, extra) = (rows.len() / n, rows.len() % n);
    let mut rest = rows;
    (0..n)
        .map(|i| {
            let (shard, tail) = rest.split_at(size + usize::from(i < extra));
            rest = tail;
            shard.to_vec()
        })
        .collect()
}

/// Builds the tensors of a micro-batch.
pub fn make_batch(
    examples: &[Example],
    rows: &[Row],
    pad_id: u32,
    dtype: DType,
    device: &Device,
) -> Result<Batch> {
    let width = rows
        .iter()
        .map(|r| row_width(examples, r))
        .max()
        .unwrap_or(0);
    let b = rows.len();
    let (mut ids, mut positions, mut targets) = (
        vec![pad_id; b * width],
        vec![0u32; b * width],
        vec![0u32; b * width],
    );
    let mut segments = vec![vec![0u32; width]; b];
    let mut trained = Vec::new();
    let mut real = 0;
    for (r, row) in rows.iter().enumerate() {
        let mut col = 0;
        for (s, &i) in row.iter().enumerate() {
            let ex = &examples[i];
            for (p, &id) in ex.ids.iter().enumerate() {
                let at = r * width + col + p;
                ids[at] = id;
                positions[at] = p as u32;
                segments[r][col + p] = s as u32 + 1;
                if p + 1 < ex.ids.len() && ex.trained[p + 1] {
                    targets[at] = ex.ids[p + 1];
                    trained.push(at as u32);
                }
            }
            col += ex.ids.len();
            real += ex.ids.len();
        }
    }
    let n = trained.len();
    Ok(Batch {
        input: ForwardInput {
            ids: Tensor::from_vec(ids, (b, width), device)?,
            positions: Tensor::from_vec(positions, (b, width), device)?,
            mask: mask::segments(&segments, dtype, device)?,
            sliding_mask: None,
            pass: Default::default(),
        },
        targets: Tensor::from_vec(targets, (b, width), device)?,
        trained: Tensor::from_vec(trained, n, device)?,
        trained_tokens: n,
        real_tokens: real,
        padded_tokens: b * width,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize) -> Example {
        Example {
            ids: (1..=len as u32).collect(),
            trained: (0..len).map(|i| i > 0).collect(),
        }
    }

    #[test]
    fn steps_hold_the_same_examples_for_any_micro_batch_split() {
        let examples: Vec<Example> = (1..=16).map(|n| ex(n % 7 + 2)).collect();
        let a = plan_epoch(&examples, 8, 1, None, &mut Rng::new(5));
        let b = plan_epoch(&examples, 2, 4, None, &mut Rng::new(5));
        let flat = |p: &EpochPlan| -> Vec<Vec<usize>> {
            p.iter()
                .map(|s| s.iter().flatten().flatten().copied().collect())
                .collect()
        };
        assert_eq!(flat(&a), flat(&b));
        assert_eq!(b[0].len(), 4);
    }

    #[test]
    fn packing_fills_rows_and_targets_stay_inside_examples() {
        let examples = vec![ex(3), ex(2), ex(4)];
        let plan = plan_epoch(&examples, 4, 1, Some(6), &mut Rng::new(1));
        let rows: Vec<Row> = plan.into_iter().flatten().flatten().collect();
        assert!(rows.iter().all(|r| row_width(&examples, r) <= 6));
        let batch = make_batch(&examples, &[vec![0, 1]], 0, DType::F32, &Device::Cpu).unwrap();
        // ids 1 2 3 | 1 2 ; targets only within an example: 2 3 _ 2 _
        assert_eq!(
            batch.input.positions.to_vec2::<u32>().unwrap(),
            vec![vec![0, 1, 2, 0, 1]]
        );
        assert_eq!(
            batch.targets.to_vec2::<u32>().unwrap(),
            vec![vec![2, 3, 0, 2, 0]]
        );
        assert_eq!(batch.trained.to_vec1::<u32>().unwrap(), vec![0, 1, 3]);
        assert_eq!(batch.real_tokens, 5);
    }

    #[test]
    fn shards_hold_at_most_the_token_budget_and_keep_row_order() {
        let lens = [100, 120, 128, 60, 300, 10, 10];
        let examples: Vec<Example> = lens.iter().map(|&n| ex(n)).collect();
        let rows: Vec<Row> = (0..lens.len()).map(|i| vec![i]).collect();
        let shards = shards(&examples, &rows, &Device::Cpu);
        assert_eq!(shards.concat(), rows);
        for shard in &shards {
            let widest = shard.iter().map(|r| lens[r[0]]).max().unwrap();
            assert!(shard.len() == 1 || shard.len() * widest <= SHARD_TOKENS);
        }
        // 100 and 120 share a shard (2 × 120 ≤ 256); a third row would not fit.
        assert_eq!(shards[0], vec![vec![0], vec![1]]);
        assert_eq!(
            shards.iter().find(|s| s.contains(&vec![4])).unwrap().len(),
            1
        );
    }
}
