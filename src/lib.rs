//! # candle-optim
//!
//! Fast, exact deep-learning optimizers for [candle](https://github.com/huggingface/candle):
//! SGD-SaI, AdamW, AdamP, AdaBelief, diffGrad, Adan and Lion, each exactly as its authors' code defines it, each step one
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
//! assert!(report.taken);
//! # Ok::<(), candle_optim::Error>(())
//! ```
//!
//! Every optimizer is the shared driver [`Optim`] around one [`Algorithm`]; the aliases
//! ([`SgdSai`], [`AdamW`], [`AdamP`], [`AdaBelief`], [`DiffGrad`], [`Adan`], [`Lion`]) name
//! them. They implement this crate's [`Optimizer`] trait and
//! `candle_nn::optim::Optimizer`, so code written for candle-nn's AdamW switches with one line.

#![warn(missing_docs)]

mod accumulate;
pub mod algorithm;
pub mod algorithms;
mod backend;
pub mod checkpoint;
pub mod elem;
mod error;
pub mod groups;
mod optimizer;
pub mod reduce;
mod registry;
pub mod schedule;

pub use accumulate::{GradAccumulator, Reduction};
pub use algorithm::{Algorithm, Kernel};
pub use algorithms::adabelief::AdaBeliefConfig;
pub use algorithms::adamp::AdamPConfig;
pub use algorithms::adamw::AdamWConfig;
pub use algorithms::adan::AdanConfig;
pub use algorithms::diffgrad::DiffGradConfig;
pub use algorithms::lion::LionConfig;
pub use algorithms::sgd_sai::{GsnrMode, SgdSaiConfig};
pub use error::{Error, Result};
pub use groups::{is_bias_or_norm, OptimBuilder};
pub use optimizer::{
    GroupMemory, NonFinitePolicy, Optim, Optimizer, ParamState, SkipReason, StepReport,
};
pub use registry::Algo;
pub use schedule::{Phase, Schedule};

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

/// AdamW (decoupled weight decay, amsgrad, maximize), as `torch.optim.AdamW`.
pub type AdamW = Optim<AdamWConfig>;
/// SGD-SaI: SGD with EMA momentum and a per-tensor learning-rate scale fixed at step 1.
pub type SgdSai = Optim<SgdSaiConfig>;
/// AdamP: Adam with the step projected off scale-invariant weights.
pub type AdamP = Optim<AdamPConfig>;
/// AdaBelief: Adam on the variance of the gradient around its EMA, RAdam-rectified.
pub type AdaBelief = Optim<AdaBeliefConfig>;
/// diffGrad: Adam with a friction coefficient from the change of the gradient.
pub type DiffGrad = Optim<DiffGradConfig>;
/// Adan: adaptive Nesterov momentum (code-convention betas, proximal decay, global clipping).
pub type Adan = Optim<AdanConfig>;
/// Lion: sign of an interpolated momentum, decoupled decay.
pub type Lion = Optim<LionConfig>;
