//! The execution of [`Matrix`](crate::algorithm::Matrix) kernels (Muon): per parameter either
//! the auxiliary element-wise rule, or an element-wise pass, Newton–Schulz over the whole
//! matrix and a second element-wise pass. The kernel supplies only the math
//! ([`MatrixRule`](crate::algorithm::MatrixRule)).
//!
//! * The element-wise passes run on the CPU through the same in-place machinery as every other
//!   fused step ([`super::cpu::update`]: threads, SIMD, no write through a shared reference).
//!   On CUDA they are `kernels/muon.cu`, launched like every element-wise kernel (not yet run
//!   on a GPU); on any other device candle tensor operations whose results are copied into the
//!   parameter and the state in place (`Tensor::slice_set`).
//! * Newton–Schulz runs with candle's matmul on the parameters' device (cuBLAS on CUDA, gemm on
//!   the CPU), except bf16 Newton–Schulz on a CPU with AVX512-BF16: [`super::ns_bf16`]. The matrices of a group with the same shape and device are stacked, so each
//!   iteration is one batched matmul per distinct shape (in batches of at most 32 MiB of input,
//!   each blended, orthogonalized and applied before the next, so a step's scratch memory does
//!   not grow with the model).

use super::{cpu, Work};
use crate::algorithm::{
    Execution, ExecutionKind, Kernel, Matrix, MatrixPart, MatrixRule, MatrixScalars, NewtonSchulz,
    NsDtype, Slots,
};
use crate::elem::Elem;
use crate::error::{Error, Result};
use crate::state::StateTensor;
use candle_core::{DType, Device, Shape, Tensor};

impl<K: MatrixRule> Execution<K> for Matrix {
    const KIND: ExecutionKind = ExecutionKind::Matrix;
    type Aux = K::Aux;

    /// The element-wise passes ([`MatrixPart`]'s `blend` and `update` kernels).
    fn update_cpu<P: Elem>(k: &K, p: &mut [P], g: &[P], s: Slots<'_, P::Math>, _: &Shape) {
        cpu::par_apply(k, p, g, s);
    }

    fn matrix_part(k: &K) -> Option<MatrixPart<K, K::Aux>> {
        Some(k.part())
    }
}

type Aux<K> = <<K as Kernel>::Execution as Execution<K>>::Aux;

/// A matrix taking the orthogonalized step.
struct Orth<'a, K> {
    w: &'a Work<'a, K>,
    blend: K,
    ns: NewtonSchulz,
    update: K,
    scalars: MatrixScalars,
}

/// Runs the update of every item (one parameter group) in place.
pub(crate) fn update<K: Kernel>(items: &[Work<'_, K>]) -> Result<()> {
    let mut aux: Vec<Work<'_, Aux<K>>> = Vec::new();
    let mut orth: Vec<Orth<'_, K>> = Vec::new();
    for w in items {
        match <K::Execution as Execution<K>>::matrix_part(&w.kernel) {
            Some(MatrixPart::ElementWise(k)) => aux.push(Work {
                param: w.param,
                grad: w.grad,
                slots: w.slots,
                shape: w.shape,
                kernel: k,
                rounding: w.rounding,
                ctl: w.ctl,
            }),
            Some(MatrixPart::Orthogonalized {
                blend,
                ns,
                update,
                scalars,
            }) => orth.push(Orth {
                w,
                blend,
                ns,
                update,
                scalars,
            }),
            None => {
                return Err(Error::Unsupported(
                    "a matrix-level step without a matrix part".into(),
                ))
            }
        }
    }
    if !aux.is_empty() {
        super::update(&aux)?;
    }
    // Batches of equal shape, device and Newton–Schulz configuration, in first-seen order, of
    // at most BATCH_BYTES of input each: a batch runs pass 1, Newton–Schulz and pass 2 before
    // the next one starts, so the step's scratch memory is bounded by the batch, not the model.
    let mut done = vec![false; orth.len()];
    for i in 0..orth.len() {
        if done[i] {
            continue;
        }
        let same: Vec<usize> = (i..orth.len())
            .filter(|&j| {
                !done[j]
                    && orth[j].w.shape == orth[i].w.shape
                    && orth[j].ns == orth[i].ns
                    && orth[j]
                        .w
                        .param
                        .device()
                        .same_device(orth[i].w.param.device())
            })
            .collect();
        let bytes = orth[i].w.shape.elem_count().max(1) * 4;
        for batch in same.chunks((BATCH_BYTES / bytes).max(1)) {
            let inputs = batch
                .iter()
                .map(|&j| blend(&orth[j]))
                .collect::<Result<Vec<_>>>()?;
            let us: Vec<&Tensor> = inputs.iter().collect();
            let out = newton_schulz(&us, &orth[i].ns)?;
            drop(inputs);
            for (bi, &j) in batch.iter().enumerate() {
                let o = out.get(bi)?;
                apply_update(&orth[j], &o)?;
                done[j] = true;
            }
        }
    }
    Ok(())
}

/// The most Newton–Schulz input (f32 bytes) one batched iteration stacks: large enough that the
/// batched matmuls stay efficient, small enough that the scratch of a step (the stacked input
/// and a few intermediates of its size) stays a fixed amount, whatever the model.
const BATCH_BYTES: usize = 32 << 20;

/// Pass 1: updates the momentum buffer in place and returns the Newton–Schulz input U.
fn blend<K: Kernel>(o: &Orth<'_, K>) -> Result<Tensor> {
    let w = o.w;
    let [StateTensor::Dense(b)] = w.slots else {
        return Err(Error::Unsupported(format!(
            "a matrix step needs 1 full-precision state slot, got {}",
            w.slots.len()
        )));
    };
    match w.param.device() {
        Device::Cpu => {
            let u = b.zeros_like()?;
            let slots = [StateTensor::Dense(b.clone()), StateTensor::Dense(u.clone())];
            cpu::update(&Work {
                param: w.param,
                grad: w.grad,
                slots: &slots,
                shape: w.shape,
                kernel: o.blend,
                rounding: None,
                ctl: w.ctl,
            })?;
            Ok(u)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let u = b.zeros_like()?;
            let slots = [StateTensor::Dense(b.clone()), StateTensor::Dense(u.clone())];
            super::cuda::elementwise(&[Work {
                param: w.param,
                grad: w.grad,
                slots: &slots,
                shape: w.shape,
                kernel: o.blend,
                rounding: None,
                ctl: w.ctl,
            }])?;
            Ok(u)
        }
        _ => {
            let s = &o.scalars;
            let g = w.grad.to_dtype(b.dtype())?.affine(s.grad_scale, 0.0)?;
            let new_b = lerp(b, &g, s.lerp_w)?;
            b.slice_set(&new_b, 0, 0)?;
            Ok(match s.nesterov {
                Some(mu) => lerp(&g, &new_b, mu)?,
                None => new_b,
            })
        }
    }
}

/// `torch.lerp(a, b, w)` as tensor operations (torch's two-branch formula).
fn lerp(a: &Tensor, b: &Tensor, w: f64) -> Result<Tensor> {
    let d = (b - a)?;
    Ok(if w < 0.5 {
        (a + d.affine(w, 0.0)?)?
    } else {
        (b - d.affine(1.0 - w, 0.0)?)?
    })
}

/// Pass 2: p ← p·decay − lr_adj·O, in place.
fn apply_update<K: Kernel>(o: &Orth<'_, K>, out: &Tensor) -> Result<()> {
    let w = o.w;
    let dt = match w.slots.first() {
        Some(StateTensor::Dense(b)) => b.dtype(),
        _ => DType::F32,
    };
    let out = out.to_dtype(dt)?.contiguous()?;
    let out_slot = StateTensor::Dense(out.clone());
    match w.param.device() {
        Device::Cpu => cpu::update(&Work {
            param: w.param,
            grad: w.grad,
            slots: std::slice::from_ref(&out_slot),
            shape: w.shape,
            kernel: o.update,
            rounding: None,
            ctl: w.ctl,
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::elementwise(&[Work {
            param: w.param,
            grad: w.grad,
            slots: std::slice::from_ref(&out_slot),
            shape: w.shape,
            kernel: o.update,
            rounding: None,
            ctl: w.ctl,
        }]),
        _ => {
            let s = &o.scalars;
            let p = w.param.to_dtype(dt)?;
            let new_p = (p.affine(s.decay, 0.0)? - out.affine(s.lr_adj, 0.0)?)?
                .to_dtype(w.param.dtype())?;
            w.param.slice_set(&new_p, 0, 0)?;
            Ok(())
        }
    }
}

/// Newton–Schulz over a batch of matrices of one shape [r, c]: returns [n, r, c] in the
/// configured dtype.
fn newton_schulz(us: &[&Tensor], ns: &NewtonSchulz) -> Result<Tensor> {
    let x = Tensor::stack(us, 0)?.to_dtype(DType::F32)?;
    let dims = x.dims().to_vec();
    let tall = dims[1] > dims[2];
    let x = if tall { x.t()?.contiguous()? } else { x };
    // The Frobenius norm of each matrix, accumulated in f32 whatever the NS dtype.
    let norm = x.sqr()?.sum_keepdim(2)?.sum_keepdim(1)?.sqrt()?;
    let norm = norm.maximum(ns.eps)?;
    let dt = match ns.dtype {
        NsDtype::Float32 => DType::F32,
        NsDtype::Bfloat16 => DType::BF16,
    };
    if dt == DType::BF16 && x.device().is_cpu() && super::ns_bf16::available() {
        // candle's CPU bf16 matmul is slower than its f32 one: the AVX512-BF16 kernel instead.
        let (n, r, c) = x.dims3()?;
        let mut v: Vec<f32> = x.broadcast_div(&norm)?.flatten_all()?.to_vec1()?;
        // One matrix per thread where the batch has several (each product is also split over
        // threads, so a thread that runs out of matrices helps with the others).
        use rayon::prelude::*;
        v.par_chunks_mut((r * c).max(1))
            .for_each(|m| super::ns_bf16::newton_schulz(m, r, c, ns.coefficients, ns.steps));
        let out = Tensor::from_vec(v, (n, r, c), &Device::Cpu)?;
        return Ok(if tall { out.t()? } else { out });
    }
    let mut x = x.broadcast_div(&norm)?.to_dtype(dt)?;
    let (a, b, c) = ns.coefficients;
    for _ in 0..ns.steps {
        let gram = x.matmul(&x.t()?)?;
        let poly = (gram.affine(b, 0.0)? + gram.matmul(&gram)?.affine(c, 0.0)?)?;
        x = (x.affine(a, 0.0)? + poly.matmul(&x)?)?;
    }
    Ok(if tall { x.t()? } else { x })
}
