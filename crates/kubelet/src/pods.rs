//! Pod workers: one task per pod bound to this node, each driving the runtime toward the pod's
//! spec (level-based: every sync looks at what CRI has, never at what it remembers) and writing
//! the status upstream's kubelet writes.
//!
//! A sync: sandbox (with the pod's network), init containers one by one, then the app containers,
//! restarted by restartPolicy with upstream's back-off (10 s doubling to 5 min); then status
//! (phase, conditions, container statuses, IPs). A pod marked for deletion: containers stopped
//! within its grace period, sandbox removed, then the pod object deleted for good.
//!
//! Everything is found again through CRI labels (`io.kubernetes.pod.uid`, ...), so a restarted
//! kubelet adopts the containers it finds and restarts nothing that is healthy.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container as KContainer, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::containerd::Layout;
use crate::cri::{self, Cri};

pub const LABEL_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_CONTAINER: &str = "io.kubernetes.container.name";
/// Which node's kubelet owns a sandbox, so that two nodes sharing one runtime keep apart.
pub const LABEL_NODE: &str = "rkube.io/node";

/// The hash of the container spec a container was created from: a different spec (say, a new
/// image) means the container is replaced.
pub const ANNOTATION_HASH: &str = "io.kubernetes.container.hash";

const BACKOFF_INITIAL: i64 = 10;

/// A short hash of a container's spec, resources left out (they may change in place).
pub fn container_hash(c: &KContainer) -> String {
    let mut c = c.clone();
    c.resources = None;
    let bytes = serde_json::to_vec(&c).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}
const BACKOFF_MAX: i64 = 300;

/// What every pod worker shares.
pub struct Kubelet {
    pub client: Client,
    pub cri: Cri,
    pub node: String,
    pub host_ip: String,
    pub layout: Layout,
    /// The cgroup every pod's cgroup sits under (`/rkube-<tag>`).
    pub cgroup_root: String,
    pub recorder: events::Recorder,
    /// Pods the eviction manager chose, by uid, with the message their status gets.
    pub evicted: Arc<std::sync::Mutex<HashMap<String, String>>>,
    /// Each pod worker's doorbell, by pod uid: the relist rings it when the pod's containers
    /// change state.
    pub wakers: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Whether the pod network (CNI config) is in place; pods with their own network wait.
    pub network_ready: tokio::sync::watch::Receiver<bool>,
    /// The cluster DNS address, once known (configured, or looked up from `kube-dns`).
    pub cluster_dns: std::sync::RwLock<Option<std::net::IpAddr>>,
    pub cluster_domain: String,
    /// The node's resolv.conf, for pods that inherit it.
    pub host_dns: crate::dns::ResolvConf,
}

fn ns_of(pod: &Pod) -> String {
    pod.namespace().unwrap_or_else(|| "default".into())
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn rfc3339(nanos: i64) -> Option<String> {
    if nanos <= 0 {
        return None;
    }
    chrono::DateTime::from_timestamp(nanos / 1_000_000_000, (nanos % 1_000_000_000) as u32)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A container as CRI knows it, with its status.
#[derive(Clone)]
struct Seen {
    status: cri::ContainerStatus,
}

impl Seen {
    fn attempt(&self) -> u32 {
        self.status.metadata.as_ref().map_or(0, |m| m.attempt)
    }
    fn running(&self) -> bool {
        self.status.state == cri::ContainerState::ContainerRunning as i32
    }
    fn exited(&self) -> bool {
        self.status.state == cri::ContainerState::ContainerExited as i32
    }
    fn created(&self) -> bool {
        self.status.state == cri::ContainerState::ContainerCreated as i32
    }
    fn id(&self) -> String {
        format!("containerd://{}", self.status.id)
    }
    fn terminated(&self) -> Value {
        let code = self.status.exit_code;
        let reason = if !self.status.reason.is_empty() {
            self.status.reason.clone()
        } else if code == 0 {
            "Completed".into()
        } else {
            "Error".into()
        };
        let mut t = json!({
            "exitCode": code,
            "reason": reason,
            "startedAt": rfc3339(self.status.started_at),
            "finishedAt": rfc3339(self.status.finished_at),
            "containerID": self.id(),
        });
        if !self.status.message.is_empty() {
            t["message"] = json!(self.status.message);
        }
        t
    }
}

/// Why a container is not running yet, as the worker saw it.
#[derive(Clone, Debug, PartialEq)]
struct Waiting {
    reason: String,
    message: String,
}

/// The per-pod state a worker keeps between syncs (none of it is needed after a restart).
#[derive(Default)]
pub struct Worker {
    waiting: HashMap<String, Waiting>,
    /// Failed pulls per container: how many in a row, and when the last one failed.
    pull_failures: HashMap<String, (u32, tokio::time::Instant)>,
    last_status: Option<Value>,
    start_time: Option<String>,
    /// When each mounted configMap/secret volume was last refreshed.
    volumes_refreshed: Option<tokio::time::Instant>,
    /// Probe state per container name (for the container instance it names).
    probes: HashMap<String, crate::probes::Probes>,
}

/// What a sync asks for next.
pub enum Next {
    /// Sync again after this long (or sooner, on a change).
    After(Duration),
    /// The pod is gone from this node: the worker ends.
    Done,
}

impl Kubelet {
    fn pod_dir(&self, uid: &str) -> std::path::PathBuf {
        self.layout.dir.join("pods").join(uid)
    }

    fn log_dir(&self, pod: &Pod) -> std::path::PathBuf {
        self.layout
            .logs()
            .join(format!("{}_{}_{}", ns_of(pod), pod.name_any(), uid_of(pod)))
    }

    /// The runtime's containers of pod `uid` (every sandbox, every attempt).
    async fn pod_containers(&self, uid: &str) -> cri::Result<Vec<cri::Container>> {
        self.cri
            .containers(cri::ContainerFilter {
                label_selector: [(LABEL_UID.to_string(), uid.to_string())].into(),
                ..Default::default()
            })
            .await
    }

    /// Every container of a pod (all sandboxes, all attempts), newest attempt first per name.
    async fn seen(&self, uid: &str) -> cri::Result<HashMap<String, Vec<Seen>>> {
        let list = self.pod_containers(uid).await?;
        let mut out: HashMap<String, Vec<Seen>> = HashMap::new();
        for c in list {
            let Some(status) = self.cri.container_status(&c.id).await? else {
                continue;
            };
            let name = c.labels.get(LABEL_CONTAINER).cloned().unwrap_or_default();
            out.entry(name).or_default().push(Seen { status });
        }
        for v in out.values_mut() {
            v.sort_by(|a, b| {
                (b.attempt(), b.status.created_at).cmp(&(a.attempt(), a.status.created_at))
            });
        }
        Ok(out)
    }

    async fn sandboxes(&self, uid: &str) -> cri::Result<Vec<cri::PodSandbox>> {
        let mut s = self.cri.sandboxes(&[(LABEL_UID, uid)]).await?;
        s.sort_by_key(|b| std::cmp::Reverse(b.created_at));
        Ok(s)
    }

    /// Stops every container of the pod (SIGTERM, SIGKILL after `grace` seconds), then its
    /// sandboxes; removes them all when `remove`.
    pub async fn kill_pod(&self, uid: &str, grace: i64, remove: bool) -> cri::Result<()> {
        let containers = self.pod_containers(uid).await?;
        let stops = containers
            .iter()
            .filter(|c| c.state != cri::ContainerState::ContainerExited as i32)
            .map(|c| self.cri.stop_container(&c.id, grace.max(0)));
        for r in futures::future::join_all(stops).await {
            tolerate(r)?;
        }
        for s in self.sandboxes(uid).await? {
            tolerate(self.cri.stop_sandbox(&s.id).await)?;
            if remove {
                tolerate(self.cri.remove_sandbox(&s.id).await)?;
            }
        }
        if remove {
            let _ = std::fs::remove_dir_all(self.pod_dir(uid));
            remove_cgroup(&format!("{}/pod{uid}", self.cgroup_root));
        }
        Ok(())
    }

    /// The cluster DNS address: as configured, or the ClusterIP of `kube-system/kube-dns`
    /// (looked up until found).
    async fn cluster_dns(&self) -> Option<std::net::IpAddr> {
        if let Some(ip) = *self.cluster_dns.read().unwrap_or_else(|e| e.into_inner()) {
            return Some(ip);
        }
        let svcs: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(self.client.clone(), "kube-system");
        let ip = svcs
            .get_opt("kube-dns")
            .await
            .ok()
            .flatten()
            .and_then(|s| s.spec?.cluster_ip)
            .and_then(|ip| ip.parse().ok())?;
        *self.cluster_dns.write().unwrap_or_else(|e| e.into_inner()) = Some(ip);
        Some(ip)
    }

    fn sandbox_config(
        &self,
        pod: &Pod,
        attempt: u32,
        dns: Option<std::net::IpAddr>,
    ) -> cri::PodSandboxConfig {
        let spec = pod.spec.clone().unwrap_or_default();
        let uid = uid_of(pod);
        let mut labels: HashMap<String, String> = pod.labels().clone().into_iter().collect();
        labels.insert(LABEL_UID.into(), uid.clone());
        labels.insert(LABEL_NAME.into(), pod.name_any());
        labels.insert(LABEL_NAMESPACE.into(), ns_of(pod));
        labels.insert(LABEL_NODE.into(), self.node.clone());
        let mut ports = Vec::new();
        for c in &spec.containers {
            for p in c.ports.iter().flatten() {
                if let Some(hp) = p.host_port.filter(|p| *p > 0) {
                    ports.push(cri::PortMapping {
                        protocol: match p.protocol.as_deref() {
                            Some("UDP") => cri::Protocol::Udp as i32,
                            Some("SCTP") => cri::Protocol::Sctp as i32,
                            _ => cri::Protocol::Tcp as i32,
                        },
                        container_port: p.container_port,
                        host_port: hp,
                        host_ip: p.host_ip.clone().unwrap_or_default(),
                    });
                }
            }
        }
        let host_network = spec.host_network.unwrap_or(false);
        let hostname = spec
            .hostname
            .clone()
            .unwrap_or_else(|| pod.name_any().chars().take(63).collect());
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.name_any(),
                uid: uid.clone(),
                namespace: ns_of(pod),
                attempt,
            }),
            hostname: if host_network {
                String::new()
            } else {
                hostname
            },
            dns_config: Some(crate::dns::pod_dns(
                &spec,
                &ns_of(pod),
                dns,
                &self.cluster_domain,
                &self.host_dns,
            )),
            log_directory: self.log_dir(pod).display().to_string(),
            port_mappings: ports,
            labels,
            annotations: pod.annotations().clone().into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod{uid}", self.cgroup_root),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if host_network {
                            cri::NamespaceMode::Node as i32
                        } else {
                            cri::NamespaceMode::Pod as i32
                        },
                        pid: if spec.share_process_namespace.unwrap_or(false) {
                            cri::NamespaceMode::Pod as i32
                        } else {
                            cri::NamespaceMode::Container as i32
                        },
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The ready sandbox of the pod, started if there is none (an old one is removed first:
    /// its containers died with it and start again in the new one).
    async fn ensure_sandbox(
        &self,
        pod: &Pod,
    ) -> anyhow::Result<(String, cri::PodSandboxConfig, String)> {
        let uid = uid_of(pod);
        let boxes = self.sandboxes(&uid).await?;
        let attempt = boxes
            .iter()
            .map(|b| b.metadata.as_ref().map_or(0, |m| m.attempt) + 1)
            .max()
            .unwrap_or(0);
        if let Some(b) = boxes
            .iter()
            .find(|b| b.state == cri::PodSandboxState::SandboxReady as i32)
        {
            let attempt = b.metadata.as_ref().map_or(0, |m| m.attempt);
            let ip = self
                .cri
                .sandbox_status(&b.id)
                .await?
                .and_then(|s| s.network)
                .map(|n| n.ip)
                .unwrap_or_default();
            let dns = self.cluster_dns().await;
            return Ok((b.id.clone(), self.sandbox_config(pod, attempt, dns), ip));
        }
        for b in &boxes {
            self.cri.stop_sandbox(&b.id).await?;
            self.cri.remove_sandbox(&b.id).await?;
        }
        let config = self.sandbox_config(pod, attempt, self.cluster_dns().await);
        std::fs::create_dir_all(self.log_dir(pod))?;
        let id = self
            .cri
            .runtime
            .clone()
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        let ip = self
            .cri
            .sandbox_status(&id)
            .await?
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        Ok((id, config, ip))
    }

    /// The value of a `fieldRef` as upstream's downward API resolves it.
    fn field_ref(&self, pod: &Pod, pod_ip: &str, path: &str) -> Option<String> {
        let spec = pod.spec.as_ref();
        Some(match path {
            "metadata.name" => pod.name_any(),
            "metadata.namespace" => ns_of(pod),
            "metadata.uid" => uid_of(pod),
            "spec.nodeName" => self.node.clone(),
            "spec.serviceAccountName" => spec?.service_account_name.clone().unwrap_or_default(),
            "status.podIP" => pod_ip.to_string(),
            "status.hostIP" => self.host_ip.clone(),
            p => {
                let (map, key) = p
                    .strip_prefix("metadata.labels['")
                    .map(|k| (pod.labels(), k))
                    .or_else(|| {
                        p.strip_prefix("metadata.annotations['")
                            .map(|k| (pod.annotations(), k))
                    })?;
                map.get(key.strip_suffix("']")?)
                    .cloned()
                    .unwrap_or_default()
            }
        })
    }

    async fn config_map(&self, ns: &str, name: &str) -> anyhow::Result<Option<ConfigMap>> {
        Ok(Api::<ConfigMap>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await?)
    }

    async fn secret(&self, ns: &str, name: &str) -> anyhow::Result<Option<Secret>> {
        Ok(Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await?)
    }

    /// The container's environment: envFrom first, then env (later entries win), with
    /// fieldRef, resourceFieldRef, configMapKeyRef and secretKeyRef resolved.
    async fn env(
        &self,
        pod: &Pod,
        c: &KContainer,
        pod_ip: &str,
    ) -> anyhow::Result<Vec<cri::KeyValue>> {
        let ns = ns_of(pod);
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(n, _)| *n != k);
            env.push((k, v));
        };
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                match self.config_map(&ns, &r.name).await? {
                    Some(cm) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            set(&mut env, format!("{prefix}{k}"), v);
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => anyhow::bail!("configmap \"{}\" not found", r.name),
                }
            }
            if let Some(r) = &from.secret_ref {
                match self.secret(&ns, &r.name).await? {
                    Some(s) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            set(
                                &mut env,
                                format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into(),
                            );
                        }
                    }
                    None if r.optional == Some(true) => {}
                    None => anyhow::bail!("secret \"{}\" not found", r.name),
                }
            }
        }
        for e in c.env.iter().flatten() {
            let value = match &e.value_from {
                None => e.value.clone().unwrap_or_default(),
                Some(from) => {
                    if let Some(f) = &from.field_ref {
                        self.field_ref(pod, pod_ip, &f.field_path)
                            .unwrap_or_default()
                    } else if let Some(r) = &from.resource_field_ref {
                        resource_field(c, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))
                    } else if let Some(r) = &from.config_map_key_ref {
                        let v = self
                            .config_map(&ns, &r.name)
                            .await?
                            .and_then(|cm| cm.data.and_then(|d| d.get(&r.key).cloned()));
                        match v {
                            Some(v) => v,
                            None if r.optional == Some(true) => continue,
                            None => anyhow::bail!(
                                "couldn't find key {} in ConfigMap {ns}/{}",
                                r.key,
                                r.name
                            ),
                        }
                    } else if let Some(r) = &from.secret_key_ref {
                        let v = self.secret(&ns, &r.name).await?.and_then(|s| {
                            s.data.and_then(|d| {
                                d.get(&r.key).map(|b| String::from_utf8_lossy(&b.0).into())
                            })
                        });
                        match v {
                            Some(v) => v,
                            None if r.optional == Some(true) => continue,
                            None => anyhow::bail!(
                                "couldn't find key {} in Secret {ns}/{}",
                                r.key,
                                r.name
                            ),
                        }
                    } else {
                        String::new()
                    }
                }
            };
            let value = expand(&value, &env);
            set(&mut env, e.name.clone(), value);
        }
        Ok(env
            .into_iter()
            .map(|(key, value)| cri::KeyValue { key, value })
            .collect())
    }

    /// Writes the pod's volumes to disk (emptyDir, configMap, secret, downwardAPI; hostPath
    /// is used in place) and returns each volume's host path.
    async fn volumes(&self, pod: &Pod, refresh: bool) -> anyhow::Result<HashMap<String, String>> {
        let ns = ns_of(pod);
        let base = self.pod_dir(&uid_of(pod)).join("volumes");
        let mut out = HashMap::new();
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let dir = base.join(&v.name);
            if let Some(h) = &v.host_path {
                if h.type_.as_deref() == Some("DirectoryOrCreate") {
                    std::fs::create_dir_all(&h.path)?;
                }
                out.insert(v.name.clone(), h.path.clone());
                continue;
            }
            let fresh = !dir.exists();
            std::fs::create_dir_all(&dir)?;
            out.insert(v.name.clone(), dir.display().to_string());
            if !(fresh || refresh) {
                continue;
            }
            let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut items =
                |map: BTreeMap<String, Vec<u8>>,
                 select: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
                    match select {
                        Some(items) => {
                            for i in items {
                                if let Some(d) = map.get(&i.key) {
                                    files.insert(i.path.clone(), d.clone());
                                }
                            }
                        }
                        None => files.extend(map),
                    }
                };
            if let Some(c) = &v.config_map {
                match self.config_map(&ns, &c.name).await? {
                    Some(cm) => {
                        let mut m: BTreeMap<String, Vec<u8>> = cm
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect();
                        m.extend(
                            cm.binary_data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.0)),
                        );
                        items(m, c.items.as_ref());
                    }
                    None if c.optional == Some(true) => {}
                    None => anyhow::bail!("configmap \"{}\" not found", c.name),
                }
            } else if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                match self.secret(&ns, &name).await? {
                    Some(sec) => items(
                        sec.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0))
                            .collect(),
                        s.items.as_ref(),
                    ),
                    None if s.optional == Some(true) => {}
                    None => anyhow::bail!("secret \"{name}\" not found"),
                }
            } else if let Some(d) = &v.downward_api {
                for i in d.items.iter().flatten() {
                    if let Some(f) = &i.field_ref {
                        let val = self.field_ref(pod, "", &f.field_path).unwrap_or_default();
                        files.insert(i.path.clone(), val.into_bytes());
                    }
                }
            } else {
                continue;
            }
            for (path, data) in &files {
                let target = dir.join(path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                crate::images::write_if_changed(&target, data)?;
            }
            // Keys that went away leave the volume too.
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().to_string();
                    if e.path().is_file() && !files.contains_key(&n) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(out)
    }

    async fn create_container(
        &self,
        pod: &Pod,
        c: &KContainer,
        attempt: u32,
        sandbox: &(String, cri::PodSandboxConfig, String),
        volumes: &HashMap<String, String>,
    ) -> anyhow::Result<String> {
        let image = c.image.clone().unwrap_or_default();
        let mut labels: HashMap<String, String> = HashMap::new();
        labels.insert(LABEL_UID.into(), uid_of(pod));
        labels.insert(LABEL_NAME.into(), pod.name_any());
        labels.insert(LABEL_NAMESPACE.into(), ns_of(pod));
        labels.insert(LABEL_CONTAINER.into(), c.name.clone());
        labels.insert(LABEL_NODE.into(), self.node.clone());
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some(host) = volumes.get(&m.name) else {
                anyhow::bail!("volume {:?} is not defined", m.name);
            };
            let mut host = std::path::PathBuf::from(host);
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                host = host.join(sub);
                if !host.exists() {
                    std::fs::create_dir_all(&host)?;
                }
            }
            mounts.push(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only.unwrap_or(false),
                ..Default::default()
            });
        }
        let sc = c.security_context.clone().unwrap_or_default();
        let psc = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.clone())
            .unwrap_or_default();
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt,
            }),
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs: self.env(pod, c, &sandbox.2).await?,
            mounts,
            labels,
            annotations: [
                (
                    "io.kubernetes.container.restartCount".to_string(),
                    attempt.to_string(),
                ),
                (ANNOTATION_HASH.to_string(), container_hash(c)),
            ]
            .into(),
            log_path: format!("{}/{attempt}.log", c.name),
            stdin: c.stdin.unwrap_or(false),
            stdin_once: c.stdin_once.unwrap_or(false),
            tty: c.tty.unwrap_or(false),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(resources(c)),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged: sc.privileged.unwrap_or(false),
                    readonly_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
                    run_as_user: sc
                        .run_as_user
                        .or(psc.run_as_user)
                        .map(|value| cri::Int64Value { value }),
                    run_as_group: sc
                        .run_as_group
                        .or(psc.run_as_group)
                        .map(|value| cri::Int64Value { value }),
                    supplemental_groups: psc.supplemental_groups.clone().unwrap_or_default(),
                    capabilities: sc.capabilities.as_ref().map(|caps| cri::Capability {
                        add_capabilities: caps.add.clone().unwrap_or_default(),
                        drop_capabilities: caps.drop.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                    namespace_options: sandbox
                        .1
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    no_new_privs: sc.allow_privilege_escalation == Some(false),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let id = self
            .cri
            .runtime
            .clone()
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.0.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox.1.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        self.cri
            .runtime
            .clone()
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        // postStart (exec): a failure kills the container, which restarts by policy.
        if let Some(cmd) = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone())
        {
            let r = self
                .cri
                .runtime
                .clone()
                .exec_sync(cri::ExecSyncRequest {
                    container_id: id.clone(),
                    cmd,
                    timeout: 30,
                })
                .await;
            if !matches!(&r, Ok(resp) if resp.get_ref().exit_code == 0) {
                self.cri.stop_container(&id, 0).await?;
                anyhow::bail!(
                    "PostStartHookError: postStart hook of container {} failed",
                    c.name
                );
            }
        }
        Ok(id)
    }
}

impl Kubelet {
    /// Ends a pod for good: its containers stopped (within `grace` seconds), phase Failed with
    /// `reason` and `message` (eviction, activeDeadlineSeconds).
    async fn fail(&self, pod: &Pod, grace: i64, reason: &str, message: &str) -> anyhow::Result<()> {
        self.kill_pod(&uid_of(pod), grace, false).await?;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns_of(pod));
        let status = json!({"status": {"phase": "Failed", "reason": reason, "message": message}});
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
        Ok(())
    }

    /// Records an event about `pod` (about one of its containers if `container` is given).
    pub fn event(
        &self,
        pod: &Pod,
        container: Option<&str>,
        type_: &str,
        reason: &str,
        message: String,
    ) {
        let mut reference = events::reference(pod);
        reference.field_path = container.map(|c| format!("spec.containers{{{c}}}"));
        self.recorder.record_ref(reference, type_, reason, message);
    }

    /// Runs the preStop hooks (exec) of the pod's running containers, within `grace` seconds.
    async fn pre_stop(&self, pod: &Pod, grace: i64) {
        let Ok(seen) = self.seen(&uid_of(pod)).await else {
            return;
        };
        let hooks = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .filter_map(|c| {
                let cmd = c
                    .lifecycle
                    .as_ref()?
                    .pre_stop
                    .as_ref()?
                    .exec
                    .as_ref()?
                    .command
                    .clone()?;
                let s = seen.get(&c.name)?.first()?.clone();
                s.running().then_some((s.status.id.clone(), cmd))
            });
        let runs = hooks.map(|(id, cmd)| {
            let req = cri::ExecSyncRequest {
                container_id: id,
                cmd,
                timeout: grace.max(1),
            };
            let mut rt = self.cri.runtime.clone();
            async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(grace.max(1) as u64),
                    rt.exec_sync(req),
                )
                .await;
            }
        });
        futures::future::join_all(runs).await;
    }
}

/// The runtime's view, relisted every second (upstream's PLEG): one ListContainers for the
/// whole node; a pod whose containers appeared, vanished or changed state has its worker woken,
/// so settled pods need no polling of their own.
pub async fn relist(k: Arc<Kubelet>) {
    let mut last: HashMap<String, (String, i32)> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let filter = cri::ContainerFilter {
            label_selector: [(LABEL_NODE.to_string(), k.node.clone())].into(),
            ..Default::default()
        };
        let Ok(list) = k.cri.containers(filter).await else {
            continue;
        };
        let now: HashMap<String, (String, i32)> = list
            .into_iter()
            .map(|c| {
                let uid = c.labels.get(LABEL_UID).cloned().unwrap_or_default();
                (c.id, (uid, c.state))
            })
            .collect();
        let mut changed: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for (id, (uid, state)) in &now {
            if last.get(id).map(|(_, s)| s) != Some(state) {
                changed.insert(uid);
            }
        }
        for (id, (uid, _)) in &last {
            if !now.contains_key(id) {
                changed.insert(uid);
            }
        }
        if !changed.is_empty() {
            let wakers = k.wakers.lock().unwrap();
            for uid in changed {
                if let Some(w) = wakers.get(uid) {
                    w.notify_one();
                }
            }
        }
        last = now;
    }
}

/// Removes an (empty) cgroup from every hierarchy it exists in: runc removes the containers'
/// cgroups, the pod's own is ours to remove. Best effort: a busy cgroup stays.
pub fn remove_cgroup(path: &str) {
    let rel = path.trim_start_matches('/');
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join(rel)];
    if let Ok(entries) = std::fs::read_dir(root) {
        dirs.extend(entries.flatten().map(|e| e.path().join(rel)));
    }
    for d in dirs.into_iter().filter(|d| d.is_dir()) {
        let _ = std::fs::remove_dir(&d);
    }
}

/// A stop or remove that lost a race with another one (the object is gone or going) is fine.
fn tolerate(r: cri::Result<()>) -> cri::Result<()> {
    match r {
        Err(cri::Error::Call(s))
            if s.code() == tonic::Code::NotFound
                || s.message().contains("not found")
                || s.message().contains("already in removing state") =>
        {
            Ok(())
        }
        r => r,
    }
}

/// `$(VAR)` references to earlier variables, as upstream expands them (`$$` escapes).
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn quantity(c: &KContainer, which: &str, resource: &str) -> Option<f64> {
    let r = c.resources.as_ref()?;
    let m = if which == "limits" {
        r.limits.as_ref()
    } else {
        r.requests.as_ref()
    }?;
    apimachinery::quantity::parse_quantity(&m.get(resource)?.0)
}

fn resource_field(c: &KContainer, resource: &str, divisor: Option<&str>) -> String {
    let (which, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let value = quantity(c, which, name).unwrap_or(0.0);
    let div = divisor
        .and_then(apimachinery::quantity::parse_quantity)
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    format!("{}", (value / div).ceil() as i64)
}

/// cgroup settings from requests and limits, as upstream's kubelet computes them.
fn resources(c: &KContainer) -> cri::LinuxContainerResources {
    let req_cpu = quantity(c, "requests", "cpu").or_else(|| quantity(c, "limits", "cpu"));
    let lim_cpu = quantity(c, "limits", "cpu");
    let mut r = cri::LinuxContainerResources {
        cpu_shares: req_cpu.map_or(2, |v| ((v * 1024.0) as i64).max(2)),
        ..Default::default()
    };
    if let Some(l) = lim_cpu {
        r.cpu_period = 100_000;
        r.cpu_quota = ((l * 100_000.0) as i64).max(1000);
    }
    if let Some(m) = quantity(c, "limits", "memory") {
        r.memory_limit_in_bytes = m as i64;
    }
    r
}

/// Back-off before restarting a container that has restarted `restarts` times: none for the
/// first restart, then 10 s doubling to 5 min.
pub fn backoff_seconds(restarts: u32) -> i64 {
    if restarts == 0 {
        return 0;
    }
    let shift = (restarts - 1).min(10);
    (BACKOFF_INITIAL << shift).min(BACKOFF_MAX)
}

fn should_restart(policy: &str, exit_code: i32) -> bool {
    match policy {
        "Never" => false,
        "OnFailure" => exit_code != 0,
        _ => true,
    }
}

impl Worker {
    /// Brings the runtime in line with `pod`, then writes its status.
    pub async fn sync(&mut self, k: &Kubelet, pod: &Pod) -> anyhow::Result<Next> {
        let uid = uid_of(pod);
        if let Some(grace) = pod
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|_| pod.metadata.deletion_grace_period_seconds.unwrap_or(30))
        {
            let started = tokio::time::Instant::now();
            for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
                k.event(
                    pod,
                    Some(&c.name),
                    "Normal",
                    "Killing",
                    format!("Stopping container {}", c.name),
                );
            }
            k.pre_stop(pod, grace).await;
            let left = grace - started.elapsed().as_secs() as i64;
            k.kill_pod(&uid, left.max(if grace > 0 { 1 } else { 0 }), true)
                .await?;
            let api: Api<Pod> = Api::namespaced(k.client.clone(), &ns_of(pod));
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&pod.name_any(), &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(Next::Done);
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let eviction = k.evicted.lock().unwrap().get(&uid).cloned();
        if let (Some(message), false) = (eviction, phase == "Failed") {
            k.fail(pod, 0, "Evicted", &message).await?;
            return Ok(Next::After(Duration::from_secs(30)));
        }
        let deadline_passed = spec.active_deadline_seconds.is_some_and(|limit| {
            pod.status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .is_some_and(|t| Timestamp::now().as_second() - t.0.as_second() >= limit)
        });
        if deadline_passed && phase != "Failed" && phase != "Succeeded" {
            let msg = "Pod was active on the node longer than the specified deadline";
            k.event(pod, None, "Normal", "DeadlineExceeded", msg.into());
            let grace = spec.termination_grace_period_seconds.unwrap_or(30);
            k.fail(pod, grace, "DeadlineExceeded", msg).await?;
            return Ok(Next::After(Duration::from_secs(30)));
        }
        if phase == "Succeeded" || phase == "Failed" {
            // Finished: nothing runs again; the sandbox (and its IP) is released.
            k.kill_pod(&uid, 0, false).await?;
            return Ok(Next::After(Duration::from_secs(30)));
        }
        if self.start_time.is_none() {
            self.start_time = pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0.to_string())
                .or_else(|| Some(now()));
        }
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        if !*k.network_ready.borrow() && spec.host_network != Some(true) {
            return self.not_started(k, pod, Duration::from_secs(1)).await;
        }
        let sandbox = match k.ensure_sandbox(pod).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pod = %pod.name_any(), error = %e, "sandbox");
                k.event(
                    pod,
                    None,
                    "Warning",
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {e}"),
                );
                return self.not_started(k, pod, Duration::from_secs(2)).await;
            }
        };
        let refresh = self
            .volumes_refreshed
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5));
        let volumes = k.volumes(pod, refresh).await;
        if refresh {
            self.volumes_refreshed = Some(tokio::time::Instant::now());
        }
        let mut seen = k.seen(&uid).await?;
        let mut started_something = false;
        let init_done = {
            let mut done = true;
            for c in spec.init_containers.iter().flatten() {
                let latest = seen.get(&c.name).and_then(|v| v.first()).cloned();
                match latest {
                    Some(s) if s.exited() && s.status.exit_code == 0 => continue,
                    Some(s) if s.running() || s.created() => {
                        done = false;
                        break;
                    }
                    Some(s) if s.exited() => {
                        done = false;
                        if policy == "Never" {
                            break;
                        }
                        self.restart(k, pod, c, Some(&s), &sandbox, &volumes)
                            .await?;
                        started_something = true;
                        break;
                    }
                    _ => {
                        done = false;
                        self.restart(k, pod, c, None, &sandbox, &volumes).await?;
                        started_something = true;
                        break;
                    }
                }
            }
            done
        };
        if init_done {
            for c in &spec.containers {
                let latest = seen.get(&c.name).and_then(|v| v.first()).cloned();
                match latest {
                    None => {
                        self.restart(k, pod, c, None, &sandbox, &volumes).await?;
                        started_something = true;
                    }
                    Some(s) if s.exited() && should_restart(&policy, s.status.exit_code) => {
                        self.restart(k, pod, c, Some(&s), &sandbox, &volumes)
                            .await?;
                        started_something = true;
                    }
                    Some(s)
                        if !s.exited()
                            && s.status
                                .annotations
                                .get(ANNOTATION_HASH)
                                .is_some_and(|h| *h != container_hash(c)) =>
                    {
                        // The spec changed (e.g. `kubectl set image` on the pod): replace it.
                        let msg =
                            format!("Container {} definition changed, will be restarted", c.name);
                        k.event(pod, Some(&c.name), "Normal", "Killing", msg);
                        let grace = spec.termination_grace_period_seconds.unwrap_or(30);
                        k.cri.stop_container(&s.status.id, grace).await?;
                        self.probes.remove(&c.name);
                        self.start(k, pod, c, s.attempt() + 1, &sandbox, &volumes)
                            .await?;
                        started_something = true;
                    }
                    Some(_) => {
                        self.waiting.remove(&c.name);
                    }
                }
            }
        }
        if started_something {
            seen = k.seen(&uid).await?;
        }
        if self.probe(k, pod, &seen, &sandbox.2).await? {
            seen = k.seen(&uid).await?;
        }
        self.write_status(k, pod, &seen, &sandbox.2).await?;
        // Settled pods wait for a change (the pod watch, or the runtime's relist waking us);
        // pods still starting, backing off or probing look again every second.
        let settled = self.waiting.is_empty()
            && spec.containers.iter().all(|c| {
                c.liveness_probe.is_none()
                    && c.readiness_probe.is_none()
                    && c.startup_probe.is_none()
            })
            && spec.containers.iter().all(|c| {
                seen.get(&c.name)
                    .and_then(|v| v.first())
                    .is_some_and(|s| s.running())
            });
        Ok(Next::After(Duration::from_secs(if settled {
            10
        } else {
            1
        })))
    }

    /// No sandbox yet: every container is ContainerCreating; look again after `wait`.
    async fn not_started(
        &mut self,
        k: &Kubelet,
        pod: &Pod,
        wait: Duration,
    ) -> anyhow::Result<Next> {
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            self.waiting.insert(
                c.name.clone(),
                Waiting {
                    reason: "ContainerCreating".into(),
                    message: String::new(),
                },
            );
        }
        self.write_status(k, pod, &HashMap::new(), "").await?;
        Ok(Next::After(wait))
    }

    /// Notes why container `c` is waiting, with the event upstream records when that changes.
    fn wait(&mut self, k: &Kubelet, pod: &Pod, c: &KContainer, reason: &str, message: String) {
        let changed = self.waiting.get(&c.name).is_none_or(|w| w.reason != reason);
        if changed {
            let image = c.image.clone().unwrap_or_default();
            let (type_, ev_reason, text) = match reason {
                "CrashLoopBackOff" => (
                    "Warning",
                    "BackOff",
                    "Back-off restarting failed container".to_string(),
                ),
                "ImagePullBackOff" => (
                    "Normal",
                    "BackOff",
                    format!("Back-off pulling image \"{image}\""),
                ),
                "ContainerCreating" => ("Warning", "FailedMount", message.clone()),
                _ => ("Warning", "Failed", format!("Error: {reason}: {message}")),
            };
            let text = if reason == "CrashLoopBackOff" {
                format!(
                    "{text} {} in pod {}_{}({})",
                    c.name,
                    pod.name_any(),
                    ns_of(pod),
                    uid_of(pod)
                )
            } else {
                text
            };
            k.event(pod, Some(&c.name), type_, ev_reason, text);
        }
        self.waiting.insert(
            c.name.clone(),
            Waiting {
                reason: reason.into(),
                message,
            },
        );
    }

    /// Runs the due probes of the running app containers; a container that fails its liveness
    /// or startup probe is stopped (and restarted by policy). Returns whether one was stopped.
    async fn probe(
        &mut self,
        k: &Kubelet,
        pod: &Pod,
        seen: &HashMap<String, Vec<Seen>>,
        pod_ip: &str,
    ) -> anyhow::Result<bool> {
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        let mut stopped = false;
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            let Some(s) = seen
                .get(&c.name)
                .and_then(|v| v.first())
                .filter(|s| s.running())
            else {
                self.probes.remove(&c.name);
                continue;
            };
            let p = self
                .probes
                .entry(c.name.clone())
                .or_insert_with(|| crate::probes::Probes::new(&s.status.id));
            if p.container_id != s.status.id {
                *p = crate::probes::Probes::new(&s.status.id);
            }
            if let crate::probes::Verdict::Restart(msg) = p.round(&k.cri, c, pod_ip).await {
                tracing::info!(pod = %pod.name_any(), container = %c.name, "{msg}");
                let probe = if msg.contains("startup") {
                    "Startup"
                } else {
                    "Liveness"
                };
                k.event(
                    pod,
                    Some(&c.name),
                    "Warning",
                    "Unhealthy",
                    format!("{probe} probe failed"),
                );
                k.event(pod, Some(&c.name), "Normal", "Killing", msg.clone());
                k.cri.stop_container(&s.status.id, grace).await?;
                self.probes.remove(&c.name);
                stopped = true;
            }
        }
        Ok(stopped)
    }

    /// Starts container `c` (again, after `last` exited, once its back-off has passed).
    async fn restart(
        &mut self,
        k: &Kubelet,
        pod: &Pod,
        c: &KContainer,
        last: Option<&Seen>,
        sandbox: &(String, cri::PodSandboxConfig, String),
        volumes: &anyhow::Result<HashMap<String, String>>,
    ) -> anyhow::Result<()> {
        let attempt = last.map_or(0, |s| s.attempt() + 1);
        if let Some(s) = last {
            let wait = backoff_seconds(s.attempt());
            let finished = s.status.finished_at / 1_000_000_000;
            let now = chrono::Utc::now().timestamp();
            if finished + wait > now {
                self.wait(
                    k,
                    pod,
                    c,
                    "CrashLoopBackOff",
                    format!(
                        "back-off {wait}s restarting failed container={} pod={}_{}({})",
                        c.name,
                        pod.name_any(),
                        ns_of(pod),
                        uid_of(pod)
                    ),
                );
                return Ok(());
            }
        }
        self.start(k, pod, c, attempt, sandbox, volumes).await
    }

    /// Pulls the image as the pull policy says and creates and starts attempt `attempt` of `c`.
    async fn start(
        &mut self,
        k: &Kubelet,
        pod: &Pod,
        c: &KContainer,
        attempt: u32,
        sandbox: &(String, cri::PodSandboxConfig, String),
        volumes: &anyhow::Result<HashMap<String, String>>,
    ) -> anyhow::Result<()> {
        let volumes = match volumes {
            Ok(v) => v,
            Err(e) => {
                self.wait(
                    k,
                    pod,
                    c,
                    "ContainerCreating",
                    format!("MountVolume.SetUp failed: {e}"),
                );
                return Ok(());
            }
        };
        let image = c.image.clone().unwrap_or_default();
        let pull_policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            if image.ends_with(":latest") || !image.rsplit('/').next().unwrap_or("").contains(':') {
                "Always".into()
            } else {
                "IfNotPresent".into()
            }
        });
        let present = k.cri.image_present(&image).await?.is_some();
        let must_pull = match pull_policy.as_str() {
            "Always" => true,
            "Never" => false,
            _ => !present,
        };
        if pull_policy == "Never" && !present {
            self.wait(
                k,
                pod,
                c,
                "ErrImageNeverPull",
                format!("Container image \"{image}\" is not present with pull policy of Never"),
            );
            return Ok(());
        }
        if must_pull {
            if let Some(&(failures, since)) = self.pull_failures.get(&c.name) {
                if let Some(w) = self.waiting.get(&c.name) {
                    if w.reason == "ErrImagePull" || w.reason == "ImagePullBackOff" {
                        // Back off between pulls as upstream does (10 s doubling).
                        let wait = Duration::from_secs(backoff_seconds(failures) as u64);
                        if since.elapsed() < wait {
                            self.wait(
                                k,
                                pod,
                                c,
                                "ImagePullBackOff",
                                format!("Back-off pulling image \"{image}\""),
                            );
                            return Ok(());
                        }
                    }
                }
            }
            k.event(
                pod,
                Some(&c.name),
                "Normal",
                "Pulling",
                format!("Pulling image \"{image}\""),
            );
            let pull_started = std::time::Instant::now();
            let pulled = k.cri.pull(&image).await;
            if pulled.is_ok() {
                k.event(
                    pod,
                    Some(&c.name),
                    "Normal",
                    "Pulled",
                    format!(
                        "Successfully pulled image \"{image}\" in {:.3}s",
                        pull_started.elapsed().as_secs_f64()
                    ),
                );
            }
            if let Err(e) = pulled {
                let failures = self.pull_failures.get(&c.name).map_or(0, |f| f.0);
                self.pull_failures
                    .insert(c.name.clone(), (failures + 1, tokio::time::Instant::now()));
                self.wait(
                    k,
                    pod,
                    c,
                    "ErrImagePull",
                    format!("failed to pull image \"{image}\": {e}"),
                );
                return Ok(());
            }
            self.pull_failures.remove(&c.name);
        }
        if !must_pull {
            k.event(
                pod,
                Some(&c.name),
                "Normal",
                "Pulled",
                format!("Container image \"{image}\" already present on machine"),
            );
        }
        match k.create_container(pod, c, attempt, sandbox, volumes).await {
            Ok(_) => {
                self.waiting.remove(&c.name);
                k.event(
                    pod,
                    Some(&c.name),
                    "Normal",
                    "Created",
                    format!("Created container {}", c.name),
                );
                k.event(
                    pod,
                    Some(&c.name),
                    "Normal",
                    "Started",
                    format!("Started container {}", c.name),
                );
            }
            Err(e) => {
                tracing::warn!(pod = %pod.name_any(), container = %c.name, error = %e, "start failed");
                self.wait(k, pod, c, "CreateContainerConfigError", e.to_string());
            }
        }
        Ok(())
    }

    fn container_status(
        &self,
        c: &KContainer,
        seen: Option<&Vec<Seen>>,
        policy: &str,
    ) -> (Value, bool) {
        let image = c.image.clone().unwrap_or_default();
        let latest = seen.and_then(|v| v.first());
        let previous = seen.and_then(|v| v.get(1));
        let mut st = json!({"name": c.name, "image": image, "imageID": "", "ready": false, "restartCount": latest.map_or(0, |s| s.attempt()), "started": false});
        let mut ready = false;
        let waiting = self.waiting.get(&c.name);
        match latest {
            Some(s) => {
                st["containerID"] = json!(s.id());
                st["imageID"] = json!(s.status.image_ref);
                if s.running() {
                    st["state"] = json!({"running": {"startedAt": rfc3339(s.status.started_at)}});
                    let probes = self
                        .probes
                        .get(&c.name)
                        .filter(|p| p.container_id == s.status.id);
                    st["started"] = json!(probes.is_some_and(|p| p.started(c)));
                    ready = probes.is_some_and(|p| p.ready(c));
                    st["ready"] = json!(ready);
                    if let Some(p) = previous {
                        st["lastState"] = json!({"terminated": p.terminated()});
                    }
                } else if s.exited() && should_restart(policy, s.status.exit_code) {
                    let w = waiting.cloned().unwrap_or(Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: String::new(),
                    });
                    st["state"] = json!({"waiting": {"reason": w.reason, "message": w.message}});
                    st["lastState"] = json!({"terminated": s.terminated()});
                } else if s.exited() {
                    st["state"] = json!({"terminated": s.terminated()});
                    if let Some(p) = previous {
                        st["lastState"] = json!({"terminated": p.terminated()});
                    }
                } else {
                    st["state"] = json!({"waiting": {"reason": "ContainerCreating"}});
                }
            }
            None => {
                let w = waiting.cloned().unwrap_or(Waiting {
                    reason: "ContainerCreating".into(),
                    message: String::new(),
                });
                let mut wj = json!({"reason": w.reason});
                if !w.message.is_empty() {
                    wj["message"] = json!(w.message);
                }
                st["state"] = json!({ "waiting": wj });
            }
        }
        if st.get("lastState").is_none() {
            st["lastState"] = json!({});
        }
        (st, ready)
    }

    async fn write_status(
        &mut self,
        k: &Kubelet,
        pod: &Pod,
        seen: &HashMap<String, Vec<Seen>>,
        pod_ip: &str,
    ) -> anyhow::Result<()> {
        let spec = pod.spec.clone().unwrap_or_default();
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let mut init_statuses = Vec::new();
        let mut init_pending = false;
        let mut init_failed = false;
        for c in spec.init_containers.iter().flatten() {
            let (mut st, _) = self.container_status(c, seen.get(&c.name), &policy);
            let done = seen
                .get(&c.name)
                .and_then(|v| v.first())
                .is_some_and(|s| s.exited() && s.status.exit_code == 0);
            if done {
                st["ready"] = json!(true);
            } else {
                if seen
                    .get(&c.name)
                    .and_then(|v| v.first())
                    .is_some_and(|s| s.exited())
                    && policy == "Never"
                {
                    init_failed = true;
                }
                init_pending = true;
            }
            init_statuses.push(st);
        }
        let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
        let mut statuses = Vec::new();
        let mut all_ready = !spec.containers.is_empty();
        for c in &spec.containers {
            let (st, ready) = self.container_status(c, seen.get(&c.name), &policy);
            all_ready &= ready;
            if st["state"].get("running").is_some() {
                running += 1;
            } else if let Some(t) = st["state"].get("terminated") {
                stopped += 1;
                if t["exitCode"] == 0 {
                    succeeded += 1;
                }
            } else if st["lastState"].get("terminated").is_some() {
                stopped += 1;
            } else {
                waiting += 1;
            }
            statuses.push(st);
        }
        let phase = if init_failed {
            "Failed"
        } else if init_pending || waiting > 0 {
            "Pending"
        } else if running > 0 {
            "Running"
        } else if stopped > 0 {
            if policy == "Always" {
                "Running"
            } else if stopped == succeeded {
                "Succeeded"
            } else if policy == "Never" {
                "Failed"
            } else {
                "Running"
            }
        } else {
            "Pending"
        };
        let terminal = phase == "Succeeded" || phase == "Failed";
        let old: Vec<Value> = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect();
        let cond = |t: &str, ok: bool, reason: &str| {
            let status = if ok { "True" } else { "False" };
            let since = old
                .iter()
                .find(|c| c["type"] == t && c["status"] == status)
                .and_then(|c| c.get("lastTransitionTime").cloned())
                .unwrap_or_else(|| json!(now()));
            let mut c = json!({"type": t, "status": status, "lastProbeTime": null, "lastTransitionTime": since});
            if !ok && !reason.is_empty() {
                c["reason"] = json!(reason);
            }
            c
        };
        let ready = all_ready && !init_pending && !terminal;
        let mut conditions = vec![
            cond(
                "PodReadyToStartContainers",
                !pod_ip.is_empty() || spec.host_network == Some(true),
                "",
            ),
            cond("Initialized", !init_pending, "ContainersNotInitialized"),
            cond(
                "Ready",
                ready,
                if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                },
            ),
            cond(
                "ContainersReady",
                ready,
                if terminal {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                },
            ),
        ];
        if let Some(s) = old.iter().find(|c| c["type"] == "PodScheduled") {
            conditions.push(s.clone());
        }
        let pod_ip = if spec.host_network == Some(true) {
            k.host_ip.as_str()
        } else {
            pod_ip
        };
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": k.host_ip,
            "hostIPs": [{"ip": k.host_ip}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
            "qosClass": pod.status.as_ref().and_then(|s| s.qos_class.clone()),
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        if !pod_ip.is_empty() {
            status["podIP"] = json!(pod_ip);
            status["podIPs"] = json!([{ "ip": pod_ip }]);
        }
        if self.last_status.as_ref() == Some(&status) {
            return Ok(());
        }
        let api: Api<Pod> = Api::namespaced(k.client.clone(), &ns_of(pod));
        match api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
        {
            Ok(_) => {
                self.last_status = Some(status);
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Runs one pod's worker until the pod is gone from this node: syncs on every change of the
/// pod and at least every `Next::After`.
pub async fn run_worker(
    k: Arc<Kubelet>,
    mut rx: tokio::sync::watch::Receiver<Option<Arc<Pod>>>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut w = Worker::default();
    let mut failures = 0u32;
    let mut uid = String::new();
    loop {
        let pod = rx.borrow_and_update().clone();
        let next = match pod {
            None => break,
            Some(pod) => {
                uid = uid_of(&pod);
                match w.sync(&k, &pod).await {
                    Ok(n) => {
                        failures = 0;
                        n
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(pod = %pod.name_any(), error = %e, "pod sync failed");
                        Next::After(Duration::from_millis(500 * u64::from(failures.min(10))))
                    }
                }
            }
        };
        match next {
            Next::Done => return,
            Next::After(d) => {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { break },
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
    // Deleted from the API without us (a forced delete): the containers go too.
    if !uid.is_empty() {
        if let Err(e) = k.kill_pod(&uid, 2, true).await {
            tracing::warn!(uid = %uid, error = %e, "cleaning up a deleted pod");
        }
    }
}
