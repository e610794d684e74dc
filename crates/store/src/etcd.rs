//! The etcd backend: the same [`Store`] promises over etcd's v3 gRPC API (etcd-client).
//!
//! Mapping:
//! - A revision *is* etcd's revision; a value's `mod_revision` is etcd's.
//! - `create` is a transaction `create_revision(key) == 0 ? put : get`; `update` and a guarded
//!   `delete` compare `mod_revision(key) == expected`, and read the key back in the else branch so
//!   a failed compare says whether the key is gone or moved on.
//! - Reads are linearizable (etcd's default), so a read after an acknowledged write sees it.
//! - `watch` is an etcd watch from `after + 1` with `prev_kv` and progress notifications;
//!   a start that etcd has compacted fails up front with `Compacted`.
//! - `compact` is etcd's (non-physical) compaction. etcd does not report its compacted revision
//!   on demand; the store remembers the newest it has seen (its own compactions, compacted errors,
//!   a probe at connect time). Being behind is harmless: a watch or read that is too old still
//!   fails with `Compacted` when etcd answers.
//! - Every unary call has a deadline; a cluster without quorum answers `Unavailable` within it,
//!   never a false success.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};

use crate::{
    check_size, Event, EventKind, KeyValue, RangeRequest, RangeResponse, RangeStream, Result,
    Revision, Store, StoreError, WatchStream, MAX_VALUE_BYTES,
};

/// How to reach an etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// PEM CA bundle to verify the members (https only).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate and key, when the cluster asks for one.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// The longest a single request may take before it fails with `Unavailable`.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    /// Parse `http(s)://HOST:PORT[,HOST:PORT...]` (later members may omit the scheme).
    pub fn from_url(url: &str) -> Result<Self> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| StoreError::Backend(format!("etcd endpoint {url:?} has no scheme")))?;
        if scheme != "http" && scheme != "https" {
            return Err(StoreError::Backend(format!(
                "etcd endpoint {url:?}: scheme must be http or https"
            )));
        }
        let mut endpoints = Vec::new();
        for member in rest.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            let member = member.trim_end_matches('/');
            let hostport = member.split_once("://").map(|(_, h)| h).unwrap_or(member);
            if !hostport.contains(':') {
                return Err(StoreError::Backend(format!(
                    "etcd endpoint {member:?} needs HOST:PORT"
                )));
            }
            endpoints.push(format!("{scheme}://{hostport}"));
        }
        if endpoints.is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd endpoint {url:?} names no member"
            )));
        }
        Ok(EtcdConfig {
            endpoints,
            ca_file: None,
            cert_file: None,
            key_file: None,
            request_timeout: Duration::from_secs(10),
        })
    }
}

struct Shared {
    /// One client per member; requests go to `current` and move on when it cannot be reached.
    clients: Vec<Client>,
    current: AtomicUsize,
    timeout: Duration,
    compacted: AtomicI64,
}

/// A store on an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    shared: Arc<Shared>,
}

/// The end of the key range that holds every key starting with `prefix` (etcd's convention).
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix (or all 0xff): every key.
    vec![0]
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: Revision(kv.create_revision()),
        mod_revision: Revision(kv.mod_revision()),
    }
}

impl EtcdStore {
    /// Connect to the cluster and check that it answers.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if config.endpoints.iter().any(|e| e.starts_with("https://")) {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                let pem = std::fs::read(ca).map_err(|e| {
                    StoreError::Backend(format!("reading --datastore-cafile {}: {e}", ca.display()))
                })?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            match (&config.cert_file, &config.key_file) {
                (Some(cert), Some(key)) => {
                    let read = |p: &std::path::Path| {
                        std::fs::read(p).map_err(|e| {
                            StoreError::Backend(format!("reading {}: {e}", p.display()))
                        })
                    };
                    tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Backend(
                        "--datastore-certfile and --datastore-keyfile go together".into(),
                    ))
                }
            }
            options = options.with_tls(tls);
        }
        // A client per member rather than one balanced channel: a balanced channel keeps
        // sending to a dead member, so half the requests would fail while one member is down.
        let mut clients = Vec::new();
        for endpoint in &config.endpoints {
            let client = Client::connect([endpoint], Some(options.clone()))
                .await
                .map_err(|e| StoreError::Unavailable(format!("etcd {endpoint}: {e}")))?;
            clients.push(client);
        }
        let store = EtcdStore {
            shared: Arc::new(Shared {
                clients,
                current: AtomicUsize::new(0),
                timeout: config.request_timeout,
                compacted: AtomicI64::new(0),
            }),
        };
        store.current_revision().await?;
        store.probe_compacted().await;
        Ok(store)
    }

    /// Run one call with the store's deadline, on the member in use or, when that one cannot
    /// take the request (unreachable, or without a leader), on the next; map the error.
    /// A request is retried elsewhere only when it was certainly not carried out.
    async fn call<T, F, Fut>(&self, what: &str, at: Option<i64>, mut f: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let attempts = async {
            let n = self.shared.clients.len();
            let start = self.shared.current.load(Ordering::Relaxed);
            let mut best: Option<etcd_client::Error> = None;
            for i in 0..n {
                let idx = (start + i) % n;
                match f(self.shared.clients[idx].clone()).await {
                    Ok(v) => {
                        if idx != start {
                            self.shared.current.store(idx, Ordering::Relaxed);
                        }
                        return Ok(v);
                    }
                    Err(e) => match not_carried_out(&e) {
                        NotCarriedOut::Unreachable => {
                            best.get_or_insert(e);
                        }
                        NotCarriedOut::NoLeader => best = Some(e),
                        NotCarriedOut::Unknown => return Err(e),
                    },
                }
            }
            Err(best.expect("at least one member"))
        };
        match tokio::time::timeout(self.shared.timeout, attempts).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd {what}: no answer within {:?} (the outcome of a write is unknown)",
                self.shared.timeout
            ))),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.map_error(what, e, at)),
        }
    }

    fn map_error(&self, what: &str, e: etcd_client::Error, at: Option<i64>) -> StoreError {
        let message = match &e {
            etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
            other => other.to_string(),
        };
        if message.contains("required revision has been compacted") {
            let compacted = self.shared.compacted.load(Ordering::SeqCst);
            return StoreError::Compacted {
                requested: Revision(at.unwrap_or(0)),
                compacted: Revision(compacted.max(at.unwrap_or(0) + 1)),
            };
        }
        if message.contains("request is too large") {
            return StoreError::TooLarge {
                size: 0,
                limit: MAX_VALUE_BYTES,
            };
        }
        let unavailable = match &e {
            etcd_client::Error::GRpcStatus(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(format!("etcd {what}: {message}"))
        } else {
            StoreError::Backend(format!("etcd {what}: {message}"))
        }
    }

    /// Learn the compacted revision: a watch from revision 1 is refused with it.
    async fn probe_compacted(&self) {
        let probe = async {
            let mut stream = self
                .call("watch", None, |mut c| async move {
                    c.watch(
                        "\0rkube-compaction-probe",
                        Some(WatchOptions::new().with_start_revision(1)),
                    )
                    .await
                })
                .await
                .ok()?;
            // The first message is the creation; a compacted start is cancelled right after.
            for _ in 0..2 {
                let msg = stream.message().await.ok()??;
                if msg.compact_revision() > 0 {
                    return Some(msg.compact_revision());
                }
                if msg.created() && !msg.canceled() {
                    // Created without complaint: the history reaches back to revision 1.
                    return Some(0);
                }
            }
            Some(0)
        };
        if let Ok(Some(rev)) = tokio::time::timeout(Duration::from_secs(2), probe).await {
            self.note_compacted(rev);
        }
    }

    fn note_compacted(&self, rev: i64) {
        self.shared.compacted.fetch_max(rev, Ordering::SeqCst);
    }

    /// A failed compare: tell apart a missing key from one that moved on.
    fn failed_compare(key: &str, expected: Revision, responses: &[TxnOpResponse]) -> StoreError {
        let current = responses.iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        });
        match current {
            None => StoreError::NotFound {
                key: key.to_string(),
            },
            Some(actual) => StoreError::Conflict {
                key: key.to_string(),
                expected,
                actual: Revision(actual),
            },
        }
    }

    async fn range_at(
        &self,
        from: Vec<u8>,
        end: Vec<u8>,
        limit: i64,
        revision: i64,
    ) -> Result<etcd_client::GetResponse> {
        // etcd refuses an empty key: "\0" is the smallest one.
        let from = if from.is_empty() { vec![0] } else { from };
        let mut options = GetOptions::new().with_range(end).with_limit(limit);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let res = self
            .call("range", Some(revision), |mut c| {
                let (from, options) = (from.clone(), options.clone());
                async move { c.get(from, Some(options)).await }
            })
            .await;
        match res {
            Ok(r) => Ok(r),
            Err(err) => {
                if let StoreError::Backend(m) = &err {
                    if m.contains("future revision") {
                        let current = self.current_revision().await.unwrap_or_default();
                        return Err(StoreError::FutureRevision {
                            requested: Revision(revision),
                            current,
                        });
                    }
                }
                Err(err)
            }
        }
    }
}

enum NotCarriedOut {
    /// The member could not be reached: the request never left.
    Unreachable,
    /// The member has no leader and refused the request.
    NoLeader,
    /// Anything else: an answer, or an outcome we cannot know.
    Unknown,
}

fn not_carried_out(e: &etcd_client::Error) -> NotCarriedOut {
    let text = match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => other.to_string(),
    };
    let text = text.to_ascii_lowercase();
    if text.contains("no leader") {
        NotCarriedOut::NoLeader
    } else if text.contains("tcp connect") || text.contains("connection refused") {
        NotCarriedOut::Unreachable
    } else {
        NotCarriedOut::Unknown
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    Revision(h.map(|h| h.revision()).unwrap_or_default())
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let resp = self
            .call("get", None, |mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(to_kv))
    }

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        let from = match &req.start_after {
            Some(s) if s.as_str() >= req.prefix.as_str() => {
                let mut k = s.as_bytes().to_vec();
                k.push(0);
                k
            }
            _ => req.prefix.as_bytes().to_vec(),
        };
        let at = req.revision.map(|r| r.0).unwrap_or(0);
        let resp = self
            .range_at(from, range_end(&req.prefix), req.limit as i64, at)
            .await?;
        let revision = if at > 0 {
            Revision(at)
        } else {
            header_revision(resp.header())
        };
        Ok(RangeResponse {
            kvs: resp.kvs().iter().map(to_kv).collect(),
            more: resp.more(),
            revision,
        })
    }

    async fn range_stream(&self, prefix: &str, chunk: usize) -> Result<RangeStream> {
        // Page through one revision: the first page fixes it, the rest read at it.
        let chunk = chunk.max(1) as i64;
        let end = range_end(prefix);
        let first = self
            .range_at(prefix.as_bytes().to_vec(), end.clone(), chunk, 0)
            .await?;
        let revision = header_revision(first.header());
        let store = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<KeyValue>>>(4);
        tokio::spawn(async move {
            let mut page = first;
            loop {
                let kvs: Vec<KeyValue> = page.kvs().iter().map(to_kv).collect();
                let next = kvs.last().map(|kv| {
                    let mut k = kv.key.as_bytes().to_vec();
                    k.push(0);
                    k
                });
                let more = page.more();
                if !kvs.is_empty() && tx.send(Ok(kvs)).await.is_err() {
                    return;
                }
                let Some(next) = next.filter(|_| more) else {
                    return;
                };
                match store.range_at(next, end.clone(), chunk, revision.0).await {
                    Ok(p) => page = p,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(RangeStream {
            revision,
            chunks: Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<Revision> {
        check_size(&value)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.to_vec(), None)]);
        let resp = self
            .call("create", None, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
            });
        }
        Ok(header_revision(resp.header()))
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<Revision> {
        check_size(&value)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected.0)])
            .and_then([TxnOp::put(key, value.to_vec(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .call("update", None, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(Self::failed_compare(key, expected, &resp.op_responses()));
        }
        Ok(header_revision(resp.header()))
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let guard = match expected {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev.0),
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::delete(
                key,
                Some(etcd_client::DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .call("delete", None, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let ops = resp.op_responses();
        if !resp.succeeded() {
            return Err(Self::failed_compare(
                key,
                expected.unwrap_or_default(),
                &ops,
            ));
        }
        let prev = ops.iter().find_map(|r| match r {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().map(to_kv),
            _ => None,
        });
        let prev = prev.ok_or_else(|| StoreError::NotFound {
            key: key.to_string(),
        })?;
        Ok((header_revision(resp.header()), prev))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // Fail fast on a compacted start: a read at that revision is refused the same way.
        if after.0 > 0 {
            match self
                .range_at(prefix.as_bytes().to_vec(), range_end(prefix), 1, after.0)
                .await
            {
                Ok(_) | Err(StoreError::FutureRevision { .. }) => {}
                Err(StoreError::Compacted { compacted, .. }) => {
                    return Err(StoreError::Compacted {
                        requested: after,
                        compacted,
                    })
                }
                Err(e) => return Err(e),
            }
        } else if self.shared.compacted.load(Ordering::SeqCst) > 0 {
            return Err(StoreError::Compacted {
                requested: after,
                compacted: Revision(self.shared.compacted.load(Ordering::SeqCst)),
            });
        }
        let options = WatchOptions::new()
            .with_range(range_end(prefix))
            .with_start_revision(after.0 + 1)
            .with_prev_key()
            .with_progress_notify();
        let stream = self
            .call("watch", None, |mut c| {
                let options = options.clone();
                async move { c.watch(prefix.as_bytes().to_vec(), Some(options)).await }
            })
            .await?;
        let store = self.clone();
        struct St {
            store: EtcdStore,
            stream: etcd_client::WatchStream,
            pending: std::collections::VecDeque<Event>,
            after: i64,
            done: bool,
        }
        let st = St {
            store,
            stream,
            pending: Default::default(),
            after: after.0,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(ev) = st.pending.pop_front() {
                    return Some((Ok(ev), st));
                }
                if st.done {
                    return None;
                }
                let msg = match st.stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        st.done = true;
                        return Some((
                            Err(StoreError::Unavailable("etcd watch stream ended".into())),
                            st,
                        ));
                    }
                    Err(e) => {
                        st.done = true;
                        let err = st.store.map_error("watch", e, None);
                        return Some((Err(err), st));
                    }
                };
                if msg.compact_revision() > 0 {
                    st.store.note_compacted(msg.compact_revision());
                    st.done = true;
                    return Some((
                        Err(StoreError::Compacted {
                            requested: Revision(st.after),
                            compacted: Revision(msg.compact_revision()),
                        }),
                        st,
                    ));
                }
                if msg.canceled() {
                    st.done = true;
                    return Some((
                        Err(StoreError::Unavailable(format!(
                            "etcd cancelled the watch: {}",
                            msg.cancel_reason()
                        ))),
                        st,
                    ));
                }
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let prev = ev.prev_kv().map(to_kv);
                    let event = match ev.event_type() {
                        etcd_client::EventType::Put => {
                            let kv = to_kv(kv);
                            // A put that recreates a deleted key has no previous value.
                            let prev = prev.filter(|p| p.create_revision == kv.create_revision);
                            Event {
                                kind: EventKind::Put,
                                kv,
                                prev,
                            }
                        }
                        etcd_client::EventType::Delete => {
                            let last = prev.clone();
                            Event {
                                kind: EventKind::Delete,
                                kv: KeyValue {
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    value: last
                                        .as_ref()
                                        .map(|p| p.value.clone())
                                        .unwrap_or_default(),
                                    create_revision: last
                                        .as_ref()
                                        .map(|p| p.create_revision)
                                        .unwrap_or_default(),
                                    mod_revision: Revision(kv.mod_revision()),
                                },
                                prev,
                            }
                        }
                    };
                    st.after = event.revision().0;
                    st.pending.push_back(event);
                }
            }
        })))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let current = self.current_revision().await?;
        if revision > current {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current,
            });
        }
        let compacted = self.shared.compacted.load(Ordering::SeqCst);
        if revision.0 <= compacted {
            return Err(StoreError::Compacted {
                requested: revision,
                compacted: Revision(compacted),
            });
        }
        match self
            .call("compact", Some(revision.0), |mut c| async move {
                c.compact(revision.0, None).await
            })
            .await
        {
            Ok(_) => {
                self.note_compacted(revision.0);
                Ok(())
            }
            Err(StoreError::Compacted { .. }) => {
                // Someone (another API server) compacted further already.
                self.probe_compacted().await;
                Err(StoreError::Compacted {
                    requested: revision,
                    compacted: Revision(self.shared.compacted.load(Ordering::SeqCst)),
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        // A linearizable read of one (absent) key: its header carries the cluster's revision.
        let resp = self
            .call("revision", None, |mut c| async move {
                c.get(
                    "\0rkube-revision",
                    Some(GetOptions::new().with_count_only()),
                )
                .await
            })
            .await?;
        Ok(header_revision(resp.header()))
    }

    async fn compacted_revision(&self) -> Result<Revision> {
        Ok(Revision(self.shared.compacted.load(Ordering::SeqCst)))
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn range_end_increments_the_last_byte() {
        assert_eq!(range_end("/registry/pods/"), b"/registry/pods0".to_vec());
        assert_eq!(range_end(""), vec![0]);
        assert_eq!(range_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn endpoints_parse() {
        let c = EtcdConfig::from_url("http://127.0.0.1:2379,127.0.0.1:2380/").unwrap();
        assert_eq!(
            c.endpoints,
            vec!["http://127.0.0.1:2379", "http://127.0.0.1:2380"]
        );
        let c = EtcdConfig::from_url("https://a:1,https://b:2").unwrap();
        assert_eq!(c.endpoints, vec!["https://a:1", "https://b:2"]);
        assert!(EtcdConfig::from_url("127.0.0.1:2379").is_err());
        assert!(EtcdConfig::from_url("ftp://a:1").is_err());
        assert!(EtcdConfig::from_url("http://a").is_err());
        assert!(EtcdConfig::from_url("http://").is_err());
    }
}
