//! The network of a run: backbone and objective head in one variable store, built from the run
//! configuration and initialised from its seed.

use datasets_prep::manifest::ClassInfo;
use tch::nn;
use tch::{Device, Tensor};

use crate::config::RunConfig;
use crate::model::Backbone;
use crate::model::layers::Pass;
use crate::objective::{Head, HeadOutput};

/// The model: backbone and head in one variable store.
pub struct Network {
    pub vs: nn::VarStore,
    pub backbone: Backbone,
    pub head: Head,
    /// Images and kernels in channels-last memory order (`--channels-last`).
    pub channels_last: bool,
}

impl Network {
    /// Builds the network for `config`, images of `channels` channels and `classes`, on
    /// `device`, initialised from the configuration's seed.
    pub fn build(
        config: &RunConfig,
        channels: i64,
        classes: &[ClassInfo],
        device: Device,
    ) -> anyhow::Result<Network> {
        tch::manual_seed(config.seed as i64);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = Backbone::new(config.arch, &root, channels, config.conv_padding);
        let class_embedding = if config.objective.loss.uses_embedding() {
            Some(crate::embedding::load(&config.embedding, classes)?.to_device(device))
        } else {
            None
        };
        let head = Head::new(
            &root,
            config.objective,
            backbone.out_dim(),
            classes.len() as i64,
            class_embedding,
        );
        Ok(Network {
            vs,
            backbone,
            head,
            channels_last: false,
        })
    }

    /// The head's output for `images`; `pass` says how BatchNorm behaves.
    pub fn forward(&self, images: &Tensor, pass: Pass) -> HeadOutput {
        let features = if self.channels_last {
            self.backbone
                .forward(&crate::model::channels_last(images), pass)
        } else {
            self.backbone.forward(images, pass)
        };
        self.head.forward(&features, pass)
    }

    /// [`Network::forward`] in training (`Pass::Train`) or evaluation mode.
    pub fn forward_t(&self, images: &Tensor, train: bool) -> HeadOutput {
        self.forward(images, Pass::training(train))
    }

    /// Switches to channels-last memory order (before the optimiser is built, so that its
    /// velocities follow).
    pub fn use_channels_last(&mut self) {
        crate::model::to_channels_last(&self.vs);
        self.channels_last = true;
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// Bytes of every variable (parameters and buffers).
    pub fn state_bytes(&self) -> u64 {
        self.vs
            .variables()
            .values()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }
}

/// The L2 coefficient of every trainable tensor (reference-spec 4.6), plus half the
/// `--weight-decay` on every tensor: an L2 coefficient l adds 2 l w to the gradient, PyTorch's
/// coupled weight decay wd adds wd w.
pub fn l2_of(config: &RunConfig) -> impl Fn(&str, &Tensor) -> f64 + '_ {
    let decay = config.weight_decay / 2.0;
    move |name, tensor| {
        decay
            + match Head::l2_of(name) {
                Some(l2) => l2,
                // Kernels (convs, dense) have two or more dimensions; biases and BN parameters
                // one.
                None if tensor.dim() >= 2 => config.arch.kernel_l2(),
                None => 0.0,
            }
    }
}
