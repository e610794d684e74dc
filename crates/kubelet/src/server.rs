//! The kubelet's HTTPS endpoint, which the API server proxies `pods/log`, `exec`, `attach` and
//! `portforward` to: logs are read from the container's CRI log file here; exec, attach and
//! port-forward ask CRI for a streaming URL and splice the caller's upgraded connection to it.
//!
//! Paths, as upstream's kubelet serves them: `/containerLogs/{ns}/{pod}/{container}`,
//! `/exec|attach/{ns}/{pod}/{container}?command=..&stdin=..`, `/portForward/{ns}/{pod}`,
//! `/healthz`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::cri;
use crate::logs;
use crate::pods::{Kubelet, LABEL_CONTAINER, LABEL_NAME, LABEL_NAMESPACE};

type Body = streaming::Body;

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": message, "reason": reason, "code": code});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Starts the server on `ip:port` (0 = any free port); returns the port and the serving task.
pub async fn start(
    k: Arc<Kubelet>,
    ip: IpAddr,
    port: u16,
    client_ca_pem: &str,
) -> anyhow::Result<(u16, impl std::future::Future<Output = ()>)> {
    let mut params = rcgen::CertificateParams::new(vec![k.node.clone()])?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_client_cert_verifier(client_verifier(client_ca_pem)?)
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    // With port 0, the port of the last run if it is still free: the Node keeps its endpoint.
    let saved = k.layout.dir.join("kubelet.port");
    let any = IpAddr::from([0, 0, 0, 0]);
    let listener = match std::fs::read_to_string(&saved)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .filter(|_| port == 0)
    {
        Some(p) => match tokio::net::TcpListener::bind(SocketAddr::new(any, p)).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind(SocketAddr::new(any, 0)).await?,
        },
        None => tokio::net::TcpListener::bind(SocketAddr::new(any, port)).await?,
    };
    let port = listener.local_addr()?.port();
    let _ = std::fs::write(&saved, port.to_string());
    let serve = async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, k) = (acceptor.clone(), k.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let k = k.clone();
                    async move { Ok::<_, Infallible>(route(k, req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    };
    Ok((port, serve))
}

/// Only callers with a client certificate from the cluster CA (the API server) get in.
fn client_verifier(
    ca_pem: &str,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    Ok(rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?)
}

async fn route(k: Arc<Kubelet>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["healthz"] => Response::new(Full::new(Bytes::from_static(b"ok")).boxed()),
        ["containerLogs", ns, pod, container] => {
            match container_logs(&k, ns, pod, container, &query).await {
                Ok(r) => r,
                Err(e) => e,
            }
        }
        [verb @ ("exec" | "attach"), ns, pod, container] => {
            let verb = verb.to_string();
            match stream_url(&k, &verb, ns, pod, container, &query).await {
                Ok(url) => forward(req, &url).await,
                Err(e) => e,
            }
        }
        ["portForward", ns, pod] => match port_forward_url(&k, ns, pod).await {
            Ok(url) => forward(req, &url).await,
            Err(e) => e,
        },
        _ => status(
            404,
            "NotFound",
            &format!("the server could not find {path}"),
        ),
    }
}

async fn forward(req: Request<Incoming>, url: &str) -> Response<Body> {
    let Ok(target) = url.parse::<http::Uri>() else {
        return status(
            500,
            "InternalError",
            &format!("runtime gave a bad URL {url}"),
        );
    };
    match streaming::proxy(req, &target, None).await {
        Ok(r) => r,
        Err(e) => status(500, "InternalError", &e.to_string()),
    }
}

/// The newest container (or the one before it, for `previous`) named `container` of pod
/// `ns/pod`.
async fn find_container(
    k: &Kubelet,
    ns: &str,
    pod: &str,
    container: &str,
    previous: bool,
) -> Result<cri::ContainerStatus, Response<Body>> {
    let list = k
        .cri
        .containers(cri::ContainerFilter {
            label_selector: [
                (LABEL_NAMESPACE.to_string(), ns.to_string()),
                (LABEL_NAME.to_string(), pod.to_string()),
                (LABEL_CONTAINER.to_string(), container.to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .map_err(|e| status(500, "InternalError", &e.to_string()))?;
    let mut list: Vec<cri::Container> = list;
    list.sort_by_key(|b| std::cmp::Reverse(b.created_at));
    let pick = if previous { list.get(1) } else { list.first() };
    let Some(c) = pick else {
        let msg = if previous {
            format!("previous terminated container \"{container}\" in pod \"{pod}\" not found")
        } else {
            format!(
                "container \"{container}\" in pod \"{pod}\" is waiting to start: ContainerCreating"
            )
        };
        return Err(status(400, "BadRequest", &msg));
    };
    k.cri
        .container_status(&c.id)
        .await
        .map_err(|e| status(500, "InternalError", &e.to_string()))?
        .ok_or_else(|| status(404, "NotFound", "container is gone"))
}

async fn container_logs(
    k: &Kubelet,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
) -> Result<Response<Body>, Response<Body>> {
    let q = logs::Query::parse(query).map_err(|m| status(400, "BadRequest", &m))?;
    let c = find_container(k, ns, pod, container, q.previous).await?;
    let path = c.log_path.clone();
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| status(404, "NotFound", &format!("log file {path}: {e}")))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .await
        .map_err(|e| status(500, "InternalError", &e.to_string()))?;
    let mut partial = String::new();
    let (lines, used) = logs::parse(&data, &mut partial);
    let mut first = String::new();
    for l in logs::select(&q, lines) {
        first.push_str(&q.render(&l));
    }
    let mut sent = 0usize;
    let limit = q.limit_bytes.unwrap_or(usize::MAX);
    let clip = move |s: String, sent: &mut usize| -> Option<Bytes> {
        if *sent >= limit {
            return None;
        }
        let take = s.len().min(limit - *sent);
        *sent += take;
        Some(Bytes::from(s.into_bytes()[..take].to_vec()))
    };
    let first = clip(first, &mut sent).unwrap_or_default();
    let text_plain = |r: &mut Response<Body>| {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
    };
    if !q.follow || c.state != cri::ContainerState::ContainerRunning as i32 {
        let mut r = Response::new(Full::new(first).boxed());
        text_plain(&mut r);
        return Ok(r);
    }
    // Follow: send what is there, then new lines as they are written, until the container
    // stops (and its last lines are out) or the caller goes away.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let id = c.id.clone();
    let cri = k.cri.clone();
    tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return;
        }
        let mut offset = used as u64;
        let mut partial = partial;
        let mut sent = sent;
        let mut idle = 0u32;
        loop {
            let mut buf = Vec::new();
            if file.seek(std::io::SeekFrom::Start(offset)).await.is_err()
                || file.read_to_end(&mut buf).await.is_err()
            {
                return;
            }
            let (lines, used) = logs::parse(&buf, &mut partial);
            offset += used as u64;
            for l in lines {
                let Some(b) = clip(q.render(&l), &mut sent) else {
                    return;
                };
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            if used == 0 {
                idle += 1;
                // Every second or so, check that the container is still running.
                if idle.is_multiple_of(10) {
                    let running = cri
                        .container_status(&id)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|s| s.state == cri::ContainerState::ContainerRunning as i32);
                    if !running {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            } else {
                idle = 0;
            }
        }
    });
    let stream = tokio_stream_from(rx);
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    text_plain(&mut r);
    Ok(r)
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))))
}

fn flag(query: &str, name: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == name && (v == "true" || v == "1"))
}

async fn stream_url(
    k: &Kubelet,
    verb: &str,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
) -> Result<String, Response<Body>> {
    let c = find_container(k, ns, pod, container, false).await?;
    if c.state != cri::ContainerState::ContainerRunning as i32 {
        return Err(status(
            400,
            "BadRequest",
            &format!("container {container} is not running"),
        ));
    }
    let (tty, stdin, stdout, stderr) = (
        flag(query, "tty"),
        flag(query, "stdin"),
        flag(query, "stdout"),
        flag(query, "stderr"),
    );
    let r = if verb == "exec" {
        let cmd: Vec<String> = form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.into_owned())
            .collect();
        if cmd.is_empty() {
            return Err(status(
                400,
                "BadRequest",
                "you must specify at least one command for the container",
            ));
        }
        k.cri
            .exec_url(cri::ExecRequest {
                container_id: c.id,
                cmd,
                tty,
                stdin,
                stdout,
                stderr: stderr && !tty,
            })
            .await
    } else {
        k.cri
            .attach_url(cri::AttachRequest {
                container_id: c.id,
                stdin,
                tty,
                stdout,
                stderr: stderr && !tty,
            })
            .await
    };
    r.map_err(|e| status(500, "InternalError", &e.to_string()))
}

async fn port_forward_url(k: &Kubelet, ns: &str, pod: &str) -> Result<String, Response<Body>> {
    let boxes = k
        .cri
        .sandboxes(&[(LABEL_NAMESPACE, ns), (LABEL_NAME, pod)])
        .await
        .map_err(|e| status(500, "InternalError", &e.to_string()))?;
    let b = boxes
        .iter()
        .filter(|b| b.state == cri::PodSandboxState::SandboxReady as i32)
        .max_by_key(|b| b.created_at)
        .ok_or_else(|| {
            status(
                404,
                "NotFound",
                &format!("pod {ns}/{pod} has no running sandbox"),
            )
        })?;
    k.cri
        .port_forward_url(&b.id)
        .await
        .map_err(|e| status(500, "InternalError", &e.to_string()))
}
