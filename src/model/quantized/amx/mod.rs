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
mod tests {
    use super::*;

    /// The configuration is the 64-byte layout `ldtilecfg` reads.
    #[test]
    fn the_configuration_is_laid_out_as_the_cpu_reads_it() {
        assert_eq!(std::mem::size_of::<TileConfig>(), 64);
        let mut shapes = [(TILE_ROWS, TILE_ROW_BYTES); 8];
        shapes[7] = (8, 32);
        // SAFETY: a `repr(C)` struct of integers, 64 bytes, no padding.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(TileConfig::new(shapes)) };
        assert_eq!(bytes[0], 1, "palette");
        assert_eq!(&bytes[1..16], &[0; 15], "start row and reserved bytes");
        assert_eq!(
            &bytes[16..18],
            &[64, 0],
            "tile 0's bytes per row, little-endian"
        );
        assert_eq!(&bytes[30..32], &[32, 0], "tile 7's bytes per row");
        assert_eq!(&bytes[32..48], &[0; 16], "tiles 8-15 unused");
        assert_eq!(&bytes[48..55], &[16; 7], "rows of tiles 0-6");
        assert_eq!(bytes[55], 8, "rows of tile 7");
        assert_eq!(&bytes[56..64], &[0; 8]);
    }

    /// A thread's tiles are held by one `Amx` at a time: a second is
    /// refused while the first lives (its drop would release the first's
    /// tiles), and granted once it is dropped.
    #[test]
    fn one_amx_holds_a_threads_tiles() {
        let Some(first) = Amx::new(TileConfig::full()) else {
            eprintln!("skipped: this CPU has no AMX, or the system does not permit it");
            return;
        };
        assert!(Amx::new(TileConfig::full()).is_none());
        assert!(tile_product_rounds(1).is_none() || !crate::cpu::features().amx_bf16);
        drop(first);
        let again = Amx::new(TileConfig::full());
        assert!(again.is_some());
        drop(again);
        assert!(tile_product_rounds(1).is_some() || !crate::cpu::features().amx_bf16);
    }

    /// The output is written in place where its rows start on cache lines
    /// and need no padding, and through a scratch buffer otherwise (padding,
    /// or an output that starts inside a line), whose unpadded part reaches
    /// the output.
    #[test]
    fn outputs_off_the_lines_or_short_of_tiles_go_through_scratch() {
        let (m, p) = (3, 16);
        let mut buffer = CacheAligned::<f32>::new();
        let aligned = buffer.zeroed(m * p + 1);
        let write = |padded: &mut [f32], stride: usize, in_place: &mut bool, at: *const f32| {
            *in_place = padded.as_ptr() == at;
            assert!(on_a_line(padded));
            for (i, v) in padded.iter_mut().enumerate() {
                *v = ((i / stride) * 100 + i % stride) as f32;
            }
        };
        for (offset, (rows, stride), want_in_place) in [
            (0, (m, p), true),
            (1, (m, p), false),
            (0, (16, p), false),
            (0, (m, 32), false),
        ] {
            let out = &mut aligned[offset..offset + m * p];
            out.fill(f32::NAN);
            let (at, mut in_place) = (out.as_ptr(), false);
            with_padded_output(out, (m, p), (rows, stride), |padded| {
                write(padded, stride, &mut in_place, at)
            });
            assert_eq!(
                in_place, want_in_place,
                "offset {offset}, {rows} x {stride}"
            );
            for (i, v) in out.iter().enumerate() {
                assert_eq!(*v, ((i / p) * 100 + i % p) as f32, "value {i}");
            }
        }
    }

    /// Random tiles: what the CPU's tiles (`Amx`) compute for one product
    /// of each kind it has, against the emulator; skipped where it has
    /// none.
    #[test]
    fn the_cpus_tiles_agree_with_the_emulator() {
        let features = crate::cpu::features();
        let mut rng = crate::rng::Rng::new(4);
        let words = |rng: &mut crate::rng::Rng, bf16: bool| -> Vec<u32> {
            (0..256)
                .map(|_| match bf16 {
                    true => {
                        let bf = super::super::bf16_dot::bf16_bits;
                        bf(rng.normal()) | bf(rng.normal()) << 16
                    }
                    false => rng.next_u64() as u32,
                })
                .collect()
        };
        let mut ran = false;
        for bf16 in [true, false] {
            let has = match bf16 {
                true => features.amx_bf16,
                false => features.amx_int8,
            };
            let Some(mut amx) = Amx::new(TileConfig::full()).filter(|_| has) else {
                continue;
            };
            ran = true;
            let mut emulated = emulator::Emulator::new(TileConfig::full());
            let (a, b, start) = (
                words(&mut rng, bf16),
                words(&mut rng, bf16),
                words(&mut rng, bf16),
            );
            let mut results = [vec![0u32; 256], vec![0u32; 256]];
            fn run(
                tiles: &mut impl Tiles,
                bf16: bool,
                [a, b, start]: [&[u32]; 3],
                out: &mut [u32],
            ) {
                load::<_, 0, _>(tiles, start, 0, 16);
                load::<_, 4, _>(tiles, a, 0, 16);
                load::<_, 6, _>(tiles, b, 0, 16);
                match bf16 {
                    true => tiles.dot_bf16::<0, 4, 6>(),
                    false => tiles.dot_i8_u8::<0, 4, 6>(),
                }
                store::<_, 0, _>(tiles, out, 0, 16);
            }
            let [got, want] = &mut results;
            run(&mut amx, bf16, [&a, &b, &start], got);
            run(&mut emulated, bf16, [&a, &b, &start], want);
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                match bf16 {
                    // f32 sums: equal up to their order.
                    true => {
                        let (g, w) = (f32::from_bits(*g), f32::from_bits(*w));
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "bf16, value {i}: {g} against {w}"
                        );
                    }
                    // Integer sums: exact.
                    false => assert_eq!(g, w, "int8, value {i}"),
                }
            }
        }
        if !ran {
            eprintln!(
                "skipped: this CPU has no AMX-BF16 or AMX-INT8, or the system does not permit them"
            );
        }
    }
}
