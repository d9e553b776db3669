//! A grid file (`sweep --grid FILE`, TOML) for studies too large for `--axis` lines:
//!
//! ```toml
//! [train]                      # options every cell gets, as after `--`
//! epochs = 30
//! arch = "resnet20"
//! sync-bn = true               # a flag: true gives it, false leaves it out
//!
//! [[axis]]                     # each [[axis]] table is one axis of the product
//! loss = ["ce", "cosine"]
//!
//! [[axis]]
//! lr-max = "paper"             # a single value is a list of one ("paper", "all" as for --axis)
//!
//! [[axis]]                     # several keys in one table vary together, value i with value i
//! data = ["data/cub", "data/cars"]
//! preset = ["paper-cub-ce", "paper-cars-ce"]
//! ```
//!
//! Relative paths are taken from the current directory, as on the command line.

use std::path::Path;

use clap::CommandFactory;
use toml::{Table, Value};

use super::super::{Cli, UsageError};
use super::grid::{axis, linked};
use crate::run_dir::sweep::Axis;

/// The largest grid file read.
const MAX_GRID_BYTES: u64 = 4 << 20;

/// The axes and the common `train` options of a grid file.
pub fn read(path: &Path) -> Result<(Vec<Axis>, Vec<String>), UsageError> {
    let bad = |why: String| UsageError(format!("--grid {}: {why}", path.display()));
    let bytes = datasets_prep::bounded::read_limited(path, MAX_GRID_BYTES)
        .map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
    parse(&text).map_err(bad)
}

/// Parses a grid file's text.
pub fn parse(text: &str) -> Result<(Vec<Axis>, Vec<String>), String> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut axes = Vec::new();
    let mut common = Vec::new();
    for (key, value) in &table {
        match (key.as_str(), value) {
            ("train", Value::Table(train)) => common = train_options(train)?,
            ("axis", Value::Array(tables)) => {
                for (i, t) in tables.iter().enumerate() {
                    let Value::Table(t) = t else {
                        return Err(format!("axis {}: expected a [[axis]] table", i + 1));
                    };
                    axes.push(axis_of(t).map_err(|e| format!("[[axis]] number {}: {e}", i + 1))?);
                }
            }
            _ => {
                return Err(format!(
                    "unknown entry '{key}': expected a [train] table and [[axis]] tables"
                ));
            }
        }
    }
    if axes.is_empty() {
        return Err("no [[axis]] table: a grid needs at least one axis".into());
    }
    Ok((axes, common))
}

/// One `[[axis]]` table: its first key is the axis, any others are linked to it.
fn axis_of(table: &Table) -> Result<Axis, String> {
    let mut options = table.iter().map(|(option, value)| {
        let values = match value {
            Value::Array(items) => items.iter().map(scalar).collect::<Result<Vec<_>, _>>(),
            other => scalar(other).map(|v| vec![v]),
        }
        .map_err(|e| format!("{option}: {e}"))?;
        axis(option, values).map_err(|e| format!("{option}: {e}"))
    });
    let first = options.next().ok_or("an empty table")??;
    let rest = options.collect::<Result<Vec<_>, _>>()?;
    linked(first, rest)
}

/// The `[train]` table as command-line arguments, in the file's order.
fn train_options(table: &Table) -> Result<Vec<String>, String> {
    let command = Cli::command();
    let train = command
        .find_subcommand("train")
        .ok_or("the train command is missing")?;
    let mut args = Vec::new();
    for (key, value) in table {
        let option = key.trim_start_matches("--");
        let arg = train
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(option)
                    || a.get_all_aliases().is_some_and(|al| al.contains(&option))
            })
            .ok_or_else(|| format!("[train] {key}: not an option of cosine-train train"))?;
        if arg.get_action().takes_values() {
            args.push(format!("--{option}"));
            args.push(scalar(value).map_err(|e| format!("[train] {key}: {e}"))?);
        } else {
            match value {
                Value::Boolean(true) => args.push(format!("--{option}")),
                Value::Boolean(false) => {}
                _ => return Err(format!("[train] {key}: a flag, expected true or false")),
            }
        }
    }
    Ok(args)
}

/// A value as the command line would spell it.
fn scalar(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::sweep::grid::cells;

    #[test]
    fn a_grid_file_gives_axes_linked_options_and_common_options() {
        let (axes, common) = parse(
            r#"
            [train]
            epochs = 3
            lr-min = 0.0
            sync-bn = true
            new-head = false
            arch = "resnet8"

            [[axis]]
            data = ["/d/cub", "/d/cars"]
            preset = ["paper-cub-ce", "paper-cars-ce"]

            [[axis]]
            lr-max = "paper"
            "#,
        )
        .unwrap();
        assert_eq!(
            common,
            [
                "--epochs",
                "3",
                "--lr-min",
                "0",
                "--sync-bn",
                "--arch",
                "resnet8"
            ]
        );
        let grid = cells(&axes);
        assert_eq!(grid.len(), 16);
        assert_eq!(grid[0].name, "data-cub_preset-paper-cub-ce_lr-max-2.5");
        assert_eq!(
            grid[15].args[..4],
            ["--data", "/d/cars", "--preset", "paper-cars-ce"]
        );
    }

    #[test]
    fn grid_file_mistakes_are_named() {
        let err = |text: &str| parse(text).unwrap_err();
        assert!(
            err("[[axis]]\nloss = [\"ce\"]\npreset = [\"a\", \"b\"]\n")
                .contains("loss has 1 values but preset has 2")
        );
        assert!(
            err("[train]\nepoch = 3\n[[axis]]\nseed = [0]\n")
                .contains("[train] epoch: not an option")
        );
        assert!(
            err("[train]\nsync-bn = 1\n[[axis]]\nseed = [0]\n").contains("expected true or false")
        );
        assert!(
            err("[[axis]]\nseed = [[0]]\n").contains("seed: expected a string, number or boolean")
        );
        assert!(err("[train]\nepochs = 3\n").contains("no [[axis]] table"));
        assert!(err("[axes]\nseed = 1\n").contains("unknown entry 'axes'"));
        assert!(err("[[axis]]\nout = [\"a\"]\n").contains("out: not an option a grid can vary"));
        assert!(err("[[axis]\n").contains("line 1"));
    }
}
