//! Server-side apply and field management (`metadata.managedFields`).
//!
//! Every field of an object is owned by the managers that set it. A write records, under its
//! field manager, the fields it changed (operation `Update`); an apply (`application/apply-patch`)
//! declares the complete set of fields its manager wants (operation `Apply`): fields another
//! manager owns with a different value are conflicts (refused unless forced, which transfers
//! them), fields the manager applied before but no longer does are removed unless someone else
//! owns them, and the rest is merged into the object.
//!
//! Field sets use upstream's `FieldsV1` encoding: `f:<field>` for a field, `k:<json>` for an
//! element of a list keyed by a merge key, `v:<json>` for an element of a set, and `.` for a
//! list element itself. Which lists are keyed, sets or atomic comes from the same [`TypeMeta`]
//! tables that drive strategic merge patch.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::strategic::{ListStrategy, TypeMeta};

/// A set of field paths, as a tree (`FieldsV1`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet(pub BTreeMap<String, FieldSet>);

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn from_json(v: &Value) -> FieldSet {
        FieldSet(
            v.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), FieldSet::from_json(v)))
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    pub fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        )
    }

    /// `to_json`, moving the path elements instead of copying them.
    pub fn into_json(self) -> Value {
        Value::Object(
            self.0
                .into_iter()
                .map(|(k, v)| (k, v.into_json()))
                .collect(),
        )
    }

    /// Every path to a leaf (a node with no children), as lists of path elements.
    pub fn leaves(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        fn walk(s: &FieldSet, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
            for (k, child) in &s.0 {
                prefix.push(k.clone());
                if child.is_empty() {
                    out.push(prefix.clone());
                } else {
                    walk(child, prefix, out);
                }
                prefix.pop();
            }
        }
        walk(self, &mut Vec::new(), &mut out);
        out
    }

    pub fn contains(&self, path: &[String]) -> bool {
        let mut cur = self;
        for p in path {
            match cur.0.get(p) {
                Some(c) => cur = c,
                None => return false,
            }
        }
        true
    }

    pub fn insert(&mut self, path: &[String]) {
        let mut cur = self;
        for p in path {
            cur = cur.0.entry(p.clone()).or_default();
        }
    }

    /// Remove a path, and any parent left empty by it.
    pub fn remove(&mut self, path: &[String]) {
        fn rm(s: &mut FieldSet, path: &[String]) {
            let Some((first, rest)) = path.split_first() else {
                return;
            };
            if rest.is_empty() {
                s.0.remove(first);
                return;
            }
            if let Some(child) = s.0.get_mut(first) {
                rm(child, rest);
                if child.is_empty() {
                    s.0.remove(first);
                }
            }
        }
        rm(self, path);
    }
}

/// Fields that no manager owns: identity and server-set metadata. `parent` is the path to
/// the field's parent, `field` its name.
fn ignored(parent: &[String], field: &str) -> bool {
    match parent {
        [] => matches!(field, "apiVersion" | "kind" | "status"),
        [m] if m == "metadata" => matches!(
            field,
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

fn key_of(element: &Value, key: &str) -> Option<String> {
    element.get(key).map(|v| format!("k:{}", json!({ key: v })))
}

fn field_meta(
    meta: Option<&'static TypeMeta>,
    name: &str,
) -> (ListStrategy, Option<&'static TypeMeta>) {
    meta.and_then(|m| m.fields.iter().find(|(n, _)| *n == name))
        .map(|(_, f)| (f.list, f.ty))
        .unwrap_or((ListStrategy::Replace, None))
}

/// The fields an object (or a partial object, for apply) sets.
pub fn fields_of(obj: &Value, meta: Option<&'static TypeMeta>) -> FieldSet {
    fields_under(obj, meta, &|_| true)
}

/// A tree of field paths being built: a `FieldSet`, or its `FieldsV1` JSON directly.
trait Tree: Default {
    fn put(&mut self, key: String, child: Self);
    fn is_empty(&self) -> bool;
}

impl Tree for FieldSet {
    fn put(&mut self, key: String, child: Self) {
        self.0.insert(key, child);
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Tree for Map<String, Value> {
    fn put(&mut self, key: String, child: Self) {
        self.insert(key, Value::Object(child));
    }
    fn is_empty(&self) -> bool {
        Map::is_empty(self)
    }
}

/// The fields an object sets under the top-level members `top` accepts.
fn fields_under<T: Tree>(
    obj: &Value,
    meta: Option<&'static TypeMeta>,
    top: &dyn Fn(&str) -> bool,
) -> T {
    fn walk<T: Tree>(
        obj: &Map<String, Value>,
        meta: Option<&'static TypeMeta>,
        path: &mut Vec<String>,
        out: &mut T,
        top: &dyn Fn(&str) -> bool,
    ) {
        for (k, v) in obj {
            if path.is_empty() && !top(k) {
                continue;
            }
            if v.is_null() || ignored(path, k) {
                continue;
            }
            let (list, ty) = field_meta(meta, k);
            let mut node = T::default();
            match v {
                Value::Object(m) if !m.is_empty() => {
                    path.push(k.clone());
                    walk(m, ty, path, &mut node, top);
                    path.pop();
                    // Only identity fields inside (metadata.name, say): nothing here is owned.
                    if node.is_empty() {
                        continue;
                    }
                }
                Value::Array(items) => match list {
                    ListStrategy::MergeByKey(key) => {
                        for item in items {
                            let Some(k) = key_of(item, key) else { continue };
                            let mut element = T::default();
                            element.put(".".into(), T::default());
                            if let Value::Object(m) = item {
                                walk(m, ty, &mut vec!["<element>".into()], &mut element, top);
                            }
                            node.put(k, element);
                        }
                    }
                    ListStrategy::MergePrimitive => {
                        for item in items {
                            node.put(format!("v:{item}"), T::default());
                        }
                    }
                    ListStrategy::Replace => {}
                },
                _ => {}
            }
            out.put(format!("f:{k}"), node);
        }
    }
    let mut out = T::default();
    if let Value::Object(m) = obj {
        walk(m, meta, &mut Vec::new(), &mut out, top);
    }
    out
}

/// The value at a field path (None if absent).
fn value_at<'a>(
    obj: &'a Value,
    path: &[String],
    meta: Option<&'static TypeMeta>,
) -> Option<&'a Value> {
    let mut cur = obj;
    let mut meta = meta;
    let mut list: Option<ListStrategy> = None;
    for p in path {
        if p == "." {
            return Some(cur);
        }
        if let Some(f) = p.strip_prefix("f:") {
            let (l, ty) = field_meta(meta, f);
            cur = cur.get(f)?;
            list = Some(l);
            meta = ty;
        } else if let Some(k) = p.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur
                .as_array()?
                .iter()
                .find(|e| want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)))?;
            let _ = list;
        } else if let Some(v) = p.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            cur = cur.as_array()?.iter().find(|e| **e == want)?;
        } else {
            return None;
        }
    }
    Some(cur)
}

/// Remove the field at `path` from `obj` (a list element when the path ends in `k:`/`v:`).
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if last == "." {
        return remove_at(obj, parents);
    }
    let mut cur = obj;
    for p in parents {
        let next = if let Some(f) = p.strip_prefix("f:") {
            cur.get_mut(f)
        } else if let Some(k) = p.strip_prefix("k:") {
            let Ok(want) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            cur.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|e| want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(want), Some(a)) = (
            serde_json::from_str::<Map<String, Value>>(k),
            cur.as_array_mut(),
        ) {
            a.retain(|e| !want.iter().all(|(wk, wv)| e.get(wk) == Some(wv)));
        }
    } else if let Some(v) = last.strip_prefix("v:") {
        if let (Ok(want), Some(a)) = (serde_json::from_str::<Value>(v), cur.as_array_mut()) {
            a.retain(|e| *e != want);
        }
    }
}

/// Merge an applied (partial) object into a live one: maps merge, keyed lists merge by key,
/// sets union, everything else is replaced.
fn merge(live: &mut Value, applied: &Value, meta: Option<&'static TypeMeta>) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                let (list, ty) = field_meta(meta, k);
                match (l.get_mut(k), av) {
                    (Some(lv @ Value::Object(_)), Value::Object(_)) => merge(lv, av, ty),
                    (Some(Value::Array(lv)), Value::Array(aa)) => match list {
                        ListStrategy::MergeByKey(key) => {
                            for ae in aa {
                                match lv
                                    .iter_mut()
                                    .find(|le| le.get(key).is_some() && le.get(key) == ae.get(key))
                                {
                                    Some(le) => merge(le, ae, ty),
                                    None => lv.push(ae.clone()),
                                }
                            }
                        }
                        ListStrategy::MergePrimitive => {
                            for ae in aa {
                                if !lv.contains(ae) {
                                    lv.push(ae.clone());
                                }
                            }
                        }
                        ListStrategy::Replace => *lv = aa.clone(),
                    },
                    _ => {
                        l.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (live, applied) => *live = applied.clone(),
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub fields: FieldSet,
    pub subresource: String,
}

impl Entry {
    fn from_json(v: &Value) -> Option<Entry> {
        Some(Entry {
            manager: v["manager"].as_str()?.to_string(),
            operation: v["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: v["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: v["time"].as_str().unwrap_or_default().to_string(),
            fields: FieldSet::from_json(&v["fieldsV1"]),
            subresource: v["subresource"].as_str().unwrap_or_default().to_string(),
        })
    }

    fn into_json(self) -> Value {
        entry_json(
            &self.manager,
            &self.operation,
            &self.api_version,
            &self.time,
            self.fields.into_json(),
            &self.subresource,
        )
    }
}

/// A `managedFields` entry as JSON.
fn entry_json(
    manager: &str,
    operation: &str,
    api_version: &str,
    time: &str,
    fields: Value,
    subresource: &str,
) -> Value {
    let mut v = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": time,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    });
    if !subresource.is_empty() {
        v["subresource"] = json!(subresource);
    }
    v
}

pub fn entries(obj: &Value) -> Vec<Entry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|a| a.iter().filter_map(Entry::from_json).collect())
        .unwrap_or_default()
}

fn set_entries(obj: &mut Value, entries: Vec<Entry>) {
    set_entries_keeping(obj, entries.into_iter().map(|e| (e, None)).collect());
}

/// Like `set_entries`, for entries that may come with their JSON as it was read (`Some`: the
/// entry is unchanged, so that JSON is written back instead of rendering it again).
fn set_entries_keeping(obj: &mut Value, entries: Vec<(Entry, Option<Value>)>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|(e, _)| !e.fields.is_empty())
        .map(|(e, json)| json.unwrap_or_else(|| e.into_json()))
        .collect();
    set_list(obj, list);
}

/// `metadata.managedFields` = `list` (removed when empty).
fn set_list(obj: &mut Value, list: Vec<Value>) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Render a path as upstream prints it: `.spec.template.spec.containers[name="web"].image`.
pub fn render_path(path: &[String]) -> String {
    let mut out = String::new();
    for p in path {
        if let Some(f) = p.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = p.strip_prefix("k:") {
            let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = p.strip_prefix("v:") {
            out.push_str(&format!("[={v}]"));
        }
    }
    out
}

/// A field another manager owns with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub manager: String,
    pub api_version: String,
    pub path: String,
}

/// Record a non-apply write by `manager`: the fields it changed become its (operation
/// `Update`), no longer anyone else's; fields it removed are nobody's.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    now: &str,
    subresource: &str,
    meta: Option<&'static TypeMeta>,
) {
    let Some(old) = old else {
        // A create: every field is the creator's, written as FieldsV1 in one pass.
        let fields: Map<String, Value> = fields_under(new, meta, &|_| true);
        let list = if fields.is_empty() {
            Vec::new()
        } else {
            vec![entry_json(
                manager,
                "Update",
                api_version,
                now,
                Value::Object(fields),
                subresource,
            )]
        };
        set_list(new, list);
        return;
    };
    // Only top-level members whose values differ can hold changed or removed fields: the others
    // (most of an object, in a status or binding update) are not walked at all.
    let differs = |k: &str| old.get(k) != new.get(k);
    let after: FieldSet = fields_under(new, meta, &differs);
    let before: FieldSet = fields_under(old, meta, &differs);
    // Each entry with its JSON as read: dropped (None) once the entry changes. The JSON is
    // taken out of `new` when it is still the stored one (a patch or a status update starts
    // from the stored object), copied otherwise; `new`'s own list is replaced below anyway.
    let stored = old["metadata"]["managedFields"].as_array();
    let carried = new
        .get_mut("metadata")
        .and_then(|m| m.get_mut("managedFields"))
        .map(Value::take);
    let read: Vec<Value> = match carried {
        Some(Value::Array(a)) if Some(&a) == stored => a,
        _ => stored.cloned().unwrap_or_default(),
    };
    let old = Some(old);
    let mut changed = Vec::new();
    for leaf in after.leaves() {
        let differs = match old {
            None => true,
            // An element's own entry (".") stands for its existence: it changes only when the
            // element is new, not when something inside it changes (as upstream's comparison).
            Some(o) => {
                !before.contains(&leaf)
                    || (leaf.last().is_none_or(|l| l != ".")
                        && value_at(o, &leaf, meta) != value_at(new, &leaf, meta))
            }
        };
        if differs {
            changed.push(leaf);
        }
    }
    let removed: Vec<Vec<String>> = before
        .leaves()
        .into_iter()
        .filter(|l| !after.contains(l))
        .collect();
    if changed.is_empty() && removed.is_empty() {
        // No entry changes: the entries go back as they were read, unparsed (less the ones
        // `Entry::from_json` and `set_entries_keeping` would drop: no manager, no fields).
        let kept: Vec<Value> = read
            .into_iter()
            .filter(|v| {
                v["manager"].is_string() && v["fieldsV1"].as_object().is_some_and(|m| !m.is_empty())
            })
            .collect();
        set_list(new, kept);
        return;
    }
    let mut list: Vec<(Entry, Option<Value>)> = read
        .into_iter()
        .filter_map(|v| Some((Entry::from_json(&v)?, Some(v))))
        .collect();
    for (e, json) in list.iter_mut() {
        // Removed fields are nobody's; changed fields now belong to this manager alone.
        let others = !(e.manager == manager && e.operation == "Update");
        let lost: Vec<&Vec<String>> = removed
            .iter()
            .chain(changed.iter().filter(|_| others))
            .filter(|p| e.fields.contains(p))
            .collect();
        if !lost.is_empty() {
            *json = None;
        }
        for p in lost {
            e.fields.remove(p);
        }
    }
    let mine = match list.iter_mut().position(|(e, _)| {
        e.manager == manager && e.operation == "Update" && e.subresource == subresource
    }) {
        Some(i) => &mut list[i],
        None => {
            list.push((
                Entry {
                    manager: manager.into(),
                    operation: "Update".into(),
                    api_version: api_version.into(),
                    time: now.into(),
                    fields: FieldSet::default(),
                    subresource: subresource.into(),
                },
                None,
            ));
            let last = list.len() - 1;
            &mut list[last]
        }
    };
    mine.1 = None;
    mine.0.time = now.into();
    mine.0.api_version = api_version.into();
    for p in &changed {
        mine.0.fields.insert(p);
    }
    set_entries_keeping(new, list);
}

/// Server-side apply of `applied` by `manager` onto `live` (None: the object does not exist).
/// Returns the new object (with its managedFields), or the conflicts when not forced.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    now: &str,
    meta: Option<&'static TypeMeta>,
) -> Result<Value, Vec<Conflict>> {
    let empty = json!({});
    let live_v = live.unwrap_or(&empty);
    let mut list = entries(live_v);
    let applied_set = fields_of(applied, meta);
    let mut conflicts = Vec::new();
    for e in list
        .iter()
        .filter(|e| !(e.manager == manager && e.operation == "Apply"))
    {
        for leaf in applied_set.leaves() {
            if e.fields.contains(&leaf)
                && value_at(live_v, &leaf, meta) != value_at(applied, &leaf, meta)
            {
                conflicts.push(Conflict {
                    manager: e.manager.clone(),
                    api_version: e.api_version.clone(),
                    path: render_path(&leaf),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let previous = list
        .iter()
        .find(|e| e.manager == manager && e.operation == "Apply")
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let mut out = live_v.clone();
    // Fields this manager applied before and no longer does go, unless another manager has them.
    for leaf in previous.leaves() {
        if applied_set.contains(&leaf) {
            continue;
        }
        let others = list
            .iter()
            .any(|e| !(e.manager == manager && e.operation == "Apply") && e.fields.contains(&leaf));
        if !others {
            remove_at(&mut out, &leaf);
        }
    }
    merge(&mut out, applied, meta);
    if force {
        for e in list
            .iter_mut()
            .filter(|e| !(e.manager == manager && e.operation == "Apply"))
        {
            for leaf in applied_set.leaves() {
                if value_at(live_v, &leaf, meta) != value_at(applied, &leaf, meta) {
                    e.fields.remove(&leaf);
                }
            }
        }
    }
    list.retain(|e| !(e.manager == manager && e.operation == "Apply"));
    list.push(Entry {
        manager: manager.into(),
        operation: "Apply".into(),
        api_version: api_version.into(),
        time: now.into(),
        fields: applied_set,
        subresource: String::new(),
    });
    set_entries(&mut out, list);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch_meta;

    fn deploy() -> Option<&'static TypeMeta> {
        Some(patch_meta::for_kind("apps", "Deployment"))
    }

    fn obj(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"app": "d"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}})
    }

    #[test]
    fn field_sets_use_fieldsv1_keys() {
        let fs = fields_of(&obj(2, "nginx"), deploy());
        let leaves: Vec<String> = fs.leaves().iter().map(|l| l.join("/")).collect();
        assert_eq!(
            leaves,
            [
                "f:metadata/f:labels/f:app",
                "f:spec/f:replicas",
                "f:spec/f:template/f:spec/f:containers/k:{\"name\":\"web\"}/.",
                "f:spec/f:template/f:spec/f:containers/k:{\"name\":\"web\"}/f:image",
                "f:spec/f:template/f:spec/f:containers/k:{\"name\":\"web\"}/f:name",
            ]
        );
        assert_eq!(FieldSet::from_json(&fs.to_json()), fs);
        assert_eq!(FieldSet::from_json(&fs.clone().into_json()), fs);
        // Built as JSON directly (as a create does), the same tree.
        let direct: Map<String, Value> = fields_under(&obj(2, "nginx"), deploy(), &|_| true);
        assert_eq!(Value::Object(direct), fs.to_json());
        assert_eq!(
            render_path(&fs.leaves()[3]),
            ".spec.template.spec.containers[name=\"web\"].image"
        );
    }

    fn owned(obj: &Value, manager: &str) -> Vec<String> {
        entries(obj)
            .iter()
            .filter(|e| e.manager == manager)
            .flat_map(|e| e.fields.leaves())
            .map(|l| l.join("/"))
            .collect()
    }

    #[test]
    fn updates_take_what_they_change_and_nothing_else() {
        let mut created = obj(2, "nginx");
        record_update(None, &mut created, "alice", "apps/v1", "t1", "", deploy());
        assert_eq!(owned(&created, "alice").len(), 5);
        // Bob changes the image (spec differs, metadata does not).
        let mut bob = created.clone();
        bob["spec"]["template"]["spec"]["containers"][0]["image"] = json!("httpd");
        record_update(
            Some(&created),
            &mut bob,
            "bob",
            "apps/v1",
            "t2",
            "",
            deploy(),
        );
        let image = "f:spec/f:template/f:spec/f:containers/k:{\"name\":\"web\"}/f:image";
        assert_eq!(owned(&bob, "bob"), [image]);
        assert!(!owned(&bob, "alice").contains(&image.to_string()));
        assert_eq!(owned(&bob, "alice").len(), 4);
        // Carol changes nothing that is owned (status only): nobody's fields move.
        let mut carol = bob.clone();
        carol["status"] = json!({"replicas": 2});
        record_update(
            Some(&bob),
            &mut carol,
            "carol",
            "apps/v1",
            "t3",
            "status",
            deploy(),
        );
        assert!(owned(&carol, "carol").is_empty());
        assert_eq!(entries(&carol), entries(&bob));
        // Dave removes the label: it is nobody's any more; a new one is his.
        let mut dave = carol.clone();
        dave["metadata"]["labels"] = json!({"tier": "web"});
        record_update(
            Some(&carol),
            &mut dave,
            "dave",
            "apps/v1",
            "t4",
            "",
            deploy(),
        );
        assert_eq!(owned(&dave, "dave"), ["f:metadata/f:labels/f:tier"]);
        assert!(!owned(&dave, "alice").contains(&"f:metadata/f:labels/f:app".to_string()));
        assert_eq!(owned(&dave, "bob"), [image]);
        // Whatever managedFields an update carries, the stored ones are what it starts from.
        let mut erin = dave.clone();
        erin["spec"]["replicas"] = json!(5);
        let mut forged = erin.clone();
        forged["metadata"]["managedFields"] = json!([{"manager": "x", "operation": "Update",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]);
        for new in [&mut erin, &mut forged] {
            record_update(Some(&dave), new, "erin", "apps/v1", "t5", "", deploy());
        }
        assert_eq!(entries(&forged), entries(&erin));
        assert_eq!(owned(&erin, "erin"), ["f:spec/f:replicas"]);
        assert_eq!(owned(&erin, "bob"), [image]);
    }

    #[test]
    fn apply_creates_then_conflicts_then_forces() {
        let created = apply(
            None,
            &obj(2, "nginx"),
            "alice",
            false,
            "apps/v1",
            "t1",
            deploy(),
        )
        .unwrap();
        assert_eq!(entries(&created)[0].operation, "Apply");
        // Another manager changes replicas with an ordinary update.
        let mut updated = created.clone();
        updated["spec"]["replicas"] = json!(5);
        record_update(
            Some(&created),
            &mut updated,
            "bob",
            "apps/v1",
            "t2",
            "",
            deploy(),
        );
        let es = entries(&updated);
        assert!(es
            .iter()
            .any(|e| e.manager == "bob"
                && e.fields.contains(&["f:spec".into(), "f:replicas".into()])));
        assert!(!es
            .iter()
            .any(|e| e.manager == "alice"
                && e.fields.contains(&["f:spec".into(), "f:replicas".into()])));
        // Alice applies replicas 3 again: bob owns it with another value.
        let err = apply(
            Some(&updated),
            &obj(3, "nginx"),
            "alice",
            false,
            "apps/v1",
            "t3",
            deploy(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            [Conflict {
                manager: "bob".into(),
                api_version: "apps/v1".into(),
                path: ".spec.replicas".into()
            }]
        );
        // Applying the value bob set is no conflict; forcing takes ownership.
        apply(
            Some(&updated),
            &obj(5, "nginx:2"),
            "alice",
            false,
            "apps/v1",
            "t3",
            deploy(),
        )
        .unwrap();
        let forced = apply(
            Some(&updated),
            &obj(3, "nginx"),
            "alice",
            true,
            "apps/v1",
            "t3",
            deploy(),
        )
        .unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        assert!(
            !entries(&forced).iter().any(|e| e.manager == "bob"),
            "bob owned nothing else"
        );
    }

    #[test]
    fn fields_dropped_from_an_apply_are_removed_unless_shared() {
        let mut first = obj(2, "nginx");
        first["metadata"]["labels"]["extra"] = json!("x");
        first["metadata"]["annotations"] = json!({"a": "1"});
        let live = apply(None, &first, "alice", false, "apps/v1", "t1", deploy()).unwrap();
        // Bob sets the same annotation too.
        let mut shared = live.clone();
        shared["metadata"]["annotations"]["b"] = json!("2");
        record_update(
            Some(&live),
            &mut shared,
            "bob",
            "apps/v1",
            "t2",
            "",
            deploy(),
        );
        let second = obj(2, "nginx");
        let out = apply(
            Some(&shared),
            &second,
            "alice",
            false,
            "apps/v1",
            "t3",
            deploy(),
        )
        .unwrap();
        assert!(
            out["metadata"]["labels"].get("extra").is_none(),
            "alice's dropped label goes"
        );
        assert!(
            out["metadata"]["annotations"].get("a").is_none(),
            "alice's dropped annotation goes"
        );
        assert_eq!(out["metadata"]["annotations"]["b"], "2", "bob's stays");
    }

    #[test]
    fn keyed_lists_merge_in_apply() {
        let live = apply(
            None,
            &obj(1, "nginx"),
            "alice",
            false,
            "apps/v1",
            "t1",
            deploy(),
        )
        .unwrap();
        let sidecar = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"template": {"spec": {"containers": [{"name": "side", "image": "busybox"}]}}}});
        let out = apply(
            Some(&live),
            &sidecar,
            "bob",
            false,
            "apps/v1",
            "t2",
            deploy(),
        )
        .unwrap();
        let names: Vec<&str> = out["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web", "side"]);
        assert_eq!(entries(&out).len(), 2);
    }
}
