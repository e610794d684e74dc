//! Services and their EndpointSlices, as the proxy and cluster DNS both need them: two watches
//! feeding one cache, indexed by Service (`namespace/name`), with the keys that changed since
//! last asked and a wake-up for whoever waits on changes.
//!
//! Each consumer starts its own cache; the watches stop when it is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use apimachinery::slim::Slim;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Resource;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

type Slices = HashMap<String, HashMap<String, Arc<EndpointSlice>>>;

#[derive(Default)]
struct Inner {
    services: HashMap<String, Arc<Service>>,
    /// Service key -> slice name -> slice.
    slices: Slices,
    /// Slice key (`namespace/name`) -> the Service key it is filed under.
    owner: HashMap<String, String>,
    /// Services changed since `take_dirty` (only when tracking).
    dirty: HashSet<String>,
    services_synced: bool,
    slices_synced: bool,
}

pub struct ServiceCache {
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    track: bool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for ServiceCache {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().map(std::mem::take).unwrap_or_default() {
            t.abort();
        }
    }
}

/// `namespace/name`.
pub fn key(ns: Option<&str>, name: &str) -> String {
    format!("{}/{name}", ns.unwrap_or_default())
}

fn key_of<K: Resource>(o: &K) -> String {
    let m = o.meta();
    key(
        m.namespace.as_deref(),
        m.name.as_deref().unwrap_or_default(),
    )
}

fn slice_service(s: &EndpointSlice) -> Option<String> {
    let name = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(key(s.metadata.namespace.as_deref(), name))
}

fn put(m: &mut Slices, s: EndpointSlice) -> Option<String> {
    let k = slice_service(&s)?;
    let name = s.metadata.name.clone().unwrap_or_default();
    m.entry(k.clone()).or_default().insert(name, Arc::new(s));
    Some(k)
}

impl ServiceCache {
    /// Start watching. `track_changes`: keep the set of changed Services for `take_dirty`.
    pub fn start(client: kube::Client, track_changes: bool) -> Arc<ServiceCache> {
        let cache = Arc::new(ServiceCache {
            inner: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            track: track_changes,
            tasks: Mutex::default(),
        });
        let weak = Arc::downgrade(&cache);
        let services = tokio::spawn(watch_services(Api::all(client.clone()), weak.clone()));
        let slices = tokio::spawn(watch_slices(Api::all(client), weak));
        if let Ok(mut t) = cache.tasks.lock() {
            t.extend([services, slices]);
        }
        cache
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Both watches have listed everything once.
    pub fn synced(&self) -> bool {
        let i = self.lock();
        i.services_synced && i.slices_synced
    }

    /// Wait for the next change (or one that came since the last wait).
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Wake a waiter without a change (to retry).
    pub fn poke(&self) {
        self.wake.notify_one()
    }

    /// The Services changed since the last call.
    pub fn take_dirty(&self) -> Vec<String> {
        self.lock().dirty.drain().collect()
    }

    pub fn service(&self, key: &str) -> Option<Arc<Service>> {
        self.lock().services.get(key).cloned()
    }

    /// The Service's slices.
    pub fn slices(&self, key: &str) -> Vec<Arc<EndpointSlice>> {
        self.lock()
            .slices
            .get(key)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn service_keys(&self) -> Vec<String> {
        self.lock().services.keys().cloned().collect()
    }

    fn changed_keys(&self, i: &mut Inner, keys: impl IntoIterator<Item = String>) {
        if self.track {
            i.dirty.extend(keys);
        }
    }
}

/// Runs a watch until the cache is dropped: each event goes to `on` with the cache locked,
/// then whoever waits on changes is woken.
async fn run_watch<K, F>(api: Api<K>, cache: std::sync::Weak<ServiceCache>, mut on: F)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
    F: FnMut(&ServiceCache, &mut Inner, Event<K>),
{
    // managedFields are never read here: not even decoded.
    let mut stream = watcher(Slim::api(&api), watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev.map(Slim::event) else {
            continue;
        };
        let Some(cache) = cache.upgrade() else { return };
        on(&cache, &mut cache.lock(), ev);
        cache.wake.notify_one();
    }
}

async fn watch_services(api: Api<Service>, cache: std::sync::Weak<ServiceCache>) {
    let mut fresh: Option<HashMap<String, Arc<Service>>> = None;
    run_watch(api, cache, move |cache, i, ev| match ev {
        Event::Init => fresh = Some(HashMap::new()),
        Event::InitApply(s) => {
            if let Some(f) = fresh.as_mut() {
                f.insert(key_of(&s), Arc::new(s));
            }
        }
        Event::InitDone => {
            let f = fresh.take().unwrap_or_default();
            let keys: HashSet<String> = i.services.keys().chain(f.keys()).cloned().collect();
            cache.changed_keys(i, keys);
            i.services = f;
            i.services_synced = true;
        }
        Event::Apply(s) => {
            let k = key_of(&s);
            cache.changed_keys(i, [k.clone()]);
            i.services.insert(k, Arc::new(s));
        }
        Event::Delete(s) => {
            let k = key_of(&s);
            cache.changed_keys(i, [k.clone()]);
            i.services.remove(&k);
        }
    })
    .await
}

async fn watch_slices(api: Api<EndpointSlice>, cache: std::sync::Weak<ServiceCache>) {
    let mut fresh: Option<Slices> = None;
    run_watch(api, cache, move |cache, i, ev| {
        match ev {
            Event::Init => fresh = Some(HashMap::new()),
            Event::InitApply(s) => {
                if let Some(f) = fresh.as_mut() {
                    put(f, s);
                }
            }
            Event::InitDone => {
                let f = fresh.take().unwrap_or_default();
                let keys: HashSet<String> = i.slices.keys().chain(f.keys()).cloned().collect();
                cache.changed_keys(i, keys);
                i.owner = f
                    .iter()
                    .flat_map(|(svc, m)| {
                        m.values().map(move |sl| (key_of(sl.as_ref()), svc.clone()))
                    })
                    .collect();
                i.slices = f;
                i.slices_synced = true;
            }
            Event::Apply(s) => {
                // A slice may have moved to another Service (its label changed): drop it from
                // the one it was under.
                let name = s.metadata.name.clone().unwrap_or_default();
                let mut touched = Vec::new();
                if let Some(old) = i.owner.remove(&key_of(&s)) {
                    if let Some(m) = i.slices.get_mut(&old) {
                        m.remove(&name);
                        if m.is_empty() {
                            i.slices.remove(&old);
                        }
                    }
                    touched.push(old);
                }
                let slice_key = key_of(&s);
                if let Some(k) = put(&mut i.slices, s) {
                    i.owner.insert(slice_key, k.clone());
                    touched.push(k);
                }
                cache.changed_keys(i, touched);
            }
            Event::Delete(s) => {
                i.owner.remove(&key_of(&s));
                if let Some(k) = slice_service(&s) {
                    let name = s.metadata.name.clone().unwrap_or_default();
                    if let Some(m) = i.slices.get_mut(&k) {
                        m.remove(&name);
                        if m.is_empty() {
                            i.slices.remove(&k);
                        }
                    }
                    cache.changed_keys(i, [k]);
                }
            }
        }
    })
    .await
}
