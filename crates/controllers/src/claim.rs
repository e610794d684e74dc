//! Claiming dependents by selector and controller reference (upstream's ControllerRefManager),
//! shared by the ReplicaSet, ReplicationController and Deployment controllers: keep what we
//! control and still select, release what we control and no longer select, adopt orphans we
//! select.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::runtime;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Keep,
    Release,
    Adopt,
    Ignore,
}

/// What an owner with `owner_uid` does with `obj`, given whether its selector matches.
pub fn classify<K: Resource>(
    obj: &K,
    owner_uid: &str,
    matches: bool,
    owner_deleting: bool,
) -> Claim {
    match runtime::controller_ref(obj) {
        Some(r) if r.uid == owner_uid => {
            if matches || owner_deleting {
                Claim::Keep
            } else {
                Claim::Release
            }
        }
        Some(_) => Claim::Ignore,
        None if matches && !owner_deleting && obj.meta().deletion_timestamp.is_none() => {
            Claim::Adopt
        }
        None => Claim::Ignore,
    }
}

/// Add the controller reference (the object's uid pinned, so a replacement of the same name is
/// not adopted by mistake). False if the object changed or went away meanwhile.
pub async fn adopt<K>(api: &Api<K>, obj: &K, owner: OwnerReference) -> anyhow::Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"metadata": {"ownerReferences": [owner], "uid": obj.meta().uid}});
    patch_refs(api, obj, patch).await
}

/// Remove this owner's reference.
pub async fn release<K>(api: &Api<K>, obj: &K, owner_uid: &str) -> anyhow::Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"metadata": {
        "ownerReferences": [{"$patch": "delete", "uid": owner_uid}],
        "uid": obj.meta().uid,
    }});
    patch_refs(api, obj, patch).await
}

async fn patch_refs<K>(api: &Api<K>, obj: &K, patch: serde_json::Value) -> anyhow::Result<bool>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 || e.code == 422 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Merge-patch the status of a `K` named `name` and leave the answer unread: the status
/// writers act on what their informers see next, not on the object the server returns.
pub async fn patch_status_unread<K: Resource<DynamicType = ()>>(
    client: &kube::Client,
    namespace: Option<&str>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    let req = kube::core::Request::new(K::url_path(&(), namespace))
        .patch_subresource(
            "status",
            name,
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(req).await.map(drop)
}

/// A write's result with "not found" counted as done (the object went away meanwhile).
pub fn ok_or_gone<T>(r: Result<T, kube::Error>) -> anyhow::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(owner: Option<&str>) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "ownerReferences": owner.map(|u| vec![
            json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": u, "controller": true})])}})).unwrap()
    }

    #[test]
    fn claims_follow_controller_references_and_selectors() {
        assert_eq!(classify(&pod(Some("me")), "me", true, false), Claim::Keep);
        assert_eq!(
            classify(&pod(Some("me")), "me", false, false),
            Claim::Release
        );
        // An owner being deleted releases nothing (the GC decides).
        assert_eq!(classify(&pod(Some("me")), "me", false, true), Claim::Keep);
        assert_eq!(
            classify(&pod(Some("other")), "me", true, false),
            Claim::Ignore
        );
        assert_eq!(classify(&pod(None), "me", true, false), Claim::Adopt);
        assert_eq!(classify(&pod(None), "me", true, true), Claim::Ignore);
        assert_eq!(classify(&pod(None), "me", false, false), Claim::Ignore);
    }
}
