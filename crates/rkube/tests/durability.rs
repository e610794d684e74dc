//! Nothing acknowledged is lost: kill -9 the server at random moments while 8 clients write,
//! restart it on the same data dir, and find every acknowledged write with its acknowledged value.

mod common;

use std::sync::{Arc, Mutex};

use common::{eventually, Cluster};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kube::ResourceExt;

const ITERATIONS: usize = 20;
const WRITERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let mut c = Cluster::start();
    // name → (acknowledged value, acknowledged resourceVersion)
    let acked: Arc<Mutex<Vec<(String, String, i64)>>> = Arc::default();
    // Errors while the server was up (not acknowledged, so not checked, but reported).
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut max_rv = 0i64;
    let mut failed_total = 0usize;
    for iteration in 0..ITERATIONS {
        let client = c.client().await;
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        let before = acked.lock().unwrap().len();
        failed_total += std::mem::take(&mut *errors.lock().unwrap()).len();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let api = api.clone();
            let acked = acked.clone();
            let errors = errors.clone();
            tasks.push(tokio::spawn(async move {
                for seq in 0.. {
                    let name = format!("it{iteration}-w{w}-{seq}");
                    let value = format!("{iteration}/{w}/{seq}");
                    let obj: ConfigMap = serde_json::from_value(serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": name}, "data": {"v": value},
                    }))
                    .unwrap();
                    match api.create(&PostParams::default(), &obj).await {
                        Ok(created) => {
                            let rv: i64 = created.resource_version().unwrap().parse().unwrap();
                            acked.lock().unwrap().push((name, value, rv));
                        }
                        // The server died under us: this write was never acknowledged.
                        Err(kube::Error::HyperError(_) | kube::Error::Service(_)) => return,
                        // Anything else is not an acknowledgement either; keep writing.
                        Err(e) => {
                            let mut errs = errors.lock().unwrap();
                            errs.push(e.to_string());
                            if errs.len() > 1000 {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        // Kill after a random number of acknowledged writes in this iteration.
        let target = before + 20 + (rand_u64() % 300) as usize;
        let acked2 = acked.clone();
        tokio::task::spawn_blocking(move || {
            eventually("writes acknowledged", &mut || {
                (acked2.lock().unwrap().len() >= target).then_some(())
            })
        })
        .await
        .unwrap();
        c.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        c.boot();

        let client = c.client().await;
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        let list = api.list(&ListParams::default()).await.unwrap();
        let present: std::collections::HashMap<String, String> = list
            .items
            .iter()
            .map(|c| (c.name_any(), c.data.as_ref().unwrap()["v"].clone()))
            .collect();
        let acked_now = acked.lock().unwrap().clone();
        for (name, value, rv) in &acked_now {
            assert_eq!(
                present.get(name),
                Some(value),
                "acknowledged write {name} lost after kill -9 (iteration {iteration})"
            );
            max_rv = max_rv.max(*rv);
        }
        let list_rv: i64 = list.metadata.resource_version.unwrap().parse().unwrap();
        assert!(
            list_rv >= max_rv,
            "resourceVersion went backwards: {list_rv} < {max_rv}"
        );
    }
    println!(
        "crash test: {ITERATIONS} kill -9 iterations, {} acknowledged writes all present after restart ({} writes failed while the server was up)",
        acked.lock().unwrap().len(),
        failed_total + errors.lock().unwrap().len()
    );
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_clean_and_the_cluster_is_as_it_was() {
    let mut c = Cluster::start();
    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: keep}\ndata: {a: b}\n");
    let rv_before = c.kubectl(&[
        "get",
        "cm",
        "keep",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    let status = c.stop();
    assert!(status.success(), "exit status {status:?}");
    c.boot();
    assert_eq!(
        c.kubectl(&[
            "get",
            "cm",
            "keep",
            "-o",
            "jsonpath={.data.a} {.metadata.resourceVersion}"
        ]),
        format!("b {rv_before}")
    );
}
