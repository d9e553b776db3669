//! Per-sample preprocessing and augmentation (reference-spec 3.1 and 3.4), from a stored u8
//! record to normalised CHW f32. Every random draw comes from a generator seeded by
//! (seed, epoch, sample index), so thread count and timing never change a result.

use datasets_prep::rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// What is done to training images (test images are only centre-cropped and normalised).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Square crop size (random in training, centre at test); `None` keeps the stored size.
    pub crop: Option<u32>,
    /// Horizontal flip with probability 0.5.
    pub hflip: bool,
    /// Random erasing probability (Zhong et al.; on the whole image, before the crop).
    pub erase_prob: f64,
    /// Continuous random shift as a fraction of the size (CIFAR: 0.15), bilinear, edge fill.
    pub shift: f64,
}

/// The deterministic generator of one sample's draws.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> SplitMix64 {
    SplitMix64::stream(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15), index)
}

fn uniform(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A stored image, borrowed.
pub struct Source<'a> {
    pub pixels: &'a [u8],
    pub height: usize,
    pub width: usize,
    /// Channels stored (1 or 3).
    pub channels: usize,
}

/// Mirror index into 0..n (reflect padding without repeating the edge).
fn reflect(i: i64, n: i64) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// Normalisation constants per output channel.
pub struct Normalize<'a> {
    pub mean: &'a [f32],
    pub std: &'a [f32],
}

/// Writes the processed image (out_channels x out_h x out_w, CHW) into `out`.
/// `rng` is `None` at test time (no augmentation).
pub fn process(
    src: &Source,
    out_channels: usize,
    norm: &Normalize,
    cfg: &AugmentConfig,
    rng: Option<&mut SplitMix64>,
    out: &mut [f32],
) {
    let (h, w) = (src.height as i64, src.width as i64);
    let (oh, ow) = match cfg.crop {
        Some(c) => (i64::from(c), i64::from(c)),
        None => (h, w),
    };
    debug_assert_eq!(out.len(), out_channels * (oh * ow) as usize);
    let value = |y: usize, x: usize, c: usize| -> f32 {
        let sc = if src.channels == 1 { 0 } else { c };
        let v = f32::from(src.pixels[(y * src.width + x) * src.channels + sc]);
        (v - norm.mean[c]) / norm.std[c]
    };

    // Draws, in a fixed order: flip, erase, crop offset, shift.
    let (mut flip, mut erase, mut top, mut left, mut shift) =
        (false, None, (h - oh) / 2, (w - ow) / 2, (0.0, 0.0));
    let mut noise_rng = None;
    if let Some(rng) = rng {
        flip = cfg.hflip && uniform(rng) < 0.5;
        if cfg.erase_prob > 0.0 && uniform(rng) < cfg.erase_prob {
            erase = erase_rect(rng, h, w);
        }
        // An image smaller than the crop stays centred and is reflect-padded.
        if oh <= h && ow <= w {
            top = (uniform(rng) * (h - oh + 1) as f64) as i64;
            left = (uniform(rng) * (w - ow + 1) as f64) as i64;
        }
        if cfg.shift > 0.0 {
            let dy = (uniform(rng) * 2.0 - 1.0) * cfg.shift * h as f64;
            let dx = (uniform(rng) * 2.0 - 1.0) * cfg.shift * w as f64;
            shift = (dy, dx);
        }
        noise_rng = Some(SplitMix64::new(rng.next_u64()));
    }

    let plane = (oh * ow) as usize;
    for oy in 0..oh {
        for ox in 0..ow {
            // Position in the (flipped, erased) full image.
            let (iy, ix) = (oy + top, ox + left);
            let o = (oy * ow + ox) as usize;
            let erased = erase.is_some_and(|(ey, ex, eh, ew)| {
                iy >= ey && iy < ey + eh && ix >= ex && ix < ex + ew
            });
            if erased {
                let rng = noise_rng
                    .as_mut()
                    .expect("erasing only happens in training");
                for c in 0..out_channels {
                    let v = (uniform(rng) * 255.0) as f32;
                    out[c * plane + o] = (v - norm.mean[c]) / norm.std[c];
                }
                continue;
            }
            if shift != (0.0, 0.0) {
                // Bilinear sample at the shifted position, edges replicated.
                let fy = (iy as f64 - shift.0).clamp(0.0, (h - 1) as f64);
                let fx = (ix as f64 - shift.1).clamp(0.0, (w - 1) as f64);
                let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
                let (y1, x1) = ((y0 + 1).min(src.height - 1), (x0 + 1).min(src.width - 1));
                let (ty, tx) = ((fy - y0 as f64) as f32, (fx - x0 as f64) as f32);
                let (x0, x1) = if flip {
                    (src.width - 1 - x0, src.width - 1 - x1)
                } else {
                    (x0, x1)
                };
                for c in 0..out_channels {
                    let top_row = value(y0, x0, c) * (1.0 - tx) + value(y0, x1, c) * tx;
                    let bottom_row = value(y1, x0, c) * (1.0 - tx) + value(y1, x1, c) * tx;
                    out[c * plane + o] = top_row * (1.0 - ty) + bottom_row * ty;
                }
                continue;
            }
            let sy = reflect(iy, h);
            let sx = reflect(ix, w);
            let sx = if flip { src.width - 1 - sx } else { sx };
            for c in 0..out_channels {
                out[c * plane + o] = value(sy, sx, c);
            }
        }
    }
}

/// Random erasing's rectangle (top, left, height, width): area U(0.02, 0.3) of the image,
/// aspect U(0.3, 1/0.3), redrawn until it fits (at most 100 tries, then no erasing).
fn erase_rect(rng: &mut SplitMix64, h: i64, w: i64) -> Option<(i64, i64, i64, i64)> {
    for _ in 0..100 {
        let area = (0.02 + uniform(rng) * 0.28) * (h * w) as f64;
        let ratio = 0.3 + uniform(rng) * (1.0 / 0.3 - 0.3);
        let eh = (area * ratio).sqrt() as i64;
        let ew = (area / ratio).sqrt() as i64;
        if eh < h && ew < w && eh > 0 && ew > 0 {
            let ex = (uniform(rng) * (w - ew) as f64) as i64;
            let ey = (uniform(rng) * (h - eh) as f64) as i64;
            return Some((ey, ex, eh, ew));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize) -> Vec<u8> {
        (0..h * w).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn test_time_is_a_normalised_centre_crop() {
        let px = ramp(6, 8);
        let src = Source {
            pixels: &px,
            height: 6,
            width: 8,
            channels: 1,
        };
        let cfg = AugmentConfig {
            crop: Some(4),
            hflip: true,
            erase_prob: 1.0,
            shift: 0.0,
        };
        let mut out = vec![0.0; 16];
        process(
            &src,
            1,
            &Normalize {
                mean: &[1.0],
                std: &[2.0],
            },
            &cfg,
            None,
            &mut out,
        );
        // Centre offset (1, 2): first output pixel is source (1, 2) = 10.
        assert_eq!(out[0], (10.0 - 1.0) / 2.0);
        assert_eq!(out[15], (f32::from(px[4 * 8 + 5]) - 1.0) / 2.0);
    }

    #[test]
    fn draws_depend_only_on_seed_epoch_and_index() {
        let px = ramp(10, 10);
        let src = Source {
            pixels: &px,
            height: 10,
            width: 10,
            channels: 1,
        };
        let cfg = AugmentConfig {
            crop: Some(8),
            hflip: true,
            erase_prob: 0.5,
            shift: 0.0,
        };
        let norm = Normalize {
            mean: &[0.0],
            std: &[1.0],
        };
        let run = |epoch, index| {
            let mut out = vec![0.0; 64];
            process(
                &src,
                1,
                &norm,
                &cfg,
                Some(&mut sample_rng(7, epoch, index)),
                &mut out,
            );
            out
        };
        assert_eq!(run(1, 5), run(1, 5));
        let distinct: std::collections::HashSet<Vec<u32>> = (0..20)
            .map(|i| run(1, i).iter().map(|v| v.to_bits()).collect())
            .collect();
        assert!(distinct.len() > 5, "different samples get different draws");
    }

    #[test]
    fn grey_records_fill_every_channel_and_shift_replicates_edges() {
        let px = vec![100u8; 16];
        let src = Source {
            pixels: &px,
            height: 4,
            width: 4,
            channels: 1,
        };
        let cfg = AugmentConfig {
            crop: None,
            hflip: false,
            erase_prob: 0.0,
            shift: 0.15,
        };
        let mut out = vec![0.0; 48];
        process(
            &src,
            3,
            &Normalize {
                mean: &[0.0, 50.0, 100.0],
                std: &[1.0; 3],
            },
            &cfg,
            Some(&mut sample_rng(1, 0, 0)),
            &mut out,
        );
        assert!(out[..16].iter().all(|&v| (v - 100.0).abs() < 1e-4));
        assert!(out[16..32].iter().all(|&v| (v - 50.0).abs() < 1e-4));
        assert!(out[32..].iter().all(|&v| v.abs() < 1e-4));
    }
}
