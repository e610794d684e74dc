//! Pod startup latency as upstream's SLO defines it: from the pod's creation to all its
//! containers started, as observed through a watch, with the image already on the node. A real
//! `rkube kubelet` process on real containerd; 100 pods one after another, then 30 at once.
//! Also the kubelet's memory with 30 pods running.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;

use crate::{cpu_seconds, pct, Server};

/// "RSS X MiB = anonymous Y MiB + file-backed Z MiB; PSS W MiB". The anonymous part is what
/// upstream's node tests limit: their kubelet memory is cAdvisor's `MemoryRSSInBytes` of the
/// kubelet's cgroup, i.e. its `total_rss` (cgroup v1) or `anon` (v2), without mapped files. PSS
/// charges each shared page (the one `rkube` binary's code) to its users in equal parts.
fn memory(pid: u32) -> String {
    let kb_in = |file: &str, key: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    format!(
        "RSS {:.1} MiB = anonymous {:.1} MiB + file-backed {:.1} MiB; PSS {:.1} MiB",
        kb_in("status", "VmRSS:"),
        kb_in("status", "RssAnon:"),
        kb_in("status", "RssFile:"),
        kb_in("smaps_rollup", "Pss:"),
    )
}

/// The CPU seconds of a process and its children (the kubelet and its containerd).
fn cpu_with_children(pid: u32) -> f64 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    cpu_seconds(pid)
        + children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .map(cpu_seconds)
            .sum::<f64>()
}

/// CPU seconds the whole machine has spent busy (every core), from `/proc/stat`.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: f64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    busy / 100.0
}

/// A cpuacct cgroup around containerd: from when it is made, it counts the CPU of containerd and
/// of everything containerd starts (the shims, runc, the CNI plugins), which inherit it.
/// Containers' own processes move to their pods' cgroups and are not counted.
struct RuntimeCpu {
    dir: PathBuf,
    v2: bool,
}

impl RuntimeCpu {
    fn around(containerd: u32) -> Option<RuntimeCpu> {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let root = if v2 {
            "/sys/fs/cgroup"
        } else {
            "/sys/fs/cgroup/cpuacct"
        };
        let dir = PathBuf::from(root).join(format!("rkube-bench-runtime-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let rc = RuntimeCpu { dir, v2 };
        std::fs::write(rc.dir.join("cgroup.procs"), containerd.to_string()).ok()?;
        Some(rc)
    }

    fn seconds(&self) -> f64 {
        if self.v2 {
            let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
            stat.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(f64::NAN, |us| us / 1e6)
        } else {
            std::fs::read_to_string(self.dir.join("cpuacct.usage"))
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(f64::NAN, |ns| ns / 1e9)
        }
    }
}

impl Drop for RuntimeCpu {
    /// Hands whatever still runs in it back to the root cgroup, then removes it.
    fn drop(&mut self) {
        let parent = self.dir.parent().map(|p| p.join("cgroup.procs"));
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            if let Some(parent) = &parent {
                let _ = std::fs::write(parent, pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The kubelet's containerd, if it runs one.
fn containerd_of(kubelet: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{kubelet}/task/{kubelet}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm"))
                .is_ok_and(|n| n.trim() == "containerd")
        })
}

pub struct Kubelet {
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "startup"}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": "busybox", "imagePullPolicy": "IfNotPresent",
                            "command": ["sleep", "3600"]}],
        },
    }))
    .expect("pod")
}

fn all_started(p: &Pod) -> bool {
    let spec_n = p.spec.as_ref().map_or(0, |s| s.containers.len());
    let st = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    st.is_some_and(|cs| {
        cs.len() == spec_n
            && cs
                .iter()
                .all(|c| c.state.as_ref().and_then(|s| s.running.as_ref()).is_some())
    })
}

/// Records when each pod with these labels is first seen in the state `pred` looks for.
pub fn observe(
    api: Api<Pod>,
    labels: &str,
    pred: fn(&Pod) -> bool,
) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let s = seen.clone();
    let config = watcher::Config::default().labels(labels);
    tokio::spawn(async move {
        let mut stream = watcher(api, config).boxed();
        while let Some(ev) = stream.next().await {
            let pods = match ev {
                Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => vec![p],
                _ => vec![],
            };
            for p in pods {
                if pred(&p) {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    s.lock().unwrap().entry(name).or_insert_with(Instant::now);
                }
            }
        }
    });
    seen
}

pub async fn wait_started(
    seen: &Mutex<HashMap<String, Instant>>,
    name: &str,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = seen.lock().unwrap().get(name) {
            return Ok(*t);
        }
        if Instant::now() > deadline {
            bail!("pod {name} did not get there within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn delete_all(api: &Api<Pod>) -> Result<()> {
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app=startup"),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !api
        .list(&ListParams::default().labels("app=startup"))
        .await?
        .items
        .is_empty()
    {
        if Instant::now() > deadline {
            bail!("pods were not deleted within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn report(what: &str, lat: &mut [Duration]) {
    let n = lat.len();
    let (p50, p99) = (pct(lat, 0.5), pct(lat, 0.99));
    let max = lat
        .iter()
        .max()
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    println!("{what}: {n} pods, p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms");
}

/// A real `rkube kubelet` (node `bench-node`, its own directory) on `server`, once the node is
/// Ready with a podCIDR.
pub async fn start_kubelet(
    bin: &PathBuf,
    server: &Server,
    client: &kube::Client,
) -> Result<Kubelet> {
    let dir = tempfile::tempdir()?;
    let node_dir = dir.path().join("agent");
    let out = Command::new(bin)
        .args(["images", "--out"])
        .arg(node_dir.join("images"))
        .output()?;
    if !out.status.success() {
        bail!("rkube images: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::remove_file(node_dir.join("images/pause.tar"))?;
    let child = Command::new(bin)
        .args(["kubelet", "--kubeconfig"])
        .arg(&server.kubeconfig)
        .arg("--kubelet-dir")
        .arg(&node_dir)
        .args(["--node-name", "bench-node", "--stop-pods-on-exit"])
        // A build machine's disk may be fuller than upstream's 10% threshold allows.
        .args([
            "--eviction-hard",
            "memory.available<1Mi,nodefs.available<1%",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting rkube kubelet")?;
    let kubelet = Kubelet { child, _dir: dir };
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = nodes.get_opt("bench-node").await?.is_some_and(|n| {
            n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some()
                && n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            break;
        }
        if Instant::now() > deadline {
            bail!("the node did not become Ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(kubelet)
}

pub async fn run(bin: PathBuf, sequential: usize, burst: usize) -> Result<()> {
    let server = Server::start_with(&bin, &["--disable", "kubelet"])?;
    let client = server.client().await?;
    let kubelet = start_kubelet(&bin, &server, &client).await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let seen = observe(api.clone(), "app=startup", all_started);
    // One pod first: the CNI config is written and the image is cached.
    api.create(&PostParams::default(), &pod("warmup")).await?;
    wait_started(&seen, "warmup", Duration::from_secs(60)).await?;
    delete_all(&api).await?;
    println!("kubelet with no pods: {}", memory(kubelet.child.id()));

    let mut lat = Vec::new();
    for i in 0..sequential {
        let name = format!("seq-{i:03}");
        let t0 = Instant::now();
        api.create(&PostParams::default(), &pod(&name)).await?;
        let t1 = wait_started(&seen, &name, Duration::from_secs(60)).await?;
        lat.push(t1.saturating_duration_since(t0));
    }
    report("one after another", &mut lat);
    delete_all(&api).await?;

    // Where the burst's CPU goes: the whole machine, the container runtime (containerd and what
    // it starts), the rkube server, the kubelet; the rest is the kernel's own threads and the
    // containers (runc's init runs in the pod's cgroup).
    let runtime = containerd_of(kubelet.child.id()).and_then(RuntimeCpu::around);
    let cpu = || {
        (
            machine_busy(),
            runtime.as_ref().map_or(f64::NAN, RuntimeCpu::seconds),
            cpu_seconds(server.child.id()),
            cpu_seconds(kubelet.child.id()),
        )
    };
    let cpu0 = cpu();
    let mut starts = Vec::new();
    let creates = (0..burst).map(|i| {
        let api = api.clone();
        async move {
            let name = format!("burst-{i:03}");
            let t0 = Instant::now();
            api.create(&PostParams::default(), &pod(&name)).await?;
            Ok::<_, kube::Error>((name, t0))
        }
    });
    for r in futures::future::join_all(creates).await {
        starts.push(r?);
    }
    let mut lat = Vec::new();
    for (name, t0) in &starts {
        let t1 = wait_started(&seen, name, Duration::from_secs(120)).await?;
        lat.push(t1.saturating_duration_since(*t0));
    }
    report("burst", &mut lat);
    let cpu1 = cpu();
    let (all, rt, srv, kl) = (
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1,
        cpu1.2 - cpu0.2,
        cpu1.3 - cpu0.3,
    );
    let per = |s: f64| s / burst.max(1) as f64 * 1000.0;
    println!(
        "burst CPU: machine {all:.2} s ({:.0} ms/pod) = runtime (containerd, shims, runc, CNI) \
         {rt:.2} s ({:.0} ms/pod) + rkube server {srv:.2} s ({:.0} ms/pod) + kubelet {kl:.2} s \
         ({:.0} ms/pod) + other {:.2} s",
        per(all),
        per(rt),
        per(srv),
        per(kl),
        all - rt - srv - kl
    );
    // Let the status writes and probes of the burst settle before reading memory.
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "kubelet with {burst} pods running: {}",
        memory(kubelet.child.id())
    );
    let before = (
        cpu_seconds(kubelet.child.id()),
        cpu_with_children(kubelet.child.id()),
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = (
        cpu_seconds(kubelet.child.id()),
        cpu_with_children(kubelet.child.id()),
    );
    println!(
        "idle with {burst} pods, over 30 s: kubelet {:.1}% of a core, with containerd {:.1}%",
        (after.0 - before.0) / 30.0 * 100.0,
        (after.1 - before.1) / 30.0 * 100.0
    );
    delete_all(&api).await?;
    drop(kubelet);
    drop(runtime);
    Ok(())
}
