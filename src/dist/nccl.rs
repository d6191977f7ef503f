//! [`NcclComm`]: one process per GPU, exchanging CUDA tensors over NCCL.
//!
//! Rank 0 makes an [`NcclId`] and hands its bytes ([`NcclId::to_bytes`]) to the other ranks
//! (through a file, as candle's `llama_multiprocess` example does, or any other channel); each
//! rank then builds its [`NcclComm`] on its own GPU with [`NcclComm::new`].
//!
//! NCCL does not allow several ranks on one GPU, so multi-rank runs are not part of this
//! crate's tests. This layer is kept thin on purpose: it checks shapes and dtypes, then hands
//! the buffers to NCCL; the sharding logic above it is the same for every [`Communicator`] and
//! is tested through the in-process [`super::ThreadComm`].

use super::Communicator;
use crate::error::{Error, Result};
use crate::reduce::{Collective, ReduceOp};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::result::NcclError;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp as NcclOp};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor,
};
use half::{bf16, f16};
use std::cell::RefCell;
use std::ffi::c_char;
use std::sync::Mutex;

/// The id that names one NCCL group: rank 0 makes it ([`NcclId::new`]) and every rank passes
/// the same id to [`NcclComm::new`].
#[derive(Clone)]
pub struct NcclId(Id);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// The length of [`to_bytes`](Self::to_bytes)'s result.
    pub const LEN: usize = 128;

    /// A new group id (`ncclGetUniqueId`); make it on one rank only.
    pub fn new() -> Result<NcclId> {
        Id::new()
            .map(NcclId)
            .map_err(|e| nccl_error("ncclGetUniqueId", e))
    }

    /// The id's [`LEN`](Self::LEN) bytes, to hand to the other ranks.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0
            .internal()
            .iter()
            .map(|c| c.to_ne_bytes()[0])
            .collect()
    }

    /// The id from the bytes of [`to_bytes`](Self::to_bytes); [`Error::Communication`] when
    /// there are not exactly [`LEN`](Self::LEN) of them.
    pub fn from_bytes(bytes: &[u8]) -> Result<NcclId> {
        let internal: [u8; Self::LEN] = bytes.try_into().map_err(|_| {
            Error::Communication(format!(
                "an NCCL id has {} bytes, got {}",
                Self::LEN,
                bytes.len()
            ))
        })?;
        Ok(NcclId(Id::uninit(
            internal.map(|b| c_char::from_ne_bytes([b])),
        )))
    }
}

/// NCCL's communicator handle.
struct SendComm(Comm);

// SAFETY: `Comm` is not `Send` only because it holds NCCL's raw `ncclComm_t` handle (its other
// fields, an `Arc<CudaStream>` and two `usize`, are `Send`). An NCCL communicator is not tied to
// the thread that created it: NCCL's thread-safety rules only forbid using one communicator from
// several threads at the same time. A `SendComm` is reachable only through `NcclComm::comm`, a
// `Mutex`, so its uses (the collectives, and `ncclCommAbort` in `Comm`'s drop, which runs with
// exclusive ownership) happen on one thread at a time, and `NcclComm::with_comm` makes the
// device's CUDA context current on the calling thread before every NCCL call.
unsafe impl Send for SendComm {}

/// One rank of a data-parallel job over NCCL, one process per GPU.
///
/// Collectives take CUDA tensors on this communicator's device (the [`Device`] given to
/// [`new`](Self::new), or a clone of it: candle gives each `Device::new_cuda` its own id and
/// stream) of dtype f32, f64, bf16 or f16, and for [`all_gather`](Communicator::all_gather) and
/// [`broadcast`](Communicator::broadcast) also u8. They are queued on the device's stream, like
/// candle's own kernels. NCCL cannot check that the ranks called the same collective on the same
/// shape: a mismatch hangs or corrupts data, where [`super::ThreadComm`] reports it. Reductions
/// combine in NCCL's order, so sums can differ from `ThreadComm`'s in the last bits.
pub struct NcclComm {
    comm: Mutex<SendComm>,
    device: CudaDevice,
    rank: usize,
    world_size: usize,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device)
            .finish()
    }
}

fn nccl_error(what: &str, e: NcclError) -> Error {
    Error::Communication(format!("NCCL {what} failed: {:?}", e.0))
}

fn nccl_op(op: ReduceOp) -> NcclOp {
    match op {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

impl NcclComm {
    /// Joins the group named by `id` as `rank` of `world_size`, on `device` (a CUDA device; one
    /// GPU per rank). Blocks until every rank has joined. Fails with [`Error::Communication`] when
    /// `rank >= world_size` or NCCL fails, and with [`Error::Unsupported`] for a device that is
    /// not CUDA.
    pub fn new(device: &Device, rank: usize, world_size: usize, id: &NcclId) -> Result<Self> {
        if rank >= world_size {
            return Err(Error::Communication(format!(
                "rank {rank} in a group of {world_size}"
            )));
        }
        let Device::Cuda(dev) = device else {
            return Err(Error::Unsupported(format!(
                "NcclComm needs a CUDA device, got {:?}",
                device.location()
            )));
        };
        if i32::try_from(world_size).is_err() {
            return Err(Error::Communication(format!(
                "NCCL takes at most {} ranks, got {world_size}",
                i32::MAX
            )));
        }
        let stream = dev.cuda_stream();
        // ncclCommInitRank takes the GPU from the calling thread's current device.
        stream.context().bind_to_thread().w()?;
        let comm = Comm::from_rank(stream, rank, world_size, id.0)
            .map_err(|e| nccl_error("ncclCommInitRank", e))?;
        Ok(NcclComm {
            comm: Mutex::new(SendComm(comm)),
            device: dev.clone(),
            rank,
            world_size,
        })
    }

    /// This communicator's device: make the tensors for its collectives on it.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    /// Runs one NCCL call with the communicator, the device's context current on this thread.
    fn with_comm<R>(
        &self,
        what: &str,
        f: impl FnOnce(&Comm) -> std::result::Result<R, NcclError>,
    ) -> Result<R> {
        let comm = self
            .comm
            .lock()
            .map_err(|_| Error::Communication("a thread panicked inside an NCCL call".into()))?;
        self.device.cuda_stream().context().bind_to_thread().w()?;
        f(&comm.0).map_err(|e| nccl_error(what, e))
    }

    /// `t` contiguous on this communicator's device, its dtype checked for the collective.
    fn input(&self, what: &str, t: &Tensor, reduce: bool) -> Result<Tensor> {
        match t.device() {
            Device::Cuda(d) if d.id() == self.device.id() => {}
            other => {
                return Err(Error::Unsupported(format!(
                    "NcclComm::{what} takes tensors on its own CUDA device ({:?}), got one on {:?}",
                    self.device,
                    other.location()
                )))
            }
        }
        match t.dtype() {
            DType::F32 | DType::F64 | DType::BF16 | DType::F16 => {}
            DType::U8 if !reduce => {}
            dtype => {
                return Err(Error::Unsupported(format!(
                    "NcclComm::{what} does not take {dtype:?} tensors (reductions: f32, f64, \
                     bf16, f16; all_gather and broadcast also u8)"
                )))
            }
        }
        Ok(t.contiguous()?)
    }

    /// Runs `kind` on `t` (checked by [`input`](Self::input)) into a new tensor of `out`.
    fn run(&self, t: &Tensor, kind: Kind, out: Shape) -> Result<Tensor> {
        if t.elem_count() == 0 {
            // Every rank passes the same shape, so every rank skips NCCL alike.
            return Ok(Tensor::zeros(out, t.dtype(), t.device())?);
        }
        let op = Collect {
            comm: self,
            kind,
            out,
            failure: RefCell::new(None),
        };
        t.apply_op1_no_bwd(&op)
            .map_err(|e| op.failure.take().unwrap_or(Error::Candle(e)))
    }
}

/// A collective, as [`Collect`] runs it.
#[derive(Clone, Copy)]
enum Kind {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
}

/// One collective as a candle op: it reads the input's buffer and returns the output's.
struct Collect<'a> {
    comm: &'a NcclComm,
    kind: Kind,
    out: Shape,
    /// The NCCL failure behind an error returned to candle, to hand back typed.
    failure: RefCell<Option<Error>>,
}

impl Collect<'_> {
    fn run<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("NcclComm: the input is not contiguous");
        };
        let dev = s.device();
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let mut dst = dev.alloc_zeros::<T>(self.out.elem_count())?;
        let res = match self.kind {
            Kind::AllReduce(op) => self.comm.with_comm("all_reduce", |c| {
                c.all_reduce(&src, &mut dst, &nccl_op(op)).map(drop)
            }),
            Kind::ReduceScatter(op) => self.comm.with_comm("reduce_scatter", |c| {
                c.reduce_scatter(&src, &mut dst, &nccl_op(op)).map(drop)
            }),
            Kind::AllGather => self
                .comm
                .with_comm("all_gather", |c| c.all_gather(&src, &mut dst).map(drop)),
            Kind::Broadcast(root) => self.comm.with_comm("broadcast", |c| {
                // `root < world_size <= i32::MAX` (checked in `broadcast` and `new`).
                c.broadcast(Some(&src), &mut dst, root as i32).map(drop)
            }),
        };
        if let Err(e) = res {
            let msg = e.to_string();
            *self.failure.borrow_mut() = Some(e);
            candle_core::bail!("{msg}");
        }
        Ok((
            CudaStorage::wrap_cuda_slice(dst, dev.clone()),
            self.out.clone(),
        ))
    }
}

impl CustomOp1 for Collect<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NcclComm collectives take CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            DType::F64 => self.run::<f64>(s, l),
            DType::BF16 => self.run::<bf16>(s, l),
            DType::F16 => self.run::<f16>(s, l),
            DType::U8 => self.run::<u8>(s, l),
            dtype => candle_core::bail!("NcclComm does not take {dtype:?} tensors"),
        }
    }
}

impl Collective for NcclComm {
    fn world_size(&self) -> usize {
        self.world_size
    }

    /// An NCCL all-reduce of the values in f64; [`ReduceOp::Avg`] sums and divides by the world
    /// size on the host, as [`super::ThreadComm`] does.
    fn all_reduce_scalars(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut buf = self.device.clone_htod(&*values)?;
        let nccl = match op {
            ReduceOp::Sum | ReduceOp::Avg => NcclOp::Sum,
            ReduceOp::Max => NcclOp::Max,
        };
        self.with_comm("all_reduce_scalars", |c| {
            c.all_reduce_in_place(&mut buf, &nccl).map(drop)
        })?;
        let out = self.device.clone_dtoh(&buf)?;
        for (v, r) in values.iter_mut().zip(out) {
            *v = if op == ReduceOp::Avg {
                r / self.world_size as f64
            } else {
                r
            };
        }
        Ok(())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let t = self.input("all_reduce", t, true)?;
        let out = t.shape().clone();
        self.run(&t, Kind::AllReduce(op), out)
    }

    fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let n = self.world_size;
        let len = t.elem_count();
        if t.rank() != 1 || !len.is_multiple_of(n) {
            return Err(Error::Communication(format!(
                "reduce_scatter takes a 1-D tensor whose length is a multiple of {n}, got {:?}",
                t.dims()
            )));
        }
        let t = self.input("reduce_scatter", t, true)?;
        self.run(&t, Kind::ReduceScatter(op), Shape::from(len / n))
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if t.rank() != 1 {
            return Err(Error::Communication(format!(
                "all_gather takes a 1-D tensor, got {:?}",
                t.dims()
            )));
        }
        let t = self.input("all_gather", t, false)?;
        let out = Shape::from(self.world_size * t.elem_count());
        self.run(&t, Kind::AllGather, out)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.world_size {
            return Err(Error::Communication(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size
            )));
        }
        let t = self.input("broadcast", t, false)?;
        let out = t.shape().clone();
        self.run(&t, Kind::Broadcast(root), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bytes_round_trip_and_length_check() {
        let mut bytes = vec![0u8; NcclId::LEN];
        bytes[0] = 0xff;
        bytes[127] = 7;
        let id = NcclId::from_bytes(&bytes).unwrap();
        assert_eq!(id.to_bytes(), bytes);
        assert!(matches!(
            NcclId::from_bytes(&bytes[..127]),
            Err(Error::Communication(_))
        ));
    }

    #[test]
    fn new_rejects_cpu_and_bad_rank() {
        let id = NcclId::from_bytes(&[0; NcclId::LEN]).unwrap();
        assert!(matches!(
            NcclComm::new(&Device::Cpu, 0, 1, &id),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            NcclComm::new(&Device::Cpu, 2, 2, &id),
            Err(Error::Communication(_))
        ));
    }

    #[test]
    fn send_sync() {
        fn check<T: Send + Sync>() {}
        check::<NcclComm>();
    }
}
