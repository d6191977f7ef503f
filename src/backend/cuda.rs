//! The CUDA path (feature `cuda`): multi-tensor launches of the kernels in `kernels/`, on the
//! candle device's own stream.
//!
//! A launch covers up to [`MAX_TENSORS`] tensors: the host builds a table of their device
//! pointers, lengths, state formats and step scalars ([`Entry`], the `TensorEntry` of
//! `kernels/common.cuh`) and a table mapping blocks to chunks of [`CHUNK`] elements, uploads
//! both and launches once. Tensors whose state is all in the math type, without stochastic
//! rounding, take a kernel's plain entry point; the others (state in bf16 or 8 bits, bf16
//! parameters rounded stochastically) its `_fmt_` one, which reads the 8-bit maps and LUTs
//! from a table uploaded once per device ([`quantizer_table`]).
//! Parameters and state are mutated only through candle's in-place ops: one nested
//! `inplace_op1` per tensor holds `&mut` to its storage (and with it cudarc's write tracking)
//! while the launch is enqueued; gradients are read under their read locks.

use super::Work;
use crate::algorithm::{Kernel, KernelParams};
use crate::error::{Error, Result};
use crate::reduce::{GradStats, ReduceParams, StepControl};
use crate::state::{quantizer, StateTensor, BLOCK};
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub(crate) use super::kernel_abi::{CHUNK, THREADS};
use super::kernel_abi::{
    ENTRY_BYTES, FLAG_SR, FMT_BF16, FMT_FULL, FMT_Q8, MAX_SLOTS, PARAM_BYTES, QTAB_BYTES, QTAB_LUT,
};

/// Tensors per launch. Each holds a nested in-place op (one per parameter and state tensor)
/// while the launch is enqueued; this and [`MAX_HELD`] bound that nesting. GPT-2 small (148
/// tensors) takes 3 launches.
pub(crate) const MAX_TENSORS: usize = 64;

/// Tensors held (nested in-place ops) per launch: as many as [`MAX_TENSORS`] parameters with
/// [`MAX_SLOTS`] dense slots each. 8-bit slots hold two tensors (codes and absmax), so their
/// launches take fewer parameters.
pub(crate) const MAX_HELD: usize = MAX_TENSORS * (1 + MAX_SLOTS);

/// Generates [`ptx`] from the table of algorithms (`crate::registry::algorithm_table!`): one
/// embedded module per line's `module` (`kernels/<module>.cu`), plus the reductions and the
/// state codec (`kernels/codec.cu`).
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
                "codec" => include_str!(concat!(env!("OUT_DIR"), "/codec.ptx")),
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
    /// Per 8-bit slot, its f32 absmax per block of 256 elements.
    pub absmax: [u64; MAX_SLOTS],
    /// The device's quantizer table ([`quantizer_table`]) when a slot is 8-bit.
    pub qtab: u64,
    /// The stochastic-rounding stream (with [`FLAG_SR`]).
    pub key: u64,
    /// The step's verdict on the device (`StepControl`, [`DeviceVerdict`]), or 0: the kernel
    /// skips the tensor when it says so and multiplies the gradient by its clipping factor.
    pub ctl: u64,
    /// Byte `k`: slot `k`'s format ([`FMT_FULL`], [`FMT_BF16`], [`FMT_Q8`]); 0 when every
    /// slot is in the math type.
    pub fmt: u32,
    /// Bit `k`: slot `k` uses the signed map; [`FLAG_SR`]: the (bf16) parameter is written
    /// back with stochastic rounding.
    pub flags: u32,
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
            absmax: [0; MAX_SLOTS],
            qtab: 0,
            key: 0,
            ctl: 0,
            fmt: 0,
            flags: 0,
            params: [0; PARAM_BYTES],
        }
    }
}

/// Words per [`Entry`] as uploaded (`TensorEntry` is `CO_ENTRY_BYTES`, from the same constant).
const ENTRY_WORDS: usize = ENTRY_BYTES / 8;
const _: () = assert!(ENTRY_WORDS * 8 == 8 * (2 + MAX_SLOTS + 4 + MAX_SLOTS + 4) + PARAM_BYTES);

impl Entry {
    /// Puts `params` in the parameter area, where the kernel reads it as its C struct (every
    /// parameter struct fits: asserted where its layout is generated).
    pub(crate) fn set_params<T: KernelParams>(&mut self, params: &T) {
        params.write_bytes(&mut self.params);
    }

    /// An entry of `n` elements, every pointer 0.
    pub(crate) fn of_len(n: u64) -> Self {
        Entry {
            n,
            ..Default::default()
        }
    }

    /// Whether the tensor needs the kernels' general path (`<stem>_fmt_<dtype>`): a slot not
    /// in the math type, or stochastic rounding.
    pub(crate) fn needs_fmt(&self) -> bool {
        self.fmt != FMT_FULL || self.flags & FLAG_SR != 0
    }

    fn push_to(&self, out: &mut Vec<u64>) {
        out.extend([self.p, self.g]);
        out.extend(self.s);
        out.extend([self.n, self.rows, self.row_len, self.off]);
        out.extend(self.absmax);
        out.extend([self.qtab, self.key, self.ctl]);
        // `unsigned int fmt, flags;`: fmt at the lower address.
        let mut w = [0u8; 8];
        w[..4].copy_from_slice(&self.fmt.to_ne_bytes());
        w[4..].copy_from_slice(&self.flags.to_ne_bytes());
        out.push(u64::from_ne_bytes(w));
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
            CudaStorageSlice::U8(x) => {
                let (p, r) = x.device_ptr_mut(&stream);
                (p, r, 1)
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

/// The compute (and full-precision state) dtype of a parameter dtype.
fn math_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Whether `w` needs the kernels' general path: a slot not in the math type, or a bf16
/// parameter written back stochastically (see [`Entry::needs_fmt`]).
pub(crate) fn needs_fmt<K>(w: &Work<'_, K>) -> bool {
    let full = math_dtype(w.param.dtype());
    (w.rounding.is_some() && w.param.dtype() == DType::BF16)
        || w.slots.iter().any(|s| match s {
            StateTensor::Dense(t) => t.dtype() != full,
            StateTensor::Blockwise8 { .. } => true,
        })
}

/// Tensors [`with_entries`] holds for `w`: the parameter and every state tensor.
pub(crate) fn held_tensors<K>(w: &Work<'_, K>) -> usize {
    1 + w.slots.iter().map(|s| s.tensors().len()).sum::<usize>()
}

/// The quantizer table the kernels read for 8-bit state: the signed and the unsigned dynamic
/// maps (256 f32 each), then their LUTs (65,536 codes each, [`QTAB_LUT`]); `crate::state`'s
/// quantizers, byte for byte.
fn quantizer_bytes() -> Vec<u8> {
    let mut out = Vec::with_capacity(QTAB_BYTES);
    for signed in [true, false] {
        for x in quantizer(signed).map {
            out.extend(x.to_le_bytes()); // the device is little-endian
        }
    }
    debug_assert_eq!(out.len(), QTAB_LUT);
    for signed in [true, false] {
        out.extend_from_slice(&quantizer(signed).lut[..]);
    }
    debug_assert_eq!(out.len(), QTAB_BYTES);
    out
}

/// The quantizer table on `dev` ([`quantizer_bytes`]), uploaded on its stream at the first
/// launch with 8-bit state and kept for the process (133 KB per candle device; keyed by the
/// device, not the ordinal, so it is only ever read on the stream that wrote it).
fn quantizer_table(dev: &CudaDevice) -> Result<Arc<CudaSlice<u8>>> {
    type Tables = Mutex<HashMap<DeviceId, Arc<CudaSlice<u8>>>>;
    static TABLES: OnceLock<Tables> = OnceLock::new();
    let mut tables = TABLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = tables.get(&dev.id()) {
        return Ok(t.clone());
    }
    let t = Arc::new(dev.cuda_stream().clone_htod(&quantizer_bytes()).w()?);
    tables.insert(dev.id(), t.clone());
    Ok(t)
}

/// Checks the storage of `w`'s slots against its parameter (the kernels index them by the
/// parameter's length): dense slots of its length in the math type or bf16, 8-bit slots with
/// u8 codes of its length and one f32 absmax per 256 elements.
fn check_slots<K>(w: &Work<'_, K>) -> Result<()> {
    let n = w.param.elem_count();
    let full = math_dtype(w.param.dtype());
    if w.slots.len() > MAX_SLOTS {
        return Err(Error::Unsupported(format!(
            "{} state slots (CUDA kernels take at most {MAX_SLOTS})",
            w.slots.len()
        )));
    }
    for s in w.slots {
        let ok = match s {
            StateTensor::Dense(t) => {
                (t.dtype() == full || t.dtype() == DType::BF16) && t.elem_count() == n
            }
            StateTensor::Blockwise8 { codes, absmax, .. } => {
                codes.dtype() == DType::U8
                    && codes.elem_count() == n
                    && absmax.dtype() == DType::F32
                    && absmax.elem_count() == n.div_ceil(BLOCK)
            }
        };
        if !ok {
            return Err(Error::Unsupported(format!(
                "{} state slot does not match its {:?} parameter of {n} elements",
                s.format_name(),
                w.param.dtype()
            )));
        }
    }
    Ok(())
}

/// Fills the tensor table of `ws` (pointers, lengths, state formats, step scalars) and runs
/// `body` with it while every parameter and state tensor is held for writing and every
/// gradient for reading.
pub(crate) fn with_entries<K: Kernel>(
    ws: &[&Work<'_, K>],
    stream: &Arc<CudaStream>,
    body: &mut dyn FnMut(&mut [Entry]) -> Result<()>,
) -> Result<()> {
    with_entries_and(ws, &[], stream, &mut |entries, _| body(entries))
}

/// What [`with_entries_and`] runs: the table, and the pointers of the extra tensors.
type EntriesBody<'f> = dyn FnMut(&mut [Entry], &[u64]) -> Result<()> + 'f;

/// [`with_entries`], also holding `extra` (distinct storages of the same device) for writing:
/// `body` gets their pointers too.
pub(crate) fn with_entries_and<K: Kernel>(
    ws: &[&Work<'_, K>],
    extra: &[&Tensor],
    stream: &Arc<CudaStream>,
    body: &mut EntriesBody<'_>,
) -> Result<()> {
    let grads: Vec<&Tensor> = ws.iter().map(|w| w.grad).collect();
    let mut held: Vec<&Tensor> = Vec::new();
    let mut q8 = false;
    for w in ws {
        check_slots(w)?;
        held.push(w.param);
        for s in w.slots {
            q8 |= matches!(s, StateTensor::Blockwise8 { .. });
            held.extend(s.tensors());
        }
    }
    let ours = held.len();
    held.extend(extra);
    let qtab = match (q8, ws.first()) {
        (true, Some(w)) => Some(quantizer_table(cuda_device(w.param)?)?),
        _ => None,
    };
    with_read_ptrs(&grads, stream, |gptrs| {
        // Read by the launches `body` enqueues; the record drops after them.
        let (qptr, _qrec) = match &qtab {
            Some(t) => {
                let (p, r) = t.device_ptr(stream);
                (p, Some(r))
            }
            None => (0, None),
        };
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
                let full = math_dtype(w.param.dtype());
                for (j, slot) in w.slots.iter().enumerate() {
                    e.s[j] = mptrs[k];
                    k += 1;
                    let f = match slot {
                        StateTensor::Dense(t) if t.dtype() == full => FMT_FULL,
                        StateTensor::Dense(_) => FMT_BF16,
                        StateTensor::Blockwise8 { signed, .. } => {
                            e.absmax[j] = mptrs[k];
                            k += 1;
                            e.qtab = qptr;
                            if *signed {
                                e.flags |= 1 << j;
                            }
                            FMT_Q8
                        }
                    };
                    e.fmt |= f << (8 * j);
                }
                if let (Some(key), DType::BF16) = (w.rounding, w.param.dtype()) {
                    e.flags |= FLAG_SR;
                    e.key = key;
                }
                e.ctl = w.ctl;
                e.set_params(&w.kernel.params());
                entries.push(e);
            }
            debug_assert_eq!(k, ours);
            body(&mut entries, &mptrs[ours..])
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

/// The tensors of `items` with elements, by parameter dtype and by [`needs_fmt`] (so each
/// launch runs one entry point), in launches of at most [`MAX_TENSORS`] tensors and
/// [`MAX_HELD`] held tensors ([`held_tensors`]).
pub(crate) fn launches<'a, 'b, K: Kernel>(
    items: &'a [Work<'b, K>],
) -> Vec<(DType, Vec<&'a Work<'b, K>>)> {
    launches_by(items, held_tensors)
}

/// [`launches`] with `cost(w)` tensors held per item.
pub(crate) fn launches_by<'a, 'b, K: Kernel>(
    items: &'a [Work<'b, K>],
    cost: impl Fn(&Work<'b, K>) -> usize,
) -> Vec<(DType, Vec<&'a Work<'b, K>>)> {
    let mut out = Vec::new();
    for dt in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for fmt in [false, true] {
            let mut cur: Vec<&Work<'_, K>> = Vec::new();
            let mut held = 0;
            for w in items.iter().filter(|w| {
                w.param.dtype() == dt && w.param.elem_count() > 0 && needs_fmt(w) == fmt
            }) {
                let c = cost(w);
                if !cur.is_empty() && (cur.len() == MAX_TENSORS || held + c > MAX_HELD) {
                    out.push((dt, std::mem::take(&mut cur)));
                    held = 0;
                }
                cur.push(w);
                held += c;
            }
            if !cur.is_empty() {
                out.push((dt, cur));
            }
        }
    }
    out
}

/// The default CUDA update: the module's element-wise kernel over every tensor, one launch per
/// dtype, path and [`MAX_TENSORS`] tensors.
pub(crate) fn elementwise<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    for (dt, ws) in launches(items) {
        launch_elementwise(&ws, dt, K::CUDA_MODULE, K::CUDA_MODULE)?;
    }
    Ok(())
}

/// One launch of `module`'s element-wise kernel over `ws` (all of dtype `dt`):
/// `<stem>_<dtype>` when every tensor keeps its state in the math type without stochastic
/// rounding, else `<stem>_fmt_<dtype>` (the general path, which takes any tensor).
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
    let sfx = dtype_suffix(dt)?;
    let n: Vec<u64> = ws.iter().map(|w| w.param.elem_count() as u64).collect();
    let (blocks, _) = block_table(&n, CHUNK as u64);
    with_entries(ws, &stream, &mut |entries| {
        // Chosen from the table itself: the plain entry point reads every slot as the math
        // type and never rounds stochastically, so it gets only tensors that need neither.
        let name = if entries.iter().any(Entry::needs_fmt) {
            format!("{stem}_fmt_{sfx}")
        } else {
            format!("{stem}_{sfx}")
        };
        let func = function(dev, module, &name)?;
        let table = upload_table(&stream, entries)?;
        for (blocks_d, nb) in upload_blocks(&stream, &blocks)? {
            let mut b = stream.launch_builder(&func);
            b.arg(&table).arg(&blocks_d);
            // SAFETY: the kernel's signature is (const TensorEntry*, const BlockEntry*); the
            // table holds pointers to tensors of `n` elements that stay held (params and state
            // exclusively, grads shared, the quantizer table read) until the launches are
            // enqueued, and each block touches only its own chunk within `n`. Slot storage
            // matches each entry's formats and lengths (`check_slots`: 8-bit codes of `n`
            // bytes, absmax of ceil(n/256) f32), and the plain entry point gets only entries
            // whose slots are all in the math type without stochastic rounding (above).
            unsafe { b.launch(grid(nb)) }.w()?;
        }
        Ok(())
    })
}

/// One multi-tensor reduction's launches: the block kernel into per-block partials, then
/// `reduce_partials` adding each tensor's partials in block order.
struct Reduction<'a> {
    stream: &'a Arc<CudaStream>,
    blocks: CudaSlice<u32>,
    first: CudaSlice<u32>,
    nb: usize,
    finish: CudaFunction,
}

impl<'a> Reduction<'a> {
    /// The block tables of a reduction over tensors of `n` elements at `ptrs` (which the
    /// caller holds), uploaded, and the tensors' table entries.
    fn new(
        dev: &CudaDevice,
        stream: &'a Arc<CudaStream>,
        ptrs: &[u64],
        n: &[u64],
    ) -> Result<(Self, Vec<Entry>)> {
        let entries = ptrs
            .iter()
            .zip(n)
            .map(|(&p, &n)| Entry {
                p,
                n,
                ..Default::default()
            })
            .collect();
        let (blocks, first) = block_table(n, CHUNK as u64);
        let r = Reduction {
            stream,
            blocks: stream.clone_htod(&blocks).w()?,
            first: stream.clone_htod(&first).w()?,
            nb: blocks.len() / 2,
            finish: function(dev, "reduce", "reduce_partials")?,
        };
        Ok((r, entries))
    }

    /// Runs `kernel` (`sums_*` or `centered_*`, `width` doubles per block) over `entries`, whose
    /// pointers the caller holds, and writes `width` totals per tensor into `out`.
    fn run(
        &self,
        kernel: &CudaFunction,
        entries: &[Entry],
        width: u32,
        out: &mut CudaViewMut<'_, f64>,
    ) -> Result<()> {
        let stream = self.stream;
        let t = entries.len();
        if out.len() < t * width as usize {
            return Err(Error::Unsupported("reduction output too small".into()));
        }
        let table = upload_table(stream, entries)?;
        let mut partial = stream
            .alloc_zeros::<f64>(self.nb.max(1) * width as usize)
            .w()?;
        let mut b = stream.launch_builder(kernel);
        b.arg(&table).arg(&self.blocks).arg(&mut partial);
        if self.nb > 0 {
            // SAFETY: (const TensorEntry*, const BlockEntry*, double* out) with `out`
            // holding `width` doubles per block; pointers are held by the caller.
            unsafe { b.launch(grid(self.nb)) }.w()?;
        }
        let mut b = stream.launch_builder(&self.finish);
        b.arg(&partial).arg(&self.first).arg(&width).arg(out);
        // SAFETY: one block per tensor reads its blocks' partials ([first[t], first[t+1]) ×
        // width) and writes out[t*width..(t+1)*width]; `out` holds t × width (checked above).
        unsafe { b.launch(grid(t)) }.w()?;
        Ok(())
    }
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
            let sums = function(dev, "reduce", &format!("sums_{sfx}"))?;
            let cent = function(dev, "reduce", &format!("centered_{sfx}"))?;
            let t = sel.len();
            let (z, q, c) = with_read_ptrs(&sel, &stream, |ptrs| {
                let (launch, mut entries) = Reduction::new(dev, &stream, ptrs, &n)?;
                let reduce =
                    |kernel: &CudaFunction, entries: &[Entry], width: u32| -> Result<Vec<f64>> {
                        let mut total = stream.alloc_zeros::<f64>(t * width as usize).w()?;
                        launch.run(kernel, entries, width, &mut total.slice_mut(..))?;
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

/// A step's verdict decided on the device ([`device_verdict`]): the `StepControl` the update
/// kernels read (through [`Work::ctl`]), and its copy to pinned host memory, enqueued right
/// after it is computed, which [`DeviceVerdict::read`] waits for (only for that copy, never for
/// the stream's later work).
pub(crate) struct DeviceVerdict {
    /// Kept alive for the update kernels, which read it through [`DeviceVerdict::ptr`].
    _ctl: CudaSlice<u64>,
    ptr: u64,
    host: Option<PinnedHostSlice<u64>>,
}

impl std::fmt::Debug for DeviceVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceVerdict")
            .field("ptr", &self.ptr)
            .finish()
    }
}

/// Pinned host buffers for verdicts, kept for reuse: page-locking memory costs far more than a
/// step's other host work.
static PINNED: Mutex<Vec<PinnedHostSlice<u64>>> = Mutex::new(Vec::new());

impl DeviceVerdict {
    /// The device address of the `StepControl` ([`Entry::ctl`]).
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The verdict, once its copy has reached the host.
    pub(crate) fn read(&self) -> Result<StepControl> {
        let host = self
            .host
            .as_ref()
            .ok_or_else(|| Error::Unsupported("verdict buffer released".into()))?;
        let w = host.as_slice().w()?;
        let words: &[u64; StepControl::WORDS] = w
            .get(..StepControl::WORDS)
            .and_then(|w| w.try_into().ok())
            .ok_or_else(|| Error::Unsupported("verdict buffer too small".into()))?;
        Ok(StepControl::from_words(words))
    }
}

/// The pinned buffer goes back to the pool (a later copy into it first waits for this one's);
/// `ctl` is freed in stream order, after the kernels that read it.
impl Drop for DeviceVerdict {
    fn drop(&mut self) {
        if let (Some(h), Ok(mut pool)) = (self.host.take(), PINNED.lock()) {
            pool.push(h);
        }
    }
}

fn pinned(ctx: &Arc<CudaContext>) -> Result<PinnedHostSlice<u64>> {
    if let Ok(mut pool) = PINNED.lock() {
        if let Some(i) = pool.iter().position(|h| Arc::ptr_eq(h.context(), ctx)) {
            return Ok(pool.swap_remove(i));
        }
    }
    // SAFETY: the memory is uninitialized until a copy fills it; it is read only through
    // `DeviceVerdict::read`, after the `memcpy_dtoh` enqueued in `device_verdict` (whose
    // completion `as_slice` waits for), and any bit pattern is a valid u64.
    Ok(unsafe { ctx.alloc_pinned_with_flags::<u64>(StepControl::WORDS, 0) }.w()?)
}

/// Decides a step on the device, reading nothing back: the finite check and, with `max_norm`,
/// the global norm and the clipping factor of `grads` (every one on the CUDA device of the
/// first, in f32, bf16 or f16) multiplied by `scale`, as the driver's synchronous path forms
/// them; `skip`: a non-finite gradient skips the step.
pub(crate) fn device_verdict(
    grads: &[&Tensor],
    scale: f64,
    max_norm: Option<f64>,
    skip: bool,
) -> Result<DeviceVerdict> {
    let first = grads
        .first()
        .ok_or_else(|| Error::Unsupported("a device verdict needs a gradient".into()))?;
    let dev = cuda_device(first)?;
    let stream = dev.cuda_stream();
    let mut totals = stream.alloc_zeros::<f64>(3 * grads.len()).w()?;
    let mut row = vec![0u32; grads.len()];
    let mut next = 0usize;
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let idx: Vec<usize> = (0..grads.len())
            .filter(|&i| grads[i].dtype() == dt)
            .collect();
        if idx.is_empty() {
            continue;
        }
        let sel: Vec<&Tensor> = idx.iter().map(|&i| grads[i]).collect();
        if sel.iter().any(|g| !g.device().same_device(first.device())) {
            return Err(Error::Unsupported(
                "a device verdict needs every gradient on one device".into(),
            ));
        }
        let sums = function(dev, "reduce", &format!("sums_{}", dtype_suffix(dt)?))?;
        let n: Vec<u64> = sel.iter().map(|t| t.elem_count() as u64).collect();
        let (start, end) = (next, next + sel.len());
        for (k, &i) in idx.iter().enumerate() {
            row[i] = (start + k) as u32;
        }
        next = end;
        with_read_ptrs(&sel, &stream, |ptrs| {
            let (launch, entries) = Reduction::new(dev, &stream, ptrs, &n)?;
            let out = &mut totals.slice_mut(3 * start..3 * end);
            launch.run(&sums, &entries, 3, out)
        })?;
    }
    if next != grads.len() {
        return Err(Error::Unsupported(
            "a device verdict takes f32, bf16 and f16 gradients".into(),
        ));
    }
    let row_d = stream.clone_htod(&row).w()?;
    let mut ctl = stream.alloc_zeros::<u64>(StepControl::WORDS).w()?;
    let func = function(dev, "reduce", "step_verdict")?;
    let (count, max, policy) = (grads.len() as u32, max_norm.unwrap_or(0.0), u32::from(skip));
    let mut b = stream.launch_builder(&func);
    b.arg(&totals)
        .arg(&row_d)
        .arg(&count)
        .arg(&scale)
        .arg(&max)
        .arg(&policy)
        .arg(&mut ctl);
    // SAFETY: step_verdict(const double* totals, const unsigned* row, unsigned n, double,
    // double, unsigned, StepControl* out): `totals` holds 3 doubles for each of the n rows that
    // `row` (n entries) names, and `out` is StepControl::WORDS words, the struct's size.
    unsafe { b.launch(LaunchConfig::for_num_elems(1)) }.w()?;
    let mut host = pinned(stream.context())?;
    stream.memcpy_dtoh(&ctl, &mut host).w()?;
    let ptr = {
        let (p, _rec) = ctl.device_ptr(&stream);
        p
    };
    Ok(DeviceVerdict {
        _ctl: ctl,
        ptr,
        host: Some(host),
    })
}
