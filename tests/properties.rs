//! Property tests over every optimizer of the table (proptest).

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};
use candle_optim::Algo;
use common::*;
use proptest::prelude::*;

/// Up to three tensors of rank 0–3 with 2–40 elements (one-element tensors give SGD-SaI
/// g-SNRs of |g|/eps, legitimately far from any f64 reference).
fn shapes() -> impl Strategy<Value = Vec<Vec<usize>>> {
    prop::collection::vec(prop::collection::vec(1usize..5, 1..4), 1..4)
        .prop_filter("≥ 2 elements", |v| {
            v.iter().all(|s| s.iter().product::<usize>() >= 2)
        })
}

fn vars_of(shapes: &[Vec<usize>], seed: u64, dtype: DType) -> Vec<(String, Var)> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("p{i}"),
                Var::from_tensor(&tensor(seed + i as u64, s, dtype)).unwrap(),
            )
        })
        .collect()
}

fn grads(vars: &[(String, Var)], seed: u64, scale: f64) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        g.insert(
            v.as_tensor(),
            (tensor(seed * 7 + i as u64, v.dims(), v.dtype()) * scale).unwrap(),
        );
    }
    g
}

fn with(e: &Entry, extra: serde_json::Value) -> serde_json::Value {
    let mut h = e.hyper.clone();
    for (k, v) in extra.as_object().unwrap() {
        h[k] = v.clone();
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn zero_lr_and_decay_leave_params_unchanged(shapes in shapes(), seed in 0u64..1000, scale in 1e-3f64..10.0) {
        for e in table() {
            let vars = vars_of(&shapes, seed, DType::F32);
            let before = param_values(&vars);
            let hyper = with(&e, serde_json::json!({"lr": 0.0, "weight_decay": 0.0}));
            let mut opt = e.algo.build_json(vars.clone(), &hyper).unwrap();
            for s in 0..4 {
                opt.step(&grads(&vars, seed + s, scale)).unwrap();
            }
            prop_assert_eq!(param_values(&vars), before, "{}", e.label);
        }
    }

    #[test]
    fn f64_reference_run_agrees(shapes in shapes(), seed in 0u64..1000) {
        for e in table() {
            let v32 = vars_of(&shapes, seed, DType::F32);
            let v64 = vars_of(&shapes, seed, DType::F64);
            let mut o32 = build(&e, &v32);
            let mut o64 = build(&e, &v64);
            for s in 0..5 {
                o32.step(&grads(&v32, seed + s, 1.0)).unwrap();
                o64.step(&grads(&v64, seed + s, 1.0)).unwrap();
            }
            let (a, b) = (param_values(&v32), param_values(&v64));
            for (x, y) in a.iter().zip(&b) {
                let scale = y.iter().fold(1f64, |m, v| m.max(v.abs()));
                for (p, q) in x.iter().zip(y) {
                    prop_assert!((p - q).abs() <= 1e-4 * scale, "{}: {} vs {}", e.label, p, q);
                }
            }
        }
    }

    #[test]
    fn save_load_save_is_byte_identical(shapes in shapes(), seed in 0u64..1000, steps in 0u64..4) {
        for e in table() {
            let vars = vars_of(&shapes, seed, DType::F32);
            let mut a = build(&e, &vars);
            for s in 0..steps {
                a.step(&grads(&vars, seed + s, 1.0)).unwrap();
            }
            let first = a.save_bytes().unwrap();
            let mut b = build(&e, &vars);
            b.load_bytes(&first).unwrap();
            prop_assert_eq!(&first, &b.save_bytes().unwrap(), "{}", e.label);
        }
    }

    #[test]
    fn random_group_splits_match_one_group(shapes in shapes(), seed in 0u64..1000, split in prop::collection::vec(0usize..3, 3)) {
        for e in table() {
            let one = vars_of(&shapes, seed, DType::F32);
            let many = vars_of(&shapes, seed, DType::F32);
            let mut a = build(&e, &one);
            let mut b = split_build(e.algo, &e.hyper, &many, &split);
            for s in 0..4 {
                a.step(&grads(&one, seed + s, 1.0)).unwrap();
                b.step(&grads(&many, seed + s, 1.0)).unwrap();
            }
            prop_assert_eq!(param_values(&one), param_values(&many), "{}", e.label);
        }
    }

    #[test]
    fn arbitrary_bytes_never_load(bytes in prop::collection::vec(any::<u8>(), 0..512), seed in 0u64..100) {
        for e in table() {
            let vars = vars_of(&[vec![3, 2]], seed, DType::F32);
            let mut opt = build(&e, &vars);
            opt.step(&grads(&vars, seed, 1.0)).unwrap();
            let before = snapshot(opt.as_ref(), &vars);
            prop_assert!(opt.load_bytes(&bytes).is_err());
            // A real checkpoint with the random bytes spliced in somewhere.
            let mut good = opt.save_bytes().unwrap();
            let at = (seed as usize * 31) % good.len();
            let end = (at + bytes.len()).min(good.len());
            let changed = good[at..end] != bytes[..end - at];
            good[at..end].copy_from_slice(&bytes[..end - at]);
            if changed {
                prop_assert!(opt.load_bytes(&good).is_err(), "{}", e.label);
            }
            prop_assert_eq!(snapshot(opt.as_ref(), &vars), before);
        }
    }
}

/// The same hyperparameters, with parameter i in group `split[i] % 3`.
fn split_build(
    algo: Algo,
    hyper: &serde_json::Value,
    vars: &[(String, Var)],
    split: &[usize],
) -> Box<dyn candle_optim::Optimizer> {
    fn go<A: candle_optim::Algorithm>(
        hyper: &serde_json::Value,
        vars: &[(String, Var)],
        split: &[usize],
    ) -> Box<dyn candle_optim::Optimizer> {
        let config: A = serde_json::from_value(hyper.clone()).unwrap();
        let mut b = candle_optim::OptimBuilder::new(config).named_vars(vars.to_vec());
        for grp in 1..3 {
            let names: Vec<String> = vars
                .iter()
                .enumerate()
                .filter(|(i, _)| split[*i % split.len()] % 3 == grp)
                .map(|(_, (n, _))| n.clone())
                .collect();
            b = b.group(move |n, _| names.iter().any(|x| x == n), |_| {});
        }
        Box::new(b.build().unwrap())
    }
    struct Split<'a>(&'a serde_json::Value, &'a [(String, Var)], &'a [usize]);
    impl candle_optim::AlgoVisitor for Split<'_> {
        type Output = Box<dyn candle_optim::Optimizer>;
        fn visit<A: candle_optim::Algorithm>(self) -> Self::Output {
            go::<A>(self.0, self.1, self.2)
        }
    }
    algo.visit(Split(hyper, vars, split))
}
