//! Behaviour shared by every optimizer, driven by the one table in `common`.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{Algo, Error, NonFinitePolicy};
use common::*;

const SHAPES: &[&[usize]] = &[&[16, 8], &[16], &[3, 4, 2, 2], &[]];

fn grads_for(vars: &[(String, Var)], seed: u64, dtype: DType) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        g.insert(v.as_tensor(), tensor(seed * 31 + i as u64, v.dims(), dtype));
    }
    g
}

#[test]
fn invalid_hyperparameters_are_typed_errors() {
    for e in table() {
        for bad in &e.invalid {
            let vars = named_vars(SHAPES, DType::F32);
            let mut hyper = e.hyper.clone();
            for (k, v) in bad.as_object().unwrap() {
                hyper[k] = v.clone();
            }
            match e.algo.build_json(vars, &hyper) {
                Err(Error::InvalidHyperparameter { .. }) => {}
                // serde_json cannot carry NaN: it arrives as null and fails to parse.
                Err(Error::Unsupported(_)) if bad.to_string().contains("null") => {}
                other => panic!(
                    "{}: {bad} was accepted or gave the wrong error: {:?}",
                    e.label,
                    other.err()
                ),
            }
        }
    }
}

#[test]
fn bad_learning_rate_changes_nothing() {
    for e in table() {
        let vars = named_vars(SHAPES, DType::F32);
        let mut opt = build(&e, &vars);
        opt.step(&grads_for(&vars, 1, DType::F32)).unwrap();
        let before = snapshot(opt.as_ref(), &vars);
        let lr = opt.learning_rate();
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(
                    opt.set_learning_rate(bad),
                    Err(Error::InvalidHyperparameter { .. })
                ),
                "{}",
                e.label
            );
        }
        assert_eq!(opt.learning_rate(), lr);
        assert_eq!(snapshot(opt.as_ref(), &vars), before, "{}", e.label);
    }
}

#[test]
fn mismatched_gradients_are_typed_errors_and_change_nothing() {
    for e in table() {
        let vars = named_vars(SHAPES, DType::F32);
        let mut opt = build(&e, &vars);
        opt.step(&grads_for(&vars, 1, DType::F32)).unwrap();
        let before = snapshot(opt.as_ref(), &vars);

        // The bad gradient belongs to the last parameter, so a partial update would show.
        let (_, last) = vars.last().unwrap();
        let mut g = grads_for(&vars, 2, DType::F32);
        g.insert(
            last.as_tensor(),
            Tensor::zeros(&[2, 2], DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(
            matches!(opt.step(&g), Err(Error::ShapeMismatch { .. })),
            "{}",
            e.label
        );

        let mut g = grads_for(&vars, 2, DType::F32);
        g.insert(
            last.as_tensor(),
            Tensor::zeros(last.dims(), DType::F64, &Device::Cpu).unwrap(),
        );
        assert!(
            matches!(opt.step(&g), Err(Error::DTypeMismatch { .. })),
            "{}",
            e.label
        );

        let mut g = grads_for(&vars, 2, DType::F32);
        g.insert(last.as_tensor(), last.as_tensor().clone());
        assert!(
            matches!(opt.step(&g), Err(Error::Aliasing { .. })),
            "{}",
            e.label
        );

        let (name0, v0) = &vars[0];
        if let Some(st) = opt.param_state(name0) {
            if let Some((_, slot)) = st.slots.first() {
                let mut g = grads_for(&vars, 2, DType::F32);
                g.insert(v0.as_tensor(), slot.as_dense().unwrap().clone());
                assert!(
                    matches!(opt.step(&g), Err(Error::Aliasing { .. })),
                    "{}",
                    e.label
                );
            }
        }
        assert_eq!(snapshot(opt.as_ref(), &vars), before, "{}", e.label);
    }
}

#[test]
fn parameters_without_gradients_are_skipped_entirely() {
    for e in table() {
        let vars = named_vars(SHAPES, DType::F32);
        let mut opt = build(&e, &vars);
        // Only p0 has a gradient at first: p1.. get no state, no decay.
        let mut g = GradStore::default();
        g.insert(
            vars[0].1.as_tensor(),
            tensor(7, vars[0].1.dims(), DType::F32),
        );
        let untouched: Vec<Vec<f32>> = vars[1..]
            .iter()
            .map(|(_, v)| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        opt.step(&g).unwrap();
        for ((name, v), before) in vars[1..].iter().zip(&untouched) {
            assert_eq!(
                &v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                before,
                "{}: {name}",
                e.label
            );
            let st = opt.param_state(name).unwrap();
            assert!(
                st.slots.is_empty() && st.step == 0,
                "{}: {name} got state",
                e.label
            );
        }
        assert_eq!(opt.param_state("p0").unwrap().step, 1);
        // Then all step once; then p0 skips a step: its state and counter stay put.
        opt.step(&grads_for(&vars, 3, DType::F32)).unwrap();
        let p0_before = snapshot(opt.as_ref(), &vars[..1]);
        let mut g = grads_for(&vars, 4, DType::F32);
        g.remove(vars[0].1.as_tensor());
        opt.step(&g).unwrap();
        let p0_after = snapshot(opt.as_ref(), &vars[..1]);
        // Compare everything but the optimizer-wide step count (the last entry).
        assert_eq!(
            p0_before[..p0_before.len() - 1],
            p0_after[..p0_after.len() - 1],
            "{}",
            e.label
        );
        assert_eq!(opt.param_state("p0").unwrap().step, 2, "{}", e.label);
        assert_eq!(opt.param_state("p1").unwrap().step, 2, "{}", e.label);
    }
}

#[test]
fn non_float_vars_are_ignored() {
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap()).unwrap();
    let f = Var::from_tensor(&tensor(1, &[4], DType::F32)).unwrap();
    for &algo in Algo::ALL {
        let opt = algo
            .build_json(
                vec![("i".into(), ints.clone()), ("f".into(), f.clone())],
                &serde_json::json!({}),
            )
            .unwrap();
        assert!(opt.param_state("i").is_none());
        assert!(opt.param_state("f").is_some());
    }
}

#[test]
fn state_bytes_are_what_the_algorithm_needs() {
    for e in table() {
        let vars = named_vars(&[&[64, 32], &[32]], DType::F32);
        let mut opt = build(&e, &vars);
        assert_eq!(
            opt.state_bytes(),
            0,
            "{}: state before the first step",
            e.label
        );
        opt.step(&grads_for(&vars, 1, DType::F32)).unwrap();
        let bytes = e.state_bytes * 64 * 32 + e.state_bytes_other * 32;
        let scalars = 2 * scalar_bytes_per_tensor(e.algo);
        assert_eq!(opt.state_bytes(), bytes + scalars, "{}", e.label);
        // bf16 parameters still keep f32 state.
        let vars = named_vars(&[&[64, 32], &[32]], DType::BF16);
        let mut opt = build(&e, &vars);
        opt.step(&grads_for(&vars, 1, DType::BF16)).unwrap();
        assert_eq!(opt.state_bytes(), bytes + scalars, "{} (bf16)", e.label);
        if let Some(st) = opt.param_state("p0") {
            for (_, t) in st.slots {
                assert_eq!(t.as_dense().unwrap().dtype(), DType::F32);
            }
        }
    }
}

/// Runs `steps` steps of `e` on parameters of `dtype` and returns them as f64.
fn run(e: &Entry, dtype: DType, steps: u64, shapes: &[&[usize]]) -> Vec<Vec<f64>> {
    let vars = named_vars(shapes, dtype);
    let mut opt = build(e, &vars);
    for s in 0..steps {
        opt.step(&grads_for(&vars, 10 + s, dtype)).unwrap();
    }
    param_values(&vars)
}

fn max_rel_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let scale = b.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs() / (y.abs() + scale))
        .fold(0.0, f64::max)
}

#[test]
fn low_precision_and_f64_parameters_track_f32() {
    // No one-element tensors here: SGD-SaI gives them g-SNR |g|/eps (about 1e8·|g|, official
    // behaviour), which overflows f16.
    let shapes: &[&[usize]] = &[&[16, 8], &[16], &[3, 4, 2, 2]];
    for e in table() {
        let f32_run = run(&e, DType::F32, 8, shapes);
        let f64_run = run(&e, DType::F64, 8, shapes);
        // AdaBelief's default eps (1e-16) makes early steps ill-conditioned in f32 for constant
        // patterns; everything here is random, so all agree closely with f64.
        let d = max_rel_diff(&f32_run, &f64_run);
        assert!(d < 1e-5, "{}: f32 vs f64 differ by {d}", e.label);
        for dt in [DType::BF16, DType::F16] {
            let low = run(&e, dt, 8, shapes);
            let d = max_rel_diff(&low, &f32_run);
            let tol = if dt == DType::BF16 { 3e-2 } else { 4e-3 };
            assert!(d < tol, "{} {dt:?}: differs from f32 by {d}", e.label);
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    // Large enough to be split over threads (and AdamP's single long row too).
    let shapes: &[&[usize]] = &[&[300, 700], &[1, 200_000], &[70_001]];
    for e in table() {
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let many = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let a = one.install(|| run(&e, DType::F32, 3, shapes));
        let b = many.install(|| run(&e, DType::F32, 3, shapes));
        assert!(a == b, "{}: results depend on the thread count", e.label);
    }
}

#[test]
fn skip_step_policy_leaves_everything_unchanged() {
    for e in table() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let vars = named_vars(SHAPES, DType::F32);
            let mut opt = build(&e, &vars);
            opt.step(&grads_for(&vars, 1, DType::F32)).unwrap();
            let before = snapshot(opt.as_ref(), &vars);
            let mut g = grads_for(&vars, 2, DType::F32);
            let (name, v) = &vars[2];
            let mut vals = values(5, v.elem_count());
            vals[7] = bad;
            g.insert(
                v.as_tensor(),
                Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap(),
            );
            let r = opt.step(&g).unwrap();
            assert!(!r.taken(), "{}", e.label);
            assert_eq!(
                r.skipped(),
                Some(candle_optim::SkipReason::NonFiniteGradient {
                    param: name.clone()
                }),
                "{}",
                e.label
            );
            assert_eq!(snapshot(opt.as_ref(), &vars), before, "{}", e.label);
        }
    }
}

#[test]
fn error_and_propagate_policies() {
    for e in table() {
        for policy in [NonFinitePolicy::Error, NonFinitePolicy::Propagate] {
            let vars = named_vars(&[&[8]], DType::F32);
            let mut opt = build(&e, &vars);
            opt.set_non_finite_policy(policy);
            let v = &vars[0].1;
            let mut g = GradStore::default();
            g.insert(
                v.as_tensor(),
                Tensor::new(&[f32::NAN; 8], &Device::Cpu).unwrap(),
            );
            if policy == NonFinitePolicy::Error {
                let before = snapshot(opt.as_ref(), &vars);
                assert!(
                    matches!(opt.step(&g), Err(Error::NonFiniteGradient { .. })),
                    "{}",
                    e.label
                );
                assert_eq!(snapshot(opt.as_ref(), &vars), before, "{}", e.label);
            } else {
                assert!(opt.step(&g).unwrap().taken(), "{}", e.label);
                // NaN is never silently turned into "no update" (candle's sign would).
                let p: Vec<f32> = v.to_vec1().unwrap();
                assert!(p.iter().all(|x| x.is_nan()), "{}: {p:?}", e.label);
            }
        }
    }
}

#[test]
fn candle_nn_optimizer_drop_in_trains() {
    // Fit a linear map y = x·Wᵀ + b with each algorithm through candle-nn's trait.
    let x = tensor(1, &[64, 8], DType::F32);
    let w_true = tensor(2, &[4, 8], DType::F32);
    let y = x
        .matmul(&w_true.t().unwrap())
        .unwrap()
        .broadcast_add(&tensor(3, &[4], DType::F32))
        .unwrap();
    fn fit<O: candle_nn::optim::Optimizer>(cfg: O::Config, x: &Tensor, y: &Tensor) -> (f32, f32) {
        let w = Var::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        let b = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let mut opt = O::new(vec![w.clone(), b.clone()], cfg).unwrap();
        let loss = |w: &Var, b: &Var| {
            x.matmul(&w.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(b.as_tensor())
                .unwrap()
                .sub(y)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
        };
        let first = loss(&w, &b).to_scalar::<f32>().unwrap();
        for _ in 0..300 {
            opt.backward_step(&loss(&w, &b)).unwrap();
        }
        (first, loss(&w, &b).to_scalar::<f32>().unwrap())
    }
    use candle_optim::*;
    let results = [
        (
            "sgd_sai",
            fit::<SgdSai>(
                SgdSaiConfig {
                    lr: 2e-2,
                    weight_decay: 0.0,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
        (
            "adamw",
            fit::<AdamW>(
                AdamWConfig {
                    lr: 0.05,
                    weight_decay: 0.0,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
        (
            "adamp",
            fit::<AdamP>(
                AdamPConfig {
                    lr: 0.05,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
        (
            "adabelief",
            fit::<AdaBelief>(
                AdaBeliefConfig {
                    lr: 0.05,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
        (
            "diffgrad",
            fit::<DiffGrad>(
                DiffGradConfig {
                    lr: 0.05,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
        (
            "adan",
            fit::<Adan>(
                AdanConfig {
                    lr: 0.05,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
        (
            "lion",
            fit::<Lion>(
                LionConfig {
                    lr: 0.01,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
        (
            "sgd",
            fit::<Sgd>(
                SgdConfig {
                    lr: 0.02,
                    momentum: 0.9,
                    ..Default::default()
                },
                &x,
                &y,
            ),
        ),
    ];
    for (name, (first, last)) in results {
        println!("{name}: loss {first} -> {last}");
        assert!(last < first * 0.05, "{name}: loss {first} -> {last}");
    }
}

#[test]
fn gradients_aliasing_another_parameter_or_its_state_are_rejected() {
    for e in table() {
        let vars = named_vars(&[&[4, 3], &[4, 3]], DType::F32);
        let mut opt = build(&e, &vars);
        opt.step(&grads_for(&vars, 1, DType::F32)).unwrap();
        let before = snapshot(opt.as_ref(), &vars);
        let mut g = grads_for(&vars, 2, DType::F32);
        g.insert(vars[0].1.as_tensor(), vars[1].1.as_tensor().clone());
        assert!(
            matches!(opt.step(&g), Err(Error::Aliasing { .. })),
            "{}",
            e.label
        );
        if let Some((_, slot)) = opt.param_state("p1").and_then(|s| s.slots.first().cloned()) {
            let mut g = grads_for(&vars, 2, DType::F32);
            g.insert(vars[0].1.as_tensor(), slot.as_dense().unwrap().clone());
            assert!(
                matches!(opt.step(&g), Err(Error::Aliasing { .. })),
                "{}",
                e.label
            );
        }
        assert_eq!(snapshot(opt.as_ref(), &vars), before, "{}", e.label);
    }
}

/// Address of a CPU tensor's first element.
fn addr(t: &Tensor) -> usize {
    let (s, l) = t.storage_and_layout();
    let base = match &*s {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.as_ptr() as usize,
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => v.as_ptr() as usize,
        _ => panic!("not an f32/bf16 CPU tensor"),
    };
    base + l.start_offset() * t.dtype().size_in_bytes()
}

#[test]
fn cpu_state_reaches_a_cache_line_where_its_parameter_does() {
    // Heap-sized tensors, whose addresses vary modulo 64: the element loop's scalar head aligns
    // the parameter, and every f32 state slot must be on a 64-byte boundary at that element too.
    let shapes: &[&[usize]] = &[&[1000], &[37, 5], &[333], &[7, 9, 3], &[4097], &[130]];
    for e in table() {
        for dtype in [DType::F32, DType::BF16] {
            let vars = named_vars(shapes, dtype);
            let mut opt = build(&e, &vars);
            opt.step(&grads_for(&vars, 1, dtype)).unwrap();
            let mut resumed = build(&e, &vars);
            resumed.load_bytes(&opt.save_bytes().unwrap()).unwrap();
            for (o, when) in [(&opt, "after a step"), (&resumed, "after loading")] {
                for (name, v) in &vars {
                    let size = dtype.size_in_bytes();
                    let head = (64 - addr(v.as_tensor()) % 64) % 64 / size;
                    let st = o.param_state(name).unwrap();
                    assert!(!st.slots.is_empty() || e.state_bytes == 0);
                    for (slot, t) in &st.slots {
                        let t = t.as_dense().unwrap();
                        assert_eq!(
                            (addr(t) + head * 4) % 64,
                            0,
                            "{} {dtype:?} {name}/{slot} {when}",
                            e.label
                        );
                    }
                }
            }
        }
    }
}

/// A finite f64 gradient whose Σg² overflows (1e200² = 1e400) is not "non-finite": the step
/// is taken under the default policy, and clipping sees the exact norm (1e200·√n).
#[test]
fn huge_finite_f64_gradients_are_stepped_and_clipped_with_the_right_norm() {
    use candle_optim::{Lion, LionConfig};
    let n = 8;
    let var = Var::from_tensor(&Tensor::zeros(n, DType::F64, &Device::Cpu).unwrap()).unwrap();
    let config = LionConfig {
        lr: 0.5,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = Lion::new(vec![var.clone()], config).unwrap();
    opt.set_max_grad_norm(Some(1.0)).unwrap();
    let mut g = GradStore::default();
    let grad = Tensor::from_vec(vec![1e200f64; n], n, &Device::Cpu).unwrap();
    g.insert(var.as_tensor(), grad);
    let r = opt.step(&g).unwrap();
    assert!(r.taken(), "skipped: {:?}", r.skipped());
    let norm = r.grad_norm().unwrap();
    let want = 1e200 * (n as f64).sqrt();
    assert!(
        ((norm - want) / want).abs() < 1e-14,
        "norm {norm:e}, want {want:e}"
    );
    // Lion steps by -lr·sign(g) whatever its size.
    assert_eq!(var.as_tensor().to_vec1::<f64>().unwrap(), vec![-0.5; n]);
}

/// A step decided on the device (here the host's emulation of one, `VerdictMode::EmulateDeferred`:
/// committed before its verdict is read, taken back when it says skipped) leaves everything as
/// a step decided on the host does: reports, parameters, state, counters, the schedule and the
/// checkpoint, read while the verdict is pending and after, over skipped steps in a row and a
/// parameter whose first gradient comes late (a step with state to allocate is decided on the
/// host).
#[test]
fn deferred_verdicts_match_host_verdicts() {
    use candle_optim::{Schedule, VerdictMode};
    for e in table() {
        // Adan's own clipping reads the gradients in `prepare`: its steps are decided on the host.
        let host_only = e.hyper.get("max_grad_norm").and_then(|v| v.as_f64()) > Some(0.0);
        for (policy, clip) in [
            (NonFinitePolicy::SkipStep, None),
            (NonFinitePolicy::SkipStep, Some(0.5)),
            (NonFinitePolicy::Propagate, Some(0.5)),
        ] {
            let label = format!("{} {policy:?} clip {clip:?}", e.label);
            let vars: [Vec<(String, Var)>; 2] =
                std::array::from_fn(|_| named_vars(SHAPES, DType::F32));
            let mut opts: Vec<_> = vars.iter().map(|v| build(&e, v)).collect();
            for (o, mode) in opts
                .iter_mut()
                .zip([VerdictMode::Host, VerdictMode::EmulateDeferred])
            {
                o.set_verdict_mode(mode).unwrap();
                o.set_non_finite_policy(policy);
                o.set_max_grad_norm(clip).unwrap();
                o.set_schedule(Some(Schedule::warmup_cosine(3, 10, 0.1)))
                    .unwrap();
            }
            let mut last_has_state = false;
            for step in 0..7u64 {
                let reports: Vec<_> = vars
                    .iter()
                    .zip(opts.iter_mut())
                    .map(|(v, o)| {
                        let mut g = grads_for(v, 40 + step, DType::F32);
                        if step < 2 {
                            g.remove(v[3].1.as_tensor()); // its first gradient at step 2
                        }
                        if matches!(step, 2 | 3 | 5) {
                            let bad =
                                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][step as usize % 3];
                            let mut vals = values(step, v[1].1.elem_count());
                            vals[3] = bad;
                            g.insert(
                                v[1].1.as_tensor(),
                                Tensor::from_vec(vals, v[1].1.dims(), &Device::Cpu).unwrap(),
                            );
                        }
                        o.step(&g).unwrap()
                    })
                    .collect();
                // Decided on the device once every parameter with a gradient has state.
                let deferred = !host_only && step != 0 && (step < 2 || last_has_state);
                assert!(reports[0].is_resolved(), "{label} step {step}");
                assert_eq!(!reports[1].is_resolved(), deferred, "{label} step {step}");
                // Read while the deferred step's counters are still uncorrected ...
                let a = snapshot(opts[0].as_ref(), &vars[0]);
                assert_eq!(
                    snapshot(opts[1].as_ref(), &vars[1]),
                    a,
                    "{label} step {step}"
                );
                assert!(reports[1].is_resolved(), "{label} step {step}");
                // (Debug: a NaN norm, under Propagate, equals itself there.)
                assert_eq!(
                    format!("{:?}", reports[0]),
                    format!("{:?}", reports[1]),
                    "{label} step {step}"
                );
                let skipped = policy == NonFinitePolicy::SkipStep && matches!(step, 2 | 3 | 5);
                assert_eq!(reports[1].taken(), !skipped, "{label} step {step}");
                last_has_state |= step >= 2 && !skipped;
                assert_eq!(
                    opts[0].learning_rate(),
                    opts[1].learning_rate(),
                    "{label} step {step}"
                );
                assert_eq!(
                    opts[0].save_bytes().unwrap(),
                    opts[1].save_bytes().unwrap(),
                    "{label} step {step}: checkpoint"
                );
            }
            // ... and after the next call settles them.
            for o in opts.iter_mut() {
                o.set_verdict_mode(VerdictMode::Host).unwrap();
            }
            assert_eq!(
                snapshot(opts[0].as_ref(), &vars[0]),
                snapshot(opts[1].as_ref(), &vars[1]),
                "{label}: settled"
            );
        }
    }
}
