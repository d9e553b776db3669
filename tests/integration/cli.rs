//! The binary's own reports and its refusals on a machine without CUDA.

use std::time::Duration;

use crate::util::{cosine_train, run, show, stderr, stdout};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn doctor_reports_libtorch_mpi_and_threads() {
    let out = run(cosine_train().args(["doctor", "--json"]), LIMIT);
    assert!(out.status.success(), "{}", show(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("doctor --json");
    let libtorch = report["libtorch_version"].as_str().unwrap();
    assert!(
        libtorch.starts_with("2.11.0"),
        "libtorch version {libtorch}"
    );
    assert!(
        report["mpi_library"].as_str().unwrap().contains("Open MPI"),
        "{report}"
    );
    assert!(report["torch_threads"].as_i64().unwrap() >= 1);
    assert_eq!(
        report["cuda_available"],
        serde_json::json!(tch::Cuda::is_available())
    );
    assert_eq!(
        report["cuda_device_count"],
        serde_json::json!(tch::Cuda::device_count())
    );
    if !tch::Cuda::is_available() {
        let why = report["cuda_unavailable_reason"].as_str().unwrap();
        assert!(!why.is_empty());
        assert!(
            report["nccl_unavailable_reason"]
                .as_str()
                .unwrap()
                .contains("CUDA")
        );
    }
}

#[test]
fn version_flag_describes_the_environment() {
    let out = run(cosine_train().arg("--version"), LIMIT);
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    assert!(text.contains("libtorch 2.11.0"), "{text}");
    assert!(text.contains("CUDA"), "{text}");
    assert!(text.contains("Open MPI"), "{text}");
}

/// NCCL ships as `libnccl.so.2` (cudarc's loader never asks for that name): it is opened under
/// that name, or from `COSINE_NCCL_LIBRARY`, and a missing one names what was tried. The stand-in
/// library exports NCCL's entry points with NCCL's C signatures.
#[test]
fn libnccl_so_2_is_opened_by_its_own_name_or_the_override() {
    let out = run(cosine_train().args(["doctor", "--json"]), LIMIT);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("doctor --json");
    if report["nccl_loadable"] == serde_json::json!(false) {
        let why = report["nccl_unavailable_reason"].as_str().unwrap();
        assert!(why.contains("libnccl.so.2"), "{why}");
        assert!(why.contains("COSINE_NCCL_LIBRARY"), "{why}");
    }

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("nccl_stub.c");
    std::fs::write(
        &source,
        r#"
typedef struct { char internal[128]; } ncclUniqueId;
int ncclGetVersion(int *v) { *v = 22809; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) { (void)id; return 0; }
int ncclCommInitRank(void **c, int n, ncclUniqueId id, int r) { (void)c; (void)n; (void)id; (void)r; return 2; }
int ncclAllReduce(const void *a, void *b, unsigned long n, int t, int o, void *c, void *s) { return 2; }
int ncclCommAbort(void *c) { (void)c; return 0; }
int ncclCommDestroy(void *c) { (void)c; return 0; }
const char *ncclGetErrorString(int r) { (void)r; return "stub"; }
"#,
    )
    .unwrap();
    let library = dir.path().join("libnccl.so.2");
    let cc = run(
        std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&library)
            .arg(&source),
        LIMIT,
    );
    assert!(cc.status.success(), "{}", show(&cc));

    let out = run(
        cosine_train()
            .args(["doctor", "--json"])
            .env("COSINE_NCCL_LIBRARY", &library),
        LIMIT,
    );
    assert!(out.status.success(), "{}", show(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("doctor --json");
    assert_eq!(report["nccl_loadable"], serde_json::json!(true), "{report}");
    assert_eq!(
        report["nccl_version"],
        serde_json::json!("2.28.9"),
        "{report}"
    );
    assert_eq!(
        report["nccl_library"],
        serde_json::json!(library.display().to_string()),
        "{report}"
    );

    // Found by name through the library path, as a CUDA libtorch's own copy would be.
    let out = run(
        cosine_train()
            .args(["doctor"])
            .env("LD_LIBRARY_PATH", prepend_path(dir.path())),
        LIMIT,
    );
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains("nccl loadable    yes (2.28.9, libnccl.so.2)"),
        "{text}"
    );

    let missing = dir.path().join("gone/libnccl.so.2");
    let out = run(
        cosine_train()
            .args(["doctor", "--json"])
            .env("COSINE_NCCL_LIBRARY", &missing),
        LIMIT,
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("doctor --json");
    assert_eq!(
        report["nccl_loadable"],
        serde_json::json!(false),
        "{report}"
    );
    let why = report["nccl_unavailable_reason"].as_str().unwrap();
    assert!(why.contains(&missing.display().to_string()), "{why}");
}

fn prepend_path(dir: &std::path::Path) -> std::ffi::OsString {
    let mut path = dir.as_os_str().to_owned();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|p| !p.is_empty()) {
        path.push(":");
        path.push(old);
    }
    path
}

#[test]
fn nccl_backend_without_cuda_is_a_clear_error() {
    if tch::Cuda::is_available() {
        eprintln!("skipped: this machine has CUDA");
        return;
    }
    let out = run(
        cosine_train().args(["check-dist", "--dist", "nccl", "--device", "cpu"]),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("NCCL not available"), "{err}");
    assert!(err.contains("CUDA"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cuda_device_without_cuda_is_a_clear_error() {
    if tch::Cuda::is_available() {
        eprintln!("skipped: this machine has CUDA");
        return;
    }
    for device in ["cuda", "cuda:0"] {
        let out = run(
            cosine_train().args(["check-dist", "--device", device]),
            LIMIT,
        );
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "--device {device} was requested but CUDA is not available"
            )),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bad_option_values_are_usage_errors() {
    let out = run(
        cosine_train().args(["check-dist", "--device", "tpu"]),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        stderr(&out).contains("expected cpu, cuda or cuda:N"),
        "{}",
        show(&out)
    );
}

/// The benchmark helpers report what they measured: `bench-step` a compute-only step (and under
/// mpirun the gradient all-reduce of exactly the model's parameters plus the two step totals),
/// `bench-loader` every training image of each timed pass, in batches of the asked shape.
#[test]
fn bench_helpers_measure_steps_sync_and_loader() {
    let parse = |o: &std::process::Output| -> serde_json::Value {
        serde_json::from_str(stdout(o).lines().find(|l| l.starts_with('{')).unwrap()).unwrap()
    };
    let args = [
        "bench-step",
        "--arch",
        "resnet8",
        "--batch-size",
        "4",
        "--size",
        "16",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
    ];
    let o = run(cosine_train().args(args).args(["--dist", "single"]), LIMIT);
    assert!(o.status.success(), "{}", show(&o));
    let one = parse(&o);
    assert!(one["step_seconds_median"].as_f64().unwrap() > 0.0, "{one}");
    assert_eq!(one["world_size"], 1);
    // Operators per step: the multi-tensor update as CUDA runs it is a handful whatever the
    // parameter count; written one operator per parameter it is several per tensor.
    let ops = &one["ops_per_step"];
    let count = |k: &str| ops[k].as_u64().unwrap_or_else(|| panic!("{k}: {one}"));
    let tensors = one["parameter_tensors"].as_u64().unwrap();
    assert!(tensors > 10, "{one}");
    assert!(count("update_as_on_cuda") <= 16, "{one}");
    assert!(count("update_one_op_per_tensor") >= 4 * tensors, "{one}");
    assert!(count("update") < count("update_one_op_per_tensor"), "{one}");
    assert!(count("forward_backward") > tensors, "{one}");
    let phases = &one["phase_seconds_median"];
    assert!(phases["forward_backward"].as_f64().unwrap() > 0.0, "{one}");
    assert!(phases["update"].as_f64().unwrap() > 0.0, "{one}");
    assert!(phases["all_reduce"].is_null(), "{one}");
    let waited = one["host_wait_fraction"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&waited), "{one}");
    let o = run(
        crate::util::mpirun(2)
            .arg(crate::util::cosine_train_path())
            .args(args),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", show(&o));
    let two = parse(&o);
    assert_eq!(two["world_size"], 2);
    assert_eq!(
        two["sync_floats"].as_i64().unwrap(),
        one["parameters"].as_i64().unwrap() + 2,
        "{two}"
    );
    assert!(two["sync_seconds_median"].as_f64().unwrap() > 0.0);
    assert!(
        two["phase_seconds_median"]["all_reduce"].as_f64().unwrap() > 0.0,
        "{two}"
    );

    let data = crate::training::fashion(10);
    let o = run(
        cosine_train()
            .args(["bench-loader", "--data"])
            .arg(&data)
            .args([
                "--crop",
                "0",
                "--batch-size",
                "16",
                "--epochs",
                "2",
                "--workers",
                "2",
            ]),
        LIMIT,
    );
    assert!(o.status.success(), "{}", show(&o));
    let l = parse(&o);
    assert_eq!(l["images"], 200, "2 passes over 100 training images: {l}");
    assert_eq!(l["batch_shape"], serde_json::json!([4, 1, 28, 28]), "{l}");
}
