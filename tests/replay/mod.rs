//! Replay of the golden traces (format: `tests/data/conformance/README` of the shared spec),
//! shared by `tests/conformance.rs` (CPU) and `examples/gpu_check.rs` (CUDA).
#![allow(dead_code)]

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_optim::{
    AdaBeliefConfig, AdamPConfig, AdamWConfig, AdanConfig, Algo, DiffGradConfig, LionConfig,
    MuonConfig, SgdConfig, SgdSaiConfig,
};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// How one case went.
pub enum Outcome {
    Passed(f64),
    Failed {
        step: usize,
        param: usize,
        err: f64,
        what: String,
    },
    Skipped(String),
}

/// The `.safetensors` traces of `dirs`, each directory sorted by name.
pub fn list_traces(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for dir in dirs {
        let mut here: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot read trace directory {}: {e}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot list trace directory {}: {e}", dir.display()))?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        here.sort();
        files.extend(here);
    }
    Ok(files)
}

/// Replays every file on `device`, printing one line per case; returns (passed, failed,
/// skipped) and each case's final optimizer state (by case name).
pub fn run_all(
    files: &[PathBuf],
    device: &Device,
    print: bool,
) -> (usize, usize, usize, Vec<(String, State)>) {
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut states = Vec::new();
    for file in files {
        let fallback = file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let (name, outcome) = match run_case(file, device) {
            Ok((name, o, state)) => {
                states.push((name.clone(), state));
                (name, o)
            }
            Err(e) => (
                fallback,
                Outcome::Failed {
                    step: 0,
                    param: 0,
                    err: f64::INFINITY,
                    what: format!("could not run: {e}"),
                },
            ),
        };
        match outcome {
            Outcome::Passed(w) => {
                passed += 1;
                if print {
                    println!("case {name}: passed (worst error {w:.3} of tolerance)");
                }
            }
            Outcome::Failed {
                step,
                param,
                err,
                what,
            } => {
                failed += 1;
                let what = if what.is_empty() {
                    String::new()
                } else {
                    format!("; {what}")
                };
                println!("case {name}: FAILED at step {step}, param {param} (error {err:.3} of tolerance{what})");
            }
            Outcome::Skipped(why) => {
                skipped += 1;
                if print {
                    println!("case {name}: skipped ({why})");
                }
            }
        }
    }
    (passed, failed, skipped, states)
}

/// Final state of a replay: per parameter, per slot, the values (f32, copied to the host).
pub type State = Vec<Vec<Vec<f32>>>;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn to_vec(t: &Tensor) -> Res<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// `[r, c]` view of a parameter for the closed-loop losses.
fn matrix_view(shape: &[usize]) -> (usize, usize) {
    let n: usize = shape.iter().product();
    if shape.len() >= 2 {
        (shape[0], n / shape[0])
    } else {
        (1, n)
    }
}

/// Row-major `[r, k] = [r, c] × [c, k]`, accumulated in f64, rounded to f32.
fn matmul(a: &[f32], b: &[f32], r: usize, c: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * k];
    for i in 0..r {
        for j in 0..k {
            let mut s = 0f64;
            for l in 0..c {
                s += a[i * c + l] as f64 * b[l * k + j] as f64;
            }
            out[i * k + j] = s as f32;
        }
    }
    out
}

fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = a[i * c + j];
        }
    }
    out
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() as f32
}

/// The closed-loop gradient of one parameter's loss term at the current parameter `m`.
fn closed_grad(
    kind: &str,
    m: &[f32],
    shape: &[usize],
    t: &HashMap<String, Tensor>,
    key: &str,
) -> Res<Vec<f32>> {
    let (r, c) = matrix_view(shape);
    // `[c, k]`: the loss input's second dimension, checked against the parameter's view.
    let input = |name: &str| -> Res<(Vec<f32>, usize)> {
        let x = get(t, &format!("loss.{key}.{name}"))?;
        match x.dims() {
            &[rows, k] if rows == c && k > 0 => Ok((to_vec(x)?, k)),
            d => Err(format!("loss.{key}.{name} has shape {d:?}, expected [{c}, k]").into()),
        }
    };
    match kind {
        "quadratic" => {
            let (a, k) = input("A")?;
            let b_t = get(t, &format!("loss.{key}.B"))?;
            if b_t.dims() != [r, k] {
                return Err(format!(
                    "loss.{key}.B has shape {:?}, expected [{r}, {k}]",
                    b_t.dims()
                )
                .into());
            }
            let b = to_vec(b_t)?;
            let mut res = matmul(m, &a, r, c, k);
            for (x, y) in res.iter_mut().zip(&b) {
                *x -= y;
            }
            Ok(matmul(&res, &transpose(&a, c, k), r, k, c))
        }
        "scale_invariant_layer" | "scale_invariant_channel" => {
            let (x, k) = input("X")?;
            let xt = transpose(&x, c, k);
            // The layer view is one row of length r·c only in the norms; Y = M X row by row.
            let y = matmul(m, &x, r, c, k);
            let yxt = matmul(&y, &xt, r, k, c);
            let mut g = vec![0f32; r * c];
            if kind == "scale_invariant_layer" {
                let (ny, nm) = (norm(&y), norm(m));
                for i in 0..r * c {
                    g[i] = yxt[i] / (ny * nm) - (ny / (nm * nm * nm)) * m[i];
                }
            } else {
                for row in 0..r {
                    let ny = norm(&y[row * k..(row + 1) * k]);
                    let mr = &m[row * c..(row + 1) * c];
                    let nm = norm(mr);
                    for j in 0..c {
                        let i = row * c + j;
                        g[i] = yxt[i] / (ny * nm) - (ny / (nm * nm * nm)) * m[i];
                    }
                }
            }
            Ok(g)
        }
        other => Err(format!("unknown closed-loop term kind {other}").into()),
    }
}

fn scalar(list: &[(&'static str, f64)], name: &str) -> Option<f64> {
    list.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// `t[name]`, or an error naming the missing tensor (indexing would panic the whole run).
fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Res<&'a Tensor> {
    t.get(name)
        .ok_or_else(|| format!("trace has no tensor `{name}`").into())
}

/// The keys `algo`'s configuration serializes to (the official hyperparameter names).
fn config_keys(algo: Algo) -> Res<BTreeSet<String>> {
    fn keys<C: Default + serde::Serialize>() -> Res<BTreeSet<String>> {
        let v = serde_json::to_value(C::default())?;
        let o = v.as_object().ok_or("configuration is not a JSON object")?;
        Ok(o.keys().cloned().collect())
    }
    match algo {
        Algo::SgdSai => keys::<SgdSaiConfig>(),
        Algo::AdamW => keys::<AdamWConfig>(),
        Algo::AdamP => keys::<AdamPConfig>(),
        Algo::AdaBelief => keys::<AdaBeliefConfig>(),
        Algo::DiffGrad => keys::<DiffGradConfig>(),
        Algo::Adan => keys::<AdanConfig>(),
        Algo::Lion => keys::<LionConfig>(),
        Algo::Muon => keys::<MuonConfig>(),
        Algo::Sgd => keys::<SgdConfig>(),
    }
}

/// Fails on a hyperparameter the configuration has no field for: `build_json` ignores unknown
/// keys, so a misspelled or unimplemented argument would otherwise replay with its default.
/// Allowed without a field: the format's always-present `betas`, `eps`, `momentum` as `null`
/// (not an argument of this optimizer), `foreach` (the reference's loop structure, same
/// arithmetic) and `fused`/`print_change_log` when false.
fn check_hyperparameter_keys(algo: Algo, hp: &Value) -> Res<()> {
    let known = config_keys(algo)?;
    let hp = hp
        .as_object()
        .ok_or("`hyperparameters` is missing or not an object")?;
    let unknown: Vec<String> = hp
        .iter()
        .filter(|(k, v)| {
            !known.contains(*k)
                && !match k.as_str() {
                    "betas" | "eps" | "momentum" => v.is_null(),
                    "foreach" => v.is_boolean(),
                    "fused" | "print_change_log" => **v == Value::Bool(false),
                    // The driver's state-format keys (8-bit traces).
                    "state_format" | "min_8bit_size" => true,
                    _ => false,
                }
        })
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!("unknown hyperparameters for {algo}: {}", unknown.join(", ")).into())
    }
}

fn usize_field(v: &Value, what: &str) -> Res<usize> {
    Ok(v.as_u64()
        .ok_or(format!("`{what}` is missing or not an integer"))? as usize)
}

fn f64_field(v: &Value, what: &str) -> Res<f64> {
    v.as_f64()
        .ok_or_else(|| format!("`{what}` is missing or not a number").into())
}

fn str_field<'a>(v: &'a Value, what: &str) -> Res<&'a str> {
    v.as_str()
        .ok_or_else(|| format!("`{what}` is missing or not a string").into())
}

/// The tolerance rule of a trace's family.
enum Rule {
    /// `fp32` and `blockwise8`: per element, `|x − ref| ≤ rtol·(|ref| + S_i) + slack_i`, where
    /// the slack grows after a code flip of parameter i (8-bit state only).
    Elementwise {
        rtol: f64,
        scales: Vec<f64>,
        slack: Vec<f64>,
    },
    /// `muon`: per tensor and step, `‖x − ref‖_F ≤ ns_rtol·D[i][t−1] + f32_rtol·‖ref‖_F`.
    Muon {
        ns_rtol: f64,
        f32_rtol: f64,
        path: Vec<Vec<f64>>,
    },
}

impl Rule {
    /// The error of parameter `i` after step `t` as a fraction of its tolerance (∞ for NaN).
    fn error(&self, i: usize, t: usize, x: &[f32], r: &[f32]) -> f64 {
        let err = match self {
            Rule::Elementwise {
                rtol,
                scales,
                slack,
            } => x
                .iter()
                .zip(r)
                .map(|(a, b)| {
                    (*a as f64 - *b as f64).abs()
                        / (rtol * ((*b as f64).abs() + scales[i]) + slack[i])
                })
                .fold(
                    0f64,
                    |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
                ),
            Rule::Muon {
                ns_rtol,
                f32_rtol,
                path,
            } => {
                let (mut d2, mut r2) = (0f64, 0f64);
                for (a, b) in x.iter().zip(r) {
                    let (a, b) = (*a as f64, *b as f64);
                    d2 += (a - b) * (a - b);
                    r2 += b * b;
                }
                d2.sqrt() / (ns_rtol * path[i][t - 1] + f32_rtol * r2.sqrt())
            }
        };
        if err.is_nan() {
            f64::INFINITY
        } else {
            err
        }
    }
}

/// The `muon` family's tolerance, after checking its metadata (README "Family muon"): every
/// parameter a matrix, `muon.decay_factor` = 1 − lr·weight_decay, `muon.adjusted_lr` what
/// `adjust_lr_fn` gives for each shape, a known `ns_dtype`, positive `ns_rtol` and `f32_rtol`,
/// and per parameter `steps` path lengths, finite, ≥ 0 and non-decreasing.
fn muon_rule(meta: &Value, nparams: usize, steps: usize) -> Res<Rule> {
    let hp = &meta["hyperparameters"];
    let m = &meta["muon"];
    let tol = &meta["tolerance"];
    let lr = f64_field(&hp["lr"], "hyperparameters.lr")?;
    let wd = f64_field(&hp["weight_decay"], "hyperparameters.weight_decay")?;
    let d = f64_field(&m["decay_factor"], "muon.decay_factor")?;
    if (d - (1.0 - lr * wd)).abs() > 1e-12 {
        return Err(format!("muon.decay_factor {d} is not 1 - lr*weight_decay").into());
    }
    match str_field(&m["ns_dtype"], "muon.ns_dtype")? {
        "bfloat16" | "float32" => {}
        other => return Err(format!("unknown muon.ns_dtype {other:?}").into()),
    }
    let adjust = match &hp["adjust_lr_fn"] {
        Value::Null => candle_optim::AdjustLr::Original,
        v => serde_json::from_value(v.clone())
            .map_err(|e| format!("hyperparameters.adjust_lr_fn: {e}"))?,
    };
    let adjusted = m["adjusted_lr"]
        .as_array()
        .ok_or("no muon.adjusted_lr list")?;
    let params = meta["params"].as_array().ok_or("no params")?;
    if adjusted.len() != nparams || params.len() != nparams {
        return Err(format!("{} adjusted rates for {nparams} parameters", adjusted.len()).into());
    }
    for (i, (a, p)) in adjusted.iter().zip(params).enumerate() {
        let a = f64_field(a, "muon.adjusted_lr[i]")?;
        let shape: Vec<usize> = p["shape"]
            .as_array()
            .ok_or("params[i]: no shape")?
            .iter()
            .map(|d| usize_field(d, "params[i].shape"))
            .collect::<Res<_>>()?;
        let [rows, cols] = shape[..] else {
            return Err(format!("p{i} has shape {shape:?}: Muon traces hold matrices").into());
        };
        let want = lr * adjust.ratio(rows, cols);
        if (a - want).abs() > 1e-9 * want.abs().max(1e-12) {
            return Err(format!("muon.adjusted_lr[{i}] = {a}, expected {want}").into());
        }
    }
    let ns_rtol = f64_field(&tol["ns_rtol"], "tolerance.ns_rtol")?;
    let f32_rtol = f64_field(&tol["f32_rtol"], "tolerance.f32_rtol")?;
    if !(ns_rtol > 0.0 && ns_rtol < 1.0 && f32_rtol > 0.0 && f32_rtol < 1e-3) {
        return Err(
            format!("tolerance ns_rtol {ns_rtol} / f32_rtol {f32_rtol} out of range").into(),
        );
    }
    let path: Vec<Vec<f64>> = tol["path_length"]
        .as_array()
        .ok_or("no tolerance.path_length")?
        .iter()
        .map(|row| {
            let row: Vec<f64> = row
                .as_array()
                .ok_or("tolerance.path_length[i] is not a list")?
                .iter()
                .map(|v| f64_field(v, "tolerance.path_length[i][t]"))
                .collect::<Res<_>>()?;
            let ordered = row.windows(2).all(|w| w[0] <= w[1]);
            if row.len() != steps || !ordered || row.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(format!(
                    "tolerance.path_length[i] must hold {steps} finite, non-negative, non-decreasing lengths"
                )
                .into());
            }
            Ok(row)
        })
        .collect::<Res<_>>()?;
    if path.len() != nparams {
        return Err(format!("{} path lengths for {nparams} parameters", path.len()).into());
    }
    Ok(Rule::Muon {
        ns_rtol,
        f32_rtol,
        path,
    })
}

/// Replays one trace file on `device` (gradients computed on the host, uploaded each step).
pub fn run_case(file: &Path, device: &Device) -> Res<(String, Outcome, State)> {
    run_trace(&std::fs::read(file)?, device)
}

/// Replays one trace given as the bytes of its `.safetensors` file. A trace that does not
/// follow the format (a missing or extra tensor, a shape that differs from its parameter's,
/// an unknown hyperparameter, a list of the wrong length) is an error, never truncated.
pub fn run_trace(bytes: &[u8], device: &Device) -> Res<(String, Outcome, State)> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
    let meta: Value = serde_json::from_str(
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("case"))
            .ok_or("no `case` metadata")?,
    )?;
    let name = str_field(&meta["name"], "name")?.to_string();
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
    let opt_name = str_field(&meta["optimizer"], "optimizer")?;
    let family = match &meta["family"] {
        Value::Null => "fp32",
        f => str_field(f, "family")?,
    };
    let (muon, q8) = match family {
        "fp32" => (false, false),
        "muon" => (true, false),
        "blockwise8" => (false, true),
        _ => {
            return Ok((
                name,
                Outcome::Skipped(format!("family {family} is not implemented")),
                Vec::new(),
            ))
        }
    };
    let version = if muon || q8 { 2 } else { 1 };
    if meta["format_version"].as_u64() != Some(version) {
        return Err(format!(
            "format_version {} of a {family} trace",
            meta["format_version"]
        )
        .into());
    }
    if muon != (opt_name == "muon") {
        return Err(format!("optimizer {opt_name} in a {family} trace").into());
    }
    // bitsandbytes' SGD8bit is torch's SGD with momentum (dampening and nesterov ignored).
    let algo_name = if opt_name == "sgd_momentum" {
        "sgd"
    } else {
        opt_name
    };
    let Some(algo) = Algo::from_name(algo_name) else {
        return Ok((
            name,
            Outcome::Skipped(format!("optimizer {opt_name} is not implemented")),
            Vec::new(),
        ));
    };
    let q8_spec = if q8 { Some(Q8Spec::read(&meta)?) } else { None };
    let hyper = match &q8_spec {
        Some(spec) => spec.hyperparameters(&meta["hyperparameters"])?,
        None => meta["hyperparameters"].clone(),
    };
    check_hyperparameter_keys(algo, &hyper)?;
    let steps = usize_field(&meta["steps"], "steps")?;
    if steps == 0 {
        return Err("`steps` is 0".into());
    }
    let params = meta["params"].as_array().ok_or("no params")?;
    let tol = &meta["tolerance"];
    let rule = if muon {
        muon_rule(&meta, params.len(), steps)?
    } else {
        let scales: Vec<f64> = tol["trajectory_scale"]
            .as_array()
            .ok_or("no trajectory_scale")?
            .iter()
            .map(|v| f64_field(v, "tolerance.trajectory_scale[i]"))
            .collect::<Res<_>>()?;
        if scales.len() != params.len() {
            return Err(format!(
                "{} trajectory scales for {} parameters",
                scales.len(),
                params.len()
            )
            .into());
        }
        Rule::Elementwise {
            rtol: f64_field(&tol["rtol"], "tolerance.rtol")?,
            scales,
            slack: vec![0.0; params.len()],
        }
    };
    let gsnr_rtol = if opt_name == "sgd_sai" {
        f64_field(&tol["gsnr_rtol"], "tolerance.gsnr_rtol")?
    } else {
        0.0
    };
    let closed = match str_field(&meta["loop"], "loop")? {
        "open" => false,
        "closed" => true,
        other => return Err(format!("unknown loop {other:?}").into()),
    };
    let restarts: Vec<u64> = meta["restart_after_steps"]
        .as_array()
        .ok_or("no restart_after_steps")?
        .iter()
        .map(|v| usize_field(v, "restart_after_steps[i]").map(|t| t as u64))
        .collect::<Res<_>>()?;
    let mut terms: HashMap<String, String> = HashMap::new();
    if closed {
        for t in meta["loop_detail"]["terms"]
            .as_array()
            .ok_or("closed loop without loop_detail.terms")?
        {
            let param = str_field(&t["param"], "terms[i].param")?;
            let kind = str_field(&t["kind"], "terms[i].kind")?;
            if terms.insert(param.into(), kind.into()).is_some() {
                return Err(format!("two loss terms for {param}").into());
            }
        }
        if terms.len() != params.len() {
            return Err(
                format!("{} loss terms for {} parameters", terms.len(), params.len()).into(),
            );
        }
    }
    let sgd_sai = opt_name == "sgd_sai";
    let max_normalized = sgd_sai && meta["hyperparameters"]["gsnr_mode"] == "max_normalized";

    // Exactly the tensors the format lists for this case: none missing, none left unused.
    let mut expected = BTreeSet::new();
    let mut vars = Vec::new();
    let mut shapes = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let key = str_field(&p["key"], "params[i].key")?.to_string();
        if key != format!("p{i}") {
            return Err(format!("parameter {i} has key {key:?}, expected \"p{i}\"").into());
        }
        let init = get(&tensors, &format!("{key}.init"))?;
        let shape: Vec<usize> = p["shape"]
            .as_array()
            .ok_or(format!("{key}: no shape"))?
            .iter()
            .map(|d| usize_field(d, "params[i].shape"))
            .collect::<Res<_>>()?;
        if init.dims() != shape.as_slice() {
            return Err(format!(
                "{key}.init has shape {:?}, params says {shape:?}",
                init.dims()
            )
            .into());
        }
        expected.insert(format!("{key}.init"));
        expected.insert(format!("{key}.final"));
        for t in 1..=steps {
            expected.insert(format!("{key}.step.{t}"));
            if !closed {
                expected.insert(format!("{key}.grad.{t}"));
            }
        }
        if closed {
            match terms.get(&key).map(String::as_str) {
                Some("quadratic") => {
                    expected.insert(format!("loss.{key}.A"));
                    expected.insert(format!("loss.{key}.B"));
                }
                Some("scale_invariant_layer" | "scale_invariant_channel") => {
                    expected.insert(format!("loss.{key}.X"));
                }
                Some(other) => return Err(format!("{key}: unknown loss term kind {other}").into()),
                None => return Err(format!("{key}: no loss term").into()),
            }
        }
        if sgd_sai {
            expected.insert(format!("{key}.gsnr"));
        }
        if let Some(spec) = &q8_spec {
            if spec.quantized.contains(&key) {
                for j in 0..spec.slots.len() {
                    for t in 1..=steps {
                        expected.insert(format!("{key}.state{j}.codes.{t}"));
                        expected.insert(format!("{key}.state{j}.absmax.{t}"));
                    }
                }
            }
        }
        shapes.push(shape);
        vars.push((key, Var::from_tensor(&init.to_device(device)?)?));
    }
    if max_normalized {
        expected.insert("gsnr_max".into());
    }
    if q8 {
        expected.insert("qmap.signed".into());
        expected.insert("qmap.unsigned".into());
    }
    let present: BTreeSet<String> = tensors.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&present).collect();
    let extra: Vec<_> = present.difference(&expected).collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(format!("tensors missing: {missing:?}; not in the format: {extra:?}").into());
    }
    for (name, t) in &tensors {
        let mut dtype = candle_core::DType::F32;
        let blocks;
        let want = if name.starts_with("loss.") {
            continue;
        } else if name.starts_with("qmap.") {
            &[256][..]
        } else if name.ends_with(".gsnr") || name == "gsnr_max" {
            &[][..]
        } else {
            let i: usize = name[1..name.find('.').unwrap_or(name.len())].parse()?;
            if name.contains(".codes.") {
                dtype = candle_core::DType::U8;
                shapes[i].as_slice()
            } else if name.contains(".absmax.") {
                blocks = [shapes[i].iter().product::<usize>().div_ceil(256)];
                &blocks[..]
            } else {
                shapes[i].as_slice()
            }
        };
        if t.dims() != want || t.dtype() != dtype {
            return Err(format!(
                "{name} is {:?} {:?}, expected {dtype:?} {want:?}",
                t.dtype(),
                t.dims(),
            )
            .into());
        }
    }
    if q8 {
        for (name, signed) in [("qmap.signed", true), ("qmap.unsigned", false)] {
            let stored = to_vec(get(&tensors, name)?)?;
            let ours = candle_optim::dynamic_map(signed);
            if stored
                .iter()
                .zip(&ours)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(format!("{name} differs from this crate's map").into());
            }
        }
    }
    for (key, _) in &vars {
        let (last, fin) = (
            to_vec(get(&tensors, &format!("{key}.step.{steps}"))?)?,
            to_vec(get(&tensors, &format!("{key}.final"))?)?,
        );
        if last
            .iter()
            .map(|x| x.to_bits())
            .ne(fin.iter().map(|x| x.to_bits()))
        {
            return Err(format!("{key}.final differs from {key}.step.{steps}").into());
        }
    }

    let mut opt = algo.build_json(vars.clone(), &hyper)?;

    let mut rule = rule;
    // Per parameter: the step of its first code flip, and the parameter before this step.
    let mut flipped: Vec<bool> = vec![false; vars.len()];
    let mut prev: Vec<Vec<f32>> = vars
        .iter()
        .map(|(key, _)| to_vec(get(&tensors, &format!("{key}.init"))?))
        .collect::<Res<_>>()?;
    let mut worst = 0f64;
    for t in 1..=steps {
        let mut grads = GradStore::default();
        for (i, (key, var)) in vars.iter().enumerate() {
            let g = if closed {
                let m = to_vec(var.as_tensor())?;
                let g = closed_grad(&terms[key], &m, &shapes[i], &tensors, key)?;
                Tensor::from_vec(g, shapes[i].as_slice(), device)?
            } else {
                get(&tensors, &format!("{key}.grad.{t}"))?.to_device(device)?
            };
            grads.insert(var.as_tensor(), g);
        }
        opt.step(&grads)?;
        if let Some(spec) = &q8_spec {
            for (i, (key, _)) in vars.iter().enumerate() {
                let state = opt
                    .param_state(key)
                    .ok_or(format!("no optimizer state for {key}"))?;
                let (flips, err) = spec.compare(&state, key, t, &tensors)?;
                if err > 1.0 {
                    return Ok(failed(name, t, i, err, "8-bit state".into()));
                }
                worst = worst.max(err);
                flipped[i] |= flips;
            }
        }
        for (i, (key, var)) in vars.iter().enumerate() {
            let x = to_vec(var.as_tensor())?;
            let r = to_vec(get(&tensors, &format!("{key}.step.{t}"))?)?;
            if let (Rule::Elementwise { slack, .. }, Some(spec)) = (&mut rule, &q8_spec) {
                // After a code flip, a fraction of a step per flipped step (README, tolerance 3).
                if flipped[i] {
                    let mu = r
                        .iter()
                        .zip(&prev[i])
                        .map(|(a, b)| (*a as f64 - *b as f64).abs())
                        .fold(0f64, f64::max);
                    slack[i] += spec.flip_slack * mu;
                }
                prev[i] = r.clone();
            }
            // Shapes were checked above; a zip must never compare a prefix.
            if x.len() != r.len() {
                return Err(
                    format!("{key}: {} values, {key}.step.{t} has {}", x.len(), r.len()).into(),
                );
            }
            let err = rule.error(i, t, &x, &r);
            worst = worst.max(err);
            if err > 1.0 {
                return Ok(failed(name, t, i, err, String::new()));
            }
        }
        if restarts.contains(&(t as u64)) {
            opt.reset_state()?;
        }
        if t == 1 && sgd_sai {
            // Raw g-SNR per tensor, and the maximum for max_normalized, fixed at step 1.
            let mut checks = Vec::new();
            for (i, (key, _)) in vars.iter().enumerate() {
                let got = opt
                    .param_state(key)
                    .and_then(|s| scalar(&s.scalars, "gsnr"));
                let want = get(&tensors, &format!("{key}.gsnr"))?.to_scalar::<f32>()?;
                checks.push((i, "g-SNR", got, want as f64));
            }
            if max_normalized {
                let got = scalar(&opt.global_scalars(), "gsnr_max");
                let want = get(&tensors, "gsnr_max")?.to_scalar::<f32>()?;
                checks.push((0, "g-SNR maximum", got, want as f64));
            }
            for (param, what, got, want) in checks {
                let got = got.ok_or(format!("no {what} reported"))?;
                let err = if got == want {
                    0.0
                } else {
                    (got - want).abs() / (gsnr_rtol * want.abs())
                };
                if err.is_nan() || err > 1.0 {
                    return Ok((
                        name,
                        Outcome::Failed {
                            step: 1,
                            param,
                            err,
                            what: what.into(),
                        },
                        Vec::new(),
                    ));
                }
                worst = worst.max(err);
            }
        }
    }
    let state = vars
        .iter()
        .map(|(key, _)| {
            let s = opt
                .param_state(key)
                .ok_or(format!("no optimizer state for {key}"))?;
            s.slots
                .iter()
                .map(|(_, t)| to_vec(&t.to_f32()?))
                .collect::<Res<Vec<_>>>()
        })
        .collect::<Res<State>>()?;
    Ok((name, Outcome::Passed(worst), state))
}

/// What a `blockwise8` trace says about its 8-bit state (README "Family blockwise8").
struct Q8Spec {
    /// Keys of the parameters with 8-bit state.
    quantized: BTreeSet<String>,
    /// Per stored slot j: its name and whether it uses the signed map.
    slots: Vec<(String, bool)>,
    min_8bit_size: usize,
    absmax_rtol: f64,
    code_flip_frac: f64,
    code_max_level_diff: u32,
    flip_slack: f64,
    /// Whether the reference is bitsandbytes itself (its constructor arguments).
    bnb: bool,
}

impl Q8Spec {
    fn read(meta: &Value) -> Res<Self> {
        let b = &meta["blockwise8"];
        if meta["state_format"] != "blockwise8" {
            return Err("a blockwise8 trace without state_format \"blockwise8\"".into());
        }
        if usize_field(&b["blocksize"], "blockwise8.blocksize")? != 256 {
            return Err("blockwise8.blocksize is not 256".into());
        }
        let min_8bit_size = usize_field(&b["min_8bit_size"], "blockwise8.min_8bit_size")?;
        if meta["hyperparameters"]["min_8bit_size"].as_u64() != Some(min_8bit_size as u64) {
            return Err(
                "hyperparameters.min_8bit_size differs from blockwise8.min_8bit_size".into(),
            );
        }
        let quantized: BTreeSet<String> = b["quantized_params"]
            .as_array()
            .ok_or("no blockwise8.quantized_params")?
            .iter()
            .map(|v| str_field(v, "quantized_params[i]").map(str::to_string))
            .collect::<Res<_>>()?;
        let mut slots = Vec::new();
        for (j, s) in b["slots"]
            .as_array()
            .ok_or("no blockwise8.slots")?
            .iter()
            .enumerate()
        {
            if usize_field(&s["state"], "slots[j].state")? != j {
                return Err("blockwise8.slots are not numbered 0..".into());
            }
            let signed = match str_field(&s["map"], "slots[j].map")? {
                "signed" => true,
                "unsigned" => false,
                other => return Err(format!("unknown map {other:?}").into()),
            };
            slots.push((str_field(&s["name"], "slots[j].name")?.to_string(), signed));
        }
        let bnb = match str_field(&b["reference_kind"], "blockwise8.reference_kind")? {
            "bitsandbytes" => true,
            "official_fp32_with_requantization" => false,
            other => return Err(format!("unknown reference_kind {other:?}").into()),
        };
        let tol = &meta["tolerance"];
        let spec = Q8Spec {
            quantized,
            slots,
            min_8bit_size,
            absmax_rtol: f64_field(&tol["absmax_rtol"], "tolerance.absmax_rtol")?,
            code_flip_frac: f64_field(&tol["code_flip_frac"], "tolerance.code_flip_frac")?,
            code_max_level_diff: usize_field(
                &tol["code_max_level_diff"],
                "tolerance.code_max_level_diff",
            )? as u32,
            flip_slack: f64_field(&tol["flip_slack"], "tolerance.flip_slack")?,
            bnb,
        };
        let in_range = spec.absmax_rtol > 0.0
            && spec.absmax_rtol < 1e-3
            && (0.0..0.01).contains(&spec.code_flip_frac)
            && spec.code_max_level_diff <= 1
            && (0.0..=16.0).contains(&spec.flip_slack);
        if !in_range {
            return Err("8-bit tolerance out of range".into());
        }
        // The quantized set must be what the threshold gives.
        for (i, p) in meta["params"]
            .as_array()
            .ok_or("no params")?
            .iter()
            .enumerate()
        {
            let numel: usize = p["shape"]
                .as_array()
                .ok_or("params[i]: no shape")?
                .iter()
                .map(|d| usize_field(d, "params[i].shape"))
                .product::<Res<usize>>()?;
            if (numel >= min_8bit_size) != spec.quantized.contains(&format!("p{i}")) {
                return Err(format!(
                    "p{i} ({numel} elements): quantized_params contradicts min_8bit_size"
                )
                .into());
            }
        }
        Ok(spec)
    }

    /// The hyperparameters for `build_json`: the trace's, with this crate's `state_format`;
    /// bitsandbytes' arguments that do not change the math (`args` unset, `is_paged` false,
    /// `optim_bits`: its 8-bit classes are 8-bit whatever it says) dropped.
    fn hyperparameters(&self, hp: &Value) -> Res<Value> {
        let mut hp = hp.clone();
        let o = hp
            .as_object_mut()
            .ok_or("`hyperparameters` is not an object")?;
        if self.bnb {
            if o.remove("args").is_some_and(|v| !v.is_null()) {
                return Err("bitsandbytes `args` is set".into());
            }
            if o.remove("is_paged")
                .is_some_and(|v| v != Value::Bool(false))
            {
                return Err("bitsandbytes `is_paged` is not false".into());
            }
            o.remove("optim_bits");
        }
        o.insert("state_format".into(), Value::from("blockwise8"));
        Ok(hp)
    }

    /// Compares parameter `key`'s state after step `t` with the trace: whether any code
    /// differed, and the worst error as a fraction of the tolerance (codes, absmax).
    fn compare(
        &self,
        state: &candle_optim::ParamState,
        key: &str,
        t: usize,
        tensors: &HashMap<String, Tensor>,
    ) -> Res<(bool, f64)> {
        use candle_optim::StateTensor;
        let quantized = self.quantized.contains(key);
        let ours_q8 = state
            .slots
            .iter()
            .filter(|(_, s)| matches!(s, StateTensor::Blockwise8 { .. }))
            .count();
        if !quantized {
            return if ours_q8 == 0 {
                Ok((false, 0.0))
            } else {
                Err(format!("{key}: 8-bit state where the reference kept float32").into())
            };
        }
        if ours_q8 != state.slots.len() || state.slots.len() != self.slots.len() {
            return Err(format!(
                "{key}: {} slots ({ours_q8} 8-bit), the trace stores {} 8-bit slots",
                state.slots.len(),
                self.slots.len()
            )
            .into());
        }
        let (mut flipped, mut worst) = (false, 0f64);
        for (j, (name, signed)) in self.slots.iter().enumerate() {
            // q8 traces name the slots as the reference does; bitsandbytes' are state1, state2.
            let ours = state
                .slots
                .iter()
                .find(|(n, _)| n == name)
                .or_else(|| state.slots.get(j))
                .map(|(_, s)| s)
                .ok_or(format!("{key}: no slot {j}"))?;
            let StateTensor::Blockwise8 {
                codes,
                absmax,
                signed: our_signed,
            } = ours
            else {
                return Err(format!("{key}: slot {j} is not 8-bit").into());
            };
            if our_signed != signed {
                return Err(format!("{key}: slot {j} ({name}) uses the other map").into());
            }
            let c = codes.flatten_all()?.to_vec1::<u8>()?;
            let rc = get(tensors, &format!("{key}.state{j}.codes.{t}"))?
                .flatten_all()?
                .to_vec1::<u8>()?;
            if c.len() != rc.len() {
                return Err(format!("{key}: {} codes, the trace {}", c.len(), rc.len()).into());
            }
            let mut differ = 0usize;
            for (a, b) in c.iter().zip(&rc) {
                if a != b {
                    differ += 1;
                    if (*a as i32 - *b as i32).unsigned_abs() > self.code_max_level_diff {
                        return Ok((true, f64::INFINITY));
                    }
                }
            }
            flipped |= differ > 0;
            let frac = differ as f64 / c.len().max(1) as f64;
            if differ > 0 {
                worst = worst.max(frac / self.code_flip_frac);
            }
            let a = absmax.to_vec1::<f32>()?;
            let ra = to_vec(get(tensors, &format!("{key}.state{j}.absmax.{t}"))?)?;
            if a.len() != ra.len() {
                return Err(
                    format!("{key}: {} absmax values, the trace {}", a.len(), ra.len()).into(),
                );
            }
            for (x, r) in a.iter().zip(&ra) {
                let err = if *r == 0.0 {
                    if *x == 0.0 {
                        0.0
                    } else {
                        f64::INFINITY
                    }
                } else {
                    (*x as f64 - *r as f64).abs() / (self.absmax_rtol * *r as f64)
                };
                worst = worst.max(if err.is_nan() { f64::INFINITY } else { err });
            }
        }
        Ok((flipped, worst))
    }
}

/// A failed case's outcome.
fn failed(
    name: String,
    step: usize,
    param: usize,
    err: f64,
    what: String,
) -> (String, Outcome, State) {
    (
        name,
        Outcome::Failed {
            step,
            param,
            err,
            what,
        },
        Vec::new(),
    )
}
