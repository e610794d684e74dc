//! What the workload controllers ask of pods: active, ready, available, which to delete first,
//! and how to make one from a template.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// A pod as the controller manager's shared informer keeps it: what no controller reads is
/// dropped, since the cache holds every pod of the cluster (a k8s-openapi `Volume` is 3 KiB and
/// a `Container` 2 KiB even when empty). Kept: metadata, the whole status, the spec's scheduling
/// and identity fields (nodeName, tolerations, affinity, hostname, subdomain, ...), and of the
/// containers only the names and ports of those that declare ports (the endpoints controller
/// resolves named target ports). The controllers only ever patch pods, never write one back from
/// this cache, so nothing dropped here can be lost.
pub fn trim_for_controllers(p: &mut Pod) {
    if let Some(spec) = p.spec.as_mut() {
        spec.volumes = None;
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.containers = std::mem::take(&mut spec.containers)
            .into_iter()
            .filter(|c| c.ports.as_ref().is_some_and(|ports| !ports.is_empty()))
            .map(|c| k8s_openapi::api::core::v1::Container {
                name: c.name,
                ports: c.ports,
                ..Default::default()
            })
            .collect();
        spec.containers.shrink_to_fit();
    }
}

/// Not finished and not being deleted (upstream's IsPodActive).
pub fn is_active(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed")) && p.metadata.deletion_timestamp.is_none()
}

fn ready_condition(p: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

pub fn is_ready(p: &Pod) -> bool {
    ready_condition(p).is_some_and(|c| c.status == "True")
}

/// Ready for at least `min_ready_seconds` at `now`.
pub fn is_available(p: &Pod, min_ready_seconds: i32, now: Timestamp) -> bool {
    let Some(c) = ready_condition(p).filter(|c| c.status == "True") else {
        return false;
    };
    if min_ready_seconds <= 0 {
        return true;
    }
    match &c.last_transition_time {
        Some(t) => t.0 + SignedDuration::from_secs(min_ready_seconds as i64) <= now,
        None => false,
    }
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).max().unwrap_or(0))
        .unwrap_or(0)
}

fn phase_rank(p: &Pod) -> u8 {
    match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running") => 2,
        Some("Unknown") => 1,
        _ => 0,
    }
}

/// The `n` pods to delete first, as upstream ranks them: unscheduled, then pending, then not
/// ready, then those sharing a node with more of their siblings, then ready for the shortest
/// time, then most restarts, then newest.
pub fn rank_for_deletion(pods: &[Arc<Pod>], n: usize) -> Vec<Arc<Pod>> {
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for p in pods {
        if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            *per_node.entry(node).or_default() += 1;
        }
    }
    let mut sorted: Vec<Arc<Pod>> = pods.to_vec();
    sorted.sort_by(|a, b| {
        let node = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.clone());
        let assigned = |p: &Pod| node(p).is_some_and(|n| !n.is_empty());
        let rank = |p: &Pod| node(p).map(|n| per_node[&n]).unwrap_or(0);
        let ready_since = |p: &Pod| {
            ready_condition(p)
                .filter(|c| c.status == "True")
                .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0))
        };
        let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        assigned(a)
            .cmp(&assigned(b))
            .then(phase_rank(a).cmp(&phase_rank(b)))
            .then(is_ready(a).cmp(&is_ready(b)))
            .then(rank(b).cmp(&rank(a)))
            .then_with(|| match (ready_since(a), ready_since(b)) {
                (Some(x), Some(y)) => y.cmp(&x),
                _ => std::cmp::Ordering::Equal,
            })
            .then(restarts(b).cmp(&restarts(a)))
            .then(created(b).cmp(&created(a)))
    });
    sorted.truncate(n);
    sorted
}

/// Delete options pinned to this pod's uid (never a same-named successor), with an optional
/// grace period.
pub fn delete_params(pod: &Pod, grace_period_seconds: Option<u32>) -> kube::api::DeleteParams {
    kube::api::DeleteParams {
        grace_period_seconds,
        preconditions: Some(kube::api::Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    }
}

/// The pod's UID (empty if it has none), the key of deletion expectations.
pub fn uid_of(p: &Pod) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

/// Delete these pods concurrently (uid-pinned); each with its result.
pub async fn delete_all(
    api: &kube::Api<Pod>,
    pods: &[Arc<Pod>],
) -> Vec<(Arc<Pod>, Result<(), kube::Error>)> {
    futures::future::join_all(pods.iter().map(|p| async move {
        let name = p.metadata.name.clone().unwrap_or_default();
        let r = api.delete(&name, &delete_params(p, None)).await.map(|_| ());
        (p.clone(), r)
    }))
    .await
}

/// A pod for a controller: the template's labels, annotations and spec, a generated name after
/// the owner's, and the controller reference.
pub fn from_template(template: &PodTemplateSpec, owner_name: &str, owner: OwnerReference) -> Pod {
    let tm = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{owner_name}-")),
            labels: tm.labels,
            annotations: tm.annotations,
            finalizers: tm.finalizers,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn trimming_keeps_what_controllers_read() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "d", "labels": {"app": "web"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "rs", "uid": "u1", "controller": true}]},
            "spec": {
                "nodeName": "n1", "hostname": "h", "subdomain": "s",
                "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoExecute",
                                 "tolerationSeconds": 30}],
                "initContainers": [{"name": "init", "image": "busybox"}],
                "containers": [
                    {"name": "sidecar", "image": "busybox", "command": ["sleep", "1"]},
                    {"name": "web", "image": "busybox", "env": [{"name": "A", "value": "1"}],
                     "ports": [{"name": "http", "containerPort": 8080}]},
                ],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "web", "ready": true, "restartCount": 3,
                                              "image": "busybox", "imageID": ""}]},
        }))
        .unwrap();
        let before = p.clone();
        trim_for_controllers(&mut p);
        assert_eq!(p.metadata, before.metadata);
        assert_eq!(p.status, before.status);
        let spec = p.spec.as_ref().unwrap();
        let was = before.spec.as_ref().unwrap();
        assert_eq!(spec.node_name, was.node_name);
        assert_eq!(spec.tolerations, was.tolerations);
        assert_eq!(
            (&spec.hostname, &spec.subdomain),
            (&was.hostname, &was.subdomain)
        );
        assert!(spec.volumes.is_none() && spec.init_containers.is_none());
        assert_eq!(spec.containers.len(), 1);
        assert_eq!(spec.containers[0].name, "web");
        assert_eq!(spec.containers[0].ports, was.containers[1].ports);
        assert!(spec.containers[0].image.is_none() && spec.containers[0].env.is_none());
        // Named target ports still resolve.
        let target =
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into());
        assert_eq!(
            crate::endpoints::resolve_port(Some(&target), 80, &p),
            Some(8080)
        );
        assert!(is_ready(&p) && is_active(&p));
    }

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool, created: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": created},
                "spec": {"containers": [], "nodeName": node},
                "status": {"phase": phase, "conditions": [
                    {"type": "Ready", "status": if ready {"True"} else {"False"},
                     "lastTransitionTime": created}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn victims_are_unscheduled_then_pending_then_unready_then_newest() {
        let pods = vec![
            pod(
                "old-ready",
                Some("n1"),
                "Running",
                true,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "new-ready",
                Some("n2"),
                "Running",
                true,
                "2026-01-02T00:00:00Z",
            ),
            pod(
                "unready",
                Some("n3"),
                "Running",
                false,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "pending",
                Some("n4"),
                "Pending",
                false,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "unscheduled",
                None,
                "Pending",
                false,
                "2026-01-01T00:00:00Z",
            ),
        ];
        let order: Vec<String> = rank_for_deletion(&pods, 5)
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            order,
            [
                "unscheduled",
                "pending",
                "unready",
                "new-ready",
                "old-ready"
            ]
        );
        assert_eq!(rank_for_deletion(&pods, 2).len(), 2);
    }

    #[test]
    fn crowded_nodes_lose_pods_first() {
        let pods = vec![
            pod("alone", Some("n1"), "Running", true, "2026-01-01T00:00:00Z"),
            pod(
                "crowd-a",
                Some("n2"),
                "Running",
                true,
                "2026-01-01T00:00:00Z",
            ),
            pod(
                "crowd-b",
                Some("n2"),
                "Running",
                true,
                "2026-01-01T00:00:00Z",
            ),
        ];
        let first = &rank_for_deletion(&pods, 1)[0];
        assert!(first.metadata.name.as_deref().unwrap().starts_with("crowd"));
    }

    #[test]
    fn availability_waits_for_min_ready_seconds() {
        let p = pod("p", Some("n"), "Running", true, "2026-01-01T00:00:00Z");
        let t: Timestamp = "2026-01-01T00:00:05Z".parse().unwrap();
        assert!(is_available(&p, 0, t));
        assert!(is_available(&p, 5, t));
        assert!(!is_available(&p, 6, t));
        assert!(is_active(&p));
    }
}
