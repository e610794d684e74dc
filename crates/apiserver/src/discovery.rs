//! Discovery (`/api`, `/apis`, `/api/v1`, `/apis/G/V`, aggregated v2) and the OpenAPI v3 index,
//! all derived from the registry.

use serde_json::{json, Value};

use crate::registry::{group_versions, Kind, KINDS};

pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// The Kubernetes version this server speaks.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0+rkube",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("linux/{}", std::env::consts::ARCH),
    })
}

fn verbs(kind: &Kind) -> Vec<&'static str> {
    if kind.review {
        // Asked by creating one; never stored, so nothing to get, list or watch (as upstream).
        return vec!["create"];
    }
    vec![
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ]
}

fn sub_verbs(sub: &str) -> Vec<&'static str> {
    match sub {
        "binding" | "token" => vec!["create"],
        "log" => vec!["get"],
        "exec" | "attach" | "portforward" => vec!["create", "get"],
        _ => vec!["get", "patch", "update"],
    }
}

fn sub_kind(kind: &Kind, sub: &str) -> (&'static str, &'static str, &'static str) {
    match sub {
        "scale" => ("autoscaling", "v1", "Scale"),
        "binding" => ("", "v1", "Binding"),
        "token" => ("authentication.k8s.io", "v1", "TokenRequest"),
        "exec" => ("", "v1", "PodExecOptions"),
        "attach" => ("", "v1", "PodAttachOptions"),
        "portforward" => ("", "v1", "PodPortForwardOptions"),
        _ => (kind.group, kind.version, kind.kind),
    }
}

fn kinds_in<'a>(group: &'a str, version: &'a str) -> impl Iterator<Item = &'static Kind> + 'a {
    KINDS
        .iter()
        .filter(move |k| k.group == group && k.version == version)
}

/// `APIResourceList` for `/api/v1` or `/apis/G/V`.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for k in kinds_in(group, version) {
        let mut r = json!({
            "name": k.plural,
            "singularName": k.singular,
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": verbs(k),
        });
        if !k.short_names.is_empty() {
            r["shortNames"] = json!(k.short_names);
        }
        if !k.categories.is_empty() {
            r["categories"] = json!(k.categories);
        }
        resources.push(r);
        for sub in k.subresources() {
            let (g, v, kind) = sub_kind(k, sub);
            let mut r = json!({
                "name": format!("{}/{}", k.plural, sub),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": kind,
                "verbs": sub_verbs(sub),
            });
            if g != k.group {
                r["group"] = json!(g);
                r["version"] = json!(v);
            }
            resources.push(r);
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

pub fn api_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group_entry(group: &str) -> Value {
    let versions: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(g, _)| *g == group)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
}

fn groups() -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    for (g, _) in group_versions() {
        if !g.is_empty() && !out.contains(&g) {
            out.push(g);
        }
    }
    out
}

pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(group_entry).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(group: &str) -> Option<Value> {
    if !groups().contains(&group) {
        return None;
    }
    let mut g = group_entry(group);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Some(g)
}

fn aggregated_version(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = kinds_in(group, version)
        .map(|k| {
            let subresources: Vec<Value> = k
                .subresources()
                .into_iter()
                .map(|sub| {
                    let (g, v, kind) = sub_kind(k, sub);
                    json!({"subresource": sub, "responseKind": {"group": g, "version": v, "kind": kind}, "verbs": sub_verbs(sub)})
                })
                .collect();
            let mut r = json!({
                "resource": k.plural,
                "responseKind": {"group": k.group, "version": k.version, "kind": k.kind},
                "scope": if k.namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": k.singular,
                "verbs": verbs(k),
            });
            if !k.short_names.is_empty() {
                r["shortNames"] = json!(k.short_names);
            }
            if !k.categories.is_empty() {
                r["categories"] = json!(k.categories);
            }
            if !subresources.is_empty() {
                r["subresources"] = json!(subresources);
            }
            r
        })
        .collect();
    json!({"version": version, "resources": resources, "freshness": "Current"})
}

/// Aggregated discovery (apidiscovery.k8s.io/v2): `legacy` = true for `/api`, false for `/apis`.
pub fn aggregated(legacy: bool) -> Value {
    let items: Vec<Value> = if legacy {
        vec![json!({"metadata": {"name": ""}, "versions": [aggregated_version("", "v1")]})]
    } else {
        groups()
            .into_iter()
            .map(|g| {
                let versions: Vec<Value> = group_versions()
                    .into_iter()
                    .filter(|(gg, _)| *gg == g)
                    .map(|(_, v)| aggregated_version(g, v))
                    .collect();
                json!({"metadata": {"name": g}, "versions": versions})
            })
            .collect()
    };
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

/// Does an Accept header ask for aggregated discovery?
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| {
        first.contains("as=APIGroupDiscoveryList")
            && first.contains("v=v2")
            && !first.contains("v=v2beta1")
    })
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The OpenAPI v3 document of one group-version (built once): its paths, with the
/// group-version-kind and the `fieldValidation` parameter on every operation, so that kubectl
/// leaves validation to the server; and the schemas of its kinds, generated from the k8s-openapi
/// types (descriptions included), each kind's schema tagged with its group-version-kind, which
/// is what `kubectl explain` reads.
/// Served as built: serialised once, handed out as shared bytes.
pub fn openapi_v3_gv(group: &str, version: &str) -> Option<bytes::Bytes> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static DOCS: OnceLock<HashMap<(&'static str, &'static str), bytes::Bytes>> = OnceLock::new();
    let docs = DOCS.get_or_init(|| {
        group_versions()
            .into_iter()
            .filter_map(|(g, v)| {
                let doc = build_openapi_v3_gv(g, v)?;
                Some(((g, v), bytes::Bytes::from(serde_json::to_vec(&doc).ok()?)))
            })
            .collect()
    });
    docs.iter()
        .find(|((g, v), _)| *g == group && *v == version)
        .map(|(_, d)| d.clone())
}

fn build_openapi_v3_gv(group: &str, version: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let mut any = false;
    for k in kinds_in(group, version).filter(|k| !k.review) {
        any = true;
        let base = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let item = if k.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", k.plural)
        } else {
            format!("{base}/{}/{{name}}", k.plural)
        };
        let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
        let params = json!([
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true},
             "description": "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields."},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
        ]);
        let op = |action: &str| {
            json!({
                "operationId": format!("{action}{}", k.kind),
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            })
        };
        paths.insert(item, json!({"get": op("get"), "put": op("put"), "patch": op("patch"), "delete": op("delete")}));
    }
    if !any {
        return None;
    }
    let mut gen = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut roots = Vec::new();
    for k in kinds_in(group, version).filter(|k| !k.review) {
        if let Some(r) = crate::codec::schema_for(k, &mut gen) {
            let name = r
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.rsplit('/').next())
                .map(String::from);
            roots.extend(name.map(|n| (n, k)));
        }
    }
    let mut schemas = serde_json::Map::new();
    for (name, schema) in gen.take_definitions(true) {
        schemas.insert(name, schema);
    }
    for (name, k) in roots {
        if let Some(s) = schemas.get_mut(&name) {
            s["x-kubernetes-group-version-kind"] =
                json!([{"group": k.group, "version": k.version, "kind": k.kind}]);
        }
        let meta = apimachinery::patch_meta::for_kind(k.group, k.kind);
        annotate_patch_meta(&mut schemas, &name, meta, 0);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// Mark the merge lists of a schema (and of the schemas it refers to) with
/// `x-kubernetes-patch-strategy` and `x-kubernetes-patch-merge-key`, from the same table that
/// drives strategic merge patch.
fn annotate_patch_meta(
    schemas: &mut serde_json::Map<String, Value>,
    name: &str,
    meta: &'static apimachinery::strategic::TypeMeta,
    depth: usize,
) {
    use apimachinery::strategic::ListStrategy;
    if depth > 16 {
        return;
    }
    let target = |prop: &Value| -> Option<String> {
        let r = prop
            .get("$ref")
            .or_else(|| prop.pointer("/allOf/0/$ref"))
            .or_else(|| prop.pointer("/items/$ref"))?;
        r.as_str()?.rsplit('/').next().map(String::from)
    };
    let mut follow = Vec::new();
    if let Some(props) = schemas
        .get_mut(name)
        .and_then(|s| s.get_mut("properties"))
        .and_then(Value::as_object_mut)
    {
        for (field, f) in meta.fields {
            let Some(prop) = props.get_mut(*field) else {
                continue;
            };
            match f.list {
                ListStrategy::MergeByKey(key) => {
                    prop["x-kubernetes-patch-strategy"] = json!("merge");
                    prop["x-kubernetes-patch-merge-key"] = json!(key);
                }
                ListStrategy::MergePrimitive => {
                    prop["x-kubernetes-patch-strategy"] = json!("merge")
                }
                ListStrategy::Replace => {}
            }
            if let (Some(ty), Some(t)) = (f.ty, target(prop)) {
                follow.push((t, ty));
            }
        }
    }
    for (t, ty) in follow {
        annotate_patch_meta(schemas, &t, ty, depth + 1);
    }
}

/// Hex SHA-free content hash for the `?hash=` that clients cache by.
pub fn content_hash(doc: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    doc.hash(&mut h);
    format!("{:016X}", h.finish())
}

/// The `/openapi/v3` index (built once: the documents never change while the server runs).
pub fn openapi_v3_index() -> Value {
    static INDEX: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    INDEX.get_or_init(build_openapi_v3_index).clone()
}

fn build_openapi_v3_index() -> Value {
    let mut paths = serde_json::Map::new();
    for (g, v) in group_versions() {
        if let Some(doc) = openapi_v3_gv(g, v) {
            let p = gv_path(g, v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", content_hash(&doc))}),
            );
        }
    }
    json!({"paths": paths})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_documents() {
        let core = resource_list("", "v1").unwrap();
        let names: Vec<&str> = core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"pods")
                && names.contains(&"pods/status")
                && names.contains(&"pods/binding")
        );
        assert!(resource_list("apps", "v2").is_none());
        // Reviews are only created (a client that lists what it can list skips them).
        let authz = resource_list("authorization.k8s.io", "v1").unwrap();
        let ssar = authz["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "selfsubjectaccessreviews")
            .unwrap();
        assert_eq!(ssar["verbs"], json!(["create"]));
        let agg = aggregated(false);
        let apps = agg["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "apps")
            .unwrap();
        let deploy = apps["versions"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == "deployments")
            .unwrap();
        assert_eq!(deploy["shortNames"], json!(["deploy"]));
        assert_eq!(deploy["subresources"][1]["responseKind"]["kind"], "Scale");
        assert!(wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(!wants_aggregated("application/json, */*"));
        let apps: Value = serde_json::from_slice(&openapi_v3_gv("apps", "v1").unwrap()).unwrap();
        let schemas = &apps["components"]["schemas"];
        let ctr = &schemas["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(ctr["x-kubernetes-patch-strategy"], "merge");
        assert_eq!(ctr["x-kubernetes-patch-merge-key"], "name");
        let env = &schemas["io.k8s.api.core.v1.Container"]["properties"]["env"];
        assert_eq!(env["x-kubernetes-patch-merge-key"], "name");
        let idx = openapi_v3_index();
        assert!(idx["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .starts_with("/openapi/v3/apis/apps/v1?hash="));
    }
}
