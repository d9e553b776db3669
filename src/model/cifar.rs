//! CIFAR-style ResNets (He et al. 2016, section 4.2): a 3x3 stem, three stages of basic blocks,
//! option-A shortcuts (2x2 average pool, zero channel padding split half before and half after),
//! glorot-uniform kernels, as the reference's `cifar_resnet.SmallResNet`. Stride-2 convolutions
//! pad as [`ConvPadding`] says (Keras' 'same': 0 before and 1 after on even sizes).

use tch::Tensor;
use tch::nn;

use super::ConvPadding;
use super::layers::{BatchNorm, ConvInit, Pass, conv2d};

#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: BatchNorm,
    conv2: nn::Conv2D,
    bn2: BatchNorm,
    stride: i64,
    c_in: i64,
    c_out: i64,
    /// Padding of `conv1` applied by hand (the conv itself pads nothing) when it is asymmetric.
    explicit_padding: Option<ConvPadding>,
}

impl BasicBlock {
    fn new(p: nn::Path, c_in: i64, c_out: i64, stride: i64, padding: ConvPadding) -> Self {
        // Stride 1 pads 1 on each side under both rules; only strided convs differ.
        let explicit_padding = (stride > 1 && padding == ConvPadding::Same).then_some(padding);
        let conv_pad = if explicit_padding.is_some() { 0 } else { 1 };
        BasicBlock {
            conv1: conv2d(
                &p / "conv1",
                c_in,
                c_out,
                3,
                stride,
                conv_pad,
                ConvInit::GlorotUniform,
            ),
            bn1: BatchNorm::new(&p / "bn1", c_out),
            conv2: conv2d(&p / "conv2", c_out, c_out, 3, 1, 1, ConvInit::GlorotUniform),
            bn2: BatchNorm::new(&p / "bn2", c_out),
            stride,
            c_in,
            c_out,
            explicit_padding,
        }
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Tensor {
        let input = match self.explicit_padding {
            Some(padding) => {
                let size = x.size();
                let (top, bottom) = padding.split(size[2], 3, self.stride);
                let (left, right) = padding.split(size[3], 3, self.stride);
                x.constant_pad_nd([left, right, top, bottom])
            }
            None => x.shallow_clone(),
        };
        let out = self.bn1.forward(&input.apply(&self.conv1), pass).relu();
        let out = self.bn2.forward(&out.apply(&self.conv2), pass);
        let mut shortcut = if self.stride > 1 {
            x.avg_pool2d(
                [self.stride, self.stride],
                [self.stride, self.stride],
                [0, 0],
                true,
                true,
                None,
            )
        } else {
            x.shallow_clone()
        };
        if self.c_out > self.c_in {
            let extra = self.c_out - self.c_in;
            shortcut = shortcut.constant_pad_nd([0, 0, 0, 0, extra / 2, extra - extra / 2]);
        }
        (out + shortcut).relu()
    }
}

/// A CIFAR ResNet of depth 6n + 2 with the given stage widths.
#[derive(Debug)]
pub struct CifarResNet {
    conv1: nn::Conv2D,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    out_dim: i64,
}

impl CifarResNet {
    pub fn new(
        p: &nn::Path,
        in_channels: i64,
        blocks_per_stage: usize,
        widths: [i64; 3],
        padding: ConvPadding,
    ) -> Self {
        let conv1 = conv2d(
            p / "conv1",
            in_channels,
            widths[0],
            3,
            1,
            1,
            ConvInit::GlorotUniform,
        );
        let bn1 = BatchNorm::new(p / "bn1", widths[0]);
        let mut blocks = Vec::new();
        let mut c_in = widths[0];
        for (stage, &width) in widths.iter().enumerate() {
            let layer = p / format!("layer{}", stage + 1);
            for i in 0..blocks_per_stage {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(&layer / i, c_in, width, stride, padding));
                c_in = width;
            }
        }
        CifarResNet {
            conv1,
            bn1,
            blocks,
            out_dim: widths[2],
        }
    }

    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }
}

impl CifarResNet {
    /// Images (N, C, H, W) to globally average-pooled features (N, out_dim).
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Tensor {
        let mut h = self.bn1.forward(&x.apply(&self.conv1), pass).relu();
        for block in &self.blocks {
            h = block.forward(&h, pass);
        }
        h.mean_dim([2i64, 3].as_slice(), false, tch::Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn same_padding_splits_the_odd_pixel_after() {
        assert_eq!(ConvPadding::Same.split(32, 3, 2), (0, 1));
        assert_eq!(ConvPadding::Same.split(16, 3, 2), (0, 1));
        assert_eq!(ConvPadding::Same.split(7, 3, 2), (1, 1));
        assert_eq!(ConvPadding::Same.split(8, 3, 1), (1, 1));
        assert_eq!(ConvPadding::Symmetric.split(32, 3, 2), (1, 1));
    }

    /// The strided block's forward pass equals the block computed by hand with the input padded
    /// 0 before and 1 after, and differs from padding 1 on both sides.
    #[test]
    fn a_strided_block_pads_as_keras_same() {
        let vs = nn::VarStore::new(Device::Cpu);
        let block = BasicBlock::new(vs.root() / "b", 4, 8, 2, ConvPadding::Same);
        let x = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
        // Fresh BatchNorms in evaluation: x / sqrt(1 + eps).
        let bn = |t: Tensor| t / (1.0 + super::super::layers::BN_EPS).sqrt();
        let by_hand = |pad: [i64; 4], conv_pad: i64| {
            let h = x.constant_pad_nd(pad).conv2d(
                &block.conv1.ws,
                None::<&Tensor>,
                [2, 2],
                [conv_pad, conv_pad],
                [1, 1],
                1,
            );
            let h = bn(h).relu();
            let h = bn(h.conv2d(&block.conv2.ws, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1));
            let shortcut = x
                .avg_pool2d([2, 2], [2, 2], [0, 0], true, true, None)
                .constant_pad_nd([0, 0, 0, 0, 2, 2]);
            (h + shortcut).relu()
        };
        let ours = tch::no_grad(|| block.forward(&x, Pass::Eval));
        let same = tch::no_grad(|| by_hand([0, 1, 0, 1], 0));
        let symmetric = tch::no_grad(|| by_hand([0, 0, 0, 0], 1));
        assert_eq!(ours.size(), [2, 8, 4, 4]);
        assert!(ours.allclose(&same, 1e-5, 1e-5, false));
        assert!(!ours.allclose(&symmetric, 1e-3, 1e-3, false));
    }
}
