//! JSON patch (RFC 6902) and JSON merge patch (RFC 7386).

use serde_json::Value;

/// Upstream's cap on the operations of one JSON patch.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the allowed maximum operations in a JSON patch is {MAX_JSON_PATCH_OPERATIONS}, got {0}"
    )]
    TooManyOperations(usize),
    #[error("testing value {path} failed")]
    TestFailed { path: String },
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn parse_pointer(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Ok(vec![]);
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| PatchError::Invalid(format!("JSON pointer {path:?} must start with '/'")))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn index(token: &str, len: usize, allow_end: bool) -> Result<usize, PatchError> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let i: usize = token
        .parse()
        .map_err(|_| PatchError::Invalid(format!("invalid array index {token:?}")))?;
    if i > len || (!allow_end && i == len) {
        return Err(PatchError::Invalid(format!(
            "array index {i} out of bounds"
        )));
    }
    Ok(i)
}

fn get<'a>(doc: &'a Value, path: &[String]) -> Result<&'a Value, PatchError> {
    let mut cur = doc;
    for t in path {
        cur = match cur {
            Value::Object(m) => m.get(t),
            Value::Array(a) => a.get(index(t, a.len(), false)?),
            _ => None,
        }
        .ok_or_else(|| PatchError::Invalid(format!("path /{} does not exist", path.join("/"))))?;
    }
    Ok(cur)
}

fn parent_mut<'a>(doc: &'a mut Value, path: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(t),
            Value::Array(a) => {
                let i = index(t, a.len(), false)?;
                a.get_mut(i)
            }
            _ => None,
        }
        .ok_or_else(|| PatchError::Invalid(format!("path /{} does not exist", path.join("/"))))?;
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &[String], value: Value) -> Result<(), PatchError> {
    let Some((last, parent)) = path.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            let i = index(last, a.len(), true)?;
            a.insert(i, value);
        }
        _ => {
            return Err(PatchError::Invalid(format!(
                "cannot add at /{}",
                path.join("/")
            )))
        }
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &[String]) -> Result<Value, PatchError> {
    let Some((last, parent)) = path.split_last() else {
        return Err(PatchError::Invalid(
            "cannot remove the whole document".into(),
        ));
    };
    match parent_mut(doc, parent)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| PatchError::Invalid(format!("path /{} does not exist", path.join("/")))),
        Value::Array(a) => {
            let i = index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(PatchError::Invalid(format!(
            "path /{} does not exist",
            path.join("/")
        ))),
    }
}

/// Apply an RFC 6902 patch document (an array of operations).
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| PatchError::Invalid("a JSON patch must be an array of operations".into()))?;
    if ops.len() > MAX_JSON_PATCH_OPERATIONS {
        return Err(PatchError::TooManyOperations(ops.len()));
    }
    for op in ops {
        let name = op["op"]
            .as_str()
            .ok_or_else(|| PatchError::Invalid("operation has no \"op\"".into()))?;
        let path =
            parse_pointer(op["path"].as_str().ok_or_else(|| {
                PatchError::Invalid(format!("operation {name:?} has no \"path\""))
            })?)?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Invalid(format!("operation {name:?} has no \"value\"")))
        };
        let from = || -> Result<Vec<String>, PatchError> {
            parse_pointer(op["from"].as_str().ok_or_else(|| {
                PatchError::Invalid(format!("operation {name:?} has no \"from\""))
            })?)
        };
        match name {
            "add" => add(doc, &path, value()?)?,
            "remove" => {
                remove(doc, &path)?;
            }
            "replace" => {
                let v = value()?;
                remove(doc, &path)?;
                add(doc, &path, v)?;
            }
            "move" => {
                let f = from()?;
                let v = remove(doc, &f)?;
                add(doc, &path, v)?;
            }
            "copy" => {
                let v = get(doc, &from()?)?.clone();
                add(doc, &path, v)?;
            }
            "test" => {
                if get(doc, &path)? != &value()? {
                    return Err(PatchError::TestFailed {
                        path: format!("/{}", path.join("/")),
                    });
                }
            }
            other => return Err(PatchError::Invalid(format!("unknown operation {other:?}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386_examples() {
        for (target, patch, want) in [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (json!([1]), json!({"a": 1}), json!({"a": 1})),
        ] {
            let mut t = target;
            merge_patch(&mut t, &patch);
            assert_eq!(t, want);
        }
    }

    #[test]
    fn json_patch_operations() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "add", "path": "/a/b/0", "value": 0},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "move", "from": "/d", "path": "/e~1f"},
                {"op": "remove", "path": "/a/b/1"},
                {"op": "test", "path": "/c", "value": "y"},
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"b": [0, 2, 3]}, "c": "y", "e/f": "y"}));
        for bad in [
            json!({"op": "add"}),
            json!([{"op": "remove", "path": "/nope"}]),
            json!([{"op": "replace", "path": "/c"}]),
            json!([{"op": "jump", "path": "/c"}]),
            json!([{"op": "add", "path": "/a/b/9", "value": 1}]),
            json!([{"op": "test", "path": "/c", "value": "z"}]),
        ] {
            assert!(json_patch(&mut doc.clone(), &bad).is_err(), "{bad}");
        }
        let many = Value::Array(vec![
            json!({"op": "test", "path": "/c", "value": "y"});
            MAX_JSON_PATCH_OPERATIONS + 1
        ]);
        assert!(matches!(
            json_patch(&mut doc, &many),
            Err(PatchError::TooManyOperations(_))
        ));
    }
}
