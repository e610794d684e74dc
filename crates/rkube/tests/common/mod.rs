//! The end-to-end harness: a real `rkube server` on its own data dir and port, driven by the
//! real kubectl (and kube-rs) through the kubeconfig the server writes. Nothing here sleeps to
//! synchronise: every wait polls with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub port: u16,
    pub extra: Vec<String>,
    /// Whether the server runs its kubelet (on real containerd); other tests leave it out.
    pub kubelet: bool,
}

pub fn rkube_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rkube"))
}

impl Cluster {
    /// Start a server with `--port 0` and wait for its ready line.
    pub fn start() -> Cluster {
        Cluster::start_with(0, &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut c = Cluster {
            dir,
            child: None,
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            kubelet: false,
        };
        c.boot();
        c
    }

    /// A server that also runs this machine as a node (real containerd), with the busybox
    /// test image imported; its pods are stopped when the server stops.
    pub fn with_kubelet(extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = dir.path().join("agent/images");
        std::fs::create_dir_all(&images).expect("images dir");
        let out = Command::new(rkube_bin())
            .args(["images", "--out"])
            .arg(&images)
            .output()
            .expect("rkube images");
        assert!(
            out.status.success(),
            "rkube images: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(images.join("pause.tar")).expect("pause.tar");
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        extra.extend(["--cluster-cidr".to_string(), unique_cluster_cidr()]);
        if !extra.iter().any(|a| a == "--service-cluster-ip-range") {
            // Each cluster's proxy owns its Service range and node ports on the shared host.
            let (cidr, ports) = unique_service_ranges();
            extra.extend([
                "--service-cluster-ip-range".to_string(),
                cidr,
                "--service-node-port-range".to_string(),
                ports,
            ]);
        }
        if !extra.iter().any(|a| a == "--eviction-hard") {
            // A build machine's disk can be fuller than upstream's 10% threshold allows; only
            // the eviction test wants pressure.
            extra.extend(["--eviction-hard".to_string(), LENIENT_EVICTION.to_string()]);
        }
        let mut c = Cluster {
            dir,
            child: None,
            port: 0,
            extra,
            kubelet: true,
        };
        c.boot();
        c
    }

    /// A data dir for an `rkube agent` joining this cluster, with the busybox image ready to
    /// import.
    pub fn agent_dir(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("agent dir");
        let images = dir.path().join("agent/images");
        std::fs::create_dir_all(&images).expect("images dir");
        std::fs::copy(
            self.dir.path().join("agent/images/busybox.tar"),
            images.join("busybox.tar"),
        )
        .expect("busybox.tar");
        dir
    }

    /// Flags for the next boot (after `stop`/`kill9`).
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig.yaml")
    }

    /// The API server's URL, as the kubeconfig names it.
    pub fn server_url(&self) -> String {
        let kc = std::fs::read_to_string(self.kubeconfig()).expect("kubeconfig");
        kc.lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("a server in the kubeconfig")
            .to_string()
    }

    /// (Re)start the server process on the same data dir and wait until it is ready.
    pub fn boot(&mut self) {
        let mut cmd = Command::new(rkube_bin());
        cmd.arg("server")
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--port")
            .arg(self.port.to_string())
            .args(&self.extra)
            .args(if self.kubelet {
                &["--stop-pods-on-exit"][..]
            } else {
                &["--disable", "kubelet,proxy"][..]
            })
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn rkube server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("rkube: ready") {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("rkube server did not print its ready line within {DEADLINE:?}");
            }
        }
        assert!(
            self.kubeconfig().exists(),
            "kubeconfig.yaml must exist when ready"
        );
        self.child = Some(child);
        // Restarts reuse the port the server picked: never a port the test chose and released,
        // which another test's server could take in between.
        if self.port == 0 {
            let url = self.server_url();
            self.port = url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("a port in the server URL");
        }
    }

    /// SIGTERM and wait: returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("rkube server did not exit within {DEADLINE:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A command (a kubectl build, say) with this cluster's kubeconfig and its own HOME.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .env("KUBECACHEDIR", self.dir.path().join("kubecache"));
        cmd
    }

    fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("kubectl");
        cmd.args(args);
        cmd
    }

    /// Run kubectl; returns its output whatever the exit status.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().expect("run kubectl")
    }

    /// Run kubectl and require success; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run kubectl and require failure; returns stderr.
    pub fn kubectl_fails(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} should have failed but printed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// kubectl with a document on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .kubectl_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("kubectl output")
    }

    pub fn apply_yaml(&self, yaml: &str) -> String {
        let out = self.kubectl_stdin(&["create", "-f", "-"], yaml);
        assert!(
            out.status.success(),
            "create -f - failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A background kubectl whose stdout lines arrive on a channel.
    pub fn kubectl_stream(&self, args: &[&str]) -> Stream {
        let mut child = self
            .kubectl_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Stream {
            child,
            rx,
            seen: Vec::new(),
        }
    }

    /// Poll `f` until it returns Some, or panic at the deadline.
    pub fn eventually<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        eventually(what, &mut f)
    }

    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.client_config().await).expect("client")
    }

    /// kube-rs's client configuration for this cluster (its default retries 429/503/504).
    pub async fn client_config(&self) -> kube::Config {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig");
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("client config")
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Cluster {
    /// `rkube hollow-nodes` with `count` nodes named `{prefix}0..`; returns once they are Ready.
    pub fn hollow(&self, count: usize, prefix: &str, extra: &[&str]) -> Proc {
        let child = Command::new(rkube_bin())
            .args(["hollow-nodes", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(["--count", &count.to_string(), "--name-prefix", prefix])
            .args(extra)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("rkube hollow-nodes");
        let p = Proc(child);
        self.eventually(&format!("{count} hollow nodes {prefix}* Ready"), || {
            let out = self.kubectl(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status} {.spec.podCIDR}{\"\\n\"}{end}",
            ]);
            let ready = out
                .lines()
                .filter(|l| {
                    let f: Vec<&str> = l.split(' ').collect();
                    f.len() == 3 && f[0].starts_with(prefix) && f[1] == "True" && !f[2].is_empty()
                })
                .count();
            (ready == count).then_some(())
        });
        p
    }

    /// A component process (`controller-manager`, `scheduler`) on this cluster's kubeconfig.
    pub fn component(&self, name: &str, extra: &[&str]) -> Proc {
        Proc(
            Command::new(rkube_bin())
                .args([name, "--kubeconfig"])
                .arg(self.kubeconfig())
                .args(extra)
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("rkube component"),
        )
    }

    /// One field (a jsonpath expression such as `{.metadata.name}`) of every pod that `args`
    /// (`-l`, `--field-selector`, ...) select and that is not being deleted.
    pub fn live_pods(&self, args: &[&str], field: &str) -> Vec<String> {
        let path = format!(
            "jsonpath={{range .items[*]}}{field} {{.metadata.deletionTimestamp}}{{\"\\n\"}}{{end}}"
        );
        let mut a = vec!["get", "pods"];
        a.extend_from_slice(args);
        a.extend(["-o", &path]);
        self.kubectl(&a)
            .lines()
            .filter(|l| l.split(' ').nth(1).is_none_or(|d| d.is_empty()))
            .map(|l| l.split(' ').next().unwrap_or_default().to_string())
            .collect()
    }

    /// The first container's image of every pod with this label selector, space separated.
    pub fn pod_images(&self, selector: &str) -> String {
        self.kubectl(&[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ])
    }

    /// jsonpath over one object, or "" if kubectl fails (not there yet).
    pub fn jsonpath(&self, args: &[&str], path: &str) -> String {
        let mut a: Vec<&str> = args.to_vec();
        let p = format!("jsonpath={path}");
        a.extend(["-o", &p]);
        let out = self.kubectl_output(&a);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).to_string()
        } else {
            String::new()
        }
    }
}

/// Eviction thresholds no test machine crosses.
pub const LENIENT_EVICTION: &str = "memory.available<1Mi,nodefs.available<1%";

/// A pod range no other cluster of this test binary uses (their bridges share the host).
pub fn unique_cluster_cidr() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("10.{}.0.0/16", 100 + (std::process::id() + n * 7) % 100)
}

/// A Service range and node-port range no other cluster of this test binary uses.
pub fn unique_service_ranges() -> (String, String) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let k = (std::process::id() + n * 5) % 16;
    let low = 30000 + k * 100;
    (
        format!("172.{}.0.0/16", 16 + k),
        format!("{low}-{}", low + 99),
    )
}

/// GET `path` from `addr` over plain HTTP/1.0; the whole response, or None if it failed.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

pub fn eventually<T>(what: &str, f: &mut dyn FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.kubelet && self.child.is_some() {
            // A clean stop: the kubelet stops its pods and containerd before the dir goes.
            self.stop();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct Stream {
    pub child: Child,
    rx: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Stream {
    /// Wait for a line containing every needle; returns it.
    pub fn expect_line(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + DEADLINE;
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().all(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "output ended without a line with {needles:?}; saw {:?}",
                        self.seen
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {needles:?} within {DEADLINE:?}; saw {:?}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Wait until at least `n` lines have arrived.
    pub fn wait_lines(&mut self, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("fewer than {n} lines: {:?}", self.seen),
            }
        }
    }

    /// Every line so far (those already seen and those waiting).
    pub fn drain(&mut self) -> Vec<String> {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// Wait for the process to exit by itself; returns whether it succeeded.
    pub fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st.success();
            }
            if Instant::now() > deadline {
                panic!("process did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
