//! The AMX instructions the kernels use, in plain Rust after the pseudo-code
//! of Intel's instruction reference: the kernels' tests run on it on any
//! CPU, so that only the instructions themselves need an AMX machine. Each
//! product checks its tiles' shapes as the CPU does (where the CPU would
//! raise an exception, the emulator panics).

use super::{TileConfig, Tiles, TILE_ROWS, TILE_ROW_BYTES};

/// Eight emulated tiles, configured as a [`TileConfig`] says.
pub(crate) struct Emulator {
    config: TileConfig,
    tiles: [[u8; TILE_ROWS * TILE_ROW_BYTES]; 8],
}

impl Emulator {
    /// Tiles configured as `config`, all zeros (as `ldtilecfg` leaves them).
    pub(crate) fn new(config: TileConfig) -> Self {
        Self {
            config,
            tiles: [[0; TILE_ROWS * TILE_ROW_BYTES]; 8],
        }
    }

    /// The 4 bytes at `i` of row `r` of tile `t`.
    fn word(&self, t: u8, r: usize, i: usize) -> [u8; 4] {
        let at = r * TILE_ROW_BYTES + 4 * i;
        self.tiles[t as usize][at..at + 4]
            .try_into()
            .expect("4 bytes")
    }

    fn set_word(&mut self, t: u8, r: usize, i: usize, word: [u8; 4]) {
        let at = r * TILE_ROW_BYTES + 4 * i;
        self.tiles[t as usize][at..at + 4].copy_from_slice(&word);
    }

    /// The shapes of a product's tiles, checked as the CPU checks them:
    /// three distinct tiles, `C` as many rows as `A`, `B` a row per 4
    /// bytes of `A`'s rows and as many bytes per row as `C`. Returns `C`'s
    /// rows, its 4-byte columns and `A`'s 4-byte steps.
    fn product_shape(&self, c: u8, a: u8, b: u8) -> (usize, usize, usize) {
        assert!(
            c != a && c != b && a != b,
            "a tile product needs three distinct tiles"
        );
        let ((c_rows, c_bytes), (a_rows, a_bytes), (b_rows, b_bytes)) = (
            self.config.shape(c),
            self.config.shape(a),
            self.config.shape(b),
        );
        assert_eq!(c_rows, a_rows, "C has A's rows");
        assert_eq!(4 * b_rows, a_bytes, "B has a row per 4 bytes of A's rows");
        assert_eq!(b_bytes, c_bytes, "B's rows are as long as C's");
        assert!(c_bytes.is_multiple_of(4) && a_bytes.is_multiple_of(4));
        (c_rows, c_bytes / 4, a_bytes / 4)
    }
}

/// A bf16 (the high half of an f32) as f32, a subnormal as zero (the
/// instruction treats subnormal inputs as zero).
fn bf16_daz(bits: u16) -> f32 {
    ftz(f32::from_bits((bits as u32) << 16))
}

/// A subnormal as zero (the instruction flushes its outputs).
fn ftz(v: f32) -> f32 {
    match v.is_subnormal() {
        true => 0.0f32.copysign(v),
        false => v,
    }
}

impl Tiles for Emulator {
    fn config(&self) -> &TileConfig {
        &self.config
    }

    fn zero<const T: u8>(&mut self) {
        self.tiles[T as usize].fill(0);
    }

    /// Reads the tile's rows of bytes; the rest of the tile becomes zeros.
    unsafe fn load_raw<const T: u8>(&mut self, from: *const u8, stride: usize) {
        let (rows, bytes) = self.config.shape(T);
        self.tiles[T as usize].fill(0);
        for r in 0..rows {
            // SAFETY: the caller keeps every row readable.
            let row = unsafe { std::slice::from_raw_parts(from.add(r * stride), bytes) };
            self.tiles[T as usize][r * TILE_ROW_BYTES..][..bytes].copy_from_slice(row);
        }
    }

    unsafe fn store_raw<const T: u8>(&mut self, to: *mut u8, stride: usize) {
        let (rows, bytes) = self.config.shape(T);
        for r in 0..rows {
            // SAFETY: the caller keeps every row writable.
            let row = unsafe { std::slice::from_raw_parts_mut(to.add(r * stride), bytes) };
            row.copy_from_slice(&self.tiles[T as usize][r * TILE_ROW_BYTES..][..bytes]);
        }
    }

    /// `TDPBF16PS`: for each row `m` of `C`, step `k` of `A`'s row and
    /// column `n`: `C[m][n] += A[m].bf16[2k]·B[k].bf16[2n]`, then
    /// `+= A[m].bf16[2k+1]·B[k].bf16[2n+1]`, in f32.
    fn dot_bf16<const C: u8, const A: u8, const B: u8>(&mut self) {
        let (rows, columns, steps) = self.product_shape(C, A, B);
        let half = |w: [u8; 4], i: usize| u16::from_le_bytes([w[2 * i], w[2 * i + 1]]);
        for m in 0..rows {
            for n in 0..columns {
                let mut c = f32::from_le_bytes(self.word(C, m, n));
                for k in 0..steps {
                    let (a, b) = (self.word(A, m, k), self.word(B, k, n));
                    c = ftz(c + bf16_daz(half(a, 0)) * bf16_daz(half(b, 0)));
                    c = ftz(c + bf16_daz(half(a, 1)) * bf16_daz(half(b, 1)));
                }
                self.set_word(C, m, n, c.to_le_bytes());
            }
        }
    }

    /// `TDPBSUD`: for each row `m` of `C`, step `k` of `A`'s row and column
    /// `n`: `C[m][n] += Σᵢ A[m].i8[4k+i]·B[k].u8[4n+i]`, in wrapping i32.
    fn dot_i8_u8<const C: u8, const A: u8, const B: u8>(&mut self) {
        let (rows, columns, steps) = self.product_shape(C, A, B);
        for m in 0..rows {
            for n in 0..columns {
                let mut c = i32::from_le_bytes(self.word(C, m, n));
                for k in 0..steps {
                    let (a, b) = (self.word(A, m, k), self.word(B, k, n));
                    let dot: i32 = (0..4).map(|i| a[i] as i8 as i32 * b[i] as i32).sum();
                    c = c.wrapping_add(dot);
                }
                self.set_word(C, m, n, c.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{load, store};
    use super::*;

    /// One bf16 tile product by hand: `A` holds row index + 1 in every
    /// pair's first value and 0.5 in its second, `B` column index in the
    /// first and 2 in the second, so `C[m][n] = start + 16·((m + 1)·n + 1)`.
    #[test]
    fn a_bf16_tile_product_sums_pairs_over_the_contraction() {
        let bf = crate::model::quantized::bf16_dot::bf16_bits;
        let a: Vec<u32> = (0..256)
            .map(|i| bf((i / 16 + 1) as f32) | bf(0.5) << 16)
            .collect();
        let b: Vec<u32> = (0..256)
            .map(|i| bf((i % 16) as f32) | bf(2.0) << 16)
            .collect();
        let start = vec![3f32; 256];
        let mut unit = Emulator::new(TileConfig::full());
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

    /// One byte tile product by hand on smaller tiles (`A` 3 rows of 8
    /// bytes, `B` 2 rows of 5 columns): signed bytes of `A` times unsigned
    /// bytes of `B`, with a byte of 255 read as 255 in `B` and −1 in `A`.
    #[test]
    fn a_byte_tile_product_sums_signed_by_unsigned_bytes() {
        let mut shapes = [(16, 64); 8];
        shapes[0] = (3, 20); // C: 3 rows × 5 i32
        shapes[1] = (3, 8); // A: 3 rows × 8 i8
        shapes[2] = (2, 20); // B: 2 steps × 5 columns × 4 u8
        let mut unit = Emulator::new(TileConfig::new(shapes));
        let a: Vec<u8> = (0..24)
            .map(|i| if i == 0 { 255 } else { i as u8 })
            .collect();
        let b: Vec<u8> = (0..40)
            .map(|i| if i == 0 { 255 } else { (i % 7) as u8 })
            .collect();
        let start: Vec<i32> = (0..15).collect();
        load::<_, 0, _>(&mut unit, &start, 0, 5);
        load::<_, 1, _>(&mut unit, &a, 0, 8);
        load::<_, 2, _>(&mut unit, &b, 0, 20);
        unit.dot_i8_u8::<0, 1, 2>();
        let mut out = vec![0i32; 15];
        store::<_, 0, _>(&mut unit, &mut out, 0, 5);
        for m in 0..3 {
            for n in 0..5 {
                let mut want = start[m * 5 + n];
                for k in 0..8 {
                    want += a[m * 8 + k] as i8 as i32 * b[(k / 4) * 20 + 4 * n + k % 4] as i32;
                }
                assert_eq!(out[m * 5 + n], want, "C[{m}][{n}]");
            }
        }
        // −1·255 + 1·1 + 2·2 + 3·3, then 4·6 + 5·0 + 6·1 + 7·2.
        assert_eq!(
            out[0],
            -255 + 1 + 2 * 2 + 3 * 3 + 4 * 6 + 6 + 7 * 2,
            "by hand"
        );
    }

    /// A load that would read past its slice is refused before it reads,
    /// and a product of mismatched shapes as the CPU would refuse it.
    #[test]
    fn loads_past_the_slice_and_mismatched_products_panic() {
        let values = vec![0u32; 16 * 16 - 1];
        let past = std::panic::catch_unwind(|| {
            load::<_, 0, _>(&mut Emulator::new(TileConfig::full()), &values, 0, 16)
        });
        assert!(past.is_err());
        let mut shapes = [(16, 64); 8];
        shapes[2] = (8, 64); // B with a row per 4 bytes of 32, for A of 64
        let mismatched = std::panic::catch_unwind(|| {
            Emulator::new(TileConfig::new(shapes)).dot_i8_u8::<0, 1, 2>()
        });
        assert!(mismatched.is_err());
    }
}
