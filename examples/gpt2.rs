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
//! ```
//!
//! Presets: `tiny` (the default; trains visibly on a laptop CPU in minutes), `small`, and
//! `gpt2-small`, the real 124M-parameter configuration (12 layers, 12 heads, width 768, context
//! 1024, the full 50257-token vocabulary), meant for `--features cuda` (on a CPU, a few steps).
//! The CPU presets keep only the GPT-2 token ids that occur in the corpus (`--vocab corpus`),
//! which makes the output layer several times smaller; `--vocab full` keeps all 50257.

mod common;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder, VarMap};
use candle_optim::Algo;
use clap::{Parser, ValueEnum};
use common::train::{self, Eval, Settings, Task};
use common::{nn, text, Result, Rng};
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

#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Config {
    n_layer: usize,
    n_head: usize,
    n_embd: usize,
    /// Positions (the preset's context length; training windows may be shorter).
    n_ctx: usize,
    vocab: usize,
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
    /// Where --compare writes compare.md and compare.png.
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
/// run with a 5-step warmup and recovered (examples/results/h200/), so that preset takes 1e-3.
fn default_lr(algo: Algo, preset: Preset) -> f64 {
    if preset == Preset::Gpt2Small && algo == Algo::SgdSai {
        return 1e-3;
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

struct Gpt {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<nn::Block>,
    ln_f: nn::LayerNorm,
    mask: Tensor,
    cfg: Config,
}

impl Gpt {
    fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            wte: embedding(cfg.vocab, cfg.n_embd, vb.pp("wte"))?,
            wpe: embedding(cfg.n_ctx, cfg.n_embd, vb.pp("wpe"))?,
            blocks: (0..cfg.n_layer)
                .map(|i| nn::Block::new(cfg.n_embd, cfg.n_head, 4, vb.pp(format!("h.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            ln_f: nn::LayerNorm::new(cfg.n_embd, vb.pp("ln_f"))?,
            mask: nn::causal_mask(cfg.n_ctx, vb.device())?,
            cfg,
        })
    }

    /// Logits `[b·t, vocab]` for token ids `idx: [b, t]`.
    fn forward(&self, idx: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let pos = Tensor::arange(0u32, t as u32, idx.device())?;
        let mut x =
            nn::f32(&self.wte.forward(idx)?)?.broadcast_add(&nn::f32(&self.wpe.forward(&pos)?)?)?;
        let mask = self.mask.i((..t, ..t))?.contiguous()?;
        for blk in &self.blocks {
            x = blk.forward(&x, Some(&mask))?;
        }
        let x = self.ln_f.forward(&x)?.reshape((b * t, self.cfg.n_embd))?;
        // The output head is the token embedding, transposed (weight tying).
        x.matmul(&nn::f32(self.wte.embeddings())?.t()?)
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

fn run_one<'a>(
    args: &Args,
    setup: &'a Setup,
    algo: Algo,
    dev: &Device,
    save: Option<PathBuf>,
    resume: Option<PathBuf>,
) -> Result<(train::Outcome, LmTask<'a>)> {
    let (mut varmap, model) = build(
        setup.cfg,
        args.seed,
        dev,
        common::weights_dtype(&args.weights)?,
    )?;
    let lr = args.lr.unwrap_or_else(|| default_lr(algo, args.preset));
    let mut opt = common::make_optimizer_with(
        algo,
        &varmap,
        lr,
        args.weight_decay,
        &args.state_format,
        args.stochastic_rounding.then_some(args.seed),
    )?;
    opt.set_max_grad_norm(Some(1.0))?;
    let mut task = LmTask {
        model,
        train: &setup.train,
        val: &setup.val,
        batch: setup.batch,
        ctx: setup.ctx,
        seed: args.seed,
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
        schedule: train::default_schedule(setup.steps),
        config: json!({
            "model": setup.cfg,
            "context": setup.ctx,
            "corpus_tokens": [setup.train.len(), setup.val.len()],
            "batch": setup.batch,
            "seed": args.seed,
            "lr": lr,
            "state_format": args.state_format,
            "weights": args.weights,
            "stochastic_rounding": args.stochastic_rounding,
            "weight_decay": args.weight_decay,
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
    let (n_layer, n_head, n_embd, n_ctx, batch, steps, full) = args.preset.shape();
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
    println!(
        "Model: GPT-2-style, {n_layer} layers, {n_head} heads, width {n_embd}, context {}, \
         {} parameters (preset {:?}); {} steps of {}×{} tokens on {:?}, seed {}.",
        n_ctx,
        common::count_params(&varmap),
        args.preset,
        setup.steps,
        setup.batch,
        setup.ctx,
        dev,
        args.seed
    );
    drop(varmap);
    match &args.compare {
        None => {
            let algo = algos[0];
            println!(
                "Optimizer: {} (lr {:.1e}, weight decay {}, warmup + cosine schedule, clipping at 1).",
                algo.name(),
                args.lr.unwrap_or_else(|| default_lr(algo, args.preset)),
                args.weight_decay * common::weight_decay_factor(algo)
            );
            let (_, task) = run_one(
                &args,
                &setup,
                algo,
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
                outcomes.push(run_one(&args, &setup, algo, &dev, save, None)?.0);
            }
            let title = format!(
                "GPT-2 {} ({} layers × {}, context {}), {}: {} steps × {}×{} tokens, seed {}",
                args.preset
                    .to_possible_value()
                    .map_or("custom".into(), |v| v.get_name().to_string()),
                n_layer,
                n_embd,
                setup.ctx,
                if args.text.is_some() {
                    "--text"
                } else {
                    "bundled corpus"
                },
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
            train::report(&args.out, &title, &outcomes, false)?;
        }
    }
    Ok(())
}
