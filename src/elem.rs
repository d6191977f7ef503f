//! Element types: the float type the math runs in ([`Real`]) and the parameter storage types
//! ([`Elem`]). Parameters in f32, bf16 and f16 compute in f32 with f32 state; f64 parameters
//! compute in f64 with f64 state (useful as a reference run).

use half::{bf16, f16};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// A float type the per-element math runs in: `f32` or `f64`.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + std::fmt::Debug
    + candle_core::WithDType
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Rounds an f64 step scalar to this type (once, outside the element loop).
    fn of(x: f64) -> Self;
    /// Widens to f64.
    fn f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;
    /// e^x.
    fn exp(self) -> Self;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
    /// The vector of a CPU storage holding this type.
    fn cpu_vec_mut(s: &mut candle_core::CpuStorage) -> Option<&mut Vec<Self>>;

    /// `torch.maximum`: NaN if either side is NaN.
    #[inline(always)]
    fn max_nan(self, other: Self) -> Self {
        if self.is_nan() || self > other {
            self
        } else {
            other
        }
    }

    /// `self != self`.
    #[inline(always)]
    #[allow(clippy::eq_op)]
    fn is_nan(self) -> bool {
        self != self
    }

    /// `torch.sign`: +1, -1, and the value itself for ±0 and NaN. Rust's `f32::signum` returns
    /// ±1 for ±0, which is wrong for Lion.
    #[inline(always)]
    fn sign(self) -> Self {
        if self > Self::ZERO {
            Self::ONE
        } else if self < Self::ZERO {
            -Self::ONE
        } else {
            self
        }
    }

    /// `torch.lerp(self, end, w)` with torch's two-branch formula.
    #[inline(always)]
    fn lerp(self, end: Self, w: Self, one_minus_w: Self, w_small: bool) -> Self {
        if w_small {
            self + w * (end - self)
        } else {
            end - (end - self) * one_minus_w
        }
    }
}

macro_rules! real {
    ($t:ty, $variant:ident) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn cpu_vec_mut(s: &mut candle_core::CpuStorage) -> Option<&mut Vec<Self>> {
                match s {
                    candle_core::CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
real!(f32, F32);
real!(f64, F64);

/// A parameter's storage type. `Math` is the type its update is computed in and the type of
/// its optimizer state.
pub trait Elem: candle_core::WithDType + Copy + Send + Sync {
    /// Compute and state type.
    type Math: Real;
    /// Widen to the compute type.
    fn load(self) -> Self::Math;
    /// Round from the compute type (round-to-nearest-even).
    fn store(x: Self::Math) -> Self;
}

impl Elem for f32 {
    type Math = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
}

impl Elem for f64 {
    type Math = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(x: f64) -> Self {
        x
    }
}

impl Elem for bf16 {
    type Math = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    type Math = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        f16::from_f32(x)
    }
}
