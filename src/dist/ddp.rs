//! Data parallelism: averaging gradients across ranks in flat buckets.

use super::Communicator;
use crate::error::Result;
use crate::reduce::ReduceOp;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// The gradients of `vars` averaged across ranks, for any optimizer of the crate (or any
/// other): every rank passes its own `grads` and gets the same averaged store back.
///
/// Gradients move in flat buckets of at most `bucket_bytes` (a tensor larger than that is a
/// bucket of its own), one all-reduce per bucket and dtype, plus one small all-reduce that
/// agrees on which variables have a gradient: a variable with a gradient on some ranks only
/// counts as zero on the others, and one with a gradient on no rank gets none. Variables with
/// no elements are skipped. Every rank must pass the same `vars` in the same order.
pub fn average_gradients(
    comm: &dyn Communicator,
    vars: &[Var],
    grads: &GradStore,
    bucket_bytes: usize,
) -> Result<GradStore> {
    let vars: Vec<&Var> = vars.iter().filter(|v| v.elem_count() > 0).collect();
    let mut local = Vec::with_capacity(vars.len());
    for (i, v) in vars.iter().enumerate() {
        local.push(match grads.get(v.as_tensor()) {
            Some(g) => {
                crate::driver::check_matches(&format!("vars[{i}]"), v.as_tensor(), g)?;
                Some(g.flatten_all()?)
            }
            None => None,
        });
    }
    let mut present: Vec<f64> = local
        .iter()
        .map(|g| f64::from(u8::from(g.is_some())))
        .collect();
    comm.all_reduce_scalars(&mut present, ReduceOp::Max)?;
    let mut out = GradStore::default();
    let mut dtypes = Vec::new();
    for v in &vars {
        if !dtypes.contains(&v.dtype()) {
            dtypes.push(v.dtype());
        }
    }
    for dt in dtypes {
        let members: Vec<usize> = (0..vars.len())
            .filter(|&i| vars[i].dtype() == dt && present[i] > 0.0)
            .collect();
        let limit = (bucket_bytes / dt.size_in_bytes()).max(1);
        let mut start = 0;
        while start < members.len() {
            // Whole tensors up to the limit (at least one).
            let mut end = start;
            let mut elems = 0;
            while end < members.len()
                && (end == start || elems + vars[members[end]].elem_count() <= limit)
            {
                elems += vars[members[end]].elem_count();
                end += 1;
            }
            let parts = members[start..end]
                .iter()
                .map(|&i| match &local[i] {
                    Some(g) => Ok(g.clone()),
                    None => Tensor::zeros(vars[i].elem_count(), dt, vars[i].device()),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = if parts.len() == 1 {
                parts[0].clone()
            } else {
                Tensor::cat(&parts, 0)?
            };
            let avg = comm.all_reduce(&flat, ReduceOp::Avg)?;
            let mut at = 0;
            for &i in &members[start..end] {
                let v = vars[i];
                let n = v.elem_count();
                out.insert(v.as_tensor(), avg.narrow(0, at, n)?.reshape(v.shape())?);
                at += n;
            }
            start = end;
        }
    }
    Ok(out)
}
