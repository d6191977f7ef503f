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
/// Bytes per tensor entry (`TensorEntry`): p, g, the slots, n, rows, row_len, off, the
/// parameter area.
pub(crate) const ENTRY_BYTES: usize = 208;
/// Elements per warp segment of the row-projected kernels (`adamp_pass1`, `adamp_pu`).
pub(crate) const ROW_SEG: u64 = 1024;

const _: () = assert!(ENTRY_BYTES == 8 * (2 + MAX_SLOTS + 4) + PARAM_BYTES);
const _: () = assert!(PARAM_BYTES.is_multiple_of(8));
