//! Side-by-side step benchmark, in one process and one run: a STREAM-style copy and triad,
//! every optimizer's fused step, and `candle_nn::optim::AdamW`, on the GPT-2-small parameter
//! shapes (124.4M f32) and on a 10M-parameter set, with 1 and 2 threads.
//!
//! ```text
//! cargo run --release --example bench -- [--sets gpt2,10m] [--threads 1,2] [--steps 10]
//!     [--json bench.json] [--torch [PYTHON]] [--skip-candle-nn]
//! ```
//!
//! Effective GB/s is the bytes each step must move (`Optimizer::step_traffic_bytes`: params,
//! grads and state, read and written) over the median time; "% triad" compares it with the
//! triad measured in the same run with the same threads. With `--torch`, `scripts/bench_torch.py`
//! runs `torch.optim.AdamW` (fused, foreach, for-loop) and `torch.optim.SGD(momentum=0.9)` on
//! the same shapes and threads in its own process, its blocks of steps interleaved with ours in
//! every round (after ours in even rounds, before them in odd ones), and its rows join the
//! table.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_optim::backend::simd;
use candle_optim::{Algo, NonFinitePolicy};
use clap::Parser;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Optimizer step benchmark (CPU), side by side")]
struct Args {
    /// Parameter sets: gpt2 (GPT-2 small, 124.4M) and/or 10m.
    #[arg(long, default_value = "gpt2,10m", value_delimiter = ',')]
    sets: Vec<String>,
    /// Thread counts.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    threads: Vec<usize>,
    /// Timed steps per measurement (in rounds of `--block`).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Consecutive timed steps per measurement and round (after one untimed step).
    #[arg(long, default_value_t = 5)]
    block: usize,
    /// Optimizers to run (default: all seven).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<String>,
    /// Also run scripts/bench_torch.py with this python (default: python3).
    #[arg(long, num_args = 0..=1, default_missing_value = "python3")]
    torch: Option<String>,
    /// Leave out candle-nn's AdamW (slow: seconds per step on GPT-2 small).
    #[arg(long)]
    skip_candle_nn: bool,
    /// Cap the SIMD level of the element loops: base, avx2 or avx512 (default: the CPU's best).
    #[arg(long)]
    simd: Option<String>,
}

/// Resident-set high-water mark growth over one call of `f` (Linux: resets the mark through
/// /proc/self/clear_refs and reads VmHWM), in bytes; None where that is not available.
fn peak_extra_rss(f: impl FnOnce()) -> Option<u64> {
    let read = |key: &str| -> Option<u64> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = s.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    let before = read("VmRSS:")?;
    f();
    Some(read("VmHWM:")?.saturating_sub(before))
}

#[derive(Serialize, Clone, Debug)]
struct Row {
    set: String,
    threads: usize,
    name: String,
    ms_median: f64,
    ms_min: f64,
    ms_max: f64,
    bytes: usize,
    gbps: f64,
    pct_triad: f64,
    speedup_vs_candle_nn: Option<f64>,
    /// Peak resident memory added during one step, as % of the parameters' bytes.
    peak_extra_pct: Option<f64>,
}

/// GPT-2 small: 124,439,808 parameters.
fn gpt2_small() -> Vec<(String, Vec<usize>)> {
    let mut s = vec![
        ("wte".into(), vec![50257, 768]),
        ("wpe".into(), vec![1024, 768]),
    ];
    for l in 0..12 {
        for (n, sh) in [
            ("ln_1.weight", vec![768]),
            ("ln_1.bias", vec![768]),
            ("attn.c_attn.weight", vec![768, 2304]),
            ("attn.c_attn.bias", vec![2304]),
            ("attn.c_proj.weight", vec![768, 768]),
            ("attn.c_proj.bias", vec![768]),
            ("ln_2.weight", vec![768]),
            ("ln_2.bias", vec![768]),
            ("mlp.c_fc.weight", vec![768, 3072]),
            ("mlp.c_fc.bias", vec![3072]),
            ("mlp.c_proj.weight", vec![3072, 768]),
            ("mlp.c_proj.bias", vec![768]),
        ] {
            s.push((format!("h.{l}.{n}"), sh));
        }
    }
    s.push(("ln_f.weight".into(), vec![768]));
    s.push(("ln_f.bias".into(), vec![768]));
    s
}

/// A 10,010,624-parameter GPT-style set (vocab 20000, width 256, 6 blocks).
fn ten_m() -> Vec<(String, Vec<usize>)> {
    let mut s = vec![
        ("wte".into(), vec![20000, 256]),
        ("wpe".into(), vec![512, 256]),
    ];
    for l in 0..6 {
        for (n, sh) in [
            ("ln_1.weight", vec![256]),
            ("ln_1.bias", vec![256]),
            ("attn.c_attn.weight", vec![256, 768]),
            ("attn.c_attn.bias", vec![768]),
            ("attn.c_proj.weight", vec![256, 256]),
            ("attn.c_proj.bias", vec![256]),
            ("ln_2.weight", vec![256]),
            ("ln_2.bias", vec![256]),
            ("mlp.c_fc.weight", vec![256, 1024]),
            ("mlp.c_fc.bias", vec![1024]),
            ("mlp.c_proj.weight", vec![1024, 256]),
            ("mlp.c_proj.bias", vec![256]),
        ] {
            s.push((format!("h.{l}.{n}"), sh));
        }
    }
    s
}

fn stats(ms: &[f64]) -> (f64, f64, f64) {
    let min = ms.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = ms.iter().cloned().fold(0.0, f64::max);
    (common::median(ms), min, max)
}

struct Triad<'a> {
    a: &'a mut [f32],
    b: &'a [f32],
    c: &'a [f32],
    s: f32,
}

impl simd::Task for Triad<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        for ((a, b), c) in self.a.iter_mut().zip(self.b).zip(self.c) {
            *a = b + self.s * c;
        }
    }
}

struct Copy<'a> {
    a: &'a mut [f32],
    b: &'a [f32],
}

impl simd::Task for Copy<'_> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        self.a.copy_from_slice(self.b);
    }
}

const CHUNK: usize = 1 << 18;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let algos: Vec<Algo> = if args.only.is_empty() {
        Algo::ALL.to_vec()
    } else {
        args.only
            .iter()
            .map(|n| Algo::from_name(n).ok_or(format!("unknown optimizer {n}")))
            .collect::<Result<_, _>>()?
    };
    match args.simd.as_deref() {
        None => {}
        Some("base") => simd::force_level(Some(simd::SimdLevel::Base)),
        Some("avx2") => simd::force_level(Some(simd::SimdLevel::Avx2)),
        Some("avx512") => simd::force_level(Some(simd::SimdLevel::Avx512)),
        Some(other) => return Err(format!("unknown --simd {other}").into()),
    }
    println!(
        "SIMD level: {:?}; cores: {}",
        simd::level(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows: Vec<Row> = Vec::new();
    for set in &args.sets {
        let shapes = match set.as_str() {
            "gpt2" => gpt2_small(),
            "10m" => ten_m(),
            other => return Err(format!("unknown set {other}").into()),
        };
        let n: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        println!(
            "\n== set {set}: {} tensors, {n} parameters ==",
            shapes.len()
        );
        let dev = Device::Cpu;
        let mut grads = GradStore::default();
        let vars: Vec<(String, Var)> = shapes
            .iter()
            .map(|(name, s)| {
                let v = Var::from_tensor(&Tensor::randn(0f32, 0.02, s.as_slice(), &dev).unwrap())
                    .unwrap();
                grads.insert(
                    v.as_tensor(),
                    Tensor::randn(0f32, 1e-3, s.as_slice(), &dev).unwrap(),
                );
                (name.clone(), v)
            })
            .collect();
        // Every measurement of one thread count runs round-robin (one step of each per
        // round), so slow drifts of a shared machine hit all of them alike and the ratios hold.
        let mut opts: Vec<(String, Box<dyn candle_optim::Optimizer>)> = Vec::new();
        for &algo in &algos {
            let hyper = serde_json::json!({"lr": 1e-4, "weight_decay": 0.01});
            let mut opt = algo.build_json(vars.clone(), &hyper)?;
            opt.set_non_finite_policy(NonFinitePolicy::Propagate);
            opts.push((format!("{}_fused", algo.name()), opt));
            if algo == Algo::AdamW {
                // The default policy (SkipStep) reads every gradient once more first.
                let mut opt = algo.build_json(vars.clone(), &hyper)?;
                opt.set_non_finite_policy(NonFinitePolicy::SkipStep);
                opts.push(("adamw_fused_skipstep".into(), opt));
            }
        }
        let mut cn = if args.skip_candle_nn {
            None
        } else {
            use candle_nn::optim::Optimizer as _;
            let vs: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            Some(candle_nn::optim::AdamW::new(
                vs,
                candle_nn::optim::ParamsAdamW {
                    lr: 1e-4,
                    ..Default::default()
                },
            )?)
        };
        let b = vec![1.0f32; n];
        let c = vec![2.0f32; n];
        let mut a = vec![0.0f32; n];
        for &threads in &args.threads {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            // names, bytes and per-round times
            let mut names: Vec<(String, usize)> = vec![
                ("stream_copy".into(), 8 * n),
                ("stream_triad".into(), 12 * n),
            ];
            names.extend(
                opts.iter()
                    .map(|(name, o)| (name.clone(), o.step_traffic_bytes())),
            );
            if cn.is_some() {
                names.push(("candle_nn_adamw".into(), 28 * n));
            }
            let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
            // torch, in its own process, answers blocks of steps between ours (same moments).
            let mut torch = match &args.torch {
                Some(py) => match TorchServer::start(py, set, threads) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        eprintln!("torch comparison skipped: {e}");
                        None
                    }
                },
                None => None,
            };
            let mut torch_times: Vec<Vec<f64>> =
                vec![Vec::new(); torch.as_ref().map_or(0, |t| t.names.len())];
            pool.install(|| {
                // Rounds of blocks: each measurement runs one untimed step and then `block`
                // timed ones back to back (warm caches and page tables, as a training loop
                // sees them), and the rounds rotate through all of them.
                let block = args.block.max(1);
                let rounds = args.steps.div_ceil(block);
                for round in 0..rounds {
                    // torch's blocks go last in even rounds and first in odd ones, so neither
                    // side always follows the same neighbour.
                    let mut torch_blocks = |torch: &mut Option<TorchServer>| {
                        if let Some(t) = torch {
                            for (k, ms) in torch_times.iter_mut().enumerate() {
                                match t.block(k, block) {
                                    Ok(v) => ms.extend(v),
                                    Err(e) => eprintln!("torch: {e}"),
                                }
                            }
                        }
                    };
                    if round % 2 == 1 {
                        torch_blocks(&mut torch);
                    }
                    let mut run = |k: usize, f: &mut dyn FnMut()| {
                        f();
                        for _ in 0..block {
                            let t = Instant::now();
                            f();
                            times[k].push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    };
                    run(0, &mut || {
                        a.par_chunks_mut(CHUNK)
                            .zip(b.par_chunks(CHUNK))
                            .for_each(|(a, b)| simd::run(Copy { a, b }))
                    });
                    run(1, &mut || {
                        a.par_chunks_mut(CHUNK)
                            .zip(b.par_chunks(CHUNK))
                            .zip(c.par_chunks(CHUNK))
                            .for_each(|((a, b), c)| simd::run(Triad { a, b, c, s: 3.0 }))
                    });
                    for (k, (_, opt)) in opts.iter_mut().enumerate() {
                        run(2 + k, &mut || {
                            opt.step(&grads).unwrap();
                        });
                    }
                    if let Some(cn) = &mut cn {
                        use candle_nn::optim::Optimizer as _;
                        run(2 + opts.len(), &mut || cn.step(&grads).unwrap());
                    }
                    if round % 2 == 0 {
                        torch_blocks(&mut torch);
                    }
                }
            });
            let mut local: Vec<Row> = Vec::new();
            let mut push = |name: String, ms: Vec<f64>, bytes: usize| {
                let (med, min, max) = stats(&ms);
                local.push(Row {
                    set: set.clone(),
                    threads,
                    name,
                    ms_median: med,
                    ms_min: min,
                    ms_max: max,
                    bytes,
                    gbps: bytes as f64 / (med * 1e-3) / 1e9,
                    pct_triad: 0.0,
                    speedup_vs_candle_nn: None,
                    peak_extra_pct: None,
                });
            };
            for ((name, bytes), ms) in names.into_iter().zip(times) {
                push(name, ms, bytes);
            }
            if let Some(t) = &torch {
                for ((name, bytes), ms) in t.names.iter().zip(&t.bytes).zip(torch_times) {
                    push(name.clone(), ms, *bytes);
                }
            }
            drop(torch);
            // Peak extra memory of one step of each optimizer (after the timed rounds, so the
            // state exists): the step allocates nothing proportional to the model.
            for (name, opt) in opts.iter_mut() {
                let extra = pool.install(|| {
                    peak_extra_rss(|| {
                        opt.step(&grads).unwrap();
                    })
                });
                if let (Some(x), Some(r)) = (extra, local.iter_mut().find(|r| &r.name == name)) {
                    r.peak_extra_pct = Some(100.0 * x as f64 / (4 * n) as f64);
                }
            }
            let triad = local
                .iter()
                .find(|r| r.name == "stream_triad")
                .map_or(f64::NAN, |r| r.gbps);
            let cnn = local
                .iter()
                .find(|r| r.name == "candle_nn_adamw")
                .map(|r| r.ms_median);
            for r in &mut local {
                r.pct_triad = 100.0 * r.gbps / triad;
                r.speedup_vs_candle_nn = cnn.map(|c| c / r.ms_median);
            }
            print_table(&local);
            rows.extend(local);
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        println!("\nwrote {path}");
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    let r0 = &rows[0];
    println!("\nset {} · {} thread(s)", r0.set, r0.threads);
    println!(
        "{:<24} {:>10} {:>19} {:>9} {:>8} {:>10} {:>11}",
        "step", "ms (med)", "spread (min–max)", "GB/s", "% triad", "vs cnn", "peak extra"
    );
    for r in rows {
        println!(
            "{:<24} {:>10.2} {:>9.2} – {:>7.2} {:>9.2} {:>7.1}% {:>10} {:>11}",
            r.name,
            r.ms_median,
            r.ms_min,
            r.ms_max,
            r.gbps,
            r.pct_triad,
            r.speedup_vs_candle_nn
                .map_or("-".into(), |s| format!("{s:.2}x")),
            r.peak_extra_pct.map_or("-".into(), |p| format!("{p:.3}%"))
        );
    }
}

/// `scripts/bench_torch.py --serve` in its own process: the same shapes and threads, one block
/// of steps per request.
struct TorchServer {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    names: Vec<String>,
    bytes: Vec<usize>,
}

impl TorchServer {
    fn start(py: &str, set: &str, threads: usize) -> Result<Self, String> {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_torch.py");
        let mut child = Command::new(py)
            .args([
                script,
                "--serve",
                "--set",
                set,
                "--threads",
                &threads.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{py}: {e}"))?;
        let mut out = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("{py} did not start: {e}"))?;
        let names = v["names"]
            .as_array()
            .ok_or("bad handshake")?
            .iter()
            .map(|n| n.as_str().unwrap_or("?").to_string())
            .collect();
        let bytes = v["bytes"]
            .as_array()
            .ok_or("bad handshake")?
            .iter()
            .map(|b| b.as_u64().unwrap_or(0) as usize)
            .collect();
        Ok(Self {
            child,
            out,
            names,
            bytes,
        })
    }

    /// One untimed and `k` timed steps of torch optimizer `i`; their times in ms.
    fn block(&mut self, i: usize, k: usize) -> Result<Vec<f64>, String> {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().ok_or("no stdin")?;
        writeln!(stdin, "{} {k}", self.names[i]).map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.out.read_line(&mut line).map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // EOF ends the server loop
        let _ = self.child.wait();
    }
}
