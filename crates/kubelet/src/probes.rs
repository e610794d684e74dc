//! Liveness, readiness and startup probes (exec, httpGet, tcpSocket) with upstream's timing
//! fields: initialDelaySeconds, periodSeconds, timeoutSeconds, successThreshold,
//! failureThreshold. State is per container instance: a restarted container starts over.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::cri::{self, Cri};

/// One probe's running tally.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    successes: i32,
    failures: i32,
    last: Option<Instant>,
    /// The settled result: None until the thresholds decide.
    pub result: Option<bool>,
}

/// The probes of one container instance.
#[derive(Debug, Clone)]
pub struct Probes {
    pub container_id: String,
    pub started: Instant,
    pub startup: Tally,
    pub liveness: Tally,
    pub readiness: Tally,
}

/// What the worker must do after a round of probing.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Fine,
    /// Liveness or startup failed: restart the container (with this message).
    Restart(String),
}

impl Probes {
    pub fn new(container_id: &str) -> Probes {
        Probes {
            container_id: container_id.into(),
            started: Instant::now(),
            startup: Tally::default(),
            liveness: Tally::default(),
            readiness: Tally::default(),
        }
    }

    /// Whether the container counts as started (its startup probe passed, or it has none).
    pub fn started(&self, c: &Container) -> bool {
        c.startup_probe.is_none() || self.startup.result == Some(true)
    }

    /// Whether the container is ready (readiness passed, or none and started).
    pub fn ready(&self, c: &Container) -> bool {
        self.started(c)
            && match c.readiness_probe {
                None => true,
                Some(_) => self.readiness.result == Some(true),
            }
    }

    /// Runs the probes that are due.
    pub async fn round(&mut self, cri: &Cri, c: &Container, pod_ip: &str) -> Verdict {
        if let Some(p) = &c.startup_probe {
            if self.startup.result != Some(true) {
                if let Some(ok) = due(
                    &mut self.startup,
                    p,
                    self.started,
                    cri,
                    c,
                    &self.container_id,
                    pod_ip,
                )
                .await
                {
                    if !ok && self.startup.result == Some(false) {
                        return Verdict::Restart(format!(
                            "Container {} failed startup probe, will be restarted",
                            c.name
                        ));
                    }
                }
                return Verdict::Fine;
            }
        }
        if let Some(p) = &c.readiness_probe {
            due(
                &mut self.readiness,
                p,
                self.started,
                cri,
                c,
                &self.container_id,
                pod_ip,
            )
            .await;
        }
        if let Some(p) = &c.liveness_probe {
            if let Some(false) = due(
                &mut self.liveness,
                p,
                self.started,
                cri,
                c,
                &self.container_id,
                pod_ip,
            )
            .await
            {
                if self.liveness.result == Some(false) {
                    return Verdict::Restart(format!(
                        "Container {} failed liveness probe, will be restarted",
                        c.name
                    ));
                }
            }
        }
        Verdict::Fine
    }
}

fn secs(v: Option<i32>, default: i32) -> i32 {
    v.filter(|v| *v > 0).unwrap_or(default)
}

/// Runs `p` if it is due; returns its outcome (None if it was not due).
async fn due(
    t: &mut Tally,
    p: &Probe,
    started: Instant,
    cri: &Cri,
    c: &Container,
    container_id: &str,
    pod_ip: &str,
) -> Option<bool> {
    let delay = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
    let period = Duration::from_secs(secs(p.period_seconds, 10) as u64);
    if started.elapsed() < delay || t.last.is_some_and(|l| l.elapsed() < period) {
        return None;
    }
    t.last = Some(Instant::now());
    let timeout = Duration::from_secs(secs(p.timeout_seconds, 1) as u64);
    let ok = probe(p, timeout, cri, c, container_id, pod_ip).await;
    if ok {
        t.successes += 1;
        t.failures = 0;
        if t.successes >= secs(p.success_threshold, 1) {
            t.result = Some(true);
        }
    } else {
        t.failures += 1;
        t.successes = 0;
        if t.failures >= secs(p.failure_threshold, 3) {
            t.result = Some(false);
        }
    }
    Some(ok)
}

fn port(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

async fn probe(
    p: &Probe,
    timeout: Duration,
    cri: &Cri,
    c: &Container,
    container_id: &str,
    pod_ip: &str,
) -> bool {
    if let Some(e) = &p.exec {
        let req = cri::ExecSyncRequest {
            container_id: container_id.into(),
            cmd: e.command.clone().unwrap_or_default(),
            timeout: timeout.as_secs() as i64,
        };
        let r = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            cri.runtime.clone().exec_sync(req),
        )
        .await;
        return matches!(r, Ok(Ok(resp)) if resp.get_ref().exit_code == 0);
    }
    if let Some(h) = &p.http_get {
        let Some(port) = port(c, &h.port) else {
            return false;
        };
        let host = h
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| pod_ip.to_string());
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
        );
        for hd in h.http_headers.iter().flatten() {
            req.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
        }
        req.push_str("\r\n");
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .ok()?;
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = vec![0u8; 64];
            let n = s.read(&mut buf).await.ok()?;
            let line = String::from_utf8_lossy(&buf[..n]).to_string();
            let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        };
        return matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)));
    }
    if let Some(t) = &p.tcp_socket {
        let Some(port) = port(c, &t.port) else {
            return false;
        };
        let host = t
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| pod_ip.to_string());
        return matches!(
            tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((host.as_str(), port))
            )
            .await,
            Ok(Ok(_))
        );
    }
    // A probe with no handler (grpc is not supported here) never passes.
    false
}
