//! Checkpoints of the whole optimizer state, as safetensors.
//!
//! Every state tensor is stored under `<parameter name>/<slot>` (e.g.
//! `h.0.attn.c_attn.weight/exp_avg`) in its own dtype (f32, f64 for f64 parameters, or bf16);
//! 8-bit state as `<parameter name>/<slot>.codes` (u8, the parameter's shape) and
//! `<parameter name>/<slot>.absmax` (f32, one per block of 256), with each group's state format
//! in the metadata. The
//! safetensors metadata key `candle_optim` holds JSON with a CRC-32 and the rest of the state:
//! format version, algorithm, the base and every group's hyperparameters, step counters, the
//! per-parameter scalars (SGD-SaI's g-SNR) and optimizer-wide ones (its maximum), the schedule,
//! clipping and non-finite settings. The CRC covers that JSON and every tensor's name, dtype,
//! shape and bytes, so a file truncated or changed anywhere fails to load.
//!
//! Loading checks the algorithm, the group layout, every parameter name, shape and dtype and
//! every state tensor before it changes anything; state moves to each parameter's device and is
//! never cast to the parameter's dtype.

use crate::algorithm::Algorithm;
use crate::driver::{NonFinitePolicy, Optim};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::state::{ParamRounding, SlotFormat, StateFormat, StateTensor};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The safetensors metadata key.
pub const META_KEY: &str = "candle_optim";
/// The checkpoint format version written by this crate (2: one source for the learning rate,
/// parameters named by position marked as such; 3: state formats and parameter rounding).
/// Version 2 files still load (as f32 state with nearest rounding).
pub const FORMAT_VERSION: u32 = 3;

/// At most this many characters of a string read from a file appear in an error message.
const QUOTE_CHARS: usize = 64;

// Every field is required and no unknown field is accepted: a checkpoint that does not say
// everything this crate would write is damaged, not something to complete with defaults.
#[derive(Serialize, Deserialize)]
#[serde(bound = "", deny_unknown_fields)]
struct State<A: Algorithm> {
    format_version: u32,
    algorithm: String,
    base: A,
    peak_lr: f64,
    steps: u64,
    schedule: Option<Schedule>,
    policy: NonFinitePolicy,
    max_grad_norm: Option<f64>,
    rounding: ParamRounding,
    global: A::Global,
    groups: Vec<GroupState<A>>,
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "", deny_unknown_fields)]
struct GroupState<A: Algorithm> {
    config: A,
    lr_ratio: f64,
    state_format: StateFormat,
    step: u64,
    params: Vec<ParamState<A>>,
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "", deny_unknown_fields)]
struct ParamState<A: Algorithm> {
    name: String,
    positional: bool,
    shape: Vec<usize>,
    dtype: String,
    step: u64,
    fresh: bool,
    has_state: bool,
    extra: A::ParamExtra,
}

/// One tensor's bytes, ready for safetensors.
struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Blob {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

fn blob(t: &Tensor) -> Result<Blob> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    let (dtype, data) = match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            t.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            t.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            t.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::U8 => (Dtype::U8, t.to_vec1::<u8>()?),
        other => return Err(Error::Checkpoint(format!("state dtype {other:?}"))),
    };
    Ok(Blob {
        dtype,
        shape: Vec::new(),
        data,
    })
}

/// CRC-32 of the state JSON and every tensor (name, dtype, shape, bytes), in name order.
fn checksum<'a>(
    state: &str,
    tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>,
) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(state.as_bytes());
    for (name, dtype, shape, data) in tensors {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}").as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize()
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Checkpoint(what.to_string())
}

fn mismatch(what: impl std::fmt::Display) -> Error {
    Error::CheckpointMismatch(what.to_string())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash never leaves a half-written checkpoint under `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

impl<A: Algorithm> Optim<A> {
    /// The whole optimizer state as safetensors bytes (see the [module docs](self)).
    pub fn save_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Blob)> = Vec::new();
        let mut groups = Vec::with_capacity(self.groups.len());
        // The counters as the last step's verdict leaves them (a step decided on the device).
        let undone = self.undone();
        let mut flat = 0;
        for g in &self.groups {
            let mut params = Vec::with_capacity(g.params.len());
            for p in &g.params {
                let back = undone.is_some_and(|u| u.get(flat).copied().unwrap_or(false));
                flat += 1;
                if A::extra_scalars(&p.extra)
                    .iter()
                    .any(|(_, v)| !v.is_finite())
                {
                    return Err(corrupt(format!(
                        "parameter `{}` has a non-finite scalar, which cannot be saved",
                        p.name
                    )));
                }
                if let Some(slots) = &p.slots {
                    for (slot, st) in g.config.param_slots(p.var.dims()).iter().zip(slots) {
                        let key = format!("{}/{}", p.name, slot.name);
                        let parts: Vec<(String, &Tensor)> = match st {
                            StateTensor::Dense(t) => vec![(key, t)],
                            StateTensor::Blockwise8 { codes, absmax, .. } => vec![
                                (format!("{key}.codes"), codes),
                                (format!("{key}.absmax"), absmax),
                            ],
                        };
                        for (key, t) in parts {
                            let mut b = blob(t)?;
                            b.shape = t.dims().to_vec();
                            tensors.push((key, b));
                        }
                    }
                }
                params.push(ParamState::<A> {
                    name: p.name.clone(),
                    positional: p.positional,
                    shape: p.var.dims().to_vec(),
                    dtype: dtype_name(p.var.dtype()),
                    step: p.t - u64::from(back),
                    fresh: p.fresh,
                    has_state: p.slots.is_some(),
                    extra: p.extra.clone(),
                });
            }
            groups.push(GroupState::<A> {
                config: g.config.clone(),
                lr_ratio: g.lr_ratio,
                state_format: g.format,
                step: g.step - u64::from(undone.is_some()),
                params,
            });
        }
        if A::global_scalars(&self.global)
            .iter()
            .any(|(_, v)| !v.is_finite())
        {
            return Err(corrupt(
                "a non-finite optimizer-wide scalar cannot be saved",
            ));
        }
        let state = State::<A> {
            format_version: FORMAT_VERSION,
            algorithm: A::NAME.to_string(),
            base: self.base.clone(),
            peak_lr: self.peak_lr,
            steps: self.step_count(),
            schedule: self.schedule.clone(),
            policy: self.policy,
            max_grad_norm: self.max_grad_norm,
            rounding: self.rounding,
            global: self.global.clone(),
            groups,
        };
        let state = serde_json::to_string(&state).map_err(corrupt)?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        if tensors.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(corrupt("two state tensors would get the same name"));
        }
        let crc = checksum(
            &state,
            tensors
                .iter()
                .map(|(n, b)| (n.as_str(), b.dtype, b.shape.as_slice(), b.data.as_slice())),
        );
        let meta = serde_json::json!({ "crc32": crc, "state": state }).to_string();
        let info = HashMap::from([(META_KEY.to_string(), meta)]);
        safetensors::serialize(tensors.iter().map(|(n, b)| (n.as_str(), b)), Some(info))
            .map_err(corrupt)
    }

    /// Writes [`save_bytes`](Self::save_bytes) to `path` (atomically).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), &self.save_bytes()?)
    }

    /// Reads a checkpoint file (see [`load_bytes`](Self::load_bytes)).
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = std::fs::read(path)?;
        self.load_bytes(&bytes)
    }

    /// Restores a checkpoint of an optimizer of the same algorithm with the same groups and
    /// parameter names, shapes and dtypes. Everything is checked first, as construction checks
    /// it and more (counters, the algorithm's scalars, second moments ≥ 0): on any error
    /// (truncated or corrupt bytes, another algorithm, a different layout, values no run can
    /// produce) nothing changes.
    ///
    /// Parameters named by position (`param.<i>`, from [`Optim::new`] or
    /// `candle_nn::optim::Optimizer::new`) are matched by shape and dtype, never by position;
    /// if two of them in one group share both, the load fails with
    /// [`Error::AmbiguousCheckpoint`].
    ///
    /// Each group's state format must be this optimizer's ([`Error::StateFormatMismatch`]
    /// otherwise); [`load_bytes_converting`](Self::load_bytes_converting) converts instead.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_impl(bytes, false)
    }

    /// Like [`load_bytes`](Self::load_bytes), but state stored in another format than this
    /// optimizer's groups use is converted on load: decoded to f32 and encoded in this
    /// optimizer's format (8-bit state is requantized; converting to 8-bit or bf16 rounds).
    pub fn load_bytes_converting(&mut self, bytes: &[u8]) -> Result<()> {
        self.load_impl(bytes, true)
    }

    fn load_impl(&mut self, bytes: &[u8], convert: bool) -> Result<()> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| corrupt(format!("not a readable safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| corrupt(format!("not a readable safetensors file: {e}")))?;
        let meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| corrupt("no candle-optim metadata (not a checkpoint of this crate)"))?;
        let meta: serde_json::Value = serde_json::from_str(meta).map_err(corrupt)?;
        let (Some(crc), Some(state_json)) = (meta["crc32"].as_u64(), meta["state"].as_str()) else {
            return Err(corrupt("malformed candle-optim metadata"));
        };
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        let views: Vec<_> = names
            .iter()
            .map(|n| st.tensor(n).map_err(corrupt))
            .collect::<Result<_>>()?;
        let actual = checksum(
            state_json,
            names
                .iter()
                .zip(&views)
                .map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())),
        );
        if actual as u64 != crc {
            return Err(corrupt("checksum mismatch: the file is damaged"));
        }
        // Only the version and algorithm are read first, so another algorithm's checkpoint
        // gets that error.
        let mut head: serde_json::Value = serde_json::from_str(state_json).map_err(corrupt)?;
        if head["format_version"].as_u64() == Some(2) {
            // Version 2 had f32 state and nearest rounding only.
            head["format_version"] = FORMAT_VERSION.into();
            head["rounding"] = serde_json::json!("nearest");
            for g in head["groups"].as_array_mut().into_iter().flatten() {
                g["state_format"] = serde_json::json!("f32");
            }
        }
        if head["format_version"].as_u64() != Some(FORMAT_VERSION as u64) {
            return Err(corrupt(format!(
                "format version {} (this crate reads {FORMAT_VERSION})",
                quote(&head["format_version"].to_string())
            )));
        }
        let found = head["algorithm"].as_str().unwrap_or("?");
        if found != A::NAME {
            return Err(Error::WrongAlgorithm {
                expected: A::NAME,
                found: quote(found),
            });
        }
        check_fields::<A>(&head)?;
        let state: State<A> = serde_json::from_value(head).map_err(corrupt)?;
        check_state(&state)?;

        // Layout: the same groups with the same parameters.
        if state.groups.len() != self.groups.len() {
            return Err(mismatch(format!(
                "{} parameter groups, this optimizer has {}",
                state.groups.len(),
                self.groups.len()
            )));
        }
        let mut ratios = Vec::with_capacity(state.groups.len());
        // For each group: for each of this optimizer's parameters, the index of its entry in
        // the checkpoint's group, and its state.
        let mut order: Vec<Vec<usize>> = Vec::with_capacity(self.groups.len());
        let mut new_slots: Vec<Vec<Option<Vec<StateTensor>>>> = Vec::new();
        let mut used = 0usize;
        for (gi, (gs, g)) in state.groups.iter().zip(&self.groups).enumerate() {
            let ratio = crate::driver::lr_ratio(state.base.lr(), gs.config.lr(), gs.lr_ratio)?;
            if ratio.to_bits() != gs.lr_ratio.to_bits() {
                return Err(corrupt(format!(
                    "group {gi}: learning-rate ratio {} does not follow from its rate",
                    gs.lr_ratio
                )));
            }
            ratios.push(ratio);
            if gs.state_format != g.format && !convert {
                return Err(Error::StateFormatMismatch {
                    group: gi,
                    checkpoint: gs.state_format.to_string(),
                    optimizer: g.format.to_string(),
                });
            }
            if gs.params.len() != g.params.len() {
                return Err(mismatch(format!(
                    "group {gi} has {} parameters, this optimizer's has {}",
                    gs.params.len(),
                    g.params.len()
                )));
            }
            let idx = match_params(gi, &gs.params, &g.params)?;
            let mut group_slots = Vec::with_capacity(g.params.len());
            for (&k, p) in idx.iter().zip(&g.params) {
                let ps = &gs.params[k];
                if ps.shape != p.var.dims() || ps.dtype != dtype_name(p.var.dtype()) {
                    return Err(mismatch(format!(
                        "parameter `{}` is {:?} {} in the checkpoint, {:?} {} here",
                        p.name,
                        ps.shape,
                        quote(&ps.dtype),
                        p.var.dims(),
                        dtype_name(p.var.dtype())
                    )));
                }
                if !ps.has_state {
                    group_slots.push(None);
                    continue;
                }
                let full = if p.var.dtype() == DType::F64 {
                    Dtype::F64
                } else {
                    Dtype::F32
                };
                let numel = p.var.elem_count();
                let stored = gs.state_format.resolve(p.format_numel);
                let target = g.format.resolve(p.format_numel);
                let mut slots = Vec::new();
                for slot in gs.config.param_slots(p.var.dims()) {
                    let key = format!("{}/{}", ps.name, slot.name);
                    let load = |key: &str, want: Dtype, shape: &[usize]| -> Result<Tensor> {
                        let view = st
                            .tensor(key)
                            .map_err(|_| mismatch(format!("no state tensor `{}`", quote(key))))?;
                        if view.dtype() != want || view.shape() != shape {
                            return Err(mismatch(format!(
                                "state tensor `{}` is {:?} {:?}, expected {want:?} {shape:?}",
                                quote(key),
                                view.dtype(),
                                view.shape(),
                            )));
                        }
                        Ok(view.load(&Device::Cpu)?)
                    };
                    let loaded = match stored {
                        SlotFormat::Full | SlotFormat::Bf16 => {
                            let want = if stored == SlotFormat::Bf16 {
                                Dtype::BF16
                            } else {
                                full
                            };
                            let t = load(&key, want, p.var.dims())?;
                            if !slot.signed {
                                check_nonnegative(&key, &t)?;
                            }
                            used += 1;
                            StateTensor::Dense(t)
                        }
                        SlotFormat::Blockwise8 => {
                            let codes = load(&format!("{key}.codes"), Dtype::U8, p.var.dims())?;
                            let absmax = load(
                                &format!("{key}.absmax"),
                                Dtype::F32,
                                &[numel.div_ceil(crate::state::BLOCK)],
                            )?;
                            check_absmax(&key, &absmax)?;
                            used += 2;
                            StateTensor::Blockwise8 {
                                codes,
                                absmax,
                                signed: slot.signed,
                            }
                        }
                    };
                    let loaded = if stored == target {
                        loaded
                    } else {
                        let values = loaded.to_f32()?;
                        let values = if full == Dtype::F64 {
                            values.to_dtype(DType::F64)?
                        } else {
                            values
                        };
                        StateTensor::encode(&values, target, slot.signed)?
                    };
                    let param = p.var.as_tensor();
                    slots.push(match loaded {
                        StateTensor::Dense(t) => StateTensor::Dense(
                            crate::backend::cpu::place_state(param, t.to_device(param.device())?)?,
                        ),
                        StateTensor::Blockwise8 {
                            codes,
                            absmax,
                            signed,
                        } => StateTensor::Blockwise8 {
                            codes: crate::backend::cpu::place_state(
                                param,
                                codes.to_device(param.device())?,
                            )?,
                            absmax: absmax.to_device(param.device())?,
                            signed,
                        },
                    });
                }
                group_slots.push(Some(slots));
            }
            order.push(idx);
            new_slots.push(group_slots);
        }
        if used != names.len() {
            return Err(mismatch(format!(
                "{} state tensors in the checkpoint belong to no parameter",
                names.len() - used
            )));
        }

        // Everything checked: commit. (A pending device verdict is superseded.)
        self.pending = None;
        for ((((gs, g), slots), idx), ratio) in state
            .groups
            .into_iter()
            .zip(&mut self.groups)
            .zip(new_slots)
            .zip(order)
            .zip(ratios)
        {
            g.config = gs.config;
            g.lr_ratio = ratio;
            g.step = gs.step;
            let mut entries: Vec<Option<ParamState<A>>> = gs.params.into_iter().map(Some).collect();
            for ((p, s), k) in g.params.iter_mut().zip(slots).zip(idx) {
                let ps = entries[k]
                    .take()
                    .expect("each checkpoint entry is matched once");
                p.t = ps.step;
                p.fresh = ps.fresh;
                p.extra = ps.extra;
                p.slots = s;
            }
        }
        self.base = state.base;
        self.global = state.global;
        self.steps = state.steps;
        self.peak_lr = state.peak_lr;
        self.schedule = state.schedule;
        self.policy = state.policy;
        self.max_grad_norm = state.max_grad_norm;
        self.rounding = state.rounding;
        Ok(())
    }
}

/// At most [`QUOTE_CHARS`] characters of `s` (a string read from a file), for error messages.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// `value` has exactly the keys `template` (a default value serialized) has, recursively
/// through objects: no missing field silently defaulted, no unknown field ignored.
pub(crate) fn check_keys(
    what: &str,
    value: &serde_json::Value,
    template: &serde_json::Value,
) -> Result<()> {
    use serde_json::Value;
    let (Value::Object(v), Value::Object(t)) = (value, template) else {
        return Ok(()); // not an object: its type is checked when it is deserialized
    };
    if let Some(k) = t.keys().find(|k| !v.contains_key(*k)) {
        return Err(corrupt(format!("{what}: field `{k}` is missing")));
    }
    if let Some(k) = v.keys().find(|k| !t.contains_key(*k)) {
        return Err(corrupt(format!("{what}: unknown field `{}`", quote(k))));
    }
    for (k, tv) in t {
        check_keys(&format!("{what}.{k}"), &v[k], tv)?;
    }
    Ok(())
}

/// The algorithm's own parts of the state JSON (configurations, per-parameter and global
/// scalars) carry exactly their fields. The driver's parts are checked by serde
/// (`deny_unknown_fields`, no defaults).
fn check_fields<A: Algorithm>(state: &serde_json::Value) -> Result<()> {
    let to = |v: serde_json::Result<serde_json::Value>| v.map_err(corrupt);
    let config = to(serde_json::to_value(A::default()))?;
    let extra = to(serde_json::to_value(A::ParamExtra::default()))?;
    let global = to(serde_json::to_value(A::Global::default()))?;
    check_keys("base", &state["base"], &config)?;
    check_keys("global", &state["global"], &global)?;
    for (gi, g) in state["groups"].as_array().into_iter().flatten().enumerate() {
        check_keys(&format!("group {gi}"), &g["config"], &config)?;
        for p in g["params"].as_array().into_iter().flatten() {
            check_keys(&format!("group {gi} parameter"), &p["extra"], &extra)?;
        }
    }
    Ok(())
}

/// Everything construction checks, plus the invariants a run keeps: counters that can still
/// advance and agree with each other, and the algorithm's scalars in the range a run produces.
fn check_state<A: Algorithm>(state: &State<A>) -> Result<()> {
    state.base.validate()?;
    crate::error::check_nonneg("lr", state.peak_lr)?;
    if let Some(s) = &state.schedule {
        s.validate()?;
    }
    if let Some(m) = state.max_grad_norm {
        if !(m > 0.0 && m.is_finite()) {
            return Err(Error::hyper("max_grad_norm", m, "must be finite and > 0"));
        }
    }
    if state.steps == u64::MAX {
        return Err(corrupt("the step counter is at its maximum"));
    }
    A::check_global(&state.global)?;
    for (gi, g) in state.groups.iter().enumerate() {
        g.config.validate()?;
        if g.step > state.steps {
            return Err(corrupt(format!(
                "group {gi} counts {} steps, the optimizer {}",
                g.step, state.steps
            )));
        }
        for p in &g.params {
            let name = quote(&p.name);
            if p.step > g.step {
                return Err(corrupt(format!(
                    "parameter `{name}` counts {} updates in a group of {} steps",
                    p.step, g.step
                )));
            }
            if p.fresh != (p.step == 0) || (!p.has_state && p.step > 0) {
                return Err(corrupt(format!(
                    "parameter `{name}`: inconsistent state flags"
                )));
            }
            A::check_extra(&p.extra).map_err(|e| corrupt(format!("parameter `{name}`: {e}")))?;
        }
    }
    Ok(())
}

/// For each of `ours`, the index of its entry in `theirs` (a checkpoint's group): by name, or
/// for parameters named by position by shape and dtype, refusing where that is ambiguous.
fn match_params<A: Algorithm>(
    gi: usize,
    theirs: &[ParamState<A>],
    ours: &[crate::driver::Param<A>],
) -> Result<Vec<usize>> {
    let key = |shape: &[usize], dtype: &str| (shape.to_vec(), dtype.to_string());
    let mut out = Vec::with_capacity(ours.len());
    let mut taken = vec![false; theirs.len()];
    for p in ours {
        let k = if p.positional {
            let want = key(p.var.dims(), &dtype_name(p.var.dtype()));
            let same = |s: &[usize], d: &str| key(s, d) == want;
            let ours_alike = ours
                .iter()
                .filter(|q| q.positional && same(q.var.dims(), &dtype_name(q.var.dtype())))
                .count();
            let cands: Vec<usize> = (0..theirs.len())
                .filter(|&i| theirs[i].positional && same(&theirs[i].shape, &theirs[i].dtype))
                .collect();
            if ours_alike > 1 || cands.len() > 1 {
                return Err(Error::AmbiguousCheckpoint(format!(
                    "group {gi}: parameters named by position with shape {:?} {} cannot be told \
                     apart; build the optimizer from named parameters (from_varmap, named_vars)",
                    p.var.dims(),
                    dtype_name(p.var.dtype())
                )));
            }
            cands.first().copied()
        } else {
            theirs
                .iter()
                .position(|t| !t.positional && t.name == p.name)
        };
        let Some(k) = k.filter(|&k| !taken[k]) else {
            return Err(mismatch(format!(
                "group {gi}: this optimizer's parameter `{}` is not in the checkpoint",
                p.name
            )));
        };
        taken[k] = true;
        out.push(k);
    }
    Ok(out)
}

/// Fails unless every absmax of 8-bit state read from a file is finite and ≥ 0.
fn check_absmax(key: &str, t: &Tensor) -> Result<()> {
    let bad = t
        .to_vec1::<f32>()?
        .into_iter()
        .any(|x| !(x >= 0.0 && x.is_finite()));
    if bad {
        return Err(corrupt(format!(
            "8-bit state `{}` has a negative or non-finite absmax",
            quote(key)
        )));
    }
    Ok(())
}

/// Fails unless every element of `t` (a state tensor read from a file) is ≥ 0: a slot that
/// cannot go negative (a second moment) would make the next step's square root NaN.
fn check_nonnegative(key: &str, t: &Tensor) -> Result<()> {
    let t = t.flatten_all()?.to_dtype(DType::F64)?;
    let bad = t
        .to_vec1::<f64>()?
        .into_iter()
        .any(|x| x < 0.0 || x.is_nan());
    if bad {
        return Err(corrupt(format!(
            "state tensor `{}` holds a negative or NaN value",
            quote(key)
        )));
    }
    Ok(())
}
