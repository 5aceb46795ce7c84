//! What training on a CUDA device needs beyond candle: allocator settings, the device's name
//! for the trial record, and its peak memory for `sweep bench`. Without the `cuda` feature
//! every device is the CPU and these answer accordingly.

use candle_core::{Device, Result};

/// Sets a CUDA device up for training; a no-op on the CPU. Call before any tensor is made.
///
/// - Event tracking off: candle records two CUDA events on every allocation so that tensors
///   can be shared between streams. A trial uses one stream, where the stream's order already
///   serializes every use, so the events are pure overhead on each of thousands of ops a step.
/// - The stream-ordered memory pool keeps what it has: by default it returns freed memory to
///   the driver at every synchronization (each step reads its loss), and the next step
///   allocates it again. PyTorch's caching allocator keeps it the same way.
pub fn prepare(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        cuda::prepare(d)?;
    }
    let _ = device;
    Ok(())
}

/// How the trial record names the device: `cpu`, or `cuda:N NAME`, with the physical GPU when
/// CUDA_VISIBLE_DEVICES renumbers them (under Slurm, say).
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::describe(d),
        other => format!("{other:?}"),
    }
}

/// The most device memory in use at once since the last [`reset_peak`], in bytes; `None`
/// on the CPU.
pub fn peak_bytes(device: &Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        // A captured step's memory is the graph's, outside the pool (graph.rs).
        Device::Cuda(d) => {
            Some(cuda::pool_attribute(d, cuda::USED_HIGH).ok()? + cuda::graph_peak(d).ok()?)
        }
        _ => None,
    }
}

/// Starts a new peak (see [`peak_bytes`]).
pub fn reset_peak(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        cuda::set_pool_attribute(d, cuda::USED_HIGH, 0)?;
        cuda::reset_graph_peak(d)?;
    }
    let _ = device;
    Ok(())
}

/// Returns the memory pool's unused memory to the driver (after a synchronization); a
/// no-op on the CPU.
pub fn trim(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        cuda::trim(d)?;
    }
    let _ = device;
    Ok(())
}

/// Device memory held outside the allocator's pool until dropped, so that what trains beside
/// it sees a smaller GPU (`sweep bench --memory-gib`).
pub struct Hold {
    bytes: u64,
    /// The device and the allocation's address.
    #[cfg(feature = "cuda")]
    held: Option<(candle_core::CudaDevice, u64)>,
}

impl Hold {
    /// The bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Holds all of `device`'s free memory but `keep` bytes; an error on the CPU, or when less
/// than `keep` is free.
pub fn hold_all_but(device: &Device, keep: u64) -> Result<Hold> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::hold_all_but(d, keep),
        _ => {
            let _ = keep;
            candle_core::bail!("holding device memory needs a CUDA device, not {device:?}")
        }
    }
}

/// The number of CUDA devices this process can see (0 without the `cuda` feature or a driver).
pub fn count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{CudaDevice, Result};

    use sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as RELEASE_THRESHOLD;
    pub use sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH as USED_HIGH;

    pub fn prepare(d: &CudaDevice) -> Result<()> {
        // SAFETY: one stream per process (candle's default); see `super::prepare`.
        unsafe { d.disable_event_tracking() };
        set_pool_attribute(d, RELEASE_THRESHOLD, u64::MAX)
    }

    pub fn describe(d: &CudaDevice) -> String {
        let ctx = d.cuda_stream().context().clone();
        let ordinal = ctx.ordinal();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        match std::env::var("CUDA_VISIBLE_DEVICES") {
            Ok(v) if !v.is_empty() => {
                let physical = v.split(',').nth(ordinal).unwrap_or("?");
                format!("cuda:{ordinal} {name} (CUDA_VISIBLE_DEVICES={v}: GPU {physical})")
            }
            _ => format!("cuda:{ordinal} {name}"),
        }
    }

    fn pool(d: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to a pool handle.
        check(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) })?;
        Ok(pool)
    }

    pub fn pool_attribute(d: &CudaDevice, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let pool = pool(d)?;
        let mut value = 0u64;
        // SAFETY: the memory attributes read here are cuuint64_t.
        check(unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast()) })?;
        Ok(value)
    }

    pub fn set_pool_attribute(
        d: &CudaDevice,
        attr: sys::CUmemPool_attribute,
        mut value: u64,
    ) -> Result<()> {
        let pool = pool(d)?;
        // SAFETY: the memory attributes written here are cuuint64_t.
        check(unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut value as *mut u64).cast()) })
    }

    pub fn trim(d: &CudaDevice) -> Result<()> {
        let pool = pool(d)?;
        // SAFETY: a valid pool; keeping 0 bytes releases all it holds unused.
        check(unsafe { sys::cuMemPoolTrimTo(pool, 0) })
    }

    /// The most memory captured graphs' allocations used at once (graph.rs).
    pub fn graph_peak(d: &CudaDevice) -> Result<u64> {
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
        let mut value = 0u64;
        let attr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
        // SAFETY: the attribute is a cuuint64_t, the device the context's.
        check(unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                ctx.cu_device(),
                attr,
                (&mut value as *mut u64).cast(),
            )
        })?;
        Ok(value)
    }

    pub fn reset_graph_peak(d: &CudaDevice) -> Result<()> {
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
        let mut zero = 0u64;
        let attr = sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
        // SAFETY: as in `graph_peak`; the high mark may only be reset to 0.
        check(unsafe {
            sys::cuDeviceSetGraphMemAttribute(ctx.cu_device(), attr, (&mut zero as *mut u64).cast())
        })
    }

    /// See [`super::hold_all_but`]: one cuMemAlloc of the free memory less `keep`, outside
    /// the stream-ordered pool the tensors come from (so the pool's peak does not count it).
    pub fn hold_all_but(d: &CudaDevice, keep: u64) -> Result<super::Hold> {
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: two out-pointers for the context bound above.
        check(unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) })?;
        let Some(bytes) = (free as u64).checked_sub(keep).filter(|&b| b > 0) else {
            candle_core::bail!(
                "the device has {:.1} GiB free, not more than the {:.1} GiB asked to keep",
                free as f64 / GIB,
                keep as f64 / GIB
            );
        };
        let mut ptr = 0;
        // SAFETY: an out-pointer; the allocation is freed by `Hold`'s drop.
        check(unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes as usize) })?;
        Ok(super::Hold {
            bytes,
            held: Some((d.clone(), ptr)),
        })
    }

    const GIB: f64 = (1u64 << 30) as f64;

    impl Drop for super::Hold {
        fn drop(&mut self) {
            if let Some((d, ptr)) = self.held.take() {
                let _ = d.cuda_stream().context().bind_to_thread();
                // SAFETY: the pointer cuMemAlloc gave `hold_all_but`, freed once.
                unsafe { sys::cuMemFree_v2(ptr) };
            }
        }
    }

    fn check(r: sys::CUresult) -> Result<()> {
        match r {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            e => candle_core::bail!("CUDA memory pool: {e:?}"),
        }
    }
}
