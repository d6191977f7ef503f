//! Checkpoints of the whole optimizer state, as safetensors.
//!
//! Every state tensor is stored under `<parameter name>/<slot>` (e.g.
//! `h.0.attn.c_attn.weight/exp_avg`) in its own dtype (f32; f64 for f64 parameters). The
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
use crate::error::{Error, Result};
use crate::optimizer::{NonFinitePolicy, Optim};
use crate::schedule::Schedule;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The safetensors metadata key.
pub const META_KEY: &str = "candle_optim";
/// The checkpoint format version written by this crate.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct State<A: Algorithm> {
    format_version: u32,
    algorithm: String,
    base: A,
    lr: f64,
    peak_lr: f64,
    steps: u64,
    schedule: Option<Schedule>,
    policy: NonFinitePolicy,
    max_grad_norm: Option<f64>,
    global: A::Global,
    groups: Vec<GroupState<A>>,
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct GroupState<A: Algorithm> {
    config: A,
    lr_scale: f64,
    step: u64,
    params: Vec<ParamState<A>>,
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
struct ParamState<A: Algorithm> {
    name: String,
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
        for g in &self.groups {
            let mut params = Vec::with_capacity(g.params.len());
            for p in &g.params {
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
                    for (slot, t) in g.config.slots().iter().zip(slots) {
                        let mut b = blob(t)?;
                        b.shape = t.dims().to_vec();
                        tensors.push((format!("{}/{}", p.name, slot.name), b));
                    }
                }
                params.push(ParamState::<A> {
                    name: p.name.clone(),
                    shape: p.var.dims().to_vec(),
                    dtype: dtype_name(p.var.dtype()),
                    step: p.t,
                    fresh: p.fresh,
                    has_state: p.slots.is_some(),
                    extra: p.extra.clone(),
                });
            }
            groups.push(GroupState::<A> {
                config: g.config.clone(),
                lr_scale: g.lr_scale,
                step: g.step,
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
            lr: self.lr,
            peak_lr: self.peak_lr,
            steps: self.steps,
            schedule: self.schedule.clone(),
            policy: self.policy,
            max_grad_norm: self.max_grad_norm,
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
    /// parameter names, shapes and dtypes. Everything is checked first: on any error (truncated
    /// or corrupt bytes, another algorithm, a different layout) nothing changes.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
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
        // Only the algorithm is read first, so another algorithm's checkpoint gets that error.
        let head: serde_json::Value = serde_json::from_str(state_json).map_err(corrupt)?;
        if head["format_version"].as_u64() != Some(FORMAT_VERSION as u64) {
            return Err(corrupt(format!(
                "format version {} (this crate reads {FORMAT_VERSION})",
                head["format_version"]
            )));
        }
        let found = head["algorithm"].as_str().unwrap_or("?");
        if found != A::NAME {
            return Err(Error::WrongAlgorithm {
                expected: A::NAME,
                found: found.to_string(),
            });
        }
        let state: State<A> = serde_json::from_str(state_json).map_err(corrupt)?;

        // Layout: the same groups with the same parameters, in order.
        if state.groups.len() != self.groups.len() {
            return Err(mismatch(format!(
                "{} parameter groups, this optimizer has {}",
                state.groups.len(),
                self.groups.len()
            )));
        }
        state.base.validate()?;
        if let Some(s) = &state.schedule {
            s.validate()?;
        }
        let mut new_slots: Vec<Vec<Option<Vec<Tensor>>>> = Vec::new();
        let mut used = 0usize;
        for (gi, (gs, g)) in state.groups.iter().zip(&self.groups).enumerate() {
            gs.config.validate()?;
            if gs.params.len() != g.params.len() {
                return Err(mismatch(format!(
                    "group {gi} has {} parameters, this optimizer's has {}",
                    gs.params.len(),
                    g.params.len()
                )));
            }
            let mut group_slots = Vec::with_capacity(g.params.len());
            for (ps, p) in gs.params.iter().zip(&g.params) {
                if ps.name != p.name {
                    return Err(mismatch(format!(
                        "group {gi}: checkpoint has parameter `{}` where this optimizer has `{}`",
                        ps.name, p.name
                    )));
                }
                if ps.shape != p.var.dims() || ps.dtype != dtype_name(p.var.dtype()) {
                    return Err(mismatch(format!(
                        "parameter `{}` is {:?} {} in the checkpoint, {:?} {} here",
                        p.name,
                        ps.shape,
                        ps.dtype,
                        p.var.dims(),
                        dtype_name(p.var.dtype())
                    )));
                }
                if !ps.has_state {
                    group_slots.push(None);
                    continue;
                }
                let want = if p.var.dtype() == DType::F64 {
                    Dtype::F64
                } else {
                    Dtype::F32
                };
                let mut slots = Vec::new();
                for slot in gs.config.slots() {
                    let key = format!("{}/{}", p.name, slot.name);
                    let view = st
                        .tensor(&key)
                        .map_err(|_| mismatch(format!("no state tensor `{key}`")))?;
                    if view.dtype() != want || view.shape() != p.var.dims() {
                        return Err(mismatch(format!(
                            "state tensor `{key}` is {:?} {:?}, expected {want:?} {:?}",
                            view.shape(),
                            view.dtype(),
                            p.var.dims()
                        )));
                    }
                    slots.push(crate::backend::cpu::place_state(
                        p.var.as_tensor(),
                        view.load(p.var.device())?,
                    )?);
                    used += 1;
                }
                group_slots.push(Some(slots));
            }
            new_slots.push(group_slots);
        }
        if used != names.len() {
            return Err(mismatch(format!(
                "{} state tensors in the checkpoint belong to no parameter",
                names.len() - used
            )));
        }
        if let Some(m) = state.max_grad_norm {
            if !(m > 0.0 && m.is_finite()) {
                return Err(Error::hyper("max_grad_norm", m, "must be finite and > 0"));
            }
        }

        // Everything checked: commit.
        for ((gs, g), slots) in state
            .groups
            .into_iter()
            .zip(&mut self.groups)
            .zip(new_slots)
        {
            g.config = gs.config;
            g.lr_scale = gs.lr_scale;
            g.step = gs.step;
            for ((ps, p), s) in gs.params.into_iter().zip(&mut g.params).zip(slots) {
                p.t = ps.step;
                p.fresh = ps.fresh;
                p.extra = ps.extra;
                p.slots = s;
            }
        }
        self.base = state.base;
        self.global = state.global;
        self.steps = state.steps;
        self.lr = state.lr;
        self.peak_lr = state.peak_lr;
        self.schedule = state.schedule;
        self.policy = state.policy;
        self.max_grad_norm = state.max_grad_norm;
        Ok(())
    }
}
