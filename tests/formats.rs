//! State formats (f32, bf16, 8-bit blockwise) and stochastic rounding of bf16 parameters,
//! for every optimizer of the table: the first step against the f32 run, memory, checkpoints,
//! reproducibility and the statistics of the rounding.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{Algo, Error, Optimizer, StateTensor};
use common::{named_vars, table, tensor};
use serde_json::{json, Value};

fn with_format(hyper: &Value, format: &str) -> Value {
    let mut h = hyper.clone();
    h["state_format"] = format.into();
    h
}

fn grads(vars: &[(String, Var)], seed: u64) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        g.insert(
            v.as_tensor(),
            tensor(seed + i as u64, v.dims(), v.dtype())
                .affine(0.1, 0.0)
                .unwrap(),
        );
    }
    g
}

fn copy(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .into_iter()
        .map(f64::to_bits)
        .collect()
}

/// 64 × 70 = 4480 elements: 8-bit state at bitsandbytes' default threshold (4096), 18 blocks
/// with a short last one; the 70-element vector keeps f32 state.
const SHAPES: &[&[usize]] = &[&[64, 70], &[70]];

#[test]
fn first_step_equals_the_f32_run_with_its_state_stored_in_the_format() {
    for e in table() {
        if e.algo == Algo::Muon {
            continue;
        }
        for format in ["blockwise8", "bf16"] {
            let vars = named_vars(SHAPES, DType::F32);
            let (a, b) = (copy(&vars), copy(&vars));
            let mut full = e.algo.build_json(a.clone(), &e.hyper).unwrap();
            let mut low = e
                .algo
                .build_json(b.clone(), &with_format(&e.hyper, format))
                .unwrap();
            full.step(&grads(&a, 7)).unwrap();
            low.step(&grads(&b, 7)).unwrap();
            let what = format!("{} {format}", e.label);
            for ((name, va), (_, vb)) in a.iter().zip(&b) {
                // From zero state both runs compute the same first step.
                assert_eq!(bits(va.as_tensor()), bits(vb.as_tensor()), "{what}: {name}");
                let sf = full.param_state(name).unwrap();
                let sl = low.param_state(name).unwrap();
                assert_eq!(sf.slots.len(), sl.slots.len(), "{what}");
                for ((slot, f), (_, l)) in sf.slots.iter().zip(&sl.slots) {
                    let f = f.as_dense().unwrap();
                    let want = match (format, f.elem_count() >= 4096) {
                        ("bf16", _) => StateTensor::Dense(f.to_dtype(DType::BF16).unwrap()),
                        (_, true) => {
                            let signed = matches!(l, StateTensor::Blockwise8 { signed: true, .. });
                            StateTensor::quantize_blockwise8(f, signed).unwrap()
                        }
                        (_, false) => StateTensor::Dense(f.clone()),
                    };
                    assert_eq!(l.format_name(), want.format_name(), "{what}: {name}/{slot}");
                    for (x, y) in l.tensors().iter().zip(want.tensors()) {
                        assert_eq!(bits(x), bits(y), "{what}: {name}/{slot}");
                    }
                }
            }
        }
    }
}

#[test]
fn eight_bit_slot_maps_follow_the_sign_of_the_slot() {
    // Second moments (never negative) take the unsigned map; momenta the signed one.
    let vars = named_vars(&[&[4096]], DType::F32);
    let mut opt = Algo::AdamW
        .build_json(
            vars.clone(),
            &json!({"state_format": "blockwise8", "amsgrad": true}),
        )
        .unwrap();
    opt.step(&grads(&vars, 3)).unwrap();
    let st = opt.param_state("p0").unwrap();
    let signed: Vec<(&str, bool)> = st
        .slots
        .iter()
        .map(|(n, s)| match s {
            StateTensor::Blockwise8 { signed, .. } => (*n, *signed),
            _ => panic!("{n} is not 8-bit"),
        })
        .collect();
    assert_eq!(
        signed,
        [
            ("exp_avg", true),
            ("exp_avg_sq", false),
            ("max_exp_avg_sq", false)
        ]
    );
}

#[test]
fn state_bytes_per_format() {
    for e in table() {
        if e.algo == Algo::Muon {
            continue;
        }
        let slots = e.state_bytes / 4;
        let scalars = common::scalar_bytes_per_tensor(e.algo) * SHAPES.len();
        for (format, per_slot) in [
            ("f32", 4 * 4480 + 4 * 70),
            ("bf16", 2 * 4480 + 2 * 70),
            ("blockwise8", 4480 + 4 * 18 + 4 * 70),
        ] {
            let vars = named_vars(SHAPES, DType::F32);
            let mut opt = e
                .algo
                .build_json(vars.clone(), &with_format(&e.hyper, format))
                .unwrap();
            opt.step(&grads(&vars, 1)).unwrap();
            assert_eq!(
                opt.state_bytes(),
                slots * per_slot + scalars,
                "{} {format}",
                e.label
            );
            let report = opt.memory_report();
            let total: usize = report.iter().map(|m| m.bytes).sum();
            assert_eq!(total, slots * per_slot, "{} {format}", e.label);
            if slots > 0 && format == "blockwise8" {
                let q = report.iter().find(|m| m.format == "blockwise8").unwrap();
                assert_eq!((q.params, q.elements, q.dtype), (1, 4480, DType::U8));
            }
        }
    }
}

#[test]
fn eight_bit_bytes_per_parameter() {
    // Large tensors: ≈ 1.0156 B per slot and element (a code + an f32 absmax per 256).
    let hp = |algo: Algo| -> f64 {
        algo.state_bytes_per_element(&json!({"state_format": "blockwise8"}), 1 << 20)
            .unwrap()
    };
    let per_slot = 1.0 + 4.0 / 256.0;
    for (algo, slots) in [
        (Algo::AdamW, 2.0),
        (Algo::AdamP, 2.0),
        (Algo::AdaBelief, 2.0),
        (Algo::SgdSai, 1.0),
        (Algo::Lion, 1.0),
        (Algo::DiffGrad, 3.0),
        (Algo::Adan, 4.0),
    ] {
        assert_eq!(hp(algo), slots * per_slot, "{algo}");
    }
}

#[test]
fn muon_rejects_other_formats() {
    for format in ["blockwise8", "bf16"] {
        let vars = named_vars(&[&[8, 8]], DType::F32);
        let r = Algo::Muon.build_json(vars, &json!({"state_format": format}));
        assert!(matches!(r, Err(Error::Unsupported(_))), "{format}");
    }
}

#[test]
fn bad_format_keys_are_typed_errors() {
    let vars = named_vars(&[&[8]], DType::F32);
    for hp in [
        json!({"state_format": "int4"}),
        json!({"state_format": 8}),
        json!({"min_8bit_size": 16}),
        json!({"state_format": "bf16", "min_8bit_size": 16}),
        json!({"state_format": "blockwise8", "min_8bit_size": -1}),
        json!({"stochastic_rounding_seed": "x"}),
    ] {
        let r = Algo::AdamW.build_json(vars.clone(), &hp);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{hp}");
    }
}

#[test]
fn eight_bit_checkpoints_resume_bit_exactly_and_convert_only_on_request() {
    for e in table() {
        if e.algo == Algo::Muon {
            continue;
        }
        let hp = with_format(&e.hyper, "blockwise8");
        let vars = named_vars(SHAPES, DType::F32);
        let mut opt = e.algo.build_json(vars.clone(), &hp).unwrap();
        for t in 0..3 {
            opt.step(&grads(&vars, 10 + t)).unwrap();
        }
        let ckpt = opt.save_bytes().unwrap();
        let resumed_vars = copy(&vars);
        for t in 3..6 {
            opt.step(&grads(&vars, 10 + t)).unwrap();
        }
        let mut resumed = e.algo.build_json(resumed_vars.clone(), &hp).unwrap();
        resumed.load_bytes(&ckpt).unwrap();
        for t in 3..6 {
            resumed.step(&grads(&resumed_vars, 10 + t)).unwrap();
        }
        assert_eq!(
            common::snapshot(opt.as_ref(), &vars),
            common::snapshot(resumed.as_ref(), &resumed_vars),
            "{}",
            e.label
        );

        // Another format: a typed error and nothing changed, unless asked to convert.
        let mut f32_opt = e.algo.build_json(copy(&vars), &e.hyper).unwrap();
        let before = common::snapshot(f32_opt.as_ref(), &vars);
        assert!(
            matches!(
                f32_opt.load_bytes(&ckpt),
                Err(Error::StateFormatMismatch { .. })
            ),
            "{}",
            e.label
        );
        assert_eq!(before, common::snapshot(f32_opt.as_ref(), &vars));
        f32_opt.load_bytes_converting(&ckpt).unwrap();
        let mut q = e.algo.build_json(copy(&vars), &hp).unwrap();
        q.load_bytes(&ckpt).unwrap();
        let (sa, sb) = (
            f32_opt.param_state("p0").unwrap(),
            q.param_state("p0").unwrap(),
        );
        for ((_, a), (_, b)) in sa.slots.iter().zip(&sb.slots) {
            assert_eq!(a.format_name(), "f32");
            assert_eq!(bits(a.as_dense().unwrap()), bits(&b.to_f32().unwrap()));
        }
    }
}

/// Lion on bf16 weights at 1.0 with a constant gradient: each step moves every weight by
/// −lr, an eighth of bf16's spacing just below 1.0 (2^-8).
fn lion_bf16_run(
    rounding_seed: Option<u64>,
    steps: u64,
    n: usize,
) -> (Vec<(String, Var)>, Box<dyn Optimizer>) {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::ones(n, DType::BF16, &dev).unwrap()).unwrap();
    let vars = vec![("w".to_string(), w)];
    let mut hp = json!({"lr": 1e-3, "weight_decay": 0.0});
    if let Some(s) = rounding_seed {
        hp["stochastic_rounding_seed"] = s.into();
    }
    let mut opt = Algo::Lion.build_json(vars.clone(), &hp).unwrap();
    let mut g = GradStore::default();
    g.insert(
        vars[0].1.as_tensor(),
        Tensor::ones(n, DType::BF16, &dev).unwrap(),
    );
    for _ in 0..steps {
        opt.step(&g).unwrap();
    }
    (vars, opt)
}

fn mean(v: &Var) -> f64 {
    v.to_dtype(DType::F64)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn stochastic_rounding_is_unbiased() {
    // E[p_t] = 1 − t·lr exactly. Each step's rounding error has variance ≤ s²/4 (s = 2^-8) and
    // the errors are independent, so after 20 steps the mean over n = 65536 weights has a
    // standard deviation ≤ sqrt(20/4/n)·s ≈ 3.4e-5: the bound 2e-4 is about 6 of them.
    let (n, steps, lr) = (1 << 16, 20, 1e-3);
    let (vars, _) = lion_bf16_run(Some(42), steps, n);
    let m = mean(&vars[0].1);
    let want = 1.0 - steps as f64 * lr;
    assert!((m - want).abs() < 2e-4, "mean {m}, expected {want}");
    // Round-to-nearest loses every update: the weights never leave 1.0.
    let (vars, _) = lion_bf16_run(None, steps, n);
    assert_eq!(mean(&vars[0].1), 1.0);
}

#[test]
fn stochastic_rounding_is_reproducible_and_resumable() {
    let n = 4096;
    let run = |seed| {
        let (vars, _) = lion_bf16_run(Some(seed), 10, n);
        bits(vars[0].1.as_tensor())
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    // Five steps, a checkpoint, five more on a fresh optimizer: the same bits as ten straight.
    let (vars, opt) = lion_bf16_run(Some(7), 5, n);
    let ckpt = opt.save_bytes().unwrap();
    let w = vars[0].1.clone();
    let mut resumed = Algo::Lion
        .build_json(
            vec![("w".into(), w.clone())],
            &json!({"lr": 1e-3, "weight_decay": 0.0}),
        )
        .unwrap();
    // The checkpoint carries the rounding (and its seed) with the rest of the state.
    resumed.load_bytes(&ckpt).unwrap();
    let mut g = GradStore::default();
    g.insert(
        w.as_tensor(),
        Tensor::ones(n, DType::BF16, &Device::Cpu).unwrap(),
    );
    for _ in 0..5 {
        resumed.step(&g).unwrap();
    }
    assert_eq!(bits(w.as_tensor()), run(7));
}
