//! The scheduler's view of the cluster: every node with the pods on it and what they use,
//! including pods the scheduler has *assumed* onto a node while their binding is in flight,
//! so that asynchronous binds can never overcommit a node.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, PodAffinityTerm, Taint, WeightedPodAffinityTerm};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::resources::{node_allocatable, pod_non_zero_requests, pod_requests, Resource};

/// A pod's inter-pod affinity terms.
#[derive(Debug, Default)]
pub struct AffinityTerms {
    pub required_affinity: Vec<PodAffinityTerm>,
    pub required_anti: Vec<PodAffinityTerm>,
    pub preferred_affinity: Vec<WeightedPodAffinityTerm>,
    pub preferred_anti: Vec<WeightedPodAffinityTerm>,
}

impl AffinityTerms {
    fn of(spec: &k8s_openapi::api::core::v1::PodSpec) -> AffinityTerms {
        let a = spec.affinity.as_ref();
        let pa = a.and_then(|a| a.pod_affinity.as_ref());
        let anti = a.and_then(|a| a.pod_anti_affinity.as_ref());
        AffinityTerms {
            required_affinity: pa
                .and_then(|p| {
                    p.required_during_scheduling_ignored_during_execution
                        .clone()
                })
                .unwrap_or_default(),
            required_anti: anti
                .and_then(|p| {
                    p.required_during_scheduling_ignored_during_execution
                        .clone()
                })
                .unwrap_or_default(),
            preferred_affinity: pa
                .and_then(|p| {
                    p.preferred_during_scheduling_ignored_during_execution
                        .clone()
                })
                .unwrap_or_default(),
            preferred_anti: anti
                .and_then(|p| {
                    p.preferred_during_scheduling_ignored_during_execution
                        .clone()
                })
                .unwrap_or_default(),
        }
    }
}

/// A pod with what the scheduler needs of it computed once.
#[derive(Debug)]
pub struct PodInfo {
    pub pod: Arc<Pod>,
    pub key: String,
    pub uid: String,
    pub requests: Resource,
    pub non_zero_cpu: i64,
    pub non_zero_memory: i64,
    pub priority: i32,
    /// Has pod affinity or anti-affinity terms.
    pub has_affinity: bool,
    /// Pod (anti-)affinity terms, taken out of the spec once.
    pub terms: Arc<AffinityTerms>,
    /// (protocol, hostIP, hostPort) of every container port with a host port.
    pub host_ports: Vec<(String, String, i32)>,
}

pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

impl PodInfo {
    pub fn new(pod: Arc<Pod>) -> PodInfo {
        let spec = pod.spec.clone().unwrap_or_default();
        let requests = pod_requests(&spec);
        let (non_zero_cpu, non_zero_memory) = pod_non_zero_requests(&spec);
        let host_ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                p.host_port.filter(|hp| *hp > 0).map(|hp| {
                    (
                        p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                        hp,
                    )
                })
            })
            .collect();
        PodInfo {
            key: pod_key(&pod),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            requests,
            non_zero_cpu,
            non_zero_memory,
            priority: spec.priority.unwrap_or(0),
            has_affinity: spec
                .affinity
                .as_ref()
                .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some()),
            terms: Arc::new(AffinityTerms::of(&spec)),
            host_ports,
            pod,
        }
    }

    pub fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or_default()
    }

    pub fn labels(&self) -> &std::collections::BTreeMap<String, String> {
        static EMPTY: std::sync::OnceLock<std::collections::BTreeMap<String, String>> =
            std::sync::OnceLock::new();
        self.pod
            .metadata
            .labels
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
    }
}

/// One node and what runs (or is assumed to run) on it.
#[derive(Debug)]
pub struct NodeInfo {
    pub name: String,
    pub node: Arc<Node>,
    pub allocatable: Resource,
    pub requested: Resource,
    pub non_zero_cpu: i64,
    pub non_zero_memory: i64,
    pub pods: Vec<Arc<PodInfo>>,
    pub used_ports: HashSet<(String, String, i32)>,
    /// Images present on the node (name → size), from its status.
    pub images: HashMap<String, i64>,
    /// Copies of what every filter and score reads of the node for every pod, kept here in
    /// the cache's array: reaching them in the `Node` costs a cache miss or more per node, and
    /// a pod visits hundreds of nodes.
    pub unschedulable: bool,
    pub taints: Vec<Taint>,
    /// The values of the labels in `TOPOLOGY_KEYS` (default topology spreading's domains).
    topology: [Option<String>; 2],
}

/// The topology keys of upstream's default spreading constraints.
const TOPOLOGY_KEYS: [&str; 2] = ["kubernetes.io/hostname", "topology.kubernetes.io/zone"];

impl NodeInfo {
    fn new(node: Arc<Node>) -> NodeInfo {
        let mut info = NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            allocatable: node_allocatable(&node),
            requested: Resource::default(),
            non_zero_cpu: 0,
            non_zero_memory: 0,
            pods: Vec::new(),
            used_ports: HashSet::new(),
            images: HashMap::new(),
            unschedulable: false,
            taints: Vec::new(),
            topology: Default::default(),
            node: node.clone(),
        };
        info.set_node(node);
        info
    }

    fn set_node(&mut self, node: Arc<Node>) {
        self.allocatable = node_allocatable(&node);
        self.images = node
            .status
            .as_ref()
            .and_then(|s| s.images.as_ref())
            .map(|imgs| {
                imgs.iter()
                    .flat_map(|i| {
                        let size = i.size_bytes.unwrap_or(0);
                        i.names.iter().flatten().map(move |n| (n.clone(), size))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let spec = node.spec.as_ref();
        self.unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false);
        self.taints = spec.and_then(|s| s.taints.clone()).unwrap_or_default();
        let labels = node.metadata.labels.as_ref();
        self.topology = TOPOLOGY_KEYS.map(|k| labels.and_then(|l| l.get(k)).cloned());
        self.node = node;
    }

    /// The value of one of the node's labels (the topology keys without visiting the `Node`).
    pub fn label(&self, key: &str) -> Option<&String> {
        match TOPOLOGY_KEYS.iter().position(|k| *k == key) {
            Some(i) => self.topology[i].as_ref(),
            None => self.labels().get(key),
        }
    }

    fn add_pod(&mut self, p: Arc<PodInfo>) {
        self.requested.add(&p.requests);
        self.requested.pods += 1;
        self.non_zero_cpu += p.non_zero_cpu;
        self.non_zero_memory += p.non_zero_memory;
        for port in &p.host_ports {
            self.used_ports.insert(port.clone());
        }
        self.pods.push(p);
    }

    fn remove_pod(&mut self, uid: &str) -> Option<Arc<PodInfo>> {
        let i = self.pods.iter().position(|p| p.uid == uid)?;
        let p = self.pods.swap_remove(i);
        self.requested.sub(&p.requests);
        self.requested.pods -= 1;
        self.non_zero_cpu -= p.non_zero_cpu;
        self.non_zero_memory -= p.non_zero_memory;
        for port in &p.host_ports {
            if !self.pods.iter().any(|o| o.host_ports.contains(port)) {
                self.used_ports.remove(port);
            }
        }
        Some(p)
    }

    /// This node as it would be without the pods in `uids` (for preemption's what-ifs).
    pub fn without(&self, uids: &HashSet<String>) -> NodeInfo {
        let mut n = NodeInfo::new(self.node.clone());
        for p in &self.pods {
            if !uids.contains(&p.uid) {
                n.add_pod(p.clone());
            }
        }
        n
    }

    pub fn labels(&self) -> &std::collections::BTreeMap<String, String> {
        static EMPTY: std::sync::OnceLock<std::collections::BTreeMap<String, String>> =
            std::sync::OnceLock::new();
        self.node
            .metadata
            .labels
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
    }
}

#[derive(Debug, Clone)]
struct PodState {
    node: String,
    assumed: bool,
}

/// Nodes in a stable order plus where every known pod is.
#[derive(Default, Debug)]
pub struct Cache {
    pub nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    pods: HashMap<String, PodState>,
    /// Pods that arrived before their node.
    orphans: HashMap<String, Vec<Arc<PodInfo>>>,
    /// How many counted pods have pod (anti-)affinity (when none, InterPodAffinity skips).
    with_affinity: usize,
    /// Selectors of Services, ReplicationControllers, ReplicaSets and StatefulSets, by
    /// "kind/namespace/name" (ordered: a namespace's Services are one range): what upstream's
    /// default topology spreading spreads by.
    pub workload_selectors: std::collections::BTreeMap<String, (String, LabelSelector)>,
    /// Placed pods by each of their labels ("namespace\0key\0value" → uid → (node, pod)): the
    /// pods a selector with matchLabels can match at most, found without visiting every node.
    by_label: HashMap<String, HashMap<String, (String, Arc<PodInfo>)>>,
    /// Namespace labels, for pod affinity terms' namespaceSelector.
    pub namespace_labels: HashMap<String, std::collections::BTreeMap<String, String>>,
}

fn label_key(namespace: &str, key: &str, value: &str) -> String {
    format!("{namespace}\0{key}\0{value}")
}

/// Whether a pod still occupies its node (terminal pods do not).
pub fn occupies_node(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

impl Cache {
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.index.get(name).map(|i| &self.nodes[*i])
    }

    pub fn upsert_node(&mut self, node: Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let node = Arc::new(node);
        match self.index.get(&name) {
            Some(i) => self.nodes[*i].set_node(node),
            None => {
                let mut info = NodeInfo::new(node);
                for p in self.orphans.remove(&name).unwrap_or_default() {
                    info.add_pod(p);
                }
                self.index.insert(name, self.nodes.len());
                self.nodes.push(info);
            }
        }
    }

    pub fn remove_node(&mut self, name: &str) {
        let Some(i) = self.index.remove(name) else {
            return;
        };
        let info = self.nodes.swap_remove(i);
        if i < self.nodes.len() {
            let moved = self.nodes[i].name.clone();
            self.index.insert(moved, i);
        }
        // Its pods wait for the node to come back (or for their own deletion).
        self.orphans.insert(name.to_string(), info.pods);
    }

    pub fn pods_with_affinity(&self) -> usize {
        self.with_affinity
    }

    fn place(&mut self, node: &str, p: Arc<PodInfo>) {
        if p.has_affinity {
            self.with_affinity += 1;
        }
        for (k, v) in p.labels() {
            self.by_label
                .entry(label_key(p.namespace(), k, v))
                .or_default()
                .insert(p.uid.clone(), (node.to_string(), p.clone()));
        }
        match self.index.get(node) {
            Some(i) => self.nodes[*i].add_pod(p),
            None => self.orphans.entry(node.to_string()).or_default().push(p),
        }
    }

    fn unplace(&mut self, node: &str, uid: &str) {
        let removed = match self.index.get(node) {
            Some(i) => self.nodes[*i].remove_pod(uid),
            None => self.orphans.get_mut(node).and_then(|v| {
                let i = v.iter().position(|p| p.uid == uid)?;
                Some(v.swap_remove(i))
            }),
        };
        let Some(p) = removed else {
            return;
        };
        if p.has_affinity {
            self.with_affinity -= 1;
        }
        for (k, v) in p.labels() {
            let key = label_key(p.namespace(), k, v);
            if let Some(posting) = self.by_label.get_mut(&key) {
                posting.remove(uid);
                if posting.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
    }

    /// The pods on known nodes in `namespace` that carry the rarest of `sel`'s matchLabels
    /// pairs, with their nodes: every pod `sel` can match, and more (the caller matches the
    /// whole selector). None when `sel` has no matchLabels, or when more than a quarter of all
    /// pods carry that pair: then visiting every node's pods is the cheaper answer.
    pub fn pods_with_labels<'a>(
        &'a self,
        namespace: &str,
        sel: &LabelSelector,
    ) -> Option<Vec<(&'a NodeInfo, &'a Arc<PodInfo>)>> {
        let pairs = sel.match_labels.as_ref().filter(|m| !m.is_empty())?;
        let shortest = pairs
            .iter()
            .map(|(k, v)| self.by_label.get(&label_key(namespace, k, v)))
            .min_by_key(|posting| posting.map_or(0, |p| p.len()))?;
        let Some(posting) = shortest else {
            return Some(Vec::new());
        };
        if posting.len() * 4 > self.pods.len() {
            // Not selective: a hash lookup per pod costs more than visiting every node's pods.
            return None;
        }
        Some(
            posting
                .values()
                .filter_map(|(node, p)| Some((self.node(node)?, p)))
                .collect(),
        )
    }

    /// A pod bound to a node (seen through the API): count it there, replacing an assumption.
    pub fn upsert_bound_pod(&mut self, pod: Arc<Pod>) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if let Some(old) = self.pods.remove(&uid) {
            self.unplace(&old.node, &uid);
        }
        if !occupies_node(&pod) || node.is_empty() {
            return;
        }
        self.place(&node, Arc::new(PodInfo::new(pod)));
        self.pods.insert(
            uid,
            PodState {
                node,
                assumed: false,
            },
        );
    }

    pub fn remove_pod(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            self.unplace(&old.node, uid);
        }
    }

    /// Count `pod` on `node` before its binding is confirmed.
    pub fn assume(&mut self, pod: Arc<PodInfo>, node: &str) {
        let uid = pod.uid.clone();
        if let Some(old) = self.pods.remove(&uid) {
            self.unplace(&old.node, &uid);
        }
        self.place(node, pod);
        self.pods.insert(
            uid,
            PodState {
                node: node.to_string(),
                assumed: true,
            },
        );
    }

    /// The binding failed: the assumption goes.
    pub fn forget(&mut self, uid: &str) {
        if matches!(self.pods.get(uid), Some(PodState { assumed: true, .. })) {
            self.remove_pod(uid);
        }
    }

    /// Every pod counted from the API (not assumed).
    pub fn bound_uids(&self) -> Vec<String> {
        self.pods
            .iter()
            .filter(|(_, s)| !s.assumed)
            .map(|(u, _)| u.clone())
            .collect()
    }

    pub fn is_assumed(&self, uid: &str) -> bool {
        matches!(self.pods.get(uid), Some(PodState { assumed: true, .. }))
    }

    /// Where a pod is counted, if anywhere.
    pub fn node_of(&self, uid: &str) -> Option<&str> {
        self.pods.get(uid).map(|s| s.node.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"allocatable": {"cpu": cpu, "memory": "1Gi", "pods": "110"}},
        }))
        .unwrap()
    }

    fn pod(uid: &str, node: Option<&str>, cpu: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": uid, "namespace": "default", "uid": uid},
                "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn node_copies_follow_the_node() {
        let mut c = Cache::default();
        let mut n: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "h1", "disk": "ssd"}},
            "spec": {"unschedulable": true, "taints": [{"key": "k", "effect": "NoSchedule"}]},
        }))
        .unwrap();
        c.upsert_node(n.clone());
        let info = c.node("n1").unwrap();
        assert!(info.unschedulable);
        assert_eq!(info.taints.len(), 1);
        assert_eq!(
            info.label("kubernetes.io/hostname").map(String::as_str),
            Some("h1")
        );
        assert_eq!(info.label("disk").map(String::as_str), Some("ssd"));
        assert_eq!(info.label("topology.kubernetes.io/zone"), None);
        // The node changes: so do the copies.
        n.spec = None;
        n.metadata.labels =
            Some([("topology.kubernetes.io/zone".to_string(), "z".to_string())].into());
        c.upsert_node(n);
        let info = c.node("n1").unwrap();
        assert!(!info.unschedulable && info.taints.is_empty());
        assert_eq!(info.label("kubernetes.io/hostname"), None);
        assert_eq!(
            info.label("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("z")
        );
    }

    #[test]
    fn assumed_pods_count_until_confirmed_or_forgotten() {
        let mut c = Cache::default();
        c.upsert_node(node("n1", "2"));
        c.assume(Arc::new(PodInfo::new(pod("a", None, "1"))), "n1");
        assert_eq!(c.node("n1").unwrap().requested.milli_cpu, 1000);
        // The informer confirms: counted once, no longer assumed.
        c.upsert_bound_pod(pod("a", Some("n1"), "1"));
        assert_eq!(c.node("n1").unwrap().requested.milli_cpu, 1000);
        assert!(!c.is_assumed("a"));
        c.assume(Arc::new(PodInfo::new(pod("b", None, "500m"))), "n1");
        c.forget("b");
        assert_eq!(c.node("n1").unwrap().requested.milli_cpu, 1000);
        assert_eq!(c.node("n1").unwrap().requested.pods, 1);
        c.remove_pod("a");
        assert!(c.node("n1").unwrap().requested.is_zero());
    }

    #[test]
    fn pods_seen_before_their_node_are_counted_when_it_arrives() {
        let mut c = Cache::default();
        c.upsert_bound_pod(pod("a", Some("n2"), "1"));
        c.upsert_node(node("n1", "2"));
        c.upsert_node(node("n2", "2"));
        assert_eq!(c.node("n2").unwrap().requested.milli_cpu, 1000);
        c.remove_node("n1");
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.node("n2").unwrap().pods.len(), 1);
    }
}
