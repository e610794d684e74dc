//! The request pipeline's stages: authentication, authorization, admission.
//!
//! Today: client certificates authenticate (CN = user, O = groups); members of `system:masters`
//! are authorized for everything and nobody else for anything; admission runs NamespaceLifecycle.
//! RBAC, tokens and quotas plug in here without reshaping the handler.

use std::sync::Arc;

use apimachinery::ApiError;
use rustls::pki_types::CertificateDer;

use crate::registry::{lookup, Kind};
use crate::AdmissionCache;

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

/// Authenticate a request that came without a client certificate: a service account token in
/// `Authorization: Bearer`, whose account must still exist with the uid it was issued for.
pub async fn authenticate_token(
    state: &crate::State,
    headers: &http::HeaderMap,
) -> Result<Arc<UserInfo>, ApiError> {
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    let node_token = state.node_token.read().ok().and_then(|t| t.clone());
    if node_token.is_some_and(|t| constant_time_eq(t.as_bytes(), token.trim().as_bytes())) {
        // Nodes are trusted with the whole API until a node authorizer narrows them.
        return Ok(Arc::new(UserInfo {
            name: "system:node:rkube-agent".into(),
            groups: vec!["system:nodes".into(), "system:authenticated".into()],
        }));
    }
    let claims = state
        .signer
        .verify(token.trim(), chrono::Utc::now().timestamp())
        .ok_or_else(ApiError::unauthorized)?;
    let k8s = &claims["kubernetes.io"];
    let ns = k8s["namespace"]
        .as_str()
        .ok_or_else(ApiError::unauthorized)?;
    let name = k8s["serviceaccount"]["name"]
        .as_str()
        .ok_or_else(ApiError::unauthorized)?;
    let uid = k8s["serviceaccount"]["uid"].as_str().unwrap_or_default();
    let sas = lookup("", "v1", "serviceaccounts")
        .ok_or_else(|| ApiError::internal("no serviceaccounts kind"))?;
    let kv = state
        .store
        .get(&sas.key(Some(ns), name))
        .await
        .map_err(|e| crate::handler::store_error(sas, "", e))?
        .ok_or_else(ApiError::unauthorized)?;
    let sa: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
    if sa["metadata"]["uid"].as_str() != Some(uid) {
        return Err(ApiError::unauthorized());
    }
    Ok(Arc::new(UserInfo {
        name: format!("system:serviceaccount:{ns}:{name}"),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ],
    }))
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

/// The one authorization decision: today, members of `system:masters` may do anything and
/// nobody else anything. RBAC replaces this function's body.
pub fn allowed(
    user: &UserInfo,
    _verb: &str,
    _group: &str,
    _resource: &str,
    _namespace: Option<&str>,
) -> bool {
    user.groups
        .iter()
        .any(|g| g == "system:masters" || g == "system:nodes")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Apply `Impersonate-User` / `Impersonate-Group` headers: only a user allowed to impersonate
/// (today: system:masters) may act as another.
pub fn impersonate(
    user: Arc<UserInfo>,
    headers: &http::HeaderMap,
) -> Result<Arc<UserInfo>, ApiError> {
    let Some(name) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
    else {
        if headers.contains_key("impersonate-group") {
            return Err(ApiError::bad_request(
                "impersonating groups requires impersonating a user",
            ));
        }
        return Ok(user);
    };
    if !allowed(&user, "impersonate", "", "users", None) {
        return Err(ApiError::forbidden(format!(
            "users \"{name}\" is forbidden: User \"{}\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope",
            user.name
        )));
    }
    let mut groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(String::from))
        .collect();
    groups.push("system:authenticated".into());
    Ok(Arc::new(UserInfo {
        name: name.to_string(),
        groups,
    }))
}

/// Answer a review: the question is in `obj`, the answer goes in its status.
pub fn review(user: &UserInfo, kind: &Kind, mut obj: serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let status = match kind.kind {
        "SelfSubjectAccessReview" => {
            let ra = &obj["spec"]["resourceAttributes"];
            let nra = &obj["spec"]["nonResourceAttributes"];
            let yes = if ra.is_object() {
                let s = |f: &str| ra[f].as_str().unwrap_or_default().to_string();
                let ns = s("namespace");
                allowed(
                    user,
                    &s("verb"),
                    &s("group"),
                    &s("resource"),
                    (!ns.is_empty()).then_some(ns.as_str()),
                )
            } else {
                allowed(user, nra["verb"].as_str().unwrap_or_default(), "", "", None)
            };
            json!({"allowed": yes})
        }
        "SelfSubjectRulesReview" => {
            if allowed(user, "*", "*", "*", None) {
                json!({
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    "incomplete": false,
                })
            } else {
                json!({"resourceRules": [], "nonResourceRules": [], "incomplete": false})
            }
        }
        _ => json!({"userInfo": {"username": user.name, "groups": user.groups}}),
    };
    obj["status"] = status;
    obj
}

pub fn authorize(user: &UserInfo, attrs: &Attributes<'_>) -> Result<(), ApiError> {
    // Anyone may ask about themselves.
    if attrs.kind.review
        || allowed(
            user,
            attrs.verb,
            attrs.kind.group,
            attrs.kind.plural,
            attrs.namespace,
        )
    {
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
    state: &crate::State,
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
    // The namespace as admission last read it (see `AdmissionCache`), else from the store.
    let generation = state.cache.admission_generation();
    let cached = AdmissionCache::at(&state.admission, generation)
        .namespaces
        .get(ns)
        .copied();
    let terminating = match cached {
        Some(t) => t,
        None => {
            let namespaces = lookup("", "v1", "namespaces")
                .ok_or_else(|| ApiError::internal("no namespaces kind"))?;
            let kv = state
                .store
                .get(&namespaces.key(None, ns))
                .await
                .map_err(|e| crate::handler::store_error(namespaces, "", e))?;
            let Some(kv) = kv else {
                return Err(ApiError::not_found("namespaces", ns).on("", "namespaces", ns));
            };
            let obj: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
            let t = obj["status"]["phase"] == "Terminating"
                || !obj["metadata"]["deletionTimestamp"].is_null();
            AdmissionCache::at(&state.admission, generation)
                .namespaces
                .insert(ns.to_string(), t);
            t
        }
    };
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
