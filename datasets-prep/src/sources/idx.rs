//! MNIST-family IDX files (MNIST, Fashion-MNIST, KMNIST), gzipped or not.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{
    ImageData, Item, Listing, Source, SourceError, integer_classes, is_present_file, read_file,
};
use crate::image_ops::Pixels;

/// Largest IDX file accepted, compressed or decompressed (EMNIST's largest is 0.6 GB).
pub const MAX_IDX_BYTES: u64 = 2 << 30;

fn find(source: &Source, root: &Path, stem: &str) -> Result<PathBuf, SourceError> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let path = root.join(name);
        if is_present_file(&path) {
            return Ok(path);
        }
    }
    Err(SourceError::MissingFile {
        path: root.join(stem),
        source_name: source.to_string(),
        layout: source.layout(),
    })
}

/// The bytes of an IDX file given its raw content, gunzipped if it is gzip data. Decompression
/// stops at the size the IDX header inside claims (and at [`MAX_IDX_BYTES`]), so that a small
/// damaged or hostile file cannot expand without bound.
fn decompress(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, SourceError> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let bad = |e: std::io::Error| {
        SourceError::invalid(path, format!("gzip data does not decompress: {e}"))
    };
    let mut gz = flate2::read::GzDecoder::new(&raw[..]);
    let mut header = vec![0u8; 4];
    gz.read_exact(&mut header).map_err(bad)?;
    let ndim = usize::from(header[3]);
    header.resize(4 + 4 * ndim, 0);
    gz.read_exact(&mut header[4..]).map_err(bad)?;
    let element = match header[2] {
        0x0B => 2,
        0x0C | 0x0D => 4,
        0x0E => 8,
        _ => 1,
    };
    let dims: Vec<u32> = (header[4..].chunks_exact(4))
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let claimed = (dims.iter())
        .try_fold(element, |a: u64, &d| a.checked_mul(u64::from(d)))
        .filter(|&n| n <= MAX_IDX_BYTES - header.len() as u64)
        .ok_or_else(|| {
            SourceError::invalid(
                path,
                format!(
                    "IDX header claims dimensions {dims:?}, more than the limit of \
                     {MAX_IDX_BYTES} bytes"
                ),
            )
        })?;
    let data = crate::bounded::read_handle_limited(gz, path, claimed).map_err(|e| match e {
        crate::bounded::ReadError::TooLarge { .. } => SourceError::invalid(
            path,
            format!(
                "gzip data holds more than the {claimed} bytes of data its IDX header claims \
                 (dimensions {dims:?})"
            ),
        ),
        crate::bounded::ReadError::Io { source, .. } => bad(source),
        other => other.into(),
    })?;
    header.extend(data);
    Ok(header)
}

/// Parses the raw content of an IDX u8 file (gzipped or not) with `want_dims` dimensions:
/// (dimensions, data). `path` names the file in errors.
pub fn parse(
    path: &Path,
    raw: Vec<u8>,
    want_dims: usize,
) -> Result<(Vec<usize>, Vec<u8>), SourceError> {
    parse_idx(path, &decompress(path, raw)?, want_dims)
}

/// Parses an IDX u8 array: (dimensions, data).
fn parse_idx(
    path: &Path,
    bytes: &[u8],
    want_dims: usize,
) -> Result<(Vec<usize>, Vec<u8>), SourceError> {
    let bad = |reason: String| SourceError::invalid(path, reason);
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file (bad magic)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX element type 0x{:02x}; only unsigned bytes (0x08) are supported",
            bytes[2]
        )));
    }
    let ndim = usize::from(bytes[3]);
    if ndim != want_dims {
        return Err(bad(format!("{ndim} dimensions, expected {want_dims}")));
    }
    let header = 4 + 4 * ndim;
    let dims_raw = bytes
        .get(4..header)
        .ok_or_else(|| bad("truncated header".into()))?;
    let dims: Vec<usize> = dims_raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("dimensions overflow".into()))?;
    let data = &bytes[header..];
    if data.len() != count {
        return Err(bad(format!(
            "dimensions {dims:?} need {count} bytes of data, the file has {}",
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

fn split(
    source: &Source,
    root: &Path,
    prefix: &str,
) -> Result<Vec<(u8, Pixels, String)>, SourceError> {
    let images_path = find(source, root, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find(source, root, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (dims, pixels) = parse(&images_path, read_file(&images_path, MAX_IDX_BYTES)?, 3)?;
    let (ldims, labels) = parse(&labels_path, read_file(&labels_path, MAX_IDX_BYTES)?, 1)?;
    if ldims[0] != dims[0] {
        return Err(SourceError::invalid(
            &labels_path,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                dims[0],
                images_path.display()
            ),
        ));
    }
    let (h, w) = (dims[1], dims[2]);
    if h == 0 || w == 0 {
        return Err(SourceError::invalid(&images_path, "images of size zero"));
    }
    Ok(labels
        .iter()
        .zip(pixels.chunks_exact(h * w))
        .enumerate()
        .map(|(i, (&label, px))| {
            let p = Pixels {
                height: h as u32,
                width: w as u32,
                channels: 1,
                data: px.to_vec(),
            };
            (label, p, format!("{}#{i}", images_path.display()))
        })
        .collect())
}

/// The class names of the datasets published in this layout, in label order.
fn class_names(source: &Source) -> Option<&'static [&'static str]> {
    match source {
        Source::Mnist => Some(&["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]),
        Source::FashionMnist => Some(&[
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]),
        // Kuzushiji-MNIST: one cursive hiragana per class, romanised.
        Source::Kmnist => Some(&["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
        _ => None,
    }
}

pub(super) fn load(source: &Source, root: &Path) -> Result<Listing, SourceError> {
    let train = split(source, root, "train")?;
    let test = split(source, root, "t10k")?;
    // Classes are 0..=max label; a class without training images is reported by the packer.
    let max = train.iter().chain(&test).map(|t| t.0).max().unwrap_or(0);
    let names = class_names(source);
    if let Some(names) = names
        && usize::from(max) >= names.len()
    {
        return Err(SourceError::invalid(
            &find(source, root, "train-labels-idx1-ubyte")?,
            format!(
                "label {max} is not one of {source}'s {} classes; --source idx packs any IDX \
                 labels",
                names.len()
            ),
        ));
    }
    let classes = integer_classes(0..=i64::from(max), |id| {
        names.map(|n| n[id as usize].to_string())
    });
    let items = |v: Vec<(u8, Pixels, String)>| -> Vec<Item> {
        v.into_iter()
            .map(|(label, p, name)| Item {
                name,
                label: label.into(),
                data: ImageData::Pixels(p),
            })
            .collect()
    };
    Ok(Listing {
        classes,
        train: items(train),
        test: items(test),
        default_short_side: None,
    })
}
