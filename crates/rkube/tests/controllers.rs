//! Controller manager end to end (issue 6): the ServiceAccount controller, node IPAM, leader
//! election (controller manager and scheduler), node failure and eviction, and a controller
//! manager crash in the middle of a rollout.

mod common;

use std::collections::HashSet;

use common::Cluster;

#[test]
fn every_namespace_has_a_default_service_account() {
    let c = Cluster::start();
    for ns in ["default", "kube-system"] {
        c.eventually(&format!("default SA in {ns}"), || {
            c.kubectl_output(&["get", "sa", "default", "-n", ns])
                .status
                .success()
                .then_some(())
        });
    }
    c.kubectl(&["create", "namespace", "team"]);
    c.eventually("default SA in team", || {
        c.kubectl_output(&["get", "sa", "default", "-n", "team"])
            .status
            .success()
            .then_some(())
    });
    let uid = c.kubectl(&[
        "get",
        "sa",
        "default",
        "-n",
        "team",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    c.kubectl(&["delete", "sa", "default", "-n", "team"]);
    c.eventually("default SA recreated", || {
        let out = c.kubectl_output(&[
            "get",
            "sa",
            "default",
            "-n",
            "team",
            "-o",
            "jsonpath={.metadata.uid}",
        ]);
        (out.status.success() && String::from_utf8_lossy(&out.stdout) != uid).then_some(())
    });
    // A terminating namespace is left alone (and goes away).
    c.kubectl(&[
        "delete",
        "namespace",
        "team",
        "--wait=true",
        "--timeout=60s",
    ]);
    assert!(!c
        .kubectl_output(&["get", "namespace", "team"])
        .status
        .success());
}

fn node(c: &Cluster, name: &str) {
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{allocatable: {{cpu: \"4\", memory: 8Gi, pods: \"110\"}}}}\n"
    ));
}

fn cidrs(c: &Cluster) -> Vec<(String, String)> {
    c.kubectl(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR}{\"\\n\"}{end}",
    ])
    .lines()
    .filter_map(|l| {
        let (n, cidr) = l.split_once(' ')?;
        Some((n.to_string(), cidr.to_string()))
    })
    .collect()
}

fn all_allocated(c: &Cluster, n: usize) -> Vec<(String, String)> {
    c.eventually("every node has a pod CIDR", || {
        let got = cidrs(c);
        (got.len() == n && got.iter().all(|(_, cidr)| !cidr.is_empty())).then_some(got)
    })
}

#[test]
fn nodes_get_distinct_pod_cidrs_that_survive_restarts() {
    let mut c = Cluster::start_with(0, &["--cluster-cidr", "10.50.0.0/16"]);
    for i in 0..3 {
        node(&c, &format!("n{i}"));
    }
    let got = all_allocated(&c, 3);
    let distinct: HashSet<_> = got.iter().map(|(_, cidr)| cidr.clone()).collect();
    assert_eq!(distinct.len(), 3, "{got:?}");
    assert!(
        got.iter()
            .all(|(_, cidr)| cidr.starts_with("10.50.") && cidr.ends_with(".0/24")),
        "{got:?}"
    );
    let spec = c.kubectl(&["get", "node", "n0", "-o", "jsonpath={.spec.podCIDRs[0]}"]);
    assert_eq!(spec, got.iter().find(|(n, _)| n == "n0").unwrap().1);
    // After a restart, allocations are remembered: a new node gets a block nobody has.
    c.stop();
    c.boot();
    node(&c, "n3");
    let after = all_allocated(&c, 4);
    let distinct: HashSet<_> = after.iter().map(|(_, cidr)| cidr.clone()).collect();
    assert_eq!(distinct.len(), 4, "{after:?}");
    for (n, cidr) in &got {
        assert!(
            after.contains(&(n.clone(), cidr.clone())),
            "{n} kept {cidr}: {after:?}"
        );
    }
}

/// Two controller managers: one holds the kube-controller-manager Lease and works; killed, the
/// standby takes the lease over and does the work.
#[test]
fn a_standby_controller_manager_takes_over_from_a_killed_leader() {
    let c = Cluster::start_with(0, &["--disable", "controller-manager,scheduler"]);
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let start = || {
        Killed(
            std::process::Command::new(common::rkube_bin())
                .args(["controller-manager", "--kubeconfig"])
                .arg(c.kubeconfig())
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("rkube controller-manager"),
        )
    };
    let mut managers = vec![start(), start()];
    let holder = || {
        c.kubectl(&[
            "get",
            "lease",
            "kube-controller-manager",
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    };
    let leader = c.eventually("a leader", || {
        let h = holder();
        managers
            .iter()
            .position(|m| h.ends_with(&format!("_{}", m.0.id())))
    });
    // Only the leader works: a new namespace gets its default account.
    c.kubectl(&["create", "namespace", "before"]);
    c.eventually("default SA from the leader", || {
        c.kubectl_output(&["get", "sa", "default", "-n", "before"])
            .status
            .success()
            .then_some(())
    });
    let standby_pid = managers[1 - leader].0.id();
    drop(managers.remove(leader));
    c.eventually("the standby holds the lease", || {
        holder().ends_with(&format!("_{standby_pid}")).then_some(())
    });
    c.kubectl(&["create", "namespace", "after"]);
    c.eventually("default SA from the new leader", || {
        c.kubectl_output(&["get", "sa", "default", "-n", "after"])
            .status
            .success()
            .then_some(())
    });
}

/// Two schedulers: the leader binds pods; killed, the standby takes the kube-scheduler lease
/// and binds the next ones.
#[test]
fn a_standby_scheduler_takes_over_from_a_killed_leader() {
    let c = Cluster::start_with(0, &["--disable", "scheduler"]);
    let _nodes = c.hollow(1, "node-", &[]);
    let mut schedulers = vec![c.component("scheduler", &[]), c.component("scheduler", &[])];
    let holder = || {
        c.jsonpath(
            &["get", "lease", "kube-scheduler", "-n", "kube-system"],
            "{.spec.holderIdentity}",
        )
    };
    let leader = c.eventually("a scheduler leader", || {
        let h = holder();
        schedulers
            .iter()
            .position(|s| h.ends_with(&format!("_{}", s.0.id())))
    });
    let bound = |pod: &str| {
        c.eventually(&format!("{pod} bound"), || {
            (!c.jsonpath(&["get", "pod", pod], "{.spec.nodeName}")
                .is_empty())
            .then_some(())
        })
    };
    c.kubectl(&["run", "before", "--image=busybox"]);
    bound("before");
    let standby = schedulers[1 - leader].0.id();
    schedulers.remove(leader).kill();
    c.eventually("the standby holds the lease", || {
        holder().ends_with(&format!("_{standby}")).then_some(())
    });
    c.kubectl(&["run", "after", "--image=busybox"]);
    bound("after");
}

/// A node that stops heartbeating: Ready becomes Unknown after the grace period, the node is
/// tainted unreachable, its pods are evicted after their tolerationSeconds and their
/// controller recreates them on the nodes that are left. Heard again, it is untainted.
#[test]
fn a_silent_node_is_marked_unknown_tainted_and_its_pods_move() {
    let c = Cluster::start_with(
        0,
        &[
            "--node-monitor-grace-period",
            "4s",
            "--node-monitor-period",
            "1s",
        ],
    );
    let _a = c.hollow(2, "a-", &[]);
    let mut b = c.hollow(1, "b-", &[]);
    // Every pod is admitted with the default 300 s tolerations; these ask for 2 s.
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 6\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: c, image: busybox}]\n      tolerations: [{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}]\n",
    );
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let on = |node: &str| {
        c.live_pods(
            &[
                "-l",
                "app=web",
                "--field-selector",
                &format!("spec.nodeName={node}"),
            ],
            "{.metadata.name}",
        )
        .len()
    };
    // Spread puts some pods on b-0 (the scheduler spreads by default).
    assert!(on("b-0") > 0, "no pod on b-0 to evict");
    let tolerations = c.jsonpath(
        &["get", "pods", "-l", "app=web"],
        "{.items[0].spec.tolerations[*].tolerationSeconds}",
    );
    assert!(
        tolerations.contains('2') && tolerations.contains("300"),
        "{tolerations}"
    );

    b.kill();
    c.eventually("b-0 Unknown", || {
        (c.jsonpath(
            &["get", "node", "b-0"],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        ) == "Unknown")
            .then_some(())
    });
    c.eventually("b-0 tainted unreachable", || {
        c.jsonpath(&["get", "node", "b-0"], "{.spec.taints[*].key}")
            .contains("node.kubernetes.io/unreachable")
            .then_some(())
    });
    assert_eq!(
        c.kubectl(&["get", "nodes", "b-0", "--no-headers"])
            .split_whitespace()
            .nth(1),
        Some("NotReady")
    );
    c.eventually("pods evicted from b-0 and recreated elsewhere", || {
        (on("b-0") == 0 && on("a-0") + on("a-1") == 6).then_some(())
    });
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    let events = c.kubectl(&["get", "events", "-A"]);
    assert!(events.contains("TaintManagerEviction"), "{events}");

    // The node comes back (same name): Ready again, untainted.
    let _b = c.hollow(1, "b-", &[]);
    c.eventually("b-0 untainted", || {
        (!c.jsonpath(&["get", "node", "b-0"], "{.spec.taints[*].key}")
            .contains("unreachable"))
        .then_some(())
    });
}

/// Kill -9 the controller manager in the middle of a rollout and start it again: the rollout
/// finishes, the final state is right, and at no moment were there more pods than desired +
/// maxSurge.
#[test]
fn a_rollout_survives_a_controller_manager_crash() {
    let c = Cluster::start_with(0, &["--disable", "controller-manager"]);
    // The controller manager first: node IPAM gives the hollow nodes their pod CIDRs.
    let mut cm = c.component("controller-manager", &[]);
    let _nodes = c.hollow(3, "node-", &[]);
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 10\n  minReadySeconds: 1\n  strategy: {rollingUpdate: {maxSurge: 2, maxUnavailable: 0}}\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: busybox:1}]}\n",
    );
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"]);
    // Watch the pods (kubectl's own watch) and remember the most active at once.
    let mut watch = c.kubectl_stream(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-w",
        "--output-watch-events",
        "-o",
        "jsonpath={.type} {.object.metadata.name} {.object.metadata.deletionTimestamp}{\"\\n\"}",
    ]);
    watch.wait_lines(10);
    c.kubectl(&["set", "image", "deployment/web", "c=busybox:2"]);
    // Mid-rollout: some new pods exist, not all.
    c.eventually("rollout under way", || {
        let n = c.pod_images("app=web");
        let new = n.split_whitespace().filter(|i| *i == "busybox:2").count();
        (new > 0).then_some(())
    });
    cm.kill();
    let _cm2 = c.component("controller-manager", &[]);
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    c.eventually("final state", || {
        let imgs = c.pod_images("app=web");
        let rs = c.kubectl(&[
            "get",
            "rs",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].spec.replicas}",
        ]);
        let mut sizes: Vec<&str> = rs.split_whitespace().collect();
        sizes.sort();
        (imgs.split_whitespace().count() == 10
            && imgs.split_whitespace().all(|i| i == "busybox:2")
            && sizes == ["0", "10"])
        .then_some(())
    });
    // Replay what the watch saw.
    let mut active: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut max = 0;
    for line in watch.drain() {
        let f: Vec<&str> = line.split(' ').collect();
        let (ty, name, deleting) = (
            f[0],
            f.get(1).copied().unwrap_or_default(),
            f.get(2).is_some_and(|d| !d.is_empty()),
        );
        if ty == "DELETED" || deleting {
            active.remove(name);
        } else {
            active.insert(name.to_string());
        }
        max = max.max(active.len());
    }
    assert!(max >= 10, "the watch saw the pods ({max})");
    assert!(
        max <= 12,
        "{max} pods at once: more than replicas + maxSurge"
    );
}
