//! Request bodies in, objects out: media types, size limits, and decoding each kind through its
//! k8s-openapi type so that type errors are 400s and unknown fields are found for
//! `fieldValidation`.

use apimachinery::ApiError;
use serde_json::Value;

use crate::registry::Kind;

/// Upstream's request body limit.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Deeper JSON than this is refused before it can exhaust a stack.
const MAX_DEPTH: usize = 100;

/// The media types a body can arrive in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Json,
    Yaml,
    JsonPatch,
    MergePatch,
    StrategicMergePatch,
    ApplyPatch,
    Protobuf,
}

pub fn media_type(content_type: Option<&str>) -> Result<Media, ApiError> {
    let raw = content_type.unwrap_or("application/json");
    let essence = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Ok(match essence.as_str() {
        "application/json" | "" => Media::Json,
        "application/yaml" | "application/x-yaml" | "text/yaml" => Media::Yaml,
        "application/json-patch+json" => Media::JsonPatch,
        "application/merge-patch+json" => Media::MergePatch,
        "application/strategic-merge-patch+json" => Media::StrategicMergePatch,
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => Media::ApplyPatch,
        "application/vnd.kubernetes.protobuf" => Media::Protobuf,
        _ => return Err(ApiError::unsupported_media_type(raw)),
    })
}

/// Parse JSON or YAML into a value, refusing what is malformed, too deep, or an alias bomb.
pub fn parse_body(bytes: &[u8], media: Media) -> Result<Value, ApiError> {
    parse_body_reporting_duplicates(bytes, media).map(|(v, _)| v)
}

/// `parse_body`, with the paths of the keys a JSON body repeated (see `parse_json`; none for
/// YAML, whose parser refuses them).
pub fn parse_body_reporting_duplicates(
    bytes: &[u8],
    media: Media,
) -> Result<(Value, Vec<String>), ApiError> {
    if bytes.len() > MAX_BODY_BYTES {
        return Err(ApiError::too_large("the request entity is too large"));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    let (value, duplicates) = match media {
        Media::Yaml | Media::ApplyPatch => (parse_yaml(bytes)?, Vec::new()),
        _ => parse_json(bytes).map_err(|e| {
            ApiError::bad_request(format!(
                "the body of the request could not be decoded as JSON: {e}"
            ))
        })?,
    };
    if depth(&value) > MAX_DEPTH {
        return Err(ApiError::bad_request(format!(
            "the body of the request is nested more than {MAX_DEPTH} levels deep"
        )));
    }
    Ok((value, duplicates))
}

fn parse_yaml(bytes: &[u8]) -> Result<Value, ApiError> {
    // JSON is YAML; take the fast, strict path when it is JSON.
    if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
        return Ok(v);
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request("the YAML body is not valid UTF-8"))?;
    // serde_norway (libyaml) refuses documents whose aliases expand past its repetition limit.
    let v: Value = serde_norway::from_str(text).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as YAML: {e}"
        ))
    })?;
    Ok(v)
}

fn depth(v: &Value) -> usize {
    // Iterative, so that checking depth cannot overflow the stack either.
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

/// Decode through the kind's typed representation and back: returns the normalised object and
/// the paths of fields the type does not know.
pub fn roundtrip(kind: &Kind, input: &Value) -> Result<(Value, Vec<String>), ApiError> {
    let typed = typed_roundtrip(kind, input).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            kind.kind, kind.version, kind.kind
        ))
    })?;
    let mut unknown = Vec::new();
    unknown_fields(input, &typed, &mut unknown);
    Ok((typed, unknown))
}

/// `roundtrip` for an object of which only the top-level fields `parts` can differ from a
/// version that was itself round-tripped (a patch of a stored object): only those fields go
/// through the typed representation, the rest stays as it is. The answer is the one
/// `roundtrip` gives for the whole object: typed decoding treats top-level fields
/// independently, and a normalised field comes back unchanged.
pub fn roundtrip_parts(
    kind: &Kind,
    mut input: Value,
    parts: &[String],
) -> Result<(Value, Vec<String>), ApiError> {
    let Some(whole) = input.as_object_mut() else {
        return roundtrip(kind, &input);
    };
    let mut part = serde_json::Map::new();
    for k in ["apiVersion", "kind"] {
        if let Some(v) = whole.get(k) {
            part.insert(k.to_string(), v.clone());
        }
    }
    for k in parts {
        if let Some(v) = whole.remove(k) {
            part.insert(k.clone(), v);
        }
    }
    let (typed, unknown) = roundtrip(kind, &Value::Object(part))?;
    let Value::Object(mut typed) = typed else {
        return Err(ApiError::internal("a typed object is not a JSON object"));
    };
    for k in parts {
        if let Some(v) = typed.remove(k) {
            whole.insert(k.clone(), v);
        }
    }
    Ok((input, unknown))
}

/// The top-level fields a patch document can change, or `None` when that is not plain from
/// the document (a JSON patch on the root, strategic-merge directives at the top).
pub fn patched_parts(json_patch: bool, doc: &Value) -> Option<Vec<String>> {
    let mut parts: Vec<String> = Vec::new();
    if json_patch {
        for op in doc.as_array()? {
            for field in ["path", "from"] {
                let Some(path) = op.get(field) else { continue };
                let first = path.as_str()?.strip_prefix('/')?.split('/').next()?;
                if first.is_empty() {
                    return None;
                }
                parts.push(first.replace("~1", "/").replace("~0", "~"));
            }
        }
    } else {
        for k in doc.as_object()?.keys() {
            if k.starts_with('$') {
                return None;
            }
            parts.push(k.clone());
        }
    }
    parts.retain(|k| k != "apiVersion" && k != "kind");
    parts.sort();
    parts.dedup();
    Some(parts)
}

/// The k8s-openapi type of every kind in the registry, in one list: `$m!` is called with it.
macro_rules! with_kind_types {
    ($m:ident, $($arg:expr),*) => {{
        use k8s_openapi::api::{apps::v1 as apps, coordination::v1 as coord, core::v1 as core};
        use k8s_openapi::api::{authentication::v1 as authn, authorization::v1 as authz};
        use k8s_openapi::api::{discovery::v1 as disc, events::v1 as events, scheduling::v1 as sched};
        $m!($($arg),* ; {
            "" / "Namespace" => core::Namespace,
            "" / "Pod" => core::Pod,
            "" / "Node" => core::Node,
            "" / "Service" => core::Service,
            "" / "Endpoints" => core::Endpoints,
            "" / "ReplicationController" => core::ReplicationController,
            "" / "ConfigMap" => core::ConfigMap,
            "" / "Secret" => core::Secret,
            "" / "ServiceAccount" => core::ServiceAccount,
            "" / "Event" => core::Event,
            "" / "ResourceQuota" => core::ResourceQuota,
            "" / "LimitRange" => core::LimitRange,
            "" / "PodTemplate" => core::PodTemplate,
            "apps" / "Deployment" => apps::Deployment,
            "apps" / "ReplicaSet" => apps::ReplicaSet,
            "apps" / "DaemonSet" => apps::DaemonSet,
            "apps" / "StatefulSet" => apps::StatefulSet,
            "apps" / "ControllerRevision" => apps::ControllerRevision,
            "coordination.k8s.io" / "Lease" => coord::Lease,
            "discovery.k8s.io" / "EndpointSlice" => disc::EndpointSlice,
            "events.k8s.io" / "Event" => events::Event,
            "scheduling.k8s.io" / "PriorityClass" => sched::PriorityClass,
            "authorization.k8s.io" / "SelfSubjectAccessReview" => authz::SelfSubjectAccessReview,
            "authorization.k8s.io" / "SelfSubjectRulesReview" => authz::SelfSubjectRulesReview,
            "authentication.k8s.io" / "SelfSubjectReview" => authn::SelfSubjectReview,
        })
    }};
}

macro_rules! typed {
    ($kind:expr, $input:expr ; { $($group:literal / $name:literal => $ty:ty),* $(,)? }) => {
        match ($kind.group, $kind.kind) {
            $(($group, $name) => {
                // From the borrowed tree: no copy of the input first.
                let t = <$ty as serde::Deserialize>::deserialize($input)?;
                serde_json::to_value(&t)
            })*
            _ => Ok($input.clone()),
        }
    };
}

fn typed_roundtrip(kind: &Kind, input: &Value) -> Result<Value, serde_json::Error> {
    with_kind_types!(typed, kind, input)
}

macro_rules! schema {
    ($kind:expr, $gen:expr ; { $($group:literal / $name:literal => $ty:ty),* $(,)? }) => {
        match ($kind.group, $kind.kind) {
            $(($group, $name) => Some($gen.subschema_for::<$ty>()),)*
            _ => None,
        }
    };
}

/// Add the OpenAPI schema of a kind (and of everything it refers to) to `gen`; returns the
/// `$ref` to it.
pub fn schema_for(kind: &Kind, gen: &mut schemars::SchemaGenerator) -> Option<schemars::Schema> {
    with_kind_types!(schema, kind, gen)
}

/// Parse JSON into a `Value` (as `serde_json::from_slice` does: a repeated key keeps its last
/// value) and, in the same pass, the paths of the keys an object repeated (`spec.x[0].n`):
/// `fieldValidation` reports them. The path of a key is printed only when it repeats.
pub fn parse_json(bytes: &[u8]) -> serde_json::Result<(Value, Vec<String>)> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::map::Entry;
    use serde_json::Map;
    use std::cell::RefCell;

    /// Where a value sits: its parent and its key or index there.
    enum At<'a> {
        Root,
        In(&'a At<'a>, Seg<'a>),
    }
    fn path_of(at: &At<'_>) -> String {
        let mut segs = Vec::new();
        let mut cur = at;
        while let At::In(parent, seg) = cur {
            segs.push(seg);
            cur = parent;
        }
        segs.reverse();
        render_path(segs)
    }
    struct Build<'a> {
        at: &'a At<'a>,
        duplicates: &'a RefCell<Vec<String>>,
    }
    impl<'de> DeserializeSeed<'de> for Build<'_> {
        type Value = Value;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Build<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Value, M::Error> {
            let mut map = Map::new();
            while let Some(k) = m.next_key::<String>()? {
                let v = m.next_value_seed(Build {
                    at: &At::In(self.at, Seg::Key(&k)),
                    duplicates: self.duplicates,
                })?;
                match map.entry(k) {
                    Entry::Vacant(e) => {
                        e.insert(v);
                    }
                    Entry::Occupied(mut e) => {
                        let path = path_of(&At::In(self.at, Seg::Key(e.key())));
                        self.duplicates.borrow_mut().push(path);
                        e.insert(v);
                    }
                }
            }
            Ok(Value::Object(map))
        }
        fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<Value, S::Error> {
            let mut items = Vec::with_capacity(s.size_hint().unwrap_or(0).min(4096));
            while let Some(v) = s.next_element_seed(Build {
                at: &At::In(self.at, Seg::Index(items.len())),
                duplicates: self.duplicates,
            })? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }
        fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
            Ok(Value::Bool(b))
        }
        fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
            Ok(Value::Number(n.into()))
        }
        fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
            Ok(Value::Number(n.into()))
        }
        fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
            Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E>(self, s: &str) -> Result<Value, E> {
            Ok(Value::String(s.to_owned()))
        }
        fn visit_string<E>(self, s: String) -> Result<Value, E> {
            Ok(Value::String(s))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    let duplicates = RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Build {
        at: &At::Root,
        duplicates: &duplicates,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((value, duplicates.into_inner()))
}

/// Fields present (and not null) in `input` but absent from the typed round trip.
/// One step of a path into a JSON value.
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// A path as field validation reports it: `spec.containers[0].name`.
fn render_path<'s, 'a: 's>(path: impl IntoIterator<Item = &'s Seg<'a>>) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(n) => s.push_str(&format!("[{n}]")),
        }
    }
    s
}

fn unknown_fields(input: &Value, typed: &Value, out: &mut Vec<String>) {
    // The path is kept as segments and printed only for a key that is reported.
    fn walk<'a>(input: &'a Value, typed: &Value, path: &mut Vec<Seg<'a>>, out: &mut Vec<String>) {
        match (input, typed) {
            (Value::Object(i), Value::Object(t)) => {
                // Free-form maps (labels, data, ...) round-trip whole, so only typed structs lose keys.
                for (k, v) in i {
                    path.push(Seg::Key(k));
                    match t.get(k) {
                        Some(tv) => walk(v, tv, path, out),
                        None if !v.is_null() => out.push(render_path(path.iter())),
                        None => {}
                    }
                    path.pop();
                }
            }
            (Value::Array(i), Value::Array(t)) => {
                for (n, (iv, tv)) in i.iter().zip(t.iter()).enumerate() {
                    path.push(Seg::Index(n));
                    walk(iv, tv, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    walk(input, typed, &mut Vec::new(), out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lookup;
    use serde_json::json;

    #[test]
    fn a_patched_part_checks_as_the_whole_object_does() {
        let pods = lookup("", "v1", "pods").unwrap();
        let stored = roundtrip(
            pods,
            &json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "namespace": "default", "labels": {"a": "b"},
                                 "managedFields": [{"manager": "m", "operation": "Update",
                                                    "fieldsType": "FieldsV1",
                                                    "fieldsV1": {"f:spec": {}}}]},
                    "spec": {"containers": [{"name": "c", "image": "busybox",
                                             "resources": {"limits": {"cpu": "1"}}}]},
                    "status": {"phase": "Pending"}}),
        )
        .unwrap()
        .0;
        let patches = [
            json!({"status": {"phase": "Running", "podIP": "10.0.0.1",
                              "conditions": [{"type": "Ready", "status": "True"}]}}),
            json!({"status": {"phase": "Running", "madeUp": 1}}),
            json!({"status": {"phase": 5}}),
            json!({"status": null}),
            json!({"metadata": {"labels": {"a": null, "c": "d"}, "extra": true}}),
            json!({"metadata": null}),
            json!({"spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x",
                                                              "unknownThing": {}}]}}),
            json!({"spec": {"containers": "not a list"}}),
            json!({"topLevelUnknown": {"x": 1}, "status": {"phase": "Failed"}}),
        ];
        for patch in patches {
            let mut patched = stored.clone();
            apimachinery::patch::merge_patch(&mut patched, &patch);
            let parts = patched_parts(false, &patch).unwrap();
            let whole = roundtrip(pods, &patched);
            let part = roundtrip_parts(pods, patched.clone(), &parts);
            match (whole, part) {
                (Ok(w), Ok(p)) => assert_eq!(w, p, "{patch}"),
                (Err(w), Err(p)) => assert_eq!(w.to_status(), p.to_status(), "{patch}"),
                (w, p) => panic!("{patch}: whole {:?}, part {:?}", w.is_ok(), p.is_ok()),
            }
        }
    }

    #[test]
    fn the_parts_a_patch_names() {
        let parts = |json, doc: serde_json::Value| patched_parts(json, &doc);
        assert_eq!(
            parts(false, json!({"status": {}, "metadata": {}, "kind": "Pod"})),
            Some(vec!["metadata".to_string(), "status".to_string()])
        );
        assert_eq!(parts(false, json!({"$patch": "replace"})), None);
        assert_eq!(parts(false, json!([1])), None);
        assert_eq!(
            parts(
                true,
                json!([{"op": "replace", "path": "/spec/replicas", "value": 1},
                       {"op": "move", "from": "/a~1b/x", "path": "/status/y"}])
            ),
            Some(vec!["a/b".to_string(), "spec".into(), "status".into()])
        );
        assert_eq!(
            parts(true, json!([{"op": "replace", "path": "", "value": {}}])),
            None
        );
        assert_eq!(parts(true, json!([{"op": "add", "path": 5}])), None);
    }

    #[test]
    fn duplicate_fields_by_path() {
        let cases: [(&str, &[&str]); 5] = [
            (r#"{"a":1,"b":2}"#, &[]),
            (r#"{"a":1,"a":2}"#, &["a"]),
            (
                r#"{"spec":{"replicas":1,"x":[{"n":1,"n":2}],"replicas":2}}"#,
                &["spec.x[0].n", "spec.replicas"],
            ),
            (r#"[[0, {"a":{"b":1,"b":2}}]]"#, &["[0][1].a.b"]),
            (r#"{"a\u0062":1,"ab":2}"#, &["ab"]),
        ];
        for (input, want) in cases {
            let (value, duplicates) = parse_json(input.as_bytes()).unwrap();
            assert_eq!(duplicates, want, "{input}");
            // The value is what serde_json makes of it (the last of repeated keys wins).
            assert_eq!(
                value,
                serde_json::from_str::<Value>(input).unwrap(),
                "{input}"
            );
        }
        for bad in ["{", r#"{"a":1} x"#, "[1,]", r#"{"a":1e999}"#, ""] {
            assert_eq!(
                parse_json(bad.as_bytes()).is_err(),
                serde_json::from_str::<Value>(bad).is_err(),
                "{bad}"
            );
        }
        let odd =
            r#"{"n":[-1, 18446744073709551615, 1.5, -0.0, 1e300, null, true, "é\n"], "o":{}}"#;
        assert_eq!(
            parse_json(odd.as_bytes()).unwrap().0,
            serde_json::from_str::<Value>(odd).unwrap()
        );
    }

    #[test]
    fn media_types() {
        assert_eq!(media_type(None).unwrap(), Media::Json);
        assert_eq!(
            media_type(Some("application/json; charset=utf-8")).unwrap(),
            Media::Json
        );
        assert_eq!(
            media_type(Some("application/merge-patch+json")).unwrap(),
            Media::MergePatch
        );
        assert_eq!(media_type(Some("text/plain")).unwrap_err().code, 415);
    }

    #[test]
    fn bodies_that_are_refused() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        let cases: Vec<(Vec<u8>, Media, u16)> = vec![
            (b"{".to_vec(), Media::Json, 400),
            (b"{\"a\": 1,}".to_vec(), Media::Json, 400),
            (b"".to_vec(), Media::Json, 400),
            (deep.into_bytes(), Media::Json, 400),
            (vec![b' '; MAX_BODY_BYTES + 1], Media::Json, 413),
            (b"a: [1, 2\n".to_vec(), Media::Yaml, 400),
        ];
        for (body, media, code) in cases {
            assert_eq!(parse_body(&body, media).unwrap_err().code, code);
        }
        let mut bomb = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let names = ["b", "c", "d", "e", "f", "g", "h", "i"];
        let mut prev = "a";
        for n in names {
            bomb.push_str(&format!("{n}: &{n} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
            prev = n;
        }
        assert_eq!(
            parse_body(bomb.as_bytes(), Media::Yaml).unwrap_err().code,
            400
        );
        assert_eq!(
            parse_body(b"a: 1\nb: [x]\n", Media::Yaml).unwrap(),
            json!({"a": 1, "b": ["x"]})
        );
    }

    #[test]
    fn roundtrip_finds_unknown_fields_and_type_errors() {
        let pods = lookup("", "v1", "pods").unwrap();
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"x": "y"}},
            "spec": {"containers": [{"name": "c", "image": "i", "bogus": 1}], "extra": true, "nodeName": null}});
        let (typed, unknown) = roundtrip(pods, &pod).unwrap();
        assert_eq!(unknown, vec!["spec.containers[0].bogus", "spec.extra"]);
        assert_eq!(typed["metadata"]["labels"]["x"], "y");
        assert!(typed["spec"].get("extra").is_none());
        let bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": 5}});
        let err = roundtrip(pods, &bad).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message.contains("cannot be handled as a Pod"),
            "{}",
            err.message
        );
    }
}
