//! The setup script and the environment file.

use std::process::Command;
use std::time::Duration;

use crate::util::{repo_root, run, show, stdout};

#[test]
fn setup_script_second_run_installs_nothing() {
    // The README's commands run setup before the tests, so this is at least the second run.
    let out = run(
        Command::new("bash")
            .arg(repo_root().join("launch/setup.sh"))
            .current_dir(repo_root()),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("nothing installed"), "{}", show(&out));
    assert!(!text.contains("installing"), "{}", show(&out));
}

#[test]
fn env_file_points_at_an_installed_libtorch() {
    let out = run(
        Command::new("bash")
            .args(["-c", "unset LIBTORCH; source launch/env.sh && echo \"$LIBTORCH\" && echo \"$LD_LIBRARY_PATH\""])
            .current_dir(repo_root()),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let libtorch = lines.next().unwrap_or_default();
    assert!(
        std::path::Path::new(libtorch)
            .join("lib/libtorch_cpu.so")
            .exists(),
        "{}",
        show(&out)
    );
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .contains(&format!("{libtorch}/lib")),
        "{}",
        show(&out)
    );
}
