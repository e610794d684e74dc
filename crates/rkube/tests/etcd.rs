//! rkube server on a real etcd (Debian's etcd-server, started by the test on free loopback
//! ports): kubectl works end to end, compaction surfaces as 410 Gone, and a 3-member cluster
//! keeps serving with one member down, refuses writes (clearly, without hanging, never with a
//! false success) with two down, and has every acknowledged write after recovery.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Cluster;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams, WatchParams};
use kube::ResourceExt;
use store::testing::EtcdCluster;

/// A hang detector for single requests (the store's own deadline is 10 s).
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

fn on_etcd(etcd: &EtcdCluster, extra: &[&str]) -> Cluster {
    let endpoint = etcd.endpoint();
    let mut args = vec!["--datastore-endpoint", endpoint.as_str()];
    args.extend_from_slice(extra);
    Cluster::start_with(0, &args)
}

fn cm(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name}, "data": {"v": value},
    }))
    .unwrap()
}

/// Create one object; Ok(resourceVersion) only if the server acknowledged it.
async fn write(api: &Api<ConfigMap>, name: &str, value: &str) -> Result<i64, String> {
    match tokio::time::timeout(
        REQUEST_DEADLINE,
        api.create(&PostParams::default(), &cm(name, value)),
    )
    .await
    {
        Err(_) => panic!("create {name} did not answer within {REQUEST_DEADLINE:?}"),
        Ok(Ok(o)) => Ok(o.resource_version().unwrap().parse().unwrap()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_on_etcd_and_410_after_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 1).expect("etcd");
    let mut c = on_etcd(&etcd, &["--compaction-interval-seconds", "1"]);
    c.kubectl(&["create", "namespace", "shop"]);
    c.kubectl(&[
        "create",
        "configmap",
        "a",
        "-n",
        "shop",
        "--from-literal=k=v1",
    ]);
    c.kubectl(&[
        "create",
        "configmap",
        "b",
        "-n",
        "shop",
        "--from-literal=k=v1",
    ]);
    let old_rv = c.kubectl(&[
        "get",
        "cm",
        "a",
        "-n",
        "shop",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    // The initial list comes first; events after it are from the watch (from the list's RV).
    let mut watch = c.kubectl_stream(&["get", "cm", "-n", "shop", "-w", "-o", "name"]);
    watch.expect_line(&["configmap/a"]);
    watch.expect_line(&["configmap/b"]);
    watch.seen.clear();
    c.kubectl(&[
        "patch",
        "cm",
        "a",
        "-n",
        "shop",
        "-p",
        r#"{"data":{"k":"v2"}}"#,
    ]);
    watch.expect_line(&["configmap/a"]);
    let listed = c.kubectl(&["get", "cm", "-n", "shop", "--chunk-size=1", "-o", "name"]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["configmap/a", "configmap/b"]
    );
    watch.seen.clear();
    c.kubectl(&["delete", "cm", "b", "-n", "shop"]);
    watch.expect_line(&["configmap/b"]);
    // The data is in etcd, not in the server: a restart finds it.
    c.stop();
    c.boot();
    assert_eq!(
        c.kubectl(&["get", "cm", "a", "-n", "shop", "-o", "jsonpath={.data.k}"]),
        "v2"
    );
    // Compaction runs every second here: a watch from the old revision ends in 410 Gone.
    let api: Api<ConfigMap> = Api::namespaced(c.client().await, "shop");
    let mut n = 0;
    loop {
        n += 1;
        c.kubectl(&[
            "annotate",
            "cm",
            "a",
            "-n",
            "shop",
            "--overwrite",
            &format!("n={n}"),
        ]);
        use futures::StreamExt;
        let mut s = api
            .watch(&WatchParams::default().timeout(1), &old_rv)
            .await
            .unwrap()
            .boxed();
        match s.next().await {
            Some(Ok(kube::api::WatchEvent::Error(e))) if e.code == 410 => break,
            Some(Err(kube::Error::Api(e))) if e.code == 410 => break,
            _ => {}
        }
        assert!(n < 200, "no 410 Gone after {n} compaction rounds");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_one_failure_and_refuse_writes_without_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(dir.path(), 3).expect("etcd cluster");
    let mut c = on_etcd(&etcd, &[]);
    // Without kube-rs's retries of 503, so that each write's own answer is seen.
    let mut config = c.client_config().await;
    config.default_retry = false;
    let api: Api<ConfigMap> = Api::namespaced(kube::Client::try_from(config).unwrap(), "default");
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        (format!("q-{seq}"), format!("value-{seq}"))
    };

    for _ in 0..20 {
        let (name, value) = next();
        write(&api, &name, &value)
            .await
            .expect("write with all members up");
        acked.insert(name, value);
    }

    // One member down (whichever it is, maybe the leader): writes go on.
    etcd.kill(0);
    let mut ok_after_one = 0;
    let mut errors_after_one = 0;
    while ok_after_one < 50 {
        let (name, value) = next();
        match write(&api, &name, &value).await {
            Ok(_) => {
                acked.insert(name, value);
                ok_after_one += 1;
            }
            // A re-election may fail a few writes; it must not last.
            Err(_) => {
                errors_after_one += 1;
                assert!(
                    errors_after_one < 200,
                    "writes keep failing with one member down"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // The server also starts with the first member it is given down.
    c.stop();
    c.boot();
    let (name, value) = next();
    write(&api, &name, &value)
        .await
        .expect("write after a restart with one member down");
    acked.insert(name, value);

    // Two of three down: no quorum. Once the first write fails, none may succeed.
    etcd.kill(1);
    let mut first_error = None;
    for _ in 0..100 {
        let (name, value) = next();
        match write(&api, &name, &value).await {
            Ok(_) => {
                acked.insert(name, value);
            }
            Err(e) => {
                first_error = Some(e);
                break;
            }
        }
    }
    let first_error = first_error.expect("writes must fail without quorum");
    let mut refused = 0;
    for _ in 0..5 {
        let (name, value) = next();
        match write(&api, &name, &value).await {
            Ok(rv) => panic!("write {name} reported success (rv {rv}) without quorum"),
            Err(e) => {
                assert!(e.contains("storage unavailable"), "unclear error: {e}");
                refused += 1;
            }
        }
    }
    let kubectl = c.kubectl_fails(&["create", "configmap", "nope"]);
    assert!(
        kubectl.contains("storage unavailable"),
        "kubectl said: {kubectl}"
    );

    // Recovery: both members back, writes work again, and every acknowledged write is there.
    etcd.restart(0).unwrap();
    etcd.restart(1).unwrap();
    etcd.wait_healthy(Duration::from_secs(60)).unwrap();
    let (name, value) = next();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match write(&api, &name, &value).await {
            Ok(_) => break,
            Err(e) if e.contains("already exists") => break,
            Err(e) => {
                assert!(attempts < 300, "writes do not resume after recovery: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    acked.insert(name, value);
    let list = api.list(&ListParams::default()).await.unwrap();
    let present: HashMap<String, String> = list
        .items
        .iter()
        .map(|o| (o.name_any(), o.data.as_ref().unwrap()["v"].clone()))
        .collect();
    for (name, value) in &acked {
        assert_eq!(
            present.get(name),
            Some(value),
            "acknowledged write {name} lost"
        );
    }
    println!(
        "etcd quorum test: {} acknowledged writes all present after recovery; {ok_after_one} writes with one member down ({errors_after_one} failed during re-election); {refused} writes refused without quorum (first error: {first_error})",
        acked.len()
    );
}

/// Every ConfigMap, Deployment and Secret in `shop` with its data, one per line.
fn shop_contents(c: &Cluster) -> String {
    c.kubectl(&[
        "get",
        "cm,deploy,secret",
        "-n",
        "shop",
        "-o",
        "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.data}{\"\\n\"}{end}",
    ])
}

fn rv_of_c0(c: &Cluster) -> i64 {
    c.kubectl(&[
        "get",
        "cm",
        "c0",
        "-n",
        "shop",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_an_embedded_store_into_etcd() {
    let mut c = Cluster::start();
    c.kubectl(&["create", "namespace", "shop"]);
    for i in 0..30 {
        c.kubectl(&[
            "create",
            "configmap",
            &format!("c{i}"),
            "-n",
            "shop",
            &format!("--from-literal=k={i}"),
        ]);
    }
    c.kubectl(&[
        "create",
        "deployment",
        "web",
        "-n",
        "shop",
        "--image=busybox",
    ]);
    c.kubectl(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "shop",
        "--from-literal=p=w",
    ]);
    // Some history beyond the live keys, so the source's revision is well ahead of its key count.
    for i in 0..50 {
        c.kubectl(&[
            "annotate",
            "cm",
            "c0",
            "-n",
            "shop",
            "--overwrite",
            &format!("n={i}"),
        ]);
    }
    let before = shop_contents(&c);
    let old_rv = rv_of_c0(&c);
    c.stop();

    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 1).expect("etcd");
    let migrate = |c: &Cluster| {
        c.command(common::rkube_bin().to_str().unwrap())
            .args(["migrate", "--data-dir"])
            .arg(c.data_dir())
            .args(["--to", &etcd.endpoint()])
            .output()
            .unwrap()
    };
    let out = migrate(&c);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified:"), "{stdout}");
    // A second run into the now non-empty etcd is refused, clearly.
    let again = migrate(&c);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds keys"));

    // The same server, now on etcd: the same objects, resourceVersions that only went up, and a
    // watch from an old resourceVersion is told to relist (410).
    let mut on_etcd = Cluster {
        dir: tempfile::tempdir().unwrap(),
        child: None,
        port: c.port,
        extra: vec![],
        kubelet: false,
    };
    std::mem::swap(&mut on_etcd.dir, &mut c.dir);
    on_etcd.set_extra(&["--datastore-endpoint", &etcd.endpoint()]);
    on_etcd.boot();
    assert_eq!(shop_contents(&on_etcd), before);
    let new_rv = rv_of_c0(&on_etcd);
    assert!(
        new_rv > old_rv,
        "resourceVersion went backwards: {new_rv} <= {old_rv}"
    );
    let api: Api<ConfigMap> = Api::namespaced(on_etcd.client().await, "shop");
    use futures::StreamExt;
    let mut s = api
        .watch(&WatchParams::default().timeout(5), &old_rv.to_string())
        .await
        .unwrap()
        .boxed();
    match s.next().await {
        Some(Ok(kube::api::WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("a watch from a pre-migration resourceVersion must get 410, got {other:?}"),
    }
    on_etcd.kubectl(&["create", "configmap", "new", "-n", "shop"]);
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn etcd_pki(
    dir: &std::path::Path,
) -> (
    store::testing::ClientTls,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let (server_cert, server_key) = leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth);
    (
        store::testing::ClientTls {
            ca: ca_path,
            cert: server_cert,
            key: server_key,
        },
        client_cert,
        client_key,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, client_cert, client_key) = etcd_pki(dir.path());
    let ca = tls.ca.clone();
    let etcd = EtcdCluster::start_with(dir.path(), 1, Some(tls)).expect("etcd with TLS");
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let (ca, cert, key) = (
        ca.to_str().unwrap().to_string(),
        client_cert.to_str().unwrap().to_string(),
        client_key.to_str().unwrap().to_string(),
    );
    // Without a client certificate etcd refuses us: the server says so and exits.
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::rkube_bin())
        .args(["server", "--port", "0", "--data-dir"])
        .arg(data.path())
        .args(["--datastore-endpoint", &endpoint, "--datastore-cafile", &ca])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("etcd"), "unclear failure: {stderr}");
    // With one, everything works.
    let c = Cluster::start_with(
        0,
        &[
            "--datastore-endpoint",
            &endpoint,
            "--datastore-cafile",
            &ca,
            "--datastore-certfile",
            &cert,
            "--datastore-keyfile",
            &key,
        ],
    );
    c.kubectl(&["create", "configmap", "tls", "--from-literal=a=b"]);
    assert_eq!(
        c.kubectl(&["get", "cm", "tls", "-o", "jsonpath={.data.a}"]),
        "b"
    );
}
