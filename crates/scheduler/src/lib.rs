//! scheduler: places pending pods on nodes, as upstream's kube-scheduler does, reaching the
//! cluster only through the API (kube-rs watchers in, `pods/binding` and events out).
//!
//! - `cache`: nodes and the pods counted on them, with assumed pods (bound in our head while the
//!   binding is in flight), so asynchronous binds never overcommit a node.
//! - `queue`: active / backoff / unschedulable sub-queues; cluster events move parked pods back.
//! - `framework`: the extension points as one plugin trait; `plugins`: the in-tree plugins.
//! - `config`: KubeSchedulerConfiguration → profiles.
//! - this file: the informers, the scheduling cycle, binding, and what users see (the
//!   PodScheduled condition, Scheduled/FailedScheduling events, nominatedNodeName).

pub mod cache;
pub mod config;
pub mod framework;
pub mod plugins;
pub mod queue;
pub mod resources;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apimachinery::slim::Slim;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::Client;
use serde_json::json;

use cache::{pod_key, Cache, PodInfo};
use framework::{fit_error_message, Code, CycleState, Profile, Status};
use queue::{Outcome, Queue};

pub use config::Configuration;

/// Why a pod could not be placed.
struct Failure {
    statuses: HashMap<String, Status>,
    message: String,
    state: CycleState,
}

pub struct Scheduler {
    client: Client,
    profiles: HashMap<String, Arc<Profile>>,
    cache: Mutex<Cache>,
    queue: Arc<Queue>,
    next_start: AtomicUsize,
    events: events::Recorder,
    /// The last Unschedulable message written per pod, to not rewrite the same condition.
    last_failure: Mutex<HashMap<String, String>>,
    /// Preemptors and the node their victims are leaving. Each is held (assumed) on that node
    /// while it waits, so that other pods, and other preemptors, do not count on that room.
    nominated: Mutex<HashMap<String, String>>,
    binds: Arc<tokio::sync::Semaphore>,
}

/// Run the scheduler until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Configuration,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let profiles = config.profiles()?;
    let s = Arc::new(Scheduler {
        client: client.clone(),
        profiles,
        cache: Mutex::new(Cache::default()),
        queue: Queue::new(),
        next_start: AtomicUsize::new(0),
        events: events::Recorder::with_limits(client.clone(), "default-scheduler", 10_000, 16),
        last_failure: Mutex::default(),
        nominated: Mutex::default(),
        binds: Arc::new(tokio::sync::Semaphore::new(64)),
    });
    let (nodes_synced_tx, nodes_synced) = tokio::sync::oneshot::channel();
    let (pods_synced_tx, pods_synced) = tokio::sync::oneshot::channel();
    let tasks = vec![
        tokio::spawn(s.clone().watch_nodes(nodes_synced_tx)),
        tokio::spawn(s.clone().watch_pods(pods_synced_tx)),
        tokio::spawn(s.clone().watch_workloads()),
        tokio::spawn({
            let q = s.queue.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    q.flush_unschedulable();
                }
            }
        }),
    ];
    let main = async {
        // Never schedule from a partial view: wait for both initial lists.
        let _ = nodes_synced.await;
        let _ = pods_synced.await;
        tracing::info!(profiles = ?s.profiles.keys().collect::<Vec<_>>(), "scheduler: caches synced; scheduling");
        s.clone().schedule_loop().await;
    };
    tokio::select! {
        _ = main => {}
        _ = shutdown => {}
    }
    s.queue.close();
    for t in &tasks {
        t.abort();
    }
    // Gone before we return: a watch still running while the API server behind an in-process
    // client shuts down would report its cancelled requests as errors.
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

impl Scheduler {
    fn wants(&self, pod: &Pod) -> bool {
        let spec = pod.spec.as_ref();
        let name = spec
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or("default-scheduler");
        spec.and_then(|s| s.node_name.as_deref())
            .unwrap_or_default()
            .is_empty()
            && pod.metadata.deletion_timestamp.is_none()
            && cache::occupies_node(pod)
            && self.profiles.contains_key(name)
    }

    async fn watch_nodes(self: Arc<Self>, synced: tokio::sync::oneshot::Sender<()>) {
        let api: Api<Node> = Api::all(self.client.clone());
        inform(
            api,
            |n: &Node| n.metadata.name.clone().unwrap_or_default(),
            |n, initial| {
                self.cache.lock().unwrap().upsert_node(n);
                if !initial {
                    self.queue.move_all();
                }
            },
            |n| {
                self.cache
                    .lock()
                    .unwrap()
                    .remove_node(n.metadata.name.as_deref().unwrap_or_default())
            },
            |seen| {
                let mut c = self.cache.lock().unwrap();
                let gone: Vec<String> = c
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .filter(|n| !seen.contains(n))
                    .collect();
                for n in gone {
                    c.remove_node(&n);
                }
                drop(c);
                self.queue.move_all();
            },
            synced,
        )
        .await
    }

    fn apply_pod(&self, pod: Pod) {
        let key = pod_key(&pod);
        let bound = !pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default()
            .is_empty();
        if bound {
            self.queue.delete(&key);
            let frees = !cache::occupies_node(&pod) || pod.metadata.deletion_timestamp.is_some();
            self.cache.lock().unwrap().upsert_bound_pod(Arc::new(pod));
            if frees {
                self.queue.move_all();
            }
        } else if self.wants(&pod) {
            self.queue
                .add_or_update(Arc::new(PodInfo::new(Arc::new(pod))));
        } else {
            self.queue.delete(&key);
        }
    }

    /// The selectors default topology spreading uses (Services, ReplicationControllers,
    /// ReplicaSets, StatefulSets) and namespace labels (for affinity namespaceSelectors).
    async fn watch_workloads(self: Arc<Self>) {
        use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
        use k8s_openapi::api::core::v1::{ReplicationController, Service};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        fn from_map(m: Option<std::collections::BTreeMap<String, String>>) -> LabelSelector {
            LabelSelector {
                match_labels: m,
                ..Default::default()
            }
        }
        let services = self.clone().follow_selectors::<Service>("Service", |o| {
            from_map(o.spec.as_ref().and_then(|s| s.selector.clone()))
        });
        let rcs = self
            .clone()
            .follow_selectors::<ReplicationController>("ReplicationController", |o| {
                from_map(o.spec.as_ref().and_then(|s| s.selector.clone()))
            });
        let rss = self
            .clone()
            .follow_selectors::<ReplicaSet>("ReplicaSet", |o| {
                o.spec
                    .as_ref()
                    .map(|s| s.selector.clone())
                    .unwrap_or_default()
            });
        let sts = self
            .clone()
            .follow_selectors::<StatefulSet>("StatefulSet", |o| {
                o.spec
                    .as_ref()
                    .map(|s| s.selector.clone())
                    .unwrap_or_default()
            });
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let namespaces = inform(
            Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone()),
            |n| n.metadata.name.clone().unwrap_or_default(),
            |n, _| {
                let name = n.metadata.name.clone().unwrap_or_default();
                let labels = n.metadata.labels.clone().unwrap_or_default();
                self.cache
                    .lock()
                    .unwrap()
                    .namespace_labels
                    .insert(name, labels);
            },
            |n| {
                self.cache
                    .lock()
                    .unwrap()
                    .namespace_labels
                    .remove(n.metadata.name.as_deref().unwrap_or_default());
            },
            |seen| {
                self.cache
                    .lock()
                    .unwrap()
                    .namespace_labels
                    .retain(|k, _| seen.contains(k))
            },
            tx,
        );
        tokio::join!(services, rcs, rss, sts, namespaces);
    }

    async fn follow_selectors<K>(
        self: Arc<Self>,
        kind: &'static str,
        selector: fn(&K) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
    {
        let id = move |o: &K| {
            format!(
                "{kind}/{}/{}",
                o.meta().namespace.as_deref().unwrap_or_default(),
                o.meta().name.as_deref().unwrap_or_default()
            )
        };
        let (tx, _rx) = tokio::sync::oneshot::channel();
        inform(
            Api::<K>::all(self.client.clone()),
            |o: &K| {
                format!(
                    "{}/{}",
                    o.meta().namespace.as_deref().unwrap_or_default(),
                    o.meta().name.as_deref().unwrap_or_default()
                )
            },
            |o, _| {
                let ns = o.meta().namespace.clone().unwrap_or_default();
                self.cache
                    .lock()
                    .unwrap()
                    .workload_selectors
                    .insert(id(&o), (ns, selector(&o)));
            },
            |o| {
                self.cache
                    .lock()
                    .unwrap()
                    .workload_selectors
                    .remove(&id(&o));
            },
            |seen| {
                self.cache
                    .lock()
                    .unwrap()
                    .workload_selectors
                    .retain(|k, _| {
                        !k.starts_with(&format!("{kind}/")) || seen.contains(&k[kind.len() + 1..])
                    });
            },
            tx,
        )
        .await
    }

    async fn watch_pods(self: Arc<Self>, synced: tokio::sync::oneshot::Sender<()>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        inform(
            api,
            |p: &Pod| p.metadata.uid.clone().unwrap_or_default(),
            |p, _| self.apply_pod(p),
            |p| {
                self.queue.delete(&pod_key(&p));
                self.last_failure.lock().unwrap().remove(&pod_key(&p));
                let uid = p.metadata.uid.clone().unwrap_or_default();
                let mut c = self.cache.lock().unwrap();
                let was_counted = c.node_of(&uid).is_some();
                c.remove_pod(&uid);
                drop(c);
                if was_counted {
                    self.queue.move_all();
                }
            },
            |seen| {
                let mut c = self.cache.lock().unwrap();
                for uid in c.bound_uids() {
                    if !seen.contains(&uid) {
                        c.remove_pod(&uid);
                    }
                }
            },
            synced,
        )
        .await
    }

    /// One scheduling cycle: PreFilter, Filter (up to the number of feasible nodes to find),
    /// PreScore, Score with normalisation and weights; the best node, ties broken in turn.
    fn schedule_one(
        &self,
        profile: &Profile,
        pod: &PodInfo,
        cache: &Cache,
    ) -> Result<(String, CycleState), Box<Failure>> {
        let mut state = CycleState::default();
        let total = cache.nodes.len();
        if total == 0 {
            return Err(Box::new(Failure {
                statuses: HashMap::new(),
                message: "no nodes available to schedule pods".into(),
                state,
            }));
        }
        for p in &profile.pre_filter {
            let s = p.pre_filter(&mut state, pod, cache);
            match s.code {
                Code::Success | Code::Skip => {}
                _ => {
                    let statuses = cache
                        .nodes
                        .iter()
                        .map(|n| (n.name.clone(), s.clone()))
                        .collect();
                    return Err(Box::new(Failure {
                        message: fit_error_message(total, &HashMap::new(), Some(&s)),
                        statuses,
                        state,
                    }));
                }
            }
        }
        let want = profile.nodes_to_find(total);
        let start = if total == 0 {
            0
        } else {
            self.next_start.load(Ordering::Relaxed) % total
        };
        let mut feasible = Vec::new();
        let mut statuses = HashMap::new();
        let mut processed = 0;
        for i in 0..total {
            let node = &cache.nodes[(start + i) % total];
            processed += 1;
            let s = profile.run_filters(&state, pod, node);
            if s.is_success() {
                feasible.push(node);
                if feasible.len() >= want {
                    break;
                }
            } else {
                statuses.insert(node.name.clone(), s);
            }
        }
        if total > 0 {
            self.next_start
                .store((start + processed) % total, Ordering::Relaxed);
        }
        if feasible.is_empty() {
            return Err(Box::new(Failure {
                message: fit_error_message(total, &statuses, None),
                statuses,
                state,
            }));
        }
        if feasible.len() == 1 {
            return Ok((feasible[0].name.clone(), state));
        }
        let mut totals = vec![0i64; feasible.len()];
        for (plugin, weight) in &profile.score {
            if plugin.pre_score(&mut state, pod, &feasible, cache).code == Code::Skip {
                continue;
            }
            let mut scores: Vec<i64> = feasible
                .iter()
                .map(|n| plugin.score(&state, pod, n))
                .collect();
            plugin.normalize(&state, &mut scores);
            for (t, s) in totals.iter_mut().zip(scores) {
                *t += weight * s;
            }
        }
        let best = totals.iter().copied().max().unwrap_or(0);
        let ties: Vec<usize> = (0..feasible.len()).filter(|i| totals[*i] == best).collect();
        let pick = ties[self.next_start.load(Ordering::Relaxed) % ties.len()];
        tracing::debug!(pod = %pod.key, ?totals, nodes = ?feasible.iter().map(|n| &n.name).collect::<Vec<_>>(), "scores");
        Ok((feasible[pick].name.clone(), state))
    }

    async fn schedule_loop(self: Arc<Self>) {
        while let Some(popped) = self.queue.pop().await {
            let info = popped.info;
            let name = info
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.scheduler_name.clone())
                .unwrap_or_else(|| "default-scheduler".into());
            let Some(profile) = self.profiles.get(&name).cloned() else {
                self.queue.done(&info.key, Outcome::Done);
                continue;
            };
            let reserved = self.nominated.lock().unwrap().remove(&info.key);
            let result = {
                let mut cache = self.cache.lock().unwrap();
                if reserved.is_some() {
                    // Its own reservation must not stand in its way.
                    cache.forget(&info.uid);
                }
                match self.schedule_one(&profile, &info, &cache) {
                    Ok(chosen) => Ok(chosen),
                    Err(f)
                        if reserved
                            .as_deref()
                            .is_some_and(|n| victims_leaving(&cache, n, info.priority)) =>
                    {
                        // Victims are still on their way out: wait for them, keep the room.
                        let node = reserved.clone().unwrap_or_default();
                        Err((
                            f.message,
                            Some(Ok(framework::Nomination {
                                node,
                                victims: vec![],
                            })),
                        ))
                    }
                    Err(f) => {
                        // PostFilter (preemption) sees the same cache.
                        let nomination = if cache.nodes.is_empty() {
                            None
                        } else {
                            profile.post_filter.iter().find_map(|p| {
                                p.post_filter(&f.state, &info, &cache, &f.statuses, &profile)
                            })
                        };
                        Err((f.message, nomination))
                    }
                }
            };
            match result {
                Ok((node, mut state)) => {
                    // Reserve and Permit, then assume and bind asynchronously.
                    if let Err(s) = profile.reserve_and_permit(&mut state, &info, &node) {
                        let point = if profile.reserve.iter().any(|p| p.name() == s.plugin) {
                            "Reserve"
                        } else {
                            "Permit"
                        };
                        let message = format!(
                            "running {point} plugin {:?}: {}",
                            s.plugin,
                            s.reasons.join(", ")
                        );
                        self.queue.done(&info.key, Outcome::Unschedulable);
                        tokio::spawn(self.clone().report_unschedulable(info, message, None));
                        continue;
                    }
                    self.cache.lock().unwrap().assume(info.clone(), &node);
                    let permit = self.binds.clone().acquire_owned().await;
                    tokio::spawn(self.clone().bind(
                        info,
                        node,
                        state,
                        profile.clone(),
                        permit.ok(),
                    ));
                }
                Err((message, nomination)) => {
                    let (message, nominated) = match nomination {
                        Some(Ok(n)) => {
                            self.preempt(&info, &n.victims);
                            self.cache.lock().unwrap().assume(info.clone(), &n.node);
                            self.nominated
                                .lock()
                                .unwrap()
                                .insert(info.key.clone(), n.node.clone());
                            let what = if n.victims.is_empty() {
                                format!(
                                    "waiting for lower-priority pods on {} to terminate.",
                                    n.node
                                )
                            } else {
                                format!(
                                    "preempting {} lower-priority pod(s) on {}.",
                                    n.victims.len(),
                                    n.node
                                )
                            };
                            (format!("{message} preemption: {what}"), Some(n.node))
                        }
                        Some(Err(m)) => (format!("{message} {m}"), None),
                        None => (message, None),
                    };
                    self.queue.done(&info.key, Outcome::Unschedulable);
                    tokio::spawn(self.clone().report_unschedulable(info, message, nominated));
                }
            }
        }
    }

    fn preempt(&self, preemptor: &PodInfo, victims: &[Arc<PodInfo>]) {
        for v in victims {
            let client = self.client.clone();
            let victim = v.pod.clone();
            let events = self.events.clone();
            let by = preemptor.key.clone();
            tokio::spawn(async move {
                let api: Api<Pod> = Api::namespaced(
                    client,
                    victim.metadata.namespace.as_deref().unwrap_or_default(),
                );
                let name = victim.metadata.name.clone().unwrap_or_default();
                let res = api.delete(&name, &DeleteParams::default()).await;
                match res {
                    Ok(_) => {
                        events.record(
                            &*victim,
                            "Normal",
                            "Preempted",
                            format!("Preempted by pod {by}"),
                        );
                    }
                    Err(e) if api_code(&e) == Some(404) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, victim = %name, "scheduler: preemption delete failed")
                    }
                }
            });
        }
    }

    async fn bind(
        self: Arc<Self>,
        info: Arc<PodInfo>,
        node: String,
        state: CycleState,
        profile: Arc<Profile>,
        _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        if let Err(s) = profile.run_pre_bind(&state, &info, &node) {
            tracing::warn!(pod = %info.key, plugin = s.plugin, reasons = ?s.reasons, "scheduler: PreBind failed");
            profile.unreserve(&state, &info, &node);
            self.cache.lock().unwrap().forget(&info.uid);
            self.queue.done(&info.key, Outcome::Error);
            return;
        }
        let ns = info.namespace().to_string();
        let name = info.pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": info.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        match api
            .create_subresource::<serde_json::Value, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                self.queue.done(&info.key, Outcome::Done);
                self.last_failure.lock().unwrap().remove(&info.key);
                self.events.record(
                    &*info.pod,
                    "Normal",
                    "Scheduled",
                    format!("Successfully assigned {ns}/{name} to {node}"),
                );
            }
            Err(e) => {
                profile.unreserve(&state, &info, &node);
                self.cache.lock().unwrap().forget(&info.uid);
                let gone = matches!(api_code(&e), Some(404) | Some(409));
                tracing::debug!(error = %e, pod = %info.key, "scheduler: binding failed");
                self.queue
                    .done(&info.key, if gone { Outcome::Done } else { Outcome::Error });
            }
        }
    }

    /// PodScheduled=False/Unschedulable with the message, nominatedNodeName when preempting,
    /// and a FailedScheduling event; the condition is written only when the message changes.
    async fn report_unschedulable(
        self: Arc<Self>,
        info: Arc<PodInfo>,
        message: String,
        nominated: Option<String>,
    ) {
        self.events
            .record(&*info.pod, "Warning", "FailedScheduling", message.clone());
        {
            let mut last = self.last_failure.lock().unwrap();
            if last.get(&info.key) == Some(&message) && nominated.is_none() {
                return;
            }
            last.insert(info.key.clone(), message.clone());
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), info.namespace());
        let mut status = json!({"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": message, "lastProbeTime": null,
            "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }]});
        if let Some(n) = nominated {
            status["nominatedNodeName"] = json!(n);
        }
        let name = info.pod.metadata.name.clone().unwrap_or_default();
        if let Err(e) = api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": status})),
            )
            .await
        {
            tracing::debug!(error = %e, pod = %info.key, "scheduler: status update failed");
        }
    }
}

/// Follow every object of a kind through a kube-runtime watcher: `apply(obj, initial)` for each
/// object listed or changed, `delete` for deletions, `resync(keys seen)` after each (re)list so
/// that what vanished meanwhile is dropped, and `synced` once the first list is in.
async fn inform<K>(
    api: Api<K>,
    key: fn(&K) -> String,
    mut apply: impl FnMut(K, bool),
    mut delete: impl FnMut(K),
    mut resync: impl FnMut(HashSet<String>),
    synced: tokio::sync::oneshot::Sender<()>,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let mut synced = Some(synced);
    let mut seen: Option<HashSet<String>> = None;
    // managedFields are never read here: not even decoded.
    let mut stream = watcher(Slim::api(&api), watcher::Config::default()).boxed();
    while let Some(ev) = stream.next().await {
        let ev = ev.map(Slim::event);
        match ev {
            Ok(watcher::Event::Init) => seen = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let Some(seen) = seen.as_mut() {
                    seen.insert(key(&o));
                }
                apply(o, true);
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = seen.take() {
                    resync(seen);
                }
                if let Some(tx) = synced.take() {
                    let _ = tx.send(());
                }
            }
            Ok(watcher::Event::Apply(o)) => apply(o, false),
            Ok(watcher::Event::Delete(o)) => delete(o),
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: watch error; the watcher retries");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Whether lower-priority pods on `node` are still terminating (a preemption under way).
fn victims_leaving(cache: &Cache, node: &str, priority: i32) -> bool {
    cache.node(node).is_some_and(|n| {
        n.pods
            .iter()
            .any(|p| p.priority < priority && p.pod.metadata.deletion_timestamp.is_some())
    })
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
