//! Server-side printing: meta.k8s.io/v1 Table with upstream's columns per kind.

use apimachinery::duration::human;
use serde_json::{json, Value};

use crate::registry::Kind;

/// (name, type, priority, description)
type Col = (&'static str, &'static str, u8, &'static str);

const NAME: Col = (
    "Name",
    "string",
    0,
    "Name must be unique within a namespace.",
);
const AGE: Col = (
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

fn columns(kind: &Kind) -> Vec<Col> {
    match (kind.group, kind.kind) {
        ("", "Pod") => vec![
            NAME,
            ("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic."),
            ("Status", "string", 0, "The aggregate status of the containers in this pod."),
            ("Restarts", "string", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
            AGE,
            ("IP", "string", 1, "IP address allocated to the pod. Routable at least within the cluster."),
            ("Node", "string", 1, "NodeName is a request to schedule this pod onto a specific node."),
            ("Nominated Node", "string", 1, "nominatedNodeName is set only when this pod preempts other pods on the node."),
            ("Readiness Gates", "string", 1, "If specified, all readiness gates will be evaluated for pod readiness."),
        ],
        ("", "Node") => vec![
            NAME,
            ("Status", "string", 0, "The status of the node"),
            ("Roles", "string", 0, "The roles of the node"),
            AGE,
            ("Version", "string", 0, "Kubelet Version reported by the node."),
            ("Internal-IP", "string", 1, "List of internal IPs of the node."),
            ("External-IP", "string", 1, "List of external IPs of the node."),
            ("OS-Image", "string", 1, "OS Image reported by the node from /etc/os-release."),
            ("Kernel-Version", "string", 1, "Kernel Version reported by the node."),
            ("Container-Runtime", "string", 1, "Container Runtime Version reported by the node."),
        ],
        ("", "Namespace") => vec![NAME, ("Status", "string", 0, "The status of the namespace"), AGE],
        ("", "Service") => vec![
            NAME,
            ("Type", "string", 0, "type determines how the Service is exposed."),
            ("Cluster-IP", "string", 0, "clusterIP is the IP address of the service."),
            ("External-IP", "string", 0, "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service."),
            ("Port(s)", "string", 0, "The list of ports that are exposed by this service."),
            AGE,
            ("Selector", "string", 1, "Route service traffic to pods with label keys and values matching this selector."),
        ],
        ("", "Endpoints") => vec![NAME, ("Endpoints", "string", 0, "Endpoints is the list of endpoints."), AGE],
        ("", "ReplicationController") | ("apps", "ReplicaSet") => vec![
            NAME,
            ("Desired", "integer", 0, "Number of desired pods."),
            ("Current", "integer", 0, "Number of actual replicas."),
            ("Ready", "integer", 0, "The number of ready replicas for this replication controller."),
            AGE,
            ("Containers", "string", 1, "Names of each container in the template."),
            ("Images", "string", 1, "Images referenced by each container in the template."),
            ("Selector", "string", 1, "Label selector for pods."),
        ],
        ("", "ConfigMap") => vec![NAME, ("Data", "integer", 0, "Number of keys in the config map."), AGE],
        ("", "Secret") => vec![
            NAME,
            ("Type", "string", 0, "The type of the secret"),
            ("Data", "integer", 0, "Number of keys in the secret."),
            AGE,
        ],
        ("", "ServiceAccount") => vec![NAME, ("Secrets", "string", 0, "Secrets is a list of the secrets in the same namespace."), AGE],
        ("", "Event") | ("events.k8s.io", "Event") => vec![
            ("Last Seen", "string", 0, "Time when this Event was last observed."),
            ("Type", "string", 0, "Type of this event (Normal, Warning), new types could be added in the future."),
            ("Reason", "string", 0, "This should be a short, machine understandable string that gives the reason for the transition into the object's current status."),
            ("Object", "string", 0, "The object that this event is about."),
            ("Subobject", "string", 1, "The subobject that this event is about."),
            ("Source", "string", 1, "The component reporting this event."),
            ("Message", "string", 0, "A human-readable description of the status of this operation."),
            ("First Seen", "string", 1, "The time at which the event was first recorded."),
            ("Count", "string", 1, "The number of times this event has occurred."),
            ("Name", "string", 1, "Name must be unique within a namespace."),
        ],
        ("", "ResourceQuota") => vec![
            NAME,
            AGE,
            ("Request", "string", 0, "Request represents a minimum amount of cpu/memory that a container may consume."),
            ("Limit", "string", 0, "Limits control the maximum amount of cpu/memory that a container may use independent of contention on the node."),
        ],
        ("", "LimitRange") => vec![NAME, ("Created At", "date", 0, "CreationTimestamp is a timestamp representing the server time when this object was created.")],
        ("", "PodTemplate") => vec![
            ("Template", "string", 0, "Name must be unique within a namespace."),
            ("Containers", "string", 0, "Names of each container in the template."),
            ("Images", "string", 0, "Images referenced by each container in the template."),
            ("Pod Labels", "string", 0, "The labels for the pod template."),
        ],
        ("apps", "Deployment") => vec![
            NAME,
            ("Ready", "string", 0, "Number of the pod with ready state"),
            ("Up-to-date", "integer", 0, "Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
            ("Available", "integer", 0, "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
            AGE,
            ("Containers", "string", 1, "Names of each container in the template."),
            ("Images", "string", 1, "Images referenced by each container in the template."),
            ("Selector", "string", 1, "Label selector for pods. Existing ReplicaSets whose pods are selected by this will be the ones affected by this deployment."),
        ],
        ("apps", "DaemonSet") => vec![
            NAME,
            ("Desired", "integer", 0, "The total number of nodes that should be running the daemon pod."),
            ("Current", "integer", 0, "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod."),
            ("Ready", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready."),
            ("Up-to-date", "integer", 0, "The total number of nodes that are running updated daemon pod"),
            ("Available", "integer", 0, "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available (ready for at least spec.minReadySeconds)"),
            ("Node Selector", "string", 0, "NodeSelector is a selector which must be true for the pod to fit on a node."),
            AGE,
            ("Containers", "string", 1, "Names of each container in the template."),
            ("Images", "string", 1, "Images referenced by each container in the template."),
            ("Selector", "string", 1, "A label query over pods that are managed by the daemon set."),
        ],
        ("apps", "StatefulSet") => vec![
            NAME,
            ("Ready", "string", 0, "Number of the pod with ready state"),
            AGE,
            ("Containers", "string", 1, "Names of each container in the template."),
            ("Images", "string", 1, "Images referenced by each container in the template."),
        ],
        ("apps", "ControllerRevision") => vec![
            NAME,
            ("Controller", "string", 0, "Controller of the object"),
            ("Revision", "integer", 0, "Revision indicates the revision of the state represented by Data."),
            AGE,
        ],
        ("coordination.k8s.io", "Lease") => vec![NAME, ("Holder", "string", 0, "HolderIdentity contains the identity of the holder of a current lease."), AGE],
        ("discovery.k8s.io", "EndpointSlice") => vec![
            NAME,
            ("AddressType", "string", 0, "The IP protocol for this slice"),
            ("Ports", "string", 0, "The ports for this slice"),
            ("Endpoints", "string", 0, "The endpoints for this slice"),
            AGE,
        ],
        ("scheduling.k8s.io", "PriorityClass") => vec![
            NAME,
            ("Value", "integer", 0, "The value of this priority class."),
            ("Global-Default", "boolean", 0, "globalDefault specifies whether this PriorityClass should be considered as the default priority."),
            AGE,
            ("PreemptionPolicy", "string", 0, "PreemptionPolicy is the Policy for preempting pods with lower priority."),
        ],
        _ => vec![NAME, AGE],
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn i(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn or_none(v: String) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v
    }
}

fn age(obj: &Value, now: i64) -> String {
    match ts(&obj["metadata"]["creationTimestamp"]) {
        Some(t) => human(now - t),
        None => "<unknown>".into(),
    }
}

fn ts(v: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.timestamp())
}

fn map_string(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn selector_string(v: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = v["matchLabels"].as_object() {
        parts.extend(m.iter().map(|(k, v)| format!("{k}={}", s(v))));
    }
    for e in v["matchExpressions"].as_array().into_iter().flatten() {
        let vals: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        parts.push(match s(&e["operator"]) {
            "In" => format!("{} in ({})", s(&e["key"]), vals.join(",")),
            "NotIn" => format!("{} notin ({})", s(&e["key"]), vals.join(",")),
            "Exists" => s(&e["key"]).to_string(),
            _ => format!("!{}", s(&e["key"])),
        });
    }
    parts.join(",")
}

fn containers_images(template_spec: &Value) -> (String, String) {
    let cs = template_spec["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| s(&c["name"])).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(&c["image"])).collect();
    (names.join(","), images.join(","))
}

fn pod_status(pod: &Value) -> (String, String, String) {
    let status = &pod["status"];
    let spec_containers = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let mut reason = s(&status["phase"]).to_string();
    if !s(&status["reason"]).is_empty() {
        reason = s(&status["reason"]).to_string();
    }
    let mut restarts = 0;
    let mut last_restart: Option<i64> = None;
    let mut ready = 0;
    let mut initializing = false;
    let inits = status["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let init_total = pod["spec"]["initContainers"].as_array().map_or(0, Vec::len);
    for (n, c) in inits.iter().enumerate() {
        restarts += i(&c["restartCount"]);
        let term = &c["state"]["terminated"];
        if term.is_object() && i(&term["exitCode"]) == 0 {
            continue;
        }
        initializing = true;
        reason = if term.is_object() {
            if s(&term["reason"]).is_empty() {
                format!("Init:ExitCode:{}", i(&term["exitCode"]))
            } else {
                format!("Init:{}", s(&term["reason"]))
            }
        } else if !s(&c["state"]["waiting"]["reason"]).is_empty()
            && s(&c["state"]["waiting"]["reason"]) != "PodInitializing"
        {
            format!("Init:{}", s(&c["state"]["waiting"]["reason"]))
        } else {
            format!("Init:{n}/{init_total}")
        };
        break;
    }
    let statuses = status["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !initializing {
        restarts = 0;
        let mut has_running = false;
        for c in statuses.iter().rev() {
            restarts += i(&c["restartCount"]);
            if let Some(t) = ts(&c["lastState"]["terminated"]["finishedAt"]) {
                last_restart = Some(last_restart.map_or(t, |l: i64| l.max(t)));
            }
            let st = &c["state"];
            if !s(&st["waiting"]["reason"]).is_empty() {
                reason = s(&st["waiting"]["reason"]).to_string();
            } else if st["terminated"].is_object() {
                reason = if s(&st["terminated"]["reason"]).is_empty() {
                    format!("ExitCode:{}", i(&st["terminated"]["exitCode"]))
                } else {
                    s(&st["terminated"]["reason"]).to_string()
                };
            } else if st["running"].is_object() && c["ready"].as_bool() == Some(true) {
                has_running = true;
                ready += 1;
            } else if st["running"].is_object() {
                has_running = true;
            }
        }
        if reason == "Completed" && has_running {
            let ready_cond = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| s(&c["type"]) == "Ready" && s(&c["status"]) == "True");
            reason = if ready_cond {
                "Running".into()
            } else {
                "NotReady".into()
            };
        }
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        reason = if s(&status["reason"]) == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    if reason.is_empty() {
        reason = "Pending".into();
    }
    let restarts_str = match last_restart {
        Some(t) if restarts > 0 => format!(
            "{restarts} ({} ago)",
            human(chrono::Utc::now().timestamp() - t)
        ),
        _ => restarts.to_string(),
    };
    (format!("{ready}/{spec_containers}"), reason, restarts_str)
}

fn service_ports(spec: &Value) -> String {
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            if p["nodePort"].is_number() {
                format!("{}:{}/{proto}", i(&p["port"]), i(&p["nodePort"]))
            } else {
                format!("{}/{proto}", i(&p["port"]))
            }
        })
        .collect();
    or_none(ports.join(","))
}

fn event_object(ev: &Value) -> (String, String) {
    let o = if ev["regarding"].is_object() {
        &ev["regarding"]
    } else {
        &ev["involvedObject"]
    };
    (
        format!("{}/{}", s(&o["kind"]).to_lowercase(), s(&o["name"])),
        s(&o["fieldPath"]).to_string(),
    )
}

fn cells(kind: &Kind, obj: &Value, now: i64) -> Vec<Value> {
    let name = json!(s(&obj["metadata"]["name"]));
    let spec = &obj["spec"];
    let status = &obj["status"];
    match (kind.group, kind.kind) {
        ("", "Pod") => {
            let (ready, reason, restarts) = pod_status(obj);
            let gates = spec["readinessGates"].as_array().map_or(0, Vec::len);
            let gates = if gates == 0 {
                "<none>".to_string()
            } else {
                let ok = spec["readinessGates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| {
                        status["conditions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|c| {
                                s(&c["type"]) == s(&g["conditionType"]) && s(&c["status"]) == "True"
                            })
                    })
                    .count();
                format!("{ok}/{gates}")
            };
            vec![
                name,
                json!(ready),
                json!(reason),
                json!(restarts),
                json!(age(obj, now)),
                json!(or_none(s(&status["podIP"]).into())),
                json!(or_none(s(&spec["nodeName"]).into())),
                json!(or_none(s(&status["nominatedNodeName"]).into())),
                json!(gates),
            ]
        }
        ("", "Node") => {
            let mut st = "Unknown".to_string();
            for c in status["conditions"].as_array().into_iter().flatten() {
                if s(&c["type"]) == "Ready" {
                    st = match s(&c["status"]) {
                        // Upstream's printer: anything but True is "Not" + type.
                        "True" => "Ready".into(),
                        _ => "NotReady".into(),
                    };
                }
            }
            if spec["unschedulable"].as_bool() == Some(true) {
                st.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = obj["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(String::from))
                .collect();
            roles.sort();
            let addr = |t: &str| {
                status["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|a| s(&a["type"]) == t)
                    .map(|a| s(&a["address"]).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let info = &status["nodeInfo"];
            vec![
                name,
                json!(st),
                json!(or_none(roles.join(","))),
                json!(age(obj, now)),
                json!(s(&info["kubeletVersion"])),
                json!(or_none(addr("InternalIP"))),
                json!(or_none(addr("ExternalIP"))),
                json!(if s(&info["osImage"]).is_empty() {
                    "<unknown>"
                } else {
                    s(&info["osImage"])
                }),
                json!(if s(&info["kernelVersion"]).is_empty() {
                    "<unknown>"
                } else {
                    s(&info["kernelVersion"])
                }),
                json!(if s(&info["containerRuntimeVersion"]).is_empty() {
                    "<unknown>"
                } else {
                    s(&info["containerRuntimeVersion"])
                }),
            ]
        }
        ("", "Namespace") => vec![name, json!(s(&status["phase"])), json!(age(obj, now))],
        ("", "Service") => {
            let ty = s(&spec["type"]);
            let cluster_ip = if ty == "ExternalName" {
                "<none>".to_string()
            } else {
                or_none(s(&spec["clusterIP"]).into())
            };
            let mut external: Vec<String> = spec["externalIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| s(v).to_string())
                .collect();
            for ing in status["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
            {
                external.push(if s(&ing["ip"]).is_empty() {
                    s(&ing["hostname"]).into()
                } else {
                    s(&ing["ip"]).into()
                });
            }
            let external = match ty {
                "ExternalName" => s(&spec["externalName"]).to_string(),
                "LoadBalancer" if external.is_empty() => "<pending>".into(),
                _ => or_none(external.join(",")),
            };
            vec![
                name,
                json!(ty),
                json!(cluster_ip),
                json!(external),
                json!(service_ports(spec)),
                json!(age(obj, now)),
                json!(or_none(map_string(&spec["selector"]))),
            ]
        }
        ("", "Endpoints") => {
            let mut eps = Vec::new();
            for subset in obj["subsets"].as_array().into_iter().flatten() {
                let ports: Vec<i64> = subset["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| i(&p["port"]))
                    .collect();
                for a in subset["addresses"].as_array().into_iter().flatten() {
                    if ports.is_empty() {
                        eps.push(s(&a["ip"]).to_string());
                    }
                    for p in &ports {
                        eps.push(format!("{}:{p}", s(&a["ip"])));
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                or_none(eps.join(","))
            };
            vec![name, json!(shown), json!(age(obj, now))]
        }
        ("", "ReplicationController") | ("apps", "ReplicaSet") => {
            let (c, im) = containers_images(&spec["template"]["spec"]);
            let sel = if kind.kind == "ReplicaSet" {
                selector_string(&spec["selector"])
            } else {
                map_string(&spec["selector"])
            };
            vec![
                name,
                json!(i(&spec["replicas"])),
                json!(i(&status["replicas"])),
                json!(i(&status["readyReplicas"])),
                json!(age(obj, now)),
                json!(c),
                json!(im),
                json!(or_none(sel)),
            ]
        }
        ("", "ConfigMap") => {
            let n = obj["data"].as_object().map_or(0, |m| m.len())
                + obj["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(n), json!(age(obj, now))]
        }
        ("", "Secret") => {
            let n = obj["data"].as_object().map_or(0, |m| m.len());
            vec![name, json!(s(&obj["type"])), json!(n), json!(age(obj, now))]
        }
        ("", "ServiceAccount") => vec![
            name,
            json!(obj["secrets"].as_array().map_or(0, Vec::len).to_string()),
            json!(age(obj, now)),
        ],
        ("", "Event") | ("events.k8s.io", "Event") => {
            let (object, sub) = event_object(obj);
            let last = ts(&obj["lastTimestamp"])
                .or_else(|| ts(&obj["eventTime"]))
                .or_else(|| ts(&obj["metadata"]["creationTimestamp"]));
            let first = ts(&obj["firstTimestamp"])
                .or_else(|| ts(&obj["eventTime"]))
                .or_else(|| ts(&obj["metadata"]["creationTimestamp"]));
            let source = if obj["source"]["component"].is_string() {
                s(&obj["source"]["component"])
            } else {
                s(&obj["reportingController"])
            };
            let message = if obj["message"].is_string() {
                s(&obj["message"])
            } else {
                s(&obj["note"])
            };
            let count = obj["count"].as_i64().unwrap_or(1);
            vec![
                json!(last.map_or("<unknown>".into(), |t| human(now - t))),
                json!(s(&obj["type"])),
                json!(s(&obj["reason"])),
                json!(object),
                json!(sub),
                json!(source),
                json!(message.trim()),
                json!(first.map_or("<unknown>".into(), |t| human(now - t))),
                json!(count.to_string()),
                name,
            ]
        }
        ("", "ResourceQuota") => {
            let hard = &status["hard"];
            let used = &status["used"];
            let mut req = Vec::new();
            let mut lim = Vec::new();
            for (k, v) in hard.as_object().into_iter().flatten() {
                let cell = format!("{k}: {}/{}", s(&used[k.as_str()]), s(v));
                if k.starts_with("limits.") {
                    lim.push(cell)
                } else {
                    req.push(cell)
                }
            }
            vec![
                name,
                json!(age(obj, now)),
                json!(req.join(", ")),
                json!(lim.join(", ")),
            ]
        }
        ("", "LimitRange") => vec![name, obj["metadata"]["creationTimestamp"].clone()],
        ("", "PodTemplate") => {
            let (c, im) = containers_images(&obj["template"]["spec"]);
            vec![
                name,
                json!(c),
                json!(im),
                json!(or_none(map_string(&obj["template"]["metadata"]["labels"]))),
            ]
        }
        ("apps", "Deployment") => {
            let (c, im) = containers_images(&spec["template"]["spec"]);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(&status["readyReplicas"]),
                    i(&spec["replicas"])
                )),
                json!(i(&status["updatedReplicas"])),
                json!(i(&status["availableReplicas"])),
                json!(age(obj, now)),
                json!(c),
                json!(im),
                json!(or_none(selector_string(&spec["selector"]))),
            ]
        }
        ("apps", "DaemonSet") => {
            let (c, im) = containers_images(&spec["template"]["spec"]);
            vec![
                name,
                json!(i(&status["desiredNumberScheduled"])),
                json!(i(&status["currentNumberScheduled"])),
                json!(i(&status["numberReady"])),
                json!(i(&status["updatedNumberScheduled"])),
                json!(i(&status["numberAvailable"])),
                json!(or_none(map_string(
                    &spec["template"]["spec"]["nodeSelector"]
                ))),
                json!(age(obj, now)),
                json!(c),
                json!(im),
                json!(or_none(selector_string(&spec["selector"]))),
            ]
        }
        ("apps", "StatefulSet") => {
            let (c, im) = containers_images(&spec["template"]["spec"]);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    i(&status["readyReplicas"]),
                    i(&spec["replicas"])
                )),
                json!(age(obj, now)),
                json!(c),
                json!(im),
            ]
        }
        ("apps", "ControllerRevision") => {
            let owner = obj["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["controller"].as_bool() == Some(true))
                .map(|o| format!("{}/{}", s(&o["kind"]).to_lowercase(), s(&o["name"])))
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(owner),
                json!(i(&obj["revision"])),
                json!(age(obj, now)),
            ]
        }
        ("coordination.k8s.io", "Lease") => vec![
            name,
            json!(s(&spec["holderIdentity"])),
            json!(age(obj, now)),
        ],
        ("discovery.k8s.io", "EndpointSlice") => {
            let ports: Vec<String> = obj["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| i(&p["port"]).to_string())
                .collect();
            let addrs: Vec<String> = obj["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .map(|a| s(&a).to_string())
                .collect();
            let shown = if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else {
                or_none(addrs.join(","))
            };
            vec![
                name,
                json!(s(&obj["addressType"])),
                json!(or_none(ports.join(","))),
                json!(shown),
                json!(age(obj, now)),
            ]
        }
        ("scheduling.k8s.io", "PriorityClass") => vec![
            name,
            json!(i(&obj["value"])),
            json!(obj["globalDefault"].as_bool().unwrap_or(false)),
            json!(age(obj, now)),
            json!(s(&obj["preemptionPolicy"])),
        ],
        _ => vec![name, json!(age(obj, now))],
    }
}

/// What each row carries as `object`, from `?includeObject=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(v: Option<&str>) -> IncludeObject {
        match v {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

fn row(kind: &Kind, obj: &Value, include: IncludeObject, now: i64) -> Value {
    let mut r = json!({"cells": cells(kind, obj, now)});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            r["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            })
        }
        IncludeObject::Object => r["object"] = obj.clone(),
    }
    r
}

/// The column definitions of a kind's table.
pub fn column_definitions(kind: &Kind) -> Value {
    Value::Array(
        columns(kind)
            .into_iter()
            .map(|(name, ty, priority, description)| {
                let format = if name == "Name" || name == "Template" { "name" } else { "" };
                json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
            })
            .collect(),
    )
}

/// A Table of `objects`, with list metadata (`resourceVersion`, `continue`).
pub fn table(
    kind: &Kind,
    objects: &[Value],
    include: IncludeObject,
    list_meta: Value,
    with_headers: bool,
) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": if with_headers { column_definitions(kind) } else { json!([]) },
        "rows": objects.iter().map(|o| row(kind, o, include, now)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{lookup, KINDS};

    #[test]
    fn every_kind_has_one_cell_per_column() {
        let obj = json!({"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}, "spec": {}, "status": {}});
        for kind in KINDS {
            assert_eq!(
                columns(kind).len(),
                cells(kind, &obj, 0).len(),
                "{}",
                kind.kind
            );
        }
    }

    #[test]
    fn pod_and_service_cells() {
        let pods = lookup("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 0, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let c = cells(pods, &pod, 1577836800 + 300);
        assert_eq!(
            c[..5],
            [
                json!("p"),
                json!("1/2"),
                json!("CrashLoopBackOff"),
                json!("3"),
                json!("5m")
            ]
        );
        assert_eq!(c[5], "10.0.0.5");
        let pending = json!({"metadata": {"name": "q"}, "spec": {"containers": [{"name": "a"}]}, "status": {"phase": "Pending"}});
        assert_eq!(cells(pods, &pending, 0)[2], "Pending");
        let svcs = lookup("", "v1", "services").unwrap();
        let svc = json!({"metadata": {"name": "s"}, "spec": {"type": "NodePort", "clusterIP": "10.43.0.5",
            "ports": [{"port": 80, "nodePort": 30080, "protocol": "TCP"}], "selector": {"app": "web"}}});
        let c = cells(svcs, &svc, 0);
        assert_eq!(
            c[1..5],
            [
                json!("NodePort"),
                json!("10.43.0.5"),
                json!("<none>"),
                json!("80:30080/TCP")
            ]
        );
        assert_eq!(c[6], "app=web");
    }
}
