//! kube-rs against a real `rkube server`: list, watch across a server restart, and many clients
//! racing read-modify-write on one object.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use common::Cluster;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;

fn cm(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"v": value},
    }))
    .unwrap()
}

/// Apply watcher events to a model of the collection; returns (name → (rv, value)).
#[derive(Default)]
struct Model {
    state: BTreeMap<String, (String, String)>,
    init: Option<BTreeMap<String, (String, String)>>,
    applied: Vec<(String, String)>,
    deleted: Vec<String>,
    relists: usize,
}

impl Model {
    fn apply(&mut self, ev: Event<ConfigMap>) {
        let entry = |c: &ConfigMap| {
            (
                c.name_any(),
                (
                    c.resource_version().unwrap_or_default(),
                    c.data
                        .as_ref()
                        .and_then(|d| d.get("v").cloned())
                        .unwrap_or_default(),
                ),
            )
        };
        match ev {
            Event::Init => {
                self.relists += 1;
                self.init = Some(BTreeMap::new());
            }
            Event::InitApply(c) => {
                let (k, v) = entry(&c);
                self.init.get_or_insert_with(BTreeMap::new).insert(k, v);
            }
            Event::InitDone => {
                self.state = self.init.take().unwrap_or_default();
            }
            Event::Apply(c) => {
                let (k, v) = entry(&c);
                self.applied.push((k.clone(), v.0.clone()));
                self.state.insert(k, v);
            }
            Event::Delete(c) => {
                self.deleted.push(c.name_any());
                self.state.remove(&c.name_any());
            }
        }
    }
}

async fn wait_model(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event<ConfigMap>>,
    model: &mut Model,
    done: impl Fn(&Model) -> bool,
) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while !done(model) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => model.apply(ev),
            Ok(None) => panic!("watcher ended"),
            Err(_) => panic!(
                "watcher did not reach the expected state; have {:?}",
                model.state.keys().collect::<Vec<_>>()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_survives_a_server_restart_without_loss_or_duplicates() {
    let mut c = Cluster::start();
    let client = c.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            if let Ok(ev) = ev {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        }
    });
    let mut model = Model::default();
    wait_model(&mut rx, &mut model, |m| m.relists == 1 && m.init.is_none()).await;

    for i in 0..20 {
        api.create(&PostParams::default(), &cm(&format!("cm-{i:02}"), "1"))
            .await
            .unwrap();
    }
    wait_model(&mut rx, &mut model, |m| m.state.len() == 20).await;

    // A clean stop and a start on the same data dir and port.
    let status = c.stop();
    assert!(status.success(), "SIGTERM must exit 0, got {status:?}");
    c.boot();

    for i in 20..40 {
        api.create(&PostParams::default(), &cm(&format!("cm-{i:02}"), "1"))
            .await
            .unwrap();
    }
    let mut c0 = api.get("cm-00").await.unwrap();
    c0.data = Some([("v".to_string(), "2".to_string())].into());
    api.replace("cm-00", &PostParams::default(), &c0)
        .await
        .unwrap();
    api.delete("cm-01", &DeleteParams::default()).await.unwrap();

    wait_model(&mut rx, &mut model, |m| {
        m.state.len() == 39
            && m.state.get("cm-00").is_some_and(|v| v.1 == "2")
            && !m.state.contains_key("cm-01")
    })
    .await;

    // The model built from events equals the server's state, object for object and version for version.
    let listed = api.list(&ListParams::default()).await.unwrap();
    let server: BTreeMap<String, (String, String)> = listed
        .items
        .iter()
        .map(|c| {
            (
                c.name_any(),
                (
                    c.resource_version().unwrap(),
                    c.data.as_ref().unwrap()["v"].clone(),
                ),
            )
        })
        .collect();
    assert_eq!(model.state, server);
    // No change was delivered twice.
    let mut seen = HashSet::new();
    for a in &model.applied {
        assert!(seen.insert(a.clone()), "duplicate event {a:?}");
    }
    assert_eq!(model.deleted, ["cm-01"]);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_modify_write_loses_nothing() {
    let c = Cluster::start();
    let client = c.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &cm("counter", "0"))
        .await
        .unwrap();

    const CLIENTS: usize = 16;
    const ATTEMPTS: usize = 25;
    let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conflicts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let api = api.clone();
        let ok = ok.clone();
        let conflicts = conflicts.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ATTEMPTS {
                let mut cur = api.get("counter").await.unwrap();
                let n: u64 = cur.data.as_ref().unwrap()["v"].parse().unwrap();
                cur.data = Some([("v".to_string(), (n + 1).to_string())].into());
                match api.replace("counter", &PostParams::default(), &cur).await {
                    Ok(_) => {
                        ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        assert_eq!(s.reason, "Conflict");
                        conflicts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ok = ok.load(std::sync::atomic::Ordering::SeqCst);
    let conflicts = conflicts.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(ok + conflicts, CLIENTS * ATTEMPTS);
    let n: usize = api.get("counter").await.unwrap().data.unwrap()["v"]
        .parse()
        .unwrap();
    assert_eq!(
        n, ok,
        "final value must equal the number of successful writes"
    );
    assert!(ok > 0);
    println!("concurrency: {ok} writes succeeded, {conflicts} got 409 Conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let c = Cluster::start();
    let client = c.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..5 {
        api.create(&PostParams::default(), &cm(&format!("s-{i}"), "1"))
            .await
            .unwrap();
    }
    // sendInitialEvents=true: the watcher sees Init, the objects, then InitDone (which it only
    // emits after the k8s.io/initial-events-end bookmark).
    let stream = watcher::watcher(api.clone(), watcher::Config::default().streaming_lists());
    let mut stream = std::pin::pin!(stream);
    let mut names = Vec::new();
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("InitDone in time")
            .unwrap()
            .unwrap();
        match ev {
            Event::Init => {}
            Event::InitApply(c) => names.push(c.name_any()),
            Event::InitDone => break,
            other => panic!("unexpected event before InitDone: {other:?}"),
        }
    }
    names.sort();
    assert_eq!(names, ["s-0", "s-1", "s-2", "s-3", "s-4"]);
    api.create(&PostParams::default(), &cm("after", "1"))
        .await
        .unwrap();
    match tokio::time::timeout_at(deadline, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        Event::Apply(c) => assert_eq!(c.name_any(), "after"),
        other => panic!("expected the new object, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_history_answers_410_gone() {
    let c = Cluster::start_with(0, &["--compaction-interval-seconds", "1"]);
    let client = c.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let first = api
        .create(&PostParams::default(), &cm("old", "1"))
        .await
        .unwrap();
    let old_rv = first.resource_version().unwrap();
    // Writes move history on; the compactor (every second here) forgets what lies behind.
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let mut n = 0;
    loop {
        n += 1;
        api.create(&PostParams::default(), &cm(&format!("new-{n}"), "1"))
            .await
            .unwrap();
        let req = http::Request::get(format!(
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={old_rv}&timeoutSeconds=1"
        ))
        .body(Vec::new())
        .unwrap();
        let text = client.request_text(req).await.unwrap();
        if let Some(line) = text.lines().find(|l| l.contains("\"ERROR\"")) {
            let ev: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(ev["object"]["kind"], "Status");
            assert_eq!(ev["object"]["code"], 410);
            assert_eq!(ev["object"]["reason"], "Expired");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no 410 after compaction"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A paged list whose continue token points at compacted history is 410 too.
    let page = api.list(&ListParams::default().limit(1)).await.unwrap();
    let token = page.metadata.continue_.clone().unwrap();
    loop {
        api.create(&PostParams::default(), &cm(&format!("more-{n}"), "1"))
            .await
            .unwrap();
        n += 1;
        match api
            .list(&ListParams::default().limit(1).continue_token(&token))
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 410 => {
                assert_eq!(s.reason, "Expired");
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "continue token never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_patch_type_through_kube_rs() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};
    let c = Cluster::start();
    let client = c.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &cm("p", "1"))
        .await
        .unwrap();
    let pp = PatchParams::default();

    let merged = cms
        .patch(
            "p",
            &pp,
            &Patch::Merge(serde_json::json!({"data": {"w": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.data.as_ref().unwrap()["w"], "2");

    let ops: json_patch::Patch = serde_json::from_value(
        serde_json::json!([{"op": "replace", "path": "/data/v", "value": "3"}]),
    )
    .unwrap();
    let patched = cms.patch("p", &pp, &Patch::Json::<()>(ops)).await.unwrap();
    assert_eq!(patched.data.as_ref().unwrap()["v"], "3");

    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}},
            "spec": {"containers": [{"name": "one", "image": "i"}]}}}})).unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    let smp = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "two", "image": "j"}]}}}});
    let d = deploys
        .patch("d", &pp, &Patch::Strategic(smp))
        .await
        .unwrap();
    let names: Vec<String> = d
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        names,
        ["one", "two"],
        "strategic merge keeps the first container"
    );

    // Server-side apply: creates, then conflicts with another manager, then forces.
    let apply = |v: &str| {
        Patch::Apply(
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"k": v}}),
        )
    };
    let made = cms
        .patch("ssa", &PatchParams::apply("alice"), &apply("1"))
        .await
        .unwrap();
    assert_eq!(made.data.unwrap()["k"], "1");
    let mf = made.metadata.managed_fields.unwrap();
    assert_eq!(
        (mf[0].manager.as_deref(), mf[0].operation.as_deref()),
        (Some("alice"), Some("Apply"))
    );
    match cms
        .patch("ssa", &PatchParams::apply("bob"), &apply("2"))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "Conflict"));
            assert!(
                s.message.contains("conflict with \"alice\""),
                "{}",
                s.message
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let forced = cms
        .patch("ssa", &PatchParams::apply("bob").force(), &apply("2"))
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["k"], "2");
}
