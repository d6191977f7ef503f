//! Runtime CPU-feature dispatch for the element loops.
//!
//! The loops are plain Rust that LLVM vectorizes; compiled for the baseline x86-64 target they
//! only get 4-wide SSE2. A [`Task`] run through [`run`] is compiled a second and third time
//! with AVX2 (+FMA available, never contracted: Rust does not fuse `a * b + c`) and with
//! AVX-512, and the widest one the CPU supports is called. Every variant performs the same
//! IEEE operations in the same order, so the results are bit-identical.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Instruction-set levels the element loops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The target's baseline (SSE2 on x86-64; everything on other architectures).
    Base = 1,
    /// AVX2, FMA, BMI1/2, F16C (x86-64).
    Avx2 = 2,
    /// AVX-512 F/VL/BW/DQ and the AVX2 level's features (x86-64).
    Avx512 = 3,
}

/// A loop to run at the best available level. `run` must be `#[inline(always)]` and call only
/// `#[inline(always)]` code down to the loop, so the whole loop is compiled per level.
pub trait Task {
    /// The loop's result.
    type Out;
    /// Runs the loop.
    fn run(self) -> Self::Out;
}

static FORCED: AtomicU8 = AtomicU8::new(0);
/// Set by [`force_scalar_codecs`].
static SCALAR_CODECS: AtomicBool = AtomicBool::new(false);
/// The cached [`detected_level`] (0: not detected yet).
static DETECTED: AtomicU8 = AtomicU8::new(0);

/// Every feature [`run_avx2`] is compiled with. Must equal its `target_feature` list (the
/// attribute needs a literal; a test compares the two): running code compiled for a feature
/// the CPU lacks is undefined behaviour, so detection checks each one.
#[cfg(target_arch = "x86_64")]
const AVX2_FEATURES: &[&str] = &["avx2", "fma", "bmi1", "bmi2", "f16c"];

/// Every feature [`run_avx512`] is compiled with (see [`AVX2_FEATURES`]).
#[cfg(target_arch = "x86_64")]
const AVX512_FEATURES: &[&str] = &[
    "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma", "bmi1", "bmi2", "f16c",
];

/// Whether the CPU has the feature `name`; `None` for a name this function does not know
/// (`is_x86_feature_detected!` takes only literals, hence the table).
#[cfg(target_arch = "x86_64")]
pub(crate) fn x86_feature(name: &str) -> Option<bool> {
    use std::arch::is_x86_feature_detected as has;
    Some(match name {
        "avx2" => has!("avx2"),
        "fma" => has!("fma"),
        "bmi1" => has!("bmi1"),
        "bmi2" => has!("bmi2"),
        "f16c" => has!("f16c"),
        "avx512f" => has!("avx512f"),
        "avx512vl" => has!("avx512vl"),
        "avx512bw" => has!("avx512bw"),
        "avx512dq" => has!("avx512dq"),
        "avx512vbmi" => has!("avx512vbmi"),
        _ => return None,
    })
}

/// Whether the CPU has every feature in `list`; an unknown name counts as missing.
#[cfg(target_arch = "x86_64")]
pub(crate) fn all_detected(list: &[&str]) -> bool {
    list.iter().all(|f| x86_feature(f) == Some(true))
}

/// The widest level this CPU supports: one whose every compiled-in feature was detected.
pub fn detected_level() -> SimdLevel {
    match DETECTED.load(Ordering::Relaxed) {
        1 => return SimdLevel::Base,
        2 => return SimdLevel::Avx2,
        3 => return SimdLevel::Avx512,
        _ => {}
    }
    let level = detect();
    DETECTED.store(level as u8, Ordering::Relaxed);
    level
}

fn detect() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if all_detected(AVX512_FEATURES) {
            return SimdLevel::Avx512;
        }
        if all_detected(AVX2_FEATURES) {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Base
}

/// The level the loops run at: the detected one, unless lowered with [`force_level`].
pub fn level() -> SimdLevel {
    let detected = detected_level();
    match FORCED.load(Ordering::Relaxed) {
        1 => SimdLevel::Base,
        2 => SimdLevel::Avx2.min(detected),
        3 => SimdLevel::Avx512.min(detected),
        _ => detected,
    }
}

/// Caps the level (`None`: back to the detected one). For benchmarks and tests; a level the
/// CPU lacks is never used.
pub fn force_level(level: Option<SimdLevel>) {
    FORCED.store(level.map_or(0, |l| l as u8), Ordering::Relaxed);
}

/// Makes 8-bit state use the portable scalar codecs instead of the AVX-512 VBMI ones (`true`),
/// or the best available again (`false`). The codes are the same either way; for benchmarks
/// that compare the two in one run.
pub fn force_scalar_codecs(on: bool) {
    SCALAR_CODECS.store(on, Ordering::Relaxed);
}

/// Whether [`force_scalar_codecs`] is on.
pub(crate) fn scalar_codecs() -> bool {
    SCALAR_CODECS.load(Ordering::Relaxed)
}

/// Runs `task` compiled for the current [`level`].
#[inline]
pub fn run<T: Task>(task: T) -> T::Out {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: `level()` never exceeds `detected_level()`, which checked at run time that
        // this CPU supports every feature the called function is compiled with.
        SimdLevel::Avx512 => return unsafe { run_avx512(task) },
        // SAFETY: as above, every feature in AVX2_FEATURES was detected.
        SimdLevel::Avx2 => return unsafe { run_avx2(task) },
        SimdLevel::Base => {}
    }
    task.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,f16c")]
unsafe fn run_avx2<T: Task>(task: T) -> T::Out {
    task.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi1,bmi2,f16c")]
unsafe fn run_avx512<T: Task>(task: T) -> T::Out {
    task.run()
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The `target_feature` list of each `run_*` function in this file's source, by name.
    fn attribute_lists() -> Vec<(String, Vec<String>)> {
        let src = include_str!("simd.rs");
        // Split so that this test's own text does not match.
        let attr = concat!("#[target_", "feature(enable = \"");
        let mut out = Vec::new();
        for (i, _) in src.match_indices(attr) {
            let rest = &src[i + attr.len()..];
            let list = &rest[..rest.find('"').unwrap()];
            let after = &rest[rest.find("fn ").unwrap() + 3..];
            let name = &after[..after.find(['<', '(']).unwrap()];
            let feats = list.split(',').map(|f| f.trim().to_string()).collect();
            out.push((name.to_string(), feats));
        }
        out
    }

    #[test]
    fn detection_checks_every_compiled_feature() {
        let lists = attribute_lists();
        let names: Vec<&str> = lists.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["run_avx2", "run_avx512"]);
        for (name, feats) in &lists {
            let detected = match name.as_str() {
                "run_avx2" => AVX2_FEATURES,
                _ => AVX512_FEATURES,
            };
            assert_eq!(
                feats, detected,
                "{name}: target_feature list vs detection list"
            );
            for f in detected {
                assert!(
                    x86_feature(f).is_some(),
                    "{f} is not detected by x86_feature"
                );
            }
        }
    }

    #[test]
    fn detected_level_is_cached_and_consistent() {
        let first = detected_level();
        assert_eq!(detected_level(), first);
        assert_eq!(first, detect());
        assert!(level() <= first);
    }
}
