//! Image classification on CIFAR-10 (or, offline, the Fashion-MNIST subset bundled with the
//! repo) with a small ResNet or a small ViT written on candle-nn, trained by any of the crate's
//! optimizers, or by several of them in turn for a comparison.
//!
//! ```text
//! cargo run --release --example cifar                                  # ResNet, bundled data
//! cargo run --release --example cifar -- --model vit --optimizer adamw
//! cargo run --release --example cifar -- --data-dir path/to/cifar-10-batches-bin
//! cargo run --release --example cifar -- --compare all                # table + PNG, ~10 min
//! cargo run --release --example cifar -- --save ckpt --stop-after 200   # then --resume ckpt
//! cargo run --release --example cifar -- --compare sgd_sai,adamw --seeds 42,43,44  # mean ± spread
//! ```
//!
//! Without `--data-dir` the example trains on `examples/data/fashion-mnist`: 8000 training and
//! 2000 test images of Fashion-MNIST (MIT licence), padded to 32×32×3 and stored in the CIFAR-10
//! binary format, so the same reader runs on both. It says which data set it is using.

mod common;

use candle_core::{DType, Device, ModuleT, Tensor, D};
use candle_nn::{
    batch_norm, conv2d_no_bias, linear, BatchNorm, Conv2d, Conv2dConfig, Linear, Module,
    VarBuilder, VarMap,
};
use candle_optim::{Algo, Optimizer};
use clap::{Parser, ValueEnum};
use common::seeds;
use common::train::{self, Eval, Settings, Task};
use common::{cifar, nn, LrOverrides, Result, Rng};
use serde_json::json;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Model {
    /// ResNet-style: a 3×3 stem, three stages of basic blocks (16, 32, 64 channels, stride 2
    /// between stages), BatchNorm (training mode while training), global average pooling.
    Resnet,
    /// A small ViT: 4×4 patches (64 tokens), learned positions, pre-LayerNorm blocks, mean
    /// pooling.
    Vit,
}

#[derive(Parser, Debug)]
#[command(about = "Train a small ResNet or ViT on CIFAR-10 (or the bundled Fashion-MNIST subset)")]
struct Args {
    /// The network.
    #[arg(long, value_enum, default_value_t = Model::Resnet)]
    model: Model,
    /// Directory with CIFAR-10's binary files (data_batch_1..5.bin, test_batch.bin). Without
    /// it: the Fashion-MNIST subset bundled with the repo.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The optimizer: sgd_sai, adamw, adamp, adabelief, diffgrad, adan, lion, muon or sgd.
    #[arg(long, default_value = "sgd_sai")]
    optimizer: String,
    /// Train each of these optimizers (comma-separated, or `all`) from the same seed and data,
    /// and write a table and a plot of the loss curves to --out.
    #[arg(long)]
    compare: Option<String>,
    /// Peak learning rate (default: tuned per optimizer and model, see `default_lr`).
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay (Lion gets 10× this; SGD 0.1× as coupled L2).
    #[arg(long, default_value_t = 5e-2)]
    weight_decay: f64,
    /// Training steps.
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Channels of the ResNet's first stage (default 16), or the ViT's width (default 64).
    #[arg(long)]
    width: Option<usize>,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train every selected optimizer once per seed (comma-separated, e.g. 42,43,44) and write
    /// compare.md (final validation loss and accuracy as mean ± spread over the seeds),
    /// compare.png and runs.json (every run's history) to --out. Default: the single --seed, as
    /// before.
    #[arg(long)]
    seeds: Option<String>,
    /// Per-optimizer peak learning rates, replacing --lr and the defaults for those named
    /// (e.g. sgd_sai=1e-2,adamw=3e-3).
    #[arg(long, value_parser = common::parse_lr_overrides)]
    lr_for: Option<LrOverrides>,
    /// Linear warmup steps (default: 5% of --steps, 1 to 200).
    #[arg(long)]
    warmup: Option<usize>,
    /// Where the cosine decay ends, as a fraction of the peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Clip the global gradient norm at this value (0, the default: no clipping).
    #[arg(long, default_value_t = 0.0)]
    clip: f64,
    /// SGD-SaI's g-SNR rule (`SgdSaiConfig::gsnr_mode`; default: exact, the released v1.0.3).
    /// Only for sgd_sai.
    #[arg(long, value_parser = ["exact", "max_normalized", "sqrt_numel"])]
    gsnr_mode: Option<String>,
    /// Momentum of SGD-SaI and SGD (default: 0.9 for both). Only for those two.
    #[arg(long)]
    momentum: Option<f64>,
    /// CPU threads (default: all cores; 1 can be faster on a machine busy with other work).
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, or cuda (build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Random crops and horizontal flips of the training images.
    #[arg(long)]
    augment: bool,
    /// Evaluate on the test images every this many steps (0: only at the end; default: 10
    /// evaluations per run).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Test images used for evaluation (default: all of the test split; the evaluations
    /// during training use at most 1000 of them).
    #[arg(long)]
    eval_size: Option<usize>,
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
    /// The weights' dtype: f32, or bf16 (ResNet only; convolution kernels and the head stored
    /// in bf16 and widened to f32 where used, BatchNorm in f32; no f32 master copy).
    #[arg(long, default_value = "f32")]
    weights: String,
    /// Write bf16 weights back with stochastic rounding (seeded by --seed) instead of
    /// round-to-nearest.
    #[arg(long)]
    stochastic_rounding: bool,
    /// Where --compare writes compare.md and compare.png (with --seeds also runs.json).
    #[arg(long, default_value = "target/compare/cifar")]
    out: PathBuf,
}

/// Peak learning rates that train each model well with each optimizer (found by short sweeps
/// on the bundled data; see examples/results/README.md).
fn default_lr(model: Model, algo: Algo) -> f64 {
    // 120-step sweeps of the ResNet, batch 64: SGD-SaI 3e-3 / 1e-2 / 3e-2 gave validation
    // losses 0.647 / 0.587 / 0.613; AdamW 1e-3 / 3e-3 / 1e-2: 0.690 / 0.489 / 0.466;
    // Lion 1e-4 / 3e-4 / 1e-3: 1.584 / 0.986 / 0.544; Adan 3e-3 / 1e-2: 0.593 / 0.483.
    // 80-step sweeps of the ViT, batch 64: SGD-SaI 1e-3 / 3e-3 / 1e-2: 2.167 / 1.941 /
    // 1.780; AdamW 1e-3 / 3e-3: 1.749 / 1.884; Lion 1e-4 / 3e-4: 2.114 / 1.839; Adan 3e-3:
    // 1.719. (The ViT learns much more slowly than the ResNet at this length.)
    // Exhaustive: a new optimizer gets its rates here or the example does not compile.
    let (resnet, vit) = match algo {
        Algo::SgdSai => (1e-2, 1e-2),
        Algo::AdamW | Algo::AdamP | Algo::AdaBelief | Algo::DiffGrad => (1e-2, 1e-3),
        Algo::Adan => (1e-2, 3e-3),
        Algo::Lion => (1e-3, 3e-4),
        // Not swept: one rate for the matrices (Muon) and the auxiliary AdamW.
        Algo::Muon => (3e-3, 3e-3),
        // Not swept: SGD with momentum 0.9 (common::make_optimizer). One 120-step ResNet run:
        // validation loss 0.514 (SGD-SaI at 1e-2: 0.587).
        Algo::Sgd => (3e-2, 1e-2),
    };
    match model {
        Model::Resnet => resnet,
        Model::Vit => vit,
    }
}

struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(cin: usize, cout: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d_no_bias(cin, cout, k, cfg, vb.pp("conv"))?,
            // BatchNorm's gains and running statistics stay f32 whatever the weights' dtype.
            bn: batch_norm(cout, 1e-5, vb.pp("bn").set_dtype(DType::F32))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        // The kernel widened to f32 where it is used (it may be stored in bf16).
        let conv = Conv2d::new(nn::f32(self.conv.weight())?, None, *self.conv.config());
        self.bn.forward_t(&conv.forward(x)?, train)
    }
}

/// Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut.
struct BasicBlock {
    c1: ConvBn,
    c2: ConvBn,
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if stride != 1 || cin != cout {
            Some(ConvBn::new(cin, cout, 1, stride, vb.pp("shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            c1: ConvBn::new(cin, cout, 3, stride, vb.pp("c1"))?,
            c2: ConvBn::new(cout, cout, 3, 1, vb.pp("c2"))?,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.c1.forward(x, train)?.relu()?;
        let y = self.c2.forward(&y, train)?;
        let s = match &self.shortcut {
            Some(s) => s.forward(x, train)?,
            None => x.clone(),
        };
        (y + s)?.relu()
    }
}

struct ResNet {
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    fc: nn::Lin,
}

impl ResNet {
    /// `width` channels after the stem, doubling (and halving the resolution) at each of the
    /// next two stages. The stem has stride 2 (32×32 → 16×16): candle's CPU convolutions and
    /// BatchNorm are slow enough that a full-resolution first stage would triple the step time.
    fn new(width: usize, vb: VarBuilder) -> Result<Self> {
        let widths = [width, 2 * width, 4 * width];
        let mut blocks = Vec::new();
        let mut cin = width;
        for (i, &w) in widths.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            blocks.push(BasicBlock::new(
                cin,
                w,
                stride,
                vb.pp(format!("layer{}", i + 1)),
            )?);
            cin = w;
        }
        Ok(Self {
            stem: ConvBn::new(3, width, 3, 2, vb.pp("stem"))?,
            blocks,
            fc: nn::Lin::new(cin, 10, vb.pp("fc"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(x, train)?.relu()?;
        for b in &self.blocks {
            x = b.forward(&x, train)?;
        }
        self.fc.forward(&x.mean((2, 3))?)
    }
}

struct Vit {
    patch: Linear,
    pos: Tensor,
    blocks: Vec<nn::Block>,
    ln_f: nn::LayerNorm,
    head: Linear,
}

impl Vit {
    const PATCH: usize = 4;
    const DEPTH: usize = 4;
    const HEAD_DIM: usize = 32;
    const MLP_RATIO: usize = 2;

    /// `width`-wide tokens (a multiple of 32: heads of 32 channels).
    fn new(width: usize, vb: VarBuilder) -> Result<Self> {
        let tokens = (32 / Self::PATCH) * (32 / Self::PATCH);
        let d = width;
        if !d.is_multiple_of(Self::HEAD_DIM) {
            return Err(format!("--width {d}: the ViT needs a multiple of 32").into());
        }
        Ok(Self {
            patch: linear(3 * Self::PATCH * Self::PATCH, d, vb.pp("patch"))?,
            pos: vb.get_with_hints((1, tokens, d), "pos_emb", candle_nn::Init::Const(0.0))?,
            blocks: (0..Self::DEPTH)
                .map(|i| {
                    nn::Block::new(
                        d,
                        d / Self::HEAD_DIM,
                        Self::MLP_RATIO,
                        vb.pp(format!("blocks.{i}")),
                    )
                })
                .collect::<candle_core::Result<_>>()?,
            ln_f: nn::LayerNorm::new(d, vb.pp("ln_f"))?,
            head: linear(d, 10, vb.pp("head"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let (p, g) = (Self::PATCH, 32 / Self::PATCH);
        // [b, 3, 32, 32] -> [b, 64 patches, 3·4·4]
        let x = x
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, 3 * p * p))?;
        let mut x = self.patch.forward(&x)?.broadcast_add(&self.pos)?;
        for blk in &self.blocks {
            x = blk.forward(&x, None)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?.mean(1)?)
    }
}

enum Net {
    Resnet(ResNet),
    Vit(Vit),
}

impl Net {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Net::Resnet(m) => m.forward(x, train),
            Net::Vit(m) => m.forward(x),
        }
    }
}

/// Builds the network into a fresh VarMap and initialises it from `seed`.
fn build(
    model: Model,
    width: usize,
    seed: u64,
    dev: &Device,
    weights: DType,
) -> Result<(VarMap, Net)> {
    if model == Model::Vit && weights != DType::F32 {
        return Err("--weights bf16 is implemented for the ResNet only".into());
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, weights, dev);
    let net = match model {
        Model::Resnet => {
            let m = ResNet::new(width, vb)?;
            common::seeded_init(&varmap, seed, common::default_init)?;
            Net::Resnet(m)
        }
        Model::Vit => {
            let m = Vit::new(width, vb)?;
            common::seeded_init(&varmap, seed, nn::gpt2_init(Vit::DEPTH))?;
            Net::Vit(m)
        }
    };
    Ok((varmap, net))
}

/// Which images, and how to normalise them.
struct Data {
    train: cifar::Split,
    test: cifar::Split,
    mean: [f32; 3],
    std: [f32; 3],
    classes: [&'static str; 10],
    name: String,
}

fn load_data(dir: Option<&PathBuf>) -> Result<Data> {
    match dir {
        Some(d) => {
            let (train, test) = cifar::load_dir(d)?;
            Ok(Data {
                name: format!(
                    "CIFAR-10 from {} ({} training / {} test images)",
                    d.display(),
                    train.len(),
                    test.len()
                ),
                train,
                test,
                mean: [0.4914, 0.4822, 0.4465],
                std: [0.2470, 0.2435, 0.2616],
                classes: [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ],
            })
        }
        None => {
            let (train, test) = cifar::load_dir(&cifar::bundled_dir())?;
            Ok(Data {
                name: format!(
                    "the Fashion-MNIST subset bundled with the repo, NOT CIFAR-10 \
                     (examples/data/fashion-mnist: {} training / {} test images, 28×28 grey \
                     padded to 32×32×3 in CIFAR-10's format; pass --data-dir \
                     path/to/cifar-10-batches-bin for CIFAR-10)",
                    train.len(),
                    test.len()
                ),
                train,
                test,
                mean: [0.2189; 3],
                std: [0.3477; 3],
                classes: [
                    "T-shirt/top",
                    "trouser",
                    "pullover",
                    "dress",
                    "coat",
                    "sandal",
                    "shirt",
                    "sneaker",
                    "bag",
                    "ankle boot",
                ],
            })
        }
    }
}

struct ImageTask<'a> {
    net: Net,
    data: &'a Data,
    test: cifar::Split,
    batch: usize,
    seed: u64,
    augment: bool,
    dev: Device,
    /// The current epoch's permutation of the training images.
    perm: (usize, Vec<usize>),
}

impl ImageTask<'_> {
    /// The training image at position `k` of the (endless) epoch-shuffled stream.
    fn sample(&mut self, k: usize) -> usize {
        let n = self.data.train.len();
        let epoch = k / n;
        if self.perm.0 != epoch || self.perm.1.is_empty() {
            let mut p: Vec<usize> = (0..n).collect();
            Rng::new(self.seed ^ 0xC1FA_0000 ^ (epoch as u64).wrapping_mul(0x9E37_79B9))
                .shuffle(&mut p);
            self.perm = (epoch, p);
        }
        self.perm.1[k % n]
    }

    fn eval_on(&self, n: usize) -> candle_core::Result<Eval> {
        let n = n.min(self.test.len());
        let (mut loss, mut correct) = (0.0, 0.0);
        let chunk = 250;
        let mut i = 0;
        while i < n {
            let idx: Vec<usize> = (i..(i + chunk).min(n)).collect();
            let (x, y) = self
                .test
                .batch(&idx, self.data.mean, self.data.std, &self.dev)?;
            let logits = self.net.forward(&x, false)?;
            loss += candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64
                * idx.len() as f64;
            correct += logits
                .argmax(D::Minus1)?
                .eq(&y)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            i += chunk;
        }
        Ok(Eval {
            loss: loss / n as f64,
            acc: Some(correct / n as f64),
        })
    }
}

impl Task for ImageTask<'_> {
    fn train_loss(&mut self, step: usize) -> candle_core::Result<Tensor> {
        let idx: Vec<usize> = (0..self.batch)
            .map(|j| self.sample(step * self.batch + j))
            .collect();
        let (x, y) = if self.augment {
            let mut rng = Rng::new(self.seed ^ 0xA6 ^ (step as u64).wrapping_mul(0x2545_F491));
            let mut below = |n: usize| rng.below(n);
            self.data.train.batch_augmented(
                &idx,
                self.data.mean,
                self.data.std,
                &self.dev,
                &mut below,
            )?
        } else {
            self.data
                .train
                .batch(&idx, self.data.mean, self.data.std, &self.dev)?
        };
        candle_nn::loss::cross_entropy(&self.net.forward(&x, true)?, &y)
    }

    fn evaluate(&mut self, full: bool) -> candle_core::Result<Eval> {
        let n = if full {
            self.test.len()
        } else {
            self.test.len().min(1000)
        };
        self.eval_on(n)
    }

    fn items_per_step(&self) -> usize {
        self.batch
    }

    fn unit(&self) -> &'static str {
        "img"
    }
}

fn describe(model: Model, w: usize) -> String {
    match model {
        Model::Resnet => format!(
            "ResNet-8 (stride-2 stem, basic blocks of {w}-{}-{} channels, BatchNorm)",
            2 * w,
            4 * w
        ),
        Model::Vit => format!(
            "ViT (4×4 patches → 64 tokens, width {w}, {} blocks, {} heads)",
            Vit::DEPTH,
            w / Vit::HEAD_DIM
        ),
    }
}

fn width(args: &Args) -> usize {
    args.width.unwrap_or(match args.model {
        Model::Resnet => 16,
        Model::Vit => 64,
    })
}

/// The peak learning rate of `algo`: --lr-for's, else --lr, else the default.
fn lr_of(args: &Args, algo: Algo) -> f64 {
    args.lr_for
        .as_ref()
        .and_then(|o| o.get(algo))
        .or(args.lr)
        .unwrap_or_else(|| default_lr(args.model, algo))
}

/// The training recipe beyond the rate, in words; `None` when every option is at its default.
fn recipe(args: &Args) -> Option<String> {
    let default = args.warmup.is_none()
        && args.min_lr_ratio == 0.1
        && args.clip == 0.0
        && args.gsnr_mode.is_none()
        && args.momentum.is_none()
        && args.lr_for.is_none();
    (!default).then(|| recipe_text(args))
}

fn recipe_text(args: &Args) -> String {
    let mut t = train::recipe_text(
        args.warmup,
        args.steps,
        args.min_lr_ratio,
        args.clip,
        args.weight_decay,
        args.gsnr_mode.as_deref(),
        args.momentum,
        args.lr_for.as_ref(),
    );
    if args.augment {
        t.push_str(", augmented");
    }
    t
}

fn run_one(
    args: &Args,
    algo: Algo,
    seed: u64,
    data: &Data,
    dev: &Device,
    save: Option<PathBuf>,
    resume: Option<PathBuf>,
) -> Result<train::Outcome> {
    let (mut varmap, net) = build(
        args.model,
        width(args),
        seed,
        dev,
        common::weights_dtype(&args.weights)?,
    )?;
    let lr = lr_of(args, algo);
    let mut opt: Box<dyn Optimizer> = common::make_optimizer_over(
        algo,
        &varmap,
        lr,
        args.weight_decay,
        &args.state_format,
        args.stochastic_rounding.then_some(seed),
        &common::algo_overrides(algo, args.momentum, args.gsnr_mode.as_deref(), None),
    )?;
    if args.clip > 0.0 {
        opt.set_max_grad_norm(Some(args.clip))?;
    }
    let test = match args.eval_size {
        Some(n) => data.test.head(n),
        None => data.test.clone(),
    };
    let mut task = ImageTask {
        net,
        data,
        test,
        batch: args.batch,
        seed,
        augment: args.augment,
        dev: dev.clone(),
        perm: (0, Vec::new()),
    };
    let settings = Settings {
        steps: args.steps,
        eval_every: args.eval_every.unwrap_or((args.steps / 10).max(1)),
        save_every: args.save_every,
        stop_after: args.stop_after,
        save,
        resume,
        example: "cifar",
        lr,
        schedule: train::schedule(args.steps, args.warmup, args.min_lr_ratio),
        config: json!({
            "model": describe(args.model, width(args)),
            "data": data.name,
            "batch": args.batch,
            "seed": seed,
            "augment": args.augment,
            "lr": lr,
            "state_format": args.state_format,
            "weights": args.weights,
            "stochastic_rounding": args.stochastic_rounding,
            "weight_decay": args.weight_decay,
            "warmup": args.warmup,
            "min_lr_ratio": args.min_lr_ratio,
            "clip": args.clip,
            "optimizer_overrides":
                common::algo_overrides(algo, args.momentum, args.gsnr_mode.as_deref(), None),
        }),
    };
    train::train(&mut task, &mut varmap, opt.as_mut(), algo, &settings)
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
    if !(args.clip >= 0.0 && args.clip.is_finite()) {
        return Err("--clip must be 0 (off) or a positive norm".into());
    }
    if !(0.0..=1.0).contains(&args.min_lr_ratio) {
        return Err("--min-lr-ratio must be in [0, 1]".into());
    }
    let data = load_data(args.data_dir.as_ref())?;
    if args.steps == 0 || args.batch == 0 {
        return Err("--steps and --batch must be at least 1".into());
    }
    if args.batch > data.train.len() {
        return Err(format!(
            "--batch {} exceeds the {} training images",
            args.batch,
            data.train.len()
        )
        .into());
    }
    println!("Data: {}.", data.name);
    let counts = data.train.class_counts();
    println!(
        "Classes: {}",
        data.classes
            .iter()
            .zip(counts)
            .map(|(c, n)| format!("{c} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (varmap, _) = build(
        args.model,
        width(&args),
        args.seed,
        &dev,
        common::weights_dtype(&args.weights)?,
    )?;
    let seed_text = match &seeds {
        None => format!("seed {}", args.seed),
        Some(s) => format!(
            "seeds {}",
            s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
    };
    println!(
        "Model: {} with {} parameters; {} steps of {} images{} on {:?}, {seed_text}.",
        describe(args.model, width(&args)),
        common::count_params(&varmap),
        args.steps,
        args.batch,
        if args.augment { " (augmented)" } else { "" },
        dev,
    );
    drop(varmap);
    if let Some(r) = recipe(&args) {
        println!("Recipe: {r}.");
    }
    let model_name = match args.model {
        Model::Resnet => "ResNet",
        Model::Vit => "ViT",
    };
    let data_name = if args.data_dir.is_some() {
        "CIFAR-10"
    } else {
        "Fashion-MNIST subset"
    };
    if let Some(seed_list) = seeds {
        let title = format!(
            "{} on {data_name}: {} steps of {}, {seed_text}; {}{}",
            describe(args.model, width(&args)),
            args.steps,
            args.batch,
            recipe_text(&args),
            if args.state_format == "f32" {
                String::new()
            } else {
                format!(", {} optimizer state", args.state_format)
            }
        );
        let plot_title = format!(
            "{model_name} on {data_name}: {} steps of {}, {} seeds",
            args.steps,
            args.batch,
            seed_list.len()
        );
        let config = json!({
            "example": "cifar",
            "model": describe(args.model, width(&args)),
            "data": data.name,
            "steps": args.steps,
            "batch": args.batch,
            "seeds": seed_list,
            "lr": algos
                .iter()
                .map(|&a| (a.name(), lr_of(&args, a)))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "weight_decay": args.weight_decay,
            "warmup": args.warmup.unwrap_or_else(|| train::default_warmup(args.steps)),
            "min_lr_ratio": args.min_lr_ratio,
            "clip": args.clip,
            "gsnr_mode": args.gsnr_mode,
            "momentum": args.momentum,
            "augment": args.augment,
            "state_format": args.state_format,
            "weights": args.weights,
            "stochastic_rounding": args.stochastic_rounding,
            "eval_size": args.eval_size,
        });
        return seeds::run_all(
            &algos,
            &seed_list,
            args.save.as_deref(),
            &args.out,
            &title,
            &plot_title,
            true,
            &config,
            |algo, seed, save| run_one(&args, algo, seed, &data, &dev, save, None),
        );
    }
    match &args.compare {
        None => {
            let algo = algos[0];
            println!(
                "Optimizer: {} (lr {:.1e}, weight decay {:.0e}, warmup + cosine schedule).",
                algo.name(),
                lr_of(&args, algo),
                args.weight_decay * common::weight_decay_factor(algo)
            );
            run_one(
                &args,
                algo,
                args.seed,
                &data,
                &dev,
                args.save.clone(),
                args.resume.clone(),
            )?;
        }
        Some(_) => {
            let mut outcomes = Vec::new();
            for &algo in &algos {
                let save = args.save.as_ref().map(|d| d.join(algo.name()));
                outcomes.push(run_one(&args, algo, args.seed, &data, &dev, save, None)?);
            }
            let title = format!(
                "{model_name} on {data_name}: {} steps of {}, seed {}",
                args.steps, args.batch, args.seed
            );
            let title = if args.state_format == "f32" {
                title
            } else {
                format!("{title}, {} optimizer state", args.state_format)
            };
            let title = match recipe(&args) {
                None => title,
                Some(r) => format!("{title}; {r}"),
            };
            train::report(&args.out, &title, &outcomes, true)?;
        }
    }
    Ok(())
}
