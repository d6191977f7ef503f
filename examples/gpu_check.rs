//! The GPU check (issue: fused CUDA kernels): on a machine with an NVIDIA GPU, replays every
//! golden trace on CUDA (same tolerances, the blockwise8 family included; each case's final
//! optimizer state is also compared with the CPU path's), checks all seven against the CPU on a
//! tensor whose launches are split into several parts, checks the state formats (8-bit
//! blockwise, bf16) and stochastic rounding of bf16 parameters against the CPU (one PASS/FAIL
//! line per optimizer and mode), then benchmarks every optimizer's step on the GPT-2-small (124.4M)
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
use candle_optim::{Algo, NonFinitePolicy, StateTensor, VerdictMode};
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
    /// Timed steps per optimizer and mode (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Optimizers to bench (default: all seven).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
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

/// One benchmarked operation. `ms_median`/`ms_min` are per step with steps enqueued back to
/// back (`--steps` of them, then one synchronize; five such runs): the device's rate, which is
/// what GB/s and % of copy come from. `ms_sync` is the median of single steps each followed
/// by a synchronize (what one step costs end to end, host work and launch latency included);
/// `host_ms` the median host time to enqueue one step.
#[derive(Serialize, Debug, Clone)]
struct Row {
    set: String,
    name: String,
    ms_median: f64,
    ms_min: f64,
    ms_sync: f64,
    host_ms: f64,
    bytes: usize,
    gbps: f64,
    pct_copy: f64,
}

impl Row {
    fn new(set: &str, name: &str, t: Timing, bytes: usize) -> Row {
        Row {
            set: set.into(),
            name: name.into(),
            ms_median: t.tput_median,
            ms_min: t.tput_min,
            ms_sync: t.sync_median,
            host_ms: t.host_median,
            bytes,
            gbps: bytes as f64 / (t.tput_median * 1e-3) / 1e9,
            pct_copy: 0.0,
        }
    }
}

/// Medians (ms) of the three ways a step is timed; see [`Row`].
#[derive(Clone, Copy, Debug)]
struct Timing {
    tput_median: f64,
    tput_min: f64,
    sync_median: f64,
    host_median: f64,
}

impl Timing {
    fn from_samples(mut tput: Vec<f64>, mut sync: Vec<f64>, mut host: Vec<f64>) -> Timing {
        let tput_min = tput.iter().cloned().fold(f64::INFINITY, f64::min);
        Timing {
            tput_median: median(&mut tput),
            tput_min,
            sync_median: median(&mut sync),
            host_median: median(&mut host),
        }
    }
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
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `f` (one step) both ways described at [`Row`].
fn time_step(
    dev: &Device,
    steps: usize,
    mut f: impl FnMut() -> candle_optim::Result<()>,
) -> candle_optim::Result<Timing> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let (mut sync, mut host) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        host.push(t.elapsed().as_secs_f64() * 1e3);
        dev.synchronize()?;
        sync.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut tput = Vec::with_capacity(5);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..steps {
            f()?;
        }
        dev.synchronize()?;
        tput.push(t.elapsed().as_secs_f64() * 1e3 / steps as f64);
    }
    Ok(Timing::from_samples(tput, sync, host))
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
        for (name, g) in &gpu_states {
            let Some((_, c)) = cpu_states.iter().find(|(n, _)| n == name) else {
                println!("state of {name}: the CPU replay has none");
                ok = false;
                continue;
            };
            if g.len() != c.len() || g.iter().zip(c).any(|(gp, cp)| gp.len() != cp.len()) {
                println!("state of {name}: different parameter or slot counts on CUDA and CPU");
                ok = false;
                continue;
            }
            let mut shown = 0;
            for (gp, cp) in g.iter().zip(c) {
                for (gs, cs) in gp.iter().zip(cp) {
                    let w = compare(gs, cs, |a, b| {
                        if shown < 3 {
                            println!("state of {name} differs between CUDA and CPU ({a} vs {b})");
                        }
                        shown += 1;
                    });
                    ok &= w <= 1.0;
                    worst = worst.max(w);
                }
            }
        }
        let sline = format!("state CUDA vs CPU: worst {worst:.3} of 1e-5 relative");
        println!("{sline}");
        ok &= f == 0;
        md += &format!("{line}\n\n{sline}\n\n");
        let (big_ok, bline) = large_launch_check(&dev);
        println!("{bline}");
        ok &= big_ok;
        md += &format!("{bline}\n\n");
        println!("== state formats and stochastic rounding, CUDA vs CPU");
        let (fmt_ok, lines) = formats_check(&dev);
        ok &= fmt_ok;
        for l in &lines {
            md += &format!("{l}\n\n");
        }
        println!("== steps decided on the device vs on the host");
        let (v_ok, lines) = verdict_check(&dev);
        ok &= v_ok;
        for l in &lines {
            md += &format!("{l}\n\n");
        }
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
            match bench_set(&dev, set, &shapes, args.steps, &args.only) {
                Ok((mut r, failed)) => {
                    ok &= failed.is_empty();
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
        md += "Steps enqueued back to back (median and min of 5 runs); `sync`: one step then a \
                synchronize; `host`: time to enqueue one step.\n\n\
                | set | step | ms/step (median) | (min) | GB/s | % of copy | ms sync | ms host |\n\
                |---|---|---|---|---|---|---|---|\n";
        for r in &rows {
            println!(
                "{:<5} {:<26} {:>8.3} ms {:>8.3} ms {:>8.1} GB/s {:>6.1}% of copy  sync {:>7.3} ms  host {:>7.3} ms",
                r.set, r.name, r.ms_median, r.ms_min, r.gbps, r.pct_copy, r.ms_sync, r.host_ms
            );
            md += &format!(
                "| {} | {} | {:.3} | {:.3} | {:.1} | {:.1}% | {:.3} | {:.3} |\n",
                r.set, r.name, r.ms_median, r.ms_min, r.gbps, r.pct_copy, r.ms_sync, r.host_ms
            );
        }
        for set in &args.sets {
            let modes: [(RowTime, &str); 2] = [
                (|r| r.ms_median, ""),
                (|r| r.ms_sync, ", one synchronized step at a time"),
            ];
            for (ms, how) in modes {
                let get = |n: &str| rows.iter().find(|r| &r.set == set && r.name == n).map(ms);
                if let (Some(a), Some(t)) = (get("adamw_fused"), get("torch_adamw_fused")) {
                    let line = format!(
                        "{set}: AdamW is {:.2}x the speed of torch fused AdamW{how}",
                        t / a
                    );
                    println!("{line}");
                    md += &format!("\n{line}\n");
                }
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

/// Which of a row's times a comparison reads.
type RowTime = fn(&Row) -> f64;

/// The worst elementwise error of `got` against `want`, in units of the tolerance
/// |a − b| ≤ 1e-5·(|b| + max|b|) (infinite for NaN); `bad(a, b)` is called for each element
/// out of tolerance.
fn compare(got: &[f32], want: &[f32], mut bad: impl FnMut(f32, f32)) -> f64 {
    // A zip would compare only the common prefix.
    if got.len() != want.len() {
        println!("{} values compared with {}", got.len(), want.len());
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let mut worst = 0f64;
    for (&a, &b) in got.iter().zip(want) {
        let e = (a as f64 - b as f64).abs() / (1e-5 * ((b as f64).abs() + scale) + 1e-30);
        if e.is_nan() || e > 1.0 {
            bad(a, b);
        }
        worst = worst.max(if e.is_nan() { f64::INFINITY } else { e });
    }
    worst
}

/// Every optimizer on a tensor large enough that its launches are split into several parts
/// (more blocks than one block-table upload carries), plus small tensors in the same launches:
/// three steps on CUDA and on the CPU from the same values, then params and state compared
/// as in the conformance replay (|a − b| ≤ 1e-5·(|b| + max|b|)).
fn large_launch_check(dev: &Device) -> (bool, String) {
    // 7000 × 16384 elements: 7000 chunk blocks, 112,000 AdamP row segments (14,000 blocks).
    let shapes: [&[usize]; 3] = [&[7000, 16384], &[300], &[4097, 33]];
    let run = || -> candle_optim::Result<(bool, f64)> {
        let mut cpu = Vec::new();
        let mut gpu = Vec::new();
        let (mut gc, mut gg) = (GradStore::default(), GradStore::default());
        for (i, s) in shapes.iter().enumerate() {
            let p = Tensor::randn(0f32, 0.02, *s, &Device::Cpu)?;
            let g = Tensor::randn(0f32, 1e-3, *s, &Device::Cpu)?;
            let (vc, vg) = (Var::from_tensor(&p)?, Var::from_tensor(&p.to_device(dev)?)?);
            gc.insert(vc.as_tensor(), g.clone());
            gg.insert(vg.as_tensor(), g.to_device(dev)?);
            cpu.push((format!("p{i}"), vc));
            gpu.push((format!("p{i}"), vg));
        }
        let (mut ok, mut worst) = (true, 0f64);
        for &algo in Algo::ALL {
            let mut hyper = serde_json::json!({"lr": 1e-3, "weight_decay": 0.01});
            if algo == Algo::Sgd {
                // Its momentum buffer (torch's default is plain SGD, without one).
                hyper["momentum"] = serde_json::json!(0.9);
                hyper["dampening"] = serde_json::json!(0.1);
            }
            let mut oc = algo.build_json(cpu.clone(), &hyper)?;
            let mut og = algo.build_json(gpu.clone(), &hyper)?;
            for _ in 0..3 {
                oc.step(&gc)?;
                og.step(&gg)?;
            }
            for ((name, vc), (_, vg)) in cpu.iter().zip(&gpu) {
                let sc = oc.param_state(name).expect("state");
                let sg = og.param_state(name).expect("state");
                if sc.slots.len() != sg.slots.len() {
                    println!(
                        "{name}: {} slots on the CPU, {} on CUDA",
                        sc.slots.len(),
                        sg.slots.len()
                    );
                    ok = false;
                }
                let mut pairs = vec![(vc.as_tensor().clone(), vg.as_tensor().clone())];
                for (a, b) in sc.slots.iter().zip(&sg.slots) {
                    pairs.push((a.1.to_f32()?, b.1.to_f32()?));
                }
                for (c, g) in pairs {
                    let c = c.flatten_all()?.to_vec1::<f32>()?;
                    let g = g.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
                    let w = compare(&g, &c, |_, _| {});
                    ok &= w <= 1.0;
                    worst = worst.max(w);
                }
            }
            println!(
                "large launches: {} done (worst so far {worst:.3})",
                algo.name()
            );
        }
        Ok((ok, worst))
    };
    match run() {
        Ok((ok, worst)) => (
            ok,
            format!(
                "large launches (split block tables), every optimizer, CUDA vs CPU: {} (worst {worst:.3} of 1e-5 relative)",
                if ok { "equal" } else { "DIFFER" }
            ),
        ),
        Err(e) => (false, format!("large launches: failed: {e}")),
    }
}

/// One mode of [`formats_check`]: its name, the parameters' dtype and the driver's keys.
struct FormatMode {
    name: &'static str,
    dtype: DType,
    keys: serde_json::Value,
}

/// Differences of one tensor (or slot), CUDA vs CPU: `exact` (bit for bit; NaN matching NaN),
/// `close` (full-precision values within the conformance tolerance 1e-5·(|b| + max|b|)),
/// `near` (one step of the representation apart: one 8-bit code level, one bf16 ulp; for
/// full-precision values within 1e-3·(|b| + max|b|)) and `far` (the rest). A check allows no
/// far value and at most max(1, n/1000) near ones per tensor: a value a rounding boundary
/// apart where the f32 math differs in its last bit, or the code of an element whose state
/// already differed.
#[derive(Default)]
struct Diff {
    n: usize,
    exact: usize,
    close: usize,
    near: usize,
    far: usize,
}

impl Diff {
    fn budget(&self) -> usize {
        (self.n / 1000).max(1)
    }

    fn ok(&self) -> bool {
        self.far == 0 && self.near <= self.budget()
    }

    fn add(&mut self, o: &Diff) {
        self.n += o.n;
        self.exact += o.exact;
        self.close += o.close;
        self.near += o.near;
        self.far += o.far;
    }

    fn mismatched(n: usize) -> Diff {
        Diff {
            n: n.max(1),
            far: n.max(1),
            ..Default::default()
        }
    }

    /// Integers (codes, bf16 bits as ordered integers): one apart is near.
    fn ints(a: &[i64], b: &[i64]) -> Diff {
        if a.len() != b.len() {
            return Diff::mismatched(b.len());
        }
        let mut d = Diff {
            n: b.len(),
            ..Default::default()
        };
        for (x, y) in a.iter().zip(b) {
            match x.abs_diff(*y) {
                0 => d.exact += 1,
                1 => d.near += 1,
                _ => d.far += 1,
            }
        }
        d
    }

    /// Floats, as described at [`Diff`].
    fn floats(a: &[f64], b: &[f64]) -> Diff {
        if a.len() != b.len() {
            return Diff::mismatched(b.len());
        }
        let mut d = Diff {
            n: b.len(),
            ..Default::default()
        };
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (x, y) in a.iter().zip(b) {
            if x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()) {
                d.exact += 1;
                continue;
            }
            let e = (x - y).abs() / (y.abs() + scale + 1e-30);
            if e <= 1e-5 {
                d.close += 1;
            } else if e <= 1e-3 {
                d.near += 1;
            } else {
                d.far += 1; // NaN against a number too
            }
        }
        d
    }

    fn show(&self) -> String {
        format!(
            "{}/{} exact, {} close, {} near, {} far",
            self.exact, self.n, self.close, self.near, self.far
        )
    }
}

/// bf16 bits as integers ordered like the values (adjacent values one apart, ±0 equal, every
/// NaN equal).
fn bf16_ordered(t: &Tensor) -> candle_optim::Result<Vec<i64>> {
    let v = t
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<half::bf16>()?;
    Ok(v.iter()
        .map(|x| {
            let b = i64::from(x.to_bits());
            if b & 0x7FFF > 0x7F80 {
                i64::MIN
            } else if b & 0x8000 != 0 {
                -(b & 0x7FFF)
            } else {
                b
            }
        })
        .collect())
}

fn f64_values(t: &Tensor) -> candle_optim::Result<Vec<f64>> {
    Ok(t.flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?)
}

/// Compares a tensor of values (parameter or dense slot), CUDA (`g`) vs CPU (`c`).
fn diff_values(g: &Tensor, c: &Tensor) -> candle_optim::Result<Diff> {
    if g.dtype() == DType::BF16 {
        Ok(Diff::ints(&bf16_ordered(g)?, &bf16_ordered(c)?))
    } else {
        Ok(Diff::floats(&f64_values(g)?, &f64_values(c)?))
    }
}

/// Compares a slot as stored: 8-bit codes and absmax, or its dense values. Returns (values or
/// codes, absmax) differences.
fn diff_slot(g: &StateTensor, c: &StateTensor) -> candle_optim::Result<(Diff, Diff)> {
    match (g, c) {
        (StateTensor::Dense(a), StateTensor::Dense(b)) if a.dtype() == b.dtype() => {
            Ok((diff_values(a, b)?, Diff::default()))
        }
        (
            StateTensor::Blockwise8 {
                codes: ca,
                absmax: aa,
                signed: sa,
            },
            StateTensor::Blockwise8 {
                codes: cb,
                absmax: ab,
                signed: sb,
            },
        ) if sa == sb => {
            let codes = |t: &Tensor| -> candle_optim::Result<Vec<i64>> {
                Ok(t.flatten_all()?
                    .to_device(&Device::Cpu)?
                    .to_vec1::<u8>()?
                    .into_iter()
                    .map(i64::from)
                    .collect())
            };
            Ok((
                Diff::ints(&codes(ca)?, &codes(cb)?),
                Diff::floats(&f64_values(aa)?, &f64_values(ab)?),
            ))
        }
        _ => Ok((Diff::mismatched(1), Diff::default())),
    }
}

/// Every optimizer that takes state formats (all but Muon, which keeps f32 state), CPU vs CUDA
/// from the same values: three steps (a new gradient each) per mode — 8-bit blockwise state
/// (`min_8bit_size` 256: every tensor but the smallest is 8-bit), bf16 state, bf16 parameters
/// rounded stochastically (f32 state, and 8-bit state), 8-bit state for f64 parameters. The
/// tensors cover a multi-chunk matrix with a partial last quantization block, vectors with
/// partial blocks, a tensor under `min_8bit_size` (f32 state in the same group) and exact
/// blocks; AdamP's matrices take its decode/encode path. Compares the parameters, the 8-bit
/// codes and absmax and the bf16 state ([`Diff`]); one PASS/FAIL line per optimizer and mode.
fn formats_check(dev: &Device) -> (bool, Vec<String>) {
    let shapes: [&[usize]; 5] = [&[4097, 33], &[300], &[100], &[64, 512], &[1000]];
    let modes = [
        FormatMode {
            name: "blockwise8",
            dtype: DType::F32,
            keys: serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
        },
        FormatMode {
            name: "bf16 state",
            dtype: DType::F32,
            keys: serde_json::json!({"state_format": "bf16"}),
        },
        FormatMode {
            name: "bf16 params, stochastic rounding",
            dtype: DType::BF16,
            keys: serde_json::json!({"stochastic_rounding_seed": 1234}),
        },
        FormatMode {
            name: "bf16 params, stochastic rounding, blockwise8",
            dtype: DType::BF16,
            keys: serde_json::json!({
                "state_format": "blockwise8", "min_8bit_size": 256, "stochastic_rounding_seed": 99
            }),
        },
        FormatMode {
            name: "f64 params, blockwise8",
            dtype: DType::F64,
            keys: serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
        },
    ];
    let mut all_ok = true;
    let mut lines = Vec::new();
    for mode in &modes {
        for &algo in Algo::ALL {
            // (Some(passed) or None when skipped, what was seen)
            let run = || -> candle_optim::Result<(Option<bool>, String)> {
                let mut hyper = serde_json::json!({"lr": 1e-3, "weight_decay": 0.01});
                for (k, v) in mode.keys.as_object().expect("keys") {
                    hyper[k] = v.clone();
                }
                let (mut cpu, mut gpu) = (Vec::new(), Vec::new());
                for (i, s) in shapes.iter().enumerate() {
                    let p = Tensor::randn(0f32, 0.02, *s, &Device::Cpu)?.to_dtype(mode.dtype)?;
                    cpu.push((format!("p{i}"), Var::from_tensor(&p)?));
                    gpu.push((format!("p{i}"), Var::from_tensor(&p.to_device(dev)?)?));
                }
                let mut oc = match algo.build_json(cpu.clone(), &hyper) {
                    Ok(o) => o,
                    Err(candle_optim::Error::Unsupported(why)) => return Ok((None, why)),
                    Err(e) => return Err(e),
                };
                let mut og = algo.build_json(gpu.clone(), &hyper)?;
                for _ in 0..3 {
                    let (mut gc, mut gg) = (GradStore::default(), GradStore::default());
                    for ((_, vc), (_, vg)) in cpu.iter().zip(&gpu) {
                        let g = Tensor::randn(0f32, 1e-3, vc.shape(), &Device::Cpu)?
                            .to_dtype(mode.dtype)?;
                        gc.insert(vc.as_tensor(), g.clone());
                        gg.insert(vg.as_tensor(), g.to_device(dev)?);
                    }
                    oc.step(&gc)?;
                    og.step(&gg)?;
                }
                let (mut params, mut state, mut absmax) =
                    (Diff::default(), Diff::default(), Diff::default());
                let mut ok = true;
                let mut q8 = 0;
                for ((name, vc), (_, vg)) in cpu.iter().zip(&gpu) {
                    let d = diff_values(vg.as_tensor(), vc.as_tensor())?;
                    ok &= d.ok();
                    params.add(&d);
                    let sc = oc.param_state(name).expect("state");
                    let sg = og.param_state(name).expect("state");
                    if sc.slots.len() != sg.slots.len() {
                        ok = false;
                    }
                    for ((_, a), (_, b)) in sg.slots.iter().zip(&sc.slots) {
                        q8 += usize::from(matches!(a, StateTensor::Blockwise8 { .. }));
                        let (v, m) = diff_slot(a, b)?;
                        ok &= v.ok() && m.ok();
                        state.add(&v);
                        absmax.add(&m);
                    }
                }
                Ok((
                    Some(ok),
                    format!(
                        "params {}; state {} ({q8} 8-bit slots); absmax {}",
                        params.show(),
                        state.show(),
                        absmax.show()
                    ),
                ))
            };
            let (ok, what) = run().unwrap_or_else(|e| (Some(false), format!("failed: {e}")));
            let verdict = match ok {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "SKIP",
            };
            let line = format!("{verdict} formats [{}] {}: {what}", mode.name, algo.name());
            println!("{line}");
            lines.push(line);
            all_ok &= ok != Some(false);
        }
    }
    (all_ok, lines)
}

fn bench_set(
    dev: &Device,
    set: &str,
    shapes: &[Vec<usize>],
    steps: usize,
    only: &[String],
) -> candle_optim::Result<(Vec<Row>, Vec<&'static str>)> {
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut grads = GradStore::default();
    let mut vars = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let v = Var::from_tensor(&Tensor::randn(0f32, 0.02, s.as_slice(), dev)?)?;
        grads.insert(v.as_tensor(), Tensor::randn(0f32, 1e-3, s.as_slice(), dev)?);
        vars.push((format!("p{i}"), v));
    }
    let mut rows = Vec::new();
    let mut push = |name: &str, t: Timing, bytes: usize| rows.push(Row::new(set, name, t, bytes));
    // A device-to-device copy (cuMemcpyDtoDAsync) between two preallocated buffers as large as
    // the parameters: reads and writes 8 B per element.
    push("device_copy", device_copy(dev, n, steps)?, 8 * n);
    // One optimizer failing must not cost the others' rows: report it and go on.
    let mut failed = Vec::new();
    for &algo in Algo::ALL {
        if !only.is_empty() && !only.iter().any(|o| o == algo.name()) {
            continue;
        }
        let mut run = || -> candle_optim::Result<()> {
            let hyper = serde_json::json!({"lr": 1e-4, "weight_decay": 0.01});
            let mut opt = algo.build_json(vars.clone(), &hyper)?;
            opt.set_non_finite_policy(NonFinitePolicy::Propagate);
            let dims: Vec<(Vec<usize>, DType)> = vars
                .iter()
                .map(|(_, v)| (v.dims().to_vec(), v.dtype()))
                .collect();
            let bytes = algo.step_traffic_bytes(&hyper, &dims)?;
            let t = time_step(dev, steps, || opt.step(&grads).map(|_| ()))?;
            push(&format!("{}_fused", algo.name()), t, bytes);
            if algo == Algo::AdamW {
                // The default policy, decided on the device (no wait per step) and on the host,
                // without and with clipping.
                opt.set_non_finite_policy(NonFinitePolicy::SkipStep);
                for (name, clip, mode) in [
                    ("adamw_fused_skipstep", None, VerdictMode::Auto),
                    ("adamw_fused_skipstep_host", None, VerdictMode::Host),
                    ("adamw_fused_skipstep_clip", Some(1.0), VerdictMode::Auto),
                    (
                        "adamw_fused_skipstep_clip_host",
                        Some(1.0),
                        VerdictMode::Host,
                    ),
                ] {
                    opt.set_max_grad_norm(clip)?;
                    opt.set_verdict_mode(mode)?;
                    let t = time_step(dev, steps, || opt.step(&grads).map(|_| ()))?;
                    push(name, t, bytes);
                }
                // State in 8 bits (bitsandbytes' default min_8bit_size 4096) and in bf16.
                for (name, format) in [
                    ("adamw_blockwise8", "blockwise8"),
                    ("adamw_bf16_state", "bf16"),
                ] {
                    let hyper = serde_json::json!({
                        "lr": 1e-4, "weight_decay": 0.01, "state_format": format
                    });
                    let mut opt = algo.build_json(vars.clone(), &hyper)?;
                    opt.set_non_finite_policy(NonFinitePolicy::Propagate);
                    let bytes = algo.step_traffic_bytes(&hyper, &dims)?;
                    let t = time_step(dev, steps, || opt.step(&grads).map(|_| ()))?;
                    push(name, t, bytes);
                }
            }
            Ok(())
        };
        if let Err(e) = run() {
            eprintln!("bench {set}: {} failed: {e}", algo.name());
            failed.push(algo.name());
        }
    }
    Ok((rows, failed))
}

#[cfg(feature = "cuda")]
fn device_copy(dev: &Device, n: usize, steps: usize) -> candle_optim::Result<Timing> {
    let Device::Cuda(d) = dev else {
        unreachable!("gpu_check runs on a CUDA device")
    };
    let stream = d.cuda_stream();
    let src = stream
        .alloc_zeros::<f32>(n)
        .map_err(candle_core::Error::wrap)?;
    let mut dst = stream
        .alloc_zeros::<f32>(n)
        .map_err(candle_core::Error::wrap)?;
    time_step(dev, steps, || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(candle_core::Error::wrap)?;
        Ok(())
    })
}

#[cfg(not(feature = "cuda"))]
fn device_copy(_: &Device, _: usize, _: usize) -> candle_optim::Result<Timing> {
    Err(candle_optim::Error::Unsupported(
        "built without the cuda feature".into(),
    ))
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
            let list = |k: &str| -> Vec<f64> {
                r[k].as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default()
            };
            let t = Timing::from_samples(list("ms_tput"), list("ms"), list("ms_host"));
            let bytes = r["bytes"].as_u64().unwrap_or(0) as usize;
            Row::new(set, r["name"].as_str().unwrap_or("?"), t, bytes)
        })
        .collect())
}

/// Every optimizer with its steps decided on the device ([`VerdictMode::Auto`]) against the same
/// run decided on the host ([`VerdictMode::Host`]), on CUDA: skipped steps in a row (NaN, then
/// +inf), clipping, a bf16 parameter; parameters, state and counters must be equal bit for bit
/// and the reports equal, and a deferred report must still be unresolved when `step` returns.
fn verdict_check(dev: &Device) -> (bool, Vec<String>) {
    let mut ok = true;
    let mut lines = Vec::new();
    for &algo in Algo::ALL {
        let run = || -> candle_optim::Result<Option<String>> {
            let shapes: [&[usize]; 3] = [&[64, 48], &[300], &[5000]];
            let make = || -> candle_optim::Result<Vec<(String, Var)>> {
                shapes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let t = Tensor::randn(0f32, 0.1, *s, &Device::Cpu)?.to_device(dev)?;
                        let t = if i == 2 { t.to_dtype(DType::BF16)? } else { t };
                        Ok((format!("p{i}"), Var::from_tensor(&t)?))
                    })
                    .collect()
            };
            let a = make()?;
            let b: Vec<(String, Var)> = a
                .iter()
                .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
                .collect::<candle_optim::Result<_>>()?;
            let hyper = serde_json::json!({"lr": 1e-3, "weight_decay": 0.01});
            let mut opts = [
                algo.build_json(a.clone(), &hyper)?,
                algo.build_json(b.clone(), &hyper)?,
            ];
            for (o, mode) in opts.iter_mut().zip([VerdictMode::Host, VerdictMode::Auto]) {
                o.set_verdict_mode(mode)?;
                o.set_max_grad_norm(Some(0.5))?;
            }
            for step in 0..6u64 {
                let grads: Vec<Tensor> = a
                    .iter()
                    .map(|(_, v)| {
                        let g = Tensor::randn(0f32, 1.0, v.dims(), &Device::Cpu)?;
                        let g = match step {
                            2 => g.broadcast_mul(&Tensor::new(f32::NAN, &Device::Cpu)?)?,
                            3 => g.broadcast_add(&Tensor::new(f32::INFINITY, &Device::Cpu)?)?,
                            _ => g,
                        };
                        Ok(g.to_dtype(v.dtype())?.to_device(dev)?)
                    })
                    .collect::<candle_optim::Result<_>>()?;
                let mut reports = Vec::new();
                for (o, vars) in opts.iter_mut().zip([&a, &b]) {
                    let mut g = GradStore::default();
                    for ((_, v), t) in vars.iter().zip(&grads) {
                        g.insert(v.as_tensor(), t.copy()?);
                    }
                    reports.push(o.step(&g)?);
                }
                if step > 0 && reports[1].is_resolved() {
                    return Ok(Some(format!("step {step}: decided on the host")));
                }
                let (ra, rb) = (format!("{:?}", reports[0]), format!("{:?}", reports[1]));
                if ra != rb {
                    return Ok(Some(format!("step {step}: reports {ra} vs {rb}")));
                }
                for ((name, va), (_, vb)) in a.iter().zip(&b) {
                    let bits = |t: &Tensor| -> candle_optim::Result<Vec<u32>> {
                        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        Ok(v.iter().map(|x| x.to_bits()).collect())
                    };
                    if bits(va.as_tensor())? != bits(vb.as_tensor())? {
                        return Ok(Some(format!("step {step}: parameter {name} differs")));
                    }
                    let (sa, sb) = (opts[0].param_state(name), opts[1].param_state(name));
                    let (Some(sa), Some(sb)) = (sa, sb) else {
                        return Ok(Some(format!("step {step}: {name} has no state")));
                    };
                    if sa.step != sb.step {
                        return Ok(Some(format!("step {step}: {name} counters differ")));
                    }
                    for ((_, x), (_, y)) in sa.slots.iter().zip(&sb.slots) {
                        if bits(&x.to_f32()?)? != bits(&y.to_f32()?)? {
                            return Ok(Some(format!("step {step}: state of {name} differs")));
                        }
                    }
                }
                if opts[0].step_count() != opts[1].step_count() {
                    return Ok(Some(format!("step {step}: step counts differ")));
                }
            }
            Ok(None)
        };
        let line = match run() {
            Ok(None) => format!("PASS verdicts {}: device = host, bit for bit", algo.name()),
            Ok(Some(why)) => {
                ok = false;
                format!("FAIL verdicts {}: {why}", algo.name())
            }
            Err(e) => {
                ok = false;
                format!("FAIL verdicts {}: {e}", algo.name())
            }
        };
        println!("{line}");
        lines.push(line);
    }
    (ok, lines)
}
