//! Services end to end: ClusterIP and NodePort allocation in the API server, and the proxy's
//! nftables data plane carrying real traffic from the node and from pods to real containers.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{eventually, Cluster};
use serde_json::Value;

/// A Service by `name` (in `default`) or `namespace/name`.
fn svc(c: &Cluster, name: &str) -> Value {
    let (ns, name) = name.split_once('/').unwrap_or(("default", name));
    serde_json::from_str(&c.kubectl(&["get", "svc", "-n", ns, name, "-o", "json"])).unwrap()
}

fn in_range(ip: &str, prefix: &str) -> bool {
    ip.starts_with(prefix)
}

#[test]
fn cluster_ips_and_node_ports_are_allocated_once_and_released() {
    let mut c = Cluster::start();
    c.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 80}]\n",
    );
    let a = svc(&c, "a");
    let a_ip = a["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(in_range(&a_ip, "10.43."), "{a_ip}");
    assert_eq!(a["spec"]["clusterIPs"], serde_json::json!([a_ip]));
    assert_eq!(a["spec"]["ipFamilies"], serde_json::json!(["IPv4"]));
    assert_eq!(a["spec"]["ipFamilyPolicy"], "SingleStack");

    // A requested IP: honoured when free, refused with a reason when taken or out of range.
    let want = |name: &str, ip: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n")
    };
    c.apply_yaml(&want("fixed", "10.43.0.20"));
    assert_eq!(svc(&c, "fixed")["spec"]["clusterIP"], "10.43.0.20");
    // Cluster DNS holds the range's tenth address, the kubernetes Service its first.
    let dns: Value = serde_json::from_str(&c.kubectl(&[
        "get",
        "svc",
        "-n",
        "kube-system",
        "kube-dns",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(dns["spec"]["clusterIP"], "10.43.0.10");
    let out = c.kubectl_stdin(&["create", "-f", "-"], &want("b", &a_ip));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is invalid") && err.contains("provided IP is already allocated"),
        "{err}"
    );
    let out = c.kubectl_stdin(&["create", "-f", "-"], &want("b", "10.99.0.1"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in the valid range"), "{err}");
    for taken in ["10.43.0.1", "10.43.0.10"] {
        let out = c.kubectl_stdin(&["create", "-f", "-"], &want("b", taken));
        assert!(!out.status.success(), "{taken}");
    }

    // Node ports.
    c.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  ports: [{port: 80}]\n");
    let np = svc(&c, "np")["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap();
    assert!((30000..=32767).contains(&np), "{np}");
    let taken = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: np2}}\nspec:\n  type: NodePort\n  ports: [{{port: 80, nodePort: {np}}}]\n");
    let out = c.kubectl_stdin(&["create", "-f", "-"], &taken);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.ports[0].nodePort")
            && err.contains("provided port is already allocated"),
        "{err}"
    );
    let out = c.kubectl_stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: np3}\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 80}]\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("30000-32767"), "{err}");

    // Headless and ExternalName Services get no address.
    c.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec:\n  clusterIP: None\n  ports: [{port: 80}]\n");
    assert_eq!(
        svc(&c, "headless")["spec"]["clusterIPs"],
        serde_json::json!(["None"])
    );
    c.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  type: ExternalName\n  externalName: example.com\n");
    assert!(svc(&c, "ext")["spec"].get("clusterIP").is_none());

    // Updates keep what was given; a ClusterIP cannot change.
    let replaced = c.kubectl_stdin(
        &["replace", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  ports: [{port: 80}]\n",
    );
    assert!(replaced.status.success(), "{replaced:?}");
    let after = svc(&c, "np");
    assert_eq!(after["spec"]["ports"][0]["nodePort"].as_u64(), Some(np));
    let err = c.kubectl_fails(&[
        "patch",
        "svc",
        "a",
        "-p",
        r#"{"spec":{"clusterIP":"10.43.0.77","clusterIPs":["10.43.0.77"]}}"#,
    ]);
    assert!(err.contains("may not change once set"), "{err}");

    // Deleting releases: the IP and the port can be asked for again.
    c.kubectl(&["delete", "svc", "a", "np"]);
    c.apply_yaml(&want("again", &a_ip));
    c.apply_yaml(&taken);

    // Concurrent creates never share an address.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ips: Vec<String> = rt.block_on(async {
        use k8s_openapi::api::core::v1::Service;
        use kube::api::{Api, PostParams};
        let api: Api<Service> = Api::namespaced(c.client().await, "default");
        let creates = (0..40).map(|i| {
            let api = api.clone();
            async move {
                let s: Service = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("par-{i}")},
                    "spec": {"ports": [{"port": 80}], "type": "NodePort"}}))
                .unwrap();
                api.create(&PostParams::default(), &s).await.unwrap()
            }
        });
        futures::future::join_all(creates)
            .await
            .into_iter()
            .map(|s| s.spec.unwrap().cluster_ip.unwrap())
            .collect()
    });
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 40, "{ips:?}");

    // After a restart every stored Service still holds its address, and cluster DNS answers
    // on the port it had (so pods' open flows to it survive).
    let before = dns_port(&c);
    assert!(!before.is_empty());
    assert!(c.stop().success());
    c.boot();
    assert_eq!(dns_port(&c), before);
    let out = c.kubectl_stdin(&["create", "-f", "-"], &want("clash", &ips[7]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("provided IP is already allocated"), "{err}");
    let out = c.kubectl_stdin(&["create", "-f", "-"], &want("clash", "10.43.0.20"));
    assert!(!out.status.success());
    assert_eq!(svc(&c, "kubernetes")["spec"]["clusterIP"], "10.43.0.1");
}

/// The port cluster DNS serves on, as its EndpointSlice says.
fn dns_port(c: &Cluster) -> String {
    c.jsonpath(
        &[
            "get",
            "endpointslice",
            "-n",
            "kube-system",
            "kube-dns-rkube",
        ],
        "{.ports[0].port}",
    )
}

/// GET / over a fresh connection; the body's last line (the answering pod's hostname).
fn get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.") || !out.contains(" 200 ") {
        return Err(std::io::Error::other(format!("bad answer: {out:?}")));
    }
    Ok(out
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string())
}

fn tally(answers: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a).or_insert(0) += 1;
    }
    m
}

const WEB: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 10
      containers:
      - name: httpd
        image: busybox
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "mkdir -p /www; hostname > /www/index.html; exec httpd -f -p 8080 -h /www"]
        readinessProbe: {httpGet: {path: /index.html, port: 8080}, periodSeconds: 1}
        lifecycle: {preStop: {exec: {command: ["sleep", "3"]}}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  externalIPs: [198.51.100.7]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nobody}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: sub}
spec:
  clusterIP: None
  selector: {app: client}
  ports: [{name: x, port: 1}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec:
  hostname: me
  subdomain: sub
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
"#;

fn addr(c: &Cluster, svc_name: &str) -> SocketAddr {
    let ip = svc(c, svc_name)["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    format!("{ip}:80").parse().unwrap()
}

#[test]
fn services_balance_over_every_backend_from_the_node_and_from_pods() {
    let c = Cluster::with_kubelet(&[]);
    c.apply_yaml(WEB);
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    c.kubectl(&[
        "wait",
        "pod/client",
        "--for=condition=Ready",
        "--timeout=60s",
    ]);
    let backends = c.live_pods(&["-l", "app=web"], "{.metadata.name}");
    assert_eq!(backends.len(), 3);
    let web = addr(&c, "web");

    // From the node, by ClusterIP: once the endpoints are programmed, 300 requests, every one
    // answered, every backend answering.
    eventually("all 3 backends behind the ClusterIP", &mut || {
        let seen = tally((0..30).filter_map(|_| get(web).ok()));
        (seen.len() == 3).then_some(())
    });
    let answers: Vec<String> = (0..300)
        .map(|_| get(web).expect("GET via ClusterIP"))
        .collect();
    let seen = tally(answers);
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        {
            let mut b = backends.clone();
            b.sort();
            b
        },
        "{seen:?}"
    );
    println!("from the node, 300 requests: {seen:?}");

    // From another pod (busybox nc, one connection per request).
    let script = format!(
        "for i in $(seq 300); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} {} | tail -n 1; done",
        web.ip(),
        web.port()
    );
    let out = c.kubectl(&["exec", "client", "--", "sh", "-c", &script]);
    let seen = tally(out.lines().map(|l| l.trim().to_string()));
    assert_eq!(seen.values().sum::<usize>(), 300, "{seen:?}");
    assert_eq!(seen.len(), 3, "{seen:?}");
    println!("from a pod, 300 requests: {seen:?}");

    // By DNS name, from the pod: the full name and the short one through the search path.
    let script = "for i in $(seq 150); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 web.default.svc.cluster.local 80 | tail -n 1; printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 web 80 | tail -n 1; done";
    let out = c.kubectl(&["exec", "client", "--", "sh", "-c", script]);
    let seen = tally(out.lines().map(|l| l.trim().to_string()));
    assert_eq!(seen.values().sum::<usize>(), 300, "{seen:?}");
    assert_eq!(seen.len(), 3, "{seen:?}");
    println!("from a pod by DNS name, 300 requests: {seen:?}");
    dns_records(&c, &backends);

    // A backend reaching its own Service (hairpin) is answered too, by itself among others.
    let me = &backends[0];
    let script = format!(
        "for i in $(seq 30); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} {} | tail -n 1; done",
        web.ip(),
        web.port()
    );
    let out = c.kubectl(&["exec", me, "--", "sh", "-c", &script]);
    assert_eq!(out.lines().count(), 30, "{out}");

    // NodePort on the node's address.
    let node_ip = c.jsonpath(
        &["get", "nodes"],
        "{.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    );
    let np = svc(&c, "web-np")["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap();
    let node_port: SocketAddr = format!("{node_ip}:{np}").parse().unwrap();
    let seen = eventually("all 3 backends behind the NodePort", &mut || {
        let seen = tally((0..60).filter_map(|_| get(node_port).ok()));
        (seen.len() == 3).then_some(seen)
    });
    println!("NodePort {node_port}: {seen:?}");
    // An external IP of the same Service (from the node: the proxy's output hook).
    let external: SocketAddr = "198.51.100.7:80".parse().unwrap();
    let seen = eventually("all 3 backends behind the external IP", &mut || {
        let seen = tally((0..60).filter_map(|_| get(external).ok()));
        (seen.len() == 3).then_some(seen)
    });
    println!("externalIP {external}: {seen:?}");

    // sessionAffinity ClientIP: every request from the node lands on one backend.
    let sticky = addr(&c, "sticky");
    eventually("the sticky Service answers", &mut || get(sticky).ok());
    let seen = tally((0..50).map(|_| get(sticky).expect("GET sticky")));
    assert_eq!(seen.len(), 1, "{seen:?}");

    // No endpoints: refused at once (not a timeout).
    let nobody = addr(&c, "nobody");
    let err = TcpStream::connect_timeout(&nobody, Duration::from_secs(10)).unwrap_err();
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "a Service without endpoints: {err}"
    );
    let script = format!("nc -w 5 {} 80 </dev/null; echo rc=$?", nobody.ip());
    let out = c.kubectl_output(&["exec", "client", "--", "sh", "-c", &script]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("refused") && text.contains("rc=1"), "{text}");

    // The rules are in the proxy's own tables; they go when the server stops.
    let table = format!(
        "rkube-{}",
        kubelet::containerd::tag(&c.data_dir().join("agent"))
    );
    let listed = |t: &str| {
        std::process::Command::new("nft")
            .args(["list", "table", "ip", t])
            .output()
            .unwrap()
            .status
            .success()
    };
    // Services are spread over shard tables `<table>-<n>`; web's is:
    let shard = format!("{table}-{}", proxy::nft::shard_of("default/web"));
    assert!(listed(&table), "{table} while the server runs");
    assert!(listed(&shard), "{shard} while the server runs");
    // Removed behind the proxy's back (web's DNAT with it), the tables are rebuilt.
    for t in [&table, &shard] {
        let deleted = std::process::Command::new("nft")
            .args(["delete", "table", "ip", t])
            .status()
            .unwrap();
        assert!(deleted.success());
    }
    eventually("the tables rebuilt and the Service answering", &mut || {
        get(web).ok().filter(|who| backends.contains(who))
    });
    assert!(listed(&table));
    drop(c);
    let left = std::process::Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(
        !left
            .lines()
            .any(|l| l.starts_with(&format!("table ip {table}"))),
        "{table} and its shards are removed on shutdown: {left}"
    );
}

/// `nslookup NAME` in the client pod: the addresses answered (after the server's own).
fn lookup(c: &Cluster, args: &[&str]) -> (bool, Vec<String>) {
    let mut cmd = vec!["exec", "client", "--", "nslookup"];
    cmd.extend(args);
    let out = c.kubectl_output(&cmd);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let addrs = text
        .split("Name:")
        .skip(1)
        .flat_map(|block| {
            block
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Address:"))
                .map(|a| a.trim().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    (out.status.success(), addrs)
}

fn dns_records(c: &Cluster, backends: &[String]) {
    let web_ip = svc(c, "web")["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    // The pod's resolv.conf points at cluster DNS with the namespace's search path.
    let conf = c.kubectl(&["exec", "client", "--", "cat", "/etc/resolv.conf"]);
    let dns_ip = svc(c, "kube-system/kube-dns")["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(conf.contains(&format!("nameserver {dns_ip}")), "{conf}");
    assert!(
        conf.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{conf}"
    );
    assert!(conf.contains("ndots:5"), "{conf}");
    let got = lookup(c, &["web.default.svc.cluster.local"]).1;
    assert_eq!(got.join(","), web_ip);
    // Headless: every ready endpoint.
    let mut pod_ips = c.live_pods(&["-l", "app=web"], "{.status.podIP}");
    pod_ips.sort();
    let mut got = lookup(c, &["web-headless.default.svc.cluster.local"]).1;
    got.sort();
    assert_eq!(got, pod_ips, "headless answers for {backends:?}");
    // A pod's hostname.subdomain record.
    let client_ip = c.jsonpath(&["get", "pod", "client"], "{.status.podIP}");
    assert_eq!(
        c.eventually("me.sub resolves", || {
            let got = lookup(c, &["me.sub.default.svc.cluster.local"]).1;
            (!got.is_empty()).then_some(got)
        }),
        [client_ip]
    );
    // SRV for a named port.
    let out = c.kubectl(&[
        "exec",
        "client",
        "--",
        "nslookup",
        "-type=srv",
        "_http._tcp.web-headless.default.svc.cluster.local",
    ]);
    assert_eq!(out.matches("service = 0 100 8080").count(), 3, "{out}");
    // Unknown names in the zone: NXDOMAIN, at once.
    let (ok, addrs) = lookup(c, &["nope.default.svc.cluster.local"]);
    assert!(!ok && addrs.is_empty());
    // From the node itself, through the kube-dns Service.
    let out = std::process::Command::new("busybox")
        .args(["nslookup", "web.default.svc.cluster.local", &dns_ip])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&web_ip), "{text}");
    // Other names go to the host's resolver, when it has one that knows them.
    let host = std::process::Command::new("busybox")
        .args(["nslookup", "deb.debian.org"])
        .output()
        .unwrap();
    if host.status.success() {
        let (ok, addrs) = lookup(c, &["deb.debian.org"]);
        assert!(ok && !addrs.is_empty(), "forwarded: {addrs:?}");
    } else {
        println!("the host resolves no outside names: forwarding not checked here");
    }
}

#[test]
fn a_rolling_update_behind_a_service_fails_no_request() {
    let c = Cluster::with_kubelet(&[]);
    c.apply_yaml(WEB);
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    let web = addr(&c, "web");
    eventually("all 3 backends behind the ClusterIP", &mut || {
        let seen = tally((0..30).filter_map(|_| get(web).ok()));
        (seen.len() == 3).then_some(())
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut answered = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(web) {
                    Ok(who) => {
                        ok += 1;
                        answered.insert(who);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed, answered)
        })
    };
    let old = c.live_pods(&["-l", "app=web"], "{.metadata.name}");
    c.kubectl(&["set", "env", "deployment/web", "VERSION=2"]);
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=120s"]);
    // Until every old pod is gone (their preStop hooks run out).
    eventually("the old pods are gone", &mut || {
        let live = c.live_pods(&["-l", "app=web"], "{.metadata.name}");
        let all = c.kubectl(&["get", "pods", "-l", "app=web", "-o", "name"]);
        (old.iter()
            .all(|o| !live.contains(o) && !all.contains(o.as_str())))
        .then_some(())
    });
    // A few more requests against the new set only.
    let new = c.live_pods(&["-l", "app=web"], "{.metadata.name}");
    eventually("the new pods answer", &mut || {
        let seen = tally((0..30).filter_map(|_| get(web).ok()));
        seen.keys().all(|k| new.contains(k)).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, answered) = client.join().unwrap();
    println!(
        "rolling update: {ok} requests answered, {} failed, by {} pods",
        failed.len(),
        answered.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 0);
    assert!(
        answered.iter().any(|a| old.contains(a)) && answered.iter().any(|a| new.contains(a)),
        "old and new pods both answered: {answered:?}"
    );
}
