//! Class embeddings psi for the cosine objectives (`--embedding`): `onehot`, a `.npy` matrix
//! whose rows are in the shard manifest's class order, or the reference's pickle files (a dict
//! with `embedding` and `ind2label`), matched to the manifest's classes by original id; and the
//! embeddings computed from class hierarchies (`cosine-train embed`, [`hierarchy`]).

pub mod hierarchy;
pub mod npy;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use anyhow::{Context, bail};
use datasets_prep::manifest::ClassInfo;
use datasets_prep::pickle;
use tch::{Kind, Tensor};

/// `--embedding`: where the cosine objectives' class embeddings come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum EmbeddingSpec {
    /// One-hot vectors (the identity matrix).
    OneHot,
    /// A `.npy` matrix or a reference pickle.
    File(PathBuf),
}

impl FromStr for EmbeddingSpec {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::from(s.to_string()))
    }
}

impl From<String> for EmbeddingSpec {
    fn from(s: String) -> Self {
        if s == "onehot" {
            EmbeddingSpec::OneHot
        } else {
            EmbeddingSpec::File(PathBuf::from(s))
        }
    }
}

impl From<EmbeddingSpec> for String {
    fn from(e: EmbeddingSpec) -> String {
        e.to_string()
    }
}

impl std::fmt::Display for EmbeddingSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmbeddingSpec::OneHot => f.write_str("onehot"),
            EmbeddingSpec::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The largest embedding file read (a 10,000 x 10,000 float64 matrix is 800 MB).
const FILE_LIMIT: u64 = 1 << 30;

/// The C x D class embedding in manifest class order, rows as stored (as the reference uses
/// them: rows that are not unit length, or zero, train differently, and are reported).
pub fn load(spec: &EmbeddingSpec, classes: &[ClassInfo]) -> anyhow::Result<Tensor> {
    let path = match spec {
        EmbeddingSpec::OneHot => {
            return Ok(Tensor::eye(
                classes.len() as i64,
                (Kind::Float, tch::Device::Cpu),
            ));
        }
        EmbeddingSpec::File(path) => path.as_path(),
    };
    let spec = path.display().to_string();
    let bytes = datasets_prep::bounded::read_limited(path, FILE_LIMIT)
        .with_context(|| format!("--embedding {spec}: cannot read (expected onehot or a file)"))?;
    let (ids, rows, dim, values) = if bytes.starts_with(b"\x93NUMPY") {
        let npy::Matrix {
            rows,
            cols: dim,
            values,
        } = npy::read_matrix(&bytes)
            .with_context(|| format!("{spec}: not a readable .npy matrix"))?;
        let ids_file = ids_path(path);
        if ids_file.exists() {
            let text = datasets_prep::bounded::read_text_limited(&ids_file, FILE_LIMIT)
                .context("cannot read the embedding's class ids")?;
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
    if let Some(at) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "{spec}: row {}, column {} is {} (class embeddings must be finite)",
            at / dim.max(1),
            at % dim.max(1),
            values[at]
        );
    }
    let values = match ids {
        Some(ids) => reorder(&spec, &ids, rows, dim, &values, classes)?,
        None => values,
    };
    let norms: Vec<f64> = values
        .chunks(dim.max(1))
        .map(|row| row.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    let zero = norms.iter().filter(|&&n| n <= 1e-12).count();
    let off_unit = norms.iter().filter(|&&n| (n - 1.0).abs() > 1e-6).count();
    if zero > 0 {
        tracing::warn!(
            "{spec}: {zero} class embedding rows are zero; those classes get no cosine target \
             (used as stored, as the reference does)"
        );
    } else if off_unit > 0 {
        tracing::warn!(
            "{spec}: {off_unit} class embedding rows are not unit length; used as stored, as \
             the reference does"
        );
    }
    let m = Tensor::from_slice(&values).reshape([classes.len() as i64, dim as i64]);
    Ok(m.to_kind(Kind::Float))
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
    let root =
        pickle::parse(bytes).with_context(|| format!("{name}: neither .npy nor a pickle"))?;
    let array = root
        .get("embedding")
        .with_context(|| format!("{name}: the pickle has no 'embedding' entry"))?;
    let array = pickle::ndarray(&array).with_context(|| format!("{name}: 'embedding'"))?;
    let [rows, dim] = array.shape[..] else {
        bail!("{name}: 'embedding' is not 2-D")
    };
    let values = array
        .to_f64()
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
