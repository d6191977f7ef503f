//! Muon-specific behaviour: the routing of parameters between Muon and the auxiliary AdamW, the
//! batching of same-shape matrices, an independent f64 reference of one step, the zero
//! gradient and the bf16 Newton–Schulz.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{AdamW, AdamWConfig, AdjustLr, Error, Muon, MuonConfig, NsDtype, Optimizer};
use common::{named_vars, tensor, values};

fn grads_for(vars: &[(String, Var)], seed: u64) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        g.insert(
            v.as_tensor(),
            tensor(seed * 1000 + i as u64, v.dims(), v.dtype()),
        );
    }
    g
}

fn flat(v: &Var) -> Vec<f64> {
    v.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n).sqrt()
}

/// Row-major r×c matrix product in f64.
fn mm(a: &[f64], b: &[f64], r: usize, k: usize, c: usize) -> Vec<f64> {
    let mut o = vec![0.0; r * c];
    for i in 0..r {
        for l in 0..k {
            for j in 0..c {
                o[i * c + j] += a[i * k + l] * b[l * c + j];
            }
        }
    }
    o
}

fn tr(a: &[f64], r: usize, c: usize) -> Vec<f64> {
    (0..c * r).map(|x| a[(x % r) * c + x / r]).collect()
}

/// Newton–Schulz in f64, as ALGORITHMS.md §13 writes it.
fn ns_ref(u: &[f64], r: usize, c: usize, cfg: &MuonConfig) -> Vec<f64> {
    let (mut x, rr, cc) = if r > c {
        (tr(u, r, c), c, r)
    } else {
        (u.to_vec(), r, c)
    };
    let n = x.iter().map(|v| v * v).sum::<f64>().sqrt().max(cfg.eps);
    x.iter_mut().for_each(|v| *v /= n);
    let (a, b, cf) = cfg.ns_coefficients;
    for _ in 0..cfg.ns_steps {
        let g = mm(&x, &tr(&x, rr, cc), rr, cc, rr);
        let g2 = mm(&g, &g, rr, rr, rr);
        let bm: Vec<f64> = g.iter().zip(&g2).map(|(p, q)| b * p + cf * q).collect();
        let bx = mm(&bm, &x, rr, rr, cc);
        x = x.iter().zip(&bx).map(|(p, q)| a * p + q).collect();
    }
    if r > c {
        tr(&x, rr, cc)
    } else {
        x
    }
}

#[test]
fn two_steps_match_an_f64_reference_for_wide_and_tall_matrices() {
    for (shape, adjust, nesterov) in [
        ([12usize, 20usize], None, true),
        ([20, 12], Some(AdjustLr::Original), true),
        ([20, 12], Some(AdjustLr::MatchRmsAdamw), false),
        ([12, 20], Some(AdjustLr::SpectralUnclamped), true),
        // Single rows and columns (the Gram matrix is 1 × 1).
        ([1, 64], None, true),
        ([64, 1], Some(AdjustLr::MatchRmsAdamw), true),
    ] {
        let cfg = MuonConfig {
            lr: 0.02,
            weight_decay: 0.1,
            nesterov,
            adjust_lr_fn: adjust,
            ..Default::default()
        };
        let vars = named_vars(&[&shape], DType::F32);
        let mut opt = Muon::builder(cfg.clone())
            .named_vars(vars.clone())
            .build()
            .unwrap();
        let (r, c) = (shape[0], shape[1]);
        let mut p = flat(&vars[0].1);
        let mut buf = vec![0.0; r * c];
        let mu = cfg.momentum;
        let ratio = adjust.unwrap_or_default().ratio(r, c);
        for step in 1..=2 {
            let g: Vec<f64> = values(step * 1000, r * c)
                .iter()
                .map(|&x| x as f64)
                .collect();
            opt.step(&grads_for(&vars, step)).unwrap();
            for (b, gi) in buf.iter_mut().zip(&g) {
                *b += (1.0 - mu) * (gi - *b);
            }
            let u: Vec<f64> = if nesterov {
                g.iter()
                    .zip(&buf)
                    .map(|(gi, b)| gi + mu * (b - gi))
                    .collect()
            } else {
                buf.clone()
            };
            let o = ns_ref(&u, r, c, &cfg);
            for (pi, oi) in p.iter_mut().zip(&o) {
                *pi = *pi * (1.0 - cfg.lr * cfg.weight_decay) - cfg.lr * ratio * oi;
            }
            let got = flat(&vars[0].1);
            // f32 Newton–Schulz against f64: far below the 1–2 % of a bf16 run.
            let upd: Vec<f64> = got.iter().zip(&p).map(|(a, b)| a - b).collect();
            let err = upd.iter().map(|v| v * v).sum::<f64>().sqrt()
                / (cfg.lr * ratio * o.iter().map(|v| v * v).sum::<f64>().sqrt());
            assert!(err < 1e-3, "{shape:?} {adjust:?} step {step}: {err}");
        }
    }
}

#[test]
fn matrices_take_muon_the_rest_and_adamw_groups_take_adamw() {
    let vars = named_vars(&[&[6, 4], &[4], &[2, 3, 2], &[], &[5, 4]], DType::F32);
    let names: Vec<(String, Var)> = ["blk.w", "blk.b", "conv", "scale", "wte.weight"]
        .iter()
        .zip(&vars)
        .map(|(n, (_, v))| (n.to_string(), v.clone()))
        .collect();
    let cfg = MuonConfig {
        lr: 0.01,
        ..Default::default()
    };
    let mut opt = Muon::builder(cfg.clone())
        .named_vars(names.clone())
        .adamw_for(&["wte*"])
        .build()
        .unwrap();
    // The same AdamW steps, from AdamW itself, for every parameter but the Muon matrix.
    let twins = named_vars(&[&[6, 4], &[4], &[2, 3, 2], &[], &[5, 4]], DType::F32);
    let mut adamw = AdamW::builder(AdamWConfig {
        lr: cfg.lr,
        betas: cfg.adamw_betas,
        eps: cfg.adamw_eps,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    })
    .named_vars(twins[1..].to_vec())
    .build()
    .unwrap();
    for step in 1..=3 {
        opt.step(&grads_for(&names, step)).unwrap();
        let mut g = GradStore::default();
        for (i, (_, v)) in twins.iter().enumerate().skip(1) {
            g.insert(
                v.as_tensor(),
                tensor(step * 1000 + i as u64, v.dims(), DType::F32),
            );
        }
        adamw.step(&g).unwrap();
    }
    let slots = |n: &str| -> Vec<&'static str> {
        opt.param_state(n)
            .unwrap()
            .slots
            .iter()
            .map(|(s, _)| *s)
            .collect()
    };
    assert_eq!(slots("blk.w"), ["momentum_buffer"]);
    for n in ["blk.b", "conv", "scale", "wte.weight"] {
        assert_eq!(slots(n), ["exp_avg", "exp_avg_sq"], "{n}");
    }
    for i in 1..5 {
        assert_eq!(flat(&names[i].1), flat(&twins[i].1), "{}", names[i].0);
    }
    assert_eq!(
        opt.state_bytes(),
        24 * 4 + (4 + 12 + 1 + 20) * 8,
        "Muon: 4 bytes per element; AdamW: 8"
    );
}

#[test]
fn same_shape_matrices_batched_equal_each_alone() {
    let vars = named_vars(&[&[8, 5], &[8, 5], &[5, 8], &[8, 5]], DType::F32);
    let mut opt = Muon::builder(MuonConfig::default())
        .named_vars(vars.clone())
        .build()
        .unwrap();
    let alone: Vec<Vec<(String, Var)>> = (0..4)
        .map(|i| {
            let shapes: [&[usize]; 4] = [&[8, 5], &[8, 5], &[5, 8], &[8, 5]];
            let v = named_vars(&shapes, DType::F32);
            vec![v[i].clone()]
        })
        .collect();
    let mut single: Vec<Box<dyn Optimizer>> = alone
        .iter()
        .map(|v| {
            Box::new(
                Muon::builder(MuonConfig::default())
                    .named_vars(v.clone())
                    .build()
                    .unwrap(),
            ) as Box<dyn Optimizer>
        })
        .collect();
    for step in 1..=3 {
        opt.step(&grads_for(&vars, step)).unwrap();
        for (i, (o, v)) in single.iter_mut().zip(&alone).enumerate() {
            let mut g = GradStore::default();
            g.insert(
                v[0].1.as_tensor(),
                tensor(step * 1000 + i as u64, v[0].1.dims(), DType::F32),
            );
            o.step(&g).unwrap();
        }
    }
    for i in 0..4 {
        let (a, b) = (flat(&vars[i].1), flat(&alone[i][0].1));
        assert!(rel_diff(&a, &b) < 1e-6, "param {i}: {}", rel_diff(&a, &b));
    }
}

#[test]
fn a_zero_gradient_leaves_only_weight_decay() {
    let vars = named_vars(&[&[6, 9]], DType::F32);
    let p0 = flat(&vars[0].1);
    let cfg = MuonConfig {
        lr: 0.05,
        weight_decay: 0.2,
        ..Default::default()
    };
    let mut opt = Muon::builder(cfg).named_vars(vars.clone()).build().unwrap();
    let mut g = GradStore::default();
    g.insert(
        vars[0].1.as_tensor(),
        Tensor::zeros((6, 9), DType::F32, &Device::Cpu).unwrap(),
    );
    opt.step(&g).unwrap();
    let d = (1.0f64 - 0.05 * 0.2) as f32;
    for (a, b) in flat(&vars[0].1).iter().zip(&p0) {
        assert_eq!(*a as f32, *b as f32 * d);
    }
}

#[test]
fn bf16_newton_schulz_stays_within_a_few_percent_of_f32() {
    let run = |dtype| {
        let vars = named_vars(&[&[16, 24]], DType::F32);
        let p0 = flat(&vars[0].1);
        let mut opt = Muon::builder(MuonConfig {
            lr: 0.02,
            weight_decay: 0.0,
            ns_dtype: dtype,
            ..Default::default()
        })
        .named_vars(vars.clone())
        .build()
        .unwrap();
        opt.step(&grads_for(&vars, 1)).unwrap();
        flat(&vars[0].1)
            .iter()
            .zip(&p0)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>()
    };
    let (f, b) = (run(NsDtype::Float32), run(NsDtype::Bfloat16));
    let d = rel_diff(&b, &f);
    assert!(d > 0.0 && d < 0.05, "{d}");
}

#[test]
fn invalid_configurations_are_typed_errors() {
    let vars = named_vars(&[&[4, 4]], DType::F32);
    for cfg in [
        MuonConfig {
            ns_steps: 100,
            ..Default::default()
        },
        MuonConfig {
            momentum: -0.1,
            ..Default::default()
        },
        MuonConfig {
            ns_coefficients: (f64::NAN, 1.0, 1.0),
            ..Default::default()
        },
    ] {
        let r = Muon::builder(cfg).named_vars(vars.clone()).build();
        assert!(matches!(r, Err(Error::InvalidHyperparameter { .. })));
    }
    // Values of the wrong kind do not parse.
    for bad in [
        serde_json::json!({"adjust_lr_fn": "spectral"}),
        serde_json::json!({"ns_dtype": "float16"}),
        serde_json::json!({"ns_coefficients": [3.4445, -4.775]}),
        serde_json::json!({"ns_coefficients": [3.4445, "a", 2.0315]}),
    ] {
        let r = candle_optim::Algo::Muon.build_json(vars.clone(), &bad);
        assert!(matches!(r, Err(Error::Unsupported(m)) if m.contains("bad hyperparameters")));
    }
    // torch's names are accepted, `null` meaning "original".
    let ok = serde_json::json!({"adjust_lr_fn": null, "betas": null, "ns_coefficients": [2.0, -1.5, 0.5]});
    assert!(candle_optim::Algo::Muon.build_json(vars, &ok).is_ok());
}
