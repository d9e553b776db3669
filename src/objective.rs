//! The four objectives (`--loss`), their heads and prediction rules (reference-spec section 1).

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::choice::Choice;
use crate::model::layers::{BatchNorm, Pass, linear};

/// `--loss`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    /// Softmax cross-entropy.
    Ce,
    /// Cross-entropy with label smoothing: 1 - ls on the true class, ls / (C - 1) elsewhere.
    CeLs,
    /// 1 - <f / |f|, psi(y)> against unit class embeddings psi.
    Cosine,
    /// Cosine plus `cls_weight` x cross-entropy of a head on the normalised embedding.
    CosineCe,
}

impl Choice for LossKind {
    const WHAT: &'static str = "loss";
    const ALL: &'static [LossKind] = &[
        LossKind::Ce,
        LossKind::CeLs,
        LossKind::Cosine,
        LossKind::CosineCe,
    ];
    fn name(self) -> &'static str {
        match self {
            LossKind::Ce => "ce",
            LossKind::CeLs => "ce-ls",
            LossKind::Cosine => "cosine",
            LossKind::CosineCe => "cosine-ce",
        }
    }
}

crate::choice_traits!(LossKind);

impl LossKind {
    pub fn uses_embedding(self) -> bool {
        matches!(self, LossKind::Cosine | LossKind::CosineCe)
    }
}

/// The objective's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveConfig {
    pub loss: LossKind,
    pub label_smoothing: f64,
    pub cls_weight: f64,
    /// Cross-entropy as Keras computes it (`--ce-clip`): softmax probabilities clipped to
    /// [1e-7, 1 - 1e-7] before the log, which zeroes the gradient of samples outside. Off: the
    /// log-softmax form. Absent in configurations written before the option (off).
    #[serde(default)]
    pub keras_ce_clip: bool,
}

/// Keras' probability clip (`epsilon()`).
pub const KERAS_EPSILON: f64 = 1e-7;

/// Keras L2 coefficient of the cosine+CE head's dense kernel.
pub const CLS_HEAD_L2: f64 = 5e-4;

/// What the head produces for a batch.
pub struct HeadOutput {
    /// CE: logits (N, C). Cosine: the L2-normalised embedding (N, D).
    pub primary: Tensor,
    /// Cosine+CE: the classification head's logits (N, C).
    pub cls_logits: Option<Tensor>,
}

/// The layers on top of the backbone's pooled features. Names: `fc` (the classifier or the
/// embedding layer, torchvision's name for the last layer), `head.bn` and `head.fc` (cosine+CE).
#[derive(Debug)]
pub struct Head {
    config: ObjectiveConfig,
    fc: nn::Linear,
    cls: Option<(BatchNorm, nn::Linear)>,
    /// Class embeddings psi, (C, D), rows as stored (cosine objectives).
    class_embedding: Option<Tensor>,
    /// psi is not the identity: accuracy by the reference's `max_sim_acc` rule.
    semantic: bool,
    classes: i64,
}

/// The reference's tolerance for a semantic embedding's best dot product (`nn_accuracy`).
pub const MAX_SIM_TOLERANCE: f64 = 1e-6;

/// x / sqrt(max(sum x^2, 1e-12)) along the last axis, as `tf.nn.l2_normalize`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let sq = x
        .pow_tensor_scalar(2)
        .sum_dim_intlist([-1i64].as_slice(), true, Kind::Float);
    x / sq.clamp_min(1e-12).sqrt()
}

impl Head {
    /// `class_embedding` (C, D) is required for the cosine objectives.
    pub fn new(
        root: &nn::Path,
        config: ObjectiveConfig,
        features: i64,
        classes: i64,
        class_embedding: Option<Tensor>,
    ) -> Self {
        let out = match (&class_embedding, config.loss.uses_embedding()) {
            (Some(e), true) => e.size()[1],
            _ => classes,
        };
        let fc = linear(root / "fc", features, out);
        let cls = (config.loss == LossKind::CosineCe).then(|| {
            let p = root / "head";
            (
                BatchNorm::new(&p / "bn", out),
                linear(&p / "fc", out, classes),
            )
        });
        let class_embedding = class_embedding.filter(|_| config.loss.uses_embedding());
        let semantic = class_embedding.as_ref().is_some_and(|e| {
            let eye = Tensor::eye(e.size()[0], (e.kind(), e.device()));
            e.size() != eye.size() || !bool::try_from(e.eq_tensor(&eye).all()).unwrap_or(false)
        });
        Head {
            config,
            fc,
            cls,
            class_embedding,
            semantic,
            classes,
        }
    }

    /// The head's output for training or evaluation (no synchronised statistics).
    pub fn forward_t(&self, features: &Tensor, train: bool) -> HeadOutput {
        self.forward(features, Pass::training(train))
    }

    pub fn forward(&self, features: &Tensor, pass: Pass) -> HeadOutput {
        // Losses and normalisation in fp32 also under bf16 autocast, which leaves a linear
        // layer's output in bf16.
        let out = self.fc.forward(features).to_kind(Kind::Float);
        if !self.config.loss.uses_embedding() {
            return HeadOutput {
                primary: out,
                cls_logits: None,
            };
        }
        let f = l2_normalize(&out);
        let cls_logits = self
            .cls
            .as_ref()
            .map(|(bn, fc)| bn.forward(&f.relu(), pass).apply(fc));
        HeadOutput {
            primary: f,
            cls_logits,
        }
    }

    /// The mean loss of a batch (L2 terms excluded: the optimiser adds them to the gradient).
    pub fn loss(&self, out: &HeadOutput, labels: &Tensor) -> Tensor {
        match self.config.loss {
            LossKind::Ce => self.ce(&out.primary, labels),
            LossKind::CeLs if self.config.keras_ce_clip => {
                let targets = smoothed_targets(
                    labels,
                    self.config.label_smoothing,
                    self.classes,
                    out.primary.device(),
                );
                keras_clipped_ce(&out.primary, &targets)
            }
            LossKind::CeLs => smoothed_ce(
                &out.primary,
                labels,
                self.config.label_smoothing,
                self.classes,
            ),
            LossKind::Cosine => self.cosine_loss(&out.primary, labels),
            LossKind::CosineCe => {
                let cls = out
                    .cls_logits
                    .as_ref()
                    .expect("cosine-ce has a classification head");
                self.cosine_loss(&out.primary, labels)
                    + self.ce(cls, labels) * self.config.cls_weight
            }
        }
    }

    /// Mean cross-entropy of `logits` against hard `labels`, in the configured form.
    fn ce(&self, logits: &Tensor, labels: &Tensor) -> Tensor {
        if self.config.keras_ce_clip {
            let targets = logits
                .zeros_like()
                .scatter_value(1, &labels.unsqueeze(1), 1.0);
            keras_clipped_ce(logits, &targets)
        } else {
            logits.cross_entropy_for_logits(labels)
        }
    }

    fn cosine_loss(&self, f: &Tensor, labels: &Tensor) -> Tensor {
        let psi = self
            .class_embedding
            .as_ref()
            .expect("cosine objectives have class embeddings");
        let targets = psi.index_select(0, labels);
        let dots = (f * targets).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
        (dots.neg() + 1.0).mean(Kind::Float)
    }

    /// Predicted classes: the objective's main prediction (CE: argmax; cosine: the class whose
    /// embedding has the largest dot product; cosine+CE: the head's argmax, which the paper
    /// reports) and, for cosine+CE, the embedding's prediction as well.
    pub fn predict(&self, out: &HeadOutput) -> (Tensor, Option<Tensor>) {
        match self.config.loss {
            LossKind::Ce | LossKind::CeLs => (out.primary.argmax(1, false), None),
            LossKind::Cosine => (self.nearest_class(&out.primary), None),
            LossKind::CosineCe => {
                let cls = out
                    .cls_logits
                    .as_ref()
                    .expect("cosine-ce has a classification head");
                (cls.argmax(1, false), Some(self.nearest_class(&out.primary)))
            }
        }
    }

    /// Which samples count as correct (N, bool) for the main prediction: the predicted class is
    /// the label; for the cosine loss with a semantic embedding, as the reference's
    /// `max_sim_acc`, the label's dot product is within 1e-6 of the best (ties count).
    /// `scores` are [`Head::scores`] of the same output.
    pub fn hits(&self, scores: &Tensor, predicted: &Tensor, labels: &Tensor) -> Tensor {
        if self.config.loss == LossKind::Cosine && self.semantic {
            let best = scores.amax([1i64].as_slice(), false);
            let at_label = scores.gather(1, &labels.unsqueeze(1), false).squeeze_dim(1);
            (best - at_label).lt(MAX_SIM_TOLERANCE)
        } else {
            predicted.eq_tensor(labels)
        }
    }

    /// Per-class scores (N, C) whose argmax is [`Head::predict`]'s main prediction: softmax
    /// probabilities for the cross-entropy heads (cosine+CE: its classification head's), the
    /// cosine similarity to each class embedding for the cosine loss.
    pub fn scores(&self, out: &HeadOutput) -> Tensor {
        match (self.config.loss, &out.cls_logits) {
            (LossKind::Cosine, _) => {
                let psi = self
                    .class_embedding
                    .as_ref()
                    .expect("cosine objectives have class embeddings");
                out.primary.matmul(&psi.transpose(0, 1))
            }
            (_, Some(cls)) => cls.softmax(1, Kind::Float),
            _ => out.primary.softmax(1, Kind::Float),
        }
    }

    fn nearest_class(&self, f: &Tensor) -> Tensor {
        let psi = self
            .class_embedding
            .as_ref()
            .expect("cosine objectives have class embeddings");
        f.matmul(&psi.transpose(0, 1)).argmax(1, false)
    }

    /// Whether a variable belongs to the head (the last layer `fc` and cosine+CE's `head.*`),
    /// which `--init-from ... --new-head` leaves freshly initialised.
    pub fn owns(name: &str) -> bool {
        name.starts_with("fc.") || name.starts_with("head.")
    }

    /// L2 coefficient of a head parameter by name, `None` if `name` is not the head's.
    pub fn l2_of(name: &str) -> Option<f64> {
        if name == "head.fc.weight" {
            Some(CLS_HEAD_L2)
        } else if name.starts_with("head.") {
            Some(0.0)
        } else {
            None
        }
    }
}

/// Smoothed target distributions (N, C): 1 - ls on the true class, ls / (C - 1) elsewhere (the
/// reference's convention, not PyTorch's ls / C).
pub fn smoothed_targets(labels: &Tensor, ls: f64, classes: i64, device: tch::Device) -> Tensor {
    let off = ls / (classes - 1).max(1) as f64;
    Tensor::full([labels.size()[0], classes], off, (Kind::Float, device)).scatter_value(
        1,
        &labels.unsqueeze(1),
        1.0 - ls,
    )
}

/// Cross-entropy against smoothed targets (see [`smoothed_targets`]), log-softmax form.
pub fn smoothed_ce(logits: &Tensor, labels: &Tensor, ls: f64, classes: i64) -> Tensor {
    let targets = smoothed_targets(labels, ls, classes, logits.device());
    -(logits.log_softmax(1, Kind::Float) * targets)
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .mean(Kind::Float)
}

/// Keras' categorical cross-entropy of `logits` against target distributions (N, C): softmax
/// probabilities clipped to [eps, 1 - eps], then -sum t log p, averaged over the batch.
pub fn keras_clipped_ce(logits: &Tensor, targets: &Tensor) -> Tensor {
    let p = logits
        .softmax(1, Kind::Float)
        .clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON);
    -(p.log() * targets)
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine_head(psi: Tensor) -> Head {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let config = ObjectiveConfig {
            loss: LossKind::Cosine,
            label_smoothing: 0.0,
            cls_weight: 0.0,
            keras_ce_clip: false,
        };
        Head::new(&vs.root(), config, 4, 2, Some(psi))
    }

    /// A semantic embedding counts a sample correct when its class's dot product is within
    /// 1e-6 of the best (ties count, as the reference's max_sim_acc); one-hot takes the argmax.
    #[test]
    fn semantic_ties_count_as_correct_and_rows_stay_as_stored() {
        let same = Tensor::from_slice(&[0.6f32, 0.8, 0.6, 0.8]).view([2, 2]);
        let head = cosine_head(same);
        let out = HeadOutput {
            primary: Tensor::from_slice(&[1f32, 0.0]).view([1, 2]),
            cls_logits: None,
        };
        let labels = Tensor::from_slice(&[1i64]);
        let (pred, _) = head.predict(&out);
        assert_eq!(i64::try_from(&pred).unwrap(), 0, "argmax takes the first");
        assert!(bool::try_from(head.hits(&head.scores(&out), &pred, &labels).all()).unwrap());
        let onehot = cosine_head(Tensor::eye(2, (Kind::Float, tch::Device::Cpu)));
        let tie = HeadOutput {
            primary: Tensor::from_slice(&[0.5f32, 0.5]).view([1, 2]),
            cls_logits: None,
        };
        let (pred, _) = onehot.predict(&tie);
        assert!(!bool::try_from(onehot.hits(&onehot.scores(&tie), &pred, &labels).all()).unwrap());
    }
}
