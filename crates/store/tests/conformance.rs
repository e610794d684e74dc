//! One storage conformance suite, run unchanged against the embedded store and a real etcd.
//!
//! Every test gets a fresh backend: a new SQLite file, or a new single-member etcd that
//! `store::testing` starts on free loopback ports. Revisions are compared relative to the
//! backend's starting revision (an empty etcd starts at 1, an empty SQLite store at 0).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use store::testing::EtcdCluster;
use store::{
    EtcdConfig, EtcdStore, EventKind, RangeRequest, Revision, SqliteStore, Store, StoreError,
    MAX_VALUE_BYTES,
};

enum Kind {
    Sqlite,
    Etcd(EtcdCluster),
}

struct Backend {
    dir: tempfile::TempDir,
    kind: Kind,
    store: Arc<dyn Store>,
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("state.db")).unwrap();
        Backend {
            dir,
            kind: Kind::Sqlite,
            store: Arc::new(store),
        }
    }

    async fn etcd() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let cluster = EtcdCluster::start(dir.path(), 1).expect("start etcd");
        let store = EtcdStore::connect(EtcdConfig::from_url(&cluster.endpoint()).unwrap())
            .await
            .unwrap();
        Backend {
            dir,
            kind: Kind::Etcd(cluster),
            store: Arc::new(store),
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stop the backend the hard way and bring it back on the same data.
    async fn restart(&mut self) {
        match &mut self.kind {
            Kind::Sqlite => {
                // The old store is closed first (one store per database file at a time): a
                // placeholder on another file stands in meanwhile.
                let placeholder =
                    SqliteStore::open(self.dir.path().join("placeholder.db")).unwrap();
                self.store = Arc::new(placeholder);
                let store = SqliteStore::open(self.dir.path().join("state.db")).unwrap();
                self.store = Arc::new(store);
            }
            Kind::Etcd(cluster) => {
                cluster.kill(0);
                cluster.restart(0).unwrap();
                cluster.wait_healthy(Duration::from_secs(30)).unwrap();
                let store = EtcdStore::connect(EtcdConfig::from_url(&cluster.endpoint()).unwrap())
                    .await
                    .unwrap();
                self.store = Arc::new(store);
            }
        }
    }
}

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::sqlite().await).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::etcd().await).await
                }
            )*
        }
    };
}

conformance!(
    cas_conflicts_and_revisions_increase,
    range_pages_and_reads_the_past,
    range_stream_is_one_snapshot_in_chunks,
    watch_replays_then_follows_with_prev_values,
    watch_is_ordered_unique_and_gapless_under_concurrent_writers,
    concurrent_compare_and_swap_loses_no_update,
    compaction_keeps_current_values_and_refuses_old_revisions,
    watch_resumes_across_a_restart,
    values_up_to_the_limit_and_a_clear_error_beyond,
    future_revisions_are_refused,
    reads_follow_writes_concurrent_with_them,
    revisions_are_never_reused_after_compaction_and_restart,
);

/// Every read that starts after a write was answered sees that write (or a later one), for keys
/// written, rewritten, deleted and created again while other keys are written concurrently.
async fn reads_follow_writes_concurrent_with_them(be: Backend) {
    let s = be.store();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let key = format!("/rfw/{t}/{i}");
                let created = s.create(&key, b("v1")).await.unwrap();
                let kv = s.get(&key).await.unwrap().unwrap();
                assert_eq!((kv.value, kv.mod_revision), (b("v1"), created));
                let updated = s.update(&key, b("v2"), created).await.unwrap();
                let kv = s.get(&key).await.unwrap().unwrap();
                assert_eq!((kv.value, kv.mod_revision), (b("v2"), updated));
                assert_eq!(kv.create_revision, created);
                // A compare against the superseded revision fails.
                assert!(matches!(
                    s.update(&key, b("stale"), created).await,
                    Err(StoreError::Conflict { .. })
                ));
                s.delete(&key, Some(updated)).await.unwrap();
                assert!(s.get(&key).await.unwrap().is_none());
                let again = s.create(&key, b("v3")).await.unwrap();
                let kv = s.get(&key).await.unwrap().unwrap();
                assert_eq!((kv.value, kv.create_revision), (b("v3"), again));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn cas_conflicts_and_revisions_increase(be: Backend) {
    let s = be.store();
    let r0 = s.current_revision().await.unwrap();
    let r1 = s.create("/a", b("1")).await.unwrap();
    assert!(r1 > r0);
    let r2 = s.create("/b", b("1")).await.unwrap();
    assert!(r2 > r1);
    assert!(matches!(
        s.create("/a", b("x")).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let r3 = s.update("/a", b("2"), r1).await.unwrap();
    assert!(r3 > r2);
    match s.update("/a", b("3"), r1).await {
        Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, r3),
        other => panic!("expected conflict, got {other:?}"),
    }
    assert!(matches!(
        s.update("/missing", b("3"), r1).await,
        Err(StoreError::NotFound { .. })
    ));
    let kv = s.get("/a").await.unwrap().unwrap();
    assert_eq!(kv.value, b("2"));
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r3);
    assert!(matches!(
        s.delete("/a", Some(r1)).await,
        Err(StoreError::Conflict { .. })
    ));
    let (r4, prev) = s.delete("/a", Some(r3)).await.unwrap();
    assert!(r4 > r3);
    assert_eq!(prev.value, b("2"));
    assert_eq!(prev.mod_revision, r3);
    assert!(s.get("/a").await.unwrap().is_none());
    assert!(matches!(
        s.delete("/a", None).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.delete("/a", Some(r3)).await,
        Err(StoreError::NotFound { .. })
    ));
    // Failed writes do not move the revision.
    assert_eq!(s.current_revision().await.unwrap(), r4);
    // A recreated key starts a new incarnation.
    let r5 = s.create("/a", b("again")).await.unwrap();
    let kv = s.get("/a").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (r5, r5));
}

async fn range_pages_and_reads_the_past(be: Backend) {
    let s = be.store();
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(s.create(&format!("/p/{i}"), b("v1")).await.unwrap());
    }
    s.create("/q/0", b("other")).await.unwrap();
    s.create("/p", b("not under /p/")).await.unwrap();
    let at = s.current_revision().await.unwrap();
    s.update("/p/3", b("v2"), revs[3]).await.unwrap();
    s.delete("/p/5", None).await.unwrap();
    s.create("/p/55", b("new")).await.unwrap();

    let mut seen = Vec::new();
    let mut start = None;
    let mut pages = 0;
    loop {
        let page = s
            .range(RangeRequest {
                prefix: "/p/".into(),
                start_after: start.clone(),
                limit: 3,
                revision: Some(at),
            })
            .await
            .unwrap();
        pages += 1;
        assert_eq!(page.revision, at);
        assert!(page.kvs.len() <= 3);
        seen.extend(page.kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())));
        if !page.more {
            break;
        }
        start = page.kvs.last().map(|kv| kv.key.clone());
    }
    assert_eq!(pages, 4);
    let keys: Vec<_> = seen.iter().map(|(k, _)| k.clone()).collect();
    let expected: Vec<_> = (0..10).map(|i| format!("/p/{i}")).collect();
    assert_eq!(keys, expected, "every key once, in key order");
    assert!(seen.iter().all(|(_, v)| v == &b("v1")));

    let now = s
        .range(RangeRequest {
            prefix: "/p/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(now.revision, s.current_revision().await.unwrap());
    let keys: Vec<_> = now.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/p/0", "/p/1", "/p/2", "/p/3", "/p/4", "/p/55", "/p/6", "/p/7", "/p/8", "/p/9"]
    );
    assert_eq!(now.kvs[3].value, b("v2"));
    assert!(!now.more);
    // A page after the last key is empty.
    let tail = s
        .range(RangeRequest {
            prefix: "/p/".into(),
            start_after: Some("/p/9".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(tail.kvs.is_empty() && !tail.more);
}

async fn range_stream_is_one_snapshot_in_chunks(be: Backend) {
    let s = be.store();
    for i in 0..25 {
        s.create(&format!("/s/{i:02}"), b("v")).await.unwrap();
    }
    s.create("/t/other", b("x")).await.unwrap();
    let mut rs = s.range_stream("/s/", 10).await.unwrap();
    let at = rs.revision;
    // Writes after the stream started are not in it.
    s.create("/s/99", b("late")).await.unwrap();
    s.delete("/s/00", None).await.unwrap();
    let mut sizes = Vec::new();
    let mut keys = Vec::new();
    while let Some(chunk) = rs.chunks.next().await {
        let chunk = chunk.unwrap();
        sizes.push(chunk.len());
        keys.extend(chunk.into_iter().map(|kv| kv.key));
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(keys.len(), 25);
    assert_eq!(keys[0], "/s/00");
    assert!(keys.iter().all(|k| k.starts_with("/s/") && k != "/s/99"));
    assert!(at < s.current_revision().await.unwrap());
}

async fn watch_replays_then_follows_with_prev_values(be: Backend) {
    let s = be.store();
    let start = s.current_revision().await.unwrap();
    let r1 = s.create("/w/a", b("1")).await.unwrap();
    s.create("/x/ignored", b("1")).await.unwrap();
    let r2 = s.update("/w/a", b("2"), r1).await.unwrap();
    let mut w = s.watch("/w/", start).await.unwrap();
    let e1 = w.next().await.unwrap().unwrap();
    assert_eq!(
        (e1.kind, e1.revision(), e1.prev.is_none()),
        (EventKind::Put, r1, true)
    );
    assert_eq!(e1.kv.create_revision, r1);
    let e2 = w.next().await.unwrap().unwrap();
    assert_eq!(e2.revision(), r2);
    let prev = e2.prev.unwrap();
    assert_eq!((prev.value, prev.mod_revision), (b("1"), r1));
    let (r3, _) = s.delete("/w/a", None).await.unwrap();
    let e3 = w.next().await.unwrap().unwrap();
    assert_eq!((e3.kind, e3.revision()), (EventKind::Delete, r3));
    assert_eq!(e3.kv.value, b("2"));
    assert_eq!(e3.prev.unwrap().mod_revision, r2);
    let r4 = s.create("/w/a", b("3")).await.unwrap();
    let e4 = w.next().await.unwrap().unwrap();
    assert_eq!(
        (e4.kind, e4.revision(), e4.prev.is_none()),
        (EventKind::Put, r4, true)
    );
    // Starting in the middle of history replays only what follows.
    let mut w = s.watch("/w/", r2).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap().revision(), r3);
    assert_eq!(w.next().await.unwrap().unwrap().revision(), r4);
}

async fn watch_is_ordered_unique_and_gapless_under_concurrent_writers(be: Backend) {
    let s = be.store();
    let start = s.current_revision().await.unwrap();
    // One watcher from the start, one that starts late (replay then live), both slow.
    let mut early = s.watch("/n/", start).await.unwrap();
    // More events than the embedded store's live broadcast holds, so a slow watcher lags.
    let per_writer = 1200;
    let writers = 8;
    let mut tasks = Vec::new();
    for t in 0..writers {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut rev = s.create(&format!("/n/{t}"), b("0")).await.unwrap();
            for i in 1..per_writer {
                rev = s
                    .update(&format!("/n/{t}"), Bytes::from(i.to_string()), rev)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = s.current_revision().await.unwrap();
    assert_eq!(end.0 - start.0, (writers * per_writer) as i64);
    let mut late = s.watch("/n/", start).await.unwrap();
    for w in [&mut early, &mut late] {
        let mut expected = start.0 + 1;
        let mut last_value = std::collections::HashMap::new();
        while expected <= end.0 {
            let ev = tokio::time::timeout(Duration::from_secs(30), w.next())
                .await
                .expect("watch stalled")
                .unwrap()
                .unwrap();
            assert_eq!(ev.revision().0, expected, "gap, duplicate or reorder");
            // The previous value is the one this watcher saw last for the key.
            assert_eq!(
                ev.prev.as_ref().map(|p| p.value.clone()),
                last_value.get(&ev.kv.key).cloned()
            );
            last_value.insert(ev.kv.key.clone(), ev.kv.value.clone());
            expected += 1;
        }
        for (_, v) in last_value {
            assert_eq!(v, Bytes::from((per_writer - 1).to_string()));
        }
    }
}

async fn concurrent_compare_and_swap_loses_no_update(be: Backend) {
    let s = be.store();
    s.create("/counter", b("0")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            let mut conflicts = 0;
            while done < 20 {
                let kv = s.get("/counter").await.unwrap().unwrap();
                let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                match s
                    .update(
                        "/counter",
                        Bytes::from((n + 1).to_string()),
                        kv.mod_revision,
                    )
                    .await
                {
                    Ok(_) => done += 1,
                    Err(StoreError::Conflict { .. }) => conflicts += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let kv = s.get("/counter").await.unwrap().unwrap();
    assert_eq!(kv.value, b("320"), "after {conflicts} conflicts");
}

async fn compaction_keeps_current_values_and_refuses_old_revisions(be: Backend) {
    let s = be.store();
    let r1 = s.create("/c/a", b("1")).await.unwrap();
    let r2 = s.update("/c/a", b("2"), r1).await.unwrap();
    s.create("/c/b", b("1")).await.unwrap();
    s.delete("/c/b", None).await.unwrap();
    let r5 = s.create("/c/c", b("1")).await.unwrap();
    let point = Revision(r5.0 - 1);
    s.compact(point).await.unwrap();
    assert_eq!(s.compacted_revision().await.unwrap(), point);
    assert!(matches!(
        s.watch("/c/", r1).await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.range(RangeRequest {
            prefix: "/c/".into(),
            revision: Some(r2),
            ..Default::default()
        })
        .await,
        Err(StoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.compact(r1).await,
        Err(StoreError::Compacted { .. })
    ));
    // The compaction point itself is still readable.
    let page = s
        .range(RangeRequest {
            prefix: "/c/".into(),
            revision: Some(point),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.kvs.len(), 1);
    assert_eq!(page.kvs[0].value, b("2"));
    // Current values are untouched.
    assert_eq!(s.get("/c/a").await.unwrap().unwrap().value, b("2"));
    // A watch from the compaction point works, and an update still reports its previous value.
    let mut w = s.watch("/c/", point).await.unwrap();
    s.update("/c/a", b("3"), r2).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap().revision(), r5);
    let ev = w.next().await.unwrap().unwrap();
    assert_eq!(ev.prev.unwrap().value, b("2"));
}

async fn watch_resumes_across_a_restart(mut be: Backend) {
    let s = be.store();
    let start = s.current_revision().await.unwrap();
    let mut w = s.watch("/r/", start).await.unwrap();
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(s.create(&format!("/r/{i}"), b("before")).await.unwrap());
    }
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.push(w.next().await.unwrap().unwrap().revision());
    }
    drop(w);
    drop(s);
    be.restart().await;
    let s = be.store();
    assert!(s.current_revision().await.unwrap() >= *revs.last().unwrap());
    let mut w = s.watch("/r/", *seen.last().unwrap()).await.unwrap();
    for i in 0..20 {
        revs.push(
            s.create(&format!("/r/after/{i}"), b("after"))
                .await
                .unwrap(),
        );
    }
    while seen.len() < revs.len() {
        let ev = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("watch stalled after restart")
            .unwrap()
            .unwrap();
        seen.push(ev.revision());
    }
    assert_eq!(
        seen, revs,
        "events across the restart: none lost, none twice"
    );
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len());
}

/// The newest revisions compacted away (a delete and what it deleted), then a restart: the next
/// write still gets a revision past every earlier one, and a create's create revision is its own.
async fn revisions_are_never_reused_after_compaction_and_restart(mut be: Backend) {
    let s = be.store();
    s.create("/n/a", b("1")).await.unwrap();
    s.create("/n/b", b("1")).await.unwrap();
    let (deleted, _) = s.delete("/n/b", None).await.unwrap();
    s.compact(deleted).await.unwrap();
    drop(s);
    be.restart().await;
    let s = be.store();
    let again = s.create("/n/b", b("2")).await.unwrap();
    assert!(again > deleted, "{again:?} after {deleted:?}");
    let kv = s.get("/n/b").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (again, again));
    let next = s.update("/n/b", b("3"), again).await.unwrap();
    assert_eq!(next.0, again.0 + 1);
    let kv = s.get("/n/b").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (again, next));
}

async fn values_up_to_the_limit_and_a_clear_error_beyond(be: Backend) {
    let s = be.store();
    let max = Bytes::from(vec![b'x'; MAX_VALUE_BYTES]);
    let rev = s.create("/big/ok", max.clone()).await.unwrap();
    assert_eq!(s.get("/big/ok").await.unwrap().unwrap().value, max);
    let mut w = s.watch("/big/", Revision(rev.0 - 1)).await.unwrap();
    assert_eq!(
        w.next().await.unwrap().unwrap().kv.value.len(),
        MAX_VALUE_BYTES
    );
    let over = Bytes::from(vec![b'x'; MAX_VALUE_BYTES + 1]);
    match s.create("/big/no", over.clone()).await {
        Err(e @ StoreError::TooLarge { .. }) => {
            assert!(e.to_string().contains("exceeds the limit"), "{e}")
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(
        s.update("/big/ok", over, rev).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert!(s.get("/big/no").await.unwrap().is_none());
    assert_eq!(s.get("/big/ok").await.unwrap().unwrap().mod_revision, rev);
}

async fn future_revisions_are_refused(be: Backend) {
    let s = be.store();
    s.create("/f/a", b("1")).await.unwrap();
    let current = s.current_revision().await.unwrap();
    assert!(matches!(
        s.range(RangeRequest {
            prefix: "/f/".into(),
            revision: Some(Revision(current.0 + 100)),
            ..Default::default()
        })
        .await,
        Err(StoreError::FutureRevision { .. })
    ));
    assert!(matches!(
        s.compact(Revision(current.0 + 100)).await,
        Err(StoreError::FutureRevision { .. })
    ));
}
