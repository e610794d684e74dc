//! Strategic merge patch (`application/strategic-merge-patch+json`).
//!
//! Like a JSON merge patch, except that lists the type declares as merge lists are merged
//! element by element (by a merge key, or as sets of primitives) instead of being replaced, and
//! that the patch may carry directives:
//! - `"$patch": "replace" | "merge" | "delete"` in a map (or as a list element) to replace, merge
//!   or delete that map (or the whole list);
//! - `"$retainKeys": [...]`: after merging, keep only these keys of the map;
//! - `"$setElementOrder/<list>": [...]`: the order of the merged list's elements;
//! - `"$deleteFromPrimitiveList/<list>": [...]`: values to remove from a primitive merge list.
//!
//! What a field's strategy is comes from a [`TypeMeta`] (see `patch_meta` for the built-in kinds).

use serde_json::{Map, Value};

/// How a list field is patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStrategy {
    /// The patch's list replaces the original (the default).
    Replace,
    /// Elements are maps merged by this key.
    MergeByKey(&'static str),
    /// Elements are primitives merged as a set.
    MergePrimitive,
}

/// What strategic merge needs to know about one field.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub list: ListStrategy,
    /// The type of the field's value (or of its list's elements), if it has fields that matter.
    pub ty: Option<&'static TypeMeta>,
}

/// The fields of a type that strategic merge treats specially; every other field is a plain map
/// (merged) or a value or list (replaced).
#[derive(Debug)]
pub struct TypeMeta {
    pub fields: &'static [(&'static str, Field)],
}

impl TypeMeta {
    fn field(&'static self, name: &str) -> Field {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .unwrap_or(Field {
                list: ListStrategy::Replace,
                ty: None,
            })
    }
}

fn field_of(meta: Option<&'static TypeMeta>, name: &str) -> Field {
    match meta {
        Some(m) => m.field(name),
        None => Field {
            list: ListStrategy::Replace,
            ty: None,
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrategicError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> StrategicError {
    StrategicError::Invalid(msg.into())
}

/// Apply `patch` to `original` (both JSON objects) for a type described by `meta`.
pub fn strategic_merge(
    original: &Value,
    patch: &Value,
    meta: Option<&'static TypeMeta>,
) -> Result<Value, StrategicError> {
    let (Value::Object(o), Value::Object(p)) = (original, patch) else {
        return Err(invalid("a strategic merge patch must be a JSON object"));
    };
    Ok(match merge_map(o, p, meta)? {
        Some(m) => Value::Object(m),
        None => Value::Object(Map::new()),
    })
}

/// Merge a patch map into a map; None means the patch deleted the map.
fn merge_map(
    original: &Map<String, Value>,
    patch: &Map<String, Value>,
    meta: Option<&'static TypeMeta>,
) -> Result<Option<Map<String, Value>>, StrategicError> {
    match patch.get("$patch") {
        None => {}
        Some(Value::String(d)) if d == "merge" => {}
        Some(Value::String(d)) if d == "replace" => {
            let mut m = patch.clone();
            m.remove("$patch");
            return Ok(Some(strip_directives_map(&m)));
        }
        Some(Value::String(d)) if d == "delete" => return Ok(None),
        Some(other) => return Err(invalid(format!("unknown patch type: {other} in map"))),
    }
    let mut out = original.clone();
    for (k, pv) in patch {
        if k.starts_with('$') {
            continue;
        }
        let field = field_of(meta, k);
        if pv.is_null() {
            out.remove(k);
            continue;
        }
        let merged = match (out.get(k), pv) {
            (Some(Value::Object(ov)), Value::Object(pm)) => {
                merge_map(ov, pm, field.ty)?.map(Value::Object)
            }
            (None, Value::Object(pm)) => merge_map(&Map::new(), pm, field.ty)?.map(Value::Object),
            (Some(Value::Array(ov)), Value::Array(pa)) => {
                Some(Value::Array(merge_list(ov, pa, field)?))
            }
            (None, Value::Array(pa)) => Some(Value::Array(merge_list(&[], pa, field)?)),
            (_, other) => Some(other.clone()),
        };
        match merged {
            Some(v) => {
                out.insert(k.clone(), v);
            }
            None => {
                out.remove(k);
            }
        }
    }
    for (k, pv) in patch {
        if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let values = pv
                .as_array()
                .ok_or_else(|| invalid(format!("{k} must be a list")))?;
            if let Some(Value::Array(items)) = out.get_mut(list) {
                items.retain(|v| !values.contains(v));
            }
        }
    }
    for (k, pv) in patch {
        if let Some(list) = k.strip_prefix("$setElementOrder/") {
            let order = pv
                .as_array()
                .ok_or_else(|| invalid(format!("{k} must be a list")))?;
            let field = field_of(meta, list);
            if let Some(Value::Array(items)) = out.get_mut(list) {
                *items = reorder(std::mem::take(items), order, field.list)?;
            }
        }
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keys = retain
            .as_array()
            .ok_or_else(|| invalid("$retainKeys must be a list of field names"))?;
        let keys: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keys.contains(&k.as_str()));
    }
    Ok(Some(out))
}

fn is_directive_element(v: &Value, directive: &str) -> bool {
    v.get("$patch").and_then(Value::as_str) == Some(directive)
}

fn merge_list(
    original: &[Value],
    patch: &[Value],
    field: Field,
) -> Result<Vec<Value>, StrategicError> {
    if patch.iter().any(|v| is_directive_element(v, "replace")) {
        return Ok(patch
            .iter()
            .filter(|v| !is_directive_element(v, "replace"))
            .map(strip_directives)
            .collect());
    }
    match field.list {
        ListStrategy::Replace => Ok(patch.iter().map(strip_directives).collect()),
        ListStrategy::MergePrimitive => {
            let mut out = original.to_vec();
            for v in patch {
                if v.is_object() || v.is_array() {
                    return Err(invalid(
                        "a primitive merge list cannot contain maps or lists",
                    ));
                }
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
            Ok(out)
        }
        ListStrategy::MergeByKey(key) => {
            let mut out = original.to_vec();
            for p in patch {
                let pm = p.as_object().ok_or_else(|| {
                    invalid(format!(
                        "expected a map in a list merged by {key:?}, got {p}"
                    ))
                })?;
                let kv = pm.get(key).ok_or_else(|| {
                    invalid(format!(
                        "map: {p} does not contain declared merge key: {key}"
                    ))
                })?;
                let pos = out.iter().position(|o| o.get(key) == Some(kv));
                if is_directive_element(p, "delete") {
                    out.retain(|o| o.get(key) != Some(kv));
                    continue;
                }
                match pos {
                    Some(i) => {
                        let om = out[i].as_object().cloned().unwrap_or_default();
                        match merge_map(&om, pm, field.ty)? {
                            Some(m) => out[i] = Value::Object(m),
                            None => {
                                out.remove(i);
                            }
                        }
                    }
                    None => {
                        if let Some(m) = merge_map(&Map::new(), pm, field.ty)? {
                            out.push(Value::Object(m));
                        }
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Order `items` as `order` says; items `order` does not name keep their relative order after.
fn reorder(
    items: Vec<Value>,
    order: &[Value],
    list: ListStrategy,
) -> Result<Vec<Value>, StrategicError> {
    let matches = |item: &Value, o: &Value| -> bool {
        match list {
            ListStrategy::MergeByKey(key) => o.get(key).is_some() && item.get(key) == o.get(key),
            _ => item == o,
        }
    };
    let mut rest: Vec<Option<Value>> = items.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(rest.len());
    for o in order {
        if let Some(slot) = rest
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|i| matches(i, o)))
        {
            out.extend(slot.take());
        }
    }
    out.extend(rest.into_iter().flatten());
    Ok(out)
}

fn strip_directives_map(m: &Map<String, Value>) -> Map<String, Value> {
    m.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), strip_directives(v)))
        .collect()
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives_map(m)),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch_meta;
    use serde_json::json;

    /// One table, every directive, against the pod and deployment types.
    #[test]
    fn strategic_merge_table() {
        let pod = Some(patch_meta::for_kind("", "Pod"));
        let deploy = Some(patch_meta::for_kind("apps", "Deployment"));
        let base = json!({
            "metadata": {"name": "p", "labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]},
            "spec": {
                "containers": [
                    {"name": "web", "image": "nginx:1", "ports": [{"containerPort": 80}, {"containerPort": 443}],
                     "env": [{"name": "A", "value": "1"}]},
                    {"name": "side", "image": "busybox"}
                ],
                "volumes": [{"name": "v", "emptyDir": {}}],
                "tolerations": [{"key": "k1"}],
            },
            "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "PodScheduled", "status": "True"}]},
        });
        let cases: Vec<(&str, Option<&'static TypeMeta>, Value, Value)> = vec![
            (
                "maps merge, null deletes",
                pod,
                json!({"metadata": {"labels": {"a": null, "c": "3"}}}),
                json!({"metadata": {"labels": {"a": null, "b": "2", "c": "3"}}}),
            ),
            (
                "containers merge by name",
                pod,
                json!({"spec": {"containers": [{"name": "web", "image": "nginx:2"}]}}),
                json!({"spec": {"containers": [{"name": "web", "image": "nginx:2"}, {"name": "side"}]}}),
            ),
            (
                "new element appended",
                pod,
                json!({"spec": {"containers": [{"name": "third", "image": "x"}]}}),
                json!({"spec": {"containers": [{"name": "web"}, {"name": "side"}, {"name": "third", "image": "x"}]}}),
            ),
            (
                "$patch delete of an element",
                pod,
                json!({"spec": {"containers": [{"name": "side", "$patch": "delete"}]}}),
                json!({"spec": {"containers": [{"name": "web"}]}}),
            ),
            (
                "ports merge by containerPort, nested",
                pod,
                json!({"spec": {"containers": [{"name": "web", "ports": [{"containerPort": 443, "$patch": "delete"}, {"containerPort": 8080}]}]}}),
                json!({"spec": {"containers": [{"name": "web", "ports": [{"containerPort": 80}, {"containerPort": 8080}]}, {"name": "side"}]}}),
            ),
            (
                "env merges by name",
                pod,
                json!({"spec": {"containers": [{"name": "web", "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "9"}]}]}}),
                json!({"spec": {"containers": [{"name": "web", "env": [{"name": "A", "value": "9"}, {"name": "B", "value": "2"}]}, {"name": "side"}]}}),
            ),
            (
                "tolerations replace (no strategy)",
                pod,
                json!({"spec": {"tolerations": [{"key": "k2"}]}}),
                json!({"spec": {"tolerations": [{"key": "k2"}]}}),
            ),
            (
                "finalizers merge as a set",
                pod,
                json!({"metadata": {"finalizers": ["y", "z"]}}),
                json!({"metadata": {"finalizers": ["x", "y", "z"]}}),
            ),
            (
                "$deleteFromPrimitiveList",
                pod,
                json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["x"]}}),
                json!({"metadata": {"finalizers": ["y"]}}),
            ),
            (
                "$setElementOrder",
                pod,
                json!({"spec": {"$setElementOrder/containers": [{"name": "side"}, {"name": "web"}], "containers": [{"name": "web", "image": "nginx:3"}]}}),
                json!({"spec": {"containers": [{"name": "side"}, {"name": "web", "image": "nginx:3"}]}}),
            ),
            (
                "$patch replace of a list",
                pod,
                json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "only", "image": "i"}]}}),
                json!({"spec": {"containers": [{"name": "only", "image": "i"}]}}),
            ),
            (
                "$patch replace of a map",
                pod,
                json!({"metadata": {"labels": {"$patch": "replace", "z": "26"}}}),
                json!({"metadata": {"labels": {"z": "26"}}}),
            ),
            (
                "$patch delete of a map",
                pod,
                json!({"metadata": {"labels": {"$patch": "delete"}}}),
                json!({"metadata": {"labels": null}}),
            ),
            (
                "status conditions merge by type",
                pod,
                json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
                json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled"}]}}),
            ),
            (
                "volumes $retainKeys",
                pod,
                json!({"spec": {"volumes": [{"name": "v", "$retainKeys": ["name", "configMap"], "configMap": {"name": "cm"}}]}}),
                json!({"spec": {"volumes": [{"name": "v", "configMap": {"name": "cm"}}]}}),
            ),
            (
                "deployment template containers merge",
                deploy,
                json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:2"}]}}}}),
                json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:2"}]}}}}),
            ),
        ];
        for (what, meta, patch, expect) in cases {
            let base = if what.starts_with("deployment") {
                json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:1"}]}}, "strategy": {"type": "RollingUpdate"}}})
            } else {
                base.clone()
            };
            let got =
                strategic_merge(&base, &patch, meta).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_subset(&expect, &got, what);
        }
    }

    /// Every value in `expect` is in `got`; a list must match in length and order; null = absent.
    fn assert_subset(expect: &Value, got: &Value, what: &str) {
        match (expect, got) {
            (Value::Object(e), Value::Object(g)) => {
                for (k, ev) in e {
                    match (ev, g.get(k)) {
                        (Value::Null, None) => {}
                        (Value::Null, Some(v)) => panic!("{what}: {k} should be gone, is {v}"),
                        (ev, Some(gv)) => assert_subset(ev, gv, what),
                        (_, None) => panic!("{what}: missing {k} in {got}"),
                    }
                }
            }
            (Value::Array(e), Value::Array(g)) => {
                assert_eq!(e.len(), g.len(), "{what}: list {got}");
                for (ev, gv) in e.iter().zip(g) {
                    assert_subset(ev, gv, what);
                }
            }
            (e, g) => assert_eq!(e, g, "{what}"),
        }
    }

    #[test]
    fn malformed_patches_are_errors() {
        let pod = Some(patch_meta::for_kind("", "Pod"));
        let base = json!({"spec": {"containers": [{"name": "a"}]}});
        for bad in [
            json!([1, 2]),
            json!({"spec": {"$patch": "explode"}}),
            json!({"spec": {"containers": [{"image": "no-name"}]}}),
            json!({"spec": {"containers": ["not-a-map"]}}),
            json!({"metadata": {"finalizers": [{"a": 1}]}}),
            json!({"metadata": {"$retainKeys": "name"}}),
            json!({"spec": {"$setElementOrder/containers": 5}}),
        ] {
            assert!(strategic_merge(&base, &bad, pod).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_kinds_merge_like_json_merge_patch() {
        let got = strategic_merge(
            &json!({"a": [1], "b": {"c": 1}}),
            &json!({"a": [2], "b": {"d": 2}}),
            None,
        )
        .unwrap();
        assert_eq!(got, json!({"a": [2], "b": {"c": 1, "d": 2}}));
    }
}
