//! The ranks of a trial as GPUs talking through NCCL, on candle's stream of each device so
//! that a collective is ordered with the kernels around it like any other op.
//!
//! Rank layout and rendezvous: a rank is a GPU; the NCCL id that makes the ranks one
//! communicator is created once and given to every rank. Here all ranks are threads of one
//! process on one host, and the id is handed over in memory; it can also come from
//! SWEEP_NCCL_ID (its 128 bytes as 256 hex digits), which is how processes on several hosts
//! would share it (see the README, "Several hosts").

use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Device, Result, Storage, Tensor};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::Group;
use crate::error::InputError;

/// The id every rank of a trial joins with.
pub struct Rendezvous {
    id: Id,
    world: usize,
}

impl Rendezvous {
    pub fn new(world: usize) -> anyhow::Result<Self> {
        // NVLink SHARP (multicast) hangs on the H200 hosts this was tried on; NCCL reads its
        // settings at its first call, which is the one below.
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            std::env::set_var("NCCL_NVLS_ENABLE", "0");
        }
        let id = match std::env::var("SWEEP_NCCL_ID") {
            Ok(hex) => parse_id(&hex)?,
            Err(_) => Id::new().map_err(|e| anyhow::anyhow!("creating the NCCL id: {e:?}"))?,
        };
        Ok(Self { id, world })
    }

    /// Rank `rank`'s communicator on `device` (blocks until every rank has joined).
    pub fn join(&self, rank: usize, device: &Device) -> Result<Nccl> {
        let Device::Cuda(device) = device else {
            bail!("NCCL ranks are GPUs");
        };
        let comm = Comm::from_rank(device.cuda_stream(), rank, self.world, self.id)
            .map_err(|e| candle_core::Error::Msg(format!("joining the NCCL group: {e:?}")))?;
        Ok(Nccl {
            comm,
            device: device.clone(),
        })
    }
}

/// SWEEP_NCCL_ID: 256 hex digits.
fn parse_id(hex: &str) -> std::result::Result<Id, InputError> {
    let bad = || {
        InputError::new(format!(
            "SWEEP_NCCL_ID: expected the NCCL id as 256 hex digits, got {} characters",
            hex.len()
        ))
    };
    let hex = hex.trim();
    if hex.len() != 256 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut internal = [0 as std::ffi::c_char; 128];
    for (i, byte) in internal.iter_mut().enumerate() {
        let b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        *byte = b as std::ffi::c_char;
    }
    Ok(Id::uninit(internal))
}

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: Comm,
    device: CudaDevice,
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what}: {e:?}"))
}

impl Nccl {
    /// A fresh f32 vector tensor on this GPU holding what `fill` writes into `out`.
    fn collective(
        &self,
        t: &Tensor,
        fill: impl FnOnce(
            &cudarc::driver::CudaView<'_, f32>,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> Result<()>,
    ) -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        let n = t.elem_count();
        let mut out = self.device.alloc_zeros::<f32>(n)?;
        {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(s) = &*storage else {
                bail!("an NCCL collective on a tensor that is not on a GPU");
            };
            let start = layout.start_offset();
            let src = s.as_cuda_slice::<f32>()?.slice(start..start + n);
            fill(&src, &mut out)?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        Ok(Tensor::from_storage(
            storage,
            t.shape(),
            BackpropOp::none(),
            false,
        ))
    }
}

impl Group for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        self.collective(t, |src, out| {
            self.comm
                .all_reduce(src, out, &ReduceOp::Sum)
                .map(|_| ())
                .map_err(|e| nccl_error("all-reduce", e))
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(t, |src, out| {
            self.comm
                .broadcast(Some(src), out, root as i32)
                .map(|_| ())
                .map_err(|e| nccl_error("broadcast", e))
        })
    }
}
