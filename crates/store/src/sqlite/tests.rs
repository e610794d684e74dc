use super::*;
use futures::StreamExt;

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("state.db")).unwrap();
    (dir, store)
}

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
}

#[tokio::test]
async fn revisions_increase_and_cas_conflicts() {
    let (_d, s) = open();
    let r1 = s.create("/a", b("1")).await.unwrap();
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
    assert!(s.get("/a").await.unwrap().is_none());
    assert!(matches!(
        s.delete("/a", None).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(s.current_revision().await.unwrap(), r4);
}

#[tokio::test]
async fn range_pages_and_reads_the_past() {
    let (_d, s) = open();
    for i in 0..10 {
        s.create(&format!("/p/{i}"), b("v1")).await.unwrap();
    }
    s.create("/q/0", b("other")).await.unwrap();
    let at = s.current_revision().await.unwrap();
    s.update("/p/3", b("v2"), Revision(4)).await.unwrap();
    s.delete("/p/5", None).await.unwrap();

    let mut seen = Vec::new();
    let mut start = None;
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
        assert_eq!(page.revision, at);
        seen.extend(page.kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())));
        if !page.more {
            break;
        }
        start = page.kvs.last().map(|kv| kv.key.clone());
    }
    assert_eq!(seen.len(), 10);
    assert!(seen.iter().all(|(_, v)| v == &b("v1")));

    let now = s
        .range(RangeRequest {
            prefix: "/p/".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(now.kvs.len(), 9);
    assert_eq!(
        now.kvs.iter().find(|kv| kv.key == "/p/3").unwrap().value,
        b("v2")
    );
    assert!(!now.more);
}

#[tokio::test]
async fn watch_replays_then_follows_with_prev_values() {
    let (_d, s) = open();
    let r1 = s.create("/w/a", b("1")).await.unwrap();
    s.create("/x/ignored", b("1")).await.unwrap();
    let r2 = s.update("/w/a", b("2"), r1).await.unwrap();
    let mut w = s.watch("/w/", Revision(0)).await.unwrap();
    let e1 = w.next().await.unwrap().unwrap();
    assert_eq!(
        (e1.kind, e1.revision(), e1.prev.is_none()),
        (EventKind::Put, r1, true)
    );
    let e2 = w.next().await.unwrap().unwrap();
    assert_eq!(e2.revision(), r2);
    assert_eq!(e2.prev.unwrap().value, b("1"));
    let (r3, _) = s.delete("/w/a", None).await.unwrap();
    let e3 = w.next().await.unwrap().unwrap();
    assert_eq!((e3.kind, e3.revision()), (EventKind::Delete, r3));
    assert_eq!(e3.kv.value, b("2"));
    let r4 = s.create("/w/a", b("3")).await.unwrap();
    let e4 = w.next().await.unwrap().unwrap();
    assert_eq!(
        (e4.kind, e4.revision(), e4.prev.is_none()),
        (EventKind::Put, r4, true)
    );
}

#[tokio::test]
async fn many_events_stay_ordered_and_unique_for_a_slow_watcher() {
    let (_d, s) = open();
    let mut w = s.watch("/n/", Revision(0)).await.unwrap();
    let n = BROADCAST_CAPACITY + 500;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 8 + 1 {
                s.create(&format!("/n/{t}/{i}"), b("v")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = s.current_revision().await.unwrap().0;
    let mut last = 0;
    let mut count = 0;
    while last < total {
        let ev = w.next().await.unwrap().unwrap();
        assert!(
            ev.revision().0 > last,
            "out of order: {} after {}",
            ev.revision(),
            last
        );
        last = ev.revision().0;
        count += 1;
    }
    assert_eq!(count, total);
}

#[tokio::test]
async fn compaction_keeps_current_values_and_refuses_old_revisions() {
    let (_d, s) = open();
    let r1 = s.create("/c/a", b("1")).await.unwrap();
    let r2 = s.update("/c/a", b("2"), r1).await.unwrap();
    s.create("/c/b", b("1")).await.unwrap();
    s.delete("/c/b", None).await.unwrap();
    let r5 = s.create("/c/c", b("1")).await.unwrap();
    s.compact(Revision(r5.0 - 1)).await.unwrap();
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
        s.compact(Revision(1)).await,
        Err(StoreError::Compacted { .. })
    ));
    let page = s
        .range(RangeRequest {
            prefix: "/c/".into(),
            revision: Some(Revision(r5.0 - 1)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.kvs.len(), 1);
    assert_eq!(page.kvs[0].value, b("2"));
    // An update after compaction still reports its previous value.
    let mut w = s.watch("/c/", Revision(r5.0 - 1)).await.unwrap();
    s.update("/c/a", b("3"), r2).await.unwrap();
    let _ = w.next().await.unwrap().unwrap(); // r5
    let ev = w.next().await.unwrap().unwrap();
    assert_eq!(ev.prev.unwrap().value, b("2"));
}

#[tokio::test]
async fn reopen_keeps_everything_and_revisions_continue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let last;
    {
        let s = SqliteStore::open(&path).unwrap();
        s.create("/r/a", b("1")).await.unwrap();
        let (r, _) = s.delete("/r/a", None).await.unwrap();
        last = r;
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.current_revision().await.unwrap(), last);
    assert!(s.create("/r/a", b("2")).await.unwrap() > last);
}

#[tokio::test]
async fn oversized_values_are_refused() {
    let (_d, s) = open();
    let big = Bytes::from(vec![b'x'; MAX_VALUE_BYTES + 1]);
    assert!(matches!(
        s.create("/big", big).await,
        Err(StoreError::TooLarge { .. })
    ));
    assert!(s.get("/big").await.unwrap().is_none());
}

#[tokio::test]
async fn range_stream_is_one_snapshot_in_chunks() {
    let (_d, s) = open();
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
