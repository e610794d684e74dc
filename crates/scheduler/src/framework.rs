//! The scheduling framework: upstream's extension points as one plugin trait, a per-cycle
//! state, plugin statuses, and the profile that strings plugins together.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::{Cache, NodeInfo, PodInfo};

/// Scores are normalised to 0..=MAX_NODE_SCORE, as upstream.
pub const MAX_NODE_SCORE: i64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Success,
    /// Might fit if something changes (preemption may help).
    Unschedulable,
    /// Will not fit on this node whatever is removed from it.
    UnschedulableAndUnresolvable,
    Error,
    /// The plugin has nothing to do for this pod (PreFilter/PreScore).
    Skip,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub code: Code,
    pub reasons: Vec<String>,
    pub plugin: &'static str,
}

impl Status {
    pub fn success() -> Status {
        Status {
            code: Code::Success,
            reasons: vec![],
            plugin: "",
        }
    }
    pub fn skip() -> Status {
        Status {
            code: Code::Skip,
            ..Status::success()
        }
    }
    pub fn unschedulable(reason: impl Into<String>) -> Status {
        Status {
            code: Code::Unschedulable,
            reasons: vec![reason.into()],
            plugin: "",
        }
    }
    pub fn unresolvable(reason: impl Into<String>) -> Status {
        Status {
            code: Code::UnschedulableAndUnresolvable,
            reasons: vec![reason.into()],
            plugin: "",
        }
    }
    pub fn error(reason: impl Into<String>) -> Status {
        Status {
            code: Code::Error,
            reasons: vec![reason.into()],
            plugin: "",
        }
    }
    pub fn is_success(&self) -> bool {
        self.code == Code::Success
    }
}

/// Data plugins compute in PreFilter/PreScore and read back in Filter/Score, keyed by plugin.
#[derive(Default)]
pub struct CycleState {
    data: HashMap<&'static str, Box<dyn Any + Send + Sync>>,
}

impl CycleState {
    pub fn write<T: Any + Send + Sync>(&mut self, key: &'static str, v: T) {
        self.data.insert(key, Box::new(v));
    }
    pub fn read<T: Any>(&self, key: &'static str) -> Option<&T> {
        self.data.get(key).and_then(|b| b.downcast_ref())
    }
}

/// The outcome of PostFilter: a node to nominate after evicting victims.
#[derive(Debug, Clone)]
pub struct Nomination {
    pub node: String,
    pub victims: Vec<Arc<PodInfo>>,
}

/// One plugin, with every extension point it may implement. The defaults do nothing.
pub trait Plugin: Send + Sync {
    fn name(&self) -> &'static str;

    /// Runs once per cycle before Filter; may reject the pod outright.
    fn pre_filter(&self, _state: &mut CycleState, _pod: &PodInfo, _cache: &Cache) -> Status {
        Status::success()
    }
    /// Whether the pod fits on this node.
    fn filter(&self, _state: &CycleState, _pod: &PodInfo, _node: &NodeInfo) -> Status {
        Status::success()
    }
    fn has_filter(&self) -> bool {
        false
    }
    /// Runs once per cycle over the feasible nodes, before Score.
    fn pre_score(
        &self,
        _state: &mut CycleState,
        _pod: &PodInfo,
        _nodes: &[&NodeInfo],
        _cache: &Cache,
    ) -> Status {
        Status::success()
    }
    /// A raw score for one feasible node.
    fn score(&self, _state: &CycleState, _pod: &PodInfo, _node: &NodeInfo) -> i64 {
        0
    }
    fn has_score(&self) -> bool {
        false
    }
    /// Map raw scores to 0..=MAX_NODE_SCORE (default: they already are).
    fn normalize(&self, _state: &CycleState, _scores: &mut [i64]) {}
    /// When no node fits: try to make room (preemption).
    fn post_filter(
        &self,
        _state: &CycleState,
        _pod: &PodInfo,
        _cache: &Cache,
        _statuses: &HashMap<String, Status>,
        _profile: &Profile,
    ) -> Option<Result<Nomination, String>> {
        None
    }
}

/// The plugins of one scheduler profile, per extension point, with score weights.
pub struct Profile {
    pub scheduler_name: String,
    pub pre_filter: Vec<Arc<dyn Plugin>>,
    pub filter: Vec<Arc<dyn Plugin>>,
    pub post_filter: Vec<Arc<dyn Plugin>>,
    pub score: Vec<(Arc<dyn Plugin>, i64)>,
    /// 0 = adaptive (upstream's formula).
    pub percentage_of_nodes_to_score: u32,
}

impl Profile {
    /// Run every Filter plugin on one node; the first failure decides.
    pub fn run_filters(&self, state: &CycleState, pod: &PodInfo, node: &NodeInfo) -> Status {
        for p in &self.filter {
            let mut s = p.filter(state, pod, node);
            if !s.is_success() {
                s.plugin = p.name();
                return s;
            }
        }
        Status::success()
    }

    /// How many feasible nodes to find before scoring (upstream's adaptive percentage).
    pub fn nodes_to_find(&self, all: usize) -> usize {
        const MIN_FEASIBLE: usize = 100;
        if all < MIN_FEASIBLE {
            return all;
        }
        let pct = if self.percentage_of_nodes_to_score == 0 {
            (50i64 - (all as i64) / 125).max(5) as usize
        } else {
            self.percentage_of_nodes_to_score.min(100) as usize
        };
        ((all * pct) / 100).max(MIN_FEASIBLE)
    }
}

/// Upstream's message for a pod no node fits: "0/5 nodes are available: 3 Insufficient cpu,
/// 2 node(s) had untolerated taint {a: b}." — reasons counted over nodes, sorted.
pub fn fit_error_message(
    all_nodes: usize,
    statuses: &HashMap<String, Status>,
    pre: Option<&Status>,
) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    match pre {
        Some(s) => {
            for r in &s.reasons {
                *counts.entry(r.clone()).or_default() += all_nodes;
            }
        }
        None => {
            for s in statuses.values() {
                for r in &s.reasons {
                    *counts.entry(r.clone()).or_default() += 1;
                }
            }
        }
    }
    let mut parts: Vec<String> = counts
        .into_iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{all_nodes} nodes are available.")
    } else {
        format!("0/{all_nodes} nodes are available: {}.", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_error_counts_and_sorts_reasons() {
        let mut st = HashMap::new();
        st.insert("a".to_string(), Status::unschedulable("Insufficient cpu"));
        st.insert("b".to_string(), Status::unschedulable("Insufficient cpu"));
        st.insert(
            "c".to_string(),
            Status::unresolvable("node(s) had untolerated taint {k: v}"),
        );
        assert_eq!(
            fit_error_message(3, &st, None),
            "0/3 nodes are available: 1 node(s) had untolerated taint {k: v}, 2 Insufficient cpu."
        );
        assert_eq!(
            fit_error_message(0, &HashMap::new(), None),
            "0/0 nodes are available."
        );
    }

    #[test]
    fn adaptive_number_of_nodes_to_find() {
        let p = Profile {
            scheduler_name: "x".into(),
            pre_filter: vec![],
            filter: vec![],
            post_filter: vec![],
            score: vec![],
            percentage_of_nodes_to_score: 0,
        };
        assert_eq!(p.nodes_to_find(50), 50);
        assert_eq!(p.nodes_to_find(5000), 500);
        assert_eq!(p.nodes_to_find(1000), 420);
    }
}
