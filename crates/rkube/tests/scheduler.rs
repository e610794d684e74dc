//! The scheduler end to end: real kubectl against `rkube server`, nodes registered as plain
//! Node objects (no kubelet), every plugin's placement and its Unschedulable message,
//! preemption, a pending pod placed when room appears, and a scheduler restart mid-stream.

mod common;

use std::collections::HashMap;
use std::process::{Child, Stdio};

use common::{eventually, Cluster};

fn node(c: &Cluster, name: &str, cpu: &str, extra_labels: &str, spec: &str) {
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}{extra_labels}}}\nspec: {{{spec}}}\nstatus:\n  capacity: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}\n  allocatable: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}\n"
    ));
}

/// A pod requesting `cpu`, with extra spec fields (YAML flow mappings, comma-led).
fn pod(c: &Cluster, name: &str, cpu: &str, labels: &str, spec: &str) {
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{{labels}}}}}\nspec: {{containers: [{{name: c, image: busybox, resources: {{requests: {{cpu: \"{cpu}\"}}}}}}]{spec}}}\n"
    ));
}

fn node_of(c: &Cluster, pod: &str) -> String {
    c.kubectl(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"])
}

fn wait_bound(c: &Cluster, pod: &str) -> String {
    c.eventually(&format!("{pod} bound"), || {
        let n = node_of(c, pod);
        (!n.is_empty()).then_some(n)
    })
}

/// Wait for PodScheduled=False/Unschedulable and return its message.
fn wait_unschedulable(c: &Cluster, pod: &str) -> String {
    c.eventually(&format!("{pod} unschedulable"), || {
        let out = c.kubectl(&[
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].reason}|{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        ]);
        let (reason, message) = out.split_once('|')?;
        (reason == "Unschedulable").then(|| message.to_string())
    })
}

/// The scheduler tests place pods on hand-made nodes that never post status, as upstream's
/// scheduler integration tests do: without the controller manager, whose node lifecycle
/// controller would (rightly) taint such nodes unreachable after the grace period.
fn scheduler_cluster(also_disable: &[&str]) -> Cluster {
    let mut disable = vec!["controller-manager"];
    disable.extend_from_slice(also_disable);
    Cluster::start_with(0, &["--disable", &disable.join(",")])
}

/// A Binding, as upstream's binding storage writes it: the node name, the Binding's
/// annotations and PodScheduled=True in one write, no managedFields entry, and a second binding
/// refused.
#[test]
fn a_binding_sets_the_node_annotations_and_condition() {
    let c = scheduler_cluster(&["scheduler"]);
    node(&c, "n1", "1", "", "");
    pod(&c, "manual", "100m", "", "");
    let binding = r#"{"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "manual", "annotations": {"example.com/placed-by": "hand"}},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "n1"}}"#;
    let managers = || {
        c.kubectl(&[
            "get",
            "pod",
            "manual",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ])
    };
    let before = managers();
    assert!(!before.is_empty());
    let path = "/api/v1/namespaces/default/pods/manual/binding";
    let out = c.kubectl_stdin(&["create", "--raw", path, "-f", "-"], binding);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node_of(&c, "manual"), "n1");
    let got = c.kubectl(&[
        "get",
        "pod",
        "manual",
        "-o",
        "jsonpath={.metadata.annotations.example\\.com/placed-by}|{.status.conditions[?(@.type==\"PodScheduled\")].status}",
    ]);
    assert_eq!(got, "hand|True");
    assert_eq!(managers(), before);
    let again = c.kubectl_stdin(&["create", "--raw", path, "-f", "-"], binding);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already assigned to node"), "{err}");
}

#[test]
fn resources_selectors_taints_ports_and_the_reasons_users_read() {
    let c = scheduler_cluster(&[]);
    node(&c, "small", "1", "", "");
    node(&c, "big", "4", ", disk: ssd", "");
    node(
        &c,
        "gpu",
        "8",
        "",
        "taints: [{key: dedicated, value: gpu, effect: NoSchedule}]",
    );
    node(&c, "cordoned", "8", "", "unschedulable: true");

    // NodeResourcesFit: only "big" has 2 cpus free (gpu is tainted, cordoned is cordoned).
    pod(&c, "needs-2cpu", "2", "", "");
    assert_eq!(wait_bound(&c, "needs-2cpu"), "big");
    // NodeAffinity through nodeSelector.
    pod(&c, "ssd", "100m", "", ", nodeSelector: {disk: ssd}");
    assert_eq!(wait_bound(&c, "ssd"), "big");
    // TaintToleration + required node affinity by hostname.
    pod(
        &c,
        "tolerates",
        "1",
        "",
        ", tolerations: [{key: dedicated, operator: Equal, value: gpu, effect: NoSchedule}], affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [gpu]}]}]}}}",
    );
    assert_eq!(wait_bound(&c, "tolerates"), "gpu");
    // Without the toleration: every node says why, in upstream's words.
    pod(
        &c,
        "no-toleration",
        "100m",
        "",
        ", affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [gpu, cordoned]}]}]}}}",
    );
    let msg = wait_unschedulable(&c, "no-toleration");
    assert!(
        msg.starts_with("0/4 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) were unschedulable, 2 node(s) didn't match Pod's node affinity/selector."),
        "{msg}"
    );
    // NodePorts: a second pod wanting the same host port on the same node does not fit.
    for name in ["port-a", "port-b"] {
        pod(
            &c,
            name,
            "10m",
            "",
            ", nodeSelector: {kubernetes.io/hostname: small}, hostNetwork: false, containers: [{name: c, image: busybox, ports: [{containerPort: 80, hostPort: 8080}]}]",
        );
    }
    let first = eventually("one port pod bound", &mut || {
        ["port-a", "port-b"]
            .into_iter()
            .find(|p| !node_of(&c, p).is_empty())
    });
    let other = if first == "port-a" {
        "port-b"
    } else {
        "port-a"
    };
    let msg = wait_unschedulable(&c, other);
    assert!(
        msg.contains("1 node(s) didn't have free ports for the requested pod ports"),
        "{msg}"
    );
    // Too big for anything: Insufficient cpu, and the events say so in `kubectl describe`.
    pod(&c, "huge", "6", "", "");
    let msg = wait_unschedulable(&c, "huge");
    assert!(msg.contains("Insufficient cpu"), "{msg}");
    assert!(msg.contains("preemption:"), "{msg}");
    let described = c.kubectl(&["describe", "pod", "huge"]);
    assert!(described.contains("FailedScheduling"), "{described}");
    // A node with room arrives: the pending pod is placed without anyone touching it.
    node(&c, "roomy", "16", "", "");
    assert_eq!(wait_bound(&c, "huge"), "roomy");
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=huge",
        "-o",
        "jsonpath={.items[*].reason}",
    ]);
    assert!(events.contains("Scheduled"), "{events}");
    // Nothing is overcommitted.
    assert_no_overcommit(&c);
}

/// Sum of cpu requests per node never exceeds the node's allocatable.
fn assert_no_overcommit(c: &Cluster) {
    let alloc: HashMap<String, f64> = c
        .kubectl(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.allocatable.cpu}{\"\\n\"}{end}",
        ])
        .lines()
        .filter_map(|l| {
            let (n, cpu) = l.split_once(' ')?;
            Some((n.to_string(), cpu_of(cpu)))
        })
        .collect();
    let mut used: HashMap<String, f64> = HashMap::new();
    for l in c
        .kubectl(&["get", "pods", "-A", "-o", "jsonpath={range .items[*]}{.spec.nodeName} {.spec.containers[0].resources.requests.cpu}{\"\\n\"}{end}"])
        .lines()
    {
        let mut parts = l.split(' ');
        let (Some(n), Some(cpu)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !n.is_empty() {
            *used.entry(n.to_string()).or_default() += cpu_of(cpu);
        }
    }
    for (n, u) in used {
        assert!(
            u <= alloc[&n] + 1e-9,
            "node {n} overcommitted: {u} > {}",
            alloc[&n]
        );
    }
}

fn cpu_of(q: &str) -> f64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().unwrap_or(0.0) / 1000.0,
        None => q.parse().unwrap_or(0.0),
    }
}

#[test]
fn pod_affinity_anti_affinity_and_topology_spread() {
    let c = scheduler_cluster(&[]);
    for (n, zone) in [("a1", "za"), ("a2", "za"), ("b1", "zb"), ("c1", "zc")] {
        node(
            &c,
            n,
            "8",
            &format!(", topology.kubernetes.io/zone: {zone}"),
            "",
        );
    }
    // Required anti-affinity per zone: three db pods, one per zone; a fourth cannot fit.
    let anti = ", affinity: {podAntiAffinity: {requiredDuringSchedulingIgnoredDuringExecution: [{topologyKey: topology.kubernetes.io/zone, labelSelector: {matchLabels: {app: db}}}]}}";
    let mut zones = Vec::new();
    for i in 0..3 {
        let name = format!("db-{i}");
        pod(&c, &name, "100m", "app: db", anti);
        let n = wait_bound(&c, &name);
        zones.push(c.kubectl(&[
            "get",
            "node",
            &n,
            "-o",
            "jsonpath={.metadata.labels.topology\\.kubernetes\\.io/zone}",
        ]));
    }
    zones.sort();
    assert_eq!(zones, ["za", "zb", "zc"]);
    pod(&c, "db-3", "100m", "app: db", anti);
    let msg = wait_unschedulable(&c, "db-3");
    // Upstream checks existing pods' anti-affinity first, so that is the reason it gives.
    assert!(
        msg.contains("4 node(s) didn't satisfy existing pods anti-affinity rules")
            || msg.contains("4 node(s) didn't match pod anti-affinity rules"),
        "{msg}"
    );
    // Required affinity: with the db pod in zone b, on the same node.
    let db_nodes: Vec<String> = (0..3).map(|i| node_of(&c, &format!("db-{i}"))).collect();
    pod(&c, "cache", "100m", "app: cache", ", affinity: {podAffinity: {requiredDuringSchedulingIgnoredDuringExecution: [{topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: db}}}]}}");
    assert!(db_nodes.contains(&wait_bound(&c, "cache")));
    // Affinity to something that does not exist: unschedulable with the affinity reason.
    pod(&c, "lonely", "100m", "", ", affinity: {podAffinity: {requiredDuringSchedulingIgnoredDuringExecution: [{topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: nothing}}}]}}");
    let msg = wait_unschedulable(&c, "lonely");
    assert!(
        msg.contains("node(s) didn't match pod affinity rules"),
        "{msg}"
    );
    // namespaceSelector: affinity to pods in namespaces labelled team=a.
    c.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a, labels: {team: a}}\n");
    c.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: shared, namespace: team-a, labels: {app: shared}}\nspec: {nodeSelector: {kubernetes.io/hostname: c1}, containers: [{name: c, image: busybox}]}\n");
    c.eventually("shared bound", || {
        (c.kubectl(&[
            "get",
            "pod",
            "shared",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.spec.nodeName}",
        ]) == "c1")
            .then_some(())
    });
    let by_ns = |team: &str| {
        format!(", affinity: {{podAffinity: {{requiredDuringSchedulingIgnoredDuringExecution: [{{topologyKey: kubernetes.io/hostname, namespaceSelector: {{matchLabels: {{team: {team}}}}}, labelSelector: {{matchLabels: {{app: shared}}}}}}]}}}}")
    };
    pod(&c, "near-team-a", "100m", "", &by_ns("a"));
    assert_eq!(wait_bound(&c, "near-team-a"), "c1");
    pod(&c, "near-team-b", "100m", "", &by_ns("b"));
    let msg = wait_unschedulable(&c, "near-team-b");
    assert!(
        msg.contains("node(s) didn't match pod affinity rules"),
        "{msg}"
    );
    // Topology spread, DoNotSchedule, maxSkew 1 over zones: 6 pods → 2 per zone.
    let spread = ", topologySpreadConstraints: [{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}]";
    let mut per_zone: HashMap<String, usize> = HashMap::new();
    for i in 0..6 {
        let name = format!("web-{i}");
        pod(&c, &name, "100m", "app: web", spread);
        let n = wait_bound(&c, &name);
        let z = c.kubectl(&[
            "get",
            "node",
            &n,
            "-o",
            "jsonpath={.metadata.labels.topology\\.kubernetes\\.io/zone}",
        ]);
        *per_zone.entry(z).or_default() += 1;
    }
    assert_eq!(per_zone.values().copied().collect::<Vec<_>>(), [2, 2, 2]);
    // A node without the topology label cannot take a pod with that constraint.
    pod(&c, "spread-nozone", "100m", "app: web", ", topologySpreadConstraints: [{maxSkew: 1, topologyKey: rack, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}]");
    let msg = wait_unschedulable(&c, "spread-nozone");
    assert!(
        msg.starts_with("0/4 nodes are available: 4 node(s) didn't match pod topology spread constraints (missing required label)."),
        "{msg}"
    );
    // Skew: zone a holds two pods of app tilt, b and c none but are closed (tainted); a third
    // would make the skew 3 > 1, so nothing fits.
    c.kubectl(&["taint", "nodes", "b1", "c1", "block=yes:NoSchedule"]);
    for i in 0..2 {
        let name = format!("tilt-{i}");
        pod(
            &c,
            &name,
            "100m",
            "app: tilt",
            ", nodeSelector: {kubernetes.io/hostname: a1}",
        );
        assert_eq!(wait_bound(&c, &name), "a1");
    }
    pod(&c, "tilt-2", "100m", "app: tilt", ", topologySpreadConstraints: [{maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: tilt}}}]");
    let msg = wait_unschedulable(&c, "tilt-2");
    assert!(
        msg.starts_with("0/4 nodes are available: 2 node(s) didn't match pod topology spread constraints, 2 node(s) had untolerated taint {block: yes}."),
        "{msg}"
    );
}

#[test]
fn preemption_evicts_lower_priority_pods_and_places_the_higher() {
    let c = scheduler_cluster(&[]);
    c.apply_yaml("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: low}\nvalue: 100\n");
    c.apply_yaml("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: high}\nvalue: 1000\n");
    node(&c, "only", "2", "", "");
    pod(&c, "low-1", "1", "", ", priorityClassName: low");
    pod(&c, "low-2", "1", "", ", priorityClassName: low");
    wait_bound(&c, "low-1");
    wait_bound(&c, "low-2");
    assert_eq!(
        c.kubectl(&["get", "pod", "low-1", "-o", "jsonpath={.spec.priority}"]),
        "100"
    );
    pod(&c, "high", "2", "", ", priorityClassName: high");
    // The victims are deleted gracefully and the preemptor is nominated to their node.
    c.eventually("nominatedNodeName", || {
        (c.kubectl(&[
            "get",
            "pod",
            "high",
            "-o",
            "jsonpath={.status.nominatedNodeName}",
        ]) == "only")
            .then_some(())
    });
    for v in ["low-1", "low-2"] {
        c.eventually("victim terminating", || {
            let out = c.kubectl_output(&[
                "get",
                "pod",
                v,
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ]);
            (!out.status.success() || !out.stdout.is_empty()).then_some(())
        });
        // No kubelet here: finish the graceful deletion as the kubelet would.
        c.kubectl(&[
            "delete",
            "pod",
            v,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
        ]);
    }
    assert_eq!(wait_bound(&c, "high"), "only");
    // An unknown PriorityClass is refused at admission.
    let err = c.kubectl_stdin(&["create", "-f", "-"], "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {priorityClassName: nope, containers: [{name: c, image: busybox}]}\n");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("no PriorityClass with name nope was found")
    );
    // Created a moment later, it is found at once (admission caches only classes it found).
    c.apply_yaml(
        "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: nope}\nvalue: 5\n",
    );
    c.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {priorityClassName: nope, containers: [{name: c, image: busybox}]}\n");
    assert_eq!(
        c.kubectl(&["get", "pod", "x", "-o", "jsonpath={.spec.priority}"]),
        "5"
    );
    // A global default applies to pods that name no class (once admission has seen it).
    c.apply_yaml("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: everyone}\nvalue: 7\nglobalDefault: true\n");
    let mut n = 0;
    c.eventually("the global default applied", || {
        n += 1;
        let name = format!("plain-{n}");
        c.apply_yaml(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec: {{containers: [{{name: c, image: busybox}}]}}\n"));
        let got = c.kubectl(&["get", "pod", &name, "-o", "jsonpath={.spec.priority} {.spec.priorityClassName}"]);
        (got == "7 everyone").then_some(())
    });
    // Equal priority is never preempted.
    pod(&c, "high-2", "2", "", ", priorityClassName: high");
    let msg = wait_unschedulable(&c, "high-2");
    assert!(
        msg.contains("No preemption victims found for incoming pod"),
        "{msg}"
    );
}

/// A scheduler process, killed when dropped (also when a test fails).
struct Scheduler(Child);

impl Scheduler {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.kill();
    }
}

fn start_scheduler(c: &Cluster, config: Option<&std::path::Path>) -> Scheduler {
    let mut cmd = std::process::Command::new(common::rkube_bin());
    cmd.args(["scheduler", "--kubeconfig"])
        .arg(c.kubeconfig())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(p) = config {
        cmd.arg("--config").arg(p);
    }
    Scheduler(cmd.spawn().expect("rkube scheduler"))
}

#[test]
fn a_restarted_scheduler_double_books_nothing_and_profiles_apply() {
    let c = scheduler_cluster(&["scheduler"]);
    let config = c.data_dir().join("scheduler.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nprofiles:\n- schedulerName: default-scheduler\n- schedulerName: packer\n  plugins:\n    score:\n      disabled: [{name: \"*\"}]\n      enabled: [{name: NodeResourcesFit, weight: 1}]\n  pluginConfig:\n  - name: NodeResourcesFit\n    args: {scoringStrategy: {type: MostAllocated}}\n",
    )
    .unwrap();
    for i in 0..10 {
        node(&c, &format!("n{i}"), "1", "", "");
    }
    let mut sched = start_scheduler(&c, Some(&config));
    // 40 pods of 500m on 10 nodes of 1 cpu: exactly 20 fit.
    for i in 0..40 {
        pod(&c, &format!("p{i:02}"), "500m", "", "");
    }
    let bound = |c: &Cluster| {
        c.kubectl(&[
            "get",
            "pods",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
        ])
        .lines()
        .filter(|l| !l.is_empty())
        .count()
    };
    eventually("some pods bound", &mut || (bound(&c) >= 5).then_some(()));
    // Kill it mid-stream and start another.
    sched.kill();
    let _sched = start_scheduler(&c, Some(&config));
    eventually("20 pods bound", &mut || (bound(&c) == 20).then_some(()));
    eventually("the rest unschedulable", &mut || {
        let reasons = c.kubectl(&["get", "pods", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"PodScheduled\")].reason}{\"\\n\"}{end}"]);
        (reasons.lines().filter(|r| *r == "Unschedulable").count() == 20).then_some(())
    });
    assert_eq!(bound(&c), 20);
    assert_no_overcommit(&c);

    // A second profile: MostAllocated packs pods of scheduler "packer" onto one node.
    // (Tainted, so that the 20 pending pods above do not move in when they appear.)
    for i in 0..3 {
        node(
            &c,
            &format!("pack{i}"),
            "4",
            ", pool: pack",
            "taints: [{key: pool, value: pack, effect: NoSchedule}]",
        );
    }
    let pack =
        ", nodeSelector: {pool: pack}, tolerations: [{key: pool, value: pack, effect: NoSchedule}]";
    for i in 0..3 {
        pod(
            &c,
            &format!("packed{i}"),
            "100m",
            "",
            &format!(", schedulerName: packer{pack}"),
        );
    }
    let nodes: std::collections::HashSet<String> = (0..3)
        .map(|i| wait_bound(&c, &format!("packed{i}")))
        .collect();
    assert_eq!(nodes.len(), 1, "MostAllocated packs: {nodes:?}");
    // A pod for a scheduler nobody runs is left alone.
    pod(&c, "other", "100m", "", ", schedulerName: someone-else");
    pod(&c, "marker", "100m", "", pack);
    wait_bound(&c, "marker");
    assert_eq!(node_of(&c, "other"), "");
    assert_eq!(
        c.kubectl(&["get", "pod", "other", "-o", "jsonpath={.status.conditions}"]),
        ""
    );
}

/// Scoring plugins, each isolated on otherwise equal nodes: the pod goes where the plugin says.
#[test]
fn scoring_plugins_pick_the_node_they_prefer() {
    let c = scheduler_cluster(&[]);
    let fresh_pair = |tag: &str, a_labels: &str, a_spec: &str| {
        node(
            &c,
            &format!("{tag}-a"),
            "4",
            &format!(", pair: {tag}{a_labels}"),
            a_spec,
        );
        node(&c, &format!("{tag}-b"), "4", &format!(", pair: {tag}"), "");
    };
    let on_pair = |tag: &str| format!(", nodeSelector: {{pair: {tag}}}");

    // NodeAffinity, preferred.
    fresh_pair("pref", ", fast: \"yes\"", "");
    pod(&c, "prefers-fast", "100m", "", &format!("{}, affinity: {{nodeAffinity: {{preferredDuringSchedulingIgnoredDuringExecution: [{{weight: 50, preference: {{matchExpressions: [{{key: fast, operator: In, values: [\"yes\"]}}]}}}}]}}}}", on_pair("pref")));
    assert_eq!(wait_bound(&c, "prefers-fast"), "pref-a");

    // TaintToleration: a PreferNoSchedule taint pushes pods away.
    fresh_pair(
        "taint",
        "",
        "taints: [{key: soft, value: x, effect: PreferNoSchedule}]",
    );
    pod(&c, "avoids-taint", "100m", "", &on_pair("taint"));
    assert_eq!(wait_bound(&c, "avoids-taint"), "taint-b");

    // NodeResourcesFit, LeastAllocated: the emptier node.
    fresh_pair("least", "", "");
    pod(
        &c,
        "filler",
        "2",
        "",
        ", nodeSelector: {kubernetes.io/hostname: least-a}",
    );
    assert_eq!(wait_bound(&c, "filler"), "least-a");
    pod(&c, "spreads", "100m", "", &on_pair("least"));
    assert_eq!(wait_bound(&c, "spreads"), "least-b");

    // ImageLocality: the node that already has a large image.
    c.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: img-a, labels: {kubernetes.io/hostname: img-a, pair: img}}\nstatus:\n  allocatable: {cpu: \"4\", memory: 8Gi, pods: \"110\"}\n  images: [{names: [\"registry.local/big:1\"], sizeBytes: 800000000}]\n");
    node(&c, "img-b", "4", ", pair: img", "");
    c.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: wants-image}\nspec: {nodeSelector: {pair: img}, containers: [{name: c, image: \"registry.local/big:1\"}]}\n");
    assert_eq!(wait_bound(&c, "wants-image"), "img-a");

    // InterPodAffinity, preferred: next to the pods it likes.
    fresh_pair("ipa", "", "");
    pod(
        &c,
        "friend",
        "100m",
        "app: friend",
        ", nodeSelector: {kubernetes.io/hostname: ipa-b}",
    );
    assert_eq!(wait_bound(&c, "friend"), "ipa-b");
    pod(&c, "likes-friend", "100m", "", &format!("{}, affinity: {{podAffinity: {{preferredDuringSchedulingIgnoredDuringExecution: [{{weight: 100, podAffinityTerm: {{topologyKey: kubernetes.io/hostname, labelSelector: {{matchLabels: {{app: friend}}}}}}}}]}}}}", on_pair("ipa")));
    assert_eq!(wait_bound(&c, "likes-friend"), "ipa-b");

    // PodTopologySpread, ScheduleAnyway: the less crowded domain.
    fresh_pair("sa", "", "");
    pod(
        &c,
        "crowd",
        "100m",
        "app: crowd",
        ", nodeSelector: {kubernetes.io/hostname: sa-a}",
    );
    assert_eq!(wait_bound(&c, "crowd"), "sa-a");
    pod(&c, "spreader", "100m", "app: crowd", &format!("{}, topologySpreadConstraints: [{{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{app: crowd}}}}}}]", on_pair("sa")));
    assert_eq!(wait_bound(&c, "spreader"), "sa-b");
}

/// Upstream's default spreading: pods selected by the same Service spread over nodes even with
/// no constraints of their own (here against what resource scoring alone would choose).
#[test]
fn pods_of_one_service_spread_by_default() {
    let c = scheduler_cluster(&[]);
    node(&c, "sp-a", "4", ", pair: sp", "");
    node(&c, "sp-b", "4", ", pair: sp", "");
    c.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: spread-me}, ports: [{port: 80}]}\n");
    pod(
        &c,
        "first",
        "10m",
        "app: spread-me",
        ", nodeSelector: {kubernetes.io/hostname: sp-a}",
    );
    pod(
        &c,
        "busy",
        "1",
        "app: other",
        ", nodeSelector: {kubernetes.io/hostname: sp-b}",
    );
    assert_eq!(wait_bound(&c, "first"), "sp-a");
    assert_eq!(wait_bound(&c, "busy"), "sp-b");
    // Resource scoring alone prefers sp-a (sp-b holds a 1-cpu pod); spreading the service wins.
    pod(
        &c,
        "second",
        "10m",
        "app: spread-me",
        ", nodeSelector: {pair: sp}",
    );
    assert_eq!(wait_bound(&c, "second"), "sp-b");
}
