//! Real etcd for tests and benchmarks: members of a cluster started on free loopback ports.
//!
//! Each member runs the `etcd` binary on the PATH (Debian's etcd-server) with its data under a
//! directory the caller owns. Members can be killed (SIGKILL) and started again on the same data
//! and ports, which is what the fault tests need. Dropping the cluster kills every member.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The request limit the members are started with: above the store's value limit plus key and
/// framing, so values up to [`crate::MAX_VALUE_BYTES`] fit (etcd's default is 1.5 MiB exactly).
pub const ETCD_MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// Certificates for a member's client endpoint (PEM files): clients must present a
/// certificate signed by `ca`.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` (and `/metrics`), also when clients speak TLS.
    metrics_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster of one or more members on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<Member>,
    tls: Option<ClientTls>,
    initial_cluster: String,
    token: String,
}

/// Ports below the kernel's ephemeral range (32768 and up by default), so that neither outgoing
/// connections nor servers started with port 0 can take a port a member is about to bind. Each
/// process walks the range from its own starting point; within a process no port is handed out
/// twice.
const PORT_RANGE: std::ops::Range<u32> = 20_000..32_000;

fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id().wrapping_mul(7919)) % span + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let mut ports = Vec::with_capacity(n);
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = (PORT_RANGE.start + offset) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    if ports.len() < n {
        return Err(std::io::Error::other("no free loopback ports for etcd"));
    }
    Ok(ports)
}

/// Whether the member whose metrics listener is `port` reports itself healthy (it has a leader
/// and answers).
pub fn healthy(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl EtcdCluster {
    /// Start `n` members under `dir` and wait until the cluster has a leader.
    pub fn start(dir: &Path, n: usize) -> std::io::Result<EtcdCluster> {
        EtcdCluster::start_with(dir, n, None)
    }

    /// Start `n` members whose client endpoints speak TLS and require client certificates.
    pub fn start_with(
        dir: &Path,
        n: usize,
        tls: Option<ClientTls>,
    ) -> std::io::Result<EtcdCluster> {
        let mut last_err = None;
        for attempt in 0..3 {
            let ports = free_ports(3 * n)?;
            let members: Vec<Member> = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: ports[3 * i],
                    peer_port: ports[3 * i + 1],
                    metrics_port: ports[3 * i + 2],
                    dir: dir.join(format!("etcd-{attempt}-m{i}")),
                    child: None,
                })
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = EtcdCluster {
                members,
                tls: tls.clone(),
                initial_cluster,
                token: format!("rkube-test-{}-{attempt}", std::process::id()),
            };
            let started = (0..n).try_for_each(|i| cluster.spawn(i));
            match started.and_then(|_| cluster.wait_healthy(Duration::from_secs(30))) {
                Ok(()) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
            // Ports may have been taken in between: try again with new ones.
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("etcd did not start")))
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let token = self.token.clone();
        let m = &mut self.members[i];
        std::fs::create_dir_all(&m.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.dir.join("etcd.log"))?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let mut cmd = Command::new("etcd");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(m.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .args(["--max-request-bytes", &ETCD_MAX_REQUEST_BYTES.to_string()])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("starting etcd (is etcd-server installed?): {e}"),
                )
            })?;
        m.child = Some(child);
        Ok(())
    }

    /// Wait until every running member reports healthy.
    pub fn wait_healthy(&mut self, within: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let mut all = true;
            for m in &mut self.members {
                let Some(child) = m.child.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = child.try_wait() {
                    m.child = None;
                    let log = std::fs::read_to_string(m.dir.join("etcd.log")).unwrap_or_default();
                    let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                    return Err(std::io::Error::other(format!(
                        "etcd member {} exited ({status}): {tail}",
                        m.name
                    )));
                }
                if !healthy(m.metrics_port) {
                    all = false;
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("etcd cluster did not become healthy"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http(s)://127.0.0.1:P1,127.0.0.1:P2,...`: what `--datastore-endpoint` takes.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("{scheme}://{}", hosts.join(","))
    }

    /// The client URL of one member.
    pub fn member_endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILL one member (no clean shutdown).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start a killed member again on its data and ports.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        self.spawn(i)
    }

    /// Whether member `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
