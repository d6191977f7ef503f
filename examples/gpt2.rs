//! A GPT-2-style language model on candle-nn (learned positions, pre-LayerNorm blocks, GELU,
//! causal self-attention, output head tied to the token embedding), with GPT-2's BPE tokenizer
//! (tiktoken-rs, compiled in), trained by any of the crate's optimizers or by several in turn.
//!
//! ```text
//! cargo run --release --example gpt2                                   # tiny preset, bundled text
//! cargo run --release --example gpt2 -- --optimizer adamw --steps 1000
//! cargo run --release --example gpt2 -- --text my.txt --preset small
//! cargo run --release --example gpt2 -- --compare all --steps 400     # table + PNG, ~10 min
//! cargo run --release --features cuda --example gpt2 -- --preset gpt2-small --device cuda
//! cargo run --release --example gpt2 -- --preset gpt2-small --steps 2 --batch 1 --context 128 \
//!     --eval-tokens 256                                          # the 124M model on a CPU
//! cargo run --release --example gpt2 -- --compare sgd_sai,adamw --seeds 42,43,44 # mean ± spread
//! cargo run --release --example gpt2 -- --preset gpt2-small --layers 2 --context 128 \
//!     --optimizer sgd_sai --diagnose 5               # per-tensor g-SNR and first-update sizes
//! ```
//!
//! Presets: `tiny` (the default; trains visibly on a laptop CPU in minutes), `small`, and
//! `gpt2-small`, the real 124M-parameter configuration (12 layers, 12 heads, width 768, context
//! 1024, the full 50257-token vocabulary), meant for `--features cuda` (on a CPU, a few steps).
//! The CPU presets keep only the GPT-2 token ids that occur in the corpus (`--vocab corpus`),
//! which makes the output layer several times smaller; `--vocab full` keeps all 50257.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_optim::{Algo, Optimizer};
use clap::{Parser, ValueEnum};
use common::gpt::{Config, Gpt};
use common::seeds;
use common::train::{self, Eval, Settings, Task};
use common::{nn, text, LrOverrides, Result, Rng};
use serde_json::json;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// 4 layers, 4 heads, width 128, context 64; batch 8.
    Tiny,
    /// 6 layers, 6 heads, width 384, context 256; batch 16.
    Small,
    /// GPT-2 small: 12 layers, 12 heads, width 768, context 1024, full vocabulary; batch 8.
    #[value(name = "gpt2-small")]
    Gpt2Small,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum VocabChoice {
    /// All 50257 GPT-2 tokens.
    Full,
    /// Only the GPT-2 token ids that occur in the corpus.
    Corpus,
}

impl Preset {
    /// (layers, heads, width, context, batch, steps, full vocabulary)
    fn shape(self) -> (usize, usize, usize, usize, usize, usize, bool) {
        match self {
            Preset::Tiny => (4, 4, 128, 64, 8, 600, false),
            Preset::Small => (6, 6, 384, 256, 16, 2000, false),
            Preset::Gpt2Small => (12, 12, 768, 1024, 8, 5000, true),
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    about = "Train a GPT-2-style language model on the bundled public-domain texts (or --text)"
)]
struct Args {
    /// Model size.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    preset: Preset,
    /// The optimizer: sgd_sai, adamw, adamp, adabelief, diffgrad, adan, lion, muon or sgd.
    #[arg(long, default_value = "sgd_sai")]
    optimizer: String,
    /// Train each of these optimizers (comma-separated, or `all`) from the same seed and data,
    /// and write a table and a plot of the loss curves to --out.
    #[arg(long)]
    compare: Option<String>,
    /// Peak learning rate (default: tuned per optimizer, see `default_lr`).
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay (Lion gets 10× this; SGD 0.1× as coupled L2).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Training steps (default: per preset).
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per step (default: per preset).
    #[arg(long)]
    batch: Option<usize>,
    /// Context length (default and maximum: the preset's).
    #[arg(long)]
    context: Option<usize>,
    /// Vocabulary (default: corpus for tiny and small, full for gpt2-small).
    #[arg(long, value_enum)]
    vocab: Option<VocabChoice>,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train every selected optimizer once per seed (comma-separated, e.g. 42,43,44) and write
    /// compare.md (final validation loss as mean ± spread over the seeds), compare.png and
    /// runs.json (every run's history) to --out. Default: the single --seed, as before.
    #[arg(long)]
    seeds: Option<String>,
    /// Per-optimizer peak learning rates, replacing --lr and the defaults for those named
    /// (e.g. sgd_sai=5e-4,adamw=1e-3).
    #[arg(long, value_parser = common::parse_lr_overrides)]
    lr_for: Option<LrOverrides>,
    /// Linear warmup steps (default: 5% of --steps, 1 to 200).
    #[arg(long)]
    warmup: Option<usize>,
    /// Where the cosine decay ends, as a fraction of the peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Clip the global gradient norm at this value (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// SGD-SaI's g-SNR rule (`SgdSaiConfig::gsnr_mode`; default: exact, the released v1.0.3).
    /// Only for sgd_sai.
    #[arg(long, value_parser = ["exact", "max_normalized", "sqrt_numel"])]
    gsnr_mode: Option<String>,
    /// Momentum of SGD-SaI and SGD (default: 0.9 for both). Only for those two.
    #[arg(long)]
    momentum: Option<f64>,
    /// Muon's Newton–Schulz element type (`MuonConfig::ns_dtype`; default: float32). bfloat16
    /// is torch's choice and, on CPUs with AVX512-BF16, about twice as fast. Only for muon.
    #[arg(long, value_parser = ["float32", "bfloat16"])]
    ns_dtype: Option<String>,
    /// Layers, replacing the preset's.
    #[arg(long)]
    layers: Option<usize>,
    /// Width (embedding size), replacing the preset's.
    #[arg(long)]
    width: Option<usize>,
    /// Attention heads, replacing the preset's (must divide the width).
    #[arg(long)]
    heads: Option<usize>,
    /// Instead of training: run this many steps of --optimizer on the training batches and
    /// print (and write to --out/diagnose-<optimizer>.md) each tensor's gradient norm, g-SNR
    /// and relative size of its first update, then the loss, gradient norm and the largest
    /// relative updates of every step.
    #[arg(long)]
    diagnose: Option<usize>,
    /// CPU threads (default: all cores; 1 can be faster on a machine busy with other work).
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, or cuda (build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Train on this text file (UTF-8, or gzip if it ends in .gz) instead of the bundled corpus.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Validate every this many steps (0: only at the end; default: 10 evaluations per run).
    #[arg(long)]
    eval_every: Option<usize>,
    /// At most this many validation tokens per evaluation (default: all; the evaluations
    /// during training use a quarter as many).
    #[arg(long)]
    eval_tokens: Option<usize>,
    /// Save model and optimizer state to this directory (at the end, and every --save-every
    /// steps). With --compare, one subdirectory per optimizer.
    #[arg(long)]
    save: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Stop after this many steps, as if interrupted, keeping --steps' schedule (with --save,
    /// a checkpoint that --resume continues exactly as if the run had not stopped).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Continue training from a checkpoint written by --save (same settings; --steps may grow).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// How the optimizer keeps its state: f32, bf16 or blockwise8 (8-bit blockwise, as
    /// bitsandbytes; tensors under 4096 elements keep f32 state).
    #[arg(long, default_value = "f32")]
    state_format: String,
    /// The weights' dtype: f32, or bf16 (math in f32: each weight is widened where it is
    /// used; no f32 master copy).
    #[arg(long, default_value = "f32")]
    weights: String,
    /// Write bf16 weights back with stochastic rounding (seeded by --seed) instead of
    /// round-to-nearest.
    #[arg(long)]
    stochastic_rounding: bool,
    /// Where --compare writes compare.md and compare.png (with --seeds also runs.json; with
    /// --diagnose diagnose-<optimizer>.md).
    #[arg(long, default_value = "target/compare/gpt2")]
    out: PathBuf,
    /// Tokens to sample from the model after training (default 120; 0 for gpt2-small).
    #[arg(long)]
    sample: Option<usize>,
}

/// Peak learning rates that train the tiny preset well with each optimizer, from 100-step sweeps
/// on the bundled corpus (validation loss): SGD-SaI 1e-3 / 3e-3 / 5e-3 / 1e-2: 6.340 / 6.275 /
/// 6.330 / 6.483; AdamW 1e-3 / 3e-3: 6.185 / 6.229; Lion 1e-4 / 3e-4 / 1e-3: 8.247 / 7.024 /
/// 6.128; Adan 3e-3: 6.242 (see examples/results/README.md). Larger models want smaller rates:
/// on the 124M `gpt2-small` preset SGD-SaI at 3e-3 diverged in its first steps (train loss
/// 11.0 → 14.5 by step 4 on CPU, → 27 by step 28 on an H200); at 1e-3 it spiked in a 100-step
/// run with a 5-step warmup and recovered (examples/results/h200/); on the CPU at width 768 the
/// same instability sets in at 1e-3 and not at 3e-4, which that preset takes.
fn default_lr(algo: Algo, preset: Preset) -> f64 {
    if preset == Preset::Gpt2Small && algo == Algo::SgdSai {
        // Width 768 (2 layers, context 128, batch 4×128, clipping at 1; see
        // examples/results/sgd-sai-gpt2-768/): at 1e-3 the gradient norm climbs from 10 to 25-39
        // and the loss goes back above its start by step 15-28; 5e-4 trains (6.125 after 150
        // steps) and 3e-4 trains better (6.069 ± 0.020 over 3 seeds; AdamW 1e-3: 5.885).
        return 3e-4;
    }
    match algo {
        Algo::SgdSai => 3e-3,
        Algo::AdamW | Algo::AdamP | Algo::AdaBelief | Algo::DiffGrad => 1e-3,
        Algo::Adan => 3e-3,
        Algo::Lion => 1e-3,
        // Not swept: one rate for the matrices (Muon) and the auxiliary AdamW.
        Algo::Muon => 3e-3,
        // Not swept: SGD with momentum 0.9 (common::make_optimizer). One 60-step run of the tiny
        // preset: validation loss 7.118 (AdamW at 1e-3: 6.489).
        Algo::Sgd => 3e-2,
    }
}

struct LmTask<'a> {
    model: Gpt,
    train: &'a [u32],
    val: &'a [u32],
    batch: usize,
    ctx: usize,
    seed: u64,
    dev: Device,
    /// The most validation tokens one evaluation uses.
    eval_tokens: usize,
}

impl LmTask<'_> {
    fn loss_at(&self, tokens: &[u32], starts: &[usize]) -> candle_core::Result<Tensor> {
        let t = self.ctx;
        let mut x = Vec::with_capacity(starts.len() * t);
        let mut y = Vec::with_capacity(starts.len() * t);
        for &s in starts {
            x.extend_from_slice(&tokens[s..s + t]);
            y.extend_from_slice(&tokens[s + 1..s + t + 1]);
        }
        let x = Tensor::from_vec(x, (starts.len(), t), &self.dev)?;
        let y = Tensor::from_vec(y, starts.len() * t, &self.dev)?;
        nn::cross_entropy(&self.model.forward(&x)?, &y)
    }

    /// Samples `n` tokens after `prompt` (temperature 0.8, top-40), from `seed`.
    fn sample(&self, prompt: &[u32], n: usize, seed: u64) -> candle_core::Result<Vec<u32>> {
        let mut rng = Rng::new(seed);
        let mut ids = prompt.to_vec();
        for _ in 0..n {
            let start = ids.len().saturating_sub(self.ctx);
            let ctx = &ids[start..];
            let x = Tensor::new(ctx, &self.dev)?.unsqueeze(0)?;
            let logits = self.model.forward(&x)?.i(ctx.len() - 1)?;
            let logits: Vec<f32> = (logits / 0.8)?.to_vec1()?;
            let mut top: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1));
            top.truncate(40);
            let m = top[0].1;
            let w: Vec<f64> = top.iter().map(|p| ((p.1 - m) as f64).exp()).collect();
            let mut r = rng.uniform() * w.iter().sum::<f64>();
            let mut pick = top[top.len() - 1].0;
            for (p, wi) in top.iter().zip(&w) {
                if r < *wi {
                    pick = p.0;
                    break;
                }
                r -= wi;
            }
            ids.push(pick as u32);
        }
        Ok(ids[prompt.len()..].to_vec())
    }
}

impl Task for LmTask<'_> {
    fn train_loss(&mut self, step: usize) -> candle_core::Result<Tensor> {
        // Random windows, drawn from the seed and the step alone.
        let mut rng = Rng::new(self.seed ^ 0x6E27_0000 ^ (step as u64).wrapping_mul(0x9E37_79B9));
        let span = self.train.len() - self.ctx - 1;
        let starts: Vec<usize> = (0..self.batch).map(|_| rng.below(span)).collect();
        self.loss_at(self.train, &starts)
    }

    fn evaluate(&mut self, full: bool) -> candle_core::Result<Eval> {
        // Non-overlapping windows over the validation tokens: all of them at the end (at most
        // --eval-tokens' worth, evenly spread), a quarter of those during training.
        let n = (self.val.len() - 1) / self.ctx;
        let cap = (self.eval_tokens / self.ctx).max(1);
        let k = if full {
            n.min(cap)
        } else {
            (n.min(cap) / 4).max(1)
        };
        let picked: Vec<usize> = (0..k).map(|i| (i * n / k) * self.ctx).collect();
        let mut total = 0.0;
        for chunk in picked.chunks((16384 / self.ctx).clamp(1, 64)) {
            total += self.loss_at(self.val, chunk)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        }
        Ok(Eval {
            loss: total / picked.len() as f64,
            acc: None,
        })
    }

    fn items_per_step(&self) -> usize {
        self.batch * self.ctx
    }

    fn unit(&self) -> &'static str {
        "tok"
    }
}

/// Everything the runs of one invocation share.
struct Setup {
    cfg: Config,
    /// Training and validation window length.
    ctx: usize,
    batch: usize,
    steps: usize,
    train: Vec<u32>,
    val: Vec<u32>,
    vocab: text::Vocab,
}

fn build(cfg: Config, seed: u64, dev: &Device, weights: DType) -> Result<(VarMap, Gpt)> {
    let varmap = VarMap::new();
    let model = Gpt::new(cfg, VarBuilder::from_varmap(&varmap, weights, dev))?;
    common::seeded_init(&varmap, seed, nn::gpt2_init(cfg.n_layer))?;
    Ok((varmap, model))
}

/// The peak learning rate of `algo`: --lr-for's, else --lr, else the default.
fn lr_of(args: &Args, algo: Algo) -> f64 {
    args.lr_for
        .as_ref()
        .and_then(|o| o.get(algo))
        .or(args.lr)
        .unwrap_or_else(|| default_lr(algo, args.preset))
}

/// The learning-rate schedule over `steps` (--warmup, --min-lr-ratio).
fn schedule_of(args: &Args, steps: usize) -> candle_optim::Schedule {
    train::schedule(steps, args.warmup, args.min_lr_ratio)
}

/// Builds `algo` over `varmap` with every setting of the command line (rate, weight decay,
/// state format, rounding, --momentum / --gsnr-mode where they apply, clipping).
fn make_opt(args: &Args, algo: Algo, varmap: &VarMap, seed: u64) -> Result<Box<dyn Optimizer>> {
    let mut opt = common::make_optimizer_over(
        algo,
        varmap,
        lr_of(args, algo),
        args.weight_decay,
        &args.state_format,
        args.stochastic_rounding.then_some(seed),
        &common::algo_overrides(
            algo,
            args.momentum,
            args.gsnr_mode.as_deref(),
            args.ns_dtype.as_deref(),
        ),
    )?;
    opt.set_max_grad_norm((args.clip > 0.0).then_some(args.clip))?;
    Ok(opt)
}

/// The training recipe beyond the rate, in words; `None` when every option is at its default.
fn recipe(args: &Args, steps: usize) -> Option<String> {
    let default = args.warmup.is_none()
        && args.min_lr_ratio == 0.1
        && args.clip == 1.0
        && args.gsnr_mode.is_none()
        && args.momentum.is_none()
        && args.ns_dtype.is_none()
        && args.lr_for.is_none();
    (!default).then(|| recipe_text(args, steps))
}

fn recipe_text(args: &Args, steps: usize) -> String {
    train::recipe_text(
        args.warmup,
        steps,
        args.min_lr_ratio,
        args.clip,
        args.weight_decay,
        args.gsnr_mode.as_deref(),
        args.momentum,
        args.lr_for.as_ref(),
    )
}

fn run_one<'a>(
    args: &Args,
    setup: &'a Setup,
    algo: Algo,
    seed: u64,
    dev: &Device,
    save: Option<PathBuf>,
    resume: Option<PathBuf>,
) -> Result<(train::Outcome, LmTask<'a>)> {
    let (mut varmap, model) = build(setup.cfg, seed, dev, common::weights_dtype(&args.weights)?)?;
    let lr = lr_of(args, algo);
    let mut opt = make_opt(args, algo, &varmap, seed)?;
    let mut task = LmTask {
        model,
        train: &setup.train,
        val: &setup.val,
        batch: setup.batch,
        ctx: setup.ctx,
        seed,
        dev: dev.clone(),
        eval_tokens: args.eval_tokens.unwrap_or(usize::MAX),
    };
    let settings = Settings {
        steps: setup.steps,
        eval_every: args.eval_every.unwrap_or((setup.steps / 10).max(1)),
        save_every: args.save_every,
        stop_after: args.stop_after,
        save,
        resume,
        example: "gpt2",
        lr,
        schedule: schedule_of(args, setup.steps),
        config: json!({
            "model": setup.cfg,
            "context": setup.ctx,
            "corpus_tokens": [setup.train.len(), setup.val.len()],
            "batch": setup.batch,
            "seed": seed,
            "lr": lr,
            "state_format": args.state_format,
            "weights": args.weights,
            "stochastic_rounding": args.stochastic_rounding,
            "weight_decay": args.weight_decay,
            "warmup": args.warmup,
            "min_lr_ratio": args.min_lr_ratio,
            "clip": args.clip,
            "optimizer_overrides":
                common::algo_overrides(
            algo,
            args.momentum,
            args.gsnr_mode.as_deref(),
            args.ns_dtype.as_deref(),
        ),
        }),
    };
    let out = train::train(&mut task, &mut varmap, opt.as_mut(), algo, &settings)?;
    Ok((out, task))
}

fn main() {
    train::exit_on_error(run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    common::set_threads(args.threads);
    let dev = common::device(&args.device)?;
    let algos = common::select_algos(
        &args.optimizer,
        args.compare.as_deref(),
        args.resume.is_some(),
    )?;
    let seeds = args.seeds.as_deref().map(common::parse_seeds).transpose()?;
    if seeds.is_some() && (args.resume.is_some() || args.stop_after.is_some()) {
        return Err(
            "--seeds trains whole runs: it cannot be combined with --resume or --stop-after".into(),
        );
    }
    if args.diagnose.is_some() && (args.compare.is_some() || seeds.is_some()) {
        return Err(
            "--diagnose runs one --optimizer from --seed (not --compare or --seeds)".into(),
        );
    }
    if !(args.clip >= 0.0 && args.clip.is_finite()) {
        return Err("--clip must be 0 (off) or a positive norm".into());
    }
    if !(0.0..=1.0).contains(&args.min_lr_ratio) {
        return Err("--min-lr-ratio must be in [0, 1]".into());
    }
    let (n_layer, n_head, n_embd, n_ctx, batch, steps, full) = args.preset.shape();
    let (n_layer, n_head, n_embd) = (
        args.layers.unwrap_or(n_layer),
        args.heads.unwrap_or(n_head),
        args.width.unwrap_or(n_embd),
    );
    if n_layer == 0 || n_head == 0 || n_embd == 0 || !n_embd.is_multiple_of(n_head) {
        return Err(format!(
            "--layers, --heads and --width must be at least 1, and the width ({n_embd}) a \
             multiple of the heads ({n_head})"
        )
        .into());
    }
    let n_ctx_used = args.context.unwrap_or(n_ctx);
    if n_ctx_used == 0 || n_ctx_used > n_ctx {
        return Err(format!("--context must be in 1..={n_ctx} for this preset").into());
    }
    let corpus = text::load(args.text.as_deref(), 0.1)?;
    let vocab = match args.vocab.unwrap_or(if full {
        VocabChoice::Full
    } else {
        VocabChoice::Corpus
    }) {
        VocabChoice::Full => text::Vocab::full(),
        VocabChoice::Corpus => text::Vocab::of_corpus(&corpus),
    };
    let (train_ids, val_ids) = (vocab.encode(&corpus.train), vocab.encode(&corpus.val));
    if val_ids.len() < n_ctx_used + 2 || train_ids.len() < n_ctx_used + 2 {
        return Err(format!(
            "the text is too short: {} training / {} validation tokens for a context of {n_ctx_used}",
            train_ids.len(),
            val_ids.len()
        )
        .into());
    }
    let cfg = Config {
        n_layer,
        n_head,
        n_embd,
        n_ctx,
        vocab: vocab.len(),
    };
    let setup = Setup {
        cfg,
        ctx: n_ctx_used,
        batch: args.batch.unwrap_or(batch),
        steps: args.steps.unwrap_or(steps),
        train: train_ids,
        val: val_ids,
        vocab,
    };
    if setup.steps == 0 || setup.batch == 0 {
        return Err("--steps and --batch must be at least 1".into());
    }
    println!("Text: {}.", corpus.description);
    println!(
        "Tokens (GPT-2 BPE): {} training, {} validation (the last 10% of each text); vocabulary: {}.",
        setup.train.len(),
        setup.val.len(),
        if setup.vocab.full {
            "all 50257 GPT-2 tokens".to_string()
        } else {
            format!(
                "the {} GPT-2 token ids that occur in the text (--vocab full for all 50257)",
                setup.vocab.len()
            )
        }
    );
    let (varmap, _) = build(cfg, args.seed, &dev, common::weights_dtype(&args.weights)?)?;
    let seed_text = match &seeds {
        None => format!("seed {}", args.seed),
        Some(s) => format!(
            "seeds {}",
            s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    println!(
        "Model: GPT-2-style, {n_layer} layers, {n_head} heads, width {n_embd}, context {}, \
         {} parameters (preset {:?}); {} steps of {}×{} tokens on {:?}, {seed_text}.",
        n_ctx,
        common::count_params(&varmap),
        args.preset,
        setup.steps,
        setup.batch,
        setup.ctx,
        dev,
    );
    drop(varmap);
    if let Some(r) = recipe(&args, setup.steps) {
        println!("Recipe: {r}.");
    }
    let preset_name = args
        .preset
        .to_possible_value()
        .map_or("custom".into(), |v| v.get_name().to_string());
    let corpus_name = if args.text.is_some() {
        "--text"
    } else {
        "bundled corpus"
    };
    if let Some(n) = args.diagnose {
        return diagnose(&args, &setup, algos[0], &dev, n);
    }
    if let Some(seed_list) = seeds {
        let title = format!(
            "GPT-2 {preset_name} ({n_layer} layers × {n_embd}, {n_head} heads, context {}), \
             {corpus_name}: {} steps × {}×{} tokens, {seed_text}; {}{}",
            setup.ctx,
            setup.steps,
            setup.batch,
            setup.ctx,
            recipe_text(&args, setup.steps),
            if args.state_format == "f32" {
                String::new()
            } else {
                format!(", {} optimizer state", args.state_format)
            }
        );
        let plot_title = format!(
            "GPT-2 {preset_name} ({n_layer} layers × {n_embd}, context {}): {} steps, {} seeds",
            setup.ctx,
            setup.steps,
            seed_list.len()
        );
        let config = json!({
            "example": "gpt2",
            "preset": preset_name,
            "model": setup.cfg,
            "context": setup.ctx,
            "batch": setup.batch,
            "steps": setup.steps,
            "text": args.text,
            "seeds": seed_list,
            "lr": algos.iter().map(|&a| (a.name(), lr_of(&args, a))).collect::<std::collections::BTreeMap<_, _>>(),
            "weight_decay": args.weight_decay,
            "warmup": args.warmup.unwrap_or_else(|| train::default_warmup(setup.steps)),
            "min_lr_ratio": args.min_lr_ratio,
            "clip": args.clip,
            "gsnr_mode": args.gsnr_mode,
            "momentum": args.momentum,
            "ns_dtype": args.ns_dtype,
            "state_format": args.state_format,
            "weights": args.weights,
            "stochastic_rounding": args.stochastic_rounding,
            "eval_tokens": args.eval_tokens,
        });
        return seeds::run_all(
            &algos,
            &seed_list,
            args.save.as_deref(),
            &args.out,
            &title,
            &plot_title,
            false,
            &config,
            |algo, seed, save| run_one(&args, &setup, algo, seed, &dev, save, None).map(|r| r.0),
        );
    }
    match &args.compare {
        None => {
            let algo = algos[0];
            println!(
                "Optimizer: {} (lr {:.1e}, weight decay {}, warmup + cosine schedule, {}).",
                algo.name(),
                lr_of(&args, algo),
                args.weight_decay * common::weight_decay_factor(algo),
                if args.clip > 0.0 {
                    format!("clipping at {}", args.clip)
                } else {
                    "no clipping".into()
                }
            );
            let (_, task) = run_one(
                &args,
                &setup,
                algo,
                args.seed,
                &dev,
                args.save.clone(),
                args.resume.clone(),
            )?;
            let n = args.sample.unwrap_or(if args.preset == Preset::Gpt2Small {
                0
            } else {
                120
            });
            if n > 0 {
                let prompt = setup.vocab.encode(&[text::EOT]);
                let out = task.sample(&prompt, n, args.seed)?;
                println!(
                    "\nA sample ({n} tokens, temperature 0.8, top-40):\n{}",
                    setup.vocab.decode(&out)
                );
            }
        }
        Some(_) => {
            let mut outcomes = Vec::new();
            for &algo in &algos {
                let save = args.save.as_ref().map(|d| d.join(algo.name()));
                outcomes.push(run_one(&args, &setup, algo, args.seed, &dev, save, None)?.0);
            }
            let title = format!(
                "GPT-2 {} ({} layers × {}, context {}), {}: {} steps × {}×{} tokens, seed {}",
                preset_name,
                n_layer,
                n_embd,
                setup.ctx,
                corpus_name,
                setup.steps,
                setup.batch,
                setup.ctx,
                args.seed
            );
            let title = if args.state_format == "f32" {
                title
            } else {
                format!("{title}, {} optimizer state", args.state_format)
            };
            let title = match (recipe(&args, setup.steps), args.heads) {
                (None, None) => title,
                (r, h) => format!(
                    "{title}{}{}",
                    h.map_or(String::new(), |h| format!(", {h} heads")),
                    r.map_or(String::new(), |r| format!("; {r}"))
                ),
            };
            train::report(&args.out, &title, &outcomes, false)?;
        }
    }
    Ok(())
}

/// Orders parameter names with their numeric segments as numbers (`h.2` before `h.10`).
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|seg| match seg.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, seg.to_string()),
        })
        .collect()
}

fn l2(t: &Tensor) -> candle_core::Result<f64> {
    Ok(t.to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?
        .sqrt() as f64)
}

/// `--diagnose N`: N steps of `algo` on the training batches, in a loop of our own that
/// snapshots the parameters around each step (no other extra pass), and a Markdown report.
fn diagnose(args: &Args, setup: &Setup, algo: Algo, dev: &Device, n: usize) -> Result<()> {
    let seed = args.seed;
    let (varmap, model) = build(setup.cfg, seed, dev, common::weights_dtype(&args.weights)?)?;
    let lr = lr_of(args, algo);
    let mut opt = make_opt(args, algo, &varmap, seed)?;
    opt.set_schedule(Some(schedule_of(args, setup.steps)))?;
    let mut task = LmTask {
        model,
        train: &setup.train,
        val: &setup.val,
        batch: setup.batch,
        ctx: setup.ctx,
        seed,
        dev: dev.clone(),
        eval_tokens: args.eval_tokens.unwrap_or(usize::MAX),
    };
    let mut vars: Vec<(String, Var)> = {
        let data = varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    vars.sort_by_key(|v| natural_key(&v.0));
    let c = setup.cfg;
    let mut md = format!(
        "# --diagnose {n}: {} on GPT-2 ({} layers × {}, {} heads, context {}, vocabulary {}), \
         batch {}×{}, seed {seed}\n\nPeak lr {lr:e}, {} steps' schedule ({}).\n\n",
        algo.name(),
        c.n_layer,
        c.n_embd,
        c.n_head,
        setup.ctx,
        c.vocab,
        setup.batch,
        setup.ctx,
        setup.steps,
        recipe_text(args, setup.steps),
    );
    print!("{md}");
    let mut steps_md = String::from(
        "| step | lr | train loss | grad norm (before clipping) | clip scale | ‖Δp‖/‖p‖ (all) | \
         largest ‖Δp‖/‖p‖ | largest among matrices |\n|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for step in 0..n {
        let before: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().to_dtype(DType::F32)?.copy())
            .collect::<candle_core::Result<_>>()?;
        let lr_now = opt.learning_rate();
        let loss = task.train_loss(step)?;
        let grads = loss.backward()?;
        let l = loss.to_scalar::<f32>()? as f64;
        let rep = opt.step(&grads)?;
        // (name, ‖p‖, ‖Δp‖, rank)
        let mut moved = Vec::with_capacity(vars.len());
        let (mut p_sq, mut d_sq) = (0.0, 0.0);
        for ((name, v), b) in vars.iter().zip(&before) {
            let pn = l2(b)?;
            let dn = l2(&(v.as_tensor().to_dtype(DType::F32)? - b)?)?;
            p_sq += pn * pn;
            d_sq += dn * dn;
            moved.push((name.as_str(), pn, dn, v.rank()));
        }
        if step == 0 {
            md.push_str(&first_step_table(
                opt.as_ref(),
                algo,
                &vars,
                &grads,
                &moved,
                lr_now,
                rep.clip_scale(),
            )?);
        }
        let top = |matrices_only: bool| {
            let mut ranked: Vec<(&str, f64)> = moved
                .iter()
                .filter(|m| m.1 > 0.0 && (!matrices_only || m.3 >= 2))
                .map(|m| (m.0, m.2 / m.1))
                .collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            ranked
                .iter()
                .take(3)
                .map(|(n, r)| format!("{n} {r:.3e}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let skipped = match &rep.skipped() {
            Some(why) => format!(" (step skipped: {why:?})"),
            None => String::new(),
        };
        let line = format!(
            "| {} | {lr_now:.3e} | {l:.4}{skipped} | {} | {:.4} | {:.3e} | {} | {} |\n",
            step + 1,
            rep.grad_norm()
                .map_or("- (no clipping: not computed)".into(), |g| format!(
                    "{g:.4}"
                )),
            rep.clip_scale(),
            (d_sq / p_sq.max(f64::MIN_POSITIVE)).sqrt(),
            top(false),
            top(true)
        );
        if step == 0 {
            print!("## Every step\n\n{steps_md}");
        }
        print!("{line}");
        steps_md.push_str(&line);
        if !l.is_finite() {
            println!("The loss is {l} at step {}; stopping.", step + 1);
            break;
        }
    }
    md.push_str("## Every step\n\n");
    md.push_str(&steps_md);
    md.push_str(
        "\nlr: the rate of that step (peak × schedule); grad norm: the global L2 norm before \
         clipping (StepReport::grad_norm); ‖Δp‖/‖p‖ (all): over all parameters together; largest: \
         the three tensors with the largest ‖Δp‖/‖p‖ (tensors with ‖p‖ = 0 left out; zero-initialised \
         biases, just moved off 0, often lead from step 2 on); among matrices: the same over the \
         tensors of rank ≥ 2 (weights and embeddings).\n",
    );
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let path = args.out.join(format!("diagnose-{}.md", algo.name()));
    std::fs::write(&path, &md).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("\nWrote {}", path.display());
    Ok(())
}

/// The first step's per-tensor table (printed, and returned for the report).
fn first_step_table(
    opt: &dyn Optimizer,
    algo: Algo,
    vars: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
    moved: &[(&str, f64, f64, usize)],
    lr: f64,
    clip_scale: f64,
) -> Result<String> {
    // AdamW's first update, in closed form: m̂ = c·g and v̂ = (c·g)² after bias correction, so
    // Δ = lr · c·g / (|c·g| + eps) element by element (eps = 1e-8, AdamW's default; c the
    // clipping scale; weight decay left out): ‖Δ‖ = lr · √Σ (|g| / (|g| + eps/c))², which is
    // lr · √(number of nonzero g) unless gradients are near eps.
    let eps = 1e-8 / clip_scale.max(f64::MIN_POSITIVE);
    let mut t = String::new();
    t.push_str("## Step 1, per tensor\n\n");
    let gmax = opt
        .global_scalars()
        .into_iter()
        .find(|s| s.0 == "gsnr_max")
        .map(|s| s.1);
    if let Some(g) = gmax {
        t.push_str(&format!(
            "max_normalized: each tensor's rate is lr · g-SNR / {g:.4e} (the largest g-SNR).\n\n"
        ));
    }
    t.push_str(&format!(
        "lr at step 1: {lr:.4e}; clipping scale {clip_scale:.4}.\n\n\
         | tensor | numel | ‖g‖ | g-SNR | √numel | ‖p‖ | ‖Δp‖ | ‖Δp‖/‖p‖ | AdamW ‖Δp‖/‖p‖ | ratio to AdamW |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    ));
    for ((name, v), m) in vars.iter().zip(moved) {
        let numel = v.elem_count();
        let (gn, adam) = match grads.get(v.as_tensor()) {
            Some(g) => {
                let g = g.to_dtype(DType::F32)?;
                let a = g.abs()?;
                let unit = (&a / (&a + eps)?)?;
                (l2(&g)?, lr * l2(&unit)?)
            }
            None => (0.0, 0.0),
        };
        let gsnr = opt
            .param_state(name)
            .and_then(|s| s.scalars.iter().find(|p| p.0 == "gsnr").map(|p| p.1));
        let (pn, dn) = (m.1, m.2);
        let rel = |x: f64| {
            if pn > 0.0 {
                format!("{:.3e}", x / pn)
            } else {
                "- (‖p‖ = 0)".into()
            }
        };
        let ratio = if adam > 0.0 {
            format!("{:.3}", dn / adam)
        } else {
            "-".into()
        };
        t.push_str(&format!(
            "| {name} | {numel} | {gn:.4e} | {} | {:.1} | {pn:.4e} | {dn:.4e} | {} | {} | {ratio} |\n",
            gsnr.map_or("-".into(), |g| format!("{g:.1}")),
            (numel as f64).sqrt(),
            rel(dn),
            rel(adam),
        ));
    }
    t.push_str(&format!(
        "\n‖g‖: before clipping. g-SNR: {}. ‖Δp‖: measured, the parameters after the step minus \
         before (weight decay included). AdamW: the first update AdamW would make at the same \
         lr, in closed form: lr · c·g/(|c·g| + 1e-8) per element (c: the clipping scale), \
         weight decay left out. ratio to AdamW: ‖Δp‖ over AdamW's ‖Δp‖.\n\n",
        if algo == Algo::SgdSai {
            "SGD-SaI's per-tensor scalar `gsnr` (opt.param_state), fixed at this step"
        } else {
            "only SGD-SaI has one"
        }
    ));
    print!("{t}");
    Ok(t)
}
