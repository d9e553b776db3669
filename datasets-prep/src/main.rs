//! `datasets-prep`: parse the command line, dispatch, print errors once, set the exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::RangedU64ValueParser;
use clap::{Parser, Subcommand, ValueEnum};
use datasets_prep::pack::{PackError, PackOptions, SHORT_SIDES, pack};
use datasets_prep::sources::Source;
use datasets_prep::{Encoding, verify};

const EXIT_CODES: &str = "\
EXIT STATUS:
    0  success
    1  failure (bad input; damage found by verify)
    2  usage error";

/// Pack image datasets into verified, memory-mapped shard files for cosine-train.
#[derive(Debug, Parser)]
#[command(name = "datasets-prep", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pack a raw dataset into a new shard directory.
    Pack(PackArgs),
    /// Check every checksum and record of a shard directory; exit 1 on damage.
    Verify {
        /// The shard directory.
        dir: PathBuf,
    },
    /// Print a JSON summary of a shard directory.
    Info {
        /// The shard directory.
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EncodingArg {
    Raw,
    Jpeg,
}

#[derive(Debug, clap::Args)]
struct PackArgs {
    /// Raw layout: cub, cub-sub:X, nab, cars, flowers, mit67, cifar100, cifar10, mnist,
    /// fashion-mnist, kmnist, idx (any IDX set, classes named by label), folder.
    #[arg(long, value_parser = parse_source)]
    source: Source,
    /// The dataset's root folder, as downloaded and extracted.
    #[arg(long)]
    root: PathBuf,
    /// The shard directory to create.
    #[arg(long)]
    out: PathBuf,
    /// Dataset name recorded in the manifest (default: the source).
    #[arg(long)]
    name: Option<String>,
    /// Resize the shorter side to this many pixels (1-4096); 0 keeps sizes. Default: 512 for
    /// cub, nab, cars and flowers, 256 for mit67, none for cifar, the IDX sources and folder.
    #[arg(long, value_parser = parse_short_side)]
    short_side: Option<u32>,
    /// How records are stored.
    #[arg(long, value_enum, default_value_t = EncodingArg::Raw)]
    encoding: EncodingArg,
    /// JPEG quality for --encoding jpeg (1-100).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: u8,
    /// Keep K training images per class (the small-data regime); the test split stays whole.
    #[arg(long, value_name = "K", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    per_class: Option<usize>,
    /// Seed of the --per-class selection.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave out images that cannot be read or decoded (listed in the manifest) instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// Decode/resize threads, 1-1024 (default: all cores). The output does not depend on it.
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=MAX_THREADS))]
    threads: Option<usize>,
    /// Target size of one shard file in MiB (1-65536).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    shard_mib: u64,
}

/// Most `--threads`: more only costs memory and start-up (each thread has its own stack), and
/// far more fails to start at all.
const MAX_THREADS: u64 = 1024;

fn parse_short_side(s: &str) -> Result<u32, String> {
    let range = || {
        format!(
            "expected 0 (keep sizes) or {}..={}",
            SHORT_SIDES.start(),
            SHORT_SIDES.end()
        )
    };
    let v: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number: {}", range()))?;
    if v == 0 || SHORT_SIDES.contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: {}", range()))
    }
}

/// The source's own error already lists the accepted names.
fn parse_source(s: &str) -> Result<Source, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("datasets-prep: {}", describe(&err));
            let usage = err
                .downcast_ref::<PackError>()
                .is_some_and(PackError::is_usage);
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line. The library's errors already include their cause's
/// message in their own, so a cause is added only when its text is not there yet.
fn describe(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Pack(args) => {
            if let Some(n) = args.threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()
                    .map_err(|e| anyhow::anyhow!("--threads {n}: cannot start the threads: {e}"))?;
            }
            let mut opts = PackOptions::new(args.source, args.root, args.out);
            opts.name = args.name;
            opts.short_side = args.short_side.map(|s| (s > 0).then_some(s));
            opts.encoding = match args.encoding {
                EncodingArg::Raw => Encoding::Raw,
                EncodingArg::Jpeg => Encoding::Jpeg,
            };
            opts.jpeg_quality = args.quality;
            opts.per_class = args.per_class;
            opts.seed = args.seed;
            opts.skip_bad = args.skip_bad;
            opts.force = args.force;
            opts.shard_bytes = args.shard_mib << 20;
            opts.progress = std::io::stderr().is_terminal();
            let start = std::time::Instant::now();
            let packed = pack(&opts)?;
            for dir in &packed.removed_partials {
                eprintln!(
                    "datasets-prep: removed {}, left by a pack that was killed",
                    dir.display()
                );
            }
            for dir in &packed.live_partials {
                eprintln!(
                    "datasets-prep: left {} alone: the pack that is writing it is still running",
                    dir.display()
                );
            }
            if packed.per_class_kept_all
                && let Some(k) = opts.per_class
            {
                eprintln!(
                    "datasets-prep: --per-class {k}: no class has more training images, so all \
                     were kept"
                );
            }
            if let Some([first, other]) = &packed.mixed_sizes {
                let hint = if packed.manifest.resize.short_side.is_none() {
                    "; --short-side N makes every short side N"
                } else {
                    ""
                };
                eprintln!(
                    "datasets-prep: note: the records differ in size ({} is {}x{}, {} is {}x{}): \
                     training needs --crop N, N at most the smallest side{hint}",
                    first.path, first.height, first.width, other.path, other.height, other.width
                );
            }
            let m = packed.manifest;
            eprintln!(
                "datasets-prep: packed {} train + {} test images of {} classes into {} in {:.1}s{}",
                m.train.count,
                m.test.count,
                m.classes.len(),
                opts.out.display(),
                start.elapsed().as_secs_f64(),
                if m.skipped.is_empty() {
                    String::new()
                } else {
                    format!(" ({} skipped)", m.skipped.len())
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { dir } => {
            let problems = verify::verify(&dir);
            for p in &problems {
                eprintln!("datasets-prep: {p}");
            }
            if problems.is_empty() {
                println!("{}: ok", dir.display());
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "datasets-prep: {}: {} problem(s) found",
                    dir.display(),
                    problems.len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Info { dir } => {
            let info = verify::info(&dir)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::other("disk on fire");
        let err = datasets_prep::format::ShardError::io(std::path::Path::new("x.shard"), io);
        assert_eq!(describe(&err.into()), "x.shard: disk on fire");
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&err), "outer: inner");
    }
}
