//! `datasets-prep`: pack, verify and describe shard directories.

use clap::Parser;

/// Pack image datasets into verified, memory-mapped shard files for cosine-train.
#[derive(Debug, Parser)]
#[command(name = "datasets-prep", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!("datasets-prep: no subcommand is implemented yet (see the README's roadmap)");
    std::process::exit(2);
}
