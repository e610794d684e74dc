//! The namespace controller: when a namespace is being deleted, delete everything in it, then
//! remove the `kubernetes` finalizer through `/finalize` so that the API server can remove it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::{verbs, Discovery, Scope};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

struct Ctx {
    client: Client,
}

/// The finalizer this controller owns.
const FINALIZER: &str = "kubernetes";

pub async fn run(client: Client) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ctx = Arc::new(Ctx { client });
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "namespace reconcile");
            }
        })
        .await;
}

fn error_policy(_ns: Arc<Namespace>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "namespace controller: will retry");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if ns.metadata.deletion_timestamp.is_none() {
        return Ok(Action::await_change());
    }
    let has_finalizer = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.as_ref())
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER));
    if !has_finalizer {
        return Ok(Action::await_change());
    }
    let name = ns.name_any();
    let remaining = delete_contents(&ctx.client, &name).await?;
    if remaining > 0 {
        tracing::debug!(namespace = %name, remaining, "namespace still has content");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut finalized = (*ns).clone();
    if let Some(spec) = finalized.spec.as_mut() {
        if let Some(f) = spec.finalizers.as_mut() {
            f.retain(|x| x != FINALIZER);
        }
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    match api
        .replace_subresource("finalize", &name, &PostParams::default(), &finalized)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(namespace = %name, "namespace finalized");
    Ok(Action::await_change())
}

/// Delete every namespaced object in `ns`; returns how many remain.
async fn delete_contents(client: &Client, ns: &str) -> Result<usize, Error> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut remaining = 0;
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if caps.scope != Scope::Namespaced || !caps.supports_operation(verbs::LIST) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            if caps.supports_operation(verbs::DELETE_COLLECTION) {
                match api
                    .delete_collection(&DeleteParams::background(), &ListParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 405 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            remaining += api
                .list_metadata(&ListParams::default().limit(1))
                .await?
                .items
                .len();
        }
    }
    Ok(remaining)
}
