//! CUB-200-2011, CUB-subX and NABirds: images.txt, image_class_labels.txt, a split file and
//! images/. Only ids listed in the split file are used; a split value other than "0" means train.

use std::collections::HashMap;
use std::path::Path;

use super::{Listing, Source, SourceError, integer_classes, key_value_lines, required};

pub(super) fn load(source: &Source, root: &Path, split_file: &str) -> Result<Listing, SourceError> {
    let images_path = required(source, root, "images.txt")?;
    let labels_path = required(source, root, "image_class_labels.txt")?;
    let split_path = required(source, root, split_file)?;
    let image_dir = required(source, root, "images")?;

    let images = key_value_lines(&images_path)?;
    let mut labels = HashMap::new();
    for (line, id, value) in key_value_lines(&labels_path)? {
        let label: i64 = value.parse().map_err(|_| SourceError::BadLine {
            path: labels_path.clone(),
            line,
            reason: format!("class of image {id:?} is {value:?}, expected an integer"),
        })?;
        labels.insert(id, label);
    }
    let mut is_train = HashMap::new();
    for (_, id, value) in key_value_lines(&split_path)? {
        is_train.insert(id, value != "0");
    }
    let names = class_names(root)?;
    let classes = integer_classes(labels.values().copied(), |id| names.get(&id).cloned());
    let index: HashMap<String, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();

    let mut listing = Listing {
        classes,
        train: Vec::new(),
        test: Vec::new(),
        default_short_side: Some(512),
    };
    let known: std::collections::HashSet<&str> =
        images.iter().map(|(_, id, _)| id.as_str()).collect();
    let mut unknown: Vec<&String> = is_train
        .keys()
        .filter(|id| !known.contains(id.as_str()))
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        unknown.truncate(5);
        return Err(SourceError::invalid(
            &split_path,
            format!("lists image ids that images.txt does not have, e.g. {unknown:?}"),
        ));
    }
    for (line, id, rel) in &images {
        let Some(&train) = is_train.get(id) else {
            continue;
        };
        let label = *labels.get(id).ok_or_else(|| SourceError::BadLine {
            path: images_path.clone(),
            line: *line,
            reason: format!("image {id:?} has no class in {}", labels_path.display()),
        })?;
        let path = image_dir.join(rel);
        listing.push_file(train, index[&label.to_string()], path);
    }
    Ok(listing)
}

/// classes.txt ("<id> <name>"), if present.
fn class_names(root: &Path) -> Result<HashMap<i64, String>, SourceError> {
    let path = root.join("classes.txt");
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let mut names = HashMap::new();
    for (line, id, name) in key_value_lines(&path)? {
        let id: i64 = id.parse().map_err(|_| SourceError::BadLine {
            path: path.clone(),
            line,
            reason: format!("class id {id:?} is not an integer"),
        })?;
        names.insert(id, name);
    }
    Ok(names)
}
