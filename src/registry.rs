//! The table of algorithms: the one declaration of the set, from which the [`Algo`] enum, its
//! name dispatch, the crate's re-exports and aliases ([`crate::AdamW`], ...) and the CUDA
//! module table all derive. Adding an optimizer is one line in [`algorithm_table!`]; code that
//! needs something per algorithm either goes through [`Algo::visit`] (generic over the
//! configuration type) or matches on [`Algo`] exhaustively, so a forgotten case does not
//! compile.

use crate::algorithm::Algorithm;
use crate::dist::{Communicator, Sharded};
use crate::driver::param_traffic_bytes;
use crate::error::{Error, Result};
use crate::groups::OptimBuilder;
use crate::optimizer::Optimizer;
use crate::state::{ParamRounding, StateFormat};
use candle_core::{DType, Var};
use std::sync::Arc;

/// THE table of algorithms. Each line: `Variant: module::Config as Alias, "doc";` where
/// `module` is both `src/algorithms/<module>.rs` and the CUDA module `kernels/<module>.cu`.
/// Calls `$m!` with the whole table.
macro_rules! algorithm_table {
    ($m:ident) => {
        $m! {
            SgdSai: sgd_sai::SgdSaiConfig as SgdSai,
                "SGD-SaI: SGD with EMA momentum and a per-tensor learning-rate scale fixed at step 1.";
            AdamW: adamw::AdamWConfig as AdamW,
                "AdamW (decoupled weight decay, amsgrad, maximize), as `torch.optim.AdamW`.";
            AdamP: adamp::AdamPConfig as AdamP,
                "AdamP: Adam with the step projected off scale-invariant weights.";
            AdaBelief: adabelief::AdaBeliefConfig as AdaBelief,
                "AdaBelief: Adam on the variance of the gradient around its EMA, RAdam-rectified.";
            DiffGrad: diffgrad::DiffGradConfig as DiffGrad,
                "diffGrad: Adam with a friction coefficient from the change of the gradient.";
            Adan: adan::AdanConfig as Adan,
                "Adan: adaptive Nesterov momentum (code-convention betas, proximal decay, global clipping).";
            Lion: lion::LionConfig as Lion,
                "Lion: sign of an interpolated momentum, decoupled decay.";
            Muon: muon::MuonConfig as Muon,
                "Muon: Newton–Schulz-orthogonalized momentum for matrices, as `torch.optim.Muon`, with an auxiliary AdamW for the other parameters.";
            Sgd: sgd::SgdConfig as Sgd,
                "SGD with momentum (dampening, Nesterov, coupled weight decay, maximize), as `torch.optim.SGD`.";
        }
    };
}
pub(crate) use algorithm_table;

/// `a == b`, usable in constants.
const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Fails the build unless every algorithm's `Kernel::CUDA_MODULE` is its table line's `module`
/// (the name the CUDA module table embeds the PTX under).
macro_rules! check_cuda_modules {
    ($($variant:ident: $module:ident::$config:ident as $alias:ident, $doc:literal;)*) => {
        $(
            const _: () = assert!(
                str_eq(
                    <<crate::algorithms::$module::$config as Algorithm>::Kernel
                        as crate::algorithm::Kernel>::CUDA_MODULE,
                    stringify!($module),
                ),
                concat!(
                    "the kernel of ",
                    stringify!($config),
                    " must have CUDA_MODULE = \"",
                    stringify!($module),
                    "\" (its line in algorithm_table!)"
                )
            );
        )*
    };
}
algorithm_table!(check_cuda_modules);

/// Declares, at the crate root, the re-export of every configuration type, the alias of every
/// optimizer and the [`Algo`] enum (invoked once, in lib.rs).
macro_rules! declare_algorithms {
    ($($variant:ident: $module:ident::$config:ident as $alias:ident, $doc:literal;)*) => {
        $(
            pub use algorithms::$module::$config;
            #[doc = $doc]
            pub type $alias = Optim<$config>;
        )*

        /// Every optimizer of the crate, for choosing one at run time.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Algo {
            $(
                #[doc = $doc]
                $variant,
            )*
        }

        impl Algo {
            /// All algorithms, in the crate's canonical order.
            pub const ALL: &'static [Algo] = &[$(Algo::$variant),*];

            /// Calls `visitor.visit::<Config>()` with this algorithm's configuration type.
            pub fn visit<V: AlgoVisitor>(self, visitor: V) -> V::Output {
                match self {
                    $(Algo::$variant => visitor.visit::<$config>(),)*
                }
            }
        }
    };
}
pub(crate) use declare_algorithms;

/// Code generic over an algorithm's configuration type, run for an [`Algo`] chosen at run time
/// by [`Algo::visit`].
///
/// ```
/// use candle_optim::{Algo, AlgoVisitor, Algorithm};
/// struct Name;
/// impl AlgoVisitor for Name {
///     type Output = &'static str;
///     fn visit<A: Algorithm>(self) -> &'static str {
///         A::NAME
///     }
/// }
/// assert_eq!(Algo::Lion.visit(Name), "lion");
/// ```
pub trait AlgoVisitor {
    /// What the visit returns.
    type Output;
    /// Runs with `A`, the chosen algorithm's configuration type.
    fn visit<A: Algorithm>(self) -> Self::Output;
}

use crate::Algo;

impl Algo {
    /// The short name used in checkpoints, traces and command lines (`"sgd_sai"`).
    pub fn name(self) -> &'static str {
        struct V;
        impl AlgoVisitor for V {
            type Output = &'static str;
            fn visit<A: Algorithm>(self) -> &'static str {
                A::NAME
            }
        }
        self.visit(V)
    }

    /// The algorithm called `name` (also accepts `-` for `_` and any letter case).
    pub fn from_name(name: &str) -> Option<Algo> {
        let n = name.to_ascii_lowercase().replace('-', "_");
        Self::ALL.iter().copied().find(|a| a.name() == n)
    }

    /// The official default learning rate.
    pub fn default_lr(self) -> f64 {
        struct V;
        impl AlgoVisitor for V {
            type Output = f64;
            fn visit<A: Algorithm>(self) -> f64 {
                A::default().lr()
            }
        }
        self.visit(V)
    }

    /// The hyperparameter names of this algorithm's configuration (the official names, as
    /// `build_json` takes them).
    pub fn hyperparameter_names(self) -> Vec<String> {
        struct V;
        impl AlgoVisitor for V {
            type Output = Vec<String>;
            fn visit<A: Algorithm>(self) -> Vec<String> {
                match serde_json::to_value(A::default()) {
                    Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
                    _ => Vec::new(),
                }
            }
        }
        self.visit(V)
    }

    /// State bytes per element for f32 parameters of `numel` elements under the configuration
    /// and state format of `hyperparameters` (see [`build_json`](Self::build_json)): 8 for f32
    /// AdamW, about 2.03 for 8-bit AdamW on a tensor of at least `min_8bit_size` elements.
    pub fn state_bytes_per_element(
        self,
        hyperparameters: &serde_json::Value,
        numel: usize,
    ) -> Result<f64> {
        struct V<'a>(&'a serde_json::Value, usize);
        impl AlgoVisitor for V<'_> {
            type Output = Result<f64>;
            fn visit<A: Algorithm>(self) -> Result<f64> {
                let (hp, format, _) = split_driver_keys(self.0)?;
                let bytes = parse::<A>(&hp)?.slots().len() * format.slot_bytes(self.1, 4);
                Ok(bytes as f64 / self.1.max(1) as f64)
            }
        }
        self.visit(V(hyperparameters, numel))
    }

    /// State bytes per element for f32 parameters under the default configuration (f32 state).
    pub fn default_state_bytes_per_element(self) -> usize {
        self.state_bytes_per_element(&serde_json::json!({}), 1)
            .unwrap_or_default() as usize
    }

    /// Bytes one fused step must move (reads and writes of parameters, gradients and state)
    /// for parameters of these shapes and dtypes, under the configuration `hyperparameters`:
    /// the memory-traffic floor a benchmark divides by the time (ALGORITHMS.md §8).
    pub fn step_traffic_bytes(
        self,
        hyperparameters: &serde_json::Value,
        params: &[(Vec<usize>, DType)],
    ) -> Result<usize> {
        struct V<'a>(&'a serde_json::Value, &'a [(Vec<usize>, DType)]);
        impl AlgoVisitor for V<'_> {
            type Output = Result<usize>;
            fn visit<A: Algorithm>(self) -> Result<usize> {
                let (hp, format, _) = split_driver_keys(self.0)?;
                let config = parse::<A>(&hp)?;
                Ok(self
                    .1
                    .iter()
                    .map(|(shape, dt)| param_traffic_bytes(&config, format, shape, *dt))
                    .sum())
            }
        }
        self.visit(V(hyperparameters, params))
    }

    /// Builds a one-group optimizer over `vars` from hyperparameters given as JSON with the
    /// official names (`{"lr": 1e-3, "betas": [0.9, 0.999], ...}`); missing keys take the
    /// defaults; a key this algorithm does not have is an error, unless it is `null` or one of
    /// PyTorch's implementation switches (`foreach`, `fused`, `capturable`, `differentiable`).
    ///
    /// Three keys choose how the state is kept, for every algorithm: `state_format`
    /// (`"f32"`, `"bf16"` or `"blockwise8"`, see [`StateFormat`]),
    /// `min_8bit_size` (blockwise8 only, default 4096) and `stochastic_rounding_seed` (bf16
    /// parameters written back with stochastic rounding, see
    /// [`ParamRounding`]).
    ///
    /// ```
    /// # use candle_core::{Device, DType, Var};
    /// use candle_optim::Algo;
    /// let w = Var::zeros((64, 64), DType::F32, &Device::Cpu)?;
    /// let hp = serde_json::json!({"lr": 1e-3, "state_format": "blockwise8"});
    /// let opt = Algo::AdamW.build_json(vec![("w".into(), w)], &hp)?;
    /// assert_eq!(opt.algorithm(), "adamw");
    /// # Ok::<(), candle_optim::Error>(())
    /// ```
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
        self.build_on(vars, hyperparameters, no_decay_for_bias_and_norm, None)
    }

    /// Like [`build_with`](Self::build_with), as this rank's share of a ZeRO-1 optimizer
    /// ([`Sharded`]) over `comm`. Every rank builds it the same way.
    pub fn build_sharded(
        self,
        vars: Vec<(String, Var)>,
        hyperparameters: &serde_json::Value,
        no_decay_for_bias_and_norm: bool,
        comm: Arc<dyn Communicator>,
    ) -> Result<Box<dyn Optimizer>> {
        self.build_on(
            vars,
            hyperparameters,
            no_decay_for_bias_and_norm,
            Some(comm),
        )
    }

    fn build_on(
        self,
        vars: Vec<(String, Var)>,
        hyperparameters: &serde_json::Value,
        no_decay_for_bias_and_norm: bool,
        comm: Option<Arc<dyn Communicator>>,
    ) -> Result<Box<dyn Optimizer>> {
        struct V<'a>(
            Vec<(String, Var)>,
            &'a serde_json::Value,
            bool,
            Option<Arc<dyn Communicator>>,
        );
        impl AlgoVisitor for V<'_> {
            type Output = Result<Box<dyn Optimizer>>;
            fn visit<A: Algorithm>(self) -> Result<Box<dyn Optimizer>> {
                let (hp, format, rounding) = split_driver_keys(self.1)?;
                let mut b = OptimBuilder::new(parse::<A>(&hp)?)
                    .named_vars(self.0)
                    .state_format(format)
                    .param_rounding(rounding);
                if self.2 {
                    b = b.no_decay_for_bias_and_norm();
                }
                Ok(match self.3 {
                    Some(comm) => Box::new(Sharded::new(b.build()?, comm)?),
                    None => Box::new(b.build()?),
                })
            }
        }
        self.visit(V(vars, hyperparameters, no_decay_for_bias_and_norm, comm))
    }
}

/// Constructor arguments of the reference implementations that choose how they run, not what
/// they compute (this crate always runs one fused pass): accepted and ignored.
const IMPLEMENTATION_KEYS: &[&str] = &[
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "print_change_log",
];

/// The keys every algorithm takes, which the driver handles (`state_format`, `min_8bit_size`,
/// `stochastic_rounding_seed`; `null` means not set), and the rest of `hp`.
fn split_driver_keys(
    hp: &serde_json::Value,
) -> Result<(serde_json::Value, StateFormat, ParamRounding)> {
    let mut hp = hp.clone();
    let Some(obj) = hp.as_object_mut() else {
        return Ok((hp, StateFormat::F32, ParamRounding::Nearest));
    };
    let bad = |k: &str, want: &str| Error::Unsupported(format!("`{k}` must be {want}"));
    let format = match obj.remove("state_format") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err(bad("state_format", "a string")),
    };
    let min = match obj.remove("min_8bit_size") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| bad("min_8bit_size", "a non-negative integer"))?,
        ),
    };
    let format = match (format, min) {
        (Some(f), min) => StateFormat::from_name(&f, min)?,
        (None, None) => StateFormat::F32,
        (None, Some(_)) => {
            return Err(Error::Unsupported(
                "min_8bit_size needs \"state_format\": \"blockwise8\"".into(),
            ))
        }
    };
    let rounding = match obj.remove("stochastic_rounding_seed") {
        None | Some(serde_json::Value::Null) => ParamRounding::Nearest,
        Some(v) => ParamRounding::Stochastic {
            seed: v
                .as_u64()
                .ok_or_else(|| bad("stochastic_rounding_seed", "a non-negative integer"))?,
        },
    };
    Ok((hp, format, rounding))
}

/// A configuration from JSON with the official names: missing keys take the defaults; a key
/// the algorithm does not have is an error unless its value is `null` (not set) or it only
/// chooses how a reference implementation runs ([`IMPLEMENTATION_KEYS`]); the result is
/// validated.
fn parse<A: Algorithm>(hp: &serde_json::Value) -> Result<A> {
    let known = serde_json::to_value(A::default())
        .map_err(|e| Error::Unsupported(format!("{}: {e}", A::NAME)))?;
    if let (Some(given), Some(known)) = (hp.as_object(), known.as_object()) {
        let unknown = |(k, v): &(&String, &serde_json::Value)| {
            !known.contains_key(*k) && !v.is_null() && !IMPLEMENTATION_KEYS.contains(&k.as_str())
        };
        if let Some((k, _)) = given.iter().find(unknown) {
            let k: String = k.chars().take(64).collect();
            return Err(Error::Unsupported(format!(
                "{}: unknown hyperparameter `{k}` (known: {})",
                A::NAME,
                known.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let mut hp = hp.clone();
    if let (Some(given), Some(known)) = (hp.as_object_mut(), known.as_object()) {
        given.retain(|k, _| known.contains_key(k));
    }
    let config: A = serde_json::from_value(hp)
        .map_err(|e| Error::Unsupported(format!("{}: bad hyperparameters: {e}", A::NAME)))?;
    config.validate()?;
    Ok(config)
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
