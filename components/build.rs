//! Under the `cuda` feature, compiles src/fused/fused.cu and flash.cu to PTX with nvcc (NVCC
//! overrides the command), for fused/cuda.rs to embed, and flash_sm90.cu (Hopper's wgmma) for
//! compute_90a. The driver JIT-compiles the PTX for the GPU it runs on; compute_80 is the
//! oldest architecture with bf16 arithmetic.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=src/fused/fused.cu");
    println!("cargo::rerun-if-changed=src/fused/flash.cu");
    println!("cargo::rerun-if-changed=src/fused/flash_sm90.cu");
    println!("cargo::rerun-if-changed=src/fused/flash.cuh");
    println!("cargo::rerun-if-changed=src/fused/mma.cuh");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // flash_sm90.cu's warpgroup products exist on Hopper only: its PTX is for compute_90a,
    // which cuda.rs loads on GPUs of compute capability 9.0 alone.
    for (name, arch) in [
        ("fused", "compute_80"),
        ("flash", "compute_80"),
        ("flash_sm90", "compute_90a"),
    ] {
        let src = format!("src/fused/{name}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch={arch}"), "-o"])
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
