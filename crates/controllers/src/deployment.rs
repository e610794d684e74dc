//! The Deployment controller, after upstream's: one ReplicaSet per pod template (named by the
//! template's hash), RollingUpdate within maxSurge/maxUnavailable or Recreate, proportional
//! scaling mid-rollout, revisions and their history limit, pause and resume, and the Progressing
//! and Available conditions (including ProgressDeadlineExceeded).
//!
//! Rollback is `kubectl rollout undo` putting an old template back: the ReplicaSet with that
//! template becomes the new one again and gets the next revision.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::{Selector, SelectorExt};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::claim::{self, ok_or_gone, Claim};
use crate::events::Recorder;
use crate::replicaset::owner_ref;
use crate::runtime::{self, Informer, Queue};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const HASH_LABEL: &str = "pod-template-hash";

/// The status counters; zero ones are left out, as upstream's `omitempty` leaves them.
const COUNTS: [&str; 5] = [
    "replicas",
    "updatedReplicas",
    "readyReplicas",
    "availableReplicas",
    "unavailableReplicas",
];

/// Annotations a Deployment does not pass on to its ReplicaSets.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];

pub struct DeploymentController {
    client: Client,
    deployments: Arc<Informer<Deployment>>,
    replicasets: Arc<Informer<ReplicaSet>>,
    pods: Arc<Informer<Pod>>,
    queue: Arc<Queue>,
    recorder: Recorder,
    /// ReplicaSet sizes this controller wrote that its cache may not show yet:
    /// uid → (resourceVersion written, replicas).
    written: Mutex<HashMap<String, (u64, i32)>>,
}

/// A ReplicaSet as the rollout sees it.
#[derive(Clone)]
struct Rs {
    obj: Arc<ReplicaSet>,
    replicas: i32,
}

impl Rs {
    fn name(&self) -> String {
        self.obj.name_any()
    }
    fn status(&self) -> k8s_openapi::api::apps::v1::ReplicaSetStatus {
        self.obj.status.clone().unwrap_or_default()
    }
    fn available(&self) -> i32 {
        self.status().available_replicas.unwrap_or(0)
    }
    /// Available pods the rollout may count on: never more than the size this controller last
    /// set. Right after a scale-down the ReplicaSet's status still counts the pods being
    /// deleted; counting them would let the next sync scale down past maxUnavailable.
    fn usable(&self) -> i32 {
        self.available().min(self.replicas)
    }
    /// Pods this ReplicaSet may still have running: its size, or more while a scale-down has
    /// not yet been carried out (its status still counts the pods it is deleting).
    fn occupied(&self) -> i32 {
        self.replicas.max(self.status().replicas)
    }
    fn revision(&self) -> i64 {
        revision_of(&self.obj)
    }
    fn created(&self) -> Option<Timestamp> {
        self.obj.metadata.creation_timestamp.as_ref().map(|t| t.0)
    }
    fn annotation(&self, k: &str) -> Option<String> {
        self.obj.annotations().get(k).cloned()
    }
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// `maxSurge`/`maxUnavailable` against `total`: percentages round up for surge, down for
/// unavailability.
pub fn resolve(v: Option<&IntOrString>, default_pct: i32, total: i32, round_up: bool) -> i32 {
    let pct = |p: i32| {
        let x = p as i64 * total as i64;
        (if round_up { (x + 99) / 100 } else { x / 100 }) as i32
    };
    match v {
        None => pct(default_pct),
        Some(IntOrString::Int(i)) => *i,
        Some(IntOrString::String(s)) => match s.strip_suffix('%').and_then(|p| p.parse().ok()) {
            Some(p) => pct(p),
            None => s.parse().unwrap_or(0),
        },
    }
}

struct Params {
    replicas: i32,
    rolling: bool,
    max_surge: i32,
    max_unavailable: i32,
}

fn params(d: &Deployment) -> Params {
    let spec = d.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1);
    let strategy = spec.strategy.unwrap_or_default();
    let rolling = strategy.type_.as_deref() != Some("Recreate");
    if !rolling {
        return Params {
            replicas,
            rolling,
            max_surge: 0,
            max_unavailable: 0,
        };
    }
    let ru = strategy.rolling_update.unwrap_or_default();
    let surge = resolve(ru.max_surge.as_ref(), 25, replicas, true);
    let mut unavailable = resolve(ru.max_unavailable.as_ref(), 25, replicas, false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    Params {
        replicas,
        rolling,
        max_surge: surge,
        max_unavailable: unavailable.min(replicas),
    }
}

/// The template's hash (FNV-1a over its JSON, plus the collision count), spelled as upstream
/// spells hashes in names.
pub fn template_hash(t: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut h: u32 = 0x811c9dc5;
    let mut feed = |b: &[u8]| {
        for x in b {
            h ^= *x as u32;
            h = h.wrapping_mul(0x01000193);
        }
    };
    feed(serde_json::to_string(t).unwrap_or_default().as_bytes());
    if let Some(c) = collision_count {
        feed(&c.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| ALPHABET[(b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// Templates equal once the hash label is set aside (and empty label or annotation maps count
/// as absent). Only the metadata is copied to compare: the spec, most of a template, is compared
/// in place.
fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    let strip = |t: &PodTemplateSpec| {
        let mut m = t.metadata.clone().unwrap_or_default();
        if let Some(l) = m.labels.as_mut() {
            l.remove(HASH_LABEL);
        }
        if m.labels.as_ref().is_some_and(|l| l.is_empty()) {
            m.labels = None;
        }
        if m.annotations.as_ref().is_some_and(|a| a.is_empty()) {
            m.annotations = None;
        }
        m
    };
    a.spec == b.spec && strip(a) == strip(b)
}

fn rv_num(rs: &ReplicaSet) -> u64 {
    rs.metadata
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn condition<'a>(status: &'a Value, t: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
}

impl DeploymentController {
    pub fn new(
        client: Client,
        deployments: Arc<Informer<Deployment>>,
        replicasets: Arc<Informer<ReplicaSet>>,
        pods: Arc<Informer<Pod>>,
        recorder: Recorder,
    ) -> Arc<Self> {
        let dc = Arc::new(DeploymentController {
            client,
            deployments: deployments.clone(),
            replicasets: replicasets.clone(),
            pods: pods.clone(),
            queue: Queue::new(),
            recorder,
            written: Mutex::new(HashMap::new()),
        });
        let q = dc.queue.clone();
        deployments.on(move |_old, new| {
            if let Some(d) = new {
                q.add(runtime::key_of(d));
            }
        });
        let weak = Arc::downgrade(&dc);
        replicasets.on(move |old, new| {
            let Some(dc) = weak.upgrade() else { return };
            // A ReplicaSet whose status alone moved (pods created, ready): one sync per burst.
            let status_only = matches!((old, new), (Some(o), Some(n))
                if o.spec == n.spec && o.metadata.owner_references == n.metadata.owner_references
                    && o.metadata.deletion_timestamp == n.metadata.deletion_timestamp);
            for rs in [old, new].into_iter().flatten() {
                match runtime::controller_ref(rs) {
                    Some(r) if r.kind == "Deployment" => {
                        let key = format!("{}/{}", rs.namespace().unwrap_or_default(), r.name);
                        if status_only {
                            dc.queue.add_soon(key)
                        } else {
                            dc.queue.add(key)
                        }
                    }
                    Some(_) => {}
                    None => {
                        for d in dc
                            .deployments
                            .list_namespace(&rs.namespace().unwrap_or_default())
                        {
                            if selector_of(&d).is_some_and(|s| s.matches(rs.labels())) {
                                dc.queue.add(runtime::key_of(&*d));
                            }
                        }
                    }
                }
            }
        });
        // Recreate waits for old pods to be gone: their deletion brings the Deployment back.
        let weak = Arc::downgrade(&dc);
        pods.on(move |old, new| {
            let (Some(p), None) = (old, new) else { return };
            let Some(dc) = weak.upgrade() else { return };
            let ns = p.namespace().unwrap_or_default();
            let Some(r) = runtime::controller_ref(p).filter(|r| r.kind == "ReplicaSet") else {
                return;
            };
            if let Some(rs) = dc.replicasets.get(&format!("{ns}/{}", r.name)) {
                if let Some(d) = runtime::controller_ref(&*rs).filter(|r| r.kind == "Deployment") {
                    dc.queue.add(format!("{ns}/{}", d.name));
                }
            }
        });
        dc
    }

    pub async fn run(self: Arc<Self>, workers: usize) {
        self.deployments.wait_synced().await;
        self.replicasets.wait_synced().await;
        self.pods.wait_synced().await;
        for d in self.deployments.list() {
            self.queue.add(runtime::key_of(&*d));
        }
        let me = self.clone();
        self.queue
            .clone()
            .run(workers, "deployment", move |key| {
                let me = me.clone();
                async move { me.sync(&key).await }
            })
            .await;
    }

    fn rs_api(&self, ns: &str) -> Api<ReplicaSet> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The ReplicaSets this Deployment controls, adopting matching orphans and releasing
    /// non-matching ones, with sizes this controller wrote overlaid on a lagging cache.
    async fn claim(&self, d: &Deployment, selector: &Selector) -> anyhow::Result<Vec<Rs>> {
        let uid = d.metadata.uid.clone().unwrap_or_default();
        let ns = d.namespace().unwrap_or_default();
        let deleting = d.metadata.deletion_timestamp.is_some();
        let mut out = Vec::new();
        let api = self.rs_api(&ns);
        for rs in self.replicasets.list_claimable(&ns, &uid) {
            let matches = selector.matches(rs.labels());
            match claim::classify(&*rs, &uid, matches, deleting) {
                Claim::Keep => out.push(rs),
                Claim::Release => {
                    claim::release(&api, &*rs, &uid).await?;
                }
                Claim::Adopt => {
                    if claim::adopt(&api, &*rs, owner_ref(d, &uid)).await? {
                        out.push(rs);
                    }
                }
                Claim::Ignore => {}
            }
        }
        let written = self.written.lock().unwrap();
        Ok(out
            .into_iter()
            .map(|obj| {
                let mut replicas = obj.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                if let Some((rv, n)) = written.get(obj.metadata.uid.as_deref().unwrap_or_default())
                {
                    if rv_num(&obj) < *rv {
                        replicas = *n;
                    }
                }
                Rs { obj, replicas }
            })
            .collect())
    }

    async fn sync(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let Some(d) = self.deployments.get(key) else {
            return Ok(None);
        };
        let Some(selector) = selector_of(&d) else {
            self.recorder.record(
                &*d,
                "Warning",
                "SelectingAll",
                "This deployment is selecting all pods. A non-empty selector is required.".into(),
            );
            return Ok(None);
        };
        let all = self.claim(&d, &selector).await?;
        if d.metadata.deletion_timestamp.is_some() {
            let (new_rs, old) = self.split(&d, &all);
            return self.write_status(&d, new_rs.as_ref(), &old).await;
        }
        let spec = d.spec.clone().unwrap_or_default();
        let paused = spec.paused.unwrap_or(false);
        self.paused_condition(&d, paused).await?;
        let p = params(&d);
        if paused || self.is_scaling_event(&all, &p) {
            let (new_rs, old) = self.split(&d, &all);
            self.scale(&d, new_rs.as_ref(), &old, &p).await?;
            if paused {
                self.cleanup(&d, &old).await?;
            }
            return self.write_status(&d, new_rs.as_ref(), &old).await;
        }
        if p.rolling {
            self.rollout_rolling(&d, all, &p).await
        } else {
            self.rollout_recreate(&d, all, &p).await
        }
    }

    /// The ReplicaSet with the Deployment's template (oldest first if several), and the rest.
    fn split(&self, d: &Deployment, all: &[Rs]) -> (Option<Rs>, Vec<Rs>) {
        let template = d
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let mut sorted = all.to_vec();
        sorted.sort_by_key(|r| (r.created(), r.name()));
        let idx = sorted.iter().position(|r| {
            r.obj
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| equal_ignore_hash(t, &template))
        });
        match idx {
            Some(i) => {
                let new_rs = sorted.remove(i);
                (Some(new_rs), sorted)
            }
            None => (None, sorted),
        }
    }

    fn is_scaling_event(&self, all: &[Rs], p: &Params) -> bool {
        all.iter().filter(|r| r.replicas > 0).any(|r| {
            r.annotation(DESIRED_REPLICAS)
                .and_then(|a| a.parse::<i32>().ok())
                .is_some_and(|want| want != p.replicas)
        })
    }

    async fn paused_condition(&self, d: &Deployment, paused: bool) -> anyhow::Result<()> {
        let status = serde_json::to_value(&d.status).unwrap_or(Value::Null);
        let cur = condition(&status, "Progressing");
        let reason = cur.and_then(|c| c["reason"].as_str()).unwrap_or_default();
        let (want, message) = if paused && reason != "DeploymentPaused" {
            ("DeploymentPaused", "Deployment is paused")
        } else if !paused && reason == "DeploymentPaused" {
            ("DeploymentResumed", "Deployment is resumed")
        } else {
            return Ok(());
        };
        if d.spec.as_ref().and_then(|s| s.progress_deadline_seconds) == Some(i32::MAX) {
            return Ok(());
        }
        let mut status = status;
        set_condition(&mut status, "Progressing", "Unknown", want, message, true);
        self.patch_status(d, status).await
    }

    /// Find the new ReplicaSet, creating it if asked; bring its revision and annotations up to
    /// date; record the Deployment's revision.
    async fn new_replica_set(
        &self,
        d: &Deployment,
        all: &[Rs],
        create: bool,
        p: &Params,
    ) -> anyhow::Result<(Option<Rs>, Vec<Rs>)> {
        let (existing, old) = self.split(d, all);
        let max_old = old.iter().map(Rs::revision).max().unwrap_or(0);
        let ns = d.namespace().unwrap_or_default();
        let spec = d.spec.clone().unwrap_or_default();
        let min_ready = spec.min_ready_seconds.unwrap_or(0);
        if let Some(rs) = existing {
            let revision = rs.revision();
            let want_rev = if revision <= max_old {
                max_old + 1
            } else {
                revision
            };
            let mut annotations: BTreeMap<String, String> = rs.obj.annotations().clone();
            copy_annotations(d, &mut annotations);
            if want_rev != revision {
                annotations.insert(REVISION.into(), want_rev.to_string());
                if revision > 0 {
                    let mut hist: Vec<String> = annotations
                        .get(REVISION_HISTORY)
                        .map(|h| h.split(',').map(String::from).collect())
                        .unwrap_or_default();
                    hist.push(revision.to_string());
                    annotations.insert(REVISION_HISTORY.into(), hist.join(","));
                }
            }
            let rs_min_ready = rs
                .obj
                .spec
                .as_ref()
                .and_then(|s| s.min_ready_seconds)
                .unwrap_or(0);
            let mut rs = rs;
            if &annotations != rs.obj.annotations() || rs_min_ready != min_ready {
                let patch = json!({"metadata": {"annotations": annotations, "resourceVersion": rs.obj.metadata.resource_version},
                                   "spec": {"minReadySeconds": min_ready}});
                let updated = self
                    .rs_api(&ns)
                    .patch(&rs.name(), &PatchParams::default(), &Patch::Merge(patch))
                    .await?;
                rs = Rs {
                    obj: Arc::new(updated),
                    replicas: rs.replicas,
                };
            }
            self.set_deployment_revision(d, want_rev).await?;
            return Ok((Some(rs), old));
        }
        if !create {
            return Ok((None, old));
        }
        // A new ReplicaSet for the current template.
        let status = d.status.clone().unwrap_or_default();
        let mut collision = status.collision_count;
        for _ in 0..5 {
            let hash = template_hash(&spec.template, collision);
            let name = format!("{}-{hash}", d.name_any());
            let mut template = spec.template.clone();
            let tm = template.metadata.get_or_insert_with(Default::default);
            tm.labels
                .get_or_insert_with(Default::default)
                .insert(HASH_LABEL.into(), hash.clone());
            let mut selector = spec.selector.clone();
            selector
                .match_labels
                .get_or_insert_with(Default::default)
                .insert(HASH_LABEL.into(), hash.clone());
            let mut annotations = BTreeMap::new();
            copy_annotations(d, &mut annotations);
            let revision = max_old + 1;
            annotations.insert(REVISION.into(), revision.to_string());
            annotations.insert(DESIRED_REPLICAS.into(), p.replicas.to_string());
            annotations.insert(MAX_REPLICAS.into(), (p.replicas + p.max_surge).to_string());
            let replicas = new_rs_replicas(all, None, p);
            let mut labels = template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            labels.insert(HASH_LABEL.into(), hash.clone());
            let rs = ReplicaSet {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: Some(annotations),
                    owner_references: Some(vec![owner_ref(
                        d,
                        d.metadata.uid.as_deref().unwrap_or_default(),
                    )]),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                    replicas: Some(replicas),
                    min_ready_seconds: Some(min_ready),
                    selector,
                    template: Some(template.clone()),
                }),
                status: None,
            };
            match self.rs_api(&ns).create(&PostParams::default(), &rs).await {
                Ok(created) => {
                    self.recorder.record(
                        d,
                        "Normal",
                        "ScalingReplicaSet",
                        format!("Scaled up replica set {name} from 0 to {replicas}"),
                    );
                    let mut st = serde_json::to_value(&d.status).unwrap_or(json!({}));
                    if has_progress_deadline(d) {
                        set_condition(
                            &mut st,
                            "Progressing",
                            "True",
                            "NewReplicaSetCreated",
                            &format!("Created new replica set \"{name}\""),
                            true,
                        );
                        self.patch_status(d, st).await?;
                    }
                    self.set_deployment_revision(d, revision).await?;
                    self.note_written(&created);
                    return Ok((
                        Some(Rs {
                            obj: Arc::new(created),
                            replicas,
                        }),
                        old,
                    ));
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    // Ours already (a lagging cache)? Otherwise a hash collision: count it.
                    if let Some(cur) = self.rs_api(&ns).get_opt(&name).await? {
                        let ours = runtime::controller_uid(&cur) == d.metadata.uid.as_deref();
                        let same = cur
                            .spec
                            .as_ref()
                            .and_then(|s| s.template.as_ref())
                            .is_some_and(|t| equal_ignore_hash(t, &spec.template));
                        if ours && same {
                            let replicas = cur.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
                            return Ok((
                                Some(Rs {
                                    obj: Arc::new(cur),
                                    replicas,
                                }),
                                old,
                            ));
                        }
                    }
                    collision = Some(collision.unwrap_or(0) + 1);
                    self.patch_status(d, json!({"collisionCount": collision}))
                        .await?;
                }
                Err(e) => {
                    let mut st = serde_json::to_value(&d.status).unwrap_or(json!({}));
                    set_condition(
                        &mut st,
                        "ReplicaFailure",
                        "True",
                        "FailedCreate",
                        &e.to_string(),
                        true,
                    );
                    let _ = self.patch_status(d, st).await;
                    self.recorder.record(
                        d,
                        "Warning",
                        "FailedCreate",
                        format!("Failed to create new replica set {name}: {e}"),
                    );
                    return Err(e.into());
                }
            }
        }
        anyhow::bail!("too many hash collisions for {}", d.name_any())
    }

    async fn set_deployment_revision(&self, d: &Deployment, revision: i64) -> anyhow::Result<()> {
        let cur = d
            .annotations()
            .get(REVISION)
            .and_then(|r| r.parse::<i64>().ok());
        if cur == Some(revision) {
            return Ok(());
        }
        let api: Api<Deployment> =
            Api::namespaced(self.client.clone(), &d.namespace().unwrap_or_default());
        let patch = json!({"metadata": {"annotations": {REVISION: revision.to_string()}}});
        ok_or_gone(
            api.patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(patch))
                .await,
        )?;
        Ok(())
    }

    fn note_written(&self, rs: &ReplicaSet) {
        let uid = rs.metadata.uid.clone().unwrap_or_default();
        let replicas = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let mut w = self.written.lock().unwrap();
        w.insert(uid, (rv_num(rs), replicas));
        if w.len() > 100_000 {
            w.clear();
        }
    }

    /// Set a ReplicaSet's size (and the annotations that say for which Deployment size).
    async fn scale_rs(
        &self,
        d: &Deployment,
        rs: &mut Rs,
        to: i32,
        p: &Params,
    ) -> anyhow::Result<bool> {
        let desired = p.replicas.to_string();
        let max = (p.replicas + p.max_surge).to_string();
        let annotations_ok = rs.annotation(DESIRED_REPLICAS).as_deref() == Some(desired.as_str())
            && rs.annotation(MAX_REPLICAS).as_deref() == Some(max.as_str());
        if rs.replicas == to && annotations_ok {
            return Ok(false);
        }
        let ns = d.namespace().unwrap_or_default();
        let patch = json!({
            "metadata": {"annotations": {DESIRED_REPLICAS: desired, MAX_REPLICAS: max},
                         "resourceVersion": rs.obj.metadata.resource_version},
            "spec": {"replicas": to},
        });
        let updated = self
            .rs_api(&ns)
            .patch(&rs.name(), &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        self.note_written(&updated);
        let from = rs.replicas;
        if from != to {
            let dir = if to > from { "up" } else { "down" };
            self.recorder.record(
                d,
                "Normal",
                "ScalingReplicaSet",
                format!("Scaled {dir} replica set {} from {from} to {to}", rs.name()),
            );
        }
        *rs = Rs {
            obj: Arc::new(updated),
            replicas: to,
        };
        Ok(from != to)
    }

    async fn rollout_rolling(
        &self,
        d: &Deployment,
        all: Vec<Rs>,
        p: &Params,
    ) -> anyhow::Result<Option<Duration>> {
        let (new_rs, mut old) = self.new_replica_set(d, &all, true, p).await?;
        let mut new_rs = new_rs.expect("created when missing");
        // Scale up the new ReplicaSet as far as maxSurge allows.
        let mut everything: Vec<Rs> = old.clone();
        everything.push(new_rs.clone());
        let target = if new_rs.replicas > p.replicas {
            p.replicas
        } else {
            new_rs_replicas(&everything, Some(&new_rs), p)
        };
        if target != new_rs.replicas {
            self.scale_rs(d, &mut new_rs, target, p).await?;
            return self.rollout_status(d, Some(&new_rs), &old).await;
        }
        // Scale down old ones as far as maxUnavailable allows.
        if self.reconcile_old(d, &mut old, &new_rs, p).await? {
            return self.rollout_status(d, Some(&new_rs), &old).await;
        }
        if complete(d, &self.compute_status(d, Some(&new_rs), &old)) {
            self.cleanup(d, &old).await?;
        }
        self.rollout_status(d, Some(&new_rs), &old).await
    }

    async fn reconcile_old(
        &self,
        d: &Deployment,
        old: &mut [Rs],
        new_rs: &Rs,
        p: &Params,
    ) -> anyhow::Result<bool> {
        let old_pods: i32 = old.iter().map(|r| r.replicas).sum();
        if old_pods == 0 {
            return Ok(false);
        }
        let all_pods = old_pods + new_rs.replicas;
        let min_available = p.replicas - p.max_unavailable;
        let new_unavailable = new_rs.replicas - new_rs.usable();
        let max_scaled_down = all_pods - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(false);
        }
        old.sort_by_key(|r| (r.created(), r.name()));
        // First the unhealthy replicas of old ReplicaSets.
        let mut cleaned = 0;
        for rs in old.iter_mut() {
            if cleaned >= max_scaled_down {
                break;
            }
            if rs.replicas == 0 || rs.usable() >= rs.replicas {
                continue;
            }
            let n = (max_scaled_down - cleaned).min(rs.replicas - rs.usable());
            let to = rs.replicas - n;
            self.scale_rs(d, rs, to, p).await?;
            cleaned += n;
        }
        // Then healthy ones, down to minAvailable.
        let available: i32 = old.iter().map(Rs::usable).sum::<i32>() + new_rs.usable();
        let mut scaled = 0;
        if available > min_available {
            let total = available - min_available;
            for rs in old.iter_mut() {
                if scaled >= total {
                    break;
                }
                if rs.replicas == 0 {
                    continue;
                }
                let n = rs.replicas.min(total - scaled);
                let to = rs.replicas - n;
                self.scale_rs(d, rs, to, p).await?;
                scaled += n;
            }
        }
        Ok(cleaned + scaled > 0)
    }

    async fn rollout_recreate(
        &self,
        d: &Deployment,
        all: Vec<Rs>,
        p: &Params,
    ) -> anyhow::Result<Option<Duration>> {
        let (new_rs, mut old) = self.new_replica_set(d, &all, false, p).await?;
        let mut scaled = false;
        for rs in old.iter_mut().filter(|r| r.replicas > 0) {
            scaled |= self.scale_rs(d, rs, 0, p).await?;
        }
        if scaled {
            return self.rollout_status(d, new_rs.as_ref(), &old).await;
        }
        // Wait until every old pod is gone.
        let ns = d.namespace().unwrap_or_default();
        let old_uids: Vec<&str> = old
            .iter()
            .filter_map(|r| r.obj.metadata.uid.as_deref())
            .collect();
        let running = old_uids.iter().any(|uid| {
            self.pods.list_controlled_by(uid).iter().any(|p| {
                p.namespace().as_deref() == Some(ns.as_str())
                    && !matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    )
            })
        });
        if running {
            return self.rollout_status(d, new_rs.as_ref(), &old).await;
        }
        let new_rs = match new_rs {
            Some(r) => r,
            None => self
                .new_replica_set(d, &all, true, p)
                .await?
                .0
                .expect("created when missing"),
        };
        let mut new_rs = new_rs;
        self.scale_rs(d, &mut new_rs, p.replicas, p).await?;
        if complete(d, &self.compute_status(d, Some(&new_rs), &old)) {
            self.cleanup(d, &old).await?;
        }
        self.rollout_status(d, Some(&new_rs), &old).await
    }

    /// Scaling while (or without) rolling out: one active ReplicaSet takes the new size; a
    /// saturated new one means old ones go to zero; otherwise the change is shared in proportion.
    async fn scale(
        &self,
        d: &Deployment,
        new_rs: Option<&Rs>,
        old: &[Rs],
        p: &Params,
    ) -> anyhow::Result<()> {
        let mut all: Vec<Rs> = old.to_vec();
        if let Some(n) = new_rs {
            all.push(n.clone());
        }
        let active: Vec<usize> = (0..all.len()).filter(|i| all[*i].replicas > 0).collect();
        let single = match active.len() {
            0 => {
                if new_rs.is_some() {
                    Some(all.len() - 1)
                } else {
                    (0..all.len()).max_by_key(|i| (all[*i].created(), all[*i].name()))
                }
            }
            1 => Some(active[0]),
            _ => None,
        };
        if let Some(i) = single {
            let mut rs = all[i].clone();
            self.scale_rs(d, &mut rs, p.replicas, p).await?;
            return Ok(());
        }
        if let Some(n) = new_rs {
            let saturated = n.replicas == p.replicas && n.usable() == p.replicas;
            if saturated {
                for rs in old {
                    let mut rs = rs.clone();
                    self.scale_rs(d, &mut rs, 0, p).await?;
                }
                return Ok(());
            }
        }
        if !p.rolling {
            return Ok(());
        }
        let allowed = if p.replicas > 0 {
            p.replicas + p.max_surge
        } else {
            0
        };
        let current: i32 = all.iter().map(|r| r.replicas).sum();
        let to_add = allowed - current;
        if to_add == 0 {
            return Ok(());
        }
        // Bigger (then newer) ReplicaSets first when growing, smaller first when shrinking.
        let mut order: Vec<usize> = (0..all.len()).collect();
        order.sort_by(|a, b| {
            let (x, y) = (&all[*a], &all[*b]);
            let c = if to_add > 0 {
                y.replicas.cmp(&x.replicas)
            } else {
                x.replicas.cmp(&y.replicas)
            };
            c.then(y.created().cmp(&x.created()))
        });
        let mut sizes: Vec<i32> = all.iter().map(|r| r.replicas).collect();
        let mut added = 0;
        for i in &order {
            if current == 0 {
                break;
            }
            let mut share = (all[*i].replicas as i64 * to_add as i64 / current as i64) as i32;
            if to_add > 0 {
                share = share.min(to_add - added);
            } else {
                share = share.max(to_add - added);
            }
            sizes[*i] += share;
            added += share;
        }
        if let Some(first) = order.first() {
            sizes[*first] += to_add - added;
        }
        for (i, size) in sizes.into_iter().enumerate() {
            let mut rs = all[i].clone();
            self.scale_rs(d, &mut rs, size.max(0), p).await?;
        }
        Ok(())
    }

    /// Delete old, empty ReplicaSets beyond revisionHistoryLimit, oldest revisions first.
    async fn cleanup(&self, d: &Deployment, old: &[Rs]) -> anyhow::Result<()> {
        let limit = d
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10)
            .max(0) as usize;
        let mut cleanable: Vec<&Rs> = old
            .iter()
            .filter(|r| r.obj.metadata.deletion_timestamp.is_none())
            .collect();
        if cleanable.len() <= limit {
            return Ok(());
        }
        cleanable.sort_by_key(|r| (r.revision(), r.created()));
        let excess = cleanable.len() - limit;
        let ns = d.namespace().unwrap_or_default();
        for rs in cleanable.into_iter().take(excess) {
            let st = rs.status();
            if rs.replicas != 0
                || st.replicas != 0
                || st.observed_generation != rs.obj.metadata.generation
            {
                continue;
            }
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: rs.obj.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            ok_or_gone(self.rs_api(&ns).delete(&rs.name(), &dp).await)?;
        }
        Ok(())
    }

    fn compute_status(&self, d: &Deployment, new_rs: Option<&Rs>, old: &[Rs]) -> Value {
        let p = params(d);
        let all: Vec<&Rs> = old.iter().chain(new_rs).collect();
        let sum = |f: &dyn Fn(&Rs) -> i32| all.iter().map(|r| f(r)).sum::<i32>();
        let replicas = sum(&|r| r.status().replicas);
        let ready = sum(&|r| r.status().ready_replicas.unwrap_or(0));
        let available = sum(&|r| r.available());
        let updated = new_rs.map(|r| r.status().replicas).unwrap_or(0);
        let mut status = serde_json::to_value(&d.status).unwrap_or(json!({}));
        if !status.is_object() {
            status = json!({});
        }
        status["observedGeneration"] = json!(d.metadata.generation.unwrap_or(0));
        status["replicas"] = json!(replicas);
        status["updatedReplicas"] = json!(updated);
        status["readyReplicas"] = json!(ready);
        status["availableReplicas"] = json!(available);
        status["unavailableReplicas"] = json!((p.replicas - available).max(0));
        if available >= p.replicas - p.max_unavailable {
            set_condition(
                &mut status,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                false,
            );
        } else {
            set_condition(
                &mut status,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                false,
            );
        }
        // A ReplicaSet that cannot create pods says so on the Deployment.
        let failure = all.iter().find_map(|r| {
            r.status()
                .conditions
                .into_iter()
                .flatten()
                .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
        });
        match failure {
            Some(c) => set_condition(
                &mut status,
                "ReplicaFailure",
                "True",
                c.reason.as_deref().unwrap_or("FailedCreate"),
                c.message.as_deref().unwrap_or_default(),
                false,
            ),
            None => remove_condition(&mut status, "ReplicaFailure"),
        }
        for k in COUNTS {
            if status[k] == json!(0) {
                status.as_object_mut().unwrap().remove(k);
            }
        }
        status
    }

    async fn write_status(
        &self,
        d: &Deployment,
        new_rs: Option<&Rs>,
        old: &[Rs],
    ) -> anyhow::Result<Option<Duration>> {
        let status = self.compute_status(d, new_rs, old);
        self.patch_status_if_changed(d, status).await?;
        Ok(None)
    }

    /// Status plus the Progressing condition; requeue to notice a progress deadline passing.
    async fn rollout_status(
        &self,
        d: &Deployment,
        new_rs: Option<&Rs>,
        old: &[Rs],
    ) -> anyhow::Result<Option<Duration>> {
        let mut status = self.compute_status(d, new_rs, old);
        let mut requeue = None;
        if !has_progress_deadline(d) {
            remove_condition(&mut status, "Progressing");
        } else {
            let prev = serde_json::to_value(&d.status).unwrap_or(json!({}));
            let cur = condition(&status, "Progressing").cloned();
            let cur_reason = cur
                .as_ref()
                .and_then(|c| c["reason"].as_str())
                .unwrap_or_default()
                .to_string();
            let is_complete = status["replicas"] == status["updatedReplicas"]
                && cur_reason == "NewReplicaSetAvailable";
            let name = new_rs.map(|r| r.name()).unwrap_or_default();
            if !is_complete {
                if complete(d, &status) {
                    set_condition(
                        &mut status,
                        "Progressing",
                        "True",
                        "NewReplicaSetAvailable",
                        &format!("ReplicaSet \"{name}\" has successfully progressed."),
                        true,
                    );
                } else if progressing(&prev, &status) {
                    let keep_transition = cur.as_ref().is_some_and(|c| c["status"] == "True");
                    set_condition_keep(
                        &mut status,
                        "Progressing",
                        "True",
                        "ReplicaSetUpdated",
                        &format!("ReplicaSet \"{name}\" is progressing."),
                        keep_transition,
                    );
                } else if timed_out(d, &status) {
                    if cur_reason != "ProgressDeadlineExceeded" {
                        self.recorder.record(
                            d,
                            "Warning",
                            "ProgressDeadlineExceeded",
                            format!("Deployment \"{}\" has timed out progressing.", d.name_any()),
                        );
                    }
                    set_condition(
                        &mut status,
                        "Progressing",
                        "False",
                        "ProgressDeadlineExceeded",
                        &format!("ReplicaSet \"{name}\" has timed out progressing."),
                        true,
                    );
                } else if cur.is_none() {
                    set_condition(
                        &mut status,
                        "Progressing",
                        "True",
                        "ReplicaSetUpdated",
                        &format!("ReplicaSet \"{name}\" is progressing."),
                        true,
                    );
                }
                // Come back when the deadline would pass.
                if let Some(c) = condition(&status, "Progressing") {
                    if c["reason"] != "ProgressDeadlineExceeded"
                        && c["reason"] != "NewReplicaSetAvailable"
                    {
                        let deadline = d
                            .spec
                            .as_ref()
                            .and_then(|s| s.progress_deadline_seconds)
                            .unwrap_or(600) as i64;
                        if let Some(t) = c["lastUpdateTime"]
                            .as_str()
                            .and_then(|t| t.parse::<Timestamp>().ok())
                        {
                            let at = t + SignedDuration::from_secs(deadline);
                            let left = at.duration_since(Timestamp::now());
                            requeue = Some(Duration::from_secs(left.as_secs().max(0) as u64 + 1));
                        }
                    }
                }
            }
        }
        self.patch_status_if_changed(d, status).await?;
        // minReadySeconds: come back when pods may have become available.
        let min_ready = d
            .spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0);
        if min_ready > 0 {
            let again = Duration::from_secs(min_ready as u64);
            requeue = Some(requeue.map_or(again, |r: Duration| r.min(again)));
        }
        Ok(requeue)
    }

    async fn patch_status_if_changed(&self, d: &Deployment, status: Value) -> anyhow::Result<()> {
        let cur = serde_json::to_value(&d.status).unwrap_or(Value::Null);
        if !status_differs(&cur, &status) {
            return Ok(());
        }
        self.patch_status(d, status).await
    }

    async fn patch_status(&self, d: &Deployment, status: Value) -> anyhow::Result<()> {
        // Replace the conditions list as a whole: a merge patch replaces lists.
        let mut patch = json!({"status": status});
        for k in COUNTS {
            if patch["status"].get(k).is_none() {
                patch["status"][k] = Value::Null;
            }
        }
        if patch["status"]
            .get("collisionCount")
            .is_some_and(|c| c.is_null())
        {
            patch["status"]
                .as_object_mut()
                .unwrap()
                .remove("collisionCount");
        }
        let ns = d.namespace().unwrap_or_default();
        ok_or_gone(
            crate::claim::patch_status_unread::<Deployment>(
                &self.client,
                Some(&ns),
                &d.name_any(),
                &patch,
            )
            .await,
        )?;
        Ok(())
    }
}

fn selector_of(d: &Deployment) -> Option<Selector> {
    let sel = d.spec.as_ref()?.selector.clone();
    let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && sel.match_expressions.as_ref().is_none_or(|m| m.is_empty());
    if empty {
        return None;
    }
    Selector::try_from(sel).ok()
}

fn copy_annotations(d: &Deployment, into: &mut BTreeMap<String, String>) {
    for (k, v) in d.annotations() {
        if !NOT_COPIED.contains(&k.as_str()) {
            into.insert(k.clone(), v.clone());
        }
    }
}

/// How big the new ReplicaSet may be now (upstream's NewRSNewReplicas). Upstream sums the
/// ReplicaSets' sizes; we sum what they may still run, so that the new ReplicaSet grows only
/// once an old one's scale-down has been carried out and there are never more than
/// replicas + maxSurge pods at once.
fn new_rs_replicas(all: &[Rs], new_rs: Option<&Rs>, p: &Params) -> i32 {
    let cur_new = new_rs.map(|r| r.replicas).unwrap_or(0);
    if !p.rolling {
        return p.replicas;
    }
    let current: i32 = all.iter().map(Rs::occupied).sum();
    let max_total = p.replicas + p.max_surge;
    if current >= max_total {
        return cur_new;
    }
    let up = (max_total - current).min((p.replicas - cur_new).max(0));
    cur_new + up
}

fn has_progress_deadline(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(600)
        != i32::MAX
}

fn num(v: &Value, k: &str) -> i64 {
    v[k].as_i64().unwrap_or(0)
}

fn complete(d: &Deployment, status: &Value) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) as i64;
    num(status, "updatedReplicas") == want
        && num(status, "replicas") == want
        && num(status, "availableReplicas") == want
        && num(status, "observedGeneration") >= d.metadata.generation.unwrap_or(0)
}

fn progressing(prev: &Value, new: &Value) -> bool {
    num(new, "updatedReplicas") > num(prev, "updatedReplicas")
        || num(new, "replicas") < num(prev, "replicas")
        || num(new, "readyReplicas") > num(prev, "readyReplicas")
        || num(new, "availableReplicas") > num(prev, "availableReplicas")
}

fn timed_out(d: &Deployment, status: &Value) -> bool {
    let Some(c) = condition(status, "Progressing") else {
        return false;
    };
    if c["reason"] == "NewReplicaSetAvailable" {
        return false;
    }
    if c["reason"] == "ProgressDeadlineExceeded" {
        return true;
    }
    let deadline = d
        .spec
        .as_ref()
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(600) as i64;
    c["lastUpdateTime"]
        .as_str()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_some_and(|t| t + SignedDuration::from_secs(deadline) < Timestamp::now())
}

fn now_string() -> String {
    Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or(Timestamp::now())
        .to_string()
}

/// Set a condition; its transition time changes only when its status does.
fn set_condition(
    status: &mut Value,
    t: &str,
    s: &str,
    reason: &str,
    message: &str,
    update_time: bool,
) {
    let now = now_string();
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let conds = status["conditions"].as_array_mut().unwrap();
    let mut c = json!({"type": t, "status": s, "reason": reason, "message": message,
                       "lastUpdateTime": now, "lastTransitionTime": now});
    if let Some(old) = conds.iter().find(|c| c["type"] == t) {
        if old["status"] == s {
            c["lastTransitionTime"] = old["lastTransitionTime"].clone();
            if old["reason"] == reason && old["message"] == message && !update_time {
                c["lastUpdateTime"] = old["lastUpdateTime"].clone();
            }
        }
    }
    conds.retain(|c| c["type"] != t);
    conds.push(c);
}

fn set_condition_keep(
    status: &mut Value,
    t: &str,
    s: &str,
    reason: &str,
    message: &str,
    keep_transition: bool,
) {
    let old_transition = condition(status, t).map(|c| c["lastTransitionTime"].clone());
    set_condition(status, t, s, reason, message, true);
    if keep_transition {
        if let (Some(ot), Some(c)) = (
            old_transition,
            status["conditions"]
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|c| c["type"] == t)),
        ) {
            c["lastTransitionTime"] = ot;
        }
    }
}

fn remove_condition(status: &mut Value, t: &str) {
    if let Some(conds) = status["conditions"].as_array_mut() {
        conds.retain(|c| c["type"] != t);
    }
}

/// Whether two statuses differ beyond timestamps.
fn status_differs(cur: &Value, new: &Value) -> bool {
    for k in [
        "observedGeneration",
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
        "unavailableReplicas",
        "collisionCount",
    ] {
        if num(cur, k) != num(new, k) {
            return true;
        }
    }
    let conds = |v: &Value| -> Vec<(Value, Value, Value, Value, Value)> {
        let mut c: Vec<_> = v["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["type"].clone(),
                    c["status"].clone(),
                    c["reason"].clone(),
                    c["message"].clone(),
                    c["lastUpdateTime"].clone(),
                )
            })
            .collect();
        c.sort_by_key(|x| x.0.to_string());
        c
    };
    conds(cur) != conds(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surge_rounds_up_and_unavailability_down() {
        assert_eq!(resolve(None, 25, 10, true), 3);
        assert_eq!(resolve(None, 25, 10, false), 2);
        assert_eq!(
            resolve(Some(&IntOrString::String("50%".into())), 25, 3, true),
            2
        );
        assert_eq!(resolve(Some(&IntOrString::Int(4)), 25, 3, false), 4);
    }

    #[test]
    fn hashes_are_stable_and_ignore_nothing_but_the_collision_count() {
        let t: PodTemplateSpec = serde_json::from_value(json!({"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}})).unwrap();
        let u: PodTemplateSpec = serde_json::from_value(json!({"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "x:2"}]}})).unwrap();
        assert_eq!(template_hash(&t, None), template_hash(&t, None));
        assert_ne!(template_hash(&t, None), template_hash(&u, None));
        assert_ne!(template_hash(&t, None), template_hash(&t, Some(1)));
        assert!(template_hash(&t, None)
            .chars()
            .all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
        let mut hashed = t.clone();
        hashed
            .metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(HASH_LABEL.into(), "abc".into());
        assert!(equal_ignore_hash(&t, &hashed));
        assert!(!equal_ignore_hash(&t, &u));
    }

    #[test]
    fn conditions_keep_their_transition_time_while_status_holds() {
        let mut st = json!({"conditions": [{"type": "Available", "status": "True", "reason": "R", "message": "m",
            "lastUpdateTime": "2020-01-01T00:00:00Z", "lastTransitionTime": "2020-01-01T00:00:00Z"}]});
        set_condition(&mut st, "Available", "True", "R", "m", false);
        assert_eq!(
            st["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(
            st["conditions"][0]["lastUpdateTime"],
            "2020-01-01T00:00:00Z"
        );
        set_condition(&mut st, "Available", "False", "R2", "m2", false);
        assert_ne!(
            st["conditions"][0]["lastTransitionTime"],
            "2020-01-01T00:00:00Z"
        );
    }

    #[test]
    fn progress_and_completion_follow_upstream() {
        let d: Deployment =
            serde_json::from_value(json!({"metadata": {"name": "d", "generation": 2},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"a": "b"}}, "template": {}}}))
            .unwrap();
        let done = json!({"updatedReplicas": 3, "replicas": 3, "availableReplicas": 3, "observedGeneration": 2});
        assert!(complete(&d, &done));
        assert!(!complete(
            &d,
            &json!({"updatedReplicas": 3, "replicas": 4, "availableReplicas": 3, "observedGeneration": 2})
        ));
        assert!(progressing(
            &json!({"updatedReplicas": 1}),
            &json!({"updatedReplicas": 2})
        ));
        assert!(progressing(
            &json!({"replicas": 4}),
            &json!({"replicas": 3})
        ));
        assert!(!progressing(&done, &done));
        let p = params(&d);
        assert_eq!((p.max_surge, p.max_unavailable), (1, 0));
    }

    #[test]
    fn the_new_replica_set_grows_once_old_pods_are_gone() {
        let rs = |name: &str, spec: i32, status: i32| Rs {
            obj: Arc::new(
                serde_json::from_value(json!({"metadata": {"name": name},
                    "spec": {"replicas": spec, "selector": {}}, "status": {"replicas": status}}))
                .unwrap(),
            ),
            replicas: spec,
        };
        let d: Deployment = serde_json::from_value(json!({"metadata": {"name": "d"},
            "spec": {"replicas": 6, "selector": {}, "template": {},
                     "strategy": {"rollingUpdate": {"maxSurge": 2, "maxUnavailable": 1}}}}))
        .unwrap();
        let p = params(&d);
        // Old scaled 6 -> 5 but still running 6; new at 2: 8 pods, no room yet.
        let (old, new) = (rs("old", 5, 6), rs("new", 2, 2));
        assert_eq!(new_rs_replicas(&[old, new.clone()], Some(&new), &p), 2);
        // The scale-down is carried out: one more.
        let old = rs("old", 5, 5);
        assert_eq!(new_rs_replicas(&[old, new.clone()], Some(&new), &p), 3);
        // The new ReplicaSet's own pods still being created count by its size.
        let (old, new) = (rs("old", 4, 4), rs("new", 3, 1));
        assert_eq!(new_rs_replicas(&[old, new.clone()], Some(&new), &p), 4);
    }
}
