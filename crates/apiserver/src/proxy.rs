//! The pods' streaming subresources (`log`, `exec`, `attach`, `portforward`), proxied to the
//! kubelet of the pod's node at the address and port the Node reports, over TLS. Upgrades (SPDY,
//! WebSocket) pass through untouched (see the `streaming` crate); the kubelet answers errors
//! with a `Status`, which reaches the client as it is.

use std::sync::{Arc, OnceLock};

use apimachinery::ApiError;
use http::{Request, Response};
use serde_json::Value;

use crate::handler::{store_error, Body, RequestBody, Target};
use crate::registry::lookup;
use crate::State;

pub const SUBRESOURCES: [&str; 4] = ["log", "exec", "attach", "portforward"];

/// The API server's client certificate if it has one, else a client with none (kubelets that
/// check client certificates will refuse it).
fn tls(state: &State) -> Option<Arc<rustls::ClientConfig>> {
    static ANONYMOUS: OnceLock<Option<Arc<rustls::ClientConfig>>> = OnceLock::new();
    state
        .kubelet_tls
        .read()
        .ok()
        .and_then(|t| t.clone())
        .or_else(|| {
            ANONYMOUS
                .get_or_init(|| streaming::tls_without_server_check(None).ok().map(Arc::new))
                .clone()
        })
}

async fn object(
    state: &State,
    plural: &str,
    ns: Option<&str>,
    name: &str,
) -> Result<Value, ApiError> {
    let kind = lookup("", "v1", plural).ok_or_else(|| ApiError::internal("no such kind"))?;
    let kv = state
        .store
        .get(&kind.key(ns, name))
        .await
        .map_err(|e| store_error(kind, name, e))?
        .ok_or_else(|| ApiError::not_found(plural, name))?;
    serde_json::from_slice(&kv.value).map_err(|e| ApiError::internal(e.to_string()))
}

/// The container a request names, or the pod's only (or default) one.
fn container(pod: &Value, name: &str, asked: Option<&str>, sub: &str) -> Result<String, ApiError> {
    let names: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            pod["spec"]["initContainers"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .filter_map(|c| c["name"].as_str())
        .collect();
    match asked.filter(|s| !s.is_empty()) {
        Some(c) if names.contains(&c) => Ok(c.to_string()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None => {
            let app: Vec<&str> = pod["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str())
                .collect();
            if app.len() == 1 || sub != "log" {
                app.first()
                    .map(|s| s.to_string())
                    .ok_or_else(|| ApiError::bad_request(format!("pod {name} has no containers")))
            } else {
                Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    app.join(" ")
                )))
            }
        }
    }
}

pub async fn pod_stream(
    state: &State,
    target: &Target,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let ns = target.namespace.as_deref().unwrap_or("default");
    let name = target.name.as_deref().unwrap_or_default();
    let sub = target.sub.as_deref().unwrap_or_default();
    let pod = object(state, "pods", Some(ns), name).await?;
    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if node.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let asked = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.into_owned());
    let n = object(state, "nodes", None, node).await?;
    let addr = n["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .map(String::from);
    let port = n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .unwrap_or(10250);
    let Some(addr) = addr else {
        return Err(ApiError::new(
            503,
            "ServiceUnavailable",
            format!("node {node} reports no InternalIP address"),
        ));
    };
    let host = if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr
    };
    let path = match sub {
        "portforward" => format!("/portForward/{ns}/{name}"),
        _ => {
            let c = container(&pod, name, asked.as_deref(), sub)?;
            let verb = if sub == "log" { "containerLogs" } else { sub };
            format!("/{verb}/{ns}/{name}/{c}")
        }
    };
    let uri: http::Uri = format!("https://{host}:{port}{path}?{query}")
        .parse()
        .map_err(|e| ApiError::internal(format!("kubelet address: {e}")))?;
    streaming::proxy(req, &uri, tls(state)).await.map_err(|e| {
        ApiError::new(
            502,
            "InternalError",
            format!("error talking to the kubelet of node {node}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn container_choice() {
        let one = json!({"spec": {"containers": [{"name": "a"}]}});
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}], "initContainers": [{"name": "i"}]}});
        assert_eq!(container(&one, "p", None, "log").unwrap(), "a");
        assert_eq!(container(&two, "p", Some("i"), "log").unwrap(), "i");
        assert_eq!(container(&two, "p", None, "exec").unwrap(), "a");
        let e = container(&two, "p", None, "log").unwrap_err();
        assert_eq!(e.code, 400);
        assert!(e.message.contains("choose one of: [a b]"), "{}", e.message);
        assert_eq!(
            container(&one, "p", Some("zz"), "log").unwrap_err().code,
            400
        );
    }
}
