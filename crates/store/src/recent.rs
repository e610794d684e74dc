//! The current values of recently written keys, kept by the embedded store's one writer so that
//! the reads that follow a write (an update's read of the object it changes, the writer's own
//! precondition checks) are answered from memory instead of SQLite.
//!
//! Only the writer changes it, and only with committed state: after a transaction commits, every
//! key it wrote gets its new value (or its absence, for a delete), before any caller hears of the
//! write. So an entry is always the key's latest committed value, and a miss says nothing (the
//! caller reads the database). Readers never insert: a value a reader fetched may already be old.
//!
//! Bounded by the bytes of the values it holds; the oldest written keys go first.

use std::collections::{HashMap, VecDeque};

use crate::KeyValue;

/// What a key's entry says: its current value, or that it does not exist.
#[derive(Debug, Clone)]
pub enum Entry {
    Present(KeyValue),
    Absent,
}

impl Entry {
    pub fn into_option(self) -> Option<KeyValue> {
        match self {
            Entry::Present(kv) => Some(kv),
            Entry::Absent => None,
        }
    }
}

#[derive(Debug)]
pub struct Recent {
    /// key -> (entry, the write's sequence number).
    map: HashMap<String, (Entry, u64)>,
    /// Keys in the order they were written, with the sequence number of that write: an element
    /// whose number no longer matches the map's is a stale leftover of an older write.
    order: VecDeque<(String, u64)>,
    seq: u64,
    bytes: usize,
    limit: usize,
}

fn size(key: &str, e: &Entry) -> usize {
    key.len()
        + match e {
            Entry::Present(kv) => kv.value.len() + kv.key.len(),
            Entry::Absent => 0,
        }
}

impl Recent {
    /// Holds at most about `limit` bytes of keys and values.
    pub fn new(limit: usize) -> Recent {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
            bytes: 0,
            limit,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.map.get(key).map(|(e, _)| e)
    }

    /// Records the committed state of `key`.
    pub fn put(&mut self, key: String, entry: Entry) {
        self.seq += 1;
        let add = size(&key, &entry);
        if let Some((old, _)) = self.map.insert(key.clone(), (entry, self.seq)) {
            self.bytes -= size(&key, &old);
        }
        self.bytes += add;
        self.order.push_back((key, self.seq));
        self.evict();
    }

    fn evict(&mut self) {
        while self.bytes > self.limit || self.order.len() > 2 * self.map.len() + 16 {
            let Some((key, seq)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&key).is_some_and(|(_, s)| *s == seq) {
                if let Some((old, _)) = self.map.remove(&key) {
                    self.bytes -= size(&key, &old);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Revision;
    use bytes::Bytes;

    fn kv(key: &str, rev: i64, len: usize) -> Entry {
        Entry::Present(KeyValue {
            key: key.into(),
            value: Bytes::from(vec![b'x'; len]),
            create_revision: Revision(1),
            mod_revision: Revision(rev),
        })
    }

    fn rev(r: &Recent, key: &str) -> Option<i64> {
        match r.get(key)? {
            Entry::Present(kv) => Some(kv.mod_revision.0),
            Entry::Absent => Some(-1),
        }
    }

    #[test]
    fn latest_write_wins() {
        let mut r = Recent::new(1 << 20);
        r.put("/a".into(), kv("/a", 2, 10));
        r.put("/a".into(), kv("/a", 5, 10));
        assert_eq!(rev(&r, "/a"), Some(5));
        r.put("/a".into(), Entry::Absent);
        assert_eq!(rev(&r, "/a"), Some(-1));
        assert_eq!(rev(&r, "/b"), None);
        assert_eq!(r.len(), 1);
        assert_eq!(r.bytes(), 2, "only the key of an absent entry counts");
    }

    #[test]
    fn oldest_written_go_first_and_bytes_stay_bounded() {
        let mut r = Recent::new(1000);
        for i in 0..20 {
            let k = format!("/k{i:02}");
            r.put(k.clone(), kv(&k, i, 100));
        }
        assert!(r.bytes() <= 1000, "{} bytes", r.bytes());
        assert_eq!(rev(&r, "/k00"), None);
        assert_eq!(rev(&r, "/k19"), Some(19));
        // Rewriting an old key makes it young again.
        let survivors: Vec<String> = (0..20)
            .map(|i| format!("/k{i:02}"))
            .filter(|k| r.get(k).is_some())
            .collect();
        let oldest = survivors[0].clone();
        r.put(oldest.clone(), kv(&oldest, 100, 100));
        for i in 20..24 {
            let k = format!("/k{i:02}");
            r.put(k.clone(), kv(&k, i, 100));
        }
        assert_eq!(rev(&r, &oldest), Some(100));
        assert!(r.bytes() <= 1000);
    }

    #[test]
    fn rewriting_one_key_does_not_grow_the_queue_without_bound() {
        let mut r = Recent::new(1 << 20);
        for i in 0..10_000 {
            r.put("/hot".into(), kv("/hot", i, 10));
        }
        assert_eq!(rev(&r, "/hot"), Some(9_999));
        assert!(r.order.len() <= 2 * r.len() + 16, "{}", r.order.len());
    }

    #[test]
    fn a_value_larger_than_the_limit_is_not_kept() {
        let mut r = Recent::new(100);
        r.put("/big".into(), kv("/big", 1, 1000));
        assert!(r.get("/big").is_none());
        assert_eq!(r.bytes(), 0);
    }
}
