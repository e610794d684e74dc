//! rkube-bench: commands that start a real `rkube server` and print figures for BENCHMARKS.md.
//! Benchmarks measure; they assert nothing (tests do that).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
}

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Server {
    fn start(bin: &PathBuf) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(bin)
            .args(["server", "--port", "0", "--data-dir"])
            .arg(dir.path())
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
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
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
    let server = Server::start(&bin)?;
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
            let bin = match rkube {
                Some(b) => b,
                None => std::env::current_exe()?.with_file_name("rkube"),
            };
            api_bench(bin, pods, clients, watchers, lists).await
        }
    }
}
