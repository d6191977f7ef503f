//! The table of algorithms: pick one by name at run time.

use crate::algorithm::Algorithm;
use crate::algorithms::{adamw::AdamWConfig, sgd_sai::SgdSaiConfig};
use crate::error::{Error, Result};
use crate::groups::OptimBuilder;
use crate::optimizer::Optimizer;
use candle_core::Var;

/// Every optimizer of the crate, for choosing one at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algo {
    /// [`crate::SgdSai`].
    SgdSai,
    /// [`crate::AdamW`].
    AdamW,
}

impl Algo {
    /// All algorithms, in the crate's canonical order.
    pub const ALL: &'static [Algo] = &[Algo::SgdSai, Algo::AdamW];

    /// The short name used in checkpoints, traces and command lines (`"sgd_sai"`).
    pub fn name(self) -> &'static str {
        match self {
            Algo::SgdSai => SgdSaiConfig::NAME,
            Algo::AdamW => AdamWConfig::NAME,
        }
    }

    /// The algorithm called `name` (also accepts `-` for `_` and any letter case).
    pub fn from_name(name: &str) -> Option<Algo> {
        let n = name.to_ascii_lowercase().replace('-', "_");
        Self::ALL.iter().copied().find(|a| a.name() == n)
    }

    /// The official default learning rate.
    pub fn default_lr(self) -> f64 {
        self.with(|a| a.lr())
    }

    fn with<R>(self, f: impl FnOnce(&dyn AlgoInfo) -> R) -> R {
        match self {
            Algo::SgdSai => f(&SgdSaiConfig::default()),
            Algo::AdamW => f(&AdamWConfig::default()),
        }
    }

    /// Builds a one-group optimizer over `vars` from hyperparameters given as JSON with the
    /// official names (`{"lr": 1e-3, "betas": [0.9, 0.999], ...}`); missing keys take the
    /// defaults, unknown keys are ignored.
    pub fn build_json(
        self,
        vars: Vec<(String, Var)>,
        hyperparameters: &serde_json::Value,
    ) -> Result<Box<dyn Optimizer>> {
        fn go<A: Algorithm>(
            vars: Vec<(String, Var)>,
            hp: &serde_json::Value,
        ) -> Result<Box<dyn Optimizer>> {
            let config: A = serde_json::from_value(hp.clone()).map_err(|e| {
                Error::Unsupported(format!("{}: bad hyperparameters: {e}", A::NAME))
            })?;
            Ok(Box::new(
                OptimBuilder::new(config).named_vars(vars).build()?,
            ))
        }
        match self {
            Algo::SgdSai => go::<SgdSaiConfig>(vars, hyperparameters),
            Algo::AdamW => go::<AdamWConfig>(vars, hyperparameters),
        }
    }
}

trait AlgoInfo {
    fn lr(&self) -> f64;
}

impl<A: Algorithm> AlgoInfo for A {
    fn lr(&self) -> f64 {
        Algorithm::lr(self)
    }
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
