//! [`Sharded`]: ZeRO stage 1 (Rajbhandari et al. 2019). Each rank keeps the optimizer state of
//! its shard only, gets its shard's averaged gradients by reduce-scatter, updates its shard
//! with the optimizer's own fused step, and all-gathers the parameters.
//!
//! **Layout.** Parameters of one dtype form a flat space cut into one segment per rank, all of
//! the same length (a multiple of [`SHARD_ALIGN`]), which is what NCCL's reduce-scatter and
//! all-gather move. Every tensor starts at a multiple of [`SHARD_ALIGN`] elements in that space,
//! so a cut inside a tensor falls on an 8-bit quantization block boundary of that tensor and a
//! shard's blockwise state is bit for bit the single-process state. Element-wise optimizers
//! take flat ranges (a rank holds at most one piece of a tensor; tensors cut by a segment end
//! are updated through a copy of that piece). Optimizers that need whole tensors (AdamP's row
//! projections, SGD-SaI's per-tensor g-SNR, Muon's matrices), and bf16 parameters written back
//! with stochastic rounding (whose random stream is indexed by element), take whole tensors,
//! balanced by size: the largest first, each to the least loaded rank.
//!
//! **One rank's optimizer** is an ordinary [`Optim`] over the rank's pieces (the parameters
//! themselves where a piece is a whole tensor), with the original names, groups and settings,
//! whose global quantities (the clipping norm, the non-finite check, SGD-SaI's maximum g-SNR,
//! Adan's clipping norm) are reduced across ranks with one small collective each.

use super::Communicator;
use crate::algorithm::{Algorithm, Execution, ExecutionKind, Kernel};
use crate::driver::{check_matches, GroupMemory, NonFinitePolicy, Optim, ParamState, StepReport};
use crate::error::{Error, Result};
use crate::optimizer::Optimizer;
use crate::reduce::ReduceOp;
use crate::schedule::Schedule;
use crate::state::{ParamRounding, StateTensor, BLOCK};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;
use std::time::Instant;

/// Tensors start at, and segments are cut at, multiples of this many elements: the 8-bit
/// quantization block.
pub const SHARD_ALIGN: usize = BLOCK;

/// The default size of one collective's buffer (25 MiB, as PyTorch DDP's buckets).
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Magic bytes of a per-rank shard checkpoint ([`Sharded::save_shard_bytes`]).
const SHARD_MAGIC: &[u8; 8] = b"COSHARD1";

/// A contiguous range of one parameter held by one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    /// Index of the parameter, in group order over all groups.
    param: usize,
    rank: usize,
    /// First element of the piece within the parameter (a multiple of [`SHARD_ALIGN`]).
    offset: usize,
    len: usize,
    /// Where it lies in its rank's segment.
    seg_offset: usize,
    /// The piece is the whole parameter.
    whole: bool,
}

/// The segments of the parameters of one dtype.
#[derive(Clone, Debug)]
struct Layout {
    dtype: DType,
    seg_len: usize,
    /// Sorted by (rank, seg_offset).
    pieces: Vec<Piece>,
}

impl Layout {
    /// The pieces of `rank` overlapping segment positions `lo..hi`, with the overlap.
    fn overlapping(
        &self,
        rank: usize,
        lo: usize,
        hi: usize,
    ) -> impl Iterator<Item = (&Piece, usize, usize)> {
        self.pieces.iter().filter_map(move |p| {
            let (a, b) = (p.seg_offset.max(lo), (p.seg_offset + p.len).min(hi));
            (p.rank == rank && a < b).then_some((p, a, b))
        })
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(SHARD_ALIGN) * SHARD_ALIGN
}

/// Cuts the parameters `sizes` (index, elements) of one dtype into `n` segments.
fn plan_layout(dtype: DType, sizes: &[(usize, usize)], n: usize, whole: bool) -> Layout {
    let mut pieces = Vec::new();
    let seg_len;
    if whole {
        // Largest first to the least loaded rank (ties: the lower rank, the earlier tensor).
        let mut order: Vec<&(usize, usize)> = sizes.iter().collect();
        order.sort_by_key(|&&(i, len)| (std::cmp::Reverse(align(len)), i));
        let mut load = vec![0usize; n];
        let mut owner = vec![0usize; sizes.len()];
        for &&(i, len) in &order {
            let r = (0..n).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += align(len);
            owner[sizes.iter().position(|&(j, _)| j == i).unwrap_or(0)] = r;
        }
        let mut at = vec![0usize; n];
        for (k, &(i, len)) in sizes.iter().enumerate() {
            let r = owner[k];
            pieces.push(Piece {
                param: i,
                rank: r,
                offset: 0,
                len,
                seg_offset: at[r],
                whole: true,
            });
            at[r] += align(len);
        }
        seg_len = load.into_iter().max().unwrap_or(0);
    } else {
        let total: usize = sizes.iter().map(|&(_, len)| align(len)).sum();
        seg_len = align(total.div_ceil(n));
        let mut flat = 0;
        for &(i, len) in sizes {
            let mut offset = 0;
            while offset < len {
                let at = flat + offset;
                let rank = at / seg_len;
                let end = ((rank + 1) * seg_len - flat).min(len);
                pieces.push(Piece {
                    param: i,
                    rank,
                    offset,
                    len: end - offset,
                    seg_offset: at - rank * seg_len,
                    whole: offset == 0 && end == len,
                });
                offset = end;
            }
            flat += align(len);
        }
    }
    pieces.sort_by_key(|p| (p.rank, p.seg_offset));
    Layout {
        dtype,
        seg_len,
        pieces,
    }
}

/// Where one piece of this rank lives in its optimizer.
#[derive(Clone, Debug)]
struct Local {
    layout: usize,
    piece: Piece,
    /// The variable the rank's optimizer updates: the parameter itself for a whole piece, else
    /// a 1-D copy of the range.
    var: Var,
}

/// A ZeRO stage 1 optimizer: one per rank, each built from the same [`Optim`] (same
/// parameters in the same order, same configuration) and its rank's [`Communicator`]. See the
/// [module docs](crate::dist) for an example.
///
/// [`step`](Optimizer::step) takes this rank's own gradients; the averaged gradients, the
/// update and the parameters that come out are the same on every rank, and equal to a single
/// [`Optim`] stepping on the averaged gradients: bitwise for the element-wise optimizers
/// (AdamW, AdaBelief, diffGrad, Lion, SGD, and Adan without its clipping), and to rounding in
/// the order of a sum for what reduces across ranks (clipping norms).
///
/// Every rank must call `step`, [`save_bytes`](Optimizer::save_bytes) and the other methods
/// that communicate in the same order. A rank whose step fails with an error (a bad gradient)
/// leaves the others waiting in a collective: with [`super::ThreadComm`] they fail after its
/// timeout.
///
/// Checkpoints: [`save_bytes`](Optimizer::save_bytes) gathers every shard into the
/// single-process format, which [`load_bytes`](Optimizer::load_bytes) (or a plain [`Optim`])
/// loads at any number of ranks; [`save_shard_bytes`](Self::save_shard_bytes) saves this rank's
/// shard alone, for a restart at the same number of ranks.
pub struct Sharded<A: Algorithm> {
    comm: Arc<dyn Communicator>,
    /// The whole optimizer, without state except while a checkpoint is converted.
    template: Optim<A>,
    /// This rank's shard.
    inner: Optim<A>,
    layouts: Vec<Layout>,
    locals: Vec<Local>,
    /// Every parameter (with elements), in group order.
    params: Vec<Var>,
    /// Index in `params` of each parameter of the template in group order (`None`: no elements).
    index: Vec<Option<usize>>,
    bucket_bytes: usize,
    timing: StepTiming,
}

/// Where the time of this rank's last [`Sharded::step`] went (wall clock on the host; on a GPU
/// the collectives and the update are timed as the host waits for them).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTiming {
    /// Agreeing on which parameters have gradients, packing and reduce-scatter of gradients.
    pub reduce_scatter: std::time::Duration,
    /// This rank's update (including the optimizer's own cross-rank scalar reductions).
    pub update: std::time::Duration,
    /// All-gather of the parameters.
    pub all_gather: std::time::Duration,
}

impl StepTiming {
    /// The collectives' share: reduce-scatter + all-gather.
    pub fn communication(&self) -> std::time::Duration {
        self.reduce_scatter + self.all_gather
    }
}

impl<A: Algorithm> std::fmt::Debug for Sharded<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded")
            .field("algorithm", &A::NAME)
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("pieces", &self.locals.len())
            .finish()
    }
}

impl<A: Algorithm> Sharded<A> {
    /// This rank's share of `opt`, which every rank builds the same way. State `opt` already
    /// has is split, so a loaded single-process optimizer can be sharded.
    pub fn new(mut opt: Optim<A>, comm: Arc<dyn Communicator>) -> Result<Self> {
        // Its counters exact (a step decided on the device applied), before they are copied.
        opt.settle()?;
        let n = comm.world_size();
        let rank = comm.rank();
        if n == 0 || rank >= n {
            return Err(Error::Communication(format!(
                "rank {rank} in a world of {n} ranks"
            )));
        }
        let mut params = Vec::new();
        let mut index = Vec::new();
        let mut device: Option<Device> = None;
        for p in opt.groups.iter().flat_map(|g| &g.params) {
            let v = &p.var;
            match &device {
                Some(d) if !d.same_device(v.device()) => {
                    return Err(Error::DeviceMismatch {
                        param: p.name.clone(),
                        expected: d.location(),
                        grad: v.device().location(),
                    })
                }
                _ => device = Some(v.device().clone()),
            }
            // A piece cut from a tensor is written back through a flat view of it.
            if !v.is_contiguous() {
                return Err(Error::NonContiguous {
                    param: p.name.clone(),
                });
            }
            if v.elem_count() == 0 {
                index.push(None);
            } else {
                index.push(Some(params.len()));
                params.push(v.clone());
            }
        }
        let kind = <<A::Kernel as Kernel>::Execution as Execution<A::Kernel>>::KIND;
        let whole = A::WHOLE_TENSORS
            || kind != ExecutionKind::ElementWise
            || matches!(opt.rounding, ParamRounding::Stochastic { .. });
        let mut dtypes: Vec<DType> = Vec::new();
        for v in &params {
            if !dtypes.contains(&v.dtype()) {
                dtypes.push(v.dtype());
            }
        }
        let layouts: Vec<Layout> = dtypes
            .into_iter()
            .map(|dt| {
                let sizes: Vec<(usize, usize)> = params
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.dtype() == dt)
                    .map(|(i, v)| (i, v.elem_count()))
                    .collect();
                plan_layout(dt, &sizes, n, whole)
            })
            .collect();
        let locals = local_pieces(&layouts, &params, rank, false)?;
        let inner = shard_optimizer(&opt, &index, &locals)?;
        let mut s = Sharded {
            comm,
            template: opt,
            inner,
            layouts,
            locals,
            params,
            index,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            timing: StepTiming::default(),
        };
        s.inner.collective = Some(s.comm.clone());
        s.split_template_state()?;
        Ok(s)
    }

    /// Sets the size of one collective's buffer (gradients and parameters move in buffers of
    /// at most this many bytes per rank's segment).
    pub fn set_bucket_bytes(&mut self, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Err(Error::hyper("bucket_bytes", 0.0, "must be > 0"));
        }
        self.bucket_bytes = bytes;
        Ok(())
    }

    /// Where the time of the last step went.
    pub fn last_step_timing(&self) -> StepTiming {
        self.timing
    }

    /// This rank's optimizer: its [`Optim::memory_report`] is the rank's state.
    pub fn shard(&self) -> &Optim<A> {
        &self.inner
    }

    /// The communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Elements of this rank's pieces (its share of the parameters).
    pub fn shard_elements(&self) -> usize {
        self.locals.iter().map(|l| l.piece.len).sum()
    }

    /// Bytes one rank puts into collectives per step: its full reduce-scatter input and
    /// all-gather output, `2 × world_size × segment` per dtype. For parameters of Ψ bytes this is
    /// 2Ψ plus the alignment padding (and, for whole-tensor shards, the imbalance between ranks).
    pub fn collective_bytes_per_step(&self) -> usize {
        let n = self.comm.world_size();
        self.layouts
            .iter()
            .map(|l| 2 * n * l.seg_len * l.dtype.size_in_bytes())
            .sum()
    }

    /// Bytes of all parameters (Ψ), the reference for [`collective_bytes_per_step`](Self::collective_bytes_per_step).
    pub fn param_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    fn segment_bucket(&self, l: &Layout) -> usize {
        (self.bucket_bytes / l.dtype.size_in_bytes()).clamp(1, l.seg_len.max(1))
    }

    /// Back-propagates `loss` (this rank's) and applies one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport> {
        let grads = loss.backward()?;
        self.step_scaled(&grads, 1.0)
    }

    /// Averages this rank's gradients across ranks, updates its shard and all-gathers the
    /// parameters: [`step_scaled`](Self::step_scaled) with a scale of 1.
    pub fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        self.step_scaled(grads, 1.0)
    }

    /// Averages this rank's gradients across ranks (reduce-scatter), updates its shard and
    /// all-gathers the parameters. Gradients are multiplied by `scale` inside the update.
    pub fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<StepReport> {
        let start = Instant::now();
        // Check this rank's gradients before any collective.
        let mut local: Vec<Option<Tensor>> = Vec::with_capacity(self.params.len());
        for (v, name) in self.params.iter().zip(self.param_names()) {
            local.push(match grads.get(v.as_tensor()) {
                Some(g) => {
                    check_matches(&name, v.as_tensor(), g)?;
                    Some(g.flatten_all()?)
                }
                None => None,
            });
        }
        // Which parameters have a gradient on any rank: the others are skipped everywhere.
        let mut present: Vec<f64> = local
            .iter()
            .map(|g| f64::from(u8::from(g.is_some())))
            .collect();
        self.comm.all_reduce_scalars(&mut present, ReduceOp::Max)?;
        // Pieces that are copies start from the parameters as they are now.
        for l in &self.locals {
            if !l.piece.whole {
                let src = self.params[l.piece.param]
                    .as_tensor()
                    .flatten_all()?
                    .narrow(0, l.piece.offset, l.piece.len)?;
                l.var.set(&src)?;
            }
        }
        let n = self.comm.world_size();
        let mut store = GradStore::default();
        for (li, l) in self.layouts.iter().enumerate() {
            let bucket = self.segment_bucket(l);
            let device = self.params[l.pieces[0].param].device().clone();
            let mut mine = Vec::new();
            let mut lo = 0;
            while lo < l.seg_len {
                let hi = (lo + bucket).min(l.seg_len);
                let mut parts = Vec::new();
                for r in 0..n {
                    let mut at = lo;
                    for (p, a, b) in l.overlapping(r, lo, hi) {
                        if a > at {
                            parts.push(Tensor::zeros(a - at, l.dtype, &device)?);
                        }
                        parts.push(match &local[p.param] {
                            Some(g) => g.narrow(0, p.offset + (a - p.seg_offset), b - a)?,
                            None => Tensor::zeros(b - a, l.dtype, &device)?,
                        });
                        at = b;
                    }
                    if hi > at {
                        parts.push(Tensor::zeros(hi - at, l.dtype, &device)?);
                    }
                }
                mine.push(self.comm.reduce_scatter_parts(&parts, ReduceOp::Avg)?);
                lo = hi;
            }
            for loc in self.locals.iter().filter(|loc| loc.layout == li) {
                let p = loc.piece;
                if present[p.param] > 0.0 {
                    // A view of the bucket that holds it; a copy only where a piece straddles
                    // buckets.
                    let (first, last) =
                        (p.seg_offset / bucket, (p.seg_offset + p.len - 1) / bucket);
                    let g = if first == last {
                        mine[first].narrow(0, p.seg_offset - first * bucket, p.len)?
                    } else {
                        let parts = (first..=last)
                            .map(|b| {
                                let lo = p.seg_offset.max(b * bucket);
                                let hi = (p.seg_offset + p.len).min((b + 1) * bucket);
                                mine[b].narrow(0, lo - b * bucket, hi - lo)
                            })
                            .collect::<candle_core::Result<Vec<_>>>()?;
                        Tensor::cat(&parts, 0)?
                    };
                    store.insert(loc.var.as_tensor(), g.reshape(loc.var.shape())?);
                }
            }
        }
        let scattered = Instant::now();
        let mut report = self.inner.step_scaled(&store, scale)?;
        let updated = Instant::now();
        if report.taken() {
            // Counted over every rank's parameters, not this rank's pieces.
            report.set_present(present.iter().filter(|&&p| p > 0.0).count());
            self.gather_params()?;
        }
        self.timing = StepTiming {
            reduce_scatter: scattered - start,
            update: updated - scattered,
            all_gather: updated.elapsed(),
        };
        Ok(report)
    }

    /// All-gathers every rank's pieces into the parameters.
    fn gather_params(&self) -> Result<()> {
        let me = self.comm.rank();
        for (li, l) in self.layouts.iter().enumerate() {
            let bucket = self.segment_bucket(l);
            let device = self.params[l.pieces[0].param].device().clone();
            let vars: Vec<&Local> = self.locals.iter().filter(|x| x.layout == li).collect();
            let mut lo = 0;
            while lo < l.seg_len {
                let hi = (lo + bucket).min(l.seg_len);
                let mut parts = Vec::new();
                let mut at = lo;
                for (p, a, b) in l.overlapping(me, lo, hi) {
                    if a > at {
                        parts.push(Tensor::zeros(a - at, l.dtype, &device)?);
                    }
                    let var = &vars
                        .iter()
                        .find(|x| x.piece == *p)
                        .expect("every piece of this rank is local")
                        .var;
                    parts.push(var.as_tensor().flatten_all()?.narrow(
                        0,
                        a - p.seg_offset,
                        b - a,
                    )?);
                    at = b;
                }
                if hi > at {
                    parts.push(Tensor::zeros(hi - at, l.dtype, &device)?);
                }
                // `t` holds rank r's segment positions lo + at .. lo + at + len(t).
                let mut deliver = |r: usize, at: usize, t: &Tensor| -> Result<()> {
                    let (from, to) = (lo + at, lo + at + t.elem_count());
                    for (p, a, b) in l.overlapping(r, from, to) {
                        if r == me && p.whole {
                            continue; // updated in place
                        }
                        let src = t.narrow(0, a - from, b - a)?;
                        self.params[p.param].as_tensor().flatten_all()?.slice_set(
                            &src,
                            0,
                            p.offset + (a - p.seg_offset),
                        )?;
                    }
                    Ok(())
                };
                self.comm.all_gather_parts(&parts, &mut deliver)?;
                lo = hi;
            }
        }
        Ok(())
    }

    fn param_names(&self) -> Vec<String> {
        self.template
            .groups
            .iter()
            .flat_map(|g| &g.params)
            .zip(&self.index)
            .filter(|(_, i)| i.is_some())
            .map(|(p, _)| p.name.clone())
            .collect()
    }

    /// Moves the template's state (if any) into this rank's shard, which it replaces, and
    /// leaves the template without state. The settings and counters follow.
    fn split_template_state(&mut self) -> Result<()> {
        // Everything fallible first.
        let full: Vec<&crate::driver::Param<A>> = self
            .template
            .groups
            .iter()
            .flat_map(|g| &g.params)
            .zip(&self.index)
            .filter(|(_, i)| i.is_some())
            .map(|(p, _)| p)
            .collect();
        let mut split = Vec::with_capacity(self.locals.len());
        for l in &self.locals {
            let src = full[l.piece.param];
            let slots = match &src.slots {
                Some(slots) if l.piece.whole => Some(slots.clone()),
                Some(slots) => Some(
                    slots
                        .iter()
                        .map(|s| slice_state(s, l.var.as_tensor(), l.piece.offset, l.piece.len))
                        .collect::<Result<Vec<_>>>()?,
                ),
                None => None,
            };
            split.push((slots, src.t, src.extra.clone(), src.fresh));
        }
        copy_settings(&self.template, &mut self.inner);
        let mut it = split.into_iter();
        for p in self.inner.groups.iter_mut().flat_map(|g| &mut g.params) {
            let (slots, t, extra, fresh) = it.next().expect("one split per piece");
            p.slots = slots;
            p.t = t;
            p.extra = extra;
            p.fresh = fresh;
        }
        clear_state(&mut self.template);
        Ok(())
    }

    /// Fills the template with every rank's state (`shards[r]`: rank r's shard checkpoint;
    /// this rank's own is read from its optimizer).
    fn merge_into_template(&mut self, shards: &[Vec<u8>]) -> Result<()> {
        let me = self.comm.rank();
        let mut pieces: Vec<Vec<(Piece, crate::driver::Param<A>)>> =
            (0..self.params.len()).map(|_| Vec::new()).collect();
        for (r, bytes) in shards.iter().enumerate() {
            if r == me {
                continue;
            }
            let locals = local_pieces(&self.layouts, &self.params, r, true)?;
            let mut other = shard_optimizer(&self.template, &self.index, &locals)?;
            other.load_bytes(bytes)?;
            let ps = other.groups.into_iter().flat_map(|g| g.params);
            for (l, p) in locals.iter().zip(ps) {
                pieces[l.piece.param].push((l.piece, p));
            }
        }
        for (l, p) in self
            .locals
            .iter()
            .zip(self.inner.groups.iter().flat_map(|g| &g.params))
        {
            pieces[l.piece.param].push((
                l.piece,
                crate::driver::Param {
                    name: p.name.clone(),
                    positional: p.positional,
                    var: p.var.clone(),
                    format_numel: p.format_numel,
                    slots: p.slots.clone(),
                    t: p.t,
                    extra: p.extra.clone(),
                    fresh: p.fresh,
                },
            ));
        }
        let mut merged = Vec::with_capacity(pieces.len());
        for (i, mut ps) in pieces.into_iter().enumerate() {
            ps.sort_by_key(|(p, _)| p.offset);
            let Some((_, first)) = ps.first() else {
                return Err(Error::Communication(format!("no rank holds parameter {i}")));
            };
            let (t, extra, fresh) = (first.t, first.extra.clone(), first.fresh);
            let slots = if ps.iter().all(|(_, p)| p.slots.is_some()) {
                let n_slots = first.slots.as_ref().map_or(0, Vec::len);
                let shape = self.params[i].shape().clone();
                Some(
                    (0..n_slots)
                        .map(|k| {
                            let parts: Vec<&StateTensor> = ps
                                .iter()
                                .map(|(_, p)| &p.slots.as_ref().expect("checked")[k])
                                .collect();
                            concat_state(&parts, &shape, self.params[i].as_tensor())
                        })
                        .collect::<Result<Vec<_>>>()?,
                )
            } else {
                None
            };
            merged.push((slots, t, extra, fresh));
        }
        copy_settings(&self.inner, &mut self.template);
        let mut it = merged.into_iter();
        for (p, i) in self
            .template
            .groups
            .iter_mut()
            .flat_map(|g| &mut g.params)
            .zip(&self.index)
        {
            if i.is_some() {
                let (slots, t, extra, fresh) = it.next().expect("one merge per parameter");
                p.slots = slots;
                p.t = t;
                p.extra = extra;
                p.fresh = fresh;
            }
        }
        Ok(())
    }

    /// Every rank's `bytes`, in rank order (one all-gather of the longest, padded).
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut len = [bytes.len() as f64];
        self.comm.all_reduce_scalars(&mut len, ReduceOp::Max)?;
        let width = len[0] as usize + 8;
        let mut buf = Vec::with_capacity(width);
        buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        buf.extend_from_slice(bytes);
        buf.resize(width, 0);
        let device = self
            .params
            .first()
            .map_or(Device::Cpu, |v| v.device().clone());
        let t = Tensor::from_vec(buf, width, &device)?;
        let all: Vec<u8> = self.comm.all_gather(&t)?.to_vec1()?;
        Ok(all
            .chunks(width)
            .map(|c| {
                let mut l = [0u8; 8];
                l.copy_from_slice(&c[..8]);
                let l = (u64::from_le_bytes(l) as usize).min(width - 8);
                c[8..8 + l].to_vec()
            })
            .collect())
    }

    /// This rank's shard alone (the rank, the world size and the layout are recorded and
    /// checked on load): for a restart at the same number of ranks. No communication.
    pub fn save_shard_bytes(&self) -> Result<Vec<u8>> {
        let mut out = self.shard_header();
        out.extend_from_slice(&self.inner.save_bytes()?);
        Ok(out)
    }

    /// Loads what [`save_shard_bytes`](Self::save_shard_bytes) saved on this rank. Nothing
    /// changes on an error. No communication.
    pub fn load_shard_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let header = self.shard_header();
        if bytes.len() < header.len() || bytes[..8] != SHARD_MAGIC[..] {
            return Err(Error::Checkpoint("not a shard checkpoint".into()));
        }
        if bytes[..header.len()] != header[..] {
            return Err(Error::CheckpointMismatch(
                "the shard was saved by another rank, number of ranks or parameter layout".into(),
            ));
        }
        self.inner.load_bytes(&bytes[header.len()..])
    }

    fn shard_header(&self) -> Vec<u8> {
        let mut h = SHARD_MAGIC.to_vec();
        h.extend_from_slice(&(self.comm.rank() as u64).to_le_bytes());
        h.extend_from_slice(&(self.comm.world_size() as u64).to_le_bytes());
        // FNV-1a over the layout.
        let mut f: u64 = 0xCBF2_9CE4_8422_2325;
        let mut mix = |x: usize| {
            for b in (x as u64).to_le_bytes() {
                f = (f ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
            }
        };
        for l in &self.layouts {
            mix(l.seg_len);
            for p in &l.pieces {
                for x in [p.param, p.rank, p.offset, p.len, p.seg_offset] {
                    mix(x);
                }
            }
        }
        h.extend_from_slice(&f.to_le_bytes());
        h
    }

    fn load_full(&mut self, bytes: &[u8], converting: bool) -> Result<()> {
        let loaded = if converting {
            self.template.load_bytes_converting(bytes)
        } else {
            self.template.load_bytes(bytes)
        };
        if let Err(e) = loaded {
            clear_state(&mut self.template);
            return Err(e);
        }
        let split = self.split_template_state();
        clear_state(&mut self.template);
        split
    }
}

/// The pieces of `rank`, in group order of their parameters (the order of its optimizer).
/// `scratch`: copies are zeros (for loading another rank's checkpoint), else the values.
fn local_pieces(
    layouts: &[Layout],
    params: &[Var],
    rank: usize,
    scratch: bool,
) -> Result<Vec<Local>> {
    let mut out = Vec::new();
    for (li, l) in layouts.iter().enumerate() {
        for p in l.pieces.iter().filter(|p| p.rank == rank) {
            let full = &params[p.param];
            let var = if p.whole {
                full.clone()
            } else if scratch {
                Var::zeros(p.len, full.dtype(), full.device())?
            } else {
                Var::from_tensor(&full.as_tensor().flatten_all()?.narrow(0, p.offset, p.len)?)?
            };
            out.push(Local {
                layout: li,
                piece: *p,
                var,
            });
        }
    }
    out.sort_by_key(|l| l.piece.param);
    Ok(out)
}

/// An optimizer over `locals` with the groups, configurations and settings of `template`.
fn shard_optimizer<A: Algorithm>(
    template: &Optim<A>,
    index: &[Option<usize>],
    locals: &[Local],
) -> Result<Optim<A>> {
    let mut groups = Vec::with_capacity(template.groups.len());
    let mut numels = Vec::new();
    let mut k = 0;
    for g in &template.groups {
        let mut vars = Vec::new();
        for p in &g.params {
            let Some(i) = index[k] else {
                k += 1;
                continue;
            };
            k += 1;
            if let Some(l) = locals.iter().find(|l| l.piece.param == i) {
                vars.push((p.name.clone(), l.var.clone(), p.positional));
                numels.push(p.var.elem_count());
            }
        }
        groups.push((g.config.clone(), g.lr_ratio, g.format, vars));
    }
    let mut opt = optim_like(template, groups)?;
    for (p, n) in opt
        .groups
        .iter_mut()
        .flat_map(|g| &mut g.params)
        .zip(numels)
    {
        p.format_numel = n;
    }
    Ok(opt)
}

/// An optimizer over `groups` with `like`'s settings, counters and optimizer-wide scalars.
fn optim_like<A: Algorithm>(
    like: &Optim<A>,
    groups: Vec<(
        A,
        f64,
        crate::state::StateFormat,
        Vec<crate::driver::PoolVar>,
    )>,
) -> Result<Optim<A>> {
    let mut opt = Optim::from_parts(
        like.base.clone(),
        groups,
        like.policy,
        like.max_grad_norm,
        like.schedule.clone(),
        like.rounding,
    )?;
    copy_settings(like, &mut opt);
    Ok(opt)
}

/// Copies the settings, counters and optimizer-wide scalars (not the per-parameter state).
fn copy_settings<A: Algorithm>(from: &Optim<A>, to: &mut Optim<A>) {
    to.base = from.base.clone();
    to.global = from.global.clone();
    to.steps = from.steps;
    to.peak_lr = from.peak_lr;
    to.schedule = from.schedule.clone();
    to.policy = from.policy;
    to.max_grad_norm = from.max_grad_norm;
    to.rounding = from.rounding;
    for (t, f) in to.groups.iter_mut().zip(&from.groups) {
        t.config = f.config.clone();
        t.lr_ratio = f.lr_ratio;
        t.format = f.format;
        t.step = f.step;
    }
}

fn clear_state<A: Algorithm>(opt: &mut Optim<A>) {
    for p in opt.groups.iter_mut().flat_map(|g| &mut g.params) {
        p.slots = None;
        p.t = 0;
        p.extra = Default::default();
        p.fresh = true;
    }
}

/// Elements `offset..offset + len` of a whole tensor's state slot, as the state of `piece`.
fn slice_state(s: &StateTensor, piece: &Tensor, offset: usize, len: usize) -> Result<StateTensor> {
    let cut = |t: &Tensor| -> Result<Tensor> {
        let part = t.flatten_all()?.narrow(0, offset, len)?;
        Ok(crate::backend::cpu::place_state(piece, part.copy()?)?)
    };
    Ok(match s {
        StateTensor::Dense(t) => StateTensor::Dense(cut(t)?),
        StateTensor::Blockwise8 {
            codes,
            absmax,
            signed,
        } => StateTensor::Blockwise8 {
            codes: cut(codes)?,
            absmax: absmax
                .narrow(0, offset / BLOCK, len.div_ceil(BLOCK))?
                .copy()?,
            signed: *signed,
        },
    })
}

/// One slot of a whole tensor of `shape` from its pieces' slots, in order.
fn concat_state(
    parts: &[&StateTensor],
    shape: &candle_core::Shape,
    param: &Tensor,
) -> Result<StateTensor> {
    let flat = |ts: Vec<&Tensor>| -> Result<Tensor> {
        let ts = ts
            .into_iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&ts, 0)?)
    };
    match parts {
        [StateTensor::Dense(_), ..] => {
            let ts = parts
                .iter()
                .map(|s| match s {
                    StateTensor::Dense(t) => Ok(t),
                    _ => Err(Error::Communication(
                        "shards hold different state formats".into(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            let t = flat(ts)?.reshape(shape)?;
            Ok(StateTensor::Dense(crate::backend::cpu::place_state(
                param, t,
            )?))
        }
        [StateTensor::Blockwise8 { signed, .. }, ..] => {
            let mut codes = Vec::new();
            let mut absmax = Vec::new();
            for s in parts {
                match s {
                    StateTensor::Blockwise8 {
                        codes: c,
                        absmax: a,
                        ..
                    } => {
                        codes.push(c);
                        absmax.push(a);
                    }
                    _ => {
                        return Err(Error::Communication(
                            "shards hold different state formats".into(),
                        ))
                    }
                }
            }
            Ok(StateTensor::Blockwise8 {
                codes: crate::backend::cpu::place_state(param, flat(codes)?.reshape(shape)?)?,
                absmax: flat(absmax)?,
                signed: *signed,
            })
        }
        [] => Err(Error::Communication("a state slot without pieces".into())),
    }
}

impl<A: Algorithm> Optimizer for Sharded<A> {
    fn algorithm(&self) -> &'static str {
        A::NAME
    }
    fn step(&mut self, grads: &GradStore) -> Result<StepReport> {
        self.step_scaled(grads, 1.0)
    }
    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.inner.set_learning_rate(lr)
    }
    fn step_count(&self) -> u64 {
        self.inner.step_count()
    }
    /// This rank's state bytes.
    fn state_bytes(&self) -> usize {
        self.inner.state_bytes()
    }
    /// The state of this rank's piece of parameter `name` (a 1-D range where the parameter
    /// is split between ranks).
    fn param_state(&self, name: &str) -> Option<ParamState> {
        self.inner.param_state(name)
    }
    fn global_scalars(&self) -> Vec<(&'static str, f64)> {
        self.inner.global_scalars()
    }
    fn reset_state(&mut self) -> Result<()> {
        self.inner.reset_state()
    }
    fn set_non_finite_policy(&mut self, policy: NonFinitePolicy) {
        self.inner.set_non_finite_policy(policy)
    }
    fn set_max_grad_norm(&mut self, max: Option<f64>) -> Result<()> {
        self.inner.set_max_grad_norm(max)
    }
    /// Kept for the rank's optimizer; its steps are decided on the host all the same, since the
    /// ranks agree on the verdict through a collective.
    fn set_verdict_mode(&mut self, mode: crate::VerdictMode) -> Result<()> {
        self.inner.set_verdict_mode(mode)
    }
    fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<StepReport> {
        Sharded::step_scaled(self, grads, scale)
    }
    fn set_schedule(&mut self, schedule: Option<Schedule>) -> Result<()> {
        self.inner.set_schedule(schedule)
    }
    /// This rank's state.
    fn memory_report(&self) -> Vec<GroupMemory> {
        self.inner.memory_report()
    }
    /// The whole state in the single-process format. A collective: every rank calls it, and
    /// every rank gets the same bytes.
    fn save_bytes(&self) -> Result<Vec<u8>> {
        let mine = self.inner.save_bytes()?;
        let all = self.all_gather_bytes(&mine)?;
        // The merge fills a copy of the template; `self` is not changed.
        let mut scratch = Sharded {
            comm: self.comm.clone(),
            template: rebuild(&self.template)?,
            inner: rebuild(&self.inner)?,
            layouts: self.layouts.clone(),
            locals: self.locals.clone(),
            params: self.params.clone(),
            index: self.index.clone(),
            bucket_bytes: self.bucket_bytes,
            timing: self.timing,
        };
        scratch.merge_into_template(&all)?;
        scratch.template.save_bytes()
    }
    /// Loads a single-process checkpoint (from any number of ranks, or none) and keeps this
    /// rank's share. No communication; every rank loads the same bytes. Nothing changes on an
    /// error.
    fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_full(bytes, false)
    }
    fn load_bytes_converting(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_full(bytes, true)
    }
}

/// A copy of `opt` sharing its parameters and state tensors (state tensors are replaced, never
/// written, by the code that uses the copy).
fn rebuild<A: Algorithm>(opt: &Optim<A>) -> Result<Optim<A>> {
    let mut groups = Vec::with_capacity(opt.groups.len());
    for g in &opt.groups {
        let vars = g
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.clone(), p.positional))
            .collect();
        groups.push((g.config.clone(), g.lr_ratio, g.format, vars));
    }
    let mut out = optim_like(opt, groups)?;
    for (t, f) in out
        .groups
        .iter_mut()
        .flat_map(|g| &mut g.params)
        .zip(opt.groups.iter().flat_map(|g| &g.params))
    {
        t.format_numel = f.format_numel;
        t.slots = f.slots.clone();
        t.t = f.t;
        t.extra = f.extra.clone();
        t.fresh = f.fresh;
    }
    Ok(out)
}
