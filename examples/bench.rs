//! Side-by-side step benchmark, in one process and one run: a STREAM-style copy and triad,
//! every optimizer's fused step, and `candle_nn::optim::AdamW`, on the GPT-2-small parameter
//! shapes (124.4M f32) and on a 10M-parameter set, with 1 and 2 threads.
//!
//! ```text
//! cargo run --release --example bench -- [--sets gpt2,10m] [--threads 1,2] [--steps 10]
//!     [--json bench.json] [--torch [PYTHON]] [--torch-variants adamw_fused,...] [--control]
//!     [--skip-candle-nn]
//! ```
//!
//! Effective GB/s is the bytes each step must move (`Algo::step_traffic_bytes`: params,
//! grads and state, read and written) over the median time; "% triad" compares it with the
//! triad measured in the same run with the same threads.
//!
//! Peers run in their own processes, their blocks of steps interleaved with ours in every round
//! (after ours in even rounds, before them in odd ones), and their rows join the table:
//! - `--torch`: `scripts/bench_torch.py` with `torch.optim.AdamW` (fused, foreach, for-loop)
//!   and `torch.optim.SGD(momentum=0.9)` on the same shapes and threads;
//! - `--control`: this bench again, stepping our own optimizers (`control_*` rows). Same code
//!   in two processes, so its ratio to our rows is the comparison's own bias.
//!
//! With peers, half of the rounds run with our memory allocated before the peers' and half with
//! it allocated after (everything afresh in between): on the development VM the process that
//! allocates second steps several percent faster, whichever it is. The last column gives the
//! medians of the two halves; the other columns pool them.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::bench_internals::simd;
use candle_optim::{Algo, NonFinitePolicy};
use clap::Parser;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Optimizer step benchmark (CPU), side by side")]
struct Args {
    /// Parameter sets: gpt2 (GPT-2 small, 124.4M) and/or 10m (also gpt2-flat: 124.4M in one
    /// tensor, and gpt2-nowte: GPT-2 small without its embedding).
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
    /// Only these torch rows (comma list of adamw_fused, adamw_foreach, adamw_forloop,
    /// sgd_momentum; default: all).
    #[arg(long, value_delimiter = ',')]
    torch_variants: Vec<String>,
    /// Leave out candle-nn's AdamW (slow: seconds per step on GPT-2 small).
    #[arg(long)]
    skip_candle_nn: bool,
    /// State formats to step each optimizer with: f32 (rows `<algo>_fused`), blockwise8
    /// (`<algo>_blockwise8`, bitsandbytes' default min_8bit_size 4096) and bf16
    /// (`<algo>_bf16`). Muon runs f32 only.
    #[arg(long, default_value = "f32,blockwise8,bf16", value_delimiter = ',')]
    formats: Vec<String>,
    /// Also run this same binary as a second process (`--serve`) stepping our optimizers: a
    /// control of the comparison with the peers, which should read 1.0x.
    #[arg(long)]
    control: bool,
    /// Serve blocks of steps on stdin/stdout for another bench process (see `--control`).
    #[arg(long, hide = true)]
    serve: bool,
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
    /// Medians of the half with our memory allocated first and of the half with the peers'
    /// first (only with peers).
    ms_median_by_order: Option<[f64; 2]>,
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

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> BoxResult<()> {
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
    if args.serve {
        return serve(&args, &algos);
    }
    println!(
        "SIMD level: {:?}; cores: {}",
        simd::level(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut rows: Vec<Row> = Vec::new();
    for set in &args.sets {
        let shapes = shapes_of(set)?;
        let n = numel(&shapes);
        println!(
            "\n== set {set}: {} tensors, {n} parameters ==",
            shapes.len()
        );
        let mut streams = Streams {
            a: vec![0.0f32; n],
            b: vec![1.0f32; n],
            c: vec![2.0f32; n],
        };
        for &threads in &args.threads {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            let local = measure(&args, &algos, set, &shapes, &pool, &mut streams)?;
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

fn shapes_of(set: &str) -> BoxResult<Vec<(String, Vec<usize>)>> {
    match set {
        "gpt2" => Ok(gpt2_small()),
        // Diagnostics: the same number of parameters in one tensor, and GPT-2 small without
        // its 38.6M-parameter embedding.
        "gpt2-flat" => Ok(vec![("flat".into(), vec![124_439_808])]),
        "gpt2-nowte" => Ok(gpt2_small()[1..].to_vec()),
        "10m" => Ok(ten_m()),
        other => Err(format!("unknown set {other}").into()),
    }
}

fn numel(shapes: &[(String, Vec<usize>)]) -> usize {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// The STREAM arrays of one set.
struct Streams {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

/// One untimed step, then `k` timed ones back to back (warm caches and page tables, as a
/// training loop sees them); their times in ms.
fn time_block(k: usize, f: &mut dyn FnMut()) -> Vec<f64> {
    f();
    (0..k)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

/// Our side of a measurement: parameters, gradients and every optimizer, its state already
/// allocated (by one untimed step), so that all of our memory is in place before the peers
/// allocate theirs, or after (see [`measure`]).
struct Ours {
    grads: GradStore,
    opts: Vec<(String, Box<dyn candle_optim::Optimizer>)>,
    /// Bytes each of `opts` moves per step (`Algo::step_traffic_bytes`).
    bytes: Vec<usize>,
    cn: Option<candle_nn::optim::AdamW>,
}

impl Ours {
    fn new(
        shapes: &[(String, Vec<usize>)],
        algos: &[Algo],
        skip_step_row: bool,
        candle_nn: bool,
        formats: &[String],
    ) -> BoxResult<Self> {
        let dev = Device::Cpu;
        let mut grads = GradStore::default();
        let mut vars: Vec<(String, Var)> = Vec::with_capacity(shapes.len());
        for (name, s) in shapes {
            let v = Var::from_tensor(&Tensor::randn(0f32, 0.02, s.as_slice(), &dev)?)?;
            grads.insert(
                v.as_tensor(),
                Tensor::randn(0f32, 1e-3, s.as_slice(), &dev)?,
            );
            vars.push((name.clone(), v));
        }
        let hyper = serde_json::json!({"lr": 1e-4, "weight_decay": 0.01});
        let mut opts: Vec<(String, Box<dyn candle_optim::Optimizer>)> = Vec::new();
        let mut bytes = Vec::new();
        let dims: Vec<(Vec<usize>, DType)> = shapes
            .iter()
            .map(|(_, s)| (s.clone(), DType::F32))
            .collect();
        for &algo in algos {
            for format in formats {
                if format == "f32" || algo == Algo::Muon {
                    continue;
                }
                let mut hyper = hyper.clone();
                hyper["state_format"] = format.as_str().into();
                let b = algo.step_traffic_bytes(&hyper, &dims)?;
                let mut opt = common::build_named(algo, vars.clone(), &hyper, false)?;
                opt.set_non_finite_policy(NonFinitePolicy::Propagate);
                opts.push((format!("{}_{format}", algo.name()), opt));
                bytes.push(b);
            }
            if !formats.iter().any(|f| f == "f32") {
                continue;
            }
            let b = algo.step_traffic_bytes(&hyper, &dims)?;
            let mut opt = common::build_named(algo, vars.clone(), &hyper, false)?;
            opt.set_non_finite_policy(NonFinitePolicy::Propagate);
            opts.push((format!("{}_fused", algo.name()), opt));
            bytes.push(b);
            if algo == Algo::AdamW && skip_step_row {
                // What the non-finite check and clipping cost: the default policy (SkipStep)
                // reads every gradient once more first; with clipping that one pass also
                // gives the norm.
                for (name, policy, clip) in [
                    ("adamw_fused_skipstep", NonFinitePolicy::SkipStep, None),
                    ("adamw_fused_clip", NonFinitePolicy::Propagate, Some(1.0)),
                    (
                        "adamw_fused_skipstep_clip",
                        NonFinitePolicy::SkipStep,
                        Some(1.0),
                    ),
                ] {
                    let mut opt = common::build_named(algo, vars.clone(), &hyper, false)?;
                    opt.set_non_finite_policy(policy);
                    opt.set_max_grad_norm(clip)?;
                    opts.push((name.into(), opt));
                    bytes.push(b);
                }
            }
        }
        for (_, opt) in &mut opts {
            opt.step(&grads)?;
        }
        // candle-nn's AdamW allocates its moments when built.
        let cn = if candle_nn {
            use candle_nn::optim::Optimizer as _;
            let vs: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
            Some(candle_nn::optim::AdamW::new(
                vs,
                candle_nn::optim::ParamsAdamW {
                    lr: 1e-4,
                    ..Default::default()
                },
            )?)
        } else {
            None
        };
        Ok(Self {
            grads,
            opts,
            bytes,
            cn,
        })
    }
}

/// One set and thread count. Every measurement runs round-robin (one block of steps of each
/// per round), so slow drifts of a shared machine hit all of them alike and the ratios hold.
///
/// With peers (torch, or `--control`: this same AdamW in a second process), the rounds run in
/// two halves with everything allocated afresh in between: in the first our tensors and state
/// are allocated before the peers start, in the second after. On the development VM a process
/// that allocates its memory first steps measurably slower than one that allocates later,
/// identical code on both sides (see examples/results/cpu_vs_torch.md), so a fixed order would
/// bias every comparison; rows report both halves' medians and pool their samples.
fn measure(
    args: &Args,
    algos: &[Algo],
    set: &str,
    shapes: &[(String, Vec<usize>)],
    pool: &rayon::ThreadPool,
    st: &mut Streams,
) -> BoxResult<Vec<Row>> {
    let threads = pool.current_num_threads();
    let n = numel(shapes);
    let new_ours = || Ours::new(shapes, algos, true, !args.skip_candle_nn, &args.formats);
    let start_peers = || -> Vec<Peer> {
        let mut peers = Vec::new();
        if let Some(py) = &args.torch {
            match Peer::torch(py, set, threads, &args.torch_variants) {
                Ok(p) => peers.push(p),
                Err(e) => eprintln!("torch comparison skipped: {e}"),
            }
        }
        if args.control {
            match Peer::control(set, threads, algos) {
                Ok(p) => peers.push(p),
                Err(e) => eprintln!("control skipped: {e}"),
            }
        }
        peers
    };
    let halves = if args.torch.is_some() || args.control {
        2
    } else {
        1
    };
    let block = args.block.max(1);
    let rounds = args.steps.div_ceil(block).div_ceil(halves).max(1);
    // Rows: name, bytes and the times of each half.
    let mut names: Vec<(String, usize, Vec<Vec<f64>>)> = Vec::new();
    let slot_of = |names: &mut Vec<(String, usize, Vec<Vec<f64>>)>, name: &str, bytes: usize| {
        names
            .iter()
            .position(|(n, _, _)| n == name)
            .unwrap_or_else(|| {
                names.push((name.to_string(), bytes, vec![Vec::new(); halves]));
                names.len() - 1
            })
    };
    let mut peak: Vec<(String, Option<u64>)> = Vec::new();
    for half in 0..halves {
        let (mut ours, mut peers) = if half == 0 {
            let ours = new_ours()?;
            (ours, start_peers())
        } else {
            let peers = start_peers();
            (new_ours()?, peers)
        };
        // Slot of every measurement in `names`, in the order they run.
        let mut slots = vec![
            slot_of(&mut names, "stream_copy", 8 * n),
            slot_of(&mut names, "stream_triad", 12 * n),
        ];
        for ((name, _), &b) in ours.opts.iter().zip(&ours.bytes) {
            slots.push(slot_of(&mut names, name, b));
        }
        if ours.cn.is_some() {
            slots.push(slot_of(&mut names, "candle_nn_adamw", 28 * n));
        }
        let peer_slots: Vec<Vec<usize>> = peers
            .iter()
            .map(|p| {
                p.names
                    .iter()
                    .zip(&p.bytes)
                    .map(|(name, &b)| slot_of(&mut names, name, b))
                    .collect()
            })
            .collect();
        let mut record = |slot: usize, ms: Vec<f64>| names[slot].2[half].extend(ms);
        // Only the steps run in the pool: a training loop allocates from its main thread.
        pool.install(|| {
            for round in 0..rounds {
                // The peers' blocks go last in even rounds and first in odd ones, so neither side
                // always follows the same neighbour.
                let mut peer_blocks = |record: &mut dyn FnMut(usize, Vec<f64>)| {
                    for (p, slots) in peers.iter_mut().zip(&peer_slots) {
                        for (i, &slot) in slots.iter().enumerate() {
                            match p.block(i, block) {
                                Ok(ms) => record(slot, ms),
                                Err(e) => eprintln!("{}: {e}", p.names[i]),
                            }
                        }
                    }
                };
                if round % 2 == 1 {
                    peer_blocks(&mut record);
                }
                let Streams { a, b, c } = &mut *st;
                let mut s = slots.iter();
                let mut next = || *s.next().expect("one slot per measurement");
                record(
                    next(),
                    time_block(block, &mut || {
                        a.par_chunks_mut(CHUNK)
                            .zip(b.par_chunks(CHUNK))
                            .for_each(|(a, b)| simd::run(Copy { a, b }))
                    }),
                );
                record(
                    next(),
                    time_block(block, &mut || {
                        a.par_chunks_mut(CHUNK)
                            .zip(b.par_chunks(CHUNK))
                            .zip(c.par_chunks(CHUNK))
                            .for_each(|((a, b), c)| simd::run(Triad { a, b, c, s: 3.0 }))
                    }),
                );
                let grads = &ours.grads;
                for (_, opt) in &mut ours.opts {
                    record(
                        next(),
                        time_block(block, &mut || {
                            opt.step(grads).unwrap();
                        }),
                    );
                }
                if let Some(cn) = &mut ours.cn {
                    use candle_nn::optim::Optimizer as _;
                    record(next(), time_block(block, &mut || cn.step(grads).unwrap()));
                }
                if round % 2 == 0 {
                    peer_blocks(&mut record);
                }
            }
        });
        drop(peers);
        if half + 1 == halves {
            // Peak extra memory of one step of each optimizer (state exists by now): the step
            // allocates nothing proportional to the model.
            let grads = &ours.grads;
            for (name, opt) in &mut ours.opts {
                let extra = pool.install(|| {
                    peak_extra_rss(|| {
                        opt.step(grads).unwrap();
                    })
                });
                peak.push((name.clone(), extra));
            }
        }
    }
    let mut local: Vec<Row> = names
        .into_iter()
        .map(|(name, bytes, by_half)| {
            let all: Vec<f64> = by_half.iter().flatten().copied().collect();
            let (med, min, max) = stats(&all);
            Row {
                set: set.to_string(),
                threads,
                name,
                ms_median: med,
                ms_min: min,
                ms_max: max,
                ms_median_by_order: (halves == 2 && by_half.iter().all(|h| !h.is_empty()))
                    .then(|| [common::median(&by_half[0]), common::median(&by_half[1])]),
                bytes,
                gbps: bytes as f64 / (med * 1e-3) / 1e9,
                pct_triad: 0.0,
                speedup_vs_candle_nn: None,
                peak_extra_pct: None,
            }
        })
        .collect();
    for (name, extra) in peak {
        if let (Some(x), Some(r)) = (extra, local.iter_mut().find(|r| r.name == name)) {
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
    Ok(local)
}

/// `--serve`: the control peer. Our fused optimizers on the first set and thread count,
/// answering the same requests as `scripts/bench_torch.py --serve`.
fn serve(args: &Args, algos: &[Algo]) -> BoxResult<()> {
    use std::io::{BufRead, Write};
    let set = args.sets.first().ok_or("--serve needs a set")?;
    let threads = *args.threads.first().ok_or("--serve needs a thread count")?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut ours = Ours::new(&shapes_of(set)?, algos, false, false, &["f32".to_string()])?;
    let names: Vec<String> = ours
        .opts
        .iter()
        .map(|(n, _)| format!("control_{n}"))
        .collect();
    let bytes = ours.bytes.clone();
    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "{}",
        serde_json::json!({"names": names, "bytes": bytes})
    )?;
    stdout.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let (name, k) = line.split_once(' ').ok_or("bad request")?;
        let i = names.iter().position(|n| n == name).ok_or("unknown name")?;
        let k: usize = k.trim().parse()?;
        let grads = &ours.grads;
        let opt = &mut ours.opts[i].1;
        let ms = pool.install(|| {
            time_block(k, &mut || {
                opt.step(grads).unwrap();
            })
        });
        writeln!(stdout, "{}", serde_json::json!(ms))?;
        stdout.flush()?;
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    let r0 = &rows[0];
    println!("\nset {} · {} thread(s)", r0.set, r0.threads);
    println!(
        "{:<24} {:>10} {:>19} {:>9} {:>8} {:>10} {:>11} {:>19}",
        "step",
        "ms (med)",
        "spread (min–max)",
        "GB/s",
        "% triad",
        "vs cnn",
        "peak extra",
        "ours / peers first"
    );
    for r in rows {
        println!(
            "{:<24} {:>10.2} {:>9.2} – {:>7.2} {:>9.2} {:>7.1}% {:>10} {:>11} {:>19}",
            r.name,
            r.ms_median,
            r.ms_min,
            r.ms_max,
            r.gbps,
            r.pct_triad,
            r.speedup_vs_candle_nn
                .map_or("-".into(), |s| format!("{s:.2}x")),
            r.peak_extra_pct.map_or("-".into(), |p| format!("{p:.3}%")),
            r.ms_median_by_order
                .map_or("-".into(), |[a, b]| format!("{a:.2} / {b:.2}"))
        );
    }
}

/// A peer in its own process (`scripts/bench_torch.py --serve`, or this bench with `--serve`):
/// the same shapes and threads, every optimizer's state allocated before it answers, then one
/// block of steps per request.
struct Peer {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    names: Vec<String>,
    bytes: Vec<usize>,
}

impl Peer {
    fn torch(py: &str, set: &str, threads: usize, variants: &[String]) -> Result<Self, String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_torch.py");
        let mut cmd = std::process::Command::new(py);
        cmd.args([script, "--serve", "--set", set, "--threads"])
            .arg(threads.to_string());
        if !variants.is_empty() {
            cmd.arg("--variants").arg(variants.join(","));
        }
        Self::start(cmd, py)
    }

    fn control(set: &str, threads: usize, algos: &[Algo]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let only: Vec<&str> = algos.iter().map(|a| a.name()).collect();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["--serve", "--sets", set, "--only", &only.join(",")])
            .args(["--threads", &threads.to_string()]);
        Self::start(cmd, "control")
    }

    fn start(mut cmd: std::process::Command, what: &str) -> Result<Self, String> {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{what}: {e}"))?;
        let mut out = std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("{what} did not start: {e}"))?;
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

    /// One untimed and `k` timed steps of the peer's optimizer `i`; their times in ms.
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

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // EOF ends the server loop
        let _ = self.child.wait();
    }
}
