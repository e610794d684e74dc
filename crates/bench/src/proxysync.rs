//! The service proxy's data plane, against the real kernel (netlink, as `rkube proxy`):
//! - `proxy-sync`: a whole sync of S Services x E endpoints (one transaction), then single
//!   endpoint changes applied one at a time;
//! - `proxy-latency`: network programming latency on a real cluster: from a pod observed Ready
//!   (through a watch) to its Service answering from this machine.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, PostParams};
use proxy::model::{Endpoint, ServicePort};
use proxy::nft::Context as NftContext;
use proxy::{Backend, Dataplane, Netlink};

use crate::{pct, Server};

fn endpoint(s: usize, e: usize) -> Endpoint {
    // Endpoints on 10.64.0.0/10, none local (so no hairpin elements).
    let n = (s * 16 + e) as u32;
    Endpoint {
        ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + n),
        port: 8080,
        local: false,
    }
}

fn service_port(s: usize, endpoints: usize) -> ServicePort {
    ServicePort::new(
        format!("bench/svc-{s}/tcp/80"),
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + s as u32 + 1),
        "tcp",
        80,
        (0..endpoints).map(|e| endpoint(s, e)).collect(),
    )
}

/// Removes the benchmark's tables however the run ends.
struct Cleanup(NftContext);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Netlink::default().apply(&proxy::nft::remove(&self.0));
    }
}

pub fn sync(services: usize, endpoints: usize, changes: usize, rounds: usize) -> Result<()> {
    let ctx = NftContext {
        table: format!("rkube-bench-{}", std::process::id()),
        local_cidr: Some("10.42.0.0/24".parse().map_err(anyhow::Error::msg)?),
    };
    let _cleanup = Cleanup(ctx.clone());
    let mut ports: Vec<ServicePort> = (0..services).map(|s| service_port(s, endpoints)).collect();
    let mut plane = Dataplane::new(ctx.clone(), Netlink::default());
    let mut full = Vec::new();
    for _ in 0..rounds.max(1) {
        let t0 = Instant::now();
        plane.sync_full(&ports).context("full sync")?;
        full.push(t0.elapsed());
    }
    let mut lines = 0;
    for t in ctx.tables() {
        let listed = Command::new("nft")
            .args(["list", "table", "ip", &t])
            .output()?;
        lines += String::from_utf8_lossy(&listed.stdout).lines().count();
    }
    println!(
        "full sync, {services} Services x {endpoints} endpoints ({lines} lines listed): median {:.0} ms, max {:.0} ms over {} rounds",
        pct(&mut full, 0.5),
        pct(&mut full, 1.0),
        full.len()
    );
    // One endpoint of one Service replaced by another (same count: map elements only).
    let mut replaced = Vec::new();
    for i in 0..changes {
        let s = (i * 7919) % services;
        let e = i % endpoints.max(1);
        let mut sp = ports[s].clone();
        if let Some(ep) = sp.endpoints.get_mut(e) {
            ep.ip = Ipv4Addr::from(u32::from(ep.ip) ^ 0x0002_0000);
        }
        sp.endpoints.sort();
        replaced.push(change(&mut plane, &mut ports, s, sp)?);
    }
    println!(
        "one endpoint replaced: {changes} changes, p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut replaced, 0.5),
        pct(&mut replaced, 0.99)
    );
    // One endpoint removed, or added back (the count changes: the Service's rule too).
    let mut resized = Vec::new();
    for i in 0..changes {
        let s = (i * 104_729 + 1) % services;
        let mut sp = ports[s].clone();
        if sp.endpoints.len() == endpoints {
            sp.endpoints.pop();
        } else {
            sp.endpoints = service_port(s, endpoints).endpoints;
        }
        resized.push(change(&mut plane, &mut ports, s, sp)?);
    }
    println!(
        "one endpoint removed or added: {changes} changes, p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut resized, 0.5),
        pct(&mut resized, 0.99)
    );
    Ok(())
}

/// Apply Service `s`'s new port and time it.
fn change(
    plane: &mut Dataplane<Netlink>,
    ports: &mut [ServicePort],
    s: usize,
    sp: ServicePort,
) -> Result<Duration> {
    let key = format!("bench/svc-{s}");
    let t0 = Instant::now();
    plane
        .update(&[(key, vec![sp.clone()])])
        .context("endpoint change")?;
    let took = t0.elapsed();
    ports[s] = sp;
    Ok(took)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Whether GET / at `addr` answers with `name` (the pod's hostname).
fn answers(addr: SocketAddr, name: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.trim_end().ends_with(name)
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub async fn latency(bin: PathBuf, pods: usize) -> Result<()> {
    let server = Server::start_with(&bin, &["--disable", "kubelet,proxy"])?;
    let client = server.client().await?;
    let _kubelet = crate::podstartup::start_kubelet(&bin, &server, &client).await?;
    let proxy = Proc(
        Command::new(&bin)
            .args(["proxy", "--kubeconfig"])
            .arg(&server.kubeconfig)
            .args(["--node-name", "bench-node"])
            .arg("--table")
            .arg(format!("rkube-bench-proxy-{}", std::process::id()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting rkube proxy")?,
    );
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), "default");
    let svc_api: Api<Service> = Api::namespaced(client.clone(), "default");
    let seen = crate::podstartup::observe(pod_api.clone(), "bench=netprog", ready);
    let (mut to_ready, mut to_reachable, mut gap) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..pods.max(1) {
        let name = format!("np-{i:03}");
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"selector": {"np": name}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))?;
        let svc = svc_api.create(&PostParams::default(), &svc).await?;
        let ip = svc.spec.and_then(|s| s.cluster_ip).context("a ClusterIP")?;
        let addr: SocketAddr = format!("{ip}:80").parse()?;
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"bench": "netprog", "np": name}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": "busybox", "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "mkdir -p /www; hostname > /www/index.html; exec httpd -f -p 8080 -h /www"],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}],
            },
        }))?;
        let created = Instant::now();
        pod_api.create(&PostParams::default(), &pod).await?;
        // Poll the Service until this pod answers through it (a connect alone proves nothing:
        // a network may accept connections to any address), then compare with when the pod
        // was seen Ready.
        let deadline = Instant::now() + Duration::from_secs(120);
        let reachable = loop {
            let want = name.clone();
            let ok = tokio::task::spawn_blocking(move || answers(addr, &want)).await?;
            if ok {
                break Instant::now();
            }
            if Instant::now() > deadline {
                anyhow::bail!("{name} never became reachable through its Service");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let became_ready =
            crate::podstartup::wait_started(&seen, &name, Duration::from_secs(60)).await?;
        to_ready.push(became_ready.saturating_duration_since(created));
        to_reachable.push(reachable.saturating_duration_since(created));
        // Signed: the Service may answer before this client's own watch reports Ready.
        let ms = |t: Instant| t.duration_since(created).as_secs_f64() * 1000.0;
        gap.push(ms(reachable) - ms(became_ready));
    }
    drop(proxy);
    gap.sort_by(f64::total_cmp);
    let at = |p: f64| gap[((gap.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{pods} pods: created -> seen Ready p50 {:.0} ms; created -> reachable through its Service p50 {:.0} ms, p99 {:.0} ms",
        pct(&mut to_ready, 0.5),
        pct(&mut to_reachable, 0.5),
        pct(&mut to_reachable, 0.99)
    );
    println!(
        "network programming (reachable minus seen Ready): p50 {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms",
        at(0.5),
        at(0.99),
        gap[0],
        gap[gap.len() - 1]
    );
    Ok(())
}
