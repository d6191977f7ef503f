//! bf16 weights without an f32 master copy: the quickstart's MLP on the bundled Fashion-MNIST
//! subset, trained with AdamW from the same seed and batches with
//!
//! * f32 weights (the reference),
//! * bf16 weights written back with round-to-nearest-even (small updates are lost),
//! * bf16 weights written back with stochastic rounding (`stochastic_rounding_seed`),
//! * the same with 8-bit optimizer state (`state_format: blockwise8`),
//!
//! computing in f32 (each weight is widened where it is used). Prints a table of final losses,
//! test accuracy and bytes per parameter (weights + optimizer state), and with `--out DIR`
//! writes it as `DIR/bf16_weights.md`.
//!
//! ```text
//! cargo run --release --example bf16_weights -- [--steps 600] [--lr 1e-3] [--out DIR]
//! ```

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use candle_optim::Algo;
use clap::Parser;
use common::{cifar, seeded_init, Rng};
use serde_json::json;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(about = "bf16 weights with stochastic rounding against f32 weights (AdamW)")]
struct Args {
    /// Training steps (batches of 128).
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// AdamW's learning rate (constant).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the initialisation, the batches and the rounding.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write the table to DIR/bf16_weights.md.
    #[arg(long)]
    out: Option<PathBuf>,
}

const BATCH: usize = 128;

/// A linear layer whose weights may be stored in bf16; the product is computed in f32.
struct Lin {
    w: Tensor,
    b: Tensor,
}

impl Lin {
    fn new(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let zero = candle_nn::Init::Const(0.0);
        Ok(Self {
            w: vb.get_with_hints((o, i), "weight", zero)?,
            b: vb.get_with_hints(o, "bias", zero)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.w.to_dtype(DType::F32)?;
        x.matmul(&w.t()?)?
            .broadcast_add(&self.b.to_dtype(DType::F32)?)
    }
}

struct Mlp(Lin, Lin, Lin);

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.0.forward(x)?.relu()?;
        let x = self.1.forward(&x)?.relu()?;
        self.2.forward(&x)
    }
}

fn features(split: &cifar::Split, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
    let (x, y) = split.batch(idx, [0.2189; 3], [0.3477; 3], &Device::Cpu)?;
    Ok((x.narrow(1, 0, 1)?.flatten_from(1)?, y))
}

struct Run {
    label: &'static str,
    train_loss: f64,
    test_loss: f64,
    test_acc: f64,
    weight_bytes: usize,
    state_bytes: usize,
    params: usize,
}

fn train(
    args: &Args,
    label: &'static str,
    dtype: DType,
    hyper: serde_json::Value,
    data: &(cifar::Split, cifar::Split),
) -> Result<Run, Box<dyn std::error::Error>> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let model = Mlp(
        Lin::new(1024, 256, vb.pp("l1"))?,
        Lin::new(256, 128, vb.pp("l2"))?,
        Lin::new(128, 10, vb.pp("l3"))?,
    );
    seeded_init(&varmap, args.seed, common::default_init)?;
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let weight_bytes = params * dtype.size_in_bytes();
    let mut opt = Algo::AdamW.build_with(vars, &hyper, true)?;
    let (train_set, test_set) = data;
    let mut rng = Rng::new(args.seed);
    let mut order: Vec<usize> = (0..train_set.len()).collect();
    let mut pos = order.len();
    let mut losses = Vec::new();
    for step in 1..=args.steps {
        if pos + BATCH > order.len() {
            rng.shuffle(&mut order);
            pos = 0;
        }
        let (x, y) = features(train_set, &order[pos..pos + BATCH])?;
        pos += BATCH;
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
        opt.backward_step(&loss)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        if step % 100 == 0 {
            println!("  {label:<28} step {step:>4}  loss {:.4}", losses[step - 1]);
        }
    }
    let idx: Vec<usize> = (0..test_set.len()).collect();
    let (x, y) = features(test_set, &idx)?;
    let logits = model.forward(&x)?;
    let test_loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()? as f64;
    let correct = logits
        .argmax(D::Minus1)?
        .eq(&y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let tail = &losses[losses.len().saturating_sub(50)..];
    Ok(Run {
        label,
        train_loss: tail.iter().sum::<f64>() / tail.len() as f64,
        test_loss,
        test_acc: correct / test_set.len() as f64,
        weight_bytes,
        state_bytes: opt.state_bytes(),
        params,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let data = cifar::load_dir(&cifar::bundled_dir())?;
    let base = json!({"lr": args.lr, "weight_decay": 1e-2});
    let with = |extra: serde_json::Value| {
        let mut h = base.clone();
        for (k, v) in extra.as_object().expect("object") {
            h[k] = v.clone();
        }
        h
    };
    let sr = json!({"stochastic_rounding_seed": args.seed});
    let runs = [
        ("f32 weights", DType::F32, base.clone()),
        ("bf16 weights, nearest", DType::BF16, base.clone()),
        ("bf16 weights, stochastic", DType::BF16, with(sr.clone())),
        (
            "bf16 stochastic + 8-bit state",
            DType::BF16,
            with(json!({"stochastic_rounding_seed": args.seed, "state_format": "blockwise8"})),
        ),
    ];
    let mut out = Vec::new();
    for (label, dtype, hyper) in runs {
        println!("{label}:");
        out.push(train(&args, label, dtype, hyper, &data)?);
    }
    let reference = out[0].test_loss;
    let mut table = format!(
        "MLP 1024-256-128-10 on the bundled Fashion-MNIST subset, AdamW lr {:e} (constant), \
         weight decay 0.01, {} steps of {BATCH}, seed {}; math in f32.\n\n\
         | weights | train loss (last 50) | test loss | vs f32 | test acc | weight B/param | state B/param |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        args.lr, args.steps, args.seed
    );
    for r in &out {
        table += &format!(
            "| {} | {:.4} | {:.4} | {:+.2}% | {:.2}% | {:.2} | {:.2} |\n",
            r.label,
            r.train_loss,
            r.test_loss,
            (r.test_loss / reference - 1.0) * 100.0,
            r.test_acc * 100.0,
            r.weight_bytes as f64 / r.params as f64,
            r.state_bytes as f64 / r.params as f64,
        );
    }
    println!("\n{table}");
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("bf16_weights.md"), &table)?;
    }
    Ok(())
}
