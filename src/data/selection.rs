//! Train-time subsets and the validation split: which records of the packed training split a
//! run trains on and which it holds out (`--per-class`, `--val-per-class`, `--subset-seed`).
//!
//! Each class's records are shuffled by a generator seeded with (subset seed, class); the first
//! ones of that order are held out for validation, the next `per_class` train. So the choice is
//! a pure function of the packed split and the seed, the validation images stay the same along a
//! sub-sampling curve, and the training subsets are nested: the 5 images of `--per-class 5` are
//! among the 10 of `--per-class 10`.

use datasets_prep::rng::SplitMix64;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `--val-per-class`: training images held out of training for validation, per class.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValSplit {
    /// This many images of every class.
    PerClass(usize),
    /// This fraction (0 < f < 1) of every class, rounded, at least one image.
    Fraction(f64),
}

impl FromStr for ValSplit {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{text}': expected a count of images per class (e.g. 2) or a fraction (e.g. 0.1)"
            )
        };
        if text.contains('.') {
            let f: f64 = text.parse().map_err(|_| bad())?;
            if f > 0.0 && f < 1.0 {
                return Ok(ValSplit::Fraction(f));
            }
            return Err(bad());
        }
        match text.parse::<usize>() {
            Ok(k) if k >= 1 => Ok(ValSplit::PerClass(k)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for ValSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValSplit::PerClass(k) => write!(f, "{k}"),
            ValSplit::Fraction(x) => write!(f, "{x}"),
        }
    }
}

/// Which of the packed training images a run trains on and which it holds out for validation:
/// a pure function of the packed training split and `seed` (see `data::selection`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainSubset {
    /// Training images per class (`--per-class`); `None`: all that are not held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_class: Option<usize>,
    /// Held out for validation (`--val-per-class`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<ValSplit>,
    /// `--subset-seed`.
    #[serde(default)]
    pub seed: u64,
}

impl TrainSubset {
    /// Every packed training image trains (and nothing is held out).
    pub fn is_all(&self) -> bool {
        self.per_class.is_none() && self.val.is_none() && self.seed == 0
    }
}

/// The records (indices into the packed training split, ascending) a run uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    /// Classes with fewer training images than `per_class` asked for, as (class, images).
    pub short: Vec<(usize, usize)>,
}

/// Why no selection can be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error(
        "--val-per-class {asked}: class {class} has only {images} training images, and at least \
         one must stay for training"
    )]
    NoTrainingLeft {
        asked: String,
        class: usize,
        images: usize,
    },
    #[error("--per-class 0: expected at least 1 image per class")]
    EmptySubset,
}

/// Images of a class of `images` that are held out for validation.
pub fn held_out(images: usize, val: Option<ValSplit>) -> usize {
    match val {
        None => 0,
        Some(ValSplit::PerClass(k)) => k,
        Some(ValSplit::Fraction(f)) => ((f * images as f64).round() as usize).max(1),
    }
}

/// Training images per class once `subset` is applied to a split with `counts` images per
/// class; the same arithmetic as [`select`].
pub fn counts_after(counts: &[u64], subset: &TrainSubset) -> Result<Vec<u64>, SelectionError> {
    counts
        .iter()
        .enumerate()
        .map(|(class, &n)| {
            let n = n as usize;
            let (_, train) = split_class(class, n, subset)?;
            Ok(train as u64)
        })
        .collect()
}

/// (held out, trained) images of `class`, which has `n`.
fn split_class(
    class: usize,
    n: usize,
    subset: &TrainSubset,
) -> Result<(usize, usize), SelectionError> {
    if subset.per_class == Some(0) {
        return Err(SelectionError::EmptySubset);
    }
    let val = held_out(n, subset.val);
    if n > 0 && val >= n {
        return Err(SelectionError::NoTrainingLeft {
            asked: subset.val.map(|v| v.to_string()).unwrap_or_default(),
            class,
            images: n,
        });
    }
    let rest = n.saturating_sub(val);
    Ok((val.min(n), subset.per_class.map_or(rest, |k| k.min(rest))))
}

/// The selection of `subset` from a split whose records have `labels` (of `classes` classes).
pub fn select(
    labels: &[u32],
    classes: usize,
    subset: &TrainSubset,
) -> Result<Selection, SelectionError> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &label) in labels.iter().enumerate() {
        if let Some(list) = by_class.get_mut(label as usize) {
            list.push(i);
        }
    }
    let (mut train, mut val, mut short) = (Vec::new(), Vec::new(), Vec::new());
    for (class, mut records) in by_class.into_iter().enumerate() {
        let (v, t) = split_class(class, records.len(), subset)?;
        if subset.per_class.is_some_and(|k| t < k) {
            short.push((class, t));
        }
        if subset.is_all() {
            train.extend(records);
            continue;
        }
        SplitMix64::stream(subset.seed ^ 0x5E1E_C7ED, class as u64).shuffle(&mut records);
        val.extend_from_slice(&records[..v]);
        train.extend_from_slice(&records[v..v + t]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok(Selection { train, val, short })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(per_class: usize, classes: u32) -> Vec<u32> {
        (0..per_class as u32 * classes)
            .map(|i| i % classes)
            .collect()
    }

    fn subset(per_class: Option<usize>, val: Option<ValSplit>, seed: u64) -> TrainSubset {
        TrainSubset {
            per_class,
            val,
            seed,
        }
    }

    #[test]
    fn everything_without_a_subset() {
        let l = labels(7, 3);
        let s = select(&l, 3, &TrainSubset::default()).unwrap();
        assert_eq!(s.train, (0..21).collect::<Vec<_>>());
        assert!(s.val.is_empty() && s.short.is_empty());
    }

    #[test]
    fn subsets_are_seeded_nested_and_leave_validation_alone() {
        let l = labels(20, 4);
        let val = Some(ValSplit::PerClass(3));
        let a = select(&l, 4, &subset(Some(5), val, 1)).unwrap();
        let b = select(&l, 4, &subset(Some(10), val, 1)).unwrap();
        assert_eq!(
            a,
            select(&l, 4, &subset(Some(5), val, 1)).unwrap(),
            "deterministic"
        );
        assert_eq!((a.train.len(), a.val.len()), (20, 12));
        for c in 0..4 {
            let of = |v: &[usize]| v.iter().filter(|&&i| l[i] == c).count();
            assert_eq!((of(&a.train), of(&a.val)), (5, 3), "class {c}");
        }
        assert!(a.train.iter().all(|i| b.train.contains(i)), "nested");
        assert_eq!(
            a.val, b.val,
            "the validation images do not depend on --per-class"
        );
        assert!(a.train.iter().all(|i| !a.val.contains(i)), "disjoint");
        let other = select(&l, 4, &subset(Some(5), val, 2)).unwrap();
        assert_ne!(other.train, a.train, "another seed, another subset");
    }

    #[test]
    fn fractions_round_and_classes_that_run_short_are_named() {
        let l = labels(10, 2);
        let s = select(&l, 2, &subset(Some(50), Some(ValSplit::Fraction(0.25)), 0)).unwrap();
        // 0.25 of 10 rounds to 3 (2.5 -> 3 away from zero); 7 train per class.
        assert_eq!((s.val.len(), s.train.len()), (6, 14));
        assert_eq!(s.short, vec![(0, 7), (1, 7)]);
        assert_eq!(
            counts_after(
                &[10, 10],
                &subset(Some(50), Some(ValSplit::Fraction(0.25)), 0)
            )
            .unwrap(),
            vec![7, 7]
        );
        let err = select(&l, 2, &subset(None, Some(ValSplit::PerClass(10)), 0)).unwrap_err();
        assert!(err.to_string().contains("class 0 has only 10"), "{err}");
        assert_eq!(
            select(&l, 2, &subset(Some(0), None, 0)).unwrap_err(),
            SelectionError::EmptySubset
        );
    }
}
