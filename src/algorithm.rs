//! The contract between the shared driver ([`crate::Optim`]) and one optimizer's math.
//!
//! An algorithm is its per-group configuration type: it validates itself, names its state slots,
//! computes its step scalars in f64 ([`Algorithm::kernel`]) and supplies the per-element rule
//! ([`Kernel::apply`]). Parameter groups, lazy state, counters, gradient checks, clipping,
//! schedules, checkpoints and the CPU/CUDA execution all live once in the driver and the
//! backend.
//!
//! A kernel declares its *execution strategy* ([`Kernel::Execution`]): how the backends run its
//! rule. The algorithm supplies only math; threads, SIMD dispatch and launches belong to the
//! backend, which implements [`Execution`] for each strategy:
//!
//! * [`ElementWise`]: every element independently ([`Kernel::apply`] over chunks);
//! * [`RowProjected`]: two passes with per-row reductions between them ([`RowRule`], AdamP).
//!
//! * [`Matrix`]: an element-wise pass, a matrix iteration over whole weights (Newton–Schulz),
//!   a second element-wise pass ([`MatrixRule`], Muon); the backend batches same-shape
//!   matrices of a group into one batched matmul per iteration.

use crate::elem::{Elem, Real};
use crate::error::Result;
use crate::reduce::{Collective, ReduceOp, Reducer};
use arrayvec::ArrayVec;
use candle_core::{Shape, Tensor};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt::Debug;

/// Most state tensors any algorithm keeps per parameter (Adan: m, n, d, q).
pub const MAX_SLOTS: usize = 4;

/// One state tensor kept per parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Its name in checkpoints and [`crate::ParamState`] (the reference implementation's).
    pub name: &'static str,
    /// Whether it can hold negative values: a quantized format needs the signed map for these
    /// and may use the unsigned one for the others (ALGORITHMS.md §12.3).
    pub signed: bool,
}

/// The state slices of one parameter (or of one chunk of it), in [`Algorithm::slots`] order.
pub type Slots<'a, F> = ArrayVec<&'a mut [F], MAX_SLOTS>;

/// What the driver knows about one parameter at the step being taken.
#[derive(Clone, Debug)]
pub struct ParamMeta<'a> {
    /// The parameter's name.
    pub name: &'a str,
    /// The parameter's shape.
    pub shape: &'a Shape,
    /// The learning rate in effect for this parameter at this step: the peak rate × the
    /// schedule's factor × its group's ratio to the base rate. Algorithms read the rate from
    /// here, never from their configuration's `lr` (which is the group's configured rate).
    pub lr: f64,
    /// How many updates this parameter has received, counting the current one (so 1 at its
    /// first update). It does not advance in steps where the parameter has no gradient.
    pub t: u64,
    /// The parameter group's step counter, counting the current step. It advances at every
    /// step taken, whether or not this parameter has a gradient (Adan's convention).
    pub group_step: u64,
    /// True when the parameter's state was created (or reset) for this step: its slots hold
    /// zeros that the algorithm has never written.
    pub fresh: bool,
}

/// A kernel's step scalars as its CUDA kernel reads them: a `#[repr(C)]` struct of `f64` and `u32`
/// fields (flags and small enums are `u32`), defined in the algorithm's module under a
/// `// cuda-params` line. The build script generates its C declaration (`kernels/params.cuh`,
/// where the kernel reads the fields by name) and this implementation, and asserts on both sides
/// that the two compilers lay it out alike and that it fits a launch table entry; see
/// `kernels/params_gen.rs`. Never implemented by hand.
pub trait KernelParams: Copy + Debug + Send + Sync + 'static {
    /// Its size in bytes.
    const SIZE: usize;
    /// Writes every field's bytes at its offset into `out` (at least [`Self::SIZE`] bytes long);
    /// padding bytes are left as they are.
    fn write_bytes(&self, out: &mut [u8]);
}

// The generated `KernelParams` implementations and layout asserts (kernels/params_gen.rs).
include!(concat!(env!("OUT_DIR"), "/params.rs"));

/// The per-element update rule with its step scalars. The scalars are f64 and are rounded to
/// the compute type once per chunk, outside the element loop. The same scalars drive the CUDA
/// kernel ([`Kernel::params`]), so the CPU and GPU paths share one definition.
pub trait Kernel: Copy + Send + Sync + Debug + Sized + 'static {
    /// The CUDA module (`kernels/<name>.cu`) whose entry points run this rule: the `module` of
    /// the algorithm's line in the table of algorithms (checked at compile time).
    const CUDA_MODULE: &'static str;

    /// How the backends run this rule: [`ElementWise`] or [`RowProjected`].
    type Execution: Execution<Self>;

    /// The step scalars as the CUDA kernel reads them.
    type Params: KernelParams;

    /// This step's scalars for the CUDA kernel.
    fn params(&self) -> Self::Params;

    /// Applies the update to one contiguous run of elements. `p`, `g` and every slot have the
    /// same length. Must be `#[inline(always)]` (with everything it calls): the backend
    /// compiles it into its loops once per SIMD level.
    fn apply<P: Elem>(&self, p: &mut [P], g: &[P], state: &mut [&mut [P::Math]]);
}

/// Which strategy a kernel runs under, for the backends' dispatch (CUDA launches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutionKind {
    /// See [`ElementWise`].
    ElementWise,
    /// See [`RowProjected`].
    RowProjected,
    /// See [`Matrix`].
    Matrix,
}

/// An execution strategy for kernels `K`. Implemented by the backend (`src/backend/`) for the
/// marker types [`ElementWise`] and [`RowProjected`]; algorithms only name one of them.
pub trait Execution<K: Kernel>: 'static {
    /// The strategy, for dispatch where no typed hook is needed (CUDA launches by name).
    const KIND: ExecutionKind;

    /// The element-wise rule the [`Matrix`] strategy delegates some parameters to (Muon's
    /// auxiliary AdamW); the kernel itself for the other strategies.
    type Aux: Kernel;

    /// Updates one whole tensor on the CPU in place.
    fn update_cpu<P: Elem>(k: &K, p: &mut [P], g: &[P], state: Slots<'_, P::Math>, shape: &Shape);

    /// [`Matrix`] only: what this parameter's step is ([`MatrixRule::part`]). `None` for every
    /// other strategy.
    fn matrix_part(k: &K) -> Option<MatrixPart<K, Self::Aux>> {
        let _ = k;
        None
    }
}

/// Strategy: each element is updated independently by [`Kernel::apply`]; the backend splits
/// tensors into chunks over threads (CPU) or blocks (CUDA, `<module>_<dtype>` entry points).
#[derive(Clone, Copy, Debug)]
pub struct ElementWise;

/// Strategy: tensors of rank ≥ 2 take two passes over rows (`shape[0]` rows), with per-row
/// reductions between them that decide a projection ([`RowRule`]); smaller tensors run
/// element-wise through [`Kernel::apply`].
#[derive(Clone, Copy, Debug)]
pub struct RowProjected;

/// Strategy: per parameter, either a matrix-level step (an element-wise pass, Newton–Schulz
/// over the whole matrix, an element-wise pass) or an element-wise step of an auxiliary rule
/// ([`MatrixRule`]).
#[derive(Clone, Copy, Debug)]
pub struct Matrix;

/// The element type Newton–Schulz runs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NsDtype {
    /// float32 matmuls (the default: exact enough on every device).
    #[default]
    Float32,
    /// bfloat16 matmul inputs, as `torch.optim.Muon`: the fast choice on CUDA and on CPUs with
    /// AVX512-BF16 (the crate's own kernel, with f32 sums; about twice the f32 speed). Other
    /// CPUs use candle's bf16 matmul, which is slower than its f32 one.
    Bfloat16,
}

/// One Newton–Schulz orthogonalization (ALGORITHMS.md §13): X = U / max(‖U‖_F, eps), on the
/// wide orientation (transposed when rows > cols, transposed back), then `steps` times
/// A = X Xᵀ, B = b·A + c·A², X = a·X + B X.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NewtonSchulz {
    /// (a, b, c).
    pub coefficients: (f64, f64, f64),
    /// Number of iterations.
    pub steps: usize,
    /// Floor of the Frobenius norm the input is divided by.
    pub eps: f64,
    /// The matmuls' element type.
    pub dtype: NsDtype,
}

/// The step scalars of a matrix-level step, for backends that run the element-wise passes as
/// tensor operations instead of [`Kernel::apply`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatrixScalars {
    /// Momentum: B ← lerp(B, g·grad_scale, lerp_w).
    pub lerp_w: f64,
    /// Nesterov blend U = lerp(g, B, μ) when `Some(μ)`, U = B when `None`.
    pub nesterov: Option<f64>,
    /// Factor every gradient is multiplied by.
    pub grad_scale: f64,
    /// p ← p·decay − lr_adj·O.
    pub decay: f64,
    /// The adjusted learning rate.
    pub lr_adj: f64,
}

/// What one parameter's step under [`Matrix`] is.
#[derive(Clone, Copy, Debug)]
pub enum MatrixPart<K, E> {
    /// The matrix-level step. `blend` runs element-wise over (p, g, slots `[B, U]`): it updates the
    /// state B and writes the Newton–Schulz input U (p unchanged); `update` runs over
    /// (p, g, slots `[O]`) with O the Newton–Schulz output and writes p (g unread).
    Orthogonalized {
        /// The first pass.
        blend: K,
        /// The orthogonalization of U.
        ns: NewtonSchulz,
        /// The second pass.
        update: K,
        /// The scalars of both passes.
        scalars: MatrixScalars,
    },
    /// An ordinary element-wise step of the auxiliary rule, over the parameter's own slots.
    ElementWise(E),
}

/// The math of a [`Matrix`] kernel: which step each parameter takes.
pub trait MatrixRule: Kernel {
    /// The auxiliary element-wise rule (Muon: AdamW).
    type Aux: Kernel;
    /// This parameter's step.
    fn part(&self) -> MatrixPart<Self, Self::Aux>;
}

/// Per-row sums of pass 1 of a [`RowProjected`] kernel, in f64: x·p, x·x, p·p, where x is the
/// gradient as pass 1 returns it.
pub type RowSums = [f64; 3];

/// The projection a [`RowRule`] decides on from the row sums.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Projection {
    /// Per row j: u ← u − p̂_j (p̂_j·u_j), p̂_j = p_j/(‖p_j‖ + eps).
    Channel,
    /// Whole tensor: u ← u − p̂ (p̂·u), p̂ = p/(‖p‖ + eps); `norm` is ‖p‖.
    Layer {
        /// ‖p‖ over the whole tensor.
        norm: f64,
    },
}

/// The math of a [`RowProjected`] kernel with two state slots (m, v). The backend runs pass 1
/// ([`RowRule::pass1`] per element, accumulating [`RowSums`] per row), asks
/// [`RowRule::decide`], and runs pass 2: u from [`RowRule::direction`], projected, then
/// [`RowRule::write`]. All per-element pieces must be `#[inline(always)]`.
pub trait RowRule: Kernel {
    /// The step scalars rounded once to the compute type.
    type Consts<F: Real>: Sync;
    /// Rounds the scalars.
    fn consts<F: Real>(&self) -> Self::Consts<F>;
    /// Whether pass 2 reads the gradient (the loops are compiled for each case).
    fn direction_reads_grad(&self) -> bool;
    /// Pass 1 at one element: updates the state from the gradient `g` and returns the gradient
    /// as the row sums see it.
    fn pass1<F: Real>(c: &Self::Consts<F>, g: F, m: &mut F, v: &mut F) -> F;
    /// The unprojected direction u at one element from the updated state; `g` is read only
    /// when `READS_GRAD`.
    fn direction<P: Elem, const READS_GRAD: bool>(
        c: &Self::Consts<P::Math>,
        m: P::Math,
        v: P::Math,
        g: &P,
    ) -> P::Math;
    /// The new parameter value from p, the weight-decay factor and the projected direction.
    fn write<F: Real>(c: &Self::Consts<F>, p: F, decay: F, u: F) -> F;
    /// The projection, if any, from the per-row sums of a tensor of `n` elements.
    fn decide(&self, sums: &[RowSums], row_len: usize, n: usize) -> Option<Projection>;
    /// The floor added to ‖p‖ in the projector p̂ = p/(‖p‖ + eps).
    fn projection_eps(&self) -> f64;
    /// The weight-decay factor, if decay applies (`projected`: a projection was decided).
    fn decay(&self, projected: bool) -> Option<f64>;
}

/// One parameter with a gradient in the current step, as seen by [`Algorithm::prepare`].
pub struct PrepareEntry<'a, A: Algorithm> {
    /// Index of the parameter's group.
    pub group: usize,
    /// The parameter's name.
    pub name: &'a str,
    /// The gradient (contiguous, validated against the parameter).
    pub grad: &'a Tensor,
    /// The parameter's algorithm-specific scalars; `prepare` may write them.
    pub extra: &'a mut A::ParamExtra,
    /// Whether the parameter has no state yet.
    pub fresh: bool,
}

/// Everything [`Algorithm::prepare`] may look at or change before the update pass.
pub struct StepContext<'a, 'b, A: Algorithm> {
    /// The configuration the optimizer was built with (optimizer-wide options live here).
    pub base: &'a A,
    /// Every group's configuration.
    pub groups: &'a [&'a A],
    /// The parameters that have a gradient this step, in group order.
    pub entries: &'a mut [PrepareEntry<'b, A>],
    /// Factor every gradient is multiplied by inside the fused pass (driver clipping already
    /// folded in). An algorithm with its own clipping (Adan) multiplies it further.
    pub grad_scale: f64,
    /// Gradient reductions on the parameters' device.
    pub reducer: &'a mut dyn Reducer,
    /// The other ranks of a sharded optimizer ([`crate::dist::Sharded`]), which hold the other
    /// parameters (or parts of them); `None` in a single process.
    pub collective: Option<&'a dyn Collective>,
}

impl<A: Algorithm> StepContext<'_, '_, A> {
    /// Combines `values` across the ranks of a sharded optimizer (nothing in a single process).
    /// An algorithm whose `prepare` reduces over all parameters calls it on every rank, every
    /// step it would in a single process, whether or not this rank holds any of them.
    pub fn reduce_across_ranks(&self, values: &mut [f64], op: ReduceOp) -> Result<()> {
        match self.collective {
            Some(c) => c.all_reduce_scalars(values, op),
            None => Ok(()),
        }
    }
}

/// Implements the [`Algorithm`] accessors of a configuration with `lr` and `weight_decay`
/// fields.
macro_rules! lr_and_weight_decay {
    () => {
        fn lr(&self) -> f64 {
            self.lr
        }
        fn set_lr(&mut self, lr: f64) {
            self.lr = lr;
        }
        fn weight_decay(&self) -> f64 {
            self.weight_decay
        }
        fn set_weight_decay(&mut self, wd: f64) {
            self.weight_decay = wd;
        }
    };
}
pub(crate) use lr_and_weight_decay;

/// One optimizer's math. Implemented by the optimizer's configuration type, which holds one
/// parameter group's hyperparameters with the official names and defaults.
pub trait Algorithm:
    Clone + Debug + Default + PartialEq + Send + Sync + Serialize + DeserializeOwned + 'static
{
    /// Short name, used in checkpoints and reports (`"adamw"`).
    const NAME: &'static str;
    /// The per-element rule with this step's scalars.
    type Kernel: Kernel;
    /// Scalars kept per parameter besides the slot tensors (SGD-SaI's g-SNR).
    type ParamExtra: Clone
        + Debug
        + Default
        + PartialEq
        + Send
        + Sync
        + Serialize
        + DeserializeOwned;
    /// Optimizer-wide state (SGD-SaI's warm-up flag and g-SNR maximum).
    type Global: Clone + Debug + Default + PartialEq + Send + Sync + Serialize + DeserializeOwned;

    /// Checks every hyperparameter; called for each group at construction and before each step.
    fn validate(&self) -> Result<()>;
    /// The learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate.
    fn set_lr(&mut self, lr: f64);
    /// The weight-decay coefficient.
    fn weight_decay(&self) -> f64;
    /// Sets the weight-decay coefficient.
    fn set_weight_decay(&mut self, wd: f64);
    /// Names of the state tensors kept per parameter under this configuration, in the order the
    /// kernel receives them. All have the parameter's shape.
    fn slots(&self) -> &'static [Slot];

    /// The state tensors of one parameter of shape `shape`: [`slots`](Self::slots) unless the
    /// algorithm routes parameters by shape (Muon: matrices keep a momentum buffer, the other
    /// parameters the auxiliary AdamW's two moments).
    fn param_slots(&self, shape: &[usize]) -> &'static [Slot] {
        let _ = shape;
        self.slots()
    }

    /// Bytes one step must move for a parameter of `numel` elements and rank `rank` whose
    /// elements take `param_bytes` each (state is f32): the floor of a fused step's memory
    /// traffic (ALGORITHMS.md §8). The default is one pass that reads p, g and every slot and
    /// writes p and every slot.
    fn traffic_bytes(&self, numel: usize, rank: usize, param_bytes: usize) -> usize {
        let _ = rank;
        numel * (3 * param_bytes + 2 * 4 * self.slots().len())
    }

    /// Whether `prepare` or the kernel needs each parameter whole (SGD-SaI's per-tensor
    /// g-SNR): a sharded optimizer ([`crate::dist::Sharded`]) then gives every rank whole
    /// tensors, as it does for every strategy other than [`ElementWise`], instead of flat
    /// ranges.
    const WHOLE_TENSORS: bool = false;

    /// Runs once per step, after the gradients were checked and before any parameter changes:
    /// the place for reductions over gradients (SGD-SaI's first-step g-SNR, Adan's global norm).
    /// At a step where every parameter has its state and [`prepare_reads_gradients`] is false,
    /// it must leave the scalars as they are: such a step may be decided on the device and taken
    /// back later, which restores the counters only.
    ///
    /// [`prepare_reads_gradients`]: Algorithm::prepare_reads_gradients
    fn prepare(global: &mut Self::Global, ctx: &mut StepContext<'_, '_, Self>) -> Result<()> {
        let _ = (global, ctx);
        Ok(())
    }

    /// Whether `prepare` needs a reduction over the gradients on the host at a step where every
    /// parameter already has its state (Adan's clipping): such steps are decided on the host,
    /// since `prepare` reads the result. (First steps always are: state is allocated then.)
    fn prepare_reads_gradients(&self) -> bool {
        false
    }

    /// The step scalars of one parameter, computed in f64.
    fn kernel(
        &self,
        meta: &ParamMeta<'_>,
        extra: &Self::ParamExtra,
        global: &Self::Global,
        grad_scale: f64,
    ) -> Self::Kernel;

    /// Checks per-parameter scalars read from a checkpoint: they must be what some run can
    /// produce (SGD-SaI: a g-SNR that is finite, ≥ 0 and an f32 value).
    fn check_extra(extra: &Self::ParamExtra) -> Result<()> {
        let _ = extra;
        Ok(())
    }

    /// Checks optimizer-wide scalars read from a checkpoint, like
    /// [`check_extra`](Self::check_extra).
    fn check_global(global: &Self::Global) -> Result<()> {
        let _ = global;
        Ok(())
    }

    /// Named per-parameter scalars for inspection and checkpoints.
    fn extra_scalars(extra: &Self::ParamExtra) -> Vec<(&'static str, f64)> {
        let _ = extra;
        Vec::new()
    }

    /// Named optimizer-wide scalars for inspection and checkpoints.
    fn global_scalars(global: &Self::Global) -> Vec<(&'static str, f64)> {
        let _ = global;
        Vec::new()
    }
}

#[cfg(test)]
#[path = "../kernels/params_gen.rs"]
mod params_gen;

#[cfg(test)]
mod params_tests {
    use super::params_gen::{c_header, parse, rust_impls, Ty};

    const SAMPLE: &str = "
// cuda-params
/// Doc.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SampleParams {
    /// A.
    pub(crate) a: f64,
    pub(crate) flag: u32,
    b: f64,
    pub(crate) last: u32,
}
";

    #[test]
    fn generator_output_for_a_sample_struct() {
        let s = parse(SAMPLE, "crate::sample", "src/sample.rs").unwrap();
        assert_eq!(s.len(), 1);
        let names: Vec<(&str, Ty)> = s[0].fields.iter().map(|(f, t)| (f.as_str(), *t)).collect();
        assert_eq!(
            names,
            [
                ("a", Ty::F64),
                ("flag", Ty::U32),
                ("b", Ty::F64),
                ("last", Ty::U32)
            ]
        );
        // C rules: `b` is aligned to 8 after the 4-byte flag; the size rounds up to 8.
        assert_eq!(s[0].layout(), (vec![0, 8, 16, 24], 32));
        let c = c_header(&s);
        assert!(c.contains(
            "struct SampleParams {\n  double a;\n  unsigned int flag;\n  double b;\n  unsigned int last;\n};\n"
        ));
        assert!(c.contains("static_assert(sizeof(SampleParams) == 32,"));
        assert!(c.contains("static_assert(offsetof(SampleParams, b) == 16,"));
        assert!(c.contains("static_assert(sizeof(SampleParams) <= CO_PARAM_BYTES,"));
        let r = rust_impls(&s, 128);
        assert!(r.contains("let Self { a, flag, b, last } = *self;"));
        assert!(r.contains("out[16..24].copy_from_slice(&f64::to_ne_bytes(b));"));
        assert!(r.contains("out[24..28].copy_from_slice(&u32::to_ne_bytes(last));"));
        assert!(r.contains("assert!(std::mem::size_of::<S>() == 32);"));
        assert!(r.contains("assert!(std::mem::offset_of!(S, flag) == 8);"));
        assert!(r.contains("assert!(std::mem::size_of::<S>() <= 128);"));
    }

    #[test]
    fn generator_rejects_what_it_cannot_mirror() {
        let bad = |from: &str, to: &str| parse(&SAMPLE.replace(from, to), "m", "f.rs");
        let e = bad("b: f64", "b: f32").unwrap_err();
        assert!(e.contains("SampleParams.b: type `f32`"), "{e}");
        assert!(bad("flag: u32", "flag: bool").is_err());
        assert!(bad("#[repr(C)]\n", "")
            .unwrap_err()
            .contains("must be #[repr(C)]"));
        assert!(bad("    b: f64,\n", "    #[serde(skip)]\n    b: f64,\n").is_err());
        assert!(bad("    b: f64,\n", "    b: f64, c: f64,\n").is_err());
        // Unmarked structs are not generated.
        assert!(bad("// cuda-params\n", "").unwrap().is_empty());
    }

    /// The committed header's sizes (what nvcc asserts) are rustc's.
    #[test]
    fn header_sizes_are_rusts() {
        let h = include_str!("../kernels/params.cuh");
        // One struct per algorithm of the table, and the reductions' two (their parameters and
        // the step's device verdict).
        assert_eq!(super::PARAM_SIZES.len(), crate::Algo::ALL.len() + 2);
        for &(name, size) in super::PARAM_SIZES {
            let want = format!("static_assert(sizeof({name}) == {size},");
            assert!(
                h.contains(&want),
                "{name}: kernels/params.cuh lacks `{want}`"
            );
            assert!(h.contains(&format!("struct {name} {{")));
        }
        assert_eq!(h.matches("\nstruct ").count(), super::PARAM_SIZES.len());
    }
}
