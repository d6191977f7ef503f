//! Data parallelism and ZeRO-1 sharding on CPU ranks (threads with `ThreadComm`): a sharded run
//! must equal one optimizer stepping on the averaged gradients, for every optimizer of the
//! table, at 2, 3 and 4 ranks, across checkpoints saved at one number of ranks and resumed at
//! another.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_optim::dist::{
    average, average_gradients, Collective, Communicator, Sharded, ThreadComm,
};
use candle_optim::{AdamW, AdamWConfig, Algo, Error, Optimizer, StepReport};
use common::{table, values, Entry};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Matrices (Muon's and AdamP's projected ones), a tensor smaller than the number of ranks, one
/// above the 8-bit threshold, uneven sizes, a scalar, and one with no elements.
const SHAPES: &[&[usize]] = &[&[48, 40], &[3], &[70, 73], &[40, 37], &[1], &[0, 5], &[300]];

fn vars(dtype: DType) -> Vec<(String, Var)> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let t = Tensor::from_vec(values(100 + i as u64, n), *s, &candle_core::Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .unwrap();
            (format!("p{i}"), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// Rank `rank`'s gradient of parameter `i` at step `step`, or `None`: parameter 4 has one on
/// rank 0 only, at odd steps; parameter 1 has none on any rank at step 2.
fn local_grad(rank: usize, step: usize, i: usize, v: &Var) -> Option<Tensor> {
    if (i == 4 && (rank != 0 || step.is_multiple_of(2))) || (i == 1 && step == 2) {
        return None;
    }
    let seed = 1000 * step as u64 + 10 * i as u64 + rank as u64;
    let g = Tensor::from_vec(values(seed, v.elem_count()), v.shape(), v.device()).unwrap();
    Some(g.to_dtype(v.dtype()).unwrap())
}

fn local_grads(rank: usize, step: usize, vars: &[(String, Var)]) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        if let Some(t) = local_grad(rank, step, i, v) {
            g.insert(v.as_tensor(), t);
        }
    }
    g
}

/// The gradients a single process steps on: the average over `n` ranks (zeros where a rank
/// has none; no gradient where no rank has one), combined as `ThreadComm` combines them.
fn averaged_grads(n: usize, step: usize, vars: &[(String, Var)]) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        let per: Vec<Option<Tensor>> = (0..n).map(|r| local_grad(r, step, i, v)).collect();
        if per.iter().all(Option::is_none) || v.elem_count() == 0 {
            continue;
        }
        let ts: Vec<Tensor> = per
            .into_iter()
            .map(|t| {
                t.unwrap_or_else(|| v.zeros_like().unwrap())
                    .flatten_all()
                    .unwrap()
            })
            .collect();
        g.insert(
            v.as_tensor(),
            average(&ts).unwrap().reshape(v.shape()).unwrap(),
        );
    }
    g
}

fn bits(vars: &[(String, Var)]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|(_, v)| {
            let t = v.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

/// Sets the parameters to values saved by [`bits`] (a checkpoint holds no parameters).
fn set_bits(vars: &[(String, Var)], bits: &[Vec<u32>]) {
    for ((_, v), b) in vars.iter().zip(bits) {
        let x: Vec<f32> = b.iter().map(|&u| f32::from_bits(u)).collect();
        let t = Tensor::from_vec(x, v.shape(), v.device()).unwrap();
        v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
    }
}

struct RankOut {
    params: Vec<Vec<u32>>,
    checkpoint: Vec<u8>,
    state_bytes: usize,
    reports: Vec<StepReport>,
}

/// Steps `steps` on `n` ranks from `resume` (a single-process checkpoint) if given.
fn run_sharded(
    algo: Algo,
    hyper: &Value,
    dtype: DType,
    n: usize,
    steps: std::ops::Range<usize>,
    resume: Option<(&[u8], &[Vec<u32>])>,
    setup: &(dyn Fn(&mut dyn Optimizer) + Sync),
) -> Vec<RankOut> {
    let comms = ThreadComm::group_with_timeout(n, Duration::from_secs(60)).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let steps = steps.clone();
                s.spawn(move || {
                    let rank = comm.rank();
                    let vs = vars(dtype);
                    if let Some((_, params)) = resume {
                        set_bits(&vs, params);
                    }
                    let mut opt = algo
                        .build_sharded(vs.clone(), hyper, false, Arc::new(comm))
                        .unwrap();
                    setup(&mut *opt);
                    if let Some((bytes, _)) = resume {
                        opt.load_bytes(bytes).unwrap();
                    }
                    let mut reports = Vec::new();
                    for step in steps {
                        reports.push(opt.step(&local_grads(rank, step, &vs)).unwrap());
                    }
                    RankOut {
                        params: bits(&vs),
                        checkpoint: opt.save_bytes().unwrap(),
                        state_bytes: opt.state_bytes(),
                        reports,
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The single-process run on the averaged gradients of `n` ranks.
fn run_single(
    algo: Algo,
    hyper: &Value,
    dtype: DType,
    n: usize,
    steps: std::ops::Range<usize>,
    setup: &(dyn Fn(&mut dyn Optimizer) + Sync),
) -> (Vec<Vec<u32>>, Vec<u8>, usize, Vec<StepReport>) {
    let vs = vars(dtype);
    let mut opt = algo.build_json(vs.clone(), hyper).unwrap();
    setup(&mut *opt);
    let reports = steps
        .map(|step| opt.step(&averaged_grads(n, step, &vs)).unwrap())
        .collect();
    (
        bits(&vs),
        opt.save_bytes().unwrap(),
        opt.state_bytes(),
        reports,
    )
}

fn no_setup(_: &mut dyn Optimizer) {}

fn check_equal(
    e: &Entry,
    n: usize,
    single: &(Vec<Vec<u32>>, Vec<u8>, usize, Vec<StepReport>),
    ranks: &[RankOut],
) {
    let what = format!("{} at {n} ranks", e.label);
    for (r, out) in ranks.iter().enumerate() {
        assert_eq!(out.params, single.0, "{what}: rank {r}'s parameters differ");
        assert!(
            out.checkpoint == single.1,
            "{what}: rank {r}'s consolidated checkpoint differs from the single-process one"
        );
        for (a, b) in out.reports.iter().zip(&single.3) {
            assert_eq!(
                (a.taken(), a.updated(), a.step()),
                (b.taken(), b.updated(), b.step()),
                "{what}"
            );
        }
    }
    // The state is partitioned: the ranks' bytes add up to the single process's.
    let total: usize = ranks.iter().map(|o| o.state_bytes).sum();
    assert_eq!(total, single.2, "{what}: state bytes");
}

#[test]
fn sharded_equals_single_process_bitwise_for_every_optimizer() {
    for e in table() {
        for n in [2, 3, 4] {
            let single = run_single(e.algo, &e.hyper, DType::F32, n, 1..5, &no_setup);
            let ranks = run_sharded(e.algo, &e.hyper, DType::F32, n, 1..5, None, &no_setup);
            check_equal(&e, n, &single, &ranks);
        }
    }
}

#[test]
fn resume_at_a_different_number_of_ranks() {
    for e in table() {
        // Two steps at 2 ranks, saved; loaded at 3 ranks (which save the same bytes); two more
        // steps at 2 ranks from there: the same as four steps of one process on the averages
        // of 2 ranks. The checkpoint then loads in a single process too.
        let first = run_sharded(e.algo, &e.hyper, DType::F32, 2, 1..3, None, &no_setup);
        let moved = run_sharded(
            e.algo,
            &e.hyper,
            DType::F32,
            3,
            3..3,
            Some((&first[0].checkpoint, &first[0].params)),
            &no_setup,
        );
        assert_eq!(
            moved[1].checkpoint, first[0].checkpoint,
            "{}: 2 → 3 ranks",
            e.label
        );
        let second = run_sharded(
            e.algo,
            &e.hyper,
            DType::F32,
            2,
            3..5,
            Some((&moved[2].checkpoint, &moved[2].params)),
            &no_setup,
        );
        let single = run_single(e.algo, &e.hyper, DType::F32, 2, 1..5, &no_setup);
        assert!(second[1].checkpoint == single.1, "{}: resumed", e.label);
        assert_eq!(second[0].params, single.0, "{}: resumed", e.label);
        // And at one process.
        let vs = vars(DType::F32);
        set_bits(&vs, &second[0].params);
        let mut one = e.algo.build_json(vs.clone(), &e.hyper).unwrap();
        one.load_bytes(&second[0].checkpoint).unwrap();
        assert_eq!(
            one.save_bytes().unwrap(),
            single.1,
            "{}: 2 ranks → 1",
            e.label
        );
    }
}

#[test]
fn sharded_low_precision_state_and_bf16_stochastic_rounding() {
    let cases = [
        (
            Algo::AdamW,
            json!({"state_format": "blockwise8"}),
            DType::F32,
        ),
        (
            Algo::Lion,
            json!({"state_format": "blockwise8", "min_8bit_size": 256}),
            DType::F32,
        ),
        (Algo::AdaBelief, json!({"state_format": "bf16"}), DType::F32),
        (
            Algo::AdamW,
            json!({"stochastic_rounding_seed": 7}),
            DType::BF16,
        ),
        (
            Algo::SgdSai,
            json!({"state_format": "blockwise8", "stochastic_rounding_seed": 3}),
            DType::BF16,
        ),
    ];
    for (algo, hyper, dtype) in cases {
        let e = Entry {
            algo,
            label: "low precision",
            hyper: hyper.clone(),
            state_bytes: 0,
            state_bytes_other: 0,
            invalid: vec![],
        };
        for n in [2, 3] {
            let single = run_single(algo, &hyper, dtype, n, 1..4, &no_setup);
            let ranks = run_sharded(algo, &hyper, dtype, n, 1..4, None, &no_setup);
            let ctx = format!("{} {hyper}", algo.name());
            assert_eq!(ranks[0].params, single.0, "{ctx}");
            check_equal(&e, n, &single, &ranks);
        }
    }
}

#[test]
fn clipping_agrees_across_ranks() {
    let setup = |o: &mut dyn Optimizer| o.set_max_grad_norm(Some(0.5)).unwrap();
    for (algo, hyper) in [
        (Algo::AdamW, json!({})),
        (Algo::SgdSai, json!({})),
        (Algo::Adan, json!({"max_grad_norm": 0.3})),
    ] {
        let single = run_single(algo, &hyper, DType::F32, 3, 1..4, &setup);
        let ranks = run_sharded(algo, &hyper, DType::F32, 3, 1..4, None, &setup);
        for out in &ranks {
            for (a, b) in out.reports.iter().zip(&single.3) {
                let (a, b) = (a.grad_norm().unwrap(), b.grad_norm().unwrap());
                assert!(
                    (a - b).abs() <= 1e-12 * b,
                    "{}: norm {a} vs {b}",
                    algo.name()
                );
            }
            // The reduction order of the norm differs: equal to a few ulps.
            for (p, q) in out.params.iter().zip(&single.0) {
                for (&x, &y) in p.iter().zip(q) {
                    let (x, y) = (f32::from_bits(x), f32::from_bits(y));
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                        "{}: {x} vs {y}",
                        algo.name()
                    );
                }
            }
        }
        assert_eq!(ranks[0].params, ranks[2].params);
    }
}

#[test]
fn a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank() {
    let comms = ThreadComm::group(2).unwrap();
    let outs: Vec<(StepReport, Vec<Vec<u32>>)> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let rank = comm.rank();
                    let vs = vars(DType::F32);
                    let mut opt = Algo::AdamW
                        .build_sharded(vs.clone(), &json!({}), false, Arc::new(comm))
                        .unwrap();
                    let mut g = local_grads(rank, 1, &vs);
                    if rank == 1 {
                        let v = &vs[2].1;
                        let mut x = values(5, v.elem_count());
                        x[17] = f32::NAN;
                        g.insert(
                            v.as_tensor(),
                            Tensor::from_vec(x, v.shape(), v.device()).unwrap(),
                        );
                    }
                    (opt.step(&g).unwrap(), bits(&vs))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let before = bits(&vars(DType::F32));
    for (report, params) in outs {
        assert!(!report.taken() && report.skipped().is_some() && report.step() == 0);
        assert_eq!(params, before);
    }
}

#[test]
fn per_rank_state_is_a_share_plus_alignment() {
    // Large enough that alignment is small against a share.
    let comms = ThreadComm::group(4).unwrap();
    let sizes = [100_000usize, 3, 70_001, 256, 1];
    let outs: Vec<(usize, usize, usize)> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let vs: Vec<Var> = sizes
                        .iter()
                        .map(|&n| Var::ones(n, DType::F32, &candle_core::Device::Cpu).unwrap())
                        .collect();
                    let opt = AdamW::new(vs.clone(), AdamWConfig::default()).unwrap();
                    let mut opt = Sharded::new(opt, Arc::new(comm)).unwrap();
                    let mut g = GradStore::default();
                    for v in &vs {
                        g.insert(v.as_tensor(), v.ones_like().unwrap());
                    }
                    opt.step(&g).unwrap();
                    let report: usize = opt.memory_report().iter().map(|m| m.bytes).sum();
                    (report, opt.collective_bytes_per_step(), opt.param_bytes())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total: usize = sizes.iter().sum::<usize>() * 8;
    assert_eq!(outs.iter().map(|o| o.0).sum::<usize>(), total);
    let slack = 8 * 256 * (sizes.len() + 1);
    for (bytes, comm_bytes, psi) in outs {
        assert!(
            bytes <= total / 4 + slack,
            "{bytes} > {} + {slack}",
            total / 4
        );
        // Reduce-scatter + all-gather: 2Ψ plus the padding to aligned segments.
        assert!(comm_bytes >= 2 * psi && comm_bytes <= 2 * psi + 2 * 4 * slack / 8 * 4);
    }
}

#[test]
fn average_gradients_matches_the_average() {
    for n in [1, 2, 3] {
        let comms = ThreadComm::group(n).unwrap();
        let outs: Vec<Vec<Option<Vec<u32>>>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let vs = vars(DType::F32);
                        let only: Vec<Var> = vs.iter().map(|(_, v)| v.clone()).collect();
                        let g = local_grads(comm.rank(), 1, &vs);
                        // Small buckets: several collectives, a tensor larger than one alone.
                        let avg = average_gradients(&comm, &only, &g, 4096).unwrap();
                        only.iter()
                            .map(|v| {
                                avg.get(v.as_tensor()).map(|t| {
                                    let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                                    t.iter().map(|x| x.to_bits()).collect()
                                })
                            })
                            .collect()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let vs = vars(DType::F32);
        let want = averaged_grads(n, 1, &vs);
        for out in outs {
            for ((_, v), got) in vs.iter().zip(out) {
                let w = want.get(v.as_tensor()).map(|t| {
                    let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    t.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                });
                assert_eq!(got, w);
            }
        }
    }
}

#[test]
fn shard_checkpoints_restore_their_own_rank_only() {
    let comms = ThreadComm::group(2).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let rank = comm.rank();
                    let comm: Arc<dyn Communicator> = Arc::new(comm);
                    let vs = vars(DType::F32);
                    let only: Vec<Var> = vs.iter().map(|(_, v)| v.clone()).collect();
                    let build = |c: Arc<dyn Communicator>| {
                        Sharded::new(AdamW::new(only.clone(), AdamWConfig::default()).unwrap(), c)
                            .unwrap()
                    };
                    let mut opt = build(comm.clone());
                    opt.step(&local_grads(rank, 1, &vs)).unwrap();
                    let mine = opt.save_shard_bytes().unwrap();
                    let mut fresh = build(comm.clone());
                    fresh.load_shard_bytes(&mine).unwrap();
                    assert_eq!(fresh.save_shard_bytes().unwrap(), mine);
                    // Another rank's shard is refused, and nothing changes.
                    let other = if rank == 0 { 1 } else { 0 };
                    let mut spoofed = mine.clone();
                    spoofed[8..16].copy_from_slice(&(other as u64).to_le_bytes());
                    assert!(matches!(
                        fresh.load_shard_bytes(&spoofed),
                        Err(Error::CheckpointMismatch(_))
                    ));
                    assert!(matches!(
                        fresh.load_shard_bytes(b"nonsense"),
                        Err(Error::Checkpoint(_))
                    ));
                    assert_eq!(fresh.save_shard_bytes().unwrap(), mine);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

#[test]
fn mismatched_collectives_fail_instead_of_hanging() {
    let comms = ThreadComm::group_with_timeout(2, Duration::from_millis(200)).unwrap();
    let results: Vec<Result<(), Error>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let t = Tensor::ones(4, DType::F32, &candle_core::Device::Cpu).unwrap();
                    if comm.rank() == 0 {
                        comm.all_gather(&t).map(|_| ())
                    } else {
                        comm.broadcast(&t, 0).map(|_| ())
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert!(matches!(r, Err(Error::Communication(_))), "{r:?}");
    }
    // A rank that never arrives: the other times out.
    let mut comms = ThreadComm::group_with_timeout(2, Duration::from_millis(100)).unwrap();
    let lonely = comms.remove(0);
    let mut v = [1.0];
    assert!(matches!(
        lonely.all_reduce_scalars(&mut v, candle_optim::dist::ReduceOp::Sum),
        Err(Error::Communication(_))
    ));
    assert!(ThreadComm::group(0).is_err());
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let comm: Arc<dyn Communicator> = Arc::new(ThreadComm::group(1).unwrap().remove(0));
    let vs = vars(DType::F32);
    let mut opt = Algo::AdamW
        .build_sharded(vs.clone(), &json!({}), false, comm.clone())
        .unwrap();
    opt.step(&local_grads(0, 1, &vs)).unwrap();
    let before = (bits(&vs), opt.save_bytes().unwrap());
    let mut g = local_grads(0, 2, &vs);
    g.insert(
        vs[0].1.as_tensor(),
        Tensor::zeros(7, DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    assert!(matches!(opt.step(&g), Err(Error::ShapeMismatch { .. })));
    let mut g = local_grads(0, 2, &vs);
    g.insert(vs[2].1.as_tensor(), vs[2].1.to_dtype(DType::F64).unwrap());
    assert!(matches!(opt.step(&g), Err(Error::DTypeMismatch { .. })));
    assert!(opt.load_bytes(b"not a checkpoint").is_err());
    assert_eq!((bits(&vs), opt.save_bytes().unwrap()), before);
}
