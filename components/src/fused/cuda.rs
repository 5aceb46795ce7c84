//! Launching the kernels of fused.cu on candle's CUDA storage.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::bf16;

/// Runs the launcher macro `$run` with the element type of `$dtype`: bf16, or f32 (the kernels
/// take nothing else; `suffix` refused any other dtype before).
macro_rules! by_dtype {
    ($dtype:expr, $run:ident) => {
        match $dtype {
            DType::BF16 => $run!(bf16),
            _ => $run!(f32),
        }
    };
}

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

/// Threads for a softmax row of `tk`: each keeps SM_E = 8 values in registers.
fn softmax_config(rows: usize, tk: usize) -> Result<LaunchConfig> {
    let threads = tk.div_ceil(8).next_power_of_two().max(32);
    if threads > 1024 {
        bail!("causal softmax: rows of at most 8192 keys, got {tk}");
    }
    Ok(LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
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
            unsafe { b.launch(softmax_config(rows, tk)?) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(by_dtype!(s.dtype(), run))
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
        bail!(
            "causal softmax backward: P is {:?}, dP {:?}",
            p.dtype(),
            dp.dtype()
        );
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
            unsafe { b.launch(softmax_config(rows, tk)?) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(by_dtype!(p.dtype(), run))
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
    by_dtype!(logits.dtype(), run);
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
    Ok(by_dtype!(logits.dtype(), run))
}

/// Rows per block of the one-warp-per-row kernels.
const WARPS: usize = 8;

fn row_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The f32 gain's device pointer, or null for none.
fn gain_ptr<'a>(gain: Option<(&'a CudaStorage, &Layout)>) -> Result<Option<CudaView<'a, f32>>> {
    gain.map(|(s, l)| {
        if s.dtype() != DType::F32 {
            bail!("rms norm: the gain must be f32, got {:?}", s.dtype());
        }
        view::<f32>(s, l)
    })
    .transpose()
}

/// RMSNorm forward (`dy` none) or its input gradient, with an optional f32 gain; see norm.rs.
pub fn rms_norm(
    x: &CudaStorage,
    lx: &Layout,
    gain: Option<(&CudaStorage, &Layout)>,
    dy: Option<(&CudaStorage, &Layout)>,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device();
    let (rows, c) = super::norm::rows_cols(lx)?;
    let which = if dy.is_some() { "bwd_x" } else { "fwd" };
    let name = format!("rms_norm_{which}_{}", suffix(x.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let g = gain_ptr(gain)?;
    let null = 0u64;
    let (rows32, c32) = (rows as i32, c as i32);
    macro_rules! run {
        ($t:ty) => {{
            let xv = view::<$t>(x, lx)?;
            let dyv = dy.map(|(s, l)| view::<$t>(s, l)).transpose()?;
            let y = out::<$t>(dev, rows * c)?;
            let mut b = func.builder();
            b.arg(&xv);
            match &g {
                Some(g) => b.arg(g),
                None => b.arg(&null),
            };
            if let Some(d) = &dyv {
                b.arg(d).arg(&null); // no gradient to add into
            }
            b.arg(&y).arg(&rows32).arg(&c32).arg(&eps);
            // SAFETY: reads rows * c of x (and dy) and c gains, writes rows * c outputs.
            unsafe { b.launch(row_config(rows)) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(by_dtype!(x.dtype(), run))
}

/// RMSNorm's input gradient added into `acc` in place (acc += dx), with an optional gain.
pub fn rms_norm_bwd_x_into(
    (acc, lacc): (&mut CudaStorage, &Layout),
    (x, lx): (&CudaStorage, &Layout),
    gain: Option<(&CudaStorage, &Layout)>,
    (dy, ldy): (&CudaStorage, &Layout),
    eps: f32,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let dev = x.device().clone();
    let (rows, c) = super::norm::rows_cols(lx)?;
    if acc.dtype() != x.dtype() || !lacc.is_contiguous() || lacc.shape() != lx.shape() {
        bail!("rms norm: the gradient to add into does not fit the input");
    }
    let name = format!("rms_norm_bwd_x_{}", suffix(x.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let g = gain_ptr(gain)?;
    let null = 0u64;
    let (rows32, c32) = (rows as i32, c as i32);
    let stream = dev.cuda_stream();
    let start = lacc.start_offset();
    macro_rules! run {
        ($t:ty) => {{
            let (xv, dyv) = (view::<$t>(x, lx)?, view::<$t>(dy, ldy)?);
            let mut a = acc
                .as_cuda_slice_mut::<$t>()?
                .slice_mut(start..start + rows * c);
            let (ap, _guard) = a.device_ptr_mut(&stream);
            let mut b = func.builder();
            b.arg(&xv);
            match &g {
                Some(g) => b.arg(g),
                None => b.arg(&null),
            };
            b.arg(&dyv)
                .arg(&ap)
                .arg(&ap)
                .arg(&rows32)
                .arg(&c32)
                .arg(&eps);
            // SAFETY: reads rows * c of x, dy and acc and c gains, writes rows * c values of
            // acc, each after reading it in the same thread.
            unsafe { b.launch(row_config(rows)) }.w()?;
        }};
    }
    by_dtype!(x.dtype(), run);
    Ok(())
}

pub fn rms_norm_bwd_g(
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device();
    let (rows, c) = super::norm::rows_cols(lx)?;
    let name = format!("rms_norm_bwd_g_{}", suffix(x.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let dg = dev.alloc_zeros::<f32>(c)?;
    let (rows32, c32) = (rows as i32, c as i32);
    // Tiles of NORM_G_TILE rows over at most four blocks a multiprocessor, each block summing
    // its tiles in shared memory first, so that the global atomic adds are blocks x c, not
    // rows x c.
    const NORM_G_TILE: usize = 16;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(NORM_G_TILE).min(528) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: (4 * (c + NORM_G_TILE)) as u32,
    };
    macro_rules! run {
        ($t:ty) => {{
            let (xv, dyv) = (view::<$t>(x, lx)?, view::<$t>(dy, ldy)?);
            let mut b = func.builder();
            b.arg(&xv)
                .arg(&dyv)
                .arg(&dg)
                .arg(&rows32)
                .arg(&c32)
                .arg(&eps);
            // SAFETY: reads rows * c of x and dy, adds into c zeroed outputs.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    by_dtype!(x.dtype(), run);
    Ok(CudaStorage::wrap_cuda_slice(dg, dev.clone()))
}

fn flat_config(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n as u32)
}

pub fn embedding_fwd(
    w: &CudaStorage,
    lw: &Layout,
    ids: &CudaStorage,
    lids: &Layout,
    n: usize,
    c: usize,
) -> Result<CudaStorage> {
    let dev = w.device();
    let func = dev.get_or_load_custom_func("embedding_fwd", MODULE, PTX)?;
    let (wv, iv) = (view::<f32>(w, lw)?, view::<u32>(ids, lids)?);
    let y = out::<f32>(dev, n * c)?;
    let (n32, c32) = (n as i32, c as i32);
    let mut b = func.builder();
    b.arg(&wv).arg(&iv).arg(&y).arg(&n32).arg(&c32);
    // SAFETY: ids are below the vocabulary (the model's tokenizer guarantees it); n * c out.
    unsafe { b.launch(flat_config(n * c)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

pub fn embedding_bwd(
    dout: &CudaStorage,
    l: &Layout,
    ids: &CudaStorage,
    lids: &Layout,
    n: usize,
    c: usize,
    vocab: usize,
) -> Result<CudaStorage> {
    let dev = dout.device();
    let func = dev.get_or_load_custom_func("embedding_bwd", MODULE, PTX)?;
    let (dv, iv) = (view::<f32>(dout, l)?, view::<u32>(ids, lids)?);
    let dw = dev.alloc_zeros::<f32>(vocab * c)?;
    let (n32, c32) = (n as i32, c as i32);
    let mut b = func.builder();
    b.arg(&dv).arg(&iv).arg(&dw).arg(&n32).arg(&c32);
    // SAFETY: ids below `vocab`; adds into vocab * c zeroed outputs.
    unsafe { b.launch(flat_config(n * c)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
}

/// dw[ids[i]] += rows[i] in place on the (vocab, C) f32 gradient dw (embedding.rs).
pub fn embedding_add(
    (dw, ldw): (&mut CudaStorage, &Layout),
    (rows, lrows): (&CudaStorage, &Layout),
    (ids, lids): (&CudaStorage, &Layout),
    n: usize,
    c: usize,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let dev = rows.device().clone();
    let stream = dev.cuda_stream();
    let func = dev.get_or_load_custom_func("embedding_bwd", MODULE, PTX)?;
    let (rv, iv) = (view::<f32>(rows, lrows)?, view::<u32>(ids, lids)?);
    let Some((start, end)) = ldw.contiguous_offsets() else {
        bail!("embedding-add: the gradient must be contiguous");
    };
    let mut d = dw.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
    let (dp, _guard) = d.device_ptr_mut(&stream);
    let (n32, c32) = (n as i32, c as i32);
    let mut b = func.builder();
    b.arg(&rv).arg(&iv).arg(&dp).arg(&n32).arg(&c32);
    // SAFETY: ids below dw's rows (checked by the caller's embedding); adds n * c values.
    unsafe { b.launch(flat_config(n * c)) }.w()?;
    Ok(())
}

/// act(x) (`dy` none) or dy * act'(x) over all elements; SwiGLU's gate over hidden rows
/// [g | u] (see activation.rs).
pub fn activation(
    x: &CudaStorage,
    lx: &Layout,
    dy: Option<(&CudaStorage, &Layout)>,
    kind: i32,
) -> Result<CudaStorage> {
    let dev = x.device();
    let n = lx.shape().elem_count();
    let which = if dy.is_some() { "bwd" } else { "fwd" };
    // SwiGLU's gate reads hidden rows [g | u] and writes half as many values forward (as many
    // backward); its kernels take (rows, hidden) where the element-wise ones take (n, kind).
    let (stem, len, threads, size, int_arg) = if kind == super::Kind::SwiGlu as i32 {
        let two_hidden = *lx.dims().last().unwrap_or(&0);
        if two_hidden == 0 || !two_hidden.is_multiple_of(2) {
            bail!("SwiGLU: hidden rows of odd width {two_hidden}");
        }
        let len = if dy.is_some() { n } else { n / 2 };
        (
            "glu",
            len,
            n / 2,
            (n / two_hidden) as u64,
            (two_hidden / 2) as i32,
        )
    } else {
        ("act", n, n, n as u64, kind)
    };
    let name = format!("{stem}_{which}_{}", suffix(x.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    // Grid-stride loops: enough blocks to fill the GPU, each thread a pack of 16 bytes (see
    // fused.cu `Pack`) or several. SwiGLU's gate takes rows across grid.y and a row's packs
    // across grid.x, which spares the kernel a division per element.
    let pack = 16 / x.dtype().size_in_bytes();
    let cfg = match stem {
        "glu" => {
            let (rows, hidden) = (size as usize, int_arg as usize);
            LaunchConfig {
                grid_dim: (
                    hidden.div_ceil(pack).div_ceil(256).max(1) as u32,
                    rows.clamp(1, 65535) as u32,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }
        }
        _ => LaunchConfig {
            grid_dim: (threads.div_ceil(pack * 1024).clamp(1, 65535) as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        },
    };
    macro_rules! run {
        ($t:ty) => {{
            let xv = view::<$t>(x, lx)?;
            let y = out::<$t>(dev, len)?;
            let mut b = func.builder();
            b.arg(&xv);
            let dyv = dy.map(|(s, l)| view::<$t>(s, l)).transpose()?;
            if let Some(d) = &dyv {
                b.arg(d);
            }
            b.arg(&y).arg(&size).arg(&int_arg);
            // SAFETY: reads n of x (and dy), writes the len values of y.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(by_dtype!(x.dtype(), run))
}

/// [a; b] (f32) as one bf16 run of values; see stack.rs.
pub fn stack_cast(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<CudaStorage> {
    let dev = a.device();
    let (na, nb) = (la.shape().elem_count(), lb.shape().elem_count());
    let func = dev.get_or_load_custom_func("stack_cast_bf16", MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: ((na + nb).div_ceil(4 * 1024).clamp(1, 65535) as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let (av, bv) = (view::<f32>(a, la)?, view::<f32>(b, lb)?);
    let y = out::<bf16>(dev, na + nb)?;
    let (na64, nb64) = (na as u64, nb as u64);
    let mut bld = func.builder();
    bld.arg(&av).arg(&bv).arg(&y).arg(&na64).arg(&nb64);
    // SAFETY: reads na values of a and nb of b, writes na + nb.
    unsafe { bld.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// a + b elementwise, both contiguous of one dtype and size; see add.rs.
pub fn add(a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    let dev = a.device();
    let n = la.shape().elem_count();
    if a.dtype() != b.dtype() || lb.shape().elem_count() != n {
        bail!(
            "add: {:?} {:?} and {:?} {:?}",
            a.dtype(),
            la.dims(),
            b.dtype(),
            lb.dims()
        );
    }
    let func = dev.get_or_load_custom_func(&format!("add_{}", suffix(a.dtype())?), MODULE, PTX)?;
    let pack = 16 / a.dtype().size_in_bytes();
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(pack * 1024).clamp(1, 65535) as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    let size = n as u64;
    macro_rules! run {
        ($t:ty) => {{
            let (av, bv) = (view::<$t>(a, la)?, view::<$t>(b, lb)?);
            let y = out::<$t>(dev, n)?;
            let mut bld = func.builder();
            bld.arg(&av).arg(&bv).arg(&y).arg(&size);
            // SAFETY: reads n values of a and b, writes the n of y.
            unsafe { bld.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(by_dtype!(a.dtype(), run))
}

/// Gated attention's gate forward (`dout` none) or backward, [dy | dg]; see gate.rs.
pub fn sigmoid_gate(
    (y, ly): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    dout: Option<(&CudaStorage, &Layout)>,
    gates: usize,
    group: usize,
) -> Result<CudaStorage> {
    let dev = y.device();
    let which = if dout.is_some() { "bwd" } else { "fwd" };
    let name = format!("gate_{which}_{}", suffix(y.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let n = gates * group;
    // Forward: a thread a value; backward: a thread a gate.
    let threads = if dout.is_some() { gates } else { n };
    let cfg = LaunchConfig {
        grid_dim: (threads.div_ceil(256).min(65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (gates64, group32) = (gates as u64, group as i32);
    macro_rules! run {
        ($t:ty) => {{
            let (yv, gv) = (view::<$t>(y, ly)?, view::<$t>(g, lg)?);
            let out = out::<$t>(dev, if dout.is_some() { n + gates } else { n })?;
            let dv = dout.map(|(s, l)| view::<$t>(s, l)).transpose()?;
            let mut b = func.builder();
            b.arg(&yv).arg(&gv);
            if let Some(d) = &dv {
                b.arg(d);
            }
            b.arg(&out).arg(&gates64).arg(&group32);
            // SAFETY: reads n of y (and dout) and `gates` of g; writes every element of out.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    Ok(by_dtype!(y.dtype(), run))
}

/// Head preparation forward (`dout` none) or backward; see head.rs.
#[allow(clippy::too_many_arguments)]
pub fn head_prep(
    y: &CudaStorage,
    ly: &Layout,
    rot: &CudaStorage,
    lrot: &Layout,
    dout: Option<(&CudaStorage, &Layout)>,
    (b, t, n, hd): (usize, usize, usize, usize),
    norm: bool,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = y.device();
    let which = if dout.is_some() { "bwd" } else { "fwd" };
    let name = format!("head_prep_{which}_{}", suffix(y.dtype())?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let rotv = view::<f32>(rot, lrot)?;
    let args: [i32; 5] = [b as i32, t as i32, n as i32, hd as i32, norm as i32];
    let rows = b * t * n;
    macro_rules! run {
        ($t:ty) => {{
            let yv = view::<$t>(y, ly)?;
            let o = out::<$t>(dev, rows * hd)?;
            let dv = dout.map(|(s, l)| view::<$t>(s, l)).transpose()?;
            let mut builder = func.builder();
            builder.arg(&yv).arg(&rotv);
            if let Some(d) = &dv {
                builder.arg(d);
            }
            builder.arg(&o);
            for a in &args {
                builder.arg(a);
            }
            builder.arg(&eps);
            // SAFETY: reads rows * hd of y (and of dout) and 2 t hd table values, writes
            // rows * hd.
            unsafe { builder.launch(row_config(rows)) }.w()?;
            CudaStorage::wrap_cuda_slice(o, dev.clone())
        }};
    }
    Ok(by_dtype!(y.dtype(), run))
}

/// An input of a stream-mixing kernel: in the compute dtype, or f32 (coefficients).
pub enum MixArg<'a> {
    T(&'a CudaStorage, &'a Layout),
    F32(&'a CudaStorage, &'a Layout),
}

/// Launches `kernel`_{dtype}(inputs..., output, n, c, tokens) (`kernel`_n4_{dtype} for four
/// streams) over `tokens`; the output has `len` elements, f32 or the compute dtype. The f32
/// outputs are the coefficients' gradients, sums over each token's channels: a warp a token
/// (eight a block); the others a block a token.
#[allow(clippy::too_many_arguments)]
pub fn mix(
    kernel: &str,
    dtype: DType,
    args: &[MixArg],
    tokens: usize,
    len: usize,
    out_f32: bool,
    n: usize,
    c: usize,
) -> Result<CudaStorage> {
    let first = match &args[0] {
        MixArg::T(s, _) | MixArg::F32(s, _) => *s,
    };
    let dev = first.device();
    let streams = if n == 4 { "_n4" } else { "" };
    let name = format!("{kernel}{streams}_{}", suffix(dtype)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let blocks = if out_f32 { tokens.div_ceil(8) } else { tokens };
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n32, c32, tokens32) = (n as i32, c as i32, tokens as i32);
    macro_rules! run {
        ($t:ty) => {{
            let f32s: Vec<CudaView<f32>> = args
                .iter()
                .filter_map(|a| match a {
                    MixArg::F32(s, l) => Some(view::<f32>(s, l)),
                    MixArg::T(..) => None,
                })
                .collect::<Result<_>>()?;
            let ts: Vec<CudaView<$t>> = args
                .iter()
                .filter_map(|a| match a {
                    MixArg::T(s, l) => Some(view::<$t>(s, l)),
                    MixArg::F32(..) => None,
                })
                .collect::<Result<_>>()?;
            let mut b = func.builder();
            let (mut fi, mut ti) = (0, 0);
            for a in args {
                match a {
                    MixArg::F32(..) => {
                        b.arg(&f32s[fi]);
                        fi += 1;
                    }
                    MixArg::T(..) => {
                        b.arg(&ts[ti]);
                        ti += 1;
                    }
                }
            }
            let result = if out_f32 {
                let o = out::<f32>(dev, len)?;
                b.arg(&o).arg(&n32).arg(&c32).arg(&tokens32);
                // SAFETY: one block per token reads its inputs and writes its `len / tokens`
                // outputs.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(o, dev.clone())
            } else {
                let o = out::<$t>(dev, len)?;
                b.arg(&o).arg(&n32).arg(&c32).arg(&tokens32);
                // SAFETY: as above.
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(o, dev.clone())
            };
            result
        }};
    }
    Ok(by_dtype!(dtype, run))
}

/// The post-mix's backward pass in one kernel (fused.cu `postmix_bwd_all`): from coef
/// (f32), the state, the sublayer's output and dy, `[ds | dout]` in the compute dtype (as
/// `postmix_bwd_g` lays them out) and dcoef (tokens, n, n + 1) f32.
pub fn postmix_bwd_all(
    [coef, s, o, dy]: [(&CudaStorage, &Layout); 4],
    tokens: usize,
    n: usize,
    c: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = s.0.device();
    let dtype = s.0.dtype();
    let streams = if n == 4 { "_n4" } else { "" };
    let name = format!("postmix_bwd_all{streams}_{}", suffix(dtype)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n32, c32, tokens32) = (n as i32, c as i32, tokens as i32);
    let kv = view::<f32>(coef.0, coef.1)?;
    let dcoef = out::<f32>(dev, tokens * n * (n + 1))?;
    macro_rules! run {
        ($t:ty) => {{
            let (sv, ov, dv) = (
                view::<$t>(s.0, s.1)?,
                view::<$t>(o.0, o.1)?,
                view::<$t>(dy.0, dy.1)?,
            );
            let g = out::<$t>(dev, tokens * (n + 1) * c)?;
            let mut b = func.builder();
            b.arg(&kv).arg(&sv).arg(&ov).arg(&dv).arg(&g).arg(&dcoef);
            b.arg(&n32).arg(&c32).arg(&tokens32);
            // SAFETY: warp t of the grid writes token t's ds, dout and dcoef, each once.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(g, dev.clone())
        }};
    }
    let g = by_dtype!(dtype, run);
    Ok((g, CudaStorage::wrap_cuda_slice(dcoef, dev.clone())))
}

/// Sinkhorn forward (`dout` none) or backward, one thread per token.
pub fn sinkhorn(
    logits: &CudaStorage,
    l: &Layout,
    dout: Option<(&CudaStorage, &Layout)>,
    tokens: usize,
    n: usize,
    iters: usize,
) -> Result<CudaStorage> {
    let dev = logits.device();
    let name = if dout.is_some() {
        "sinkhorn_bwd"
    } else {
        "sinkhorn_fwd"
    };
    let mut inputs = vec![view::<f32>(logits, l)?];
    inputs.extend(dout.map(|(s, l)| view::<f32>(s, l)).transpose()?);
    let args = [tokens as i32, n as i32, iters as i32];
    per_token(dev, name, &inputs, tokens * n * n, &args, tokens, 1, false)
}

/// Launches the per-token kernel `name` (Sinkhorn's, the stream coefficients'): its f32
/// `inputs`, its f32 output of `len` values (zero-filled first with `zeroed`), then the i32
/// `args`; `threads` a token, 32 tokens a block. A warp a block for a thread a token: a
/// thread keeps Sinkhorn's rounds in local memory (about 5 KB), so the kernels are bound by
/// the multiprocessors they reach, and
/// 8192 tokens in blocks of 128 left half of an H200's 132 idle.
#[allow(clippy::too_many_arguments)]
fn per_token(
    dev: &CudaDevice,
    name: &str,
    inputs: &[CudaView<'_, f32>],
    len: usize,
    args: &[i32],
    tokens: usize,
    threads: usize,
    zeroed: bool,
) -> Result<CudaStorage> {
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let y = match zeroed {
        true => dev.alloc_zeros::<f32>(len)?,
        false => out::<f32>(dev, len)?,
    };
    let mut b = func.builder();
    for x in inputs {
        b.arg(x);
    }
    b.arg(&y);
    for a in args {
        b.arg(a);
    }
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(32) as u32, 1, 1),
        block_dim: ((32 * threads) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: a token's threads read its rows of the inputs (and the shared parameters) and
    // write its row of the output, each thread its own part of it.
    unsafe { b.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The multi-stream schemes' coefficients (`dout` none) or their backward rows, one thread
/// (or 16, mHC of 4 streams) per token; see stream_coef.rs.
pub fn stream_coef(
    op: &super::StreamCoef,
    (z, lz): (&CudaStorage, &Layout),
    (p, lp): (&CudaStorage, &Layout),
    dout: Option<(&CudaStorage, &Layout)>,
    rows: usize,
    w: usize,
) -> Result<CudaStorage> {
    use super::{CoefPart, Scheme};
    let dev = z.device();
    let n = op.n;
    let (iters, stem) = match op.scheme {
        Scheme::Mhc { iters } => (iters, "mhc"),
        Scheme::Hc => (0, "hc"),
    };
    // mHC's four streams take 16 threads a token, one an element (fused.cu `mhc_res_fwd16`).
    let wide = stem == "mhc" && op.part == CoefPart::Res && n == 4;
    let part = match op.part {
        CoefPart::Pre => "pre",
        CoefPart::Res => "res",
    };
    let pass = if dout.is_some() { "bwd" } else { "fwd" };
    let name = format!("{stem}_{part}_{pass}{}", if wide { "16" } else { "" });
    let width = match (op.part, dout.is_some()) {
        (_, true) => w + op.scheme.packed_len(n),
        (CoefPart::Pre, false) => n,
        (CoefPart::Res, false) => n * (n + 1),
    };
    let mut inputs = vec![view::<f32>(z, lz)?, view::<f32>(p, lp)?];
    inputs.extend(dout.map(|(s, l)| view::<f32>(s, l)).transpose()?);
    let args = [rows as i32, n as i32, w as i32, iters as i32];
    per_token(
        dev,
        &name,
        &inputs,
        rows * width,
        &args,
        rows,
        if wide { 16 } else { 1 },
        dout.is_some(),
    )
}

/// [dp (np) | dz (rows w)] from the coefficient ops' backward rows a and b, or a's token sums
/// alone (b none, w 0); see coef_grads.rs.
pub fn coef_grads(
    (a, la): (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    rows: usize,
    w: usize,
    np: usize,
) -> Result<CudaStorage> {
    let dev = a.device();
    let av = view::<f32>(a, la)?;
    let bv = b.map(|(b, lb)| view::<f32>(b, lb)).transpose()?;
    let null = 0u64;
    // Blocks of 64 rows or more, at most 128 of them: the final sum reads blocks x np values.
    let blocks = rows.div_ceil(64).clamp(1, 128);
    let y = out::<f32>(dev, np + rows * w)?;
    let partial = out::<f32>(dev, blocks * np)?;
    let (r32, w32, np32, b32) = (rows as i32, w as i32, np as i32, blocks as i32);
    let part = dev.get_or_load_custom_func("coef_grads_part", MODULE, PTX)?;
    let mut p = part.builder();
    p.arg(&av);
    match &bv {
        Some(bv) => p.arg(bv),
        None => p.arg(&null),
    };
    p.arg(&y).arg(&partial).arg(&r32).arg(&w32).arg(&np32);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: dz's elements are written once each over the grid, block x's partial row by
    // block x only.
    unsafe { p.launch(cfg) }.w()?;
    let last = dev.get_or_load_custom_func("coef_grads_final", MODULE, PTX)?;
    let mut f = last.builder();
    f.arg(&partial).arg(&y).arg(&b32).arg(&np32);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block; thread c writes dp's columns c, c + 128, ...
    unsafe { f.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The streams of x (tokens, n, c) summed into (tokens, c) (`spread` false) or y (tokens, c)
/// spread over n streams, times `scale`; see streams.rs.
pub fn streams(
    x: &CudaStorage,
    l: &Layout,
    spread: bool,
    (tokens, n, c): (usize, usize, usize),
    scale: f32,
) -> Result<CudaStorage> {
    let dev = x.device();
    let stem = if spread {
        "streams_spread"
    } else {
        "streams_sum"
    };
    let func =
        dev.get_or_load_custom_func(&format!("{stem}_{}", suffix(x.dtype())?), MODULE, PTX)?;
    let len = if spread { tokens * n * c } else { tokens * c };
    let (t64, n32, c32) = (tokens as u64, n as i32, c as i32);
    macro_rules! run {
        ($t:ty) => {{
            let xv = view::<$t>(x, l)?;
            let y = out::<$t>(dev, len)?;
            let mut b = func.builder();
            b.arg(&xv).arg(&y).arg(&t64).arg(&n32).arg(&c32).arg(&scale);
            // A grid-stride loop over the smaller side's elements, 8 bf16 or 4 f32 each
            // where c allows: a few blocks a multiprocessor.
            let cfg = LaunchConfig {
                grid_dim: ((tokens * c).div_ceil(8 * 256).clamp(1, 1056) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: every output element is written once, from the inputs of its token.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }};
    }
    Ok(by_dtype!(x.dtype(), run))
}

/// One in-place AdamW update of an f32 tensor; see adam.rs.
pub fn adam_update(
    dst: &mut CudaStorage,
    ldst: &Layout,
    a: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    mode: i32,
    p: [f32; 5],
) -> Result<()> {
    let dev = dst.device().clone();
    let func = dev.get_or_load_custom_func("adam_update", MODULE, PTX)?;
    let n = ldst.shape().elem_count();
    let av = view::<f32>(a.0, a.1)?;
    let bv = b.map(|(s, l)| view::<f32>(s, l)).transpose()?;
    let Some((start, end)) = ldst.contiguous_offsets() else {
        bail!("adam update: the tensor updated must be contiguous");
    };
    let mut d = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
    let n64 = n as u64;
    let null = 0u64;
    let mut builder = func.builder();
    builder.arg(&mut d).arg(&av);
    match &bv {
        Some(b) => builder.arg(b),
        None => builder.arg(&null),
    };
    builder.arg(&n64).arg(&mode);
    for x in &p {
        builder.arg(x);
    }
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(1024).min(4096) as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: reads n of a (and b), updates n of dst in place.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// One parameter's storages for [`adam_multi`].
pub struct AdamParts<'a> {
    pub w: (&'a CudaStorage, &'a Layout),
    pub m: (&'a CudaStorage, &'a Layout),
    pub v: (&'a CudaStorage, &'a Layout),
    pub g: (&'a CudaStorage, &'a Layout),
    pub decays: bool,
}

/// Elements per chunk of [`adam_multi`]: a thread block's share.
const ADAM_CHUNK: usize = 1 << 18;

/// AdamW's update of every parameter in one launch; see adam.rs. Block i takes chunk i of
/// one parameter: its four pointers and (length, decays) in a table of five u64.
pub fn adam_multi(parts: &[AdamParts], h: &super::AdamStep) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let Some(first) = parts.first() else {
        return Ok(());
    };
    let dev = first.w.0.device();
    let stream = dev.cuda_stream();
    let mut views = Vec::with_capacity(4 * parts.len());
    for p in parts {
        let n = p.w.1.shape().elem_count();
        for (s, l) in [p.w, p.m, p.v, p.g] {
            if l.shape().elem_count() != n || !l.is_contiguous() {
                bail!("adam step: a weight of {n} values with a moment or gradient of another size, or not contiguous");
            }
            views.push(view::<f32>(s, l)?);
        }
    }
    let mut table = Vec::<u64>::new();
    let mut held = Vec::with_capacity(views.len());
    for (p, four) in parts.iter().zip(views.chunks(4)) {
        let n = p.w.1.shape().elem_count();
        let mut ptrs = [0u64; 4];
        for (ptr, v) in ptrs.iter_mut().zip(four) {
            let (at, read) = v.device_ptr(&stream);
            *ptr = at;
            held.push(read);
        }
        for start in (0..n).step_by(ADAM_CHUNK) {
            let len = (n - start).min(ADAM_CHUNK) as u64;
            table.extend(ptrs.iter().map(|p| p + (start * 4) as u64));
            table.push(len | (u64::from(p.decays) << 32));
        }
    }
    let chunks = table.len() / 5;
    if chunks == 0 {
        return Ok(());
    }
    let dtable = dev.clone_htod(&table)?;
    let func = dev.get_or_load_custom_func("adam_multi", MODULE, PTX)?;
    let numbers = [
        h.beta1,
        h.beta2,
        h.lr,
        h.bias1,
        h.bias2,
        h.eps,
        h.decay,
        h.grad_scale,
    ];
    let mut b = func.builder();
    b.arg(&dtable);
    for x in &numbers {
        b.arg(x);
    }
    let cfg = LaunchConfig {
        grid_dim: (chunks as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: chunk i reads and writes len values at each of its pointers, inside storages
    // that `held` keeps borrowed until the launch is queued (frees are ordered on the same
    // stream). w, m and v are written through pointers taken for reading: they are the
    // optimizer's own state and its parameters, which nothing else reads or writes during the
    // step, and every use of them is ordered on this one stream.
    unsafe { b.launch(cfg) }.w()?;
    drop(held);
    Ok(())
}

/// Blocks for the stack kernels of muon_step.rs: (blocks a matrix, k), 1024 threads.
fn stack_config(k: usize, per: usize) -> LaunchConfig {
    let per_matrix = per.div_ceil(1024).min((2112 / k.max(1)).max(4));
    LaunchConfig {
        grid_dim: (per_matrix as u32, k as u32, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// [m' | ss] of Muon's momentum over a stack of k matrices of `per` values; see muon_step.rs.
pub fn muon_momentum(
    (m, lm): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    (k, per): (usize, usize),
    (beta, nesterov): (f32, bool),
    grad_scale: f32,
) -> Result<CudaStorage> {
    let dev = m.device();
    let func = dev.get_or_load_custom_func("muon_momentum", MODULE, PTX)?;
    // Zeroed: the norms' tail is summed into by every block.
    let out = dev.alloc_zeros::<f32>(k * per + k)?;
    let (mv, gv) = (view::<f32>(m, lm)?, view::<f32>(g, lg)?);
    let (per64, nest) = (per as u64, nesterov as i32);
    let mut b = func.builder();
    b.arg(&mv)
        .arg(&gv)
        .arg(&out)
        .arg(&per64)
        .arg(&beta)
        .arg(&nest)
        .arg(&grad_scale);
    // SAFETY: block (i, j) reads and writes its share of matrix j and adds into out[k per + j].
    unsafe { b.launch(stack_config(k, per)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Newton-Schulz's normalized input in `dtype` from [m' | ss]; see muon_step.rs.
pub fn muon_scale(
    (m, lm): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    (ss, lss): (&CudaStorage, &Layout),
    (k, per): (usize, usize),
    (beta, nesterov): (f32, bool),
    grad_scale: f32,
    dtype: DType,
) -> Result<CudaStorage> {
    let dev = m.device();
    let func =
        dev.get_or_load_custom_func(&format!("muon_scale_{}", suffix(dtype)?), MODULE, PTX)?;
    let (mv, gv, sv) = (
        view::<f32>(m, lm)?,
        view::<f32>(g, lg)?,
        view::<f32>(ss, lss)?,
    );
    let (per64, nest) = (per as u64, nesterov as i32);
    macro_rules! run {
        ($t:ty) => {{
            let x = out::<$t>(dev, k * per)?;
            let mut b = func.builder();
            b.arg(&mv)
                .arg(&gv)
                .arg(&sv)
                .arg(&x)
                .arg(&per64)
                .arg(&beta)
                .arg(&nest)
                .arg(&grad_scale);
            // SAFETY: reads k per of m' and g and k norms, writes every element of x.
            unsafe { b.launch(stack_config(k, per)) }.w()?;
            CudaStorage::wrap_cuda_slice(x, dev.clone())
        }};
    }
    Ok(by_dtype!(dtype, run))
}

/// Row sums of squares (rows) f32 of o (rows, cols); see muon_step.rs.
pub fn row_sumsq(o: &CudaStorage, lo: &Layout, rows: usize, cols: usize) -> Result<CudaStorage> {
    let dev = o.device();
    let func =
        dev.get_or_load_custom_func(&format!("row_sumsq_{}", suffix(o.dtype())?), MODULE, PTX)?;
    let rs = out::<f32>(dev, rows)?;
    let (rows64, cols32) = (rows as u64, cols as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! run {
        ($t:ty) => {{
            let ov = view::<$t>(o, lo)?;
            let mut b = func.builder();
            b.arg(&ov).arg(&rs).arg(&rows64).arg(&cols32);
            // SAFETY: a warp a row reads its row and writes its sum.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    by_dtype!(o.dtype(), run);
    Ok(CudaStorage::wrap_cuda_slice(rs, dev.clone()))
}

/// w = decay w - f[row] o in place; see muon_step.rs.
pub fn muon_apply(
    w: &mut CudaStorage,
    lw: &Layout,
    (o, lo): (&CudaStorage, &Layout),
    (f, lf): (&CudaStorage, &Layout),
    cols: usize,
    decay: f32,
) -> Result<()> {
    let dev = w.device().clone();
    let func =
        dev.get_or_load_custom_func(&format!("muon_apply_{}", suffix(o.dtype())?), MODULE, PTX)?;
    let n = lw.shape().elem_count();
    let Some((start, end)) = lw.contiguous_offsets() else {
        bail!("muon update: the weight must be contiguous");
    };
    let fv = view::<f32>(f, lf)?;
    let (n64, cols32) = (n as u64, cols as i32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(1024).min(4096) as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! run {
        ($t:ty) => {{
            let ov = view::<$t>(o, lo)?;
            let mut d = w.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
            let mut b = func.builder();
            b.arg(&mut d)
                .arg(&ov)
                .arg(&fv)
                .arg(&n64)
                .arg(&cols32)
                .arg(&decay);
            // SAFETY: reads n of o and n / cols factors, updates n of w in place.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    by_dtype!(o.dtype(), run);
    Ok(())
}

/// Row-major C = alpha op(A) op(B) + beta C over a strided batch of bf16 matrices, C (m, n),
/// op(A) (m, k), op(B) (k, n); A stored (m, k) or, transposed, (k, m); B (k, n) or (n, k).
/// cuBLAS is column-major: a row-major matrix is its transpose there, so this is
/// C^T = op(B)^T op(A)^T with the operands swapped.
///
/// # Safety
/// The pointers must hold `batch` matrices of those sizes at those strides, on the stream of
/// `blas`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_bf16_rows(
    blas: &candle_core::cuda_backend::cudarc::cublas::CudaBlas,
    trans: (bool, bool),
    mnk: (usize, usize, usize),
    alpha: f32,
    a: (u64, usize),
    b: (u64, usize),
    beta: f32,
    c: (u64, usize),
    batch: usize,
) -> Result<()> {
    gemm_rows(blas, trans, mnk, alpha, a, b, beta, c, false, batch)
}

/// [`gemm_bf16_rows`] with C in f32 when `c_f32` (the products accumulate in f32 either way,
/// so an f32 C is the exact sum, not a rounded one cast back up).
///
/// # Safety
/// As [`gemm_bf16_rows`], C holding f32 values when `c_f32`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    blas: &candle_core::cuda_backend::cudarc::cublas::CudaBlas,
    (trans_a, trans_b): (bool, bool),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, stride_a): (u64, usize),
    (b, stride_b): (u64, usize),
    beta: f32,
    (c, stride_c): (u64, usize),
    c_f32: bool,
    batch: usize,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    let op = |t: bool| match t {
        true => sys::cublasOperation_t::CUBLAS_OP_T,
        false => sys::cublasOperation_t::CUBLAS_OP_N,
    };
    let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
    let c_type = match c_f32 {
        true => sys::cudaDataType_t::CUDA_R_32F,
        false => bf16,
    };
    result::gemm_strided_batched_ex(
        *blas.handle(),
        op(trans_b),
        op(trans_a),
        n as i32,
        m as i32,
        k as i32,
        (&alpha) as *const f32 as *const _,
        b as *const _,
        bf16,
        if trans_b { k } else { n } as i32,
        stride_b as i64,
        a as *const _,
        bf16,
        if trans_a { m } else { k } as i32,
        stride_a as i64,
        (&beta) as *const f32 as *const _,
        c as *mut _,
        c_type,
        n as i32,
        stride_c as i64,
        batch as i32,
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .w()
}

/// A block of `rounds` Newton-Schulz rounds on a bf16 stack x (k, rows, cols), run on its
/// Gram matrix; see newton_schulz.rs.
pub fn ns_block(
    x: &CudaStorage,
    lx: &Layout,
    (k, rows, cols): (usize, usize, usize),
    rounds: usize,
    (a, b, c): (f32, f32, f32),
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let dev = x.device();
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let tall = rows > cols;
    let s = rows.min(cols);
    let (xs, gs) = (rows * cols, s * s);
    let xv = view::<bf16>(x, lx)?;
    // Every launch is on the device's one stream, in order, so a slice's read event may be
    // recorded (its guard dropped) before the launch that reads it; every slice outlives
    // its launches, and its stream-ordered free follows them.
    let ptr = |m: &CudaSlice<bf16>| m.device_ptr(&stream).0;
    // Every product below is a stack of k, each matrix at its stride (xs or gs).
    let gemm = |trans, mnk, alpha, a_: (u64, usize), b_: (u64, usize), beta, c_: (u64, usize)| {
        // SAFETY: the operands hold k matrices of the shapes `mnk` names at these strides.
        unsafe { gemm_bf16_rows(&blas, trans, mnk, alpha, a_, b_, beta, c_, k) }
    };
    // C = alpha A B + beta C on the (s, s) stacks.
    let square = |alpha, a_: u64, b_: u64, beta, c_: u64| {
        gemm(
            (false, false),
            (s, s, s),
            alpha,
            (a_, gs),
            (b_, gs),
            beta,
            (c_, gs),
        )
    };
    let xp = xv.device_ptr(&stream).0;
    // R = X X^T, or X^T X for a tall X.
    let mut gram = out::<bf16>(dev, k * gs)?;
    let (trans, inner) = match tall {
        true => ((true, false), rows),
        false => ((false, true), cols),
    };
    gemm(
        trans,
        (s, s, inner),
        1.0,
        (xp, xs),
        (xp, xs),
        0.0,
        (ptr(&gram), gs),
    )?;
    let func = dev.get_or_load_custom_func("ns_poly_init", MODULE, PTX)?;
    let n = k * gs;
    let (n64, s32) = (n as u64, s as i32);
    let mut q: Option<CudaSlice<bf16>> = None;
    for t in 0..rounds {
        // P = a I + b R (the kernel), then P += c R R.
        let poly = out::<bf16>(dev, n)?;
        let mut builder = func.builder();
        builder
            .arg(&gram)
            .arg(&poly)
            .arg(&n64)
            .arg(&s32)
            .arg(&a)
            .arg(&b);
        // SAFETY: reads and writes n values of the two stacks.
        unsafe { builder.launch(flat_config(n)) }.w()?;
        let (gp, pp) = (ptr(&gram), ptr(&poly));
        square(c, gp, gp, 1.0, pp)?;
        if t + 1 < rounds {
            // R <- P (R P).
            let (rp, next) = (out::<bf16>(dev, n)?, out::<bf16>(dev, n)?);
            square(1.0, gp, pp, 0.0, ptr(&rp))?;
            square(1.0, pp, ptr(&rp), 0.0, ptr(&next))?;
            gram = next;
        }
        q = Some(match q {
            None => poly,
            Some(q) => {
                let qp = out::<bf16>(dev, n)?;
                square(1.0, ptr(&q), pp, 0.0, ptr(&qp))?;
                qp
            }
        });
    }
    let Some(q) = q else {
        bail!("newton-schulz: a block of no rounds");
    };
    // X' = Q X, or X Q for a tall X.
    let next = out::<bf16>(dev, k * xs)?;
    let (qp, np) = (ptr(&q), ptr(&next));
    match tall {
        true => gemm(
            (false, false),
            (rows, cols, cols),
            1.0,
            (xp, xs),
            (qp, gs),
            0.0,
            (np, xs),
        )?,
        false => gemm(
            (false, false),
            (rows, cols, rows),
            1.0,
            (qp, gs),
            (xp, xs),
            0.0,
            (np, xs),
        )?,
    }
    Ok(CudaStorage::wrap_cuda_slice(next, dev.clone()))
}

/// dW = dy^T x in f32 from bf16 rows dy (rows, out) and x (rows, in): a linear layer's
/// weight gradient straight into the f32 master's dtype, where a bf16 product would be cast
/// up in one more pass (see linear.rs `weight_grad`).
pub fn weight_grad(
    (dy, ldy): (&CudaStorage, &Layout),
    (x, lx): (&CudaStorage, &Layout),
    (rows, d_out, d_in): (usize, usize, usize),
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let dev = dy.device();
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (dyv, xv) = (view::<bf16>(dy, ldy)?, view::<bf16>(x, lx)?);
    if dyv.len() != rows * d_out || xv.len() != rows * d_in {
        bail!(
            "weight gradient: dy {:?} and x {:?} are not ({rows}, {d_out}) and ({rows}, {d_in})",
            ldy.dims(),
            lx.dims()
        );
    }
    let dw = out::<f32>(dev, d_out * d_in)?;
    {
        let (dp, _rd) = dyv.device_ptr(&stream);
        let (xp, _rx) = xv.device_ptr(&stream);
        let (wp, _rw) = dw.device_ptr(&stream);
        // SAFETY: dy holds (rows, d_out) and x (rows, d_in) bf16, dw (d_out, d_in) f32; one
        // matrix, on the device's stream.
        unsafe {
            gemm_rows(
                &blas,
                (true, false),
                (d_out, d_in, rows),
                1.0,
                (dp, 0),
                (xp, 0),
                0.0,
                (wp, 0),
                true,
                1,
            )?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
}

/// dst (n, c) += a (n, k) b (k, c), bf16, in place; see linear.rs `AddProduct`.
pub fn add_product(
    (dst, ld): (&mut CudaStorage, &Layout),
    (a, la): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
    (n, k, c): (usize, usize, usize),
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let dev = dst.device().clone();
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (av, bv) = (view::<bf16>(a, la)?, view::<bf16>(b, lb)?);
    let start = ld.start_offset();
    let mut d = dst
        .as_cuda_slice_mut::<bf16>()?
        .slice_mut(start..start + n * c);
    let (ap, _ra) = av.device_ptr(&stream);
    let (bp, _rb) = bv.device_ptr(&stream);
    let (dp, _rd) = d.device_ptr_mut(&stream);
    // SAFETY: a holds (n, k), b (k, c) and dst (n, c) bf16 values, contiguous, on the
    // device's stream; dst = a b + dst.
    unsafe {
        gemm_bf16_rows(
            &blas,
            (false, false),
            (n, c, k),
            1.0,
            (ap, 0),
            (bp, 0),
            1.0,
            (dp, 0),
            1,
        )
    }
}

/// x *= s in place, x f32 or bf16 and s one f32 on the device (read there: no wait for it).
pub fn scale_by(
    (x, lx): (&mut CudaStorage, &Layout),
    (s, ls): (&CudaStorage, &Layout),
) -> Result<()> {
    let dev = x.device().clone();
    let Some((start, end)) = lx.contiguous_offsets() else {
        bail!("scale in place: the tensor scaled must be contiguous");
    };
    let sv = view::<f32>(s, ls)?;
    if sv.len() != 1 {
        bail!(
            "scale in place: the factor has {} values, not one",
            sv.len()
        );
    }
    let n = end - start;
    let n64 = n as u64;
    let func =
        dev.get_or_load_custom_func(&format!("scale_by_{}", suffix(x.dtype())?), MODULE, PTX)?;
    macro_rules! run {
        ($t:ty) => {{
            let mut d = x.as_cuda_slice_mut::<$t>()?.slice_mut(start..end);
            let mut b = func.builder();
            b.arg(&mut d).arg(&sv).arg(&n64);
            // SAFETY: reads one f32, updates n values in place.
            unsafe { b.launch(flat_config(n)) }.w()?;
        }};
    }
    match x.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(bf16),
        other => bail!("scale in place: {other:?} is not supported"),
    }
    Ok(())
}

const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const FLASH: &str = "sweep_flash";
use super::FlashKernels;
const FLASH90_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_sm90.ptx"));
const FLASH90: &str = "sweep_flash90";

/// Queries or keys per thread block of flash.cu, queries per step of its dK/dV kernel, and
/// its threads.
const FLASH_BLOCK: usize = 64;
/// Queries a block of the forward kernel (flash.cu FWD_Q).
const FLASH_FWD_Q: usize = 128;
const FLASH_KV_STEP: usize = 32;
/// Keys a step of the dQ kernel (flash.cu KQ).
const FLASH_Q_STEP: usize = 32;
const FLASH_THREADS: u32 = 128;
/// flash_sm90.cu: 64 rows (a warpgroup, 128 threads) a block and a step (QS), and the bytes
/// of a row of a warp's staging of dS^T (DS_ROW).
const FLASH90_ROWS: usize = 64;
const FLASH90_DS_ROW: usize = 144;

/// flash_sm90.cu's FWD_WGS_HD<hd>: the forward kernel's warpgroups a block, which share its
/// key and value tiles (two at heads of 128, one at 64, where a second did not pay).
fn flash90_fwd_groups(hd: usize) -> usize {
    if hd == 128 {
        2
    } else {
        1
    }
}

impl FlashKernels {
    /// The fastest the device runs: wgmma on a Hopper GPU, unless `SWEEP_FLASH=mma` asks for
    /// mma.sync (to compare the two in one process).
    pub fn for_device(dev: &CudaDevice) -> Result<Self> {
        static FORCE_MMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let force = *FORCE_MMA.get_or_init(|| std::env::var("SWEEP_FLASH").as_deref() == Ok("mma"));
        let (major, _) = dev.cuda_stream().context().compute_capability().w()?;
        Ok(if major == 9 && !force {
            Self::Wgmma
        } else {
            Self::Mma
        })
    }
}

/// A bf16 input of flash.cu: contiguous and 16-byte aligned (the kernels load 8 at a time).
fn flash_view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, bf16>> {
    if !l.start_offset().is_multiple_of(8) {
        bail!(
            "flash attention: an input starts at element {}, not a multiple of 8",
            l.start_offset()
        );
    }
    view::<bf16>(s, l)
}

/// The inputs' sizes: batch, query heads, key/value heads, tokens, head dimension (one of
/// [`super::FLASH_HEAD_DIMS`]), and the kernels that run.
#[derive(Clone, Copy, Debug)]
pub struct FlashDims {
    pub b: usize,
    pub h: usize,
    pub kv: usize,
    pub t: usize,
    pub hd: usize,
    pub kernels: FlashKernels,
}

/// The passes of flash.cu and flash_sm90.cu, each a kernel per head dimension.
#[derive(Clone, Copy)]
enum FlashPass {
    Fwd,
    Kv,
    Q,
}

impl FlashDims {
    fn ints(&self) -> (i32, i32, i32) {
        (self.h as i32, self.kv as i32, self.t as i32)
    }

    /// The pass's kernel for this head dimension, allowed the shared memory it asks for.
    fn kernel(&self, dev: &CudaDevice, pass: FlashPass) -> Result<CudaFunction> {
        let name = match pass {
            FlashPass::Fwd => "fwd",
            FlashPass::Kv => "kv",
            FlashPass::Q => "q",
        };
        let func = match self.kernels {
            FlashKernels::Mma => {
                let name = format!("flash_{name}_hd{}", self.hd);
                dev.get_or_load_custom_func(&name, FLASH, FLASH_PTX)?
            }
            FlashKernels::Wgmma => {
                let name = format!("flash90_{name}_hd{}", self.hd);
                dev.get_or_load_custom_func(&name, FLASH90, FLASH90_PTX)?
            }
        };
        // Past 48 KiB a kernel's dynamic shared memory must be allowed explicitly.
        let bytes = self.shared_bytes(pass);
        if bytes > 48 << 10 {
            let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            func.set_attribute(attr, bytes as i32).w()?;
        }
        Ok((*func).clone())
    }

    /// The shared memory of a pass's block, as the kernels lay it out. flash.cu: tiles of
    /// rows hd + 8 bf16 apart, what is loaded once and two buffers of what is loaded in the
    /// loop (Q, then K and V; K and V, then Q and dO of a step with two f32 per query; Q and
    /// dO, then K and V of a key step). flash_sm90.cu: tiles of 64 rows hd bf16 apart
    /// (swizzled): Q of the block's groups and two of K and of V; K and V, two of Q and of dO, their f32 rows and
    /// the warps' staging of dS^T; two of dS^T (64 x 64) and of K. And 1 KB to align them to.
    fn shared_bytes(&self, pass: FlashPass) -> u32 {
        let bytes = match self.kernels {
            FlashKernels::Mma => {
                let row = (self.hd + 8) * 2;
                match pass {
                    FlashPass::Fwd => (FLASH_FWD_Q + 4 * FLASH_BLOCK) * row,
                    FlashPass::Kv => {
                        (2 * FLASH_BLOCK + 4 * FLASH_KV_STEP) * row + 4 * FLASH_KV_STEP * 4
                    }
                    FlashPass::Q => (2 * FLASH_BLOCK + 4 * FLASH_Q_STEP) * row,
                }
            }
            FlashKernels::Wgmma => {
                let (tile, n) = (FLASH90_ROWS * self.hd * 2, FLASH90_ROWS);
                1024 + match pass {
                    FlashPass::Fwd => (flash90_fwd_groups(self.hd) + 4) * tile,
                    FlashPass::Kv => 6 * tile + 4 * n * 4 + 4 * 16 * FLASH90_DS_ROW,
                    FlashPass::Q => 2 * (n * n * 2 + tile),
                }
            }
        };
        bytes as u32
    }

    /// Grid (heads, blocks) with the pass's threads and shared memory. flash.cu: blocks of
    /// FLASH_FWD_Q queries (forward) or FLASH_BLOCK queries or keys, 128 threads; flash_sm90.cu:
    /// 64 rows a warpgroup, one a block but in the forward pass at heads of 128. Heads on x: blocks start x first, so the longest blocks of every
    /// head start first.
    fn config(&self, pass: FlashPass, heads: usize) -> LaunchConfig {
        let (rows, threads) = match (self.kernels, pass) {
            (FlashKernels::Mma, FlashPass::Fwd) => (FLASH_FWD_Q, FLASH_THREADS),
            (FlashKernels::Mma, _) => (FLASH_BLOCK, FLASH_THREADS),
            (FlashKernels::Wgmma, FlashPass::Fwd) => {
                let groups = flash90_fwd_groups(self.hd);
                (FLASH90_ROWS * groups, 128 * groups as u32)
            }
            (FlashKernels::Wgmma, _) => (FLASH90_ROWS, 128),
        };
        LaunchConfig {
            grid_dim: (heads as u32, self.t.div_ceil(rows) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: self.shared_bytes(pass),
        }
    }
}

/// softmax(scale Q K^T, causal) V: the output as rows (B T, H hd) and the log-sum-exp
/// (B, H, T) in f32 for the backward pass.
pub fn flash_fwd(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    d: FlashDims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = q.device();
    let stream = dev.cuda_stream();
    let func = d.kernel(dev, FlashPass::Fwd)?;
    let (qv, kv, vv) = (flash_view(q, lq)?, flash_view(k, lk)?, flash_view(v, lv)?);
    let o = out::<bf16>(dev, d.b * d.t * d.h * d.hd)?;
    let lse = out::<f32>(dev, d.b * d.h * d.t)?;
    let (h, kvh, t) = d.ints();
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let mut b = stream.launch_builder(&func);
    b.arg(&qv).arg(&kv).arg(&vv).arg(&o).arg(&lse);
    b.arg(&h).arg(&kvh).arg(&t).arg(&scale_log2);
    // SAFETY: reads Q, K and V of the sizes `d` gives, writes every output row and its
    // log-sum-exp once.
    unsafe { b.launch(d.config(FlashPass::Fwd, d.b * d.h)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(o, dev.clone()),
        CudaStorage::wrap_cuda_slice(lse, dev.clone()),
    ))
}

/// The gradients (dQ (B, H, T, hd), dK (B, KV, T, hd), dV rows) of [`flash_fwd`], from its
/// output `o`, the output's gradient `dout` (both rows) and its log-sum-exp.
#[allow(clippy::too_many_arguments)]
pub fn flash_bwd(
    (q, lq): (&CudaStorage, &Layout),
    (k, lk): (&CudaStorage, &Layout),
    (v, lv): (&CudaStorage, &Layout),
    (o, lo): (&CudaStorage, &Layout),
    (dout, ldout): (&CudaStorage, &Layout),
    (lse, llse): (&CudaStorage, &Layout),
    d: FlashDims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let dev = q.device();
    let stream = dev.cuda_stream();
    let (qv, kv, vv) = (flash_view(q, lq)?, flash_view(k, lk)?, flash_view(v, lv)?);
    let (ov, dov) = (flash_view(o, lo)?, flash_view(dout, ldout)?);
    let lsev = view::<f32>(lse, llse)?;
    let (h, kvh, t) = d.ints();
    let scale_log2 = scale * std::f32::consts::LOG2_E;

    if d.kernels == FlashKernels::Wgmma {
        return flash90_bwd(dev, [&qv, &kv, &vv, &ov, &dov], &lsev, d, scale);
    }
    // The dQ kernel first: it also writes D = rowsum(dO O) of its rows, which the dK/dV
    // kernel reads.
    let dsum = out::<f32>(dev, d.b * d.h * d.t)?;
    let dq = out::<bf16>(dev, d.b * d.h * d.t * d.hd)?;
    let func = d.kernel(dev, FlashPass::Q)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&qv).arg(&kv).arg(&vv).arg(&ov).arg(&dov).arg(&lsev);
    b.arg(&dsum)
        .arg(&dq)
        .arg(&h)
        .arg(&kvh)
        .arg(&t)
        .arg(&scale_log2)
        .arg(&scale);
    // SAFETY: each block writes the dQ rows and D of its own query block, every row once.
    unsafe { b.launch(d.config(FlashPass::Q, d.b * d.h)) }.w()?;

    let dk = out::<bf16>(dev, d.b * d.kv * d.t * d.hd)?;
    let dv = out::<bf16>(dev, d.b * d.t * d.kv * d.hd)?;
    let func = d.kernel(dev, FlashPass::Kv)?;
    let mut b = stream.launch_builder(&func);
    b.arg(&qv).arg(&kv).arg(&vv).arg(&dov).arg(&lsev).arg(&dsum);
    b.arg(&dk)
        .arg(&dv)
        .arg(&h)
        .arg(&kvh)
        .arg(&t)
        .arg(&scale_log2)
        .arg(&scale);
    // SAFETY: each block writes the dK and dV rows of its own key block, every row once.
    unsafe { b.launch(d.config(FlashPass::Kv, d.b * d.kv)) }.w()?;

    let wrap = |s| CudaStorage::wrap_cuda_slice(s, dev.clone());
    Ok((wrap(dq), wrap(dk), wrap(dv)))
}

/// flash_bwd on flash_sm90.cu: D = rowsum(dO O) first, then dK and dV with dS^T (bf16, a
/// square of the length rounded up to 64 per batch and head, written where it is causal and
/// read back there), then dQ = dS K from it: S and dP are computed once, not twice.
fn flash90_bwd(
    dev: &CudaDevice,
    [q, k, v, o, dout]: [&CudaView<'_, bf16>; 5],
    lse: &CudaView<'_, f32>,
    d: FlashDims,
    scale: f32,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let stream = dev.cuda_stream();
    let (h, kvh, t) = d.ints();
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let tp = d.t.div_ceil(FLASH90_ROWS) * FLASH90_ROWS;

    let dsum = out::<f32>(dev, d.b * d.h * d.t)?;
    let name = format!("flash90_dsum_hd{}", d.hd);
    let func = dev.get_or_load_custom_func(&name, FLASH90, FLASH90_PTX)?;
    let mut b = stream.launch_builder(&func);
    b.arg(o).arg(dout).arg(&dsum).arg(&h).arg(&t);
    let cfg = LaunchConfig {
        grid_dim: ((d.b * d.h) as u32, (tp / FLASH90_ROWS) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: each warp writes D of its own 16 rows, those before T.
    unsafe { b.launch(cfg) }.w()?;

    // Every element the dQ kernel reads is written by the dK/dV kernel: no zero fill.
    let dst = out::<bf16>(dev, d.b * d.h * tp * tp)?;
    let dk = out::<bf16>(dev, d.b * d.kv * d.t * d.hd)?;
    let dv = out::<bf16>(dev, d.b * d.t * d.kv * d.hd)?;
    let func = d.kernel(dev, FlashPass::Kv)?;
    let mut b = stream.launch_builder(&func);
    b.arg(q).arg(k).arg(v).arg(dout).arg(lse).arg(&dsum);
    b.arg(&dk).arg(&dv).arg(&dst);
    b.arg(&h).arg(&kvh).arg(&t).arg(&scale_log2).arg(&scale);
    // SAFETY: each block writes the dK and dV rows of its own key block, and its rows of
    // dS^T for every query step at or after it, each once.
    unsafe { b.launch(d.config(FlashPass::Kv, d.b * d.kv)) }.w()?;

    let dq = out::<bf16>(dev, d.b * d.h * d.t * d.hd)?;
    let func = d.kernel(dev, FlashPass::Q)?;
    let mut b = stream.launch_builder(&func);
    b.arg(k)
        .arg(&dst)
        .arg(&dq)
        .arg(&h)
        .arg(&kvh)
        .arg(&t)
        .arg(&scale);
    // SAFETY: each block reads the dS^T tiles at or before its diagonal (all written above)
    // and writes the dQ rows of its own query block once.
    unsafe { b.launch(d.config(FlashPass::Q, d.b * d.h)) }.w()?;

    let wrap = |s| CudaStorage::wrap_cuda_slice(s, dev.clone());
    Ok((wrap(dq), wrap(dk), wrap(dv)))
}

/// Elements per chunk of [`sum_squares`]: a thread block's share.
const SQ_CHUNK: usize = 1 << 16;

/// The sum of the squares of every element of `parts` (f32, one device), as one f32 there:
/// two launches for all of them, where a reduction per tensor costs several launches each
/// (a few hundred tensors for a model's gradients).
pub fn sum_squares(parts: &[(&CudaStorage, &Layout)]) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let Some((first, _)) = parts.first() else {
        bail!("sum of squares of no tensors");
    };
    let dev = first.device();
    let stream = dev.cuda_stream();
    let views = parts
        .iter()
        .map(|(s, l)| view::<f32>(s, l))
        .collect::<Result<Vec<_>>>()?;
    let (mut ptrs, mut lens) = (Vec::<u64>::new(), Vec::<u32>::new());
    let mut reads = Vec::with_capacity(views.len());
    for v in &views {
        let (ptr, read) = v.device_ptr(&stream);
        reads.push(read);
        for start in (0..v.len()).step_by(SQ_CHUNK) {
            ptrs.push(ptr + (start * 4) as u64);
            lens.push((v.len() - start).min(SQ_CHUNK) as u32);
        }
    }
    let chunks = ptrs.len();
    let (dptrs, dlens) = (dev.clone_htod(&ptrs)?, dev.clone_htod(&lens)?);
    let partial = out::<f32>(dev, chunks.max(1))?;
    let func = dev.get_or_load_custom_func("sum_squares_chunks", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&dptrs).arg(&dlens).arg(&partial);
    if chunks > 0 {
        // SAFETY: chunk i reads lens[i] f32 from ptrs[i], inside tensor storages that `reads`
        // keeps borrowed until the launch is queued (frees are ordered on the same stream).
        unsafe { b.launch(config(chunks, 1024)) }.w()?;
    }
    drop(reads);
    let total = out::<f32>(dev, 1)?;
    let func = dev.get_or_load_custom_func("sum_f32", MODULE, PTX)?;
    let n = chunks as i32;
    let mut b = func.builder();
    b.arg(&partial).arg(&total).arg(&n);
    // SAFETY: reads the n partial sums, writes one.
    unsafe { b.launch(config(1, 4096)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(total, dev.clone()))
}

/// The device's multiprocessors, for grids of one wave.
fn multiprocessors(dev: &CudaDevice) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let count = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(count.max(1) as usize)
}

/// Threads of a normed-projection block: a token each forward, a column of K backward.
const NP_THREADS: usize = 256;

/// Blocks of partial products over K for [`norm_proj_fwd`]: enough for every
/// multiprocessor to hold a few, never more than K has tiles of 32.
fn norm_proj_ksplit(n: usize, k: usize) -> usize {
    let token_blocks = n.div_ceil(NP_THREADS);
    (528 / token_blocks.max(1)).clamp(1, k.div_ceil(32))
}

/// The name of the normed projection's kernel `stem` for `m` outputs: sums of 24 or of 64 in
/// registers.
fn norm_proj_kernel(stem: &str, m: usize, dtype: DType) -> Result<String> {
    let width = if m <= 24 { 24 } else { 64 };
    Ok(format!("{stem}_m{width}_{}", suffix(dtype)?))
}

/// Whether the tensor-core kernels (fused.cu `norm_proj_*_tc`) take this projection: a bf16
/// state starting on 16 bytes, at most 32 logits, K whole steps of 64 columns.
fn norm_proj_tc(x: &CudaStorage, lx: &Layout, k: usize, m: usize) -> bool {
    x.dtype() == DType::BF16
        && m <= 32
        && k.is_multiple_of(64)
        && lx.start_offset().is_multiple_of(8)
}

/// Warps of a tensor-core normed-projection block (fused.cu NPT_WARPS).
const NPT_WARPS: usize = 8;

/// z_ext (n, m + 1) f32 of mHC's normed projection; see norm_proj.rs.
#[allow(clippy::too_many_arguments)]
pub fn norm_proj_fwd(
    x: &CudaStorage,
    lx: &Layout,
    phi: &CudaStorage,
    lphi: &Layout,
    n: usize,
    k: usize,
    m: usize,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = x.device();
    let p = view::<f32>(phi, lphi)?;
    let (n32, k32, m32) = (n as i32, k as i32, m as i32);
    let (part, ksplit) = if norm_proj_tc(x, lx, k, m) {
        // Blocks of 256 tokens times K slices of whole 64-column steps, a few blocks a
        // multiprocessor.
        let token_blocks = n.div_ceil(32 * NPT_WARPS);
        let steps = k / 64;
        let span = 64 * steps.div_ceil((528 / token_blocks).clamp(1, steps));
        let ksplit = k.div_ceil(span);
        let part = out::<f32>(dev, ksplit * n * (m + 1))?;
        let func = dev.get_or_load_custom_func("norm_proj_part_tc", MODULE, PTX)?;
        let xv = view::<bf16>(x, lx)?;
        let span32 = span as i32;
        let mut b = func.builder();
        b.arg(&xv)
            .arg(&p)
            .arg(&part)
            .arg(&n32)
            .arg(&k32)
            .arg(&m32)
            .arg(&span32);
        let cfg = LaunchConfig {
            grid_dim: (token_blocks as u32, ksplit as u32, 1),
            block_dim: ((32 * NPT_WARPS) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block (i, s) reads tokens 256 i.. of x over columns [s span, (s + 1) span)
        // and phi's rows there, and writes those tokens' partials of split s once.
        unsafe { b.launch(cfg) }.w()?;
        (part, ksplit)
    } else {
        (
            norm_proj_part_cuda(x, lx, &p, n, k, m)?,
            norm_proj_ksplit(n, k),
        )
    };
    let sum_fn = dev.get_or_load_custom_func("norm_proj_sum", MODULE, PTX)?;
    let s32 = ksplit as i32;
    let z = out::<f32>(dev, n * (m + 1))?;
    let mut b = sum_fn.builder();
    b.arg(&part)
        .arg(&z)
        .arg(&n32)
        .arg(&k32)
        .arg(&m32)
        .arg(&s32)
        .arg(&eps);
    // SAFETY: one thread per output reads its ksplit partials.
    unsafe { b.launch(flat_config(n * (m + 1))) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(z, dev.clone()))
}

/// The backward's per-token operands in the tensor cores' fragment order, for
/// [`norm_proj_bwd_x`] (fused.cu `norm_proj_dz_frag`): five 16-byte words a lane of each
/// m-tile of 16 tokens.
fn norm_proj_dz_frag(
    dev: &CudaDevice,
    dzz: &CudaView<'_, f32>,
    n: usize,
    k: usize,
    m: usize,
) -> Result<CudaSlice<u32>> {
    let tiles = n.div_ceil(16);
    let frag = out::<u32>(dev, tiles * 5 * 32 * 4)?;
    let func = dev.get_or_load_custom_func("norm_proj_dz_frag", MODULE, PTX)?;
    let (n32, k32, m32) = (n as i32, k as i32, m as i32);
    let mut b = func.builder();
    b.arg(dzz).arg(&frag).arg(&n32).arg(&k32).arg(&m32);
    let cfg = LaunchConfig {
        grid_dim: (tiles.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: warp i of the grid writes m-tile i's 5 x 32 words, for every m-tile.
    unsafe { b.launch(cfg) }.w()?;
    Ok(frag)
}

/// The forward partials on the CUDA cores (fused.cu `norm_proj_part`), any dtype and width.
fn norm_proj_part_cuda(
    x: &CudaStorage,
    lx: &Layout,
    p: &CudaView<'_, f32>,
    n: usize,
    k: usize,
    m: usize,
) -> Result<CudaSlice<f32>> {
    let dev = x.device();
    let part_fn = dev.get_or_load_custom_func(
        &norm_proj_kernel("norm_proj_part", m, x.dtype())?,
        MODULE,
        PTX,
    )?;
    let ksplit = norm_proj_ksplit(n, k);
    let part = out::<f32>(dev, ksplit * n * (m + 1))?;
    let (n32, k32, m32, s32) = (n as i32, k as i32, m as i32, ksplit as i32);
    macro_rules! run {
        ($t:ty) => {{
            let xv = view::<$t>(x, lx)?;
            let mut b = part_fn.builder();
            b.arg(&xv)
                .arg(p)
                .arg(&part)
                .arg(&n32)
                .arg(&k32)
                .arg(&m32)
                .arg(&s32);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(NP_THREADS) as u32, ksplit as u32, 1),
                block_dim: (NP_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: block (i, s) reads tokens 256 i.. of x over its K slice and phi's rows
            // of that slice, and writes those tokens' partials of split s: every partial is
            // written once.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    by_dtype!(x.dtype(), run);
    Ok(part)
}

/// The pre-mix's part of the state's gradient, pre[t][i] dh[t][ch], for the normed
/// projection's backward kernel to add: pre (tokens, streams) f32 and dh (tokens, channels)
/// in the state's dtype.
#[derive(Clone, Copy)]
pub struct PreMixPart<'a> {
    pub pre: (&'a CudaStorage, &'a Layout),
    pub dh: (&'a CudaStorage, &'a Layout),
    pub streams: usize,
    pub channels: usize,
}

/// dx (n, k) in x's dtype of mHC's normed projection, plus `add` and the pre-mix's part
/// where given.
#[allow(clippy::too_many_arguments)]
pub fn norm_proj_bwd_x(
    x: &CudaStorage,
    lx: &Layout,
    phi: &CudaStorage,
    lphi: &Layout,
    dzz: &CudaStorage,
    ldzz: &Layout,
    add: Option<(&CudaStorage, &Layout)>,
    premix: Option<PreMixPart>,
    n: usize,
    k: usize,
    m: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    let on16 = |l: &Layout| l.start_offset().is_multiple_of(8);
    let tc = norm_proj_tc(x, lx, k, m)
        && add.is_none_or(|(_, l)| on16(l))
        && premix.is_none_or(|p| on16(p.dh.1) && p.channels.is_multiple_of(8));
    let name = match tc {
        true => "norm_proj_bwd_x_tc".to_string(),
        false => norm_proj_kernel("norm_proj_bwd_x", m, x.dtype())?,
    };
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (p, d) = (view::<f32>(phi, lphi)?, view::<f32>(dzz, ldzz)?);
    let (n32, k32, m32) = (n as i32, k as i32, m as i32);
    // Column blocks (256 columns, as threads or as 8 warps of 32) times token strides; each
    // block loads its phi rows once for all its tiles. On the CUDA cores tiles of 64 tokens,
    // a few blocks a multiprocessor; on the tensor cores, whose warps walk their m-tiles of
    // 16 without a barrier, one wave of three blocks a multiprocessor (no tail).
    let column_blocks = k.div_ceil(NP_THREADS);
    let (tile, blocks) = match tc {
        true => (16, 3 * multiprocessors(dev)?),
        false => (64, 1056),
    };
    let strides = n.div_ceil(tile).min((blocks / column_blocks).max(1));
    let frag = tc
        .then(|| norm_proj_dz_frag(dev, &d, n, k, m))
        .transpose()?;
    let cfg = LaunchConfig {
        grid_dim: (column_blocks as u32, strides as u32, 1),
        block_dim: (NP_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! run {
        ($t:ty) => {{
            let xv = view::<$t>(x, lx)?;
            let av = add.map(|(s, l)| view::<$t>(s, l)).transpose()?;
            let pre = premix.map(|p| view::<f32>(p.pre.0, p.pre.1)).transpose()?;
            let dh = premix.map(|p| view::<$t>(p.dh.0, p.dh.1)).transpose()?;
            let (ns, cs) = premix.map_or((0, 0), |p| (p.streams as i32, p.channels as i32));
            let dx = out::<$t>(dev, n * k)?;
            let null = 0u64;
            let mut b = func.builder();
            b.arg(&xv).arg(&p);
            match &frag {
                Some(f) => b.arg(f),
                None => b.arg(&d),
            };
            match &av {
                Some(a) => b.arg(a),
                None => b.arg(&null),
            };
            match (&pre, &dh) {
                (Some(pre), Some(dh)) => b.arg(pre).arg(dh),
                _ => b.arg(&null).arg(&null),
            };
            b.arg(&dx).arg(&n32).arg(&k32).arg(&m32).arg(&ns).arg(&cs);
            // SAFETY: block (i, j) writes dx at columns 256 i.. of the token tiles j, j +
            // strides, ..: every element once. The tensor-core kernel reads dz's fragments,
            // written above for every m-tile.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        }};
    }
    Ok(by_dtype!(x.dtype(), run))
}

/// dphi (k, m) f32 of mHC's normed projection.
pub fn norm_proj_bwd_phi(
    x: &CudaStorage,
    lx: &Layout,
    dzz: &CudaStorage,
    ldzz: &Layout,
    n: usize,
    k: usize,
    m: usize,
) -> Result<CudaStorage> {
    let dev = x.device();
    if norm_proj_tc(x, lx, k, m) {
        return norm_proj_bwd_phi_blas(x, lx, dzz, ldzz, n, k, m);
    }
    let func = dev.get_or_load_custom_func(
        &norm_proj_kernel("norm_proj_bwd_phi", m, x.dtype())?,
        MODULE,
        PTX,
    )?;
    let d = view::<f32>(dzz, ldzz)?;
    let dphi = dev.alloc_zeros::<f32>(k * m)?;
    // Token slices for a few blocks a multiprocessor, each at least a tile of 64 tokens so
    // that a block's atomic adds are few beside its sums.
    let column_blocks = k.div_ceil(NP_THREADS);
    let tsplit = (528 / column_blocks).clamp(1, n.div_ceil(64));
    let (n32, k32, m32, t32) = (n as i32, k as i32, m as i32, tsplit as i32);
    let cfg = LaunchConfig {
        grid_dim: (column_blocks as u32, tsplit as u32, 1),
        block_dim: (NP_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! run {
        ($t:ty) => {{
            let xv = view::<$t>(x, lx)?;
            let mut b = func.builder();
            b.arg(&xv)
                .arg(&d)
                .arg(&dphi)
                .arg(&n32)
                .arg(&k32)
                .arg(&m32)
                .arg(&t32);
            // SAFETY: block (i, s) reads columns 256 i.. of x for its token slice and adds
            // into those rows of the zeroed dphi.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    by_dtype!(x.dtype(), run);
    Ok(CudaStorage::wrap_cuda_slice(dphi, dev.clone()))
}

/// dphi = x^T g, g = r dz rounded to bf16 (N, M), on cuBLAS with f32 sums and output: a bf16
/// state's phi gradient at the cost of reading the state once, as every linear layer's
/// weight gradient is taken from bf16 operands.
fn norm_proj_bwd_phi_blas(
    x: &CudaStorage,
    lx: &Layout,
    dzz: &CudaStorage,
    ldzz: &Layout,
    n: usize,
    k: usize,
    m: usize,
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let dev = x.device();
    let stream = dev.cuda_stream();
    let d = view::<f32>(dzz, ldzz)?;
    let g = out::<bf16>(dev, n * m)?;
    let func = dev.get_or_load_custom_func("norm_proj_g_bf16", MODULE, PTX)?;
    let (n32, m32) = (n as i32, m as i32);
    let mut b = func.builder();
    b.arg(&d).arg(&g).arg(&n32).arg(&m32);
    // SAFETY: one thread per element of g reads its token's dz and r.
    unsafe { b.launch(flat_config(n * m)) }.w()?;
    let xv = view::<bf16>(x, lx)?;
    let dphi = out::<f32>(dev, k * m)?;
    let blas = dev.cublas_handle();
    {
        let (xp, _rx) = xv.device_ptr(&stream);
        let (gp, _rg) = g.device_ptr(&stream);
        let (pp, _rp) = dphi.device_ptr(&stream);
        // SAFETY: x holds (n, k) and g (n, m) bf16, dphi (k, m) f32; one matrix, on the
        // device's stream.
        unsafe {
            gemm_rows(
                &blas,
                (true, false),
                (k, m, n),
                1.0,
                (xp, 0),
                (gp, 0),
                0.0,
                (pp, 0),
                true,
                1,
            )?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(dphi, dev.clone()))
}
