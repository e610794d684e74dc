//! Watch history across an API server restart: watchers that resume from their last
//! resourceVersion receive exactly the store's history (no gaps, duplicates or reordering),
//! on the embedded store and on etcd.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, Cluster};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::ResourceExt;
use store::testing::EtcdCluster;

/// (event type, name, resourceVersion, value)
type Seen = (&'static str, String, i64, String);

const WATCHERS: usize = 3;
const WRITERS: usize = 4;

fn record(ev: WatchEvent<ConfigMap>) -> Result<Option<Seen>, String> {
    let (kind, obj) = match ev {
        WatchEvent::Added(o) => ("ADDED", o),
        WatchEvent::Modified(o) => ("MODIFIED", o),
        WatchEvent::Deleted(o) => ("DELETED", o),
        WatchEvent::Bookmark(_) => return Ok(None),
        WatchEvent::Error(e) => return Err(format!("{} {}", e.code, e.message)),
    };
    let value = obj
        .data
        .as_ref()
        .and_then(|d| d.get("v").cloned())
        .unwrap_or_default();
    Ok(Some((
        kind,
        obj.name_any(),
        obj.resource_version().unwrap().parse().unwrap(),
        value,
    )))
}

/// Follow configmaps in `default` from `from` until the `end` marker appears, resuming from the
/// last resourceVersion whenever the stream breaks (the server restarting).
async fn follow(api: Api<ConfigMap>, from: String, resumes: Arc<Mutex<usize>>) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut last = from;
    loop {
        let stream = match api.watch(&WatchParams::default().timeout(30), &last).await {
            Ok(s) => s.boxed(),
            // The server is down: try again shortly.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut stream = stream;
        while let Some(item) = stream.next().await {
            let Ok(ev) = item else { break };
            match record(ev) {
                Ok(Some(s)) => {
                    last = s.2.to_string();
                    let done = s.1 == "end";
                    seen.push(s);
                    if done {
                        return seen;
                    }
                }
                Ok(None) => {}
                Err(e) => panic!("watch from {last} failed: {e}"),
            }
        }
        *resumes.lock().unwrap() += 1;
    }
}

async fn history_across_restart(mut c: Cluster) {
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, "default");
    let start = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let resumes: Arc<Mutex<usize>> = Arc::default();
    let watchers: Vec<_> = (0..WATCHERS)
        .map(|_| tokio::spawn(follow(api.clone(), start.clone(), resumes.clone())))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let client_api = api.clone();
            tokio::spawn(async move {
                let mut seq = 0;
                while !stop.load(Ordering::SeqCst) {
                    seq += 1;
                    let name = format!("w{w}-{}", seq % 5);
                    let value = format!("{w}/{seq}");
                    let obj: ConfigMap = serde_json::from_value(serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": name}, "data": {"v": value},
                    }))
                    .unwrap();
                    // Create, update, delete in turn: every kind of event.
                    let res = match seq % 3 {
                        0 => client_api
                            .create(&PostParams::default(), &obj)
                            .await
                            .map(|o| o.resource_version()),
                        1 => client_api
                            .patch(
                                &name,
                                &kube::api::PatchParams::default(),
                                &kube::api::Patch::Merge(serde_json::json!({"data": {"v": value}})),
                            )
                            .await
                            .map(|o| o.resource_version()),
                        _ => client_api
                            .delete(&name, &DeleteParams::default())
                            .await
                            .map(|r| r.left().and_then(|o| o.resource_version())),
                    };
                    match res {
                        Ok(Some(rv)) => acked.lock().unwrap().push((name, rv.parse().unwrap())),
                        Ok(None) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();

    let wait_acks = |n: usize| {
        let acked = acked.clone();
        tokio::task::spawn_blocking(move || {
            eventually("writes acknowledged", &mut || {
                (acked.lock().unwrap().len() >= n).then_some(())
            })
        })
    };
    wait_acks(300).await.unwrap();
    c.kill9();
    c.boot();
    let after = acked.lock().unwrap().len();
    wait_acks(after + 300).await.unwrap();
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    // A last write that every watcher waits for.
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, "default");
    let end: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "end"},
    }))
    .unwrap();
    api.create(&PostParams::default(), &end).await.unwrap();

    let mut results = Vec::new();
    for w in watchers {
        results.push(
            tokio::time::timeout(Duration::from_secs(120), w)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // The store's history: one fresh watch from the same start, after the fact.
    let history = follow(api.clone(), start, Arc::default()).await;
    let revs: Vec<i64> = history.iter().map(|s| s.2).collect();
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "history is ordered and unique"
    );
    for (i, seen) in results.iter().enumerate() {
        assert_eq!(seen.len(), history.len(), "watcher {i}: event count");
        assert_eq!(
            seen, &history,
            "watcher {i} differs from the store's history"
        );
    }
    // And every acknowledged write is in that history.
    let in_history: std::collections::HashSet<(String, i64)> =
        history.iter().map(|s| (s.1.clone(), s.2)).collect();
    for a in acked.lock().unwrap().iter() {
        assert!(
            in_history.contains(a),
            "acknowledged write {a:?} missing from history"
        );
    }
    println!(
        "watch history: {WATCHERS} watchers x {} events across a kill -9 restart ({} resumes), equal to the store's history; {} acknowledged writes all in it",
        history.len(),
        resumes.lock().unwrap(),
        acked.lock().unwrap().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_history_across_restart_embedded() {
    history_across_restart(Cluster::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_history_across_restart_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 1).expect("etcd");
    history_across_restart(Cluster::start_with(
        0,
        &["--datastore-endpoint", &etcd.endpoint()],
    ))
    .await;
}
