//! The step totals (global-batch loss, stop votes) of the steps not yet read by the host.
//!
//! Reading a number computed on a GPU makes the host wait for everything queued before it, so
//! reading each step's loss would stall the GPU once per step. Instead each step's totals are
//! copied, on the device, into a row of a small table, and the host reads the table every
//! `--totals-every` steps (and at the end of an epoch, at a checkpoint, at the end of a run).
//! The ranks read at the same steps, so they agree on where a run stops or diverged. On the CPU
//! the default is to read every step, which costs nothing there.

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use super::step::StepAt;

/// A step whose totals wait in the table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PendingStep {
    pub at: StepAt,
    pub lr: f64,
    /// Images in the step's global batch.
    pub images: usize,
}

/// A step's totals as read by the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadStep {
    pub step: PendingStep,
    /// The global-batch loss.
    pub loss: f64,
    /// Whether any rank asked to stop at this step.
    pub stop: bool,
}

/// The table of unread step totals.
pub struct PendingTotals {
    /// `capacity` rows of (loss, stop votes), created on the totals' device at the first push.
    rows: Option<Tensor>,
    capacity: usize,
    steps: Vec<PendingStep>,
}

impl PendingTotals {
    /// A table read at least every `capacity` steps (at least 1).
    pub fn new(capacity: usize) -> Self {
        PendingTotals {
            rows: None,
            capacity: capacity.max(1),
            steps: Vec::new(),
        }
    }

    /// Copies `totals` (the step's 2 values, on any device) into the next row, without waiting.
    pub fn push(&mut self, totals: &Tensor, step: PendingStep) {
        assert!(!self.is_full(), "step totals pushed into a full table");
        let capacity = self.capacity as i64;
        let rows = self
            .rows
            .get_or_insert_with(|| Tensor::zeros([capacity, 2], (Kind::Float, totals.device())));
        tch::no_grad(|| {
            rows.get(self.steps.len() as i64)
                .copy_(&totals.reshape([2]).to_kind(Kind::Float));
        });
        self.steps.push(step);
    }

    /// Steps waiting to be read.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether the next step must be read before another is pushed.
    pub fn is_full(&self) -> bool {
        self.steps.len() >= self.capacity
    }

    /// Reads the waiting steps, in order, and empties the table. The caller has waited for the
    /// collectives that produced them (a hang then shows in the wait, not here).
    pub fn read(&mut self) -> anyhow::Result<Vec<ReadStep>> {
        let steps = std::mem::take(&mut self.steps);
        let Some(rows) = &self.rows else {
            return Ok(Vec::new());
        };
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let values = Vec::<f32>::try_from(
            rows.narrow(0, 0, steps.len() as i64)
                .to_device(Device::Cpu)
                .reshape([-1]),
        )
        .context("reading the step totals")?;
        Ok(steps
            .into_iter()
            .zip(values.chunks_exact(2))
            .map(|(step, v)| ReadStep {
                step,
                loss: f64::from(v[0]),
                stop: v[1] > 0.0,
            })
            .collect())
    }
}

/// Steps between reads for `--totals-every requested`: as asked, or with 0 (auto) every step
/// on the CPU, where reading costs nothing, and on a GPU enough to keep the host well ahead of
/// the device (a stop request or a non-finite loss is then acted on at most this many steps
/// later).
pub fn interval(requested: u32, device: Device) -> usize {
    match requested {
        0 if device.is_cuda() => 16,
        0 => 1,
        n => n as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: usize) -> PendingStep {
        PendingStep {
            at: StepAt { epoch: 0, step: i },
            lr: 0.1,
            images: 10 + i,
        }
    }

    #[test]
    fn rows_come_back_in_order_and_the_table_empties() {
        let mut table = PendingTotals::new(3);
        assert!(table.read().unwrap().is_empty());
        for (i, (loss, stop)) in [(1.5f32, 0.0f32), (f32::NAN, 0.0), (0.25, 2.0)]
            .into_iter()
            .enumerate()
        {
            assert!(!table.is_full());
            table.push(&Tensor::from_slice(&[loss, stop]), step(i));
        }
        assert!(table.is_full());
        let read = table.read().unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!((read[0].loss, read[0].stop), (1.5, false));
        assert!(read[1].loss.is_nan());
        assert_eq!(
            (read[2].loss, read[2].stop, read[2].step),
            (0.25, true, step(2))
        );
        assert!(table.is_empty() && !table.is_full());
        // A row is overwritten after a read; a partial table reads only its own rows.
        table.push(&Tensor::from_slice(&[7.0f32, 0.0]), step(3));
        let read = table.read().unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].loss, read[0].step), (7.0, step(3)));
    }

    #[test]
    fn a_pushed_row_is_a_copy_not_a_view_of_the_totals() {
        let mut table = PendingTotals::new(2);
        let mut totals = Tensor::from_slice(&[3.0f32, 1.0]);
        table.push(&totals, step(0));
        let _ = totals.fill_(9.0);
        let read = table.read().unwrap();
        assert_eq!((read[0].loss, read[0].stop), (3.0, true));
    }
}
