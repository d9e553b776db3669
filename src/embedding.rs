//! Class embeddings psi for the cosine objectives (`--embedding`): `onehot`, a `.npy` matrix
//! whose rows are in the shard manifest's class order, or the reference's pickle files (a dict
//! with `embedding` and `ind2label`), matched to the manifest's classes by original id.

use std::path::Path;

use anyhow::{Context, bail};
use datasets_prep::manifest::ClassInfo;
use datasets_prep::pickle;
use tch::{Kind, Tensor};

/// The C x D class embedding in manifest class order, rows scaled to unit length.
pub fn load(spec: &str, classes: &[ClassInfo]) -> anyhow::Result<Tensor> {
    if spec == "onehot" {
        return Ok(Tensor::eye(
            classes.len() as i64,
            (Kind::Float, tch::Device::Cpu),
        ));
    }
    let path = Path::new(spec);
    let bytes = std::fs::read(path)
        .with_context(|| format!("--embedding {spec}: cannot read (expected onehot or a file)"))?;
    let (ids, rows, dim, values) = if bytes.starts_with(b"\x93NUMPY") {
        let (shape, values) =
            read_npy(&bytes).with_context(|| format!("{spec}: not a readable .npy matrix"))?;
        let [rows, dim] = shape[..] else {
            bail!(
                "{spec}: a {}-D array; expected a 2-D C x D matrix",
                shape.len()
            )
        };
        let ids_file = ids_path(path);
        if ids_file.exists() {
            let text = std::fs::read_to_string(&ids_file)
                .with_context(|| format!("{}: cannot read", ids_file.display()))?;
            let ids = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from);
            (Some(ids.collect()), rows, dim, values)
        } else if rows != classes.len() {
            bail!(
                "{spec}: {rows} rows, but the data has {} classes (one row per class, in the \
                 manifest's class order, or class ids in {})",
                classes.len(),
                ids_file.display()
            );
        } else {
            (None, rows, dim, values)
        }
    } else {
        let (ids, rows, dim, values) = from_reference_pickle(path, &bytes)?;
        (Some(ids), rows, dim, values)
    };
    let values = match ids {
        Some(ids) => reorder(spec, &ids, rows, dim, &values, classes)?,
        None => values,
    };
    let m = Tensor::from_slice(&values).reshape([classes.len() as i64, dim as i64]);
    let norms = m
        .pow_tensor_scalar(2)
        .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
        .sqrt();
    if bool::try_from(norms.le(1e-12).any()).unwrap_or(true) {
        bail!("{spec}: a class embedding row is zero; every class needs a direction");
    }
    Ok((m / norms).to_kind(Kind::Float))
}

/// The class-id list that `cosine-train embed` writes beside an `.npy` embedding.
pub fn ids_path(npy: &Path) -> std::path::PathBuf {
    let name = npy
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    npy.with_file_name(format!(
        "{}.ids.txt",
        name.strip_suffix(".npy").unwrap_or(&name)
    ))
}

/// The reference pickle: (ids in row order, rows, columns, values).
fn from_reference_pickle(
    path: &Path,
    bytes: &[u8],
) -> anyhow::Result<(Vec<String>, usize, usize, Vec<f64>)> {
    let name = path.display();
    let root = pickle::parse(bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{name}: neither .npy nor a pickle"))?;
    let array = root
        .get("embedding")
        .with_context(|| format!("{name}: the pickle has no 'embedding' entry"))?;
    let array = pickle::ndarray(&array)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{name}: 'embedding'"))?;
    let [rows, dim] = array.shape[..] else {
        bail!("{name}: 'embedding' is not 2-D")
    };
    let values = array
        .to_f64()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{name}: 'embedding'"))?;
    let ids: Vec<String> = root
        .get("ind2label")
        .and_then(|v| v.items())
        .with_context(|| format!("{name}: the pickle has no 'ind2label' list"))?
        .iter()
        .map(|v| v.as_int().map(|i| i.to_string()).or_else(|| v.as_text()))
        .collect::<Option<_>>()
        .with_context(|| format!("{name}: 'ind2label' holds something other than ids"))?;
    Ok((ids, rows, dim, values))
}

/// Rows labelled by `ids`, put in the manifest's class order; every class needs exactly one row.
fn reorder(
    name: &str,
    ids: &[String],
    rows: usize,
    dim: usize,
    values: &[f64],
    classes: &[ClassInfo],
) -> anyhow::Result<Vec<f64>> {
    if ids.len() != rows {
        bail!("{name}: {} class ids for {rows} embedding rows", ids.len());
    }
    let missing: Vec<&str> = classes
        .iter()
        .filter(|c| !ids.contains(&c.id))
        .map(|c| c.id.as_str())
        .collect();
    let extra: Vec<&str> = ids
        .iter()
        .filter(|id| !classes.iter().any(|c| &c.id == *id))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        bail!(
            "{name}: the embedding's classes do not match the data's ({rows} vs {}): missing ids {:?}, extra ids {:?}",
            classes.len(),
            &missing[..missing.len().min(10)],
            &extra[..extra.len().min(10)]
        );
    }
    let mut out = Vec::with_capacity(classes.len() * dim);
    for class in classes {
        let row = ids
            .iter()
            .position(|id| *id == class.id)
            .expect("checked above");
        out.extend_from_slice(&values[row * dim..(row + 1) * dim]);
    }
    Ok(out)
}

/// Reads a little-endian f8/f4 `.npy` file in C order: (shape, values).
fn read_npy(bytes: &[u8]) -> anyhow::Result<(Vec<usize>, Vec<f64>)> {
    if !bytes.starts_with(b"\x93NUMPY") {
        bail!("not a .npy file (no \\x93NUMPY magic)");
    }
    let major = *bytes.get(6).context("truncated")?;
    let (len, start) = match major {
        1 => (
            u16::from_le_bytes(bytes.get(8..10).context("truncated")?.try_into()?) as usize,
            10,
        ),
        2 | 3 => (
            u32::from_le_bytes(bytes.get(8..12).context("truncated")?.try_into()?) as usize,
            12,
        ),
        v => bail!("npy version {v} is not supported"),
    };
    let header = std::str::from_utf8(bytes.get(start..start + len).context("truncated header")?)?;
    let descr = header
        .split("'descr':")
        .nth(1)
        .and_then(|s| s.split('\'').nth(1))
        .context("no descr")?;
    if header.contains("'fortran_order': True") {
        bail!("Fortran-ordered arrays are not supported");
    }
    let shape_text = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split(['(', ')']).nth(1))
        .context("no shape")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + len..];
    let values: Vec<f64> = match descr {
        "<f8" => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        "<f4" => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")).into())
            .collect(),
        other => bail!("dtype {other} is not supported (expected <f8 or <f4)"),
    };
    let expected = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .context("the shape's element count overflows")?;
    if values.len() != expected {
        bail!("{} values for shape {shape:?}", values.len());
    }
    Ok((shape, values))
}

#[cfg(test)]
mod parser_properties {
    use super::*;
    use proptest::prelude::*;

    fn valid_npy() -> Vec<u8> {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }";
        let padded = format!("{header:<117}\n");
        bytes.extend((padded.len() as u16).to_le_bytes());
        bytes.extend(padded.as_bytes());
        bytes.extend((0..6).flat_map(|i| f64::from(i).to_le_bytes()));
        bytes
    }

    #[test]
    fn the_valid_sample_parses() {
        let (shape, values) = read_npy(&valid_npy()).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(values[5], 5.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Embedding files are user input: any bytes give a value or an error, never a panic.
        #[test]
        fn npy_and_pickle_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read_npy(&bytes);
            let _ = from_reference_pickle(Path::new("x.pickle"), &bytes);
        }

        #[test]
        fn npy_parser_survives_mutations(edits in proptest::collection::vec((0usize..200, any::<u8>()), 1..6), cut in 0usize..250) {
            let mut bytes = valid_npy();
            for (i, b) in edits {
                let i = i % bytes.len();
                bytes[i] = b;
            }
            bytes.truncate(cut.max(1).min(bytes.len()));
            let _ = read_npy(&bytes);
        }
    }
}
