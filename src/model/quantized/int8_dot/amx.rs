//! The int8 product on AMX tiles (AMX-INT8): the same rows rounded to two
//! 8-bit digits and the same packed panels as the AVX512_VNNI micro-kernel,
//! each group's integer sums made by `tdpbsud` (the rows' signed digits by
//! the weight's unsigned values) 16 rows × 16 columns at a time.
//!
//! A group has its own scales, so a tile product runs over one group (32
//! values, or 16: `A` tiles of 16 rows × `G` bytes, `B` tiles of `G / 4`
//! steps × 16 columns' 4 bytes, which is how a packed panel already lays
//! out each half of its 32 columns). Per group and block of 16 rows × one
//! panel: the high and the low digits' sums for both halves in tiles 0-3
//! (rows' digits in tiles 4-5, the panel's halves in 6-7), stored, then
//! combined and scaled into an f32 block exactly as the VNNI kernel does
//! (`256·high + start + low`, times `s · d`, plus `min · s · Σq`). The rows
//! are padded with zero rows to a multiple of 16, the output to whole
//! panels (in a scratch buffer where it is not already).
//!
//! The blocking constants are the VNNI kernel's; they are not tuned for
//! AMX, which no machine this was written on had.

use super::super::amx::{load, store, with_padded_output, TileConfig, Tiles, TILE_ROWS};
use super::pack::{for_each_block, group_panel_bytes, has_min, mins_at, scales_at, zero_point};
use super::{Int8Weight, QuantizedRows, NR};

/// The tiles' shapes for groups of `group` values: 0-3 16 × 16 i32 sums,
/// 4-5 16 rows × `group` digits, 6-7 `group / 4` steps × 16 columns × 4
/// bytes.
pub(super) fn config(group: usize) -> TileConfig {
    let (sums, digits, panel) = ((TILE_ROWS, 64), (TILE_ROWS, group), (group / 4, 64));
    TileConfig::new([sums, sums, sums, sums, digits, digits, panel, panel])
}

/// `x Wᵀ` into `out` on `tiles` (configured by [`config`] for `G`): what
/// [`super::product`] computes on one thread.
///
/// # Panics
/// If the CPU lacks AVX-512 F, BW and DQ (for rounding the rows and
/// scaling the sums), or the tiles are configured otherwise.
pub(super) fn serial<const G: usize>(
    tiles: &mut impl Tiles,
    x: &[f32],
    m: usize,
    w: Int8Weight,
    out: &mut [f32],
) {
    assert!(
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
        "the CPU has no AVX-512"
    );
    let (n, k) = (w.n, w.rows.k);
    let groups = k / G;
    let rows_padded = m.next_multiple_of(TILE_ROWS);
    let rows = QuantizedRows::new::<G>(x, rows_padded, k, zero_point(w.rows.format));
    let with_min = has_min(w.rows.format);
    let out_stride = n.next_multiple_of(NR);
    with_padded_output(out, (m, n), (rows_padded, out_stride), |acc| {
        let mut sums = vec![0i32; 4 * TILE_ROWS * 16];
        for_each_block::<G>(w.rows, n, |packed| {
            for row in (0..rows_padded).step_by(TILE_ROWS) {
                let panels = packed
                    .panels
                    .chunks_exact(packed.depth * group_panel_bytes(G));
                for (j, panel) in panels.enumerate() {
                    let mut block = [[0f32; NR]; TILE_ROWS];
                    for b in 0..packed.depth {
                        let group = packed.first + b;
                        let at = b * group_panel_bytes(G);
                        group_sums(tiles, &rows, row * k + group * G, k, panel, at, &mut sums);
                        let per_row = Group {
                            rows: &rows,
                            at: row * groups + group,
                            stride: groups,
                        };
                        let panel = &panel[at..][..group_panel_bytes(G)];
                        // SAFETY: the CPU has AVX-512 F (asserted above).
                        unsafe { scale_sums(&sums, per_row, panel, G, with_min, &mut block) };
                    }
                    let c = row * out_stride + packed.col + j * NR;
                    for (i, block) in block.iter().enumerate() {
                        let o = &mut acc[c + i * out_stride..][..NR];
                        match packed.first {
                            0 => o.copy_from_slice(block),
                            _ => o.iter_mut().zip(block).for_each(|(o, v)| *o += v),
                        }
                    }
                }
            }
        });
    });
}

/// One group's integer sums for 16 rows (their digits from `at` of the
/// rounded rows, rows `stride` apart) against the panel's group at
/// `panel_at`, into `sums`: the high digits' sums for columns 0-15, then
/// 16-31, then the low digits' likewise, 16 × 16 i32 each.
#[inline(always)]
fn group_sums(
    tiles: &mut impl Tiles,
    rows: &QuantizedRows,
    at: usize,
    stride: usize,
    panel: &[u8],
    panel_at: usize,
    sums: &mut [i32],
) {
    const SUMS: usize = TILE_ROWS * 16;
    load::<_, 4, _>(tiles, &rows.high, at, stride);
    load::<_, 5, _>(tiles, &rows.low, at, stride);
    load::<_, 6, _>(tiles, panel, panel_at, 4 * NR);
    load::<_, 7, _>(tiles, panel, panel_at + 64, 4 * NR);
    tiles.zero::<0>();
    tiles.zero::<1>();
    tiles.zero::<2>();
    tiles.zero::<3>();
    tiles.dot_i8_u8::<0, 4, 6>();
    tiles.dot_i8_u8::<1, 4, 7>();
    tiles.dot_i8_u8::<2, 5, 6>();
    tiles.dot_i8_u8::<3, 5, 7>();
    store::<_, 0, _>(tiles, sums, 0, 16);
    store::<_, 1, _>(tiles, sums, SUMS, 16);
    store::<_, 2, _>(tiles, sums, 2 * SUMS, 16);
    store::<_, 3, _>(tiles, sums, 3 * SUMS, 16);
}

/// What 16 rows carry for one group: row `i`'s scale, start and scaled sum
/// at `at + i · stride` of the rounded rows' per-group values.
struct Group<'a> {
    rows: &'a QuantizedRows,
    at: usize,
    stride: usize,
}

/// Adds one group's scaled sums to the f32 block (16 rows × 32 columns):
/// `(256·high + start + low) · s · d`, plus `min · s·Σq` for formats with a
/// min, as the VNNI kernel computes them. `panel` is the group's panel bytes
/// (values, then the columns' scales and offsets).
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f,fma")]
unsafe fn scale_sums(
    sums: &[i32],
    group: Group,
    panel: &[u8],
    size: usize,
    with_min: bool,
    block: &mut [[f32; NR]; TILE_ROWS],
) {
    let f32s = |at: usize| -> [f32; NR] {
        std::array::from_fn(|c| {
            f32::from_le_bytes(panel[at + 4 * c..][..4].try_into().expect("4 bytes"))
        })
    };
    let (d, min) = (f32s(scales_at(size)), f32s(mins_at(size)));
    const SUMS: usize = TILE_ROWS * 16;
    for (i, block) in block.iter_mut().enumerate() {
        let at = group.at + i * group.stride;
        let (scale, start, scaled_sum) = (
            group.rows.scales[at],
            group.rows.starts[at],
            group.rows.scaled_sums[at],
        );
        for half in 0..2 {
            let high = &sums[half * SUMS + i * 16..][..16];
            let low = &sums[(2 + half) * SUMS + i * 16..][..16];
            let (d, min) = (&d[16 * half..][..16], &min[16 * half..][..16]);
            let out = &mut block[16 * half..][..16];
            for l in 0..16 {
                let total = (high[l] << 8).wrapping_add(start).wrapping_add(low[l]);
                out[l] = (total as f32).mul_add(d[l] * scale, out[l]);
            }
            if with_min {
                for l in 0..16 {
                    out[l] = min[l].mul_add(scaled_sum, out[l]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::amx::{emulator::Emulator, Amx};
    use super::super::pack::group_size;
    use super::super::tests::{check_products, runs_here};
    use super::*;

    /// [`serial`] on `tiles` configured for the weight's groups.
    fn on<U: Tiles>(
        tiles: impl Fn(TileConfig) -> U,
    ) -> impl FnMut(&[f32], usize, Int8Weight, &mut [f32]) {
        move |x, m, w, out| match group_size(w.rows.format) {
            16 => serial::<16>(&mut tiles(config(16)), x, m, w, out),
            _ => serial::<32>(&mut tiles(config(32)), x, m, w, out),
        }
    }

    /// Every format, on the emulated tiles: the kernel's layout, padding
    /// and loops, wherever the CPU can round the rows (AVX-512).
    #[test]
    fn emulated_tile_products_equal_the_products_of_the_rounded_rows() {
        if !runs_here() {
            return;
        }
        check_products(
            on(Emulator::new),
            &[
                (1, 1, 32),
                (13, 33, 96),
                (17, 40, 256),
                (33, 1040, 288),
                (5, 17, 512),
            ],
        );
    }

    /// The emulated tiles give the VNNI kernel's products bit for bit: the
    /// same integer sums, scaled and added in the same order.
    #[test]
    fn emulated_tile_products_equal_the_vnni_kernels_exactly() {
        if !runs_here() {
            return;
        }
        let mut rng = crate::rng::Rng::new(8);
        for format in crate::model::quantized::INT8_KERNEL_FORMATS {
            let (m, n, k) = (21, 45, 512);
            let w = super::super::tests::weight(format, n, k, &mut rng);
            let rows = w.cpu_rows().unwrap().unwrap();
            let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let (mut vnni, mut tiles) = (vec![0f32; m * n], vec![1f32; m * n]);
            super::super::product(&x, m, Int8Weight { rows, n }, &mut vnni);
            on(Emulator::new)(&x, m, Int8Weight { rows, n }, &mut tiles);
            assert_eq!(vnni, tiles, "{format:?}");
        }
    }

    /// The same on the CPU's tiles, where it has AMX-INT8, with larger
    /// shapes.
    #[test]
    fn amx_tile_products_equal_the_products_of_the_rounded_rows() {
        let usable = Amx::new(config(32)).is_some() && crate::cpu::features().amx_int8;
        if !(usable && runs_here()) {
            eprintln!("skipped: this CPU has no AMX-INT8, or the system does not permit it");
            return;
        }
        check_products(
            on(|c| Amx::new(c).expect("AMX")),
            &[
                (1, 1, 32),
                (13, 33, 96),
                (25, 70, 288),
                (97, 1031, 320),
                (19, 1029, 768),
                (5, 17, 4096),
                (256, 576, 1536),
            ],
        );
    }
}
