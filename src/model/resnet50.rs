//! ResNet-50 v1 as keras-applications builds it (the reference's backbone for the fine-grained
//! datasets): stride on the first 1x1 conv of a stage's first block, projection shortcuts, a
//! padded 3x3/2 max-pool after the stem, truncated he-normal kernels. Parameter names follow
//! torchvision's `resnet50`, so the weights load there with `strict=True` (torchvision puts the
//! stride on the 3x3 conv, "v1.5"; shapes are identical, the computation differs).

use tch::Tensor;
use tch::nn;

use super::layers::{BatchNorm, ConvInit, Pass, conv2d};

#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: BatchNorm,
    conv2: nn::Conv2D,
    bn2: BatchNorm,
    conv3: nn::Conv2D,
    bn3: BatchNorm,
    downsample: Option<(nn::Conv2D, BatchNorm)>,
}

impl Bottleneck {
    fn new(p: nn::Path, c_in: i64, width: i64, stride: i64) -> Self {
        let c_out = width * 4;
        let init = ConvInit::TruncatedHeNormal;
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = &p / "downsample";
            (
                conv2d(&d / "0", c_in, c_out, 1, stride, 0, init),
                BatchNorm::new(&d / "1", c_out),
            )
        });
        Bottleneck {
            conv1: conv2d(&p / "conv1", c_in, width, 1, stride, 0, init),
            bn1: BatchNorm::new(&p / "bn1", width),
            conv2: conv2d(&p / "conv2", width, width, 3, 1, 1, init),
            bn2: BatchNorm::new(&p / "bn2", width),
            conv3: conv2d(&p / "conv3", width, c_out, 1, 1, 0, init),
            bn3: BatchNorm::new(&p / "bn3", c_out),
            downsample,
        }
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Tensor {
        let out = self.bn1.forward(&x.apply(&self.conv1), pass).relu();
        let out = self.bn2.forward(&out.apply(&self.conv2), pass).relu();
        let out = self.bn3.forward(&out.apply(&self.conv3), pass);
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&x.apply(conv), pass),
            None => x.shallow_clone(),
        };
        (out + shortcut).relu()
    }
}

#[derive(Debug)]
pub struct ResNet50 {
    conv1: nn::Conv2D,
    bn1: BatchNorm,
    blocks: Vec<Bottleneck>,
}

/// Output features of the backbone.
pub const RESNET50_FEATURES: i64 = 2048;

impl ResNet50 {
    pub fn new(p: &nn::Path, in_channels: i64) -> Self {
        let conv1 = conv2d(
            p / "conv1",
            in_channels,
            64,
            7,
            2,
            3,
            ConvInit::TruncatedHeNormal,
        );
        let bn1 = BatchNorm::new(p / "bn1", 64);
        let mut blocks = Vec::new();
        let mut c_in = 64;
        for (stage, (&width, &count)) in [64i64, 128, 256, 512]
            .iter()
            .zip(&[3usize, 4, 6, 3])
            .enumerate()
        {
            let layer = p / format!("layer{}", stage + 1);
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(&layer / i, c_in, width, stride));
                c_in = width * 4;
            }
        }
        ResNet50 { conv1, bn1, blocks }
    }
}

impl ResNet50 {
    /// The stem's feature map: conv 7x7/2, BatchNorm, ReLU, then the padded 3x3/2 max-pool (a
    /// 448x448 input gives 112x112). Public so that tests can check the stem on its own.
    pub fn stem(&self, x: &Tensor, pass: Pass) -> Tensor {
        let h = self.bn1.forward(&x.apply(&self.conv1), pass).relu();
        // Zero padding after a ReLU equals -inf padding: keras' pool1_pad + valid max-pool.
        h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)
    }

    /// Pooled features of `x`.
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Tensor {
        let mut h = self.stem(x, pass);
        for block in &self.blocks {
            h = block.forward(&h, pass);
        }
        h.mean_dim([2i64, 3].as_slice(), false, tch::Kind::Float)
    }
}
