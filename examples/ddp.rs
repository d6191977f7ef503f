//! Data-parallel training of the gpt2 example's tiny GPT-2 on the bundled text, with N CPU ranks
//! as threads of one process ([`ThreadComm`]): ZeRO stage 1 (`--mode zero1`, the default: each
//! rank keeps its share of the optimizer state, [`Sharded`]) or plain data parallelism
//! (`--mode ddp`: gradients averaged with [`average_gradients`], then the whole optimizer on
//! every rank).
//!
//! ```text
//! cargo run --release --example ddp                                  # 2 ranks, zero1, adamw
//! cargo run --release --example ddp -- --ranks 2 --steps 20 --check  # bitwise vs one process
//! cargo run --release --example ddp -- --ranks 3 --mode ddp --optimizer lion --check
//! cargo run --release --example ddp -- --ranks 4 --optimizer sgd_sai --steps 200
//! cargo run --release --example ddp -- --optimizer adamw --state-format blockwise8 --check
//! cargo run --release --features nccl --example ddp -- --device cuda --ranks 1 --check
//! cargo run --release --features nccl --example ddp -- --device cuda --ranks 8   # 8 GPUs
//! ```
//!
//! Every rank builds the same model from `--seed`. Each step draws one global batch of
//! `ranks × batch` windows from a stream seeded by `--seed` and the step (so the global batch
//! does not depend on how many ranks share it), and rank r trains on its r-th slice of
//! `--batch` windows. Rank 0 prints the mean of the ranks' losses (one scalar all-reduce), the
//! final validation loss (its windows shared out between the ranks), each rank's optimizer
//! state against the unsharded optimizer's, the bytes put into collectives per step against 2Ψ
//! (Ψ: the parameter bytes), and where a step's time goes. At the end every rank's parameters
//! must be bitwise identical (a checksum through the communicator, then the bits compared
//! after the threads are joined).
//!
//! `--check` also trains one process on the same data: per step, each rank's micro-batch
//! gradient in turn, averaged with `candle_optim::dist::average` (as `ThreadComm` averages), and
//! one unsharded optimizer. Its parameters must be bitwise equal to the ranks' for every
//! optimizer, in both modes; the one exception is `--max-grad-norm` in zero1 mode, where the
//! clipping norm is a sum over the ranks' shards in another order, and the parameters are
//! compared to a tolerance instead. The example exits non-zero on a mismatch. (So zero1 and
//! ddp at the same number of ranks end with the same bits.)
//!
//! Each rank runs in a thread pool of its own, `--threads` threads (default: the cores divided
//! among the ranks), so the ranks do not contend for one pool.
//!
//! [`train_rank`] is one rank's whole run, for any [`Communicator`]. With `--device cuda`
//! (feature `nccl`) the example launches one process per GPU, each joining one NCCL group
//! (`NcclComm`; the group's id handed over in a file) and running `train_rank` on its GPU.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_optim::dist::{average, average_gradients, Communicator, ReduceOp, Sharded, ThreadComm};
use candle_optim::{
    Algo, AlgoVisitor, Algorithm, Muon, MuonConfig, Optim, OptimBuilder, Optimizer, StateFormat,
};
use clap::{Parser, ValueEnum};
use common::{human_bytes, median, nn, text, train, Result, Rng};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The gpt2 example's `tiny` preset: layers, heads, width, context.
const N_LAYER: usize = 4;
const N_HEAD: usize = 4;
const N_EMBD: usize = 128;
const N_CTX: usize = 64;

/// How long a rank waits for the others in one collective before the run fails.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// ZeRO stage 1: reduce-scatter the gradients, update this rank's shard, all-gather the
    /// parameters; each rank keeps 1/N of the optimizer state.
    Zero1,
    /// All-reduce the gradients (in buckets), then every rank steps the whole optimizer.
    Ddp,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Data-parallel training of a tiny GPT-2 with CPU ranks as threads")]
struct Args {
    /// Number of ranks (threads).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// zero1 (sharded optimizer state) or ddp (averaged gradients, whole optimizer per rank).
    #[arg(long, value_enum, default_value_t = Mode::Zero1)]
    mode: Mode,
    /// The optimizer: sgd_sai, adamw, adamp, adabelief, diffgrad, adan, lion, muon or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Training steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Sequences per rank and step (the global batch is ranks × batch).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Peak learning rate (default: the gpt2 example's for the tiny preset; SGD-SaI 1e-3).
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay (Lion gets 10× this; SGD 0.1× as coupled L2), as the gpt2 example.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (default: no clipping; the gpt2 example clips at
    /// 1). In zero1 mode the norm is summed over the ranks' shards in another order than one
    /// process sums it, so --check then accepts a small difference (it says when there is none).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// How the optimizer keeps its state: f32, bf16 or blockwise8.
    #[arg(long, default_value = "f32")]
    state_format: String,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Size of one collective's buffer, in MiB (gradients and parameters move in buckets).
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f64,
    /// At most this many validation tokens in the final evaluation.
    #[arg(long, default_value_t = 8192)]
    eval_tokens: usize,
    /// CPU threads per rank: each rank runs in a thread pool of its own (default: the cores
    /// divided among the ranks, at least 1).
    #[arg(long)]
    threads: Option<usize>,
    /// Also train one process on the same data and compare the parameters bit for bit (with
    /// `--device cuda`: at one rank only, against the unsharded optimizer on the same GPU).
    #[arg(long)]
    check: bool,
    /// cpu (ranks are threads of this process), or cuda: one process per GPU over NCCL (build
    /// with `--features nccl`; rank r runs on GPU r).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Set by the launcher in each NCCL rank's process.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// The file holding the NCCL group's id (written by the launcher).
    #[arg(long, hide = true)]
    nccl_id: Option<std::path::PathBuf>,
}

impl Args {
    fn algo(&self) -> Result<Algo> {
        Algo::from_name(&self.optimizer).ok_or_else(|| {
            let known: Vec<&str> = Algo::ALL.iter().map(|a| a.name()).collect();
            format!(
                "unknown optimizer {:?} (one of {})",
                self.optimizer,
                known.join(", ")
            )
            .into()
        })
    }

    fn bucket_bytes(&self) -> Result<usize> {
        let b = self.bucket_mb * (1u64 << 20) as f64;
        if !(b >= 1.0 && b.is_finite()) {
            return Err(format!("--bucket-mb must be positive, got {}", self.bucket_mb).into());
        }
        Ok(b as usize)
    }
}

/// The gpt2 example's learning rates for the tiny preset (see its `default_lr`), except
/// SGD-SaI's: its 3e-3 was tuned with clipping at 1, which this example leaves off by default
/// (`--max-grad-norm`); without it SGD-SaI diverged at 3e-3 (train loss 9.4 → 30 in 50 steps
/// at 2 ranks) and trains at 1e-3 (→ 6.6).
fn default_lr(algo: Algo) -> f64 {
    match algo {
        Algo::SgdSai => 1e-3,
        Algo::AdamW | Algo::AdamP | Algo::AdaBelief | Algo::DiffGrad => 1e-3,
        Algo::Adan => 3e-3,
        Algo::Lion => 1e-3,
        Algo::Muon => 3e-3,
        Algo::Sgd => 3e-2,
    }
}

// ---------------------------------------------------------------------------------------------
// Data and model (the gpt2 example's, tiny preset, corpus vocabulary).

/// The tokenized bundled corpus, shared by the ranks of a process.
struct Data {
    description: String,
    train: Vec<u32>,
    val: Vec<u32>,
    vocab: usize,
}

/// Loads and tokenizes the corpus once per process.
fn data() -> Result<Arc<Data>> {
    static DATA: Mutex<Option<Arc<Data>>> = Mutex::new(None);
    let mut slot = DATA
        .lock()
        .map_err(|_| "a rank panicked loading the text")?;
    if let Some(d) = &*slot {
        return Ok(d.clone());
    }
    let corpus = text::load(None, 0.1)?;
    let vocab = text::Vocab::of_corpus(&corpus);
    let d = Arc::new(Data {
        description: corpus.description.clone(),
        train: vocab.encode(&corpus.train),
        val: vocab.encode(&corpus.val),
        vocab: vocab.len(),
    });
    if d.train.len() < N_CTX + 2 || d.val.len() < N_CTX + 2 {
        return Err("the text is too short for the context".into());
    }
    *slot = Some(d.clone());
    Ok(d)
}

/// The gpt2 example's model (`common::gpt`) with the losses this example needs.
struct Gpt(common::gpt::Gpt);

impl Gpt {
    fn new(vocab: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = common::gpt::Config {
            n_layer: N_LAYER,
            n_head: N_HEAD,
            n_embd: N_EMBD,
            n_ctx: N_CTX,
            vocab,
        };
        Ok(Self(common::gpt::Gpt::new(cfg, vb)?))
    }

    fn forward(&self, idx: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(idx)
    }

    /// Mean cross-entropy of the windows of `tokens` starting at `starts`.
    fn loss(&self, tokens: &[u32], starts: &[usize]) -> candle_core::Result<Tensor> {
        let mut x = Vec::with_capacity(starts.len() * N_CTX);
        let mut y = Vec::with_capacity(starts.len() * N_CTX);
        for &s in starts {
            x.extend_from_slice(&tokens[s..s + N_CTX]);
            y.extend_from_slice(&tokens[s + 1..s + N_CTX + 1]);
        }
        let dev = self.0.device();
        let x = Tensor::from_vec(x, (starts.len(), N_CTX), dev)?;
        let y = Tensor::from_vec(y, starts.len() * N_CTX, dev)?;
        nn::cross_entropy(&self.forward(&x)?, &y)
    }

    /// Σ over `windows` of their mean loss (chunks of 32 windows).
    fn loss_sum(&self, tokens: &[u32], windows: &[usize]) -> candle_core::Result<f64> {
        let mut total = 0.0;
        for chunk in windows.chunks(32) {
            total += self.loss(tokens, chunk)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        }
        Ok(total)
    }
}

/// The model from `seed`, and its variables in name order.
fn build_model(d: &Data, seed: u64, dev: &Device) -> Result<(Gpt, Vec<(String, Var)>)> {
    let varmap = VarMap::new();
    let model = Gpt::new(d.vocab, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    common::seeded_init(&varmap, seed, nn::gpt2_init(N_LAYER))?;
    let mut vars: Vec<(String, Var)> = {
        let data = varmap.data().lock().map_err(|_| "varmap lock")?;
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((model, vars))
}

/// The window starts of step `step`'s global batch of `n` windows: one stream from the seed
/// and the step (the gpt2 example's), whatever the number of ranks that share it.
fn global_batch(seed: u64, step: usize, n: usize, span: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ 0x6E27_0000 ^ (step as u64).wrapping_mul(0x9E37_79B9));
    (0..n).map(|_| rng.below(span)).collect()
}

/// Non-overlapping validation windows, at most `max_tokens` worth, evenly spread.
fn val_windows(val_len: usize, max_tokens: usize) -> Vec<usize> {
    let n = (val_len - 1) / N_CTX;
    let k = n.min((max_tokens / N_CTX).max(1));
    (0..k).map(|i| (i * n / k) * N_CTX).collect()
}

// ---------------------------------------------------------------------------------------------
// Optimizers.

/// What a ZeRO-1 optimizer reports besides the [`Optimizer`] interface.
#[derive(Clone, Copy, Debug)]
struct ShardInfo {
    timing: candle_optim::dist::StepTiming,
    collective_bytes: usize,
    param_bytes: usize,
}

/// A rank's optimizer: a whole [`Optim`] (ddp, and the single process of `--check`) or a
/// [`Sharded`] one (zero1).
trait RankOptim: Optimizer {
    fn shard_info(&self) -> Option<ShardInfo>;
}

impl<A: Algorithm> RankOptim for Optim<A> {
    fn shard_info(&self) -> Option<ShardInfo> {
        None
    }
}

impl<A: Algorithm> RankOptim for Sharded<A> {
    fn shard_info(&self) -> Option<ShardInfo> {
        Some(ShardInfo {
            timing: self.last_step_timing(),
            collective_bytes: self.collective_bytes_per_step(),
            param_bytes: self.param_bytes(),
        })
    }
}

/// The gpt2 example's hyperparameters (`common::make_optimizer_with`): the rate, the weight
/// decay scaled per algorithm, SGD's momentum 0.9; the rest the official defaults.
fn hyperparameters(algo: Algo, args: &Args) -> serde_json::Value {
    let mut hp = json!({
        "lr": args.lr.unwrap_or_else(|| default_lr(algo)),
        "weight_decay": args.weight_decay * common::weight_decay_factor(algo),
    });
    if algo == Algo::Sgd {
        hp["momentum"] = json!(0.9);
    }
    hp
}

/// `algo` over `vars`, built as the gpt2 example builds it (biases and norm gains without
/// weight decay; for Muon, the embeddings on the auxiliary AdamW), with the warmup + cosine
/// schedule over `--steps`; sharded over `comm` if given.
fn build_optimizer(
    algo: Algo,
    vars: Vec<(String, Var)>,
    args: &Args,
    comm: Option<Arc<dyn Communicator>>,
) -> Result<Box<dyn RankOptim>> {
    let hp = hyperparameters(algo, args);
    if algo == Algo::Muon {
        let cfg: MuonConfig = serde_json::from_value(hp)?;
        // The gpt2 example's Muon groups (`common::build_named`): wte and wpe on AdamW.
        let b = Muon::builder(cfg)
            .named_vars(vars)
            .adamw_for(&["wte.*", "wpe.*"]);
        return finish(b, args, comm);
    }
    struct V<'a> {
        vars: Vec<(String, Var)>,
        hp: serde_json::Value,
        args: &'a Args,
        comm: Option<Arc<dyn Communicator>>,
    }
    impl AlgoVisitor for V<'_> {
        type Output = Result<Box<dyn RankOptim>>;
        fn visit<A: Algorithm>(self) -> Self::Output {
            let cfg: A = serde_json::from_value(self.hp)?;
            finish(
                OptimBuilder::new(cfg).named_vars(self.vars),
                self.args,
                self.comm,
            )
        }
    }
    algo.visit(V {
        vars,
        hp,
        args,
        comm,
    })
}

fn finish<A: Algorithm>(
    b: OptimBuilder<A>,
    args: &Args,
    comm: Option<Arc<dyn Communicator>>,
) -> Result<Box<dyn RankOptim>> {
    let mut b = b
        .no_decay_for_bias_and_norm()
        .state_format(StateFormat::from_name(&args.state_format, None)?)
        .schedule(train::default_schedule(args.steps));
    if let Some(m) = args.max_grad_norm {
        b = b.clip_grad_norm(m);
    }
    let opt = b.build()?;
    Ok(match comm {
        Some(comm) => {
            let mut s = Sharded::new(opt, comm)?;
            s.set_bucket_bytes(args.bucket_bytes()?)?;
            Box::new(s)
        }
        None => Box::new(opt),
    })
}

fn state_bytes(opt: &dyn RankOptim) -> usize {
    opt.memory_report().iter().map(|m| m.bytes).sum()
}

// ---------------------------------------------------------------------------------------------
// One rank.

/// What one rank's run ends with.
struct RankResult {
    rank: usize,
    /// Per step, the mean of the ranks' training losses.
    losses: Vec<f64>,
    /// The final validation loss (the same on every rank).
    val_loss: f64,
    /// This rank's optimizer state (memory report).
    state_bytes: usize,
    /// The final parameters, in name order.
    params: Vec<(String, Tensor)>,
    /// FNV-1a of the parameters' bits, checked equal across ranks.
    checksum: u64,
}

/// FNV-1a over the f32 bits of every parameter, in order.
fn checksum(params: &[(String, Tensor)]) -> Result<u64> {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for (_, t) in params {
        for x in t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
            for b in x.to_bits().to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
            }
        }
    }
    Ok(h)
}

/// How many all-reduces [`average_gradients`] makes of f32 `vars` in buckets of `bytes`:
/// whole tensors up to the limit, at least one per bucket.
fn ddp_buckets(vars: &[Var], bytes: usize) -> usize {
    let limit = (bytes / 4).max(1);
    let (mut count, mut elems) = (0, 0);
    for n in vars.iter().map(|v| v.elem_count()).filter(|&n| n > 0) {
        if count > 0 && elems + n <= limit {
            elems += n;
        } else {
            count += 1;
            elems = n;
        }
    }
    count
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One rank's training run, for any communicator (ranks as threads with [`ThreadComm`], or one
/// process per GPU). Rank 0 prints; every rank returns its result, after checking through
/// `comm` that every rank ends with the same parameters.
fn train_rank(comm: Arc<dyn Communicator>, device: &Device, args: &Args) -> Result<RankResult> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    let algo = args.algo()?;
    let d = data()?;
    let (model, vars) = build_model(&d, args.seed, device)?;
    let plain: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let psi: usize = plain.iter().map(|v| v.elem_count() * 4).sum();
    let sharded = (args.mode == Mode::Zero1).then(|| comm.clone());
    let mut opt = build_optimizer(algo, vars.clone(), args, sharded)?;
    let bucket = args.bucket_bytes()?;
    if lead {
        println!("Text: {}.", d.description);
        println!(
            "Tokens (GPT-2 BPE): {} training, {} validation; vocabulary: the {} GPT-2 ids that \
             occur in the text.",
            d.train.len(),
            d.val.len(),
            d.vocab
        );
        println!(
            "Model: GPT-2 tiny ({N_LAYER} layers, {N_HEAD} heads, width {N_EMBD}, context \
             {N_CTX}), {} parameters (Ψ = {} in f32).",
            psi / 4,
            human_bytes(psi)
        );
        println!(
            "{n} rank(s), {}: micro-batch {} per rank, global batch {}×{N_CTX} tokens; {} steps \
             of {} (lr {:.1e}, weight decay {}, warmup + cosine{}, {} state), seed {}.",
            match args.mode {
                Mode::Zero1 => "ZeRO-1 (sharded optimizer state)",
                Mode::Ddp => "DDP (all-reduced gradients, whole optimizer per rank)",
            },
            args.batch,
            n * args.batch,
            args.steps,
            algo.name(),
            args.lr.unwrap_or_else(|| default_lr(algo)),
            args.weight_decay * common::weight_decay_factor(algo),
            args.max_grad_norm
                .map_or(String::new(), |m| format!(", clipping at {m}")),
            args.state_format,
            args.seed
        );
    }
    let span = d.train.len() - N_CTX - 1;
    let log_every = (args.steps / 10).max(1);
    let mut losses = Vec::with_capacity(args.steps);
    // Milliseconds per step: forward + backward, and the optimizer's three phases (zero1:
    // reduce-scatter, update, all-gather; ddp: all-reduce, update, nothing).
    let (mut fb, mut c1, mut up, mut c2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut skipped = 0;
    let t_run = Instant::now();
    for step in 0..args.steps {
        let starts = global_batch(args.seed, step, n * args.batch, span);
        let mine = &starts[rank * args.batch..(rank + 1) * args.batch];
        let t0 = Instant::now();
        let loss = model.loss(&d.train, mine)?;
        let grads = loss.backward()?;
        fb.push(ms(t0.elapsed()));
        let report = match args.mode {
            Mode::Zero1 => {
                let report = opt.step(&grads)?;
                let t = opt
                    .shard_info()
                    .ok_or("zero1 without a sharded optimizer")?;
                c1.push(ms(t.timing.reduce_scatter));
                up.push(ms(t.timing.update));
                c2.push(ms(t.timing.all_gather));
                report
            }
            Mode::Ddp => {
                let t1 = Instant::now();
                let avg = average_gradients(comm.as_ref(), &plain, &grads, bucket)?;
                let t2 = Instant::now();
                let report = opt.step(&avg)?;
                c1.push(ms(t2 - t1));
                up.push(ms(t2.elapsed()));
                c2.push(0.0);
                report
            }
        };
        if !report.taken() {
            skipped += 1;
        }
        let mut l = [loss.to_scalar::<f32>()? as f64];
        comm.all_reduce_scalars(&mut l, ReduceOp::Avg)?;
        losses.push(l[0]);
        let done = step + 1;
        if lead && (done == 1 || done % log_every == 0 || done == args.steps) {
            println!(
                "step {done:>5}/{}  loss {:.4}  (forward+backward {:.0} ms, optimizer {:.0} ms)",
                args.steps,
                l[0],
                fb[step],
                c1[step] + up[step] + c2[step]
            );
        }
    }
    let train_s = t_run.elapsed().as_secs_f64();

    // Validation: the windows shared out between the ranks, the sums all-reduced.
    let windows = val_windows(d.val.len(), args.eval_tokens);
    let my_windows: Vec<usize> = windows.iter().skip(rank).step_by(n).copied().collect();
    let mut v = [
        model.loss_sum(&d.val, &my_windows)?,
        my_windows.len() as f64,
    ];
    comm.all_reduce_scalars(&mut v, ReduceOp::Sum)?;
    let val_loss = v[0] / v[1];

    // Every rank's state bytes, in rank order.
    let mine = state_bytes(opt.as_ref());
    let mut per_rank = vec![0.0; n];
    per_rank[rank] = mine as f64;
    comm.all_reduce_scalars(&mut per_rank, ReduceOp::Sum)?;

    // The same parameters on every rank: the checksum's halves, maximum and minimum.
    let params: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let sum = checksum(&params)?;
    let (lo, hi) = ((sum & 0xFFFF_FFFF) as f64, (sum >> 32) as f64);
    let mut agree = [lo, hi, -lo, -hi];
    comm.all_reduce_scalars(&mut agree, ReduceOp::Max)?;
    if agree[0] != -agree[2] || agree[1] != -agree[3] {
        return Err(format!("rank {rank}: the ranks' parameters differ at the end").into());
    }

    if lead {
        let tail = &losses[losses.len().saturating_sub(5)..];
        println!(
            "{}: {} steps in {train_s:.1} s; train loss {:.4} (mean of the last {}), val loss \
             {val_loss:.4} ({} windows){}.",
            algo.name(),
            args.steps,
            tail.iter().sum::<f64>() / tail.len().max(1) as f64,
            tail.len(),
            windows.len(),
            if skipped > 0 {
                format!("; {skipped} step(s) skipped (non-finite gradients)")
            } else {
                String::new()
            }
        );
        let full: f64 = match args.mode {
            Mode::Zero1 => per_rank.iter().sum(),
            Mode::Ddp => mine as f64,
        };
        let list: Vec<String> = per_rank
            .iter()
            .map(|&b| format!("{} ({:.3})", human_bytes(b as usize), b / full.max(1.0)))
            .collect();
        println!(
            "Optimizer state per rank (memory report, fraction of the unsharded {}): {}; 1/N = \
             {:.3}.",
            human_bytes(full as usize),
            list.join(", "),
            1.0 / n as f64
        );
        match opt.shard_info() {
            Some(info) => println!(
                "Collectives per step (reduce-scatter input + all-gather output): {} = {:.4} × \
                 2Ψ (2Ψ = {}; the rest is alignment padding{}).",
                human_bytes(info.collective_bytes),
                info.collective_bytes as f64 / (2 * info.param_bytes) as f64,
                human_bytes(2 * info.param_bytes),
                if matches!(algo, Algo::SgdSai | Algo::AdamP | Algo::Muon) {
                    " and the imbalance of whole-tensor shards"
                } else {
                    ""
                }
            ),
            None => println!(
                "Collectives per step (all-reduce of the gradients, {} bucket(s)): {} = Ψ in, Ψ \
                 out (2Ψ = {}).",
                ddp_buckets(&plain, bucket),
                human_bytes(psi),
                human_bytes(2 * psi)
            ),
        }
        let (a, b) = match args.mode {
            Mode::Zero1 => ("reduce-scatter", "all-gather"),
            Mode::Ddp => ("all-reduce", "-"),
        };
        let step_ms = median(&c1) + median(&up) + median(&c2);
        println!(
            "Median per step on rank 0: forward+backward {:.1} ms; optimizer {step_ms:.1} ms = \
             {a} {:.1} ms + update {:.1} ms{} (collectives include waiting for the slowest \
             rank).",
            median(&fb),
            median(&c1),
            median(&up),
            if args.mode == Mode::Zero1 {
                format!(" + {b} {:.1} ms", median(&c2))
            } else {
                String::new()
            }
        );
    }
    Ok(RankResult {
        rank,
        losses,
        val_loss,
        state_bytes: mine,
        params,
        checksum: sum,
    })
}

// ---------------------------------------------------------------------------------------------
// The single-process reference of --check.

struct Single {
    losses: Vec<f64>,
    val_loss: f64,
    state_bytes: usize,
    params: Vec<(String, Tensor)>,
}

/// One process, one unsharded optimizer: per step each of the `ranks` micro-batch gradients
/// in turn, averaged with [`average`] as [`ThreadComm`] averages them.
fn train_single(args: &Args, device: &Device) -> Result<Single> {
    let algo = args.algo()?;
    let d = data()?;
    let (model, vars) = build_model(&d, args.seed, device)?;
    let mut opt = build_optimizer(algo, vars.clone(), args, None)?;
    let span = d.train.len() - N_CTX - 1;
    let n = args.ranks;
    let mut losses = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let starts = global_batch(args.seed, step, n * args.batch, span);
        let mut per_rank: Vec<GradStore> = Vec::with_capacity(n);
        let mut mean = 0.0;
        for r in 0..n {
            let loss = model.loss(&d.train, &starts[r * args.batch..(r + 1) * args.batch])?;
            per_rank.push(loss.backward()?);
            mean += loss.to_scalar::<f32>()? as f64;
        }
        losses.push(mean / n as f64);
        let mut avg = GradStore::default();
        for (_, v) in &vars {
            let gs: Vec<Option<&Tensor>> = per_rank.iter().map(|g| g.get(v.as_tensor())).collect();
            if gs.iter().all(Option::is_none) {
                continue;
            }
            let ts = gs
                .into_iter()
                .map(|g| g.cloned().map_or_else(|| v.zeros_like(), Ok))
                .collect::<candle_core::Result<Vec<_>>>()?;
            avg.insert(v.as_tensor(), average(&ts)?);
        }
        opt.step(&avg)?;
    }
    let windows = val_windows(d.val.len(), args.eval_tokens);
    let val_loss = model.loss_sum(&d.val, &windows)? / windows.len() as f64;
    Ok(Single {
        losses,
        val_loss,
        state_bytes: state_bytes(opt.as_ref()),
        params: vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
    })
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

/// Compares the ranks' parameters with the single process's: bitwise when `exact`, else to a
/// relative tolerance.
fn compare(ranks: &RankResult, single: &Single, exact: bool) -> Result<()> {
    let (mut differ, mut total, mut worst) = (0usize, 0usize, 0f64);
    let mut first: Option<String> = None;
    for ((name, a), (_, b)) in ranks.params.iter().zip(&single.params) {
        let (x, y) = (bits(a)?, bits(b)?);
        total += x.len();
        for (&p, &q) in x.iter().zip(&y) {
            if p != q {
                differ += 1;
                let (p, q) = (f32::from_bits(p) as f64, f32::from_bits(q) as f64);
                worst = worst.max((p - q).abs() / q.abs().max(1e-3));
                first.get_or_insert_with(|| name.clone());
            }
        }
    }
    let loss_diff = ranks
        .losses
        .iter()
        .zip(&single.losses)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!(
        "check: single process — val loss {:.4} (ranks {:.4}); training losses differ by at \
         most {loss_diff:.2e}.",
        single.val_loss, ranks.val_loss
    );
    if differ == 0 {
        println!("check: bitwise equal to the single-process run");
        return Ok(());
    }
    let what = format!(
        "{differ} of {total} parameter values differ from the single-process run (first in \
         {}; largest relative difference {worst:.2e})",
        first.unwrap_or_default()
    );
    if exact {
        return Err(format!("check failed: {what}").into());
    }
    const TOLERANCE: f64 = 1e-3;
    if worst > TOLERANCE {
        return Err(format!("check failed: {what}, above {TOLERANCE:.0e}").into());
    }
    println!(
        "check: {what}: within {TOLERANCE:.0e} (not bitwise: --max-grad-norm in zero1 mode sums \
         the clipping norm over the shards in another order)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() {
    train::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    if args.ranks == 0 || args.steps == 0 || args.batch == 0 {
        return Err("--ranks, --steps and --batch must be at least 1".into());
    }
    let algo = args.algo()?;
    args.bucket_bytes()?;
    StateFormat::from_name(&args.state_format, None)?;
    match args.device.as_str() {
        "cpu" => {}
        "cuda" => return run_nccl(&args),
        other => return Err(format!("--device must be cpu or cuda, got {other:?}").into()),
    }
    // One pool of `threads` per rank; candle's matrix products ask for as many (they read
    // RAYON_NUM_THREADS), so the ranks do not contend for one shared pool.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = args
        .threads
        .filter(|&t| t > 0)
        .unwrap_or((cores / args.ranks).max(1));
    common::set_threads(Some(threads));
    let device = Device::Cpu;
    println!(
        "{} rank(s) as threads of this process (ThreadComm), {} CPU thread(s) each; {} mode, {}.",
        args.ranks,
        threads,
        match args.mode {
            Mode::Zero1 => "zero1",
            Mode::Ddp => "ddp",
        },
        algo.name()
    );
    let comms = ThreadComm::group_with_timeout(args.ranks, COLLECTIVE_TIMEOUT)?;
    let outs: Vec<Result<RankResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (args, device) = (&args, &device);
                s.spawn(move || -> Result<RankResult> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()?;
                    pool.install(|| train_rank(Arc::new(comm), device, args))
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("rank {r} panicked").into()))
            })
            .collect()
    });
    let mut ranks = Vec::with_capacity(outs.len());
    let mut errors = Vec::new();
    for (r, o) in outs.into_iter().enumerate() {
        match o {
            Ok(x) => ranks.push(x),
            Err(e) => errors.push(format!("rank {r}: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; ").into());
    }
    // The checksums agreed through the communicator; compare every bit after the join too.
    let first = &ranks[0];
    let reference: Vec<Vec<u32>> = first
        .params
        .iter()
        .map(|(_, t)| bits(t))
        .collect::<Result<_>>()?;
    for other in &ranks[1..] {
        for ((name, t), want) in other.params.iter().zip(&reference) {
            if &bits(t)? != want {
                return Err(format!("rank {}'s {name} differs from rank 0's", other.rank).into());
            }
        }
        if other.checksum != first.checksum || other.losses != first.losses {
            return Err(format!("rank {} ended differently from rank 0", other.rank).into());
        }
    }
    println!(
        "Parameters: bitwise identical on all {} rank(s) (checksum {:016x}).",
        ranks.len(),
        first.checksum
    );
    if args.check {
        println!(
            "check: one process, {} micro-batch gradient(s) per step averaged with \
             dist::average, one unsharded {}...",
            args.ranks,
            algo.name()
        );
        let single = train_single(&args, &device)?;
        let held: usize = match args.mode {
            Mode::Zero1 => ranks.iter().map(|r| r.state_bytes).sum(),
            Mode::Ddp => first.state_bytes,
        };
        if held != single.state_bytes {
            return Err(format!(
                "check failed: the ranks hold {held} B of optimizer state, the single process {} B",
                single.state_bytes
            )
            .into());
        }
        let exact = args.mode == Mode::Ddp || args.max_grad_norm.is_none();
        compare(first, &single, exact)?;
    }
    Ok(())
}

#[cfg(not(feature = "nccl"))]
fn run_nccl(_: &Args) -> Result<()> {
    Err("--device cuda runs one process per GPU over NCCL: build with --features nccl".into())
}

/// One process per GPU: the launcher (no `--rank`) writes an NCCL id to a file and starts
/// `--ranks` copies of this program with `--rank r`; each joins the group on GPU r and runs
/// [`train_rank`]. With `--check` at one rank, rank 0 also trains the unsharded optimizer on the
/// same GPU and compares.
#[cfg(feature = "nccl")]
fn run_nccl(args: &Args) -> Result<()> {
    use candle_optim::dist::{NcclComm, NcclId};
    if let (Some(rank), Some(path)) = (args.rank, &args.nccl_id) {
        let id = NcclId::from_bytes(&std::fs::read(path)?)?;
        let device = Device::new_cuda(rank)?;
        let comm = NcclComm::new(&device, rank, args.ranks, &id)?;
        let result = train_rank(Arc::new(comm), &device, args)?;
        if args.check && args.ranks == 1 {
            let single = train_single(args, &device)?;
            let exact = args.mode == Mode::Ddp || args.max_grad_norm.is_none();
            compare(&result, &single, exact)?;
        } else if args.check && rank == 0 {
            println!("check: only at --ranks 1 over NCCL (one process per GPU)");
        }
        return Ok(());
    }
    let id = NcclId::new()?;
    let path = std::env::temp_dir().join(format!("candle-optim-nccl-{}.id", std::process::id()));
    std::fs::write(&path, id.to_bytes())?;
    println!(
        "{} rank(s), one process per GPU over NCCL; {} mode.",
        args.ranks,
        match args.mode {
            Mode::Zero1 => "zero1",
            Mode::Ddp => "ddp",
        }
    );
    let exe = std::env::current_exe()?;
    let mut children = Vec::with_capacity(args.ranks);
    for r in 0..args.ranks {
        let child = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .arg("--rank")
            .arg(r.to_string())
            .arg("--nccl-id")
            .arg(&path)
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                children.iter_mut().for_each(|c| {
                    let _ = c.kill();
                });
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
        }
    }
    let mut failed = Vec::new();
    for (r, mut c) in children.into_iter().enumerate() {
        if !c.wait()?.success() {
            failed.push(r);
        }
    }
    let _ = std::fs::remove_file(&path);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("rank(s) {failed:?} failed").into())
    }
}
