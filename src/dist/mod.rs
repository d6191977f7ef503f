//! Training on several ranks: a [`Communicator`] of collectives over candle tensors,
//! data-parallel gradient averaging ([`average_gradients`]) and a ZeRO stage 1 optimizer
//! ([`Sharded`]) that keeps each rank's share of the optimizer state only.
//!
//! Two communicators: [`ThreadComm`], ranks as threads of one process (CPU data parallelism,
//! and the tests: every piece of the sharding logic runs through it), and with the `nccl`
//! feature `NcclComm`, one process per GPU over NCCL. The NCCL layer only moves buffers; NCCL
//! does not run several ranks on one GPU, so multi-rank NCCL runs are not part of the tests.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use candle_optim::dist::{Communicator, Sharded, ThreadComm};
//! use candle_optim::{AdamW, AdamWConfig};
//! use std::sync::Arc;
//!
//! // Two ranks as threads; each holds the same parameters and computes its own gradients.
//! let comms = ThreadComm::group(2)?;
//! let handles: Vec<_> = comms
//!     .into_iter()
//!     .map(|comm| {
//!         std::thread::spawn(move || -> candle_optim::Result<Vec<f32>> {
//!             let rank = comm.rank() as f32;
//!             let w = Var::from_tensor(&Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?)?;
//!             let opt = AdamW::new(vec![w.clone()], AdamWConfig { lr: 0.1, ..Default::default() })?;
//!             let mut opt = Sharded::new(opt, Arc::new(comm))?;
//!             let loss = w.as_tensor().affine(rank as f64 + 1.0, 0.0)?.sum_all()?;
//!             opt.backward_step(&loss)?; // averages the gradients, updates this rank's shard
//!             Ok(w.as_tensor().to_vec1()?)
//!         })
//!     })
//!     .collect();
//! let results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect::<Result<_, _>>()?;
//! assert_eq!(results[0], results[1]); // every rank ends with the same parameters
//! # Ok::<(), candle_optim::Error>(())
//! ```

mod ddp;
#[cfg(feature = "nccl")]
mod nccl;
mod thread;
mod zero;

pub use crate::reduce::{Collective, ReduceOp};
pub use ddp::average_gradients;
#[cfg(feature = "nccl")]
pub use nccl::{NcclComm, NcclId};
pub use thread::{average, combine, ThreadComm};
pub use zero::{Sharded, StepTiming, DEFAULT_BUCKET_BYTES, SHARD_ALIGN};

use crate::error::Result;
use candle_core::Tensor;

/// Collectives over candle tensors across the ranks of a data-parallel job. Every rank must
/// call the same collectives, in the same order, with tensors of the same shape and dtype.
/// Each collective returns a new tensor on the input's device.
pub trait Communicator: Collective {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Combines `t` element by element across ranks; every rank gets the result.
    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// `t` (1-D, its length a multiple of the world size) is combined across ranks, and rank
    /// `r` gets chunk `r` of the result (length `len / world_size`).
    fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// Concatenates every rank's `t` (1-D, the same length on every rank) in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;

    /// Rank `root`'s `t`, on every rank (the others pass a tensor of the same shape and dtype).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;

    /// [`reduce_scatter`](Self::reduce_scatter) of the concatenation of `parts` (1-D tensors of
    /// one dtype and device). The default concatenates them; an implementation that can read
    /// the parts where they are (ranks in one process) skips that copy.
    fn reduce_scatter_parts(&self, parts: &[Tensor], op: ReduceOp) -> Result<Tensor> {
        match parts {
            [one] => self.reduce_scatter(one, op),
            _ => self.reduce_scatter(&Tensor::cat(parts, 0)?, op),
        }
    }

    /// [`all_gather`](Self::all_gather) of the concatenation of `parts` (1-D tensors of one
    /// dtype and device, the same total length on every rank), handed over piecewise:
    /// `deliver(r, offset, t)` receives elements `offset..offset + len(t)` of rank `r`'s
    /// concatenation, every element of every rank exactly once, and must copy what it keeps
    /// (`t` may be another rank's own tensor). The default gathers one flat tensor.
    fn all_gather_parts(
        &self,
        parts: &[Tensor],
        deliver: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let mine = match parts {
            [one] => one.clone(),
            _ => Tensor::cat(parts, 0)?,
        };
        let w = mine.elem_count();
        let all = self.all_gather(&mine)?;
        for r in 0..self.world_size() {
            deliver(r, 0, &all.narrow(0, r * w, w)?)?;
        }
        Ok(())
    }
}
