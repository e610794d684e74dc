//! The kubelet: runs the pods bound to its node as real containers through CRI (containerd +
//! runc), reports the node and its pods, and serves logs, exec, attach and port-forward to the
//! API server. It reaches the cluster only through the API (a kube `Client`).
//!
//! Not here: scheduling (the scheduler binds pods), Services (the proxy), node health decisions
//! (the node lifecycle controller reads the Lease we renew).

pub mod containerd;
pub mod cri;
pub mod dns;
pub mod eviction;
pub mod images;
pub mod logs;
pub mod network;
pub mod node;
pub mod pods;
pub mod probes;
pub mod server;
pub mod static_pods;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    /// The node's own directory (`<data-dir>/agent`): runtime state, images, logs, volumes.
    pub dir: PathBuf,
    /// An existing CRI socket; None = start and supervise containerd.
    pub runtime_endpoint: Option<String>,
    pub insecure_registries: Vec<String>,
    /// The address the node reports and serves on; None = the default route's source address.
    pub node_ip: Option<IpAddr>,
    /// The kubelet's HTTPS port; 0 = a free one (reported in the Node's daemonEndpoints).
    pub port: u16,
    pub labels: Vec<(String, String)>,
    /// Stop every pod of this node when the kubelet stops (default: they keep running, as
    /// upstream's do across kubelet restarts).
    pub stop_pods_on_exit: bool,
    /// The cluster CA: callers of the kubelet's endpoint must show a client certificate it
    /// signed. None: read `kube-system/kube-root-ca.crt` from the API.
    pub client_ca_pem: Option<String>,
    /// Hard eviction thresholds (`--eviction-hard`).
    pub eviction_hard: eviction::Thresholds,
    /// Static pod manifests (None: `<dir>/pod-manifests`).
    pub pod_manifest_path: Option<PathBuf>,
    /// The cluster DNS Service's address for pods' resolv.conf (None: the ClusterIP of
    /// `kube-system/kube-dns`, looked up when a pod needs it).
    pub cluster_dns: Option<IpAddr>,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
}

/// Runs the kubelet until `shutdown` resolves. Containers keep running after it returns.
pub async fn run(
    client: Client,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let layout = containerd::Layout {
        dir: opts.dir.clone(),
    };
    std::fs::create_dir_all(&opts.dir)?;
    let (supervised, endpoint) = match &opts.runtime_endpoint {
        Some(e) => (None, e.clone()),
        None => {
            let s = containerd::Supervised::start(
                &layout,
                images::PAUSE_IMAGE,
                &opts.insecure_registries,
            )
            .await?;
            let sock = s.socket.display().to_string();
            (Some(s), sock)
        }
    };
    let result = serve(
        client,
        &opts,
        &layout,
        &endpoint,
        supervised.is_some(),
        shutdown,
    )
    .await;
    if let Some(s) = supervised {
        s.stop().await;
    }
    result
}

async fn serve(
    client: Client,
    opts: &Options,
    layout: &containerd::Layout,
    endpoint: &str,
    supervised: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let socket = cri::socket_path(endpoint);
    // Our pause image, then whatever the operator dropped into images/.
    let pause = layout.images().join(".rkube-pause.tar");
    std::fs::create_dir_all(layout.images())?;
    images::write_if_changed(
        &pause,
        &images::pause(std::path::Path::new(images::BUSYBOX_BINARY))?,
    )?;
    containerd::import(&socket, &pause).await?;
    let mut tarballs: Vec<PathBuf> = std::fs::read_dir(layout.images())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    tarballs.sort();
    for t in tarballs {
        match containerd::import(&socket, &t).await {
            Ok(()) => tracing::info!(image = %t.display(), "imported"),
            Err(e) => tracing::warn!(error = %e, "image import failed"),
        }
    }
    let runtime = cri::Cri::connect(endpoint).await?;
    let version = runtime.version().await?;
    let ip = opts.node_ip.unwrap_or_else(node::default_ip);
    let tag = containerd::tag(&opts.dir);
    let (network_tx, network_ready) = watch::channel(false);
    let kubelet = Arc::new(pods::Kubelet {
        client: client.clone(),
        cri: runtime,
        node: opts.node_name.clone(),
        host_ip: ip.to_string(),
        layout: containerd::Layout {
            dir: opts.dir.clone(),
        },
        cgroup_root: format!("/rkube-{tag}"),
        recorder: events::Recorder::new(client.clone(), "kubelet").on_host(&opts.node_name),
        evicted: Default::default(),
        wakers: Default::default(),
        network_ready,
        cluster_dns: std::sync::RwLock::new(opts.cluster_dns),
        cluster_domain: opts.cluster_domain.clone(),
        host_dns: dns::ResolvConf::host(),
    });
    let (pressure_tx, pressure) = watch::channel(eviction::Pressure::default());
    let ca = match &opts.client_ca_pem {
        Some(ca) => ca.clone(),
        None => root_ca(&client).await?,
    };
    let (port, server) = server::start(kubelet.clone(), ip, opts.port, &ca).await?;
    let facts = node::Facts {
        name: opts.node_name.clone(),
        ip,
        port,
        runtime_version: format!("{}://{}", version.runtime_name, version.runtime_version),
        labels: opts.labels.clone(),
        storage_dir: opts.dir.clone(),
    };
    node::register(&client, &facts).await?;
    tracing::info!(node = %opts.node_name, %ip, port, supervised, "kubelet registered");
    let cni = pod_network(
        client.clone(),
        opts.node_name.clone(),
        containerd::Layout {
            dir: opts.dir.clone(),
        },
        tag,
        network_tx,
    );
    let routes: Arc<std::sync::Mutex<network::Routes>> = Default::default();
    let masq_chain = containerd::masquerade_chain(&kubelet.layout);
    tokio::select! {
        _ = network::keep_routes(client.clone(), opts.node_name.clone(), masq_chain.clone(), routes.clone()) => {}
        _ = node::heartbeat(client.clone(), opts.node_name.clone()) => {}
        _ = node::status_loop(client.clone(), facts, pressure, kubelet.cri.clone()) => {}
        _ = static_pods::run(kubelet.clone(), opts.pod_manifest_path.clone().unwrap_or_else(|| opts.dir.join("pod-manifests"))) => {}
        _ = eviction::run(kubelet.clone(), opts.eviction_hard.clone(), opts.dir.clone(), pressure_tx, kubelet.evicted.clone()) => {}
        _ = cni => {}
        r = sync_pods(kubelet.clone()) => r?,
        _ = pods::relist(kubelet.clone()) => {}
        _ = server => {}
        _ = shutdown => {}
    }
    if opts.stop_pods_on_exit {
        stop_all(&kubelet).await;
        network::remove_routes(&routes, &masq_chain).await;
    }
    Ok(())
}

/// The cluster CA as the server publishes it (`kube-system/kube-root-ca.crt`, `ca.crt`).
async fn root_ca(client: &Client) -> anyhow::Result<String> {
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "kube-system");
    let cm = cms.get("kube-root-ca.crt").await.map_err(|e| {
        anyhow::anyhow!("reading the cluster CA (kube-system/kube-root-ca.crt): {e}")
    })?;
    cm.data
        .and_then(|d| d.get("ca.crt").cloned())
        .ok_or_else(|| anyhow::anyhow!("kube-system/kube-root-ca.crt has no ca.crt"))
}

/// Writes the CNI config once the node has a podCIDR (from node IPAM); without one after 15 s
/// (no controller manager), a /24 of 10.88.0.0/16 picked from the node's directory.
async fn pod_network(
    client: Client,
    name: String,
    layout: containerd::Layout,
    tag: String,
    ready: watch::Sender<bool>,
) {
    let nodes: Api<Node> = Api::all(client);
    let started = tokio::time::Instant::now();
    let mut written: Option<String> = None;
    loop {
        let cidr = match nodes.get_opt(&name).await {
            Ok(Some(n)) => n.spec.and_then(|s| s.pod_cidr),
            _ => None,
        };
        let cidr = cidr.or_else(|| {
            (written.is_none() && started.elapsed() > Duration::from_secs(15)).then(|| {
                let b = u8::from_str_radix(&tag[..2], 16).unwrap_or(0);
                format!("10.88.{b}.0/24")
            })
        });
        if let Some(c) = cidr.filter(|c| written.as_ref() != Some(c)) {
            match containerd::write_cni(&layout, &c) {
                Ok(_) => {
                    tracing::info!(pod_cidr = %c, "pod network configured");
                    written = Some(c);
                    let _ = ready.send(true);
                }
                Err(e) => tracing::warn!(error = %e, "writing the CNI config"),
            }
        }
        tokio::time::sleep(Duration::from_secs(if written.is_some() { 30 } else { 1 })).await;
    }
}

/// Watches the pods bound to this node and keeps one worker per pod; after the first list,
/// removes sandboxes of pods that no longer exist.
async fn sync_pods(k: Arc<pods::Kubelet>) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::all(k.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", k.node));
    // managedFields are never read here: not even decoded.
    let mut stream = watcher(apimachinery::slim::Slim::api(&api), cfg)
        .map(|ev| ev.map(apimachinery::slim::Slim::event))
        .boxed();
    let mut workers: HashMap<String, watch::Sender<Option<Arc<Pod>>>> = HashMap::new();
    let mut listing: Option<std::collections::HashSet<String>> = None;
    let mut gc = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            ev = stream.next() => {
                let Some(ev) = ev else { anyhow::bail!("pod watch ended") };
                match ev {
                    Ok(watcher::Event::Init) => listing = Some(Default::default()),
                    Ok(watcher::Event::InitApply(p)) => {
                        if let Some(l) = listing.as_mut() {
                            l.insert(p.uid().unwrap_or_default());
                        }
                        upsert(&k, &mut workers, p);
                    }
                    Ok(watcher::Event::Apply(p)) => upsert(&k, &mut workers, p),
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(tx) = workers.remove(&p.uid().unwrap_or_default()) {
                            let _ = tx.send(None);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(seen) = listing.take() {
                            workers.retain(|uid, tx| {
                                let keep = seen.contains(uid);
                                if !keep {
                                    let _ = tx.send(None);
                                }
                                keep
                            });
                        }
                        remove_orphans(&k, &workers).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pod watch");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            _ = gc.tick() => {
                workers.retain(|_, tx| !tx.is_closed());
                k.wakers.lock().unwrap().retain(|uid, _| workers.contains_key(uid));
            }
        }
    }
}

fn upsert(
    k: &Arc<pods::Kubelet>,
    workers: &mut HashMap<String, watch::Sender<Option<Arc<Pod>>>>,
    pod: Pod,
) {
    let uid = pod.uid().unwrap_or_default();
    let pod = Arc::new(pod);
    if let Some(tx) = workers.get(&uid) {
        if tx.send(Some(pod.clone())).is_ok() {
            return;
        }
    }
    let (tx, rx) = watch::channel(Some(pod));
    let wake = Arc::new(tokio::sync::Notify::new());
    k.wakers.lock().unwrap().insert(uid.clone(), wake.clone());
    tokio::spawn(pods::run_worker(k.clone(), rx, wake));
    workers.insert(uid, tx);
}

/// Stops and removes every pod sandbox of this node (--stop-pods-on-exit).
async fn stop_all(k: &pods::Kubelet) {
    let boxes = k
        .cri
        .sandboxes(&[(pods::LABEL_NODE, &k.node)])
        .await
        .unwrap_or_default();
    let uids: std::collections::HashSet<String> = boxes
        .iter()
        .filter_map(|b| b.labels.get(pods::LABEL_UID).cloned())
        .collect();
    let stops = uids.iter().map(|uid| k.kill_pod(uid, 2, true));
    for r in futures::future::join_all(stops).await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "stopping a pod on exit");
        }
    }
    // With no pods left, the node's bridge and masquerade rule go too (another node may reuse
    // its range).
    containerd::unmasquerade(&k.layout);
    pods::remove_cgroup(&k.cgroup_root);
    let _ = tokio::process::Command::new("ip")
        .args(["link", "del", &k.layout.bridge()])
        .output()
        .await;
}

/// Sandboxes of this node whose pod is gone (deleted while the kubelet was down).
async fn remove_orphans(
    k: &Arc<pods::Kubelet>,
    workers: &HashMap<String, watch::Sender<Option<Arc<Pod>>>>,
) {
    let boxes = match k.cri.sandboxes(&[(pods::LABEL_NODE, &k.node)]).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "listing sandboxes");
            return;
        }
    };
    for b in boxes {
        let uid = b.labels.get(pods::LABEL_UID).cloned().unwrap_or_default();
        if !workers.contains_key(&uid) {
            tracing::info!(uid = %uid, "removing the containers of a pod that no longer exists");
            if let Err(e) = k.kill_pod(&uid, 2, true).await {
                tracing::warn!(uid = %uid, error = %e, "removing an orphaned pod");
            }
        }
    }
}
