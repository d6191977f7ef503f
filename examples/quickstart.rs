//! Quickstart: trains the same small MLP on the Fashion-MNIST subset that ships with the repo,
//! once with SGD-SaI and once with AdamW, from the same seed, and prints a comparison.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

mod common;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, Linear, Module, VarBuilder, VarMap};
use candle_optim::Algo;
use common::{cifar, human_bytes, median, seeded_init, Rng};
use std::time::Instant;

const STEPS: usize = 300;
const BATCH: usize = 128;
const SEED: u64 = 42;

struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            l1: linear(1024, 256, vb.pp("l1"))?,
            l2: linear(256, 128, vb.pp("l2"))?,
            l3: linear(128, 10, vb.pp("l3"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.l1.forward(x)?.relu()?;
        let x = self.l2.forward(&x)?.relu()?;
        self.l3.forward(&x)
    }
}

/// The grey plane of the padded images as `[n, 1024]`.
fn features(split: &cifar::Split, idx: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
    // Fashion-MNIST mean/std of the padded images.
    let (x, y) = split.batch(idx, [0.2189; 3], [0.3477; 3], &Device::Cpu)?;
    Ok((x.narrow(1, 0, 1)?.flatten_from(1)?, y))
}

struct Outcome {
    algo: Algo,
    final_loss: f64,
    test_acc: f64,
    ms_step: f64,
    ms_opt: f64,
    state_bytes: usize,
}

fn train(
    algo: Algo,
    lr: f64,
    train: &cifar::Split,
    test: &cifar::Split,
) -> anyhow_like::Result<Outcome> {
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    seeded_init(&varmap, SEED, common::default_init)?;
    let mut opt = common::make_optimizer(algo, &varmap, lr, 1e-2)?;
    let mut rng = Rng::new(SEED);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut losses, mut step_ms, mut opt_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut pos = order.len();
    for step in 1..=STEPS {
        if pos + BATCH > order.len() {
            rng.shuffle(&mut order);
            pos = 0;
        }
        let idx = &order[pos..pos + BATCH];
        pos += BATCH;
        let t0 = Instant::now();
        let (x, y) = features(train, idx)?;
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x)?, &y)?;
        let grads = loss.backward()?;
        let t1 = Instant::now();
        opt.step(&grads)?;
        let t2 = Instant::now();
        step_ms.push((t2 - t0).as_secs_f64() * 1e3);
        opt_ms.push((t2 - t1).as_secs_f64() * 1e3);
        let l = loss.to_scalar::<f32>()? as f64;
        losses.push(l);
        if step % 50 == 0 || step == 1 {
            println!("  {:<8} step {step:>4}  loss {l:.4}", algo.name());
        }
    }
    // Test accuracy.
    let idx: Vec<usize> = (0..test.len()).collect();
    let (x, y) = features(test, &idx)?;
    let pred = model.forward(&x)?.argmax(D::Minus1)?;
    let correct = pred
        .eq(&y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let tail = &losses[losses.len() - 20..];
    Ok(Outcome {
        algo,
        final_loss: tail.iter().sum::<f64>() / tail.len() as f64,
        test_acc: correct / test.len() as f64,
        ms_step: median(&step_ms),
        ms_opt: median(&opt_ms),
        state_bytes: opt.state_bytes(),
    })
}

/// A minimal boxed-error result for the example.
mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

fn main() -> anyhow_like::Result<()> {
    let (train_set, test_set) = cifar::load_dir(&cifar::bundled_dir())?;
    println!(
        "Training an MLP (1024-256-128-10) on the Fashion-MNIST subset bundled with the repo \
         ({} train / {} test images), {STEPS} steps of {BATCH}, seed {SEED}.",
        train_set.len(),
        test_set.len()
    );
    let runs = [(Algo::SgdSai, 1e-3), (Algo::AdamW, 1e-3)];
    let mut out = Vec::new();
    for (algo, lr) in runs {
        println!("{} (lr {lr:e}):", algo.name());
        out.push(train(algo, lr, &train_set, &test_set)?);
    }
    println!();
    println!(
        "{:<10} {:>11} {:>9} {:>12} {:>12} {:>14}",
        "optimizer", "final loss", "test acc", "ms/step", "ms/opt.step", "state bytes"
    );
    for o in &out {
        println!(
            "{:<10} {:>11.4} {:>8.1}% {:>12.2} {:>12.3} {:>14}",
            o.algo.name(),
            o.final_loss,
            o.test_acc * 100.0,
            o.ms_step,
            o.ms_opt,
            human_bytes(o.state_bytes)
        );
    }
    let (s, a) = (&out[0], &out[1]);
    println!(
        "\nSGD-SaI keeps {:.2}x the optimizer state of AdamW; its final loss is {:.3} vs {:.3}.",
        s.state_bytes as f64 / a.state_bytes as f64,
        s.final_loss,
        a.final_loss
    );
    Ok(())
}
