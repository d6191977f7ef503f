//! 8-bit state through the AVX-512 VBMI codecs equals the same run through the portable scalar
//! codecs, bit for bit, over several steps, for every optimizer of the table. A binary of its
//! own: the switch between the two is process-wide.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};
use candle_optim::bench_internals::simd::force_scalar_codecs;
use candle_optim::Algo;
use common::{named_vars, snapshot, table, tensor};

/// Whole and partial quantization blocks; one tensor big enough to be split across threads;
/// one under the 8-bit threshold.
const SHAPES: &[&[usize]] = &[&[64, 70], &[300, 1100], &[70]];

/// Four steps from the same start; every byte of parameters and state afterwards.
fn run(e: &common::Entry, dtype: DType, scalar: bool) -> Vec<Vec<u8>> {
    let vars: Vec<(String, Var)> = named_vars(SHAPES, dtype);
    let mut hyper = e.hyper.clone();
    hyper["state_format"] = "blockwise8".into();
    let mut opt = e.algo.build_json(vars.clone(), &hyper).expect("build");
    force_scalar_codecs(scalar);
    for step in 0..4u64 {
        let mut g = GradStore::default();
        for (i, (_, v)) in vars.iter().enumerate() {
            let t = tensor(step * 31 + i as u64, v.dims(), dtype);
            g.insert(v.as_tensor(), t.affine(0.1, 0.0).unwrap());
        }
        opt.step(&g).expect("step");
    }
    force_scalar_codecs(false);
    snapshot(opt.as_ref(), &vars)
}

#[test]
fn vector_and_scalar_codecs_give_the_same_run() {
    // Muon keeps f32 state only.
    for e in table().into_iter().filter(|e| e.algo != Algo::Muon) {
        for dtype in [DType::F32, DType::BF16] {
            let fast = run(&e, dtype, false);
            let scalar = run(&e, dtype, true);
            assert_eq!(fast.len(), scalar.len(), "{} {dtype:?}", e.label);
            for (i, (a, b)) in fast.iter().zip(&scalar).enumerate() {
                assert!(a == b, "{} {dtype:?}: item {i} differs", e.label);
            }
        }
    }
}
