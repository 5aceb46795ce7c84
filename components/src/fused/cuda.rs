//! Launching the kernels of fused.cu on candle's CUDA storage.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::bf16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "sweep_fused";

/// Threads per block for rows of `len`: a few elements per thread, whole warps, at most 1024.
fn block(len: usize) -> u32 {
    (len.div_ceil(4).next_power_of_two()).clamp(32, 1024) as u32
}

fn config(rows: usize, len: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (block(len), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous view of a storage under its layout.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("fused kernels need contiguous inputs");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => bail!("fused kernels take f32 or bf16, not {other:?}"),
    })
}

fn out<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that follows.
    unsafe { dev.alloc::<T>(n) }
}

pub fn causal_softmax_fwd(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    tq: usize,
    tk: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = s.device();
    let name = format!("causal_softmax_fwd_{}", suffix(s.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (tq, tk32) = (tq as i32, tk as i32);
    macro_rules! run {
        ($t:ty) => {{
            let x = view::<$t>(s, l)?;
            let y = out::<$t>(dev, rows * tk)?;
            let mut b = func.builder();
            b.arg(&x).arg(&y).arg(&tq).arg(&tk32).arg(&scale);
            // SAFETY: the kernel reads rows * tk inputs and writes as many outputs.
            unsafe { b.launch(config(rows, tk)) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(match s.dtype() {
        DType::BF16 => run!(bf16),
        _ => run!(f32),
    })
}

#[allow(clippy::too_many_arguments)]
pub fn causal_softmax_bwd(
    p: &CudaStorage,
    lp: &Layout,
    dp: &CudaStorage,
    ldp: &Layout,
    rows: usize,
    tq: usize,
    tk: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = p.device();
    if dp.dtype() != p.dtype() {
        bail!("causal softmax backward: P is {:?}, dP {:?}", p.dtype(), dp.dtype());
    }
    let name = format!("causal_softmax_bwd_{}", suffix(p.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (tq, tk32) = (tq as i32, tk as i32);
    macro_rules! run {
        ($t:ty) => {{
            let (pv, dpv) = (view::<$t>(p, lp)?, view::<$t>(dp, ldp)?);
            let y = out::<$t>(dev, rows * tk)?;
            let mut b = func.builder();
            b.arg(&pv).arg(&dpv).arg(&y).arg(&tq).arg(&tk32).arg(&scale);
            // SAFETY: reads rows * tk of P and dP, writes as many outputs.
            unsafe { b.launch(config(rows, tk)) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(match p.dtype() {
        DType::BF16 => run!(bf16),
        _ => run!(f32),
    })
}

pub fn cross_entropy_fwd(
    logits: &CudaStorage,
    l1: &Layout,
    targets: &CudaStorage,
    l2: &Layout,
    rows: usize,
    v: usize,
) -> Result<CudaStorage> {
    let dev = logits.device();
    let name = format!("cross_entropy_fwd_{}", suffix(logits.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let t = view::<u32>(targets, l2)?;
    let v32 = v as i32;
    let loss = out::<f32>(dev, rows)?;
    macro_rules! run {
        ($t:ty) => {{
            let x = view::<$t>(logits, l1)?;
            let mut b = func.builder();
            b.arg(&x).arg(&t).arg(&loss).arg(&v32);
            // SAFETY: reads rows * v logits and rows targets (each < v), writes rows losses.
            unsafe { b.launch(config(rows, v)) }.w()?;
        }};
    }
    match logits.dtype() {
        DType::BF16 => run!(bf16),
        _ => run!(f32),
    }
    Ok(CudaStorage::wrap_cuda_slice(loss, dev.clone()))
}

#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_bwd(
    logits: &CudaStorage,
    l1: &Layout,
    targets: &CudaStorage,
    l2: &Layout,
    g: &CudaStorage,
    l3: &Layout,
    rows: usize,
    v: usize,
) -> Result<CudaStorage> {
    let dev = logits.device();
    let name = format!("cross_entropy_bwd_{}", suffix(logits.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let t = view::<u32>(targets, l2)?;
    let gv = view::<f32>(g, l3)?;
    let v32 = v as i32;
    macro_rules! run {
        ($t:ty) => {{
            let x = view::<$t>(logits, l1)?;
            let y = out::<$t>(dev, rows * v)?;
            let mut b = func.builder();
            b.arg(&x).arg(&t).arg(&gv).arg(&y).arg(&v32);
            // SAFETY: reads rows * v logits, rows targets and rows gradients; writes rows * v.
            unsafe { b.launch(config(rows, v)) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(match logits.dtype() {
        DType::BF16 => run!(bf16),
        _ => run!(f32),
    })
}
