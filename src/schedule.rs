//! Learning-rate schedules, as pure functions of the position in training, so that resuming is
//! just asking again.

use serde::{Deserialize, Serialize};

/// How the learning rate moves.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// The reference's SGDR (Loshchilov & Hutter), stepped once per epoch: cycles of `base`,
    /// `base * mul`, ... epochs; epoch 0 of a cycle at `max_lr`, epoch j >= 1 at the cosine of
    /// (j + 1) / L, so each cycle's last epoch is at `min_lr`. Momentum is kept at restarts.
    Sgdr {
        max_lr: f64,
        min_lr: f64,
        base: usize,
        mul: usize,
    },
    /// One cosine decay from `max_lr` to `min_lr` over all steps of the run, updated every step.
    CosineSteps { max_lr: f64, min_lr: f64 },
}

/// Where the cycle of epoch `epoch` starts and how long it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgdrCycle {
    pub index: usize,
    pub epoch_in_cycle: usize,
    pub length: usize,
}

/// Locates `epoch` (0-based) in the SGDR cycles of lengths base, base*mul, base*mul^2, ...
pub fn sgdr_cycle(epoch: usize, base: usize, mul: usize) -> SgdrCycle {
    let (mut start, mut length, mut index) = (0usize, base.max(1), 0usize);
    while epoch >= start + length {
        start += length;
        length = length.saturating_mul(mul.max(1));
        index += 1;
    }
    SgdrCycle {
        index,
        epoch_in_cycle: epoch - start,
        length,
    }
}

/// Total epochs of the first `cycles` SGDR cycles (5 cycles of 12 x 2^i: 372).
pub const fn sgdr_epochs(base: usize, mul: usize, cycles: usize) -> usize {
    let (mut total, mut length, mut i): (usize, usize, usize) = (0, base, 0);
    while i < cycles {
        total = total.saturating_add(length);
        length = length.saturating_mul(mul);
        i += 1;
    }
    total
}

/// `--schedule`: which [`Schedule`] a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Sgdr,
    CosineSteps,
}

impl crate::choice::Choice for ScheduleKind {
    const WHAT: &'static str = "schedule";
    const ALL: &'static [ScheduleKind] = &[ScheduleKind::Sgdr, ScheduleKind::CosineSteps];
    fn name(self) -> &'static str {
        match self {
            ScheduleKind::Sgdr => "sgdr",
            ScheduleKind::CosineSteps => "cosine-steps",
        }
    }
}

crate::choice_traits!(ScheduleKind);

impl Schedule {
    /// The learning rate of step `step` (0-based, of `steps_per_epoch`) in epoch `epoch` of a run
    /// of `epochs` epochs.
    pub fn lr_at(&self, epoch: usize, step: usize, steps_per_epoch: usize, epochs: usize) -> f64 {
        match *self {
            Schedule::Sgdr {
                max_lr,
                min_lr,
                base,
                mul,
            } => {
                let c = sgdr_cycle(epoch, base, mul);
                if c.epoch_in_cycle == 0 {
                    max_lr
                } else {
                    let t = (c.epoch_in_cycle + 1) as f64 / c.length as f64;
                    min_lr + 0.5 * (max_lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
            Schedule::CosineSteps { max_lr, min_lr } => {
                let total = (epochs * steps_per_epoch).max(1) as f64;
                let t = (epoch * steps_per_epoch + step) as f64 / total;
                min_lr + 0.5 * (max_lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    pub fn max_lr(&self) -> f64 {
        match *self {
            Schedule::Sgdr { max_lr, .. } | Schedule::CosineSteps { max_lr, .. } => max_lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_of_the_paper() {
        assert_eq!(sgdr_epochs(12, 2, 5), 372);
        assert_eq!(
            sgdr_cycle(0, 12, 2),
            SgdrCycle {
                index: 0,
                epoch_in_cycle: 0,
                length: 12
            }
        );
        assert_eq!(
            sgdr_cycle(11, 12, 2),
            SgdrCycle {
                index: 0,
                epoch_in_cycle: 11,
                length: 12
            }
        );
        assert_eq!(
            sgdr_cycle(12, 12, 2),
            SgdrCycle {
                index: 1,
                epoch_in_cycle: 0,
                length: 24
            }
        );
        assert_eq!(sgdr_cycle(36, 12, 2).index, 2);
        assert_eq!(sgdr_cycle(84, 12, 2).index, 3);
        assert_eq!(sgdr_cycle(180, 12, 2).index, 4);
        assert_eq!(
            sgdr_cycle(371, 12, 2),
            SgdrCycle {
                index: 4,
                epoch_in_cycle: 191,
                length: 192
            }
        );
    }
}
