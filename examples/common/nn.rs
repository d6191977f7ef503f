//! Transformer layers on candle-nn, shared by the GPT-2 and ViT examples.
//!
//! candle-nn 0.11's `LayerNorm` module and `ops::softmax_last_dim` run fused kernels that have
//! no backward pass (gradients silently stop there), so the layers here use the composed,
//! differentiable `ops::layer_norm_slow`, and fused softmax and cross-entropy custom ops with
//! backward passes of their own on the CPU (the composed forms elsewhere).

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, D};
use candle_nn::{linear, Init, Linear, Module, VarBuilder};
use rayon::prelude::*;

/// `t` in f32: the layers compute in f32 whatever dtype their weights are stored in (bf16
/// weights without an f32 master copy); a no-op for f32.
pub fn f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// candle-nn's linear layer, its weights widened to f32 where they are used.
pub struct Lin(Linear);

impl Lin {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self(linear(in_dim, out_dim, vb)?))
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.0.bias().map(f32).transpose()?;
        Linear::new(f32(self.0.weight())?, b).forward(x)
    }
}

/// Layer normalisation over the last dimension, with gain `weight` and bias `bias`.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps: 1e-5,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &f32(&self.weight)?, &f32(&self.bias)?, self.eps)
    }
}

/// Multi-head self-attention with one fused q/k/v projection (GPT-2's `c_attn`, `c_proj`).
pub struct Attention {
    c_attn: Lin,
    c_proj: Lin,
    n_head: usize,
}

impl Attention {
    pub fn new(dim: usize, n_head: usize, vb: VarBuilder) -> Result<Self> {
        if !dim.is_multiple_of(n_head) {
            candle_core::bail!("width {dim} is not a multiple of the {n_head} heads");
        }
        Ok(Self {
            c_attn: Lin::new(dim, 3 * dim, vb.pp("c_attn"))?,
            c_proj: Lin::new(dim, dim, vb.pp("c_proj"))?,
            n_head,
        })
    }

    /// `x`: `[b, t, c]`; `mask`: an additive `[t, t]` mask (0 or -inf), or none.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let hd = c / self.n_head;
        let qkv = self
            .c_attn
            .forward(x)?
            .reshape((b, t, 3, self.n_head, hd))?
            .permute((2, 0, 3, 1, 4))?; // [3, b, h, t, hd]
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.c_proj.forward(&y)
    }
}

/// The causal mask: 0 on and below the diagonal, -inf above.
pub fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (t, t), dev)
}

/// The feed-forward part: `c_fc` to `hidden`, GELU (tanh form, as GPT-2), `c_proj` back.
pub struct Mlp {
    c_fc: Lin,
    c_proj: Lin,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            c_fc: Lin::new(dim, hidden, vb.pp("c_fc"))?,
            c_proj: Lin::new(hidden, dim, vb.pp("c_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.c_proj.forward(&self.c_fc.forward(x)?.gelu()?)
    }
}

/// A pre-LayerNorm transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
pub struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub fn new(dim: usize, n_head: usize, mlp_ratio: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::new(dim, vb.pp("ln_1"))?,
            attn: Attention::new(dim, n_head, vb.pp("attn"))?,
            ln_2: LayerNorm::new(dim, vb.pp("ln_2"))?,
            mlp: Mlp::new(dim, mlp_ratio * dim, vb.pp("mlp"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, mask)?)?;
        &x + self.mlp.forward(&self.ln_2.forward(&x)?)?
    }
}

/// GPT-2's initialisation by name: every weight matrix and embedding N(0, 0.02²), the
/// projections back into the residual stream (`c_proj`) N(0, (0.02/√(2·layers))²), biases 0,
/// LayerNorm gains 1.
pub fn gpt2_init(n_layer: usize) -> impl Fn(&str, &[usize]) -> super::Init {
    move |name: &str, shape: &[usize]| {
        let last = name.rsplit('.').next().unwrap_or(name);
        if shape.len() <= 1 {
            if last == "bias" {
                super::Init::Const(0.0)
            } else {
                super::Init::Const(1.0)
            }
        } else if name.ends_with("c_proj.weight") {
            super::Init::Normal(0.02 / (2.0 * n_layer as f64).sqrt())
        } else {
            super::Init::Normal(0.02)
        }
    }
}

/// Mean cross-entropy of `logits: [n, v]` (f32) against `targets: [n]` (u32). On the CPU one
/// fused, multi-threaded pass forward and one backward (candle-nn's composed
/// `log_softmax` + `nll` makes about fifteen passes over the `[n, v]` logits, which dominate a
/// small language model's step); elsewhere candle-nn's `loss::cross_entropy`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && targets.dtype() == DType::U32 {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, FusedCrossEntropy)
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

struct FusedCrossEntropy;

/// The f32 rows of `logits` and the u32 `targets`, checked.
fn ce_inputs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(&'a [f32], &'a [u32], usize)> {
    let (n, v) = l1.shape().dims2()?;
    let (CpuStorage::F32(x), CpuStorage::U32(t)) = (s1, s2) else {
        candle_core::bail!("cross_entropy: f32 logits and u32 targets expected");
    };
    let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("cross_entropy: contiguous inputs expected");
    };
    let (x, t) = (&x[a..b], &t[c..d]);
    if t.len() != n {
        candle_core::bail!("cross_entropy: {} targets for {n} rows", t.len());
    }
    if let Some(bad) = t.iter().find(|&&k| k as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} out of range for {v} classes");
    }
    Ok((x, t, v))
}

/// The maximum of a row and the sum of `exp(x - max)`.
fn max_and_sum(row: &[f32]) -> (f32, f32) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (m, row.iter().map(|&x| (x - m).exp()).sum())
}

impl CustomOp2 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, t, v) = ce_inputs(s1, l1, s2, l2)?;
        let total: f64 = x
            .par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &k)| {
                let (m, s) = max_and_sum(row);
                (m + s.ln() - row[k as usize]) as f64
            })
            .sum();
        let loss = (total / t.len().max(1) as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = logits.dim(0)?.max(1);
        let scale = grad_res.to_scalar::<f32>()? / n as f32;
        let grad = logits.apply_op2_no_bwd(targets, &CrossEntropyGrad { scale })?;
        Ok((Some(grad), None))
    }
}

/// `scale · (softmax(logits) − onehot(targets))`.
struct CrossEntropyGrad {
    scale: f32,
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, t, v) = ce_inputs(s1, l1, s2, l2)?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(t.par_iter())
            .for_each(|((o, row), &k)| {
                let (m, s) = max_and_sum(row);
                let f = self.scale / s;
                for (oi, &xi) in o.iter_mut().zip(row) {
                    *oi = (xi - m).exp() * f;
                }
                o[k as usize] -= self.scale;
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension: on the CPU one fused pass forward and one backward (the
/// composed `ops::softmax` makes about five forward and ten backward passes); elsewhere
/// candle-nn's `ops::softmax`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(FusedSoftmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct FusedSoftmax;

fn f32_contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(x) = s else {
        candle_core::bail!("{what}: f32 expected");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input expected");
    };
    Ok(&x[a..b])
}

impl candle_core::CustomOp1 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s, l, "softmax")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, row)| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (oi, &xi) in o.iter_mut().zip(row) {
                    *oi = (xi - m).exp();
                    sum += *oi;
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `y · (g − Σ g·y)` row by row, from the softmax output `y` and the incoming gradient `g`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_contiguous(s1, l1, "softmax grad")?;
        let g = f32_contiguous(s2, l2, "softmax grad")?;
        if y.len() != g.len() {
            candle_core::bail!("softmax grad: shapes differ");
        }
        let d = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (yr, gr))| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((oi, &yi), &gi) in o.iter_mut().zip(yr).zip(gr) {
                    *oi = yi * (gi - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
