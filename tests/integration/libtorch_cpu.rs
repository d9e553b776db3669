//! libtorch on CPU does what we compute by hand: a conv2d forward, its gradients, SGD steps.

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1).to_kind(Kind::Float)).unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn conv2d_forward_backward_and_sgd_match_hand_computation() {
    // x: 1x1x3x3 with values 1..9; kernel 2x2; bias; loss = sum(g * out) with fixed g.
    let x_vals: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let x_at = |i: usize, j: usize| x_vals[i * 3 + j];
    let w0 = [1.0f32, -1.0, 2.0, 0.5];
    let b0 = 0.25f32;
    let g = [1.0f32, 2.0, 3.0, 4.0];

    let vs = nn::VarStore::new(Device::Cpu);
    let mut conv = nn::conv2d(vs.root() / "conv", 1, 1, 2, Default::default());
    tch::no_grad(|| {
        conv.ws
            .copy_(&Tensor::from_slice(&w0).reshape([1, 1, 2, 2]));
        conv.bs.as_mut().unwrap().copy_(&Tensor::from_slice(&[b0]));
    });
    let x = Tensor::from_slice(&x_vals)
        .reshape([1, 1, 3, 3])
        .set_requires_grad(true);
    let g_t = Tensor::from_slice(&g).reshape([1, 1, 2, 2]);

    // Forward: out[p][q] = b + sum_ab w[a][b] x[p+a][q+b].
    let out = conv.forward(&x);
    let mut want_out = Vec::new();
    for p in 0..2 {
        for q in 0..2 {
            let mut s = b0;
            for a in 0..2 {
                for b in 0..2 {
                    s += w0[a * 2 + b] * x_at(p + a, q + b);
                }
            }
            want_out.push(s);
        }
    }
    assert_close(&to_vec(&out), &want_out, "conv output");

    // Backward: dL/dw[a][b] = sum_pq g[p][q] x[p+a][q+b]; dL/db = sum g;
    // dL/dx[i][j] = sum over (p, q, a, b) with p+a = i, q+b = j of g[p][q] w[a][b].
    let loss = (&out * &g_t).sum(Kind::Float);
    loss.backward();
    let mut want_dw = [0f32; 4];
    let mut want_dx = [0f32; 9];
    for p in 0..2 {
        for q in 0..2 {
            for a in 0..2 {
                for b in 0..2 {
                    want_dw[a * 2 + b] += g[p * 2 + q] * x_at(p + a, q + b);
                    want_dx[(p + a) * 3 + q + b] += g[p * 2 + q] * w0[a * 2 + b];
                }
            }
        }
    }
    let want_db: f32 = g.iter().sum();
    assert_close(&to_vec(&conv.ws.grad()), &want_dw, "dL/dw");
    assert_close(
        &to_vec(&conv.bs.as_ref().unwrap().grad()),
        &[want_db],
        "dL/db",
    );
    assert_close(&to_vec(&x.grad()), &want_dx, "dL/dx");

    // Two SGD steps, momentum 0.9 in torch's form (buf = g, then buf = 0.9 buf + g;
    // w -= lr buf). The loss is linear in w, so the gradient is the same at both steps.
    let lr = 0.1f32;
    let mut opt = nn::Sgd {
        momentum: 0.9,
        ..Default::default()
    }
    .build(&vs, lr as f64)
    .unwrap();
    opt.zero_grad();
    let step = |opt: &mut nn::Optimizer| {
        let loss = (conv.forward(&x.detach()) * &g_t).sum(Kind::Float);
        opt.backward_step(&loss);
    };
    step(&mut opt);
    let w1: Vec<f32> = w0.iter().zip(&want_dw).map(|(w, d)| w - lr * d).collect();
    assert_close(&to_vec(&conv.ws), &w1, "w after one step");
    step(&mut opt);
    let w2: Vec<f32> = w1
        .iter()
        .zip(&want_dw)
        .map(|(w, d)| w - lr * 1.9 * d)
        .collect();
    assert_close(&to_vec(&conv.ws), &w2, "w after two steps");
    let b2 = b0 - lr * want_db - lr * 1.9 * want_db;
    assert_close(
        &to_vec(conv.bs.as_ref().unwrap()),
        &[b2],
        "b after two steps",
    );
}
