//! One module per optimizer, each holding only the math: the configuration (official names and
//! defaults, validation), the state slots, the f64 step scalars and the per-element rule.

pub mod adabelief;
pub mod adamp;
pub mod adamw;
pub mod adan;
pub mod diffgrad;
pub mod lion;
pub mod muon;
pub mod sgd;
pub mod sgd_sai;
