//! The ServiceAccount controller: every active namespace has a `default` ServiceAccount; it is
//! created with the namespace and again if someone deletes it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use crate::namespace::Error;

const DEFAULT: &str = "default";

pub async fn run(client: Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let accounts: Api<ServiceAccount> = Api::all(client.clone());
    Controller::new(namespaces, watcher::Config::default())
        // A deleted `default` account brings its namespace back to the reconciler.
        .watches(accounts, watcher::Config::default(), |sa| {
            (sa.name_any() == DEFAULT)
                .then(|| ObjectRef::<Namespace>::new(sa.namespace().as_deref().unwrap_or_default()))
        })
        .run(reconcile, error_policy, Arc::new(client))
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "serviceaccount reconcile");
            }
        })
        .await;
}

fn error_policy(_ns: Arc<Namespace>, err: &Error, _client: Arc<Client>) -> Action {
    tracing::warn!(error = %err, "serviceaccount controller: will retry");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(ns: Arc<Namespace>, client: Arc<Client>) -> Result<Action, Error> {
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    if terminating {
        return Ok(Action::await_change());
    }
    let api: Api<ServiceAccount> = Api::namespaced((*client).clone(), &ns.name_any());
    if api.get_opt(DEFAULT).await?.is_some() {
        return Ok(Action::await_change());
    }
    let sa = ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some(DEFAULT.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => tracing::info!(namespace = %ns.name_any(), "created the default service account"),
        // Already there, or the namespace started terminating meanwhile: nothing to do.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 403 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}
