//! The table of algorithms: pick one by name at run time.

use crate::algorithm::Algorithm;
use crate::algorithms::{
    adabelief::AdaBeliefConfig, adamp::AdamPConfig, adamw::AdamWConfig, adan::AdanConfig,
    diffgrad::DiffGradConfig, lion::LionConfig, sgd_sai::SgdSaiConfig,
};
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
    /// [`crate::AdamP`].
    AdamP,
    /// [`crate::AdaBelief`].
    AdaBelief,
    /// [`crate::DiffGrad`].
    DiffGrad,
    /// [`crate::Adan`].
    Adan,
    /// [`crate::Lion`].
    Lion,
}

/// Calls `$f::<Config>($args)` for the algorithm `$algo`.
macro_rules! dispatch {
    ($algo:expr, $f:ident ( $($arg:expr),* )) => {
        match $algo {
            Algo::SgdSai => $f::<SgdSaiConfig>($($arg),*),
            Algo::AdamW => $f::<AdamWConfig>($($arg),*),
            Algo::AdamP => $f::<AdamPConfig>($($arg),*),
            Algo::AdaBelief => $f::<AdaBeliefConfig>($($arg),*),
            Algo::DiffGrad => $f::<DiffGradConfig>($($arg),*),
            Algo::Adan => $f::<AdanConfig>($($arg),*),
            Algo::Lion => $f::<LionConfig>($($arg),*),
        }
    };
}

impl Algo {
    /// All algorithms, in the crate's canonical order.
    pub const ALL: &'static [Algo] = &[
        Algo::SgdSai,
        Algo::AdamW,
        Algo::AdamP,
        Algo::AdaBelief,
        Algo::DiffGrad,
        Algo::Adan,
        Algo::Lion,
    ];

    /// The short name used in checkpoints, traces and command lines (`"sgd_sai"`).
    pub fn name(self) -> &'static str {
        fn name<A: Algorithm>() -> &'static str {
            A::NAME
        }
        dispatch!(self, name())
    }

    /// The algorithm called `name` (also accepts `-` for `_` and any letter case).
    pub fn from_name(name: &str) -> Option<Algo> {
        let n = name.to_ascii_lowercase().replace('-', "_");
        Self::ALL.iter().copied().find(|a| a.name() == n)
    }

    /// The official default learning rate.
    pub fn default_lr(self) -> f64 {
        fn lr<A: Algorithm>() -> f64 {
            A::default().lr()
        }
        dispatch!(self, lr())
    }

    /// State bytes per element for f32 parameters under the default configuration.
    pub fn default_state_bytes_per_element(self) -> usize {
        fn bytes<A: Algorithm>() -> usize {
            A::default().slots().len() * 4
        }
        dispatch!(self, bytes())
    }

    /// Builds a one-group optimizer over `vars` from hyperparameters given as JSON with the
    /// official names (`{"lr": 1e-3, "betas": [0.9, 0.999], ...}`); missing keys take the
    /// defaults, unknown keys are ignored.
    pub fn build_json(
        self,
        vars: Vec<(String, Var)>,
        hyperparameters: &serde_json::Value,
    ) -> Result<Box<dyn Optimizer>> {
        self.build_with(vars, hyperparameters, false)
    }

    /// Like [`build_json`](Self::build_json); with `no_decay_for_bias_and_norm`, biases, norm
    /// gains and tensors of rank ≤ 1 go to a second group without weight decay.
    pub fn build_with(
        self,
        vars: Vec<(String, Var)>,
        hyperparameters: &serde_json::Value,
        no_decay_for_bias_and_norm: bool,
    ) -> Result<Box<dyn Optimizer>> {
        fn go<A: Algorithm>(
            vars: Vec<(String, Var)>,
            hp: &serde_json::Value,
            no_decay: bool,
        ) -> Result<Box<dyn Optimizer>> {
            let config: A = serde_json::from_value(hp.clone()).map_err(|e| {
                Error::Unsupported(format!("{}: bad hyperparameters: {e}", A::NAME))
            })?;
            let mut b = OptimBuilder::new(config).named_vars(vars);
            if no_decay {
                b = b.no_decay_for_bias_and_norm();
            }
            Ok(Box::new(b.build()?))
        }
        dispatch!(self, go(vars, hyperparameters, no_decay_for_bias_and_norm))
    }
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
