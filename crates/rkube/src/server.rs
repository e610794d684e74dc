//! `rkube server`: open the store, start the API server, write the kubeconfig and the join token,
//! print the ready line, and shut down cleanly on SIGTERM or SIGINT.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use store::Store;

use crate::certs;

/// Components `--disable` accepts.
const COMPONENTS: &[&str] = &["scheduler", "controller-manager", "kubelet", "proxy", "dns"];

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Everything the server keeps: store, certificates, kubeconfigs, runtime state.
    #[arg(long, env = "RKUBE_DATA_DIR", default_value = "/var/lib/rkube")]
    pub data_dir: PathBuf,
    /// Address the API server listens on.
    #[arg(long, env = "RKUBE_BIND_ADDRESS", default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// API server port (0 = pick a free one; the kubeconfig says which).
    #[arg(long, env = "RKUBE_PORT", default_value_t = 6443)]
    pub port: u16,
    /// `sqlite://PATH` for the embedded store (default: in the data dir), or an etcd cluster.
    #[arg(long, env = "RKUBE_DATASTORE_ENDPOINT")]
    pub datastore_endpoint: Option<String>,
    #[command(flatten)]
    pub datastore_tls: DatastoreTls,
    /// Comma list of components to leave out.
    #[arg(long, env = "RKUBE_DISABLE", value_delimiter = ',')]
    pub disable: Vec<String>,
    /// How often store history is compacted; each compaction keeps the last interval's
    /// revisions, so watchers and paged lists can resume within 1-2 intervals.
    #[arg(long, env = "RKUBE_COMPACTION_INTERVAL_SECONDS", default_value_t = 300)]
    pub compaction_interval_seconds: u64,
    /// The range Service ClusterIPs are given from (its first address is the `kubernetes`
    /// Service's, its tenth cluster DNS's).
    #[arg(long, env = "RKUBE_SERVICE_CLUSTER_IP_RANGE", default_value = apiserver::DEFAULT_SERVICE_CIDR)]
    pub service_cluster_ip_range: String,
    /// The range NodePorts are given from.
    #[arg(long, env = "RKUBE_SERVICE_NODE_PORT_RANGE", default_value = apiserver::DEFAULT_NODE_PORT_RANGE)]
    pub service_node_port_range: String,
    #[command(flatten)]
    pub controllers: ControllerArgs,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// The node's flags (in `rkube server`, `rkube agent` and `rkube kubelet`).
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// This machine's node name (default: the host name).
    #[arg(long, env = "RKUBE_NODE_NAME")]
    pub node_name: Option<String>,
    /// An existing CRI socket instead of a supervised runtime.
    #[arg(long, env = "RKUBE_CONTAINER_RUNTIME_ENDPOINT")]
    pub container_runtime_endpoint: Option<String>,
    /// Registries to pull from over plain HTTP (repeatable).
    #[arg(long, env = "RKUBE_INSECURE_REGISTRY")]
    pub insecure_registry: Vec<String>,
    /// The address this node reports and serves on (default: the default route's source).
    #[arg(long, env = "RKUBE_NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// The kubelet's HTTPS port (0 = a free one).
    #[arg(long, env = "RKUBE_KUBELET_PORT", default_value_t = 0)]
    pub kubelet_port: u16,
    /// The node's own directory (for `rkube kubelet`; the server and agent use <data-dir>/agent).
    #[arg(
        long,
        env = "RKUBE_KUBELET_DIR",
        default_value = "/var/lib/rkube/agent"
    )]
    pub kubelet_dir: PathBuf,
    /// Stop this node's pods when rkube stops (by default they keep running, and a restarted
    /// kubelet adopts them).
    #[arg(long, env = "RKUBE_STOP_PODS_ON_EXIT")]
    pub stop_pods_on_exit: bool,
    /// Hard eviction thresholds, as upstream's kubelet takes them.
    #[arg(
        long,
        env = "RKUBE_EVICTION_HARD",
        default_value = "memory.available<100Mi,nodefs.available<10%"
    )]
    pub eviction_hard: String,
    /// A directory of pod manifests run as static pods (default: <node dir>/pod-manifests).
    #[arg(long, env = "RKUBE_POD_MANIFEST_PATH")]
    pub pod_manifest_path: Option<PathBuf>,
    /// The cluster DNS address pods are given (default: the `kube-system/kube-dns` Service's).
    #[arg(long, env = "RKUBE_CLUSTER_DNS")]
    pub cluster_dns: Option<IpAddr>,
    /// The cluster's DNS domain.
    #[arg(long, env = "RKUBE_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

impl NodeArgs {
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(hostname)
    }

    /// The proxy's options for the node whose directory is `dir`: its table is named after
    /// that directory, so that nodes of two clusters on one machine never share one.
    pub fn proxy_options(&self, dir: &Path, cluster_cidr: Option<String>) -> proxy::Options {
        proxy::Options {
            node_name: self.node_name(),
            table: format!("rkube-{}", kubelet::containerd::tag(dir)),
            cluster_cidr,
        }
    }

    /// The kubelet's options; `dir` overrides --kubelet-dir.
    pub fn options(&self, dir: Option<PathBuf>) -> Result<kubelet::Options> {
        Ok(kubelet::Options {
            node_name: self.node_name(),
            dir: dir.unwrap_or_else(|| self.kubelet_dir.clone()),
            runtime_endpoint: self.container_runtime_endpoint.clone(),
            insecure_registries: self.insecure_registry.clone(),
            node_ip: self.node_ip,
            port: self.kubelet_port,
            labels: Vec::new(),
            stop_pods_on_exit: self.stop_pods_on_exit,
            client_ca_pem: None,
            eviction_hard: kubelet::eviction::Thresholds::parse(&self.eviction_hard)
                .map_err(|e| anyhow::anyhow!("--eviction-hard: {e}"))?,
            pod_manifest_path: self.pod_manifest_path.clone(),
            cluster_dns: self.cluster_dns,
            cluster_domain: self.cluster_domain.clone(),
        })
    }

    /// Why this machine cannot run a kubelet, if it cannot (no runtime to supervise).
    pub fn missing_runtime(&self) -> Option<String> {
        if self.container_runtime_endpoint.is_some() {
            return None;
        }
        kubelet::containerd::missing().map(|m| format!("{m} not installed"))
    }
}

/// The controller manager's flags (in `rkube server` and `rkube controller-manager`).
#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// The range node pod CIDRs (/24 each) are allocated from.
    #[arg(long, env = "RKUBE_CLUSTER_CIDR", default_value = controllers::DEFAULT_CLUSTER_CIDR)]
    pub cluster_cidr: String,
    /// How long a node may go unheard before its Ready condition becomes Unknown (`50s`, `1m`).
    #[arg(long, env = "RKUBE_NODE_MONITOR_GRACE_PERIOD", default_value = "50s", value_parser = parse_duration)]
    pub node_monitor_grace_period: std::time::Duration,
    /// How often node health is checked.
    #[arg(long, env = "RKUBE_NODE_MONITOR_PERIOD", default_value = "5s", value_parser = parse_duration)]
    pub node_monitor_period: std::time::Duration,
    /// Nodes per second tainted for eviction in a healthy zone.
    #[arg(long, env = "RKUBE_NODE_EVICTION_RATE", default_value_t = 0.1)]
    pub node_eviction_rate: f64,
    /// Nodes per second in a partially disrupted zone larger than --large-cluster-size-threshold.
    #[arg(
        long,
        env = "RKUBE_SECONDARY_NODE_EVICTION_RATE",
        default_value_t = 0.01
    )]
    pub secondary_node_eviction_rate: f64,
    /// The share of not-ready nodes (at least 3) that makes a zone partially disrupted.
    #[arg(long, env = "RKUBE_UNHEALTHY_ZONE_THRESHOLD", default_value_t = 0.55)]
    pub unhealthy_zone_threshold: f64,
    /// Zones with more nodes than this slow eviction down instead of stopping it when
    /// partially disrupted.
    #[arg(long, env = "RKUBE_LARGE_CLUSTER_SIZE_THRESHOLD", default_value_t = 50)]
    pub large_cluster_size_threshold: usize,
}

impl ControllerArgs {
    pub fn config(&self) -> anyhow::Result<controllers::Config> {
        Ok(controllers::Config {
            cluster_cidr: controllers::nodeipam::ClusterCidr::parse(&self.cluster_cidr, 24)
                .map_err(|e| anyhow::anyhow!("--cluster-cidr {e}"))?,
            node_lifecycle: controllers::nodelifecycle::Settings {
                grace_period: self.node_monitor_grace_period,
                monitor_period: self.node_monitor_period,
                eviction_rate: self.node_eviction_rate,
                secondary_eviction_rate: self.secondary_node_eviction_rate,
                unhealthy_zone_threshold: self.unhealthy_zone_threshold,
                large_cluster_threshold: self.large_cluster_size_threshold,
            },
        })
    }
}

/// `300ms`, `5s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 50s)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// TLS towards etcd (https endpoints).
#[derive(Args, Debug, Clone, Default)]
pub struct DatastoreTls {
    /// PEM CA bundle that verifies the etcd members.
    #[arg(long, env = "RKUBE_DATASTORE_CAFILE")]
    pub datastore_cafile: Option<PathBuf>,
    /// PEM client certificate for etcd.
    #[arg(long, env = "RKUBE_DATASTORE_CERTFILE")]
    pub datastore_certfile: Option<PathBuf>,
    /// PEM key of the client certificate for etcd.
    #[arg(long, env = "RKUBE_DATASTORE_KEYFILE")]
    pub datastore_keyfile: Option<PathBuf>,
}

/// Where the data lives: the embedded store (a path) or an etcd cluster.
pub enum Datastore {
    Sqlite(PathBuf),
    Etcd(store::EtcdConfig),
}

/// Parse `--datastore-endpoint` and the etcd TLS flags.
pub fn datastore(endpoint: Option<&str>, data_dir: &Path, tls: &DatastoreTls) -> Result<Datastore> {
    let cafile = tls.datastore_cafile.as_deref();
    let certfile = tls.datastore_certfile.as_deref();
    let keyfile = tls.datastore_keyfile.as_deref();
    match endpoint {
        None => Ok(Datastore::Sqlite(data_dir.join("db").join("state.db"))),
        Some(ep) if ep.starts_with("sqlite://") => {
            Ok(Datastore::Sqlite(PathBuf::from(&ep["sqlite://".len()..])))
        }
        Some(ep) if ep.starts_with("http://") || ep.starts_with("https://") => {
            let mut config = store::EtcdConfig::from_url(ep)
                .map_err(|e| anyhow::anyhow!("--datastore-endpoint {ep}: {e}"))?;
            if ep.starts_with("http://") && (cafile.is_some() || certfile.is_some()) {
                bail!("--datastore-cafile/--datastore-certfile need an https:// endpoint");
            }
            config.ca_file = cafile.map(Path::to_path_buf);
            config.cert_file = certfile.map(Path::to_path_buf);
            config.key_file = keyfile.map(Path::to_path_buf);
            Ok(Datastore::Etcd(config))
        }
        Some(ep) => {
            bail!("--datastore-endpoint {ep}: expected sqlite://PATH or http(s)://HOST:PORT[,HOST:PORT...]")
        }
    }
}

/// Open the datastore (connecting to etcd and checking that it answers).
pub async fn open_datastore(ds: Datastore) -> Result<Arc<dyn Store>> {
    match ds {
        Datastore::Sqlite(path) => {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let store = store::SqliteStore::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok(Arc::new(store))
        }
        Datastore::Etcd(config) => {
            let endpoints = config.endpoints.join(",");
            let store = store::EtcdStore::connect(config)
                .await
                .with_context(|| format!("connecting to etcd at {endpoints}"))?;
            Ok(Arc::new(store))
        }
    }
}

async fn open_store(args: &ServerArgs) -> Result<Arc<dyn Store>> {
    let ds = datastore(
        args.datastore_endpoint.as_deref(),
        &args.data_dir,
        &args.datastore_tls,
    )?;
    open_datastore(ds).await
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The server's data dir (its embedded store is the default source).
    #[arg(long, env = "RKUBE_DATA_DIR", default_value = "/var/lib/rkube")]
    pub data_dir: PathBuf,
    /// The source, as `--datastore-endpoint` takes it (default: the data dir's embedded store).
    #[arg(long)]
    pub from: Option<String>,
    /// The target etcd cluster: `http(s)://HOST:PORT[,HOST:PORT...]`; it must hold no keys.
    #[arg(long)]
    pub to: String,
    #[command(flatten)]
    pub datastore_tls: DatastoreTls,
}

/// `rkube migrate`: copy, advance, compact, verify.
pub async fn migrate(args: MigrateArgs) -> Result<()> {
    let from = datastore(
        args.from.as_deref(),
        &args.data_dir,
        &DatastoreTls::default(),
    )?;
    if let Datastore::Sqlite(path) = &from {
        if !path.exists() {
            bail!("no embedded store at {}", path.display());
        }
    }
    let to = datastore(Some(&args.to), &args.data_dir, &args.datastore_tls)?;
    if !matches!(to, Datastore::Etcd(_)) {
        bail!(
            "--to {}: the target must be an etcd cluster (http(s)://)",
            args.to
        );
    }
    let source = open_datastore(from).await?;
    let target = open_datastore(to).await?;
    let say = |m: &str| println!("rkube migrate: {m}");
    let report = store::migrate::migrate(source, target, &say)
        .await
        .context("migration")?;
    println!(
        "rkube migrate: done: {} keys moved; start the server with --datastore-endpoint {}",
        report.keys, args.to
    );
    Ok(())
}

pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

/// Who the components inside `rkube server` act as: the identity of the admin certificate
/// (CN=admin, O=system:masters) that the kubeconfig they used to read holds.
fn in_process_user() -> apiserver::UserInfo {
    apiserver::UserInfo {
        name: "admin".into(),
        groups: vec!["system:masters".into(), "system:authenticated".into()],
    }
}

fn kubeconfig(server: &str, pki: &certs::Pki) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: rkube\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: rkube\n  context:\n    cluster: rkube\n    user: admin\ncurrent-context: rkube\n",
        b64(&pki.ca_pem),
        b64(&pki.admin_cert_pem),
        b64(&pki.admin_key_pem)
    )
}

fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    Ok(())
}

fn ensure_token(data_dir: &Path) -> Result<()> {
    let path = data_dir.join("token");
    if !path.exists() {
        let bytes: [u8; 16] = rand::random();
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_atomic(&path, &format!("{token}\n"))?;
    }
    Ok(())
}

pub async fn run(args: ServerArgs) -> Result<()> {
    for d in &args.disable {
        if !COMPONENTS.contains(&d.as_str()) {
            bail!(
                "--disable {d}: unknown component (expected any of {})",
                COMPONENTS.join(", ")
            );
        }
    }
    let service_network = apiserver::ServiceNetwork::parse(
        &args.service_cluster_ip_range,
        &args.service_node_port_range,
    )
    .map_err(|e| anyhow::anyhow!("--service-cluster-ip-range/--service-node-port-range: {e}"))?;
    fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let store = open_store(&args).await?;

    let mut addresses = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V4(service_network.nth(1)),
    ];
    if !args.bind_address.is_unspecified() && !addresses.contains(&args.bind_address) {
        addresses.push(args.bind_address);
    }
    let mut names = vec![
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ];
    let host = hostname();
    if !names.contains(&host) && !host.is_empty() {
        names.push(host);
    }
    let pki = certs::ensure(&args.data_dir, &addresses, &names)?;

    let addr = SocketAddr::new(args.bind_address, args.port);
    let compaction = std::time::Duration::from_secs(args.compaction_interval_seconds.max(1));
    let signer = apiserver::TokenSigner::load_or_create(
        &args.data_dir.join("tls").join("service-account.key"),
    )?;
    let api = apiserver::ApiServer::start(
        store,
        addr,
        pki.serving.clone(),
        compaction,
        signer,
        service_network.clone(),
    )
    .await
    .with_context(|| format!("starting the API server on {addr}"))?;
    api.publish_self(advertise_address(args.bind_address))
        .await
        .context("publishing the kubernetes Service")?;
    let host_for_clients = if args.bind_address.is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        args.bind_address
    };
    let url = format!(
        "https://{}",
        SocketAddr::new(host_for_clients, api.local_addr.port())
    );
    let kubeconfig_path = args.data_dir.join("kubeconfig.yaml");
    write_atomic(&kubeconfig_path, &kubeconfig(&url, &pki))?;
    ensure_token(&args.data_dir)?;
    api.accept_node_token(&fs::read_to_string(args.data_dir.join("token"))?);
    api.set_kubelet_client(&pki.kubelet_client_cert_pem, &pki.kubelet_client_key_pem)?;

    publish_root_ca(&kubeconfig_path, &pki.ca_pem).await?;

    // Components after the API server, each reaching it only through its handler: in this
    // process, without a connection (`crate::local_client`), as the kubeconfig's admin.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut components = Vec::new();
    if !args.disable.iter().any(|d| d == "controller-manager") {
        let local = api.local(in_process_user());
        let mut stop = stop_rx.clone();
        let config = args.controllers.config()?;
        components.push(on_own_thread("controller-manager", move || async move {
            let client = crate::local_client(local);
            controllers::run(client, config, async move {
                let _ = stop.changed().await;
            })
            .await
        })?);
    }
    if !args.disable.iter().any(|d| d == "scheduler") {
        let local = api.local(in_process_user());
        let mut stop = stop_rx.clone();
        components.push(on_own_thread("scheduler", move || async move {
            let client = crate::local_client(local);
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            crate::run_scheduler(client, scheduler::Configuration::default(), shutdown).await;
        })?);
    }
    // Cluster DNS before the kubelet, so that the first pods already get it.
    let dns_ip = service_network.nth(10);
    let dns_enabled = !args.disable.iter().any(|d| d == "dns");
    if dns_enabled {
        let node_ip = args
            .node
            .node_ip
            .unwrap_or_else(|| advertise_address(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        // The port the last run had, if it is still free: connections pods made to the
        // kube-dns Service (UDP conntrack entries included) keep working across a restart.
        let port_file = args.data_dir.join("dns-port");
        let last: u16 = fs::read_to_string(&port_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        let server = match dns::DnsServer::bind(SocketAddr::new(node_ip, last)).await {
            Ok(s) => s,
            Err(_) => dns::DnsServer::bind(SocketAddr::new(node_ip, 0))
                .await
                .with_context(|| format!("binding cluster DNS on {node_ip}"))?,
        };
        write_atomic(&port_file, &format!("{}\n", server.addr.port()))?;
        publish_dns(&kubeconfig_path, dns_ip, server.addr).await?;
        let client = crate::local_client(api.local(in_process_user()));
        let mut stop = stop_rx.clone();
        let domain = args.node.cluster_domain.clone();
        let upstreams =
            dns::nameservers(&fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        components.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = server.run(client, &domain, upstreams, shutdown).await {
                tracing::error!(error = %e, "cluster DNS stopped");
            }
        }));
    }
    if !args.disable.iter().any(|d| d == "kubelet") {
        match args.node.missing_runtime() {
            Some(why) => tracing::warn!(
                "no kubelet on this machine: {why} (install containerd, runc and containernetworking-plugins, or pass --container-runtime-endpoint)"
            ),
            None => {
                let client = crate::local_client(api.local(in_process_user()));
                let mut stop = stop_rx.clone();
                let mut opts = args.node.options(Some(args.data_dir.join("agent")))?;
                opts.client_ca_pem = Some(pki.ca_pem.clone());
                if dns_enabled && opts.cluster_dns.is_none() {
                    opts.cluster_dns = Some(IpAddr::V4(dns_ip));
                }
                opts.labels
                    .push(("node-role.kubernetes.io/control-plane".into(), "true".into()));
                components.push(tokio::spawn(async move {
                    let shutdown = async move {
                        let _ = stop.changed().await;
                    };
                    if let Err(e) = kubelet::run(client, opts, shutdown).await {
                        tracing::error!(error = %e, "kubelet stopped");
                    }
                }));
            }
        }
    }
    if !args.disable.iter().any(|d| d == "proxy") {
        let client = crate::local_client(api.local(in_process_user()));
        let opts = args.node.proxy_options(
            &args.data_dir.join("agent"),
            Some(args.controllers.cluster_cidr.clone()),
        );
        components.extend(spawn_proxy(client, opts, stop_rx.clone()));
    }
    println!(
        "rkube: ready: kubeconfig {} (API server {url})",
        kubeconfig_path.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = stop_tx.send(true);
    for c in components {
        let _ = c.await;
    }
    api.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Run a component (the controller manager, the scheduler) on a thread of its own, with a
/// single-threaded runtime, as its own process would (`rkube controller-manager` and `rkube
/// scheduler` also run on one worker thread). The kernel then shares the cores between the
/// component and the API server's workers; on the API server's runtime the component's tasks
/// would queue behind every request's, and the stages of a burst would starve each other: the
/// controllers' pod creations took the CPU while the scheduler and its bindings waited (the
/// first tenth of a 10,000-pod burst available after 2-3 s instead of 1; BENCHMARKS.md,
/// `deployments`). Finishes, for the caller to await, when the component returns.
fn on_own_thread<F, Fut>(name: &str, run: F) -> Result<tokio::task::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let component = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run()),
                Err(e) => {
                    tracing::error!(%component, error = %e, "cannot start the component's runtime")
                }
            }
            let _ = done_tx.send(());
        })
        .with_context(|| format!("starting the {name}'s thread"))?;
    Ok(tokio::spawn(async move {
        let _ = done_rx.await;
    }))
}

/// The `kube-system/kube-dns` Service (the range's tenth address, port 53 over UDP and TCP)
/// and its endpoints: this server's DNS at `at`. Applied, so a restart re-points them.
async fn publish_dns(kubeconfig: &Path, ip: Ipv4Addr, at: SocketAddr) -> Result<()> {
    use k8s_openapi::api::core::v1::{Endpoints, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, Patch, PatchParams};
    use serde_json::json;
    let client = crate::client_from_kubeconfig(kubeconfig).await?;
    let pp = PatchParams::apply("rkube-server").force();
    let (host, port) = (at.ip().to_string(), at.port());
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
        "spec": {"clusterIP": ip.to_string(), "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": port},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": port}]},
    });
    let eps = json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kube-dns", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": host}], "ports": [
            {"name": "dns", "port": port, "protocol": "UDP"},
            {"name": "dns-tcp", "port": port, "protocol": "TCP"}]}],
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kube-dns-rkube", "labels": {
            "kubernetes.io/service-name": "kube-dns",
            "endpointslice.kubernetes.io/managed-by": "rkube-server"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [host], "conditions": {"ready": true, "serving": true, "terminating": false}}],
        "ports": [{"name": "dns", "port": port, "protocol": "UDP"},
                  {"name": "dns-tcp", "port": port, "protocol": "TCP"}],
    });
    Api::<Service>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns", &pp, &Patch::Apply(svc))
        .await
        .context("publishing kube-system/kube-dns")?;
    Api::<Endpoints>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns", &pp, &Patch::Apply(eps))
        .await
        .context("publishing the kube-dns Endpoints")?;
    Api::<EndpointSlice>::namespaced(client, "kube-system")
        .patch("kube-dns-rkube", &pp, &Patch::Apply(slice))
        .await
        .context("publishing the kube-dns EndpointSlice")?;
    Ok(())
}

/// `kube-system/kube-root-ca.crt` (`ca.crt`: the cluster CA), which agents read to know whom
/// to trust for calls to their kubelet.
async fn publish_root_ca(kubeconfig: &Path, ca_pem: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams};
    let client = crate::client_from_kubeconfig(kubeconfig).await?;
    let cms: Api<ConfigMap> = Api::namespaced(client, "kube-system");
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kube-root-ca.crt"},
        "data": {"ca.crt": ca_pem},
    });
    cms.patch(
        "kube-root-ca.crt",
        &PatchParams::apply("rkube-server").force(),
        &Patch::Apply(cm),
    )
    .await
    .context("publishing kube-system/kube-root-ca.crt")?;
    Ok(())
}

/// The address other hosts reach this server at: the bind address, or (bound to every
/// address) the source address of the default route, or loopback without one.
fn advertise_address(bind: IpAddr) -> IpAddr {
    if !bind.is_unspecified() {
        return bind;
    }
    // Connecting a UDP socket sends nothing; it only picks the route's source address.
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| {
            s.connect("192.0.2.1:9")?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// The proxy as a task that stops when `stop` turns true; None (with a warning) when this
/// machine cannot run it.
pub fn spawn_proxy(
    client: kube::Client,
    opts: proxy::Options,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if let Some(why) = proxy::unavailable() {
        tracing::warn!("no service proxy on this node: {why}");
        return None;
    }
    Some(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = proxy::run(client, opts, shutdown).await {
            tracing::error!(error = %e, "proxy stopped");
        }
    }))
}
