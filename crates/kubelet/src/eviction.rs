//! The eviction manager: watches the node's free memory and free disk against hard thresholds
//! (upstream's defaults: `memory.available<100Mi`, `nodefs.available<10%`), reports
//! MemoryPressure / DiskPressure in the node's conditions, and while a threshold is crossed evicts
//! one pod at a time, BestEffort first, then Burstable, then Guaranteed (lower priority first
//! within a class), as upstream ranks them when it has no usage figures to go by.
//!
//! An evicted pod is stopped and ends `Failed` with reason `Evicted`; its controller replaces it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use crate::pods::Kubelet;

/// Hard thresholds (`--eviction-hard`).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Bytes of memory that must stay available.
    pub memory_available: u64,
    /// Share (0-1) of the node's filesystem that must stay free.
    pub nodefs_available: f64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            memory_available: 100 << 20,
            nodefs_available: 0.10,
        }
    }
}

impl Thresholds {
    /// `memory.available<100Mi,nodefs.available<10%` (either may be left out: its default stays).
    pub fn parse(s: &str) -> Result<Thresholds, String> {
        let mut t = Thresholds::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (signal, value) = part
                .split_once('<')
                .ok_or_else(|| format!("{part:?}: expected SIGNAL<QUANTITY"))?;
            let pct = |v: &str| -> Result<f64, String> {
                v.strip_suffix('%')
                    .and_then(|p| p.parse::<f64>().ok())
                    .map(|p| p / 100.0)
                    .ok_or_else(|| format!("{part:?}: expected a percentage"))
            };
            match signal {
                "memory.available" => {
                    t.memory_available = apimachinery::quantity::parse_quantity(value)
                        .filter(|v| *v >= 0.0)
                        .ok_or_else(|| format!("{part:?}: {value:?} is not a quantity"))?
                        as u64
                }
                "nodefs.available" => t.nodefs_available = pct(value)?,
                other => {
                    return Err(format!(
                        "{other}: unknown eviction signal (memory.available, nodefs.available)"
                    ))
                }
            }
        }
        Ok(t)
    }
}

/// Which pressures the node is under now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
}

fn mem_available() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The free share of the filesystem holding `dir` (df: available / size).
fn disk_free_share(dir: &std::path::Path) -> Option<f64> {
    let out = std::process::Command::new("df")
        .args(["-k", "--output=size,avail"])
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text.lines().nth(1)?;
    let mut f = line.split_whitespace().map(|v| v.parse::<f64>().ok());
    let (size, avail) = (f.next()??, f.next()??);
    (size > 0.0).then(|| avail / size)
}

pub fn measure(t: &Thresholds, dir: &std::path::Path) -> Pressure {
    Pressure {
        memory: mem_available().is_some_and(|m| m < t.memory_available),
        disk: disk_free_share(dir).is_some_and(|d| d < t.nodefs_available),
    }
}

fn qos_rank(p: &Pod) -> u8 {
    match p.status.as_ref().and_then(|s| s.qos_class.as_deref()) {
        Some("BestEffort") => 0,
        Some("Burstable") => 1,
        _ => 2,
    }
}

/// The pod to evict first: BestEffort, then Burstable, then Guaranteed; lower priority first;
/// the newest first among equals.
pub fn victim(pods: &[Pod]) -> Option<&Pod> {
    pods.iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            p.metadata.deletion_timestamp.is_none()
                && !matches!(phase, Some("Succeeded") | Some("Failed"))
        })
        .min_by_key(|p| {
            (
                qos_rank(p),
                p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
                std::cmp::Reverse(p.metadata.creation_timestamp.clone().map(|t| t.0)),
            )
        })
}

/// Checks every 5 s (every second while under pressure); publishes the pressure for the node's
/// conditions and marks one victim at a time in `evicted` (the pod's worker stops it).
pub async fn run(
    k: Arc<Kubelet>,
    thresholds: Thresholds,
    dir: PathBuf,
    pressure: tokio::sync::watch::Sender<Pressure>,
    evicted: Arc<Mutex<HashMap<String, String>>>,
) {
    let pods: Api<Pod> = Api::all(k.client.clone());
    loop {
        let now = measure(&thresholds, &dir);
        pressure.send_if_modified(|p| {
            let changed = *p != now;
            *p = now;
            changed
        });
        if now.memory || now.disk {
            let resource = if now.memory {
                "memory"
            } else {
                "ephemeral-storage"
            };
            let lp = ListParams::default().fields(&format!("spec.nodeName={}", k.node));
            if let Ok(list) = pods.list(&lp).await {
                let already: Vec<String> = evicted.lock().unwrap().keys().cloned().collect();
                let candidates: Vec<Pod> = list
                    .items
                    .into_iter()
                    .filter(|p| !already.contains(&p.uid().unwrap_or_default()))
                    .collect();
                if let Some(p) = victim(&candidates) {
                    let message = format!("The node was low on resource: {resource}. ");
                    tracing::warn!(pod = %p.name_any(), %resource, "evicting");
                    k.event(p, None, "Warning", "Evicted", message.clone());
                    evicted
                        .lock()
                        .unwrap()
                        .insert(p.uid().unwrap_or_default(), message);
                }
            }
        }
        let wait = if now.memory || now.disk { 1 } else { 5 };
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, qos: &str, priority: i32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [], "priority": priority},
            "status": {"qosClass": qos, "phase": "Running"},
        }))
        .unwrap()
    }

    #[test]
    fn thresholds() {
        assert_eq!(Thresholds::parse("").unwrap(), Thresholds::default());
        let t = Thresholds::parse("memory.available<1Gi, nodefs.available<5%").unwrap();
        assert_eq!(t.memory_available, 1 << 30);
        assert!((t.nodefs_available - 0.05).abs() < 1e-9);
        assert!(Thresholds::parse("memory.available>1Gi").is_err());
        assert!(Thresholds::parse("pid.available<10").is_err());
        assert!(Thresholds::parse("nodefs.available<ten%").is_err());
    }

    #[test]
    fn victims_in_upstream_order() {
        let pods = vec![
            pod("g", "Guaranteed", 0),
            pod("b-high", "Burstable", 1000),
            pod("b-low", "Burstable", 0),
        ];
        assert_eq!(victim(&pods).unwrap().name_any(), "b-low");
        let mut more = pods.clone();
        more.push(pod("be", "BestEffort", 5000));
        assert_eq!(victim(&more).unwrap().name_any(), "be");
        assert_eq!(victim(&pods[..1]).unwrap().name_any(), "g");
        assert!(victim(&[]).is_none());
    }

    #[test]
    fn impossible_thresholds_mean_pressure() {
        let t = Thresholds {
            memory_available: u64::MAX,
            nodefs_available: 1.1,
        };
        let p = measure(&t, std::path::Path::new("/"));
        assert!(p.memory && p.disk);
        let none = measure(
            &Thresholds {
                memory_available: 0,
                nodefs_available: 0.0,
            },
            std::path::Path::new("/"),
        );
        assert_eq!(none, Pressure::default());
    }
}
