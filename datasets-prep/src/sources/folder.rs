//! Class-per-folder layouts: `folder` (train/ and test/ sub-trees, or list files) and MIT-67
//! (Images/<class>/ with TrainImages.txt and TestImages.txt). Classes are the sorted folder names.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{ImageData, Item, Listing, Source, SourceError, is_image_file, read_lines, required};
use crate::manifest::ClassInfo;

/// Sorted names of the visible sub-directories of `dir`. Class names are stored as UTF-8 text,
/// so a folder name that is not UTF-8 is an error naming it (two such names could otherwise
/// become the same class).
fn subdirs(dir: &Path) -> Result<Vec<String>, SourceError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SourceError::invalid(dir, e.to_string()))? {
        let entry = entry.map_err(|e| SourceError::invalid(dir, e.to_string()))?;
        let path = entry.path();
        if entry.file_name().as_encoded_bytes().starts_with(b".") || !path.is_dir() {
            continue;
        }
        let name = entry.file_name().into_string().map_err(|_| {
            SourceError::invalid(
                &path,
                "class folder name is not valid UTF-8 (shown with \u{fffd} for the bad bytes); \
                 rename it: class names are stored as UTF-8 text",
            )
        })?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Sorted image files directly inside `dir`.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| SourceError::invalid(dir, e.to_string()))? {
        let path = entry
            .map_err(|e| SourceError::invalid(dir, e.to_string()))?
            .path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        // Anything but a directory: a FIFO named like an image is then reported, not skipped.
        let not_dir = std::fs::metadata(&path).is_ok_and(|m| !m.is_dir());
        if !hidden && not_dir && is_image_file(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn class_list(names: &[String]) -> Vec<ClassInfo> {
    names
        .iter()
        .map(|n| ClassInfo {
            id: n.clone(),
            name: n.clone(),
        })
        .collect()
}

pub(super) fn load(source: &Source, root: &Path) -> Result<Listing, SourceError> {
    let (train_dir, test_dir) = (root.join("train"), root.join("test"));
    if train_dir.is_dir() && test_dir.is_dir() {
        return load_trees(&train_dir, &test_dir);
    }
    if root.join("train.txt").is_file() && root.join("test.txt").is_file() {
        return load_lists(source, root, ".", "train.txt", "test.txt", None);
    }
    Err(SourceError::MissingFile {
        path: root.join("train"),
        source_name: source.to_string(),
        layout: source.layout(),
    })
}

fn load_trees(train_dir: &Path, test_dir: &Path) -> Result<Listing, SourceError> {
    let names = subdirs(train_dir)?;
    let mut listing = Listing {
        classes: class_list(&names),
        train: Vec::new(),
        test: Vec::new(),
        default_short_side: None,
    };
    for test_class in subdirs(test_dir)? {
        if !names.contains(&test_class) {
            return Err(SourceError::invalid(
                &test_dir.join(&test_class),
                "a test class with no folder under train/ (every class needs training images)",
            ));
        }
    }
    for (label, name) in names.iter().enumerate() {
        for (dir, items) in [
            (train_dir, &mut listing.train),
            (test_dir, &mut listing.test),
        ] {
            let class_dir = dir.join(name);
            if !class_dir.is_dir() {
                continue;
            }
            for path in image_files(&class_dir)? {
                items.push(Item {
                    name: path.display().to_string(),
                    label,
                    data: ImageData::File(path),
                });
            }
        }
    }
    Ok(listing)
}

/// Images under `root/image_dir/<class>/`, split by two list files of `<class>/<file>` lines.
pub(super) fn load_lists(
    source: &Source,
    root: &Path,
    image_dir: &str,
    train_list: &str,
    test_list: &str,
    default_short_side: Option<u32>,
) -> Result<Listing, SourceError> {
    let images = required(source, root, image_dir)?;
    let train_path = required(source, root, train_list)?;
    let test_path = required(source, root, test_list)?;
    let names = subdirs(&images)?;
    let mut listing = Listing {
        classes: class_list(&names),
        train: Vec::new(),
        test: Vec::new(),
        default_short_side,
    };
    let mut seen = HashSet::new();
    for (list, train) in [(&train_path, true), (&test_path, false)] {
        for (line, rel) in read_lines(list)? {
            let bad = |reason: String| SourceError::BadLine {
                path: list.to_path_buf(),
                line,
                reason,
            };
            let Some((class, _)) = rel.rsplit_once('/') else {
                return Err(bad(format!("expected <class>/<file>, got {rel:?}")));
            };
            let label = names.iter().position(|n| n == class).ok_or_else(|| {
                bad(format!(
                    "class {class:?} has no folder in {}",
                    images.display()
                ))
            })?;
            if !seen.insert(rel.clone()) {
                return Err(bad(format!("{rel:?} is listed twice")));
            }
            let path = images.join(&rel);
            listing.push_file(train, label, path);
        }
    }
    Ok(listing)
}
