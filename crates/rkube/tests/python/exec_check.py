"""The Python `kubernetes` client's streaming calls against rkube's kubelet: exec over WebSocket
(the client's `stream`, channel protocol v4) and pod logs.

Run by crates/rkube/tests/python_client.rs with KUBECONFIG pointing at a cluster with a node.
Prints one line per check; exits non-zero on the first failure.
"""
import sys
import time

from kubernetes import client, config
from kubernetes.stream import stream

config.load_kube_config()
core = client.CoreV1Api()


def check(what, cond, detail=""):
    if not cond:
        print(f"FAIL {what}: {detail}")
        sys.exit(1)
    print(f"ok {what}")


core.create_namespaced_pod("default", client.V1Pod(
    metadata=client.V1ObjectMeta(name="pyexec"),
    spec=client.V1PodSpec(termination_grace_period_seconds=1, containers=[client.V1Container(
        name="c", image="busybox", image_pull_policy="IfNotPresent",
        command=["sh", "-c", "echo started; while true; do sleep 0.2; done"])])))
deadline = time.time() + 60
while core.read_namespaced_pod("pyexec", "default").status.phase != "Running":
    if time.time() > deadline:
        check("running", False, "the pod did not start within 60 s")
    time.sleep(0.2)

out = stream(core.connect_get_namespaced_pod_exec, "pyexec", "default",
             command=["sh", "-c", "echo hello from $(hostname)"],
             stderr=True, stdin=False, stdout=True, tty=False)
check("exec", out == "hello from pyexec\n", repr(out))

resp = stream(core.connect_get_namespaced_pod_exec, "pyexec", "default",
              command=["sh", "-c", "read x; echo got $x; exit 3"],
              stderr=True, stdin=True, stdout=True, tty=False, _preload_content=False)
resp.write_stdin("hi\n")
got = ""
deadline = time.time() + 20
while resp.is_open() and time.time() < deadline:
    resp.update(timeout=1)
    got += resp.read_stdout(timeout=0) if resp.peek_stdout() else ""
got += resp.read_stdout(timeout=0) if resp.peek_stdout() else ""
check("exec stdin", got == "got hi\n", repr(got))
check("exec exit code", resp.returncode == 3, repr(resp.returncode))

deadline = time.time() + 30
while "started" not in core.read_namespaced_pod_log("pyexec", "default"):
    if time.time() > deadline:
        check("logs", False, repr(core.read_namespaced_pod_log("pyexec", "default")))
    time.sleep(0.2)
check("logs", True)
