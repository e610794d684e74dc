//! Workload controllers end to end (issue 6): the real kubectl against `rkube server` with
//! hollow nodes running the pods. ReplicationControllers, ReplicaSets (adoption, orphaning),
//! Deployments (rollout within maxSurge/maxUnavailable, history, undo, pause, resume, restart),
//! DaemonSets, Endpoints and EndpointSlices, and the three deletion propagations.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::Cluster;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

fn pods(c: &Cluster, selector: &str) -> Vec<String> {
    c.live_pods(&["-l", selector], "{.metadata.name}")
}

fn wait_pods(c: &Cluster, selector: &str, n: usize) -> Vec<String> {
    c.eventually(&format!("{n} pods {selector}"), || {
        let p = pods(c, selector);
        (p.len() == n).then_some(p)
    })
}

fn get(c: &Cluster, what: &[&str], path: &str) -> String {
    c.jsonpath(what, path)
}

#[test]
fn replication_controllers_and_replica_sets_scale_adopt_and_orphan() {
    let c = Cluster::start();
    let _nodes = c.hollow(3, "node-", &[]);
    c.apply_yaml(
        "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: rc}\nspec:\n  replicas: 3\n  selector: {app: rc}\n  template:\n    metadata: {labels: {app: rc}}\n    spec: {containers: [{name: c, image: busybox}]}\n",
    );
    wait_pods(&c, "app=rc", 3);
    c.kubectl(&["scale", "rc", "rc", "--replicas=5"]);
    wait_pods(&c, "app=rc", 5);
    c.kubectl(&["scale", "rc", "rc", "--replicas=1"]);
    wait_pods(&c, "app=rc", 1);
    c.eventually("rc status", || {
        (get(
            &c,
            &["get", "rc", "rc"],
            "{.status.replicas}/{.status.readyReplicas}/{.status.availableReplicas}",
        ) == "1/1/1")
            .then_some(())
    });

    let rs = "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: rs}\nspec:\n  replicas: 4\n  selector: {matchLabels: {app: rs}}\n  template:\n    metadata: {labels: {app: rs}}\n    spec: {containers: [{name: c, image: busybox}]}\n";
    c.apply_yaml(rs);
    let first = wait_pods(&c, "app=rs", 4);
    c.eventually("rs status", || {
        (get(&c, &["get", "rs", "rs"], "{.status.replicas}/{.status.fullyLabeledReplicas}/{.status.readyReplicas}/{.status.availableReplicas}/{.status.observedGeneration}") == "4/4/4/4/1").then_some(())
    });
    c.kubectl(&["scale", "rs", "rs", "--replicas=2"]);
    wait_pods(&c, "app=rs", 2);

    // Orphaning: the pods stay, without an owner.
    c.kubectl(&["delete", "rs", "rs", "--cascade=orphan"]);
    c.eventually("pods orphaned", || {
        let owners = c.kubectl(&[
            "get",
            "pods",
            "-l",
            "app=rs",
            "-o",
            "jsonpath={.items[*].metadata.ownerReferences}",
        ]);
        (owners.trim().is_empty() && pods(&c, "app=rs").len() == 2).then_some(())
    });
    // Adoption: a new ReplicaSet with the same selector takes them back and creates no more.
    let kept = pods(&c, "app=rs");
    assert!(kept.iter().all(|p| first.contains(p)));
    c.apply_yaml(&rs.replace("replicas: 4", "replicas: 2"));
    let uid = c.kubectl(&["get", "rs", "rs", "-o", "jsonpath={.metadata.uid}"]);
    c.eventually("pods adopted", || {
        let owners = c.kubectl(&[
            "get",
            "pods",
            "-l",
            "app=rs",
            "-o",
            "jsonpath={.items[*].metadata.ownerReferences[0].uid}",
        ]);
        (owners.split_whitespace().filter(|o| *o == uid).count() == 2).then_some(())
    });
    assert_eq!(pods(&c, "app=rs"), kept);
    // A pod whose labels stop matching is released, and replaced.
    c.kubectl(&["label", "pod", &kept[0], "app=other", "--overwrite"]);
    c.eventually("released and replaced", || {
        let owners = c.jsonpath(&["get", "pod", &kept[0]], "{.metadata.ownerReferences}");
        (owners.is_empty() && pods(&c, "app=rs").len() == 2).then_some(())
    });
    // Events say what happened.
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=rs",
    ]);
    assert!(events.contains("SuccessfulCreate"), "{events}");
    assert!(events.contains("SuccessfulDelete"), "{events}");
}

/// What a pod watch saw during a rollout.
#[derive(Default, Debug)]
struct Seen {
    armed: bool,
    /// Active pods after the latest event (once listed).
    active_now: Option<usize>,
    max_active: usize,
    min_ready: usize,
    samples: usize,
}

/// Watch pods with a label and record, after every event, how many are active (not being
/// deleted) and how many are Ready.
fn monitor(c: &Cluster, selector: &str) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen {
        min_ready: usize::MAX,
        ..Default::default()
    }));
    let (s, kc, sel) = (seen.clone(), c.kubeconfig(), selector.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let kcfg = kube::config::Kubeconfig::read_from(kc).unwrap();
            let cfg = kube::Config::from_custom_kubeconfig(kcfg, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(cfg).unwrap();
            let api: kube::Api<Pod> = kube::Api::default_namespaced(client);
            let mut state: HashMap<String, (bool, bool)> = HashMap::new();
            let mut stream = watcher(api, watcher::Config::default().labels(&sel)).boxed();
            let mut listing = false;
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let mut apply = |p: &Pod| {
                    let active = p.metadata.deletion_timestamp.is_none()
                        && !matches!(
                            p.status.as_ref().and_then(|s| s.phase.as_deref()),
                            Some("Succeeded" | "Failed")
                        );
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    state.insert(
                        p.metadata.name.clone().unwrap_or_default(),
                        (active, active && ready),
                    );
                };
                match ev {
                    watcher::Event::Init => {
                        listing = true;
                        state.clear();
                    }
                    watcher::Event::InitApply(p) => apply(&p),
                    watcher::Event::InitDone => listing = false,
                    watcher::Event::Apply(p) => apply(&p),
                    watcher::Event::Delete(p) => {
                        state.remove(&p.metadata.name.clone().unwrap_or_default());
                    }
                }
                if listing {
                    continue;
                }
                let active = state.values().filter(|v| v.0).count();
                let ready = state.values().filter(|v| v.1).count();
                let mut s = s.lock().unwrap();
                s.active_now = Some(active);
                if s.armed {
                    s.max_active = s.max_active.max(active);
                    s.min_ready = s.min_ready.min(ready);
                    s.samples += 1;
                }
            }
        });
    });
    seen
}

/// Start recording once the monitor has listed `n` active pods.
fn arm(c: &Cluster, seen: &Arc<Mutex<Seen>>, n: usize) {
    c.eventually("the monitor lists the pods", || {
        let mut s = seen.lock().unwrap();
        (s.active_now == Some(n)).then(|| s.armed = true)
    });
}

fn rollout_done(c: &Cluster, name: &str) {
    c.kubectl(&[
        "rollout",
        "status",
        &format!("deployment/{name}"),
        "--timeout=60s",
    ]);
}

#[test]
fn deployments_roll_within_surge_and_unavailability_and_roll_back() {
    let c = Cluster::start();
    let _nodes = c.hollow(3, "node-", &[]);
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 6\n  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 2, maxUnavailable: 1}}\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: busybox:1}]}\n",
    );
    rollout_done(&c, "web");
    assert_eq!(
        get(
            &c,
            &["get", "deploy", "web"],
            "{.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
        ),
        "1"
    );
    let seen = monitor(&c, "app=web");
    arm(&c, &seen, 6);
    c.kubectl(&["set", "image", "deployment/web", "c=busybox:2"]);
    rollout_done(&c, "web");
    {
        let s = seen.lock().unwrap();
        assert!(s.samples > 0, "the watch saw the rollout: {s:?}");
        assert!(
            s.max_active <= 8,
            "more than replicas + maxSurge pods at once: {s:?}"
        );
        assert!(
            s.min_ready >= 5,
            "fewer than replicas - maxUnavailable ready at once: {s:?}"
        );
    }
    c.eventually("old pods gone", || {
        let imgs = c.pod_images("app=web");
        imgs.split_whitespace()
            .all(|i| i == "busybox:2")
            .then_some(())
    });
    let status = get(&c, &["get", "deploy", "web"], "{.status.replicas}/{.status.updatedReplicas}/{.status.readyReplicas}/{.status.availableReplicas}");
    assert_eq!(status, "6/6/6/6");
    let progressing = get(
        &c,
        &["get", "deploy", "web"],
        "{.status.conditions[?(@.type==\"Progressing\")].reason}",
    );
    assert_eq!(progressing, "NewReplicaSetAvailable");

    // History and undo.
    let history = c.kubectl(&["rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    c.kubectl(&["rollout", "undo", "deployment/web"]);
    rollout_done(&c, "web");
    c.eventually("back on busybox:1", || {
        let imgs = c.pod_images("app=web");
        (imgs.split_whitespace().count() == 6 && imgs.split_whitespace().all(|i| i == "busybox:1"))
            .then_some(())
    });
    assert_eq!(
        get(
            &c,
            &["get", "deploy", "web"],
            "{.metadata.annotations.deployment\\.kubernetes\\.io/revision}"
        ),
        "3"
    );

    // Pause: a template change does not roll; resume rolls it.
    c.kubectl(&["rollout", "pause", "deployment/web"]);
    c.eventually("paused condition", || {
        (get(
            &c,
            &["get", "deploy", "web"],
            "{.status.conditions[?(@.type==\"Progressing\")].reason}",
        ) == "DeploymentPaused")
            .then_some(())
    });
    c.kubectl(&["set", "image", "deployment/web", "c=busybox:3"]);
    let rs_count = || {
        c.kubectl(&["get", "rs", "-l", "app=web", "-o", "name"])
            .lines()
            .count()
    };
    // The paused controller has observed the change and made no new ReplicaSet.
    c.eventually("paused deployment observed", || {
        let gen = get(&c, &["get", "deploy", "web"], "{.metadata.generation}");
        (get(
            &c,
            &["get", "deploy", "web"],
            "{.status.observedGeneration}",
        ) == gen)
            .then_some(())
    });
    assert_eq!(rs_count(), 2);
    c.kubectl(&["rollout", "resume", "deployment/web"]);
    rollout_done(&c, "web");
    assert_eq!(rs_count(), 3);
    // Restart: a new template annotation, a new ReplicaSet.
    c.kubectl(&["rollout", "restart", "deployment/web"]);
    rollout_done(&c, "web");
    assert_eq!(rs_count(), 4);
    let restarted = get(
        &c,
        &["get", "deploy", "web"],
        "{.spec.template.metadata.annotations.kubectl\\.kubernetes\\.io/restartedAt}",
    );
    assert!(!restarted.is_empty());
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=web",
    ]);
    assert!(events.contains("ScalingReplicaSet"), "{events}");
}

#[test]
fn a_deployment_past_its_progress_deadline_says_so() {
    let c = Cluster::start();
    let _nodes = c.hollow(1, "node-", &[]);
    // Pods that never become ready (a hollow-node hook), a short deadline.
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: stuck}\nspec:\n  replicas: 2\n  progressDeadlineSeconds: 2\n  selector: {matchLabels: {app: stuck}}\n  template:\n    metadata: {labels: {app: stuck}, annotations: {hollow.rkube.io/ready: \"false\"}}\n    spec: {containers: [{name: c, image: busybox}]}\n",
    );
    c.eventually("ProgressDeadlineExceeded", || {
        let cond = get(&c, &["get", "deploy", "stuck"], "{.status.conditions[?(@.type==\"Progressing\")].status}/{.status.conditions[?(@.type==\"Progressing\")].reason}");
        (cond == "False/ProgressDeadlineExceeded").then_some(())
    });
    let out = c.kubectl_output(&["rollout", "status", "deployment/stuck", "--timeout=30s"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exceeded its progress deadline"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn recreate_deployments_stop_old_pods_before_starting_new_ones() {
    let c = Cluster::start();
    let _nodes = c.hollow(2, "node-", &[]);
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: re}\nspec:\n  replicas: 3\n  strategy: {type: Recreate}\n  selector: {matchLabels: {app: re}}\n  template:\n    metadata: {labels: {app: re}}\n    spec: {containers: [{name: c, image: busybox:1}]}\n",
    );
    rollout_done(&c, "re");
    let seen = monitor(&c, "app=re");
    arm(&c, &seen, 3);
    c.kubectl(&["set", "image", "deployment/re", "c=busybox:2"]);
    rollout_done(&c, "re");
    let s = seen.lock().unwrap();
    assert!(s.max_active <= 3, "{s:?}");
    assert_eq!(s.min_ready, 0, "Recreate goes through zero: {s:?}");
}

#[test]
fn daemon_sets_follow_nodes_joining_leaving_and_tainted() {
    let c = Cluster::start();
    let _a = c.hollow(2, "a-", &[]);
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec: {containers: [{name: c, image: busybox:1}]}\n",
    );
    let on_nodes = |c: &Cluster| -> Vec<String> {
        let mut v = c.live_pods(&["-l", "app=agent"], "{.spec.nodeName}");
        v.sort();
        v
    };
    let want = |c: &Cluster, nodes: &[&str]| {
        c.eventually(&format!("daemons on {nodes:?}"), || {
            (on_nodes(c) == nodes).then_some(())
        });
    };
    want(&c, &["a-0", "a-1"]);
    // A node joins.
    let mut b = c.hollow(1, "b-", &[]);
    want(&c, &["a-0", "a-1", "b-0"]);
    // A NoExecute taint the template does not tolerate: the daemon leaves; untainted, it returns.
    c.kubectl(&["taint", "node", "a-1", "dedicated=x:NoExecute"]);
    want(&c, &["a-0", "b-0"]);
    c.kubectl(&["taint", "node", "a-1", "dedicated-"]);
    want(&c, &["a-0", "a-1", "b-0"]);
    // A cordoned node keeps its daemon (daemons tolerate unschedulable).
    c.kubectl(&["cordon", "a-0"]);
    // A node leaves: its pods go with it.
    b.kill();
    c.kubectl(&["delete", "node", "b-0"]);
    want(&c, &["a-0", "a-1"]);
    c.eventually("status", || {
        (get(&c, &["get", "ds", "agent"], "{.status.desiredNumberScheduled}/{.status.currentNumberScheduled}/{.status.numberReady}/{.status.updatedNumberScheduled}") == "2/2/2/2").then_some(())
    });
    // A rolling update replaces every daemon, and history holds both revisions.
    c.kubectl(&["set", "image", "ds/agent", "c=busybox:2"]);
    c.kubectl(&["rollout", "status", "ds/agent", "--timeout=60s"]);
    c.eventually("new image everywhere", || {
        let imgs = c.pod_images("app=agent");
        (imgs.split_whitespace().count() == 2 && imgs.split_whitespace().all(|i| i == "busybox:2"))
            .then_some(())
    });
    let revisions = c.kubectl(&["get", "controllerrevisions", "-o", "name"]);
    assert_eq!(revisions.lines().count(), 2, "{revisions}");
    // OnDelete: a template change waits for pods to be deleted by hand.
    c.kubectl(&[
        "patch",
        "ds",
        "agent",
        "-p",
        "{\"spec\":{\"updateStrategy\":{\"type\":\"OnDelete\",\"rollingUpdate\":null}}}",
    ]);
    c.kubectl(&["set", "image", "ds/agent", "c=busybox:3"]);
    c.eventually("observed", || {
        let gen = get(&c, &["get", "ds", "agent"], "{.metadata.generation}");
        (get(&c, &["get", "ds", "agent"], "{.status.observedGeneration}") == gen).then_some(())
    });
    let imgs = c.pod_images("app=agent");
    assert!(imgs.split_whitespace().all(|i| i == "busybox:2"), "{imgs}");
}

#[test]
fn endpoints_and_slices_follow_pod_readiness() {
    let c = Cluster::start();
    let _nodes = c.hollow(2, "node-", &["--zones", "z1,z2"]);
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: busybox, ports: [{name: http, containerPort: 8080}]}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http}]\n",
    );
    rollout_done(&c, "web");
    let ready_ips = |c: &Cluster| {
        get(
            c,
            &["get", "endpoints", "web"],
            "{.subsets[*].addresses[*].ip}",
        )
    };
    let not_ready = |c: &Cluster| {
        get(
            c,
            &["get", "endpoints", "web"],
            "{.subsets[*].notReadyAddresses[*].ip}",
        )
    };
    c.eventually("three ready endpoints on the named port", || {
        let ports = get(
            &c,
            &["get", "endpoints", "web"],
            "{.subsets[*].ports[*].port}",
        );
        (ready_ips(&c).split_whitespace().count() == 3 && ports == "8080").then_some(())
    });
    let slice = |c: &Cluster, path: &str| {
        c.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    c.eventually("a slice with three ready endpoints and zones", || {
        let ready = slice(&c, "{.items[*].endpoints[*].conditions.ready}");
        let zones = slice(&c, "{.items[*].endpoints[*].zone}");
        (ready.split_whitespace().filter(|r| *r == "true").count() == 3 && zones.contains('z'))
            .then_some(())
    });
    // A pod stops being ready: it moves to notReadyAddresses and its slice endpoint says so.
    let pod = pods(&c, "app=web")[0].clone();
    let ip = get(&c, &["get", "pod", &pod], "{.status.podIP}");
    c.kubectl(&["annotate", "pod", &pod, "hollow.rkube.io/ready=false"]);
    c.eventually("not ready address", || {
        (not_ready(&c) == ip && ready_ips(&c).split_whitespace().count() == 2).then_some(())
    });
    c.eventually("slice endpoint not ready", || {
        (slice(
            &c,
            "{.items[*].endpoints[?(@.conditions.ready==false)].addresses[0]}",
        ) == ip)
            .then_some(())
    });
    // publishNotReadyAddresses puts it back among the addresses.
    c.kubectl(&[
        "patch",
        "svc",
        "web",
        "-p",
        "{\"spec\":{\"publishNotReadyAddresses\":true}}",
    ]);
    c.eventually("published not ready", || {
        (ready_ips(&c).split_whitespace().count() == 3 && not_ready(&c).is_empty()).then_some(())
    });
    // Scaled down: fewer endpoints. The Service gone: its Endpoints and slices too.
    c.kubectl(&["scale", "deploy", "web", "--replicas=1"]);
    c.eventually("one endpoint", || {
        (ready_ips(&c).split_whitespace().count() == 1).then_some(())
    });
    c.kubectl(&["delete", "svc", "web"]);
    c.eventually("endpoints gone", || {
        (!c.kubectl_output(&["get", "endpoints", "web"])
            .status
            .success()
            && slice(&c, "{.items[*].metadata.name}").is_empty())
        .then_some(())
    });
    // The API server's own endpoints.
    let k = get(
        &c,
        &["get", "endpoints", "kubernetes"],
        "{.subsets[0].ports[0].port}",
    );
    assert_eq!(k, c.server_url().rsplit(':').next().unwrap());
}

#[test]
fn deletion_propagates_in_background_foreground_and_orphan_modes() {
    let c = Cluster::start();
    let _nodes = c.hollow(2, "node-", &[]);
    let rs = |name: &str| {
        format!("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {{name: {name}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: c, image: busybox}}]}}\n")
    };
    // Background: the owner goes at once, its pods after.
    c.apply_yaml(&rs("bg"));
    wait_pods(&c, "app=bg", 2);
    c.kubectl(&["delete", "rs", "bg", "--cascade=background", "--wait=false"]);
    c.eventually("bg pods collected", || {
        pods(&c, "app=bg").is_empty().then_some(())
    });

    // Foreground: the owner stays (foregroundDeletion) until its blocking dependents are gone.
    c.apply_yaml(&rs("fg"));
    let fg = wait_pods(&c, "app=fg", 2);
    c.kubectl(&[
        "patch",
        "pod",
        &fg[0],
        "--type=merge",
        "-p",
        "{\"metadata\":{\"finalizers\":[\"test.rkube.io/hold\"]}}",
    ]);
    c.kubectl(&["delete", "rs", "fg", "--cascade=foreground", "--wait=false"]);
    c.eventually("owner waiting on its dependents", || {
        let f = get(&c, &["get", "rs", "fg"], "{.metadata.finalizers}");
        let held = get(&c, &["get", "pod", &fg[0]], "{.metadata.deletionTimestamp}");
        (f.contains("foregroundDeletion") && !held.is_empty()).then_some(())
    });
    c.kubectl(&[
        "patch",
        "pod",
        &fg[0],
        "--type=merge",
        "-p",
        "{\"metadata\":{\"finalizers\":null}}",
    ]);
    c.eventually("owner gone after its dependents", || {
        (!c.kubectl_output(&["get", "rs", "fg"]).status.success()).then_some(())
    });
    assert!(!c.kubectl_output(&["get", "pod", &fg[0]]).status.success());

    // Orphan: the owner goes, the pods stay without the reference.
    c.apply_yaml(&rs("or"));
    let or = wait_pods(&c, "app=or", 2);
    c.kubectl(&["delete", "rs", "or", "--cascade=orphan"]);
    c.eventually("orphans", || {
        let owners = c.kubectl(&[
            "get",
            "pods",
            "-l",
            "app=or",
            "-o",
            "jsonpath={.items[*].metadata.ownerReferences}",
        ]);
        (owners.trim().is_empty() && !c.kubectl_output(&["get", "rs", "or"]).status.success())
            .then_some(())
    });
    assert_eq!(pods(&c, "app=or").len(), or.len());

    // A dangling owner (never existed): the dependent is collected.
    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dangling\n  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: ghost, uid: 00000000-0000-0000-0000-000000000001}]\n");
    c.eventually("dangling dependent collected", || {
        (!c.kubectl_output(&["get", "configmap", "dangling"])
            .status
            .success())
        .then_some(())
    });
    // One live owner keeps a dependent; the dangling reference is dropped.
    c.kubectl(&["create", "configmap", "owner"]);
    let uid = get(&c, &["get", "configmap", "owner"], "{.metadata.uid}");
    c.apply_yaml(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: two-owners\n  ownerReferences:\n  - {{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}}}\n  - {{apiVersion: v1, kind: ConfigMap, name: ghost, uid: 00000000-0000-0000-0000-000000000002}}\n"));
    c.eventually("dangling reference dropped", || {
        (get(
            &c,
            &["get", "configmap", "two-owners"],
            "{.metadata.ownerReferences[*].name}",
        ) == "owner")
            .then_some(())
    });
    // A cycle: a owns b, b owns a; deleting one collects both.
    c.kubectl(&["create", "configmap", "cyc-a"]);
    c.kubectl(&["create", "configmap", "cyc-b"]);
    let ua = get(&c, &["get", "configmap", "cyc-a"], "{.metadata.uid}");
    let ub = get(&c, &["get", "configmap", "cyc-b"], "{.metadata.uid}");
    c.kubectl(&["patch", "configmap", "cyc-a", "--type=merge", "-p", &format!("{{\"metadata\":{{\"ownerReferences\":[{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"name\":\"cyc-b\",\"uid\":\"{ub}\"}}]}}}}")]);
    c.kubectl(&["patch", "configmap", "cyc-b", "--type=merge", "-p", &format!("{{\"metadata\":{{\"ownerReferences\":[{{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"name\":\"cyc-a\",\"uid\":\"{ua}\"}}]}}}}")]);
    c.kubectl(&["delete", "configmap", "cyc-a"]);
    c.eventually("cycle collected", || {
        (!c.kubectl_output(&["get", "configmap", "cyc-b"])
            .status
            .success())
        .then_some(())
    });
}

#[test]
fn deleting_a_namespace_deletes_everything_in_it() {
    let c = Cluster::start();
    let _nodes = c.hollow(1, "node-", &[]);
    c.kubectl(&["create", "namespace", "team"]);
    c.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=2",
        "-n",
        "team",
    ]);
    c.kubectl(&["create", "configmap", "cfg", "-n", "team"]);
    c.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: team}\nspec:\n  selector: {app: web}\n  ports: [{port: 80}]\n");
    c.eventually("pods running", || {
        (c.kubectl(&["get", "pods", "-n", "team", "-o", "name"])
            .lines()
            .count()
            == 2)
            .then_some(())
    });
    c.kubectl(&["delete", "namespace", "team", "--timeout=60s"]);
    assert!(!c
        .kubectl_output(&["get", "namespace", "team"])
        .status
        .success());
    for kind in [
        "deployments",
        "replicasets",
        "pods",
        "configmaps",
        "services",
        "endpoints",
    ] {
        let left = c.kubectl(&["get", kind, "-n", "team", "-o", "name"]);
        assert!(left.trim().is_empty(), "{kind} left: {left}");
    }
}

#[test]
fn draining_a_node_moves_its_pods_and_keeps_its_daemons() {
    let c = Cluster::start();
    let _nodes = c.hollow(2, "node-", &[]);
    c.apply_yaml(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec: {containers: [{name: c, image: busybox}]}\n",
    );
    c.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=busybox",
        "--replicas=4",
    ]);
    rollout_done(&c, "web");
    c.eventually("two daemons", || {
        (pods(&c, "app=agent").len() == 2).then_some(())
    });
    let on = |c: &Cluster, sel: &str, node: &str| {
        c.live_pods(
            &[
                "-l",
                sel,
                "--field-selector",
                &format!("spec.nodeName={node}"),
            ],
            "{.metadata.name}",
        )
        .len()
    };
    // kubectl drain: cordon, then delete (this server has no eviction subresource, so kubectl
    // falls back to deletes with protobuf DeleteOptions).
    let out = c.kubectl(&["drain", "node-0", "--ignore-daemonsets", "--timeout=60s"]);
    assert!(out.contains("node/node-0 drained"), "{out}");
    c.eventually("web pods moved to node-1", || {
        (on(&c, "app=web", "node-0") == 0 && on(&c, "app=web", "node-1") == 4).then_some(())
    });
    assert_eq!(on(&c, "app=agent", "node-0"), 1, "the daemon stays");
    let st = c.kubectl(&["get", "node", "node-0", "--no-headers"]);
    assert!(st.contains("SchedulingDisabled"), "{st}");
    c.kubectl(&["uncordon", "node-0"]);
}
