//! Behaviour specific to one algorithm, where the official code is silent or crashes.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_optim::{Algo, Error, GsnrMode, Lion, LionConfig, Sgd, SgdConfig, SgdSai, SgdSaiConfig};
use serde_json::json;

fn var(vals: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(vals, &Device::Cpu).unwrap()).unwrap()
}

fn grads(pairs: &[(&Var, &[f32])]) -> GradStore {
    let mut g = GradStore::default();
    for (v, vals) in pairs {
        g.insert(v.as_tensor(), Tensor::new(*vals, &Device::Cpu).unwrap());
    }
    g
}

/// The reference's g-SNR: ‖g‖ / (std_unbiased(g) + eps), in f64 here.
fn gsnr(g: &[f32], eps: f64) -> f64 {
    let n = g.len() as f64;
    let mean = g.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = g.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    norm / (var.sqrt() + eps)
}

#[test]
fn sgd_sai_late_tensor_takes_its_gsnr_from_its_first_gradient() {
    let (a, b) = (var(&[1., 2., 3., 4.]), var(&[0.5, -0.5, 1.5]));
    let mut opt = SgdSai::new(vec![a.clone(), b.clone()], SgdSaiConfig::default()).unwrap();
    let ga: &[f32] = &[0.1, -0.2, 0.3, 0.05];
    opt.step(&grads(&[(&a, ga)])).unwrap();
    assert!(opt.gsnr(&b).is_none(), "no g-SNR before b's first gradient");
    let gb: &[f32] = &[0.7, -0.1, 0.4];
    let b0: Vec<f32> = b.to_vec1().unwrap();
    opt.step(&grads(&[(&a, ga), (&b, gb)])).unwrap();
    let got = opt.gsnr(&b).unwrap();
    assert!((got - gsnr(gb, 1e-8)).abs() < 1e-5 * got, "{got}");
    // b's first update uses buf = g (no (1 − μ) factor): p ← p·(1 − lr·λ) − lr·gsnr·g.
    let (lr, wd) = (1e-2, 1e-2);
    for ((x, x0), g) in b.to_vec1::<f32>().unwrap().iter().zip(&b0).zip(gb) {
        let want = *x0 as f64 * (1.0 - lr * wd) - lr * got * *g as f64;
        assert!((*x as f64 - want).abs() < 1e-5, "{x} vs {want}");
    }
    // Fixed from then on.
    opt.step(&grads(&[(&a, ga), (&b, &[9., 9.5, -3.])]))
        .unwrap();
    assert_eq!(opt.gsnr(&b).unwrap(), got);
}

#[test]
fn sgd_sai_max_normalized_divides_by_the_max_over_all_groups() {
    let (a, b) = (var(&[1., 2., 3., 4.]), var(&[0.5, -0.5, 1.5]));
    let cfg = SgdSaiConfig {
        gsnr_mode: GsnrMode::MaxNormalized,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = SgdSai::builder(cfg)
        .named_vars([("a", a.clone()), ("b", b.clone())])
        .group_names(&["b"], |c| c.lr = 0.02)
        .build()
        .unwrap();
    let (ga, gb): (&[f32], &[f32]) = (&[0.1, -0.2, 0.3, 0.05], &[1.0, 1.1, 0.9]);
    let (a0, b0): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
    opt.step(&grads(&[(&a, ga), (&b, gb)])).unwrap();
    let max = gsnr(ga, 1e-8).max(gsnr(gb, 1e-8));
    assert!((opt.gsnr_max().unwrap() - max).abs() < 1e-5 * max);
    // Group b steps with 0.02 · gsnr_b / G: b is the max here, so exactly 0.02 · g.
    let b1: Vec<f32> = b.to_vec1().unwrap();
    for ((x1, x0), g) in b1.iter().zip(&b0).zip(gb) {
        assert!((x0 - x1 - 0.02 * g).abs() < 1e-6, "{x0} -> {x1}");
    }
    let a1: Vec<f32> = a.to_vec1().unwrap();
    let sa = 1e-2 * gsnr(ga, 1e-8) / max;
    for ((x1, x0), g) in a1.iter().zip(&a0).zip(ga) {
        assert!((x0 - x1 - (sa * *g as f64) as f32).abs() < 1e-6);
    }
}

#[test]
fn sgd_sai_without_momentum_is_scaled_sgd_and_keeps_no_buffer() {
    let a = var(&[1., -2., 3., 0.5]);
    let cfg = SgdSaiConfig {
        momentum: 0.0,
        ..Default::default()
    };
    let mut opt = SgdSai::new(vec![a.clone()], cfg.clone()).unwrap();
    let gs: [&[f32]; 3] = [
        &[0.1, -0.2, 0.3, 0.05],
        &[0.4, 0.1, -0.3, 0.2],
        &[-0.1, 0.0, 0.2, 0.3],
    ];
    let mut expect: Vec<f64> = a
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let s = cfg.lr * gsnr(gs[0], cfg.eps);
    for g in gs {
        opt.step(&grads(&[(&a, g)])).unwrap();
        for (e, g) in expect.iter_mut().zip(g) {
            *e = *e * (1.0 - cfg.lr * cfg.weight_decay) - s * *g as f64;
        }
    }
    for (x, e) in a.to_vec1::<f32>().unwrap().iter().zip(&expect) {
        assert!((*x as f64 - e).abs() < 1e-5, "{x} vs {e}");
    }
    assert_eq!(opt.state_bytes(), 4, "only the g-SNR scalar");
}

#[test]
fn lion_sign_of_zero_is_zero() {
    // β1 = 0 and an all-zero first gradient: c = 0, so only the decay moves p.
    let a = var(&[1., -2., 3.]);
    let cfg = LionConfig {
        lr: 0.1,
        betas: (0.0, 0.99),
        weight_decay: 0.5,
    };
    let mut opt = Lion::new(vec![a.clone()], cfg).unwrap();
    opt.step(&grads(&[(&a, &[0., 0., 0.])])).unwrap();
    let got: Vec<f32> = a.to_vec1().unwrap();
    assert_eq!(got, vec![1. * 0.95, -2. * 0.95, 3. * 0.95]);
    // Exactly-zero entries keep p (after decay); the others move by lr.
    opt.step(&grads(&[(&a, &[0., 1., -1.])])).unwrap();
    let now: Vec<f32> = a.to_vec1().unwrap();
    assert_eq!(now[0], got[0] * 0.95);
    assert!((now[1] - (got[1] * 0.95 - 0.1)).abs() < 1e-6);
    assert!((now[2] - (got[2] * 0.95 + 0.1)).abs() < 1e-6);
}

/// One parameter of the f64 reference of `torch.optim.SGD` (`_single_tensor_sgd`).
struct SgdRef {
    p: Vec<f64>,
    /// `None` until the parameter's first update, as torch's `momentum_buffer`.
    buf: Option<Vec<f64>>,
}

impl SgdRef {
    fn step(&mut self, h: &SgdConfig, grad: &[f32]) {
        let (mu, damp, wd) = (h.momentum, h.dampening, h.weight_decay);
        let mut g: Vec<f64> = grad
            .iter()
            .map(|&x| if h.maximize { -(x as f64) } else { x as f64 })
            .collect();
        if wd != 0.0 {
            for (gi, pi) in g.iter_mut().zip(&self.p) {
                *gi += wd * pi;
            }
        }
        if mu != 0.0 {
            let buf = match self.buf.take() {
                None => g.clone(),
                Some(mut b) => {
                    for (bi, gi) in b.iter_mut().zip(&g) {
                        *bi = mu * *bi + (1.0 - damp) * gi;
                    }
                    b
                }
            };
            for (gi, bi) in g.iter_mut().zip(&buf) {
                *gi = if h.nesterov { *gi + mu * bi } else { *bi };
            }
            self.buf = Some(buf);
        }
        for (pi, gi) in self.p.iter_mut().zip(&g) {
            *pi -= h.lr * gi;
        }
    }
}

/// `|x − ref| ≤ 1e-6·(|ref| + scale)` for every element, `scale` the tensor's magnitude.
fn assert_close(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (&x, &r)) in got.iter().zip(want).enumerate() {
        let err = (x as f64 - r).abs();
        assert!(
            err <= 1e-6 * (r.abs() + scale),
            "{what}[{i}]: {x} vs reference {r} (error {err:e}, scale {scale})"
        );
    }
}

#[test]
fn sgd_matches_an_f64_reference_of_torch_sgd() {
    let cases = [
        ("plain", json!({"lr": 0.05})),
        (
            "momentum_dampening_wd",
            json!({"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1}),
        ),
        (
            "nesterov",
            json!({"lr": 0.05, "momentum": 0.9, "nesterov": true, "weight_decay": 0.05}),
        ),
        (
            "maximize",
            json!({"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1, "maximize": true}),
        ),
    ];
    // `a` (vector body and tail of the element loop) has a gradient at every step; `b` gets its
    // first at step 2, where its buffer starts as a copy of that gradient.
    let sizes = [1003, 7];
    for (label, hyper) in cases {
        let h: SgdConfig = serde_json::from_value(hyper.clone()).unwrap();
        let vars: Vec<Var> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| var(&common::values(10 + i as u64, n)))
            .collect();
        let mut refs: Vec<SgdRef> = vars
            .iter()
            .map(|v| SgdRef {
                p: v.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|&x| x as f64)
                    .collect(),
                buf: None,
            })
            .collect();
        let named = vec![
            ("a".to_string(), vars[0].clone()),
            ("b".into(), vars[1].clone()),
        ];
        let mut opt = Algo::Sgd.build_json(named, &hyper).unwrap();
        for step in 1..=5u64 {
            let mut g = GradStore::default();
            for (i, (v, r)) in vars.iter().zip(&mut refs).enumerate() {
                if i == 1 && step == 1 {
                    continue;
                }
                let gv = common::values(100 * step + i as u64, v.elem_count());
                g.insert(
                    v.as_tensor(),
                    Tensor::new(gv.as_slice(), &Device::Cpu).unwrap(),
                );
                r.step(&h, &gv);
            }
            assert!(opt.step(&g).unwrap().taken(), "{label}");
            for ((name, v), r) in ["a", "b"].iter().zip(&vars).zip(&refs) {
                let what = format!("{label} step {step} {name}");
                assert_close(&what, &v.to_vec1::<f32>().unwrap(), &r.p);
                let st = opt.param_state(name).unwrap();
                match &r.buf {
                    None => assert!(st.slots.is_empty(), "{what}: unexpected state"),
                    Some(buf) => {
                        assert_eq!(st.slots.len(), 1, "{what}");
                        let (slot, t) = &st.slots[0];
                        assert_eq!(*slot, "momentum_buffer");
                        assert_close(
                            &format!("{what} buf"),
                            &t.to_f32().unwrap().to_vec1::<f32>().unwrap(),
                            buf,
                        );
                    }
                }
            }
        }
        let per_elem = if h.momentum != 0.0 { 4 } else { 0 };
        assert_eq!(opt.state_bytes(), per_elem * (1003 + 7), "{label}");
    }
}

#[test]
fn sgd_nesterov_without_momentum_or_with_dampening_is_a_typed_error() {
    let named = || vec![("a".to_string(), var(&[1., 2.]))];
    for bad in [
        json!({"nesterov": true}),
        json!({"nesterov": true, "momentum": 0.0}),
        json!({"nesterov": true, "momentum": 0.9, "dampening": 0.1}),
    ] {
        let r = Algo::Sgd.build_json(named(), &bad);
        assert!(
            matches!(r, Err(Error::InvalidHyperparameter { .. })),
            "{bad}: {:?}",
            r.err()
        );
    }
    let cfg = SgdConfig {
        nesterov: true,
        ..Default::default()
    };
    let r = Sgd::builder(cfg).named_vars(named()).build();
    assert!(matches!(
        r,
        Err(Error::InvalidHyperparameter {
            name: "momentum",
            ..
        })
    ));
    for cfg in [
        SgdConfig {
            dampening: f64::INFINITY,
            ..Default::default()
        },
        SgdConfig {
            dampening: f64::NAN,
            momentum: 0.9,
            ..Default::default()
        },
        SgdConfig {
            momentum: -0.1,
            ..Default::default()
        },
    ] {
        let r = Sgd::new(vec![var(&[1.])], cfg.clone());
        assert!(
            matches!(r, Err(Error::InvalidHyperparameter { .. })),
            "{cfg:?}"
        );
    }
    // Nesterov with a momentum and no dampening is fine; the name resolves in any case.
    Sgd::new(
        vec![var(&[1.])],
        SgdConfig {
            nesterov: true,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(Algo::from_name("SGD"), Some(Algo::Sgd));
    assert_eq!(Algo::Sgd.default_lr(), 1e-3);
}
