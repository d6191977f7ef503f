//! Shared pieces of the examples: a CIFAR-10 binary reader, seeded initialisation, building an
//! optimizer by name, a training loop with progress bar and checkpoints, transformer layers,
//! loss-curve plots and a text corpus with GPT-2's tokenizer.
#![allow(dead_code)]

pub mod cifar;
pub mod gpt;
pub mod nn;
pub mod plot;
pub mod seeds;
pub mod text;
pub mod train;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use candle_optim::{Algo, Muon, MuonConfig, Optimizer};
use serde_json::json;

/// A small deterministic generator (xorshift64*), so runs are reproducible from `--seed`.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

/// How one variable is initialised.
pub enum Init {
    /// Leave candle's value (e.g. BatchNorm running statistics).
    Keep,
    Const(f64),
    Uniform(f64),
    Normal(f64),
}

/// torch-like defaults by name and shape: weights U(±1/√fan_in), biases 0, norm gains 1,
/// embeddings N(0, 0.02²) (candle's `embedding` uses std 1, which makes training diverge).
pub fn default_init(name: &str, shape: &[usize]) -> Init {
    let last = name.rsplit('.').next().unwrap_or(name);
    if name.contains("running_") {
        Init::Keep
    } else if name.contains("emb") || name.contains("wte") || name.contains("wpe") {
        Init::Normal(0.02)
    } else if shape.len() <= 1 {
        if last == "bias" || last == "beta" {
            Init::Const(0.0)
        } else {
            Init::Const(1.0)
        }
    } else {
        let fan_in: usize = shape[1..].iter().product();
        Init::Uniform(1.0 / (fan_in as f64).sqrt())
    }
}

/// Overwrites every variable of `varmap` (in name order) from a generator seeded with `seed`,
/// so two models built from the same seed start identical.
pub fn seeded_init(
    varmap: &VarMap,
    seed: u64,
    rule: impl Fn(&str, &[usize]) -> Init,
) -> candle_core::Result<()> {
    let mut rng = Rng::new(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let vals: Vec<f32> = match rule(name, var.dims()) {
            Init::Keep => continue,
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform(b) => (0..n)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * b) as f32)
                .collect(),
            Init::Normal(s) => (0..n).map(|_| (rng.normal() * s) as f32).collect(),
        };
        let t = Tensor::from_vec(vals, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// A learning rate that trains the examples' small models well for each algorithm.
pub fn example_lr(algo: Algo) -> f64 {
    match algo {
        Algo::SgdSai => 1e-3,
        Algo::AdamW | Algo::AdamP | Algo::AdaBelief | Algo::DiffGrad => 1e-3,
        Algo::Adan => 2e-3,
        Algo::Lion => 1e-4,
        // Not swept: one rate for the matrices (Muon) and the auxiliary AdamW.
        Algo::Muon => 3e-3,
        // Not swept (momentum 0.9, see `make_optimizer`).
        Algo::Sgd => 1e-2,
    }
}

/// The factor the examples' weight decay is multiplied by for `algo`: Lion's smaller steps
/// want a larger decay (its authors' recipe: 3–10× AdamW's); SGD's is a coupled L2 penalty,
/// which momentum 0.9 accumulates to 1/(1 − 0.9) = 10× a decoupled decay of the same value;
/// the others take it as given.
pub fn weight_decay_factor(algo: Algo) -> f64 {
    match algo {
        Algo::Lion => 10.0,
        Algo::Sgd => 0.1,
        Algo::SgdSai
        | Algo::AdamW
        | Algo::AdamP
        | Algo::AdaBelief
        | Algo::DiffGrad
        | Algo::Adan
        | Algo::Muon => 1.0,
    }
}

/// Builds `algo` over every float variable of `varmap` with learning rate `lr` and weight decay
/// `wd` (none for biases and norm gains); other hyperparameters take the official defaults,
/// except SGD's momentum: 0.9 (torch's default, 0, is plain SGD).
pub fn make_optimizer(
    algo: Algo,
    varmap: &VarMap,
    lr: f64,
    wd: f64,
) -> candle_optim::Result<Box<dyn Optimizer>> {
    make_optimizer_with(algo, varmap, lr, wd, "f32", None)
}

/// [`make_optimizer`] with the optimizer state kept in `state_format` (`f32`, `bf16` or
/// `blockwise8`, see `candle_optim::StateFormat`) and, with `rounding_seed`, bf16 parameters
/// written back with stochastic rounding.
pub fn make_optimizer_with(
    algo: Algo,
    varmap: &VarMap,
    lr: f64,
    wd: f64,
    state_format: &str,
    rounding_seed: Option<u64>,
) -> candle_optim::Result<Box<dyn Optimizer>> {
    make_optimizer_over(
        algo,
        varmap,
        lr,
        wd,
        state_format,
        rounding_seed,
        &json!({}),
    )
}

/// [`make_optimizer_with`] with further hyperparameters (`overrides`, a JSON object whose keys
/// replace or add to the ones built here; see [`algo_overrides`]).
pub fn make_optimizer_over(
    algo: Algo,
    varmap: &VarMap,
    lr: f64,
    wd: f64,
    state_format: &str,
    rounding_seed: Option<u64>,
    overrides: &serde_json::Value,
) -> candle_optim::Result<Box<dyn Optimizer>> {
    let mut vars: Vec<_> = {
        let data = varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let wd = wd * weight_decay_factor(algo);
    let mut hyper = json!({"lr": lr, "weight_decay": wd});
    if state_format != "f32" {
        hyper["state_format"] = state_format.into();
    }
    if let Some(seed) = rounding_seed {
        hyper["stochastic_rounding_seed"] = seed.into();
    }
    if algo == Algo::Sgd {
        hyper["momentum"] = json!(0.9);
    }
    if let Some(o) = overrides.as_object() {
        for (k, v) in o {
            hyper[k.as_str()] = v.clone();
        }
    }
    build_named(algo, vars, &hyper, true)
}

/// The hyperparameter overrides the examples' `--momentum` and `--gsnr-mode` make for `algo`:
/// `momentum` for SGD-SaI and SGD, `gsnr_mode` (`SgdSaiConfig`'s key) for SGD-SaI; an empty
/// object for the other optimizers, which have neither.
pub fn algo_overrides(
    algo: Algo,
    momentum: Option<f64>,
    gsnr_mode: Option<&str>,
    ns_dtype: Option<&str>,
) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    if let (Some(m), Algo::SgdSai | Algo::Sgd) = (momentum, algo) {
        o.insert("momentum".into(), json!(m));
    }
    if let (Some(g), Algo::SgdSai) = (gsnr_mode, algo) {
        o.insert("gsnr_mode".into(), json!(g));
    }
    if let (Some(d), Algo::Muon) = (ns_dtype, algo) {
        o.insert("ns_dtype".into(), json!(d));
    }
    serde_json::Value::Object(o)
}

/// Per-optimizer learning rates (`--lr-for`).
#[derive(Clone, Debug, Default)]
pub struct LrOverrides(pub Vec<(Algo, f64)>);

impl LrOverrides {
    /// The rate given for `algo`, if any.
    pub fn get(&self, algo: Algo) -> Option<f64> {
        self.0.iter().find(|p| p.0 == algo).map(|p| p.1)
    }
}

/// Parses `--lr-for`: `name=rate` pairs separated by commas (`sgd_sai=5e-4,adamw=1e-3`), each
/// rate replacing `--lr` (and the default) for that optimizer.
pub fn parse_lr_overrides(spec: &str) -> std::result::Result<LrOverrides, String> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, rate) = item
            .split_once('=')
            .ok_or_else(|| format!("--lr-for: expected name=rate, got {item:?}"))?;
        let algo = parse_algo(name.trim())?;
        let rate: f64 = rate
            .trim()
            .parse()
            .map_err(|e| format!("--lr-for: bad rate in {item:?}: {e}"))?;
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("--lr-for: the rate in {item:?} must be positive"));
        }
        out.retain(|p: &(Algo, f64)| p.0 != algo);
        out.push((algo, rate));
    }
    Ok(LrOverrides(out))
}

/// Parses `--seeds`: seeds separated by commas (`42,43,44`), duplicates dropped.
pub fn parse_seeds(spec: &str) -> std::result::Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for s in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let seed: u64 = s
            .parse()
            .map_err(|e| format!("--seeds: bad seed {s:?}: {e}"))?;
        if !out.contains(&seed) {
            out.push(seed);
        }
    }
    if out.is_empty() {
        return Err("--seeds needs at least one seed, e.g. 42,43,44".into());
    }
    Ok(out)
}

/// Builds `algo` over named variables from JSON hyperparameters (`Algo::build_with`), in the
/// usual setup for Muon: hidden matrices take Muon; embeddings and output heads (by name) take
/// the auxiliary AdamW, and so do biases, norm gains and convolution kernels (rank ≠ 2,
/// automatically); with `no_decay`, the rank ≤ 1 ones without weight decay.
pub fn build_named(
    algo: Algo,
    vars: Vec<(String, candle_core::Var)>,
    hyper: &serde_json::Value,
    no_decay: bool,
) -> candle_optim::Result<Box<dyn Optimizer>> {
    if algo != Algo::Muon {
        return algo.build_with(vars, hyper, no_decay);
    }
    let cfg: MuonConfig = serde_json::from_value(hyper.clone())
        .map_err(|e| candle_optim::Error::Unsupported(format!("muon: {e}")))?;
    let mut b = Muon::builder(cfg)
        .named_vars(vars)
        .group(|n, _| is_embedding_or_head(n), |c| c.use_muon = false);
    if no_decay {
        b = b.no_decay_for_bias_and_norm();
    }
    Ok(Box::new(b.build()?))
}

/// Whether a parameter name has a segment naming an embedding or an output head.
fn is_embedding_or_head(name: &str) -> bool {
    name.split(['.', '/']).any(|s| {
        matches!(
            s,
            "wte" | "wpe" | "lm_head" | "head" | "fc" | "classifier" | "cls_token" | "pos_embed"
        ) || s.contains("embed")
    })
}

pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

/// The error type of the examples' `main`s.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The device named on the command line (`cpu`, `cuda` or `cuda:N`).
/// The dtype a `--weights` option names: f32, or bf16 (weights stored in bf16, widened to f32
/// where the layers use them).
pub fn weights_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("--weights must be f32 or bf16, got {other:?}").into()),
    }
}

pub fn device(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => return Err(format!("unknown device {other:?} (cpu, cuda or cuda:N)").into()),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(
            "--device cuda needs the examples built with the `cuda` feature, e.g. \
                    `cargo run --release --features cuda --example NAME -- --device cuda` \
                    (this binary was built without it)"
                .into(),
        );
    }
    Device::new_cuda(ordinal)
        .map_err(|e| format!("could not open CUDA device {ordinal}: {e}").into())
}

/// Sets the number of CPU threads candle (and rayon) use, before either starts its pool. On a
/// machine busy with other work, 1 can be faster than the default (all cores): candle's pool
/// spins while it waits for workers that the OS has descheduled.
pub fn set_threads(n: Option<usize>) {
    if let Some(n) = n.filter(|&n| n > 0) {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Parses `--compare`: `all`, or optimizer names separated by commas.
pub fn parse_algos(spec: &str) -> std::result::Result<Vec<Algo>, String> {
    if spec.trim().eq_ignore_ascii_case("all") {
        return Ok(Algo::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let algo = Algo::from_name(name).ok_or_else(|| {
            let known: Vec<_> = Algo::ALL.iter().map(|a| a.name()).collect();
            format!(
                "unknown optimizer {name:?} (one of {} or all)",
                known.join(", ")
            )
        })?;
        if !out.contains(&algo) {
            out.push(algo);
        }
    }
    if out.is_empty() {
        return Err("--compare needs at least one optimizer name, or all".into());
    }
    Ok(out)
}

/// Parses one optimizer name.
pub fn parse_algo(name: &str) -> std::result::Result<Algo, String> {
    match parse_algos(name)?.as_slice() {
        [a] => Ok(*a),
        _ => Err(format!(
            "--optimizer takes one name, got {name:?} (use --compare for several)"
        )),
    }
}

/// The optimizers a run trains: `--optimizer`, or every one `--compare` names (which cannot be
/// combined with `--resume`).
pub fn select_algos(optimizer: &str, compare: Option<&str>, resume: bool) -> Result<Vec<Algo>> {
    match compare {
        None => Ok(vec![parse_algo(optimizer)?]),
        Some(spec) => {
            let algos = parse_algos(spec)?;
            if resume {
                return Err("--resume works with a single --optimizer, not --compare".into());
            }
            Ok(algos)
        }
    }
}

/// Total number of elements of the trainable (non-running-statistics) variables.
pub fn count_params(varmap: &VarMap) -> usize {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(_, v)| v.elem_count())
        .sum()
}

pub fn dtype_f32() -> DType {
    DType::F32
}
