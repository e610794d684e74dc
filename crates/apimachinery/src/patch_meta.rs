//! Which fields of the built-in kinds strategic merge patch treats specially: the list fields
//! upstream's types declare with `patchStrategy:"merge"` (and their `patchMergeKey`), and the
//! nesting that leads to them. Everything not named here is a map (merged) or a value or list
//! (replaced), as upstream treats fields without a patch strategy.

use crate::strategic::{Field, ListStrategy, TypeMeta};

const fn by(key: &'static str, ty: Option<&'static TypeMeta>) -> Field {
    Field {
        list: ListStrategy::MergeByKey(key),
        ty,
    }
}

const fn set() -> Field {
    Field {
        list: ListStrategy::MergePrimitive,
        ty: None,
    }
}

const fn nested(ty: &'static TypeMeta) -> Field {
    Field {
        list: ListStrategy::Replace,
        ty: Some(ty),
    }
}

pub static OBJECT_META: TypeMeta = TypeMeta {
    fields: &[("finalizers", set()), ("ownerReferences", by("uid", None))],
};

pub static CONTAINER: TypeMeta = TypeMeta {
    fields: &[
        ("ports", by("containerPort", None)),
        ("env", by("name", None)),
        ("volumeMounts", by("mountPath", None)),
        ("volumeDevices", by("devicePath", None)),
    ],
};

pub static POD_SPEC: TypeMeta = TypeMeta {
    fields: &[
        ("containers", by("name", Some(&CONTAINER))),
        ("initContainers", by("name", Some(&CONTAINER))),
        ("ephemeralContainers", by("name", Some(&CONTAINER))),
        ("volumes", by("name", None)),
        ("imagePullSecrets", by("name", None)),
        ("hostAliases", by("ip", None)),
        ("topologySpreadConstraints", by("topologyKey", None)),
        ("resourceClaims", by("name", None)),
        ("schedulingGates", by("name", None)),
    ],
};

static CONDITIONS: TypeMeta = TypeMeta {
    fields: &[("conditions", by("type", None))],
};

static POD_STATUS: TypeMeta = TypeMeta {
    fields: &[
        ("conditions", by("type", None)),
        ("podIPs", by("ip", None)),
        ("hostIPs", by("ip", None)),
        ("resourceClaimStatuses", by("name", None)),
    ],
};

pub static POD_TEMPLATE_SPEC: TypeMeta = TypeMeta {
    fields: &[
        ("metadata", nested(&OBJECT_META)),
        ("spec", nested(&POD_SPEC)),
    ],
};

static WORKLOAD_SPEC: TypeMeta = TypeMeta {
    fields: &[("template", nested(&POD_TEMPLATE_SPEC))],
};

static POD: TypeMeta = TypeMeta {
    fields: &[
        ("metadata", nested(&OBJECT_META)),
        ("spec", nested(&POD_SPEC)),
        ("status", nested(&POD_STATUS)),
    ],
};

static POD_TEMPLATE: TypeMeta = TypeMeta {
    fields: &[
        ("metadata", nested(&OBJECT_META)),
        ("template", nested(&POD_TEMPLATE_SPEC)),
    ],
};

static WORKLOAD: TypeMeta = TypeMeta {
    fields: &[
        ("metadata", nested(&OBJECT_META)),
        ("spec", nested(&WORKLOAD_SPEC)),
        ("status", nested(&CONDITIONS)),
    ],
};

static SERVICE_SPEC: TypeMeta = TypeMeta {
    fields: &[("ports", by("port", None))],
};

static SERVICE: TypeMeta = TypeMeta {
    fields: &[
        ("metadata", nested(&OBJECT_META)),
        ("spec", nested(&SERVICE_SPEC)),
        ("status", nested(&CONDITIONS)),
    ],
};

static NODE_SPEC: TypeMeta = TypeMeta {
    fields: &[("podCIDRs", set())],
};

static NODE_STATUS: TypeMeta = TypeMeta {
    fields: &[
        ("conditions", by("type", None)),
        ("addresses", by("type", None)),
    ],
};

static NODE: TypeMeta = TypeMeta {
    fields: &[
        ("metadata", nested(&OBJECT_META)),
        ("spec", nested(&NODE_SPEC)),
        ("status", nested(&NODE_STATUS)),
    ],
};

static WITH_CONDITIONS: TypeMeta = TypeMeta {
    fields: &[
        ("metadata", nested(&OBJECT_META)),
        ("status", nested(&CONDITIONS)),
    ],
};

static METADATA_ONLY: TypeMeta = TypeMeta {
    fields: &[("metadata", nested(&OBJECT_META))],
};

/// The patch metadata of a built-in kind (kinds without special fields get metadata's only).
pub fn for_kind(group: &str, kind: &str) -> &'static TypeMeta {
    match (group, kind) {
        ("", "Pod") => &POD,
        ("", "PodTemplate") => &POD_TEMPLATE,
        ("", "ReplicationController")
        | ("apps", "Deployment")
        | ("apps", "ReplicaSet")
        | ("apps", "DaemonSet")
        | ("apps", "StatefulSet") => &WORKLOAD,
        ("", "Service") => &SERVICE,
        ("", "Node") => &NODE,
        ("", "Namespace") => &WITH_CONDITIONS,
        _ => &METADATA_ONLY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The merge keys of every merge list, spelled out once: a change here is a change of
    /// behaviour and must be deliberate.
    #[test]
    fn merge_keys_of_the_built_in_kinds() {
        fn walk(meta: &'static TypeMeta, path: &str, out: &mut Vec<String>) {
            for (name, f) in meta.fields {
                let p = format!("{path}.{name}");
                match f.list {
                    ListStrategy::MergeByKey(k) => out.push(format!("{p}[{k}]")),
                    ListStrategy::MergePrimitive => out.push(format!("{p}[set]")),
                    ListStrategy::Replace => {}
                }
                if let Some(ty) = f.ty {
                    walk(ty, &p, out);
                }
            }
        }
        let mut pod = Vec::new();
        walk(for_kind("", "Pod"), "", &mut pod);
        assert_eq!(
            pod,
            [
                ".metadata.finalizers[set]",
                ".metadata.ownerReferences[uid]",
                ".spec.containers[name]",
                ".spec.containers.ports[containerPort]",
                ".spec.containers.env[name]",
                ".spec.containers.volumeMounts[mountPath]",
                ".spec.containers.volumeDevices[devicePath]",
                ".spec.initContainers[name]",
                ".spec.initContainers.ports[containerPort]",
                ".spec.initContainers.env[name]",
                ".spec.initContainers.volumeMounts[mountPath]",
                ".spec.initContainers.volumeDevices[devicePath]",
                ".spec.ephemeralContainers[name]",
                ".spec.ephemeralContainers.ports[containerPort]",
                ".spec.ephemeralContainers.env[name]",
                ".spec.ephemeralContainers.volumeMounts[mountPath]",
                ".spec.ephemeralContainers.volumeDevices[devicePath]",
                ".spec.volumes[name]",
                ".spec.imagePullSecrets[name]",
                ".spec.hostAliases[ip]",
                ".spec.topologySpreadConstraints[topologyKey]",
                ".spec.resourceClaims[name]",
                ".spec.schedulingGates[name]",
                ".status.conditions[type]",
                ".status.podIPs[ip]",
                ".status.hostIPs[ip]",
                ".status.resourceClaimStatuses[name]",
            ]
        );
        let mut deploy = Vec::new();
        walk(for_kind("apps", "Deployment"), "", &mut deploy);
        assert!(deploy.contains(&".spec.template.spec.containers.env[name]".to_string()));
        assert!(deploy.contains(&".status.conditions[type]".to_string()));
        let mut svc = Vec::new();
        walk(for_kind("", "Service"), "", &mut svc);
        assert!(svc.contains(&".spec.ports[port]".to_string()));
        let mut node = Vec::new();
        walk(for_kind("", "Node"), "", &mut node);
        assert!(
            node.contains(&".status.addresses[type]".to_string())
                && node.contains(&".spec.podCIDRs[set]".to_string())
        );
    }
}
