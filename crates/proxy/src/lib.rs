//! kube-proxy: Services and EndpointSlices in, a data plane out.
//!
//! A [`ServiceCache`] (two watches) marks each changed Service dirty and wakes the sync loop,
//! which renders only the dirty Services' ports ([`model`]) and applies the difference to the
//! nftables tables ([`nft`]) in one transaction, sent over netlink ([`nfnl`]); then it deletes
//! the UDP flows left pointing at removed endpoints ([`conntrack`]). The first sync, and any
//! sync after a failed one, rebuilds every table in one transaction. On shutdown the tables
//! are deleted: the proxy never touches rules outside them.

pub mod conntrack;
pub mod model;
pub mod nfnl;
pub mod nft;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use servicecache::ServiceCache;

use model::ServicePort;
use nft::{Context, Op, Rendered, Txn};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("talking to nf_tables over netlink: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("nf_tables refused the transaction: {0}")]
    Refused(String),
}

/// Where transactions go: the kernel over netlink in production, a recorder in unit tests.
pub trait Backend: Send + 'static {
    /// Apply `ops` as one transaction: all or nothing.
    fn apply(&mut self, ops: &[Op]) -> Result<(), Error>;
    /// Whether the table is (still) in the kernel.
    fn has_table(&mut self, _table: &str) -> bool {
        true
    }
    /// Delete the conntrack entries `stale` matches; how many went.
    fn flush_conntrack(&mut self, _stale: &conntrack::Stale) -> Result<usize, Error> {
        Ok(0)
    }
}

/// Applies transactions as nf_tables netlink batches.
#[derive(Default)]
pub struct Netlink {
    sock: Option<nfnl::Socket>,
}

impl Netlink {
    fn socket(&mut self) -> Result<&mut nfnl::Socket, Error> {
        if self.sock.is_none() {
            self.sock = Some(nfnl::Socket::open().map_err(Error::Netlink)?);
        }
        Ok(self.sock.as_mut().expect("just opened"))
    }
}

impl Backend for Netlink {
    fn apply(&mut self, ops: &[Op]) -> Result<(), Error> {
        let (batch, origin) = nft::batch(ops);
        let res = self.socket()?.send(batch);
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(refusal)) => {
                let op = (refusal.seq as usize)
                    .checked_sub(1)
                    .and_then(|i| origin.get(i))
                    .map(|i| {
                        let line = ops[*i].to_string();
                        line.chars().take(500).collect::<String>()
                    })
                    .unwrap_or_else(|| format!("message {}", refusal.seq));
                Err(Error::Refused(format!(
                    "{op}: {}",
                    std::io::Error::from_raw_os_error(refusal.errno)
                )))
            }
            Err(e) => {
                // A broken socket is opened anew next time.
                self.sock = None;
                Err(Error::Netlink(e))
            }
        }
    }

    fn flush_conntrack(&mut self, stale: &conntrack::Stale) -> Result<usize, Error> {
        const AF_INET: u8 = 2;
        let res = self.socket().and_then(|s| {
            let dump = s
                .dump(
                    nfnl::NFNL_SUBSYS_CTNETLINK,
                    nfnl::IPCTNL_MSG_CT_GET,
                    AF_INET,
                )
                .map_err(Error::Netlink)?;
            let doomed: Vec<Vec<u8>> = dump
                .iter()
                .filter_map(|m| conntrack::parse(m))
                .filter(|e| stale.matches(e))
                .map(|e| conntrack::delete_request(&e))
                .collect();
            s.requests(
                nfnl::NFNL_SUBSYS_CTNETLINK,
                nfnl::IPCTNL_MSG_CT_DELETE,
                AF_INET,
                &doomed,
            )
            .map_err(Error::Netlink)
        });
        if res.is_err() {
            self.sock = None;
        }
        res
    }

    fn has_table(&mut self, table: &str) -> bool {
        let res = match self.socket() {
            Ok(s) => s.has_table(table),
            Err(_) => return true,
        };
        match res {
            Ok(found) => found,
            // Cannot tell: assume it is there rather than rebuild in a loop.
            Err(_) => {
                self.sock = None;
                true
            }
        }
    }
}

/// Why this machine cannot run the proxy, if it cannot: nf_tables must answer over netlink
/// (the kernel module, and CAP_NET_ADMIN).
pub fn unavailable() -> Option<String> {
    let probe = nfnl::Socket::open().and_then(|mut s| s.has_table("rkube-probe"));
    probe
        .err()
        .map(|e| format!("nf_tables does not answer over netlink: {e}"))
}

/// The programmed state and how to change it.
pub struct Dataplane<B> {
    ctx: Context,
    backend: B,
    /// Service port id → what it installed.
    applied: BTreeMap<String, Rendered>,
    /// UDP Service port id → the port as last applied (for conntrack clean-up).
    udp: BTreeMap<String, ServicePort>,
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
            udp: BTreeMap::new(),
            hairpin: BTreeMap::new(),
            in_sync: false,
        }
    }

    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// If a table went missing (someone flushed the ruleset), the next sync is a full one.
    /// Returns whether one did.
    pub fn check(&mut self) -> bool {
        if self.in_sync && !self.ctx.tables().iter().all(|t| self.backend.has_table(t)) {
            self.in_sync = false;
            return true;
        }
        false
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
        let ops = nft::full(&self.ctx, &all);
        self.in_sync = false;
        self.backend.apply(&ops)?;
        // What changed since the last sync this proxy made (none at start: flows that
        // outlived a restart are left alone).
        let udp: BTreeMap<String, ServicePort> = ports
            .iter()
            .filter(|sp| conntrack::concerns(sp))
            .map(|sp| (sp.id.clone(), sp.clone()))
            .collect();
        let mut stale = conntrack::Stale::default();
        if !self.applied.is_empty() {
            for (id, old) in &self.udp {
                stale.add(Some(old), udp.get(id));
            }
            for (id, sp) in &udp {
                if !self.udp.contains_key(id) {
                    stale.add(None, Some(sp));
                }
            }
        }
        self.udp = udp;
        self.flush_conntrack(&stale);
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
        let mut txn = Txn::new(&self.ctx);
        let mut next: Vec<(String, Option<(Rendered, &ServicePort)>)> = Vec::new();
        let mut hairpin = self.hairpin.clone();
        let mut stale = conntrack::Stale::default();
        let empty = Rendered::default();
        for (key, ports) in services {
            let prefix = format!("{key}/");
            let old_ids: Vec<String> = self
                .applied
                .range(prefix.clone()..)
                .take_while(|(id, _)| id.starts_with(&prefix))
                .map(|(id, _)| id.clone())
                .collect();
            let new: BTreeMap<&str, (Rendered, &ServicePort)> = ports
                .iter()
                .map(|sp| (sp.id.as_str(), (nft::render(&self.ctx, sp), sp)))
                .collect();
            for id in &old_ids {
                if !new.contains_key(id.as_str()) {
                    let old = &self.applied[id];
                    txn.change(old, &empty);
                    unref(&mut hairpin, old);
                    stale.add(self.udp.get(id), None);
                    next.push((id.clone(), None));
                }
            }
            for (id, (r, sp)) in new {
                let old = self.applied.get(id).unwrap_or(&empty);
                if *old == r {
                    continue;
                }
                txn.change(old, &r);
                unref(&mut hairpin, old);
                for ip in &nft::hairpin_of(std::iter::once(&r)) {
                    *hairpin.entry(*ip).or_insert(0) += 1;
                }
                stale.add(self.udp.get(id), Some(sp));
                next.push((id.to_string(), Some((r, sp))));
            }
        }
        let before: BTreeSet<Ipv4Addr> = self.hairpin.keys().copied().collect();
        let after: BTreeSet<Ipv4Addr> = hairpin.keys().copied().collect();
        txn.hairpin(&before, &after);
        let ops = txn.finish();
        if ops.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.backend.apply(&ops) {
            self.in_sync = false;
            return Err(e);
        }
        for (id, r) in next {
            match r {
                Some((r, sp)) => {
                    if conntrack::concerns(sp) {
                        self.udp.insert(id.clone(), sp.clone());
                    }
                    self.applied.insert(id, r);
                }
                None => {
                    self.applied.remove(&id);
                    self.udp.remove(&id);
                }
            };
        }
        self.hairpin = hairpin;
        self.flush_conntrack(&stale);
        Ok(())
    }

    /// Best effort: a flow left pointing at a dead endpoint times out on its own.
    fn flush_conntrack(&mut self, stale: &conntrack::Stale) {
        if stale.is_empty() {
            return;
        }
        match self.backend.flush_conntrack(stale) {
            Ok(n) => tracing::debug!(deleted = n, "stale UDP conntrack entries"),
            Err(e) => tracing::warn!(error = %e, "deleting stale UDP conntrack entries"),
        }
    }

    /// Remove the tables and everything in them.
    pub fn cleanup(&mut self) -> Result<(), Error> {
        self.in_sync = false;
        self.applied.clear();
        self.udp.clear();
        self.hairpin.clear();
        self.backend.apply(&nft::remove(&self.ctx))
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

/// Run until `shutdown`, then remove the table.
pub async fn run(
    client: kube::Client,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let local_cidr = match &opts.cluster_cidr {
        Some(c) => Some(c.clone()),
        None => tokio::select! {
            c = node_pod_cidr(&client, &opts.node_name) => c,
            _ = &mut shutdown => return Ok(()),
        },
    };
    if local_cidr.is_none() {
        tracing::warn!(node = %opts.node_name, "no pod range known: all traffic to Services from this node is masqueraded");
    }
    let local_cidr = local_cidr.and_then(|c| match c.parse() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "the pod range is unusable: all traffic to Services from this node is masqueraded");
            None
        }
    });
    let ctx = Context {
        table: opts.table.clone(),
        local_cidr,
    };
    let cache = ServiceCache::start(client, true);
    let plane = Arc::new(Mutex::new(Dataplane::new(ctx, Netlink::default())));
    let sync = sync_loop(cache.clone(), plane.clone(), opts.node_name.clone());
    tokio::select! {
        _ = shutdown => {}
        _ = sync => {}
    }
    drop(cache);
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

/// The ports of the Service `key` as the cache has it now.
fn ports_of(cache: &ServiceCache, key: &str, node: &str) -> Vec<ServicePort> {
    let Some(svc) = cache.service(key) else {
        return Vec::new();
    };
    let slices = cache.slices(key);
    let refs: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
    model::service_ports(&svc, &refs, node)
}

/// How often the proxy checks that its table is still there.
const CHECK_EVERY: Duration = Duration::from_secs(10);

async fn sync_loop(cache: Arc<ServiceCache>, plane: Arc<Mutex<Dataplane<Netlink>>>, node: String) {
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cache.changed() => {}
            _ = check.tick() => {
                let p = plane.clone();
                let lost = tokio::task::spawn_blocking(move || lock(&p).check()).await.unwrap_or(false);
                if !lost {
                    continue;
                }
                tracing::warn!("the proxy's nftables table is gone; rebuilding it");
            }
        }
        if !cache.synced() {
            continue;
        }
        let dirty = cache.take_dirty();
        let work = if lock(&plane).in_sync() {
            Work::Update(
                dirty
                    .into_iter()
                    .map(|k| {
                        let ports = ports_of(&cache, &k, &node);
                        (k, ports)
                    })
                    .collect(),
            )
        } else {
            Work::Full(
                cache
                    .service_keys()
                    .iter()
                    .flat_map(|k| ports_of(&cache, k, &node))
                    .collect(),
            )
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
                cache.poke();
            }
            Err(e) => tracing::error!(error = %e, "proxy sync panicked"),
        }
    }
}

enum Work {
    Full(Vec<ServicePort>),
    Update(Vec<(String, Vec<ServicePort>)>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::Endpoint;

    #[derive(Default)]
    struct Recorder(Vec<String>, bool);

    impl Backend for Recorder {
        fn apply(&mut self, ops: &[Op]) -> Result<(), Error> {
            if self.1 {
                return Err(Error::Refused("no".into()));
            }
            self.0.push(nft::script(ops));
            Ok(())
        }
    }

    fn sp(name: &str, eps: &[&str]) -> ServicePort {
        let eps = eps
            .iter()
            .map(|ip| Endpoint {
                ip: ip.parse().unwrap(),
                port: 80,
                local: true,
            })
            .collect();
        ServicePort::new(
            format!("ns/{name}/tcp/80"),
            "10.43.0.9".parse().unwrap(),
            "tcp",
            80,
            eps,
        )
    }

    #[test]
    fn a_missing_table_asks_for_a_full_sync() {
        struct Gone;
        impl Backend for Gone {
            fn apply(&mut self, _: &[Op]) -> Result<(), Error> {
                Ok(())
            }
            fn has_table(&mut self, _: &str) -> bool {
                false
            }
        }
        let mut p = Dataplane::new(
            Context {
                table: "t".into(),
                local_cidr: None,
            },
            Gone,
        );
        assert!(!p.check(), "nothing to lose before the first sync");
        p.sync_full(&[]).unwrap();
        assert!(p.check());
        assert!(!p.in_sync());
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
        let shard = nft::shard_of("ns/a");
        assert!(
            last.contains(&format!("delete chain ip t-{shard} svc-ns/a/tcp/80")),
            "{last}"
        );
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
