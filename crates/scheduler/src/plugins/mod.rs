//! The in-tree plugins, with upstream's names, semantics and messages.

pub mod interpod;
pub mod preemption;
pub mod selectors;
pub mod spread;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Taint, Toleration};

use crate::cache::{NodeInfo, PodInfo};
use crate::framework::{CycleState, Plugin, Status, MAX_NODE_SCORE};
use selectors::{term_matches, tolerated};

/// Map raw scores onto 0..=MAX_NODE_SCORE by the largest (reversed: smaller is better).
pub fn normalize_by_max(scores: &mut [i64], reverse: bool) {
    let max = scores.iter().copied().max().unwrap_or(0);
    for s in scores.iter_mut() {
        let v = if max == 0 {
            0
        } else {
            *s * MAX_NODE_SCORE / max
        };
        *s = if reverse { MAX_NODE_SCORE - v } else { v };
    }
    if max == 0 && reverse {
        scores.iter_mut().for_each(|s| *s = MAX_NODE_SCORE);
    }
}

pub struct NodeName;
impl Plugin for NodeName {
    fn name(&self) -> &'static str {
        "NodeName"
    }
    fn has_filter(&self) -> bool {
        true
    }
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        match pod.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            Some(n) if !n.is_empty() && n != node.name => {
                Status::unresolvable("node(s) didn't match the requested node name")
            }
            _ => Status::success(),
        }
    }
}

pub struct NodeUnschedulable;
impl Plugin for NodeUnschedulable {
    fn name(&self) -> &'static str {
        "NodeUnschedulable"
    }
    fn has_filter(&self) -> bool {
        true
    }
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        if !node.unschedulable {
            return Status::success();
        }
        let taint = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let tolerations = pod
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        if tolerated(&tolerations, &taint) {
            Status::success()
        } else {
            Status::unresolvable("node(s) were unschedulable")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringStrategy {
    LeastAllocated,
    MostAllocated,
}

pub struct NodeResourcesFit {
    pub strategy: ScoringStrategy,
}
impl Plugin for NodeResourcesFit {
    fn name(&self) -> &'static str {
        "NodeResourcesFit"
    }
    fn has_filter(&self) -> bool {
        true
    }
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        let (a, u, r) = (&node.allocatable, &node.requested, &pod.requests);
        let mut reasons = Vec::new();
        if u.pods + 1 > a.pods {
            reasons.push("Too many pods".to_string());
        }
        if r.milli_cpu > 0 && r.milli_cpu > a.milli_cpu - u.milli_cpu {
            reasons.push("Insufficient cpu".into());
        }
        if r.memory > 0 && r.memory > a.memory - u.memory {
            reasons.push("Insufficient memory".into());
        }
        if r.ephemeral_storage > 0
            && r.ephemeral_storage > a.ephemeral_storage - u.ephemeral_storage
        {
            reasons.push("Insufficient ephemeral-storage".into());
        }
        for (name, want) in &r.scalar {
            if *want == 0 {
                continue;
            }
            let have = a.scalar.get(name).copied().unwrap_or(0);
            let used = u.scalar.get(name).copied().unwrap_or(0);
            if *want > have - used {
                reasons.push(format!("Insufficient {name}"));
            }
        }
        if reasons.is_empty() {
            Status::success()
        } else {
            let mut s = Status::unschedulable("");
            s.reasons = reasons;
            s
        }
    }
    fn has_score(&self) -> bool {
        true
    }
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        let frac = |cap: i64, used: i64| -> i64 {
            if cap <= 0 {
                return 0;
            }
            let used = used.min(cap);
            match self.strategy {
                ScoringStrategy::LeastAllocated => (cap - used) * MAX_NODE_SCORE / cap,
                ScoringStrategy::MostAllocated => used * MAX_NODE_SCORE / cap,
            }
        };
        let cpu = frac(
            node.allocatable.milli_cpu,
            node.non_zero_cpu + pod.non_zero_cpu,
        );
        let mem = frac(
            node.allocatable.memory,
            node.non_zero_memory + pod.non_zero_memory,
        );
        (cpu + mem) / 2
    }
}

pub struct BalancedAllocation;
impl Plugin for BalancedAllocation {
    fn name(&self) -> &'static str {
        "NodeResourcesBalancedAllocation"
    }
    fn has_score(&self) -> bool {
        true
    }
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        let f = |cap: i64, used: i64| -> f64 {
            if cap <= 0 {
                1.0
            } else {
                (used as f64 / cap as f64).min(1.0)
            }
        };
        let cpu = f(
            node.allocatable.milli_cpu,
            node.non_zero_cpu + pod.non_zero_cpu,
        );
        let mem = f(
            node.allocatable.memory,
            node.non_zero_memory + pod.non_zero_memory,
        );
        // Standard deviation of the two fractions.
        let std = (cpu - mem).abs() / 2.0;
        ((1.0 - std) * MAX_NODE_SCORE as f64) as i64
    }
}

pub struct NodeAffinity;
impl NodeAffinity {
    fn required_ok(pod: &PodInfo, node: &NodeInfo) -> bool {
        let Some(spec) = pod.pod.spec.as_ref() else {
            return true;
        };
        // The node's labels only when asked about: reaching them costs a cache miss per node.
        for (k, v) in spec.node_selector.iter().flatten() {
            if node.label(k) != Some(v) {
                return false;
            }
        }
        let required = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            });
        match required {
            None => true,
            Some(sel) => sel
                .node_selector_terms
                .iter()
                .any(|t| term_matches(t, node.labels(), &node.name)),
        }
    }
}
impl Plugin for NodeAffinity {
    fn name(&self) -> &'static str {
        "NodeAffinity"
    }
    fn has_filter(&self) -> bool {
        true
    }
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        if Self::required_ok(pod, node) {
            Status::success()
        } else {
            Status::unresolvable("node(s) didn't match Pod's node affinity/selector")
        }
    }
    fn has_score(&self) -> bool {
        true
    }
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        let preferred = pod
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.affinity.as_ref())
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            });
        preferred
            .into_iter()
            .flatten()
            .filter(|p| term_matches(&p.preference, node.labels(), &node.name))
            .map(|p| p.weight as i64)
            .sum()
    }
    fn normalize(&self, _: &CycleState, scores: &mut [i64]) {
        normalize_by_max(scores, false);
    }
}

pub struct TaintToleration;
impl Plugin for TaintToleration {
    fn name(&self) -> &'static str {
        "TaintToleration"
    }
    fn has_filter(&self) -> bool {
        true
    }
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        let tolerations = pod
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_deref())
            .unwrap_or_default();
        for t in &node.taints {
            if (t.effect == "NoSchedule" || t.effect == "NoExecute") && !tolerated(tolerations, t) {
                return Status::unresolvable(format!(
                    "node(s) had untolerated taint {{{}: {}}}",
                    t.key,
                    t.value.as_deref().unwrap_or_default()
                ));
            }
        }
        Status::success()
    }
    fn has_score(&self) -> bool {
        true
    }
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        let tolerations = pod
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_deref())
            .unwrap_or_default();
        // Only tolerations with no effect or PreferNoSchedule count here (upstream).
        let counts = |t: &&Toleration| {
            t.effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == "PreferNoSchedule")
        };
        node.taints
            .iter()
            .filter(|taint| {
                taint.effect == "PreferNoSchedule"
                    && !tolerations
                        .iter()
                        .filter(counts)
                        .any(|t| selectors::tolerates(t, taint))
            })
            .count() as i64
    }
    fn normalize(&self, _: &CycleState, scores: &mut [i64]) {
        normalize_by_max(scores, true);
    }
}

pub struct NodePorts;
impl Plugin for NodePorts {
    fn name(&self) -> &'static str {
        "NodePorts"
    }
    fn has_filter(&self) -> bool {
        true
    }
    fn filter(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        for (proto, ip, port) in &pod.host_ports {
            let clash = node.used_ports.iter().any(|(p2, ip2, port2)| {
                p2 == proto && port2 == port && (ip == ip2 || ip == "0.0.0.0" || ip2 == "0.0.0.0")
            });
            if clash {
                return Status::unschedulable(
                    "node(s) didn't have free ports for the requested pod ports",
                );
            }
        }
        Status::success()
    }
}

pub struct ImageLocality;
impl Plugin for ImageLocality {
    fn name(&self) -> &'static str {
        "ImageLocality"
    }
    fn has_score(&self) -> bool {
        true
    }
    fn score(&self, _: &CycleState, pod: &PodInfo, node: &NodeInfo) -> i64 {
        const MB: i64 = 1024 * 1024;
        let Some(spec) = pod.pod.spec.as_ref() else {
            return 0;
        };
        let containers = spec.containers.len() as i64;
        let sum: i64 = spec
            .containers
            .iter()
            .filter_map(|c| c.image.as_deref())
            .map(|image| {
                if node.images.is_empty() {
                    return 0;
                }
                node.images
                    .get(image)
                    .or_else(|| {
                        // An image named without tag or digest is `:latest`.
                        let untagged = !(image.contains(':') || image.contains('@'));
                        untagged
                            .then(|| node.images.get(&format!("{image}:latest")))
                            .flatten()
                    })
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        let (min, max) = (23 * MB, 1000 * MB * containers.max(1));
        let sum = sum.clamp(min, max);
        MAX_NODE_SCORE * (sum - min) / (max - min)
    }
}

/// Every plugin by its upstream name.
pub fn registry(strategy: ScoringStrategy) -> Vec<Arc<dyn Plugin>> {
    vec![
        Arc::new(NodeName),
        Arc::new(NodeUnschedulable),
        Arc::new(NodeResourcesFit { strategy }),
        Arc::new(BalancedAllocation),
        Arc::new(NodeAffinity),
        Arc::new(TaintToleration),
        Arc::new(NodePorts),
        Arc::new(ImageLocality),
        Arc::new(interpod::InterPodAffinity),
        Arc::new(spread::PodTopologySpread),
        Arc::new(preemption::DefaultPreemption),
    ]
}
