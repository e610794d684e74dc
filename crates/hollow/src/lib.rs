//! Hollow nodes: N simulated nodes in one process, for tests and scale work. Each registers a
//! Node (capacity, labels, Ready), renews its Lease in kube-node-lease every 10 s, puts its Ready
//! condition back when someone else changed it, and "runs" the pods bound to it: marks them
//! Running and Ready with an IP from the node's podCIDR, and finishes their graceful deletion.
//!
//! All nodes share one pod watch, one node watch and one work queue, so a node costs a few
//! hundred bytes of state: 5,000 fit in one process.
//!
//! Test hooks, as annotations on a pod: `hollow.rkube.io/ready: "false"` keeps it not Ready,
//! `hollow.rkube.io/phase: Succeeded|Failed` ends it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apimachinery::slim::Slim;
use controllers::runtime::{self, Queue};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

/// What the simulated nodes look like.
#[derive(Debug, Clone)]
pub struct Options {
    pub count: usize,
    pub name_prefix: String,
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    /// Extra labels on every node.
    pub labels: Vec<(String, String)>,
    /// Zones handed out round-robin (`topology.kubernetes.io/zone`); none if empty.
    pub zones: Vec<String>,
    /// How often leases are renewed (upstream: 10 s for a 40 s lease).
    pub renew_interval: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            count: 1,
            name_prefix: "hollow-node-".into(),
            cpu: "4".into(),
            memory: "16Gi".into(),
            pods: "110".into(),
            labels: Vec::new(),
            zones: Vec::new(),
            renew_interval: Duration::from_secs(10),
        }
    }
}

pub const ANNOTATION_READY: &str = "hollow.rkube.io/ready";
pub const ANNOTATION_PHASE: &str = "hollow.rkube.io/phase";
const FIELD_MANAGER: &str = "hollow-kubelet";

/// One simulated node's state.
struct HollowNode {
    /// The pod IP counter within its podCIDR.
    next_ip: u32,
    /// Each pod's IP, kept across status writes.
    pod_ips: HashMap<String, String>,
}

struct Shared {
    client: Client,
    nodes: Mutex<HashMap<String, HollowNode>>,
    pods: Arc<runtime::Informer<Pod>>,
    node_cache: Arc<runtime::Informer<Node>>,
    queue: Arc<Queue>,
}

pub fn node_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

fn node_object(opts: &Options, name: &str, i: usize) -> Value {
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(name));
    labels.insert("kubernetes.io/os".into(), json!("linux"));
    labels.insert("kubernetes.io/arch".into(), json!("amd64"));
    labels.insert("node.kubernetes.io/instance-type".into(), json!("hollow"));
    if !opts.zones.is_empty() {
        labels.insert(
            "topology.kubernetes.io/zone".into(),
            json!(opts.zones[i % opts.zones.len()]),
        );
    }
    for (k, v) in &opts.labels {
        labels.insert(k.clone(), json!(v));
    }
    let capacity = json!({"cpu": opts.cpu, "memory": opts.memory, "pods": opts.pods, "ephemeral-storage": "100Gi"});
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {},
        "status": {
            "capacity": capacity, "allocatable": capacity,
            "conditions": conditions(),
            "addresses": [
                {"type": "InternalIP", "address": format!("10.254.{}.{}", (i / 250) % 250, i % 250 + 1)},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "hollow",
                "osImage": "rkube hollow node", "containerRuntimeVersion": "hollow://1.0",
                "kubeletVersion": "v1.33.0-rkube", "kubeProxyVersion": "v1.33.0-rkube",
                "operatingSystem": "linux", "architecture": "amd64",
            },
        },
    })
}

fn conditions() -> Value {
    // The same conditions the real kubelet reports.
    kubelet::node::conditions(&Timestamp::now().to_string())
}

fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Run `opts.count` hollow nodes until `shutdown` resolves.
pub async fn run(
    client: Client,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let prefix = opts.name_prefix.clone();
    let pods = runtime::start(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields("spec.nodeName!="),
    );
    let node_cache = runtime::start(Api::<Node>::all(client.clone()), watcher::Config::default());
    let shared = Arc::new(Shared {
        client: client.clone(),
        nodes: Mutex::new(HashMap::new()),
        pods: pods.clone(),
        node_cache: node_cache.clone(),
        queue: Queue::new(),
    });
    {
        let s = shared.clone();
        pods.on(move |_old, new| {
            if let Some(p) = new {
                let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
                if node.is_some_and(|n| s.nodes.lock().unwrap().contains_key(n)) {
                    s.queue.add(runtime::key_of(p));
                }
            }
        });
        let s = shared.clone();
        node_cache.on(move |_old, new| {
            // A node whose podCIDR just arrived: its waiting pods can get IPs now.
            if let Some(n) = new {
                if s.nodes.lock().unwrap().contains_key(&n.name_any()) && !node_ready(n) {
                    s.queue.add(format!("node:{}", n.name_any()));
                }
            }
        });
    }

    // Register every node (bounded concurrency), then start serving.
    let nodes_api: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    futures::stream::iter(0..opts.count)
        .map(|i| {
            let (nodes_api, opts) = (nodes_api.clone(), &opts);
            let name = node_name(&prefix, i);
            async move {
                let node: Node = serde_json::from_value(node_object(opts, &name, i))?;
                match nodes_api.create(&PostParams::default(), &node).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => {
                        return Err(anyhow::Error::from(e).context(format!("registering {name}")))
                    }
                }
                anyhow::Ok(name)
            }
        })
        .buffer_unordered(32)
        .try_for_each(|name| {
            shared.nodes.lock().unwrap().insert(
                name,
                HollowNode {
                    next_ip: 2,
                    pod_ips: HashMap::new(),
                },
            );
            futures::future::ready(Ok(()))
        })
        .await?;
    tracing::info!(count = opts.count, prefix = %prefix, "hollow nodes registered");

    let names: Vec<String> = (0..opts.count).map(|i| node_name(&prefix, i)).collect();
    let heartbeat = heartbeat(leases, names.clone(), opts.renew_interval);
    let status = status_loop(shared.clone(), names);
    let s = shared.clone();
    let work = shared.queue.clone().run(16, "hollow-nodes", move |key| {
        let s = s.clone();
        async move { s.sync(&key).await }
    });
    // Pods bound before we watched them are queued by the informer's first list.
    pods.wait_synced().await;
    for p in pods.list() {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        if node.is_some_and(|n| shared.nodes.lock().unwrap().contains_key(&n)) {
            shared.queue.add(runtime::key_of(&*p));
        }
    }
    tokio::select! {
        _ = heartbeat => {}
        _ = status => {}
        _ = work => {}
        _ = shutdown => {}
    }
    Ok(())
}

use futures::{StreamExt, TryStreamExt};

/// Renew every node's Lease once per interval, spread over the interval.
async fn heartbeat(leases: Api<Lease>, names: Vec<String>, interval: Duration) {
    let state: Arc<Mutex<HashMap<String, Lease>>> = Arc::default();
    loop {
        let started = tokio::time::Instant::now();
        futures::stream::iter(names.iter().cloned())
            .for_each_concurrent(32, |name| {
                let (leases, state) = (leases.clone(), state.clone());
                async move {
                    if let Err(e) = renew(&leases, &state, &name).await {
                        tracing::debug!(node = %name, error = %e, "lease renewal failed");
                        state.lock().unwrap().remove(&name);
                    }
                }
            })
            .await;
        tokio::time::sleep_until(started + interval).await;
    }
}

async fn renew(
    leases: &Api<Lease>,
    state: &Mutex<HashMap<String, Lease>>,
    name: &str,
) -> anyhow::Result<()> {
    let known = state.lock().unwrap().get(name).cloned();
    let lease = kubelet::node::renew(leases, name, known).await?;
    state.lock().unwrap().insert(name.into(), lease);
    Ok(())
}

/// Every 10 s, put back the Ready condition of any of our nodes someone else changed (the node
/// lifecycle controller marks silent nodes Unknown; a node that is heard again recovers).
async fn status_loop(shared: Arc<Shared>, names: Vec<String>) {
    shared.node_cache.wait_synced().await;
    loop {
        for name in &names {
            if let Some(n) = shared.node_cache.get(name) {
                if !node_ready(&n) {
                    shared.queue.add(format!("node:{name}"));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

impl Shared {
    async fn sync(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        if let Some(node) = key.strip_prefix("node:") {
            let api: Api<Node> = Api::all(self.client.clone());
            api.patch_status(
                node,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": conditions()}})),
            )
            .await?;
            return Ok(None);
        }
        let Some(pod) = self.pods.get(key) else {
            return Ok(None);
        };
        let (ns, name) = runtime::split_key(key);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns.unwrap_or_default());
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            // "Stop the containers", then finish the deletion.
            let dp = controllers::pods::delete_params(&pod, Some(0));
            match api.delete(name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(n) = self.nodes.lock().unwrap().get_mut(&node) {
                n.pod_ips.remove(key);
            }
            return Ok(None);
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
            return Ok(None);
        }
        let annotations = pod.annotations();
        let want_phase = annotations
            .get(ANNOTATION_PHASE)
            .filter(|p| *p == "Succeeded" || *p == "Failed")
            .cloned()
            .unwrap_or_else(|| "Running".into());
        let ready = want_phase == "Running"
            && annotations.get(ANNOTATION_READY).map(String::as_str) != Some("false");
        // The pod IP, from the node's podCIDR.
        let Some(cidr) = self
            .node_cache
            .get(&node)
            .and_then(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.clone()))
        else {
            return Ok(Some(Duration::from_millis(500)));
        };
        let host_ip = self
            .node_cache
            .get(&node)
            .and_then(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .and_then(|a| {
                        a.iter()
                            .find(|a| a.type_ == "InternalIP")
                            .map(|a| a.address.clone())
                    })
            })
            .unwrap_or_default();
        let ip = {
            let mut nodes = self.nodes.lock().unwrap();
            let Some(hn) = nodes.get_mut(&node) else {
                return Ok(None);
            };
            match pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
                Some(ip) => ip,
                None => hn
                    .pod_ips
                    .entry(key.to_string())
                    .or_insert_with(|| {
                        let ip = ip_in(&cidr, hn.next_ip);
                        hn.next_ip = if hn.next_ip >= 253 { 2 } else { hn.next_ip + 1 };
                        ip
                    })
                    .clone(),
            }
        };
        let status = pod_status(&pod, &want_phase, ready, &ip, &host_ip);
        let current = serde_json::to_value(&pod.status).unwrap_or(Value::Null);
        if same_status(&current, &status) {
            return Ok(None);
        }
        Slim::api(&api)
            .patch_status(
                name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
        Ok(None)
    }
}

/// Whether the status we would write says nothing new (phase, readiness, IP).
fn same_status(cur: &Value, want: &Value) -> bool {
    let ready = |v: &Value| {
        v["conditions"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["status"].clone())
    };
    cur["phase"] == want["phase"] && cur["podIP"] == want["podIP"] && ready(cur) == ready(want)
}

fn ip_in(cidr: &str, host: u32) -> String {
    let base: std::net::Ipv4Addr = cidr
        .split('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(std::net::Ipv4Addr::new(10, 42, 0, 0));
    std::net::Ipv4Addr::from(u32::from(base) + host).to_string()
}

fn pod_status(pod: &Pod, phase: &str, ready: bool, ip: &str, host_ip: &str) -> Value {
    let now = Timestamp::now().to_string();
    let start = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| now.clone());
    let running = phase == "Running";
    let flag = |b: bool| if b { "True" } else { "False" };
    let cond = |t: &str, s: &str| json!({"type": t, "status": s, "lastTransitionTime": now});
    let containers: Vec<Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let state = if running {
                json!({"running": {"startedAt": start}})
            } else {
                json!({"terminated": {"exitCode": if phase == "Succeeded" {0} else {1},
                        "reason": if phase == "Succeeded" {"Completed"} else {"Error"},
                        "startedAt": start, "finishedAt": now}})
            };
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(),
                "imageID": format!("hollow://{}", c.image.clone().unwrap_or_default()),
                "containerID": format!("hollow://{}/{}", pod.metadata.uid.clone().unwrap_or_default(), c.name),
                "ready": ready, "started": running, "restartCount": 0, "state": state,
            })
        })
        .collect();
    json!({
        "phase": phase,
        "conditions": [
            cond("PodReadyToStartContainers", flag(running)),
            cond("Initialized", "True"),
            cond("Ready", flag(ready)),
            cond("ContainersReady", flag(ready)),
            cond("PodScheduled", "True"),
        ],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "podIP": ip, "podIPs": [{"ip": ip}],
        "startTime": start,
        "containerStatuses": containers,
        "qosClass": "BestEffort",
    })
}

/// List the nodes a hollow-nodes process with this prefix registered (for tests and benches).
pub async fn registered(client: &Client, prefix: &str) -> anyhow::Result<usize> {
    let nodes: Api<Node> = Api::all(client.clone());
    Ok(nodes
        .list_metadata(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| n.name_any().starts_with(prefix))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ips_come_from_the_node_cidr() {
        assert_eq!(ip_in("10.42.3.0/24", 2), "10.42.3.2");
        assert_eq!(ip_in("10.42.3.0/24", 253), "10.42.3.253");
    }

    #[test]
    fn nodes_register_ready_with_labels_and_zones() {
        let opts = Options {
            zones: vec!["a".into(), "b".into()],
            labels: vec![("tier".into(), "x".into())],
            ..Options::default()
        };
        let n: Node = serde_json::from_value(node_object(&opts, "n1", 1)).unwrap();
        assert!(node_ready(&n));
        let labels = n.labels();
        assert_eq!(labels["topology.kubernetes.io/zone"], "b");
        assert_eq!(labels["tier"], "x");
        assert_eq!(labels["kubernetes.io/hostname"], "n1");
    }

    #[test]
    fn status_reflects_the_test_hooks() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }))
        .unwrap();
        let s = pod_status(&pod, "Running", false, "10.42.0.2", "10.254.0.1");
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "10.42.0.2");
        assert!(s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "False"));
        let done = pod_status(&pod, "Succeeded", false, "10.42.0.2", "");
        assert_eq!(
            done["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
    }
}
