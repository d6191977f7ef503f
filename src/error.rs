//! The crate's one error type.

use candle_core::{DType, DeviceLocation, Shape};

/// Everything that can go wrong in this crate. Every fallible operation returns this type;
/// nothing panics on bad input, and a call that fails leaves parameters and optimizer state as
/// they were.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A hyperparameter is out of its valid range.
    #[error("invalid hyperparameter {name} = {value}: {reason}")]
    InvalidHyperparameter {
        /// The hyperparameter's name (the official one, e.g. `betas[0]`).
        name: &'static str,
        /// The offending value.
        value: f64,
        /// What the valid range is.
        reason: &'static str,
    },

    /// A gradient's shape differs from its parameter's.
    #[error("gradient of parameter `{param}` has shape {grad:?}, the parameter has {expected:?}")]
    ShapeMismatch {
        /// Parameter name.
        param: String,
        /// The parameter's shape.
        expected: Shape,
        /// The gradient's shape.
        grad: Shape,
    },

    /// A gradient's dtype differs from its parameter's.
    #[error("gradient of parameter `{param}` has dtype {grad:?}, the parameter has {expected:?}")]
    DTypeMismatch {
        /// Parameter name.
        param: String,
        /// The parameter's dtype.
        expected: DType,
        /// The gradient's dtype.
        grad: DType,
    },

    /// A gradient lives on another device than its parameter.
    #[error("gradient of parameter `{param}` is on {grad:?}, the parameter is on {expected:?}")]
    DeviceMismatch {
        /// Parameter name.
        param: String,
        /// The parameter's device.
        expected: DeviceLocation,
        /// The gradient's device.
        grad: DeviceLocation,
    },

    /// A gradient shares its storage with a parameter or with optimizer state.
    #[error("gradient of parameter `{param}` shares storage with {other}")]
    Aliasing {
        /// Parameter name.
        param: String,
        /// What it aliases.
        other: String,
    },

    /// A dtype this crate cannot optimize.
    #[error("parameter `{param}` has dtype {dtype:?}; supported are f32, f64, bf16 and f16")]
    UnsupportedDType {
        /// Parameter name.
        param: String,
        /// Its dtype.
        dtype: DType,
    },

    /// A parameter tensor that is not laid out contiguously.
    #[error("parameter `{param}` is not contiguous")]
    NonContiguous {
        /// Parameter name.
        param: String,
    },

    /// A name or pattern in a parameter-group specification matches no parameter.
    #[error("no parameter matches `{0}`")]
    UnknownParameter(String),

    /// The same parameter (or two parameters with the same name) was given twice.
    #[error("parameter `{0}` appears twice")]
    DuplicateParameter(String),

    /// A gradient holds NaN or infinity and the non-finite policy is `Error`.
    #[error("non-finite gradient in parameter `{param}`")]
    NonFiniteGradient {
        /// The first parameter found with a non-finite gradient.
        param: String,
    },

    /// The operation does not apply in this state or to this algorithm.
    #[error("{0}")]
    Unsupported(String),

    /// A checkpoint is truncated, corrupt or not a checkpoint of this crate.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

    /// A checkpoint of another algorithm.
    #[error("checkpoint is for `{found}`, this optimizer is `{expected}`")]
    WrongAlgorithm {
        /// This optimizer's algorithm.
        expected: &'static str,
        /// The checkpoint's.
        found: String,
    },

    /// A checkpoint whose groups, parameter names, shapes or dtypes differ from this optimizer's.
    #[error("checkpoint does not match this optimizer: {0}")]
    CheckpointMismatch(String),

    /// A checkpoint of parameters named only by position (`param.<i>`) cannot be matched to
    /// this optimizer's parameters: two of them in one group share shape and dtype, so their
    /// state could land on the wrong one. Name the parameters (`named_vars`, `from_varmap`).
    #[error("checkpoint: {0}")]
    AmbiguousCheckpoint(String),

    /// A checkpoint whose state is stored in another format than this optimizer's group keeps
    /// it in (load with `load_bytes_converting` to convert).
    #[error("checkpoint: group {group} holds {checkpoint} state, this optimizer's keeps {optimizer} state (load_bytes_converting converts)")]
    StateFormatMismatch {
        /// The group.
        group: usize,
        /// The checkpoint's format.
        checkpoint: String,
        /// This optimizer's.
        optimizer: String,
    },

    /// A collective across ranks failed: a rank left, timed out, or called another
    /// collective than the others (see [`crate::dist`]).
    #[error("communication: {0}")]
    Communication(String),

    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An I/O error (checkpoint files).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidHyperparameter`].
    pub(crate) fn hyper(name: &'static str, value: f64, reason: &'static str) -> Self {
        Error::InvalidHyperparameter {
            name,
            value,
            reason,
        }
    }
}

/// Checks that `value` lies in `[lo, hi)`; NaN fails.
pub(crate) fn check_range(name: &'static str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if value >= lo && value < hi {
        Ok(())
    } else {
        Err(Error::hyper(name, value, range_reason(lo, hi)))
    }
}

fn range_reason(lo: f64, hi: f64) -> &'static str {
    match (lo == 0.0, hi.is_infinite(), hi == 1.0) {
        (true, true, _) => "must be finite and >= 0",
        (true, false, true) => "must lie in [0, 1)",
        _ => "out of range",
    }
}

/// Checks that `value` is finite and `>= 0`.
pub(crate) fn check_nonneg(name: &'static str, value: f64) -> Result<()> {
    check_range(name, value, 0.0, f64::INFINITY)
}

/// Checks that `value` is finite (neither infinite nor NaN).
pub(crate) fn check_finite(name: &'static str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::hyper(name, value, "must be finite"))
    }
}

/// Checks (β1, β2) ∈ [0, 1)².
pub(crate) fn check_betas(b: (f64, f64)) -> Result<()> {
    check_range("betas[0]", b.0, 0.0, 1.0)?;
    check_range("betas[1]", b.1, 0.0, 1.0)
}
