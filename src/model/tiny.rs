//! `tiny-cnn`: three 3x3 convolutions with biases and ReLUs, global average pooling, no
//! BatchNorm. Its gradient depends on each sample alone, so a data-parallel run must reproduce a
//! one-rank run up to float summation order; the exactness tests use it. It also makes a quick
//! smoke test of a new machine or dataset.

use tch::Tensor;
use tch::nn::{self, Init};

use super::layers::glorot_uniform;

pub const TINY_WIDTHS: [i64; 3] = [16, 32, 64];

#[derive(Debug)]
pub struct TinyCnn {
    convs: Vec<nn::Conv2D>,
}

impl TinyCnn {
    pub fn new(p: &nn::Path, in_channels: i64) -> Self {
        let mut c_in = in_channels;
        let convs = TINY_WIDTHS
            .iter()
            .enumerate()
            .map(|(i, &c_out)| {
                let config = nn::ConvConfig {
                    stride: if i == 0 { 1 } else { 2 },
                    padding: 1,
                    bias: true,
                    ws_init: glorot_uniform(c_in * 9, c_out * 9),
                    bs_init: Init::Const(0.0),
                    ..Default::default()
                };
                let conv = nn::conv2d(p / format!("conv{}", i + 1), c_in, c_out, 3, config);
                c_in = c_out;
                conv
            })
            .collect();
        TinyCnn { convs }
    }

    pub fn out_dim(&self) -> i64 {
        TINY_WIDTHS[2]
    }
}

impl TinyCnn {
    /// Pooled features of `xs` (no BatchNorm: the pass changes nothing).
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let mut x = xs.shallow_clone();
        for conv in &self.convs {
            x = x.apply(conv).relu();
        }
        x.mean_dim(&[2i64, 3][..], false, tch::Kind::Float)
    }
}
