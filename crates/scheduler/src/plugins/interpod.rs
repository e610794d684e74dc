//! InterPodAffinity: required and preferred pod affinity and anti-affinity over topology
//! domains, including existing pods' anti-affinity towards the incoming pod.
//!
//! Namespaces, as upstream: a term applies to the union of its `namespaces` and the namespaces its
//! `namespaceSelector` selects (`{}` selects all); with neither, to the pod's own namespace.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::PodAffinityTerm;

use super::selectors::selector_matches;
use crate::cache::{Cache, NodeInfo, PodInfo};
use crate::framework::{CycleState, Plugin, Status, MAX_NODE_SCORE};

const KEY: &str = "InterPodAffinity";

fn term_selects(
    term: &PodAffinityTerm,
    owner_ns: &str,
    candidate: &PodInfo,
    cache: &Cache,
) -> bool {
    let listed = term.namespaces.as_deref().unwrap_or_default();
    let ns = candidate.namespace();
    let ns_ok = match &term.namespace_selector {
        None if listed.is_empty() => ns == owner_ns,
        None => listed.iter().any(|n| n == ns),
        Some(sel) => {
            listed.iter().any(|n| n == ns)
                || cache
                    .namespace_labels
                    .get(ns)
                    .is_some_and(|labels| selector_matches(sel, labels))
                || (sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
                    && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty()))
        }
    };
    ns_ok
        && term
            .label_selector
            .as_ref()
            .is_some_and(|s| selector_matches(s, candidate.labels()))
}

#[derive(Default)]
struct Pre {
    /// Per required affinity term: topology values holding a matching pod.
    affinity: Vec<(String, HashSet<String>)>,
    /// No pod anywhere matches the affinity terms, but the pod matches them itself.
    affinity_self_ok: bool,
    /// topologyKey → values the incoming pod's anti-affinity forbids.
    anti: HashMap<String, HashSet<String>>,
    /// topologyKey → values existing pods' anti-affinity forbids.
    existing_anti: HashMap<String, HashSet<String>>,
}

pub struct InterPodAffinity;

impl Plugin for InterPodAffinity {
    fn name(&self) -> &'static str {
        KEY
    }

    fn pre_filter(&self, state: &mut CycleState, pod: &PodInfo, cache: &Cache) -> Status {
        let (aff, anti) = (&pod.terms.required_affinity, &pod.terms.required_anti);
        if aff.is_empty() && anti.is_empty() && cache.pods_with_affinity() == 0 {
            return Status::skip();
        }
        let mut pre = Pre {
            affinity: aff
                .iter()
                .map(|t| (t.topology_key.clone(), HashSet::new()))
                .collect(),
            ..Default::default()
        };
        let ns = pod.namespace().to_string();
        for node in &cache.nodes {
            let labels = node.labels();
            for existing in &node.pods {
                for (i, t) in aff.iter().enumerate() {
                    if let Some(v) = labels.get(&t.topology_key) {
                        if term_selects(t, &ns, existing, cache) {
                            pre.affinity[i].1.insert(v.clone());
                        }
                    }
                }
                for t in anti {
                    if let Some(v) = labels.get(&t.topology_key) {
                        if term_selects(t, &ns, existing, cache) {
                            pre.anti
                                .entry(t.topology_key.clone())
                                .or_default()
                                .insert(v.clone());
                        }
                    }
                }
                if !existing.has_affinity && aff.is_empty() && anti.is_empty() {
                    continue;
                }
                for t in &existing.terms.required_anti {
                    if let Some(v) = labels.get(&t.topology_key) {
                        if term_selects(t, existing.namespace(), pod, cache) {
                            pre.existing_anti
                                .entry(t.topology_key.clone())
                                .or_default()
                                .insert(v.clone());
                        }
                    }
                }
            }
        }
        pre.affinity_self_ok = !aff.is_empty()
            && pre.affinity.iter().all(|(_, v)| v.is_empty())
            && aff.iter().all(|t| term_selects(t, &ns, pod, cache));
        state.write(KEY, pre);
        Status::success()
    }

    fn has_filter(&self) -> bool {
        true
    }

    fn filter(&self, state: &CycleState, _pod: &PodInfo, node: &NodeInfo) -> Status {
        let Some(pre) = state.read::<Pre>(KEY) else {
            return Status::success();
        };
        let labels = node.labels();
        let forbidden = |m: &HashMap<String, HashSet<String>>| {
            m.iter()
                .any(|(k, values)| labels.get(k).is_some_and(|v| values.contains(v)))
        };
        if forbidden(&pre.existing_anti) {
            return Status::unschedulable(
                "node(s) didn't satisfy existing pods anti-affinity rules",
            );
        }
        if forbidden(&pre.anti) {
            return Status::unschedulable("node(s) didn't match pod anti-affinity rules");
        }
        if !pre.affinity.is_empty() {
            let ok = pre.affinity.iter().all(|(k, values)| {
                labels
                    .get(k)
                    .is_some_and(|v| values.contains(v) || pre.affinity_self_ok)
            });
            if !ok {
                return Status::unschedulable("node(s) didn't match pod affinity rules");
            }
        }
        Status::success()
    }

    fn pre_score(
        &self,
        state: &mut CycleState,
        pod: &PodInfo,
        _nodes: &[&NodeInfo],
        cache: &Cache,
    ) -> Status {
        let (pref_aff, pref_anti) = (&pod.terms.preferred_affinity, &pod.terms.preferred_anti);
        if pref_aff.is_empty() && pref_anti.is_empty() && cache.pods_with_affinity() == 0 {
            return Status::skip();
        }
        // Weight per (topologyKey, value).
        let mut weights: HashMap<(String, String), i64> = HashMap::new();
        let ns = pod.namespace().to_string();
        for node in &cache.nodes {
            let labels = node.labels();
            for existing in &node.pods {
                for (terms, sign) in [(pref_aff, 1i64), (pref_anti, -1)] {
                    for w in terms.iter() {
                        let t = &w.pod_affinity_term;
                        if let Some(v) = labels.get(&t.topology_key) {
                            if term_selects(t, &ns, existing, cache) {
                                *weights
                                    .entry((t.topology_key.clone(), v.clone()))
                                    .or_default() += sign * w.weight as i64;
                            }
                        }
                    }
                }
                // Symmetry: existing pods' preferences about the incoming pod.
                if !existing.has_affinity {
                    continue;
                }
                let their = [
                    (&existing.terms.preferred_affinity, 1i64),
                    (&existing.terms.preferred_anti, -1),
                ];
                for (terms, sign) in their {
                    for w in terms {
                        let t = &w.pod_affinity_term;
                        if let Some(v) = labels.get(&t.topology_key) {
                            if term_selects(t, existing.namespace(), pod, cache) {
                                *weights
                                    .entry((t.topology_key.clone(), v.clone()))
                                    .or_default() += sign * w.weight as i64;
                            }
                        }
                    }
                }
            }
        }
        state.write("InterPodAffinityScore", weights);
        Status::success()
    }

    fn has_score(&self) -> bool {
        true
    }

    fn score(&self, state: &CycleState, _pod: &PodInfo, node: &NodeInfo) -> i64 {
        let Some(w) = state.read::<HashMap<(String, String), i64>>("InterPodAffinityScore") else {
            return 0;
        };
        node.labels()
            .iter()
            .map(|(k, v)| w.get(&(k.clone(), v.clone())).copied().unwrap_or(0))
            .sum()
    }

    fn normalize(&self, _: &CycleState, scores: &mut [i64]) {
        let (min, max) = (
            scores.iter().copied().min().unwrap_or(0),
            scores.iter().copied().max().unwrap_or(0),
        );
        for s in scores.iter_mut() {
            *s = if max == min {
                0
            } else {
                (*s - min) * MAX_NODE_SCORE / (max - min)
            };
        }
    }
}
