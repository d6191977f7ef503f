//! Side-by-side step benchmark, in one process and one run: a STREAM-style copy and triad,
//! every optimizer's fused step, and `candle_nn::optim::AdamW`, on the GPT-2-small parameter
//! shapes (124.4M f32) and on a 10M-parameter set, with 1 and 2 threads.
//!
//! ```text
//! cargo run --release --example bench -- [--sets gpt2,10m] [--threads 1,2] [--steps 10]
//!     [--json bench.json] [--torch [PYTHON]] [--torch-variants adamw_fused,...] [--control]
//!     [--skip-candle-nn] [--sharded 2,4]
//! cargo run --release --example bench -- --sets 10m --threads 1,2 --only adamw --sharded 2 \
//!     --formats f32 --skip-candle-nn
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
//!
//! `--sharded N,...` adds ZeRO-1 rows (`<algo>_zero1_<N>ranks`; `--only` defaults to adamw in
//! this mode): `dist::Sharded` over the same parameters with N ranks as threads of this process
//! on `ThreadComm`, each rank with its own copy of the parameters and gradients and its own
//! rayon pool of `--threads` threads, its blocks of steps interleaved with the other rows'. The
//! step time is the slowest rank's, all ranks started together by a barrier. The same machine
//! does every rank's work, so the sharded step is not expected to beat the unsharded one here:
//! what the rows measure is the per-rank update against the unsharded update, and the
//! communication (reduce-scatter and all-gather through shared memory) that sharding adds. A second table gives rank 0's
//! split of the step, the ratio to the unsharded row of the same format, the optimizer state per
//! rank against the unsharded state, and the bytes a rank puts into collectives per step
//! against 2Ψ (twice the parameters' bytes).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::bench_internals::simd;
use candle_optim::dist::{Communicator, Sharded, StepTiming, ThreadComm};
use candle_optim::{
    Algo, AlgoVisitor, Algorithm, MuonConfig, NonFinitePolicy, Optim, OptimBuilder, Optimizer as _,
    StateFormat,
};
use clap::Parser;
use rayon::prelude::*;
use serde::Serialize;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Optimizer step benchmark (CPU), side by side")]
struct Args {
    /// Parameter sets: gpt2 (GPT-2 small, 124.4M) and/or 10m (also gpt2-flat: 124.4M in one
    /// tensor, gpt2-nowte: GPT-2 small without its embedding, and cache: 65,536 parameters
    /// that stay in cache).
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
    /// (`<algo>_blockwise8`, bitsandbytes' default min_8bit_size 4096), blockwise8_scalar (the
    /// same through the portable scalar codecs instead of the AVX-512 VBMI ones) and bf16
    /// (`<algo>_bf16`). Muon's state is f32; its `muon_bf16` row runs Newton–Schulz in bf16.
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
    /// Also step ZeRO-1 (`dist::Sharded`) with these numbers of ranks, as threads of this
    /// process on `ThreadComm` (rows `<algo>_zero1_<N>ranks`); `--only` then defaults to adamw.
    #[arg(long, value_delimiter = ',')]
    sharded: Vec<usize>,
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
    /// ZeRO-1 rows (`--sharded`) only.
    #[serde(skip_serializing_if = "Option::is_none")]
    sharded: Option<ShardedStats>,
}

/// What a ZeRO-1 row (`--sharded`) adds.
#[derive(Serialize, Clone, Debug)]
struct ShardedStats {
    ranks: usize,
    /// The unsharded row of the same optimizer and state format, measured in the same rounds.
    reference: String,
    /// The reference's median step (ms), and this row's median step over it.
    reference_ms: f64,
    vs_reference: f64,
    /// Rank 0's medians (ms) of the parts of `Sharded::last_step_timing` (a rank's collectives
    /// include its wait for the others).
    reduce_scatter_ms: f64,
    update_ms: f64,
    all_gather_ms: f64,
    /// Median over steps of the slowest rank's update (ms).
    update_max_ms: f64,
    /// `Optimizer::state_bytes` of each rank, and of the unsharded optimizer.
    state_bytes_per_rank: Vec<usize>,
    state_bytes_unsharded: usize,
    /// `Sharded::collective_bytes_per_step` (rank 0) and `Sharded::param_bytes` (Ψ).
    collective_bytes_per_step: usize,
    param_bytes: usize,
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
    let algos: Vec<Algo> = if args.only.is_empty() && !args.sharded.is_empty() {
        vec![Algo::AdamW]
    } else if args.only.is_empty() {
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
    if args.sharded.contains(&0) {
        return Err("--sharded takes rank counts of at least 1".into());
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("SIMD level: {:?}; cores: {cores}", simd::level());
    if !args.sharded.is_empty() {
        println!(
            "\nZeRO-1 rows (--sharded): N ranks are N threads of this process on ThreadComm, each\n\
             with its own copy of the parameters and gradients and its own rayon pool of the\n\
             table's thread count (N x threads OS threads on {cores} cores). This one machine does\n\
             every rank's share of the update, and the collectives are copies and sums in shared\n\
             memory: a sharded step is not expected to beat the unsharded one here. Read the\n\
             per-rank update against the unsharded step (on N machines each rank would update\n\
             1/N of the parameters with a machine to itself), and reduce-scatter + all-gather as\n\
             the communication overhead that sharding adds. Step time: the slowest rank's, all\n\
             ranks started together by a barrier."
        );
    }
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
        // 65,536 parameters in 4 tensors (about 1 MB of f32 AdamW arrays, in this CPU's L2):
        // the step's arithmetic with little DRAM traffic.
        "cache" => Ok((0..4)
            .map(|i| (format!("cache.{i}.weight"), vec![128, 128]))
            .collect()),
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
    /// The parameters (the initial values of the ZeRO-1 ranks' copies).
    vars: Vec<(String, Var)>,
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
        let hyper = bench_hyper("f32");
        let mut opts: Vec<(String, Box<dyn candle_optim::Optimizer>)> = Vec::new();
        let mut bytes = Vec::new();
        let dims: Vec<(Vec<usize>, DType)> = shapes
            .iter()
            .map(|(_, s)| (s.clone(), DType::F32))
            .collect();
        for &algo in algos {
            for format in formats {
                if format == "f32" || (algo == Algo::Muon && format != "bf16") {
                    continue;
                }
                // blockwise8_scalar: the same state through the portable scalar codecs.
                let mut hyper = bench_hyper(format.trim_end_matches("_scalar"));
                if algo == Algo::Muon {
                    // Muon's "bf16" row: f32 state, bf16 Newton–Schulz (torch.optim.Muon's).
                    hyper = bench_hyper("f32");
                    hyper["ns_dtype"] = "bfloat16".into();
                }
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
            vars,
            grads,
            opts,
            bytes,
            cn,
        })
    }
}

/// How long a ZeRO-1 rank waits for the others in one collective before the bench fails.
const RANK_TIMEOUT: Duration = Duration::from_secs(120);

/// Hyperparameters of every optimizer of the bench, in state format `format`.
fn bench_hyper(format: &str) -> serde_json::Value {
    let mut hyper = serde_json::json!({"lr": 1e-4, "weight_decay": 0.01});
    if format != "f32" {
        hyper["state_format"] = format.into();
    }
    hyper
}

/// As `common::build_named` (its embedding-or-head test for Muon's AdamW group, without
/// no-decay), returning the `Optim<A>` that `Sharded` wraps.
fn build_optim<A: Algorithm>(
    vars: Vec<(String, Var)>,
    hyper: &serde_json::Value,
) -> BoxResult<Optim<A>> {
    let mut hp = hyper.clone();
    let format = match hp.as_object_mut().and_then(|o| o.remove("state_format")) {
        Some(serde_json::Value::String(f)) => StateFormat::from_name(&f, None)?,
        _ => StateFormat::F32,
    };
    let config: A = serde_json::from_value(hp)?;
    let mut b = OptimBuilder::new(config)
        .named_vars(vars)
        .state_format(format);
    if std::any::TypeId::of::<A>() == std::any::TypeId::of::<MuonConfig>() {
        let embedding_or_head = |name: &str| {
            name.split(['.', '/']).any(|s| {
                matches!(
                    s,
                    "wte"
                        | "wpe"
                        | "lm_head"
                        | "head"
                        | "fc"
                        | "classifier"
                        | "cls_token"
                        | "pos_embed"
                ) || s.contains("embed")
            })
        };
        b = b.group(
            |n, _| embedding_or_head(n),
            |c: &mut A| {
                if let Some(m) = (c as &mut dyn std::any::Any).downcast_mut::<MuonConfig>() {
                    m.use_muon = false;
                }
            },
        );
    }
    Ok(b.build()?)
}

/// One timed step of one rank.
struct RankStep {
    ms: f64,
    timing: StepTiming,
}

enum RankMsg {
    /// Built, one step taken (the state exists): `state_bytes`, `collective_bytes_per_step`,
    /// `param_bytes`.
    Ready(usize, usize, usize),
    /// One untimed step, then these.
    Block(Vec<RankStep>),
    Failed(String),
}

/// What a rank thread starts with.
struct Rank {
    comm: ThreadComm,
    /// Names, parameters and gradients, which the rank copies.
    init: Arc<Vec<(String, Tensor, Tensor)>>,
    hyper: serde_json::Value,
    threads: usize,
    barrier: Arc<Barrier>,
    cmds: mpsc::Receiver<usize>,
    out: mpsc::Sender<RankMsg>,
}

impl AlgoVisitor for Rank {
    type Output = std::io::Result<std::thread::JoinHandle<()>>;
    fn visit<A: Algorithm>(self) -> Self::Output {
        std::thread::Builder::new()
            .name(format!("rank{}", self.comm.rank()))
            .spawn(move || {
                let out = self.out.clone();
                if let Err(e) = rank_main::<A>(self) {
                    let _ = out.send(RankMsg::Failed(e.to_string()));
                }
            })
    }
}

/// A rank: its own parameters, gradients, `Sharded` optimizer and rayon pool; answers each
/// request `k` with one untimed and `k` timed steps, every step started with the other ranks
/// at a barrier.
fn rank_main<A: Algorithm>(r: Rank) -> BoxResult<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(r.threads)
        .build()?;
    let mut vars = Vec::with_capacity(r.init.len());
    let mut grads = GradStore::default();
    for (name, p, g) in r.init.iter() {
        let v = Var::from_tensor(&p.copy()?)?;
        grads.insert(v.as_tensor(), g.copy()?);
        vars.push((name.clone(), v));
    }
    let opt = build_optim::<A>(vars, &r.hyper)?;
    let mut opt = Sharded::new(opt, Arc::new(r.comm))?;
    opt.set_non_finite_policy(NonFinitePolicy::Propagate);
    pool.install(|| {
        r.barrier.wait();
        opt.step(&grads)
    })?;
    r.out.send(RankMsg::Ready(
        opt.state_bytes(),
        opt.collective_bytes_per_step(),
        opt.param_bytes(),
    ))?;
    while let Ok(k) = r.cmds.recv() {
        let steps = pool.install(|| -> candle_optim::Result<Vec<RankStep>> {
            let mut steps = Vec::with_capacity(k);
            for i in 0..=k {
                r.barrier.wait();
                let t = Instant::now();
                opt.step(&grads)?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if i > 0 {
                    steps.push(RankStep {
                        ms,
                        timing: opt.last_step_timing(),
                    });
                }
            }
            Ok(steps)
        })?;
        r.out.send(RankMsg::Block(steps))?;
    }
    Ok(())
}

/// The ranks of one ZeRO-1 row, as threads waiting for requests.
struct RankGroup {
    name: String,
    cmds: Vec<mpsc::Sender<usize>>,
    msgs: Vec<mpsc::Receiver<RankMsg>>,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// Every rank's state bytes; rank 0's collective bytes per step and parameter bytes.
    state_bytes: Vec<usize>,
    collective_bytes: usize,
    param_bytes: usize,
    /// A rank failed: the others may wait in a collective or at the barrier, so they are not
    /// joined.
    failed: bool,
}

impl RankGroup {
    /// Starts `ranks` ranks stepping `algo` and waits until each has taken one step.
    fn start(
        name: String,
        algo: Algo,
        hyper: &serde_json::Value,
        ranks: usize,
        threads: usize,
        init: &Arc<Vec<(String, Tensor, Tensor)>>,
    ) -> BoxResult<Self> {
        let barrier = Arc::new(Barrier::new(ranks));
        let mut g = RankGroup {
            name,
            cmds: Vec::new(),
            msgs: Vec::new(),
            handles: Vec::new(),
            state_bytes: Vec::new(),
            collective_bytes: 0,
            param_bytes: 0,
            failed: false,
        };
        for comm in ThreadComm::group_with_timeout(ranks, RANK_TIMEOUT)? {
            let (cmd_tx, cmd_rx) = mpsc::channel();
            let (msg_tx, msg_rx) = mpsc::channel();
            let rank = Rank {
                comm,
                init: init.clone(),
                hyper: hyper.clone(),
                threads,
                barrier: barrier.clone(),
                cmds: cmd_rx,
                out: msg_tx,
            };
            g.handles.push(algo.visit(rank)?);
            g.cmds.push(cmd_tx);
            g.msgs.push(msg_rx);
        }
        for r in 0..ranks {
            match g.recv(r)? {
                RankMsg::Ready(state, collective, param) => {
                    g.state_bytes.push(state);
                    if r == 0 {
                        g.collective_bytes = collective;
                        g.param_bytes = param;
                    }
                }
                _ => return Err(g.fail(format!("rank {r}: unexpected reply"))),
            }
        }
        Ok(g)
    }

    fn fail(&mut self, why: String) -> Box<dyn std::error::Error + Send + Sync> {
        self.failed = true;
        format!("{}: {why}", self.name).into()
    }

    fn recv(&mut self, r: usize) -> BoxResult<RankMsg> {
        match self.msgs[r].recv() {
            Ok(RankMsg::Failed(e)) => Err(self.fail(format!("rank {r}: {e}"))),
            Ok(m) => Ok(m),
            Err(_) => Err(self.fail(format!("rank {r} ended"))),
        }
    }

    /// One untimed and `k` timed steps on every rank: the time of each step (the slowest
    /// rank's, ms), rank 0's split of it and the slowest rank's update (ms).
    fn block(&mut self, k: usize) -> BoxResult<(Vec<f64>, Vec<StepTiming>, Vec<f64>)> {
        for r in 0..self.cmds.len() {
            if self.cmds[r].send(k).is_err() {
                return Err(self.fail(format!("rank {r} ended")));
            }
        }
        let mut ms = vec![0.0f64; k];
        let mut update_max = vec![0.0f64; k];
        let mut split = Vec::new();
        for r in 0..self.msgs.len() {
            let RankMsg::Block(steps) = self.recv(r)? else {
                return Err(self.fail(format!("rank {r}: unexpected reply")));
            };
            for ((m, u), s) in ms.iter_mut().zip(&mut update_max).zip(&steps) {
                *m = m.max(s.ms);
                *u = u.max(s.timing.update.as_secs_f64() * 1e3);
            }
            if r == 0 {
                split = steps.iter().map(|s| s.timing).collect();
            }
        }
        Ok((ms, split, update_max))
    }
}

impl Drop for RankGroup {
    fn drop(&mut self) {
        self.cmds.clear(); // each rank's request loop ends
        if !self.failed {
            for h in self.handles.drain(..) {
                let _ = h.join();
            }
        }
    }
}

/// A ZeRO-1 row's figures over all of its blocks.
struct ShardAcc {
    name: String,
    reference: String,
    ranks: usize,
    split: Vec<StepTiming>,
    update_max: Vec<f64>,
    state_bytes: Vec<usize>,
    state_bytes_unsharded: usize,
    collective_bytes: usize,
    param_bytes: usize,
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
    let mut shard_accs: Vec<ShardAcc> = Vec::new();
    for half in 0..halves {
        let (mut ours, mut peers) = if half == 0 {
            let ours = new_ours()?;
            (ours, start_peers())
        } else {
            let peers = start_peers();
            (new_ours()?, peers)
        };
        let mut groups = start_rank_groups(args, algos, &ours, threads, &mut shard_accs)?;
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
        let group_slots: Vec<usize> = groups
            .iter()
            .map(|(g, b)| slot_of(&mut names, &g.name, *b))
            .collect();
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
                for (name, opt) in &mut ours.opts {
                    simd::force_scalar_codecs(name.ends_with("_scalar"));
                    record(
                        next(),
                        time_block(block, &mut || {
                            opt.step(grads).unwrap();
                        }),
                    );
                    simd::force_scalar_codecs(false);
                }
                if let Some(cn) = &mut ours.cn {
                    use candle_nn::optim::Optimizer as _;
                    record(next(), time_block(block, &mut || cn.step(grads).unwrap()));
                }
                for ((g, _), &slot) in groups.iter_mut().zip(&group_slots) {
                    let (ms, split, update_max) = g.block(block).unwrap_or_else(|e| panic!("{e}"));
                    record(slot, ms);
                    let acc = shard_accs.iter_mut().find(|a| a.name == g.name);
                    let acc = acc.expect("an accumulator per group");
                    acc.split.extend(split);
                    acc.update_max.extend(update_max);
                }
                if round % 2 == 0 {
                    peer_blocks(&mut record);
                }
            }
        });
        drop(peers);
        drop(groups);
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
                sharded: None,
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
    for a in shard_accs {
        let reference_ms = local
            .iter()
            .find(|r| r.name == a.reference)
            .map_or(f64::NAN, |r| r.ms_median);
        let part = |f: fn(&StepTiming) -> Duration| {
            let ms: Vec<f64> = a.split.iter().map(|t| f(t).as_secs_f64() * 1e3).collect();
            common::median(&ms)
        };
        let stats = ShardedStats {
            ranks: a.ranks,
            reference: a.reference.clone(),
            reference_ms,
            vs_reference: f64::NAN,
            reduce_scatter_ms: part(|t| t.reduce_scatter),
            update_ms: part(|t| t.update),
            all_gather_ms: part(|t| t.all_gather),
            update_max_ms: common::median(&a.update_max),
            state_bytes_per_rank: a.state_bytes,
            state_bytes_unsharded: a.state_bytes_unsharded,
            collective_bytes_per_step: a.collective_bytes,
            param_bytes: a.param_bytes,
        };
        if let Some(r) = local.iter_mut().find(|r| r.name == a.name) {
            r.sharded = Some(ShardedStats {
                vs_reference: r.ms_median / reference_ms,
                ..stats
            });
        }
    }
    Ok(local)
}

/// `--sharded`: a group of ranks for every optimizer, state format (as the unsharded rows) and
/// number of ranks, each with its row's bytes per step (those of the unsharded row: the ranks
/// update the same parameters between them); `accs` gets their figures.
fn start_rank_groups(
    args: &Args,
    algos: &[Algo],
    ours: &Ours,
    threads: usize,
    accs: &mut Vec<ShardAcc>,
) -> BoxResult<Vec<(RankGroup, usize)>> {
    let mut groups = Vec::new();
    if args.sharded.is_empty() {
        return Ok(groups);
    }
    let init: Vec<(String, Tensor, Tensor)> = ours
        .vars
        .iter()
        .map(|(name, v)| {
            let g = ours
                .grads
                .get(v.as_tensor())
                .ok_or("a parameter without gradient")?;
            Ok((name.clone(), v.as_tensor().clone(), g.clone()))
        })
        .collect::<BoxResult<_>>()?;
    let init = Arc::new(init);
    for &algo in algos {
        for format in &args.formats {
            // Muon's rows have f32 state; the scalar codecs are a diagnostic of one process.
            if (format != "f32" && algo == Algo::Muon) || format.ends_with("_scalar") {
                continue;
            }
            let (reference, prefix) = if format == "f32" {
                (format!("{}_fused", algo.name()), algo.name().to_string())
            } else {
                let f = format!("{}_{format}", algo.name());
                (f.clone(), f)
            };
            let Some(i) = ours.opts.iter().position(|(n, _)| *n == reference) else {
                continue;
            };
            for &ranks in &args.sharded {
                let name = format!("{prefix}_zero1_{ranks}ranks");
                let hyper = bench_hyper(format);
                let g = RankGroup::start(name.clone(), algo, &hyper, ranks, threads, &init)?;
                match accs.iter_mut().find(|a| a.name == name) {
                    Some(a) => a.state_bytes = g.state_bytes.clone(),
                    None => accs.push(ShardAcc {
                        name,
                        reference: reference.clone(),
                        ranks,
                        split: Vec::new(),
                        update_max: Vec::new(),
                        state_bytes: g.state_bytes.clone(),
                        state_bytes_unsharded: ours.opts[i].1.state_bytes(),
                        collective_bytes: g.collective_bytes,
                        param_bytes: g.param_bytes,
                    }),
                }
                groups.push((g, ours.bytes[i]));
            }
        }
    }
    Ok(groups)
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
    // The ZeRO-1 rows' names are longer than the others'.
    let w = rows
        .iter()
        .filter(|r| r.sharded.is_some())
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max(24);
    println!("\nset {} · {} thread(s)", r0.set, r0.threads);
    println!(
        "{:<w$} {:>10} {:>19} {:>9} {:>8} {:>10} {:>11} {:>19}",
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
            "{:<w$} {:>10.2} {:>9.2} – {:>7.2} {:>9.2} {:>7.1}% {:>10} {:>11} {:>19}",
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
    print_sharded(rows, w);
}

/// The ZeRO-1 rows' figures (`--sharded`), under the table.
fn print_sharded(rows: &[Row], w: usize) {
    let sharded: Vec<(&Row, &ShardedStats)> = rows
        .iter()
        .filter_map(|r| r.sharded.as_ref().map(|s| (r, s)))
        .collect();
    if sharded.is_empty() {
        return;
    }
    let threads = rows[0].threads;
    println!(
        "\nZeRO-1 (ranks: threads of this process, each with a pool of {threads} thread(s), \
         sharing this machine's cores)\n\
         rs / upd / ag: rank 0's medians of reduce-scatter / update / all-gather (its \
         collectives include waiting for the other ranks)\n\
         upd max: the slowest rank's update (median); upd/uns: upd max over the unsharded step\n\
         comm %: the collectives' share of rank 0's parts; state/rank: the largest rank's \
         optimizer state vs the unsharded one's\n\
         coll./2Ψ: the bytes a rank puts into collectives per step over twice the \
         parameters' bytes"
    );
    println!(
        "{:<w$} {:>9} {:>24} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>20} {:>7} {:>9}",
        "step",
        "ms (med)",
        "unsharded (ms med)",
        "ratio",
        "rs ms",
        "upd ms",
        "ag ms",
        "upd max",
        "upd/uns",
        "comm %",
        "state/rank (vs uns.)",
        "ratio",
        "coll./2Ψ"
    );
    for (r, s) in sharded {
        let max_state = s.state_bytes_per_rank.iter().copied().max().unwrap_or(0);
        let parts = s.reduce_scatter_ms + s.update_ms + s.all_gather_ms;
        println!(
            "{:<w$} {:>9.2} {:>24} {:>6.2}x {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>6.2}x {:>6.1}% {:>20} {:>6.3}x {:>8.4}x",
            r.name,
            r.ms_median,
            format!("{} {:.2}", s.reference, s.reference_ms),
            s.vs_reference,
            s.reduce_scatter_ms,
            s.update_ms,
            s.all_gather_ms,
            s.update_max_ms,
            s.update_max_ms / s.reference_ms,
            100.0 * (s.reduce_scatter_ms + s.all_gather_ms) / parts,
            format!(
                "{} / {}",
                common::human_bytes(max_state),
                common::human_bytes(s.state_bytes_unsharded)
            ),
            max_state as f64 / s.state_bytes_unsharded as f64,
            s.collective_bytes_per_step as f64 / (2 * s.param_bytes) as f64,
        );
        println!(
            "{:<w$}   state per rank: {:?} B; collectives per step and rank: {} B, 2Ψ = {} B",
            "",
            s.state_bytes_per_rank,
            s.collective_bytes_per_step,
            2 * s.param_bytes
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
