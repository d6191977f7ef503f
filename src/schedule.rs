//! Learning-rate schedules: step-based multipliers of the optimizer's peak learning rate.
//!
//! The optimizer holds a peak rate (`set_learning_rate`) and, optionally, a [`Schedule`]; before
//! each step it takes, every group's rate becomes `peak · factor(t) · group ratio`, where `t` is
//! the number of steps taken so far (0 at the first step). Skipped steps do not advance `t`.
//! The schedule is part of the checkpoint.
//!
//! ```
//! use candle_optim::Schedule;
//! // 100 steps of linear warmup, then cosine decay to 10% over the remaining 900.
//! let s = Schedule::warmup_cosine(100, 1000, 0.1);
//! assert_eq!(s.factor(0), 0.01);
//! assert_eq!(s.factor(99), 1.0);
//! assert!((s.factor(999) - 0.1).abs() < 1e-5);
//! ```

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// A learning-rate multiplier as a function of the step count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// Always 1.
    Constant,
    /// `(t + 1) / steps` until it reaches 1 (the first step already moves), then 1.
    LinearWarmup {
        /// Warmup length.
        steps: u64,
    },
    /// Cosine from 1 at `t = 0` to `final_factor` at `t = steps`, then `final_factor`.
    Cosine {
        /// Decay length.
        steps: u64,
        /// The factor at the end.
        final_factor: f64,
    },
    /// Linear from 1 at `t = 0` to `final_factor` at `t = steps`, then `final_factor`.
    Linear {
        /// Decay length.
        steps: u64,
        /// The factor at the end.
        final_factor: f64,
    },
    /// Warmup-stable-decay: linear warmup, a constant phase, then a decay to `final_factor`.
    WarmupStableDecay {
        /// Warmup length (as [`Schedule::LinearWarmup`]).
        warmup: u64,
        /// Steps at factor 1.
        stable: u64,
        /// Decay length.
        decay: u64,
        /// The factor at the end.
        final_factor: f64,
        /// Cosine instead of linear decay.
        cosine: bool,
    },
    /// Phases one after another, each seeing its own step count from 0; the last one goes on.
    Sequence {
        /// The phases, in order.
        phases: Vec<Phase>,
    },
    /// The product of several schedules' factors.
    Product {
        /// The schedules multiplied.
        factors: Vec<Schedule>,
    },
}

/// One phase of a [`Schedule::Sequence`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Steps in this phase (ignored for the last phase).
    pub steps: u64,
    /// The schedule of this phase.
    pub schedule: Schedule,
}

impl Schedule {
    /// Linear warmup for `warmup` steps, then cosine decay to `final_factor` at step `total`.
    pub fn warmup_cosine(warmup: u64, total: u64, final_factor: f64) -> Self {
        Schedule::Sequence {
            phases: vec![
                Phase {
                    steps: warmup,
                    schedule: Schedule::LinearWarmup { steps: warmup },
                },
                Phase {
                    steps: total.saturating_sub(warmup),
                    schedule: Schedule::Cosine {
                        steps: total.saturating_sub(warmup).saturating_sub(1).max(1),
                        final_factor,
                    },
                },
            ],
        }
    }

    /// The multiplier at step `t` (0 for the first step).
    pub fn factor(&self, t: u64) -> f64 {
        let frac = |t: u64, n: u64| {
            if n == 0 {
                1.0
            } else {
                t.min(n) as f64 / n as f64
            }
        };
        match self {
            Schedule::Constant => 1.0,
            Schedule::LinearWarmup { steps } => {
                if *steps == 0 {
                    1.0
                } else {
                    (t.saturating_add(1) as f64 / *steps as f64).min(1.0)
                }
            }
            Schedule::Cosine {
                steps,
                final_factor,
            } => final_factor + (1.0 - final_factor) * 0.5 * (1.0 + (PI * frac(t, *steps)).cos()),
            Schedule::Linear {
                steps,
                final_factor,
            } => 1.0 + (final_factor - 1.0) * frac(t, *steps),
            Schedule::WarmupStableDecay {
                warmup,
                stable,
                decay,
                final_factor,
                cosine,
            } => {
                if t < *warmup {
                    Schedule::LinearWarmup { steps: *warmup }.factor(t)
                } else if t < warmup.saturating_add(*stable) {
                    1.0
                } else {
                    // t >= warmup + stable, which did not saturate (else t < u64::MAX failed
                    // above for every t but u64::MAX, where d = 0 is the saturated answer).
                    let d = t - warmup.saturating_add(*stable);
                    if *cosine {
                        Schedule::Cosine {
                            steps: *decay,
                            final_factor: *final_factor,
                        }
                        .factor(d)
                    } else {
                        Schedule::Linear {
                            steps: *decay,
                            final_factor: *final_factor,
                        }
                        .factor(d)
                    }
                }
            }
            Schedule::Sequence { phases } => {
                let mut start = 0u64;
                for (i, ph) in phases.iter().enumerate() {
                    // Saturating: a length of u64::MAX means "forever"; phases after it are
                    // never reached.
                    if i + 1 == phases.len() || t < start.saturating_add(ph.steps) {
                        return ph.schedule.factor(t - start);
                    }
                    start = start.saturating_add(ph.steps);
                }
                1.0
            }
            Schedule::Product { factors } => factors.iter().map(|s| s.factor(t)).product(),
        }
    }

    /// Checks that every factor is finite and ≥ 0 (final factors) and sequences are not empty.
    pub fn validate(&self) -> Result<()> {
        let check = |f: f64| {
            if f.is_finite() && f >= 0.0 {
                Ok(())
            } else {
                Err(Error::hyper("final_factor", f, "must be finite and >= 0"))
            }
        };
        match self {
            Schedule::Constant | Schedule::LinearWarmup { .. } => Ok(()),
            Schedule::Cosine { final_factor, .. }
            | Schedule::Linear { final_factor, .. }
            | Schedule::WarmupStableDecay { final_factor, .. } => check(*final_factor),
            Schedule::Sequence { phases } => {
                if phases.is_empty() {
                    return Err(Error::Unsupported("an empty schedule sequence".into()));
                }
                phases.iter().try_for_each(|p| p.schedule.validate())
            }
            Schedule::Product { factors } => factors.iter().try_for_each(|p| p.validate()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let w = Schedule::LinearWarmup { steps: 4 };
        assert_eq!(
            (0..6).map(|t| w.factor(t)).collect::<Vec<_>>(),
            [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
        );
        let c = Schedule::Cosine {
            steps: 10,
            final_factor: 0.0,
        };
        assert_eq!(c.factor(0), 1.0);
        assert!((c.factor(5) - 0.5).abs() < 1e-12);
        assert!(c.factor(10).abs() < 1e-12 && c.factor(50).abs() < 1e-12);
        let l = Schedule::Linear {
            steps: 4,
            final_factor: 0.2,
        };
        assert!((l.factor(2) - 0.6).abs() < 1e-12);
        let wsd = Schedule::WarmupStableDecay {
            warmup: 2,
            stable: 3,
            decay: 4,
            final_factor: 0.0,
            cosine: false,
        };
        let f: Vec<f64> = (0..10).map(|t| wsd.factor(t)).collect();
        assert_eq!(f, [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]);
        let p = Schedule::Product {
            factors: vec![
                w.clone(),
                Schedule::Linear {
                    steps: 10,
                    final_factor: 0.0,
                },
            ],
        };
        assert!((p.factor(1) - 0.5 * 0.9).abs() < 1e-12);
        let s = Schedule::Sequence {
            phases: vec![
                Phase {
                    steps: 2,
                    schedule: Schedule::Constant,
                },
                Phase {
                    steps: 0,
                    schedule: Schedule::Linear {
                        steps: 2,
                        final_factor: 0.0,
                    },
                },
            ],
        };
        assert_eq!(
            (0..5).map(|t| s.factor(t)).collect::<Vec<_>>(),
            [1.0, 1.0, 1.0, 0.5, 0.0]
        );
        assert!(Schedule::Cosine {
            steps: 1,
            final_factor: -1.0
        }
        .validate()
        .is_err());
        assert!(Schedule::Sequence { phases: vec![] }.validate().is_err());
        let json = serde_json::to_string(&Schedule::warmup_cosine(2, 10, 0.0)).unwrap();
        assert_eq!(
            serde_json::from_str::<Schedule>(&json).unwrap(),
            Schedule::warmup_cosine(2, 10, 0.0)
        );
    }

    /// A length of u64::MAX means "forever": no step count overflows (which panics in debug
    /// and, wrapped in release, jumped into the wrong phase or gave warmup factor 0).
    #[test]
    fn max_lengths_do_not_overflow() {
        const M: u64 = u64::MAX;
        let steps = [0, 1, 5, 10, 1000, M - 1, M];
        let factors = |s: &Schedule| steps.map(|t| s.factor(t));

        let w = Schedule::LinearWarmup { steps: 10 };
        assert_eq!(factors(&w), [0.1, 0.2, 0.6, 1.0, 1.0, 1.0, 1.0]);
        let w = Schedule::LinearWarmup { steps: M };
        assert_eq!(w.factor(M - 1), 1.0);
        assert_eq!(w.factor(M), 1.0);
        assert!(w.factor(0) > 0.0);

        for final_factor in [0.0, 0.5] {
            let c = Schedule::Cosine {
                steps: M,
                final_factor,
            };
            assert_eq!(c.factor(0), 1.0);
            assert_eq!(c.factor(M), final_factor);
            let l = Schedule::Linear {
                steps: M,
                final_factor,
            };
            assert_eq!(l.factor(0), 1.0);
            assert_eq!(l.factor(M), final_factor);
        }

        // Stable forever: after the warmup, 1 at every step.
        for cosine in [false, true] {
            let wsd = Schedule::WarmupStableDecay {
                warmup: 10,
                stable: M,
                decay: 100,
                final_factor: 0.0,
                cosine,
            };
            assert_eq!(factors(&wsd), [0.1, 0.2, 0.6, 1.0, 1.0, 1.0, 1.0]);
            assert!(wsd.validate().is_ok());
        }
        // Every length u64::MAX: warmup forever.
        let wsd = Schedule::WarmupStableDecay {
            warmup: M,
            stable: M,
            decay: M,
            final_factor: 0.0,
            cosine: false,
        };
        assert!(steps
            .iter()
            .all(|&t| wsd.factor(t) > 0.0 && wsd.factor(t) <= 1.0));
        assert_eq!(wsd.factor(M - 1), 1.0);
        assert!(wsd.validate().is_ok());

        // A phase of u64::MAX steps in the middle: the phases after it are never reached.
        let decay = Schedule::Linear {
            steps: 4,
            final_factor: 0.0,
        };
        let seq = Schedule::Sequence {
            phases: vec![
                Phase {
                    steps: 5,
                    schedule: decay.clone(),
                },
                Phase {
                    steps: M,
                    schedule: Schedule::Constant,
                },
                Phase {
                    steps: M,
                    schedule: decay.clone(),
                },
                Phase {
                    steps: 0,
                    schedule: decay.clone(),
                },
            ],
        };
        assert_eq!(factors(&seq), [1.0, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]);
        assert!(seq.validate().is_ok());
        let seq2 = Schedule::Sequence {
            phases: vec![
                Phase {
                    steps: M,
                    schedule: Schedule::LinearWarmup { steps: 10 },
                },
                Phase {
                    steps: 3,
                    schedule: decay.clone(),
                },
            ],
        };
        assert_eq!(factors(&seq2), [0.1, 0.2, 0.6, 1.0, 1.0, 1.0, 1.0]);

        let prod = Schedule::Product {
            factors: vec![seq, seq2, wsd],
        };
        assert_eq!(prod.factor(10), 1.0 * 1.0 * (11.0 / M as f64));
        assert_eq!(prod.factor(M - 1), 1.0);
        assert!(prod.validate().is_ok());
        let wc = Schedule::warmup_cosine(M, M, 0.0);
        assert_eq!(wc.factor(M - 1), 1.0);
        assert!(wc.validate().is_ok());
    }
}
