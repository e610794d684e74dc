//! rkube-bench: commands that start a real `rkube server` and print figures for BENCHMARKS.md.
//! Benchmarks measure; they assert nothing (tests do that).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod podstartup;
mod proxysync;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};

#[derive(Parser)]
#[command(name = "rkube-bench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create N pods in `default` through an existing cluster's kubeconfig (for profiling).
    Fill {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        pods: usize,
        #[arg(long, default_value_t = 16)]
        clients: usize,
    },
    /// API server and embedded store: creates/s, single-object latency under load, LIST, watch
    /// delivery, memory.
    Api {
        /// The rkube binary (default: next to this one).
        #[arg(long)]
        rkube: Option<PathBuf>,
        /// Pods to create in total (the LIST is measured over all of them).
        #[arg(long, default_value_t = 100_000)]
        pods: usize,
        /// Concurrent creating clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Concurrent watchers for the delivery measurement.
        #[arg(long, default_value_t = 1000)]
        watchers: usize,
        /// LIST repetitions.
        #[arg(long, default_value_t = 10)]
        lists: usize,
    },
    /// Scheduler throughput and latency on upstream's scheduler_perf workloads, against
    /// `rkube server` with the embedded store; a pod counts as scheduled when its binding is
    /// stored (seen through a watch).
    Scheduler {
        /// The rkube binary (default: next to this one).
        #[arg(long)]
        rkube: Option<PathBuf>,
        /// Which workloads: basic, affinity, antiaffinity, podaffinity, spread, preemption (comma
        /// list), or all.
        #[arg(long, default_value = "all")]
        workloads: String,
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        /// Create every pod first with the scheduler stopped, then start `rkube scheduler` and
        /// time it alone (measures the scheduler, not the API's create rate).
        #[arg(long)]
        precreate: bool,
    },
    /// Controller throughput on hollow nodes: N Deployments x R replicas created at once; pods
    /// created and reported available per second; the hollow-nodes process's memory per node.
    Deployments {
        /// The rkube binary (default: next to this one).
        #[arg(long)]
        rkube: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        deployments: usize,
        #[arg(long, default_value_t = 10)]
        replicas: usize,
        #[arg(long, default_value_t = 5000)]
        nodes: usize,
        /// Concurrent creating clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Run the controller manager and the scheduler as their own processes, to report the
        /// CPU time of each component.
        #[arg(long)]
        split: bool,
    },
    /// Pod startup latency (creation to all containers started, seen through a watch, image
    /// cached) on a real `rkube kubelet` with containerd: N pods one after another, then a
    /// burst; and the kubelet's memory.
    PodStartup {
        /// The rkube binary (default: next to this one).
        #[arg(long)]
        rkube: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        sequential: usize,
        #[arg(long, default_value_t = 30)]
        burst: usize,
    },
    /// The proxy's nftables data plane alone (root; `nft` only to count what was listed): a
    /// whole sync of S Services x E endpoints in one transaction, then single endpoint
    /// changes (replaced, then removed or added back) one at a time.
    ProxySync {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Whole syncs to time (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Network programming latency on a real kubelet and `rkube proxy`: from a pod seen Ready
    /// to its Service answering on this machine, one pod (and Service) after another.
    ProxyLatency {
        /// The rkube binary (default: next to this one).
        #[arg(long)]
        rkube: Option<PathBuf>,
        #[arg(long, default_value_t = 30)]
        pods: usize,
    },
    /// The embedded store and Debian's etcd side by side, same workload through the same API
    /// server: durable writes/s at 1 and 64 clients, reads/s, watch delivery latency.
    Datastores {
        /// The rkube binary (default: next to this one).
        #[arg(long)]
        rkube: Option<PathBuf>,
        /// Seconds per measured phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Server {
    fn start(bin: &PathBuf) -> Result<Server> {
        Server::start_with(bin, &[])
    }

    fn start_with(bin: &PathBuf, extra: &[&str]) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(bin)
            .args(["server", "--port", "0", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("rkube: ready") => break,
                Some(_) => continue,
                None => bail!("server exited before it was ready"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let kubeconfig = dir.path().join("kubeconfig.yaml");
        Ok(Server {
            child,
            _dir: dir,
            kubeconfig,
        })
    }

    fn rss_mib(&self) -> f64 {
        rss_mib_of(self.child.id())
    }

    async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn pod(i: usize) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i:06}"), "labels": {"app": "bench", "shard": (i % 16).to_string()}},
        "spec": {"containers": [{"name": "c", "image": "registry.local/busybox:1.36", "command": ["sleep", "3600"],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}, "ports": [{"containerPort": 8080}]}]},
    }))
    .expect("pod")
}

async fn api_bench(
    bin: PathBuf,
    pods: usize,
    clients: usize,
    watchers: usize,
    lists: usize,
) -> Result<()> {
    // The API server and its store alone: no scheduler writing conditions and events for the
    // (node-less) pods this creates.
    let server = Server::start_with(&bin, &["--disable", "scheduler"])?;
    let client = server.client().await?;
    // Let start-up settle, then measure idle memory.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods_api.list(&ListParams::default().limit(1)).await?;
    let idle_rss = server.rss_mib();

    // Phase 1: creates with N clients, one more client doing get+update on one object.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let probe: ConfigMap = serde_json::from_value(
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}, "data": {"n": "0"}}),
    )?;
    cms.create(&PostParams::default(), &probe).await?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let c = server.client().await?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let api: Api<Pod> = Api::namespaced(c, "default");
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= pods {
                    return Ok::<_, kube::Error>(());
                }
                api.create(&PostParams::default(), &pod(i)).await?;
            }
        }));
    }
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe_task = {
        let c = server.client().await?;
        let done = done.clone();
        tokio::spawn(async move {
            let api: Api<ConfigMap> = Api::namespaced(c, "default");
            let (mut gets, mut updates) = (Vec::new(), Vec::new());
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                let mut cm = api.get("probe").await?;
                gets.push(t.elapsed());
                let n: u64 = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get("n"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                cm.data = Some([("n".to_string(), (n + 1).to_string())].into());
                let t = Instant::now();
                api.replace("probe", &PostParams::default(), &cm).await?;
                updates.push(t.elapsed());
            }
            Ok::<_, kube::Error>((gets, updates))
        })
    };
    // The create rate over the first 20k pods is the throughput figure (the rest fills the store).
    let first = pods.min(20_000);
    let mut rate_at_first = None;
    while next.load(std::sync::atomic::Ordering::SeqCst) < pods {
        if rate_at_first.is_none() && next.load(std::sync::atomic::Ordering::SeqCst) >= first {
            rate_at_first = Some(first as f64 / start.elapsed().as_secs_f64());
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for t in tasks {
        t.await??;
    }
    let total = start.elapsed();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut gets, mut updates) = probe_task.await??;
    let creates_per_s = rate_at_first.unwrap_or(pods as f64 / total.as_secs_f64());
    println!("creates: {pods} pods with {clients} clients in {:.1}s; first {first}: {creates_per_s:.0} creates/s (durable: synchronous=FULL)", total.as_secs_f64());
    println!("single-object under create load: get p50 {:.2} ms p99 {:.2} ms ({} samples); update p50 {:.2} ms p99 {:.2} ms", pct(&mut gets, 0.5), pct(&mut gets, 0.99), gets.len(), pct(&mut updates, 0.5), pct(&mut updates, 0.99));

    // Phase 2: LIST all pods: request to last byte, as raw JSON (the client's own decoding is
    // the client's cost, measured apart).
    let mut list_times = Vec::new();
    let mut size = 0;
    for _ in 0..lists {
        let t = Instant::now();
        let req = http::Request::get("/api/v1/namespaces/default/pods").body(Vec::new())?;
        let body = client.request_text(req).await?;
        list_times.push(t.elapsed());
        size = body.len();
    }
    let t = Instant::now();
    let l = pods_api.list(&ListParams::default()).await?;
    let typed = t.elapsed();
    if l.items.len() != pods {
        bail!("LIST returned {} pods, expected {pods}", l.items.len());
    }
    println!(
        "LIST {pods} pods ({:.1} MB): p50 {:.0} ms p99 {:.0} ms ({lists} runs, to last byte); with kube-rs decoding to typed Pods: {:.0} ms",
        size as f64 / 1e6,
        pct(&mut list_times, 0.5),
        pct(&mut list_times, 0.99),
        typed.as_secs_f64() * 1000.0
    );
    let full_rss = server.rss_mib();
    // Freed list buffers go back to the system after the allocator's decay time.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let settled_rss = server.rss_mib();

    // Phase 3: watch delivery to many watchers.
    let ns = "default";
    let mut ready = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let rv = cms
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let epoch = Instant::now();
    let conns = 50usize;
    let mut watch_clients = Vec::new();
    for _ in 0..conns {
        watch_clients.push(server.client().await?);
    }
    for w in 0..watchers {
        let api: Api<ConfigMap> = Api::namespaced(watch_clients[w % conns].clone(), ns);
        let tx = tx.clone();
        let rv = rv.clone();
        let (rtx, rrx) = tokio::sync::oneshot::channel::<()>();
        ready.push(rrx);
        tokio::spawn(async move {
            let params = WatchParams::default().labels("bench=watch").timeout(290);
            let Ok(stream) = api.watch(&params, &rv).await else {
                return;
            };
            let _ = rtx.send(());
            record_deliveries(stream, epoch, tx).await;
        });
    }
    for r in ready {
        let _ = r.await;
    }
    let events = 100usize;
    for i in 0..events {
        let t = epoch.elapsed().as_micros() as u64;
        let cm: ConfigMap = serde_json::from_value(
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("w-{i}"), "labels": {"bench": "watch"}}, "data": {"t": t.to_string()}}),
        )?;
        cms.create(&PostParams::default(), &cm).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lat.len() < events * watchers && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(d)) => lat.push(d),
            _ => break,
        }
    }
    println!(
        "watch: {events} events to {watchers} watchers: {} deliveries, create-call→delivery p50 {:.1} ms p99 {:.1} ms",
        lat.len(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    println!(
        "server RSS: idle {idle_rss:.1} MiB; with {pods} pods: right after the LISTs {full_rss:.1} MiB, 15 s later {settled_rss:.1} MiB; with {watchers} watchers {:.1} MiB",
        server.rss_mib()
    );
    Ok(())
}

/// For each ADDED event, how long after its `data.t` (microseconds since `epoch`) it arrived.
async fn record_deliveries(
    stream: impl futures::Stream<Item = kube::Result<WatchEvent<ConfigMap>>>,
    epoch: Instant,
    tx: tokio::sync::mpsc::UnboundedSender<Duration>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(Ok(ev)) = stream.next().await {
        if let WatchEvent::Added(cm) = ev {
            let sent: u64 = cm
                .data
                .as_ref()
                .and_then(|d| d.get("t"))
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            let now = epoch.elapsed().as_micros() as u64;
            let _ = tx.send(Duration::from_micros(now.saturating_sub(sent)));
        }
    }
}

/// One backend's figures.
#[derive(Default, Debug)]
struct StoreFigures {
    writes_1: f64,
    writes_64: f64,
    reads_64: f64,
    watch_p50: f64,
    watch_p99: f64,
}

/// Create ConfigMaps from `clients` clients for `secs`; returns acknowledged creates per second.
async fn write_rate(server: &Server, prefix: &str, clients: usize, secs: u64) -> Result<f64> {
    let client = server.client().await?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("{prefix}-{c}-{n}")},
                    "data": {"k": "v".repeat(200)},
                }))
                .expect("configmap");
                api.create(&PostParams::default(), &cm).await?;
                n += 1;
            }
            Ok::<_, kube::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn store_figures(server: &Server, secs: u64) -> Result<StoreFigures> {
    let mut f = StoreFigures {
        writes_1: write_rate(server, "one", 1, secs).await?,
        writes_64: write_rate(server, "many", 64, secs).await?,
        ..Default::default()
    };
    // Reads: GETs of objects that exist, from 64 clients (linearizable on both stores).
    let client = server.client().await?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..64usize {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                api.get(&format!("many-{c}-{}", n % 10)).await?;
                n += 1;
            }
            Ok::<_, kube::Error>(n)
        }));
    }
    let mut reads = 0;
    for t in tasks {
        reads += t.await??;
    }
    f.reads_64 = reads as f64 / start.elapsed().as_secs_f64();
    // Watch delivery: one watcher, 200 creates at about 50/s, create call → event received.
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let rv = api
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let epoch = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let wapi = api.clone();
    let stream = wapi
        .watch(
            &WatchParams::default().labels("bench=watch").timeout(290),
            &rv,
        )
        .await?;
    tokio::spawn(record_deliveries(stream, epoch, tx));
    let events = 200;
    for i in 0..events {
        let t = epoch.elapsed().as_micros() as u64;
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("watch-{i}"), "labels": {"bench": "watch"}},
            "data": {"t": t.to_string()},
        }))?;
        api.create(&PostParams::default(), &cm).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut lat = Vec::new();
    while lat.len() < events {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(d)) => lat.push(d),
            _ => break,
        }
    }
    f.watch_p50 = pct(&mut lat, 0.5);
    f.watch_p99 = pct(&mut lat, 0.99);
    Ok(f)
}

async fn datastores_bench(bin: PathBuf, secs: u64) -> Result<()> {
    let etcd_dir = tempfile::tempdir()?;
    let etcd = store::testing::EtcdCluster::start(etcd_dir.path(), 1)?;
    let version = Command::new("etcd").arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    println!(
        "datastores: same workload through rkube's API server; {secs} s per phase; etcd: {}",
        version.lines().next().unwrap_or("?")
    );
    let embedded = {
        let server = Server::start(&bin)?;
        store_figures(&server, secs).await?
    };
    let on_etcd = {
        let server = Server::start_with(&bin, &["--datastore-endpoint", &etcd.endpoint()])?;
        store_figures(&server, secs).await?
    };
    println!("| measure | embedded (SQLite, synchronous=FULL) | etcd 1 member (default fsync) | embedded / etcd |");
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, a: f64, b: f64, unit: &str| {
        println!("| {name} | {a:.0} {unit} | {b:.0} {unit} | {:.2}x |", a / b);
    };
    row(
        "durable creates, 1 client",
        embedded.writes_1,
        on_etcd.writes_1,
        "/s",
    );
    row(
        "durable creates, 64 clients",
        embedded.writes_64,
        on_etcd.writes_64,
        "/s",
    );
    row(
        "GETs, 64 clients",
        embedded.reads_64,
        on_etcd.reads_64,
        "/s",
    );
    println!(
        "| watch delivery p50 / p99 | {:.1} / {:.1} ms | {:.1} / {:.1} ms | |",
        embedded.watch_p50, embedded.watch_p99, on_etcd.watch_p50, on_etcd.watch_p99
    );
    Ok(())
}

/// One scheduler_perf-style workload.
struct Workload {
    name: &'static str,
    nodes: usize,
    init_pods: usize,
    measured_pods: usize,
    /// Node labels by index.
    node_labels: fn(usize) -> serde_json::Value,
    /// Extra pod spec for the initial and the measured pods.
    init_spec: fn(usize) -> serde_json::Value,
    measured_spec: fn(usize) -> serde_json::Value,
    node_cpu: &'static str,
    pod_cpu: &'static str,
}

fn zone_labels(i: usize) -> serde_json::Value {
    serde_json::json!({"kubernetes.io/hostname": format!("node-{i}"), "topology.kubernetes.io/zone": format!("zone-{}", i % 10)})
}

fn no_spec(_: usize) -> serde_json::Value {
    serde_json::json!({})
}

fn workloads(nodes: usize) -> Vec<Workload> {
    vec![
        Workload {
            name: "basic",
            nodes,
            init_pods: 1000,
            measured_pods: 10_000,
            node_labels: zone_labels,
            init_spec: no_spec,
            measured_spec: no_spec,
            node_cpu: "4",
            pod_cpu: "100m",
        },
        Workload {
            name: "affinity",
            nodes,
            init_pods: 1000,
            measured_pods: 5000,
            node_labels: zone_labels,
            init_spec: no_spec,
            measured_spec: |_| serde_json::json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["zone-0", "zone-1", "zone-2", "zone-3", "zone-4"]}]}]}}}}),
            node_cpu: "4",
            pod_cpu: "100m",
        },
        Workload {
            name: "antiaffinity",
            nodes,
            init_pods: 1000,
            measured_pods: 1000,
            node_labels: zone_labels,
            init_spec: |_| serde_json::json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"color": "green"}}}]}}}),
            measured_spec: |_| serde_json::json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"color": "green"}}}]}}}),
            node_cpu: "4",
            pod_cpu: "100m",
        },
        Workload {
            name: "podaffinity",
            nodes,
            init_pods: 1000,
            measured_pods: 5000,
            node_labels: zone_labels,
            init_spec: no_spec,
            measured_spec: |_| serde_json::json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "topology.kubernetes.io/zone", "labelSelector": {"matchLabels": {"color": "green"}}}]}}}),
            node_cpu: "4",
            pod_cpu: "100m",
        },
        Workload {
            name: "spread",
            nodes,
            init_pods: 1000,
            measured_pods: 5000,
            node_labels: zone_labels,
            init_spec: no_spec,
            measured_spec: |_| serde_json::json!({"topologySpreadConstraints": [{"maxSkew": 5, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"color": "green"}}}]}),
            node_cpu: "4",
            pod_cpu: "100m",
        },
        Workload {
            name: "preemption",
            nodes: 500,
            // Low-priority pods fill every node (4 per node); each measured pod preempts one.
            init_pods: 2000,
            measured_pods: 500,
            node_labels: zone_labels,
            init_spec: |_| serde_json::json!({"priorityClassName": "bench-low"}),
            measured_spec: |_| serde_json::json!({"priorityClassName": "bench-high"}),
            node_cpu: "4",
            pod_cpu: "1",
        },
    ]
}

/// Create `n` objects from `clients` concurrent tasks.
async fn create_many<K, F>(api: Api<K>, n: usize, clients: usize, make: F) -> Result<Vec<Instant>>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: Fn(usize) -> K + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let times = Arc::new(std::sync::Mutex::new(vec![Instant::now(); n]));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (api, make, next, times) = (api.clone(), make.clone(), next.clone(), times.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return Ok::<_, kube::Error>(());
                }
                let obj = make(i);
                let t = Instant::now();
                api.create(&PostParams::default(), &obj).await?;
                times.lock().unwrap()[i] = t;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let times = times.lock().unwrap().clone();
    Ok(times)
}

async fn run_workload(bin: &PathBuf, w: &Workload, precreate: bool) -> Result<()> {
    let disable = if precreate {
        "controller-manager,scheduler"
    } else {
        "controller-manager"
    };
    let server = Server::start_with(bin, &["--disable", disable])?;
    let client = server.client().await?;
    if w.name == "preemption" {
        let pcs: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(client.clone());
        for (name, value) in [("bench-low", 10), ("bench-high", 1000)] {
            pcs.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({
                "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value}))?).await?;
        }
    }
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let (labels, cpu) = (w.node_labels, w.node_cpu);
    create_many(nodes, w.nodes, 32, move |i| {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{i}"), "labels": labels(i)},
            "status": {"capacity": {"cpu": cpu, "memory": "32Gi", "pods": "110"},
                       "allocatable": {"cpu": cpu, "memory": "32Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("node")
    })
    .await?;

    // Watch bindings: a pod is scheduled when its nodeName is stored.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let bound: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let rv = pods
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    {
        let (pods, bound) = (pods.clone(), bound.clone());
        tokio::spawn(async move {
            let mut rv = rv;
            loop {
                let Ok(stream) = pods.watch(&WatchParams::default().timeout(290), &rv).await else {
                    return;
                };
                let mut stream = std::pin::pin!(stream);
                while let Some(Ok(ev)) = stream.next().await {
                    if let WatchEvent::Added(p) | WatchEvent::Modified(p) = ev {
                        rv = p.metadata.resource_version.clone().unwrap_or_default();
                        if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                            let name = p.metadata.name.clone().unwrap_or_default();
                            bound
                                .lock()
                                .unwrap()
                                .entry(name)
                                .or_insert_with(Instant::now);
                        }
                    }
                }
            }
        });
    }
    // No kubelet: finish graceful deletions (preemption victims) as a kubelet would.
    if w.name == "preemption" {
        let pods = pods.clone();
        tokio::spawn(async move {
            let Ok(stream) = pods.watch(&WatchParams::default().timeout(290), "0").await else {
                return;
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(ev)) = stream.next().await {
                if let WatchEvent::Modified(p) = ev {
                    if p.metadata.deletion_timestamp.is_some() {
                        let name = p.metadata.name.clone().unwrap_or_default();
                        let _ = pods
                            .delete(&name, &kube::api::DeleteParams::default().grace_period(0))
                            .await;
                    }
                }
            }
        });
    }
    let pod_cpu = w.pod_cpu;
    let make = |prefix: &'static str, spec: fn(usize) -> serde_json::Value| {
        move |i: usize| -> Pod {
            let mut s = serde_json::json!({"containers": [{"name": "c", "image": "registry.local/pause:3.9",
                "resources": {"requests": {"cpu": pod_cpu, "memory": "64Mi"}}}]});
            if let (Some(m), serde_json::Value::Object(extra)) = (s.as_object_mut(), spec(i)) {
                m.extend(extra);
            }
            serde_json::from_value(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{prefix}-{i}"), "labels": {"color": "green"}}, "spec": s}))
            .expect("pod")
        }
    };
    let wait_bound = |prefix: &'static str, n: usize, within: Duration| {
        let bound = bound.clone();
        async move {
            let deadline = Instant::now() + within;
            loop {
                let count = bound
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|k| k.starts_with(prefix))
                    .count();
                if count >= n || Instant::now() > deadline {
                    return count;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    create_many(pods.clone(), w.init_pods, 32, make("init", w.init_spec)).await?;
    let mut scheduler = None;
    let (init_bound, start, created, created_in) = if precreate {
        let created = create_many(
            pods.clone(),
            w.measured_pods,
            64,
            make("measured", w.measured_spec),
        )
        .await?;
        let start = Instant::now();
        scheduler = Some(
            Command::new(bin)
                .args(["scheduler", "--kubeconfig"])
                .arg(&server.kubeconfig)
                .env("RUST_LOG", "warn")
                .spawn()?,
        );
        let init_bound = wait_bound("init-", w.init_pods, Duration::from_secs(300)).await;
        // Latency is meaningless here (pods waited for the scheduler to start): from its start.
        (
            init_bound,
            start,
            vec![start; created.len()],
            Duration::ZERO,
        )
    } else {
        let init_bound = wait_bound("init-", w.init_pods, Duration::from_secs(300)).await;
        let start = Instant::now();
        let created = create_many(
            pods.clone(),
            w.measured_pods,
            64,
            make("measured", w.measured_spec),
        )
        .await?;
        (init_bound, start, created, start.elapsed())
    };
    let n = wait_bound("measured-", w.measured_pods, Duration::from_secs(300)).await;
    let b = bound.lock().unwrap().clone();
    let mut lat = Vec::new();
    let mut last = start;
    for (i, t) in created.iter().enumerate() {
        if let Some(done) = b.get(&format!("measured-{i}")) {
            lat.push(done.saturating_duration_since(*t));
            last = last.max(*done);
        }
    }
    let elapsed = last.saturating_duration_since(start).as_secs_f64();
    println!(
        "| {} | {} | {}/{} | {}/{} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} s |",
        w.name,
        w.nodes,
        init_bound,
        w.init_pods,
        n,
        w.measured_pods,
        n as f64 / elapsed,
        w.measured_pods as f64 / created_in.as_secs_f64().max(f64::MIN_POSITIVE),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        elapsed
    );
    println!(
        "  scheduler+server RSS at the end: {:.0} MiB",
        server.rss_mib()
    );
    if let Some(mut s) = scheduler {
        let _ = s.kill();
        let _ = s.wait();
    }
    Ok(())
}

async fn scheduler_bench(bin: PathBuf, which: &str, nodes: usize, precreate: bool) -> Result<()> {
    println!("| workload | nodes | initial pods bound | measured pods bound | pods/s (bound) | pods/s (created) | latency p50 ms | p99 ms | measured span |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for w in workloads(nodes) {
        if which == "all" || which.split(',').any(|x| x == w.name) {
            run_workload(&bin, &w, precreate).await?;
        }
    }
    Ok(())
}

fn rss_mib_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A pod as the deployments benchmark's watch records it: its name (and resourceVersion, for the
/// watcher) and whether it is Ready. Everything else is skipped while parsing, never built.
#[derive(Clone, Debug)]
struct Sighting {
    metadata: kube::api::ObjectMeta,
    ready: bool,
}

impl<'de> serde::Deserialize<'de> for Sighting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Sighting, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            namespace: Option<String>,
            resource_version: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Condition {
            #[serde(rename = "type")]
            type_: String,
            status: String,
        }
        #[derive(serde::Deserialize, Default)]
        struct Status {
            #[serde(default)]
            conditions: Vec<Condition>,
        }
        #[derive(serde::Deserialize)]
        struct Wire {
            metadata: Meta,
            #[serde(default)]
            status: Status,
        }
        let w = Wire::deserialize(d)?;
        Ok(Sighting {
            metadata: kube::api::ObjectMeta {
                name: w.metadata.name,
                namespace: w.metadata.namespace,
                resource_version: w.metadata.resource_version,
                ..Default::default()
            },
            ready: w
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
        })
    }
}

impl kube::Resource for Sighting {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &kube::api::ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut kube::api::ObjectMeta {
        &mut self.metadata
    }
}

async fn deployments_bench(
    bin: PathBuf,
    deployments: usize,
    replicas: usize,
    nodes: usize,
    clients: usize,
    split: bool,
) -> Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Node;
    // A /24 per node: 5,000 nodes need more than the default /16. The hollow nodes are the
    // nodes: this machine's own kubelet and proxy stay out of the figures.
    let flags = vec![
        "--cluster-cidr",
        "10.0.0.0/8",
        "--disable",
        if split {
            "kubelet,proxy,controller-manager,scheduler"
        } else {
            "kubelet,proxy"
        },
    ];
    let server = Server::start_with(&bin, &flags)?;
    let client = server.client().await?;
    let mut components: Vec<(&str, Child)> = Vec::new();
    if split {
        for (name, extra) in [
            ("controller-manager", vec!["--cluster-cidr", "10.0.0.0/8"]),
            ("scheduler", vec![]),
        ] {
            let child = Command::new(&bin)
                .args([name, "--kubeconfig"])
                .arg(&server.kubeconfig)
                .args(extra)
                .env("RUST_LOG", "warn")
                .spawn()?;
            components.push((name, child));
        }
    }
    // The hollow nodes, all Ready before the clock starts.
    let t0 = Instant::now();
    let mut hollow = Command::new(&bin)
        .args([
            "hollow-nodes",
            "--count",
            &nodes.to_string(),
            "--kubeconfig",
        ])
        .arg(&server.kubeconfig)
        .args(["--max-pods", "250"])
        .env("RUST_LOG", "warn")
        .spawn()?;
    let node_api: Api<Node> = Api::all(client.clone());
    loop {
        // Registered and given a pod CIDR.
        let list = node_api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.as_ref()).is_some())
            .count();
        if ready >= nodes {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("hollow nodes did not register");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let registered = t0.elapsed();
    // Let a lease round pass, then read the hollow process's memory.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let hollow_rss = rss_mib_of(hollow.id());
    println!(
        "hollow nodes: {nodes} registered in {:.1}s; hollow-nodes RSS {hollow_rss:.1} MiB = {:.3} MiB/node",
        registered.as_secs_f64(),
        hollow_rss / nodes as f64
    );

    // Watch pods: first sighting (created) and first Ready (available; minReadySeconds 0).
    // Decoded down to what it records: the benchmark's own watch shares the two cores.
    let pods: Api<Sighting> = Api::namespaced(client.clone(), "default");
    let total = deployments * replicas;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(bool, Instant)>();
    let watch = {
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut ready = std::collections::HashSet::new();
            let mut stream = kube::runtime::watcher(pods, Default::default()).boxed();
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else {
                    continue;
                };
                let objs = match ev {
                    kube::runtime::watcher::Event::Apply(p)
                    | kube::runtime::watcher::Event::InitApply(p) => vec![p],
                    _ => vec![],
                };
                for p in objs {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    if seen.insert(name.clone()) {
                        let _ = tx.send((false, Instant::now()));
                    }
                    if p.ready && ready.insert(name) {
                        let _ = tx.send((true, Instant::now()));
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deploy_api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let requests_before = request_counts(&client).await?;
    let mut procs = vec![
        ("server", server.child.id()),
        ("hollow-nodes", hollow.id()),
        ("benchmark", std::process::id()),
    ];
    for (name, c) in &components {
        procs.push((name, c.id()));
    }
    let cpu_before: Vec<f64> = procs.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let start = Instant::now();
    create_many(deploy_api.clone(), deployments, clients, move |i| {
        serde_json::from_value::<Deployment>(serde_json::json!({
            "metadata": {"name": format!("d{i}")},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"d": format!("d{i}")}},
                     "template": {"metadata": {"labels": {"d": format!("d{i}")}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        }))
        .expect("a deployment")
    })
    .await?;
    let created_deployments = start.elapsed();
    let (mut created, mut available) = (0usize, 0usize);
    let (mut last_created, mut last_available) = (start, start);
    // When each tenth of the pods had been seen created and available.
    let (mut created_at, mut available_at) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(1200);
    while available < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((true, t))) => {
                available += 1;
                last_available = t;
                if available * 10 % total == 0 {
                    available_at.push(t);
                }
            }
            Ok(Some((false, t))) => {
                created += 1;
                last_created = t;
                if created * 10 % total == 0 {
                    created_at.push(t);
                }
            }
            _ => break,
        }
    }
    watch.abort();
    // Every Deployment reports itself available.
    let mut done = 0;
    let t_status = Instant::now();
    while t_status.elapsed() < Duration::from_secs(300) {
        done = deploy_api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|d| {
                d.status.as_ref().and_then(|s| s.available_replicas) == Some(replicas as i32)
            })
            .count();
        if done == deployments {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_reported = start.elapsed();
    let cpu_after: Vec<f64> = procs.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let requests_after = request_counts(&client).await?;
    let secs = |t: Instant| t.duration_since(start).as_secs_f64();
    println!("| deployments x replicas | hollow nodes | deployments created in | pods created | pods/s created | pods available | pods/s available | all Deployments report available after | server RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {deployments} x {replicas} | {nodes} | {:.1}s | {created} in {:.1}s | {:.0} | {available} in {:.1}s | {:.0} | {done}/{deployments} at {:.1}s | {:.0} |",
        created_deployments.as_secs_f64(),
        secs(last_created),
        created as f64 / secs(last_created),
        secs(last_available),
        available as f64 / secs(last_available),
        all_reported.as_secs_f64(),
        server.rss_mib(),
    );
    let tenths = |at: &[Instant]| {
        at.iter()
            .map(|t| format!("{:.1}", secs(*t)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "each tenth of the pods, seconds from the first create: created {}; available {}",
        tenths(&created_at),
        tenths(&available_at)
    );
    println!(
        "CPU seconds since start, RSS: {}",
        procs
            .iter()
            .map(|(n, pid)| format!("{n} {:.1}s {:.0} MiB", cpu_seconds(*pid), rss_mib_of(*pid)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let run: Vec<f64> = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(b, a)| a - b)
        .collect();
    println!(
        "CPU seconds from the first create until every Deployment was available: {} (total {:.1}s = {:.2} ms per pod)",
        procs
            .iter()
            .zip(&run)
            .map(|((n, _), s)| format!("{n} {s:.1}s"))
            .collect::<Vec<_>>()
            .join(", "),
        run.iter().sum::<f64>(),
        run.iter().sum::<f64>() * 1000.0 / total as f64
    );
    print_requests_per_pod(&requests_before, &requests_after, total);
    for (_, mut c) in components {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = hollow.kill();
    let _ = hollow.wait();
    Ok(())
}

/// The server's `apiserver_request_total` counters by label set (its `/metrics`).
async fn request_counts(client: &kube::Client) -> Result<HashMap<String, f64>> {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("apiserver_request_total"))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(labels, v)| Some((labels.to_string(), v.parse().ok()?)))
        .collect())
}

/// API requests made while the benchmark ran, per pod, by verb, resource and code.
fn print_requests_per_pod(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    pods: usize,
) {
    let label = |set: &str, key: &str| {
        set.split(&format!("{key}=\"")[..])
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_default()
            .to_string()
    };
    let mut rows: Vec<(f64, String)> = after
        .iter()
        .map(|(set, n)| (n - before.get(set).copied().unwrap_or(0.0), set))
        .filter(|(n, _)| *n > 0.0)
        .map(|(n, set)| {
            let sub = label(set, "subresource");
            let what = format!(
                "{} {}{}{} {}",
                label(set, "verb"),
                label(set, "resource"),
                if sub.is_empty() { "" } else { "/" },
                sub,
                label(set, "code")
            );
            (n, what)
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = rows.iter().map(|r| r.0).sum();
    println!(
        "API requests while it ran: {total:.0} = {:.1} per pod; per pod: {}",
        total / pods as f64,
        rows.iter()
            .map(|(n, what)| format!("{what} {:.2}", n / pods as f64))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// User + system CPU seconds a process has used (from /proc/<pid>/stat; 100 ticks a second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The rkube binary: as given, or next to this one.
fn rkube_bin(given: Option<PathBuf>) -> Result<PathBuf> {
    match given {
        Some(b) => Ok(b),
        None => Ok(std::env::current_exe()?.with_file_name("rkube")),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Fill {
            kubeconfig,
            pods,
            clients,
        } => {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let config =
                    kube::Config::from_custom_kubeconfig(kc.clone(), &Default::default()).await?;
                let api: Api<Pod> = Api::namespaced(kube::Client::try_from(config)?, "default");
                let next = next.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= pods {
                            return Ok::<_, kube::Error>(());
                        }
                        api.create(&PostParams::default(), &pod(i)).await?;
                    }
                }));
            }
            for t in tasks {
                t.await??;
            }
            println!(
                "created {pods} pods in {:.1}s",
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Api {
            rkube,
            pods,
            clients,
            watchers,
            lists,
        } => {
            let bin = rkube_bin(rkube)?;
            api_bench(bin, pods, clients, watchers, lists).await
        }
        Cmd::Scheduler {
            rkube,
            workloads,
            nodes,
            precreate,
        } => {
            let bin = rkube_bin(rkube)?;
            scheduler_bench(bin, &workloads, nodes, precreate).await
        }
        Cmd::Deployments {
            rkube,
            deployments,
            replicas,
            nodes,
            clients,
            split,
        } => {
            let bin = rkube_bin(rkube)?;
            deployments_bench(bin, deployments, replicas, nodes, clients, split).await
        }
        Cmd::PodStartup {
            rkube,
            sequential,
            burst,
        } => podstartup::run(rkube_bin(rkube)?, sequential, burst).await,
        Cmd::ProxySync {
            services,
            endpoints,
            changes,
            rounds,
        } => proxysync::sync(services, endpoints, changes, rounds),
        Cmd::ProxyLatency { rkube, pods } => proxysync::latency(rkube_bin(rkube)?, pods).await,
        Cmd::Datastores { rkube, seconds } => {
            let bin = rkube_bin(rkube)?;
            datastores_bench(bin, seconds).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sighting_keeps_the_name_and_whether_the_pod_is_ready() {
        let pod = |status: serde_json::Value| {
            serde_json::from_value::<Sighting>(serde_json::json!({
                "metadata": {"name": "p", "namespace": "default", "resourceVersion": "7",
                             "managedFields": [{"manager": "m"}], "labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c"}]},
                "status": status,
            }))
            .unwrap()
        };
        let ready = pod(serde_json::json!({"phase": "Running", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}));
        assert!(ready.ready);
        assert_eq!(ready.metadata.name.as_deref(), Some("p"));
        assert_eq!(ready.metadata.resource_version.as_deref(), Some("7"));
        let not_yet =
            pod(serde_json::json!({"conditions": [{"type": "Ready", "status": "False"}]}));
        assert!(!not_yet.ready);
        assert!(!pod(serde_json::json!({})).ready);
        let bare: Sighting =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "q"}})).unwrap();
        assert!(!bare.ready);
    }
}
