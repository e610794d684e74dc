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

/// A hash map for the scheduling cycle's lookups, made once per node per plugin: a fast
/// (not DoS-resistant) hasher, as the keys are the cluster's own node labels and plugin names.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Data plugins compute in PreFilter/PreScore and read back in Filter/Score, keyed by plugin.
#[derive(Default)]
pub struct CycleState {
    data: FastMap<&'static str, Box<dyn Any + Send + Sync>>,
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
    /// The node is chosen: claim what the plugin manages (before the pod is assumed).
    fn reserve(&self, _state: &mut CycleState, _pod: &PodInfo, _node: &str) -> Status {
        Status::success()
    }
    /// Undo `reserve` (a later Reserve, Permit, PreBind or the binding failed).
    fn unreserve(&self, _state: &CycleState, _pod: &PodInfo, _node: &str) {}
    /// Last word before binding: success allows, anything else rejects the placement.
    fn permit(&self, _state: &CycleState, _pod: &PodInfo, _node: &str) -> Status {
        Status::success()
    }
    /// Runs in the binding task, before the binding is written.
    fn pre_bind(&self, _state: &CycleState, _pod: &PodInfo, _node: &str) -> Status {
        Status::success()
    }
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
    pub reserve: Vec<Arc<dyn Plugin>>,
    pub permit: Vec<Arc<dyn Plugin>>,
    pub pre_bind: Vec<Arc<dyn Plugin>>,
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

    /// Reserve on every plugin, then Permit; on any failure, unreserve (in reverse) what was
    /// reserved and return the failing status (its plugin named).
    pub fn reserve_and_permit(
        &self,
        state: &mut CycleState,
        pod: &PodInfo,
        node: &str,
    ) -> Result<(), Status> {
        for (i, p) in self.reserve.iter().enumerate() {
            let mut s = p.reserve(state, pod, node);
            if !s.is_success() {
                s.plugin = p.name();
                for q in self.reserve[..=i].iter().rev() {
                    q.unreserve(state, pod, node);
                }
                return Err(s);
            }
        }
        for p in &self.permit {
            let mut s = p.permit(state, pod, node);
            if !s.is_success() {
                s.plugin = p.name();
                self.unreserve(state, pod, node);
                return Err(s);
            }
        }
        Ok(())
    }

    /// Undo every Reserve (in reverse order).
    pub fn unreserve(&self, state: &CycleState, pod: &PodInfo, node: &str) {
        for p in self.reserve.iter().rev() {
            p.unreserve(state, pod, node);
        }
    }

    /// Every PreBind plugin; the first failure decides.
    pub fn run_pre_bind(
        &self,
        state: &CycleState,
        pod: &PodInfo,
        node: &str,
    ) -> Result<(), Status> {
        for p in &self.pre_bind {
            let mut s = p.pre_bind(state, pod, node);
            if !s.is_success() {
                s.plugin = p.name();
                return Err(s);
            }
        }
        Ok(())
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
            reserve: vec![],
            permit: vec![],
            pre_bind: vec![],
            percentage_of_nodes_to_score: 0,
        };
        assert_eq!(p.nodes_to_find(50), 50);
        assert_eq!(p.nodes_to_find(5000), 500);
        assert_eq!(p.nodes_to_find(1000), 420);
    }
}

#[cfg(test)]
mod reserve_tests {
    use super::*;
    use std::sync::Mutex;

    struct Recorder {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        reserve_ok: bool,
        permit_ok: bool,
    }

    impl Plugin for Recorder {
        fn name(&self) -> &'static str {
            self.name
        }
        fn reserve(&self, _: &mut CycleState, _: &PodInfo, node: &str) -> Status {
            self.log
                .lock()
                .unwrap()
                .push(format!("reserve {} {node}", self.name));
            if self.reserve_ok {
                Status::success()
            } else {
                Status::unschedulable("no room in my books")
            }
        }
        fn unreserve(&self, _: &CycleState, _: &PodInfo, node: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("unreserve {} {node}", self.name));
        }
        fn permit(&self, _: &CycleState, _: &PodInfo, _: &str) -> Status {
            if self.permit_ok {
                Status::success()
            } else {
                Status::unschedulable("not now")
            }
        }
    }

    fn profile(plugins: Vec<Arc<dyn Plugin>>) -> Profile {
        Profile {
            scheduler_name: "t".into(),
            pre_filter: vec![],
            filter: vec![],
            post_filter: vec![],
            score: vec![],
            reserve: plugins.clone(),
            permit: plugins,
            pre_bind: vec![],
            percentage_of_nodes_to_score: 0,
        }
    }

    fn pod() -> PodInfo {
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "d", "uid": "p"}, "spec": {"containers": [{"name": "c"}]}}))
        .unwrap();
        PodInfo::new(Arc::new(p))
    }

    #[test]
    fn a_failed_reserve_or_permit_unreserves_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let rec = |name, reserve_ok, permit_ok| -> Arc<dyn Plugin> {
            Arc::new(Recorder {
                name,
                log: log.clone(),
                reserve_ok,
                permit_ok,
            })
        };
        let p = profile(vec![rec("a", true, true), rec("b", false, true)]);
        let err = p
            .reserve_and_permit(&mut CycleState::default(), &pod(), "n1")
            .unwrap_err();
        assert_eq!(
            (err.plugin, err.reasons[0].as_str()),
            ("b", "no room in my books")
        );
        assert_eq!(
            *log.lock().unwrap(),
            [
                "reserve a n1",
                "reserve b n1",
                "unreserve b n1",
                "unreserve a n1"
            ]
        );
        log.lock().unwrap().clear();
        let p = profile(vec![rec("a", true, true), rec("c", true, false)]);
        let err = p
            .reserve_and_permit(&mut CycleState::default(), &pod(), "n2")
            .unwrap_err();
        assert_eq!(err.plugin, "c");
        assert_eq!(
            *log.lock().unwrap(),
            [
                "reserve a n2",
                "reserve c n2",
                "unreserve c n2",
                "unreserve a n2"
            ]
        );
        let p = profile(vec![rec("a", true, true)]);
        assert!(p
            .reserve_and_permit(&mut CycleState::default(), &pod(), "n3")
            .is_ok());
    }
}
