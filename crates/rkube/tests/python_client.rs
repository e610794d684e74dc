//! The Python `kubernetes` client (PyPI) against a real `rkube server`. The interpreter comes
//! from RKUBE_TEST_PYTHON (scripts/test.sh sets up a venv with the client pinned).

mod common;

use common::Cluster;

/// Runs `tests/python/<script>` against `c` and requires an `ok <check>` line for each check.
fn run_script(c: &Cluster, script: &str, checks: &[&str]) {
    let python = std::env::var("RKUBE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = c.command(&python).arg(&path).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{python} {path} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in checks {
        assert!(
            stdout.lines().any(|l| l == format!("ok {check}")),
            "{check} did not pass:\n{stdout}"
        );
    }
}

#[test]
fn python_kubernetes_client_creates_patches_lists_and_watches() {
    let c = Cluster::start();
    run_script(
        &c,
        "client_check.py",
        &[
            "create",
            "merge patch",
            "json patch",
            "strategic merge patch",
            "apply patch",
            "list",
            "watch",
            "404",
        ],
    );
}

#[test]
fn python_kubernetes_client_execs_and_reads_logs_on_a_real_node() {
    let c = Cluster::with_kubelet(&[]);
    run_script(
        &c,
        "exec_check.py",
        &["exec", "exec stdin", "exec exit code", "logs"],
    );
}
