//! Under the `cuda` feature, compiles src/fused/fused.cu and flash.cu to PTX with nvcc (NVCC
//! overrides the command), for fused/cuda.rs to embed. The driver JIT-compiles the PTX for the GPU it runs
//! on; compute_80 is the oldest architecture with bf16 arithmetic.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/fused/fused.cu");
    println!("cargo::rerun-if-changed=src/fused/flash.cu");
    println!("cargo::rerun-if-changed=src/fused/mma.cuh");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["fused", "flash"] {
        let src = format!("src/fused/{name}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-arch=compute_80", "-o"])
            .arg(out_dir.join(format!("{name}.ptx")))
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {nvcc} for the `cuda` feature: {e} (source ../shared/cuda/setup.sh)"
                )
            });
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
