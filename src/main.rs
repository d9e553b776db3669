//! `cosine-train`: parse the command line, dispatch, print errors once, set the exit code.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use cosine_train::cli::{Cli, Command};
use cosine_train::dist::Communicator;
use cosine_train::job::Job;
use cosine_train::{check_dist, doctor};

fn main() -> ExitCode {
    cosine_train::runtime::memory::tune_allocator();
    init_logging();
    let mut command = Cli::command();
    // The long version describes the environment; only probe it when asked for.
    if std::env::args().any(|a| a == "--version") {
        let line: &'static str = Box::leak(doctor::collect().summary_line().into_boxed_str());
        command = command.long_version(line);
    }
    let matches = command.get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("cosine-train: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Doctor(args) => {
            let report = doctor::collect();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.to_text());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => {
            args.device.ensure_available()?;
            let manifest = datasets_prep::ShardDir::open(&args.data).with_context(|| {
                format!(
                    "--data {}: not a usable shard directory",
                    args.data.display()
                )
            })?;
            let config = cosine_train::config::resolve(&args, &manifest.manifest().source)?;
            drop(manifest);
            let job = Job::join(&args.job, args.device, args.threads)?;
            let opts = cosine_train::train::RunOptions {
                out: args.out.clone(),
                device: job.device,
                workers: args.workers,
                force: args.force,
                bucket_mb: args.job.bucket_mb,
                checkpoint_every: args.checkpoint_every,
                keep_checkpoints: args.keep_checkpoints.max(1),
                resume: args.resume.clone(),
                channels_last: args.channels_last.resolve(job.device),
            };
            match job.finish(cosine_train::train::train(&config, &opts, &job.comm)) {
                Ok(_) => Ok(ExitCode::SUCCESS),
                Err(e) if e.is::<cosine_train::train::Stopped>() => {
                    if job.comm.rank() == 0 {
                        eprintln!("cosine-train: {e}");
                    }
                    Ok(ExitCode::from(cosine_train::runtime::signals::EXIT_PREEMPTED as u8))
                }
                Err(e) => Err(e),
            }
        }
        Command::Eval(args) => {
            let job = Job::join(&args.job, args.device, args.threads)?;
            let report = job.finish(cosine_train::eval_run::run(&args, job.device, &job.comm))?;
            if job.comm.rank() == 0 {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchStep(args) => {
            let job = Job::join(&args.job, args.device, args.threads)?;
            let report = job.finish(cosine_train::bench_step::run(&args, job.device, &job.comm))?;
            if job.comm.rank() == 0 {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchLoader(args) => {
            let report = cosine_train::bench_loader::run(&args)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Report(args) => {
            cosine_train::report::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Embed(args) => {
            let h = cosine_train::hierarchy::Hierarchy::from_file(&args.hierarchy, args.is_a)?;
            let (ids, e) = cosine_train::hierarchy::unitsphere_embedding(&h)?;
            cosine_train::hierarchy::write_npy(&args.out, ids.len(), ids.len(), &e)?;
            let ids_path = cosine_train::embedding::ids_path(&args.out);
            let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
            cosine_train::train::write_atomic(&ids_path, text.as_bytes())?;
            eprintln!(
                "cosine-train: {} classes -> {} and {}",
                ids.len(),
                args.out.display(),
                ids_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckDist(args) => {
            let ok = check_dist::run(&args)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// Log lines go to stderr; `COSINE_LOG` (or `RUST_LOG`) sets the filter, default `info`.
fn init_logging() {
    let filter = std::env::var("COSINE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
