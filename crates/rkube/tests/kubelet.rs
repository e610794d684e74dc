//! The kubelet end to end: real kubectl against `rkube server`, whose kubelet runs pods as real
//! containers on the containerd it supervises (Debian's containerd + runc + CNI plugins), with
//! the busybox image rkube builds (`rkube images`).

mod common;

use std::process::Command;

use common::{eventually, http_get, Cluster, Proc};

fn pod_yaml(name: &str, extra_spec: &str, container: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {name}}}\nspec:\n  terminationGracePeriodSeconds: 5\n{extra_spec}  containers:\n  - name: c\n    image: busybox\n    imagePullPolicy: IfNotPresent\n{container}"
    )
}

fn field(c: &Cluster, pod: &str, path: &str) -> String {
    c.jsonpath(&["get", "pod", pod], path)
}

fn wait_field(c: &Cluster, pod: &str, path: &str, want: &str) {
    c.eventually(&format!("{pod} {path} = {want}"), || {
        (field(c, pod, path) == want).then_some(())
    });
}

fn exec(c: &Cluster, pod: &str, script: &str) -> String {
    c.kubectl(&["exec", pod, "--", "sh", "-c", script])
}

#[test]
fn a_pod_runs_and_streams_logs_exec_port_forward_and_cp() {
    let c = Cluster::with_kubelet(&[]);
    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {key: v1}\n");
    c.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {pw: hunter2}\n");
    c.apply_yaml(&pod_yaml(
        "web",
        "  volumes:\n  - name: cfg\n    configMap: {name: cm}\n",
        r#"    command: ["sh", "-c", "mkdir -p /www; echo hello-$(hostname) > /www/index.html; echo started; exec httpd -f -p 8080 -h /www"]
    env:
    - {name: A, valueFrom: {configMapKeyRef: {name: cm, key: key}}}
    - {name: B, valueFrom: {secretKeyRef: {name: s, key: pw}}}
    - {name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
    - {name: AB, value: "$(A)-$(B)"}
    volumeMounts: [{name: cfg, mountPath: /cfg}]
"#,
    ));
    wait_field(&c, "web", "{.status.phase}", "Running");
    let ip = field(&c, "web", "{.status.podIP}");
    assert!(
        ip.starts_with("10."),
        "pod IP from the node's podCIDR: {ip:?}"
    );
    wait_field(
        &c,
        "web",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    );
    assert!(
        field(&c, "web", "{.status.containerStatuses[0].containerID}").starts_with("containerd://")
    );

    // Environment and volumes, as the container sees them.
    assert_eq!(
        exec(&c, "web", "echo $A $B $IP $AB").trim(),
        format!("v1 hunter2 {ip} v1-hunter2")
    );
    assert_eq!(exec(&c, "web", "cat /cfg/key"), "v1");
    c.kubectl(&["patch", "configmap", "cm", "-p", r#"{"data":{"key":"v2"}}"#]);
    c.eventually("the updated configMap in the volume", || {
        (exec(&c, "web", "cat /cfg/key") == "v2").then_some(())
    });

    // exec with stdin, and a remote exit code.
    let out = c.kubectl_stdin(
        &["exec", "-i", "web", "--", "sh", "-c", "read x; echo got $x"],
        "hi\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got hi\n");
    let out = c.kubectl_output(&["exec", "web", "--", "sh", "-c", "exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // exec -t: a terminal in the container, and the caller's window size reaching it (the
    // resize arrives after the start, so the container polls for it).
    let tty = c
        .command("script")
        .args([
            "-qec",
            "stty cols 123 rows 45; kubectl exec -it web -- sh -c 'tty; for i in $(seq 100); do s=$(stty size 2>/dev/null); [ \"$s\" = \"45 123\" ] && break; sleep 0.1; done; echo size=$s'",
            "/dev/null",
        ])
        .output()
        .expect("script (bsdutils)");
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    assert!(tty_out.contains("/dev/pts/"), "{tty_out}");
    assert!(tty_out.contains("size=45 123"), "{tty_out}");

    // logs, and logs -f seeing a line written after it started.
    assert!(c.kubectl(&["logs", "web"]).contains("started"));
    let mut follow = c.kubectl_stream(&["logs", "-f", "web"]);
    follow.expect_line(&["started"]);
    exec(&c, "web", "echo marker-1 > /proc/1/fd/1");
    follow.expect_line(&["marker-1"]);
    assert_eq!(c.kubectl(&["logs", "web", "--tail=1"]), "marker-1\n");
    let stamped = c.kubectl(&["logs", "web", "--tail=1", "--timestamps"]);
    assert!(
        stamped.ends_with(" marker-1\n") && stamped.starts_with("20"),
        "{stamped:?}"
    );

    // HTTP to the pod IP from the node, and through port-forward.
    let direct = http_get(&format!("{ip}:8080"), "/index.html").expect("GET from the node");
    assert!(direct.contains("hello-web"), "{direct}");
    let mut pf = c.kubectl_stream(&["port-forward", "pod/web", ":8080"]);
    let line = pf.expect_line(&["Forwarding from 127.0.0.1:"]);
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a local port");
    let through =
        http_get(&format!("127.0.0.1:{port}"), "/index.html").expect("GET through port-forward");
    assert!(through.contains("hello-web"), "{through}");
    drop(pf);

    // cp both ways.
    let local = c.data_dir().join("up.txt");
    std::fs::write(&local, "uploaded\n").unwrap();
    c.kubectl(&["cp", local.to_str().unwrap(), "web:/tmp/up.txt"]);
    assert_eq!(exec(&c, "web", "cat /tmp/up.txt"), "uploaded\n");
    let back = c.data_dir().join("back.html");
    c.kubectl(&["cp", "web:/www/index.html", back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "hello-web\n");

    // The node reports its images (what the scheduler's ImageLocality reads).
    let images = c.jsonpath(&["get", "nodes"], "{.items[0].status.images[*].names}");
    assert!(
        images.contains("docker.io/library/busybox:latest"),
        "{images}"
    );

    // The kubelet's own endpoint wants the API server's client certificate.
    let kip = c.jsonpath(
        &["get", "node"],
        "{.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    );
    let kport = c.jsonpath(
        &["get", "node"],
        "{.items[0].status.daemonEndpoints.kubeletEndpoint.Port}",
    );
    let direct = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "5",
            &format!("https://{kip}:{kport}/containerLogs/default/web/c"),
        ])
        .output()
        .unwrap();
    assert!(
        !direct.status.success(),
        "the kubelet answered without a client certificate: {}",
        String::from_utf8_lossy(&direct.stdout)
    );

    // Errors come back as Status: a container that does not exist.
    let e = c.kubectl_fails(&["logs", "web", "-c", "nope"]);
    assert!(e.contains("container nope is not valid for pod web"), "{e}");
}

#[test]
fn graceful_deletion_sends_sigterm_and_honours_the_grace_period() {
    let c = Cluster::with_kubelet(&[]);
    let out = tempfile::tempdir().unwrap();
    let vol = format!(
        "  volumes:\n  - name: out\n    hostPath: {{path: {}}}\n",
        out.path().display()
    );
    // Traps SIGTERM, takes a second to finish, and says so.
    c.apply_yaml(&pod_yaml(
        "polite",
        &vol,
        r#"    command: ["sh", "-c", "trap 'echo term > /out/term; sleep 1; echo done > /out/done; exit 0' TERM; while true; do sleep 0.2; done"]
    volumeMounts: [{name: out, mountPath: /out}]
"#,
    ));
    // Ignores SIGTERM: only the SIGKILL at the end of its grace period stops it.
    c.apply_yaml(&pod_yaml(
        "stubborn",
        "",
        r#"    command: ["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"]
"#,
    ));
    wait_field(&c, "polite", "{.status.phase}", "Running");
    wait_field(&c, "stubborn", "{.status.phase}", "Running");
    c.kubectl(&["delete", "pod", "polite", "--grace-period=20"]);
    assert_eq!(
        std::fs::read_to_string(out.path().join("term")).unwrap(),
        "term\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("done")).unwrap(),
        "done\n"
    );
    c.kubectl(&["delete", "pod", "stubborn", "--grace-period=2"]);
    assert!(c.kubectl(&["get", "pods", "-o", "name"]).is_empty());
}

#[test]
fn restart_policies_backoff_and_probes() {
    let c = Cluster::with_kubelet(&[]);
    let pod = |name: &str, policy: &str, script: &str, more: &str| {
        c.apply_yaml(&pod_yaml(
            name,
            &format!("  restartPolicy: {policy}\n"),
            &format!("    command: [\"sh\", \"-c\", \"{script}\"]\n{more}"),
        ));
    };
    pod("never-fails", "Never", "exit 3", "");
    pod("never-ok", "Never", "exit 0", "");
    pod("onfailure", "OnFailure", "exit 1", "");
    pod("always", "Always", "echo crashing; exit 2", "");
    pod(
        "live",
        "Always",
        "touch /tmp/healthy; while true; do sleep 0.2; done",
        "    livenessProbe: {exec: {command: [cat, /tmp/healthy]}, periodSeconds: 1, failureThreshold: 1}\n",
    );
    pod(
        "gated",
        "Always",
        "while true; do sleep 0.2; done",
        "    readinessProbe: {exec: {command: [cat, /tmp/ready]}, periodSeconds: 1}\n",
    );

    wait_field(&c, "never-fails", "{.status.phase}", "Failed");
    assert_eq!(
        field(
            &c,
            "never-fails",
            "{.status.containerStatuses[0].state.terminated.exitCode}"
        ),
        "3"
    );
    assert_eq!(
        field(
            &c,
            "never-fails",
            "{.status.containerStatuses[0].restartCount}"
        ),
        "0"
    );
    wait_field(&c, "never-ok", "{.status.phase}", "Succeeded");
    assert_eq!(
        field(
            &c,
            "never-ok",
            "{.status.containerStatuses[0].state.terminated.reason}"
        ),
        "Completed"
    );
    c.eventually("OnFailure restarts a failed container", || {
        (field(
            &c,
            "onfailure",
            "{.status.containerStatuses[0].restartCount}",
        )
        .parse::<u32>()
        .unwrap_or(0)
            >= 1)
            .then_some(())
    });
    wait_field(
        &c,
        "always",
        "{.status.containerStatuses[0].state.waiting.reason}",
        "CrashLoopBackOff",
    );
    assert_eq!(field(&c, "always", "{.status.phase}"), "Running");
    assert_eq!(
        field(
            &c,
            "always",
            "{.status.containerStatuses[0].lastState.terminated.exitCode}"
        ),
        "2"
    );
    assert!(c
        .kubectl(&["get", "pod", "always"])
        .contains("CrashLoopBackOff"));
    assert_eq!(
        c.kubectl(&["logs", "always", "--previous"]).trim_end(),
        "crashing"
    );
    let described = c.kubectl(&["describe", "pod", "always"]);
    for needle in [
        "Started",
        "Created container c",
        "Back-off restarting failed container",
    ] {
        assert!(
            described.contains(needle),
            "describe lacks {needle:?}:\n{described}"
        );
    }

    // Liveness: healthy, then not: the container is restarted.
    wait_field(&c, "live", "{.status.phase}", "Running");
    let first = field(&c, "live", "{.status.containerStatuses[0].containerID}");
    assert_eq!(
        field(&c, "live", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
    exec(&c, "live", "rm /tmp/healthy");
    wait_field(
        &c,
        "live",
        "{.status.containerStatuses[0].restartCount}",
        "1",
    );
    assert_ne!(
        field(&c, "live", "{.status.containerStatuses[0].containerID}"),
        first
    );

    // activeDeadlineSeconds ends a pod.
    pod("deadline", "Always", "while true; do sleep 0.2; done", "");
    c.kubectl(&[
        "patch",
        "pod",
        "deadline",
        "-p",
        r#"{"spec":{"activeDeadlineSeconds":2}}"#,
    ]);
    wait_field(&c, "deadline", "{.status.reason}", "DeadlineExceeded");
    assert_eq!(field(&c, "deadline", "{.status.phase}"), "Failed");

    // A new image for a running pod (`kubectl set image pod/...`) replaces its container.
    let v2 = c.data_dir().join("v2");
    let out = Command::new(common::rkube_bin())
        .args([
            "images",
            "--busybox-name",
            "docker.io/library/busybox:v2",
            "--out",
        ])
        .arg(&v2)
        .output()
        .unwrap();
    assert!(out.status.success());
    let import = Command::new("ctr")
        .arg("--address")
        .arg(c.data_dir().join("agent/containerd/containerd.sock"))
        .args(["-n", "k8s.io", "images", "import"])
        .arg(v2.join("busybox.tar"))
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    wait_field(&c, "gated", "{.status.phase}", "Running");
    let before = field(&c, "gated", "{.status.containerStatuses[0].containerID}");
    c.kubectl(&["set", "image", "pod/gated", "c=busybox:v2"]);
    c.eventually("the container replaced with the new image", || {
        let id = field(&c, "gated", "{.status.containerStatuses[0].containerID}");
        let image = field(&c, "gated", "{.status.containerStatuses[0].image}");
        let running =
            !field(&c, "gated", "{.status.containerStatuses[0].state.running}").is_empty();
        (id != before && !id.is_empty() && image == "busybox:v2" && running).then_some(())
    });
    assert_eq!(
        field(&c, "gated", "{.status.containerStatuses[0].restartCount}"),
        "1"
    );

    // Readiness gates Ready.
    wait_field(&c, "gated", "{.status.phase}", "Running");
    assert_eq!(
        field(
            &c,
            "gated",
            "{.status.conditions[?(@.type==\"Ready\")].status}"
        ),
        "False"
    );
    assert_eq!(
        field(&c, "gated", "{.status.containerStatuses[0].ready}"),
        "false"
    );
    exec(&c, "gated", "touch /tmp/ready");
    wait_field(
        &c,
        "gated",
        "{.status.conditions[?(@.type==\"Ready\")].status}",
        "True",
    );
}

#[test]
fn a_deployment_serves_http_from_each_pod() {
    let c = Cluster::with_kubelet(&[]);
    c.apply_yaml(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: httpd
        image: busybox
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "mkdir -p /www; hostname > /www/index.html; exec httpd -f -p 8080 -h /www"]
        readinessProbe: {httpGet: {path: /index.html, port: 8080}, periodSeconds: 1}
"#,
    );
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let pods = c.live_pods(&["-l", "app=web"], "{.status.podIP}");
    let names = c.live_pods(&["-l", "app=web"], "{.metadata.name}");
    assert_eq!(pods.len(), 3, "{pods:?}");
    for (ip, name) in pods.iter().zip(&names) {
        let body = http_get(&format!("{ip}:8080"), "/index.html").expect("GET a pod");
        assert!(body.ends_with(&format!("{name}\n")), "{ip} answered {body}");
    }
}

/// docker-registry on a free loopback port, serving from `dir`.
fn registry(dir: &std::path::Path) -> (Proc, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker-registry (Debian's docker-registry package)");
    let p = Proc(child);
    eventually("the registry answers", &mut || {
        http_get(&format!("127.0.0.1:{port}"), "/v2/").filter(|r| r.contains(" 200 "))
    });
    (p, port)
}

#[test]
fn images_pulled_from_a_registry_and_a_kubelet_restart_adopts_running_pods() {
    let work = tempfile::tempdir().unwrap();
    let (_registry, port) = registry(work.path());
    let images = work.path().join("images");
    let out = Command::new(common::rkube_bin())
        .args(["images", "--out"])
        .arg(&images)
        .output()
        .unwrap();
    assert!(out.status.success());
    let image = format!("127.0.0.1:{port}/test/busybox:v1");
    let copy = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!(
            "oci-archive:{}",
            images.join("busybox.tar").display()
        ))
        .arg(format!("docker://{image}"))
        .output()
        .expect("skopeo");
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );

    let mut c = Cluster::with_kubelet(&["--insecure-registry", &format!("127.0.0.1:{port}")]);
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pulled}}\nspec:\n  containers:\n  - name: c\n    image: {image}\n    command: [sh, -c, 'while true; do sleep 0.2; done']\n"
    ));
    wait_field(&c, "pulled", "{.status.phase}", "Running");
    assert!(field(&c, "pulled", "{.status.containerStatuses[0].imageID}").contains("sha256:"));
    let missing = format!("127.0.0.1:{port}/test/none:v1");
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: missing}}\nspec:\n  containers:\n  - name: c\n    image: {missing}\n"
    ));
    c.eventually("ErrImagePull or ImagePullBackOff", || {
        let r = field(
            &c,
            "missing",
            "{.status.containerStatuses[0].state.waiting.reason}",
        );
        (r == "ErrImagePull" || r == "ImagePullBackOff").then_some(())
    });
    c.kubectl(&["delete", "pod", "missing", "--grace-period=0", "--force"]);

    // Restart rkube (kill -9: the kubelet and containerd get no warning); the pod's container
    // keeps running and the new kubelet adopts it: same container, no restart.
    let id = field(&c, "pulled", "{.status.containerStatuses[0].containerID}");
    let started = field(
        &c,
        "pulled",
        "{.status.containerStatuses[0].state.running.startedAt}",
    );
    c.kill9();
    c.boot();
    c.eventually("the node Ready again", || {
        (c.jsonpath(
            &["get", "nodes"],
            "{.items[0].status.conditions[?(@.type==\"Ready\")].status}",
        ) == "True")
            .then_some(())
    });
    c.eventually("exec through the new kubelet", || {
        let out = c.kubectl_output(&["exec", "pulled", "--", "echo", "still here"]);
        (out.status.success() && out.stdout == b"still here\n").then_some(())
    });
    assert_eq!(
        field(&c, "pulled", "{.status.containerStatuses[0].containerID}"),
        id
    );
    assert_eq!(
        field(
            &c,
            "pulled",
            "{.status.containerStatuses[0].state.running.startedAt}"
        ),
        started
    );
    assert_eq!(
        field(&c, "pulled", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
}

#[test]
fn a_second_node_joins_with_rkube_agent_and_runs_pods() {
    let c = Cluster::with_kubelet(&[]);
    let token = std::fs::read_to_string(c.data_dir().join("token")).unwrap();
    let agent_dir = c.agent_dir();
    let start_agent = || {
        Proc(
            Command::new(common::rkube_bin())
                .args([
                    "agent",
                    "--server",
                    &c.server_url(),
                    "--token",
                    token.trim(),
                ])
                .arg("--data-dir")
                .arg(agent_dir.path())
                .args(["--node-name", "second", "--stop-pods-on-exit"])
                .args(["--eviction-hard", common::LENIENT_EVICTION])
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("rkube agent"),
        )
    };
    let mut agent = start_agent();
    c.eventually("node second Ready with a pod CIDR", || {
        let ready = c.jsonpath(
            &["get", "node", "second"],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        );
        let cidr = c.jsonpath(&["get", "node", "second"], "{.spec.podCIDR}");
        (ready == "True" && !cidr.is_empty()).then_some(cidr)
    });
    // A wrong token is refused.
    let bad = Command::new(common::rkube_bin())
        .args([
            "agent",
            "--server",
            &c.server_url(),
            "--token",
            "wrong",
            "--node-name",
            "third",
        ])
        .arg("--data-dir")
        .arg(agent_dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("401")
            || String::from_utf8_lossy(&bad.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    c.apply_yaml(&pod_yaml(
        "there",
        "  nodeSelector: {kubernetes.io/hostname: second}\n",
        "    command: [sh, -c, 'echo on-$(hostname); while true; do sleep 0.2; done']\n",
    ));
    wait_field(&c, "there", "{.status.phase}", "Running");
    assert_eq!(field(&c, "there", "{.spec.nodeName}"), "second");
    assert_eq!(exec(&c, "there", "echo hi"), "hi\n");
    c.eventually("logs from the second node", || {
        c.kubectl(&["logs", "there"])
            .contains("on-there")
            .then_some(())
    });

    // Deleted while its node's kubelet is down: cleaned up when the kubelet comes back.
    let socket = agent_dir.path().join("agent/containerd/containerd.sock");
    let containers_of_there = || {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["-n", "k8s.io", "containers", "ls", "-q"])
            .arg("labels.\"io.kubernetes.pod.name\"==there")
            .output()
            .expect("ctr");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert!(containers_of_there() >= 2, "the sandbox and the container");
    agent.kill();
    c.kubectl(&["delete", "pod", "there", "--grace-period=0", "--force"]);
    let mut agent = start_agent();
    c.eventually("the deleted pod's containers removed", || {
        (containers_of_there() == 0).then_some(())
    });

    let _ = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status();
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "agent exit: {status}");
}

#[test]
fn static_pods_are_mirrored_and_follow_their_manifests() {
    let c = Cluster::with_kubelet(&[]);
    let node = c.eventually("the node registered", || {
        Some(c.jsonpath(&["get", "nodes"], "{.items[0].metadata.name}")).filter(|n| !n.is_empty())
    });
    let manifests = c.data_dir().join("agent/pod-manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let manifest = manifests.join("static-web.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: static-web}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox\n    imagePullPolicy: IfNotPresent\n    command: [sh, -c, 'while true; do sleep 0.2; done']\n",
    )
    .unwrap();
    let name = format!("static-web-{node}");
    wait_field(&c, &name, "{.status.phase}", "Running");
    assert_eq!(
        field(
            &c,
            &name,
            "{.metadata.annotations.kubernetes\\.io/config\\.source}"
        ),
        "file"
    );
    assert_eq!(
        field(&c, &name, "{.metadata.ownerReferences[0].kind}"),
        "Node"
    );
    assert_eq!(exec(&c, &name, "echo static"), "static\n");

    // Deleted through the API, the mirror pod comes back.
    let uid = field(&c, &name, "{.metadata.uid}");
    c.kubectl(&["delete", "pod", &name, "--wait=false"]);
    c.eventually("the mirror pod back, running", || {
        let now = field(&c, &name, "{.metadata.uid}");
        (!now.is_empty() && now != uid && field(&c, &name, "{.status.phase}") == "Running")
            .then_some(())
    });

    // The manifest removed: the pod goes.
    std::fs::remove_file(&manifest).unwrap();
    c.eventually("the mirror pod gone", || {
        (!c.kubectl_output(&["get", "pod", &name]).status.success()).then_some(())
    });
}

#[test]
fn memory_pressure_is_reported_and_evicts_pods() {
    // A threshold no machine meets: the node is under memory pressure from the start.
    let c = Cluster::with_kubelet(&["--eviction-hard", "memory.available<1000Ti"]);
    c.eventually("MemoryPressure=True", || {
        (c.jsonpath(
            &["get", "nodes"],
            "{.items[0].status.conditions[?(@.type==\"MemoryPressure\")].status}",
        ) == "True")
            .then_some(())
    });
    c.apply_yaml(&pod_yaml(
        "hungry",
        "",
        "    command: [sh, -c, 'while true; do sleep 0.2; done']\n",
    ));
    wait_field(&c, "hungry", "{.status.reason}", "Evicted");
    assert_eq!(field(&c, "hungry", "{.status.phase}"), "Failed");
    assert!(field(&c, "hungry", "{.status.message}").contains("low on resource: memory"));
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=hungry",
    ]);
    assert!(events.contains("Evicted"), "{events}");
}
