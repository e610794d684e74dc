//! Events, recorded as upstream's components record them (core/v1 Events that `kubectl
//! describe` and `kubectl get events` show): a bounded queue, written in the background, never
//! blocking or failing a reconcile or a pod sync. Shared by the controllers and the kubelet.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use kube::api::PostParams;
use kube::{Client, Resource, ResourceExt};

/// Records events for one component (`source.component`).
#[derive(Clone)]
pub struct Recorder {
    tx: tokio::sync::mpsc::Sender<Event>,
    component: &'static str,
    /// `source.host`: the node, for a kubelet's events.
    host: Option<String>,
}

impl Recorder {
    pub fn new(client: Client, component: &'static str) -> Recorder {
        Recorder::with_limits(client, component, 4096, 8)
    }

    /// A recorder that queues up to `queue` events and writes up to `inflight` at once.
    pub fn with_limits(
        client: Client,
        component: &'static str,
        queue: usize,
        inflight: usize,
    ) -> Recorder {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(queue);
        tokio::spawn(async move {
            let inflight = Arc::new(tokio::sync::Semaphore::new(inflight));
            while let Some(ev) = rx.recv().await {
                let Ok(permit) = inflight.clone().acquire_owned().await else {
                    return;
                };
                let client = client.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = post(&client, &ev).await {
                        tracing::debug!(error = %e, "could not record an event");
                    }
                });
            }
        });
        Recorder {
            tx,
            component,
            host: None,
        }
    }

    /// The same queue, reporting as another component (`deployment-controller`, ...).
    pub fn named(&self, component: &'static str) -> Recorder {
        Recorder {
            tx: self.tx.clone(),
            component,
            host: self.host.clone(),
        }
    }

    /// The same queue, reporting from node `host`.
    pub fn on_host(&self, host: &str) -> Recorder {
        Recorder {
            host: Some(host.into()),
            ..self.clone()
        }
    }

    /// Record `reason`/`message` (type Normal or Warning) about `obj`.
    pub fn record<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: &str,
        reason: &str,
        message: String,
    ) {
        self.record_ref(reference(obj), type_, reason, message);
    }

    pub fn record_ref(
        &self,
        reference: ObjectReference,
        type_: &str,
        reason: &str,
        message: String,
    ) {
        let now = chrono::Utc::now();
        let ts = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let ns = reference
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        let name = reference.name.clone().unwrap_or_default();
        let ev = Event {
            metadata: kube::api::ObjectMeta {
                name: Some(format!(
                    "{name}.{:x}",
                    now.timestamp_nanos_opt().unwrap_or(0)
                )),
                namespace: Some(ns),
                ..Default::default()
            },
            involved_object: reference,
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some(type_.into()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some(self.component.into()),
                host: self.host.clone(),
            }),
            reporting_component: Some(self.component.into()),
            reporting_instance: Some(self.host.clone().unwrap_or_else(|| self.component.into())),
            first_timestamp: Some(ts.clone()),
            last_timestamp: Some(ts),
            count: Some(1),
            ..Default::default()
        };
        // A full queue drops the event, as upstream's broadcaster does.
        let _ = self.tx.try_send(ev);
    }
}

/// POST one Event. The created Event the server answers with is not decoded: nobody reads it.
async fn post(client: &Client, ev: &Event) -> Result<(), kube::Error> {
    let ns = ev.metadata.namespace.as_deref().unwrap_or_default();
    let url = Event::url_path(&(), Some(ns));
    let body = serde_json::to_vec(ev).map_err(kube::Error::SerdeError)?;
    let req = kube::core::Request::new(url)
        .create(&PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(req).await.map(drop)
}

/// The reference an event about `obj` carries (add a `field_path` to point into it).
pub fn reference<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: obj.meta().name.clone(),
        namespace: obj.meta().namespace.clone(),
        uid: obj.meta().uid.clone(),
        resource_version: obj.meta().resource_version.clone(),
        ..Default::default()
    }
}

/// `kind/name` of an object for messages.
pub fn describe<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!("{}/{}", K::kind(&()).to_lowercase(), obj.name_any())
}
