//! AMX tiles: eight tile registers of up to 16 rows × 64 bytes and a unit
//! that multiplies whole tiles: `tdpbf16ps` (a 16 × 32 bf16 tile by a
//! 32 × 16 one into 16 × 16 f32 sums, 16,384 flops per instruction) and
//! `tdpbsud` (signed by unsigned bytes into i32 sums).
//!
//! The kernels are written once against [`Tiles`], with two
//! implementations:
//! - [`Amx`], the CPU's tiles through `asm!`, on CPUs with AMX-TILE (and
//!   AMX-BF16 or AMX-INT8 for the products) whose operating system lets
//!   the process use them ([`crate::cpu::amx_permitted`]);
//! - [`emulator::Emulator`] (tests only), Intel's pseudo-code for each
//!   instruction in plain Rust, which checks every tile's configuration and
//!   runs on any CPU: the kernels' layout, padding and loops are tested
//!   everywhere, and only the instructions themselves need an AMX machine.
//!
//! A kernel configures the tiles' shapes once per [`Amx`] value
//! ([`TileConfig`]) and pads its operands to whole tiles.

#[cfg(test)]
pub(crate) mod emulator;
pub(crate) mod packed;

use std::arch::asm;
use std::marker::PhantomData;

use super::simd::{on_a_line, CacheAligned, CACHE_LINE};

/// The most rows of a tile.
pub(crate) const TILE_ROWS: usize = 16;
/// The most bytes of a tile's row: 16 f32 or u32 values, 32 bf16 values, 64
/// bytes.
pub(super) const TILE_ROW_BYTES: usize = 64;
/// The u32s of a tile's row: 16 pairs of bf16 values.
pub(crate) const TILE_PAIRS: usize = TILE_ROW_BYTES / 4;

/// The tile registers, `T` (0 to 7), each configured to a number of rows
/// of a number of bytes ([`TileConfig`]). Kernels load and store through
/// the checked [`load`] and [`store`].
pub(crate) trait Tiles {
    /// The configuration the tiles were set up with.
    fn config(&self) -> &TileConfig;
    /// Sets tile `T` to zeros.
    fn zero<const T: u8>(&mut self);
    /// Loads tile `T` from `from`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// The tile's rows of bytes at `from + i·stride` are readable.
    unsafe fn load_raw<const T: u8>(&mut self, from: *const u8, stride: usize);
    /// Stores tile `T` to `to`, rows `stride` bytes apart.
    ///
    /// # Safety
    /// The tile's rows of bytes at `to + i·stride` are writable.
    unsafe fn store_raw<const T: u8>(&mut self, to: *mut u8, stride: usize);
    /// `C += A·B` in bf16 pairs (`tdpbf16ps`): `A` rows of pairs, `B` a
    /// row per pair in `A`'s rows, of 16 columns' pairs, `C` f32.
    fn dot_bf16<const C: u8, const A: u8, const B: u8>(&mut self);
    /// `C += A·B` in bytes (`tdpbsud`): `A` rows of signed bytes, `B` a row
    /// per 4 bytes of `A`'s rows, of 16 columns' 4 unsigned bytes, `C` i32
    /// sums of 4 products per step.
    fn dot_i8_u8<const C: u8, const A: u8, const B: u8>(&mut self);
}

/// Checks that tile `t`'s rows, `stride` values of `V` apart from `at`, lie
/// inside `len` values; returns the stride in bytes.
#[inline(always)]
fn checked_stride<V>(config: &TileConfig, t: u8, len: usize, at: usize, stride: usize) -> usize {
    let size = std::mem::size_of::<V>();
    let (rows, bytes) = config.shape(t);
    assert!(
        rows > 0 && bytes.is_multiple_of(size),
        "tile {t} is {rows} rows of {bytes} bytes"
    );
    assert!(
        at + (rows - 1) * stride + bytes / size <= len,
        "tile {t} past its slice"
    );
    stride * size
}

/// Loads tile `T` from `values[at..]`, rows `stride` values apart.
///
/// # Panics
/// If the tile's rows are not all inside `values`.
#[inline(always)]
pub(crate) fn load<U: Tiles, const T: u8, V: Copy>(
    unit: &mut U,
    values: &[V],
    at: usize,
    stride: usize,
) {
    let bytes = checked_stride::<V>(unit.config(), T, values.len(), at, stride);
    // SAFETY: checked that every row read is inside `values`.
    unsafe { unit.load_raw::<T>(values.as_ptr().add(at).cast(), bytes) }
}

/// Stores tile `T` to `values[at..]`, rows `stride` values apart.
///
/// # Panics
/// If the tile's rows are not all inside `values`.
#[inline(always)]
pub(crate) fn store<U: Tiles, const T: u8, V: Copy>(
    unit: &mut U,
    values: &mut [V],
    at: usize,
    stride: usize,
) {
    let bytes = checked_stride::<V>(unit.config(), T, values.len(), at, stride);
    // SAFETY: checked that every row written is inside `values`.
    unsafe { unit.store_raw::<T>(values.as_mut_ptr().add(at).cast(), bytes) }
}

/// Runs `f` on an output of `m` rows of `p` values padded with zeros to
/// `rows` rows of `stride` values (at least `m` and `p`; kernels on tiles
/// write whole tiles): on `out` itself where no padding is needed and its
/// rows start on cache lines, else on a scratch buffer whose rows do, whose
/// unpadded part is copied into `out` afterwards (a pass over the output,
/// against a tile row straddling two cache lines at every load and store).
pub(super) fn with_padded_output(
    out: &mut [f32],
    (m, p): (usize, usize),
    (rows, stride): (usize, usize),
    f: impl FnOnce(&mut [f32]),
) {
    assert!(rows >= m && stride >= p && out.len() == m * p);
    if p == 0 {
        return;
    }
    let on_lines = |values: &[f32], stride: usize| {
        on_a_line(values) && (stride * std::mem::size_of::<f32>()).is_multiple_of(CACHE_LINE)
    };
    if rows == m && stride == p && on_lines(out, p) {
        return f(out);
    }
    let mut scratch = CacheAligned::new();
    let padded = scratch.zeroed(rows * stride);
    debug_assert!(
        on_lines(padded, stride),
        "kernels on tiles pad rows to whole lines"
    );
    f(padded);
    for (o, s) in out.chunks_exact_mut(p).zip(padded.chunks_exact(stride)) {
        o.copy_from_slice(&s[..p]);
    }
}

/// Four 16 × 16 f32 output tiles as a kernel stores them (each on cache
/// lines), to be written out from there.
#[repr(C, align(64))]
pub(super) struct StoredTiles {
    pub(super) tiles: [[f32; TILE_ROWS * TILE_ROWS]; 4],
}

impl StoredTiles {
    /// Four tiles of zeros.
    pub(super) fn new() -> Self {
        Self {
            tiles: [[0.0; TILE_ROWS * TILE_ROWS]; 4],
        }
    }
}

/// The tile configuration `ldtilecfg` reads (palette 1): each of tiles
/// 0-7 some rows of some bytes.
#[derive(Clone)]
#[repr(C, align(64))]
pub(crate) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Tiles 0-7 each `(rows, bytes per row)` of `shapes`.
    ///
    /// # Panics
    /// If a shape is empty or larger than a tile.
    pub(super) fn new(shapes: [(usize, usize); 8]) -> Self {
        let mut bytes_per_row = [0; 16];
        let mut rows = [0; 16];
        for (t, (r, b)) in shapes.into_iter().enumerate() {
            assert!((1..=TILE_ROWS).contains(&r) && (1..=TILE_ROW_BYTES).contains(&b));
            rows[t] = r as u8;
            bytes_per_row[t] = b as u16;
        }
        Self {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row,
            rows,
        }
    }

    /// Every tile 16 rows of 64 bytes.
    pub(crate) fn full() -> Self {
        Self::new([(TILE_ROWS, TILE_ROW_BYTES); 8])
    }

    /// Tile `t`'s rows and bytes per row.
    pub(super) fn shape(&self, t: u8) -> (usize, usize) {
        (
            self.rows[t as usize] as usize,
            self.bytes_per_row[t as usize] as usize,
        )
    }
}

/// This thread's AMX tiles, configured on creation and released on drop.
/// Not `Send`: the tiles' state belongs to the thread.
pub(crate) struct Amx {
    config: TileConfig,
    /// Whether the CPU has AMX-BF16 and AMX-INT8: the products check, so
    /// that no safe call runs an instruction the CPU lacks.
    bf16: bool,
    int8: bool,
    _thread: PhantomData<*const ()>,
}

impl Amx {
    /// Configures this thread's tiles, where the CPU has AMX-TILE and the
    /// process may use it; `None` elsewhere, and while another `Amx` holds
    /// this thread's tiles (its drop releases them, which would leave this
    /// one's instructions faulting). (Which tile products the CPU has,
    /// AMX-BF16 or AMX-INT8, is the caller's to check.)
    pub(crate) fn new(config: TileConfig) -> Option<Self> {
        if !crate::cpu::amx_permitted() || TILES_HELD.replace(true) {
            return None;
        }
        // SAFETY: the CPU has AMX-TILE and the kernel granted the process
        // its tile data; `TileConfig::new` keeps the configuration valid.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
        }
        let cpu = crate::cpu::features();
        Some(Self {
            config,
            bf16: cpu.amx_bf16,
            int8: cpu.amx_int8,
            _thread: PhantomData,
        })
    }
}

impl Drop for Amx {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured by `new` on this thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
        TILES_HELD.set(false);
    }
}

thread_local! {
    /// Whether an [`Amx`] holds this thread's tiles.
    static TILES_HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Tiles for Amx {
    fn config(&self) -> &TileConfig {
        &self.config
    }

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
        assert!(self.bf16, "the CPU has no AMX-BF16");
        // SAFETY: the tiles are configured (`new`); the CPU has AMX-BF16.
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

    #[inline(always)]
    fn dot_i8_u8<const C: u8, const A: u8, const B: u8>(&mut self) {
        assert!(self.int8, "the CPU has no AMX-INT8");
        // SAFETY: the tiles are configured (`new`); the CPU has AMX-INT8.
        unsafe {
            asm!(
                "tdpbsud tmm{c}, tmm{a}, tmm{b}",
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
    if !crate::cpu::features().amx_bf16 {
        return None;
    }
    let mut tiles = Amx::new(TileConfig::full())?;
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
mod tests;
