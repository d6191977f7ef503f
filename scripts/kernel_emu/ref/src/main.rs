//! Reference data for the kernel emulator (../emu.cpp): AdamW runs on the CPU (the crate's
//! optimizer, through its public API) with every state format, stochastic rounding and
//! non-finite values; this writes the inputs, the kernel's parameter bytes per step
//! (`Algorithm::kernel` → `Kernel::params`), the stochastic-rounding keys (the driver's
//! `rounding_key`, copied below), the quantizer table (the maps and `Quantizer::new`'s LUTs,
//! copied below) and the final parameters and state.
//!
//! `emu-ref OUT_DIR`: one folder per case (`meta.txt` and raw little-endian arrays).
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_optim::algorithm::{Algorithm, Kernel, KernelParams, ParamMeta};
use candle_optim::{dynamic_map, AdamWConfig, Algo, StateTensor};
use std::io::Write;

fn random_bits(key: u64, index: u64) -> u32 {
    let mut z = key ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}
/// The driver's key of a parameter's stream at its update `t` (src/state.rs): the seed, an FNV-1a
/// hash of the parameter's name and the count.
fn rounding_key(seed: u64, name: &str, t: u64) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let a = random_bits(seed, h) as u64;
    let b = random_bits(seed.rotate_left(32) ^ 0xA076_1D64_78BD_642F, t) as u64;
    (a << 32 | b) ^ t.wrapping_mul(0xE703_7ED1_A0B4_28DB)
}

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        d => panic!("{d:?}"),
    }
}

fn qtab() -> Vec<u8> {
    let mut out = Vec::new();
    let mut luts = Vec::new();
    for signed in [true, false] {
        let map = dynamic_map(signed);
        for x in map {
            out.extend(x.to_le_bytes());
        }
        // state.rs Quantizer::new
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
        let mut lut = vec![0u8; 65536];
        let mut k = 0usize;
        for (j, code) in lut.iter_mut().enumerate() {
            let v = -1.0f32 + (2.0f32 * j as f32) / 65535.0f32;
            while k < mids.len() && mids[k] < v {
                k += 1;
            }
            *code = k as u8;
        }
        luts.extend(lut);
    }
    out.extend(luts);
    out
}

fn main() {
    let root = std::path::PathBuf::from(std::env::args().nth(1).expect("out dir"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("qtab.bin"), qtab()).unwrap();
    let shapes: [&[usize]; 5] = [&[4097, 33], &[300], &[100], &[64, 512], &[1000]];
    // name, param dtype, driver keys, amsgrad
    let cases: Vec<(&str, DType, serde_json::Value, bool)> = vec![
        ("f32", DType::F32, serde_json::json!({}), false),
        (
            "q8",
            DType::F32,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
            false,
        ),
        (
            "q8ams",
            DType::F32,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
            true,
        ),
        (
            "bf16s",
            DType::F32,
            serde_json::json!({"state_format": "bf16"}),
            false,
        ),
        (
            "sr",
            DType::BF16,
            serde_json::json!({"stochastic_rounding_seed": 1234}),
            false,
        ),
        (
            "srq8",
            DType::BF16,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256, "stochastic_rounding_seed": 99}),
            false,
        ),
        (
            "srbf16s",
            DType::BF16,
            serde_json::json!({"state_format": "bf16", "stochastic_rounding_seed": 7}),
            true,
        ),
        (
            "q8f64",
            DType::F64,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
            false,
        ),
        (
            "bf16sf64",
            DType::F64,
            serde_json::json!({"state_format": "bf16"}),
            false,
        ),
        (
            "q8f16",
            DType::F16,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
            false,
        ),
        (
            "q8bf16",
            DType::BF16,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
            false,
        ),
        (
            "bf16sbf16",
            DType::BF16,
            serde_json::json!({"state_format": "bf16"}),
            true,
        ),
        (
            "nfq8",
            DType::F32,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256}),
            true,
        ),
        (
            "nfsrq8",
            DType::BF16,
            serde_json::json!({"state_format": "blockwise8", "min_8bit_size": 256, "stochastic_rounding_seed": 5}),
            false,
        ),
        (
            "nfsrbf16",
            DType::BF16,
            serde_json::json!({"state_format": "bf16", "stochastic_rounding_seed": 6}),
            false,
        ),
    ];
    let steps = 3u64;
    for (name, dt, keys, ams) in cases {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut hyper = serde_json::json!({"lr": 1e-3, "weight_decay": 0.01, "amsgrad": ams});
        for (k, v) in keys.as_object().unwrap() {
            hyper[k] = v.clone();
        }
        let seed = keys
            .get("stochastic_rounding_seed")
            .and_then(|v| v.as_u64());
        let mut vars = Vec::new();
        for (i, s) in shapes.iter().enumerate() {
            let p = Tensor::randn(0f32, 0.02, *s, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            std::fs::write(dir.join(format!("p{i}.init.bin")), bytes(&p)).unwrap();
            vars.push((format!("p{i}"), Var::from_tensor(&p).unwrap()));
        }
        let mut opt = Algo::AdamW.build_json(vars.clone(), &hyper).unwrap();
        let special = name.starts_with("nf");
        opt.set_non_finite_policy(candle_optim::NonFinitePolicy::Propagate);
        let config = AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            amsgrad: ams,
            ..Default::default()
        };
        let mut meta = String::new();
        meta += &format!(
            "dtype {}\nparams {}\nsteps {steps}\n",
            dt.as_str(),
            shapes.len()
        );
        for t in 1..=steps {
            let mut grads = GradStore::default();
            for (i, (_, v)) in vars.iter().enumerate() {
                // Mostly small gradients, a few exact zeros and a big one to exercise absmax.
                let mut g = Tensor::randn(0f32, 1e-3, v.shape(), &Device::Cpu).unwrap();
                if special || i == 0 {
                    // A zero block (absmax 0 the first time), and with `special` NaN, ±inf and
                    // huge and tiny values in a few places.
                    let mut x = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let n = x.len();
                    if t == 1 && n >= 512 {
                        x[256..512].fill(0.0);
                    }
                    if special {
                        let at = |k: usize| (k * 7919 + t as usize * 13) % n;
                        x[at(1)] = f32::NAN;
                        if t >= 2 {
                            x[at(2)] = f32::INFINITY;
                            x[at(3)] = f32::NEG_INFINITY;
                        }
                        x[at(4)] = 3e38;
                        x[at(5)] = 1e-42;
                        x[at(6)] = -0.0;
                    }
                    g = Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap();
                }
                let g = g.to_dtype(dt).unwrap();
                std::fs::write(dir.join(format!("g{i}.{t}.bin")), bytes(&g)).unwrap();
                grads.insert(v.as_tensor(), g);
                let shape = v.shape().clone();
                let pm = ParamMeta {
                    name: "x",
                    shape: &shape,
                    lr: 1e-3,
                    t,
                    group_step: t,
                    fresh: t == 1,
                };
                let k = config.kernel(&pm, &(), &(), 1.0);
                let mut b = [0u8; 128];
                k.params().write_bytes(&mut b);
                std::fs::write(dir.join(format!("k{i}.{t}.bin")), b).unwrap();
                let key = seed.map_or(0, |s| rounding_key(s, &format!("p{i}"), t));
                meta += &format!("key {i} {t} {key}\n");
            }
            opt.step(&grads).unwrap();
        }
        for (i, (pname, v)) in vars.iter().enumerate() {
            meta += &format!("param {i} {}\n", v.elem_count());
            std::fs::write(dir.join(format!("p{i}.final.bin")), bytes(v.as_tensor())).unwrap();
            let st = opt.param_state(pname).unwrap();
            for (k, (_, s)) in st.slots.iter().enumerate() {
                match s {
                    StateTensor::Dense(t) => {
                        meta += &format!("slot {i} {k} {} 0\n", t.dtype().as_str());
                        std::fs::write(dir.join(format!("s{i}.{k}.final.bin")), bytes(t)).unwrap();
                    }
                    StateTensor::Blockwise8 {
                        codes,
                        absmax,
                        signed,
                    } => {
                        meta += &format!("slot {i} {k} q8 {}\n", u8::from(*signed));
                        std::fs::write(dir.join(format!("s{i}.{k}.final.bin")), bytes(codes))
                            .unwrap();
                        std::fs::write(dir.join(format!("a{i}.{k}.final.bin")), bytes(absmax))
                            .unwrap();
                    }
                }
            }
        }
        std::fs::File::create(dir.join("meta.txt"))
            .unwrap()
            .write_all(meta.as_bytes())
            .unwrap();
        println!("{name}: done");
    }
}
