//! Bad input gets a clear Status with the right code: never a crash, a 500, a hang or lost data.

mod common;

use common::Cluster;
use http::Request;

struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    content_type: &'static str,
    body: Vec<u8>,
    code: u16,
    reason: &'static str,
}

fn case(
    what: &'static str,
    method: &'static str,
    path: &str,
    content_type: &'static str,
    body: impl Into<Vec<u8>>,
    code: u16,
    reason: &'static str,
) -> Case {
    Case {
        what,
        method,
        path: path.to_string(),
        content_type,
        body: body.into(),
        code,
        reason,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_status_with_the_right_code() {
    let c = Cluster::start();
    let client = c.client().await;
    let cms = "/api/v1/namespaces/default/configmaps";
    let good = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ok"}}"#;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_obj = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"deep"}},"data":{}{}}}"#,
        "{\"a\":".repeat(200),
        "1".to_string() + &"}".repeat(200)
    );
    let mut bomb = String::from("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bomb}\na: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    let mut prev = "a".to_string();
    for n in ["b", "c", "d", "e", "f", "g", "h", "i"] {
        bomb.push_str(&format!(
            "{n}: &{n} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
        prev = n.to_string();
    }
    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"x":"{}"}}}}"#,
        "x".repeat(3 * 1024 * 1024 + 10)
    );
    let many_ops = serde_json::to_vec(&vec![
        serde_json::json!({"op": "test", "path": "/kind", "value": "ConfigMap"});
        10_001
    ])
    .unwrap();
    let cases = vec![
        case(
            "malformed JSON",
            "POST",
            cms,
            "application/json",
            "{\"apiVersion\": ",
            400,
            "BadRequest",
        ),
        case(
            "truncated JSON",
            "POST",
            cms,
            "application/json",
            &good[..good.len() - 5],
            400,
            "BadRequest",
        ),
        case(
            "not an object",
            "POST",
            cms,
            "application/json",
            "[1,2]",
            400,
            "BadRequest",
        ),
        case(
            "empty body",
            "POST",
            cms,
            "application/json",
            "",
            400,
            "BadRequest",
        ),
        case(
            "malformed YAML",
            "POST",
            cms,
            "application/yaml",
            "apiVersion: v1\nkind: [ConfigMap\n",
            400,
            "BadRequest",
        ),
        case(
            "YAML alias bomb",
            "POST",
            cms,
            "application/yaml",
            bomb,
            400,
            "BadRequest",
        ),
        case(
            "deeply nested JSON",
            "POST",
            cms,
            "application/json",
            deep,
            400,
            "BadRequest",
        ),
        case(
            "deeply nested object",
            "POST",
            cms,
            "application/json",
            deep_obj,
            400,
            "BadRequest",
        ),
        case(
            "body over 3 MiB",
            "POST",
            cms,
            "application/json",
            big,
            413,
            "RequestEntityTooLarge",
        ),
        case(
            "wrong kind for the path",
            "POST",
            cms,
            "application/json",
            r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"}}"#,
            400,
            "BadRequest",
        ),
        case(
            "wrong apiVersion for the path",
            "POST",
            cms,
            "application/json",
            r#"{"apiVersion":"apps/v1","kind":"ConfigMap","metadata":{"name":"s"}}"#,
            400,
            "BadRequest",
        ),
        case(
            "namespace differs from the path",
            "POST",
            cms,
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s","namespace":"kube-system"}}"#,
            400,
            "BadRequest",
        ),
        case(
            "wrong field type",
            "POST",
            cms,
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s"},"data":{"a":1}}"#,
            400,
            "BadRequest",
        ),
        case(
            "unsupported media type",
            "POST",
            cms,
            "text/plain",
            good,
            415,
            "UnsupportedMediaType",
        ),
        case(
            "garbage protobuf",
            "POST",
            cms,
            "application/vnd.kubernetes.protobuf",
            "k8s\0garbage",
            400,
            "BadRequest",
        ),
        case(
            "protobuf without its envelope",
            "POST",
            cms,
            "application/vnd.kubernetes.protobuf",
            "garbage",
            400,
            "BadRequest",
        ),
        case(
            "protobuf for a kind not read from protobuf yet",
            "POST",
            "/api/v1/namespaces/default/pods",
            "application/vnd.kubernetes.protobuf",
            b"k8s\0\x0a\x09\x0a\x02v1\x12\x03Pod\x12\x00".to_vec(),
            415,
            "UnsupportedMediaType",
        ),
        case(
            "unknown resource",
            "GET",
            "/api/v1/namespaces/default/widgets",
            "",
            "",
            404,
            "NotFound",
        ),
        case(
            "unknown group",
            "GET",
            "/apis/widgets.example.com/v1/widgets",
            "",
            "",
            404,
            "NotFound",
        ),
        case(
            "unknown version",
            "GET",
            "/apis/apps/v9/deployments",
            "",
            "",
            404,
            "NotFound",
        ),
        case(
            "unknown subresource",
            "GET",
            "/api/v1/namespaces/default/configmaps/x/status",
            "",
            "",
            404,
            "NotFound",
        ),
        case(
            "invalid label selector",
            "GET",
            &format!("{cms}?labelSelector=a%20in%20b"),
            "",
            "",
            400,
            "BadRequest",
        ),
        case(
            "invalid field selector",
            "GET",
            &format!("{cms}?fieldSelector=nonsense"),
            "",
            "",
            400,
            "BadRequest",
        ),
        case(
            "unsupported field selector",
            "GET",
            &format!("{cms}?fieldSelector=spec.x%3D1"),
            "",
            "",
            400,
            "BadRequest",
        ),
        case(
            "garbage continue token",
            "GET",
            &format!("{cms}?limit=1&continue=zzz"),
            "",
            "",
            400,
            "BadRequest",
        ),
        case(
            "non-numeric resourceVersion",
            "GET",
            &format!("{cms}?resourceVersion=abc"),
            "",
            "",
            400,
            "BadRequest",
        ),
        case(
            "bad limit",
            "GET",
            &format!("{cms}?limit=x"),
            "",
            "",
            400,
            "BadRequest",
        ),
        case(
            "watch from a non-numeric resourceVersion",
            "GET",
            &format!("{cms}?watch=true&resourceVersion=abc"),
            "",
            "",
            400,
            "BadRequest",
        ),
        case(
            "bad dryRun",
            "POST",
            &format!("{cms}?dryRun=Some"),
            "application/json",
            good,
            400,
            "BadRequest",
        ),
        case(
            "bad fieldValidation",
            "POST",
            &format!("{cms}?fieldValidation=Loose"),
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s"},"x":1}"#,
            400,
            "BadRequest",
        ),
        case(
            "invalid object",
            "POST",
            cms,
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"Not Valid"}}"#,
            422,
            "Invalid",
        ),
        case(
            "malformed merge patch",
            "PATCH",
            &format!("{cms}/target"),
            "application/merge-patch+json",
            "{",
            400,
            "BadRequest",
        ),
        case(
            "merge patch not an object",
            "PATCH",
            &format!("{cms}/target"),
            "application/merge-patch+json",
            "[]",
            400,
            "BadRequest",
        ),
        case(
            "malformed JSON patch",
            "PATCH",
            &format!("{cms}/target"),
            "application/json-patch+json",
            r#"[{"op":"add"}]"#,
            422,
            "Invalid",
        ),
        case(
            "JSON patch over 10,000 operations",
            "PATCH",
            &format!("{cms}/target"),
            "application/json-patch+json",
            many_ops,
            413,
            "RequestEntityTooLarge",
        ),
        case(
            "strategic patch without the merge key",
            "PATCH",
            &format!("{cms}/target"),
            "application/strategic-merge-patch+json",
            r#"{"metadata":{"ownerReferences":[{"name":"x"}]}}"#,
            422,
            "Invalid",
        ),
        case(
            "strategic patch with an unknown directive",
            "PATCH",
            &format!("{cms}/target"),
            "application/strategic-merge-patch+json",
            r#"{"metadata":{"$patch":"explode"}}"#,
            422,
            "Invalid",
        ),
        case(
            "malformed strategic patch",
            "PATCH",
            &format!("{cms}/target"),
            "application/strategic-merge-patch+json",
            "{\"metadata\":",
            400,
            "BadRequest",
        ),
        case(
            "server-side apply without a field manager",
            "PATCH",
            &format!("{cms}/target"),
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: target}\n",
            422,
            "Invalid",
        ),
        case(
            "server-side apply with a mismatched kind",
            "PATCH",
            &format!("{cms}/target?fieldManager=m"),
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: target}\n",
            400,
            "BadRequest",
        ),
        case(
            "server-side apply with a mismatched name",
            "PATCH",
            &format!("{cms}/target?fieldManager=m"),
            "application/apply-patch+yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\n",
            400,
            "BadRequest",
        ),
        case(
            "malformed server-side apply",
            "PATCH",
            &format!("{cms}/target?fieldManager=m"),
            "application/apply-patch+yaml",
            "metadata: [",
            400,
            "BadRequest",
        ),
        case(
            "patch of an unknown media type",
            "PATCH",
            &format!("{cms}/target"),
            "application/xml",
            "<x/>",
            415,
            "UnsupportedMediaType",
        ),
        case(
            "update with a mismatched name",
            "PUT",
            &format!("{cms}/target"),
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"other"}}"#,
            400,
            "BadRequest",
        ),
        case(
            "delete with malformed options",
            "DELETE",
            &format!("{cms}/target"),
            "application/json",
            "{",
            400,
            "BadRequest",
        ),
        case(
            "delete with a bad propagation policy",
            "DELETE",
            &format!("{cms}/target"),
            "application/json",
            r#"{"propagationPolicy":"Sideways"}"#,
            422,
            "Invalid",
        ),
        case(
            "delete with a failing precondition",
            "DELETE",
            &format!("{cms}/target"),
            "application/json",
            r#"{"preconditions":{"uid":"nope"}}"#,
            409,
            "Conflict",
        ),
        case(
            "create in a missing namespace",
            "POST",
            "/api/v1/namespaces/nowhere/configmaps",
            "application/json",
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"s"}}"#,
            404,
            "NotFound",
        ),
        case(
            "method not allowed",
            "PUT",
            cms,
            "application/json",
            good,
            405,
            "MethodNotAllowed",
        ),
    ];
    c.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: target}\ndata: {k: v}\n");
    let before = c.kubectl(&["get", "cm", "-o", "json"]);
    for case in cases {
        let mut req = Request::builder().method(case.method).uri(&case.path);
        if !case.content_type.is_empty() {
            req = req.header("Content-Type", case.content_type);
        }
        let req = req.body(case.body).unwrap();
        match client.request_text(req).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(
                    (s.code, s.reason.as_str()),
                    (case.code, case.reason),
                    "{}: {}",
                    case.what,
                    s.message
                );
                assert!(!s.message.is_empty(), "{}: empty message", case.what);
            }
            other => panic!(
                "{}: expected {} {}, got {other:?}",
                case.what, case.code, case.reason
            ),
        }
    }
    // Nothing was written, and the server still serves.
    let after = c.kubectl(&["get", "cm", "-o", "json"]);
    assert_eq!(before, after);
    let ready = client
        .request_text(Request::get("/readyz").body(Vec::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(ready, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_client_certificate_are_unauthorized() {
    let c = Cluster::start();
    let server = c.server_url();
    let ca = c.data_dir().join("tls/ca.crt");
    for (path, want) in [
        ("/api/v1/namespaces", "401"),
        ("/healthz", "200"),
        ("/version", "200"),
    ] {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                ca.to_str().unwrap(),
                &format!("{server}{path}"),
            ])
            .output()
            .expect("curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{path}");
    }
}
