//! The Python `kubernetes` client (PyPI) against a real `rkube server`. The interpreter comes
//! from RKUBE_TEST_PYTHON (scripts/test.sh sets up a venv with the client pinned).

mod common;

use common::Cluster;

#[test]
fn python_kubernetes_client_creates_patches_lists_and_watches() {
    let python = std::env::var("RKUBE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let c = Cluster::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client_check.py");
    let out = c.command(&python).arg(script).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{python} {script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in [
        "create",
        "merge patch",
        "json patch",
        "strategic merge patch",
        "apply patch",
        "list",
        "watch",
        "404",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("ok {check}")),
            "{check} did not pass:\n{stdout}"
        );
    }
}

#[test]
fn python_kubernetes_client_execs_and_reads_logs_on_a_real_node() {
    let python = std::env::var("RKUBE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let c = Cluster::with_kubelet(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/exec_check.py");
    let out = c.command(&python).arg(script).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{python} {script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in ["exec", "exec stdin", "exec exit code", "logs"] {
        assert!(
            stdout.lines().any(|l| l == format!("ok {check}")),
            "{check} did not pass:\n{stdout}"
        );
    }
}
