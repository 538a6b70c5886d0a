//! One micro-tile of the product: up to `MR` quantized rows against one
//! packed micro-panel of `NR` columns (both the instruction set's), into
//! (or added to) the output. The micro-kernels (`vnni.rs`, `avx2.rs`) run
//! it: per group of `G` values (32, or 16), each row's integer sums start at
//! `−z · Σ q` and add the products of the group's `G / 4` runs of 4 values;
//! they are then scaled (`s · d`) into the f32 tile, with the offsets'
//! `min · s · Σ q` added (formats with a min).

/// A micro-tile's inputs and output.
pub(super) struct Tile<'a> {
    /// The tile's first row's rounded values, from the panel's first group on.
    pub(super) values: &'a [i8],
    pub(super) values_stride: usize,
    /// The first row's per-group scales, integer sums' starts and scaled
    /// sums, from the panel's first group on.
    pub(super) scales: &'a [f32],
    pub(super) starts: &'a [i32],
    pub(super) scaled_sums: &'a [f32],
    pub(super) scales_stride: usize,
    pub(super) panel: &'a [u8],
    /// Groups in the panel.
    pub(super) depth: usize,
    /// Add the panel's offsets (formats with a min).
    pub(super) with_min: bool,
    /// The tile's first output row, from its first column on.
    pub(super) out: &'a mut [f32],
    pub(super) out_stride: usize,
    /// Valid columns (at most the panel's `NR`).
    pub(super) width: usize,
    /// Add to `out` rather than overwrite it.
    pub(super) accumulate: bool,
}

impl Tile<'_> {
    /// Checks that `rows` rows of groups of `group` values, on a panel of
    /// `group_bytes` per group, are inside the tile's slices: the bounds the
    /// micro-kernels' unchecked reads and writes rely on.
    pub(super) fn check_bounds(&self, rows: usize, group_bytes: usize, group: usize) {
        let (last_values, last_scales) = (
            (rows - 1) * self.values_stride,
            (rows - 1) * self.scales_stride,
        );
        assert!(self.panel.len() >= self.depth * group_bytes);
        assert!(self.values.len() >= last_values + self.depth * group);
        for per_group in [self.scales.len(), self.starts.len(), self.scaled_sums.len()] {
            assert!(per_group >= last_scales + self.depth);
        }
        assert!(self.out.len() >= (rows - 1) * self.out_stride + self.width);
    }

    /// Writes (or adds) a finished tile's rows, their first `width` values.
    pub(super) fn write<const N: usize>(self, tile: &[[f32; N]]) {
        for (i, row) in tile.iter().enumerate() {
            let out = &mut self.out[i * self.out_stride..][..self.width];
            match self.accumulate {
                true => out.iter_mut().zip(row).for_each(|(o, v)| *o += v),
                false => out.copy_from_slice(&row[..self.width]),
            }
        }
    }
}
