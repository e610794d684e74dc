//! The endpoints and EndpointSlice controllers (one reconcile writes both): for every Service
//! with a selector, the pods it selects with their IPs, ready or not, named target ports
//! resolved per pod, `publishNotReadyAddresses` honoured; slices also carry terminating pods,
//! node names and zones, at most 100 endpoints each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::claim::ok_or_gone;
use crate::replicaset::owner_ref;
use crate::runtime::{self, Informer, Queue};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const MAX_PER_SLICE: usize = 100;

pub struct EndpointsController {
    client: Client,
    services: Arc<Informer<Service>>,
    pods: Arc<Informer<Pod>>,
    nodes: Arc<Informer<Node>>,
    endpoints: Arc<Informer<Endpoints>>,
    slices: Arc<Informer<EndpointSlice>>,
    queue: Arc<Queue>,
}

fn selector(svc: &Service) -> Option<&BTreeMap<String, String>> {
    svc.spec
        .as_ref()?
        .selector
        .as_ref()
        .filter(|s| !s.is_empty())
}

fn selects(svc: &Service, pod: &Pod) -> bool {
    let labels = pod.labels();
    selector(svc).is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// A service port's target on one pod: a number, or a named container port looked up.
pub(crate) fn resolve_port(target: Option<&IntOrString>, port: i32, pod: &Pod) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(i)) => Some(*i),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse() {
                return Some(n);
            }
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port)
            })
        }
    }
}

/// One endpoint as both objects need it.
#[derive(Clone)]
struct Ep {
    ip: String,
    node: Option<String>,
    zone: Option<String>,
    hostname: Option<String>,
    pod: Value,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// (name, port, protocol) per service port, resolved for one pod.
type PortSet = Vec<(String, i32, String)>;

impl EndpointsController {
    pub fn new(
        client: Client,
        services: Arc<Informer<Service>>,
        pods: Arc<Informer<Pod>>,
        nodes: Arc<Informer<Node>>,
        endpoints: Arc<Informer<Endpoints>>,
        slices: Arc<Informer<EndpointSlice>>,
    ) -> Arc<Self> {
        let ec = Arc::new(EndpointsController {
            client,
            services: services.clone(),
            pods: pods.clone(),
            nodes,
            endpoints: endpoints.clone(),
            slices: slices.clone(),
            queue: Queue::new(),
        });
        let q = ec.queue.clone();
        services.on(move |old, new| {
            if let Some(s) = new.or(old) {
                q.add(runtime::key_of(s));
            }
        });
        let weak = Arc::downgrade(&ec);
        pods.on(move |old, new| {
            let Some(ec) = weak.upgrade() else { return };
            let ns = new.or(old).and_then(|p| p.namespace()).unwrap_or_default();
            for svc in ec.services.list_namespace(&ns) {
                if old.is_some_and(|p| selects(&svc, p)) || new.is_some_and(|p| selects(&svc, p)) {
                    ec.queue.add(runtime::key_of(&*svc));
                }
            }
        });
        // Someone else changed what we keep: put it back.
        let q = ec.queue.clone();
        endpoints.on(move |_old, new| {
            if let Some(e) = new {
                q.add(runtime::key_of(e));
            }
        });
        let q = ec.queue.clone();
        slices.on(move |old, new| {
            if let Some(s) = new.or(old) {
                if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
                    q.add(format!("{}/{svc}", s.namespace().unwrap_or_default()));
                }
            }
        });
        ec
    }

    pub async fn run(self: Arc<Self>, workers: usize) {
        self.services.wait_synced().await;
        self.pods.wait_synced().await;
        self.nodes.wait_synced().await;
        self.endpoints.wait_synced().await;
        self.slices.wait_synced().await;
        for s in self.services.list() {
            self.queue.add(runtime::key_of(&*s));
        }
        let me = self.clone();
        self.queue
            .clone()
            .run(workers, "endpoints", move |key| {
                let me = me.clone();
                async move { me.sync(&key).await }
            })
            .await;
    }

    async fn sync(&self, key: &str) -> anyhow::Result<Option<Duration>> {
        let (ns, name) = runtime::split_key(key);
        let ns = ns.unwrap_or_default();
        let ep_api: Api<Endpoints> = Api::namespaced(self.client.clone(), ns);
        let Some(svc) = self.services.get(key) else {
            // The Service is gone: so are its Endpoints (slices go by ownerReference).
            if self.endpoints.get(key).is_some_and(|e| !is_apiserver(&e)) {
                ok_or_gone(ep_api.delete(name, &DeleteParams::default()).await)?
            }
            return Ok(None);
        };
        if selector(&svc).is_none() {
            return Ok(None);
        }
        let spec = svc.spec.clone().unwrap_or_default();
        let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
        // Group endpoints by their resolved ports.
        let mut groups: BTreeMap<PortSet, Vec<Ep>> = BTreeMap::new();
        let mut pods: Vec<Arc<Pod>> = self
            .pods
            .list_namespace(ns)
            .into_iter()
            .filter(|p| selects(&svc, p))
            .collect();
        pods.sort_by_key(|p| p.name_any());
        for pod in pods {
            let status = pod.status.clone().unwrap_or_default();
            let Some(ip) = status.pod_ip.clone().filter(|i| !i.is_empty()) else {
                continue;
            };
            if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                continue;
            }
            let ready = crate::pods::is_ready(&pod);
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let zone = node
                .as_ref()
                .and_then(|n| self.nodes.get(n))
                .and_then(|n| n.labels().get("topology.kubernetes.io/zone").cloned());
            let pspec = pod.spec.clone().unwrap_or_default();
            let hostname = match (&pspec.hostname, &pspec.subdomain) {
                (Some(h), Some(sd)) if *sd == name => Some(h.clone()),
                _ => None,
            };
            let mut ports: PortSet = Vec::new();
            for sp in spec.ports.iter().flatten() {
                if let Some(p) = resolve_port(sp.target_port.as_ref(), sp.port, &pod) {
                    ports.push((
                        sp.name.clone().unwrap_or_default(),
                        p,
                        sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    ));
                }
            }
            groups.entry(ports).or_default().push(Ep {
                ip,
                node,
                zone,
                hostname,
                pod: json!({"kind": "Pod", "namespace": ns, "name": pod.name_any(), "uid": pod.metadata.uid}),
                ready: ready || publish_not_ready,
                serving: ready || publish_not_ready,
                terminating,
            });
        }
        self.write_endpoints(&svc, &groups, publish_not_ready)
            .await?;
        self.write_slices(&svc, &groups).await?;
        Ok(None)
    }

    async fn write_endpoints(
        &self,
        svc: &Service,
        groups: &BTreeMap<PortSet, Vec<Ep>>,
        publish_not_ready: bool,
    ) -> anyhow::Result<()> {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let mut subsets = Vec::new();
        for (ports, eps) in groups {
            let addr = |e: &Ep| {
                let mut a = json!({"ip": e.ip, "targetRef": e.pod});
                if let Some(n) = &e.node {
                    a["nodeName"] = json!(n);
                }
                if let Some(h) = &e.hostname {
                    a["hostname"] = json!(h);
                }
                a
            };
            let live: Vec<&Ep> = eps
                .iter()
                .filter(|e| !e.terminating || publish_not_ready)
                .collect();
            let ready: Vec<Value> = live.iter().filter(|e| e.ready).map(|e| addr(e)).collect();
            let not_ready: Vec<Value> = live.iter().filter(|e| !e.ready).map(|e| addr(e)).collect();
            if ready.is_empty() && not_ready.is_empty() {
                continue;
            }
            let ports: Vec<Value> = ports
                .iter()
                .map(|(n, p, proto)| {
                    let mut v = json!({"port": p, "protocol": proto});
                    if !n.is_empty() {
                        v["name"] = json!(n);
                    }
                    v
                })
                .collect();
            let mut subset = json!({"ports": ports});
            if !ready.is_empty() {
                subset["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(not_ready);
            }
            subsets.push(subset);
        }
        let mut labels: BTreeMap<String, String> = svc.labels().clone();
        if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
            labels.insert("service.kubernetes.io/headless".into(), String::new());
        }
        let want_subsets: Value = json!(subsets);
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &ns);
        let key = format!("{ns}/{name}");
        let current = self.endpoints.get(&key);
        let same = current.as_ref().is_some_and(|cur| {
            let subs = serde_json::to_value(cur.subsets.clone().unwrap_or_default())
                .unwrap_or(Value::Null);
            subs == want_subsets && cur.labels() == &labels
        });
        if same {
            return Ok(());
        }
        let mut ep: Endpoints = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "subsets": want_subsets,
        }))?;
        match current {
            Some(cur) => {
                ep.metadata.resource_version = cur.metadata.resource_version.clone();
                match api.replace(&name, &PostParams::default(), &ep).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            None => match api.create(&PostParams::default(), &ep).await {
                Ok(_) => Ok(()),
                // Created meanwhile, or the namespace is terminating: the watch brings us back.
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 403 => Ok(()),
                Err(e) => Err(e.into()),
            },
        }
    }

    async fn write_slices(
        &self,
        svc: &Service,
        groups: &BTreeMap<PortSet, Vec<Ep>>,
    ) -> anyhow::Result<()> {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let uid = svc.metadata.uid.clone().unwrap_or_default();
        let mut want: Vec<Value> = Vec::new();
        for (ports, eps) in groups {
            let ports: Vec<Value> = ports
                .iter()
                .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
                .collect();
            for chunk in eps.chunks(MAX_PER_SLICE) {
                let endpoints: Vec<Value> = chunk
                    .iter()
                    .map(|e| {
                        let mut v = json!({"addresses": [e.ip], "targetRef": e.pod,
                            "conditions": {"ready": e.ready && !e.terminating, "serving": e.serving, "terminating": e.terminating}});
                        if let Some(n) = &e.node {
                            v["nodeName"] = json!(n);
                        }
                        if let Some(z) = &e.zone {
                            v["zone"] = json!(z);
                        }
                        if let Some(h) = &e.hostname {
                            v["hostname"] = json!(h);
                        }
                        v
                    })
                    .collect();
                want.push(json!({"endpoints": endpoints, "ports": ports}));
            }
        }
        if want.is_empty() {
            // A service with no endpoints still has one (empty) slice, as upstream keeps.
            let ports: Vec<Value> = svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.clone())
                .unwrap_or_default()
                .iter()
                .filter(|p| matches!(p.target_port, None | Some(IntOrString::Int(_))))
                .map(|p| {
                    let port = match &p.target_port {
                        Some(IntOrString::Int(i)) => *i,
                        _ => p.port,
                    };
                    json!({"name": p.name.clone().unwrap_or_default(), "port": port, "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into())})
                })
                .collect();
            want.push(json!({"endpoints": [], "ports": ports}));
        }
        let mut existing: Vec<Arc<EndpointSlice>> = self
            .slices
            .list_namespace(&ns)
            .into_iter()
            .filter(|s| {
                s.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                    && s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
            })
            .collect();
        existing.sort_by_key(|s| s.name_any());
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
        let mut labels: BTreeMap<String, String> = svc.labels().clone();
        labels.insert(SERVICE_NAME_LABEL.into(), name.clone());
        labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
        for (i, w) in want.iter().enumerate() {
            let body = |meta: Value| -> anyhow::Result<EndpointSlice> {
                Ok(serde_json::from_value(json!({
                    "metadata": meta, "addressType": "IPv4",
                    "endpoints": w["endpoints"], "ports": w["ports"],
                }))?)
            };
            match existing.get(i) {
                Some(cur) => {
                    let cur_v = json!({
                        "endpoints": serde_json::to_value(&cur.endpoints)?,
                        "ports": serde_json::to_value(cur.ports.clone().unwrap_or_default())?,
                    });
                    if &cur_v == w && cur.labels() == &labels {
                        continue;
                    }
                    let slice = body(
                        json!({"name": cur.name_any(), "namespace": ns, "labels": labels,
                        "ownerReferences": [owner_ref(svc, &uid)],
                        "resourceVersion": cur.metadata.resource_version}),
                    )?;
                    ok_or_gone(
                        api.replace(&cur.name_any(), &PostParams::default(), &slice)
                            .await,
                    )?
                }
                None => {
                    let slice = body(
                        json!({"generateName": format!("{name}-"), "namespace": ns, "labels": labels,
                        "ownerReferences": [owner_ref(svc, &uid)]}),
                    )?;
                    match api.create(&PostParams::default(), &slice).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 403 || e.code == 409 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        for extra in existing.iter().skip(want.len()) {
            ok_or_gone(
                api.delete(&extra.name_any(), &DeleteParams::default())
                    .await,
            )?
        }
        Ok(())
    }
}

/// The API server's own `kubernetes` endpoints are not ours to delete.
fn is_apiserver(e: &Endpoints) -> bool {
    e.name_any() == "kubernetes" && e.namespace().as_deref() == Some("default")
}

/// Count ready addresses in an Endpoints object (for tests and tools).
pub fn ready_ips(e: &Endpoints) -> Vec<String> {
    let mut ips: Vec<String> = e
        .subsets
        .iter()
        .flatten()
        .flat_map(|s| s.addresses.iter().flatten().map(|a| a.ip.clone()))
        .collect();
    ips.sort();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ports: Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "ports": ports}]}})).unwrap()
    }

    #[test]
    fn named_ports_resolve_per_pod() {
        let p = pod(json!([{"name": "http", "containerPort": 8080}]));
        assert_eq!(
            resolve_port(Some(&IntOrString::String("http".into())), 80, &p),
            Some(8080)
        );
        assert_eq!(
            resolve_port(Some(&IntOrString::String("grpc".into())), 80, &p),
            None
        );
        assert_eq!(
            resolve_port(Some(&IntOrString::Int(9090)), 80, &p),
            Some(9090)
        );
        assert_eq!(resolve_port(None, 80, &p), Some(80));
    }

    #[test]
    fn services_select_by_every_label() {
        let svc: Service = serde_json::from_value(
            json!({"metadata": {"name": "s"}, "spec": {"selector": {"app": "a", "tier": "t"}}}),
        )
        .unwrap();
        let mut p = pod(json!([]));
        p.metadata.labels = Some([("app".to_string(), "a".to_string())].into());
        assert!(!selects(&svc, &p));
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("tier".into(), "t".into());
        assert!(selects(&svc, &p));
        let none: Service =
            serde_json::from_value(json!({"metadata": {"name": "s"}, "spec": {}})).unwrap();
        assert!(!selects(&none, &p));
    }
}
