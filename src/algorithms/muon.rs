//! Muon (Keller Jordan et al.), exactly as `torch.optim.Muon` (torch 2.15, single-tensor path)
//! for matrices, with an auxiliary AdamW for every other parameter (as Keller Jordan's
//! `MuonWithAuxAdam`). Spec: ALGORITHMS.md §13.
//!
//! **Routing.** A group with `use_muon = true` (the default) gives every parameter of rank 2
//! the Muon step and every other parameter (biases, norm gains, scalars, convolution kernels)
//! the auxiliary AdamW step with `adamw_betas`, `adamw_eps` and the group's `lr` and
//! `weight_decay`: nothing is rejected, nothing panics. A group with `use_muon = false` gives
//! every parameter the AdamW step (embeddings and output heads, by name:
//! [`crate::OptimBuilder::adamw_for`]).
//!
//! The step of a matrix is: B ← lerp(B, g, 1−μ); U = lerp(g, B, μ) (nesterov) or B;
//! O = NS(U) ([`NewtonSchulz`], run by the backend); p ← p·(1 − lr·wd) − lr·r(shape)·O.

use crate::algorithm::{
    Algorithm, Kernel, Matrix, MatrixPart, MatrixRule, MatrixScalars, NewtonSchulz, NsDtype,
    ParamMeta, Slot,
};
use crate::algorithms::adamw::{AdamWConfig, AdamWKernel};
use crate::elem::{Elem, Real};
use crate::error::{check_nonneg, check_range, Error, Result};
use serde::{Deserialize, Serialize};

/// How the learning rate of a matrix of shape [A, B] is adjusted (`adjust_lr_fn`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustLr {
    /// lr · sqrt(max(1, A/B)) (torch's `None` and `"original"`).
    #[default]
    Original,
    /// lr · 0.2 · sqrt(max(A, B)): the update's RMS matches AdamW's.
    MatchRmsAdamw,
    /// lr · sqrt(A/B).
    SpectralUnclamped,
}

impl AdjustLr {
    /// The factor r(shape) for a matrix of `rows` × `cols`.
    pub fn ratio(self, rows: usize, cols: usize) -> f64 {
        let (a, b) = (rows as f64, cols as f64);
        match self {
            AdjustLr::Original => (a / b).max(1.0).sqrt(),
            AdjustLr::MatchRmsAdamw => 0.2 * a.max(b).sqrt(),
            AdjustLr::SpectralUnclamped => (a / b).sqrt(),
        }
    }
}

/// Muon hyperparameters (one parameter group). The Muon ones are torch's (names and defaults);
/// `ns_dtype`, `use_muon`, `adamw_betas` and `adamw_eps` are this crate's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MuonConfig {
    /// Learning rate (1e-3); the auxiliary AdamW uses it too.
    pub lr: f64,
    /// Decoupled weight decay p ← p·(1 − lr·wd), with the unadjusted lr, applied first (0.1).
    pub weight_decay: f64,
    /// μ of the EMA momentum buffer (0.95).
    pub momentum: f64,
    /// Orthogonalize lerp(g, B, μ) instead of B (true).
    pub nesterov: bool,
    /// Newton–Schulz coefficients (a, b, c) = (3.4445, −4.775, 2.0315).
    pub ns_coefficients: (f64, f64, f64),
    /// Floor of the Frobenius norm before Newton–Schulz (1e-7).
    pub eps: f64,
    /// Newton–Schulz iterations (5; must be < 100).
    pub ns_steps: usize,
    /// The learning-rate adjustment (`null` = `"original"`).
    pub adjust_lr_fn: Option<AdjustLr>,
    /// Newton–Schulz element type: `"float32"` (default) or `"bfloat16"` (torch's choice, the
    /// fast one on CUDA and on CPUs with AVX512-BF16).
    pub ns_dtype: NsDtype,
    /// Muon for the group's matrices (true); false: AdamW for every parameter of the group.
    pub use_muon: bool,
    /// (β1, β2) of the auxiliary AdamW ((0.9, 0.95), as `MuonWithAuxAdam`).
    pub adamw_betas: (f64, f64),
    /// eps of the auxiliary AdamW (1e-10, as `MuonWithAuxAdam`).
    pub adamw_eps: f64,
}

impl Default for MuonConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 0.1,
            momentum: 0.95,
            nesterov: true,
            ns_coefficients: (3.4445, -4.775, 2.0315),
            eps: 1e-7,
            ns_steps: 5,
            adjust_lr_fn: None,
            ns_dtype: NsDtype::Float32,
            use_muon: true,
            adamw_betas: (0.9, 0.95),
            adamw_eps: 1e-10,
        }
    }
}

impl MuonConfig {
    /// Whether a parameter of this shape takes the Muon step (else the auxiliary AdamW's).
    pub fn is_muon_param(&self, shape: &[usize]) -> bool {
        self.use_muon && shape.len() == 2
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            betas: self.adamw_betas,
            eps: self.adamw_eps,
            weight_decay: self.weight_decay,
            amsgrad: false,
            maximize: false,
        }
    }
}

// cuda-params
/// The scalars of Muon's element-wise passes as `kernels/muon.cu` reads them
/// (`kernels/params.cuh`, generated from this definition).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MuonParams {
    /// Momentum: B ← lerp(B, g·grad_scale, lerp_w), lerp_w = 1 − μ.
    pub(crate) lerp_w: f64,
    /// μ of the Nesterov blend U = lerp(g, B, μ) (when `nesterov` is 1).
    pub(crate) mu: f64,
    /// The factor every gradient is multiplied by.
    pub(crate) grad_scale: f64,
    /// 1 − lr·wd (the unadjusted lr).
    pub(crate) decay: f64,
    /// The adjusted learning rate.
    pub(crate) lr_adj: f64,
    /// 0: blend (slots B, U); 1: update (slot O; p ← p·decay − lr_adj·O); 2: nothing.
    pub(crate) pass: u32,
    /// 1: U = lerp(g, B, μ); 0: U = B.
    pub(crate) nesterov: u32,
}

/// Which element-wise pass a [`MuonKernel`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// B ← lerp(B, g, 1−μ); U = lerp(g, B, μ) or B.
    Blend,
    /// p ← p·decay − lr_adj·O.
    Update,
}

/// Muon's step scalars (f64) for one parameter.
#[derive(Clone, Copy, Debug)]
pub struct MuonKernel(Step);

#[derive(Clone, Copy, Debug)]
enum Step {
    Muon {
        pass: Pass,
        scalars: MatrixScalars,
        ns: NewtonSchulz,
    },
    AdamW(AdamWKernel),
}

impl Kernel for MuonKernel {
    const CUDA_MODULE: &'static str = "muon";
    type Execution = Matrix;

    type Params = MuonParams;

    /// The element-wise passes' scalars for `kernels/muon.cu` (the auxiliary AdamW runs
    /// AdamW's own kernel, so its variant has nothing to say here: pass 2, a no-op).
    fn params(&self) -> MuonParams {
        match self.0 {
            Step::Muon {
                pass, scalars: s, ..
            } => MuonParams {
                lerp_w: s.lerp_w,
                mu: s.nesterov.unwrap_or(0.0),
                grad_scale: s.grad_scale,
                decay: s.decay,
                lr_adj: s.lr_adj,
                pass: match pass {
                    Pass::Blend => 0,
                    Pass::Update => 1,
                },
                nesterov: s.nesterov.is_some() as u32,
            },
            Step::AdamW(_) => MuonParams {
                lerp_w: 0.0,
                mu: 0.0,
                grad_scale: 1.0,
                decay: 1.0,
                lr_adj: 0.0,
                pass: 2,
                nesterov: 0,
            },
        }
    }

    #[inline(always)]
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], s: &mut [&mut [P::Math]]) {
        let of = <P::Math as Real>::of;
        let (pass, c) = match self.0 {
            Step::Muon { pass, scalars, .. } => (pass, scalars),
            Step::AdamW(k) => return k.apply(p, g, s),
        };
        let n = p.len();
        match (pass, s) {
            (Pass::Blend, [b, u]) => {
                let (b, u, g) = (&mut b[..n], &mut u[..n], &g[..n]);
                let (w, gs) = (of(c.lerp_w), of(c.grad_scale));
                let w1 = <P::Math as Real>::ONE - w;
                let w_small = c.lerp_w < 0.5;
                match c.nesterov {
                    Some(mu) => {
                        let mu_small = mu < 0.5;
                        let mu = of(mu);
                        let mu1 = <P::Math as Real>::ONE - mu;
                        for i in 0..n {
                            let gi = g[i].load() * gs;
                            let bi = b[i].lerp(gi, w, w1, w_small);
                            b[i] = bi;
                            u[i] = gi.lerp(bi, mu, mu1, mu_small);
                        }
                    }
                    None => {
                        for i in 0..n {
                            let bi = b[i].lerp(g[i].load() * gs, w, w1, w_small);
                            b[i] = bi;
                            u[i] = bi;
                        }
                    }
                }
            }
            (Pass::Update, [o]) => {
                let o = &o[..n];
                let (decay, neg_lr) = (of(c.decay), of(-c.lr_adj));
                for i in 0..n {
                    p[i] = P::store(p[i].load() * decay + neg_lr * o[i]);
                }
            }
            _ => unreachable!("Muon's passes take 2 (blend) and 1 (update) slots"),
        }
    }
}

impl MatrixRule for MuonKernel {
    type Aux = AdamWKernel;

    fn part(&self) -> MatrixPart<Self, AdamWKernel> {
        match self.0 {
            Step::Muon { scalars, ns, .. } => MatrixPart::Orthogonalized {
                blend: MuonKernel(Step::Muon {
                    pass: Pass::Blend,
                    scalars,
                    ns,
                }),
                ns,
                update: MuonKernel(Step::Muon {
                    pass: Pass::Update,
                    scalars,
                    ns,
                }),
                scalars,
            },
            Step::AdamW(k) => MatrixPart::ElementWise(k),
        }
    }
}

const MOMENTUM: &[Slot] = &[Slot {
    name: "momentum_buffer",
    signed: true,
}];

impl Algorithm for MuonConfig {
    const NAME: &'static str = "muon";
    type Kernel = MuonKernel;
    type ParamExtra = ();
    type Global = ();

    fn validate(&self) -> Result<()> {
        check_nonneg("lr", self.lr)?;
        check_nonneg("momentum", self.momentum)?;
        check_nonneg("weight_decay", self.weight_decay)?;
        check_nonneg("eps", self.eps)?;
        if self.ns_steps >= 100 {
            return Err(Error::hyper(
                "ns_steps",
                self.ns_steps as f64,
                "must be < 100",
            ));
        }
        let (a, b, c) = self.ns_coefficients;
        for (name, v) in [
            ("ns_coefficients[0]", a),
            ("ns_coefficients[1]", b),
            ("ns_coefficients[2]", c),
        ] {
            if !v.is_finite() {
                return Err(Error::hyper(name, v, "must be finite"));
            }
        }
        check_range("adamw_betas[0]", self.adamw_betas.0, 0.0, 1.0)?;
        check_range("adamw_betas[1]", self.adamw_betas.1, 0.0, 1.0)?;
        check_nonneg("adamw_eps", self.adamw_eps)
    }
    crate::algorithm::lr_and_weight_decay!();

    /// The slots of a matrix under Muon: the momentum buffer.
    fn slots(&self) -> &'static [Slot] {
        if self.use_muon {
            MOMENTUM
        } else {
            self.adamw().slots()
        }
    }

    fn param_slots(&self, shape: &[usize]) -> &'static [Slot] {
        if self.is_muon_param(shape) {
            MOMENTUM
        } else {
            self.adamw().slots()
        }
    }

    /// A matrix: the two element-wise passes (p, g, B read; B, U written; then p, O read, p
    /// written) plus Newton–Schulz's input and output in f32; other parameters: AdamW's.
    fn traffic_bytes(&self, numel: usize, rank: usize, param_bytes: usize) -> usize {
        if self.use_muon && rank == 2 {
            numel * (param_bytes + 2 * 4 + 4) + numel * (2 * param_bytes + 4) + 2 * numel * 4
        } else {
            self.adamw().traffic_bytes(numel, rank, param_bytes)
        }
    }

    fn kernel(&self, meta: &ParamMeta<'_>, _: &(), _: &(), grad_scale: f64) -> MuonKernel {
        let dims = meta.shape.dims();
        if !self.is_muon_param(dims) {
            return MuonKernel(Step::AdamW(self.adamw().kernel(meta, &(), &(), grad_scale)));
        }
        let (rows, cols) = (dims[0], dims[1]);
        let ratio = self.adjust_lr_fn.unwrap_or_default().ratio(rows, cols);
        let scalars = MatrixScalars {
            lerp_w: 1.0 - self.momentum,
            nesterov: self.nesterov.then_some(self.momentum),
            grad_scale,
            decay: 1.0 - meta.lr * self.weight_decay,
            lr_adj: meta.lr * ratio,
        };
        let ns = NewtonSchulz {
            coefficients: self.ns_coefficients,
            steps: self.ns_steps,
            eps: self.eps,
            dtype: self.ns_dtype,
        };
        MuonKernel(Step::Muon {
            pass: Pass::Blend,
            scalars,
            ns,
        })
    }
}
