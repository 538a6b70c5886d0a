//! AMX tiles: eight tile registers of 16 rows × 64 bytes and a unit that
//! multiplies whole tiles (`tdpbf16ps`: a 16 × 32 bf16 tile by a 32 × 16
//! one into 16 × 16 f32 sums, 16,384 flops per instruction).
//!
//! The kernels are written once against [`Tiles`], with two
//! implementations:
//! - [`Amx`], the CPU's tiles through `asm!`, on CPUs with AMX-TILE and
//!   AMX-BF16 whose operating system lets the process use them
//!   ([`crate::cpu::amx_permitted`]);
//! - [`emulator::Emulator`] (tests only), Intel's pseudo-code for each
//!   instruction in plain Rust, which checks every tile's configuration and
//!   runs on any CPU: the kernels' layout, padding and loops are tested
//!   everywhere, and only the instructions themselves need an AMX machine.
//!
//! Every tile is configured the same way, 16 rows of 64 bytes (palette 1),
//! once per [`Amx`] value; a kernel pads its operands to whole tiles.

#[cfg(test)]
pub(super) mod emulator;

use std::arch::asm;
use std::marker::PhantomData;

/// Rows of a tile.
pub(super) const TILE_ROWS: usize = 16;
/// Bytes of a tile's row: 16 f32 or u32 values, 32 bf16 values.
pub(super) const TILE_ROW_BYTES: usize = 64;

/// The tile registers, `T` (0 to 7) each 16 rows of 64 bytes. Kernels
/// load and store through the checked [`load`] and [`store`].
pub(super) trait Tiles {
    /// Sets tile `T` to zeros.
    fn zero<const T: u8>(&mut self);
    /// Loads tile `T` from `from`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// `16` rows of `64` bytes at `from + i·stride` are readable.
    unsafe fn load_raw<const T: u8>(&mut self, from: *const u8, stride: usize);
    /// Stores tile `T` to `to`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// `16` rows of `64` bytes at `to + i·stride` are writable.
    unsafe fn store_raw<const T: u8>(&mut self, to: *mut u8, stride: usize);
    /// `C += A·B` in bf16 pairs (`tdpbf16ps`): `A` 16 rows of 16 pairs,
    /// `B` 16 rows (pairs of the contraction) of 16 columns' pairs, `C`
    /// 16 × 16 f32.
    fn dot_bf16<const C: u8, const A: u8, const B: u8>(&mut self);
}

/// Loads tile `T` from `values[at..]`, rows `stride` values apart.
///
/// # Panics
/// If the tile's 16 rows of 64 bytes are not all inside `values`.
#[inline(always)]
pub(super) fn load<U: Tiles, const T: u8, V: Copy>(
    unit: &mut U,
    values: &[V],
    at: usize,
    stride: usize,
) {
    let size = std::mem::size_of::<V>();
    assert!(at + (TILE_ROWS - 1) * stride + TILE_ROW_BYTES / size <= values.len());
    // SAFETY: asserted that every row read is inside `values`.
    unsafe { unit.load_raw::<T>(values.as_ptr().add(at).cast(), stride * size) }
}

/// Stores tile `T` to `values[at..]`, rows `stride` values apart.
///
/// # Panics
/// If the tile's 16 rows of 64 bytes are not all inside `values`.
#[inline(always)]
pub(super) fn store<U: Tiles, const T: u8, V: Copy>(
    unit: &mut U,
    values: &mut [V],
    at: usize,
    stride: usize,
) {
    let size = std::mem::size_of::<V>();
    assert!(at + (TILE_ROWS - 1) * stride + TILE_ROW_BYTES / size <= values.len());
    // SAFETY: asserted that every row written is inside `values`.
    unsafe { unit.store_raw::<T>(values.as_mut_ptr().add(at).cast(), stride * size) }
}

/// The tile configuration `ldtilecfg` reads: palette 1, every tile 16 rows
/// of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn all_full() -> Self {
        let mut bytes_per_row = [0; 16];
        let mut rows = [0; 16];
        bytes_per_row[..8].fill(TILE_ROW_BYTES as u16);
        rows[..8].fill(TILE_ROWS as u8);
        Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row,
            rows,
        }
    }
}

/// This thread's AMX tiles, configured on creation and released on drop.
/// Not `Send`: the tiles' state belongs to the thread.
pub(super) struct Amx {
    _thread: PhantomData<*const ()>,
}

impl Amx {
    /// Configures this thread's tiles, where the CPU has AMX-BF16 and the
    /// process may use it; `None` elsewhere.
    pub(super) fn new() -> Option<Self> {
        let features = crate::cpu::features();
        if !(features.amx_bf16 && crate::cpu::amx_permitted()) {
            return None;
        }
        let config = TileConfig::all_full();
        // SAFETY: the CPU has AMX-TILE and the kernel granted the process
        // its tile data; the configuration is a valid palette-1 one.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        }
        Some(Self {
            _thread: PhantomData,
        })
    }
}

impl Drop for Amx {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }
}

impl Tiles for Amx {
    #[inline(always)]
    fn zero<const T: u8>(&mut self) {
        // SAFETY: the tiles are configured (`new`).
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) }
    }

    #[inline(always)]
    unsafe fn load_raw<const T: u8>(&mut self, from: *const u8, stride: usize) {
        // SAFETY: the caller keeps the rows readable; tiles are configured.
        unsafe {
            asm!(
                "tileloadd tmm{t}, [{from} + {stride}*1]",
                t = const T,
                from = in(reg) from,
                stride = in(reg) stride,
                options(nostack, readonly)
            )
        }
    }

    #[inline(always)]
    unsafe fn store_raw<const T: u8>(&mut self, to: *mut u8, stride: usize) {
        // SAFETY: the caller keeps the rows writable; tiles are configured.
        unsafe {
            asm!(
                "tilestored [{to} + {stride}*1], tmm{t}",
                t = const T,
                to = in(reg) to,
                stride = in(reg) stride,
                options(nostack)
            )
        }
    }

    #[inline(always)]
    fn dot_bf16<const C: u8, const A: u8, const B: u8>(&mut self) {
        // SAFETY: the tiles are configured (`new`) and the CPU has AMX-BF16.
        unsafe {
            asm!(
                "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
                c = const C,
                a = const A,
                b = const B,
                options(nostack, nomem)
            )
        }
    }
}

/// Runs `rounds` of four independent tile products (`tdpbf16ps`, 16,384
/// flops each) on this thread's tiles and returns the flops done: what a
/// measurement of the tiles' peak times. `None` where the CPU has no usable
/// AMX-BF16.
pub(crate) fn tile_product_rounds(rounds: u64) -> Option<f64> {
    let mut tiles = Amx::new()?;
    let ones = vec![0x3f80_3f80u32; TILE_ROWS * 16]; // pairs of bf16 1.0
    tiles.zero::<0>();
    tiles.zero::<1>();
    tiles.zero::<2>();
    tiles.zero::<3>();
    load::<_, 4, _>(&mut tiles, &ones, 0, 16);
    load::<_, 5, _>(&mut tiles, &ones, 0, 16);
    load::<_, 6, _>(&mut tiles, &ones, 0, 16);
    load::<_, 7, _>(&mut tiles, &ones, 0, 16);
    for _ in 0..std::hint::black_box(rounds) {
        tiles.dot_bf16::<0, 4, 6>();
        tiles.dot_bf16::<1, 4, 7>();
        tiles.dot_bf16::<2, 5, 6>();
        tiles.dot_bf16::<3, 5, 7>();
    }
    let mut sink = vec![0f32; TILE_ROWS * 16];
    store::<_, 0, _>(&mut tiles, &mut sink, 0, 16);
    std::hint::black_box(&sink);
    Some(rounds as f64 * 4.0 * 16_384.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration is the 64-byte layout `ldtilecfg` reads.
    #[test]
    fn the_configuration_is_laid_out_as_the_cpu_reads_it() {
        assert_eq!(std::mem::size_of::<TileConfig>(), 64);
        let config = TileConfig::all_full();
        // SAFETY: a `repr(C)` struct of integers, 64 bytes, no padding.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(config) };
        assert_eq!(bytes[0], 1, "palette");
        assert_eq!(
            &bytes[16..18],
            &[64, 0],
            "tile 0's bytes per row, little-endian"
        );
        assert_eq!(&bytes[30..32], &[64, 0], "tile 7's bytes per row");
        assert_eq!(&bytes[32..48], &[0; 16], "tiles 8-15 unused");
        assert_eq!(&bytes[48..56], &[16; 8], "rows of tiles 0-7");
        assert_eq!(&bytes[56..64], &[0; 8]);
    }

    /// Where the CPU has AMX: the tiles agree with the emulator on one
    /// product of random bf16 tiles, bit for bit except for the order of the
    /// f32 sums.
    #[test]
    fn the_cpus_tiles_agree_with_the_emulator() {
        let Some(mut amx) = Amx::new() else {
            eprintln!("skipped: this CPU has no AMX-BF16, or the system does not permit it");
            return;
        };
        let mut emulated = emulator::Emulator::default();
        let mut rng = crate::rng::Rng::new(4);
        let pairs = |rng: &mut crate::rng::Rng| -> Vec<u32> {
            (0..256)
                .map(|_| {
                    let bf = |v: f32| half::bf16::from_f32(v).to_bits() as u32;
                    bf(rng.normal()) | bf(rng.normal()) << 16
                })
                .collect()
        };
        let (a, b) = (pairs(&mut rng), pairs(&mut rng));
        let start: Vec<f32> = (0..256).map(|_| rng.normal()).collect();
        let mut got = vec![0f32; 256];
        let mut want = vec![0f32; 256];
        load::<_, 0, _>(&mut amx, &start, 0, 16);
        load::<_, 4, _>(&mut amx, &a, 0, 16);
        load::<_, 6, _>(&mut amx, &b, 0, 16);
        amx.dot_bf16::<0, 4, 6>();
        store::<_, 0, _>(&mut amx, &mut got, 0, 16);
        load::<_, 0, _>(&mut emulated, &start, 0, 16);
        load::<_, 4, _>(&mut emulated, &a, 0, 16);
        load::<_, 6, _>(&mut emulated, &b, 0, 16);
        emulated.dot_bf16::<0, 4, 6>();
        store::<_, 0, _>(&mut emulated, &mut want, 0, 16);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "value {i}: {g} against {w}"
            );
        }
    }
}
