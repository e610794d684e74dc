//! PodTopologySpread: `topologySpreadConstraints` with DoNotSchedule (a filter on skew) and
//! ScheduleAnyway (a score preferring less crowded domains). Nodes count towards domains when
//! they match the pod's node affinity and selector (nodeAffinityPolicy Honor, the default);
//! taints are ignored (nodeTaintsPolicy Ignore, the default). A pod with no constraints of its
//! own gets upstream's system defaults for scoring (ScheduleAnyway, maxSkew 3 per hostname and 5
//! per zone), selecting the pods of the Services, ReplicationControllers, ReplicaSets and
//! StatefulSets that select it.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::TopologySpreadConstraint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::selectors::selector_matches;
use super::NodeAffinity;
use crate::cache::{Cache, NodeInfo, PodInfo};
use crate::framework::{CycleState, Plugin, Status, MAX_NODE_SCORE};

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
    let mut selector = LabelSelector::default();
    let mut any = false;
    for (ns, sel) in cache.workload_selectors.values() {
        let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
            && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty());
        if ns != pod.namespace() || empty || !selector_matches(sel, pod.labels()) {
            continue;
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

/// Per constraint: matching pods per domain value (every eligible domain present).
fn count(
    pod: &PodInfo,
    cs: &[TopologySpreadConstraint],
    cache: &Cache,
) -> Vec<HashMap<String, i64>> {
    let mut out = vec![HashMap::new(); cs.len()];
    for node in &cache.nodes {
        if !NodeAffinity::required_ok(pod, node) {
            continue;
        }
        for (i, c) in cs.iter().enumerate() {
            let Some(value) = node.labels().get(&c.topology_key) else {
                continue;
            };
            let n = node
                .pods
                .iter()
                .filter(|p| {
                    p.namespace() == pod.namespace()
                        && p.pod.metadata.deletion_timestamp.is_none()
                        && c.label_selector
                            .as_ref()
                            .is_some_and(|s| selector_matches(s, p.labels()))
                })
                .count() as i64;
            *out[i].entry(value.clone()).or_default() += n;
        }
    }
    out
}

/// Per constraint: matching pods per domain, only for the domains of `candidates` (what Score
/// needs). A hostname domain is the node itself, so only the candidates are visited for it;
/// other keys visit every node whose domain a candidate shares.
fn count_for_scoring(
    pod: &PodInfo,
    cs: &[TopologySpreadConstraint],
    cache: &Cache,
    candidates: &[&NodeInfo],
) -> Vec<HashMap<String, i64>> {
    let matching = |c: &TopologySpreadConstraint, node: &NodeInfo| -> i64 {
        node.pods
            .iter()
            .filter(|p| {
                p.namespace() == pod.namespace()
                    && p.pod.metadata.deletion_timestamp.is_none()
                    && c.label_selector
                        .as_ref()
                        .is_some_and(|s| selector_matches(s, p.labels()))
            })
            .count() as i64
    };
    cs.iter()
        .map(|c| {
            let mut counts: HashMap<String, i64> = HashMap::new();
            if c.topology_key == "kubernetes.io/hostname" {
                for node in candidates {
                    if let Some(v) = node.labels().get(&c.topology_key) {
                        *counts.entry(v.clone()).or_default() += matching(c, node);
                    }
                }
                return counts;
            }
            let wanted: std::collections::HashSet<&str> = candidates
                .iter()
                .filter_map(|n| n.labels().get(&c.topology_key).map(String::as_str))
                .collect();
            if wanted.is_empty() {
                return counts;
            }
            for node in &cache.nodes {
                let Some(v) = node.labels().get(&c.topology_key) else {
                    continue;
                };
                if !wanted.contains(v.as_str()) || !NodeAffinity::required_ok(pod, node) {
                    continue;
                }
                let n = matching(c, node);
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
    counts: Vec<HashMap<String, i64>>,
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
            let Some(value) = node.labels().get(&c.topology_key) else {
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
                node.labels()
                    .get(&c.topology_key)
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
