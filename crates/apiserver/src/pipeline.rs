//! The request pipeline's stages: authentication, authorization, admission.
//!
//! Today: client certificates authenticate (CN = user, O = groups); members of `system:masters`
//! are authorized for everything and nobody else for anything; admission runs NamespaceLifecycle.
//! RBAC, tokens and quotas plug in here without reshaping the handler.

use std::sync::Arc;

use apimachinery::ApiError;
use rustls::pki_types::CertificateDer;
use store::Store;

use crate::registry::{lookup, Kind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

/// The identity a TLS connection proved, if any.
pub fn authenticate_connection(certs: Option<&[CertificateDer<'_>]>) -> Option<Arc<UserInfo>> {
    let leaf = certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_string();
    let mut groups: Vec<String> = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(String::from))
        .collect();
    groups.push("system:authenticated".into());
    Some(Arc::new(UserInfo { name, groups }))
}

/// Paths anyone may read, as upstream's `system:public-info-viewer` allows.
pub fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/livez" | "/readyz" | "/version" | "/version/"
    ) || path.starts_with("/healthz/")
        || path.starts_with("/livez/")
        || path.starts_with("/readyz/")
}

/// What a request wants to do, for authorization and admission.
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub kind: &'a Kind,
    pub namespace: Option<&'a str>,
    pub subresource: Option<&'a str>,
}

pub fn authorize(user: &UserInfo, attrs: &Attributes<'_>) -> Result<(), ApiError> {
    if user.groups.iter().any(|g| g == "system:masters") {
        return Ok(());
    }
    let resource = match attrs.subresource {
        Some(s) => format!("{}/{}", attrs.kind.plural, s),
        None => attrs.kind.plural.to_string(),
    };
    let scope = match attrs.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    Err(ApiError::forbidden(format!(
        "{} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\"{}",
        attrs.kind.qualified(),
        user.name,
        attrs.verb,
        resource,
        attrs.kind.group,
        scope
    ))
    .on(attrs.kind.group, attrs.kind.plural, ""))
}

/// Namespaces that always exist and cannot be deleted.
pub const IMMORTAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// NamespaceLifecycle: no new objects in a namespace that is missing or terminating; the
/// built-in namespaces cannot be deleted.
pub async fn admit(
    store: &Arc<dyn Store>,
    attrs: &Attributes<'_>,
    name: &str,
) -> Result<(), ApiError> {
    if attrs.kind.plural == "namespaces" && attrs.kind.group.is_empty() {
        if attrs.verb == "delete" && IMMORTAL_NAMESPACES.contains(&name) {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            ))
            .on("", "namespaces", name));
        }
        return Ok(());
    }
    if attrs.verb != "create" || !attrs.kind.namespaced {
        return Ok(());
    }
    let Some(ns) = attrs.namespace else {
        return Ok(());
    };
    let namespaces =
        lookup("", "v1", "namespaces").ok_or_else(|| ApiError::internal("no namespaces kind"))?;
    let kv = store
        .get(&namespaces.key(None, ns))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let Some(kv) = kv else {
        return Err(ApiError::not_found("namespaces", ns).on("", "namespaces", ns));
    };
    let obj: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
    let terminating =
        obj["status"]["phase"] == "Terminating" || !obj["metadata"]["deletionTimestamp"].is_null();
    // Events may still be written into a terminating namespace, as upstream allows.
    if terminating && attrs.kind.kind != "Event" {
        let mut e = ApiError::forbidden(format!(
            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
            attrs.kind.qualified()
        ))
        .on(attrs.kind.group, attrs.kind.plural, name);
        e.details.causes.push(apimachinery::Cause::new(
            "NamespaceTerminating",
            "metadata.namespace",
            format!("namespace {ns} is being terminated"),
        ));
        return Err(e);
    }
    Ok(())
}
