//! Replay of the golden traces (format: `tests/data/conformance/README` of the shared spec),
//! shared by `tests/conformance.rs` (CPU) and `examples/gpu_check.rs` (CUDA).
#![allow(dead_code)]

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_optim::Algo;
use serde_json::Value;
use std::collections::HashMap;
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
            .filter_map(|e| e.ok().map(|e| e.path()))
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
    match kind {
        "quadratic" => {
            let a_t = &t[&format!("loss.{key}.A")];
            let k = a_t.dims()[1];
            let a = to_vec(a_t)?;
            let b = to_vec(&t[&format!("loss.{key}.B")])?;
            let mut res = matmul(m, &a, r, c, k);
            for (x, y) in res.iter_mut().zip(&b) {
                *x -= y;
            }
            Ok(matmul(&res, &transpose(&a, c, k), r, k, c))
        }
        "scale_invariant_layer" | "scale_invariant_channel" => {
            let x_t = &t[&format!("loss.{key}.X")];
            let k = x_t.dims()[1];
            let x = to_vec(x_t)?;
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

/// Replays one trace on `device` (gradients computed on the host, uploaded each step).
pub fn run_case(file: &Path, device: &Device) -> Res<(String, Outcome, State)> {
    let bytes = std::fs::read(file)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let meta: Value = serde_json::from_str(
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("case"))
            .ok_or("no `case` metadata")?,
    )?;
    let name = meta["name"].as_str().unwrap_or("?").to_string();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let opt_name = meta["optimizer"].as_str().ok_or("no optimizer")?;
    let Some(algo) = Algo::from_name(opt_name) else {
        return Ok((
            name,
            Outcome::Skipped(format!("optimizer {opt_name} is not implemented")),
            Vec::new(),
        ));
    };
    let steps = meta["steps"].as_u64().ok_or("no steps")? as usize;
    let params = meta["params"].as_array().ok_or("no params")?;
    let tol = &meta["tolerance"];
    let rtol = tol["rtol"].as_f64().ok_or("no rtol")?;
    let gsnr_rtol = tol["gsnr_rtol"].as_f64().unwrap_or(1e-5);
    let scales: Vec<f64> = tol["trajectory_scale"]
        .as_array()
        .ok_or("no trajectory_scale")?
        .iter()
        .map(|v| v.as_f64().unwrap_or(0.0))
        .collect();
    let closed = meta["loop"].as_str() == Some("closed");
    let restarts: Vec<u64> = meta["restart_after_steps"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    let terms: HashMap<String, String> = meta["loop_detail"]["terms"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["param"].as_str().unwrap_or("").to_string(),
                        t["kind"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();

    let mut vars = Vec::new();
    let mut shapes = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let key = p["key"]
            .as_str()
            .map(str::to_string)
            .unwrap_or(format!("p{i}"));
        let init = &tensors[&format!("{key}.init")];
        shapes.push(init.dims().to_vec());
        vars.push((key, Var::from_tensor(&init.to_device(device)?)?));
    }
    let mut opt = algo.build_json(vars.clone(), &meta["hyperparameters"])?;

    let mut worst = 0f64;
    for t in 1..=steps {
        let mut grads = GradStore::default();
        for (i, (key, var)) in vars.iter().enumerate() {
            let g = if closed {
                let kind = terms.get(key).ok_or("no loss term")?;
                let m = to_vec(var.as_tensor())?;
                let g = closed_grad(kind, &m, &shapes[i], &tensors, key)?;
                Tensor::from_vec(g, shapes[i].as_slice(), device)?
            } else {
                tensors[&format!("{key}.grad.{t}")].to_device(device)?
            };
            grads.insert(var.as_tensor(), g);
        }
        opt.step(&grads)?;
        for (i, (key, var)) in vars.iter().enumerate() {
            let x = to_vec(var.as_tensor())?;
            let r = to_vec(&tensors[&format!("{key}.step.{t}")])?;
            let mut err = 0f64;
            for (a, b) in x.iter().zip(&r) {
                let e = (*a as f64 - *b as f64).abs() / (rtol * ((*b as f64).abs() + scales[i]));
                err = if e.is_nan() {
                    f64::INFINITY
                } else {
                    err.max(e)
                };
            }
            worst = worst.max(err);
            if err > 1.0 {
                return Ok((
                    name,
                    Outcome::Failed {
                        step: t,
                        param: i,
                        err,
                        what: String::new(),
                    },
                    Vec::new(),
                ));
            }
        }
        if restarts.contains(&(t as u64)) {
            opt.reset_state()?;
        }
        if t == 1 && opt_name == "sgd_sai" {
            // Raw g-SNR per tensor, and the maximum for max_normalized, fixed at step 1.
            let mut checks = Vec::new();
            for (i, (key, _)) in vars.iter().enumerate() {
                let got = opt
                    .param_state(key)
                    .and_then(|s| scalar(&s.scalars, "gsnr"));
                checks.push((
                    i,
                    "g-SNR",
                    got,
                    to_vec(&tensors[&format!("{key}.gsnr")])?[0] as f64,
                ));
            }
            if let Some(want) = tensors.get("gsnr_max") {
                let got = scalar(&opt.global_scalars(), "gsnr_max");
                checks.push((0, "g-SNR maximum", got, to_vec(want)?[0] as f64));
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
            opt.param_state(key)
                .map(|s| {
                    s.slots
                        .iter()
                        .map(|(_, t)| to_vec(t))
                        .collect::<Res<Vec<_>>>()
                })
                .unwrap_or_else(|| Ok(Vec::new()))
        })
        .collect::<Res<State>>()?;
    Ok((name, Outcome::Passed(worst), state))
}
