//! Stanford Cars from `cars_annos.mat` (the all-images annotation file shipped with car_ims.tgz),
//! not the devkit: struct array `annotations` with relative_im_path, class (1..196) and test.

use std::path::Path;

use super::{Listing, Source, SourceError, integer_classes, read_file, required};
use crate::mat::{self, MatValue};

pub(super) fn load(source: &Source, root: &Path) -> Result<Listing, SourceError> {
    let annos_path = required(source, root, "cars_annos.mat")?;
    let bad = |reason: String| SourceError::invalid(&annos_path, reason);
    let vars = mat::read_mat(&read_file(&annos_path, mat::MAX_FILE_BYTES)?)
        .map_err(|e| bad(e.to_string()))?;
    let annos = mat::variable(&vars, "annotations").map_err(|e| bad(e.to_string()))?;
    let paths = annos
        .struct_field("relative_im_path")
        .map_err(|e| bad(e.to_string()))?;
    let classes_raw = annos
        .struct_field("class")
        .map_err(|e| bad(e.to_string()))?;
    let tests = annos.struct_field("test").map_err(|e| bad(e.to_string()))?;
    let names: Vec<String> = match mat::variable(&vars, "class_names") {
        Ok(MatValue::Cell { elements, .. }) => elements
            .iter()
            .map(|e| match e {
                MatValue::Char { text, .. } => text.clone(),
                _ => String::new(),
            })
            .collect(),
        _ => Vec::new(),
    };

    let mut rows = Vec::with_capacity(paths.len());
    for (i, ((p, c), t)) in paths.iter().zip(&classes_raw).zip(&tests).enumerate() {
        let scalar = |v: &MatValue, field: &str| -> Result<f64, SourceError> {
            match v.as_numbers() {
                Ok([x]) => Ok(*x),
                Ok(other) => Err(bad(format!(
                    "annotation {}: {field} has {} values, expected 1",
                    i + 1,
                    other.len()
                ))),
                Err(e) => Err(bad(format!("annotation {}: {field}: {e}", i + 1))),
            }
        };
        let MatValue::Char { text: rel, .. } = p else {
            return Err(bad(format!(
                "annotation {}: relative_im_path is {}, expected text",
                i + 1,
                p.kind()
            )));
        };
        let class = scalar(c, "class")?;
        if class < 1.0 || class.fract() != 0.0 {
            return Err(bad(format!(
                "annotation {} ({rel}): class {class} out of range (classes start at 1)",
                i + 1
            )));
        }
        rows.push((rel.clone(), class as i64, scalar(t, "test")? != 0.0));
    }
    let classes = integer_classes(rows.iter().map(|r| r.1), |id| {
        names
            .get(id as usize - 1)
            .filter(|n| !n.is_empty())
            .cloned()
    });
    let mut listing = Listing {
        classes,
        train: Vec::new(),
        test: Vec::new(),
        default_short_side: Some(512),
    };
    for (rel, class, test) in rows {
        let label = listing
            .classes
            .iter()
            .position(|c| c.id == class.to_string())
            .expect("class was collected");
        let path = root.join(&rel);
        listing.push_file(!test, label, path);
    }
    Ok(listing)
}
