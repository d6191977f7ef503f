//! The GPU check (issue: fused CUDA kernels): on a machine with an NVIDIA GPU, replays every
//! golden trace on CUDA (same tolerances; each case's final optimizer state is also compared
//! with the CPU path's), then benchmarks every optimizer's step on the GPT-2-small (124.4M)
//! and GPT-2-XL (1.56B) parameter shapes: ms/step, GB/s from the bytes the step must move, %
//! of a device-to-device copy measured in the same run, and — with `--torch PYTHON` —
//! `torch.optim.AdamW(fused=True)` on the same shapes through that python.
//!
//! Build it on a machine without a GPU with `scripts/pack_gpu_check.sh` (a folder of at most
//! 64 MiB), copy the folder over and run `./run.sh` there. Directly:
//!
//! ```text
//! cargo run --release --features cuda --example gpu_check -- --out results/
//! ```

#[path = "../tests/replay/mod.rs"]
mod replay;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{Algo, NonFinitePolicy};
use clap::Parser;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Conformance and bandwidth of candle-optim's CUDA kernels")]
struct Args {
    /// Trace directory (default: the repository's tests/data/conformance, or ./traces).
    #[arg(long)]
    traces: Option<PathBuf>,
    /// Where results.json and results.md go.
    #[arg(long, default_value = "gpu-results")]
    out: PathBuf,
    /// Timed steps per optimizer (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Parameter sets: gpt2 (124.4M) and/or xl (GPT-2-XL, 1.56B).
    #[arg(long, default_value = "gpt2,xl", value_delimiter = ',')]
    sets: Vec<String>,
    /// Also run scripts/bench_torch.py --device cuda with this python.
    #[arg(long)]
    torch: Option<String>,
    /// Path of bench_torch.py (default: scripts/bench_torch.py next to the repository or ./).
    #[arg(long)]
    torch_script: Option<PathBuf>,
    /// Skip the conformance replay.
    #[arg(long)]
    skip_conformance: bool,
    /// Skip the benchmark.
    #[arg(long)]
    skip_bench: bool,
}

#[derive(Serialize, Debug, Clone)]
struct Row {
    set: String,
    name: String,
    ms_median: f64,
    ms_min: f64,
    bytes: usize,
    gbps: f64,
    pct_copy: f64,
}

/// GPT-2 shapes: vocab 50257, context 1024, `layers` blocks of width `d`.
fn gpt2_shapes(layers: usize, d: usize) -> Vec<Vec<usize>> {
    let mut s = vec![vec![50257, d], vec![1024, d]];
    for _ in 0..layers {
        s.extend([
            vec![d],
            vec![d],
            vec![d, 3 * d],
            vec![3 * d],
            vec![d, d],
            vec![d],
        ]);
        s.extend([
            vec![d],
            vec![d],
            vec![d, 4 * d],
            vec![4 * d],
            vec![4 * d, d],
            vec![d],
        ]);
    }
    s.extend([vec![d], vec![d]]);
    s
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time_ms(
    dev: &Device,
    steps: usize,
    mut f: impl FnMut() -> candle_optim::Result<()>,
) -> candle_optim::Result<Vec<f64>> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(out)
}

fn main() {
    let args = Args::parse();
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("gpu_check: no CUDA device ({e}). Build with --features cuda and run on a GPU machine.");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&args.out).expect("output directory");
    let mut report = serde_json::json!({});
    let mut md = String::from("# candle-optim GPU check\n\n");
    let mut ok = true;

    if !args.skip_conformance {
        let dir = args.traces.clone().unwrap_or_else(|| {
            let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance");
            if repo.exists() {
                repo
            } else {
                PathBuf::from("traces")
            }
        });
        let files = replay::list_traces(&[dir]).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1);
        });
        println!("== conformance on CUDA ({} traces)", files.len());
        let (p, f, s, gpu_states) = replay::run_all(&files, &dev, true);
        let line = format!("conformance (cuda): {p} passed, {f} failed, {s} skipped");
        println!("{line}");
        let (_, _, _, cpu_states) = replay::run_all(&files, &Device::Cpu, false);
        // Final state, CUDA vs CPU: |a − b| ≤ 1e-5·(|b| + max|b|) elementwise.
        let mut worst = 0f64;
        for ((name, g), (_, c)) in gpu_states.iter().zip(&cpu_states) {
            for (gp, cp) in g.iter().zip(c) {
                for (gs, cs) in gp.iter().zip(cp) {
                    let scale = cs.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
                    for (a, b) in gs.iter().zip(cs) {
                        let e = (*a as f64 - *b as f64).abs()
                            / (1e-5 * ((*b as f64).abs() + scale) + 1e-30);
                        if e.is_nan() || e > 1.0 {
                            println!("state of {name} differs between CUDA and CPU ({a} vs {b})");
                            ok = false;
                        }
                        worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
                    }
                }
            }
        }
        let sline = format!("state CUDA vs CPU: worst {worst:.3} of 1e-5 relative");
        println!("{sline}");
        ok &= f == 0;
        md += &format!("{line}\n\n{sline}\n\n");
        report["conformance"] =
            serde_json::json!({"passed": p, "failed": f, "skipped": s, "state_worst": worst});
    }

    if !args.skip_bench {
        let mut rows = Vec::new();
        for set in &args.sets {
            let shapes = match set.as_str() {
                "gpt2" => gpt2_shapes(12, 768),
                "xl" => gpt2_shapes(48, 1600),
                other => {
                    eprintln!("unknown set {other}");
                    std::process::exit(1);
                }
            };
            let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
            println!("\n== bench {set}: {n} parameters");
            match bench_set(&dev, set, &shapes, args.steps) {
                Ok(mut r) => {
                    if let Some(py) = &args.torch {
                        match torch_rows(py, args.torch_script.as_ref(), set, args.steps) {
                            Ok(t) => r.extend(t),
                            Err(e) => eprintln!("torch comparison skipped: {e}"),
                        }
                    }
                    let copy = r
                        .iter()
                        .find(|x| x.name == "device_copy")
                        .map_or(f64::NAN, |x| x.gbps);
                    for x in &mut r {
                        x.pct_copy = 100.0 * x.gbps / copy;
                    }
                    rows.extend(r);
                }
                Err(e) => {
                    eprintln!("bench {set} failed: {e}");
                    ok = false;
                }
            }
        }
        md += "| set | step | ms (median) | ms (min) | GB/s | % of copy |\n|---|---|---|---|---|---|\n";
        for r in &rows {
            println!(
                "{:<5} {:<26} {:>9.3} ms {:>9.3} ms {:>8.1} GB/s {:>6.1}% of copy",
                r.set, r.name, r.ms_median, r.ms_min, r.gbps, r.pct_copy
            );
            md += &format!(
                "| {} | {} | {:.3} | {:.3} | {:.1} | {:.1}% |\n",
                r.set, r.name, r.ms_median, r.ms_min, r.gbps, r.pct_copy
            );
        }
        for set in &args.sets {
            let get = |n: &str| {
                rows.iter()
                    .find(|r| &r.set == set && r.name == n)
                    .map(|r| r.ms_median)
            };
            if let (Some(a), Some(t)) = (get("adamw_fused"), get("torch_adamw_fused")) {
                let line = format!(
                    "{set}: AdamW is {:.2}x the speed of torch fused AdamW",
                    t / a
                );
                println!("{line}");
                md += &format!("\n{line}\n");
            }
        }
        report["bench"] = serde_json::to_value(&rows).unwrap();
    }
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("write");
    std::fs::write(args.out.join("results.md"), md).expect("write");
    println!("\nwrote {}", args.out.join("results.md").display());
    std::process::exit(if ok { 0 } else { 1 });
}

fn bench_set(
    dev: &Device,
    set: &str,
    shapes: &[Vec<usize>],
    steps: usize,
) -> candle_optim::Result<Vec<Row>> {
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut grads = GradStore::default();
    let mut vars = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let v = Var::from_tensor(&Tensor::randn(0f32, 0.02, s.as_slice(), dev)?)?;
        grads.insert(v.as_tensor(), Tensor::randn(0f32, 1e-3, s.as_slice(), dev)?);
        vars.push((format!("p{i}"), v));
    }
    let mut rows = Vec::new();
    let mut push = |name: &str, mut ms: Vec<f64>, bytes: usize| {
        let min = ms.iter().cloned().fold(f64::INFINITY, f64::min);
        let med = median(&mut ms);
        rows.push(Row {
            set: set.into(),
            name: name.into(),
            ms_median: med,
            ms_min: min,
            bytes,
            gbps: bytes as f64 / (med * 1e-3) / 1e9,
            pct_copy: 0.0,
        });
    };
    // A device-to-device copy of a buffer as large as the parameters (reads + writes 8 B/elem).
    let src = Tensor::zeros(n, DType::F32, dev)?;
    let ms = time_ms(dev, steps, || {
        let _ = src.copy()?;
        Ok(())
    })?;
    push("device_copy", ms, 8 * n);
    for &algo in Algo::ALL {
        let mut opt = algo.build_json(
            vars.clone(),
            &serde_json::json!({"lr": 1e-4, "weight_decay": 0.01}),
        )?;
        opt.set_non_finite_policy(NonFinitePolicy::Propagate);
        let bytes = opt.step_traffic_bytes();
        let ms = time_ms(dev, steps, || opt.step(&grads).map(|_| ()))?;
        push(&format!("{}_fused", algo.name()), ms, bytes);
        if algo == Algo::AdamW {
            opt.set_non_finite_policy(NonFinitePolicy::SkipStep);
            let ms = time_ms(dev, steps, || opt.step(&grads).map(|_| ()))?;
            push("adamw_fused_skipstep", ms, bytes);
        }
    }
    Ok(rows)
}

fn torch_rows(
    py: &str,
    script: Option<&PathBuf>,
    set: &str,
    steps: usize,
) -> Result<Vec<Row>, String> {
    let script = script.cloned().unwrap_or_else(|| {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_torch.py");
        if repo.exists() {
            repo
        } else {
            PathBuf::from("bench_torch.py")
        }
    });
    let out = std::process::Command::new(py)
        .arg(&script)
        .args([
            "--device",
            "cuda",
            "--set",
            set,
            "--steps",
            &steps.to_string(),
        ])
        .output()
        .map_err(|e| format!("{py}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("failed")
            .to_string());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(v.as_array()
        .ok_or("bad output")?
        .iter()
        .map(|r| {
            let mut ms: Vec<f64> = r["ms"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            let min = ms.iter().cloned().fold(f64::INFINITY, f64::min);
            let med = median(&mut ms);
            let bytes = r["bytes"].as_u64().unwrap_or(0) as usize;
            Row {
                set: set.into(),
                name: r["name"].as_str().unwrap_or("?").into(),
                ms_median: med,
                ms_min: min,
                bytes,
                gbps: bytes as f64 / (med * 1e-3) / 1e9,
                pct_copy: 0.0,
            }
        })
        .collect())
}
