//! Two nodes, two network namespaces: the server's node on this host and an `rkube agent` in a
//! network namespace joined to it by a veth pair. Pods on one reach pods on the other through
//! the routes the nodes program, and Services reach backends on the other node.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::Cluster;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace linked to the host by a veth pair (host side `.1`, namespace `.2` of
/// a /24), with a default route through the host; deleted on drop.
struct Netns {
    name: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 100_000;
        let k = std::process::id() % 200 + 20;
        let (name, host_if, ns_if) = (format!("rkmn{id}"), format!("rkh{id}"), format!("rkn{id}"));
        let (host_ip, ns_ip) = (format!("10.77.{k}.1"), format!("10.77.{k}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        sh(&["ip", "netns", "add", &name]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        sh(&["ip", "link", "set", &ns_if, "netns", &name]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &host_if,
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &name];
            v.extend_from_slice(args);
            sh(&v);
        };
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&["ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
        inside(&["ip", "link", "set", &ns_if, "up"]);
        inside(&["ip", "route", "add", "default", "via", &host_ip]);
        inside(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        sh(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        Netns {
            name,
            host_ip,
            ns_ip,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A process stopped with SIGTERM (and waited for) on drop, so that it cleans up.
struct Graceful(Child);

impl Drop for Graceful {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod(name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {name}}}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www; echo {name} > /www/index.html; exec httpd -f -p 8080 -h /www"]
    readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc-{name}}}
spec:
  selector: {{app: {name}}}
  ports: [{{port: 80, targetPort: 8080}}]
"#
    )
}

/// This host's routes to `cidr`, as `ip route` prints them.
fn routes_to(cidr: &str) -> String {
    let out = Command::new("ip")
        .args(["route", "show", cidr])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET http://HOST:PORT/ from inside pod `from` (busybox nc): the body's last line.
fn get_from(c: &Cluster, from: &str, host: &str, port: u16) -> String {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port} | tail -n 1");
    c.kubectl(&["exec", from, "--", "sh", "-c", &script])
        .trim()
        .to_string()
}

#[test]
fn pods_and_services_reach_across_nodes_in_network_namespaces() {
    let net = Netns::new();
    let c = Cluster::with_kubelet(&["--bind-address", "0.0.0.0", "--node-ip", &net.host_ip]);
    let port = c.server_url().rsplit(':').next().unwrap().to_string();
    let token = std::fs::read_to_string(c.data_dir().join("token")).unwrap();
    let agent_dir = c.agent_dir();
    let agent = Graceful(
        // nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup mounts.
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", net.name))
            .arg(common::rkube_bin())
            .args([
                "agent",
                "--server",
                &format!("https://{}:{port}", net.host_ip),
            ])
            .args(["--token", token.trim()])
            .arg("--data-dir")
            .arg(agent_dir.path())
            .args(["--node-name", "node-b", "--node-ip", &net.ns_ip])
            .args([
                "--stop-pods-on-exit",
                "--eviction-hard",
                common::LENIENT_EVICTION,
            ])
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("rkube agent in the namespace"),
    );
    c.eventually("node-b Ready with a pod CIDR", || {
        let ready = c.jsonpath(
            &["get", "node", "node-b"],
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        );
        let cidr = c.jsonpath(&["get", "node", "node-b"], "{.spec.podCIDR}");
        (ready == "True" && !cidr.is_empty()).then_some(())
    });
    let node_a = c
        .kubectl(&["get", "nodes", "-o", "name"])
        .lines()
        .map(|l| l.trim_start_matches("node/").to_string())
        .find(|n| n != "node-b")
        .expect("the server's node");
    c.apply_yaml(&pod("a", &node_a));
    c.apply_yaml(&pod("b", "node-b"));
    for p in ["a", "b"] {
        c.kubectl(&[
            "wait",
            &format!("pod/{p}"),
            "--for=condition=Ready",
            "--timeout=90s",
        ]);
    }
    let ip_a = c.jsonpath(&["get", "pod", "a"], "{.status.podIP}");
    let ip_b = c.jsonpath(&["get", "pod", "b"], "{.status.podIP}");
    let cidr_b = c.jsonpath(&["get", "node", "node-b"], "{.spec.podCIDR}");
    assert_ne!(
        ip_a.rsplit_once('.').map(|x| x.0),
        ip_b.rsplit_once('.').map(|x| x.0),
        "pods on different nodes get addresses from different ranges: {ip_a} {ip_b}"
    );
    println!("a {ip_a} on {node_a}, b {ip_b} on node-b ({cidr_b})");

    // Pod to pod, both ways, through the routes the nodes programmed.
    let answer = c.eventually("a reaches b across nodes", || {
        Some(get_from(&c, "a", &ip_b, 8080)).filter(|s| s == "b")
    });
    assert_eq!(answer, "b");
    assert_eq!(get_from(&c, "b", &ip_a, 8080), "a");
    let routes = routes_to(&cidr_b);
    assert!(
        routes.contains(&format!("via {}", net.ns_ip)),
        "the host routes node-b's pods through node-b: {routes:?}"
    );

    // A Service whose backend is on the other node: from a pod on each node, from the host.
    let svc_ip = |name: &str| c.jsonpath(&["get", "svc", name], "{.spec.clusterIP}");
    let (svc_a, svc_b) = (svc_ip("svc-a"), svc_ip("svc-b"));
    let answer = c.eventually("a reaches b's Service", || {
        Some(get_from(&c, "a", &svc_b, 80)).filter(|s| s == "b")
    });
    assert_eq!(answer, "b");
    let answer = c.eventually("b reaches a's Service", || {
        Some(get_from(&c, "b", &svc_a, 80)).filter(|s| s == "a")
    });
    assert_eq!(answer, "a");
    let body = common::http_get(&format!("{svc_b}:80"), "/").expect("host to b's Service");
    assert!(body.trim_end().ends_with('b'), "{body}");
    // And by name, from the other node (cluster DNS lives with the server).
    assert_eq!(
        get_from(&c, "b", "svc-a.default.svc.cluster.local", 80),
        "a"
    );

    // Stopping the agent cleanly; the server's routes go with the server.
    drop(agent);
    drop(c);
    let routes = routes_to(&cidr_b);
    assert!(routes.trim().is_empty(), "routes left behind: {routes}");
}
