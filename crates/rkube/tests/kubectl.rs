//! The real kubectl against a real `rkube server`: every check reads what kubectl printed or the
//! object that resulted, not only the exit status.

mod common;

use common::Cluster;
use serde_json::Value;

const MANIFEST: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web, tier: front}
spec:
  containers:
  - name: c
    image: busybox:1.36
    ports: [{containerPort: 80}]
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  labels: {app: db}
spec:
  containers: [{name: c, image: busybox}]
---
apiVersion: v1
kind: Service
metadata:
  name: websvc
spec:
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: dep
spec:
  replicas: 2
  selector: {matchLabels: {app: d}}
  template:
    metadata: {labels: {app: d}}
    spec:
      containers: [{name: c, image: busybox}]
"#;

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Split a kubectl table into rows of whitespace-separated cells (header first).
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn discovery_version_and_cluster_info() {
    let c = Cluster::start();
    let v = json(&c.kubectl(&["version", "-o", "json"]));
    assert_eq!(v["serverVersion"]["major"], "1");
    assert_eq!(v["serverVersion"]["minor"], "33");

    let res = c.kubectl(&["api-resources"]);
    let table = rows(&res);
    assert_eq!(table[0][..2], ["NAME", "SHORTNAMES"]);
    for (name, short, kind) in [
        ("pods", "po", "Pod"),
        ("deployments", "deploy", "Deployment"),
        ("namespaces", "ns", "Namespace"),
        ("priorityclasses", "pc", "PriorityClass"),
    ] {
        assert!(
            table.iter().any(|r| r[0] == name
                && r[1] == short
                && r.last().map(String::as_str) == Some(kind)),
            "{name} missing from api-resources:\n{res}"
        );
    }
    let namespaced = c.kubectl(&["api-resources", "--namespaced=false", "-o", "name"]);
    assert!(namespaced.lines().any(|l| l == "nodes"));
    assert!(!namespaced.lines().any(|l| l == "pods"));
    let all = c.kubectl(&["api-resources", "--categories=all", "-o", "name"]);
    for r in ["pods", "services", "deployments.apps", "replicasets.apps"] {
        assert!(
            all.lines().any(|l| l == r),
            "{r} not in category all: {all}"
        );
    }

    let versions = c.kubectl(&["api-versions"]);
    for gv in [
        "v1",
        "apps/v1",
        "coordination.k8s.io/v1",
        "discovery.k8s.io/v1",
        "events.k8s.io/v1",
        "scheduling.k8s.io/v1",
    ] {
        assert!(
            versions.lines().any(|l| l == gv),
            "{gv} missing: {versions}"
        );
    }
    let info = c.kubectl(&["cluster-info"]);
    assert!(
        info.contains("Kubernetes control plane is running at https://127.0.0.1:"),
        "{info}"
    );

    let ns = c.kubectl(&["get", "ns", "-o", "name"]);
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(ns.lines().any(|l| l == format!("namespace/{n}")), "{ns}");
    }

    // Reviews are create-only in discovery, as upstream.
    let listable = c.kubectl(&["api-resources", "--verbs=list", "-o", "name"]);
    assert!(!listable.contains("selfsubjectaccessreviews"), "{listable}");

    // /metrics counts requests as upstream's apiserver_request_total does.
    c.kubectl(&["create", "configmap", "counted"]);
    let _ = c.kubectl_fails(&["create", "configmap", "counted"]);
    let metrics = c.kubectl(&["get", "--raw", "/metrics"]);
    let count = |code: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("apiserver_request_total{")
                    && l.contains("verb=\"POST\"")
                    && l.contains("resource=\"configmaps\"")
                    && l.contains(&format!("code=\"{code}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(count("201") >= 1, "{metrics}");
    assert_eq!(count("409"), 1, "{metrics}");
}

#[test]
fn create_get_and_printing() {
    let c = Cluster::start_with(0, &["--disable", "controller-manager"]);
    let out = c.apply_yaml(MANIFEST);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "pod/web created",
            "pod/db created",
            "service/websvc created",
            "deployment.apps/dep created"
        ]
    );
    // A directory of manifests.
    let dir = c.data_dir().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm-a}\ndata: {k: v}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.json"),
        r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm-b"}}"#,
    )
    .unwrap();
    let out = c.kubectl(&["create", "-f", dir.to_str().unwrap()]);
    assert!(
        out.contains("configmap/cm-a created") && out.contains("configmap/cm-b created"),
        "{out}"
    );
    let again = c.kubectl_fails(&["create", "-f", dir.to_str().unwrap()]);
    assert!(
        again.contains("AlreadyExists") && again.contains("\"cm-a\" already exists"),
        "{again}"
    );

    // Default table.
    let t = rows(&c.kubectl(&["get", "pods"]));
    assert_eq!(t[0], ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert_eq!(t[1][..4], ["db", "0/1", "Pending", "0"]);
    assert_eq!(t[2][..4], ["web", "0/1", "Pending", "0"]);
    // Wide.
    let wide = c.kubectl(&["get", "pods", "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().contains("NOMINATED NODE"),
        "{wide}"
    );
    // Services, deployments.
    let svc = rows(&c.kubectl(&["get", "svc", "websvc"]));
    assert_eq!(
        svc[0],
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    assert_eq!(svc[1][1], "ClusterIP");
    assert_eq!(svc[1][4], "80/TCP");
    let dep = rows(&c.kubectl(&["get", "deploy"]));
    assert_eq!(dep[1][..4], ["dep", "0/2", "0", "0"]);
    let cms = rows(&c.kubectl(&["get", "cm", "cm-a"]));
    assert_eq!(cms[1][..2], ["cm-a", "1"]);

    // YAML and JSON carry server-set metadata and defaults.
    let pod = json(&c.kubectl(&["get", "pod", "web", "-o", "json"]));
    assert!(!pod["metadata"]["uid"].as_str().unwrap().is_empty());
    assert!(
        pod["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 0
    );
    assert_eq!(pod["spec"]["restartPolicy"], "Always");
    assert_eq!(
        pod["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(pod["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(pod["status"]["qosClass"], "BestEffort");
    let yaml = c.kubectl(&["get", "deploy", "dep", "-o", "yaml"]);
    assert!(
        yaml.contains("maxSurge: 25%") && yaml.contains("generation: 1"),
        "{yaml}"
    );

    // jsonpath, name, custom-columns.
    assert_eq!(
        c.kubectl(&["get", "pods", "-o", "jsonpath={.items[*].metadata.name}"]),
        "db web"
    );
    assert_eq!(
        c.kubectl(&["get", "pods", "-o", "name"]),
        "pod/db\npod/web\n"
    );
    let cc = rows(&c.kubectl(&[
        "get",
        "pods",
        "-o",
        "custom-columns=N:.metadata.name,IMG:.spec.containers[0].image",
    ]));
    assert_eq!(
        cc,
        [
            vec!["N", "IMG"],
            vec!["db", "busybox"],
            vec!["web", "busybox:1.36"]
        ]
    );

    // -A, -l, --field-selector, --show-labels, --sort-by.
    let all = rows(&c.kubectl(&["get", "pods", "-A"]));
    assert_eq!(all[0][..2], ["NAMESPACE", "NAME"]);
    assert_eq!(all[1][..2], ["default", "db"]);
    assert_eq!(
        c.kubectl(&["get", "pods", "-l", "app=web", "-o", "name"]),
        "pod/web\n"
    );
    assert_eq!(
        c.kubectl(&[
            "get",
            "pods",
            "-l",
            "app in (web,db),tier!=front",
            "-o",
            "name"
        ]),
        "pod/db\n"
    );
    assert_eq!(
        c.kubectl(&["get", "pods", "-l", "!tier", "-o", "name"]),
        "pod/db\n"
    );
    assert_eq!(
        c.kubectl(&[
            "get",
            "pods",
            "--field-selector",
            "metadata.name=web",
            "-o",
            "name"
        ]),
        "pod/web\n"
    );
    assert_eq!(
        c.kubectl(&[
            "get",
            "pods",
            "--field-selector",
            "status.phase=Running",
            "-o",
            "name"
        ]),
        ""
    );
    let bad = c.kubectl_fails(&["get", "pods", "--field-selector", "spec.bogus=1"]);
    assert!(
        bad.contains("BadRequest") && bad.contains("field label not supported"),
        "{bad}"
    );
    let labels = c.kubectl(&["get", "pods", "--show-labels"]);
    assert!(
        labels
            .lines()
            .any(|l| l.starts_with("web") && l.ends_with("app=web,tier=front")),
        "{labels}"
    );
    c.kubectl(&["label", "pod", "db", "rank=1"]);
    c.kubectl(&["label", "pod", "web", "rank=2"]);
    let sorted = c.kubectl(&[
        "get",
        "pods",
        "--sort-by=.metadata.labels.rank",
        "-o",
        "name",
    ]);
    assert_eq!(sorted, "pod/db\npod/web\n");
    let sorted = c.kubectl(&[
        "get",
        "pods",
        "--sort-by=.spec.containers[0].image",
        "-o",
        "name",
    ]);
    assert_eq!(sorted, "pod/db\npod/web\n");

    // get all.
    let all = c.kubectl(&["get", "all"]);
    for needle in ["pod/web", "pod/db", "service/websvc", "deployment.apps/dep"] {
        assert!(all.contains(needle), "{needle} not in get all:\n{all}");
    }
    // Not found.
    let nf = c.kubectl_fails(&["get", "pod", "nope"]);
    assert!(
        nf.contains("Error from server (NotFound): pods \"nope\" not found"),
        "{nf}"
    );
}

#[test]
fn paging_with_chunks() {
    let c = Cluster::start();
    let mut yaml = String::new();
    for i in 0..25 {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:02}}}\n---\n"
        ));
    }
    c.apply_yaml(&yaml);
    let names = c.kubectl(&["get", "cm", "--chunk-size=4", "-o", "name"]);
    let got: Vec<&str> = names.lines().collect();
    let want: Vec<String> = (0..25).map(|i| format!("configmap/cm-{i:02}")).collect();
    assert_eq!(got, want);
    let t = rows(&c.kubectl(&["get", "cm", "--chunk-size=7"]));
    assert_eq!(t.len(), 26, "header + 25 rows");
}

#[test]
fn watch_sees_added_modified_deleted() {
    let c = Cluster::start();
    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: first}\n");
    let mut w = c.kubectl_stream(&["get", "configmaps", "-w", "--output-watch-events"]);
    w.expect_line(&["ADDED", "first"]);
    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: second}\n");
    w.expect_line(&["ADDED", "second"]);
    c.kubectl(&["label", "cm", "second", "x=y"]);
    w.expect_line(&["MODIFIED", "second"]);
    c.kubectl(&["delete", "cm", "second"]);
    w.expect_line(&["DELETED", "second"]);

    // One object, by name; and a label-selected watch sees objects leave the selection.
    let mut one = c.kubectl_stream(&["get", "cm", "first", "-w", "-o", "name"]);
    one.expect_line(&["configmap/first"]);
    let mut sel = c.kubectl_stream(&["get", "cm", "-l", "keep=yes", "-w", "--output-watch-events"]);
    c.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: third, labels: {keep: \"yes\"}}\n",
    );
    sel.expect_line(&["ADDED", "third"]);
    c.kubectl(&["label", "cm", "third", "keep=no", "--overwrite"]);
    sel.expect_line(&["DELETED", "third"]);
}

#[test]
fn label_annotate_patch_replace() {
    let c = Cluster::start_with(0, &["--disable", "controller-manager"]);
    c.apply_yaml(MANIFEST);
    assert_eq!(
        c.kubectl(&["label", "pod", "web", "env=prod"]),
        "pod/web labeled\n"
    );
    let err = c.kubectl_fails(&["label", "pod", "web", "env=dev"]);
    assert!(err.contains("already has a value (prod)"), "{err}");
    c.kubectl(&["label", "pod", "web", "env=dev", "--overwrite"]);
    c.kubectl(&["label", "pod", "web", "tier-"]);
    c.kubectl(&["annotate", "pod", "web", "note=hello"]);
    let pod = json(&c.kubectl(&["get", "pod", "web", "-o", "json"]));
    assert_eq!(
        pod["metadata"]["labels"],
        serde_json::json!({"app": "web", "env": "dev"})
    );
    assert_eq!(pod["metadata"]["annotations"]["note"], "hello");

    let rv_before: i64 = pod["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    c.kubectl(&[
        "patch",
        "deploy",
        "dep",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":5,"template":{"spec":{"terminationGracePeriodSeconds":5}}}}"#,
    ]);
    let dep = json(&c.kubectl(&["get", "deploy", "dep", "-o", "json"]));
    assert_eq!(dep["spec"]["replicas"], 5);
    assert_eq!(
        dep["metadata"]["generation"], 2,
        "a spec change bumps the generation"
    );
    c.kubectl(&["patch", "deploy", "dep", "--type", "json", "-p", r#"[{"op":"replace","path":"/spec/replicas","value":3},{"op":"add","path":"/metadata/labels","value":{"p":"j"}}]"#]);
    let dep = json(&c.kubectl(&["get", "deploy", "dep", "-o", "json"]));
    assert_eq!(dep["spec"]["replicas"], 3);
    assert_eq!(dep["metadata"]["labels"]["p"], "j");
    assert_eq!(dep["metadata"]["generation"], 3);
    // A metadata-only change does not bump it.
    c.kubectl(&["label", "deploy", "dep", "q=1"]);
    let dep = json(&c.kubectl(&["get", "deploy", "dep", "-o", "json"]));
    assert_eq!(dep["metadata"]["generation"], 3);
    // Status is its own subresource: the main resource ignores it.
    c.kubectl(&[
        "patch",
        "deploy",
        "dep",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"replicas":7}}"#,
    ]);
    assert_eq!(
        c.kubectl(&["get", "deploy", "dep", "-o", "jsonpath={.status.replicas}"]),
        ""
    );
    c.kubectl(&[
        "patch",
        "deploy",
        "dep",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"replicas":7},"spec":{"replicas":9}}"#,
    ]);
    assert_eq!(
        c.kubectl(&[
            "get",
            "deploy",
            "dep",
            "-o",
            "jsonpath={.status.replicas} {.spec.replicas}"
        ]),
        "7 3"
    );

    let bad = c.kubectl_fails(&[
        "patch",
        "pod",
        "web",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/spec/nope"}]"#,
    ]);
    assert!(
        bad.contains("The request is invalid") && bad.contains("/spec/nope"),
        "{bad}"
    );
    let nf = c.kubectl_fails(&["patch", "pod", "nope", "--type", "merge", "-p", "{}"]);
    assert!(nf.contains("NotFound"), "{nf}");

    // replace: a full object, with its resourceVersion as a precondition.
    let mut cm = json(&{
        c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: r}\ndata: {a: \"1\"}\n");
        c.kubectl(&["get", "cm", "r", "-o", "json"])
    });
    cm["data"]["a"] = "2".into();
    let out = c.kubectl_stdin(&["replace", "-f", "-"], &cm.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "configmap/r replaced\n"
    );
    // The same (now stale) resourceVersion again: 409.
    cm["data"]["a"] = "3".into();
    let out = c.kubectl_stdin(&["replace", "-f", "-"], &cm.to_string());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Conflict") && err.contains("the object has been modified"),
        "{err}"
    );
    assert_eq!(
        c.kubectl(&["get", "cm", "r", "-o", "jsonpath={.data.a}"]),
        "2"
    );
    let _ = rv_before;
}

#[test]
fn describe_with_events() {
    let c = Cluster::start();
    c.apply_yaml(MANIFEST);
    c.apply_yaml(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-1, labels: {kubernetes.io/hostname: node-1}}\nstatus:\n  capacity: {cpu: \"4\", memory: 8Gi, pods: \"110\"}\n  allocatable: {cpu: \"4\", memory: 8Gi, pods: \"110\"}\n  conditions: [{type: Ready, status: \"True\", reason: KubeletReady, message: ok}]\n  addresses: [{type: InternalIP, address: 10.0.0.1}]\n",
    );
    let uid = c.kubectl(&["get", "pod", "web", "-o", "jsonpath={.metadata.uid}"]);
    c.apply_yaml(&format!(
        "apiVersion: v1\nkind: Event\nmetadata: {{name: web.1}}\ninvolvedObject: {{kind: Pod, name: web, namespace: default, uid: {uid}, apiVersion: v1}}\nreason: Testing\nmessage: something happened to web\ntype: Normal\nsource: {{component: e2e}}\ncount: 1\nfirstTimestamp: \"2026-01-01T00:00:00Z\"\nlastTimestamp: \"2026-01-01T00:00:00Z\"\n"
    ));
    let d = c.kubectl(&["describe", "pod", "web"]);
    for needle in [
        "Name:         web",
        "Namespace:    default",
        "app=web",
        "Image:        busybox:1.36",
        "Port:         80/TCP",
        "BestEffort",
        "Testing",
        "something happened to web",
    ] {
        assert!(d.contains(needle), "describe pod lacks {needle:?}:\n{d}");
    }
    let n = c.kubectl(&["describe", "node", "node-1"]);
    for needle in [
        "Name:               node-1",
        "kubernetes.io/hostname=node-1",
        "InternalIP:  10.0.0.1",
        "KubeletReady",
    ] {
        assert!(n.contains(needle), "describe node lacks {needle:?}:\n{n}");
    }
    let s = c.kubectl(&["describe", "service", "websvc"]);
    for needle in [
        "Name:",
        "websvc",
        "Selector:",
        "app=web",
        "Type:",
        "ClusterIP",
        "80/TCP",
    ] {
        assert!(s.contains(needle), "describe svc lacks {needle:?}:\n{s}");
    }
    let ev = rows(&c.kubectl(&["get", "events"]));
    assert_eq!(ev[0][..4], ["LAST", "SEEN", "TYPE", "REASON"]);
    assert!(
        ev.iter()
            .any(|r| r.contains(&"Testing".to_string()) && r.contains(&"pod/web".to_string())),
        "{ev:?}"
    );
    let fs = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=web,reason=Testing",
        "-o",
        "name",
    ]);
    assert_eq!(fs, "event/web.1\n");
    let nodes = rows(&c.kubectl(&["get", "nodes", "-o", "wide"]));
    assert_eq!(nodes[1][..2], ["node-1", "Ready"]);
}

#[test]
fn delete_in_every_form() {
    let c = Cluster::start();
    c.apply_yaml(MANIFEST);
    assert_eq!(
        c.kubectl(&["delete", "pod", "web"]),
        "pod \"web\" deleted\n"
    );
    c.kubectl_fails(&["get", "pod", "web"]);
    let nf = c.kubectl_fails(&["delete", "pod", "web"]);
    assert!(nf.contains("NotFound"), "{nf}");
    assert_eq!(
        c.kubectl(&["delete", "pod", "web", "--ignore-not-found"]),
        ""
    );

    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, labels: {grp: x}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b, labels: {grp: x}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n");
    let out = c.kubectl(&["delete", "cm", "-l", "grp=x"]);
    assert!(
        out.contains("configmap \"a\" deleted") && out.contains("configmap \"b\" deleted"),
        "{out}"
    );
    assert_eq!(c.kubectl(&["get", "cm", "-o", "name"]), "configmap/c\n");
    c.kubectl(&["delete", "cm", "--all"]);
    assert_eq!(c.kubectl(&["get", "cm", "-o", "name"]), "");

    c.kubectl(&["delete", "pod", "db", "--wait=true"]);
    // The node the next pods are bound to exists (pod GC deletes pods of missing nodes).
    c.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: somewhere}\n");
    c.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: forced}\nspec:\n  nodeName: somewhere\n  containers: [{name: c, image: busybox}]\n");
    let out = c.kubectl_output(&["delete", "pod", "forced", "--grace-period=0", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Immediate deletion does not wait"));
    c.kubectl_fails(&["get", "pod", "forced"]);

    // A bound pod is deleted gracefully: it stays, marked, until its node finishes it.
    c.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: graceful}\nspec:\n  nodeName: somewhere\n  containers: [{name: c, image: busybox}]\n");
    c.kubectl(&["delete", "pod", "graceful", "--wait=false"]);
    let pod = json(&c.kubectl(&["get", "pod", "graceful", "-o", "json"]));
    assert!(pod["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 30);
    assert!(c
        .kubectl(&["get", "pod", "graceful"])
        .contains("Terminating"));
    c.kubectl(&["delete", "pod", "graceful", "--grace-period=0", "--force"]);
    c.kubectl_fails(&["get", "pod", "graceful"]);

    // Finalizers hold an object until they are removed.
    c.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, finalizers: [example.com/hold]}\n",
    );
    c.kubectl(&["delete", "cm", "held", "--wait=false"]);
    let cm = json(&c.kubectl(&["get", "cm", "held", "-o", "json"]));
    assert!(cm["metadata"]["deletionTimestamp"].is_string());
    c.kubectl(&[
        "patch",
        "cm",
        "held",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    c.kubectl_fails(&["get", "cm", "held"]);

    // Server-side dry run never persists.
    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: dry}\n");
    c.kubectl(&["delete", "cm", "dry", "--dry-run=server"]);
    c.kubectl(&["get", "cm", "dry"]);
}

#[test]
fn wait_for_condition_delete_and_jsonpath() {
    let c = Cluster::start();
    c.apply_yaml(MANIFEST);
    let mut waiter =
        c.kubectl_stream(&["wait", "pod/web", "--for=condition=Ready", "--timeout=60s"]);
    c.kubectl(&[
        "patch",
        "pod",
        "web",
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    waiter.expect_line(&["pod/web condition met"]);
    assert!(waiter.wait_exit());

    let mut jp = c.kubectl_stream(&[
        "wait",
        "deploy/dep",
        "--for=jsonpath={.spec.replicas}=4",
        "--timeout=60s",
    ]);
    c.kubectl(&[
        "patch",
        "deploy",
        "dep",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":4}}"#,
    ]);
    jp.expect_line(&["deployment.apps/dep condition met"]);
    assert!(jp.wait_exit());

    c.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, finalizers: [example.com/hold]}\n",
    );
    c.kubectl(&["delete", "cm", "held", "--wait=false"]);
    let mut del = c.kubectl_stream(&["wait", "cm/held", "--for=delete", "--timeout=60s"]);
    c.kubectl(&[
        "patch",
        "cm",
        "held",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    // If the object is gone before kubectl looks, kubectl exits 0 without a line: both are fine.
    assert!(del.wait_exit());
    c.kubectl_fails(&["get", "cm", "held"]);
}

#[test]
fn namespace_lifecycle() {
    let c = Cluster::start();
    c.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n");
    let ns = json(&c.kubectl(&["get", "ns", "team", "-o", "json"]));
    assert_eq!(ns["status"]["phase"], "Active");
    assert_eq!(ns["spec"]["finalizers"], serde_json::json!(["kubernetes"]));
    let out = c.kubectl_stdin(&["create", "-n", "team", "-f", "-"], MANIFEST);
    assert!(out.status.success());
    // Something that holds the namespace in Terminating until we let go.
    c.kubectl_stdin(
        &["create", "-n", "team", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, finalizers: [example.com/hold]}\n",
    );

    c.kubectl(&["delete", "ns", "team", "--wait=false"]);
    c.eventually("namespace Terminating", || {
        (c.kubectl(&["get", "ns", "team", "-o", "jsonpath={.status.phase}"]) == "Terminating")
            .then_some(())
    });
    let out = c.kubectl_stdin(
        &["create", "-n", "team", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: late}\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Forbidden") && err.contains("because it is being terminated"),
        "{err}"
    );
    // Everything else in it is deleted by the namespace controller.
    c.eventually("namespace contents deleted", || {
        (c.kubectl(&["get", "pods,svc,deploy", "-n", "team", "-o", "name"])
            .is_empty())
        .then_some(())
    });
    c.kubectl(&[
        "patch",
        "cm",
        "held",
        "-n",
        "team",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    c.kubectl(&["wait", "ns/team", "--for=delete", "--timeout=60s"]);
    let nf = c.kubectl_fails(&["get", "ns", "team"]);
    assert!(nf.contains("NotFound"));
    // Writes into a namespace that does not exist.
    let out = c.kubectl_stdin(
        &["create", "-n", "nowhere", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("namespaces \"nowhere\" not found"));
    // The built-in namespaces cannot be deleted.
    let err = c.kubectl_fails(&["delete", "ns", "default"]);
    assert!(
        err.contains("Forbidden") && err.contains("may not be deleted"),
        "{err}"
    );
}

#[test]
fn invalid_objects_are_refused_with_causes() {
    let c = Cluster::start();
    let out = c.kubectl_stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: []}\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Invalid")
            && err.contains("metadata.name")
            && err.contains("spec.containers: Required value"),
        "{err}"
    );
    let out = c.kubectl_stdin(&["create", "-f", "-"], "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: x, bogus: 1}]\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field") && err.contains("bogus"),
        "strict validation: {err}"
    );
    let out = c.kubectl_stdin(&["create", "--validate=false", "-f", "-"], "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: x, bogus: 1}]\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pod = json(&c.kubectl(&["get", "pod", "p", "-o", "json"]));
    assert!(
        pod["spec"]["containers"][0].get("bogus").is_none(),
        "unknown fields are dropped"
    );
}

#[test]
fn kubectl_one_minor_version_behind_works_too() {
    // The dispatcher picks 1.33 for this server; upstream supports clients one minor behind.
    let old = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32";
    if !std::path::Path::new(old).exists() {
        panic!("{old} is missing: the machine image should ship kubectl 1.27-1.33");
    }
    let c = Cluster::start_with(0, &["--disable", "controller-manager"]);
    let run = |args: &[&str]| {
        let out = c.command(old).args(args).output().expect("kubectl 1.32");
        assert!(
            out.status.success(),
            "kubectl.1.32 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v = json(&run(&["version", "-o", "json"]));
    assert_eq!(v["clientVersion"]["minor"], "32");
    assert!(run(&["api-resources", "-o", "name"])
        .lines()
        .any(|l| l == "deployments.apps"));
    let f = c.data_dir().join("m.yaml");
    std::fs::write(&f, MANIFEST).unwrap();
    assert!(run(&["create", "-f", f.to_str().unwrap()]).contains("deployment.apps/dep created"));
    let t = rows(&run(&["get", "pods"]));
    assert_eq!(t[0], ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert_eq!(t.len(), 3);
    assert_eq!(run(&["delete", "pod", "db"]), "pod \"db\" deleted\n");
}
