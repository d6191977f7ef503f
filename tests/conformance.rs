//! Replays the golden traces recorded from the official implementations
//! (`tests/data/conformance/`, plus every `.safetensors` in `$CANDLE_OPTIM_TRACES` if set) and
//! checks every step against the per-case tolerance of the trace format
//! (`|x − ref| ≤ rtol·(|ref| + S_i)`, g-SNR within `gsnr_rtol`).
//!
//! Prints one line per case and a summary line; fails if any case fails.

mod replay;

use candle_core::Device;
use std::path::{Path, PathBuf};

fn main() {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance")];
    if let Ok(extra) = std::env::var("CANDLE_OPTIM_TRACES") {
        if !extra.is_empty() {
            dirs.push(PathBuf::from(extra));
        }
    }
    let files = replay::list_traces(&dirs).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    let (passed, failed, skipped, _) = replay::run_all(&files, &Device::Cpu, true);
    println!("conformance: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 || passed + failed + skipped == 0 {
        std::process::exit(1);
    }
}
