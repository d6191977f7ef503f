//! # candle-optim
//!
//! Fast, exact deep-learning optimizers for [candle](https://github.com/huggingface/candle):
//! SGD-SaI, AdamW, AdamP, AdaBelief, diffGrad, Adan, Lion, Muon and SGD with momentum, each exactly as its authors' code defines it, each step one
//! fused, multi-threaded pass over parameters, gradients and state.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, VarBuilder, VarMap};
//! use candle_optim::{SgdSai, SgdSaiConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = candle_nn::linear(2, 1, vb.pp("fc"))?;
//! let mut opt = SgdSai::from_varmap(&varmap, SgdSaiConfig { lr: 1e-3, ..Default::default() })?;
//! let x = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
//! let loss = model.forward(&x)?.sqr()?.mean_all()?;
//! let report = opt.backward_step(&loss)?;
//! assert!(report.taken());
//! # Ok::<(), candle_optim::Error>(())
//! ```
//!
//! Every optimizer is the shared driver [`Optim`] around one [`Algorithm`]; the aliases
//! ([`SgdSai`], [`AdamW`], [`AdamP`], [`AdaBelief`], [`DiffGrad`], [`Adan`], [`Lion`], [`Muon`],
//! [`Sgd`]) name
//! them. They implement this crate's [`Optimizer`] trait and
//! `candle_nn::optim::Optimizer`, so code written for candle-nn's AdamW switches with one line.

#![warn(missing_docs)]

mod accumulate;
pub mod algorithm;
pub mod algorithms;
mod backend;
pub mod checkpoint;
pub mod dist;
mod driver;
pub mod elem;
mod error;
pub mod groups;
mod optimizer;
pub mod reduce;
mod registry;
pub mod schedule;
mod state;

pub use accumulate::{GradAccumulator, Reduction};
pub use algorithm::NsDtype;
pub use algorithm::{Algorithm, Kernel};
pub use algorithms::muon::AdjustLr;
pub use algorithms::sgd_sai::GsnrMode;
pub use driver::{
    GroupMemory, NonFinitePolicy, Optim, Outcome, ParamState, SkipReason, StepReport, VerdictMode,
};
pub use error::{Error, Result};
pub use groups::{is_bias_or_norm, OptimBuilder};
pub use optimizer::Optimizer;
pub use registry::AlgoVisitor;
pub use schedule::{Phase, Schedule};
pub use state::{
    dynamic_map, ParamRounding, StateFormat, StateTensor, BLOCK as QUANT_BLOCK,
    DEFAULT_MIN_8BIT_SIZE,
};

// The configuration types, the optimizer aliases and `Algo`, from the one table of algorithms.
registry::algorithm_table!(declare_algorithms);
use registry::declare_algorithms;

/// Benchmark-only knobs for `examples/bench.rs` (the SIMD level of the CPU loops). Not part of
/// the API: hidden from the docs, and may change or go away in any release.
#[doc(hidden)]
pub mod bench_internals {
    pub use crate::backend::simd;
}

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
