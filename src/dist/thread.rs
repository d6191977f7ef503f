//! [`ThreadComm`]: ranks as threads of one process, exchanging tensors through shared memory.

use super::Communicator;
use crate::error::{Error, Result};
use crate::reduce::{Collective, ReduceOp};
use candle_core::Tensor;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a rank waits for the others in one collective before the group fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// One rank of an in-process group: ranks are threads, each holding its `ThreadComm`. The
/// collectives combine in rank order, so results do not depend on thread timing.
///
/// A rank that waits longer than the group's timeout (a rank failed, or ranks called different
/// collectives) fails with [`Error::Communication`], and so does every later collective of the
/// group: a mismatch never hangs a test.
#[derive(Clone)]
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ThreadComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadComm")
            .field("rank", &self.rank)
            .field("world_size", &self.shared.n)
            .finish()
    }
}

struct Shared {
    n: usize,
    timeout: Duration,
    round: Mutex<Round>,
    cv: Condvar,
}

#[derive(Clone)]
enum Item {
    Tensor(Tensor),
    Parts(Vec<Tensor>),
    Scalars(Vec<f64>),
}

/// One rank's contribution to a collective: what it called (checked against the others) and
/// its data.
#[derive(Clone)]
struct Contribution {
    what: String,
    item: Item,
}

#[derive(Default)]
struct Round {
    generation: u64,
    slots: Vec<Option<Contribution>>,
    arrived: usize,
    result: Arc<Vec<Contribution>>,
    failed: Option<String>,
}

impl ThreadComm {
    /// A group of `n` ranks (`n ≥ 1`): hand one to each thread.
    pub fn group(n: usize) -> Result<Vec<ThreadComm>> {
        Self::group_with_timeout(n, DEFAULT_TIMEOUT)
    }

    /// Like [`group`](Self::group), with the time a rank waits for the others.
    pub fn group_with_timeout(n: usize, timeout: Duration) -> Result<Vec<ThreadComm>> {
        if n == 0 {
            return Err(Error::Communication(
                "a group needs at least one rank".into(),
            ));
        }
        let shared = Arc::new(Shared {
            n,
            timeout,
            round: Mutex::new(Round {
                slots: vec![None; n],
                ..Default::default()
            }),
            cv: Condvar::new(),
        });
        Ok((0..n)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Deposits this rank's contribution and returns every rank's, once all have arrived.
    fn exchange(&self, what: String, item: Item) -> Result<Arc<Vec<Contribution>>> {
        let sh = &*self.shared;
        fn poisoned<T>(_: T) -> Error {
            Error::Communication("a rank panicked inside a collective".into())
        }
        let mut round = sh.round.lock().map_err(poisoned)?;
        if let Some(why) = &round.failed {
            return Err(Error::Communication(why.clone()));
        }
        let generation = round.generation;
        round.slots[self.rank] = Some(Contribution { what, item });
        round.arrived += 1;
        let all = if round.arrived == sh.n {
            let slots: Vec<Contribution> = round.slots.iter_mut().flat_map(Option::take).collect();
            round.result = Arc::new(slots);
            round.arrived = 0;
            round.generation += 1;
            sh.cv.notify_all();
            round.result.clone()
        } else {
            let deadline = Instant::now() + sh.timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                round = sh.cv.wait_timeout(round, left).map_err(poisoned)?.0;
                if round.generation != generation {
                    break round.result.clone();
                }
                if let Some(why) = &round.failed {
                    return Err(Error::Communication(why.clone()));
                }
                if Instant::now() >= deadline {
                    let why = format!(
                        "rank {} waited {:?} for the other ranks in a collective",
                        self.rank, sh.timeout
                    );
                    round.failed = Some(why.clone());
                    sh.cv.notify_all();
                    return Err(Error::Communication(why));
                }
            }
        };
        drop(round);
        // Every rank must have called the same collective on the same shape.
        let mine = &all[self.rank].what;
        if let Some((r, c)) = all.iter().enumerate().find(|(_, c)| &c.what != mine) {
            return Err(Error::Communication(format!(
                "rank {} called {mine}, rank {r} called {}",
                self.rank, c.what
            )));
        }
        Ok(all)
    }

    /// Every rank's list of parts (the tensors themselves, not copies).
    fn parts(&self, what: &str, parts: &[Tensor]) -> Result<Vec<Vec<Tensor>>> {
        let dtype = parts.first().map(|t| t.dtype());
        if parts
            .iter()
            .any(|t| t.rank() != 1 || Some(t.dtype()) != dtype)
        {
            return Err(Error::Communication(format!(
                "{what} takes 1-D parts of one dtype"
            )));
        }
        let len: usize = parts.iter().map(Tensor::elem_count).sum();
        let what = format!("{what} of {dtype:?} [{len}]");
        let all = self.exchange(what, Item::Parts(parts.to_vec()))?;
        Ok(all
            .iter()
            .map(|c| match &c.item {
                Item::Parts(p) => p.clone(),
                _ => unreachable!("the collective names were checked equal"),
            })
            .collect())
    }

    fn tensors(&self, what: &str, t: &Tensor) -> Result<Vec<Tensor>> {
        let what = format!("{what} of {:?} {:?}", t.dtype(), t.dims());
        let all = self.exchange(what, Item::Tensor(t.clone()))?;
        Ok(all
            .iter()
            .map(|c| match &c.item {
                Item::Tensor(t) => t.clone(),
                _ => unreachable!("the collective names were checked equal"),
            })
            .collect())
    }
}

/// The element-wise combination of `ts` (same shape and dtype), in order: the sum, the sum
/// divided by the count (an f32 division for f32 tensors), or the maximum. [`ThreadComm`]
/// reduces with it, so a single-process reference can average gradients exactly as it does.
pub fn combine(ts: &[Tensor], op: ReduceOp) -> Result<Tensor> {
    let Some((first, rest)) = ts.split_first() else {
        return Err(Error::Communication("nothing to combine".into()));
    };
    if let Some(t) = combine_cpu(ts, op)? {
        return Ok(t);
    }
    let mut acc = first.clone();
    for t in rest {
        acc = match op {
            ReduceOp::Max => acc.maximum(t)?,
            ReduceOp::Sum | ReduceOp::Avg => (&acc + t)?,
        };
    }
    if op == ReduceOp::Avg {
        let n = Tensor::new(ts.len() as f32, acc.device())?.to_dtype(acc.dtype())?;
        acc = acc.broadcast_div(&n)?;
    } else if rest.is_empty() {
        acc = acc.copy()?;
    }
    Ok(acc)
}

/// [`combine`]'s sum or average in one pass for contiguous f32 and f64 CPU tensors (the same arithmetic in the
/// same order as the candle ops it replaces: a sum in order, then a division); `None` for
/// anything else.
fn combine_cpu(ts: &[Tensor], op: ReduceOp) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    fn run<T: Copy + std::ops::Add<Output = T> + std::ops::Div<Output = T>>(
        xs: &[&[T]],
        avg: bool,
        n: T,
    ) -> Vec<T> {
        let mut out: Vec<T> = xs[0].to_vec();
        for x in &xs[1..] {
            out.iter_mut().zip(x.iter()).for_each(|(o, &v)| *o = *o + v);
        }
        if avg {
            out.iter_mut().for_each(|o| *o = *o / n);
        }
        out
    }
    if op == ReduceOp::Max || !ts.iter().all(|t| t.device().is_cpu() && t.is_contiguous()) {
        return Ok(None);
    }
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let dims = ts[0].shape().clone();
    let n = ts.len();
    macro_rules! slices {
        ($variant:ident) => {{
            let mut xs = Vec::with_capacity(n);
            for (g, l) in &guards {
                let (Storage::Cpu(CpuStorage::$variant(v)), Some((a, b))) =
                    (&**g, l.contiguous_offsets())
                else {
                    return Ok(None);
                };
                xs.push(&v[a..b]);
            }
            xs
        }};
    }
    let out = match ts[0].dtype() {
        candle_core::DType::F32 => {
            let xs = slices!(F32);
            Tensor::from_vec(
                run(&xs, op == ReduceOp::Avg, n as f32),
                dims,
                &candle_core::Device::Cpu,
            )?
        }
        candle_core::DType::F64 => {
            let xs = slices!(F64);
            Tensor::from_vec(
                run(&xs, op == ReduceOp::Avg, n as f64),
                dims,
                &candle_core::Device::Cpu,
            )?
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// Like [`combine_cpu`] for ranks' chunks given as runs of contiguous f32 CPU tensors (each
/// rank's runs adding up to the same length); `None` for anything else.
fn combine_runs_cpu(chunks: &[Vec<Tensor>], op: ReduceOp) -> Result<Option<Tensor>> {
    use candle_core::{CpuStorage, Storage};
    if op == ReduceOp::Max
        || !chunks.iter().flatten().all(|t| {
            t.device().is_cpu() && t.is_contiguous() && t.dtype() == candle_core::DType::F32
        })
    {
        return Ok(None);
    }
    let mut out: Vec<f32> = Vec::new();
    for (q, runs) in chunks.iter().enumerate() {
        let mut at = 0;
        for t in runs {
            let (g, l) = t.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*g, l.contiguous_offsets())
            else {
                return Ok(None);
            };
            let x = &v[a..b];
            if q == 0 {
                out.extend_from_slice(x);
            } else {
                out[at..at + x.len()]
                    .iter_mut()
                    .zip(x)
                    .for_each(|(o, &v)| *o += v);
            }
            at += x.len();
        }
    }
    if op == ReduceOp::Avg {
        let n = chunks.len() as f32;
        out.iter_mut().for_each(|o| *o /= n);
    }
    let len = out.len();
    Ok(Some(Tensor::from_vec(out, len, &candle_core::Device::Cpu)?))
}

/// The average of `ts` (same shape and dtype), exactly as [`ThreadComm`] computes it with
/// [`ReduceOp::Avg`]: summed in order, then divided by the count.
pub fn average(ts: &[Tensor]) -> Result<Tensor> {
    combine(ts, ReduceOp::Avg)
}

impl Collective for ThreadComm {
    fn world_size(&self) -> usize {
        self.shared.n
    }

    fn all_reduce_scalars(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        let what = format!("all_reduce_scalars({op:?}) of {}", values.len());
        let all = self.exchange(what, Item::Scalars(values.to_vec()))?;
        for (i, v) in values.iter_mut().enumerate() {
            let mut it = all.iter().map(|c| match &c.item {
                Item::Scalars(s) => s[i],
                _ => unreachable!("the collective names were checked equal"),
            });
            let first = it.next().unwrap_or(0.0);
            *v = match op {
                ReduceOp::Max => it.fold(first, f64::max),
                ReduceOp::Sum | ReduceOp::Avg => it.fold(first, |a, b| a + b),
            };
            if op == ReduceOp::Avg {
                *v /= all.len() as f64;
            }
        }
        Ok(())
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        combine(&self.tensors(&format!("all_reduce({op:?})"), t)?, op)
    }

    fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let n = self.shared.n;
        let len = t.elem_count();
        if t.rank() != 1 || !len.is_multiple_of(n) {
            return Err(Error::Communication(format!(
                "reduce_scatter takes a 1-D tensor whose length is a multiple of {n}, got {:?}",
                t.dims()
            )));
        }
        let chunk = len / n;
        let parts = self
            .tensors(&format!("reduce_scatter({op:?})"), t)?
            .iter()
            .map(|t| t.narrow(0, self.rank * chunk, chunk))
            .collect::<candle_core::Result<Vec<_>>>()?;
        combine(&parts, op)
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if t.rank() != 1 {
            return Err(Error::Communication(format!(
                "all_gather takes a 1-D tensor, got {:?}",
                t.dims()
            )));
        }
        Ok(Tensor::cat(&self.tensors("all_gather", t)?, 0)?)
    }

    fn reduce_scatter_parts(&self, parts: &[Tensor], op: ReduceOp) -> Result<Tensor> {
        let n = self.shared.n;
        let len: usize = parts.iter().map(Tensor::elem_count).sum();
        if !len.is_multiple_of(n) {
            return Err(Error::Communication(format!(
                "reduce_scatter takes a length that is a multiple of {n}, got {len}"
            )));
        }
        let chunk = len / n;
        let (lo, hi) = (self.rank * chunk, (self.rank + 1) * chunk);
        // From every rank, views of the parts that fall in this rank's chunk.
        let chunks = self
            .parts(&format!("reduce_scatter_parts({op:?})"), parts)?
            .iter()
            .map(|ps| {
                let mut at = 0;
                let mut views = Vec::new();
                for p in ps {
                    let (a, b) = (at.max(lo), (at + p.elem_count()).min(hi));
                    if a < b {
                        views.push(p.narrow(0, a - at, b - a)?);
                    }
                    at += p.elem_count();
                }
                Ok(views)
            })
            .collect::<Result<Vec<Vec<Tensor>>>>()?;
        if let Some(t) = combine_runs_cpu(&chunks, op)? {
            return Ok(t);
        }
        let flat = chunks
            .iter()
            .map(|v| Tensor::cat(v, 0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        combine(&flat, op)
    }

    fn all_gather_parts(
        &self,
        parts: &[Tensor],
        deliver: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let all = self.parts("all_gather_parts", parts)?;
        let mut delivered = Ok(());
        'ranks: for (r, ps) in all.iter().enumerate() {
            let mut at = 0;
            for p in ps {
                delivered = deliver(r, at, p);
                if delivered.is_err() {
                    break 'ranks;
                }
                at += p.elem_count();
            }
        }
        // The parts are the other ranks' own tensors: no rank goes on to change its own before
        // every rank has copied them.
        let mut done = [f64::from(u8::from(delivered.is_err()))];
        self.all_reduce_scalars(&mut done, ReduceOp::Max)?;
        delivered
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.n {
            return Err(Error::Communication(format!(
                "broadcast from rank {root} in a group of {}",
                self.shared.n
            )));
        }
        Ok(self.tensors(&format!("broadcast({root})"), t)?[root].copy()?)
    }
}
