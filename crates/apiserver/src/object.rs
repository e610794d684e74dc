//! Objects as the server carries them between the store and clients: the stored JSON with its
//! `metadata.resourceVersion` stamped in, plus the parsed metadata. Lists and watches send the
//! bytes as they are; only what needs the whole object (tables, field selectors on spec or
//! status, writes) parses it. This keeps a LIST of 100k pods and the watch cache cheap.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct Stored {
    /// The object's JSON, with `metadata.resourceVersion` set.
    pub json: Bytes,
    /// The parsed `metadata` (with `resourceVersion`).
    pub meta: Map<String, Value>,
}

impl Stored {
    /// From a stored value and the revision of the write that produced it.
    pub fn from_store(value: &[u8], revision: i64) -> Stored {
        match stamp(value, revision) {
            Some(s) => s,
            None => {
                // Not an object with metadata (should not happen for values we wrote): keep it whole.
                let v: Value = serde_json::from_slice(value).unwrap_or(Value::Null);
                Stored {
                    json: Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
                    meta: Map::new(),
                }
            }
        }
    }

    /// The whole object.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        self.meta
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn meta_str(&self, field: &str) -> &str {
        self.meta
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Rewrite the top level of `value` with `metadata.resourceVersion` = `revision`, parsing only
/// the metadata; every other field is copied as raw JSON.
fn stamp(value: &[u8], revision: i64) -> Option<Stored> {
    let top: Vec<(String, &RawValue)> = serde_json::from_slice::<TopLevel>(value).ok()?.0;
    let mut out = Vec::with_capacity(value.len() + 32);
    out.push(b'{');
    let mut meta = None;
    for (i, (k, raw)) in top.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, k).ok()?;
        out.push(b':');
        if k == "metadata" {
            let mut m: Map<String, Value> = serde_json::from_str(raw.get()).ok()?;
            m.insert(
                "resourceVersion".into(),
                Value::String(revision.to_string()),
            );
            serde_json::to_writer(&mut out, &m).ok()?;
            meta = Some(m);
        } else {
            out.extend_from_slice(raw.get().as_bytes());
        }
    }
    out.push(b'}');
    Some(Stored {
        json: Bytes::from(out),
        meta: meta?,
    })
}

/// The top-level members of an object, in order, values unparsed.
struct TopLevel<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for TopLevel<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = TopLevel<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Decode a stored value into a whole object with its resourceVersion stamped.
pub fn decode(value: &[u8], revision: i64) -> Value {
    let mut v: Value = serde_json::from_slice(value).unwrap_or(Value::Null);
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
    v
}

/// Does a stored object match the selectors? Parses the whole object only for field selectors
/// outside `metadata`.
pub fn matches(
    kind: &crate::registry::Kind,
    obj: &Stored,
    labels: &apimachinery::labels::Selector,
    fields: &apimachinery::fields::FieldSelector,
) -> bool {
    if !labels.is_empty() && !labels.matches(&obj.labels()) {
        return false;
    }
    if fields.is_empty() {
        return true;
    }
    let metadata_only = fields
        .requirements
        .iter()
        .all(|r| r.field.starts_with("metadata."));
    let whole = if metadata_only {
        serde_json::json!({"metadata": obj.meta})
    } else {
        obj.value()
    };
    fields.matches(|f| kind.field_value(&whole, f))
}

/// `{"kind":..,"apiVersion":..,"metadata":{..},"items":[..]}` from raw items.
pub fn list_json(kind: &str, api_version: &str, meta: &Value, items: &[Stored]) -> Vec<u8> {
    let size: usize = items.iter().map(|i| i.json.len() + 1).sum();
    let mut out = Vec::with_capacity(size + 256);
    out.extend_from_slice(b"{\"kind\":");
    let _ = serde_json::to_writer(&mut out, &format!("{kind}List"));
    out.extend_from_slice(b",\"apiVersion\":");
    let _ = serde_json::to_writer(&mut out, api_version);
    out.extend_from_slice(b",\"metadata\":");
    let _ = serde_json::to_writer(&mut out, meta);
    out.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&item.json);
    }
    out.extend_from_slice(b"]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stamping_keeps_everything_else() {
        let v = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "data": {"metadata": "{\"x\":1}", "k": "v\"q"},
            "metadata": {"name": "a", "labels": {"x": "y"}, "resourceVersion": "1"}});
        let s = Stored::from_store(&serde_json::to_vec(&v).unwrap(), 42);
        let back = s.value();
        let mut want = v.clone();
        want["metadata"]["resourceVersion"] = json!("42");
        assert_eq!(back, want);
        assert_eq!(s.meta_str("resourceVersion"), "42");
        assert_eq!(s.labels().get("x").map(String::as_str), Some("y"));
        let l = list_json(
            "ConfigMap",
            "v1",
            &json!({"resourceVersion": "42"}),
            &[s.clone(), s],
        );
        let l: Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(l["kind"], "ConfigMapList");
        assert_eq!(l["items"][1], want);
    }
}
