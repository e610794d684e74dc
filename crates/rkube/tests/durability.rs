//! Nothing acknowledged is lost: kill -9 the server at random moments while 8 clients write,
//! restart it on the same data dir, and find every acknowledged write with its acknowledged value.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::{eventually, Cluster};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kube::ResourceExt;

const ITERATIONS: usize = 20;
const WRITERS: usize = 8;

/// One acknowledged write: the object, the value, the resourceVersion it got.
type Ack = (String, String, i64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let mut c = Cluster::start();
    let acked: Arc<Mutex<Vec<Ack>>> = Arc::default();
    // Writes in flight when the server died: they may or may not have landed.
    let in_flight: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    // Errors while the server was up (not acknowledged, so not checked, but reported).
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut max_rv = 0i64;
    let mut failed_total = 0usize;
    let mut updates_total = 0usize;
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
            let in_flight = in_flight.clone();
            tasks.push(tokio::spawn(async move {
                let mut updates = 0usize;
                for seq in 0.. {
                    // Create an object, then update it a few times (each update is a CAS on the
                    // resourceVersion the previous write was acknowledged with).
                    let name = format!("it{iteration}-w{w}-{seq}");
                    let mut rv: Option<String> = None;
                    for version in 0..=(seq % 4) {
                        let value = format!("{iteration}/{w}/{seq}/{version}");
                        let mut obj: ConfigMap = serde_json::from_value(serde_json::json!({
                            "apiVersion": "v1", "kind": "ConfigMap",
                            "metadata": {"name": name}, "data": {"v": value},
                        }))
                        .unwrap();
                        obj.metadata.resource_version = rv.clone();
                        let res = match &rv {
                            None => api.create(&PostParams::default(), &obj).await,
                            Some(_) => api.replace(&name, &PostParams::default(), &obj).await,
                        };
                        match res {
                            Ok(written) => {
                                let got = written.resource_version().unwrap();
                                acked.lock().unwrap().push((
                                    name.clone(),
                                    value,
                                    got.parse().unwrap(),
                                ));
                                updates += usize::from(rv.is_some());
                                rv = Some(got);
                            }
                            // The server died under us: this write was never acknowledged.
                            Err(kube::Error::HyperError(_) | kube::Error::Service(_)) => {
                                in_flight.lock().unwrap().insert(name, value);
                                return updates;
                            }
                            // Anything else is not an acknowledgement either; go on.
                            Err(e) => {
                                let mut errs = errors.lock().unwrap();
                                errs.push(e.to_string());
                                if errs.len() > 1000 {
                                    return updates;
                                }
                                break;
                            }
                        }
                    }
                }
                updates
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
            updates_total += t.await.unwrap();
        }
        c.boot();

        let client = c.client().await;
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        let list = api.list(&ListParams::default()).await.unwrap();
        let present: HashMap<String, (String, i64)> = list
            .items
            .iter()
            .map(|c| {
                (
                    c.name_any(),
                    (
                        c.data.as_ref().unwrap()["v"].clone(),
                        c.resource_version().unwrap().parse().unwrap(),
                    ),
                )
            })
            .collect();
        // The newest acknowledged write of each object.
        let mut newest: HashMap<String, (String, i64)> = HashMap::new();
        for (name, value, rv) in acked.lock().unwrap().iter() {
            max_rv = max_rv.max(*rv);
            let e = newest.entry(name.clone()).or_insert((value.clone(), *rv));
            if *rv >= e.1 {
                *e = (value.clone(), *rv);
            }
        }
        let in_flight_now = in_flight.lock().unwrap().clone();
        for (name, (value, rv)) in &newest {
            let Some((got, got_rv)) = present.get(name) else {
                panic!("acknowledged object {name} lost after kill -9 (iteration {iteration})");
            };
            if got == value {
                assert_eq!(
                    got_rv, rv,
                    "{name}: the acknowledged value with another resourceVersion"
                );
            } else {
                // Only a later write that was in flight at the kill may have replaced it.
                assert_eq!(
                    in_flight_now.get(name),
                    Some(got),
                    "acknowledged write {name}={value} lost after kill -9 (iteration {iteration}); found {got}"
                );
                assert!(got_rv > rv, "{name}: resourceVersion went backwards");
            }
        }
        let list_rv: i64 = list.metadata.resource_version.unwrap().parse().unwrap();
        assert!(
            list_rv >= max_rv,
            "resourceVersion went backwards: {list_rv} < {max_rv}"
        );
    }
    println!(
        "crash test: {ITERATIONS} kill -9 iterations, {} acknowledged writes ({updates_total} of them updates) all present with their values after restart ({} writes failed while the server was up)",
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
