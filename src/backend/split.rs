//! How the CPU passes split a tensor over threads.

/// Smallest run of elements handed to one thread (128 KiB of f32 per stream).
pub(crate) const GRAIN: usize = 1 << 15;

/// The run length below which an element-wise pass over `n` elements is not split further:
/// a few leaves per thread balance the load, more only add joins; no split on one thread.
/// (Element-wise results do not depend on it; reductions use a fixed tree instead.)
pub(crate) fn leaf_len(n: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads <= 1 {
        usize::MAX
    } else {
        GRAIN.max(n / (threads * 4))
    }
}
