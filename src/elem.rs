//! Element types: the float type the math runs in ([`Real`]) and the parameter storage types
//! ([`Elem`]). Parameters in f32, bf16 and f16 compute in f32 with f32 state; f64 parameters
//! compute in f64 with f64 state (useful as a reference run).

use half::{bf16, f16};
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

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
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + std::fmt::Debug
    + candle_core::WithDType
    + Elem<Math = Self>
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
    /// e^x by an inlinable, branch-free routine that vectorizes (f32: Cephes' `expf`
    /// polynomial, within 2 ulp of the correctly rounded value; f64: `exp`).
    fn exp_v(self) -> Self;
    /// Whether the value is neither infinite nor NaN.
    fn is_finite(self) -> bool;
    /// The vector of a CPU storage holding this type.
    fn cpu_vec_mut(s: &mut candle_core::CpuStorage) -> Option<&mut Vec<Self>>;
    /// Runs `f` with this thread's scratch vector of this type (reused across calls; a fresh
    /// one where a call on this thread already holds it).
    fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R;
    /// The slice as `f32`, if this type is `f32` (for loops written for f32 only).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The slice as `f32`, if this type is `f32`.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;

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

    /// +1, -1, and the value itself for ±0 and NaN: `torch.sign` for every non-NaN input (Rust's
    /// `f32::signum` returns ±1 for ±0, which is wrong for Lion); NaN stays NaN.
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
    ($t:ty, $variant:ident, $exp_v:path, $as_f32:expr, $as_f32_mut:expr) => {
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
            fn exp_v(self) -> Self {
                $exp_v(self)
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
            #[inline(always)]
            fn as_f32(s: &[Self]) -> Option<&[f32]> {
                $as_f32(s)
            }
            #[inline(always)]
            fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
                $as_f32_mut(s)
            }
            fn with_scratch<R>(f: impl FnOnce(&mut Vec<Self>) -> R) -> R {
                thread_local! {
                    static SCRATCH: std::cell::RefCell<Vec<$t>> =
                        const { std::cell::RefCell::new(Vec::new()) };
                }
                SCRATCH.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut v) => f(&mut v),
                    Err(_) => f(&mut Vec::new()),
                })
            }
        }
    };
}
real!(f32, F32, expf_v, Some, Some);
real!(f64, F64, f64::exp, |_| None, |_| None);

/// Cephes' single-precision `expf`: range reduction x = n·ln2 + r with |r| ≤ ln2/2 (ln2 in
/// two parts), a degree-6 polynomial for e^r, and 2^n built in the exponent bits. The rounding
/// of x·log2(e) to an integer uses the 1.5·2^23 trick, so there is no call and no branch.
#[inline(always)]
fn expf_v(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
                                     // e^x underflows below -87.3 (we return e^-87.3 ≈ 1.2e-38 there) and overflows above 88.7.
    let x = x.clamp(-87.336_55, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * 0.693_359_4) - n * -2.121_944_4e-4;
    let mut y = 1.987_569_1e-4_f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 5e-1;
    y = y * (r * r) + r + 1.0;
    // t's mantissa holds n + 1.5·2^23; its low bits are n (|n| < 2^22).
    let e = (t.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    y * f32::from_bits(e as u32)
}

/// A parameter's storage type. `Math` is the type its update is computed in and the type of
/// its optimizer state.
pub trait Elem: candle_core::WithDType + Copy + Send + Sync {
    /// Compute and state type.
    type Math: Real;
    /// Widen to the compute type.
    fn load(self) -> Self::Math;
    /// Round from the compute type (round-to-nearest-even).
    fn store(x: Self::Math) -> Self;
    /// Round from the compute type stochastically with 16 uniform random bits (bf16); the other
    /// types round as [`store`](Self::store).
    #[inline(always)]
    fn store_stochastic(x: Self::Math, random16: u32) -> Self {
        let _ = random16;
        Self::store(x)
    }
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
    #[inline(always)]
    fn store_stochastic(x: f32, random16: u32) -> Self {
        bf16_stochastic(x, random16)
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

/// bf16 from f32 with stochastic rounding: rounds up with probability equal to the distance
/// from the value rounded down, in units of the bf16 spacing, given 16 uniform random bits.
/// Infinities and NaN round to nearest.
#[inline(always)]
pub(crate) fn bf16_stochastic(x: f32, random16: u32) -> bf16 {
    let b = x.to_bits();
    if !x.is_finite() {
        return bf16::from_f32(x);
    }
    // Adding a uniform value below one unit of the kept part before truncating rounds up with
    // the probability of the dropped fraction (a carry can reach the exponent: the next binade,
    // or infinity from the largest finite values, which is where the value rounds up to).
    bf16::from_bits(((b + (random16 & 0xFFFF)) >> 16) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_v_is_within_two_ulp() {
        let mut worst = 0i64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let a = expf_v(x);
            let b = (x as f64).exp() as f32;
            worst = worst.max((a.to_bits() as i64 - b.to_bits() as i64).abs());
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert!(expf_v(f32::NAN).is_nan());
        assert_eq!(expf_v(0.0), 1.0);
        assert!(expf_v(-1000.0) < 2e-38 && expf_v(-1000.0) >= 0.0);
    }

    #[test]
    fn sign_keeps_zero_and_nan() {
        assert_eq!(0f32.sign(), 0.0);
        assert_eq!((-0f32).sign(), 0.0);
        assert!(f32::NAN.sign().is_nan());
        assert_eq!(3f32.sign(), 1.0);
        assert_eq!((-3f64).sign(), -1.0);
    }

    #[test]
    fn stochastic_rounding_is_exactly_unbiased_over_its_random_bits() {
        // Over all 2^16 values of the random bits, the mean of the rounded values is the value
        // itself, exactly (f64 sums of bf16 values are exact here).
        for x in [1.0f32 + 3.0 * f32::EPSILON, -0.3337, 1e-20, 6.5e4, 0.999] {
            let sum: f64 = (0..1u32 << 16)
                .map(|r| bf16_stochastic(x, r).to_f32() as f64)
                .sum();
            assert_eq!(sum / 65536.0, x as f64, "{x}");
        }
    }

    #[test]
    fn stochastic_rounding_brackets_the_value() {
        let x = 1.0f32 + 3.0 * f32::EPSILON;
        let lo = bf16::from_bits((x.to_bits() >> 16) as u16);
        for r in [0u32, 1, 0x7FFF, 0xFFFF] {
            let y = bf16_stochastic(x, r);
            assert!(y == lo || y.to_bits() == lo.to_bits() + 1);
        }
        assert_eq!(bf16_stochastic(0.0, 0xFFFF).to_f32(), 0.0);
        assert!(bf16_stochastic(f32::NAN, 5).is_nan());
        assert_eq!(bf16_stochastic(-2.0, 0xFFFF).to_f32(), -2.0);
    }
}
