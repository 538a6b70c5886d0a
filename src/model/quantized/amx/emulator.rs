//! The AMX instructions the kernels use, in plain Rust after the pseudo-code
//! of Intel's instruction reference: the kernels' tests run on it on any
//! CPU, so that only the instructions themselves need an AMX machine.

use super::{Tiles, TILE_ROWS, TILE_ROW_BYTES};

/// Eight emulated tiles of 16 rows × 64 bytes, all configured full.
pub(in crate::model::quantized) struct Emulator {
    tiles: [[u8; TILE_ROWS * TILE_ROW_BYTES]; 8],
}

impl Default for Emulator {
    fn default() -> Self {
        Self {
            tiles: [[0; TILE_ROWS * TILE_ROW_BYTES]; 8],
        }
    }
}

impl Emulator {
    /// Value `i` of row `r` of tile `t`, as 4 bytes.
    fn word(&self, t: u8, r: usize, i: usize) -> [u8; 4] {
        let at = r * TILE_ROW_BYTES + 4 * i;
        self.tiles[t as usize][at..at + 4]
            .try_into()
            .expect("4 bytes")
    }
}

/// A bf16 (the high half of an f32) as f32, a subnormal as zero (the
/// instruction treats subnormal inputs as zero).
fn bf16_daz(bits: u16) -> f32 {
    let v = f32::from_bits((bits as u32) << 16);
    match v.is_subnormal() {
        true => 0.0f32.copysign(v),
        false => v,
    }
}

/// A result flushed to zero where it is subnormal, as the instruction
/// flushes its outputs.
fn ftz(v: f32) -> f32 {
    match v.is_subnormal() {
        true => 0.0f32.copysign(v),
        false => v,
    }
}

impl Tiles for Emulator {
    fn zero<const T: u8>(&mut self) {
        self.tiles[T as usize].fill(0);
    }

    unsafe fn load_raw<const T: u8>(&mut self, from: *const u8, stride: usize) {
        for r in 0..TILE_ROWS {
            // SAFETY: the caller keeps every row readable.
            let row = unsafe { std::slice::from_raw_parts(from.add(r * stride), TILE_ROW_BYTES) };
            self.tiles[T as usize][r * TILE_ROW_BYTES..][..TILE_ROW_BYTES].copy_from_slice(row);
        }
    }

    unsafe fn store_raw<const T: u8>(&mut self, to: *mut u8, stride: usize) {
        for r in 0..TILE_ROWS {
            // SAFETY: the caller keeps every row writable.
            let row = unsafe { std::slice::from_raw_parts_mut(to.add(r * stride), TILE_ROW_BYTES) };
            row.copy_from_slice(&self.tiles[T as usize][r * TILE_ROW_BYTES..][..TILE_ROW_BYTES]);
        }
    }

    /// `TDPBF16PS`: for each row `m` of `C` and pair `k` of `A`'s row, each
    /// column `n`: `C[m][n] += A[m].bf16[2k]·B[k].bf16[2n]`, then
    /// `+= A[m].bf16[2k+1]·B[k].bf16[2n+1]`, in f32.
    fn dot_bf16<const C: u8, const A: u8, const B: u8>(&mut self) {
        assert!(
            C != A && C != B && A != B,
            "tdpbf16ps needs three distinct tiles"
        );
        let half = |w: [u8; 4], i: usize| u16::from_le_bytes([w[2 * i], w[2 * i + 1]]);
        for m in 0..TILE_ROWS {
            let mut row: [f32; 16] =
                std::array::from_fn(|n| f32::from_le_bytes(self.word(C, m, n)));
            for k in 0..TILE_ROW_BYTES / 4 {
                let a = self.word(A, m, k);
                for (n, c) in row.iter_mut().enumerate() {
                    let b = self.word(B, k, n);
                    *c = ftz(*c + bf16_daz(half(a, 0)) * bf16_daz(half(b, 0)));
                    *c = ftz(*c + bf16_daz(half(a, 1)) * bf16_daz(half(b, 1)));
                }
            }
            for (n, c) in row.iter().enumerate() {
                let at = m * TILE_ROW_BYTES + 4 * n;
                self.tiles[C as usize][at..at + 4].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load, store};
    use super::*;

    /// One tile product by hand: `A` holds row index + 1 in every pair's
    /// first value and 0.5 in its second, `B` column index in the first and
    /// 2 in the second, so `C[m][n] = start + 16·((m + 1)·n + 1)`.
    #[test]
    fn a_tile_product_sums_pairs_over_the_contraction() {
        let bf = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
        let a: Vec<u32> = (0..256)
            .map(|i| bf((i / 16 + 1) as f32) | bf(0.5) << 16)
            .collect();
        let b: Vec<u32> = (0..256)
            .map(|i| bf((i % 16) as f32) | bf(2.0) << 16)
            .collect();
        let start = vec![3f32; 256];
        let mut unit = Emulator::default();
        load::<_, 1, _>(&mut unit, &start, 0, 16);
        load::<_, 2, _>(&mut unit, &a, 0, 16);
        load::<_, 3, _>(&mut unit, &b, 0, 16);
        unit.dot_bf16::<1, 2, 3>();
        let mut out = vec![0f32; 16 * 20];
        store::<_, 1, _>(&mut unit, &mut out, 2, 20);
        for m in 0..16 {
            for n in 0..16 {
                let want = 3.0 + 16.0 * ((m + 1) * n + 1) as f32;
                assert_eq!(out[2 + m * 20 + n], want, "C[{m}][{n}]");
            }
            assert_eq!(&out[m * 20..m * 20 + 2], &[0.0, 0.0], "outside the tile");
        }
        unit.zero::<1>();
        store::<_, 1, _>(&mut unit, &mut out, 0, 16);
        assert!(out[..256].iter().all(|&v| v == 0.0));
    }

    /// A load that would read past its slice is refused before it reads.
    #[test]
    #[should_panic]
    fn a_load_past_the_slice_panics() {
        let values = vec![0u32; 16 * 16 - 1];
        load::<_, 0, _>(&mut Emulator::default(), &values, 0, 16);
    }
}
