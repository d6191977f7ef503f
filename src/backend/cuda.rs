//! The CUDA path (feature `cuda`): multi-tensor launches of the kernels in `kernels/`, on the
//! candle device's own stream.
//!
//! A launch covers up to [`MAX_TENSORS`] tensors: the host builds a table of their device
//! pointers, lengths and step scalars ([`Entry`], the `TensorEntry` of `kernels/common.cuh`)
//! and a table mapping blocks to chunks of [`CHUNK`] elements, uploads both and launches once.
//! Parameters and state are mutated only through candle's in-place ops: one nested
//! `inplace_op1` per tensor holds `&mut` to its storage (and with it cudarc's write tracking)
//! while the launch is enqueued; gradients are read under their read locks.

use super::Work;
use crate::algorithm::{Kernel, KernelParams};
use crate::error::{Error, Result};
use crate::reduce::{GradStats, ReduceParams};
use crate::state::StateTensor;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor,
};
use std::cell::RefCell;
use std::sync::Arc;

pub(crate) use super::kernel_abi::{CHUNK, THREADS};
use super::kernel_abi::{ENTRY_BYTES, MAX_SLOTS, PARAM_BYTES};

/// Tensors per launch. Each holds a nested in-place op (one per parameter and slot) while the
/// launch is enqueued; this bounds that nesting. GPT-2 small (148 tensors) takes 3 launches.
pub(crate) const MAX_TENSORS: usize = 64;

/// Generates [`ptx`] from the table of algorithms (`crate::registry::algorithm_table!`): one
/// embedded module per line's `module` (`kernels/<module>.cu`), plus the reductions.
macro_rules! ptx_table {
    ($($variant:ident: $module:ident::$config:ident as $alias:ident, $doc:literal;)*) => {
        /// The PTX of a kernel module, compiled by `build.rs`.
        pub(crate) fn ptx(module: &str) -> Result<&'static str> {
            Ok(match module {
                $(
                    stringify!($module) => {
                        include_str!(concat!(env!("OUT_DIR"), "/", stringify!($module), ".ptx"))
                    }
                )*
                "reduce" => include_str!(concat!(env!("OUT_DIR"), "/reduce.ptx")),
                other => return Err(Error::Unsupported(format!("no CUDA module `{other}`"))),
            })
        }
    };
}
crate::registry::algorithm_table!(ptx_table);

/// The entry-point suffix of a parameter dtype.
pub(crate) fn dtype_suffix(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => return Err(Error::Unsupported(format!("no CUDA kernels for {other:?}"))),
    })
}

/// A row of the tensor table (`TensorEntry` in `kernels/common.cuh`: [`ENTRY_BYTES`] bytes).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub p: u64,
    pub g: u64,
    pub s: [u64; MAX_SLOTS],
    pub n: u64,
    pub rows: u64,
    pub row_len: u64,
    pub off: u64,
    /// The kernel's parameter struct, as bytes ([`Entry::set_params`]).
    params: [u8; PARAM_BYTES],
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            p: 0,
            g: 0,
            s: [0; MAX_SLOTS],
            n: 0,
            rows: 0,
            row_len: 0,
            off: 0,
            params: [0; PARAM_BYTES],
        }
    }
}

/// Words per [`Entry`] as uploaded (`TensorEntry` is `CO_ENTRY_BYTES`, from the same constant).
const ENTRY_WORDS: usize = ENTRY_BYTES / 8;
const _: () = assert!(ENTRY_WORDS * 8 == 8 * (2 + MAX_SLOTS + 4) + PARAM_BYTES);

impl Entry {
    /// Puts `params` in the parameter area, where the kernel reads it as its C struct (every
    /// parameter struct fits: asserted where its layout is generated).
    pub(crate) fn set_params<T: KernelParams>(&mut self, params: &T) {
        params.write_bytes(&mut self.params);
    }

    fn push_to(&self, out: &mut Vec<u64>) {
        out.extend([self.p, self.g]);
        out.extend(self.s);
        out.extend([self.n, self.rows, self.row_len, self.off]);
        let (words, rest) = self.params.as_chunks::<8>();
        debug_assert!(rest.is_empty());
        out.extend(words.iter().map(|w| u64::from_ne_bytes(*w)));
    }
}

/// The table of `entries`, uploaded.
pub(crate) fn upload_table(stream: &Arc<CudaStream>, entries: &[Entry]) -> Result<CudaSlice<u64>> {
    let mut t = Vec::with_capacity(entries.len() * ENTRY_WORDS);
    for e in entries {
        e.push_to(&mut t);
    }
    Ok(stream.clone_htod(&t).w()?)
}

/// Block table (pairs tensor, chunk) covering `n[t]` elements of each tensor in chunks of
/// `chunk`, and the index of each tensor's first block (length `n.len() + 1`).
pub(crate) fn block_table(n: &[u64], chunk: u64) -> (Vec<u32>, Vec<u32>) {
    let mut blocks = Vec::new();
    let mut first = Vec::with_capacity(n.len() + 1);
    for (t, &len) in n.iter().enumerate() {
        first.push((blocks.len() / 2) as u32);
        for c in 0..len.div_ceil(chunk) {
            blocks.extend([t as u32, c as u32]);
        }
    }
    first.push((blocks.len() / 2) as u32);
    (blocks, first)
}

/// Blocks per launch. A block table is uploaded and launched in parts of at most this many
/// blocks (48 KiB), because the driver copies a host-to-device upload of up to 64 KiB without
/// waiting, while a larger one from pageable memory first waits for the stream: the host then
/// follows the device launch by launch (GPT-2 XL: 7.7 of 11 ms of host time per AdamW step).
pub(crate) const MAX_BLOCKS: usize = 6144;

/// `blocks` (pairs, see [`block_table`]) uploaded in parts of at most [`MAX_BLOCKS`] blocks,
/// each with its number of blocks. For the update kernels only: they find their work through
/// the table, never through `blockIdx` alone, so their tables may be split anywhere (the
/// reductions index per-block outputs by `blockIdx` and keep one launch per table).
pub(crate) fn upload_blocks(
    stream: &Arc<CudaStream>,
    blocks: &[u32],
) -> Result<Vec<(CudaSlice<u32>, usize)>> {
    blocks
        .chunks(2 * MAX_BLOCKS)
        .map(|part| Ok((stream.clone_htod(part).w()?, part.len() / 2)))
        .collect()
}

/// A launch configuration of `blocks` blocks of [`THREADS`] threads.
pub(crate) fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The CUDA device of `t`.
pub(crate) fn cuda_device(t: &Tensor) -> Result<&CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d),
        other => Err(Error::Unsupported(format!(
            "expected a CUDA tensor, got one on {:?}",
            other.location()
        ))),
    }
}

/// `module`'s function `name`, loaded once per device (registered with candle under a
/// `candle_optim_` prefix so no other crate's custom module can shadow it).
pub(crate) fn function(dev: &CudaDevice, module: &str, name: &str) -> Result<CudaFunction> {
    let key = format!("candle_optim_{module}");
    Ok(dev
        .get_or_load_custom_func(name, &key, ptx(module)?)?
        .into_cuda_function())
}

fn offset_bytes(l: &Layout, elem: usize) -> candle_core::Result<u64> {
    match l.contiguous_offsets() {
        Some((a, _)) => Ok((a * elem) as u64),
        None => bail!("candle-optim: tensor is not contiguous"),
    }
}

/// Runs `body` with read pointers of `tensors` (contiguous CUDA tensors), holding their read
/// locks and cudarc's read records until `body` returns.
pub(crate) fn with_read_ptrs<R>(
    tensors: &[&Tensor],
    stream: &Arc<CudaStream>,
    body: impl FnOnce(&[u64]) -> Result<R>,
) -> Result<R> {
    let locks: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut ptrs = Vec::with_capacity(locks.len());
    let mut records = Vec::with_capacity(locks.len());
    for (s, l) in &locks {
        let Storage::Cuda(cs) = &**s else {
            return Err(Error::Unsupported("expected a CUDA tensor".into()));
        };
        let (ptr, rec, elem) = match &cs.slice {
            CudaStorageSlice::F32(x) => {
                let (p, r) = x.device_ptr(stream);
                (p, r, 4)
            }
            CudaStorageSlice::F64(x) => {
                let (p, r) = x.device_ptr(stream);
                (p, r, 8)
            }
            CudaStorageSlice::BF16(x) => {
                let (p, r) = x.device_ptr(stream);
                (p, r, 2)
            }
            CudaStorageSlice::F16(x) => {
                let (p, r) = x.device_ptr(stream);
                (p, r, 2)
            }
            _ => return Err(Error::Unsupported("unsupported CUDA dtype".into())),
        };
        ptrs.push(ptr + offset_bytes(l, elem)?);
        records.push(rec);
    }
    let out = body(&ptrs);
    drop(records); // records the reads after the launches were enqueued
    out
}

type MutBody<'f> = dyn FnMut(&[u64]) -> Result<()> + 'f;

/// Runs `body` with write pointers of `tensors` (contiguous CUDA tensors in distinct storages),
/// each held through a nested `inplace_op1` — so `&mut` to every storage, and cudarc's write
/// tracking — until `body` returns.
pub(crate) fn with_mut_ptrs(tensors: &[&Tensor], body: &mut MutBody<'_>) -> Result<()> {
    let ptrs = RefCell::new(Vec::with_capacity(tensors.len()));
    let err = RefCell::new(None);
    let r = nest(tensors, &ptrs, &err, body);
    if let Some(e) = err.take() {
        return Err(e);
    }
    Ok(r?)
}

fn nest(
    rest: &[&Tensor],
    ptrs: &RefCell<Vec<u64>>,
    err: &RefCell<Option<Error>>,
    body: &mut MutBody<'_>,
) -> candle_core::Result<()> {
    match rest.split_first() {
        None => {
            let p = ptrs.borrow().clone();
            if let Err(e) = body(&p) {
                *err.borrow_mut() = Some(e);
                bail!("candle-optim: CUDA launch failed");
            }
            Ok(())
        }
        Some((t, rest)) => t.inplace_op1(&MutPtr {
            rest,
            ptrs,
            err,
            body: RefCell::new(body),
        }),
    }
}

struct MutPtr<'a, 'b, 'c> {
    rest: &'a [&'a Tensor],
    ptrs: &'a RefCell<Vec<u64>>,
    err: &'a RefCell<Option<Error>>,
    body: RefCell<&'b mut MutBody<'c>>,
}

impl InplaceOp1 for MutPtr<'_, '_, '_> {
    fn name(&self) -> &'static str {
        "candle-optim-cuda-hold"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        bail!("candle-optim: a CPU tensor in a CUDA launch")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let stream = s.device.cuda_stream();
        let (ptr, _write_record, elem) = match &mut s.slice {
            CudaStorageSlice::F32(x) => {
                let (p, r) = x.device_ptr_mut(&stream);
                (p, r, 4)
            }
            CudaStorageSlice::F64(x) => {
                let (p, r) = x.device_ptr_mut(&stream);
                (p, r, 8)
            }
            CudaStorageSlice::BF16(x) => {
                let (p, r) = x.device_ptr_mut(&stream);
                (p, r, 2)
            }
            CudaStorageSlice::F16(x) => {
                let (p, r) = x.device_ptr_mut(&stream);
                (p, r, 2)
            }
            _ => bail!("candle-optim: unsupported CUDA dtype"),
        };
        self.ptrs.borrow_mut().push(ptr + offset_bytes(l, elem)?);
        let mut body = self.body.borrow_mut();
        let r = nest(self.rest, self.ptrs, self.err, &mut **body);
        self.ptrs.borrow_mut().pop();
        r // `_write_record` drops here: the write is recorded after the launch was enqueued
    }
}

/// Fills the tensor table of `ws` (pointers, lengths, step scalars) and runs `body` with it
/// while every parameter and slot is held for writing and every gradient for reading.
pub(crate) fn with_entries<K: Kernel>(
    ws: &[&Work<'_, K>],
    stream: &Arc<CudaStream>,
    body: &mut dyn FnMut(&mut [Entry]) -> Result<()>,
) -> Result<()> {
    let grads: Vec<&Tensor> = ws.iter().map(|w| w.grad).collect();
    let mut held: Vec<&Tensor> = Vec::new();
    for w in ws {
        held.push(w.param);
        for s in w.slots {
            match s {
                StateTensor::Dense(t) if t.dtype() != DType::BF16 => held.push(t),
                _ => {
                    return Err(Error::Unsupported(format!(
                        "{} optimizer state on CUDA is not supported yet",
                        s.format_name()
                    )))
                }
            }
        }
        if w.rounding.is_some() {
            return Err(Error::Unsupported(
                "stochastic rounding of parameters on CUDA is not supported yet".into(),
            ));
        }
    }
    with_read_ptrs(&grads, stream, |gptrs| {
        with_mut_ptrs(&held, &mut |mptrs| {
            let mut entries = Vec::with_capacity(ws.len());
            let mut k = 0;
            for (w, &g) in ws.iter().zip(gptrs) {
                let mut e = Entry {
                    p: mptrs[k],
                    g,
                    n: w.param.elem_count() as u64,
                    ..Default::default()
                };
                k += 1;
                for slot in e.s.iter_mut().take(w.slots.len()) {
                    *slot = mptrs[k];
                    k += 1;
                }
                e.set_params(&w.kernel.params());
                entries.push(e);
            }
            body(&mut entries)
        })
    })
}

/// `items` grouped by the CUDA device `loc` names for each, in order of first appearance: one
/// launch covers one device's tensors only.
pub(crate) fn by_device<T: Copy>(
    items: &[T],
    loc: impl Fn(T) -> candle_core::DeviceLocation,
) -> Vec<Vec<T>> {
    let mut out: Vec<(candle_core::DeviceLocation, Vec<T>)> = Vec::new();
    for &x in items {
        let l = loc(x);
        match out.iter_mut().find(|(k, _)| *k == l) {
            Some((_, v)) => v.push(x),
            None => out.push((l, vec![x])),
        }
    }
    out.into_iter().map(|(_, v)| v).collect()
}

/// The tensors of `items` with elements, by parameter dtype, in launches of at most
/// [`MAX_TENSORS`].
pub(crate) fn launches<'a, 'b, K: Kernel>(
    items: &'a [Work<'b, K>],
) -> Vec<(DType, Vec<&'a Work<'b, K>>)> {
    let mut out = Vec::new();
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let sel: Vec<&Work<'_, K>> = items
            .iter()
            .filter(|w| w.param.dtype() == dt && w.param.elem_count() > 0)
            .collect();
        for c in sel.chunks(MAX_TENSORS) {
            out.push((dt, c.to_vec()));
        }
    }
    out
}

/// The default CUDA update: the module's element-wise kernel over every tensor, one launch per
/// dtype and [`MAX_TENSORS`] tensors.
pub(crate) fn elementwise<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    for (dt, ws) in launches(items) {
        launch_elementwise(&ws, dt, K::CUDA_MODULE, K::CUDA_MODULE)?;
    }
    Ok(())
}

/// One launch of `module`'s element-wise kernel `<stem>_<dtype>` over `ws` (all of dtype `dt`).
pub(crate) fn launch_elementwise<K: Kernel>(
    ws: &[&Work<'_, K>],
    dt: DType,
    module: &str,
    stem: &str,
) -> Result<()> {
    let Some(first) = ws.first() else {
        return Ok(());
    };
    let dev = cuda_device(first.param)?;
    let stream = dev.cuda_stream();
    let func = function(dev, module, &format!("{stem}_{}", dtype_suffix(dt)?))?;
    let n: Vec<u64> = ws.iter().map(|w| w.param.elem_count() as u64).collect();
    let (blocks, _) = block_table(&n, CHUNK as u64);
    with_entries(ws, &stream, &mut |entries| {
        let table = upload_table(&stream, entries)?;
        for (blocks_d, nb) in upload_blocks(&stream, &blocks)? {
            let mut b = stream.launch_builder(&func);
            b.arg(&table).arg(&blocks_d);
            // SAFETY: the kernel's signature is (const TensorEntry*, const BlockEntry*); the
            // table holds pointers to tensors of `n` elements that stay held (params and slots
            // exclusively, grads shared) until the launches are enqueued, and each block
            // touches only its own chunk within `n`.
            unsafe { b.launch(grid(nb)) }.w()?;
        }
        Ok(())
    })
}

/// Per-tensor statistics of CUDA gradients (see [`crate::reduce::Reducer::stats`]): one launch
/// and one copy to the host per pass, never one per tensor.
pub(crate) fn grad_stats(grads: &[&Tensor], centered: bool) -> Result<Vec<GradStats>> {
    let mut out: Vec<Option<GradStats>> = vec![None; grads.len()];
    // One launch per (device, dtype): a table holds pointers of one device only.
    let all: Vec<usize> = (0..grads.len()).collect();
    for on_dev in by_device(&all, |i| grads[i].device().location()) {
        for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let idx: Vec<usize> = on_dev
                .iter()
                .copied()
                .filter(|&i| grads[i].dtype() == dt)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let sel: Vec<&Tensor> = idx.iter().map(|&i| grads[i]).collect();
            let dev = cuda_device(sel[0])?;
            let stream = dev.cuda_stream();
            let sfx = dtype_suffix(dt)?;
            let n: Vec<u64> = sel.iter().map(|t| t.elem_count() as u64).collect();
            let (blocks, first) = block_table(&n, CHUNK as u64);
            let nb = blocks.len() / 2;
            let sums = function(dev, "reduce", &format!("sums_{sfx}"))?;
            let cent = function(dev, "reduce", &format!("centered_{sfx}"))?;
            let fin = function(dev, "reduce", "reduce_partials")?;
            let t = sel.len();
            let (z, q, c) = with_read_ptrs(&sel, &stream, |ptrs| {
                let mut entries: Vec<Entry> = ptrs
                    .iter()
                    .zip(&n)
                    .map(|(&p, &n)| Entry {
                        p,
                        n,
                        ..Default::default()
                    })
                    .collect();
                let blocks_d = stream.clone_htod(&blocks).w()?;
                let first_d = stream.clone_htod(&first).w()?;
                let reduce =
                    |kernel: &CudaFunction, entries: &[Entry], width: u32| -> Result<Vec<f64>> {
                        let table = upload_table(&stream, entries)?;
                        let mut partial =
                            stream.alloc_zeros::<f64>(nb.max(1) * width as usize).w()?;
                        let mut total = stream.alloc_zeros::<f64>(t * width as usize).w()?;
                        let mut b = stream.launch_builder(kernel);
                        b.arg(&table).arg(&blocks_d).arg(&mut partial);
                        if nb > 0 {
                            // SAFETY: (const TensorEntry*, const BlockEntry*, double* out) with `out`
                            // holding `width` doubles per block; pointers are held by the caller.
                            unsafe { b.launch(grid(nb)) }.w()?;
                        }
                        let mut b = stream.launch_builder(&fin);
                        b.arg(&partial).arg(&first_d).arg(&width).arg(&mut total);
                        // SAFETY: one block per tensor reads its blocks' partials ([first[t],
                        // first[t+1]) × width) and writes total[t*width..]; both sized above.
                        unsafe { b.launch(grid(t)) }.w()?;
                        Ok(stream.clone_dtoh(&total).w()?)
                    };
                let sqz = reduce(&sums, &entries, 3)?;
                let s: Vec<f64> = sqz.chunks(3).map(|c| c[0]).collect();
                let q: Vec<f64> = sqz.chunks(3).map(|c| c[1]).collect();
                let z: Vec<f64> = sqz.chunks(3).map(|c| c[2]).collect();
                let c = if centered {
                    for (e, (&s, &n)) in entries.iter_mut().zip(s.iter().zip(&n)) {
                        e.set_params(&ReduceParams {
                            mean: if n == 0 { 0.0 } else { s / n as f64 },
                        });
                    }
                    Some(reduce(&cent, &entries, 1)?)
                } else {
                    None
                };
                Ok((z, q, c))
            })?;
            for (k, &i) in idx.iter().enumerate() {
                let all_finite = !z[k].is_nan();
                // Finite values whose Σx² overflowed (f64 only, rare): rescale on the host.
                let scaled = if all_finite && !q[k].is_finite() {
                    super::cpu::grad_stats(&sel[k].to_device(&Device::Cpu)?, false)?.scaled
                } else {
                    (1.0, q[k])
                };
                out[i] = Some(GradStats {
                    n: n[k] as usize,
                    sum_sq: q[k],
                    centered_sq: c.as_ref().map(|c| c[k]),
                    all_finite,
                    scaled,
                });
            }
        }
    }
    out.into_iter()
        .map(|s| s.ok_or_else(|| Error::Unsupported("gradient dtype without CUDA kernels".into())))
        .collect()
}
