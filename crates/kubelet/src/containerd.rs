//! The container runtime rkube supervises: Debian's containerd (CRI plugin) with runc, started
//! with a config generated under the node's data dir so that two nodes on one machine never share
//! a socket, a state directory, a CNI network or a bridge.
//!
//! Layout under `<dir>` (the node's agent dir):
//! `containerd/{config.toml,containerd.sock,root,state}`, `cni/net.d/10-rkube.conflist`,
//! `cni/ipam`, `images/*.tar` (imported at start), `logs` (container log files).
//!
//! Containers outlive containerd (their shims keep them running): stopping the node stops
//! containerd, not the pods, as upstream's kubelet and k3s do.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found: install Debian's containerd, runc and containernetworking-plugins")]
    Missing(String),
    #[error("starting containerd: {0}")]
    Spawn(std::io::Error),
    #[error("containerd exited before its socket appeared ({0}); see {1}")]
    Exited(std::process::ExitStatus, String),
    #[error("containerd did not answer on {0} within 30 s")]
    Timeout(String),
    #[error("importing {path}: {message}")]
    Import { path: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where the CNI plugins live on Debian.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A short, stable tag for a directory: names of bridges, networks and cgroups derive from it.
pub fn tag(dir: &Path) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, dir.as_os_str().as_encoded_bytes());
    d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("containerd/config.toml")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }
    pub fn images(&self) -> PathBuf {
        self.dir.join("images")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn bridge(&self) -> String {
        format!("rk{}", tag(&self.dir))
    }
}

/// The containerd config: our own socket, root and state; the CRI plugin with our pause image,
/// the CNI directories, runc through the v2 shim, and plain-HTTP mirrors for `insecure`.
pub fn config(layout: &Layout, sandbox_image: &str, insecure: &[String]) -> String {
    let d = layout.dir.join("containerd");
    let q = |p: PathBuf| format!("{:?}", p.display().to_string());
    let mut s = format!(
        r#"version = 2
root = {root}
state = {state}
oom_score = 0

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {sandbox:?}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {bin:?}
    conf_dir = {conf}
"#,
        root = q(d.join("root")),
        state = q(d.join("state")),
        sock = q(layout.socket()),
        ttrpc = q(d.join("containerd.sock.ttrpc")),
        opt = q(d.join("opt")),
        sandbox = sandbox_image,
        bin = CNI_BIN_DIR,
        conf = q(layout.cni_conf_dir()),
    );
    for r in insecure {
        s.push_str(&format!(
            "  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.{r:?}]\n    endpoint = [{:?}]\n",
            format!("http://{r}")
        ));
    }
    s
}

/// The CNI network for the node's pods: a bridge (the pods' gateway, masquerading traffic that
/// leaves the pod range) with host-local addresses from the node's podCIDR, plus hostPorts.
pub fn cni_conflist(layout: &Layout, pod_cidr: &str) -> String {
    let name = format!("rkube-{}", tag(&layout.dir));
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": layout.bridge(),
                "isGateway": true,
                // One masquerade rule for the node's whole range (`masquerade`) instead of the
                // plugin's chain per pod: a burst of pods would otherwise queue on iptables.
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": layout.dir.join("cni/ipam").display().to_string(),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
        ],
    })
    .to_string()
}

/// The nat chain that masquerades the node's pod traffic leaving the pod range.
pub fn masquerade_chain(layout: &Layout) -> String {
    format!("RKUBE-MASQ-{}", tag(&layout.dir))
}

fn iptables(args: &[&str]) -> bool {
    std::process::Command::new("iptables")
        .args(["-w", "5", "-t", "nat"])
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Pods reach beyond the node through the node's address: one rkube-owned chain, jumped to from
/// POSTROUTING for traffic from `pod_cidr`, masquerading all but pod-to-pod and multicast.
pub fn masquerade(layout: &Layout, pod_cidr: &str) -> std::io::Result<()> {
    let chain = masquerade_chain(layout);
    unmasquerade(layout);
    let ok = iptables(&["-N", &chain])
        && iptables(&["-A", &chain, "-d", pod_cidr, "-j", "RETURN"])
        && iptables(&["-A", &chain, "-d", "224.0.0.0/4", "-j", "RETURN"])
        && iptables(&["-A", &chain, "-j", "MASQUERADE"])
        && iptables(&["-A", "POSTROUTING", "-s", pod_cidr, "-j", &chain]);
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "iptables: could not set up {chain}"
        )))
    }
}

/// Removes what `masquerade` installed (every jump to our chain, then the chain).
pub fn unmasquerade(layout: &Layout) {
    let chain = masquerade_chain(layout);
    let rules = std::process::Command::new("iptables")
        .args(["-w", "5", "-t", "nat", "-S", "POSTROUTING"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    for rule in rules
        .lines()
        .filter(|r| r.ends_with(&format!("-j {chain}")))
    {
        let args: Vec<&str> = rule.split_whitespace().skip(1).collect();
        let mut del = vec!["-D"];
        del.extend(args);
        iptables(&del);
    }
    iptables(&["-F", &chain]);
    iptables(&["-X", &chain]);
}

/// Writes the CNI config for `pod_cidr` (containerd picks it up on its own).
pub fn write_cni(layout: &Layout, pod_cidr: &str) -> std::io::Result<bool> {
    masquerade(layout, pod_cidr)?;
    std::fs::create_dir_all(layout.cni_conf_dir())?;
    crate::images::write_if_changed(
        &layout.cni_conf_dir().join("10-rkube.conflist"),
        cni_conflist(layout, pod_cidr).as_bytes(),
    )
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// What the supervised runtime needs and this machine lacks (None: all there).
pub fn missing() -> Option<String> {
    let mut missing: Vec<String> = ["containerd", "runc", "containerd-shim-runc-v2", "ctr"]
        .into_iter()
        .filter(|b| !on_path(b))
        .map(String::from)
        .collect();
    if !Path::new(CNI_BIN_DIR).join("bridge").is_file() {
        missing.push(format!("{CNI_BIN_DIR}/bridge"));
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// A containerd process we started; stopped (SIGTERM, then SIGKILL after 10 s) by `stop`.
pub struct Supervised {
    child: Child,
    pub socket: PathBuf,
}

impl Supervised {
    /// Writes the config and starts containerd; returns once its socket answers.
    pub async fn start(
        layout: &Layout,
        sandbox_image: &str,
        insecure: &[String],
    ) -> Result<Supervised, Error> {
        if let Some(m) = missing() {
            return Err(Error::Missing(m));
        }
        std::fs::create_dir_all(layout.dir.join("containerd"))?;
        std::fs::create_dir_all(layout.cni_conf_dir())?;
        std::fs::create_dir_all(layout.images())?;
        std::fs::create_dir_all(layout.logs())?;
        crate::images::write_if_changed(
            &layout.config(),
            config(layout, sandbox_image, insecure).as_bytes(),
        )?;
        let log_path = layout.dir.join("containerd/containerd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        stop_stale(&layout.dir.join("containerd/containerd.pid")).await;
        let _ = std::fs::remove_file(layout.socket());
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(layout.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::Spawn)?;
        if let Some(pid) = child.id() {
            std::fs::write(
                layout.dir.join("containerd/containerd.pid"),
                pid.to_string(),
            )?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(Error::Exited(status, log_path.display().to_string()));
            }
            if tokio::net::UnixStream::connect(layout.socket())
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Timeout(layout.socket().display().to_string()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Supervised {
            child,
            socket: layout.socket(),
        })
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A containerd left running by a node that was killed (SIGKILL gives it no chance to stop
/// its child): stopped before a new one starts on the same directories.
async fn stop_stale(pid_file: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "containerd" {
        return;
    }
    tracing::info!(pid, "stopping a containerd left over from an earlier run");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if tokio::time::Instant::now() > deadline {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status()
                .await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Imports an image tarball (OCI layout or docker-archive) into the CRI namespace.
pub async fn import(socket: &Path, tarball: &Path) -> Result<(), Error> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args([
            "--namespace",
            "k8s.io",
            "images",
            "import",
            "--no-unpack=false",
        ])
        .arg(tarball)
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        return Err(Error::Import {
            path: tarball.display().to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_dir() {
        let a = Layout {
            dir: "/tmp/a/agent".into(),
        };
        let b = Layout {
            dir: "/tmp/b/agent".into(),
        };
        assert_ne!(a.bridge(), b.bridge());
        assert!(
            a.bridge().len() <= 15,
            "interface names are at most 15 bytes"
        );
        let c = config(&a, "x/pause:1", &["127.0.0.1:5000".into()]);
        assert!(c.contains("\"/tmp/a/agent/containerd/containerd.sock\""));
        assert!(c.contains("endpoint = [\"http://127.0.0.1:5000\"]"), "{c}");
        let n: serde_json::Value = serde_json::from_str(&cni_conflist(&a, "10.42.3.0/24")).unwrap();
        assert_eq!(
            n["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.42.3.0/24"
        );
        assert_eq!(n["plugins"][0]["bridge"], a.bridge());
    }
}
