//! The CUDA execution of [`crate::algorithm::RowProjected`] kernels (AdamP): vectors take one
//! element-wise launch (`<module>_plain`); tensors of rank ≥ 2 take the five launches described
//! in `kernels/adamp.cu` (`<module>_pass1`, `_decide`, `_pu`, `_coef`, `_pass2`), with per-row
//! sums and decisions kept on the device (no host round trip).

use super::cuda::{
    block_table, cuda_device, dtype_suffix, function, grid, launch_elementwise, launches,
    upload_blocks, upload_table, with_entries, CHUNK, THREADS,
};
use super::Work;
use crate::algorithm::Kernel;
use crate::error::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;

// Elements per warp segment (`ADAMP_SEG`) and warps per block.
use super::kernel_abi::ROW_SEG as SEG;
const WARPS: u64 = THREADS as u64 / 32;

pub(crate) fn update<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    let module = K::CUDA_MODULE;
    for (dt, ws) in launches(items) {
        let (mats, vecs): (Vec<_>, Vec<_>) = ws.into_iter().partition(|w| w.shape.rank() >= 2);
        launch_elementwise(&vecs, dt, module, &format!("{module}_plain"))?;
        if mats.is_empty() {
            continue;
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
            // SAFETY (all five launches): the signatures are those of the module's row kernels (kernels/adamp.cu); the
            // table's pointers stay held until the launches are enqueued; `sums`, `mode`,
            // `pu` and `coef` hold 3, 4 (per tensor), 1 and 2 doubles per row, indexed by
            // the rows' offsets set above; each block table only names blocks within its
            // tensor's segments, rows or chunks (in parts: kernels index rows and tensors
            // through the tables, `decide` alone by block, one per tensor).
            for (seg, nb) in &seg_d {
                let mut b = stream.launch_builder(&pass1);
                b.arg(&table).arg(seg).arg(&mut sums);
                unsafe { b.launch(grid(*nb)) }.w()?;
            }
            let mut b = stream.launch_builder(&decide);
            b.arg(&table).arg(&sums).arg(&mut mode);
            unsafe { b.launch(grid(t)) }.w()?;
            for (seg, nb) in &seg_d {
                let mut b = stream.launch_builder(&pu_k);
                b.arg(&table).arg(seg).arg(&mode).arg(&mut pu);
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
                unsafe { b.launch(grid(*nb)) }.w()?;
            }
            for (chunk, nb) in &chunk_d {
                let mut b = stream.launch_builder(&pass2);
                b.arg(&table).arg(chunk).arg(&mode).arg(&coef);
                unsafe { b.launch(grid(*nb)) }.w()?;
            }
            Ok(())
        })?;
    }
    Ok(())
}
