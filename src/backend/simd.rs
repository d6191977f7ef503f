//! Runtime CPU-feature dispatch for the element loops.
//!
//! The loops are plain Rust that LLVM vectorizes; compiled for the baseline x86-64 target they
//! only get 4-wide SSE2. A [`Task`] run through [`run`] is compiled a second and third time
//! with AVX2 (+FMA available, never contracted: Rust does not fuse `a * b + c`) and with
//! AVX-512, and the widest one the CPU supports is called. Every variant performs the same
//! IEEE operations in the same order, so the results are bit-identical.

use std::sync::atomic::{AtomicU8, Ordering};

/// Instruction-set levels the element loops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The target's baseline (SSE2 on x86-64; everything on other architectures).
    Base = 1,
    /// AVX2 (x86-64).
    Avx2 = 2,
    /// AVX-512 F/VL/BW/DQ (x86-64).
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

/// The widest level this CPU supports.
pub fn detected_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return SimdLevel::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
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

/// Runs `task` compiled for the current [`level`].
#[inline]
pub fn run<T: Task>(task: T) -> T::Out {
    #[cfg(target_arch = "x86_64")]
    match level() {
        // SAFETY: `level()` never exceeds `detected_level()`, which checked at run time that
        // this CPU supports every feature the called function is compiled with.
        SimdLevel::Avx512 => return unsafe { run_avx512(task) },
        // SAFETY: as above, AVX2 and FMA were detected.
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
