//! The Node object: registration with the machine's real capacity, addresses and nodeInfo; the
//! Lease in kube-node-lease renewed every 10 s; conditions written again every minute and
//! whenever someone else (the node lifecycle controller) changed Ready.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::{json, Value};

use crate::eviction::Pressure;

pub const KUBELET_VERSION: &str = "v1.33.0";
pub const MAX_PODS: &str = "110";
const FIELD_MANAGER: &str = "kubelet";

/// What the node reports about itself.
#[derive(Debug, Clone)]
pub struct Facts {
    pub name: String,
    pub ip: IpAddr,
    pub port: u16,
    pub runtime_version: String,
    pub labels: Vec<(String, String)>,
    pub storage_dir: std::path::PathBuf,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn memory_bytes() -> u64 {
    read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::process::Command::new("df")
        .args(["-k", "--output=size"])
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn os_image() -> String {
    read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// The healthy node conditions (no pressure, Ready) at time `now`.
pub fn conditions(now: &str) -> Value {
    conditions_with(now, Pressure::default())
}

/// The node conditions under `pressure` (Ready stays True, as upstream's).
pub fn conditions_with(now: &str, pressure: Pressure) -> Value {
    let c = |t: &str, s: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": s, "reason": reason, "message": msg,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let memory = if pressure.memory {
        c(
            "MemoryPressure",
            "True",
            "KubeletHasInsufficientMemory",
            "kubelet has insufficient memory available",
        )
    } else {
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        )
    };
    let disk = if pressure.disk {
        c(
            "DiskPressure",
            "True",
            "KubeletHasDiskPressure",
            "kubelet has disk pressure",
        )
    } else {
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
        )
    };
    json!([
        memory,
        disk,
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        c(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status"
        ),
    ])
}

/// The node's status as the kubelet reports it (capacity, allocatable, addresses, nodeInfo,
/// conditions, the kubelet's port).
pub fn status(f: &Facts, pressure: Pressure) -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = memory_bytes();
    let capacity = json!({
        "cpu": cpus.to_string(),
        "memory": format!("{}Ki", mem / 1024),
        "ephemeral-storage": format!("{}Ki", disk_bytes(&f.storage_dir) / 1024),
        "pods": MAX_PODS,
    });
    // Upstream reserves the eviction threshold (100Mi of memory) from allocatable.
    let mut allocatable = capacity.clone();
    allocatable["memory"] = json!(format!("{}Ki", mem.saturating_sub(100 << 20) / 1024));
    let now = Timestamp::now().to_string();
    json!({
        "capacity": capacity,
        "allocatable": allocatable,
        "conditions": conditions_with(&now, pressure),
        "addresses": [
            {"type": "InternalIP", "address": f.ip.to_string()},
            {"type": "Hostname", "address": f.name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": f.port}},
        "nodeInfo": {
            "machineID": read("/etc/machine-id"),
            "systemUUID": read("/sys/class/dmi/id/product_uuid"),
            "bootID": read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read("/proc/sys/kernel/osrelease"),
            "osImage": os_image(),
            "containerRuntimeVersion": f.runtime_version,
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION,
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    })
}

/// Creates the Node or, if it exists (a restart), brings its labels and status up to date.
pub async fn register(client: &Client, f: &Facts) -> anyhow::Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(f.name));
    labels.insert("kubernetes.io/os".into(), json!("linux"));
    labels.insert("kubernetes.io/arch".into(), json!("amd64"));
    for (k, v) in &f.labels {
        labels.insert(k.clone(), json!(v));
    }
    let status = status(f, Pressure::default());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": f.name, "labels": labels},
        "spec": {},
        "status": status,
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(n) => Ok(n),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            nodes
                .patch(
                    &f.name,
                    &pp,
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await?;
            Ok(nodes
                .patch_status(&f.name, &pp, &Patch::Merge(json!({ "status": status })))
                .await?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Renews the node's Lease every 10 s (a 40 s lease, as upstream), forever.
pub async fn heartbeat(client: Client, name: String) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let mut known: Option<Lease> = None;
    loop {
        match renew(&leases, &name, known.take()).await {
            Ok(l) => known = Some(l),
            Err(e) => tracing::warn!(node = %name, error = %e, "lease renewal failed"),
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Renews node `name`'s Lease (40 s, as upstream), starting from `known` (the last one written)
/// if given; returns the Lease as stored.
pub async fn renew(leases: &Api<Lease>, name: &str, known: Option<Lease>) -> anyhow::Result<Lease> {
    let mut lease = match known {
        Some(l) => l,
        None => leases.get_opt(name).await?.unwrap_or(Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: None,
        }),
    };
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(name.into()),
        lease_duration_seconds: Some(40),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..Default::default()
    });
    Ok(if lease.metadata.resource_version.is_some() {
        leases.replace(name, &PostParams::default(), &lease).await?
    } else {
        leases.create(&PostParams::default(), &lease).await?
    })
}

/// Writes the node's conditions every minute (and at once after a failure), so that a node
/// the lifecycle controller marked Unknown comes back Ready when heard again.
pub async fn status_loop(
    client: Client,
    facts: Facts,
    mut pressure: tokio::sync::watch::Receiver<Pressure>,
    runtime: crate::cri::Cri,
) {
    let nodes: Api<Node> = Api::all(client);
    let pp = PatchParams::default();
    loop {
        let now = *pressure.borrow_and_update();
        let mut st = status(&facts, now);
        st["images"] = images(&runtime).await;
        let wait = match nodes
            .patch_status(&facts.name, &pp, &Patch::Merge(json!({ "status": st })))
            .await
        {
            Ok(_) => Duration::from_secs(60),
            Err(e) => {
                tracing::warn!(node = %facts.name, error = %e, "node status update failed");
                Duration::from_secs(5)
            }
        };
        let deadline = tokio::time::Instant::now() + wait;
        // Check Ready every 5 s: someone else may have set it to Unknown.
        while tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                // A pressure change is written at once.
                r = pressure.changed() => if r.is_ok() { break },
            }
            if let Ok(n) = nodes.get(&facts.name).await {
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .and_then(|c| c.into_iter().find(|c| c.type_ == "Ready"))
                    .is_some_and(|c| c.status == "True");
                if !ready {
                    break;
                }
            }
        }
    }
}

/// The node's images as upstream reports them (names and size, largest first, at most 50): the
/// scheduler's ImageLocality scores by them.
async fn images(runtime: &crate::cri::Cri) -> Value {
    let Ok(list) = runtime
        .images
        .clone()
        .list_images(crate::cri::ListImagesRequest::default())
        .await
    else {
        return json!([]);
    };
    let mut images = list.into_inner().images;
    images.sort_by_key(|i| std::cmp::Reverse(i.size));
    let out: Vec<Value> = images
        .into_iter()
        .filter(|i| !i.repo_tags.is_empty() || !i.repo_digests.is_empty())
        .take(50)
        .map(|i| {
            let names: Vec<String> = i.repo_digests.into_iter().chain(i.repo_tags).collect();
            json!({"names": names, "sizeBytes": i.size})
        })
        .collect();
    json!(out)
}

/// The address other machines reach this one at: the source address of the default route.
pub fn default_ip() -> IpAddr {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:80")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}
