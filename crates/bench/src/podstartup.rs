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
    Ok(())
}
