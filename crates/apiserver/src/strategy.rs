//! Per-kind strategy: defaulting and validation, as upstream's registry strategies do them.
//! Generic metadata rules apply to every kind; the per-kind parts are small functions chosen by
//! kind name.

use apimachinery::{validation, Cause};
use base64::Engine;
use serde_json::{json, Map, Value};

use crate::registry::Kind;

fn obj_mut<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.get(key).is_some_and(Value::is_object) {
        v[key] = json!({});
    }
    match v.get_mut(key) {
        Some(Value::Object(m)) => m,
        _ => unreachable!("just set to an object"),
    }
}

fn default(m: &mut Map<String, Value>, key: &str, value: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), value);
    }
}

/// Apply upstream's defaults for a kind.
pub fn apply_defaults(kind: &Kind, obj: &mut Value) {
    match (kind.group, kind.kind) {
        ("", "Pod") => default_template(Some(obj)),
        ("", "PodTemplate") => default_template(obj.get_mut("template")),
        ("", "Namespace") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "finalizers", json!(["kubernetes"]));
            let status = obj_mut(obj, "status");
            default(status, "phase", json!("Active"));
        }
        ("", "Secret") => {
            if let Some(m) = obj.as_object_mut() {
                default(m, "type", json!("Opaque"));
                // stringData is write-only: it lands in data (base64), where it wins, as upstream.
                if let Some(Value::Object(strings)) = m.remove("stringData") {
                    let data = m.entry("data").or_insert_with(|| json!({}));
                    if !data.is_object() {
                        *data = json!({});
                    }
                    for (k, v) in strings {
                        let text = v.as_str().unwrap_or_default().as_bytes().to_vec();
                        data[k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
                    }
                }
            }
        }
        ("", "Service") => default_service(obj),
        ("", "ReplicationController") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "replicas", json!(1));
            // An RC's selector and template labels default from each other.
            let tlabels = spec
                .get("template")
                .and_then(|t| t.pointer("/metadata/labels"))
                .cloned();
            if let Some(l) = tlabels {
                default(spec, "selector", l);
            }
            default_template(spec.get_mut("template"));
        }
        ("apps", "Deployment") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "replicas", json!(1));
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "progressDeadlineSeconds", json!(600));
            default(spec, "strategy", json!({"type": "RollingUpdate"}));
            if let Some(s) = spec.get_mut("strategy").and_then(Value::as_object_mut) {
                default(s, "type", json!("RollingUpdate"));
                if s.get("type") == Some(&json!("RollingUpdate")) {
                    default(s, "rollingUpdate", json!({}));
                    if let Some(ru) = s.get_mut("rollingUpdate").and_then(Value::as_object_mut) {
                        default(ru, "maxSurge", json!("25%"));
                        default(ru, "maxUnavailable", json!("25%"));
                    }
                }
            }
            default_template(spec.get_mut("template"));
        }
        ("apps", "ReplicaSet") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "replicas", json!(1));
            default_template(spec.get_mut("template"));
        }
        ("apps", "DaemonSet") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "updateStrategy", json!({"type": "RollingUpdate"}));
            if let Some(s) = spec
                .get_mut("updateStrategy")
                .and_then(Value::as_object_mut)
            {
                if s.get("type") == Some(&json!("RollingUpdate")) {
                    default(s, "rollingUpdate", json!({}));
                    if let Some(ru) = s.get_mut("rollingUpdate").and_then(Value::as_object_mut) {
                        default(ru, "maxSurge", json!(0));
                        default(ru, "maxUnavailable", json!(1));
                    }
                }
            }
            default_template(spec.get_mut("template"));
        }
        ("apps", "StatefulSet") => {
            let spec = obj_mut(obj, "spec");
            default(spec, "replicas", json!(1));
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "podManagementPolicy", json!("OrderedReady"));
            default(
                spec,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
            default(
                spec,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            default_template(spec.get_mut("template"));
        }
        ("scheduling.k8s.io", "PriorityClass") => {
            if let Some(m) = obj.as_object_mut() {
                default(m, "preemptionPolicy", json!("PreemptLowerPriority"));
            }
        }
        _ => {}
    }
}

fn default_template(template: Option<&mut Value>) {
    if let Some(spec) = template.and_then(|t| t.get_mut("spec")) {
        if spec.is_object() {
            default_pod_spec(spec);
        }
    }
}

fn default_pod_spec(spec: &mut Value) {
    let Some(m) = spec.as_object_mut() else {
        return;
    };
    default(m, "restartPolicy", json!("Always"));
    default(m, "terminationGracePeriodSeconds", json!(30));
    default(m, "dnsPolicy", json!("ClusterFirst"));
    default(m, "securityContext", json!({}));
    default(m, "schedulerName", json!("default-scheduler"));
    default(m, "enableServiceLinks", json!(true));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                default_container(c);
            }
        }
    }
}

fn default_container(c: &mut Map<String, Value>) {
    let image = c.get("image").and_then(Value::as_str).unwrap_or_default();
    // Upstream: Always for `:latest` or no tag (and no digest), else IfNotPresent.
    let last = image.rsplit('/').next().unwrap_or(image);
    let policy = if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.rsplit_once(':') {
            Some((_, "latest")) | None => "Always",
            Some(_) => "IfNotPresent",
        }
    };
    default(c, "imagePullPolicy", json!(policy));
    default(c, "terminationMessagePath", json!("/dev/termination-log"));
    default(c, "terminationMessagePolicy", json!("File"));
    default(c, "resources", json!({}));
    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
        }
    }
}

fn default_service(obj: &mut Value) {
    let spec = obj_mut(obj, "spec");
    default(spec, "type", json!("ClusterIP"));
    default(spec, "sessionAffinity", json!("None"));
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
        .to_string();
    if ty != "ExternalName" {
        default(spec, "internalTrafficPolicy", json!("Cluster"));
    }
    if ty == "NodePort" || ty == "LoadBalancer" {
        default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            default(p, "protocol", json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                default(p, "targetPort", port);
            }
        }
    }
    let status = obj_mut(obj, "status");
    default(status, "loadBalancer", json!({}));
}

/// Validate an object of a kind: metadata rules for every kind plus the kind's own rules.
pub fn validate(kind: &Kind, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    if name.is_empty() {
        causes.push(Cause::required("metadata.name"));
    } else {
        let errs = if kind.name_is_label {
            validation::dns1123_label(name)
        } else {
            validation::dns1123_subdomain(name)
        };
        if let Some(e) = errs.first() {
            causes.push(Cause::invalid("metadata.name", name, e));
        }
    }
    if let Some(labels) = meta["labels"].as_object() {
        for (k, v) in labels {
            for e in validation::qualified_name(k) {
                causes.push(Cause::invalid("metadata.labels", k, &e));
            }
            for e in validation::label_value(v.as_str().unwrap_or_default()) {
                causes.push(Cause::invalid(
                    &format!("metadata.labels[{k}]"),
                    v.as_str().unwrap_or_default(),
                    &e,
                ));
            }
        }
    }
    if let Some(ann) = meta["annotations"].as_object() {
        let mut total = 0;
        for (k, v) in ann {
            total += k.len() + v.as_str().map_or(0, str::len);
            for e in validation::qualified_name(k) {
                causes.push(Cause::invalid("metadata.annotations", k, &e));
            }
        }
        if total > validation::TOTAL_ANNOTATION_SIZE_LIMIT {
            causes.push(Cause::new(
                "FieldValueTooLong",
                "metadata.annotations",
                format!(
                    "Too long: may not be more than {} bytes",
                    validation::TOTAL_ANNOTATION_SIZE_LIMIT
                ),
            ));
        }
    }
    match (kind.group, kind.kind) {
        ("", "Pod") => validate_pod_spec(&obj["spec"], "spec", &mut causes),
        ("", "Service") => validate_service(obj, &mut causes),
        ("", "ConfigMap") | ("", "Secret") => {
            for field in ["data", "binaryData", "stringData"] {
                if let Some(m) = obj[field].as_object() {
                    for k in m.keys() {
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
                        if !ok {
                            causes.push(Cause::invalid(&format!("{field}[{k}]"), k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
                        }
                    }
                }
            }
        }
        ("apps", "Deployment")
        | ("apps", "ReplicaSet")
        | ("apps", "DaemonSet")
        | ("apps", "StatefulSet") => validate_workload(obj, true, &mut causes),
        ("", "ReplicationController") => validate_workload(obj, false, &mut causes),
        _ => {}
    }
    causes
}

fn validate_workload(obj: &Value, selector_object: bool, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    if let Some(r) = spec.get("replicas") {
        if r.as_i64().is_some_and(|r| r < 0) {
            causes.push(Cause::invalid(
                "spec.replicas",
                r,
                "must be greater than or equal to 0",
            ));
        }
    }
    let labels: std::collections::BTreeMap<String, String> = spec
        .pointer("/template/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    let selector = if selector_object {
        match spec.get("selector") {
            None | Some(Value::Null) => {
                causes.push(Cause::required("spec.selector"));
                None
            }
            Some(s) => match apimachinery::labels::Selector::from_label_selector(s) {
                Ok(sel) if sel.is_empty() => {
                    causes.push(Cause::invalid(
                        "spec.selector",
                        "{}",
                        "empty selector is invalid for deployment",
                    ));
                    None
                }
                Ok(sel) => Some(sel),
                Err(e) => {
                    causes.push(Cause::invalid("spec.selector", s, &e.to_string()));
                    None
                }
            },
        }
    } else {
        spec.get("selector").and_then(|s| {
            apimachinery::labels::Selector::from_label_selector(&json!({"matchLabels": s})).ok()
        })
    };
    if let Some(sel) = selector {
        if !sel.matches(&labels) {
            causes.push(Cause::invalid(
                "spec.template.metadata.labels",
                format!("{labels:?}"),
                "`selector` does not match template `labels`",
            ));
        }
    }
    match spec.pointer("/template/spec") {
        Some(ps) if ps.is_object() => validate_pod_spec(ps, "spec.template.spec", causes),
        _ => causes.push(Cause::required("spec.template.spec")),
    }
}

fn validate_pod_spec(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let containers = spec["containers"].as_array();
    match containers {
        None => causes.push(Cause::required(&format!("{path}.containers"))),
        Some(cs) if cs.is_empty() => causes.push(Cause::required(&format!("{path}.containers"))),
        Some(_) => {}
    }
    let mut names = std::collections::HashSet::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in spec[list].as_array().into_iter().flatten().enumerate() {
            let p = format!("{path}.{list}[{i}]");
            let name = c["name"].as_str().unwrap_or_default();
            if name.is_empty() {
                causes.push(Cause::required(&format!("{p}.name")));
            } else if let Some(e) = validation::dns1123_label(name).first() {
                causes.push(Cause::invalid(&format!("{p}.name"), name, e));
            } else if !names.insert(name.to_string()) {
                causes.push(Cause::new(
                    "FieldValueDuplicate",
                    &format!("{p}.name"),
                    format!("Duplicate value: \"{name}\""),
                ));
            }
            if c["image"].as_str().unwrap_or_default().trim().is_empty() {
                causes.push(Cause::required(&format!("{p}.image")));
            }
            for (j, port) in c["ports"].as_array().into_iter().flatten().enumerate() {
                let cp = port["containerPort"].as_i64().unwrap_or(0);
                if !(1..=65535).contains(&cp) {
                    causes.push(Cause::invalid(
                        &format!("{p}.ports[{j}].containerPort"),
                        cp,
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
        }
    }
    if let Some(rp) = spec["restartPolicy"].as_str() {
        if !["Always", "OnFailure", "Never"].contains(&rp) {
            causes.push(Cause::not_supported(
                &format!("{path}.restartPolicy"),
                rp,
                &["Always", "OnFailure", "Never"],
            ));
        }
    }
    if let Some(dp) = spec["dnsPolicy"].as_str() {
        let ok = ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
        if !ok.contains(&dp) {
            causes.push(Cause::not_supported(&format!("{path}.dnsPolicy"), dp, &ok));
        }
    }
}

fn validate_service(obj: &Value, causes: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    let types = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    if !types.contains(&ty) {
        causes.push(Cause::not_supported("spec.type", ty, &types));
    }
    let ports = spec["ports"].as_array();
    let headless = spec["clusterIP"].as_str() == Some("None");
    if ty != "ExternalName" && !headless && ports.is_none_or(|p| p.is_empty()) {
        causes.push(Cause::required("spec.ports"));
    }
    if ty == "ExternalName" && spec["externalName"].as_str().unwrap_or_default().is_empty() {
        causes.push(Cause::required("spec.externalName"));
    }
    let multi = ports.is_some_and(|p| p.len() > 1);
    for (i, p) in ports.into_iter().flatten().enumerate() {
        let port = p["port"].as_i64().unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push(Cause::invalid(
                &format!("spec.ports[{i}].port"),
                port,
                "must be between 1 and 65535, inclusive",
            ));
        }
        if multi && p["name"].as_str().unwrap_or_default().is_empty() {
            causes.push(Cause::required(&format!("spec.ports[{i}].name")));
        }
        if let Some(proto) = p["protocol"].as_str() {
            if !["TCP", "UDP", "SCTP"].contains(&proto) {
                causes.push(Cause::not_supported(
                    &format!("spec.ports[{i}].protocol"),
                    proto,
                    &["SCTP", "TCP", "UDP"],
                ));
            }
        }
    }
    if let Some(aff) = spec["sessionAffinity"].as_str() {
        if !["None", "ClientIP"].contains(&aff) {
            causes.push(Cause::not_supported(
                "spec.sessionAffinity",
                aff,
                &["ClientIP", "None"],
            ));
        }
    }
}

/// What an update may not change, per kind (on top of [`validate`] of the new object).
pub fn validate_update(kind: &Kind, old: &Value, new: &Value) -> Vec<Cause> {
    match kind.kind {
        "Service" => crate::servicealloc::validate_update(old, new),
        "Node" => {
            // As upstream: a node's pod range is set once ("" -> value), then never moves
            // (its kubelet has configured pod networking with it).
            let (os, ns) = (&old["spec"], &new["spec"]);
            let set = |v: &Value| !v.is_null() && v != "" && v != &json!([]);
            if (set(&os["podCIDR"]) && os["podCIDR"] != ns["podCIDR"])
                || (set(&os["podCIDRs"]) && os["podCIDRs"] != ns["podCIDRs"])
            {
                return vec![Cause::new(
                    "FieldValueForbidden",
                    "spec.podCIDRs",
                    "Forbidden: node updates may not change podCIDR except from \"\" to valid",
                )];
            }
            Vec::new()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;

    #[test]
    fn a_node_pod_range_is_set_once() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        let with =
            |c: &str| json!({"metadata": {"name": "n"}, "spec": {"podCIDR": c, "podCIDRs": [c]}});
        let without = json!({"metadata": {"name": "n"}, "spec": {}});
        assert!(validate_update(nodes, &without, &with("10.42.1.0/24")).is_empty());
        assert!(validate_update(nodes, &with("10.42.1.0/24"), &with("10.42.1.0/24")).is_empty());
        let causes = validate_update(nodes, &with("10.42.1.0/24"), &with("10.42.2.0/24"));
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.podCIDRs");
        assert!(!validate_update(nodes, &with("10.42.1.0/24"), &without).is_empty());
    }

    fn check(plural: &str, group: &str, obj: Value, expect_fields: &[&str]) {
        let kind = lookup(group, "v1", plural).unwrap();
        let mut obj = obj;
        apply_defaults(kind, &mut obj);
        let fields: Vec<String> = validate(kind, &obj).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, expect_fields, "{obj}");
    }

    #[test]
    fn validation_table() {
        check(
            "pods",
            "",
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
            &[],
        );
        check(
            "pods",
            "",
            json!({"metadata": {"name": "P_"}, "spec": {}}),
            &["metadata.name", "spec.containers"],
        );
        check(
            "pods",
            "",
            json!({"metadata": {"name": "p"}, "spec": {"restartPolicy": "Sometimes",
            "containers": [{"name": "c", "image": ""}, {"name": "c", "image": "x", "ports": [{"containerPort": 70000}]}]}}),
            &[
                "spec.containers[0].image",
                "spec.containers[1].name",
                "spec.containers[1].ports[0].containerPort",
                "spec.restartPolicy",
            ],
        );
        check(
            "services",
            "",
            json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}),
            &[],
        );
        check(
            "services",
            "",
            json!({"metadata": {"name": "s.x"}, "spec": {"type": "Weird"}}),
            &["metadata.name", "spec.type", "spec.ports"],
        );
        check(
            "deployments",
            "apps",
            json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}),
            &["spec.template.metadata.labels"],
        );
        check(
            "configmaps",
            "",
            json!({"metadata": {"name": "c", "labels": {"bad key": "v"}}, "data": {"ok": "1", "not ok": "2"}}),
            &["metadata.labels", "data[not ok]"],
        );
    }

    #[test]
    fn defaults() {
        let kind = lookup("", "v1", "pods").unwrap();
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "busybox"}, {"name": "b", "image": "reg:5000/busybox:1.36", "ports": [{"containerPort": 80}]},
            {"name": "c", "image": "busybox:latest"}]}});
        apply_defaults(kind, &mut pod);
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(
            pod["spec"]["containers"][1]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(pod["spec"]["containers"][2]["imagePullPolicy"], "Always");
        assert_eq!(pod["spec"]["containers"][1]["ports"][0]["protocol"], "TCP");
        let svc = lookup("", "v1", "services").unwrap();
        let mut s = json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}});
        apply_defaults(svc, &mut s);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        let dep = lookup("apps", "v1", "deployments").unwrap();
        let mut d = json!({"metadata": {"name": "d"}, "spec": {}});
        apply_defaults(dep, &mut d);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["replicas"], 1);
    }
}
