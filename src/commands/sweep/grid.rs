//! The grid of a sweep: axes from `--axis OPTION=V1,V2`, their combinations as named cells,
//! and each cell's `train` arguments parsed as the command line would parse them.

use std::path::Path;

use clap::{CommandFactory, FromArgMatches};

use super::super::train::TrainArgs;
use super::super::{Cli, Command, UsageError};
use crate::config::RunConfig;
use crate::run_dir::sweep::{Axis, Cell};

/// The reference's learning-rate grid (`--axis lr-max=paper`, reference-spec 4.5).
pub const PAPER_RATES: [&str; 8] = ["2.5", "1.0", "0.5", "0.1", "0.05", "0.01", "0.005", "0.001"];

/// Parses `OPTION=V1,V2`.
pub fn parse_axis(text: &str) -> Result<Axis, UsageError> {
    let (option, values) = text.split_once('=').ok_or_else(|| {
        UsageError(format!(
            "--axis {text}: expected OPTION=V1,V2,... (e.g. loss=ce,cosine)"
        ))
    })?;
    let values = values
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    axis(option, values).map_err(|why| UsageError(format!("--axis {text}: {why}")))
}

/// An axis of `option` (with or without its `--`) over `values`, with the shorthands expanded:
/// lr-max=paper is the paper's 8 rates, per-class=all the whole split.
pub fn axis(option: &str, mut values: Vec<String>) -> Result<Axis, String> {
    let option = option.trim().trim_start_matches("--").to_string();
    if option.is_empty() || option == "out" || option == "resume" || option == "force" {
        return Err("not an option a grid can vary".into());
    }
    if option == "lr-max" && values == ["paper"] {
        values = PAPER_RATES.iter().map(|v| v.to_string()).collect();
    }
    if option == "per-class" {
        for v in &mut values {
            if v == "all" {
                *v = "0".into();
            }
        }
    }
    if values.is_empty() {
        return Err("no values".into());
    }
    Ok(Axis::new(option, values))
}

/// Options that vary together: `first` and the rest, each with as many values.
pub fn linked(first: Axis, rest: Vec<Axis>) -> Result<Axis, String> {
    if let Some(other) = rest.iter().find(|a| a.values.len() != first.values.len()) {
        return Err(format!(
            "{} has {} values but {} has {}: options that vary together need as many values each",
            first.option,
            first.values.len(),
            other.option,
            other.values.len()
        ));
    }
    Ok(Axis {
        linked: rest,
        ..first
    })
}

/// Refuses a grid whose axes name an option twice, or name one of the common options
/// (`common` as given to `train`), or that sets `--out` among the common options.
pub fn check(axes: &[Axis], common: &[String]) -> Result<(), UsageError> {
    let given = |flag: &str| {
        common
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if given("--out") {
        return Err(UsageError(
            "sweep: --out goes before --, the cells' directories are made inside it".into(),
        ));
    }
    let mut seen: Vec<&str> = Vec::new();
    for option in axes.iter().flat_map(Axis::options) {
        if seen.contains(&option) {
            return Err(UsageError(format!(
                "sweep: --{option} is on two axes; give each option one axis (options that \
                 vary together go in one [[axis]] table of a grid file)"
            )));
        }
        if given(&format!("--{option}")) {
            return Err(UsageError(format!(
                "sweep: --{option} is an axis and also among the options every cell gets \
                 (after -- or in the grid file's [train]); give it once"
            )));
        }
        seen.push(option);
    }
    Ok(())
}

/// Every combination of the axes' values (the first axis varies slowest), with its name.
pub fn cells(axes: &[Axis]) -> Vec<Cell> {
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for axis in axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                (0..axis.values.len()).map(move |i| {
                    let mut c = c.clone();
                    c.extend(axis.step(i));
                    c
                })
            })
            .collect();
    }
    combos
        .into_iter()
        .map(|pairs| {
            Cell::new(
                pairs
                    .iter()
                    .map(|(o, v)| format!("{o}-{}", file_safe(v)))
                    .collect::<Vec<_>>()
                    .join("_"),
                pairs
                    .iter()
                    .flat_map(|(o, v)| [format!("--{o}"), v.clone()])
                    .collect(),
            )
        })
        .collect()
}

/// A value as part of a directory name (paths become their last component).
fn file_safe(value: &str) -> String {
    let last = Path::new(value)
        .file_name()
        .map_or(value.to_string(), |n| n.to_string_lossy().into_owned());
    last.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-+".contains(c) {
                c
            } else {
                '+'
            }
        })
        .collect()
}

/// The `train` arguments of a cell, parsed as the command line would be, with `given`.
pub fn parse_cell(
    out: &Path,
    common: &[String],
    cell: &Cell,
) -> anyhow::Result<(TrainArgs, Vec<String>)> {
    let mut argv: Vec<String> = vec!["cosine-train".into(), "train".into(), "--out".into()];
    argv.push(out.join(&cell.name).display().to_string());
    argv.extend(common.iter().cloned());
    argv.extend(cell.args.iter().cloned());
    let matches = Cli::command().try_get_matches_from(&argv).map_err(|e| {
        UsageError(format!(
            "cell {}: {}",
            cell.name,
            e.render().to_string().trim()
        ))
    })?;
    let given: Vec<String> = matches
        .subcommand()
        .map(|(_, m)| {
            m.ids()
                .filter(|id| {
                    m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| id.as_str().to_string())
                .collect()
        })
        .unwrap_or_default();
    match Cli::from_arg_matches(&matches)?.command {
        Command::Train(args) => Ok((*args, given)),
        _ => unreachable!("the argument vector names the train command"),
    }
}

/// How the resolved configurations of a stored run and the grid's differ, as `key: a -> b`.
pub fn difference(stored: &RunConfig, wanted: &RunConfig) -> String {
    crate::train::resume::all_differences(stored, wanted)
        .map(|d| d.join(", "))
        .unwrap_or_else(|e| format!("(cannot compare: {e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_expand_to_every_combination_with_readable_names() {
        let axes = [
            parse_axis("loss=ce,cosine").unwrap(),
            parse_axis("--seed=0,1,2").unwrap(),
        ];
        let grid = cells(&axes);
        assert_eq!(grid.len(), 6);
        assert_eq!(grid[0].name, "loss-ce_seed-0");
        assert_eq!(grid[5].name, "loss-cosine_seed-2");
        assert_eq!(grid[4].args, ["--loss", "cosine", "--seed", "1"]);
        assert_eq!(parse_axis("lr-max=paper").unwrap().values.len(), 8);
        assert_eq!(parse_axis("per-class=1,all").unwrap().values, ["1", "0"]);
        assert!(parse_axis("out=a,b").is_err());
        assert!(parse_axis("loss").is_err());
        let data = parse_axis("data=/x/cub,/y/nab").unwrap();
        assert_eq!(cells(&[data])[1].name, "data-nab");
    }

    #[test]
    fn linked_options_vary_together() {
        let data = axis("data", vec!["/d/cub".into(), "/d/cars".into()]).unwrap();
        let preset = axis(
            "preset",
            vec!["paper-cub-ce".into(), "paper-cars-ce".into()],
        )
        .unwrap();
        let both = linked(data.clone(), vec![preset]).unwrap();
        let grid = cells(&[both.clone(), parse_axis("seed=0,1").unwrap()]);
        assert_eq!(grid.len(), 4);
        assert_eq!(grid[2].name, "data-cars_preset-paper-cars-ce_seed-0");
        assert_eq!(
            grid[2].args,
            [
                "--data",
                "/d/cars",
                "--preset",
                "paper-cars-ce",
                "--seed",
                "0"
            ]
        );
        let short = axis("preset", vec!["paper-cub-ce".into()]).unwrap();
        let err = linked(data, vec![short]).unwrap_err();
        assert!(err.contains("data has 2 values but preset has 1"), "{err}");
        let seed = parse_axis("seed=0,1").unwrap();
        assert!(check(&[both.clone(), seed.clone()], &[]).is_ok());
        let twice = check(&[seed.clone(), seed.clone()], &[]).unwrap_err().0;
        assert!(twice.contains("--seed is on two axes"), "{twice}");
        let common = ["--preset".to_string(), "paper-cub-ce".to_string()];
        let clash = check(&[both], &common).unwrap_err().0;
        assert!(clash.contains("--preset is an axis"), "{clash}");
        assert!(check(&[seed], &["--out=x".into()]).is_err());
    }
}
