//! The resource registry: one static description per kind. Every verb, discovery, OpenAPI and the
//! table printer are driven from this table; there is no handler per kind.

use serde_json::Value;

/// How a kind is served.
#[derive(Debug)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Plural resource name, as in URLs.
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Has a `/status` subresource: the main resource ignores status, `/status` ignores the rest.
    pub status: bool,
    /// Has a `/scale` subresource (autoscaling/v1 Scale).
    pub scale: bool,
    /// Status is reset on create (upstream's PrepareForCreate), for kinds whose status only
    /// controllers write.
    pub reset_status_on_create: bool,
    /// Names must be DNS-1123 labels rather than subdomains.
    pub name_is_label: bool,
    /// Field selectors this kind supports besides `metadata.name` and `metadata.namespace`.
    pub fields: &'static [&'static str],
    /// Storage prefix below `/registry/` (distinct where two groups serve one name).
    pub storage: &'static str,
    /// A review (access, rules, self): created to ask a question, answered in its status,
    /// never stored.
    pub review: bool,
}

impl Kind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `deployments.apps`: how upstream names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The store prefix for a namespace (or every namespace with `None`).
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("/registry/{}/{}/", self.storage, ns),
            _ => format!("/registry/{}/", self.storage),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{}", self.prefix(namespace), name)
    }

    /// Subresources, in discovery order.
    pub fn subresources(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.status {
            out.push("status");
        }
        if self.scale {
            out.push("scale");
        }
        if self.plural == "pods" {
            out.extend(["binding", "log", "exec", "attach", "portforward"]);
        }
        if self.plural == "serviceaccounts" {
            out.push("token");
        }
        out
    }

    /// A field selector value for `field` of `obj`, or None if the kind does not support it.
    pub fn field_value(&self, obj: &Value, field: &str) -> Option<String> {
        if field != "metadata.name"
            && field != "metadata.namespace"
            && !self.fields.contains(&field)
        {
            return None;
        }
        let mut cur = obj;
        for part in field.split('.') {
            cur = match cur.get(part) {
                Some(v) => v,
                None => return Some(String::new()),
            };
        }
        Some(match cur {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Null => String::new(),
            other => other.to_string(),
        })
    }

    pub fn supports_field(&self, field: &str) -> bool {
        field == "metadata.name" || field == "metadata.namespace" || self.fields.contains(&field)
    }
}

macro_rules! kind {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, ns: $ns:expr,
     short: [$($short:expr),*], cat: [$($cat:expr),*], status: $status:expr, scale: $scale:expr,
     reset: $reset:expr, label: $label:expr, fields: [$($field:expr),*], storage: $storage:expr) => {
        Kind {
            group: $group, version: $version, kind: $kind, plural: $plural, singular: $singular,
            namespaced: $ns, short_names: &[$($short),*], categories: &[$($cat),*],
            status: $status, scale: $scale, reset_status_on_create: $reset, name_is_label: $label,
            fields: &[$($field),*], storage: $storage, review: false,
        }
    };
}

/// A review kind: cluster-scoped, create-only, not stored.
macro_rules! review {
    ($group:expr, $kind:expr, $plural:expr, $singular:expr) => {
        Kind {
            group: $group,
            version: "v1",
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: false,
            short_names: &[],
            categories: &[],
            status: false,
            scale: false,
            reset_status_on_create: false,
            name_is_label: false,
            fields: &[],
            storage: "",
            review: true,
        }
    };
}

pub static KINDS: &[Kind] = &[
    kind!("", "v1", "Namespace", "namespaces", "namespace", ns: false, short: ["ns"], cat: [],
          status: true, scale: false, reset: false, label: true, fields: ["status.phase"], storage: "namespaces"),
    kind!("", "v1", "Pod", "pods", "pod", ns: true, short: ["po"], cat: ["all"],
          status: true, scale: false, reset: true, label: false,
          fields: ["spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
                   "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"],
          storage: "pods"),
    kind!("", "v1", "Node", "nodes", "node", ns: false, short: ["no"], cat: [],
          status: true, scale: false, reset: false, label: false, fields: ["spec.unschedulable"], storage: "minions"),
    kind!("", "v1", "Service", "services", "service", ns: true, short: ["svc"], cat: ["all"],
          status: true, scale: false, reset: true, label: true, fields: ["spec.clusterIP", "spec.type"],
          storage: "services/specs"),
    kind!("", "v1", "Endpoints", "endpoints", "endpoints", ns: true, short: ["ep"], cat: [],
          status: false, scale: false, reset: false, label: false, fields: [], storage: "services/endpoints"),
    kind!("", "v1", "ReplicationController", "replicationcontrollers", "replicationcontroller", ns: true,
          short: ["rc"], cat: ["all"], status: true, scale: true, reset: true, label: false,
          fields: ["status.replicas"], storage: "controllers"),
    kind!("", "v1", "ConfigMap", "configmaps", "configmap", ns: true, short: ["cm"], cat: [],
          status: false, scale: false, reset: false, label: false, fields: [], storage: "configmaps"),
    kind!("", "v1", "Secret", "secrets", "secret", ns: true, short: [], cat: [],
          status: false, scale: false, reset: false, label: false, fields: ["type"], storage: "secrets"),
    kind!("", "v1", "ServiceAccount", "serviceaccounts", "serviceaccount", ns: true, short: ["sa"], cat: [],
          status: false, scale: false, reset: false, label: false, fields: [], storage: "serviceaccounts"),
    kind!("", "v1", "Event", "events", "event", ns: true, short: ["ev"], cat: [],
          status: false, scale: false, reset: false, label: false,
          fields: ["involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                   "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                   "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"],
          storage: "events"),
    kind!("", "v1", "ResourceQuota", "resourcequotas", "resourcequota", ns: true, short: ["quota"], cat: [],
          status: true, scale: false, reset: true, label: false, fields: [], storage: "resourcequotas"),
    kind!("", "v1", "LimitRange", "limitranges", "limitrange", ns: true, short: ["limits"], cat: [],
          status: false, scale: false, reset: false, label: false, fields: [], storage: "limitranges"),
    kind!("", "v1", "PodTemplate", "podtemplates", "podtemplate", ns: true, short: [], cat: [],
          status: false, scale: false, reset: false, label: false, fields: [], storage: "podtemplates"),
    kind!("apps", "v1", "Deployment", "deployments", "deployment", ns: true, short: ["deploy"], cat: ["all"],
          status: true, scale: true, reset: true, label: false, fields: [], storage: "deployments"),
    kind!("apps", "v1", "ReplicaSet", "replicasets", "replicaset", ns: true, short: ["rs"], cat: ["all"],
          status: true, scale: true, reset: true, label: false, fields: ["status.replicas"], storage: "replicasets"),
    kind!("apps", "v1", "DaemonSet", "daemonsets", "daemonset", ns: true, short: ["ds"], cat: ["all"],
          status: true, scale: false, reset: true, label: false, fields: [], storage: "daemonsets"),
    kind!("apps", "v1", "StatefulSet", "statefulsets", "statefulset", ns: true, short: ["sts"], cat: ["all"],
          status: true, scale: true, reset: true, label: false, fields: [], storage: "statefulsets"),
    kind!("apps", "v1", "ControllerRevision", "controllerrevisions", "controllerrevision", ns: true,
          short: [], cat: [], status: false, scale: false, reset: false, label: false, fields: [],
          storage: "controllerrevisions"),
    kind!("coordination.k8s.io", "v1", "Lease", "leases", "lease", ns: true, short: [], cat: [],
          status: false, scale: false, reset: false, label: false, fields: [], storage: "leases"),
    kind!("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", "endpointslice", ns: true,
          short: [], cat: [], status: false, scale: false, reset: false, label: false,
          fields: ["addressType"], storage: "endpointslices"),
    kind!("events.k8s.io", "v1", "Event", "events", "event", ns: true, short: ["ev"], cat: [],
          status: false, scale: false, reset: false, label: false,
          fields: ["reason", "type", "regarding.kind", "regarding.name", "regarding.namespace", "regarding.uid"],
          storage: "events.k8s.io/events"),
    kind!("scheduling.k8s.io", "v1", "PriorityClass", "priorityclasses", "priorityclass", ns: false,
          short: ["pc"], cat: [], status: false, scale: false, reset: false, label: false, fields: [],
          storage: "priorityclasses"),
    review!(
        "authorization.k8s.io",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview"
    ),
    review!(
        "authorization.k8s.io",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        "selfsubjectrulesreview"
    ),
    review!(
        "authentication.k8s.io",
        "SelfSubjectReview",
        "selfsubjectreviews",
        "selfsubjectreview"
    ),
];

/// The kind served at `group`/`version`/`plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// Every (group, version) served, core first, in discovery order.
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for k in KINDS {
        if !out.contains(&(k.group, k.version)) {
            out.push((k.group, k.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_keys() {
        let pods = lookup("", "v1", "pods").unwrap();
        assert_eq!(pods.key(Some("default"), "p"), "/registry/pods/default/p");
        assert!(lookup("apps", "v1", "pods").is_none());
        assert_eq!(
            lookup("apps", "v1", "deployments").unwrap().qualified(),
            "deployments.apps"
        );
        // Storage prefixes must not shadow each other.
        for a in KINDS.iter().filter(|k| !k.review) {
            for b in KINDS.iter().filter(|k| !k.review) {
                if !std::ptr::eq(a, b) {
                    assert_ne!(a.storage, b.storage);
                }
            }
        }
    }
}
