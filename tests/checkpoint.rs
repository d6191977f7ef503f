//! Checkpoints, exact resume, schedules, clipping and accumulation, over the table of optimizers.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{Algo, Error, GradAccumulator, NonFinitePolicy, Optimizer, Reduction, Schedule};
use common::*;

const SHAPES: &[&[usize]] = &[&[12, 5], &[5], &[2, 3, 2, 2], &[]];

fn grads_for(vars: &[(String, Var)], seed: u64) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        // Leave one parameter out now and then, so skipped parameters are covered too.
        if (seed + i as u64) % 5 == 4 {
            continue;
        }
        g.insert(
            v.as_tensor(),
            tensor(seed * 17 + i as u64, v.dims(), v.dtype()),
        );
    }
    g
}

/// An optimizer with every piece of state a checkpoint must carry: schedule, clipping.
fn make(e: &Entry, vars: &[(String, Var)]) -> Box<dyn Optimizer> {
    let mut opt = build(e, vars);
    opt.set_schedule(Some(Schedule::warmup_cosine(3, 12, 0.1)))
        .unwrap();
    opt.set_max_grad_norm(Some(2.0)).unwrap();
    opt
}

/// Steps `from..to`, with a non-finite step at 5 (skipped) and Adan-style restarts at 3.
fn run(opt: &mut dyn Optimizer, vars: &[(String, Var)], from: u64, to: u64) {
    for s in from..to {
        if s == 5 {
            let mut g = grads_for(vars, s);
            g.insert(
                vars[0].1.as_tensor(),
                Tensor::full(f32::NAN, vars[0].1.dims(), &Device::Cpu).unwrap(),
            );
            assert!(!opt.step(&g).unwrap().taken());
        }
        if s == 3 {
            opt.reset_state().unwrap(); // Adan's restart(); for the others a full reset
        }
        opt.step(&grads_for(vars, s)).unwrap();
    }
}

#[test]
fn exact_resume_for_every_optimizer() {
    for e in table() {
        let (n, k) = (10, 4);
        let vars_a = named_vars(SHAPES, DType::F32);
        let mut a = make(&e, &vars_a);
        run(a.as_mut(), &vars_a, 0, n);

        let vars_b = named_vars(SHAPES, DType::F32);
        let mut b = make(&e, &vars_b);
        run(b.as_mut(), &vars_b, 0, k);
        let bytes = b.save_bytes().unwrap();
        drop(b);
        let mut c = build(&e, &vars_b); // fresh: no schedule, no clipping until the load
        c.load_bytes(&bytes).unwrap();
        run(c.as_mut(), &vars_b, k, n);

        assert_eq!(
            snapshot(a.as_ref(), &vars_a),
            snapshot(c.as_ref(), &vars_b),
            "{}",
            e.label
        );
        assert_eq!(
            a.learning_rate().to_bits(),
            c.learning_rate().to_bits(),
            "{}",
            e.label
        );
        assert_eq!(a.global_scalars(), c.global_scalars(), "{}", e.label);
        assert_eq!(
            a.save_bytes().unwrap(),
            c.save_bytes().unwrap(),
            "{}",
            e.label
        );
    }
}

#[test]
fn sgd_sai_gsnr_is_restored_not_recomputed() {
    let e = table().into_iter().find(|e| e.label == "sgd_sai").unwrap();
    let vars = named_vars(SHAPES, DType::F32);
    let mut a = build(&e, &vars);
    a.step(&grads_for(&vars, 1)).unwrap();
    let g0 = a.param_state("p0").unwrap().scalars;
    let mut b = build(&e, &vars);
    b.load_bytes(&a.save_bytes().unwrap()).unwrap();
    // A very different gradient after the load must not change the g-SNR.
    let mut g = GradStore::default();
    g.insert(
        vars[0].1.as_tensor(),
        (tensor(99, vars[0].1.dims(), DType::F32) * 1000.0).unwrap(),
    );
    b.step(&g).unwrap();
    assert_eq!(b.param_state("p0").unwrap().scalars, g0);
}

#[test]
fn file_round_trip_and_layout_checks() {
    let dir = std::env::temp_dir().join(format!("candle-optim-ck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in table() {
        let vars = named_vars(SHAPES, DType::F32);
        let mut a = build(&e, &vars);
        a.step(&grads_for(&vars, 1)).unwrap();
        let path = dir.join(format!("{}.safetensors", e.label));
        a.save(&path).unwrap();
        let mut b = build(&e, &vars);
        b.load(&path).unwrap();
        assert_eq!(snapshot(a.as_ref(), &vars), snapshot(b.as_ref(), &vars));

        // Another algorithm's checkpoint.
        let other = if e.algo == Algo::Lion {
            Algo::AdamW
        } else {
            Algo::Lion
        };
        let mut o = other
            .build_json(vars.clone(), &serde_json::json!({}))
            .unwrap();
        assert!(
            matches!(o.load(&path), Err(Error::WrongAlgorithm { .. })),
            "{}",
            e.label
        );

        // Other names, other shapes, fewer parameters.
        let renamed: Vec<_> = vars
            .iter()
            .map(|(n, v)| (format!("x.{n}"), v.clone()))
            .collect();
        let mut r = e.algo.build_json(renamed, &e.hyper).unwrap();
        assert!(
            matches!(r.load(&path), Err(Error::CheckpointMismatch(_))),
            "{}",
            e.label
        );
        let reshaped = named_vars(&[&[5, 12], &[5], &[2, 3, 2, 2], &[]], DType::F32);
        let mut r = build(&e, &reshaped);
        assert!(
            matches!(r.load(&path), Err(Error::CheckpointMismatch(_))),
            "{}",
            e.label
        );
        let mut r = build(&e, &vars[..2]);
        assert!(
            matches!(r.load(&path), Err(Error::CheckpointMismatch(_))),
            "{}",
            e.label
        );
        let bf = named_vars(SHAPES, DType::BF16);
        let mut r = build(&e, &bf);
        assert!(
            matches!(r.load(&path), Err(Error::CheckpointMismatch(_))),
            "{}",
            e.label
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn damaged_checkpoints_are_errors_and_change_nothing() {
    for e in table() {
        let vars = named_vars(&[&[3, 2], &[2]], DType::F32);
        let mut a = make(&e, &vars);
        run(a.as_mut(), &vars, 0, 4);
        let bytes = a.save_bytes().unwrap();
        let mut b = build(&e, &vars);
        b.step(&grads_for(&vars, 50)).unwrap();
        let before = snapshot(b.as_ref(), &vars);
        let lr = b.learning_rate();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                assert!(
                    b.load_bytes(&bad).is_err(),
                    "{}: flip {flip:#x} at byte {i} loaded",
                    e.label
                );
            }
        }
        for len in (0..bytes.len()).step_by(7) {
            assert!(
                b.load_bytes(&bytes[..len]).is_err(),
                "{}: truncated to {len} loaded",
                e.label
            );
        }
        assert_eq!(snapshot(b.as_ref(), &vars), before, "{}", e.label);
        assert_eq!(b.learning_rate(), lr);
        b.load_bytes(&bytes).unwrap();
        assert_eq!(snapshot(b.as_ref(), &vars), snapshot(a.as_ref(), &vars));
    }
}

#[test]
fn schedules_apply_per_group_keeping_ratios() {
    use candle_optim::{AdamW, AdamWConfig};
    let vars = named_vars(&[&[4, 4], &[4]], DType::F32);
    let mut opt = AdamW::builder(AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    })
    .named_vars(vars.clone())
    .group_names(&["p1"], |c| c.lr = 5e-3)
    .schedule(Schedule::Linear {
        steps: 4,
        final_factor: 0.0,
    })
    .build()
    .unwrap();
    let mut lrs = Vec::new();
    for s in 0..5 {
        // The rates the next step runs with; the configurations keep what was built.
        lrs.push((
            opt.group_learning_rate(0).unwrap(),
            opt.group_learning_rate(1).unwrap(),
        ));
        opt.step(&grads_for(&vars, s)).unwrap();
        assert_eq!(opt.group_config(0).unwrap().lr, 1e-2);
        assert_eq!(opt.group_config(1).unwrap().lr, 5e-3);
    }
    let want = [1.0, 0.75, 0.5, 0.25, 0.0];
    for ((g0, g1), f) in lrs.iter().zip(want) {
        assert!(
            (g0 - 1e-2 * f).abs() < 1e-15 && (g1 - 5e-3 * f).abs() < 1e-15,
            "{lrs:?}"
        );
    }
}

#[test]
fn global_norm_clipping_scales_all_gradients() {
    // AdamW with betas 0 and a large eps moves p by about lr·g·c/eps: linear in the clip factor.
    let vars: Vec<(String, Var)> = [3usize, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (
                format!("p{i}"),
                Var::zeros(n, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let hyper =
        serde_json::json!({"lr": 1.0, "betas": [0.0, 0.0], "eps": 1e6, "weight_decay": 0.0});
    let mut opt = Algo::AdamW.build_json(vars.clone(), &hyper).unwrap();
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    let mut g = GradStore::default();
    g.insert(
        vars[0].1.as_tensor(),
        Tensor::new(&[3f32, 0., 0.], &Device::Cpu).unwrap(),
    );
    g.insert(
        vars[1].1.as_tensor(),
        Tensor::new(&[0f32, 4.], &Device::Cpu).unwrap(),
    );
    let before: Vec<f32> = vars[0].1.to_vec1().unwrap();
    let r = opt.step(&g).unwrap();
    assert_eq!(r.grad_norm(), Some(5.0));
    assert!((r.clip_scale() - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
    let after: Vec<f32> = vars[0].1.to_vec1().unwrap();
    // p -= lr · m/(√v + eps) with m = g·c, √v = |g·c|: ≈ (3/5)/(0.6 + 1e6).
    let moved = (before[0] - after[0]) as f64;
    let want = 0.6 / (0.6 + 1e6);
    assert!((moved - want).abs() < 1e-6 * want, "{moved} vs {want}");
}

#[test]
fn accumulation_sum_and_mean() {
    for e in table() {
        let vars = named_vars(&[&[4, 3], &[3]], DType::F32);
        let twin = named_vars(&[&[4, 3], &[3]], DType::F32);
        let mut opt = build(&e, &vars);
        let mut reference = build(&e, &twin);
        opt.set_non_finite_policy(NonFinitePolicy::Propagate);
        reference.set_non_finite_policy(NonFinitePolicy::Propagate);
        let mut acc = GradAccumulator::new(vars.iter().map(|(_, v)| v.clone()), Reduction::Mean);
        for round in 0..3u64 {
            let mut sum: Vec<Vec<f32>> = twin
                .iter()
                .map(|(_, v)| vec![0.0; v.elem_count()])
                .collect();
            for micro in 0..4u64 {
                let mut g = GradStore::default();
                for (i, (_, v)) in vars.iter().enumerate() {
                    let t = tensor(round * 100 + micro * 10 + i as u64, v.dims(), DType::F32);
                    for (s, x) in sum[i]
                        .iter_mut()
                        .zip(t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    {
                        *s += x;
                    }
                    g.insert(v.as_tensor(), t);
                }
                acc.add(&g).unwrap();
            }
            assert_eq!(acc.micro_batches(), 4);
            acc.step(opt.as_mut()).unwrap();
            let mut g = GradStore::default();
            for ((_, v), s) in twin.iter().zip(&sum) {
                let mean: Vec<f32> = s.iter().map(|x| x * 0.25).collect();
                g.insert(
                    v.as_tensor(),
                    Tensor::from_vec(mean, v.dims(), &Device::Cpu).unwrap(),
                );
            }
            reference.step(&g).unwrap();
        }
        for ((_, a), (_, b)) in vars.iter().zip(&twin) {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{}: {x} vs {y}",
                    e.label
                );
            }
        }
    }
}

#[test]
fn memory_report_per_group_and_dtype() {
    use candle_optim::{AdamW, AdamWConfig};
    let vars = named_vars(&[&[8, 4], &[4]], DType::F32);
    let mut opt = AdamW::builder(AdamWConfig::default())
        .named_vars(vars.clone())
        .no_decay_for_bias_and_norm()
        .build()
        .unwrap();
    opt.step(&grads_for(&vars, 1)).unwrap();
    let rep = opt.memory_report();
    assert_eq!(rep.len(), 2);
    assert_eq!(
        (rep[0].group, rep[0].dtype, rep[0].bytes),
        (0, DType::F32, 32 * 8)
    );
    assert_eq!(
        (rep[1].group, rep[1].dtype, rep[1].bytes),
        (1, DType::F32, 4 * 8)
    );
    assert_eq!(
        rep.iter().map(|r| r.bytes).sum::<usize>(),
        opt.state_bytes()
    );
}

#[test]
fn unknown_group_pattern_is_an_error() {
    use candle_optim::{AdamW, AdamWConfig};
    let vars = named_vars(&[&[2]], DType::F32);
    let r = AdamW::builder(AdamWConfig::default())
        .named_vars(vars)
        .group_names(&["nope.*"], |_| {})
        .build();
    assert!(matches!(r, Err(Error::UnknownParameter(p)) if p == "nope.*"));
}
