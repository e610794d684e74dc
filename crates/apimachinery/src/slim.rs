//! Decoding objects without their `metadata.managedFields`.
//!
//! managedFields are for server-side apply; controllers, the scheduler and the hollow nodes
//! never read them, yet decoding them (a tree of `fieldsV1` per manager) was the largest single
//! part of decoding a pod off a watch. `Slim<K>` decodes a `K` with the serde adapter below,
//! which passes over `metadata.managedFields` without building anything (as upstream's
//! components drop them from their informers, only sooner). Watch `Api<Slim<K>>` and take the
//! `K` out with [`Slim::event`]; write through one when the answer is read but its
//! managedFields are not.
//!
//! The adapter wraps the deserializer of the whole object and, inside it, the one of its
//! `metadata`; everything else reaches `K`'s own `Deserialize` untouched.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{BorrowedStrDeserializer, StringDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

/// Deserializes a `T` as `T::deserialize` would, except that the object's
/// `metadata.managedFields` are skipped (as if absent).
pub fn without_managed_fields<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    T::deserialize(Skim {
        inner: d,
        level: Level::Object,
    })
}

/// A `K` decoded without its managedFields (see the module's documentation).
#[derive(Clone, Debug)]
pub struct Slim<K>(pub K);

impl<'de, K: Deserialize<'de>> Deserialize<'de> for Slim<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        without_managed_fields(d).map(Slim)
    }
}

/// Serialized as the `K` it holds, so that writes through an `Api<Slim<K>>` send `K` and
/// decode the answer slim.
impl<K: serde::Serialize> serde::Serialize for Slim<K> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<K> Slim<K> {
    /// A watch event of `Slim<K>` as the same event of `K`.
    pub fn event(ev: kube::runtime::watcher::Event<Slim<K>>) -> kube::runtime::watcher::Event<K> {
        use kube::runtime::watcher::Event;
        match ev {
            Event::Apply(o) => Event::Apply(o.0),
            Event::Delete(o) => Event::Delete(o.0),
            Event::Init => Event::Init,
            Event::InitApply(o) => Event::InitApply(o.0),
            Event::InitDone => Event::InitDone,
        }
    }
}

impl<K> Slim<K>
where
    K: kube::Resource + Clone,
    K::DynamicType: Default,
{
    /// The same collection as `api` (all namespaces or one), decoded slim.
    pub fn api(api: &kube::Api<K>) -> kube::Api<Slim<K>> {
        let client = api.clone().into_client();
        let dt = K::DynamicType::default();
        match api.namespace() {
            Some(ns) => kube::Api::namespaced_with(client, ns, &dt),
            None => kube::Api::all_with(client, &dt),
        }
    }
}

impl<K: kube::Resource> kube::Resource for Slim<K> {
    type DynamicType = K::DynamicType;
    /// Dynamic, so that `Slim::api` can make both kinds of `Api`; the scope is `K`'s.
    type Scope = kube::core::DynamicResourceScope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn api_version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::api_version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &kube::core::ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
        self.0.meta_mut()
    }
}

/// Where in the object a map is.
#[derive(Clone, Copy, PartialEq)]
enum Level {
    /// The object itself: its `metadata` is looked into.
    Object,
    /// Its `metadata`: `managedFields` is skipped.
    Metadata,
}

struct Skim<D> {
    inner: D,
    level: Level,
}

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* v: V) -> Result<V::Value, D::Error> {
                self.inner.$method($($arg,)* v)
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Skim<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        let level = self.level;
        self.inner.deserialize_any(SkimVisitor { inner: v, level })
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        let level = self.level;
        self.inner.deserialize_map(SkimVisitor { inner: v, level })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        let level = self.level;
        self.inner
            .deserialize_struct(name, fields, SkimVisitor { inner: v, level })
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        let level = self.level;
        self.inner
            .deserialize_option(SkimVisitor { inner: v, level })
    }
    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }

    forward! {
        deserialize_bool(), deserialize_i8(), deserialize_i16(), deserialize_i32(),
        deserialize_i64(), deserialize_i128(), deserialize_u8(), deserialize_u16(),
        deserialize_u32(), deserialize_u64(), deserialize_u128(), deserialize_f32(),
        deserialize_f64(), deserialize_char(), deserialize_str(), deserialize_string(),
        deserialize_bytes(), deserialize_byte_buf(), deserialize_unit(), deserialize_seq(),
        deserialize_identifier(), deserialize_ignored_any(),
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
    }
}

struct SkimVisitor<V> {
    inner: V,
    level: Level,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for SkimVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.expecting(f)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(SkimMap {
            inner: map,
            level: self.level,
            value: None,
        })
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Skim {
            inner: d,
            level: self.level,
        })
    }
    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }
    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(seq)
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<V::Value, E> {
        self.inner.visit_bool(b)
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<V::Value, E> {
        self.inner.visit_i64(n)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<V::Value, E> {
        self.inner.visit_u64(n)
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<V::Value, E> {
        self.inner.visit_f64(n)
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<V::Value, E> {
        self.inner.visit_str(s)
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<V::Value, E> {
        self.inner.visit_borrowed_str(s)
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<V::Value, E> {
        self.inner.visit_string(s)
    }
}

struct SkimMap<A> {
    inner: A,
    level: Level,
    /// The level of the value after the key just returned, if it is looked into.
    value: Option<Level>,
}

/// A map key, borrowed from the input when it can be.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl<'de> Key<'de> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(s))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkimMap<A> {
    type Error = A::Error;

    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        loop {
            let Some(key) = self.inner.next_key::<Key<'de>>()? else {
                return Ok(None);
            };
            self.value = match (self.level, key.as_str()) {
                (Level::Metadata, "managedFields") => {
                    self.inner.next_value::<IgnoredAny>()?;
                    continue;
                }
                (Level::Object, "metadata") => Some(Level::Metadata),
                _ => None,
            };
            return match key {
                Key::Borrowed(s) => seed.deserialize(BorrowedStrDeserializer::new(s)),
                Key::Owned(s) => seed.deserialize(StringDeserializer::new(s)),
            }
            .map(Some);
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        match self.value.take() {
            Some(level) => self.inner.next_value_seed(SkimSeed { inner: seed, level }),
            None => self.inner.next_value_seed(seed),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct SkimSeed<S> {
    inner: S,
    level: Level,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for SkimSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Skim {
            inner: d,
            level: self.level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn pod_json() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "p",
                "namespace": "default",
                "labels": {"app": "a", "managedFields": "a label, not the field"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:spec": {"f:containers": {}}}}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "rs", "uid": "u", "controller": true}],
                "resourceVersion": "7"
            },
            "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "n1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    #[test]
    fn managed_fields_are_skipped_and_everything_else_kept() {
        use k8s_openapi::api::core::v1::Pod;
        let text = serde_json::to_string(&pod_json()).unwrap();
        let slim: Slim<Pod> = serde_json::from_str(&text).unwrap();
        let mut whole: Pod = serde_json::from_str(&text).unwrap();
        assert!(whole.metadata.managed_fields.is_some());
        assert!(slim.0.metadata.managed_fields.is_none());
        whole.metadata.managed_fields = None;
        assert_eq!(slim.0, whole);
        // A label named like the field is a label, and stays.
        assert_eq!(
            slim.0.metadata.labels.unwrap()["managedFields"],
            "a label, not the field"
        );
    }

    #[test]
    fn only_the_metadata_of_the_object_is_looked_into() {
        // A "managedFields" anywhere else is data, not skipped.
        let v = json!({"metadata": {"name": "x"}, "spec": {"metadata": {"managedFields": [1]}},
                       "managedFields": [2]});
        let back: Value =
            without_managed_fields(&mut serde_json::Deserializer::from_str(&v.to_string()))
                .unwrap();
        assert_eq!(back, v);
        // Keys with escapes (not borrowable) are matched as well.
        let text = r#"{"metadata":{"managed\u0046ields":[1],"name":"y"}}"#;
        let back: Value =
            without_managed_fields(&mut serde_json::Deserializer::from_str(text)).unwrap();
        assert_eq!(back, json!({"metadata": {"name": "y"}}));
    }

    #[test]
    fn errors_are_the_inner_errors() {
        use k8s_openapi::api::core::v1::Pod;
        for bad in [
            r#"{"metadata": 5}"#,
            r#"{"metadata": {"name": 5}}"#,
            r#"[1]"#,
            r#"{"metadata": {"managedFields": [}}"#,
        ] {
            assert!(
                serde_json::from_str::<Slim<Pod>>(bad).is_err(),
                "{bad} should not decode"
            );
        }
        // A watch event line decodes as kube's watcher decodes it.
        let line = json!({"type": "ADDED", "object": pod_json()}).to_string();
        let ev: kube::core::WatchEvent<Slim<Pod>> = serde_json::from_str(&line).unwrap();
        match ev {
            kube::core::WatchEvent::Added(p) => {
                assert_eq!(p.0.metadata.name.as_deref(), Some("p"));
                assert!(p.0.metadata.managed_fields.is_none());
            }
            _ => panic!("not an ADDED event"),
        }
    }
}
