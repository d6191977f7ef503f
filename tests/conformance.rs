//! Replays the golden traces recorded from the official implementations
//! (`tests/data/conformance/`, plus every `.safetensors` in `$CANDLE_OPTIM_TRACES` if set) and
//! checks every step against the per-case tolerance of the trace format
//! (`|x − ref| ≤ rtol·(|ref| + S_i)`, g-SNR within `gsnr_rtol`).
//!
//! Prints one line per case and a summary line; fails if any case fails, or if a damaged copy
//! of a real trace is not rejected.

mod replay;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn main() {
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance")];
    if let Ok(extra) = std::env::var("CANDLE_OPTIM_TRACES") {
        if !extra.is_empty() {
            dirs.push(PathBuf::from(extra));
        }
    }
    let files = replay::list_traces(&dirs).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1);
    });
    let (passed, failed, skipped, _) = replay::run_all(&files, &Device::Cpu, true);
    println!("conformance: {passed} passed, {failed} failed, {skipped} skipped");
    let damaged_ok = damaged_traces_fail(&dirs[0].join("adamw_pub_defaults.safetensors"))
        & damaged_q8_traces_fail(&dirs[0].join("q8_sgd_sai_pub_defaults.safetensors"))
        & muon_traces_pass_in_bf16(&files);
    if failed > 0 || passed + failed + skipped == 0 || !damaged_ok {
        std::process::exit(1);
    }
}

/// Replays damaged copies of the trace `file` (built in memory): each must fail the case, with
/// a message, and the undamaged copy must pass. Returns whether all did as expected.
fn damaged_traces_fail(file: &Path) -> bool {
    let bytes = std::fs::read(file).expect("read the trace");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("trace header");
    let case = &header.metadata().as_ref().expect("metadata")["case"];
    let meta: Value = serde_json::from_str(case).expect("case metadata");
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
    let steps = meta["steps"].as_u64().expect("steps");
    assert!(steps >= 4 && meta["loop"] == "open");

    type Damage = Box<dyn Fn(&mut Value, &mut HashMap<String, Tensor>)>;
    let cases: Vec<(&str, bool, Damage)> = vec![
        ("undamaged", true, Box::new(|_, _| {})),
        (
            "last recorded step of p1 dropped",
            false,
            Box::new(move |_, t| {
                t.remove(&format!("p1.step.{steps}"));
            }),
        ),
        (
            "a gradient dropped",
            false,
            Box::new(|_, t| {
                t.remove("p0.grad.2");
            }),
        ),
        (
            "`steps` one short of the recorded steps",
            false,
            Box::new(move |m, _| m["steps"] = json!(steps - 1)),
        ),
        (
            "a recorded step after the last",
            false,
            Box::new(move |_, t| {
                let x = t[&format!("p0.step.{steps}")].clone();
                t.insert(format!("p0.step.{}", steps + 1), x);
            }),
        ),
        (
            "a recorded step truncated to half",
            false,
            Box::new(|_, t| {
                let x = t["p0.step.3"].flatten_all().unwrap();
                let half = x.narrow(0, 0, x.elem_count() / 2).unwrap();
                t.insert("p0.step.3".into(), half);
            }),
        ),
        (
            "unknown hyperparameter",
            false,
            Box::new(|m, _| m["hyperparameters"]["amsgard"] = json!(true)),
        ),
        (
            "unknown hyperparameter set to null",
            false,
            Box::new(|m, _| m["hyperparameters"]["nesterov"] = Value::Null),
        ),
        (
            "one trajectory scale for two parameters",
            false,
            Box::new(|m, _| m["tolerance"]["trajectory_scale"] = json!([1.0])),
        ),
        (
            "unknown loop kind",
            false,
            Box::new(|m, _| m["loop"] = json!("Open")),
        ),
    ];
    let mut ok = true;
    for (what, should_pass, damage) in cases {
        let (mut m, mut t) = (meta.clone(), tensors.clone());
        damage(&mut m, &mut t);
        let info = HashMap::from([("case".to_string(), m.to_string())]);
        let bytes = safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(info))
            .expect("serialize");
        // Only a failed case or an error rejects: a skipped case does not fail the run.
        let (accepted, how) = match replay::run_trace(&bytes, &Device::Cpu) {
            Ok((_, replay::Outcome::Passed(_), _)) => (true, "passed".to_string()),
            Ok((_, replay::Outcome::Skipped(why), _)) => (true, format!("skipped ({why})")),
            Ok((_, replay::Outcome::Failed { step, param, .. }, _)) => {
                (false, format!("failed at step {step}, param {param}"))
            }
            Err(e) => (false, e.to_string()),
        };
        if accepted == should_pass {
            println!("damaged-trace check ({what}): as expected, {how}");
        } else {
            println!("damaged-trace check ({what}): FAILED: {how}");
            ok = false;
        }
    }
    ok
}

/// Every Muon trace replayed again with Newton–Schulz in bf16 (`ns_dtype: "bfloat16"`: on a CPU
/// with AVX512-BF16 the crate's own bf16 kernel, elsewhere candle's bf16 matmul) must pass too:
/// the family's tolerance accepts either precision. Returns whether all did.
fn muon_traces_pass_in_bf16(files: &[PathBuf]) -> bool {
    let mut ok = true;
    for file in files {
        let bytes = std::fs::read(file).expect("read the trace");
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("trace header");
        let Some(case) = header.metadata().as_ref().and_then(|m| m.get("case")) else {
            continue;
        };
        let mut meta: Value = serde_json::from_str(case).expect("case metadata");
        if meta["optimizer"] != "muon" {
            continue;
        }
        meta["hyperparameters"]["ns_dtype"] = json!("bfloat16");
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
        let info = HashMap::from([("case".to_string(), meta.to_string())]);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(info))
                .expect("serialize");
        let name = file.file_stem().unwrap_or_default().to_string_lossy();
        match replay::run_trace(&bytes, &Device::Cpu) {
            Ok((_, replay::Outcome::Passed(w), _)) => {
                println!(
                    "case {name} with bf16 Newton–Schulz: passed (worst error {w:.3} of tolerance)"
                )
            }
            other => {
                let how = match other {
                    Ok((_, replay::Outcome::Failed { step, what, .. }, _)) => {
                        format!("step {step}: {what}")
                    }
                    Ok((_, replay::Outcome::Skipped(why), _)) => format!("skipped ({why})"),
                    Ok(_) => unreachable!("passed is handled above"),
                    Err(e) => e.to_string(),
                };
                println!("case {name} with bf16 Newton–Schulz: FAILED: {how}");
                ok = false;
            }
        }
    }
    ok
}

/// Damaged copies of an 8-bit trace: a code moved by two levels, an absmax off by 0.1%, a codes
/// tensor missing must each fail; the undamaged copy must pass.
fn damaged_q8_traces_fail(file: &Path) -> bool {
    let bytes = std::fs::read(file).expect("read the trace");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("trace header");
    let info: HashMap<String, String> = header.metadata().clone().expect("metadata");
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
    type Damage = Box<dyn Fn(&mut HashMap<String, Tensor>)>;
    let bump = |name: &'static str, f: fn(&Tensor) -> Tensor| -> Damage {
        Box::new(move |t: &mut HashMap<String, Tensor>| {
            let x = f(&t[name]);
            t.insert(name.to_string(), x);
        })
    };
    let cases: Vec<(&str, bool, Damage)> = vec![
        ("undamaged", true, Box::new(|_| {})),
        (
            "a code two levels off",
            false,
            bump("p0.state0.codes.3", |x| {
                let mut v = x.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                v[5] = if v[5] < 128 { v[5] + 2 } else { v[5] - 2 };
                Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap()
            }),
        ),
        (
            "an absmax 0.1% off",
            false,
            bump("p0.state0.absmax.2", |x| x.affine(1.001, 0.0).unwrap()),
        ),
        (
            "a codes tensor missing",
            false,
            Box::new(|t| {
                t.remove("p0.state0.codes.4");
            }),
        ),
    ];
    let mut ok = true;
    for (what, should_pass, damage) in cases {
        let mut t = tensors.clone();
        damage(&mut t);
        let bytes =
            safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), Some(info.clone()))
                .expect("serialize");
        let passed = matches!(
            replay::run_trace(&bytes, &Device::Cpu),
            Ok((_, replay::Outcome::Passed(_), _))
        );
        if passed == should_pass {
            println!("damaged 8-bit trace ({what}): as expected");
        } else {
            println!("damaged 8-bit trace ({what}): FAILED");
            ok = false;
        }
    }
    ok
}
