//! One module per optimizer, each holding only the math: the configuration (official names and
//! defaults, validation), the state slots, the f64 step scalars and the per-element rule.

pub mod adamw;
pub mod sgd_sai;
