//! The one table of optimizers that drives the shared tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use candle_optim::{Algo, Optimizer};
use serde_json::{json, Value};

/// One optimizer configuration under test.
pub struct Entry {
    pub algo: Algo,
    /// Distinguishes option variants of the same algorithm.
    pub label: &'static str,
    /// Hyperparameters with the official names (missing ones take the defaults).
    pub hyper: Value,
    /// State bytes per element for f32 parameters (matrices, for an algorithm that routes by
    /// rank).
    pub state_bytes: usize,
    /// State bytes per element for f32 parameters of rank ≠ 2 (Muon's auxiliary AdamW); equal
    /// to `state_bytes` for every algorithm that does not route by rank.
    pub state_bytes_other: usize,
    /// Hyperparameter sets that must be rejected.
    pub invalid: Vec<Value>,
}

fn bad_common() -> Vec<Value> {
    vec![
        json!({"lr": -1e-3}),
        json!({"lr": f64::NAN}),
        json!({"weight_decay": -0.1}),
    ]
}

fn bad_betas2() -> Vec<Value> {
    vec![
        json!({"betas": [1.0, 0.999]}),
        json!({"betas": [0.9, 1.0]}),
        json!({"betas": [-0.1, 0.999]}),
    ]
}

fn with(mut a: Vec<Value>, b: Vec<Value>) -> Vec<Value> {
    a.extend(b);
    a
}

/// Every algorithm with its default options, plus the option variants that change the state.
pub fn table() -> Vec<Entry> {
    Algo::ALL.iter().flat_map(|&a| entries(a)).collect()
}

/// One algorithm's entries. An exhaustive match: a new algorithm in the crate's table does not
/// compile until it is given its entries here.
fn entries(algo: Algo) -> Vec<Entry> {
    let entry = |label, hyper, state_bytes, invalid| Entry {
        algo,
        label,
        hyper,
        state_bytes,
        state_bytes_other: state_bytes,
        invalid,
    };
    match algo {
        Algo::SgdSai => vec![
            entry(
                "sgd_sai",
                json!({}),
                4,
                with(
                    bad_common(),
                    vec![
                        json!({"momentum": 1.0}),
                        json!({"momentum": -0.5}),
                        json!({"eps": -1e-8}),
                    ],
                ),
            ),
            entry("sgd_sai_no_momentum", json!({"momentum": 0.0}), 0, vec![]),
        ],
        Algo::AdamW => vec![
            entry(
                "adamw",
                json!({}),
                8,
                with(
                    with(bad_common(), bad_betas2()),
                    vec![json!({"eps": -1e-8})],
                ),
            ),
            entry("adamw_amsgrad", json!({"amsgrad": true}), 12, vec![]),
        ],
        Algo::AdamP => vec![entry(
            "adamp",
            json!({"weight_decay": 0.01}),
            8,
            with(
                with(bad_common(), bad_betas2()),
                vec![json!({"eps": -1.0}), json!({"delta": -0.1})],
            ),
        )],
        Algo::AdaBelief => vec![
            entry(
                "adabelief",
                json!({}),
                8,
                with(
                    with(bad_common(), bad_betas2()),
                    vec![json!({"eps": -1e-16})],
                ),
            ),
            entry("adabelief_amsgrad", json!({"amsgrad": true}), 12, vec![]),
        ],
        Algo::DiffGrad => vec![entry(
            "diffgrad",
            json!({"weight_decay": 0.01}),
            12,
            with(
                with(bad_common(), bad_betas2()),
                vec![json!({"eps": -1e-8})],
            ),
        )],
        Algo::Adan => vec![entry(
            "adan",
            json!({"weight_decay": 0.02, "max_grad_norm": 1.0}),
            16,
            with(
                bad_common(),
                vec![
                    json!({"betas": [0.98, 0.92, 1.0]}),
                    json!({"betas": [1.0, 0.92, 0.99]}),
                    json!({"max_grad_norm": -1.0}),
                    json!({"eps": -1e-8}),
                ],
            ),
        )],
        Algo::Lion => vec![entry(
            "lion",
            json!({"weight_decay": 0.1}),
            4,
            with(bad_common(), bad_betas2()),
        )],
        Algo::Muon => vec![
            // Matrices take Muon (a momentum buffer), the rest the auxiliary AdamW (2 moments).
            Entry {
                state_bytes_other: 8,
                ..entry(
                    "muon",
                    json!({}),
                    4,
                    with(
                        bad_common(),
                        vec![
                            json!({"momentum": -0.5}),
                            json!({"ns_steps": 100}),
                            json!({"eps": -1e-7}),
                            json!({"adamw_betas": [1.0, 0.95]}),
                            json!({"adamw_eps": -1e-10}),
                        ],
                    ),
                )
            },
            Entry {
                state_bytes_other: 8,
                ..entry(
                    "muon_nesterov_off_match_rms_bf16",
                    json!({"nesterov": false, "adjust_lr_fn": "match_rms_adamw", "ns_dtype": "bfloat16"}),
                    4,
                    vec![],
                )
            },
            // A group of AdamW parameters (embeddings, heads) of a Muon optimizer.
            entry("muon_adamw_group", json!({"use_muon": false}), 8, vec![]),
        ],
        Algo::Sgd => vec![
            // torch's default: no momentum, no state.
            entry(
                "sgd",
                json!({}),
                0,
                with(
                    bad_common(),
                    vec![
                        json!({"momentum": -0.5}),
                        // Nesterov needs a momentum and zero dampening (torch's ValueError).
                        json!({"nesterov": true}),
                        json!({"nesterov": true, "momentum": 0.9, "dampening": 0.1}),
                    ],
                ),
            ),
            entry(
                "sgd_momentum_dampening_wd",
                json!({"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
                4,
                vec![],
            ),
            entry(
                "sgd_nesterov",
                json!({"momentum": 0.9, "nesterov": true, "weight_decay": 0.01}),
                4,
                vec![],
            ),
        ],
    }
}

/// Bytes of per-tensor scalars an algorithm keeps besides its state tensors (exhaustive).
pub fn scalar_bytes_per_tensor(algo: Algo) -> usize {
    match algo {
        Algo::SgdSai => 4, // the g-SNR
        Algo::AdamW
        | Algo::AdamP
        | Algo::AdaBelief
        | Algo::DiffGrad
        | Algo::Adan
        | Algo::Lion
        | Algo::Muon
        | Algo::Sgd => 0,
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn tensor(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(seed, n), shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

/// Every parameter's values, flattened, in f64.
pub fn param_values(vars: &[(String, Var)]) -> Vec<Vec<f64>> {
    vars.iter()
        .map(|(_, v)| {
            v.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

pub fn named_vars(shapes: &[&[usize]], dtype: DType) -> Vec<(String, Var)> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("p{i}"),
                Var::from_tensor(&tensor(100 + i as u64, s, dtype)).unwrap(),
            )
        })
        .collect()
}

pub fn build(e: &Entry, vars: &[(String, Var)]) -> Box<dyn Optimizer> {
    e.algo.build_json(vars.to_vec(), &e.hyper).expect("build")
}

/// Every byte of the parameters and of the optimizer state, for "nothing changed" checks.
pub fn snapshot(opt: &dyn Optimizer, vars: &[(String, Var)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let bytes = |t: &Tensor| -> Vec<u8> {
        let t = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
        t.to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    for (name, v) in vars {
        out.push(bytes(v.as_tensor()));
        if let Some(s) = opt.param_state(name) {
            out.push(s.step.to_le_bytes().to_vec());
            for (_, st) in &s.slots {
                for t in st.tensors() {
                    out.push(bytes(t));
                }
            }
            for (_, x) in &s.scalars {
                out.push(x.to_le_bytes().to_vec());
            }
        }
    }
    out.push(opt.step_count().to_le_bytes().to_vec());
    out
}
