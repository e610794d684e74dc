//! apiserver: the cluster's only door. HTTPS (rustls, client certificates), the request pipeline
//! (authentication → authorization → admission), discovery, and one generic handler that serves
//! every kind in the registry from the revisioned store.
//!
//! What it is not: it does not choose a storage backend (the binary hands it a `dyn Store`), and
//! it runs no controllers: the scheduler, controllers and nodes reach it only over HTTP.

mod codec;
mod discovery;
mod handler;
mod metrics;
mod object;
mod pipeline;
mod protobuf;
mod proxy;
mod registry;
mod servicealloc;
mod strategy;
mod table;
mod tokens;
mod watch;
mod watchcache;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch as tokio_watch;

pub use pipeline::UserInfo;
pub use registry::KINDS;
pub use servicealloc::{ServiceNetwork, DEFAULT_NODE_PORT_RANGE, DEFAULT_SERVICE_CIDR};
pub use tokens::TokenSigner;

/// Shared by every request.
pub struct State {
    pub store: Arc<dyn Store>,
    pub cache: Arc<watchcache::WatchCache>,
    /// What admission last read (PriorityClasses, namespaces), at a watch cache generation.
    pub admission: std::sync::Mutex<AdmissionCache>,
    /// Signs and verifies service account tokens.
    pub signer: TokenSigner,
    pub shutdown: tokio_watch::Receiver<bool>,
    /// The token agents join with (`<data-dir>/token`): it authenticates as a node.
    pub node_token: std::sync::RwLock<Option<String>>,
    /// The TLS client used towards kubelets (with the API server's client certificate).
    pub kubelet_tls: std::sync::RwLock<Option<Arc<rustls::ClientConfig>>>,
    /// Service ClusterIPs and node ports.
    pub services: servicealloc::Allocator,
    /// What `/metrics` serves.
    pub metrics: metrics::Metrics,
}

/// Admission's copies of the objects it looked up: the PriorityClasses Priority admission
/// read and the namespaces NamespaceLifecycle read. Found objects only, so that one created a
/// moment ago is never refused from a stale "not found". Every change to a PriorityClass or a
/// namespace, by any writer, bumps the watch cache's admission generation, and a copy taken at
/// an older generation is dropped: as upstream's informer-backed admission, a copy lags a
/// change by no more than the watch cache does.
#[derive(Default)]
pub struct AdmissionCache {
    pub generation: u64,
    /// The global default class (None inside: there is none).
    pub default_priority: Option<Option<serde_json::Value>>,
    pub priority_by_name: HashMap<String, serde_json::Value>,
    /// Namespace name -> whether it is terminating.
    pub namespaces: HashMap<String, bool>,
}

impl AdmissionCache {
    /// The cache at `generation`, emptied first if it was filled at another one.
    pub fn at(
        cache: &std::sync::Mutex<AdmissionCache>,
        generation: u64,
    ) -> std::sync::MutexGuard<'_, AdmissionCache> {
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.generation != generation {
            *c = AdmissionCache {
                generation,
                ..Default::default()
            };
        }
        c
    }
}

/// A running API server.
pub struct ApiServer {
    pub local_addr: SocketAddr,
    state: Arc<State>,
    shutdown: tokio_watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
}

impl ApiServer {
    /// Bind `addr`, bootstrap the built-in namespaces, and start serving.
    pub async fn start(
        store: Arc<dyn Store>,
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        compaction_interval: Duration,
        signer: TokenSigner,
        service_network: ServiceNetwork,
    ) -> anyhow::Result<ApiServer> {
        let (shutdown_tx, shutdown_rx) = tokio_watch::channel(false);
        let cache = watchcache::WatchCache::start(store.clone(), shutdown_rx.clone()).await?;
        let state = Arc::new(State {
            store,
            cache,
            admission: Default::default(),
            signer,
            shutdown: shutdown_rx.clone(),
            node_token: Default::default(),
            kubelet_tls: Default::default(),
            services: servicealloc::Allocator::new(service_network),
            metrics: Default::default(),
        });
        handler::bootstrap(&state).await?;
        handler::restore_service_allocations(&state).await?;
        tokio::spawn(compactor(
            state.store.clone(),
            shutdown_rx.clone(),
            compaction_interval,
        ));
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let mut tls = tls;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let done = tokio::spawn(accept_loop(listener, acceptor, state.clone(), shutdown_rx));
        tracing::info!(%local_addr, "API server listening");
        Ok(ApiServer {
            local_addr,
            state,
            shutdown: shutdown_tx,
            done,
        })
    }

    /// Publish the `kubernetes` Service and its endpoints at `ip` and this server's port.
    pub async fn publish_self(&self, ip: std::net::IpAddr) -> anyhow::Result<()> {
        handler::publish_self(&self.state, ip, self.local_addr.port()).await
    }

    /// Stop accepting, end watches, let in-flight requests finish (bounded), then return.
    /// Present this client certificate (PEM chain and key) to kubelets.
    pub fn set_kubelet_client(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let cfg = streaming::tls_without_server_check(Some((chain, key)))?;
        if let Ok(mut t) = self.state.kubelet_tls.write() {
            *t = Some(Arc::new(cfg));
        }
        Ok(())
    }

    /// Accept `token` from agents joining as nodes (`rkube agent --token`).
    pub fn accept_node_token(&self, token: &str) {
        if let Ok(mut t) = self.state.node_token.write() {
            *t = Some(token.trim().to_string()).filter(|t| !t.is_empty());
        }
    }

    /// A way in for components running in this process, acting as `user`.
    pub fn local(&self, user: UserInfo) -> Local {
        Local {
            state: self.state.clone(),
            user: Arc::new(user),
        }
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.done.await;
    }
}

/// The API server for a component in the same process (`ApiServer::local`): each request goes
/// straight to the handler, which authorizes it as `user` and then serves it exactly as one
/// that came over HTTPS (admission, storage, watch), without a socket, TLS or HTTP framing.
/// Streaming subresources that upgrade the connection (exec, attach, port-forward) need one,
/// and are refused here.
#[derive(Clone)]
pub struct Local {
    state: Arc<State>,
    user: Arc<UserInfo>,
}

impl Local {
    pub async fn call(&self, req: http::Request<bytes::Bytes>) -> http::Response<handler::Body> {
        if req.headers().contains_key(http::header::UPGRADE) {
            return handler::error_response(&apimachinery::ApiError::bad_request(
                "upgrading a request (exec, attach, port-forward) needs a connection: in-process components cannot",
            ));
        }
        let req = req.map(|b| http_body_util::Either::Right(http_body_util::Full::new(b)));
        handler::handle(self.state.clone(), Some(self.user.clone()), req).await
    }
}

/// How often history is compacted by default, and so how much history (one to two intervals) is
/// kept for watchers that resume and lists that continue: upstream's API server uses 5 minutes.
pub const COMPACTION_INTERVAL: Duration = Duration::from_secs(300);

/// Every interval, compact the store to the revision it had one interval earlier.
async fn compactor(
    store: Arc<dyn Store>,
    mut shutdown: tokio_watch::Receiver<bool>,
    every: Duration,
) {
    let mut previous: Option<store::Revision> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Some(rev) = previous {
            match store.compact(rev).await {
                Ok(()) => tracing::debug!(revision = rev.0, "compacted"),
                // Already compacted that far (nothing was written): not an error.
                Err(store::StoreError::Compacted { .. }) => {}
                Err(e) => tracing::warn!(error = %e, "compaction failed"),
            }
        }
        previous = store.current_revision().await.ok();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    mut shutdown: tokio_watch::Receiver<bool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        let active = active.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let user = pipeline::authenticate_connection(tls.get_ref().1.peer_certificates());
            active.fetch_add(1, Ordering::SeqCst);
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    let user = user.clone();
                    let req = req.map(http_body_util::Either::Left);
                    async move {
                        Ok::<_, std::convert::Infallible>(handler::handle(state, user, req).await)
                    }
                });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            let conn = watcher.watch(conn.into_owned());
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(listener);
    // In-flight requests finish; watches have been told to end by the same shutdown signal.
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!(open = active.load(Ordering::SeqCst), "connections still open at shutdown");
        }
    }
}
