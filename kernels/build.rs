//! The build script (Cargo.toml: `build = "kernels/build.rs"`). With the `cuda` feature it
//! compiles every `kernels/*.cu` to PTX for `compute_80` (A100, H100,
//! H200, ...) with nvcc, into `$OUT_DIR/<name>.ptx`, which `src/backend/cuda.rs` embeds.
//! Without the feature it does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let nvcc = nvcc();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let ptx = out.join(format!("{stem}.ptx"));
        // compute_80 PTX (JIT-compiled by the driver for newer GPUs); IEEE division and square
        // root, and no FMA contraction, so the GPU rounds like the CPU path.
        let status = Command::new(&nvcc)
            .args([
                "-ptx",
                "-arch=compute_80",
                "-O3",
                "--std=c++17",
                "-fmad=false",
            ])
            .args(["-prec-div=true", "-prec-sqrt=true", "-Ikernels", "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}): the `cuda` feature needs nvcc (set NVCC or CUDA_ROOT)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
