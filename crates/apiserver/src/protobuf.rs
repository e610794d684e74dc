//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`): the `k8s\0` envelope around a
//! `runtime.Unknown` whose `raw` is the typed message (k8s-pb's prost types).
//!
//! Each converter *takes* the fields it understands out of the decoded message and turns them
//! into JSON; whatever is left must encode to nothing. So a field this server cannot read yet is
//! refused (415, "send JSON"), never silently dropped. The covered messages are the ones kubectl's
//! typed client posts: ConfigMap, Secret, Namespace, ServiceAccount, PriorityClass, Deployment
//! (as `kubectl create deployment` builds it) and the self-subject reviews.

use std::collections::BTreeMap;

use apimachinery::ApiError;
use base64::Engine;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use prost::Message;
use serde_json::{json, Map, Value};

use crate::registry::Kind;

const MAGIC: &[u8] = b"k8s\0";

/// Decode a protobuf body into the JSON object it stands for.
pub fn to_json(kind: &Kind, body: &[u8]) -> Result<Value, ApiError> {
    to_json_as(&kind.api_version(), kind.kind, &kind.qualified(), body)
}

/// Decode a protobuf body that must carry `api_version`/`kind` (a subresource's own type, say).
pub fn to_json_as(
    expected_api_version: &str,
    expected_kind: &str,
    what: &str,
    body: &[u8],
) -> Result<Value, ApiError> {
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| {
        ApiError::bad_request("protobuf body does not start with the k8s\\0 envelope")
    })?;
    let unknown = k8s_pb::apimachinery::pkg::runtime::Unknown::decode(rest).map_err(|e| {
        ApiError::bad_request(format!("protobuf envelope could not be decoded: {e}"))
    })?;
    let tm = unknown.type_meta.unwrap_or_default();
    let api_version = tm.api_version.unwrap_or_default();
    let kind_name = tm.kind.unwrap_or_default();
    if api_version != expected_api_version || kind_name != expected_kind {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({expected_api_version})"
        )));
    }
    let raw = unknown.raw.unwrap_or_default();
    let mut out = match (api_version.as_str(), kind_name.as_str()) {
        ("v1", "ConfigMap") => config_map(decode(&raw)?)?,
        ("v1", "Secret") => secret(decode(&raw)?)?,
        ("v1", "Namespace") => namespace(decode(&raw)?)?,
        ("v1", "ServiceAccount") => service_account(decode(&raw)?)?,
        ("scheduling.k8s.io/v1", "PriorityClass") => priority_class(decode(&raw)?)?,
        ("apps/v1", "Deployment") => deployment(decode(&raw)?)?,
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => access_review(decode(&raw)?)?,
        ("authorization.k8s.io/v1", "SelfSubjectRulesReview") => rules_review(decode(&raw)?)?,
        ("authentication.k8s.io/v1", "SelfSubjectReview") => self_review(decode(&raw)?)?,
        ("authentication.k8s.io/v1", "TokenRequest") => token_request(decode(&raw)?)?,
        _ => {
            return Err(ApiError::unsupported_media_type(&format!(
                "application/vnd.kubernetes.protobuf for {what}: not supported by this rkube yet; send JSON"
            )))
        }
    };
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!(kind_name));
    Ok(Value::Object(out))
}

/// A DeleteOptions body (kubectl's typed client sends one with every delete, e.g. `kubectl
/// drain`), in any group version, as its JSON form.
pub fn delete_options(body: &[u8]) -> Result<Value, ApiError> {
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| {
        ApiError::bad_request("protobuf body does not start with the k8s\\0 envelope")
    })?;
    let unknown = k8s_pb::apimachinery::pkg::runtime::Unknown::decode(rest).map_err(|e| {
        ApiError::bad_request(format!("protobuf envelope could not be decoded: {e}"))
    })?;
    let kind = unknown.type_meta.and_then(|t| t.kind).unwrap_or_default();
    if kind != "DeleteOptions" {
        return Err(ApiError::bad_request(format!(
            "a delete takes DeleteOptions, not {kind:?}"
        )));
    }
    let o: k8s_pb::apimachinery::pkg::apis::meta::v1::DeleteOptions =
        decode(&unknown.raw.unwrap_or_default())?;
    let mut out = json!({"kind": "DeleteOptions", "apiVersion": "v1"});
    if let Some(g) = o.grace_period_seconds {
        out["gracePeriodSeconds"] = json!(g);
    }
    if let Some(p) = o.preconditions {
        let mut pre = json!({});
        if let Some(uid) = p.uid {
            pre["uid"] = json!(uid);
        }
        if let Some(rv) = p.resource_version {
            pre["resourceVersion"] = json!(rv);
        }
        out["preconditions"] = pre;
    }
    if let Some(o) = o.orphan_dependents {
        out["orphanDependents"] = json!(o);
    }
    if let Some(p) = o.propagation_policy {
        out["propagationPolicy"] = json!(p);
    }
    if !o.dry_run.is_empty() {
        out["dryRun"] = json!(o.dry_run);
    }
    Ok(out)
}

fn decode<M: Message + Default>(raw: &[u8]) -> Result<M, ApiError> {
    M::decode(raw)
        .map_err(|e| ApiError::bad_request(format!("protobuf body could not be decoded: {e}")))
}

/// Everything converted must have been taken: what remains was not understood. Go's encoder
/// writes non-pointer fields even when empty (`""`, `false`, `0`, empty messages), which JSON
/// would omit; those count as nothing.
fn nothing_left<M: Message>(what: &str, rest: &M) -> Result<(), ApiError> {
    if only_zero_values(&rest.encode_to_vec(), 0) {
        return Ok(());
    }
    Err(ApiError::unsupported_media_type(&format!(
        "application/vnd.kubernetes.protobuf: {what} carries fields this rkube cannot read from protobuf yet; send JSON"
    )))
}

fn varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// Does this protobuf encoding hold only zero values (varint 0, empty or all-zero nested
/// messages, zero fixed-width values)?
fn only_zero_values(mut b: &[u8], depth: u32) -> bool {
    if depth > 32 {
        return false;
    }
    while !b.is_empty() {
        let Some((key, rest)) = varint(b) else {
            return false;
        };
        b = rest;
        match key & 7 {
            0 => match varint(b) {
                Some((0, rest)) => b = rest,
                _ => return false,
            },
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                if b.len() < n || b[..n].iter().any(|x| *x != 0) {
                    return false;
                }
                b = &b[n..];
            }
            2 => {
                let Some((len, rest)) = varint(b) else {
                    return false;
                };
                let len = len as usize;
                if rest.len() < len || !only_zero_values(&rest[..len], depth + 1) {
                    return false;
                }
                b = &rest[len..];
            }
            _ => return false,
        }
    }
    true
}

/// A JSON object under construction; absent and empty values are left out, as the JSON
/// encoding of the same object would leave them out.
#[derive(Default)]
struct J(Map<String, Value>);

impl J {
    /// Strings: empty ones are left out, as Go's JSON encoding leaves them out.
    fn s(mut self, k: &str, v: Option<String>) -> Self {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    /// A non-pointer bool: false is the same as absent.
    fn bz(self, k: &str, v: Option<bool>) -> Self {
        self.b(k, v.filter(|b| *b))
    }
    /// A non-pointer integer: zero is the same as absent.
    fn iz(self, k: &str, v: Option<i64>) -> Self {
        self.i(k, v.filter(|i| *i != 0))
    }
    fn b(mut self, k: &str, v: Option<bool>) -> Self {
        if let Some(v) = v {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    fn i(mut self, k: &str, v: Option<i64>) -> Self {
        if let Some(v) = v {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    fn list(mut self, k: &str, v: Vec<Value>) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), Value::Array(v));
        }
        self
    }
    fn strs(self, k: &str, v: Vec<String>) -> Self {
        self.list(k, v.into_iter().map(Value::String).collect())
    }
    fn map(mut self, k: &str, v: BTreeMap<String, String>) -> Self {
        if !v.is_empty() {
            self.0.insert(k.into(), json!(v));
        }
        self
    }
    fn obj(mut self, k: &str, v: Option<Value>) -> Self {
        if let Some(v) = v {
            self.0.insert(k.into(), v);
        }
        self
    }
    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn object_meta(m: Option<meta::ObjectMeta>) -> Result<Value, ApiError> {
    let mut m = m.unwrap_or_default();
    let owners = std::mem::take(&mut m.owner_references)
        .into_iter()
        .map(|o| {
            J::default()
                .s("apiVersion", o.api_version)
                .s("kind", o.kind)
                .s("name", o.name)
                .s("uid", o.uid)
                .b("controller", o.controller)
                .b("blockOwnerDeletion", o.block_owner_deletion)
                .done()
        })
        .collect();
    let out = J::default()
        .s("name", m.name.take())
        .s("generateName", m.generate_name.take())
        .s("namespace", m.namespace.take())
        .s("uid", m.uid.take())
        .s("resourceVersion", m.resource_version.take())
        .map("labels", std::mem::take(&mut m.labels))
        .map("annotations", std::mem::take(&mut m.annotations))
        .list("ownerReferences", owners)
        .strs("finalizers", std::mem::take(&mut m.finalizers))
        .done();
    // Server-owned: set by the server whatever the client sends.
    m.creation_timestamp = None;
    m.self_link = None;
    m.generation = None;
    m.managed_fields.clear();
    nothing_left("metadata", &m)?;
    Ok(out)
}

fn into_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn config_map(mut c: k8s_pb::api::core::v1::ConfigMap) -> Result<Map<String, Value>, ApiError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let binary: BTreeMap<String, String> = std::mem::take(&mut c.binary_data)
        .into_iter()
        .map(|(k, v)| (k, b64.encode(v)))
        .collect();
    let out = J::default()
        .obj("metadata", Some(object_meta(c.metadata.take())?))
        .b("immutable", c.immutable.take())
        .map("data", std::mem::take(&mut c.data))
        .map("binaryData", binary)
        .done();
    nothing_left("ConfigMap", &c)?;
    Ok(into_map(out))
}

fn secret(mut s: k8s_pb::api::core::v1::Secret) -> Result<Map<String, Value>, ApiError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: BTreeMap<String, String> = std::mem::take(&mut s.data)
        .into_iter()
        .map(|(k, v)| (k, b64.encode(v)))
        .collect();
    let out = J::default()
        .obj("metadata", Some(object_meta(s.metadata.take())?))
        .b("immutable", s.immutable.take())
        .map("data", data)
        .map("stringData", std::mem::take(&mut s.string_data))
        .s("type", s.r#type.take())
        .done();
    nothing_left("Secret", &s)?;
    Ok(into_map(out))
}

fn namespace(mut n: k8s_pb::api::core::v1::Namespace) -> Result<Map<String, Value>, ApiError> {
    let spec = n.spec.take().map(|mut s| {
        let v = J::default()
            .strs("finalizers", std::mem::take(&mut s.finalizers))
            .done();
        (v, s)
    });
    let out = J::default()
        .obj("metadata", Some(object_meta(n.metadata.take())?))
        .obj("spec", spec.as_ref().map(|(v, _)| v.clone()))
        .done();
    if let Some((_, rest)) = &spec {
        nothing_left("Namespace spec", rest)?;
    }
    n.status = None; // status is the server's
    nothing_left("Namespace", &n)?;
    Ok(into_map(out))
}

fn service_account(
    mut sa: k8s_pb::api::core::v1::ServiceAccount,
) -> Result<Map<String, Value>, ApiError> {
    let secrets = std::mem::take(&mut sa.secrets)
        .into_iter()
        .map(|r| {
            J::default()
                .s("kind", r.kind)
                .s("namespace", r.namespace)
                .s("name", r.name)
                .s("uid", r.uid)
                .s("apiVersion", r.api_version)
                .s("resourceVersion", r.resource_version)
                .s("fieldPath", r.field_path)
                .done()
        })
        .collect();
    let pulls = std::mem::take(&mut sa.image_pull_secrets)
        .into_iter()
        .map(|r| J::default().s("name", r.name).done())
        .collect();
    let out = J::default()
        .obj("metadata", Some(object_meta(sa.metadata.take())?))
        .list("secrets", secrets)
        .list("imagePullSecrets", pulls)
        .b(
            "automountServiceAccountToken",
            sa.automount_service_account_token.take(),
        )
        .done();
    nothing_left("ServiceAccount", &sa)?;
    Ok(into_map(out))
}

fn priority_class(
    mut pc: k8s_pb::api::scheduling::v1::PriorityClass,
) -> Result<Map<String, Value>, ApiError> {
    let out = J::default()
        .obj("metadata", Some(object_meta(pc.metadata.take())?))
        .i("value", pc.value.take().map(i64::from))
        .bz("globalDefault", pc.global_default.take())
        .s("description", pc.description.take())
        .s("preemptionPolicy", pc.preemption_policy.take())
        .done();
    nothing_left("PriorityClass", &pc)?;
    Ok(into_map(out))
}

fn label_selector(s: Option<meta::LabelSelector>) -> Option<Value> {
    s.map(|s| {
        let exprs = s
            .match_expressions
            .into_iter()
            .map(|e| {
                J::default()
                    .s("key", e.key)
                    .s("operator", e.operator)
                    .strs("values", e.values)
                    .done()
            })
            .collect();
        J::default()
            .map("matchLabels", s.match_labels)
            .list("matchExpressions", exprs)
            .done()
    })
}

fn container(mut c: k8s_pb::api::core::v1::Container) -> Result<Value, ApiError> {
    let ports = std::mem::take(&mut c.ports)
        .into_iter()
        .map(|p| {
            J::default()
                .s("name", p.name)
                .iz("hostPort", p.host_port.map(i64::from))
                .i("containerPort", p.container_port.map(i64::from))
                .s("protocol", p.protocol)
                .s("hostIP", p.host_ip)
                .done()
        })
        .collect();
    let mut env = Vec::new();
    for e in std::mem::take(&mut c.env) {
        if e.value_from.is_some() {
            return Err(ApiError::unsupported_media_type(
                "application/vnd.kubernetes.protobuf: env valueFrom cannot be read from protobuf yet; send JSON",
            ));
        }
        env.push(J::default().s("name", e.name).s("value", e.value).done());
    }
    let resources = match c.resources.take() {
        None => None,
        Some(mut r) => {
            let q = |m: BTreeMap<String, k8s_pb::apimachinery::pkg::api::resource::Quantity>| -> BTreeMap<String, String> {
                m.into_iter().map(|(k, v)| (k, v.string.unwrap_or_default())).collect()
            };
            let v = J::default()
                .map("limits", q(std::mem::take(&mut r.limits)))
                .map("requests", q(std::mem::take(&mut r.requests)))
                .done();
            nothing_left("container resources", &r)?;
            Some(v)
        }
    };
    let out = J::default()
        .s("name", c.name.take())
        .s("image", c.image.take())
        .strs("command", std::mem::take(&mut c.command))
        .strs("args", std::mem::take(&mut c.args))
        .s("workingDir", c.working_dir.take())
        .list("ports", ports)
        .list("env", env)
        .obj("resources", resources)
        .s("terminationMessagePath", c.termination_message_path.take())
        .s(
            "terminationMessagePolicy",
            c.termination_message_policy.take(),
        )
        .s("imagePullPolicy", c.image_pull_policy.take())
        .bz("stdin", c.stdin.take())
        .bz("stdinOnce", c.stdin_once.take())
        .bz("tty", c.tty.take())
        .done();
    nothing_left("container", &c)?;
    Ok(out)
}

fn deployment(mut d: k8s_pb::api::apps::v1::Deployment) -> Result<Map<String, Value>, ApiError> {
    let spec = match d.spec.take() {
        None => None,
        Some(mut s) => {
            let template = match s.template.take() {
                None => None,
                Some(mut t) => {
                    let pod_spec = match t.spec.take() {
                        None => None,
                        Some(mut ps) => {
                            let containers = std::mem::take(&mut ps.containers)
                                .into_iter()
                                .map(container)
                                .collect::<Result<Vec<_>, _>>()?;
                            let v = J::default()
                                .list("containers", containers)
                                .s("restartPolicy", ps.restart_policy.take())
                                .s("dnsPolicy", ps.dns_policy.take())
                                .i(
                                    "terminationGracePeriodSeconds",
                                    ps.termination_grace_period_seconds.take(),
                                )
                                .s("schedulerName", ps.scheduler_name.take())
                                .done();
                            nothing_left("pod template spec", &ps)?;
                            Some(v)
                        }
                    };
                    let v = J::default()
                        .obj("metadata", Some(object_meta(t.metadata.take())?))
                        .obj("spec", pod_spec)
                        .done();
                    nothing_left("pod template", &t)?;
                    Some(v)
                }
            };
            let strategy = s.strategy.take().map(|st| {
                let ru = st.rolling_update.map(|ru| {
                    let ios = |v: Option<k8s_pb::apimachinery::pkg::util::intstr::IntOrString>| {
                        v.map(|v| match v.r#type {
                            Some(1) => json!(v.str_val.unwrap_or_default()),
                            _ => json!(v.int_val.unwrap_or_default()),
                        })
                    };
                    J::default()
                        .obj("maxUnavailable", ios(ru.max_unavailable))
                        .obj("maxSurge", ios(ru.max_surge))
                        .done()
                });
                J::default()
                    .s("type", st.r#type)
                    .obj("rollingUpdate", ru)
                    .done()
            });
            let v = J::default()
                .i("replicas", s.replicas.take().map(i64::from))
                .obj("selector", label_selector(s.selector.take()))
                .obj("template", template)
                .obj("strategy", strategy)
                .iz("minReadySeconds", s.min_ready_seconds.take().map(i64::from))
                .i(
                    "revisionHistoryLimit",
                    s.revision_history_limit.take().map(i64::from),
                )
                .bz("paused", s.paused.take())
                .i(
                    "progressDeadlineSeconds",
                    s.progress_deadline_seconds.take().map(i64::from),
                )
                .done();
            nothing_left("Deployment spec", &s)?;
            Some(v)
        }
    };
    let out = J::default()
        .obj("metadata", Some(object_meta(d.metadata.take())?))
        .obj("spec", spec)
        .done();
    d.status = None;
    nothing_left("Deployment", &d)?;
    Ok(into_map(out))
}

fn access_review(
    mut r: k8s_pb::api::authorization::v1::SelfSubjectAccessReview,
) -> Result<Map<String, Value>, ApiError> {
    let spec = r.spec.take().unwrap_or_default();
    let ra = spec.resource_attributes.map(|a| {
        J::default()
            .s("namespace", a.namespace)
            .s("verb", a.verb)
            .s("group", a.group)
            .s("version", a.version)
            .s("resource", a.resource)
            .s("subresource", a.subresource)
            .s("name", a.name)
            .done()
    });
    let nra = spec
        .non_resource_attributes
        .map(|a| J::default().s("path", a.path).s("verb", a.verb).done());
    let out = J::default()
        .obj("metadata", Some(object_meta(r.metadata.take())?))
        .obj(
            "spec",
            Some(
                J::default()
                    .obj("resourceAttributes", ra)
                    .obj("nonResourceAttributes", nra)
                    .done(),
            ),
        )
        .done();
    r.status = None;
    nothing_left("SelfSubjectAccessReview", &r)?;
    Ok(into_map(out))
}

fn rules_review(
    mut r: k8s_pb::api::authorization::v1::SelfSubjectRulesReview,
) -> Result<Map<String, Value>, ApiError> {
    let ns = r.spec.take().and_then(|s| s.namespace);
    let out = J::default()
        .obj("metadata", Some(object_meta(r.metadata.take())?))
        .obj("spec", Some(J::default().s("namespace", ns).done()))
        .done();
    r.status = None;
    nothing_left("SelfSubjectRulesReview", &r)?;
    Ok(into_map(out))
}

fn token_request(
    mut r: k8s_pb::api::authentication::v1::TokenRequest,
) -> Result<Map<String, Value>, ApiError> {
    let spec = r.spec.take().unwrap_or_default();
    let bound = spec.bound_object_ref.map(|b| {
        J::default()
            .s("kind", b.kind)
            .s("apiVersion", b.api_version)
            .s("name", b.name)
            .s("uid", b.u_id)
            .done()
    });
    let out = J::default()
        .obj("metadata", Some(object_meta(r.metadata.take())?))
        .obj(
            "spec",
            Some(
                J::default()
                    .strs("audiences", spec.audiences)
                    .i("expirationSeconds", spec.expiration_seconds)
                    .obj("boundObjectRef", bound)
                    .done(),
            ),
        )
        .done();
    r.status = None;
    nothing_left("TokenRequest", &r)?;
    Ok(into_map(out))
}

fn self_review(
    mut r: k8s_pb::api::authentication::v1::SelfSubjectReview,
) -> Result<Map<String, Value>, ApiError> {
    let out = J::default()
        .obj("metadata", Some(object_meta(r.metadata.take())?))
        .done();
    r.status = None;
    nothing_left("SelfSubjectReview", &r)?;
    Ok(into_map(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_options_decode_from_protobuf() {
        use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
        let opts = meta::DeleteOptions {
            grace_period_seconds: Some(0),
            propagation_policy: Some("Foreground".into()),
            preconditions: Some(meta::Preconditions {
                uid: Some("u1".into()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let env = k8s_pb::apimachinery::pkg::runtime::Unknown {
            type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                api_version: Some("v1".into()),
                kind: Some("DeleteOptions".into()),
            }),
            raw: Some(opts.encode_to_vec()),
            ..Default::default()
        };
        let mut body = MAGIC.to_vec();
        body.extend(env.encode_to_vec());
        let v = delete_options(&body).unwrap();
        assert_eq!(v["gracePeriodSeconds"], 0);
        assert_eq!(v["propagationPolicy"], "Foreground");
        assert_eq!(v["preconditions"]["uid"], "u1");
        let mut wrong = MAGIC.to_vec();
        wrong.extend(
            k8s_pb::apimachinery::pkg::runtime::Unknown {
                type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(delete_options(&wrong).unwrap_err().code, 400);
    }
    use crate::registry::lookup;

    fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = k8s_pb::apimachinery::pkg::runtime::Unknown {
            type_meta: Some(k8s_pb::apimachinery::pkg::runtime::TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    fn named(name: &str) -> Option<meta::ObjectMeta> {
        Some(meta::ObjectMeta {
            name: Some(name.into()),
            creation_timestamp: Some(meta::Time {
                seconds: Some(-62135596800),
                nanos: Some(0),
            }),
            ..Default::default()
        })
    }

    #[test]
    fn config_maps_and_secrets() {
        let cm = k8s_pb::api::core::v1::ConfigMap {
            metadata: named("c"),
            data: [("k".to_string(), "v".to_string())].into(),
            binary_data: [("b".to_string(), vec![0u8, 1, 2])].into(),
            ..Default::default()
        };
        let v = to_json(
            lookup("", "v1", "configmaps").unwrap(),
            &envelope("v1", "ConfigMap", cm.encode_to_vec()),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}, "binaryData": {"b": "AAEC"}})
        );
        let s = k8s_pb::api::core::v1::Secret {
            metadata: named("s"),
            data: [("k".to_string(), b"hi".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let v = to_json(
            lookup("", "v1", "secrets").unwrap(),
            &envelope("v1", "Secret", s.encode_to_vec()),
        )
        .unwrap();
        assert_eq!(v["data"]["k"], "aGk=");
        assert_eq!(v["type"], "Opaque");
    }

    #[test]
    fn deployments_as_kubectl_create_builds_them() {
        use k8s_pb::api::{apps::v1 as apps, core::v1 as core};
        let d = apps::Deployment {
            metadata: named("web"),
            spec: Some(apps::DeploymentSpec {
                replicas: Some(2),
                selector: Some(meta::LabelSelector {
                    match_labels: [("app".to_string(), "web".to_string())].into(),
                    ..Default::default()
                }),
                template: Some(core::PodTemplateSpec {
                    metadata: named(""),
                    spec: Some(core::PodSpec {
                        containers: vec![core::Container {
                            name: Some("nginx".into()),
                            image: Some("nginx".into()),
                            ports: vec![core::ContainerPort {
                                container_port: Some(80),
                                ..Default::default()
                            }],
                            resources: Some(Default::default()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                }),
                strategy: Some(Default::default()),
                ..Default::default()
            }),
            status: Some(Default::default()),
        };
        let v = to_json(
            lookup("apps", "v1", "deployments").unwrap(),
            &envelope("apps/v1", "Deployment", d.encode_to_vec()),
        )
        .unwrap();
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "web");
        assert_eq!(
            v["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
            80
        );
    }

    #[test]
    fn zero_values_count_as_absent() {
        use k8s_pb::api::core::v1 as core;
        let empty = core::PodSpec {
            node_name: Some(String::new()),
            host_network: Some(false),
            security_context: Some(Default::default()),
            ..Default::default()
        };
        assert!(only_zero_values(&empty.encode_to_vec(), 0));
        let set = core::PodSpec {
            node_name: Some("n1".into()),
            ..Default::default()
        };
        assert!(!only_zero_values(&set.encode_to_vec(), 0));
        assert!(!only_zero_values(
            &core::PodSpec {
                host_network: Some(true),
                ..Default::default()
            }
            .encode_to_vec(),
            0
        ));
        assert!(!only_zero_values(&[0xff], 0), "garbage is not nothing");
    }

    #[test]
    fn what_cannot_be_read_is_refused_not_dropped() {
        use k8s_pb::api::{apps::v1 as apps, core::v1 as core};
        let d = apps::Deployment {
            metadata: named("web"),
            spec: Some(apps::DeploymentSpec {
                template: Some(core::PodTemplateSpec {
                    metadata: None,
                    spec: Some(core::PodSpec {
                        host_network: Some(true),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        };
        let err = to_json(
            lookup("apps", "v1", "deployments").unwrap(),
            &envelope("apps/v1", "Deployment", d.encode_to_vec()),
        )
        .unwrap_err();
        assert_eq!(err.code, 415);
        let pods = lookup("", "v1", "pods").unwrap();
        assert_eq!(
            to_json(pods, &envelope("v1", "Pod", vec![]))
                .unwrap_err()
                .code,
            415
        );
        let cms = lookup("", "v1", "configmaps").unwrap();
        assert_eq!(to_json(cms, b"k8s\0\xff\xff\xff").unwrap_err().code, 400);
        assert_eq!(to_json(cms, b"{}").unwrap_err().code, 400);
        assert_eq!(
            to_json(cms, &envelope("v1", "Secret", vec![]))
                .unwrap_err()
                .code,
            400
        );
    }
}
