//! PodTopologySpread: `topologySpreadConstraints` with DoNotSchedule (a filter on skew) and
//! ScheduleAnyway (a score preferring less crowded domains). Nodes count towards domains when
//! they match the pod's node affinity and selector (nodeAffinityPolicy Honor, the default);
//! taints are ignored (nodeTaintsPolicy Ignore, the default). A pod with no constraints of its
//! own gets upstream's system defaults for scoring (ScheduleAnyway, maxSkew 3 per hostname and 5
//! per zone), selecting the pods of the Services, ReplicationControllers, ReplicaSets and
//! StatefulSets that select it.

use k8s_openapi::api::core::v1::TopologySpreadConstraint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::selectors::selector_matches;
use super::NodeAffinity;
use crate::cache::{Cache, NodeInfo, PodInfo};
use crate::framework::{CycleState, FastMap, Plugin, Status, MAX_NODE_SCORE};

const KEY: &str = "PodTopologySpread";

fn constraints(pod: &PodInfo, when: &str) -> Vec<TopologySpreadConstraint> {
    pod.pod
        .spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.when_unsatisfiable == when)
        .collect()
}

/// Upstream's system default constraints, for a pod that has none, with a selector made of every
/// workload selector that selects the pod (all must match); none when nothing selects it.
fn default_constraints(pod: &PodInfo, cache: &Cache) -> Vec<TopologySpreadConstraint> {
    let has_own = pod
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.topology_spread_constraints.as_ref())
        .is_some_and(|c| !c.is_empty());
    if has_own {
        return vec![];
    }
    // Upstream's DefaultSelector: the selectors of the Services that select the pod, and of
    // its controller if that is a ReplicationController, ReplicaSet or StatefulSet.
    let ns = pod.namespace();
    let mut selector = LabelSelector::default();
    let mut any = false;
    let mut add = |sel: &LabelSelector| {
        let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
            && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty());
        if empty {
            return;
        }
        any = true;
        for (k, v) in sel.match_labels.iter().flatten() {
            selector
                .match_labels
                .get_or_insert_with(Default::default)
                .insert(k.clone(), v.clone());
        }
        for e in sel.match_expressions.iter().flatten() {
            selector
                .match_expressions
                .get_or_insert_with(Default::default)
                .push(e.clone());
        }
    };
    let services = format!("Service/{ns}/");
    for (_, (_, sel)) in cache
        .workload_selectors
        .range(services.clone()..)
        .take_while(|(k, _)| k.starts_with(&services))
    {
        if sel.match_labels.as_ref().is_some_and(|m| !m.is_empty())
            && selector_matches(sel, pod.labels())
        {
            add(sel);
        }
    }
    let controller = pod
        .pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if let Some(owner) = controller {
        let kind = match (owner.api_version.as_str(), owner.kind.as_str()) {
            ("v1", "ReplicationController") => Some("ReplicationController"),
            ("apps/v1", "ReplicaSet") => Some("ReplicaSet"),
            ("apps/v1", "StatefulSet") => Some("StatefulSet"),
            _ => None,
        };
        if let Some((_, sel)) = kind.and_then(|k| {
            cache
                .workload_selectors
                .get(&format!("{k}/{ns}/{}", owner.name))
        }) {
            add(sel);
        }
    }
    if !any {
        return vec![];
    }
    [
        ("kubernetes.io/hostname", 3),
        ("topology.kubernetes.io/zone", 5),
    ]
    .into_iter()
    .map(|(key, skew)| TopologySpreadConstraint {
        max_skew: skew,
        topology_key: key.to_string(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(selector.clone()),
        ..Default::default()
    })
    .collect()
}

/// Whether `p` counts towards constraint `c` of `pod`: same namespace, not terminating, selected.
fn counts_for(pod: &PodInfo, c: &TopologySpreadConstraint, p: &PodInfo) -> bool {
    p.namespace() == pod.namespace()
        && p.pod.metadata.deletion_timestamp.is_none()
        && c.label_selector
            .as_ref()
            .is_some_and(|s| selector_matches(s, p.labels()))
}

fn matching_on(pod: &PodInfo, c: &TopologySpreadConstraint, node: &NodeInfo) -> i64 {
    node.pods.iter().filter(|p| counts_for(pod, c, p)).count() as i64
}

/// The node of every pod that counts towards `c`, found through the cache's label index; None
/// when the index cannot answer cheaply (see `Cache::pods_with_labels`): then visit the nodes.
fn indexed<'a>(
    pod: &PodInfo,
    c: &TopologySpreadConstraint,
    cache: &'a Cache,
) -> Option<Vec<&'a NodeInfo>> {
    let pods = cache.pods_with_labels(pod.namespace(), c.label_selector.as_ref()?)?;
    Some(
        pods.into_iter()
            .filter(|(_, p)| counts_for(pod, c, p))
            .map(|(node, _)| node)
            .collect(),
    )
}

/// Per constraint: matching pods per domain value (every eligible domain present).
fn count(
    pod: &PodInfo,
    cs: &[TopologySpreadConstraint],
    cache: &Cache,
) -> Vec<FastMap<String, i64>> {
    let found: Vec<Option<Vec<&NodeInfo>>> = cs.iter().map(|c| indexed(pod, c, cache)).collect();
    let mut out = vec![FastMap::default(); cs.len()];
    for node in &cache.nodes {
        if !NodeAffinity::required_ok(pod, node) {
            continue;
        }
        for (i, c) in cs.iter().enumerate() {
            let Some(value) = node.label(&c.topology_key) else {
                continue;
            };
            let n = match found[i] {
                Some(_) => 0,
                None => matching_on(pod, c, node),
            };
            *out[i].entry(value.clone()).or_default() += n;
        }
    }
    for (i, nodes) in found.iter().enumerate() {
        for node in nodes.iter().flatten() {
            let Some(value) = node.label(&cs[i].topology_key) else {
                continue;
            };
            if NodeAffinity::required_ok(pod, node) {
                // Present: an eligible node registered its domain above.
                if let Some(n) = out[i].get_mut(value) {
                    *n += 1;
                }
            }
        }
    }
    out
}

/// Per constraint: matching pods per domain, only for the domains of `candidates` (what Score
/// needs). A selector with matchLabels starts from the cache's label index (only pods that can
/// match); otherwise a hostname domain is the node itself, so only the candidates are visited
/// for it, and other keys visit every node whose domain a candidate shares.
fn count_for_scoring(
    pod: &PodInfo,
    cs: &[TopologySpreadConstraint],
    cache: &Cache,
    candidates: &[&NodeInfo],
) -> Vec<FastMap<String, i64>> {
    cs.iter()
        .map(|c| {
            let mut counts: FastMap<String, i64> = FastMap::default();
            let hostname = c.topology_key == "kubernetes.io/hostname";
            if let Some(nodes) = indexed(pod, c, cache) {
                // Only the candidates' domains are ever looked up (`score`), so a domain
                // without candidates may be counted too: that costs less than finding out.
                for node in nodes {
                    let Some(v) = node.label(&c.topology_key) else {
                        continue;
                    };
                    if hostname || NodeAffinity::required_ok(pod, node) {
                        *counts.entry(v.clone()).or_default() += 1;
                    }
                }
                return counts;
            }
            if hostname {
                for node in candidates {
                    if let Some(v) = node.label(&c.topology_key) {
                        *counts.entry(v.clone()).or_default() += matching_on(pod, c, node);
                    }
                }
                return counts;
            }
            let wanted: std::collections::HashSet<&str> = candidates
                .iter()
                .filter_map(|n| n.label(&c.topology_key).map(String::as_str))
                .collect();
            if wanted.is_empty() {
                return counts;
            }
            for node in &cache.nodes {
                let Some(v) = node.label(&c.topology_key) else {
                    continue;
                };
                if !wanted.contains(v.as_str()) || !NodeAffinity::required_ok(pod, node) {
                    continue;
                }
                let n = matching_on(pod, c, node);
                match counts.get_mut(v) {
                    Some(x) => *x += n,
                    None => {
                        counts.insert(v.clone(), n);
                    }
                }
            }
            counts
        })
        .collect()
}

pub struct PodTopologySpread;

struct Pre {
    constraints: Vec<TopologySpreadConstraint>,
    counts: Vec<FastMap<String, i64>>,
}

impl Plugin for PodTopologySpread {
    fn name(&self) -> &'static str {
        KEY
    }

    fn pre_filter(&self, state: &mut CycleState, pod: &PodInfo, cache: &Cache) -> Status {
        let cs = constraints(pod, "DoNotSchedule");
        if cs.is_empty() {
            return Status::skip();
        }
        let counts = count(pod, &cs, cache);
        state.write(
            KEY,
            Pre {
                constraints: cs,
                counts,
            },
        );
        Status::success()
    }

    fn has_filter(&self) -> bool {
        true
    }

    fn filter(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        let Some(pre) = state.read::<Pre>(KEY) else {
            return Status::success();
        };
        for (c, counts) in pre.constraints.iter().zip(&pre.counts) {
            let Some(value) = node.label(&c.topology_key) else {
                return Status::unresolvable(
                    "node(s) didn't match pod topology spread constraints (missing required label)",
                );
            };
            let min = counts.values().copied().min().unwrap_or(0);
            let self_match =
                c.label_selector
                    .as_ref()
                    .is_some_and(|s| selector_matches(s, pod.labels())) as i64;
            let skew = counts.get(value).copied().unwrap_or(0) + self_match - min;
            if skew > c.max_skew as i64 {
                return Status::unschedulable(
                    "node(s) didn't match pod topology spread constraints",
                );
            }
        }
        Status::success()
    }

    fn pre_score(
        &self,
        state: &mut CycleState,
        pod: &PodInfo,
        nodes: &[&NodeInfo],
        cache: &Cache,
    ) -> Status {
        let mut cs = constraints(pod, "ScheduleAnyway");
        if cs.is_empty() {
            cs = default_constraints(pod, cache);
        }
        if cs.is_empty() {
            return Status::skip();
        }
        let counts = count_for_scoring(pod, &cs, cache, nodes);
        state.write(
            "PodTopologySpreadScore",
            Pre {
                constraints: cs,
                counts,
            },
        );
        Status::success()
    }

    fn has_score(&self) -> bool {
        true
    }

    fn score(&self, state: &CycleState, _pod: &PodInfo, node: &NodeInfo) -> i64 {
        let Some(pre) = state.read::<Pre>("PodTopologySpreadScore") else {
            return 0;
        };
        pre.constraints
            .iter()
            .zip(&pre.counts)
            .map(|(c, counts)| {
                node.label(&c.topology_key)
                    .and_then(|v| counts.get(v))
                    .copied()
                    .unwrap_or(0)
            })
            .sum()
    }

    fn normalize(&self, _: &CycleState, scores: &mut [i64]) {
        // Fewer matching pods in the node's domains is better.
        let (min, max) = (
            scores.iter().copied().min().unwrap_or(0),
            scores.iter().copied().max().unwrap_or(0),
        );
        for s in scores.iter_mut() {
            *s = if max == min {
                MAX_NODE_SCORE
            } else {
                (max - *s) * MAX_NODE_SCORE / (max - min)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn pod(ns: &str, owner: Option<(&str, &str, &str)>) -> PodInfo {
        let owners: Vec<serde_json::Value> = owner
            .into_iter()
            .map(|(api, kind, name)| {
                serde_json::json!({"apiVersion": api, "kind": kind, "name": name, "uid": "u", "controller": true})
            })
            .collect();
        PodInfo::new(Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": ns, "uid": "p",
                             "labels": {"app": "web", "tier": "front"},
                             "ownerReferences": owners},
                "spec": {"containers": [{"name": "c"}]},
            }))
            .unwrap(),
        ))
    }

    fn keys(cs: &[TopologySpreadConstraint]) -> Vec<(String, BTreeMap<String, String>)> {
        cs.iter()
            .map(|c| {
                let sel = c.label_selector.clone().unwrap_or_default();
                (c.topology_key.clone(), sel.match_labels.unwrap_or_default())
            })
            .collect()
    }

    /// As upstream's DefaultSelector: Services of the pod's namespace that select it, plus its
    /// controller's selector; a ReplicaSet that merely matches the labels is not its owner.
    #[test]
    fn default_spreading_uses_selecting_services_and_the_controller() {
        let mut cache = Cache::default();
        let w = &mut cache.workload_selectors;
        w.insert(
            "Service/default/web".into(),
            ("default".into(), labels(&[("app", "web")])),
        );
        w.insert(
            "Service/default/other".into(),
            ("default".into(), labels(&[("app", "other")])),
        );
        w.insert(
            "Service/elsewhere/web".into(),
            ("elsewhere".into(), labels(&[("app", "web"), ("x", "y")])),
        );
        w.insert(
            "ReplicaSet/default/mine".into(),
            ("default".into(), labels(&[("tier", "front")])),
        );
        w.insert(
            "ReplicaSet/default/stranger".into(),
            ("default".into(), labels(&[("app", "web"), ("s", "t")])),
        );

        let owned = default_constraints(
            &pod("default", Some(("apps/v1", "ReplicaSet", "mine"))),
            &cache,
        );
        let want: BTreeMap<String, String> = [("app", "web"), ("tier", "front")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            keys(&owned),
            vec![
                ("kubernetes.io/hostname".to_string(), want.clone()),
                ("topology.kubernetes.io/zone".to_string(), want),
            ]
        );
        assert!(owned
            .iter()
            .all(|c| c.when_unsatisfiable == "ScheduleAnyway"));

        // No owner: the Service alone.
        let bare = default_constraints(&pod("default", None), &cache);
        assert_eq!(
            keys(&bare)[0].1,
            [("app".to_string(), "web".to_string())].into()
        );
        // Nothing selects it in its namespace: no default spreading.
        assert!(default_constraints(&pod("empty", None), &cache).is_empty());
        // An owner of a kind default spreading ignores (a Job) adds nothing.
        let job = default_constraints(&pod("default", Some(("batch/v1", "Job", "mine"))), &cache);
        assert_eq!(keys(&job), keys(&bare));
    }

    fn node(name: &str, zone: &str) -> k8s_openapi::api::core::v1::Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}},
        }))
        .unwrap()
    }

    fn bound(
        uid: &str,
        ns: &str,
        node: &str,
        app: &str,
        deleting: bool,
    ) -> Arc<k8s_openapi::api::core::v1::Pod> {
        let mut meta = serde_json::json!({"name": uid, "namespace": ns, "uid": uid,
                                          "labels": {"app": app, "team": "t"}});
        if deleting {
            meta["deletionTimestamp"] = serde_json::json!("2026-01-01T00:00:00Z");
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": meta,
                "spec": {"nodeName": node, "containers": [{"name": "c"}]},
            }))
            .unwrap(),
        )
    }

    fn nonzero(counts: Vec<FastMap<String, i64>>) -> Vec<BTreeMap<String, i64>> {
        counts
            .into_iter()
            .map(|m| m.into_iter().filter(|(_, n)| *n > 0).collect())
            .collect()
    }

    /// Counting from the label index gives what visiting the nodes gives (a matchExpressions
    /// selector takes the visiting path), and follows pods that leave or change labels.
    #[test]
    fn indexed_counts_equal_visiting_every_node() {
        let mut cache = Cache::default();
        for (i, zone) in ["a", "a", "b", "b", "c"].iter().enumerate() {
            cache.upsert_node(node(&format!("n{i}"), zone));
        }
        let mut uid = 0;
        let mut add = |cache: &mut Cache, ns: &str, node: &str, app: &str, deleting: bool| {
            uid += 1;
            cache.upsert_bound_pod(bound(&format!("u{uid}"), ns, node, app, deleting));
        };
        for (node, app) in [
            ("n0", "web"),
            ("n0", "web"),
            ("n1", "web"),
            ("n2", "db"),
            ("n3", "web"),
            ("n4", "web"),
            ("gone", "web"),
        ] {
            add(&mut cache, "default", node, app, false);
        }
        add(&mut cache, "other", "n1", "web", false);
        add(&mut cache, "default", "n2", "web", true);
        // Enough other pods that "app: web" is selective (the index answers).
        for i in 0..40 {
            add(
                &mut cache,
                "default",
                &format!("n{}", i % 5),
                "filler",
                false,
            );
        }

        let by_labels = labels(&[("app", "web"), ("team", "t")]);
        let by_expression = LabelSelector {
            match_expressions: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                    key: "app".into(),
                    operator: "In".into(),
                    values: Some(vec!["web".into()]),
                },
            ]),
            ..Default::default()
        };
        let constraint = |key: &str, sel: &LabelSelector| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(sel.clone()),
            ..Default::default()
        };
        let me = pod("default", None);
        let counts = |cache: &Cache, sel: &LabelSelector| {
            let candidates: Vec<&NodeInfo> = ["n0", "n2", "n4"]
                .iter()
                .filter_map(|n| cache.node(n))
                .collect();
            let cs = [
                constraint("kubernetes.io/hostname", sel),
                constraint("topology.kubernetes.io/zone", sel),
            ];
            // Only the candidates' domains are looked up: compare those.
            let mut found = count_for_scoring(&me, &cs, cache, &candidates);
            for (c, counts) in cs.iter().zip(found.iter_mut()) {
                counts.retain(|v, _| {
                    candidates
                        .iter()
                        .any(|n| n.label(&c.topology_key) == Some(v))
                });
            }
            nonzero(found)
        };
        let map = |pairs: &[(&str, i64)]| -> BTreeMap<String, i64> {
            pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
        };
        assert!(cache.pods_with_labels("default", &by_labels).is_some());
        assert!(cache
            .pods_with_labels("default", &labels(&[("team", "t")]))
            .is_none());
        let indexed = counts(&cache, &by_labels);
        assert_eq!(indexed, counts(&cache, &by_expression));
        let filter_counts = |cache: &Cache, sel: &LabelSelector| {
            count(
                &me,
                &[constraint("topology.kubernetes.io/zone", sel)],
                cache,
            )
        };
        // The filter's counts keep every eligible domain, with zeros.
        let zones = filter_counts(&cache, &by_labels);
        assert_eq!(zones, filter_counts(&cache, &by_expression));
        assert_eq!(
            zones[0]
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect::<BTreeMap<_, _>>(),
            map(&[("a", 3), ("b", 1), ("c", 1)])
        );
        // Hostname: candidates only; zone: every node of the candidates' zones.
        assert_eq!(
            indexed,
            vec![
                map(&[("n0", 2), ("n4", 1)]),
                map(&[("a", 3), ("b", 1), ("c", 1)])
            ]
        );

        // A pod that goes, and one whose labels change, are counted no more.
        cache.remove_pod("u1");
        cache.upsert_bound_pod(bound("u5", "default", "n3", "db", false));
        let after = counts(&cache, &by_labels);
        assert_eq!(after, counts(&cache, &by_expression));
        assert_eq!(
            filter_counts(&cache, &by_labels),
            filter_counts(&cache, &by_expression)
        );
        assert_eq!(filter_counts(&cache, &by_labels)[0].get("b"), Some(&0));
        assert_eq!(
            after,
            vec![map(&[("n0", 1), ("n4", 1)]), map(&[("a", 2), ("c", 1)])]
        );
    }
}
