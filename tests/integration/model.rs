//! Architectures, objectives, optimiser and schedule against values derived by hand.

use cosine_train::model::{Arch, Backbone, ConvPadding};
use cosine_train::objective::{
    Head, HeadOutput, LossKind, ObjectiveConfig, l2_normalize, smoothed_ce,
};
use cosine_train::optim::Sgd;
use cosine_train::schedule::Schedule;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

fn trainable(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

/// A conv without bias plus its BatchNorm (weight and bias).
fn conv_bn(k: i64, c_in: i64, c_out: i64) -> i64 {
    k * k * c_in * c_out + 2 * c_out
}

#[test]
fn resnet50_has_torchvisions_parameter_count() {
    // Stem, then per stage: the first block has a projection; widths 64..512, 3/4/6/3 blocks.
    let mut expected = conv_bn(7, 3, 64);
    let mut c_in = 64;
    for (w, n) in [(64, 3), (128, 4), (256, 6), (512, 3)] {
        for i in 0..n {
            expected += conv_bn(1, c_in, w) + conv_bn(3, w, w) + conv_bn(1, w, 4 * w);
            if i == 0 {
                expected += conv_bn(1, c_in, 4 * w);
            }
            c_in = 4 * w;
        }
    }
    // torchvision's resnet50 with its 1000-class fc has 25,557,032 parameters.
    assert_eq!(expected + 2048 * 1000 + 1000, 25_557_032);
    let vs = nn::VarStore::new(Device::Cpu);
    let backbone = Backbone::new(Arch::ResNet50, &vs.root(), 3, ConvPadding::Same);
    assert_eq!(trainable(&vs), expected);
    assert_eq!(backbone.out_dim(), 2048);
    // Any input size gives pooled features; 448 is the fine-grained crop, 224 MIT-67's.
    for size in [448, 224, 32] {
        let x = Tensor::randn([1, 3, size, size], (Kind::Float, Device::Cpu));
        let f = tch::no_grad(|| backbone.forward_t(&x, false));
        assert_eq!(f.size(), [1, 2048], "input {size}");
    }
    let names: std::collections::HashSet<String> = vs.variables().into_keys().collect();
    for name in [
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer4.2.bn3.num_batches_tracked",
    ] {
        assert!(names.contains(name), "torchvision name {name} missing");
    }
}

#[test]
fn resnet110_wfc_parameter_count_and_shapes() {
    // 3x3 stem to 32 channels, 3 stages of 18 basic blocks (32, 64, 128), option-A shortcuts
    // (no parameters), a dense layer from 128 features.
    let mut expected = conv_bn(3, 3, 32);
    let mut c_in = 32;
    for w in [32, 64, 128] {
        for _ in 0..18 {
            expected += conv_bn(3, c_in, w) + conv_bn(3, w, w);
            c_in = w;
        }
    }
    let vs = nn::VarStore::new(Device::Cpu);
    let backbone = Backbone::new(
        Arch::Cifar {
            depth: 110,
            wide: true,
        },
        &vs.root(),
        3,
        ConvPadding::Same,
    );
    assert_eq!(trainable(&vs), expected);
    assert_eq!(expected, 6_892_192, "6.89 M parameters before the head");
    let head = Head::new(
        &vs.root(),
        ObjectiveConfig {
            loss: LossKind::Ce,
            label_smoothing: 0.0,
            cls_weight: 0.0,
            keras_ce_clip: false,
        },
        128,
        100,
        None,
    );
    assert_eq!(trainable(&vs), expected + 128 * 100 + 100);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let out = tch::no_grad(|| head.forward_t(&backbone.forward_t(&x, false), false));
    assert_eq!(out.primary.size(), [2, 100]);
}

fn vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < 1e-5, "{what}[{i}]: {x} vs {y}");
    }
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

const LOGITS: [[f64; 3]; 2] = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]];
const LABELS: [i64; 2] = [0, 2];

fn head(loss: LossKind, embedding: Option<Tensor>) -> Head {
    let vs = nn::VarStore::new(Device::Cpu);
    Head::new(
        &vs.root(),
        ObjectiveConfig {
            loss,
            label_smoothing: 0.1,
            cls_weight: 0.1,
            keras_ce_clip: false,
        },
        4,
        3,
        embedding,
    )
}

#[test]
fn cross_entropy_and_label_smoothing_match_hand_computation() {
    let flat: Vec<f32> = LOGITS.iter().flatten().map(|&v| v as f32).collect();
    let labels = Tensor::from_slice(&LABELS);
    for (loss, ls) in [(LossKind::Ce, 0.0), (LossKind::CeLs, 0.1)] {
        let logits = Tensor::from_slice(&flat)
            .reshape([2, 3])
            .set_requires_grad(true);
        let value = head(loss, None).loss(
            &HeadOutput {
                primary: logits.shallow_clone(),
                cls_logits: None,
            },
            &labels,
        );
        value.backward();
        // Targets: 1 - ls on the true class, ls / (C - 1) = 0.05 elsewhere.
        let (mut want, mut grad) = (0.0, Vec::new());
        for (row, &y) in LOGITS.iter().zip(&LABELS) {
            let p = softmax(row);
            for (k, pk) in p.iter().enumerate() {
                let t = if k as i64 == y { 1.0 - ls } else { ls / 2.0 };
                want -= t * pk.ln() / 2.0;
                grad.push((pk - t) / 2.0);
            }
        }
        close(&vec(&value), &[want], &format!("{loss} loss"));
        close(&vec(&logits.grad()), &grad, &format!("{loss} gradient"));
    }
    let direct = smoothed_ce(&Tensor::from_slice(&flat).reshape([2, 3]), &labels, 0.0, 3);
    let plain = Tensor::from_slice(&flat)
        .reshape([2, 3])
        .cross_entropy_for_logits(&labels);
    close(&vec(&direct), &vec(&plain), "ls = 0 is plain CE");
}

/// `--ce-clip`: Keras clips the probabilities to [1e-7, 1 - 1e-7] before the log. A sample the
/// clip does not touch gets the usual loss and gradient; a saturated one gets the clipped loss
/// and no gradient at all.
#[test]
fn keras_clipped_cross_entropy_matches_hand_computation() {
    let rows = [[1.0f64, 2.0, 0.5], [30.0, 0.0, 0.0]];
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    let labels = Tensor::from_slice(&[0i64, 0]);
    let eps = 1e-7f64;
    for (loss, ls) in [(LossKind::Ce, 0.0), (LossKind::CeLs, 0.1)] {
        let vs = nn::VarStore::new(Device::Cpu);
        let config = ObjectiveConfig {
            loss,
            label_smoothing: ls,
            cls_weight: 0.1,
            keras_ce_clip: true,
        };
        let head = Head::new(&vs.root(), config, 4, 3, None);
        let logits = Tensor::from_slice(&flat)
            .reshape([2, 3])
            .set_requires_grad(true);
        let value = head.loss(
            &HeadOutput {
                primary: logits.shallow_clone(),
                cls_logits: None,
            },
            &labels,
        );
        value.backward();
        let (mut want, mut grad) = (0.0, Vec::new());
        for (r, row) in rows.iter().enumerate() {
            let p = softmax(row);
            for (k, pk) in p.iter().enumerate() {
                let t = if k == 0 { 1.0 - ls } else { ls / 2.0 };
                want -= t * pk.clamp(eps, 1.0 - eps).ln() / 2.0;
                // The second row is saturated: every probability lies beyond the clip.
                grad.push(if r == 1 { 0.0 } else { (pk - t) / 2.0 });
            }
        }
        close(&vec(&value), &[want], &format!("{loss} clipped loss"));
        close(
            &vec(&logits.grad()),
            &grad,
            &format!("{loss} clipped gradient"),
        );
    }
}

#[test]
fn cosine_losses_match_hand_computation() {
    // Raw embedding-layer outputs x (N=2, D=3) and one-hot class embeddings.
    let x_rows = [[3.0f64, 4.0, 0.0], [1.0, 1.0, 1.0]];
    let flat: Vec<f32> = x_rows.iter().flatten().map(|&v| v as f32).collect();
    let labels = Tensor::from_slice(&LABELS);
    let x = Tensor::from_slice(&flat)
        .reshape([2, 3])
        .set_requires_grad(true);
    let h = head(
        LossKind::Cosine,
        Some(Tensor::eye(3, (Kind::Float, Device::Cpu))),
    );
    let f = l2_normalize(&x);
    let value = h.loss(
        &HeadOutput {
            primary: f,
            cls_logits: None,
        },
        &labels,
    );
    value.backward();
    // loss = mean(1 - x_y / |x|); d/dx = -(e_y - (x_y/|x|) x/|x|) / |x| / N.
    let (mut want, mut grad) = (0.0, Vec::new());
    for (row, &y) in x_rows.iter().zip(&LABELS) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        let cos = row[y as usize] / norm;
        want += (1.0 - cos) / 2.0;
        for (k, xk) in row.iter().enumerate() {
            let e = if k as i64 == y { 1.0 } else { 0.0 };
            grad.push(-(e - cos * xk / norm) / norm / 2.0);
        }
    }
    close(&vec(&value), &[want], "cosine loss");
    close(&vec(&x.grad()), &grad, "cosine gradient");

    // cosine-ce: the same cosine term plus 0.1 x CE of the head's logits.
    let h = head(
        LossKind::CosineCe,
        Some(Tensor::eye(3, (Kind::Float, Device::Cpu))),
    );
    let lf: Vec<f32> = LOGITS.iter().flatten().map(|&v| v as f32).collect();
    let logits = Tensor::from_slice(&lf)
        .reshape([2, 3])
        .set_requires_grad(true);
    let f = l2_normalize(&Tensor::from_slice(&flat).reshape([2, 3]));
    let value = h.loss(
        &HeadOutput {
            primary: f,
            cls_logits: Some(logits.shallow_clone()),
        },
        &labels,
    );
    value.backward();
    let mut ce = 0.0;
    let mut grad = Vec::new();
    for (row, &y) in LOGITS.iter().zip(&LABELS) {
        let p = softmax(row);
        ce -= p[y as usize].ln() / 2.0;
        grad.extend((0..3).map(|k| 0.1 * (p[k] - if k as i64 == y { 1.0 } else { 0.0 }) / 2.0));
    }
    close(&vec(&value), &[want + 0.1 * ce], "cosine-ce loss");
    close(
        &vec(&logits.grad()),
        &grad,
        "cosine-ce gradient on the head's logits",
    );

    // Prediction: the class whose embedding has the largest dot product.
    let psi = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0]).reshape([3, 3]);
    let h = head(LossKind::Cosine, Some(psi));
    let f = Tensor::from_slice(&[0.7f32, 0.71, 0.0, 0.1, 0.0, 0.99]).reshape([2, 3]);
    let (pred, _) = h.predict(&HeadOutput {
        primary: f,
        cls_logits: None,
    });
    assert_eq!(Vec::<i64>::try_from(pred).unwrap(), vec![1, 2]);
}

#[test]
fn sgdr_matches_the_reference_sequence_for_a_12_epoch_cycle() {
    let s = Schedule::Sgdr {
        max_lr: 1.0,
        min_lr: 0.0,
        base: 12,
        mul: 2,
    };
    let got: Vec<f64> = (0..12).map(|e| s.lr_at(e, 0, 10, 372)).collect();
    // reference-spec 4.2: 1, .933, .854, .75, .629, .5, .371, .25, .146, .067, .017, ~0.
    let want = [
        1.0, 0.933, 0.854, 0.75, 0.629, 0.5, 0.371, 0.25, 0.146, 0.067, 0.017, 0.0,
    ];
    for (e, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-3, "epoch {e}: {g} vs {w}");
    }
    assert_eq!(s.lr_at(12, 0, 10, 372), 1.0, "restart at epoch 12");
    let s = Schedule::Sgdr {
        max_lr: 0.5,
        min_lr: 1e-6,
        base: 12,
        mul: 2,
    };
    assert!(
        (s.lr_at(35, 0, 10, 372) - 1e-6).abs() < 1e-12,
        "last epoch of cycle 2 at the minimum"
    );
    assert_eq!(
        s.lr_at(5, 3, 10, 372),
        s.lr_at(5, 0, 10, 372),
        "constant within an epoch"
    );
}

#[test]
fn sgd_follows_the_keras_momentum_form_across_a_learning_rate_change() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var("w", &[2], nn::Init::Const(1.0));
    let mut opt = Sgd::new(&vs, 0.9, None, |_, _| 0.0);
    // loss = sum(g * w) has the constant gradient g.
    let g = [0.5f64, -2.0];
    let gt = Tensor::from_slice(&[0.5f32, -2.0]);
    let (mut p, mut v) = ([1.0f64, 1.0], [0.0f64, 0.0]);
    for lr in [0.1, 0.1, 1.0, 0.01] {
        opt.zero_grad().unwrap();
        (&w * &gt).sum(Kind::Float).backward();
        let _norm = opt.step(lr).unwrap();
        for k in 0..2 {
            v[k] = 0.9 * v[k] - lr * g[k];
            p[k] += v[k];
        }
        close(&vec(&w), &p, &format!("after a step at lr {lr}"));
    }
    // PyTorch's form would differ after the change of rate: check it does.
    let torch_form = {
        let (mut p, mut b) = (1.0f64, 0.0f64);
        for (i, lr) in [0.1, 0.1, 1.0, 0.01].into_iter().enumerate() {
            b = if i == 0 { 0.5 } else { 0.9 * b + 0.5 };
            p -= lr * b;
        }
        p
    };
    assert!(
        (torch_form - p[0]).abs() > 1e-3,
        "the test distinguishes the two forms"
    );
}

/// Both places the clip factor can be computed (the host, as on the CPU; the device, as on
/// CUDA, with no read-back) give the same update, clipped or not.
#[test]
fn l2_and_global_norm_clip_enter_the_update() {
    for clip_on_device in [false, true] {
        for limit in [10.0, 100.0] {
            let vs = nn::VarStore::new(Device::Cpu);
            let w = vs.root().var("w", &[2, 1], nn::Init::Const(3.0));
            let mut opt = Sgd::new(&vs, 0.9, Some(limit), |_, _| 0.5);
            opt.clip_on_device = clip_on_device;
            opt.zero_grad().unwrap();
            (&w * 20.0).sum(Kind::Float).backward();
            let norm = f64::try_from(opt.step(0.1).unwrap().expect("a norm")).unwrap();
            // Gradient 20 + 2 * 0.5 * 3 = 23 per element; norm 23 sqrt 2: above 10, so scaled
            // to 10, below 100, so kept.
            let n = 23.0 * 2f64.sqrt();
            assert!((norm - n).abs() < 1e-4, "{norm}");
            let step = 0.1 * 23.0 * (limit / n).min(1.0);
            let what = format!("update with limit {limit}, clip on device {clip_on_device}");
            close(&vec(&w), &[3.0 - step, 3.0 - step], &what);
        }
    }
}

/// Below the limit the device's clip factor is exactly 1 (limit / limit, for limits whose
/// reciprocal does not round-trip, such as 41), and a NaN norm leaves the other parameters'
/// updates unscaled, as the host path does: the two paths give the same weights bit for bit.
#[test]
fn the_device_clip_factor_equals_the_hosts_below_the_limit_and_for_a_nan_norm() {
    let run = |clip_on_device: bool, limit: f64, poison: bool| -> Vec<f64> {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = vs.root().var("a", &[3], nn::Init::Const(1.0));
        let _b = vs.root().var("b", &[2], nn::Init::Const(2.0));
        let mut opt = Sgd::new(&vs, 0.9, Some(limit), |_, _| 0.0);
        opt.clip_on_device = clip_on_device;
        let first = if poison { f32::NAN } else { 0.3 };
        let grads = vec![
            Tensor::from_slice(&[first, -0.7, 0.11]),
            Tensor::from_slice(&[1.3f32, 0.2]),
        ];
        let _norm = opt.step_with(0.37, grads).unwrap();
        let mut out = vec(&a);
        out.extend(vec(&vs.root().get("b").unwrap()));
        out
    };
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for limit in [41.0, 47.0, 97.0] {
        assert_eq!(
            bits(&run(false, limit, false)),
            bits(&run(true, limit, false)),
            "{limit}"
        );
    }
    let (host, device) = (run(false, 41.0, true), run(true, 41.0, true));
    assert!(host[0].is_nan() && device[0].is_nan());
    assert_eq!(bits(&host[1..]), bits(&device[1..]));
    assert!(device[3..].iter().all(|x| x.is_finite()), "{device:?}");
}

#[test]
fn batchnorm_running_statistics_are_bias_corrected_and_precise_bn_averages_batches() {
    use cosine_train::model::layers::{BN_DECAY, BatchNorm, Pass};
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = BatchNorm::new(vs.root() / "bn", 1);
    let batch = |values: &[f32]| Tensor::from_slice(values).reshape([values.len() as i64, 1, 1, 1]);
    let mean = |t: &Tensor| f64::try_from(t.sum(Kind::Float)).unwrap();
    // Update 1: the corrected average is the batch statistic itself (libtorch alone would give
    // 0.99 * 0 + 0.01 * 2 = 0.02).
    let _ = bn.forward_t(&batch(&[1.0, 3.0]), true);
    assert!((mean(&bn.running_mean) - 2.0).abs() < 1e-6);
    assert!(
        (mean(&bn.running_var) - 2.0).abs() < 1e-6,
        "unbiased variance of [1, 3]"
    );
    // Update 2: (0.99 * 0.01 * 2 + 0.01 * 6) / (1 - 0.99^2), the debiased EMA of 2 and 6.
    let _ = bn.forward_t(&batch(&[5.0, 7.0]), true);
    let want =
        (BN_DECAY * (1.0 - BN_DECAY) * 2.0 + (1.0 - BN_DECAY) * 6.0) / (1.0 - BN_DECAY * BN_DECAY);
    assert!(
        (mean(&bn.running_mean) - want).abs() < 1e-5,
        "{}",
        mean(&bn.running_mean)
    );
    assert_eq!(i64::try_from(&bn.num_batches_tracked).unwrap(), 2);
    // Precise BN: the plain average of the pass's batch means (10 and 20), counter untouched.
    let _ = bn.forward(&batch(&[9.0, 11.0]), Pass::PreciseStats { batch: 1 });
    let _ = bn.forward(&batch(&[19.0, 21.0]), Pass::PreciseStats { batch: 2 });
    assert!((mean(&bn.running_mean) - 15.0).abs() < 1e-5);
    assert!((mean(&bn.running_var) - 2.0).abs() < 1e-5);
    assert_eq!(i64::try_from(&bn.num_batches_tracked).unwrap(), 2);
    // Evaluation uses the running statistics: (15 - 15) / sqrt(2 + 1e-3) = 0.
    let y = bn.forward_t(&batch(&[15.0]), false);
    assert!(mean(&y).abs() < 1e-5);
}

/// Channels-last memory order changes the layout, not the network: the kernels are re-laid in
/// place, and outputs and gradients agree with NCHW up to summation order.
#[test]
fn channels_last_gives_the_same_outputs_and_gradients() {
    // Both networks get the first one's weights (the global generator is shared with tests
    // running in parallel, so seeding twice would not give the same initialisation).
    let reference = nn::VarStore::new(Device::Cpu);
    let _ = Backbone::new(
        "resnet20".parse().unwrap(),
        &reference.root(),
        3,
        ConvPadding::Same,
    );
    let build = |channels_last: bool| {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let net = Backbone::new(
            "resnet20".parse().unwrap(),
            &vs.root(),
            3,
            ConvPadding::Same,
        );
        vs.copy(&reference).unwrap();
        if channels_last {
            cosine_train::model::to_channels_last(&vs);
        }
        (vs, net)
    };
    let images = Tensor::randn([4, 3, 16, 16], (Kind::Float, Device::Cpu));
    let mut results = Vec::new();
    for channels_last in [false, true] {
        let (vs, net) = build(channels_last);
        let kernel = vs.variables()["conv1.weight"].shallow_clone();
        assert_eq!(
            cosine_train::model::is_channels_last(&kernel),
            channels_last
        );
        assert!(kernel.requires_grad(), "still the trainable variable");
        let input = if channels_last {
            cosine_train::model::channels_last(&images)
        } else {
            images.shallow_clone()
        };
        assert_eq!(cosine_train::model::is_channels_last(&input), channels_last);
        let out = net.forward_t(&input, true);
        out.pow_tensor_scalar(2).sum(Kind::Float).backward();
        results.push((vec(&out), vec(&kernel.grad())));
    }
    for (what, a, b) in [
        ("features", &results[0].0, &results[1].0),
        ("conv1 kernel gradient", &results[0].1, &results[1].1),
    ] {
        assert_eq!(a.len(), b.len());
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let diff = norm(&mut a.iter().zip(b.iter()).map(|(x, y)| x - y));
        let size = norm(&mut a.iter().copied());
        // A conv summing in another order differs in the last bits; BatchNorm over a batch of
        // four amplifies that through the layers, to about 1e-3 of the gradient's norm.
        assert!(
            diff <= 1e-2 * size,
            "{what}: |difference| {diff} vs |value| {size}"
        );
        assert!(size > 0.0, "{what} is not all zeros");
    }
}
