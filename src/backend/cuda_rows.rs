//! The CUDA execution of [`crate::algorithm::RowProjected`] kernels (AdamP): vectors take one
//! element-wise launch (`<module>_plain`, `<module>_plain_fmt` for state in bf16 or 8 bits and
//! stochastic rounding); tensors of rank ≥ 2 take the five launches described in
//! `kernels/adamp.cu` (`<module>_pass1`, `_decide`, `_pu`, `_coef`, `_pass2`), with per-row
//! sums and decisions kept on the device (no host round trip). Those passes read the state in
//! the math type: tensors of rank ≥ 2 whose state is not (or whose bf16 parameter is rounded
//! stochastically) run them on dense copies, decoded before and encoded after
//! (`kernels/codec.cu`), as the CPU does (`backend/staged.rs`, `whole`).

use super::cuda::{
    block_table, cuda_device, dtype_suffix, function, grid, held_tensors, launch_elementwise,
    launches, launches_by, needs_fmt, upload_blocks, upload_table, with_entries, with_entries_and,
    Entry, CHUNK, THREADS,
};
use super::Work;
use crate::algorithm::Kernel;
use crate::error::{Error, Result};
use crate::state::StateTensor;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Tensor};

// Elements per warp segment (`ADAMP_SEG`) and warps per block.
use super::kernel_abi::ROW_SEG as SEG;
const WARPS: u64 = THREADS as u64 / 32;

pub(crate) fn update<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    let (copied, direct): (Vec<Work<'_, K>>, Vec<Work<'_, K>>) = items
        .iter()
        .copied()
        .partition(|w| w.shape.rank() >= 2 && needs_fmt(w));
    update_direct(&direct)?;
    update_through_copies(&copied)
}

/// One tensor's dense copies for [`update_through_copies`].
struct Copies {
    /// f32 copies of a stochastically rounded bf16 parameter and its gradient.
    pg: Option<(Tensor, Tensor)>,
    /// The slots the passes see: the stored ones in the math type, copies of the others.
    slots: Vec<StateTensor>,
    /// Per slot, its copy (None: the slot is used as it is).
    made: Vec<Option<Tensor>>,
}

/// Rank ≥ 2 tensors with state not in the math type, or a bf16 parameter rounded
/// stochastically: `codec_unpack` decodes the slots into dense copies (math type), the row
/// passes run on them (and on f32 copies of a stochastically rounded parameter and its
/// gradient), and `codec_pack` encodes the copies back into the slots (8-bit: new absmax and
/// codes per block) and rounds the parameter copy into the parameter. The same values as the
/// CPU's (`backend/staged.rs`, `whole`).
fn update_through_copies<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    // A launch holds each tensor's own tensors and its copies (at most 1 + slots).
    for (dt, ws) in launches_by(items, |w| held_tensors(w) + 1 + w.slots.len()) {
        let dev = cuda_device(ws[0].param)?;
        let stream = dev.cuda_stream();
        let sfx = dtype_suffix(dt)?;
        let full = if dt == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let mut copies = Vec::with_capacity(ws.len());
        for w in &ws {
            let pg = match (w.rounding, dt) {
                (Some(_), DType::BF16) => {
                    Some((w.param.to_dtype(DType::F32)?, w.grad.to_dtype(DType::F32)?))
                }
                _ => None,
            };
            let (mut slots, mut made) = (Vec::new(), Vec::new());
            for s in w.slots {
                match s {
                    StateTensor::Dense(t) if t.dtype() == full => {
                        slots.push(s.clone());
                        made.push(None);
                    }
                    _ => {
                        let c = Tensor::zeros(w.param.shape(), full, w.param.device())?;
                        slots.push(StateTensor::Dense(c.clone()));
                        made.push(Some(c));
                    }
                }
            }
            copies.push(Copies { pg, slots, made });
        }
        // Held beside the tensors' own, in this order: per tensor its parameter copy, then
        // its slot copies.
        let extra: Vec<&Tensor> = copies
            .iter()
            .flat_map(|c| c.pg.iter().map(|(p, _)| p).chain(c.made.iter().flatten()))
            .collect();
        let n: Vec<u64> = ws.iter().map(|w| w.param.elem_count() as u64).collect();
        let (blocks, _) = block_table(&n, CHUNK as u64);
        let codec = |stem: &str| -> Result<()> {
            let func = function(dev, "codec", &format!("codec_{stem}_{sfx}"))?;
            with_entries_and(&ws, &extra, &stream, &mut |entries, xptrs| {
                let mut x = xptrs.iter().copied();
                let mut next = || {
                    x.next()
                        .ok_or_else(|| Error::Unsupported("missing copy pointer".into()))
                };
                let mut pairs = Vec::with_capacity(2 * entries.len());
                for (e, c) in entries.iter().zip(&copies) {
                    let mut d = Entry::of_len(e.n);
                    if c.pg.is_some() {
                        d.p = next()?;
                    }
                    for (j, m) in c.made.iter().enumerate() {
                        if m.is_some() {
                            d.s[j] = next()?;
                        }
                    }
                    pairs.extend([*e, d]);
                }
                let table = upload_table(&stream, &pairs)?;
                for (blocks_d, nb) in upload_blocks(&stream, &blocks)? {
                    let mut b = stream.launch_builder(&func);
                    b.arg(&table).arg(&blocks_d);
                    // SAFETY: (const TensorEntry*, const BlockEntry*) with the table in pairs
                    // (stored tensor, its copies), as kernels/codec.cu reads it; every pointer
                    // is held until the launches are enqueued (the tensors' own and their
                    // copies for writing, the gradients and the quantizer table for reading);
                    // each copy has the parameter's `n` elements in the math type (or f32 for
                    // the parameter's), the slots match their formats (`check_slots` in
                    // `with_entries_and`), and each block touches only its chunk within `n`.
                    unsafe { b.launch(grid(nb)) }.w()?;
                }
                Ok(())
            })
        };
        codec("unpack")?;
        let works: Vec<Work<'_, K>> = ws
            .iter()
            .zip(&copies)
            .map(|(w, c)| Work {
                param: c.pg.as_ref().map_or(w.param, |(p, _)| p),
                grad: c.pg.as_ref().map_or(w.grad, |(_, g)| g),
                slots: &c.slots,
                shape: w.shape,
                kernel: w.kernel,
                rounding: None,
                ctl: w.ctl,
            })
            .collect();
        update_direct(&works)?;
        codec("pack")?;
    }
    Ok(())
}

/// Tensors of rank < 2 (any state), and tensors of rank ≥ 2 whose slots are in the math type
/// without stochastic rounding.
fn update_direct<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    let module = K::CUDA_MODULE;
    for (dt, ws) in launches(items) {
        let (mats, vecs): (Vec<_>, Vec<_>) = ws.into_iter().partition(|w| w.shape.rank() >= 2);
        launch_elementwise(&vecs, dt, module, &format!("{module}_plain"))?;
        if mats.is_empty() {
            continue;
        }
        // The row kernels read every slot as the math type and round to nearest.
        if mats.iter().any(|w| needs_fmt(w)) {
            return Err(Error::Unsupported(
                "row passes on state not in the math type (decode it first)".into(),
            ));
        }
        let dev = cuda_device(mats[0].param)?;
        let stream = dev.cuda_stream();
        let sfx = dtype_suffix(dt)?;
        let pass1 = function(dev, module, &format!("{module}_pass1_{sfx}"))?;
        let decide = function(dev, module, &format!("{module}_decide"))?;
        let pu_k = function(dev, module, &format!("{module}_pu_{sfx}"))?;
        let coef_k = function(dev, module, &format!("{module}_coef"))?;
        let pass2 = function(dev, module, &format!("{module}_pass2_{sfx}"))?;
        // Row layout, and the three block tables: warp segments, row threads, chunks.
        let mut rows = Vec::with_capacity(mats.len());
        for w in &mats {
            let n = w.param.elem_count() as u64;
            if n >= 1 << 32 {
                return Err(Error::Unsupported(
                    "row-projected updates on CUDA handle tensors of fewer than 2^32 elements"
                        .into(),
                ));
            }
            let r = w.shape.dims()[0] as u64;
            rows.push((r, n / r.max(1)));
        }
        let total_rows: u64 = rows.iter().map(|r| r.0).sum();
        // Warp segments per tensor (rows × segments per row), WARPS to a block.
        let segs: Vec<u64> = rows.iter().map(|&(r, l)| r * l.div_ceil(SEG)).collect();
        let (seg_blocks, _) = block_table(&segs, WARPS);
        let row_threads: Vec<u64> = rows.iter().map(|&(r, _)| r).collect();
        let (row_blocks, _) = block_table(&row_threads, THREADS as u64);
        let n: Vec<u64> = mats.iter().map(|w| w.param.elem_count() as u64).collect();
        let (chunk_blocks, _) = block_table(&n, CHUNK as u64);
        with_entries(&mats, &stream, &mut |entries| {
            let mut off = 0;
            for (e, &(r, l)) in entries.iter_mut().zip(&rows) {
                (e.rows, e.row_len, e.off) = (r, l, off);
                off += r;
            }
            let table = upload_table(&stream, entries)?;
            let seg_d = upload_blocks(&stream, &seg_blocks)?;
            let row_d = upload_blocks(&stream, &row_blocks)?;
            let chunk_d = upload_blocks(&stream, &chunk_blocks)?;
            let t = entries.len();
            let mut sums = stream.alloc_zeros::<f64>(3 * total_rows as usize).w()?;
            let mut mode = stream.alloc_zeros::<f64>(4 * t).w()?;
            let mut pu = stream.alloc_zeros::<f64>(total_rows as usize).w()?;
            let mut coef = stream.alloc_zeros::<f64>(2 * total_rows as usize).w()?;
            // The five launches below rely on the same facts: the signatures are those of the
            // module's row kernels (kernels/adamp.cu); every slot is dense in the math type
            // (checked above; lengths by `with_entries`); the table's pointers stay held until
            // the launches are enqueued; `sums`, `mode`, `pu` and `coef` hold 3, 4 (per
            // tensor), 1 and 2 doubles per row, indexed by the rows' offsets set above; each
            // block table only names blocks within its tensor's segments, rows or chunks (in
            // parts: kernels index rows and tensors through the tables, `decide` alone by
            // block, one per tensor).
            for (seg, nb) in &seg_d {
                let mut b = stream.launch_builder(&pass1);
                b.arg(&table).arg(seg).arg(&mut sums);
                // SAFETY: see above; pass1 adds into `sums` (3 per row).
                unsafe { b.launch(grid(*nb)) }.w()?;
            }
            let mut b = stream.launch_builder(&decide);
            b.arg(&table).arg(&sums).arg(&mut mode);
            // SAFETY: see above; one block per tensor (t blocks), writing `mode` (4 per tensor).
            unsafe { b.launch(grid(t)) }.w()?;
            for (seg, nb) in &seg_d {
                let mut b = stream.launch_builder(&pu_k);
                b.arg(&table).arg(seg).arg(&mode).arg(&mut pu);
                // SAFETY: see above; adds into `pu` (1 per row).
                unsafe { b.launch(grid(*nb)) }.w()?;
            }
            for (row, nb) in &row_d {
                let mut b = stream.launch_builder(&coef_k);
                b.arg(&table)
                    .arg(row)
                    .arg(&sums)
                    .arg(&mode)
                    .arg(&pu)
                    .arg(&mut coef);
                // SAFETY: see above; one thread per row writes `coef` (2 per row).
                unsafe { b.launch(grid(*nb)) }.w()?;
            }
            for (chunk, nb) in &chunk_d {
                let mut b = stream.launch_builder(&pass2);
                b.arg(&table).arg(chunk).arg(&mode).arg(&coef);
                // SAFETY: see above; each block updates its chunk of its tensor in place.
                unsafe { b.launch(grid(*nb)) }.w()?;
            }
            Ok(())
        })?;
    }
    Ok(())
}
