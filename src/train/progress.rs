//! Where a run stands (what a checkpoint records of the loop) and how it shows on a terminal.

use std::io::IsTerminal;

use crate::run_dir::checkpoint::State;

/// The loop's position and what it has learnt so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Position {
    /// The epoch being trained (0-based) and the next step within it.
    pub epoch: usize,
    pub step: usize,
    /// Optimiser steps taken.
    pub global_step: u64,
    /// The epoch's training loss so far (sum over samples) and its sample count.
    pub loss_sum: f64,
    pub seen: usize,
    /// The selected epoch's test top-1 (NaN before the first evaluation) and that epoch: the
    /// best on validation when the run holds some out, else the best on test (the paper's
    /// protocol); and the last test top-1.
    pub best: f64,
    pub best_epoch: usize,
    pub last: f64,
    /// The selected epoch's validation top-1 (NaN without a validation split).
    pub best_val: f64,
    /// The highest test top-1 of any epoch (the test-selected figure).
    pub max_test: f64,
}

impl Position {
    pub fn start() -> Self {
        Position {
            epoch: 0,
            step: 0,
            global_step: 0,
            loss_sum: 0.0,
            seen: 0,
            best: f64::NAN,
            best_epoch: 0,
            last: f64::NAN,
            best_val: f64::NAN,
            max_test: f64::NAN,
        }
    }

    /// The position a checkpoint recorded.
    pub fn from_state(st: &State) -> Self {
        Position {
            epoch: st.epoch,
            step: st.step,
            global_step: st.global_step,
            loss_sum: st.loss_sum,
            seen: st.seen,
            best: st.best_top1.unwrap_or(f64::NAN),
            best_epoch: st.best_epoch,
            last: st.last_top1.unwrap_or(f64::NAN),
            best_val: st.best_val_top1.unwrap_or(f64::NAN),
            max_test: st.max_test_top1.or(st.best_top1).unwrap_or(f64::NAN),
        }
    }

    /// After a step over `images` images of the global batch with mean loss `loss`.
    pub fn stepped(&mut self, loss: f64, images: usize) {
        self.global_step += 1;
        self.step += 1;
        self.loss_sum += loss * images as f64;
        self.seen += images;
    }

    /// The epoch's mean training loss so far.
    pub fn train_loss(&self) -> f64 {
        self.loss_sum / self.seen.max(1) as f64
    }

    /// Records an evaluation of the current epoch: its test top-1 and, with a validation
    /// split, its validation top-1, on which the epoch is then selected (the first of ties).
    pub fn evaluated(&mut self, test: f64, val: Option<f64>) {
        self.last = test;
        if self.max_test.is_nan() || test > self.max_test {
            self.max_test = test;
        }
        let better = match val {
            Some(v) => self.best_val.is_nan() || v > self.best_val,
            None => self.best.is_nan() || test > self.best,
        };
        if better {
            self.best = test;
            self.best_epoch = self.epoch + 1;
            if let Some(v) = val {
                self.best_val = v;
            }
        }
    }

    /// Moves to the start of the next epoch.
    pub fn next_epoch(&mut self) {
        self.epoch += 1;
        self.step = 0;
        self.loss_sum = 0.0;
        self.seen = 0;
    }
}

/// The time left, from the mean training seconds per step and evaluation seconds per
/// evaluation measured so far in this process.
#[derive(Clone, Debug, Default)]
pub struct Eta {
    train_seconds: f64,
    steps: u64,
    eval_seconds: f64,
    evals: u64,
}

impl Eta {
    pub fn trained(&mut self, steps: u64, seconds: f64) {
        self.steps += steps;
        self.train_seconds += seconds;
    }

    pub fn evaluated(&mut self, seconds: f64) {
        self.evals += 1;
        self.eval_seconds += seconds;
    }

    /// Seconds for `steps` more steps and `evals` more evaluations (`None` before any step).
    pub fn left(&self, steps: u64, evals: u64) -> Option<f64> {
        if self.steps == 0 {
            return None;
        }
        let per_step = self.train_seconds / self.steps as f64;
        // Before the first evaluation, guess one costs as much as an epoch's steps would not:
        // leave it out rather than invent a figure.
        let per_eval = if self.evals == 0 {
            0.0
        } else {
            self.eval_seconds / self.evals as f64
        };
        Some(per_step * steps as f64 + per_eval * evals as f64)
    }
}

/// `1h02m`, `4m05s`, `12s`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}

/// The progress bar of rank 0 on a terminal (hidden elsewhere).
pub struct Display {
    bar: indicatif::ProgressBar,
    /// Whether stderr is a terminal (log lines then go above the bar).
    pub terminal: bool,
}

impl Display {
    pub fn new(lead: bool, total_steps: u64, done: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal && lead {
            indicatif::ProgressBar::new(total_steps)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_position(done);
        Display { bar, terminal }
    }

    pub fn epoch(&self, epoch: usize, epochs: usize) {
        self.bar.set_prefix(format!("{}/{epochs}", epoch + 1));
    }

    /// After a step: the epoch's loss so far, the learning rate, training images per second,
    /// the time left and the best test top-1 so far (NaN: none yet).
    pub fn step(&self, loss: f64, lr: f64, images_per_sec: f64, left: Option<f64>, best: f64) {
        self.bar.inc(1);
        if self.bar.is_hidden() {
            return;
        }
        let mut msg = format!("loss {loss:.4} lr {lr:.3e} {images_per_sec:.0} img/s");
        if let Some(left) = left {
            msg += &format!(" ETA {}", duration(left));
        }
        if !best.is_nan() {
            msg += &format!(" best {:.2}%", 100.0 * best);
        }
        self.bar.set_message(msg);
    }

    /// While the test split is evaluated (the bar would otherwise look frozen).
    pub fn evaluating(&self, images: u64) {
        self.bar
            .set_message(format!("evaluating on {images} test images ..."));
    }

    /// A line above the bar (on a terminal).
    pub fn println(&self, line: &str) {
        if self.terminal {
            self.bar.println(line);
        }
    }

    pub fn abandon(&self) {
        self.bar.abandon();
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_adds_steps_and_evaluations_at_their_own_rates() {
        let mut eta = Eta::default();
        assert_eq!(eta.left(10, 1), None);
        eta.trained(10, 5.0);
        assert_eq!(eta.left(4, 3), Some(2.0));
        eta.evaluated(3.0);
        eta.evaluated(1.0);
        assert_eq!(eta.left(4, 3), Some(2.0 + 6.0));
        assert_eq!(duration(7.4), "7s");
        assert_eq!(duration(245.0), "4m05s");
        assert_eq!(duration(3720.0), "1h02m");
    }
}
