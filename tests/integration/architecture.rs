//! Architectural details of the reference (reference-spec 2.1, 2.3, 3.1, 4.5-4.7) checked on
//! computed outputs: ResNet-50 v1's stride placement and stem, the initialisers' scales, random
//! erasing's draw rules and the flip rate, the paper presets, and which parameters get which L2.
//! Every expectation is derived from the spec, never copied from the code.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use cosine_train::config::{Overrides, Preset, RunConfig, preset_names};
use cosine_train::data::augment::{self, AugmentConfig, Normalize, Source};
use cosine_train::model::layers::{Pass, glorot_uniform, truncated_he_normal_};
use cosine_train::model::resnet50::ResNet50;
use cosine_train::model::{Arch, Backbone, ConvPadding};
use cosine_train::network::{Network, l2_of};
use cosine_train::objective::LossKind;
use cosine_train::optim::Sgd;
use cosine_train::schedule::Schedule;
use datasets_prep::manifest::ClassInfo;
use tch::nn;
use tch::{Device, Kind, Tensor};

const RESNET110_WFC: Arch = Arch::Cifar {
    depth: 110,
    wide: true,
};

const LOSSES: [LossKind; 4] = [
    LossKind::Ce,
    LossKind::CeLs,
    LossKind::Cosine,
    LossKind::CosineCe,
];

fn scalar(t: &Tensor) -> f64 {
    f64::try_from(t).unwrap()
}

/// Mean, standard deviation (unbiased) and largest magnitude of `t`.
fn moments(t: &Tensor) -> (f64, f64, f64) {
    let t = t.detach().to_kind(Kind::Double);
    (
        scalar(&t.mean(Kind::Double)),
        scalar(&t.std(true)),
        scalar(&t.abs().max()),
    )
}

/// The largest magnitude in `t`.
fn max_abs(t: &Tensor) -> f64 {
    scalar(&t.detach().to_kind(Kind::Double).abs().max())
}

/// The largest absolute difference of `a` and `b`, relative to the largest magnitude in `b`.
fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    scalar(&(a - b).abs().max()) / scalar(&b.abs().max())
}

// ---------------------------------------------------------------------------------------------
// ResNet-50 v1 (reference-spec 2.1)
// ---------------------------------------------------------------------------------------------

/// How the hand-written reference forward builds ResNet-50.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    /// keras-applications >= 1.0.6: stride on the first 1x1 conv, zero-pad 1 before the pool.
    V1,
    /// torchvision's "v1.5": the stride on the 3x3 conv.
    V15,
    /// keras-applications <= 1.0.4: no `pool1_pad`.
    V1WithoutPoolPad,
}

/// ResNet-50 at inference computed by hand from a variable store's tensors (by torchvision
/// name), recording which variables it read.
struct Reference {
    vars: HashMap<String, Tensor>,
    used: RefCell<HashSet<String>>,
}

impl Reference {
    fn new(vs: &nn::VarStore) -> Self {
        Reference {
            vars: vs.variables(),
            used: RefCell::new(HashSet::new()),
        }
    }

    fn var(&self, name: String) -> &Tensor {
        let t = self
            .vars
            .get(&name)
            .unwrap_or_else(|| panic!("the model has no variable {name}"));
        self.used.borrow_mut().insert(name);
        t
    }

    /// A bias-free conv (a conv bias before BN is inert, reference-spec 2.1).
    fn conv(&self, name: &str, x: &Tensor, stride: i64, padding: i64) -> Tensor {
        x.conv2d(
            self.var(format!("{name}.weight")),
            None::<&Tensor>,
            [stride, stride],
            [padding, padding],
            [1, 1],
            1,
        )
    }

    /// Keras BN at inference: (x - mean) / sqrt(var + 1e-3) * gamma + beta (spec 4.7).
    fn bn(&self, name: &str, x: &Tensor) -> Tensor {
        let p = |s: &str| self.var(format!("{name}.{s}")).view([1, -1, 1, 1]);
        self.var(format!("{name}.num_batches_tracked"));
        (x - p("running_mean")) / (p("running_var") + 1e-3).sqrt() * p("weight") + p("bias")
    }

    /// Stem: conv 7x7/2 (zero-pad 3), BN, ReLU, zero-pad 1 (unless `variant` lacks it), valid
    /// max-pool 3x3/2.
    fn stem(&self, x: &Tensor, variant: Variant) -> Tensor {
        let h = self.bn("bn1", &self.conv("conv1", x, 2, 3)).relu();
        let pad = if variant == Variant::V1WithoutPoolPad {
            0
        } else {
            1
        };
        h.constant_pad_nd([pad, pad, pad, pad])
            .max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
    }

    /// Pooled features: stem, 3/4/6/3 bottleneck blocks (conv-BN-ReLU, conv-BN-ReLU, conv-BN,
    /// add, ReLU), a projection shortcut with the block's stride in each stage's first block,
    /// stride 2 in the first block of stages 3-5, then global average pooling.
    fn forward(&self, x: &Tensor, variant: Variant) -> Tensor {
        let mut h = self.stem(x, variant);
        for (stage, blocks) in [3, 4, 6, 3].into_iter().enumerate() {
            for i in 0..blocks {
                let b = format!("layer{}.{i}", stage + 1);
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let (s1, s2) = match variant {
                    Variant::V15 => (1, stride),
                    Variant::V1 | Variant::V1WithoutPoolPad => (stride, 1),
                };
                let out = self.conv(&format!("{b}.conv1"), &h, s1, 0);
                let out = self.bn(&format!("{b}.bn1"), &out).relu();
                let out = self.conv(&format!("{b}.conv2"), &out, s2, 1);
                let out = self.bn(&format!("{b}.bn2"), &out).relu();
                let out = self.conv(&format!("{b}.conv3"), &out, 1, 0);
                let out = self.bn(&format!("{b}.bn3"), &out);
                let shortcut = if i == 0 {
                    let s = self.conv(&format!("{b}.downsample.0"), &h, stride, 0);
                    self.bn(&format!("{b}.downsample.1"), &s)
                } else {
                    h.shallow_clone()
                };
                h = (out + shortcut).relu();
            }
        }
        h.mean_dim([2i64, 3].as_slice(), false, Kind::Float)
    }
}

/// Gives every BatchNorm of `vs` random statistics and affine parameters, so that a reference
/// which wired a BN to the wrong conv (or skipped one) would not agree by accident.
fn randomise_batchnorms(vs: &nn::VarStore) {
    let vars = vs.variables();
    tch::no_grad(|| {
        for name in vars.keys() {
            let Some(prefix) = name.strip_suffix(".running_mean") else {
                continue;
            };
            for (field, lo, up) in [
                ("running_mean", -0.2, 0.2),
                ("running_var", 0.5, 2.0),
                ("weight", 0.5, 1.5),
                ("bias", -0.2, 0.2),
            ] {
                let _ = vars[&format!("{prefix}.{field}")]
                    .shallow_clone()
                    .uniform_(lo, up);
            }
        }
    });
}

#[test]
fn resnet50_is_v1_with_the_stride_on_the_first_1x1_conv() {
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let backbone = Backbone::new(Arch::ResNet50, &vs.root(), 3, ConvPadding::Same);
    randomise_batchnorms(&vs);
    let reference = Reference::new(&vs);
    // Non-square, and small enough to be fast: 64x80 -> 16x20 after the stem -> 2x3 in stage 5.
    let x = Tensor::randn([2, 3, 64, 80], (Kind::Float, Device::Cpu));
    let (model, v1, v15, unpadded) = tch::no_grad(|| {
        (
            backbone.forward(&x, Pass::Eval),
            reference.forward(&x, Variant::V1),
            reference.forward(&x, Variant::V15),
            reference.forward(&x, Variant::V1WithoutPoolPad),
        )
    });
    assert_eq!(model.size(), [2, 2048]);
    let d_v1 = relative_difference(&model, &v1);
    assert!(
        d_v1 < 1e-4,
        "the backbone differs from ResNet-50 v1 (stride on conv1) by {d_v1:e}"
    );
    // The other variants give clearly different features: the comparison can tell them apart.
    let d_v15 = relative_difference(&model, &v15);
    assert!(
        d_v15 > 1e-2,
        "stride on conv2 (v1.5) gives the same features ({d_v15:e}): test cannot discriminate"
    );
    let d_unpadded = relative_difference(&model, &unpadded);
    assert!(
        d_unpadded > 1e-2,
        "no pool padding gives the same features ({d_unpadded:e})"
    );
    // The reference read every variable of the model: there is no layer it does not know of.
    let all: BTreeSet<String> = vs.variables().into_keys().collect();
    let used: BTreeSet<String> = reference.used.borrow().iter().cloned().collect();
    let unused: Vec<_> = all.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "variables outside ResNet-50 v1: {unused:?}"
    );
}

#[test]
fn resnet50_stem_max_pool_is_padded_448_to_112_and_224_to_56() {
    tch::manual_seed(6);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet50::new(&vs.root(), 3);
    randomise_batchnorms(&vs);
    let reference = Reference::new(&vs);
    // conv 7x7/2 with zero-pad 3, then zero-pad 1 and a valid 3x3/2 max-pool (reference-spec
    // 2.1, keras-applications >= 1.0.6): n -> (n + 6 - 7) / 2 + 1 -> (m + 2 - 3) / 2 + 1.
    let after_stem = |n: i64| {
        let m = (n + 2 * 3 - 7) / 2 + 1;
        (m + 2 - 3) / 2 + 1
    };
    assert_eq!((after_stem(448), after_stem(224)), (112, 56), "spec 2.1");
    for size in [448, 224] {
        let x = Tensor::randn([1, 3, size, size], (Kind::Float, Device::Cpu));
        let (stem, expected) =
            tch::no_grad(|| (net.stem(&x, Pass::Eval), reference.stem(&x, Variant::V1)));
        let s = after_stem(size);
        assert_eq!(stem.size(), [1, 64, s, s], "input {size}");
        let d = relative_difference(&stem, &expected);
        assert!(
            d < 1e-5,
            "input {size}: stem differs from the reference by {d:e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Initialisers (reference-spec 2.1, 4.7)
// ---------------------------------------------------------------------------------------------

/// P(|Z| < 2) and P(|Z| < 1) for a standard normal Z.
const P_WITHIN_2: f64 = 0.954_499_736_103_641_6;
const P_WITHIN_1: f64 = 0.682_689_492_137_085_9;

/// Std of a standard normal truncated to [-2, 2]: sqrt(1 - 2 * 2 phi(2) / P(|Z| < 2)).
fn truncated_normal_std_factor() -> f64 {
    let phi2 = (-2.0f64).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (1.0 - 4.0 * phi2 / P_WITHIN_2).sqrt()
}

/// Checks that `t` looks like Keras' truncated he-normal for `fan_in`: realised std
/// sqrt(2 / fan_in) (within `tolerance`, relative), nothing beyond 2 sigma of the raw draw.
fn assert_truncated_he_normal(t: &Tensor, fan_in: i64, tolerance: f64, what: &str) {
    let target = (2.0 / fan_in as f64).sqrt();
    let sigma_raw = target / truncated_normal_std_factor();
    let (mean, std, max_abs) = moments(t);
    let n = t.numel() as f64;
    assert!(
        (std / target - 1.0).abs() < tolerance,
        "{what}: std {std} vs sqrt(2 / {fan_in}) = {target}"
    );
    assert!(
        mean.abs() < 5.0 * target / n.sqrt(),
        "{what}: mean {mean} (std {target}, {n} values)"
    );
    assert!(
        max_abs <= 2.0 * sigma_raw * (1.0 + 1e-6),
        "{what}: |value| {max_abs} beyond 2 sigma of the draw ({})",
        2.0 * sigma_raw
    );
}

/// Checks that `t` looks like glorot-uniform U(-limit, limit), limit sqrt(6 / (fan_in +
/// fan_out)): inside the bounds, reaching them, std limit / sqrt(3) (relative `tolerance`).
fn assert_glorot_uniform(t: &Tensor, fan_in: i64, fan_out: i64, tolerance: f64, what: &str) {
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let (mean, std, max_abs) = moments(t);
    let n = t.numel() as f64;
    assert!(
        max_abs <= limit * (1.0 + 1e-6),
        "{what}: |value| {max_abs} beyond the limit {limit}"
    );
    // The largest of n uniform magnitudes falls below limit (1 - 20 / n) with chance e^-20.
    assert!(
        max_abs >= limit * (1.0 - 20.0 / n),
        "{what}: largest |value| {max_abs} far below the limit {limit} ({n} values)"
    );
    let expected_std = limit / 3f64.sqrt();
    assert!(
        (std / expected_std - 1.0).abs() < tolerance,
        "{what}: std {std} vs limit / sqrt(3) = {expected_std}"
    );
    assert!(
        mean.abs() < 5.0 * expected_std / n.sqrt(),
        "{what}: mean {mean}"
    );
}

#[test]
fn truncated_he_normal_has_the_he_std_and_is_cut_at_two_sigma() {
    tch::manual_seed(7);
    let fan_in = 3 * 3 * 64;
    let mut t = Tensor::zeros([1 << 20], (Kind::Float, Device::Cpu));
    truncated_he_normal_(&mut t, fan_in);
    assert_truncated_he_normal(&t, fan_in, 0.01, "2^20 values");
    // A truncated normal, not a clipped or rescaled one: the share beyond 1 sigma of the draw
    // is (P(|Z| < 2) - P(|Z| < 1)) / P(|Z| < 2) = 0.2848, and the last 0.5% of the range just
    // below 2 sigma holds 0.11% of the values (clipping would pile 4.5% at the bound).
    let sigma_raw = (2.0 / fan_in as f64).sqrt() / truncated_normal_std_factor();
    let share = |threshold: f64| {
        scalar(
            &t.abs()
                .gt(threshold)
                .to_kind(Kind::Double)
                .mean(Kind::Double),
        )
    };
    let beyond_1 = share(sigma_raw);
    let expected = (P_WITHIN_2 - P_WITHIN_1) / P_WITHIN_2;
    assert!(
        (beyond_1 - expected).abs() < 0.005,
        "share beyond 1 sigma {beyond_1}, expected {expected}"
    );
    let at_the_cut = share(1.99 * sigma_raw);
    assert!(
        at_the_cut < 0.003,
        "share in [1.99, 2] sigma {at_the_cut}: values piled at the cut"
    );
}

#[test]
fn glorot_uniform_has_the_glorot_limit_and_std() {
    tch::manual_seed(8);
    let (fan_in, fan_out) = (3 * 3 * 128, 3 * 3 * 64);
    let t = nn::init(glorot_uniform(fan_in, fan_out), &[1 << 20], Device::Cpu);
    assert_glorot_uniform(&t, fan_in, fan_out, 0.01, "2^20 values");
    // Uniform, not normal: the share beyond limit / 2 is 1/2.
    let limit = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let share = scalar(
        &t.abs()
            .gt(limit / 2.0)
            .to_kind(Kind::Double)
            .mean(Kind::Double),
    );
    assert!(
        (share - 0.5).abs() < 0.005,
        "share beyond limit / 2: {share}"
    );
}

/// A network as a run builds it, for `arch` and `loss` and 10 classes.
fn network(arch: Arch, loss: LossKind) -> Network {
    let mut config = RunConfig::resolve(Path::new("d"), &Overrides::default(), None).unwrap();
    config.arch = arch;
    config.objective.loss = loss;
    Network::build(&config, 3, &classes(10), Device::Cpu).unwrap()
}

fn classes(n: usize) -> Vec<ClassInfo> {
    (0..n)
        .map(|i| ClassInfo {
            id: i.to_string(),
            name: format!("class {i}"),
        })
        .collect()
}

/// Whether `name` (`X.weight`, `X.bias`) belongs to a BatchNorm: `X` has running statistics.
fn is_batchnorm(vars: &HashMap<String, Tensor>, name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(prefix, _)| vars.contains_key(&format!("{prefix}.running_mean")))
}

/// Per-tensor tolerance on a std estimated from `n` values: 6 standard errors of the estimate
/// (relative SE of a sample std is at most about 1 / sqrt(2 n) for these light-tailed laws).
fn std_tolerance(n: usize) -> f64 {
    6.0 / (2.0 * n as f64).sqrt()
}

#[test]
fn networks_are_initialised_as_the_reference() {
    // reference-spec 2.1 and 4.7: ResNet-50 convs truncated he-normal (fan_in = kh kw c_in);
    // CIFAR-ResNet convs and every dense kernel glorot-uniform (receptive-field scaling);
    // biases 0; BN gamma 1, beta 0, running mean 0, running variance 1.
    for (arch, loss) in [
        (Arch::ResNet50, LossKind::CosineCe),
        (RESNET110_WFC, LossKind::CosineCe),
    ] {
        tch::manual_seed(9);
        let net = network(arch, loss);
        let vars = net.vs.variables();
        let mut kernels = 0;
        for (name, t) in &vars {
            let what = format!("{arch:?} {name}");
            let n = t.numel();
            if name.ends_with(".running_var") {
                assert_eq!(max_abs(&(t - 1.0)), 0.0, "{what}: expected all 1");
            } else if name.ends_with(".running_mean") || name.ends_with(".num_batches_tracked") {
                assert_eq!(max_abs(t), 0.0, "{what}: expected zeros");
            } else if is_batchnorm(&vars, name) {
                let expected = if name.ends_with(".weight") { 1.0 } else { 0.0 };
                assert_eq!(
                    max_abs(&(t - expected)),
                    0.0,
                    "{what}: expected all {expected}"
                );
            } else if name.ends_with(".bias") {
                assert_eq!(max_abs(t), 0.0, "{what}: expected zeros");
            } else if name.ends_with(".weight") && t.dim() == 4 {
                kernels += 1;
                let s = t.size();
                let (c_out, c_in, kh, kw) = (s[0], s[1], s[2], s[3]);
                match arch {
                    Arch::ResNet50 => {
                        assert_truncated_he_normal(t, kh * kw * c_in, std_tolerance(n), &what)
                    }
                    _ => assert_glorot_uniform(
                        t,
                        kh * kw * c_in,
                        kh * kw * c_out,
                        std_tolerance(n),
                        &what,
                    ),
                }
            } else if name.ends_with(".weight") && t.dim() == 2 {
                kernels += 1;
                let s = t.size();
                assert_glorot_uniform(t, s[1], s[0], std_tolerance(n), &what);
            } else {
                panic!("{what}: neither BN, bias, conv kernel nor dense kernel");
            }
        }
        // ResNet-50: 49 convs + 4 projections; CIFAR: 109 convs; plus `fc` and `head.fc`.
        let expected_kernels = match arch {
            Arch::ResNet50 => 1 + 3 * (3 + 4 + 6 + 3) + 4 + 2,
            _ => 1 + 3 * 18 * 2 + 2,
        };
        assert_eq!(kernels, expected_kernels, "{arch:?}: kernels checked");
    }
}

// ---------------------------------------------------------------------------------------------
// Random erasing and flips (reference-spec 3.1)
// ---------------------------------------------------------------------------------------------

const MEAN: [f32; 3] = [120.0, 110.0, 100.0];
const STD: [f32; 3] = [60.0, 70.0, 80.0];
/// The value of every pixel of the constant test images.
const GREY: u8 = 50;

fn norm() -> Normalize<'static> {
    Normalize {
        mean: &MEAN,
        std: &STD,
    }
}

/// An erased rectangle in image coordinates.
#[derive(Clone, Copy, Debug)]
struct Rect {
    top: usize,
    left: usize,
    h: usize,
    w: usize,
}

/// Processes `draws` constant 3-channel h x w images with `erase_prob` (no crop, no flip), and
/// returns each draw's erased rectangle (`None`: nothing erased) and the erased values,
/// denormalised back to pixel units. Panics if the erased pixels do not form one rectangle.
fn erase_draws(
    h: usize,
    w: usize,
    erase_prob: f64,
    draws: u64,
    seed: u64,
) -> (Vec<Option<Rect>>, Vec<f64>) {
    let pixels = vec![GREY; h * w * 3];
    let src = Source {
        pixels: &pixels,
        height: h,
        width: w,
        channels: 3,
    };
    let cfg = AugmentConfig {
        crop: None,
        hflip: false,
        erase_prob,
        shift: 0.0,
        rrc_scale: None,
    };
    let plain: Vec<u32> = (0..3)
        .map(|c| ((f32::from(GREY) - MEAN[c]) / STD[c]).to_bits())
        .collect();
    let plane = h * w;
    let mut rects = Vec::new();
    let mut noise = Vec::new();
    let mut out = vec![0.0f32; 3 * plane];
    for i in 0..draws {
        let mut rng = augment::sample_rng(seed, i % 3, i / 3);
        augment::process(&src, 3, &norm(), &cfg, Some(&mut rng), &mut out);
        let erased =
            |y: usize, x: usize| (0..3).any(|c| out[c * plane + y * w + x].to_bits() != plain[c]);
        let (mut y0, mut y1, mut x0, mut x1, mut count) = (usize::MAX, 0, usize::MAX, 0, 0);
        for y in 0..h {
            for x in 0..w {
                if erased(y, x) {
                    (y0, y1, x0, x1) = (y0.min(y), y1.max(y), x0.min(x), x1.max(x));
                    count += 1;
                    for c in 0..3 {
                        let v = out[c * plane + y * w + x];
                        noise.push(f64::from(v) * f64::from(STD[c]) + f64::from(MEAN[c]));
                    }
                }
            }
        }
        if count == 0 {
            rects.push(None);
            continue;
        }
        let rect = Rect {
            top: y0,
            left: x0,
            h: y1 - y0 + 1,
            w: x1 - x0 + 1,
        };
        assert_eq!(
            count,
            rect.h * rect.w,
            "draw {i}: erased pixels are not one filled rectangle {rect:?}"
        );
        rects.push(Some(rect));
    }
    (rects, noise)
}

/// The per-draw rules: h = int(sqrt(s HW r)), w = int(sqrt(s HW / r)) for some s in
/// [0.02, 0.3] and r in [0.3, 1/0.3], so s HW lies in [h w, (h+1)(w+1)) and r in
/// (h / (w+1), (h+1) / w); h < H, w < W; corner from randint(0, W - w) and randint(0, H - h),
/// upper bounds exclusive, so the rectangle ends at least one pixel before the last row and column.
fn assert_draw_rules(r: &Rect, height: usize, width: usize, what: &str) {
    let area = (height * width) as f64;
    let (h, w) = (r.h as f64, r.w as f64);
    assert!(
        h * w <= 0.3 * area,
        "{what}: {r:?} covers more than 0.3 of the image"
    );
    assert!(
        (h + 1.0) * (w + 1.0) > 0.02 * area,
        "{what}: {r:?} is smaller than 0.02 of the image allows"
    );
    assert!(
        h / (w + 1.0) < 1.0 / 0.3,
        "{what}: {r:?} taller than r = 1/0.3"
    );
    assert!((h + 1.0) / w > 0.3, "{what}: {r:?} wider than r = 0.3");
    assert!(
        r.h < height && r.w < width,
        "{what}: {r:?} as large as the image"
    );
    assert!(
        r.top + r.h < height && r.left + r.w < width,
        "{what}: {r:?} reaches past randint's exclusive bound in a {height}x{width} image"
    );
}

#[test]
fn random_erasing_follows_the_reference_draw_rules() {
    // A square image: no draw is ever redrawn (h = sqrt(s r) H < H for s <= 0.3, r <= 1/0.3), so
    // the measured rectangles follow the drawn distributions.
    let (size, draws) = (64, 1000);
    let (rects, noise) = erase_draws(size, size, 1.0, draws, 21);
    let rects: Vec<Rect> = rects
        .iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| panic!("draw {i}: erase_prob 1 erased nothing")))
        .collect();
    let area = (size * size) as f64;
    for (i, r) in rects.iter().enumerate() {
        assert_draw_rules(r, size, size, &format!("draw {i}"));
    }
    let n = rects.len() as f64;
    // s ~ U(0.02, 0.3): mean 0.16, std 0.28 / sqrt(12); each draw's s lies in
    // [h w, (h+1)(w+1)) / HW.
    let tolerance = 4.0 * 0.28 / 12f64.sqrt() / n.sqrt();
    let s_low: Vec<f64> = rects.iter().map(|r| (r.h * r.w) as f64 / area).collect();
    let s_high: Vec<f64> = rects
        .iter()
        .map(|r| ((r.h + 1) * (r.w + 1)) as f64 / area)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&s_low) < 0.16 + tolerance && mean(&s_high) > 0.16 - tolerance,
        "mean area fraction in [{}, {}), expected 0.16",
        mean(&s_low),
        mean(&s_high)
    );
    assert!(
        s_low.iter().any(|&s| s < 0.04) && s_high.iter().any(|&s| s > 0.28),
        "area fractions do not span [0.02, 0.3]"
    );
    // r ~ U(0.3, 1/0.3) (height / width): P(r > 1) = (1/0.3 - 1) / (1/0.3 - 0.3) = 0.769, and
    // h > w implies r > 1 (h < w implies r < 1). Log-uniform r, or h and w swapped, would
    // give 0.5 or 0.231.
    let p_tall = (1.0 / 0.3 - 1.0) / (1.0 / 0.3 - 0.3);
    let tall = rects.iter().filter(|r| r.h > r.w).count() as f64 / n;
    let wide = rects.iter().filter(|r| r.h < r.w).count() as f64 / n;
    assert!(
        (tall - p_tall).abs() < 0.06 && (wide - (1.0 - p_tall)).abs() < 0.06,
        "share taller than wide {tall}, wider than tall {wide}; expected {p_tall} and {}",
        1.0 - p_tall
    );
    // The corner is uniform over the whole allowed range: both ends are reached.
    assert!(rects.iter().any(|r| r.left == 0) && rects.iter().any(|r| r.top == 0));
    assert!(rects.iter().any(|r| r.left + r.w == size - 1));
    assert!(rects.iter().any(|r| r.top + r.h == size - 1));
    // The fill is per-pixel, per-channel U(0, 255) noise, normalised like the image.
    let m = mean(&noise);
    let sd = (noise.iter().map(|v| (v - m).powi(2)).sum::<f64>() / noise.len() as f64).sqrt();
    let (lo, hi) = noise
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(
        lo > -1e-3 && hi < 255.0 + 1e-3,
        "noise outside [0, 255]: {lo}..{hi}"
    );
    assert!((m - 127.5).abs() < 1.0, "noise mean {m}, expected 127.5");
    let expected_sd = 255.0 / 12f64.sqrt();
    assert!(
        (sd - expected_sd).abs() < 0.5,
        "noise std {sd}, expected {expected_sd}"
    );
}

#[test]
fn random_erasing_stays_inside_a_non_square_image() {
    // 40x96: large draws do not fit the height and are redrawn; every result keeps the rules.
    let (h, w) = (40, 96);
    let (rects, _) = erase_draws(h, w, 1.0, 600, 22);
    for (i, r) in rects.iter().enumerate() {
        let r = r.unwrap_or_else(|| panic!("draw {i}: erase_prob 1 erased nothing"));
        assert_draw_rules(&r, h, w, &format!("draw {i}"));
    }
    assert!(rects.iter().flatten().any(|r| r.left + r.w == w - 1));
    assert!(rects.iter().flatten().any(|r| r.top + r.h == h - 1));
}

/// Within 4 binomial standard errors of `p` over `n` draws.
fn assert_rate(hits: usize, n: usize, p: f64, what: &str) {
    let rate = hits as f64 / n as f64;
    let tolerance = 4.0 * (p * (1.0 - p) / n as f64).sqrt();
    assert!(
        (rate - p).abs() < tolerance,
        "{what}: rate {rate} over {n} draws, expected {p} +- {tolerance}"
    );
}

#[test]
fn erasing_happens_at_its_probability() {
    let draws = 2000;
    let (rects, _) = erase_draws(16, 16, 0.5, draws, 23);
    assert_rate(
        rects.iter().flatten().count(),
        draws as usize,
        0.5,
        "erasing",
    );
    let (rects, _) = erase_draws(16, 16, 0.0, 200, 23);
    assert_eq!(rects.iter().flatten().count(), 0, "erase_prob 0 erased");
}

#[test]
fn horizontal_flips_happen_half_the_time() {
    // A ramp that differs from its mirror image in every row.
    let (h, w) = (4usize, 32usize);
    let value = |y: usize, x: usize| (x * 7 + y) as u8;
    let pixels: Vec<u8> = (0..h * w).map(|i| value(i / w, i % w)).collect();
    let src = Source {
        pixels: &pixels,
        height: h,
        width: w,
        channels: 1,
    };
    let norm = Normalize {
        mean: &[0.0],
        std: &[1.0],
    };
    let identity: Vec<f32> = (0..h * w).map(|i| f32::from(value(i / w, i % w))).collect();
    let mirrored: Vec<f32> = (0..h * w)
        .map(|i| f32::from(value(i / w, w - 1 - i % w)))
        .collect();
    let count_flips = |hflip: bool, draws: u64| {
        let cfg = AugmentConfig {
            crop: None,
            hflip,
            erase_prob: 0.0,
            shift: 0.0,
            rrc_scale: None,
        };
        let mut out = vec![0.0f32; h * w];
        let mut flips = 0;
        for i in 0..draws {
            let mut rng = augment::sample_rng(31, i % 4, i / 4);
            augment::process(&src, 1, &norm, &cfg, Some(&mut rng), &mut out);
            if out == mirrored {
                flips += 1;
            } else {
                assert_eq!(out, identity, "draw {i}: neither the image nor its mirror");
            }
        }
        flips
    };
    assert_rate(count_flips(true, 2000), 2000, 0.5, "flips");
    assert_eq!(count_flips(false, 200), 0, "flips without hflip");
}

// ---------------------------------------------------------------------------------------------
// Presets (reference-spec 3.2, 4.2-4.5)
// ---------------------------------------------------------------------------------------------

/// reference-spec 4.5, transcribed: best `--sgdr_max_lr` per loss (rows) and dataset (columns
/// CUB, NAB, Cars, Flowers, MIT67, CIFAR-100).
const DATASETS: [&str; 6] = ["cub", "nab", "cars", "flowers", "mit67", "cifar100"];
const BEST_LR: [(&str, LossKind, [f64; 6]); 4] = [
    ("ce", LossKind::Ce, [0.05, 0.05, 1.0, 1.0, 0.05, 0.1]),
    ("ce-ls", LossKind::CeLs, [0.05, 0.1, 1.0, 0.1, 1.0, 0.1]),
    ("cosine", LossKind::Cosine, [0.5, 0.5, 1.0, 0.5, 2.5, 0.05]),
    (
        "cosine-ce",
        LossKind::CosineCe,
        [0.5, 0.5, 0.5, 0.5, 2.5, 0.1],
    ),
];
/// The grid the best rates were chosen from.
const LR_GRID: [f64; 8] = [2.5, 1.0, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001];

#[test]
fn paper_presets_match_the_reference_protocol() {
    let expected_names: BTreeSet<String> = DATASETS
        .iter()
        .flat_map(|d| {
            BEST_LR
                .iter()
                .map(move |(l, _, _)| format!("paper-{d}-{l}"))
        })
        .collect();
    // The paper's Table 2 protocols (other families, e.g. `paper-cub-subX-*`, are not these).
    let names: Vec<String> = preset_names()
        .into_iter()
        .filter(|n| n.starts_with("paper-") && !n.starts_with("paper-cub-sub"))
        .collect();
    assert_eq!(names.len(), 24, "{names:?}");
    assert_eq!(names.into_iter().collect::<BTreeSet<_>>(), expected_names);
    // 5 SGDR cycles of 12 * 2^i epochs (spec 4.2).
    let epochs: usize = (0..5).map(|i| 12 << i).sum();
    assert_eq!(epochs, 372);
    for (d, dataset) in DATASETS.iter().enumerate() {
        let cifar = *dataset == "cifar100";
        for (loss_name, loss, rates) in BEST_LR {
            let name = format!("paper-{dataset}-{loss_name}");
            let p: Preset = name.parse().unwrap();
            let lr = rates[d];
            assert!(LR_GRID.contains(&lr));
            assert_eq!(p.loss, loss, "{name}");
            assert_eq!(p.lr_max, lr, "{name}: learning rate");
            assert_eq!(p.epochs, epochs, "{name}: epochs");
            // spec 2.1/2.2 and 4.4: ResNet-50 with batch 96, CIFAR-100 resnet-110-wfc with 100.
            let (arch, batch) = if cifar {
                (RESNET110_WFC, 100)
            } else {
                (Arch::ResNet50, 96)
            };
            assert_eq!((p.arch, p.batch_size), (arch, batch), "{name}");
            // spec 3.1, 3.2, 3.4: 448 crops (MIT67: 224), flips, erasing 0.5; CIFAR: no crop,
            // flips and 15% shifts, no erasing.
            let augment = if cifar {
                AugmentConfig {
                    crop: None,
                    hflip: true,
                    erase_prob: 0.0,
                    shift: 0.15,
                    rrc_scale: None,
                }
            } else {
                AugmentConfig {
                    crop: Some(if *dataset == "mit67" { 224 } else { 448 }),
                    hflip: true,
                    erase_prob: 0.5,
                    shift: 0.0,
                    rrc_scale: None,
                }
            };
            assert_eq!(p.augment, augment, "{name}: augmentation");
            let smoothing = (loss == LossKind::CeLs).then_some(0.1);
            assert_eq!(p.label_smoothing, smoothing, "{name}: label smoothing");
            // What a run resolves from the preset alone (spec 4.1, 4.2, 1.2).
            let overrides = Overrides {
                preset: Some(p),
                ..Overrides::default()
            };
            let c = RunConfig::resolve(Path::new("d"), &overrides, None).unwrap();
            assert_eq!((c.arch, c.batch_size, c.epochs), (arch, batch, epochs));
            assert_eq!(
                c.schedule,
                Schedule::Sgdr {
                    max_lr: lr,
                    min_lr: 1e-6,
                    base: 12,
                    mul: 2
                },
                "{name}"
            );
            assert_eq!(c.objective.loss, loss);
            if loss == LossKind::CeLs {
                assert_eq!(c.objective.label_smoothing, 0.1, "{name}");
            }
            if loss == LossKind::CosineCe {
                assert_eq!(c.objective.cls_weight, 0.1, "{name}");
            }
            assert_eq!((c.momentum, c.clip_norm), (0.9, Some(10.0)), "{name}");
            assert_eq!(c.augment, augment, "{name}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// L2 regularisation (reference-spec 2.3, 4.6)
// ---------------------------------------------------------------------------------------------

/// The Keras L2 lambda the reference puts on trainable variable `name` (spec 2.3 and 4.6):
/// every conv and dense kernel gets the architecture's (resnet-110-wfc 2e-4, ResNet-50 none),
/// the cosine+CE `prob` kernel 5e-4; biases, BN gamma/beta (the head's BN too) nothing.
fn spec_l2(arch: Arch, vars: &HashMap<String, Tensor>, name: &str) -> f64 {
    let kernel_l2 = if arch == Arch::ResNet50 { 0.0 } else { 2e-4 };
    if name == "head.fc.weight" {
        5e-4
    } else if is_batchnorm(vars, name) || name.ends_with(".bias") {
        0.0
    } else {
        let t = &vars[name];
        assert!(
            name.ends_with(".weight") && (t.dim() == 4 || t.dim() == 2),
            "{name} is neither BN, bias, conv kernel nor dense kernel"
        );
        kernel_l2
    }
}

#[test]
fn l2_goes_to_the_kernels_the_reference_regularises() {
    for arch in [RESNET110_WFC, Arch::ResNet50] {
        for loss in LOSSES {
            tch::manual_seed(3);
            let mut config =
                RunConfig::resolve(Path::new("d"), &Overrides::default(), None).unwrap();
            config.arch = arch;
            config.objective.loss = loss;
            let net = Network::build(&config, 3, &classes(10), Device::Cpu).unwrap();
            let vars = net.vs.variables();
            let l2 = l2_of(&config);
            let mut regularised = 0;
            for (name, t) in vars.iter().filter(|(_, t)| t.requires_grad()) {
                let expected = spec_l2(arch, &vars, name);
                assert_eq!(l2(name, t), expected, "{arch:?} {loss:?}: l2 of {name}");
                regularised += usize::from(expected > 0.0);
            }
            // The optimiser of a run gets the same coefficients for every trainable variable.
            let sgd = Sgd::new(&net.vs, config.momentum, config.clip_norm, l2_of(&config));
            let trainable = vars.values().filter(|t| t.requires_grad()).count();
            assert_eq!(sgd.params.len(), trainable);
            for p in &sgd.params {
                assert_eq!(
                    p.l2,
                    spec_l2(arch, &vars, &p.name),
                    "{arch:?} {loss:?}: {}",
                    p.name
                );
            }
            // Counted from the architecture: resnet-110-wfc has 109 conv kernels plus `fc`;
            // ResNet-50 none; cosine+CE adds `head.fc`.
            let head = usize::from(loss == LossKind::CosineCe);
            let expected = match arch {
                Arch::ResNet50 => head,
                _ => 109 + 1 + head,
            };
            assert_eq!(
                regularised, expected,
                "{arch:?} {loss:?}: regularised tensors"
            );
        }
    }
}
