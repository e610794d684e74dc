//! Upgrade-aware HTTP proxying for the streaming calls (logs, exec, attach, port-forward): the
//! API server proxies them to the pod's kubelet, the kubelet to the container runtime's
//! streaming server. Plain responses are streamed through; a `101 Switching Protocols` (SPDY or
//! WebSocket) is answered to the caller with the upstream's headers and the two connections are
//! spliced byte for byte, so whatever protocol the ends agree on passes untouched.
//!
//! Not here: routing, authentication, or knowledge of any Kubernetes object.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, BodyStream, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

pub type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad upstream address {0}")]
    Address(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS to {0}: {1}")]
    Tls(String, std::io::Error),
    #[error("talking to {0}: {1}")]
    Http(String, hyper::Error),
}

/// Headers that belong to one hop and are not passed on (but Upgrade and Connection are, for
/// upgrade requests: the far end must see them).
const HOP: [&str; 5] = [
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
];

/// Turns any body into ours: data frames pass, an upstream error ends the stream.
pub fn body_of(b: Incoming) -> Body {
    let s = BodyStream::new(b)
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| futures::future::ready(r.ok()))
        .map(Ok::<Frame<Bytes>, Infallible>);
    BodyExt::boxed(StreamBody::new(s))
}

/// Proxies `req` to `target` (scheme, host, port, path and query), over TLS when `tls` is given.
/// The caller's Authorization header is never passed on.
pub async fn proxy<B>(
    mut req: Request<B>,
    target: &Uri,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Response<Body>, Error>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let host = target
        .host()
        .ok_or_else(|| Error::Address(target.to_string()))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let port = target
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let wants_upgrade = req.headers().contains_key(header::UPGRADE);
    let downstream = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let shown = format!("{host}:{port}");
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| Error::Connect(shown.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    let out = outgoing(req, target, wants_upgrade);
    let resp = match tls {
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| Error::Address(host.clone()))?;
            let stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| Error::Tls(shown.clone(), e))?;
            send(stream, out, &shown).await?
        }
        None => send(tcp, out, &shown).await?,
    };
    let (parts, body) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let mut upstream_resp = Response::from_parts(parts.clone(), body);
        let upstream = hyper::upgrade::on(&mut upstream_resp);
        if let Some(downstream) = downstream {
            tokio::spawn(async move {
                match (downstream.await, upstream.await) {
                    (Ok(a), Ok(b)) => {
                        let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                    (a, b) => tracing::debug!(
                        downstream = a.is_ok(),
                        upstream = b.is_ok(),
                        "upgrade did not complete"
                    ),
                }
            });
        }
        let mut r = Response::new(BodyExt::boxed(http_body_util::Empty::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *r.headers_mut() = parts.headers;
        return Ok(r);
    }
    Ok(Response::from_parts(parts, body_of(body)))
}

fn outgoing<B>(req: Request<B>, target: &Uri, upgrade: bool) -> Request<B> {
    let (parts, body) = req.into_parts();
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = target
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    for (k, v) in parts.headers.iter() {
        let name = k.as_str();
        if HOP.contains(&name)
            || k == header::HOST
            || k == header::AUTHORIZATION
            || (!upgrade && (k == header::CONNECTION || k == header::UPGRADE))
        {
            continue;
        }
        out.headers_mut().append(k.clone(), v.clone());
    }
    if let Some(a) = target.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            out.headers_mut().insert(header::HOST, v);
        }
    }
    out
}

async fn send<I, B>(io: I, req: Request<B>, shown: &str) -> Result<Response<Incoming>, Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| Error::Http(shown.into(), e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| Error::Http(shown.into(), e))
}

/// A TLS client that accepts any server certificate: kubelets serve self-signed ones, and
/// upstream's API server does not check them either unless given a CA for them. `identity` is
/// the client certificate (chain, key) presented to the server.
pub fn tls_without_server_check(
    identity: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key),
        None => Ok(builder.with_no_client_auth()),
    }
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
