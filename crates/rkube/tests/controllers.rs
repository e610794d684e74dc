//! Controller manager end to end (issue 6, started): the ServiceAccount controller and node IPAM.

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
