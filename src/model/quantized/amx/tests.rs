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
        fn run(tiles: &mut impl Tiles, bf16: bool, [a, b, start]: [&[u32]; 3], out: &mut [u32]) {
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
