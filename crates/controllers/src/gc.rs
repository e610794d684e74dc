//! The garbage collector: a graph of ownerReferences over every kind the API serves (one
//! metadata watch per resource), and two queues.
//!
//! - *attempt to delete* an object whose owners may be gone: owners are looked up live; if none
//!   is left, the object is deleted (with the propagation its own finalizers ask for); if some
//!   are gone but one remains, the dangling references are removed. An owner being deleted in the
//!   foreground makes its dependents go in the foreground too; an owner waiting in the
//!   foreground loses its `foregroundDeletion` finalizer once no dependent that blocks it is
//!   left.
//! - *attempt to orphan*: an owner deleted with `propagationPolicy=Orphan` carries the `orphan`
//!   finalizer; its dependents lose their reference to it, then it loses the finalizer.
//!
//! Cycles end because each object is deleted once and deletions only ever follow owner edges.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::discovery::{verbs, ApiResource, Discovery, Scope};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::mpsc;

use crate::runtime::{Informer, Queue};

const ORPHAN: &str = "orphan";
const FOREGROUND: &str = "foregroundDeletion";

/// An object as the collector's watches see it: the metadata the graph needs and nothing else.
/// Everything else (a pod's spec and status, and above all its managedFields, which cost more
/// to parse than the rest of the object) is skipped while parsing, never built.
#[derive(Clone, Debug)]
struct Lean {
    metadata: ObjectMeta,
}

#[derive(serde::Deserialize)]
struct LeanWire {
    #[serde(default)]
    metadata: LeanMeta,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    finalizers: Option<Vec<String>>,
    deletion_timestamp: Option<Time>,
}

impl<'de> serde::Deserialize<'de> for Lean {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lean, D::Error> {
        let m = LeanWire::deserialize(d)?.metadata;
        Ok(Lean {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                owner_references: m.owner_references,
                finalizers: m.finalizers,
                deletion_timestamp: m.deletion_timestamp,
                ..Default::default()
            },
        })
    }
}

impl kube::Resource for Lean {
    type DynamicType = ApiResource;
    type Scope = kube::core::DynamicResourceScope;

    fn group(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn kind(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn api_version(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> std::borrow::Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Clone)]
struct Resource {
    ar: ApiResource,
    namespaced: bool,
}

#[derive(Default)]
struct GraphNode {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    name: String,
    owners: Vec<OwnerReference>,
    dependents: HashSet<String>,
    /// Seen through a watch (not just named as somebody's owner).
    observed: bool,
    deleting: bool,
    finalizers: Vec<String>,
}

impl GraphNode {
    fn deleting_dependents(&self) -> bool {
        self.deleting && self.finalizers.iter().any(|f| f == FOREGROUND)
    }
    fn orphaning(&self) -> bool {
        self.deleting && self.finalizers.iter().any(|f| f == ORPHAN)
    }
}

struct Gc {
    client: Client,
    /// `apiVersion/kind` → how to reach it.
    resources: HashMap<(String, String), Resource>,
    graph: Mutex<HashMap<String, GraphNode>>,
    delete_queue: Arc<Queue>,
    orphan_queue: Arc<Queue>,
}

enum Change {
    Upsert(Resource, ObjectMeta),
    Delete(ObjectMeta),
}

/// The metadata the graph reads (as `Lean` decodes it).
fn lean_meta(m: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        resource_version: m.resource_version.clone(),
        owner_references: m.owner_references.clone(),
        finalizers: m.finalizers.clone(),
        deletion_timestamp: m.deletion_timestamp.clone(),
        ..Default::default()
    }
}

type Feed = Box<dyn FnOnce(mpsc::UnboundedSender<Change>, Resource) + Send>;

/// Kinds the controller manager already watches cluster-wide: the collector follows those
/// informers instead of opening a second watch of the same objects (upstream's collector
/// shares the controller manager's informers too). Every other kind gets its own watch.
#[derive(Default)]
pub struct Shared {
    feeds: HashMap<(String, String), Feed>,
}

impl Shared {
    pub fn add<K>(&mut self, informer: &Arc<Informer<K>>)
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let informer = informer.clone();
        let feed: Feed = Box::new(move |tx, r| {
            informer.on_each(move |old, new| {
                let change = match (old, new) {
                    (_, Some(o)) => Change::Upsert(r.clone(), lean_meta(o.meta())),
                    (Some(o), None) => Change::Delete(lean_meta(o.meta())),
                    (None, None) => return,
                };
                let _ = tx.send(change);
            })
        });
        let key = (K::api_version(&()).into_owned(), K::kind(&()).into_owned());
        self.feeds.insert(key, feed);
    }
}

/// Kinds whose objects never own or are owned in practice, and churn a lot (upstream skips
/// events too).
const IGNORED: &[&str] = &["events"];

pub async fn run(client: Client, mut shared: Shared) -> anyhow::Result<()> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut resources = HashMap::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            let ok = [verbs::LIST, verbs::WATCH, verbs::DELETE, verbs::PATCH]
                .iter()
                .all(|v| caps.supports_operation(v));
            if !ok || IGNORED.contains(&ar.plural.as_str()) {
                continue;
            }
            let r = Resource {
                ar: ar.clone(),
                namespaced: caps.scope == Scope::Namespaced,
            };
            resources.insert((ar.api_version.clone(), ar.kind.clone()), r);
        }
    }
    let gc = Arc::new(Gc {
        client: client.clone(),
        resources: resources.clone(),
        graph: Mutex::new(HashMap::new()),
        delete_queue: Queue::new(),
        orphan_queue: Queue::new(),
    });
    let (tx, mut rx) = mpsc::channel::<Change>(4096);
    // Changes from shared informers: their handlers cannot wait, so this channel is unbounded
    // (it holds what the informers already hold in their caches, at most).
    let (shared_tx, mut shared_rx) = mpsc::unbounded_channel::<Change>();
    for r in resources.values().cloned() {
        let key = (r.ar.api_version.clone(), r.ar.kind.clone());
        if let Some(feed) = shared.feeds.remove(&key) {
            feed(shared_tx.clone(), r);
            continue;
        }
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move {
            let api: Api<Lean> = Api::all_with(client, &r.ar);
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            // The uids listed by the relist in progress (empty otherwise: it used to keep every
            // uid ever seen, deleted ones too).
            let mut seen: HashSet<String> = HashSet::new();
            // uid -> (namespace, name): only what a later delete needs.
            let mut known: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
            let gone = |uid: String, (namespace, name): (Option<String>, Option<String>)| {
                Change::Delete(ObjectMeta {
                    name,
                    namespace,
                    uid: Some(uid),
                    ..Default::default()
                })
            };
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                // Only a relist's events are InitApply.
                let listed = matches!(ev, Event::InitApply(_));
                let changes: Vec<Change> = match ev {
                    Event::Init => {
                        seen.clear();
                        vec![]
                    }
                    Event::InitApply(o) | Event::Apply(o) => {
                        if listed {
                            seen.insert(o.metadata.uid.clone().unwrap_or_default());
                        }
                        let meta = o.metadata;
                        let uid = meta.uid.clone().unwrap_or_default();
                        known.insert(uid, (meta.namespace.clone(), meta.name.clone()));
                        vec![Change::Upsert(r.clone(), meta)]
                    }
                    Event::Delete(o) => {
                        let uid = o.metadata.uid.clone().unwrap_or_default();
                        known.remove(&uid);
                        vec![Change::Delete(o.metadata)]
                    }
                    Event::InitDone => {
                        // Whatever disappeared while we were not watching.
                        let missing: Vec<String> = known
                            .keys()
                            .filter(|u| !seen.contains(*u))
                            .cloned()
                            .collect();
                        seen = HashSet::new();
                        missing
                            .into_iter()
                            .filter_map(|u| known.remove(&u).map(|m| gone(u, m)))
                            .collect()
                    }
                };
                for c in changes {
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(tx);
    drop(shared_tx);
    let g = gc.clone();
    let builder = async move {
        loop {
            let c = tokio::select! {
                Some(c) = rx.recv() => c,
                Some(c) = shared_rx.recv() => c,
                else => break,
            };
            g.process(c);
        }
    };
    let g = gc.clone();
    let deleter = gc
        .delete_queue
        .clone()
        .run(5, "garbage-collector", move |uid| {
            let g = g.clone();
            async move { g.attempt_to_delete(&uid).await }
        });
    let g = gc.clone();
    let orphaner = gc
        .orphan_queue
        .clone()
        .run(2, "garbage-collector-orphan", move |uid| {
            let g = g.clone();
            async move { g.attempt_to_orphan(&uid).await }
        });
    tokio::select! {
        _ = builder => {}
        _ = deleter => {}
        _ = orphaner => {}
    }
    Ok(())
}

impl Gc {
    /// The graph builder: one change at a time, in watch order.
    fn process(&self, change: Change) {
        let mut graph = self.graph.lock().unwrap();
        match change {
            Change::Upsert(r, meta) => {
                let uid = meta.uid.clone().unwrap_or_default();
                let owners = meta.owner_references.clone().unwrap_or_default();
                let finalizers = meta.finalizers.clone().unwrap_or_default();
                let deleting = meta.deletion_timestamp.is_some();
                let node = graph.entry(uid.clone()).or_default();
                let old_owners = std::mem::take(&mut node.owners);
                node.api_version = r.ar.api_version.clone();
                node.kind = r.ar.kind.clone();
                node.namespace = meta.namespace.clone();
                node.name = meta.name.clone().unwrap_or_default();
                node.observed = true;
                node.owners = owners.clone();
                let was_deleting_dependents = node.deleting_dependents();
                node.deleting = deleting;
                node.finalizers = finalizers;
                let (deleting_dependents, orphaning) =
                    (node.deleting_dependents(), node.orphaning());
                let dependents: Vec<String> = node.dependents.iter().cloned().collect();
                let old: HashSet<&str> = old_owners.iter().map(|o| o.uid.as_str()).collect();
                let new: HashSet<&str> = owners.iter().map(|o| o.uid.as_str()).collect();
                for o in &owners {
                    if old.contains(o.uid.as_str()) {
                        continue;
                    }
                    let owner = graph.entry(o.uid.clone()).or_insert_with(|| GraphNode {
                        api_version: o.api_version.clone(),
                        kind: o.kind.clone(),
                        namespace: meta.namespace.clone(),
                        name: o.name.clone(),
                        ..Default::default()
                    });
                    owner.dependents.insert(uid.clone());
                    if !owner.observed || owner.deleting {
                        // Maybe dangling, or its owner is going: look.
                        self.delete_queue.add(uid.clone());
                    }
                }
                for o in &old_owners {
                    if new.contains(o.uid.as_str()) {
                        continue;
                    }
                    if let Some(owner) = graph.get_mut(&o.uid) {
                        owner.dependents.remove(&uid);
                        if owner.deleting_dependents() {
                            self.delete_queue.add(o.uid.clone());
                        }
                        if !owner.observed && owner.dependents.is_empty() {
                            graph.remove(&o.uid);
                        }
                    }
                }
                if orphaning {
                    self.orphan_queue.add(uid.clone());
                }
                if deleting_dependents {
                    if !was_deleting_dependents {
                        for d in &dependents {
                            self.delete_queue.add(d.clone());
                        }
                    }
                    self.delete_queue.add(uid.clone());
                }
                // A dependent that is now being deleted may unblock its owners.
                if deleting {
                    for o in &owners {
                        if graph.get(&o.uid).is_some_and(|n| n.deleting_dependents()) {
                            self.delete_queue.add(o.uid.clone());
                        }
                    }
                }
            }
            Change::Delete(meta) => {
                let uid = meta.uid.clone().unwrap_or_default();
                let Some(node) = graph.remove(&uid) else {
                    return;
                };
                for d in &node.dependents {
                    self.delete_queue.add(d.clone());
                }
                if !node.dependents.is_empty() {
                    // Keep the edges: the dependents still name this (now absent) owner.
                    graph.insert(
                        uid.clone(),
                        GraphNode {
                            api_version: node.api_version.clone(),
                            kind: node.kind.clone(),
                            namespace: node.namespace.clone(),
                            name: node.name.clone(),
                            dependents: node.dependents.clone(),
                            ..Default::default()
                        },
                    );
                }
                for o in &node.owners {
                    if let Some(owner) = graph.get_mut(&o.uid) {
                        owner.dependents.remove(&uid);
                        if owner.deleting_dependents() {
                            self.delete_queue.add(o.uid.clone());
                        }
                        if !owner.observed && owner.dependents.is_empty() {
                            graph.remove(&o.uid);
                        }
                    }
                }
            }
        }
    }

    fn api_for(
        &self,
        api_version: &str,
        kind: &str,
        ns: Option<&str>,
    ) -> Option<Api<DynamicObject>> {
        let r = self
            .resources
            .get(&(api_version.to_string(), kind.to_string()))?;
        Some(match (r.namespaced, ns) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &r.ar),
            (true, None) => return None,
            (false, _) => Api::all_with(self.client.clone(), &r.ar),
        })
    }

    async fn attempt_to_delete(&self, uid: &str) -> anyhow::Result<Option<Duration>> {
        let (api_version, kind, ns, name, deleting, deleting_dependents) = {
            let graph = self.graph.lock().unwrap();
            let Some(n) = graph.get(uid) else {
                return Ok(None);
            };
            if !n.observed {
                return Ok(None);
            }
            (
                n.api_version.clone(),
                n.kind.clone(),
                n.namespace.clone(),
                n.name.clone(),
                n.deleting,
                n.deleting_dependents(),
            )
        };
        let Some(api) = self.api_for(&api_version, &kind, ns.as_deref()) else {
            return Ok(None);
        };
        if deleting_dependents {
            return self.process_deleting_dependents(uid, &api, &name).await;
        }
        if deleting {
            return Ok(None);
        }
        // The latest owners, from the API rather than the graph.
        let Some(latest) = api.get_metadata_opt(&name).await? else {
            return Ok(None);
        };
        if latest.metadata.uid.as_deref() != Some(uid) {
            return Ok(None);
        }
        let owners = latest.metadata.owner_references.clone().unwrap_or_default();
        if owners.is_empty() {
            return Ok(None);
        }
        let (mut solid, mut dangling, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
        for o in &owners {
            match self.owner_state(o, ns.as_deref()).await? {
                OwnerState::Solid => solid.push(o.uid.clone()),
                OwnerState::Dangling => dangling.push(o.uid.clone()),
                OwnerState::Waiting => waiting.push(o.uid.clone()),
            }
        }
        let rv = latest.metadata.resource_version.clone();
        if !solid.is_empty() {
            if dangling.is_empty() && waiting.is_empty() {
                return Ok(None);
            }
            let keep: Vec<&OwnerReference> = owners
                .iter()
                .filter(|o| !dangling.contains(&o.uid) && !waiting.contains(&o.uid))
                .collect();
            let patch = json!({"metadata": {"ownerReferences": list_or_null(&keep), "resourceVersion": rv}});
            tracing::debug!(%kind, %name, "removing dangling owner references");
            return patch_ok(
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await,
            );
        }
        let has_dependents = self
            .graph
            .lock()
            .unwrap()
            .get(uid)
            .is_some_and(|n| !n.dependents.is_empty());
        let finalizers = latest.metadata.finalizers.clone().unwrap_or_default();
        let policy = if !waiting.is_empty() && has_dependents {
            "Foreground"
        } else if finalizers.iter().any(|f| f == ORPHAN) {
            "Orphan"
        } else if finalizers.iter().any(|f| f == FOREGROUND) {
            "Foreground"
        } else {
            "Background"
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            propagation_policy: Some(match policy {
                "Foreground" => kube::api::PropagationPolicy::Foreground,
                "Orphan" => kube::api::PropagationPolicy::Orphan,
                _ => kube::api::PropagationPolicy::Background,
            }),
            ..Default::default()
        };
        tracing::debug!(%kind, %name, policy, "deleting an object whose owners are gone");
        match api.delete(&name, &dp).await {
            Ok(_) => Ok(None),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn owner_state(
        &self,
        o: &OwnerReference,
        ns: Option<&str>,
    ) -> anyhow::Result<OwnerState> {
        let Some(api) = self.api_for(&o.api_version, &o.kind, ns) else {
            // Not a kind we can look up: never delete on a guess.
            return Ok(OwnerState::Solid);
        };
        let Some(owner) = api.get_metadata_opt(&o.name).await? else {
            return Ok(OwnerState::Dangling);
        };
        if owner.metadata.uid.as_deref() != Some(o.uid.as_str()) {
            return Ok(OwnerState::Dangling);
        }
        let waiting = owner.metadata.deletion_timestamp.is_some()
            && owner
                .metadata
                .finalizers
                .iter()
                .flatten()
                .any(|f| f == FOREGROUND);
        Ok(if waiting {
            OwnerState::Waiting
        } else {
            OwnerState::Solid
        })
    }

    /// An owner deleted in the foreground: delete its blocking dependents; when none is left,
    /// remove its finalizer.
    async fn process_deleting_dependents(
        &self,
        uid: &str,
        api: &Api<DynamicObject>,
        name: &str,
    ) -> anyhow::Result<Option<Duration>> {
        let blocking: Vec<(String, bool)> = {
            let graph = self.graph.lock().unwrap();
            let Some(n) = graph.get(uid) else {
                return Ok(None);
            };
            n.dependents
                .iter()
                .filter_map(|d| {
                    let dep = graph.get(d)?;
                    let blocks = dep
                        .owners
                        .iter()
                        .any(|o| o.uid == uid && o.block_owner_deletion == Some(true));
                    blocks.then(|| (d.clone(), dep.deleting))
                })
                .collect()
        };
        if blocking.is_empty() {
            remove_finalizer(api, name, uid, FOREGROUND).await?;
            return Ok(None);
        }
        for (d, deleting) in blocking {
            if !deleting {
                self.delete_queue.add(d);
            }
        }
        Ok(None)
    }

    async fn attempt_to_orphan(&self, uid: &str) -> anyhow::Result<Option<Duration>> {
        let (owner_api, name, dependents) = {
            let graph = self.graph.lock().unwrap();
            let Some(n) = graph.get(uid) else {
                return Ok(None);
            };
            if !n.orphaning() {
                return Ok(None);
            }
            let deps: Vec<(String, String, Option<String>, String)> = n
                .dependents
                .iter()
                .filter_map(|d| graph.get(d))
                .map(|d| {
                    (
                        d.api_version.clone(),
                        d.kind.clone(),
                        d.namespace.clone(),
                        d.name.clone(),
                    )
                })
                .collect();
            (
                self.api_for(&n.api_version, &n.kind, n.namespace.as_deref()),
                n.name.clone(),
                deps,
            )
        };
        for (av, kind, ns, dname) in dependents {
            let Some(api) = self.api_for(&av, &kind, ns.as_deref()) else {
                continue;
            };
            let Some(dep) = api.get_metadata_opt(&dname).await? else {
                continue;
            };
            let owners = dep.metadata.owner_references.clone().unwrap_or_default();
            if !owners.iter().any(|o| o.uid == uid) {
                continue;
            }
            let keep: Vec<&OwnerReference> = owners.iter().filter(|o| o.uid != uid).collect();
            let patch = json!({"metadata": {"ownerReferences": list_or_null(&keep),
                "resourceVersion": dep.metadata.resource_version}});
            patch_ok(
                api.patch(&dname, &PatchParams::default(), &Patch::Merge(patch))
                    .await,
            )?;
        }
        if let Some(api) = owner_api {
            remove_finalizer(&api, &name, uid, ORPHAN).await?;
        }
        Ok(None)
    }
}

/// A merge patch removes a field with null: an emptied list goes away, as upstream leaves it.
fn list_or_null<T: serde::Serialize>(items: &[T]) -> serde_json::Value {
    if items.is_empty() {
        serde_json::Value::Null
    } else {
        json!(items)
    }
}

enum OwnerState {
    Solid,
    Dangling,
    Waiting,
}

fn patch_ok<T>(r: Result<T, kube::Error>) -> anyhow::Result<Option<Duration>> {
    match r {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn remove_finalizer(
    api: &Api<DynamicObject>,
    name: &str,
    uid: &str,
    finalizer: &str,
) -> anyhow::Result<()> {
    let Some(cur) = api.get_metadata_opt(name).await? else {
        return Ok(());
    };
    if cur.metadata.uid.as_deref() != Some(uid) {
        return Ok(());
    }
    let fins = cur.metadata.finalizers.clone().unwrap_or_default();
    if !fins.iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let keep: Vec<&String> = fins.iter().filter(|f| *f != finalizer).collect();
    let patch = json!({"metadata": {"finalizers": list_or_null(&keep), "resourceVersion": cur.metadata.resource_version}});
    patch_ok(
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lean_objects_keep_what_the_graph_needs() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u1", "resourceVersion": "7",
                "labels": {"a": "b"}, "annotations": {"x": "y"},
                "finalizers": ["foregroundDeletion"],
                "deletionTimestamp": "2026-11-28T00:00:00Z",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                                     "uid": "u0", "controller": true, "blockOwnerDeletion": true}],
                "managedFields": [{"manager": "m", "operation": "Update", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:a": {}}}}}],
            },
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running"},
        });
        let lean: Lean = serde_json::from_value(pod).unwrap();
        let m = &lean.metadata;
        assert_eq!(m.name.as_deref(), Some("p"));
        assert_eq!(m.namespace.as_deref(), Some("ns"));
        assert_eq!(m.uid.as_deref(), Some("u1"));
        assert_eq!(m.resource_version.as_deref(), Some("7"));
        assert_eq!(
            m.finalizers.as_deref(),
            Some(&["foregroundDeletion".to_string()][..])
        );
        assert!(m.deletion_timestamp.is_some());
        let owner = &m.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u0", Some(true)));
        assert!(m.managed_fields.is_none() && m.labels.is_none() && m.annotations.is_none());
        // An object without metadata (never sent, but not a parse error).
        let bare: Lean = serde_json::from_value(json!({"kind": "X"})).unwrap();
        assert!(bare.metadata.uid.is_none());
    }
}
