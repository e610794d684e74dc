//! The runtime every workload controller shares: informers (one kube-runtime watcher per kind,
//! a cache indexed by namespace and by controlling owner, and change handlers that see adds,
//! updates and deletes) and work queues (a key is never reconciled by two workers at once; a
//! key added while it is being reconciled runs again afterwards; failures back off per key).
//!
//! Upstream's client-go shared informers and workqueue, in the small.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use apimachinery::slim::Slim;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use serde::de::DeserializeOwned;

/// `namespace/name`, or `name` for cluster-scoped objects: the key queues and caches use.
pub fn key_of<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

/// Split a key made by [`key_of`].
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, key),
    }
}

/// The owner reference with `controller: true`, if any.
pub fn controller_ref<K: Resource>(
    obj: &K,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    obj.meta()
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
}

/// The uid of the owner reference with `controller: true`, if any.
pub fn controller_uid<K: Resource>(obj: &K) -> Option<&str> {
    controller_ref(obj).map(|o| o.uid.as_str())
}

type Handler<K> = Box<dyn Fn(Option<&K>, Option<&K>) + Send + Sync>;

#[derive(Default)]
struct Cache<K> {
    objects: HashMap<String, Arc<K>>,
    by_namespace: HashMap<String, HashSet<String>>,
    by_controller: HashMap<String, HashSet<String>>,
    /// Objects without a controller, by namespace (what a controller may adopt).
    orphans: HashMap<String, HashSet<String>>,
}

impl<K: Resource> Cache<K> {
    fn insert(&mut self, obj: Arc<K>) -> Option<Arc<K>> {
        let key = key_of(&*obj);
        let old = self.remove(&key);
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        self.by_namespace.entry(ns).or_default().insert(key.clone());
        match controller_uid(&*obj) {
            Some(uid) => {
                self.by_controller
                    .entry(uid.to_string())
                    .or_default()
                    .insert(key.clone());
            }
            None => {
                let ns = obj.meta().namespace.clone().unwrap_or_default();
                self.orphans.entry(ns).or_default().insert(key.clone());
            }
        }
        self.objects.insert(key, obj);
        old
    }

    fn remove(&mut self, key: &str) -> Option<Arc<K>> {
        let old = self.objects.remove(key)?;
        let ns = old.meta().namespace.clone().unwrap_or_default();
        if let Some(set) = self.by_namespace.get_mut(&ns) {
            set.remove(key);
            if set.is_empty() {
                self.by_namespace.remove(&ns);
            }
        }
        match controller_uid(&*old) {
            Some(uid) => {
                if let Some(set) = self.by_controller.get_mut(uid) {
                    set.remove(key);
                    if set.is_empty() {
                        self.by_controller.remove(uid);
                    }
                }
            }
            None => {
                if let Some(set) = self.orphans.get_mut(&ns) {
                    set.remove(key);
                    if set.is_empty() {
                        self.orphans.remove(&ns);
                    }
                }
            }
        }
        Some(old)
    }
}

/// A watched, cached kind with change handlers.
pub struct Informer<K: Resource> {
    api: Api<K>,
    config: watcher::Config,
    cache: RwLock<Cache<K>>,
    handlers: Mutex<Vec<Handler<K>>>,
    synced: tokio::sync::watch::Sender<bool>,
    /// Applied to every object before it is cached (besides dropping managedFields).
    trim: fn(&mut K),
}

impl<K> Informer<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// An informer that caches objects as `trim` leaves them: for kinds whose caches are large
    /// (pods), only what its controllers read.
    pub fn trimming(api: Api<K>, config: watcher::Config, trim: fn(&mut K)) -> Arc<Informer<K>> {
        Arc::new(Informer {
            trim,
            api,
            config,
            cache: RwLock::new(Cache {
                objects: HashMap::new(),
                by_namespace: HashMap::new(),
                by_controller: HashMap::new(),
                orphans: HashMap::new(),
            }),
            handlers: Mutex::new(Vec::new()),
            synced: tokio::sync::watch::channel(false).0,
        })
    }

    /// Call `f(old, new)` on every change after the cache has it: `(None, Some)` for an add,
    /// `(Some, Some)` for an update, `(Some, None)` for a delete.
    pub fn on(&self, f: impl Fn(Option<&K>, Option<&K>) + Send + Sync + 'static) {
        self.handlers.lock().unwrap().push(Box::new(f));
    }

    /// `on`, first calling `f(None, Some(obj))` for every object already cached: a late
    /// subscriber sees every object once, then every change, in order (registered under the
    /// handlers' lock, which every change's notification takes after updating the cache).
    pub fn on_each(&self, f: impl Fn(Option<&K>, Option<&K>) + Send + Sync + 'static) {
        let mut handlers = self.handlers.lock().unwrap();
        for obj in self.list() {
            f(None, Some(&obj));
        }
        handlers.push(Box::new(f));
    }

    pub fn get(&self, key: &str) -> Option<Arc<K>> {
        self.cache.read().unwrap().objects.get(key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<K>> {
        self.cache
            .read()
            .unwrap()
            .objects
            .values()
            .cloned()
            .collect()
    }

    pub fn list_namespace(&self, ns: &str) -> Vec<Arc<K>> {
        let cache = self.cache.read().unwrap();
        cache
            .by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .filter_map(|k| cache.objects.get(k).cloned())
            .collect()
    }

    /// The objects whose controlling owner has this uid.
    pub fn list_controlled_by(&self, uid: &str) -> Vec<Arc<K>> {
        let cache = self.cache.read().unwrap();
        cache
            .by_controller
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|k| cache.objects.get(k).cloned())
            .collect()
    }

    /// What an owner with this uid in this namespace may claim: the objects it controls and
    /// the namespace's objects that have no controller.
    pub fn list_claimable(&self, ns: &str, uid: &str) -> Vec<Arc<K>> {
        let cache = self.cache.read().unwrap();
        cache
            .by_controller
            .get(uid)
            .into_iter()
            .flatten()
            .chain(cache.orphans.get(ns).into_iter().flatten())
            .filter_map(|k| cache.objects.get(k).cloned())
            .filter(|o| o.meta().namespace.as_deref().unwrap_or_default() == ns)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.cache.read().unwrap().objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once the first full list is in the cache.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn notify(&self, old: Option<&K>, new: Option<&K>) {
        for h in self.handlers.lock().unwrap().iter() {
            h(old, new);
        }
    }

    /// Watch (the watcher relists and resumes by itself, with backoff) for as long as anyone
    /// holds the informer: a controller manager that loses its lease drops its controllers, and
    /// with them their informers' watches.
    async fn run(weak: std::sync::Weak<Self>) {
        let Some((api, config, trim)) = weak
            .upgrade()
            .map(|i| (i.api.clone(), i.config.clone(), i.trim))
        else {
            return;
        };
        // managedFields are for apply, not for controllers: not even decoded (upstream's
        // controller manager and scheduler drop them from their informers too).
        let mut stream = watcher(Slim::api(&api), config).default_backoff().boxed();
        let mut relist: Option<HashMap<String, Arc<K>>> = None;
        while let Some(ev) = stream.next().await {
            let Some(this) = weak.upgrade() else {
                return;
            };
            let ev = match ev {
                Ok(ev) => Slim::event(ev).modify(trim),
                Err(e) => {
                    tracing::debug!(error = %e, kind = %K::kind(&()), "watch error");
                    continue;
                }
            };
            match ev {
                Event::Init => relist = Some(HashMap::new()),
                Event::InitApply(obj) => {
                    if let Some(r) = relist.as_mut() {
                        r.insert(key_of(&obj), Arc::new(obj));
                    }
                }
                Event::InitDone => {
                    let fresh = relist.take().unwrap_or_default();
                    let mut changes = Vec::new();
                    {
                        let mut cache = this.cache.write().unwrap();
                        let gone: Vec<String> = cache
                            .objects
                            .keys()
                            .filter(|k| !fresh.contains_key(*k))
                            .cloned()
                            .collect();
                        for k in gone {
                            if let Some(old) = cache.remove(&k) {
                                changes.push((Some(old), None));
                            }
                        }
                        for (_, obj) in fresh {
                            let old = cache.insert(obj.clone());
                            let same = old.as_ref().is_some_and(|o| {
                                o.meta().resource_version == obj.meta().resource_version
                            });
                            if !same {
                                changes.push((old, Some(obj)));
                            }
                        }
                    }
                    for (old, new) in changes {
                        this.notify(old.as_deref(), new.as_deref());
                    }
                    this.synced.send_replace(true);
                }
                Event::Apply(obj) => {
                    let obj = Arc::new(obj);
                    let old = this.cache.write().unwrap().insert(obj.clone());
                    this.notify(old.as_deref(), Some(&obj));
                }
                Event::Delete(obj) => {
                    let old = this.cache.write().unwrap().remove(&key_of(&obj));
                    let old = old.unwrap_or_else(|| Arc::new(obj));
                    this.notify(Some(&old), None);
                }
            }
        }
    }
}

/// Start an informer's watch in the background and return it.
pub fn start<K>(api: Api<K>, config: watcher::Config) -> Arc<Informer<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    start_trimmed(api, config, |_| {})
}

/// `start`, caching objects as `trim` leaves them.
pub fn start_trimmed<K>(api: Api<K>, config: watcher::Config, trim: fn(&mut K)) -> Arc<Informer<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let inf = Informer::trimming(api, config, trim);
    tokio::spawn(Informer::run(Arc::downgrade(&inf)));
    inf
}

#[derive(Default)]
struct QueueState {
    /// Waiting to be handed to a worker (or to run again after the current run).
    dirty: HashSet<String>,
    /// Due to be added once `SOON` has passed (`add_soon`).
    soon: HashSet<String>,
    processing: HashSet<String>,
    failures: HashMap<String, u32>,
}

/// How long `Queue::add_soon` waits: long enough to gather a burst of status changes, short
/// next to a pod's start.
const SOON: Duration = Duration::from_millis(100);

/// A deduplicating work queue of keys.
pub struct Queue {
    state: Mutex<QueueState>,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
    rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>,
}

impl Queue {
    pub fn new() -> Arc<Queue> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            tx,
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let mut st = self.state.lock().unwrap();
        if !st.dirty.insert(key.clone()) {
            return;
        }
        if !st.processing.contains(&key) {
            let _ = self.tx.send(key);
        }
    }

    pub fn add_after(self: &Arc<Self>, key: impl Into<String>, after: Duration) {
        let (q, key) = (self.clone(), key.into());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            q.add(key);
        });
    }

    /// Add the key once `SOON` has passed, unless it is already waiting: a burst of changes
    /// that only move status (pods becoming ready, a ReplicaSet's counts) is handled by one
    /// sync instead of one per change, as kube-runtime's debounce does. Changes a controller
    /// must act on at once (creations, deletions) use `add`.
    pub fn add_soon(self: &Arc<Self>, key: impl Into<String>) {
        let key = key.into();
        {
            let mut st = self.state.lock().unwrap();
            if st.dirty.contains(&key) || !st.soon.insert(key.clone()) {
                return;
            }
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SOON).await;
            q.state.lock().unwrap().soon.remove(&key);
            q.add(key);
        });
    }

    /// Requeue after a failure: 50 ms, doubling per consecutive failure, at most 30 s.
    pub fn add_rate_limited(self: &Arc<Self>, key: &str) {
        let n = {
            let mut st = self.state.lock().unwrap();
            let n = st.failures.entry(key.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let delay = Duration::from_millis(50u64.saturating_mul(1 << n.min(10)))
            .min(Duration::from_secs(30));
        self.add_after(key, delay);
    }

    pub fn forget(&self, key: &str) {
        self.state.lock().unwrap().failures.remove(key);
    }

    async fn get(&self) -> Option<String> {
        let key = self.rx.lock().await.recv().await?;
        let mut st = self.state.lock().unwrap();
        st.dirty.remove(&key);
        st.processing.insert(key.clone());
        Some(key)
    }

    fn done(&self, key: &str) {
        let mut st = self.state.lock().unwrap();
        st.processing.remove(key);
        if st.dirty.contains(key) {
            let _ = self.tx.send(key.to_string());
        }
    }

    /// Run `workers` concurrent workers, each calling `reconcile(key)` forever. An `Err` requeues
    /// the key with backoff; `Ok(Some(d))` requeues it after `d`.
    pub async fn run<F, Fut>(self: Arc<Self>, workers: usize, name: &'static str, reconcile: F)
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<Option<Duration>>> + Send,
    {
        let reconcile = Arc::new(reconcile);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers.max(1) {
            let (q, reconcile) = (self.clone(), reconcile.clone());
            tasks.spawn(async move {
                while let Some(key) = q.get().await {
                    match reconcile(key.clone()).await {
                        Ok(again) => {
                            q.forget(&key);
                            if let Some(d) = again {
                                q.add_after(key.clone(), d);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(controller = name, key = %key, error = %e, "will retry");
                            q.add_rate_limited(&key);
                        }
                    }
                    q.done(&key);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

/// Expectations: how many creations a controller has asked for and which pods (by UID) it has
/// asked to delete, not yet seen in its cache, per controller key, so that it does not act again
/// on a stale cache (upstream's UIDTrackingControllerExpectations). A deletion is observed when
/// the pod's deletionTimestamp appears or when it leaves the cache, whichever comes first; keyed
/// by UID, seeing both (or a deletion someone else started before ours) counts once. Expectations
/// older than five minutes are treated as met.
#[derive(Default)]
pub struct Expectations {
    map: Mutex<HashMap<String, Expected>>,
}

struct Expected {
    adds: i64,
    deletes: std::collections::HashSet<String>,
    at: std::time::Instant,
}

const EXPECTATIONS_TTL: Duration = Duration::from_secs(300);

impl Expectations {
    pub fn satisfied(&self, key: &str) -> bool {
        match self.map.lock().unwrap().get(key) {
            None => true,
            Some(e) => (e.adds <= 0 && e.deletes.is_empty()) || e.at.elapsed() > EXPECTATIONS_TTL,
        }
    }

    /// Expect `adds` creations and the deletion of the pods with these UIDs.
    pub fn expect(&self, key: &str, adds: i64, deletes: impl IntoIterator<Item = String>) {
        self.map.lock().unwrap().insert(
            key.to_string(),
            Expected {
                adds,
                deletes: deletes.into_iter().collect(),
                at: std::time::Instant::now(),
            },
        );
    }

    pub fn observe_creation(&self, key: &str) {
        if let Some(e) = self.map.lock().unwrap().get_mut(key) {
            e.adds -= 1;
        }
    }

    /// The pod with this UID is terminating or gone. Also for a deletion that failed, which will
    /// never be observed.
    pub fn observe_deletion(&self, key: &str, uid: &str) {
        if let Some(e) = self.map.lock().unwrap().get_mut(key) {
            e.deletes.remove(uid);
        }
    }

    /// Creations that failed or were not attempted will never be observed.
    pub fn creations_failed(&self, key: &str, n: i64) {
        if let Some(e) = self.map.lock().unwrap().get_mut(key) {
            e.adds -= n;
        }
    }

    pub fn delete(&self, key: &str) {
        self.map.lock().unwrap().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_dedups_and_reruns_keys_added_while_processing() {
        let q = Queue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        let first = q.get().await.unwrap();
        assert_eq!(first, "a");
        // Added again while being processed: not handed out until done.
        q.add("a");
        assert_eq!(q.get().await.unwrap(), "b");
        q.done("b");
        q.done("a");
        assert_eq!(q.get().await.unwrap(), "a");
        q.done("a");
        assert!(q.state.lock().unwrap().dirty.is_empty());
    }

    #[tokio::test]
    async fn add_soon_gathers_a_burst_into_one_run() {
        let q = Queue::new();
        q.add_soon("a");
        q.add_soon("a");
        q.add_soon("b");
        // Already waiting to run: nothing more to do.
        q.add("c");
        q.add_soon("c");
        assert!(!q.state.lock().unwrap().soon.contains("c"));
        let mut got = Vec::new();
        for _ in 0..3 {
            let k = tokio::time::timeout(Duration::from_secs(10), q.get())
                .await
                .expect("every key is handed out")
                .unwrap();
            q.done(&k);
            got.push(k);
        }
        got.sort();
        assert_eq!(got, ["a", "b", "c"]);
        let st = q.state.lock().unwrap();
        assert!(st.dirty.is_empty() && st.soon.is_empty());
    }

    #[test]
    fn expectations_count_down() {
        let e = Expectations::default();
        assert!(e.satisfied("x"));
        e.expect("x", 2, []);
        assert!(!e.satisfied("x"));
        e.observe_creation("x");
        assert!(!e.satisfied("x"));
        e.creations_failed("x", 1);
        assert!(e.satisfied("x"));
    }

    #[test]
    fn deletions_are_tracked_per_pod() {
        let e = Expectations::default();
        // A deletion observed before the expectation was set (someone else started it) is
        // forgotten by `expect`; the pod leaving the cache still counts.
        e.observe_deletion("x", "u1");
        e.expect("x", 0, ["u1".to_string(), "u2".to_string()]);
        assert!(!e.satisfied("x"));
        // Terminating, then gone: counted once.
        e.observe_deletion("x", "u2");
        e.observe_deletion("x", "u2");
        assert!(!e.satisfied("x"), "u1 is still expected");
        // Another pod's deletion does not stand in for an expected one.
        e.observe_deletion("x", "u3");
        assert!(!e.satisfied("x"));
        e.observe_deletion("x", "u1");
        assert!(e.satisfied("x"));
        // Other keys are separate.
        e.expect("y", 0, ["u4".to_string()]);
        e.observe_deletion("x", "u4");
        assert!(!e.satisfied("y"));
    }

    #[test]
    fn the_cache_indexes_by_namespace_controller_and_orphans() {
        use k8s_openapi::api::core::v1::Pod;
        let pod = |ns: &str, name: &str, owner: Option<&str>| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(serde_json::json!({"metadata": {
                    "name": name, "namespace": ns,
                    "ownerReferences": owner.map(|u| vec![serde_json::json!(
                        {"apiVersion": "v1", "kind": "X", "name": "x", "uid": u, "controller": true})]),
                }}))
                .unwrap(),
            )
        };
        let mut c: Cache<Pod> = Cache {
            objects: HashMap::new(),
            by_namespace: HashMap::new(),
            by_controller: HashMap::new(),
            orphans: HashMap::new(),
        };
        c.insert(pod("a", "mine", Some("u1")));
        c.insert(pod("a", "theirs", Some("u2")));
        c.insert(pod("a", "orphan", None));
        c.insert(pod("b", "far-orphan", None));
        let inf_keys = |c: &Cache<Pod>, ns: &str, uid: &str| {
            let mut v: Vec<String> = c
                .by_controller
                .get(uid)
                .into_iter()
                .flatten()
                .chain(c.orphans.get(ns).into_iter().flatten())
                .cloned()
                .collect();
            v.sort();
            v
        };
        assert_eq!(inf_keys(&c, "a", "u1"), ["a/mine", "a/orphan"]);
        // Adopted: no longer an orphan; released: an orphan again.
        c.insert(pod("a", "orphan", Some("u1")));
        assert_eq!(inf_keys(&c, "a", "u2"), ["a/theirs"]);
        c.insert(pod("a", "mine", None));
        assert_eq!(inf_keys(&c, "a", "u2"), ["a/mine", "a/theirs"]);
        c.remove("a/mine");
        assert_eq!(inf_keys(&c, "a", "u2"), ["a/theirs"]);
        assert_eq!(c.by_namespace["a"].len(), 2);
    }

    #[tokio::test]
    async fn a_late_subscriber_sees_every_cached_object_once_then_every_change() {
        use k8s_openapi::api::core::v1::ConfigMap;
        // The informer is never run: its cache is filled by hand, so no server is needed.
        let service = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("no server here"))
        });
        let client = kube::Client::new(service, "default");
        let inf = Informer::trimming(Api::<ConfigMap>::all(client), Default::default(), |_| {});
        let cm = |name: &str| -> Arc<ConfigMap> {
            Arc::new(
                serde_json::from_value(
                    serde_json::json!({"metadata": {"name": name, "namespace": "ns"}}),
                )
                .unwrap(),
            )
        };
        for name in ["a", "b"] {
            inf.cache.write().unwrap().insert(cm(name));
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        inf.on_each(move |old, new| {
            let name = |o: Option<&ConfigMap>| o.and_then(|o| o.metadata.name.clone());
            s.lock().unwrap().push((name(old), name(new)));
        });
        seen.lock().unwrap().sort();
        let c = cm("c");
        inf.cache.write().unwrap().insert(c.clone());
        inf.notify(None, Some(&c));
        let a = inf.cache.write().unwrap().remove("ns/a").unwrap();
        inf.notify(Some(&a), None);
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (None, some("a")),
                (None, some("b")),
                (None, some("c")),
                (some("a"), None)
            ]
        );
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(split_key("ns/a"), (Some("ns"), "a"));
        assert_eq!(split_key("node-1"), (None, "node-1"));
    }
}
