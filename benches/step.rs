//! One optimizer step on the GPT-2-small parameter shapes (124,439,808 f32 parameters): every
//! algorithm's fused step, and `candle_nn::optim::AdamW` on the same shapes.
//!
//! Each benchmark's throughput is the bytes the algorithm must move per step (ALGORITHMS.md
//! traffic table × parameters), so criterion's GiB/s figures compare directly: an optimizer on
//! the fused path reaches about the same GiB/s as AdamW.
//!
//! ```text
//! cargo bench --bench step
//! ```

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{Algo, NonFinitePolicy};
use criterion::{criterion_group, Criterion, Throughput};
use std::time::Duration;

/// GPT-2 small: wte, wpe, 12 × (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj), ln_f.
fn gpt2_small_shapes() -> Vec<(String, Vec<usize>)> {
    let mut s = vec![
        ("wte".to_string(), vec![50257, 768]),
        ("wpe".to_string(), vec![1024, 768]),
    ];
    for l in 0..12 {
        let h = format!("h.{l}");
        s.push((format!("{h}.ln_1.weight"), vec![768]));
        s.push((format!("{h}.ln_1.bias"), vec![768]));
        s.push((format!("{h}.attn.c_attn.weight"), vec![768, 2304]));
        s.push((format!("{h}.attn.c_attn.bias"), vec![2304]));
        s.push((format!("{h}.attn.c_proj.weight"), vec![768, 768]));
        s.push((format!("{h}.attn.c_proj.bias"), vec![768]));
        s.push((format!("{h}.ln_2.weight"), vec![768]));
        s.push((format!("{h}.ln_2.bias"), vec![768]));
        s.push((format!("{h}.mlp.c_fc.weight"), vec![768, 3072]));
        s.push((format!("{h}.mlp.c_fc.bias"), vec![3072]));
        s.push((format!("{h}.mlp.c_proj.weight"), vec![3072, 768]));
        s.push((format!("{h}.mlp.c_proj.bias"), vec![768]));
    }
    s.push(("ln_f.weight".to_string(), vec![768]));
    s.push(("ln_f.bias".to_string(), vec![768]));
    s
}

/// Bytes one fused f32 step must move (ALGORITHMS.md §8), as the crate counts them.
fn bytes_per_step(algo: Algo, shapes: &[(String, Vec<usize>)]) -> u64 {
    let dims: Vec<(Vec<usize>, DType)> = shapes
        .iter()
        .map(|(_, s)| (s.clone(), DType::F32))
        .collect();
    algo.step_traffic_bytes(&serde_json::json!({"lr": 1e-4}), &dims)
        .expect("default hyperparameters are valid") as u64
}

/// `algo` over the model with lr 1e-4; Muon as it is used: the embeddings (by name) to its
/// auxiliary AdamW, not through Newton–Schulz on a 50257 × 768 matrix.
fn build(algo: Algo, vars: &[(String, Var)]) -> Box<dyn candle_optim::Optimizer> {
    if algo == Algo::Muon {
        let cfg = candle_optim::MuonConfig {
            lr: 1e-4,
            ..Default::default()
        };
        return Box::new(
            candle_optim::Muon::builder(cfg)
                .named_vars(vars.to_vec())
                .adamw_for(&["wte", "wpe"])
                .build()
                .unwrap(),
        );
    }
    algo.build_json(vars.to_vec(), &serde_json::json!({"lr": 1e-4}))
        .unwrap()
}

struct Model {
    vars: Vec<(String, Var)>,
    grads: GradStore,
}

fn model(shapes: &[(String, Vec<usize>)]) -> Model {
    let dev = Device::Cpu;
    let mut grads = GradStore::default();
    let vars = shapes
        .iter()
        .map(|(n, s)| {
            let v =
                Var::from_tensor(&Tensor::randn(0f32, 0.02, s.as_slice(), &dev).unwrap()).unwrap();
            grads.insert(
                v.as_tensor(),
                Tensor::randn(0f32, 1e-3, s.as_slice(), &dev).unwrap(),
            );
            (n.clone(), v)
        })
        .collect();
    Model { vars, grads }
}

fn bench(c: &mut Criterion) {
    let shapes = gpt2_small_shapes();
    let n: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(n, 124_439_808);
    let m = model(&shapes);
    let mut group = c.benchmark_group("gpt2_small_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    for &algo in Algo::ALL {
        let mut opt = build(algo, &m.vars);
        opt.set_non_finite_policy(NonFinitePolicy::Propagate);
        group.throughput(Throughput::Bytes(bytes_per_step(algo, &shapes)));
        group.bench_function(format!("{}_fused", algo.name()), |b| {
            b.iter(|| opt.step(&m.grads).unwrap())
        });
    }
    // The default non-finite policy (SkipStep) adds one read pass over the gradients.
    let mut opt = Algo::AdamW
        .build_json(m.vars.clone(), &serde_json::json!({"lr": 1e-4}))
        .unwrap();
    group.throughput(Throughput::Bytes(bytes_per_step(Algo::AdamW, &shapes)));
    group.bench_function("adamw_fused_skip_nonfinite", |b| {
        b.iter(|| opt.step(&m.grads).unwrap())
    });

    use candle_nn::optim::Optimizer as _;
    let vars: Vec<Var> = m.vars.iter().map(|(_, v)| v.clone()).collect();
    let mut cn = candle_nn::optim::AdamW::new(
        vars,
        candle_nn::optim::ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .unwrap();
    group.bench_function("candle_nn_adamw", |b| b.iter(|| cn.step(&m.grads).unwrap()));
    group.finish();
    drop(m);
}

/// The same steps measured side by side: rounds that rotate over every optimizer, each doing
/// one untimed and five timed steps back to back, so the machine's slow drifts hit all alike.
/// Prints each one's median, effective bandwidth and ratios to AdamW and to candle-nn.
fn side_by_side(rounds: usize) {
    let shapes = gpt2_small_shapes();
    let m = model(&shapes);
    let mut opts: Vec<(String, Box<dyn candle_optim::Optimizer>, u64)> = Algo::ALL
        .iter()
        .map(|&a| {
            let mut o = build(a, &m.vars);
            o.set_non_finite_policy(NonFinitePolicy::Propagate);
            (format!("{}_fused", a.name()), o, bytes_per_step(a, &shapes))
        })
        .collect();
    use candle_nn::optim::Optimizer as _;
    let vars: Vec<Var> = m.vars.iter().map(|(_, v)| v.clone()).collect();
    let params = candle_nn::optim::ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut cn = candle_nn::optim::AdamW::new(vars, params).unwrap();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); opts.len() + 1];
    for _ in 0..rounds {
        for (k, (_, o, _)) in opts.iter_mut().enumerate() {
            o.step(&m.grads).unwrap();
            for _ in 0..5 {
                let t = std::time::Instant::now();
                o.step(&m.grads).unwrap();
                times[k].push(t.elapsed().as_secs_f64());
            }
        }
        let t = std::time::Instant::now();
        cn.step(&m.grads).unwrap();
        times[opts.len()].push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let meds: Vec<f64> = times.iter_mut().map(med).collect();
    let adamw = opts
        .iter()
        .position(|(n, _, _)| n == "adamw_fused")
        .unwrap();
    let gbps = |k: usize| opts[k].2 as f64 / meds[k] / 1e9;
    println!(
        "\nside by side ({rounds} rounds, {} threads), GPT-2 small:",
        rayon::current_num_threads()
    );
    println!(
        "{:<18} {:>10} {:>9} {:>15} {:>13}",
        "step", "ms (med)", "GB/s", "GB/s vs AdamW", "vs candle-nn"
    );
    for k in 0..opts.len() {
        println!(
            "{:<18} {:>10.2} {:>9.2} {:>14.1}% {:>12.1}x",
            opts[k].0,
            meds[k] * 1e3,
            gbps(k),
            100.0 * gbps(k) / gbps(adamw),
            meds[opts.len()] / meds[k]
        );
    }
    println!("{:<18} {:>10.2}", "candle_nn_adamw", meds[opts.len()] * 1e3);
    println!(
        "SGD-SaI step / AdamW step: {:.3}",
        meds[opts
            .iter()
            .position(|(n, _, _)| n == "sgd_sai_fused")
            .unwrap()]
            / meds[adamw]
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench -- <filter>` runs criterion's matching benchmarks only.
    if std::env::args().skip(1).all(|a| a.starts_with('-')) {
        side_by_side(4);
    }
}
