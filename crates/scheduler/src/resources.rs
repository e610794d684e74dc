//! Resource arithmetic: quantities, what a pod requests, what a node offers.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Node, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Requests the scoring plugins assume for a container that requests nothing (upstream's).
pub const DEFAULT_MILLI_CPU: i64 = 100;
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

pub use apimachinery::quantity::parse_quantity;

fn milli(q: &Quantity) -> i64 {
    parse_quantity(&q.0)
        .map(|v| (v * 1000.0).ceil() as i64)
        .unwrap_or(0)
}

fn units(q: &Quantity) -> i64 {
    parse_quantity(&q.0).map(|v| v.ceil() as i64).unwrap_or(0)
}

/// An amount of every resource the scheduler accounts for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resource {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral_storage: i64,
    /// Pods (only meaningful for allocatable).
    pub pods: i64,
    /// Extended and other resources, in their base units.
    pub scalar: BTreeMap<String, i64>,
}

impl Resource {
    pub fn from_map(map: &BTreeMap<String, Quantity>) -> Resource {
        let mut r = Resource::default();
        for (name, q) in map {
            match name.as_str() {
                "cpu" => r.milli_cpu = milli(q),
                "memory" => r.memory = units(q),
                "ephemeral-storage" => r.ephemeral_storage = units(q),
                "pods" => r.pods = units(q),
                other => {
                    r.scalar.insert(other.to_string(), units(q));
                }
            }
        }
        r
    }

    pub fn add(&mut self, o: &Resource) {
        self.milli_cpu += o.milli_cpu;
        self.memory += o.memory;
        self.ephemeral_storage += o.ephemeral_storage;
        self.pods += o.pods;
        for (k, v) in &o.scalar {
            *self.scalar.entry(k.clone()).or_default() += v;
        }
    }

    pub fn sub(&mut self, o: &Resource) {
        self.milli_cpu -= o.milli_cpu;
        self.memory -= o.memory;
        self.ephemeral_storage -= o.ephemeral_storage;
        self.pods -= o.pods;
        for (k, v) in &o.scalar {
            *self.scalar.entry(k.clone()).or_default() -= v;
        }
    }

    /// Each resource the larger of the two.
    pub fn max_with(&mut self, o: &Resource) {
        self.milli_cpu = self.milli_cpu.max(o.milli_cpu);
        self.memory = self.memory.max(o.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(o.ephemeral_storage);
        for (k, v) in &o.scalar {
            let e = self.scalar.entry(k.clone()).or_default();
            *e = (*e).max(*v);
        }
    }

    pub fn is_zero(&self) -> bool {
        self.milli_cpu == 0
            && self.memory == 0
            && self.ephemeral_storage == 0
            && self.scalar.values().all(|v| *v == 0)
    }
}

fn container_requests(c: &Container) -> Resource {
    c.resources
        .as_ref()
        .and_then(|r| r.requests.as_ref().or(r.limits.as_ref()))
        .map(Resource::from_map)
        .unwrap_or_default()
}

/// What a pod requests, as upstream computes it: the larger of the app containers' sum (plus
/// sidecars, init containers that keep running) and each init container's request (plus the
/// sidecars started before it), plus the pod overhead.
pub fn pod_requests(spec: &PodSpec) -> Resource {
    let mut apps = Resource::default();
    for c in &spec.containers {
        apps.add(&container_requests(c));
    }
    let mut sidecars = Resource::default();
    let mut init_max = Resource::default();
    for c in spec.init_containers.iter().flatten() {
        let req = container_requests(c);
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars.add(&req);
            let mut at_start = sidecars.clone();
            at_start.max_with(&Resource::default());
            init_max.max_with(&at_start);
        } else {
            let mut during = sidecars.clone();
            during.add(&req);
            init_max.max_with(&during);
        }
    }
    let mut total = apps;
    total.add(&sidecars);
    total.max_with(&init_max);
    if let Some(overhead) = &spec.overhead {
        total.add(&Resource::from_map(overhead));
    }
    total
}

/// Requests with upstream's non-zero defaults for containers that request no cpu or memory
/// (used by scoring, so that best-effort pods still spread).
pub fn pod_non_zero_requests(spec: &PodSpec) -> (i64, i64) {
    let mut cpu = 0;
    let mut mem = 0;
    for c in &spec.containers {
        let r = container_requests(c);
        cpu += if r.milli_cpu == 0 {
            DEFAULT_MILLI_CPU
        } else {
            r.milli_cpu
        };
        mem += if r.memory == 0 {
            DEFAULT_MEMORY
        } else {
            r.memory
        };
    }
    (cpu, mem)
}

/// A node's allocatable resources (capacity when allocatable is absent).
pub fn node_allocatable(node: &Node) -> Resource {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
        .map(Resource::from_map)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> PodSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pod_requests_take_init_containers_and_overhead_into_account() {
        let s = spec(serde_json::json!({
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "100Mi"}}},
                {"name": "b", "resources": {"requests": {"cpu": "200m"}}},
            ],
            "initContainers": [
                {"name": "i", "resources": {"requests": {"cpu": "1", "memory": "10Mi"}}},
            ],
            "overhead": {"cpu": "10m"},
        }));
        let r = pod_requests(&s);
        assert_eq!(r.milli_cpu, 1010);
        assert_eq!(r.memory, 100 * 1024 * 1024);
        // Limits stand in for requests when only limits are given.
        let s = spec(serde_json::json!({"containers": [
            {"name": "a", "resources": {"limits": {"cpu": "2", "example.com/gpu": "1"}}}]}));
        let r = pod_requests(&s);
        assert_eq!((r.milli_cpu, r.scalar["example.com/gpu"]), (2000, 1));
        assert_eq!(
            pod_non_zero_requests(&spec(serde_json::json!({"containers": [{"name": "a"}]}))),
            (100, 200 * 1024 * 1024)
        );
    }
}
