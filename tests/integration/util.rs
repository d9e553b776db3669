//! Helpers: paths of the binaries and scripts, commands with a deadline, `mpirun` as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn cosine_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cosine-train"))
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `mpirun -np N` with what the test harness (not users) needs: CI runs as root, and the tests
/// may start more ranks than the machine has cores. See [`share_cores`].
pub fn mpirun(np: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args([
            "--oversubscribe",
            "--bind-to",
            "none",
            "-np",
            &np.to_string(),
        ]);
    share_cores(&mut cmd);
    cmd
}

/// Tests run side by side on 2 cores, several ranks each. Open MPI's ranks spin while they wait
/// in a collective, which on an oversubscribed machine starves the rank they wait for (seen: a
/// 1-epoch job taking minutes). Each job only knows its own ranks, so it does not detect the
/// oversubscription; tell it to yield the core while idle.
pub fn share_cores(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_MCA_mpi_yield_when_idle", "1")
}

pub fn cosine_train_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cosine-train"))
}

/// Runs `cmd` to completion, killing it after `limit` (a hang is a test failure, not a stuck CI).
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let description = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let out = child
                    .wait_with_output()
                    .expect("collect output of killed child");
                panic!(
                    "{description} did not finish within {limit:?}\n{}",
                    show(&out)
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for {description}: {e}"),
        }
    }
    child.wait_with_output().expect("collect child output")
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The checkpoint directories of a run, oldest first.
pub fn checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    v.sort();
    v
}

/// Records a skipped test where `make test` reports it, and says so now.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    let path = repo_root().join("target/skipped-tests.txt");
    let line = format!("{test}: {why}\n");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
}
