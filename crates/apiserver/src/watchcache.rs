//! The watch cache: one store watch over `/registry/`, decoded once, shared by every API watcher.
//!
//! It keeps a ring of the most recent events. A watcher starting at a revision the ring still
//! covers is served from memory; an older start falls back to a watch on the store itself (which
//! answers `Compacted` → 410 Gone if that history is gone). A watcher that falls behind the live
//! broadcast is cut off and must resume from its last revision, so one slow client never holds
//! memory or other clients hostage. Live events go out on one channel per resource (made when
//! the resource is first watched), so a watcher wakes only for its own resource's changes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use store::{EventKind, Revision, Store};
use tokio::sync::{broadcast, watch};

use crate::object::Stored;

/// How many recent events the ring keeps.
const RING_CAPACITY: usize = 20_000;
/// How far a live watcher may fall behind its resource's changes before it is cut off.
const BROADCAST_CAPACITY: usize = 8_192;

/// One change, with `metadata.resourceVersion` stamped; bodies stay as JSON bytes.
#[derive(Debug)]
pub struct CachedEvent {
    pub kind: EventKind,
    pub key: String,
    pub revision: i64,
    /// The new object (for a delete: the last state, with the delete's revision).
    pub object: Stored,
    /// The object before the change (None for a create).
    pub prev: Option<Stored>,
}

pub fn from_store_event(ev: &store::Event) -> CachedEvent {
    let revision = ev.revision().0;
    CachedEvent {
        kind: ev.kind,
        key: ev.kv.key.clone(),
        revision,
        object: Stored::from_store(&ev.kv.value, revision),
        prev: ev
            .prev
            .as_ref()
            .map(|p| Stored::from_store(&p.value, p.mod_revision.0)),
    }
}

struct Ring {
    events: VecDeque<Arc<CachedEvent>>,
    /// Every event with a revision greater than this is in `events`.
    complete_after: i64,
    /// Live events by resource (its key prefix, `/registry/<storage>/`); dropped (closing
    /// every receiver) when the cache starts over.
    channels: HashMap<String, broadcast::Sender<Arc<CachedEvent>>>,
}

impl Ring {
    /// The channel of the resource `key` belongs to, if anyone watches it.
    fn channel_of(&self, key: &str) -> Option<&broadcast::Sender<Arc<CachedEvent>>> {
        let rest = key.strip_prefix("/registry/")?;
        // Storage prefixes have one or two segments (`pods`, `services/specs`).
        let mut ends = rest
            .match_indices('/')
            .map(|(i, _)| i + "/registry/".len() + 1);
        let one = ends.next()?;
        self.channels
            .get(&key[..one])
            .or_else(|| ends.next().and_then(|two| self.channels.get(&key[..two])))
    }
}

pub struct WatchCache {
    ring: RwLock<Ring>,
    revision: watch::Sender<i64>,
    /// Bumped by every change to an object admission keeps a copy of (PriorityClasses,
    /// namespaces), from any writer: a cached copy taken at an older generation is stale.
    admission_generation: std::sync::atomic::AtomicU64,
}

/// Key prefixes whose objects admission caches.
const ADMISSION_PREFIXES: &[&str] = &["/registry/priorityclasses/", "/registry/namespaces/"];

/// The longest pause between attempts to resume the store watch.
const MAX_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a new watcher's events come from.
pub enum Subscription {
    /// From memory: replay these, then follow the receiver.
    Cached(Vec<Arc<CachedEvent>>, broadcast::Receiver<Arc<CachedEvent>>),
    /// The ring no longer reaches back that far: watch the store.
    TooOld,
}

impl WatchCache {
    /// Start following the store from its current revision.
    pub async fn start(
        store: Arc<dyn Store>,
        mut shutdown: watch::Receiver<bool>,
    ) -> store::Result<Arc<WatchCache>> {
        let start = store.current_revision().await?;
        let (revision, _) = watch::channel(start.0);
        let cache = Arc::new(WatchCache {
            ring: RwLock::new(Ring {
                events: VecDeque::new(),
                complete_after: start.0,
                channels: HashMap::new(),
            }),
            revision,
            admission_generation: Default::default(),
        });
        let mut stream = store.watch("/registry/", start).await?;
        let c = cache.clone();
        tokio::spawn(async move {
            let mut last = start.0;
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    next = stream.next() => match next {
                        Some(Ok(ev)) => {
                            last = ev.revision().0;
                            c.push(Arc::new(from_store_event(&ev)));
                            continue;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "watch cache: store watch failed; resuming");
                        }
                        None => tracing::warn!("watch cache: store watch ended; resuming"),
                    }
                }
                // Resume from the last revision seen, for as long as it takes (the store may be
                // down for a while), backing off up to MAX_RETRY between attempts.
                let mut pause = std::time::Duration::from_millis(50);
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    match store.watch("/registry/", Revision(last)).await {
                        Ok(s) => {
                            stream = s;
                            break;
                        }
                        Err(store::StoreError::Compacted { .. }) => {
                            // What happened meanwhile is gone from history: start over from now.
                            // Every live watcher is cut off and resumes or relists on its own.
                            if let Ok(now) = store.current_revision().await {
                                tracing::warn!(from = last, to = now.0, "watch cache: history compacted while disconnected; starting over");
                                c.reset(now.0);
                                last = now.0;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "watch cache: cannot resume yet");
                            pause = (pause * 2).min(MAX_RETRY);
                        }
                    }
                }
            }
        });
        Ok(cache)
    }

    /// Forget the ring and close every live receiver: the cache continues from `revision`.
    fn reset(&self, revision: i64) {
        // Whatever happened while disconnected is unknown: every cached copy is stale.
        self.admission_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut ring) = self.ring.write() {
            ring.events.clear();
            ring.complete_after = revision;
            ring.channels.clear();
        }
        self.revision.send_replace(revision);
    }

    /// A write to `key` was made (by this server, or seen on the store's watch): admission's
    /// copies of such objects are stale. This server's own writes call it as soon as they are
    /// committed, so that its next request does not wait for the watch to deliver them.
    pub fn written(&self, key: &str) {
        if ADMISSION_PREFIXES.iter().any(|p| key.starts_with(p)) {
            self.admission_generation
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn push(&self, ev: Arc<CachedEvent>) {
        let rev = ev.revision;
        self.written(&ev.key);
        if let Ok(mut ring) = self.ring.write() {
            if ring.events.len() >= RING_CAPACITY {
                if let Some(old) = ring.events.pop_front() {
                    ring.complete_after = old.revision;
                }
            }
            // Broadcast under the lock so that subscribe() sees ring and channel consistently.
            if let Some(tx) = ring.channel_of(&ev.key) {
                let _ = tx.send(ev.clone());
            }
            ring.events.push_back(ev);
        }
        self.revision.send_replace(rev);
    }

    /// See `admission_generation`.
    pub fn admission_generation(&self) -> u64 {
        self.admission_generation
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The newest revision the cache has seen.
    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Wait until the cache has seen `revision` (bounded by the caller's timeout).
    pub async fn wait_for(&self, revision: i64) {
        let mut rx = self.revision.subscribe();
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    /// Events of `resource` (a key prefix `/registry/<storage>/`) after `after` (replay) and
    /// the live receiver for it, if memory still covers `after`.
    pub fn subscribe(&self, resource: &str, after: i64) -> Subscription {
        let Ok(mut ring) = self.ring.write() else {
            return Subscription::TooOld;
        };
        if after < ring.complete_after {
            return Subscription::TooOld;
        }
        let rx = ring
            .channels
            .entry(resource.to_string())
            .or_insert_with(|| broadcast::channel(BROADCAST_CAPACITY).0)
            .subscribe();
        let start = ring.events.partition_point(|e| e.revision <= after);
        let replay = ring
            .events
            .range(start..)
            .filter(|e| e.key.starts_with(resource))
            .cloned()
            .collect();
        Subscription::Cached(replay, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CM: &str = "/registry/configmaps/";

    /// A cache over a fresh store (keep the first two alive as long as the cache).
    async fn cache() -> (tempfile::TempDir, watch::Sender<bool>, Arc<WatchCache>) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(store::SqliteStore::open(dir.path().join("s.db")).unwrap());
        let (stop, shutdown) = watch::channel(false);
        let cache = WatchCache::start(store, shutdown).await.unwrap();
        (dir, stop, cache)
    }

    fn event(revision: i64) -> Arc<CachedEvent> {
        Arc::new(CachedEvent {
            kind: EventKind::Put,
            key: format!("/registry/configmaps/default/c{revision}"),
            revision,
            object: Stored::from_store(br#"{"metadata":{"name":"c"}}"#, revision),
            prev: None,
        })
    }

    #[tokio::test]
    async fn a_slow_watcher_is_cut_off_and_memory_stays_bounded() {
        let (_dir, _stop, cache) = cache().await;
        let Subscription::Cached(replay, mut slow) = cache.subscribe(CM, 0) else {
            panic!("a fresh cache covers its start");
        };
        assert!(replay.is_empty());
        let total = (RING_CAPACITY + BROADCAST_CAPACITY) as i64 + 10;
        for rev in 1..=total {
            cache.push(event(rev));
        }
        // The watcher that never read is told it lagged (the API ends its watch: it resumes or
        // relists), instead of holding every event for it.
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        let ring = cache.ring.read().unwrap();
        assert_eq!(ring.events.len(), RING_CAPACITY);
        assert_eq!(ring.complete_after, total - RING_CAPACITY as i64);
        drop(ring);
        // Older starts than the ring holds fall back to the store.
        assert!(matches!(cache.subscribe(CM, 5), Subscription::TooOld));
        assert!(matches!(
            cache.subscribe(CM, total - 5),
            Subscription::Cached(ref r, _) if r.len() == 5
        ));
    }

    #[tokio::test]
    async fn a_watcher_hears_only_its_resource() {
        let (_dir, _stop, cache) = cache().await;
        let Subscription::Cached(_, mut cms) = cache.subscribe(CM, 0) else {
            panic!("covered");
        };
        let specs = "/registry/services/specs/";
        let Subscription::Cached(_, mut svcs) = cache.subscribe(specs, 0) else {
            panic!("covered");
        };
        let other = |rev: i64, key: &str| {
            Arc::new(CachedEvent {
                kind: EventKind::Put,
                key: key.into(),
                revision: rev,
                object: Stored::from_store(br#"{"metadata":{"name":"x"}}"#, rev),
                prev: None,
            })
        };
        cache.push(other(1, "/registry/pods/default/p"));
        cache.push(other(2, "/registry/services/specs/default/s"));
        cache.push(event(3));
        assert_eq!(cms.recv().await.unwrap().revision, 3);
        assert!(cms.try_recv().is_err(), "nothing else for configmaps");
        assert_eq!(svcs.recv().await.unwrap().revision, 2);
        assert!(svcs.try_recv().is_err());
        // A late watcher's replay holds its resource's events only.
        let Subscription::Cached(replay, _) = cache.subscribe(CM, 0) else {
            panic!("covered");
        };
        let revs: Vec<i64> = replay.iter().map(|e| e.revision).collect();
        assert_eq!(revs, [3]);
    }

    #[tokio::test]
    async fn reset_closes_live_watchers() {
        let (_dir, _stop, cache) = cache().await;
        cache.push(event(1));
        let Subscription::Cached(_, mut rx) = cache.subscribe(CM, 1) else {
            panic!("covered");
        };
        cache.reset(100);
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        assert!(matches!(cache.subscribe(CM, 50), Subscription::TooOld));
        assert_eq!(cache.revision(), 100);
    }
}
