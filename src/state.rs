//! How optimizer state is stored: f32 (the default), bf16, or 8-bit blockwise codes exactly as
//! bitsandbytes 0.50.2 stores them on the CPU (ALGORITHMS.md §12), and the rounding of bf16
//! parameters (nearest-even, or stochastic without an f32 master copy).
//!
//! The update math never changes with the format: the backend decodes a block of state into
//! the compute type, runs the algorithm's own rule on it, and encodes it again, in one pass.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Elements per quantization block (bitsandbytes' blocksize, fixed for every 8-bit optimizer).
pub const BLOCK: usize = 256;

/// bitsandbytes' default `min_8bit_size`: smaller tensors keep f32 state.
pub const DEFAULT_MIN_8BIT_SIZE: usize = 4096;

/// How a parameter group keeps its optimizer state.
///
/// | format | bytes per state slot and element |
/// |---|---|
/// | [`F32`](Self::F32) | 4 (8 for f64 parameters) |
/// | [`Bf16`](Self::Bf16) | 2 |
/// | [`Blockwise8`](Self::Blockwise8) | 1 + 4/256 (an f32 absmax per block of 256), f32 below `min_8bit_size` |
///
/// The math is the same in every format (f32, f64 for f64 parameters); only what is kept
/// between steps is rounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateFormat {
    /// Full precision (the default): f32, f64 for f64 parameters.
    #[default]
    F32,
    /// bfloat16, rounded to nearest-even after every step.
    Bf16,
    /// 8-bit codes in blocks of 256 with an f32 absmax per block, bitsandbytes' dynamic maps
    /// (signed for slots that can be negative, unsigned for the others) and its CPU quantizer,
    /// bit for bit. Tensors with fewer than `min_8bit_size` elements keep f32 state. The codes
    /// cannot hold NaN or infinity: under [`crate::NonFinitePolicy::Propagate`] a non-finite
    /// state value is stored as some finite code (the parameter still receives it in that
    /// step); the default policy never lets one reach the state.
    Blockwise8 {
        /// The smallest tensor (in elements) whose state is 8-bit (bitsandbytes' default 4096).
        min_8bit_size: usize,
    },
}

impl StateFormat {
    /// [`Blockwise8`](Self::Blockwise8) with bitsandbytes' default threshold (4096).
    pub const fn blockwise8() -> Self {
        StateFormat::Blockwise8 {
            min_8bit_size: DEFAULT_MIN_8BIT_SIZE,
        }
    }

    /// The format's name: `"f32"`, `"bf16"` or `"blockwise8"`.
    pub fn name(&self) -> &'static str {
        match self {
            StateFormat::F32 => "f32",
            StateFormat::Bf16 => "bf16",
            StateFormat::Blockwise8 { .. } => "blockwise8",
        }
    }

    /// The format called `name` (see [`name`](Self::name)); `min_8bit_size` applies to
    /// `blockwise8` (default 4096) and must not be given for the others.
    pub fn from_name(name: &str, min_8bit_size: Option<usize>) -> Result<Self> {
        let n = name.to_ascii_lowercase();
        let f = match n.as_str() {
            "f32" | "fp32" | "float32" => StateFormat::F32,
            "bf16" | "bfloat16" => StateFormat::Bf16,
            "blockwise8" | "8bit" | "int8" => {
                return Ok(StateFormat::Blockwise8 {
                    min_8bit_size: min_8bit_size.unwrap_or(DEFAULT_MIN_8BIT_SIZE),
                })
            }
            _ => {
                let shown: String = name.chars().take(32).collect();
                return Err(Error::Unsupported(format!(
                    "unknown state format `{shown}` (known: f32, bf16, blockwise8)"
                )));
            }
        };
        match min_8bit_size {
            Some(_) => Err(Error::Unsupported(format!(
                "min_8bit_size applies to the blockwise8 state format, not {}",
                f.name()
            ))),
            None => Ok(f),
        }
    }

    /// How a tensor of `numel` elements keeps its state under this format.
    pub(crate) fn resolve(&self, numel: usize) -> SlotFormat {
        match *self {
            StateFormat::F32 => SlotFormat::Full,
            StateFormat::Bf16 => SlotFormat::Bf16,
            StateFormat::Blockwise8 { min_8bit_size } if numel >= min_8bit_size => {
                SlotFormat::Blockwise8
            }
            StateFormat::Blockwise8 { .. } => SlotFormat::Full,
        }
    }

    /// State bytes per element of one slot of a tensor of `numel` elements whose full-precision
    /// state takes `full` bytes per element.
    pub fn slot_bytes(&self, numel: usize, full: usize) -> usize {
        match self.resolve(numel) {
            SlotFormat::Full => numel * full,
            SlotFormat::Bf16 => numel * 2,
            SlotFormat::Blockwise8 => numel + 4 * numel.div_ceil(BLOCK),
        }
    }
}

impl std::fmt::Display for StateFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateFormat::Blockwise8 { min_8bit_size } => {
                write!(f, "blockwise8 (min_8bit_size {min_8bit_size})")
            }
            other => f.write_str(other.name()),
        }
    }
}

/// The storage of one tensor's state slots, resolved from a [`StateFormat`] and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotFormat {
    /// The compute type (f32; f64 for f64 parameters).
    Full,
    /// bf16.
    Bf16,
    /// 8-bit codes + f32 absmax per block.
    Blockwise8,
}

/// One state slot of one parameter, as stored. The tensors are the optimizer's own: they show
/// later steps too and must not be handed back as gradients.
#[derive(Clone, Debug)]
pub enum StateTensor {
    /// Values in the parameter's shape: f32 (f64 for f64 parameters), or bf16.
    Dense(Tensor),
    /// 8-bit blockwise state (ALGORITHMS.md §12): element `i` is
    /// `map[codes[i]] * absmax[i / 256]` over the flattened tensor, with the signed or unsigned
    /// dynamic map ([`dynamic_map`]).
    Blockwise8 {
        /// u8 codes, the parameter's shape.
        codes: Tensor,
        /// f32 absmax per block of 256 elements, `[ceil(numel / 256)]`.
        absmax: Tensor,
        /// Whether the codes index the signed map.
        signed: bool,
    },
}

impl StateTensor {
    /// Zeroed state for a parameter of `shape` on `device` in `format`; `full` is the compute
    /// dtype. `alloc` creates the dense tensors (the backend places them for alignment).
    pub(crate) fn zeros(
        format: SlotFormat,
        signed: bool,
        full: DType,
        alloc: &dyn Fn(DType) -> candle_core::Result<Tensor>,
        numel: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(match format {
            SlotFormat::Full => StateTensor::Dense(alloc(full)?),
            SlotFormat::Bf16 => StateTensor::Dense(alloc(DType::BF16)?),
            SlotFormat::Blockwise8 => StateTensor::Blockwise8 {
                codes: alloc(DType::U8)?,
                absmax: Tensor::zeros(numel.div_ceil(BLOCK), DType::F32, device)?,
                signed,
            },
        })
    }

    /// The tensors that hold this slot (one, or the codes and the absmax).
    pub fn tensors(&self) -> Vec<&Tensor> {
        match self {
            StateTensor::Dense(t) => vec![t],
            StateTensor::Blockwise8 { codes, absmax, .. } => vec![codes, absmax],
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.tensors()
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The format's name: the dense dtype (`"f32"`, `"f64"`, `"bf16"`) or `"blockwise8"`.
    pub fn format_name(&self) -> &'static str {
        match self {
            StateTensor::Dense(t) => t.dtype().as_str(),
            StateTensor::Blockwise8 { .. } => "blockwise8",
        }
    }

    /// The dense tensor, if the slot is dense.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            StateTensor::Dense(t) => Some(t),
            StateTensor::Blockwise8 { .. } => None,
        }
    }

    /// The slot's values as an f32 tensor (f64 stays f64) on the slot's device, in the
    /// parameter's shape: dequantized for 8-bit state (a copy), widened for bf16.
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            StateTensor::Dense(t) if t.dtype() == DType::F64 => Ok(t.clone()),
            StateTensor::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            StateTensor::Blockwise8 {
                codes,
                absmax,
                signed,
            } => {
                let q = quantizer(*signed);
                let c = codes.flatten_all()?.to_vec1::<u8>()?;
                let a = absmax.to_vec1::<f32>()?;
                if a.len() != c.len().div_ceil(BLOCK) {
                    return Err(Error::Unsupported(format!(
                        "8-bit state has {} absmax values for {} codes",
                        a.len(),
                        c.len()
                    )));
                }
                let mut out = vec![0f32; c.len()];
                for ((o, c), a) in out.chunks_mut(BLOCK).zip(c.chunks(BLOCK)).zip(&a) {
                    q.decode(c, *a, o);
                }
                Ok(
                    Tensor::from_vec(out, codes.shape(), &Device::Cpu)?
                        .to_device(codes.device())?,
                )
            }
        }
    }

    /// `values` (any float dtype and device, the parameter's shape) quantized as 8-bit
    /// blockwise state with the signed or unsigned map, exactly as the optimizers store it.
    pub fn quantize_blockwise8(values: &Tensor, signed: bool) -> Result<Self> {
        let cpu = values.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        match Self::encode(&cpu, SlotFormat::Blockwise8, signed)? {
            StateTensor::Blockwise8 {
                codes,
                absmax,
                signed,
            } => Ok(StateTensor::Blockwise8 {
                codes: codes.to_device(values.device())?,
                absmax: absmax.to_device(values.device())?,
                signed,
            }),
            dense => Ok(dense),
        }
    }

    /// `values` (f32 or f64, on the CPU) stored in `format` (8-bit: quantized with the signed
    /// or unsigned map).
    pub(crate) fn encode(values: &Tensor, format: SlotFormat, signed: bool) -> Result<Self> {
        Ok(match format {
            SlotFormat::Full => StateTensor::Dense(values.clone()),
            SlotFormat::Bf16 => StateTensor::Dense(values.to_dtype(DType::BF16)?),
            SlotFormat::Blockwise8 => {
                let x = values
                    .flatten_all()?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?;
                let q = quantizer(signed);
                let mut codes = vec![0u8; x.len()];
                let absmax: Vec<f32> = x
                    .chunks(BLOCK)
                    .zip(codes.chunks_mut(BLOCK))
                    .map(|(x, c)| q.encode(x, c))
                    .collect();
                let n = absmax.len();
                StateTensor::Blockwise8 {
                    codes: Tensor::from_vec(codes, values.shape(), &Device::Cpu)?,
                    absmax: Tensor::from_vec(absmax, n, &Device::Cpu)?,
                    signed,
                }
            }
        })
    }

    /// Sets the slot to zero in place (8-bit: every code 0 and every absmax 0, the all-zero
    /// blocks bitsandbytes starts from).
    pub(crate) fn zero_set(&self) -> Result<()> {
        for t in self.tensors() {
            t.zero_set()?;
        }
        Ok(())
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True)`, as float32 bit patterns (sorted ascending;
/// index 127 is 0.0, 255 is 1.0). Copied from the maps stored in every 8-bit golden trace,
/// which a test compares bit for bit.
const SIGNED_MAP: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// bitsandbytes' `create_dynamic_map(signed=False)`, as float32 bit patterns (index 0 is 0.0,
/// 255 is 1.0).
const UNSIGNED_MAP: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e,
    0x37e171a0, 0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b,
    0x394154ca, 0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50,
    0x3a264c30, 0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106,
    0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540,
    0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd,
    0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae,
    0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a,
    0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000,
    0x3d0dc28f, 0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b,
    0x3d3bd70a, 0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7,
    0x3d69eb87, 0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8,
    0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6,
    0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333,
    0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000,
    0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a,
    0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666,
    0x3e8f0000, 0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333,
    0x3eabcccc, 0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000,
    0x3ec8999a, 0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc,
    0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999,
    0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334,
    0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a,
    0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000,
    0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc,
    0x3f49199a, 0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334,
    0x3f578000, 0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a,
    0x3f65e666, 0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000,
    0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

/// The 256 values of the signed or unsigned dynamic map, ascending.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let bits = if signed { &SIGNED_MAP } else { &UNSIGNED_MAP };
    bits.map(f32::from_bits)
}

/// Points of the quantizer's grid over [−1, 1].
pub(crate) const GRID: usize = 65536;

/// One dynamic map with bitsandbytes' CPU quantizer: values are snapped to a 65,536-point grid
/// over [−1, 1] and each grid point goes to its nearest code (ALGORITHMS.md §12.1).
pub(crate) struct Quantizer {
    /// The map, ascending.
    pub map: [f32; 256],
    /// Grid index → code.
    pub lut: Box<[u8; GRID]>,
}

impl Quantizer {
    fn new(signed: bool) -> Self {
        let map = dynamic_map(signed);
        // mid_k = fl(0.5·fl(map[k] + map[k+1])); LUT[j] = #{k : mid_k < v_j}, v_j on the grid.
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
        let mut lut = Box::new([0u8; GRID]);
        let mut k = 0usize;
        for (j, code) in lut.iter_mut().enumerate() {
            let v = -1.0f32 + (2.0f32 * j as f32) / 65535.0f32;
            while k < mids.len() && mids[k] < v {
                k += 1;
            }
            *code = k as u8;
        }
        Self { map, lut }
    }

    /// `out[i] = map[codes[i]] · absmax` (one f32 multiply).
    #[inline(always)]
    pub fn decode<F: crate::elem::Real>(&self, codes: &[u8], absmax: f32, out: &mut [F]) {
        let n = out.len().min(codes.len());
        let (codes, out) = (&codes[..n], &mut out[..n]);
        for i in 0..n {
            out[i] = F::of((self.map[codes[i] as usize] * absmax) as f64);
        }
    }

    /// Quantizes one block (at most [`BLOCK`] elements): returns its absmax (`max |x|`, f32)
    /// and writes the codes. An all-zero block codes to index 0.
    #[inline(always)]
    pub fn encode<F: crate::elem::Real>(&self, x: &[F], codes: &mut [u8]) -> f32 {
        let n = x.len().min(codes.len()).min(BLOCK);
        let (x, codes) = (&x[..n], &mut codes[..n]);
        let mut xf = [0f32; BLOCK];
        let xf = &mut xf[..n];
        for i in 0..n {
            xf[i] = x[i].f64() as f32;
        }
        // max |x| in 16 independent lanes (max is exact, so the order does not matter); the
        // comparison form skips NaN, as f32::max does.
        const LANES: usize = 16;
        let mut acc = [0f32; LANES];
        let whole = n / LANES * LANES;
        for c in xf[..whole].chunks_exact(LANES) {
            for l in 0..LANES {
                let a = c[l].abs();
                acc[l] = if a > acc[l] { a } else { acc[l] };
            }
        }
        for (l, v) in xf[whole..].iter().enumerate() {
            let a = v.abs();
            acc[l] = if a > acc[l] { a } else { acc[l] };
        }
        let absmax = acc.iter().fold(0f32, |m, &a| if a > m { a } else { m });
        if absmax == 0.0 {
            codes.fill(0);
            return absmax;
        }
        let inv = 1.0f32 / absmax;
        let mut grid = [0u16; BLOCK];
        let grid = &mut grid[..n];
        for i in 0..n {
            let y = (xf[i] * inv).clamp(-1.0, 1.0);
            // trunc(fl(fl(fl(y + 1)·0.5)·65535) + 0.5), in [0, 65535] for every finite y; a
            // NaN (from a non-finite state under NonFinitePolicy::Propagate) goes to 0.
            let t = (y + 1.0) * 0.5 * 65535.0 + 0.5;
            let t = if t >= 0.0 { t } else { 0.0 };
            // trunc(t) for t in [0, 65535.5]: floor(t) + 2^23 is exact, and its low mantissa
            // bits are floor(t) (a float-to-int `as` would not vectorize).
            let j = (t.floor() + 8_388_608.0).to_bits() - 0x4B00_0000;
            grid[i] = j.min(GRID as u32 - 1) as u16;
        }
        // Scalar lookups, four per word: LLVM's emulated byte gathers are slower.
        let whole = n / 4 * 4;
        for (c, g) in codes[..whole]
            .chunks_exact_mut(4)
            .zip(grid[..whole].chunks_exact(4))
        {
            let w = u64::from(g[0])
                | u64::from(g[1]) << 16
                | u64::from(g[2]) << 32
                | u64::from(g[3]) << 48;
            let lut = &self.lut;
            let out = u32::from(lut[(w & 0xFFFF) as usize])
                | u32::from(lut[(w >> 16 & 0xFFFF) as usize]) << 8
                | u32::from(lut[(w >> 32 & 0xFFFF) as usize]) << 16
                | u32::from(lut[(w >> 48) as usize]) << 24;
            c.copy_from_slice(&out.to_le_bytes());
        }
        for i in whole..n {
            codes[i] = self.lut[grid[i] as usize];
        }
        absmax
    }
}

/// The quantizer of the signed or unsigned map (built once).
pub(crate) fn quantizer(signed: bool) -> &'static Quantizer {
    static SIGNED: OnceLock<Quantizer> = OnceLock::new();
    static UNSIGNED: OnceLock<Quantizer> = OnceLock::new();
    if signed {
        SIGNED.get_or_init(|| Quantizer::new(true))
    } else {
        UNSIGNED.get_or_init(|| Quantizer::new(false))
    }
}

/// 32 random bits for element `index` of the stream `key`: a counter-based generator (the
/// SplitMix64 finalizer), so a result does not depend on how elements are split over threads.
#[inline(always)]
pub(crate) fn random_bits(key: u64, index: u64) -> u32 {
    let mut z = key ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// The stream of one parameter's stochastic rounding at one of its updates: a function of the
/// optimizer's seed, the parameter's name (FNV-1a) and its update count, so a resumed run, or
/// the same model built in another order, draws the same bits.
pub(crate) fn rounding_key(seed: u64, name: &str, t: u64) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let a = random_bits(seed, h) as u64;
    let b = random_bits(seed.rotate_left(32) ^ 0xA076_1D64_78BD_642F, t) as u64;
    (a << 32 | b) ^ t.wrapping_mul(0xE703_7ED1_A0B4_28DB)
}

/// How bf16 parameters are written back after an update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamRounding {
    /// Round to nearest-even (the default; what candle's own ops do).
    #[default]
    Nearest,
    /// Stochastic rounding with a counter-based generator seeded by `seed`: unbiased, so small
    /// updates accumulate in bf16 weights without an f32 master copy; the same seed gives the
    /// same run bit for bit (each parameter's stream is keyed by its name and update count, both
    /// checkpointed).
    /// Applies to bf16 parameters; others round as usual.
    Stochastic {
        /// The generator's seed.
        seed: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_with_fixed_points() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(u.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((s[127], s[255], u[0], u[255]), (0.0, 1.0, 0.0, 1.0));
        assert_eq!(s[0], -0.992_968_75);
    }

    #[test]
    fn grid_consequences_of_the_spec() {
        // §12.1: an exact 0 in a block with absmax ≠ 0 becomes signed index 131 / unsigned 7.
        let (s, u) = (quantizer(true), quantizer(false));
        let mut c = [0u8; 2];
        assert_eq!(s.encode(&[0.0f32, 1.0], &mut c), 1.0);
        assert_eq!(c, [131, 255]);
        u.encode(&[0.0f32, 2.0], &mut c);
        assert_eq!(c, [7, 255]);
        // All-zero block: index 0, absmax 0; decodes to -0.0 (signed).
        assert_eq!(s.encode(&[0.0f32, -0.0], &mut c), 0.0);
        assert_eq!(c, [0, 0]);
        let mut d = [1f32; 2];
        s.decode(&c, 0.0, &mut d);
        assert!(d[0] == 0.0 && d[0].is_sign_negative());
        // Never produced: signed 124..=130, unsigned 1..=6, 8, 9, 11, 13.
        for (q, never) in [
            (s, &[124u8, 125, 126, 127, 128, 129, 130][..]),
            (u, &[1, 2, 3, 4, 5, 6, 8, 9, 11, 13]),
        ] {
            for c in never {
                assert!(!q.lut.contains(c), "code {c}");
            }
        }
    }
}
