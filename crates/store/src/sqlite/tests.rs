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
