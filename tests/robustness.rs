//! Defects found by trying the crate as a demanding user would: each test failed on the code
//! before its fix. Over the table of optimizers where the behaviour is shared.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{AdamW, AdamWConfig, Algo, Error, Optimizer, SgdSai, SgdSaiConfig};
use common::*;
use serde_json::{json, Value};

fn grads_for(vars: &[(String, Var)], seed: u64) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        g.insert(
            v.as_tensor(),
            tensor(seed * 13 + i as u64, v.dims(), v.dtype()),
        );
    }
    g
}

#[test]
fn zero_element_parameters_are_no_ops() {
    // A zero before a non-unit dimension made candle's in-place op fail ("dst has repeated
    // elements") after earlier parameters of the group had been updated.
    const SHAPES: &[&[usize]] = &[&[5, 3], &[3, 0, 2], &[4, 0], &[0], &[6]];
    for e in table() {
        let vars = named_vars(SHAPES, DType::F32);
        let mut opt = build(&e, &vars);
        let before = param_values(&vars);
        for s in 0..3 {
            let r = opt
                .step(&grads_for(&vars, s))
                .unwrap_or_else(|err| panic!("{}: {err}", e.label));
            assert!(r.taken(), "{}", e.label);
            assert_eq!(r.updated(), 2, "{}: only the non-empty parameters", e.label);
        }
        let after = param_values(&vars);
        assert_ne!(after[0], before[0], "{}", e.label);
        assert_ne!(after[4], before[4], "{}", e.label);
        assert_eq!(opt.step_count(), 3, "{}", e.label);
        for name in ["p1", "p2", "p3"] {
            let st = opt.param_state(name).unwrap();
            assert!(st.slots.is_empty() && st.step == 0, "{}: {name}", e.label);
        }
        // And a checkpoint of such an optimizer loads.
        let bytes = opt.save_bytes().unwrap();
        let mut fresh = build(&e, &vars);
        fresh.load_bytes(&bytes).unwrap();
        assert_eq!(fresh.save_bytes().unwrap(), bytes, "{}", e.label);
    }
}

#[test]
fn group_rates_come_from_one_source() {
    let vars = named_vars(&[&[4, 4], &[4]], DType::F32);
    let build = |base: f64| {
        AdamW::builder(AdamWConfig {
            lr: base,
            ..Default::default()
        })
        .named_vars(vars.clone())
        .group_names(&["p1"], |c| c.lr *= 4.0)
    };
    // The configurations are never rewritten; the rate in effect is peak × ratio.
    let mut opt = build(1e-3).build().unwrap();
    opt.set_learning_rate(0.0).unwrap();
    assert_eq!(opt.group_learning_rate(1), Some(0.0));
    opt.set_learning_rate(2e-3).unwrap();
    assert_eq!(opt.group_learning_rate(1), Some(8e-3));
    assert_eq!(opt.group_config(1).unwrap().lr, 4e-3);
    // A base rate of 0 keeps a relative override's ratio (it used to become 1).
    let mut opt = build(0.0).build().unwrap();
    assert_eq!(opt.group_learning_rate(1), Some(0.0));
    opt.set_learning_rate(1e-3).unwrap();
    assert_eq!(opt.group_learning_rate(0), Some(1e-3));
    assert_eq!(opt.group_learning_rate(1), Some(4e-3));
    // ... and survives a checkpoint.
    let bytes = opt.save_bytes().unwrap();
    let mut back = build(0.0).build().unwrap();
    back.load_bytes(&bytes).unwrap();
    assert_eq!(back.group_learning_rate(1), Some(4e-3));
    // An absolute rate under a base rate of 0 has no ratio: a typed error, not a silent 1.
    let r = AdamW::builder(AdamWConfig {
        lr: 0.0,
        ..Default::default()
    })
    .named_vars(vars.clone())
    .group_names(&["p1"], |c| c.lr = 1e-3)
    .build();
    assert!(matches!(r, Err(Error::InvalidHyperparameter { .. })));
}

#[test]
fn a_failing_step_changes_nothing() {
    for e in table() {
        let vars = named_vars(&[&[6, 3], &[3]], DType::F32);
        let mut opt = build(&e, &vars);
        opt.step(&grads_for(&vars, 1)).unwrap();
        let before = opt.save_bytes().unwrap();
        let values = param_values(&vars);
        // A gradient of the wrong dtype for the last parameter only.
        let mut g = grads_for(&vars, 2);
        g.insert(
            vars[1].1.as_tensor(),
            Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
        );
        assert!(opt.step(&g).is_err(), "{}", e.label);
        assert_eq!(param_values(&vars), values, "{}", e.label);
        assert_eq!(opt.save_bytes().unwrap(), before, "{}", e.label);
    }
    // candle-nn's set_learning_rate cannot fail: the bad rate fails the next step.
    let vars = named_vars(&[&[6, 3]], DType::F32);
    let mut opt = AdamW::new(vec![vars[0].1.clone()], AdamWConfig::default()).unwrap();
    candle_nn::optim::Optimizer::set_learning_rate(&mut opt, -1.0);
    let before = param_values(&vars);
    assert!(matches!(
        opt.step(&grads_for(&vars, 1)),
        Err(Error::InvalidHyperparameter { .. })
    ));
    assert_eq!(param_values(&vars), before);
    assert_eq!(opt.step_count(), 0);
}

// ---- checkpoints: re-signed with a valid CRC, so only the content is wrong ----

/// The state JSON of a checkpoint.
fn state_of(bytes: &[u8]) -> Value {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let meta: Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["candle_optim"]).unwrap();
    serde_json::from_str(meta["state"].as_str().unwrap()).unwrap()
}

/// The checkpoint `bytes` with its state JSON and tensors changed by `f` and `g`, and a
/// correct checksum (the crate's format: CRC-32 of the state JSON and of every tensor's name,
/// dtype, shape and bytes in name order).
fn resign(
    bytes: &[u8],
    f: impl FnOnce(&mut Value),
    g: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>),
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let dtypes: std::collections::HashMap<String, safetensors::Dtype> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype()))
        .collect();
    let dtype = |n: &str| dtypes.get(n).copied().unwrap_or(safetensors::Dtype::F32);
    let mut state = state_of(bytes);
    f(&mut state);
    let state = serde_json::to_string(&state).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    g(&mut tensors);
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = crc32fast::Hasher::new();
    h.update(state.as_bytes());
    for (name, shape, data) in &tensors {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{:?}", dtype(name)).as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
    }
    let meta = json!({ "crc32": h.finalize(), "state": state }).to_string();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype(n), s.clone(), d).unwrap(),
            )
        })
        .collect();
    let info = std::collections::HashMap::from([("candle_optim".to_string(), meta)]);
    safetensors::serialize(views, Some(info)).unwrap()
}

/// A loaded optimizer's checkpoint must be rejected with a typed error, leaving it unchanged.
fn assert_refused(opt: &mut dyn Optimizer, bytes: &[u8], what: &str) -> Error {
    let before = opt.save_bytes().unwrap();
    let err = match opt.load_bytes(bytes) {
        Err(e) => e,
        Ok(()) => panic!("{what}: loaded"),
    };
    assert_eq!(opt.save_bytes().unwrap(), before, "{what}: changed");
    assert!(
        err.to_string().len() < 600,
        "{what}: an error message of {} bytes",
        err.to_string().len()
    );
    err
}

#[test]
fn checkpoints_are_validated_like_construction() {
    let vars = named_vars(&[&[8, 6], &[6]], DType::F32);
    let gs = |s| grads_for(&vars, s);
    for e in table() {
        let mut opt = build(&e, &vars);
        for s in 0..3 {
            opt.step(&gs(s)).unwrap();
        }
        let good = opt.save_bytes().unwrap();
        let mut target = build(&e, &vars);
        target.load_bytes(&good).unwrap(); // the untouched checkpoint loads
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "negative peak_lr",
                Box::new(|s| s["peak_lr"] = json!(-1e-3)),
            ),
            (
                "negative group lr",
                Box::new(|s| s["groups"][0]["config"]["lr"] = json!(-1e-3)),
            ),
            (
                "negative ratio",
                Box::new(|s| s["groups"][0]["lr_ratio"] = json!(-1.0)),
            ),
            (
                "step counter at its maximum",
                Box::new(|s| s["steps"] = json!(u64::MAX)),
            ),
            (
                "parameter counter beyond the group's",
                Box::new(|s| s["groups"][0]["params"][0]["step"] = json!(1000)),
            ),
            (
                "missing config field",
                Box::new(|s| {
                    let c = s["groups"][0]["config"].as_object_mut().unwrap();
                    let k = c.keys().find(|k| *k != "lr").unwrap().clone();
                    c.remove(&k);
                }),
            ),
            (
                "unknown config field",
                Box::new(|s| s["base"]["bogus"] = json!(1)),
            ),
            (
                "unknown top-level field",
                Box::new(|s| s["bogus"] = json!(1)),
            ),
            (
                "unknown schedule field",
                Box::new(|s| {
                    s["schedule"] =
                        json!({"kind": "linear", "steps": 4, "final_factor": 0.0, "bogus": 1})
                }),
            ),
            (
                "missing parameter field",
                Box::new(|s| {
                    s["groups"][0]["params"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("fresh");
                }),
            ),
            (
                "huge name",
                Box::new(|s| s["groups"][0]["params"][0]["name"] = json!("x".repeat(1 << 20))),
            ),
        ];
        for (what, edit) in &cases {
            let bad = resign(&good, edit, |_| {});
            let what = format!("{}: {what}", e.label);
            assert_refused(target.as_mut(), &bad, &what);
        }
        // A second moment below zero (every algorithm but SGD-SaI and Lion keeps one).
        let second: Vec<String> = state_names(&good)
            .into_iter()
            .filter(|n| n.ends_with("_sq") || n.ends_with("_var"))
            .collect();
        if let Some(name) = second.first() {
            let bad = resign(
                &good,
                |_| {},
                |ts| {
                    let t = ts.iter_mut().find(|t| &t.0 == name).unwrap();
                    t.2[..4].copy_from_slice(&(-1f32).to_le_bytes());
                },
            );
            assert_refused(
                target.as_mut(),
                &bad,
                &format!("{}: negative {name}", e.label),
            );
        }
    }
}

fn state_names(bytes: &[u8]) -> Vec<String> {
    safetensors::SafeTensors::deserialize(bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect()
}

#[test]
fn sgd_sai_scalars_no_run_can_produce_are_refused() {
    let vars = named_vars(&[&[8, 6], &[6]], DType::F32);
    let mk = |mode: &str| {
        Algo::SgdSai
            .build_json(vars.clone(), &json!({"gsnr_mode": mode}))
            .unwrap()
    };
    let mut opt = mk("max_normalized");
    opt.step(&grads_for(&vars, 1)).unwrap();
    let good = opt.save_bytes().unwrap();
    let mut target = mk("max_normalized");
    for (what, v) in [("1e300", json!(1e300)), ("negative", json!(-2.0))] {
        let bad = resign(
            &good,
            |s| s["groups"][0]["params"][0]["extra"]["gsnr"] = v.clone(),
            |_| {},
        );
        assert_refused(target.as_mut(), &bad, &format!("g-SNR {what}"));
    }
    let bad = resign(&good, |s| s["global"]["gsnr_max"] = json!(0.0), |_| {});
    assert_refused(target.as_mut(), &bad, "g-SNR maximum 0");
}

#[test]
fn positional_names_never_put_state_on_the_wrong_parameter() {
    // `varmap.all_vars()` comes in HashMap order: the same model gives `param.<i>` to other
    // tensors in another run.
    let cfg = SgdSaiConfig::default;
    let a = Var::from_tensor(&tensor(1, &[4, 3], DType::F32)).unwrap();
    let b = Var::from_tensor(&tensor(2, &[3], DType::F32)).unwrap();
    let c = Var::from_tensor(&tensor(3, &[4, 3], DType::F32)).unwrap();
    let grads = |vs: &[&Var], s: u64| {
        let mut g = GradStore::default();
        for (i, v) in vs.iter().enumerate() {
            g.insert(
                v.as_tensor(),
                tensor(s * 7 + i as u64, v.dims(), DType::F32),
            );
        }
        g
    };
    // Distinct shapes: matched by shape, whatever the order.
    let mut opt = SgdSai::new(vec![a.clone(), b.clone()], cfg()).unwrap();
    opt.step(&grads(&[&a, &b], 1)).unwrap();
    let bytes = opt.save_bytes().unwrap();
    let mut swapped = SgdSai::new(vec![b.clone(), a.clone()], cfg()).unwrap();
    swapped.load_bytes(&bytes).unwrap();
    assert_eq!(swapped.gsnr(&a), opt.gsnr(&a));
    assert_eq!(swapped.gsnr(&b), opt.gsnr(&b));
    // Two of the same shape: which is which cannot be known, so the load is refused.
    let mut opt = SgdSai::new(vec![a.clone(), c.clone()], cfg()).unwrap();
    opt.step(&grads(&[&a, &c], 1)).unwrap();
    let bytes = opt.save_bytes().unwrap();
    let mut other = SgdSai::new(vec![c.clone(), a.clone()], cfg()).unwrap();
    assert!(matches!(
        assert_refused(&mut other, &bytes, "ambiguous positions"),
        Error::AmbiguousCheckpoint(_)
    ));
    // Named parameters are matched by name, whatever the shapes.
    let named = |x: &Var, y: &Var| {
        SgdSai::builder(cfg())
            .named_vars([("w1", x.clone()), ("w2", y.clone())])
            .build()
            .unwrap()
    };
    let mut opt = named(&a, &c);
    opt.step(&grads(&[&a, &c], 1)).unwrap();
    let mut back = named(&a, &c);
    back.load_bytes(&opt.save_bytes().unwrap()).unwrap();
    assert_eq!(back.gsnr(&c), opt.gsnr(&c));
}

#[test]
fn unknown_hyperparameters_are_errors() {
    let vars = named_vars(&[&[3]], DType::F32);
    for &algo in Algo::ALL {
        let r = algo.build_json(vars.clone(), &json!({"learning_rate": 1e-3}));
        assert!(matches!(r, Err(Error::Unsupported(_))), "{algo}");
        // PyTorch's implementation switches and keys set to null are accepted.
        algo.build_json(
            vars.clone(),
            &json!({"foreach": true, "fused": false, "bogus": null}),
        )
        .unwrap();
    }
}

#[test]
fn every_non_finite_value_is_found_in_every_dtype_and_position() {
    // The non-finite check without clipping runs its own pass (no norm): it must find a NaN or
    // an infinity wherever it sits, in the vector body or the tail, in each parameter dtype.
    let n = 70_001; // several reduction leaves and a ragged tail
    for dt in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        for clip in [None, Some(1.0)] {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                for at in [0, 31, 32, n / 2, n - 1] {
                    let w = Var::from_tensor(&tensor(1, &[n], dt)).unwrap();
                    let mut opt = Algo::AdamW
                        .build_json(vec![("w".into(), w.clone())], &json!({}))
                        .unwrap();
                    opt.set_max_grad_norm(clip).unwrap();
                    let mut g: Vec<f64> = tensor(2, &[n], DType::F64).to_vec1().unwrap();
                    g[at] = bad;
                    let mut grads = GradStore::default();
                    let gt = Tensor::new(g, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
                    grads.insert(w.as_tensor(), gt.clone());
                    let r = opt.step(&grads).unwrap();
                    assert!(!r.taken(), "{dt:?} clip {clip:?}: {bad} at {at} not found");
                    // The same gradient with the value made finite is stepped.
                    let fixed = gt.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                    let mut v: Vec<f64> = fixed.to_vec1().unwrap();
                    v[at] = 0.5;
                    grads.insert(
                        w.as_tensor(),
                        Tensor::new(v, &Device::Cpu).unwrap().to_dtype(dt).unwrap(),
                    );
                    assert!(opt.step(&grads).unwrap().taken(), "{dt:?} finite");
                }
            }
        }
    }
}

#[test]
fn damaged_eight_bit_checkpoints_are_refused() {
    let vars = named_vars(&[&[16, 20], &[20]], DType::F32);
    let hp = json!({"state_format": "blockwise8", "min_8bit_size": 256});
    let mut opt = Algo::AdamW.build_json(vars.clone(), &hp).unwrap();
    for s in 0..2 {
        opt.step(&grads_for(&vars, s)).unwrap();
    }
    let good = opt.save_bytes().unwrap();
    let mut target = Algo::AdamW.build_json(vars.clone(), &hp).unwrap();
    target.load_bytes(&good).unwrap();
    let f32_at = |v: f32| {
        move |t: &mut Vec<(String, Vec<usize>, Vec<u8>)>| {
            let a = t
                .iter_mut()
                .find(|x| x.0 == "p0/exp_avg_sq.absmax")
                .unwrap();
            a.2[..4].copy_from_slice(&v.to_le_bytes());
        }
    };
    let bad = [
        ("negative absmax", resign(&good, |_| {}, f32_at(-1.0))),
        ("NaN absmax", resign(&good, |_| {}, f32_at(f32::NAN))),
        (
            "absmax of the wrong length",
            resign(
                &good,
                |_| {},
                |t| {
                    let a = t.iter_mut().find(|x| x.0 == "p0/exp_avg.absmax").unwrap();
                    a.1 = vec![1];
                    a.2.truncate(4);
                },
            ),
        ),
        (
            "codes missing",
            resign(&good, |_| {}, |t| t.retain(|x| x.0 != "p0/exp_avg.codes")),
        ),
        (
            "the group's format said to be f32",
            resign(
                &good,
                |s| s["groups"][0]["state_format"] = json!("f32"),
                |_| {},
            ),
        ),
        (
            "unknown state format",
            resign(
                &good,
                |s| s["groups"][0]["state_format"] = json!("int3"),
                |_| {},
            ),
        ),
        (
            "unknown rounding",
            resign(&good, |s| s["rounding"] = json!("upward"), |_| {}),
        ),
    ];
    for (what, bytes) in bad {
        assert_refused(target.as_mut(), &bytes, what);
    }
}
