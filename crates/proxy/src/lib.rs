//! kube-proxy: Services and EndpointSlices in, a data plane out.
//!
//! Two watches feed one cache; each change marks its Service dirty and wakes the sync loop,
//! which renders only the dirty Services' ports ([`model`]) and applies the difference to the
//! nftables table ([`nft`]) in one transaction. The first sync, and any sync after a failed
//! one, rebuilds the whole table in one transaction. On shutdown the table is deleted: the
//! proxy never touches rules outside it.

pub mod model;
pub mod nft;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;

use model::ServicePort;
use nft::{Context, Rendered, Txn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the transaction: {0}")]
    Refused(String),
}

/// Where transactions go: `nft -f -` in production, a recorder in unit tests.
pub trait Backend: Send + 'static {
    fn apply(&mut self, script: &str) -> Result<(), Error>;
}

/// Applies transactions with the `nft` program.
pub struct Nft;

impl Backend for Nft {
    fn apply(&mut self, script: &str) -> Result<(), Error> {
        use std::io::Write;
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(Error::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(Error::Spawn)?;
        }
        let out = child.wait_with_output().map_err(Error::Spawn)?;
        if out.status.success() {
            Ok(())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(Error::Refused(err.chars().take(2000).collect()))
        }
    }
}

/// The programmed state and how to change it.
pub struct Dataplane<B> {
    ctx: Context,
    backend: B,
    /// Service port id → what it installed.
    applied: BTreeMap<String, Rendered>,
    /// Hairpin IP → how many Service ports have it as a local endpoint.
    hairpin: BTreeMap<Ipv4Addr, usize>,
    /// Whether the table is believed to match `applied` (false: the next sync is a full one).
    in_sync: bool,
}

impl<B: Backend> Dataplane<B> {
    pub fn new(ctx: Context, backend: B) -> Self {
        Dataplane {
            ctx,
            backend,
            applied: BTreeMap::new(),
            hairpin: BTreeMap::new(),
            in_sync: false,
        }
    }

    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Rebuild the whole table for `ports`, in one transaction.
    pub fn sync_full(&mut self, ports: &[ServicePort]) -> Result<(), Error> {
        let rendered: BTreeMap<String, Rendered> = ports
            .iter()
            .map(|sp| (sp.id.clone(), nft::render(&self.ctx, sp)))
            .collect();
        let all: Vec<&Rendered> = rendered.values().collect();
        let script = nft::full(&self.ctx, &all);
        self.in_sync = false;
        self.backend.apply(&script)?;
        let mut hairpin = BTreeMap::new();
        for ip in rendered
            .values()
            .flat_map(|r| nft::hairpin_of(std::iter::once(r)))
        {
            *hairpin.entry(ip).or_insert(0) += 1;
        }
        self.applied = rendered;
        self.hairpin = hairpin;
        self.in_sync = true;
        Ok(())
    }

    /// Apply the ports of changed Services (`namespace/name` → its ports now; empty: gone)
    /// in one transaction. Nothing to change: no transaction.
    pub fn update(&mut self, services: &[(String, Vec<ServicePort>)]) -> Result<(), Error> {
        let t = self.ctx.table.clone();
        let mut txn = Txn::new(&t);
        let mut next: Vec<(String, Option<Rendered>)> = Vec::new();
        let mut hairpin = self.hairpin.clone();
        let empty = Rendered::default();
        for (key, ports) in services {
            let prefix = format!("{key}/");
            let old_ids: Vec<String> = self
                .applied
                .range(prefix.clone()..)
                .take_while(|(id, _)| id.starts_with(&prefix))
                .map(|(id, _)| id.clone())
                .collect();
            let new: BTreeMap<&str, Rendered> = ports
                .iter()
                .map(|sp| (sp.id.as_str(), nft::render(&self.ctx, sp)))
                .collect();
            for id in &old_ids {
                if !new.contains_key(id.as_str()) {
                    let old = &self.applied[id];
                    txn.change(old, &empty);
                    unref(&mut hairpin, old);
                    next.push((id.clone(), None));
                }
            }
            for (id, r) in new {
                let old = self.applied.get(id).unwrap_or(&empty);
                if *old == r {
                    continue;
                }
                txn.change(old, &r);
                unref(&mut hairpin, old);
                for ip in &nft::hairpin_of(std::iter::once(&r)) {
                    *hairpin.entry(*ip).or_insert(0) += 1;
                }
                next.push((id.to_string(), Some(r)));
            }
        }
        let before: BTreeSet<Ipv4Addr> = self.hairpin.keys().copied().collect();
        let after: BTreeSet<Ipv4Addr> = hairpin.keys().copied().collect();
        txn.hairpin(&before, &after);
        let script = txn.finish();
        if script.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.backend.apply(&script) {
            self.in_sync = false;
            return Err(e);
        }
        for (id, r) in next {
            match r {
                Some(r) => self.applied.insert(id, r),
                None => self.applied.remove(&id),
            };
        }
        self.hairpin = hairpin;
        Ok(())
    }

    /// Remove the table and everything in it.
    pub fn cleanup(&mut self) -> Result<(), Error> {
        let t = &self.ctx.table;
        self.in_sync = false;
        self.applied.clear();
        self.hairpin.clear();
        self.backend
            .apply(&format!("add table ip {t}\ndelete table ip {t}\n"))
    }
}

fn unref(hairpin: &mut BTreeMap<Ipv4Addr, usize>, r: &Rendered) {
    for ip in nft::hairpin_of(std::iter::once(r)) {
        if let Some(n) = hairpin.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                hairpin.remove(&ip);
            }
        }
    }
}

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The node this proxy programs (its endpoints are the local ones).
    pub node_name: String,
    /// The nftables table to own (one per proxy on a machine).
    pub table: String,
    /// The pod range traffic counts as local from; None: the node's podCIDR.
    pub cluster_cidr: Option<String>,
}

/// What the watches have seen.
#[derive(Default)]
struct Cache {
    services: HashMap<String, Arc<Service>>,
    /// Service key → slice name → slice.
    slices: HashMap<String, HashMap<String, Arc<EndpointSlice>>>,
    dirty: HashSet<String>,
    services_synced: bool,
    slices_synced: bool,
}

impl Cache {
    fn ports(&self, key: &str, node: &str) -> Vec<ServicePort> {
        let Some(svc) = self.services.get(key) else {
            return Vec::new();
        };
        let slices: Vec<&EndpointSlice> = self
            .slices
            .get(key)
            .map(|m| m.values().map(|s| s.as_ref()).collect())
            .unwrap_or_default();
        model::service_ports(svc, &slices, node)
    }
}

fn svc_key(ns: Option<&str>, name: &str) -> String {
    format!("{}/{name}", ns.unwrap_or_default())
}

fn slice_service(s: &EndpointSlice) -> Option<String> {
    let name = s
        .metadata
        .labels
        .as_ref()?
        .get("kubernetes.io/service-name")?;
    Some(svc_key(s.metadata.namespace.as_deref(), name))
}

/// Run until `shutdown`, then remove the table.
pub async fn run(
    client: kube::Client,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let local_cidr = match &opts.cluster_cidr {
        Some(c) => Some(c.clone()),
        None => node_pod_cidr(&client, &opts.node_name).await,
    };
    if local_cidr.is_none() {
        tracing::warn!(node = %opts.node_name, "no pod range known: all traffic to Services from this node is masqueraded");
    }
    let ctx = Context {
        table: opts.table.clone(),
        local_cidr,
    };
    let cache = Arc::new(Mutex::new(Cache::default()));
    let wake = Arc::new(tokio::sync::Notify::new());
    let svc_task = tokio::spawn(watch_services(
        Api::all(client.clone()),
        cache.clone(),
        wake.clone(),
    ));
    let slice_task = tokio::spawn(watch_slices(Api::all(client), cache.clone(), wake.clone()));
    let plane = Arc::new(Mutex::new(Dataplane::new(ctx, Nft)));
    let node = opts.node_name.clone();
    let sync = sync_loop(cache, wake, plane.clone(), node);
    tokio::select! {
        _ = shutdown => {}
        _ = sync => {}
    }
    svc_task.abort();
    slice_task.abort();
    let res = tokio::task::spawn_blocking(move || lock(&plane).cleanup()).await?;
    if let Err(e) = res {
        tracing::warn!(error = %e, "removing the proxy's nftables table");
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node's podCIDR, waiting up to 30 s for node IPAM to give one.
async fn node_pod_cidr(client: &kube::Client, node: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(n)) = nodes.get_opt(node).await {
            if let Some(c) = n.spec.and_then(|s| s.pod_cidr) {
                return Some(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

async fn sync_loop(
    cache: Arc<Mutex<Cache>>,
    wake: Arc<tokio::sync::Notify>,
    plane: Arc<Mutex<Dataplane<Nft>>>,
    node: String,
) {
    loop {
        wake.notified().await;
        let work = {
            let mut c = lock(&cache);
            if !(c.services_synced && c.slices_synced) {
                continue;
            }
            let in_sync = lock(&plane).in_sync();
            if in_sync {
                let dirty: Vec<String> = c.dirty.drain().collect();
                Work::Update(
                    dirty
                        .into_iter()
                        .map(|k| {
                            let ports = c.ports(&k, &node);
                            (k, ports)
                        })
                        .collect(),
                )
            } else {
                c.dirty.clear();
                let keys: Vec<&String> = c.services.keys().collect();
                Work::Full(keys.iter().flat_map(|k| c.ports(k, &node)).collect())
            }
        };
        let plane = plane.clone();
        let started = Instant::now();
        let res = tokio::task::spawn_blocking(move || {
            let mut p = lock(&plane);
            match &work {
                Work::Full(ports) => p.sync_full(ports).map(|_| ("full", ports.len())),
                Work::Update(svcs) => p.update(svcs).map(|_| ("partial", svcs.len())),
            }
        })
        .await;
        match res {
            Ok(Ok((kind, n))) => {
                tracing::debug!(kind, n, elapsed = ?started.elapsed(), "proxy sync")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "proxy sync failed; rebuilding the table");
                tokio::time::sleep(Duration::from_millis(500)).await;
                wake.notify_one();
            }
            Err(e) => tracing::error!(error = %e, "proxy sync panicked"),
        }
    }
}

enum Work {
    Full(Vec<ServicePort>),
    Update(Vec<(String, Vec<ServicePort>)>),
}

async fn watch_services(
    api: Api<Service>,
    cache: Arc<Mutex<Cache>>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut fresh: Option<HashMap<String, Arc<Service>>> = None;
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        let mut c = lock(&cache);
        match ev {
            Event::Init => fresh = Some(HashMap::new()),
            Event::InitApply(s) => {
                let k = svc_key(
                    s.metadata.namespace.as_deref(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                );
                if let Some(f) = fresh.as_mut() {
                    f.insert(k, Arc::new(s));
                }
            }
            Event::InitDone => {
                let f = fresh.take().unwrap_or_default();
                let keys: HashSet<String> = c.services.keys().chain(f.keys()).cloned().collect();
                c.dirty.extend(keys);
                c.services = f;
                c.services_synced = true;
            }
            Event::Apply(s) => {
                let k = svc_key(
                    s.metadata.namespace.as_deref(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                );
                c.dirty.insert(k.clone());
                c.services.insert(k, Arc::new(s));
            }
            Event::Delete(s) => {
                let k = svc_key(
                    s.metadata.namespace.as_deref(),
                    s.metadata.name.as_deref().unwrap_or_default(),
                );
                c.dirty.insert(k.clone());
                c.services.remove(&k);
            }
        }
        drop(c);
        wake.notify_one();
    }
}

async fn watch_slices(
    api: Api<EndpointSlice>,
    cache: Arc<Mutex<Cache>>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    type Slices = HashMap<String, HashMap<String, Arc<EndpointSlice>>>;
    let mut fresh: Option<Slices> = None;
    let put = |m: &mut Slices, s: EndpointSlice| -> Option<String> {
        let k = slice_service(&s)?;
        let name = s.metadata.name.clone().unwrap_or_default();
        m.entry(k.clone()).or_default().insert(name, Arc::new(s));
        Some(k)
    };
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        let mut c = lock(&cache);
        match ev {
            Event::Init => fresh = Some(HashMap::new()),
            Event::InitApply(s) => {
                if let Some(f) = fresh.as_mut() {
                    put(f, s);
                }
            }
            Event::InitDone => {
                let f = fresh.take().unwrap_or_default();
                let keys: HashSet<String> = c.slices.keys().chain(f.keys()).cloned().collect();
                c.dirty.extend(keys);
                c.slices = f;
                c.slices_synced = true;
            }
            Event::Apply(s) => {
                // A slice may have moved to another Service: drop it from wherever it was.
                let name = s.metadata.name.clone().unwrap_or_default();
                let ns = s.metadata.namespace.clone().unwrap_or_default();
                let mut touched = Vec::new();
                for (k, m) in c.slices.iter_mut() {
                    if k.starts_with(&format!("{ns}/")) && m.remove(&name).is_some() {
                        touched.push(k.clone());
                    }
                }
                c.dirty.extend(touched);
                if let Some(k) = put(&mut c.slices, s) {
                    c.dirty.insert(k);
                }
            }
            Event::Delete(s) => {
                if let Some(k) = slice_service(&s) {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    if let Some(m) = c.slices.get_mut(&k) {
                        m.remove(&name);
                        if m.is_empty() {
                            c.slices.remove(&k);
                        }
                    }
                    c.dirty.insert(k);
                }
            }
        }
        drop(c);
        wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::Endpoint;

    #[derive(Default)]
    struct Recorder(Vec<String>, bool);

    impl Backend for Recorder {
        fn apply(&mut self, script: &str) -> Result<(), Error> {
            if self.1 {
                return Err(Error::Refused("no".into()));
            }
            self.0.push(script.to_string());
            Ok(())
        }
    }

    fn sp(name: &str, eps: &[&str]) -> ServicePort {
        ServicePort {
            id: format!("ns/{name}/tcp/80"),
            cluster_ip: "10.43.0.9".parse().unwrap(),
            protocol: "tcp",
            port: 80,
            node_port: None,
            affinity_seconds: None,
            external_local: false,
            internal_local: false,
            endpoints: eps
                .iter()
                .map(|ip| Endpoint {
                    ip: ip.parse().unwrap(),
                    port: 80,
                    local: true,
                })
                .collect(),
        }
    }

    fn plane() -> Dataplane<Recorder> {
        Dataplane::new(
            Context {
                table: "t".into(),
                local_cidr: None,
            },
            Recorder::default(),
        )
    }

    #[test]
    fn updates_are_incremental_and_hairpins_counted() {
        let mut p = plane();
        p.sync_full(&[sp("a", &["10.42.0.2"]), sp("ab", &["10.42.0.2"])])
            .unwrap();
        assert!(p.in_sync());
        // Service "a" loses its endpoint: only a's chain and elements change; the hairpin
        // element stays, "ab" still has that endpoint.
        p.update(&[("ns/a".into(), vec![sp("a", &[])])]).unwrap();
        let last = p.backend().0.last().unwrap().clone();
        assert!(last.contains("delete chain ip t svc-ns/a/tcp/80"), "{last}");
        assert!(!last.contains("ns/ab/"), "{last}");
        assert!(!last.contains("hairpin"), "{last}");
        // "ab" goes: its hairpin element goes with it.
        p.update(&[("ns/ab".into(), vec![])]).unwrap();
        let last = p.backend().0.last().unwrap().clone();
        assert!(
            last.contains("delete element ip t hairpin { 10.42.0.2 . 10.42.0.2 }"),
            "{last}"
        );
        // Nothing changed: no transaction.
        let n = p.backend().0.len();
        p.update(&[("ns/ab".into(), vec![])]).unwrap();
        assert_eq!(p.backend().0.len(), n);
    }

    #[test]
    fn a_failed_update_asks_for_a_full_sync() {
        let mut p = plane();
        p.sync_full(&[]).unwrap();
        p.backend.1 = true;
        assert!(p
            .update(&[("ns/a".into(), vec![sp("a", &["10.42.0.2"])])])
            .is_err());
        assert!(!p.in_sync());
    }
}
