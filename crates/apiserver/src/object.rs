//! Objects as the server carries them between the store and clients: the stored JSON with its
//! `metadata.resourceVersion` stamped in, plus the parsed metadata. Lists and watches send the
//! bytes as they are; only what needs the whole object (tables, field selectors on spec or
//! status, writes) parses it. This keeps a LIST of 100k pods and the watch cache cheap.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct Stored {
    /// The object's JSON, with `metadata.resourceVersion` set.
    pub json: Bytes,
    /// Where the top-level `metadata` object lies in `json`, parsed only when asked for.
    meta_span: (usize, usize),
}

impl Stored {
    /// From a stored value and the revision of the write that produced it. Stored values never
    /// carry a resourceVersion (every write path strips it), so it is spliced in, not replaced.
    pub fn from_store(value: &[u8], revision: i64) -> Stored {
        if let Some((start, end)) = metadata_span(value) {
            let rv = format!("\"resourceVersion\":\"{revision}\"");
            let empty = value[start + 1..end - 1]
                .iter()
                .all(u8::is_ascii_whitespace);
            let mut out = Vec::with_capacity(value.len() + rv.len() + 1);
            out.extend_from_slice(&value[..=start]);
            out.extend_from_slice(rv.as_bytes());
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(&value[start + 1..]);
            let added = rv.len() + usize::from(!empty);
            return Stored {
                json: Bytes::from(out),
                meta_span: (start, end + added),
            };
        }
        // Not an object with metadata (not something we wrote): keep it whole.
        Stored {
            json: Bytes::copy_from_slice(value),
            meta_span: (0, 0),
        }
    }

    /// The whole object.
    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap_or(Value::Null)
    }

    /// The parsed `metadata`.
    pub fn meta(&self) -> Map<String, Value> {
        let (a, b) = self.meta_span;
        serde_json::from_slice(self.json.get(a..b).unwrap_or_default()).unwrap_or_default()
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        self.meta()
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn meta_str(&self, field: &str) -> String {
        self.meta()
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}

/// The span `[start, end)` of the value of the top-level `"metadata"` member of a JSON object
/// (`start` at its `{`, `end` after its `}`), found by scanning, without parsing.
fn metadata_span(json: &[u8]) -> Option<(usize, usize)> {
    member_span(json, 0, b"metadata").filter(|&(i, _)| json[i] == b'{')
}

/// The span of the value at a dotted path of object members (`spec.nodeName`), by scanning.
fn path_span(json: &[u8], path: &str) -> Option<(usize, usize)> {
    let mut span = (0, json.len());
    for part in path.split('.') {
        span = member_span(json, span.0, part.as_bytes())?;
    }
    Some(span)
}

/// The span of the value of member `key` of the JSON object starting at `start` (whitespace
/// allowed before it); None if there is no such member or `start` is not at an object.
fn member_span(json: &[u8], start: usize, key: &[u8]) -> Option<(usize, usize)> {
    let mut i = skip_ws(json, start);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(json, i);
        match json.get(i)? {
            b'}' => return None,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(json, i)?;
        let found = &json[i + 1..key_end - 1];
        i = skip_ws(json, key_end);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(json, i + 1);
        let value_end = skip_value(json, i)?;
        if found == key {
            return Some((i, value_end));
        }
        i = value_end;
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while json.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// `i` at an opening quote; returns the index after the closing quote.
fn skip_string(json: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', json.get(j..)?)?;
        if json[j] == b'"' {
            return Some(j + 1);
        }
        // An escape: the next byte is escaped, whatever it is.
        j += 2;
    }
}

/// `i` at the start of a value; returns the index after it.
fn skip_value(json: &[u8], i: usize) -> Option<usize> {
    match json.get(i)? {
        b'"' => skip_string(json, i),
        &open @ (b'{' | b'[') => {
            // Only this value's own kind of bracket can close it (the other kind nests inside
            // and balances by itself), and strings are skipped whole: the scan jumps from one
            // of those three bytes to the next (memchr) instead of looking at every byte.
            let close = if open == b'{' { b'}' } else { b']' };
            let mut depth = 0usize;
            let mut j = i;
            loop {
                j += memchr::memchr3(b'"', open, close, json.get(j..)?)?;
                match json[j] {
                    b'"' => {
                        j = skip_string(json, j)?;
                        continue;
                    }
                    c if c == open => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(c) = json.get(j) {
                if matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace() {
                    break;
                }
                j += 1;
            }
            Some(j)
        }
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
    // Only the selected fields, each found by scanning and parsed alone: a watch with a field
    // selector sees every change to its resource, and most objects are much bigger.
    let mut sparse = Value::Object(Map::new());
    for r in &fields.requirements {
        let Some((a, b)) = path_span(&obj.json, &r.field) else {
            continue;
        };
        let Ok(leaf) = serde_json::from_slice::<Value>(&obj.json[a..b]) else {
            return obj_matches_whole(kind, obj, fields);
        };
        let mut cur = &mut sparse;
        let mut parts = r.field.split('.').peekable();
        while let Some(part) = parts.next() {
            let Value::Object(m) = cur else { break };
            cur = if parts.peek().is_none() {
                m.insert(part.to_string(), leaf.clone());
                break;
            } else {
                m.entry(part.to_string())
                    .or_insert_with(|| Value::Object(Map::new()))
            };
        }
    }
    fields.matches(|f| kind.field_value(&sparse, f))
}

/// The selector against the whole parsed object (for JSON the scanner gives up on).
fn obj_matches_whole(
    kind: &crate::registry::Kind,
    obj: &Stored,
    fields: &apimachinery::fields::FieldSelector,
) -> bool {
    let whole = obj.value();
    fields.matches(|f| kind.field_value(&whole, f))
}

/// `{"kind":..,"apiVersion":..,"metadata":{..},"items":[..]}` from raw items, as a stream of
/// chunks of about `CHUNK` bytes: the response is never built whole, and each item is released
/// once it has been sent.
pub fn list_stream(
    kind: &str,
    api_version: &str,
    meta: &Value,
    items: Vec<Stored>,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    const CHUNK: usize = 256 * 1024;
    let head = list_head(kind, api_version, meta);
    let mut items = items.into_iter().peekable();
    let mut first = true;
    let mut head = Some(head);
    futures::stream::iter(std::iter::from_fn(move || {
        let mut buf = head.take()?;
        if buf.is_empty() && items.peek().is_none() {
            return None;
        }
        while buf.len() < CHUNK {
            match items.next() {
                Some(item) => {
                    if !first {
                        buf.push(b',');
                    }
                    first = false;
                    buf.extend_from_slice(&item.json);
                }
                None => {
                    buf.extend_from_slice(b"]}");
                    return Some(Bytes::from(buf));
                }
            }
        }
        head = Some(Vec::with_capacity(CHUNK + 4096));
        Some(Bytes::from(buf))
    }))
}

/// A whole list straight from the store: each chunk of stored values is stamped, filtered and
/// sent as one body chunk, so the store read overlaps with sending and memory holds a few
/// chunks. A store error mid-way ends the body early (the client sees a truncated list and
/// retries); nothing else can be said once the 200 has gone out.
pub fn list_from_store(
    kind: &str,
    api_version: &str,
    meta: &Value,
    chunks: std::pin::Pin<
        Box<dyn futures::Stream<Item = store::Result<Vec<store::KeyValue>>> + Send>,
    >,
    keep: impl Fn(&Stored) -> bool + Send + 'static,
) -> impl futures::Stream<Item = Bytes> + Send + 'static {
    use futures::StreamExt;
    struct St<F> {
        head: Option<Vec<u8>>,
        chunks: std::pin::Pin<
            Box<dyn futures::Stream<Item = store::Result<Vec<store::KeyValue>>> + Send>,
        >,
        first: bool,
        done: bool,
        keep: F,
    }
    let st = St {
        head: Some(list_head(kind, api_version, meta)),
        chunks,
        first: true,
        done: false,
        keep,
    };
    futures::stream::unfold(st, |mut st| async move {
        if let Some(h) = st.head.take() {
            return Some((Bytes::from(h), st));
        }
        loop {
            if st.done {
                return None;
            }
            match st.chunks.next().await {
                Some(Ok(kvs)) => {
                    let mut buf =
                        Vec::with_capacity(kvs.iter().map(|kv| kv.value.len() + 40).sum());
                    for kv in kvs {
                        let obj = Stored::from_store(&kv.value, kv.mod_revision.0);
                        if (st.keep)(&obj) {
                            if !st.first {
                                buf.push(b',');
                            }
                            st.first = false;
                            buf.extend_from_slice(&obj.json);
                        }
                    }
                    if !buf.is_empty() {
                        return Some((Bytes::from(buf), st));
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "list: store read failed mid-stream");
                    return None;
                }
                None => {
                    st.done = true;
                    return Some((Bytes::from_static(b"]}"), st));
                }
            }
        }
    })
}

fn list_head(kind: &str, api_version: &str, meta: &Value) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"{\"kind\":");
    let _ = serde_json::to_writer(&mut head, &format!("{kind}List"));
    head.extend_from_slice(b",\"apiVersion\":");
    let _ = serde_json::to_writer(&mut head, api_version);
    head.extend_from_slice(b",\"metadata\":");
    let _ = serde_json::to_writer(&mut head, meta);
    head.extend_from_slice(b",\"items\":[");
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_selectors_match_as_on_the_whole_object() {
        use apimachinery::fields::FieldSelector;
        let pods = crate::registry::lookup("", "v1", "pods").unwrap();
        let objects = [
            json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1", "restartPolicy": "Always"}, "status": {"phase": "Running"}}),
            json!({"metadata": {"name": "b", "namespace": "ns"}, "spec": {"containers": [{"name": "c"}]}, "status": {}}),
            json!({"metadata": {"name": "c", "namespace": "other"}, "spec": null, "status": {"phase": "Pending", "podIP": "10.0.0.1"}}),
            json!({"spec": {"nodeName": "n\"2"}, "metadata": {"name": "d", "namespace": "ns"}}),
        ];
        let selectors = [
            "spec.nodeName=n1",
            "spec.nodeName!=",
            "spec.nodeName=",
            "spec.nodeName=n\"2",
            "status.phase=Running,metadata.namespace=ns",
            "status.phase!=Running,spec.restartPolicy!=Always",
            "metadata.name=c,status.podIP=10.0.0.1",
        ];
        for obj in &objects {
            let stored = Stored::from_store(obj.to_string().as_bytes(), 7);
            for sel in selectors {
                let fields = FieldSelector::parse(sel).unwrap();
                assert_eq!(
                    matches(pods, &stored, &Default::default(), &fields),
                    obj_matches_whole(pods, &stored, &fields),
                    "{sel} on {obj}"
                );
            }
        }
        let on_n1 = FieldSelector::parse("spec.nodeName=n1").unwrap();
        let first = Stored::from_store(objects[0].to_string().as_bytes(), 7);
        assert!(matches(pods, &first, &Default::default(), &on_n1));
    }

    #[test]
    fn list_streams_are_valid_json_whatever_their_size() {
        for n in [0usize, 1, 2, 5000] {
            let items: Vec<Stored> = (0..n)
                .map(|i| {
                    Stored::from_store(
                        format!(
                            r#"{{"kind":"X","metadata":{{"name":"n{i}"}},"pad":"{}"}}"#,
                            "p".repeat(100)
                        )
                        .as_bytes(),
                        3,
                    )
                })
                .collect();
            let chunks: Vec<Bytes> = futures::executor::block_on(futures::StreamExt::collect(
                list_stream("X", "v1", &json!({}), items),
            ));
            assert!(
                n < 5000 || chunks.len() > 1,
                "large lists go out in several chunks"
            );
            let v: Value = serde_json::from_slice(&chunks.concat()).unwrap();
            assert_eq!(v["items"].as_array().unwrap().len(), n);
            assert_eq!(v["kind"], "XList");
        }
    }

    #[test]
    fn lists_from_store_chunks_filter_and_stay_valid_json() {
        use futures::StreamExt;
        let kv = |i: usize| store::KeyValue {
            key: format!("/k/{i}"),
            value: Bytes::from(format!(r#"{{"kind":"X","metadata":{{"name":"n{i}"}}}}"#)),
            create_revision: store::Revision(1),
            mod_revision: store::Revision(i as i64 + 1),
        };
        for (chunks, keep_even, want) in [
            (vec![vec![kv(0), kv(1)], vec![kv(2)]], false, 3usize),
            (vec![vec![kv(0), kv(1)], vec![kv(2), kv(3)]], true, 2),
            (vec![vec![kv(1)], vec![kv(3)]], true, 0),
            (vec![], false, 0),
        ] {
            let stream: std::pin::Pin<
                Box<dyn futures::Stream<Item = store::Result<Vec<store::KeyValue>>> + Send>,
            > = Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)));
            let out: Vec<Bytes> = futures::executor::block_on(
                list_from_store(
                    "X",
                    "v1",
                    &json!({"resourceVersion": "9"}),
                    stream,
                    move |o| {
                        !keep_even
                            || o.meta_str("name")
                                .trim_start_matches('n')
                                .parse::<usize>()
                                .unwrap()
                                % 2
                                == 0
                    },
                )
                .collect(),
            );
            let v: Value = serde_json::from_slice(&out.concat()).unwrap();
            assert_eq!(v["items"].as_array().unwrap().len(), want);
            assert_eq!(v["metadata"]["resourceVersion"], "9");
            if want > 0 {
                assert!(v["items"][0]["metadata"]["resourceVersion"].is_string());
            }
        }
    }

    #[test]
    fn stamping_odd_shapes() {
        for (input, want) in [
            (
                r#"{"metadata":{}}"#,
                r#"{"metadata":{"resourceVersion":"7"}}"#,
            ),
            (
                r#" { "kind" : "X" , "metadata" : { "name" : "n" } } "#,
                r#" { "kind" : "X" , "metadata" : {"resourceVersion":"7", "name" : "n" } } "#,
            ),
            (
                r#"{"a":"}\"metadata\":{","b":[{"metadata":{}}],"c":1.5e3,"d":null,"metadata":{"x":"{"}}"#,
                r#"{"a":"}\"metadata\":{","b":[{"metadata":{}}],"c":1.5e3,"d":null,"metadata":{"resourceVersion":"7","x":"{"}}"#,
            ),
        ] {
            let s = Stored::from_store(input.as_bytes(), 7);
            assert_eq!(std::str::from_utf8(&s.json).unwrap(), want);
            assert_eq!(s.meta_str("resourceVersion"), "7");
        }
        // No metadata object, or not an object: kept as it is.
        for input in [r#"{"kind":"X"}"#, "[1]", r#"{"metadata":"x"}"#, "{"] {
            let s = Stored::from_store(input.as_bytes(), 7);
            assert_eq!(&s.json[..], input.as_bytes());
        }
    }

    #[test]
    fn member_spans_agree_with_a_parser() {
        let docs = [
            json!({"a": [[1, [2]], {"b": "]}", "c": [{"d": "{["}]}], "metadata": {"x": "\\"}}),
            json!({"metadata": {"n": "q\"}\\\"", "l": [[], {}]}, "z": {"y": [{"}": "]"}]}}),
            json!({"e": "", "f": "\\\\", "metadata": {}, "g": [{"h": [[{"i": "é ✓"}]]}]}),
        ];
        for doc in &docs {
            let text = serde_json::to_vec_pretty(doc).unwrap();
            for (key, want) in doc.as_object().unwrap() {
                let (a, b) = member_span(&text, 0, key.as_bytes()).unwrap();
                let got: Value = serde_json::from_slice(&text[a..b]).unwrap();
                assert_eq!(&got, want, "{key} in {doc}");
            }
            assert_eq!(member_span(&text, 0, b"missing"), None);
        }
        // Cut short anywhere: no span past the end, no panic.
        let text = serde_json::to_vec(&docs[0]).unwrap();
        for end in 0..text.len() {
            if let Some((_, b)) = member_span(&text[..end], 0, b"metadata") {
                assert!(b <= end);
            }
        }
    }

    #[test]
    fn stamping_keeps_everything_else() {
        let v = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "data": {"metadata": "{\"x\":1}", "k": "v\"q"},
            "metadata": {"name": "a", "labels": {"x": "y"}}});
        let s = Stored::from_store(&serde_json::to_vec(&v).unwrap(), 42);
        let back = s.value();
        let mut want = v.clone();
        want["metadata"]["resourceVersion"] = json!("42");
        assert_eq!(back, want);
        assert_eq!(s.meta_str("resourceVersion"), "42");
        assert_eq!(s.meta_str("name"), "a");
        assert_eq!(s.labels().get("x").map(String::as_str), Some("y"));
        let chunks: Vec<Bytes> =
            futures::executor::block_on(futures::StreamExt::collect(list_stream(
                "ConfigMap",
                "v1",
                &json!({"resourceVersion": "42"}),
                vec![s.clone(), s],
            )));
        let l: Value = serde_json::from_slice(&chunks.concat()).unwrap();
        assert_eq!(l["kind"], "ConfigMapList");
        assert_eq!(l["items"][1], want);
    }
}
