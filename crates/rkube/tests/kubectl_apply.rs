//! kubectl's strategic-merge-patch verbs against a real `rkube server`: apply, edit, patch,
//! set image, rollout restart, scale, diff and server-side dry run. Each check reads the object
//! that resulted.

mod common;

use common::Cluster;
use serde_json::Value;

const APP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web, team: a}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: nginx
        image: nginx:1.26
        ports: [{containerPort: 80}, {containerPort: 443}]
"#;

const APP_V2: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: nginx
        image: nginx:1.27
        ports: [{containerPort: 80}]
        env: [{name: MODE, value: prod}]
"#;

fn deploy(c: &Cluster) -> Value {
    serde_json::from_str(&c.kubectl(&["get", "deploy", "web", "-o", "json"])).unwrap()
}

fn write(c: &Cluster, name: &str, body: &str) -> String {
    let p = c.data_dir().join(name);
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn client_side_apply_round_trip() {
    let c = Cluster::start();
    let v1 = write(&c, "v1.yaml", APP);
    let v2 = write(&c, "v2.yaml", APP_V2);
    assert_eq!(
        c.kubectl(&["apply", "-f", &v1]),
        "deployment.apps/web created\n"
    );
    let d = deploy(&c);
    assert!(
        d["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );

    // Change image and replicas, drop a port and a label, add an env var.
    assert_eq!(
        c.kubectl(&["apply", "-f", &v2]),
        "deployment.apps/web configured\n"
    );
    let d = deploy(&c);
    let ctr = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(ctr["image"], "nginx:1.27");
    assert_eq!(
        ctr["ports"],
        serde_json::json!([{"containerPort": 80, "protocol": "TCP"}])
    );
    assert_eq!(
        ctr["env"],
        serde_json::json!([{"name": "MODE", "value": "prod"}])
    );
    assert_eq!(d["metadata"]["labels"], serde_json::json!({"app": "web"}));
    // Fields set by others survive an apply that does not mention them.
    c.kubectl(&["label", "deploy", "web", "owner=ops"]);
    c.kubectl(&["apply", "-f", &v2]);
    assert_eq!(deploy(&c)["metadata"]["labels"]["owner"], "ops");

    // A no-op apply writes nothing.
    let rv = deploy(&c)["metadata"]["resourceVersion"].clone();
    assert_eq!(
        c.kubectl(&["apply", "-f", &v2]),
        "deployment.apps/web unchanged\n"
    );
    assert_eq!(deploy(&c)["metadata"]["resourceVersion"], rv);

    // A directory and a multi-document file.
    let dir = c.data_dir().join("dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: \"1\"}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\ndata: {k: \"1\"}\n").unwrap();
    let out = c.kubectl(&["apply", "-f", dir.to_str().unwrap()]);
    assert_eq!(out, "configmap/a created\nconfigmap/b created\n");
    std::fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: \"2\"}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\ndata: {k: \"1\"}\n").unwrap();
    let out = c.kubectl(&["apply", "-f", dir.to_str().unwrap()]);
    assert_eq!(out, "configmap/a configured\nconfigmap/b unchanged\n");
    assert_eq!(
        c.kubectl(&["get", "cm", "a", "-o", "jsonpath={.data.k}"]),
        "2"
    );
}

#[test]
fn apply_dry_run_and_diff_persist_nothing() {
    let c = Cluster::start();
    let v1 = write(&c, "v1.yaml", APP);
    c.kubectl(&["apply", "-f", &v1]);
    let v2 = write(&c, "v2.yaml", APP_V2);
    assert_eq!(
        c.kubectl(&["apply", "-f", &v2, "--dry-run=server"]),
        "deployment.apps/web configured (server dry run)\n"
    );
    assert_eq!(deploy(&c)["spec"]["replicas"], 2);
    let out = c.kubectl_output(&["diff", "-f", &v2]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "diff exits 1 when there are differences"
    );
    let diff = String::from_utf8_lossy(&out.stdout);
    assert!(
        diff.contains("-  replicas: 2") && diff.contains("+  replicas: 3"),
        "{diff}"
    );
    let removed = |needle: &str| {
        diff.lines()
            .any(|l| l.starts_with('-') && l.contains(needle))
    };
    let added = |needle: &str| {
        diff.lines()
            .any(|l| l.starts_with('+') && l.contains(needle))
    };
    assert!(
        removed("image: nginx:1.26") && added("image: nginx:1.27"),
        "{diff}"
    );
    assert!(
        removed("containerPort: 443") && added("name: MODE") && removed("team: a"),
        "{diff}"
    );
    assert_eq!(deploy(&c)["spec"]["replicas"], 2);
    assert_eq!(
        c.kubectl_output(&["diff", "-f", &v1]).status.code(),
        Some(0),
        "no differences"
    );
    // Creating with a server dry run stores nothing.
    let cm = write(
        &c,
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ghost}\n",
    );
    c.kubectl(&["apply", "-f", &cm, "--dry-run=server"]);
    c.kubectl_fails(&["get", "cm", "ghost"]);
}

#[test]
fn edit_patch_set_image_restart_scale() {
    let c = Cluster::start();
    let v1 = write(&c, "v1.yaml", APP);
    c.kubectl(&["apply", "-f", &v1]);

    // edit, with a scripted editor.
    let edit = c
        .command("kubectl")
        .args(["edit", "deploy", "web"])
        .env("EDITOR", "sed -i s/replicas:\\ 2/replicas:\\ 4/")
        .output()
        .unwrap();
    assert!(
        edit.status.success(),
        "{}",
        String::from_utf8_lossy(&edit.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&edit.stdout),
        "deployment.apps/web edited\n"
    );
    assert_eq!(deploy(&c)["spec"]["replicas"], 4);

    // The default patch type is strategic: a container is merged in by name, then deleted.
    c.kubectl(&[
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"side","image":"busybox"}]}}}}"#,
    ]);
    let names = c.kubectl(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[*].name}",
    ]);
    assert_eq!(names, "nginx side");
    c.kubectl(&["patch", "deploy", "web", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"nginx","ports":[{"containerPort":443,"$patch":"delete"}]}]}}}}"#]);
    let ports = c.kubectl(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].ports[*].containerPort}",
    ]);
    assert_eq!(ports, "80");
    c.kubectl(&[
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"side","$patch":"delete"}]}}}}"#,
    ]);
    assert_eq!(
        c.kubectl(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.template.spec.containers[*].name}"
        ]),
        "nginx"
    );
    let bad = c.kubectl_fails(&[
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"image":"no-name"}]}}}}"#,
    ]);
    assert!(
        bad.contains("does not contain declared merge key: name"),
        "{bad}"
    );

    // set image, rollout restart.
    assert_eq!(
        c.kubectl(&["set", "image", "deploy/web", "nginx=nginx:1.28"]),
        "deployment.apps/web image updated\n"
    );
    assert_eq!(
        deploy(&c)["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.28"
    );
    assert_eq!(
        c.kubectl(&["rollout", "restart", "deploy/web"]),
        "deployment.apps/web restarted\n"
    );
    assert!(deploy(&c)["spec"]["template"]["metadata"]["annotations"]
        ["kubectl.kubernetes.io/restartedAt"]
        .is_string());

    // scale: plain, with a precondition that holds, with one that does not, several at once.
    assert_eq!(
        c.kubectl(&["scale", "deploy", "web", "--replicas=5"]),
        "deployment.apps/web scaled\n"
    );
    assert_eq!(deploy(&c)["spec"]["replicas"], 5);
    c.kubectl(&[
        "scale",
        "deploy",
        "web",
        "--current-replicas=5",
        "--replicas=6",
    ]);
    assert_eq!(deploy(&c)["spec"]["replicas"], 6);
    let err = c.kubectl_fails(&[
        "scale",
        "deploy",
        "web",
        "--current-replicas=1",
        "--replicas=7",
    ]);
    assert!(err.contains("Expected replicas to be 1, was 6"), "{err}");
    c.apply_yaml("apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: rs}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec: {containers: [{name: c, image: i}]}\n---\napiVersion: v1\nkind: ReplicationController\nmetadata: {name: rc}\nspec:\n  selector: {a: c}\n  template:\n    metadata: {labels: {a: c}}\n    spec: {containers: [{name: c, image: i}]}\n");
    let out = c.kubectl(&["scale", "--replicas=3", "rs/rs", "rc/rc", "deploy/web"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    for (kind, name) in [("rs", "rs"), ("rc", "rc"), ("deploy", "web")] {
        assert_eq!(
            c.kubectl(&["get", kind, name, "-o", "jsonpath={.spec.replicas}"]),
            "3",
            "{kind}"
        );
    }
    let scale: Value = serde_json::from_str(&c.kubectl(&[
        "get",
        "--raw",
        "/apis/apps/v1/namespaces/default/deployments/web/scale",
    ]))
    .unwrap();
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["selector"], "app=web");
}

#[test]
fn create_kinds_that_post_protobuf() {
    let c = Cluster::start();
    assert_eq!(
        c.kubectl(&["create", "namespace", "team"]),
        "namespace/team created\n"
    );
    assert_eq!(
        c.kubectl(&["get", "ns", "team", "-o", "jsonpath={.status.phase}"]),
        "Active"
    );
    c.kubectl(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "team",
        "--from-literal=a=1",
        "--from-literal=b=2",
    ]);
    assert_eq!(
        c.kubectl(&[
            "get",
            "cm",
            "cfg",
            "-n",
            "team",
            "-o",
            "jsonpath={.data.a}{.data.b}"
        ]),
        "12"
    );
    c.kubectl(&[
        "create",
        "secret",
        "generic",
        "sec",
        "--from-literal=pw=hunter2",
    ]);
    let secret: Value =
        serde_json::from_str(&c.kubectl(&["get", "secret", "sec", "-o", "json"])).unwrap();
    assert_eq!(secret["data"]["pw"], "aHVudGVyMg==");
    assert_eq!(secret["type"], "Opaque");
    c.kubectl(&["create", "serviceaccount", "bot"]);
    c.kubectl(&["get", "sa", "bot"]);
    c.kubectl(&[
        "create",
        "priorityclass",
        "high",
        "--value=1000",
        "--description=important",
    ]);
    assert_eq!(
        c.kubectl(&[
            "get",
            "pc",
            "high",
            "-o",
            "jsonpath={.value} {.description} {.preemptionPolicy}"
        ]),
        "1000 important PreemptLowerPriority"
    );
    assert_eq!(
        c.kubectl(&[
            "create",
            "deployment",
            "web",
            "--image=nginx:1.27",
            "--replicas=2",
            "--port=80"
        ]),
        "deployment.apps/web created\n"
    );
    let d = deploy(&c);
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
        80
    );
    c.kubectl(&[
        "create",
        "deployment",
        "sleeper",
        "--image=busybox",
        "--",
        "sleep",
        "3600",
    ]);
    assert_eq!(
        c.kubectl(&[
            "get",
            "deploy",
            "sleeper",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].command}"
        ]),
        r#"["sleep","3600"]"#
    );
    // Server-side dry run of a protobuf create stores nothing.
    c.kubectl(&[
        "create",
        "configmap",
        "dry",
        "--from-literal=a=1",
        "--dry-run=server",
    ]);
    c.kubectl_fails(&["get", "cm", "dry"]);
}

#[test]
fn auth_can_i_and_whoami() {
    let c = Cluster::start();
    assert_eq!(c.kubectl(&["auth", "can-i", "list", "pods"]), "yes\n");
    assert_eq!(
        c.kubectl(&[
            "auth",
            "can-i",
            "create",
            "deployments.apps",
            "-n",
            "kube-system"
        ]),
        "yes\n"
    );
    // Someone else (impersonated by the admin) may not.
    let out = c.kubectl_output(&["auth", "can-i", "list", "pods", "--as=bob"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no\n");
    let list = c.kubectl(&["auth", "can-i", "--list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("*.*") && l.ends_with("[*]")),
        "{list}"
    );
    let me = c.kubectl(&["auth", "whoami", "-o", "json"]);
    let me: Value = serde_json::from_str(&me).unwrap();
    assert_eq!(me["status"]["userInfo"]["username"], "admin");
    assert!(me["status"]["userInfo"]["groups"]
        .as_array()
        .unwrap()
        .contains(&"system:masters".into()));
    let bob: Value = serde_json::from_str(&c.kubectl(&[
        "auth",
        "whoami",
        "--as=bob",
        "--as-group=devs",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(bob["status"]["userInfo"]["username"], "bob");
    assert_eq!(bob["status"]["userInfo"]["groups"][0], "devs");
    // Bob himself is refused everywhere else, with upstream's message.
    let err = c.kubectl_fails(&["get", "pods", "--as=bob"]);
    assert!(
        err.contains("Forbidden") && err.contains("User \"bob\" cannot list resource \"pods\""),
        "{err}"
    );
}

#[test]
fn explain_reads_the_published_schemas() {
    let c = Cluster::start();
    let out = c.kubectl(&["explain", "deployment.spec.strategy"]);
    assert!(
        out.contains("KIND:       Deployment")
            && out.contains("FIELD: strategy <DeploymentStrategy>"),
        "{out}"
    );
    assert!(
        out.contains("rollingUpdate\t<RollingUpdateDeployment>")
            && out.contains("Can be \"Recreate\" or \"RollingUpdate\""),
        "{out}"
    );
    let out = c.kubectl(&["explain", "pod.spec.containers.ports"]);
    assert!(
        out.contains("FIELD: ports <[]ContainerPort>")
            && out.contains("containerPort\t<integer> -required-"),
        "{out}"
    );
    let err = c.kubectl_fails(&["explain", "pod.spec.nonsense"]);
    assert!(err.contains("field \"nonsense\" does not exist"), "{err}");
}

#[test]
fn server_side_apply_with_conflicts_and_force() {
    let c = Cluster::start();
    let v1 = write(&c, "v1.yaml", APP);
    assert_eq!(
        c.kubectl(&["apply", "--server-side", "-f", &v1]),
        "deployment.apps/web serverside-applied\n"
    );
    let d: Value = serde_json::from_str(&c.kubectl(&[
        "get",
        "deploy",
        "web",
        "-o",
        "json",
        "--show-managed-fields",
    ]))
    .unwrap();
    let mf = d["metadata"]["managedFields"].as_array().unwrap();
    assert!(
        mf.iter()
            .any(|e| e["manager"] == "kubectl" && e["operation"] == "Apply"),
        "{mf:?}"
    );
    // Another manager takes replicas; applying a different value conflicts.
    c.kubectl(&[
        "patch",
        "deploy",
        "web",
        "--type",
        "merge",
        "--field-manager=ops",
        "-p",
        r#"{"spec":{"replicas":5}}"#,
    ]);
    let v3 = write(&c, "v3.yaml", &APP.replace("replicas: 2", "replicas: 3"));
    let err = c.kubectl_fails(&["apply", "--server-side", "-f", &v3]);
    assert!(
        err.contains(
            "Apply failed with 1 conflict: conflict with \"ops\" using apps/v1: .spec.replicas"
        ),
        "{err}"
    );
    assert_eq!(deploy(&c)["spec"]["replicas"], 5);
    c.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &v3]);
    assert_eq!(deploy(&c)["spec"]["replicas"], 3);
    // What the manager stops applying is removed: a port and a label.
    let v2 = write(&c, "v2.yaml", APP_V2);
    c.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &v2]);
    let d = deploy(&c);
    assert_eq!(d["metadata"]["labels"], serde_json::json!({"app": "web"}));
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["env"][0]["name"],
        "MODE"
    );
    // Creating with apply, and a server dry run that stores nothing.
    let cm = write(
        &c,
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa}\ndata: {a: \"1\"}\n",
    );
    c.kubectl(&["apply", "--server-side", "--dry-run=server", "-f", &cm]);
    c.kubectl_fails(&["get", "cm", "ssa"]);
    c.kubectl(&["apply", "--server-side", "-f", &cm]);
    assert_eq!(
        c.kubectl(&["get", "cm", "ssa", "-o", "jsonpath={.data.a}"]),
        "1"
    );
}

#[test]
fn create_token_and_authenticate_with_it() {
    let c = Cluster::start();
    c.kubectl(&["create", "serviceaccount", "bot"]);
    let token = c.kubectl(&["create", "token", "bot"]).trim().to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let server = c.server_url();
    let ca = c.data_dir().join("tls/ca.crt");
    let as_bot = |extra: &[&str], token: &str| {
        let mut args = vec![
            "--kubeconfig=/dev/null",
            "--server",
            &server,
            "--certificate-authority",
            ca.to_str().unwrap(),
            "--token",
            token,
        ];
        args.extend_from_slice(extra);
        c.kubectl_output(&args)
    };
    let who = as_bot(
        &[
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ],
        &token,
    );
    assert_eq!(
        String::from_utf8_lossy(&who.stdout),
        "system:serviceaccount:default:bot"
    );
    let pods = as_bot(&["get", "pods"], &token);
    assert!(
        String::from_utf8_lossy(&pods.stderr).contains("Forbidden"),
        "no RBAC yet: a service account may do nothing"
    );
    let junk = as_bot(&["get", "pods"], "not.a.token");
    assert!(String::from_utf8_lossy(&junk.stderr).contains("Unauthorized"));
    let err = c.kubectl_fails(&["create", "token", "bot", "--duration=1m"]);
    assert!(
        err.contains("may not specify a duration less than 10 minutes"),
        "{err}"
    );
    // Deleting the account revokes its tokens.
    c.kubectl(&["delete", "sa", "bot"]);
    let gone = as_bot(&["auth", "whoami"], &token);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("Unauthorized"));
}
