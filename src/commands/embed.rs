//! `cosine-train embed`: the unit-sphere class embedding of a class hierarchy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::embedding::hierarchy::{Hierarchy, unitsphere_embedding};
use crate::embedding::{ids_path, npy};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Hierarchy file: one `parent child` pair of integer ids per line.
    #[arg(long)]
    pub hierarchy: PathBuf,
    /// The file has `child parent` lines instead (as NABirds' hierarchy.txt).
    #[arg(long, visible_alias = "hierarchy-is-a")]
    pub is_a: bool,
    /// Output .npy (float64, C x C); the class ids of its rows go to the same name with
    /// `.ids.txt` instead of `.npy`.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &EmbedArgs) -> anyhow::Result<ExitCode> {
    let h = Hierarchy::from_file(&args.hierarchy, args.is_a)?;
    let (ids, values) = unitsphere_embedding(&h)?;
    let matrix = npy::Matrix {
        rows: ids.len(),
        cols: ids.len(),
        values,
    };
    npy::write_matrix(&args.out, &matrix)?;
    let ids_file = ids_path(&args.out);
    let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
    datasets_prep::atomic::write_file(&ids_file, text.as_bytes())?;
    eprintln!(
        "cosine-train: {} classes -> {} and {}",
        ids.len(),
        args.out.display(),
        ids_file.display()
    );
    Ok(ExitCode::SUCCESS)
}
