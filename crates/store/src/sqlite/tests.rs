//! SQLite-specific behaviour. What every backend must do is in `tests/conformance.rs`.

use super::*;
use futures::StreamExt;

fn b(s: &str) -> Bytes {
    Bytes::from(s.to_string())
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
async fn a_second_store_on_the_same_file_is_refused_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let first = SqliteStore::open(&path).unwrap();
    first.create("/l/a", b("1")).await.unwrap();
    let Err(e) = SqliteStore::open_waiting(&path, std::time::Duration::from_millis(100)) else {
        panic!("a second writer was allowed on one database");
    };
    assert!(e.to_string().contains("in use by another process"), "{e}");
    drop(first);
    // Once the first store (and its writer thread) is gone, the database opens again.
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(again.get("/l/a").await.unwrap().unwrap().value, b("1"));
}

#[tokio::test]
async fn a_watcher_far_behind_replays_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(dir.path().join("state.db")).unwrap();
    // More history than one replay page and than the live broadcast holds.
    let n = BROADCAST_CAPACITY as i64 + 2 * REPLAY_PAGE + 7;
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
    let mut w = s.watch("/n/", Revision(0)).await.unwrap();
    for expected in 1..=total {
        assert_eq!(w.next().await.unwrap().unwrap().revision().0, expected);
    }
}

#[tokio::test]
async fn compaction_removes_superseded_history_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(dir.path().join("state.db")).unwrap();
    let mut revs = Vec::new();
    for k in 0..10 {
        revs.push(s.create(&format!("/k/{k}"), b("0")).await.unwrap());
    }
    // Enough history for several compaction steps.
    let rounds = (COMPACT_STEP as usize * 2) / 10 + 5;
    for i in 1..rounds {
        for (k, rev) in revs.iter_mut().enumerate() {
            *rev = s
                .update(&format!("/k/{k}"), Bytes::from(i.to_string()), *rev)
                .await
                .unwrap();
        }
    }
    s.create("/gone", b("x")).await.unwrap();
    s.delete("/gone", None).await.unwrap();
    let before = s.current_revision().await.unwrap();
    s.compact(before).await.unwrap();
    let rows: i64 = s
        .read(|c| {
            c.query_row("SELECT COUNT(*) FROM log", [], |r| r.get(0))
                .map_err(backend)
        })
        .await
        .unwrap();
    assert_eq!(rows, 10, "only the live value of each key is left");
    assert_eq!(s.compacted_revision().await.unwrap(), before);
    let kv = s.get("/k/3").await.unwrap().unwrap();
    assert_eq!(kv.value, Bytes::from((rounds - 1).to_string()));
    // Previous values still come with events after the compaction point.
    let mut w = s.watch("/k/", before).await.unwrap();
    s.update("/k/3", b("new"), kv.mod_revision).await.unwrap();
    let ev = w.next().await.unwrap().unwrap();
    assert_eq!(ev.prev.unwrap().value, kv.value);
}

#[tokio::test]
async fn a_database_with_values_in_kv_opens_and_loses_the_copy() {
    // The layout before values lived in `log` only: `kv` carried a copy of each.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA auto_vacuum=INCREMENTAL;
             CREATE TABLE log (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL,
                 deleted INTEGER NOT NULL, create_revision INTEGER NOT NULL,
                 prev_revision INTEGER NOT NULL, value BLOB NOT NULL);
             CREATE INDEX log_key_id ON log (key, id);
             CREATE TABLE kv (key TEXT PRIMARY KEY, create_revision INTEGER NOT NULL,
                 mod_revision INTEGER NOT NULL, value BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO log (key, deleted, create_revision, prev_revision, value) VALUES ('/m/a', 0, 1, 0, CAST('old' AS BLOB));
             INSERT INTO log (key, deleted, create_revision, prev_revision, value) VALUES ('/m/a', 0, 1, 1, CAST('new' AS BLOB));
             INSERT INTO log (key, deleted, create_revision, prev_revision, value) VALUES ('/m/b', 0, 3, 0, CAST('b' AS BLOB));
             INSERT INTO kv VALUES ('/m/a', 1, 2, 'new'), ('/m/b', 3, 3, CAST('b' AS BLOB));",
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let a = s.get("/m/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value, a.create_revision, a.mod_revision),
        (b("new"), Revision(1), Revision(2))
    );
    let list = s
        .range(RangeRequest {
            prefix: "/m/".into(),
            start_after: None,
            limit: 0,
            revision: None,
        })
        .await
        .unwrap();
    let values: Vec<Bytes> = list.kvs.into_iter().map(|kv| kv.value).collect();
    assert_eq!(values, vec![b("new"), b("b")]);
    let r = s.update("/m/b", b("b2"), Revision(3)).await.unwrap();
    assert_eq!(r, Revision(4));
    drop(s);
    // The copy is gone, and the store reopens as it is now.
    let conn = Connection::open(&path).unwrap();
    let columns: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM pragma_table_info('kv') WHERE name = 'value'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(columns, 0);
    drop(conn);
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.get("/m/b").await.unwrap().unwrap().value, b("b2"));
}
