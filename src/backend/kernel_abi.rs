//! Sizes shared by the host code and the CUDA kernels. `kernels/build.rs` turns every
//! `pub(crate) const NAME: TYPE = VALUE;` line of this file into `#define CO_NAME VALUE` in
//! `kernels/abi.cuh` (committed, so CI's plain `nvcc -ptx` finds it) and fails the build when
//! the committed header differs from what it generates, so the two sides cannot drift apart.
//! Keep each constant on one line, with a literal value.

/// Elements per block-chunk of the element-wise and reduction kernels.
pub(crate) const CHUNK: usize = 16384;
/// Threads per block.
pub(crate) const THREADS: u32 = 256;
/// State slot pointers per tensor entry.
pub(crate) const MAX_SLOTS: usize = 4;
/// Bytes of a tensor entry's parameter area (`TensorEntry::params`), which holds the kernel's
/// parameter struct (`kernels/params.cuh`, generated from the `// cuda-params` structs; each is
/// asserted to fit on both sides).
pub(crate) const PARAM_BYTES: usize = 128;
/// Bytes per tensor entry (`TensorEntry`): p, g, the slots, n, rows, row_len, off, the slots'
/// absmax pointers, qtab, key, ctl, fmt and flags (one word), the parameter area.
pub(crate) const ENTRY_BYTES: usize = 272;
/// Elements per warp segment of the row-projected kernels (`adamp_pass1`, `adamp_pu`).
pub(crate) const ROW_SEG: u64 = 1024;

/// Elements per quantization block of 8-bit state (one f32 absmax each; `crate::state::BLOCK`).
pub(crate) const QBLOCK: usize = 256;
/// A slot's format (one byte of `TensorEntry::fmt` per slot): values in the math type.
pub(crate) const FMT_FULL: u32 = 0;
/// A slot's format: bf16 values (rounded to nearest-even when written).
pub(crate) const FMT_BF16: u32 = 1;
/// A slot's format: u8 codes, an f32 absmax per [`QBLOCK`] elements.
pub(crate) const FMT_Q8: u32 = 2;
/// `TensorEntry::flags`: the parameter (bf16) is written back with stochastic rounding (stream
/// `key`). Bits 0..MAX_SLOTS say which 8-bit slots use the signed map.
pub(crate) const FLAG_SR: u32 = 256;
/// Points of the quantizer's grid (entries of each LUT).
pub(crate) const QGRID: usize = 65536;
/// Byte offset of the LUTs in the per-device quantizer table: the signed map, then the
/// unsigned map (256 f32 each) at 0, the signed LUT and then the unsigned LUT at `QTAB_LUT`.
pub(crate) const QTAB_LUT: usize = 2048;
/// Bytes of the quantizer table.
pub(crate) const QTAB_BYTES: usize = 133120;

const _: () = assert!(ENTRY_BYTES == 8 * (2 + MAX_SLOTS + 4 + MAX_SLOTS + 4) + PARAM_BYTES);
const _: () = assert!(PARAM_BYTES.is_multiple_of(8));
const _: () = assert!(QBLOCK == crate::state::BLOCK && CHUNK.is_multiple_of(QBLOCK));
const _: () = assert!(
    QBLOCK == 8 * 32,
    "one warp per quantization block, 8 elements per lane"
);
const _: () = assert!(MAX_SLOTS == crate::algorithm::MAX_SLOTS && MAX_SLOTS <= 4);
const _: () = assert!(FLAG_SR >= 1 << MAX_SLOTS);
const _: () = assert!(QGRID == crate::state::GRID);
const _: () = assert!(QTAB_LUT == 2 * 256 * 4 && QTAB_BYTES == QTAB_LUT + 2 * QGRID);
