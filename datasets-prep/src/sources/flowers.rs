//! Oxford Flowers-102: jpg/image_NNNNN.jpg, imagelabels.mat (`labels`, 1..102 for images
//! 1..8189) and setid.mat (`trnid`, `valid`, `tstid`); train = trnid + valid, test = tstid.

use std::path::Path;

use super::{Listing, Source, SourceError, integer_classes, read_file, required};
use crate::mat;

pub(super) fn load(source: &Source, root: &Path) -> Result<Listing, SourceError> {
    let labels_path = required(source, root, "imagelabels.mat")?;
    let setid_path = required(source, root, "setid.mat")?;
    let jpg = required(source, root, "jpg")?;

    let numbers = |path: &Path, var: &str| -> Result<Vec<f64>, SourceError> {
        let vars = mat::read_mat(&read_file(path, mat::MAX_FILE_BYTES)?)
            .map_err(|e| SourceError::invalid(path, e.to_string()))?;
        let v = mat::variable(&vars, var).map_err(|e| SourceError::invalid(path, e.to_string()))?;
        v.as_numbers()
            .map(<[f64]>::to_vec)
            .map_err(|e| SourceError::invalid(path, format!("{var}: {e}")))
    };
    let labels = numbers(&labels_path, "labels")?;
    for (i, &l) in labels.iter().enumerate() {
        if l < 1.0 || l.fract() != 0.0 {
            return Err(SourceError::invalid(
                &labels_path,
                format!(
                    "image {}: label {l} out of range (labels start at 1)",
                    i + 1
                ),
            ));
        }
    }
    let classes = integer_classes(labels.iter().map(|&l| l as i64), |_| None);
    let mut listing = Listing {
        classes,
        train: Vec::new(),
        test: Vec::new(),
        default_short_side: Some(512),
    };
    let mut seen = std::collections::HashSet::new();
    for (var, train) in [("trnid", true), ("valid", true), ("tstid", false)] {
        for id in numbers(&setid_path, var)? {
            if !seen.insert(id.to_bits()) {
                return Err(SourceError::invalid(
                    &setid_path,
                    format!("image {id} is listed twice (again in {var})"),
                ));
            }
            if id < 1.0 || id.fract() != 0.0 || id as usize > labels.len() {
                return Err(SourceError::invalid(
                    &setid_path,
                    format!(
                        "{var} lists image {id}, but imagelabels.mat labels images 1..{}",
                        labels.len()
                    ),
                ));
            }
            let id = id as usize;
            let class = (labels[id - 1] as i64).to_string();
            let label = listing
                .classes
                .iter()
                .position(|c| c.id == class)
                .expect("class was collected");
            let path = jpg.join(format!("image_{id:05}.jpg"));
            listing.push_file(train, label, path);
        }
    }
    Ok(listing)
}
