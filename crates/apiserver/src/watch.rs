//! The watch verb: a chunked stream of `{"type": ..., "object": ...}` lines.
//!
//! Start: with `resourceVersion` unset or "0" (or `sendInitialEvents=true`), the current state as
//! ADDED first, then changes after it; with N, every change after N. Objects that move into or
//! out of the selectors are ADDED or DELETED, as upstream's watch cache reports them.

use std::sync::Arc;
use std::time::Duration;

use apimachinery::ApiError;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use store::{EventKind, Revision};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::handler::{store_error, Body, Ctx};
use crate::object::Stored;
use crate::table::{self, IncludeObject};
use crate::watchcache::{from_store_event, CachedEvent, Subscription};

/// Upstream's default request timeout for watches (it adds jitter; we do not need to).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
const BOOKMARK_EVERY: Duration = Duration::from_secs(30);
/// Events already waiting for a watcher are sent together, up to about this many bytes.
const CHUNK_BYTES: usize = 256 * 1024;

enum Source {
    Cache(broadcast::Receiver<Arc<CachedEvent>>),
    Store(store::WatchStream),
}

impl Source {
    /// The next event, or None when the watch must end (lagged, closed, compacted).
    async fn next(&mut self) -> Option<Result<Arc<CachedEvent>, ApiError>> {
        match self {
            Source::Cache(rx) => match rx.recv().await {
                Ok(ev) => Some(Ok(ev)),
                Err(_) => None,
            },
            Source::Store(s) => match s.next().await {
                Some(Ok(ev)) => Some(Ok(Arc::new(from_store_event(&ev)))),
                Some(Err(e)) => Some(Err(ApiError::gone(e.to_string()))),
                None => None,
            },
        }
    }

    /// What `next` would return if it is ready now; `None` if it would have to wait.
    fn try_next(&mut self) -> Option<Option<Result<Arc<CachedEvent>, ApiError>>> {
        use broadcast::error::TryRecvError;
        match self {
            Source::Cache(rx) => match rx.try_recv() {
                Ok(ev) => Some(Some(Ok(ev))),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Lagged(_) | TryRecvError::Closed) => Some(None),
            },
            Source::Store(_) => self.next().now_or_never(),
        }
    }
}

struct Encoder {
    kind: &'static crate::registry::Kind,
    table: bool,
    include: IncludeObject,
    headers_sent: bool,
}

impl Encoder {
    /// Appends one event's line to `out`.
    fn append(&mut self, out: &mut Vec<u8>, ty: &str, obj: &Stored) {
        if self.table {
            out.extend_from_slice(&self.event(ty, obj));
            return;
        }
        // The common case: no parsing, the stored bytes go out as they are.
        out.reserve(obj.json.len() + 32);
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(ty.as_bytes());
        out.extend_from_slice(b"\",\"object\":");
        out.extend_from_slice(&obj.json);
        out.extend_from_slice(b"}\n");
    }

    fn event(&mut self, ty: &str, obj: &Stored) -> Bytes {
        if self.table {
            let t = table::table(
                self.kind,
                &[obj.value()],
                self.include,
                json!({"resourceVersion": obj.meta_str("resourceVersion")}),
                !self.headers_sent,
            );
            self.headers_sent = true;
            return line(&json!({"type": ty, "object": t}));
        }
        let mut b = Vec::new();
        self.append(&mut b, ty, obj);
        Bytes::from(b)
    }

    fn bookmark(&self, rv: i64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            &json!({"type": "BOOKMARK", "object": {"kind": self.kind.kind, "apiVersion": self.kind.api_version(), "metadata": meta}}),
        )
    }
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn error_event(e: &ApiError) -> Bytes {
    line(&json!({"type": "ERROR", "object": e.to_status()}))
}

pub async fn serve(ctx: &Ctx) -> Result<Response<Body>, ApiError> {
    let (labels, fields) = ctx.selectors()?;
    let timeout = match ctx.query.get("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
        ),
        None => DEFAULT_TIMEOUT,
    };
    let bookmarks = ctx.query.flag("allowWatchBookmarks");
    let send_initial = match ctx.query.get("sendInitialEvents") {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    };
    let rv_param = ctx.query.get("resourceVersion").map(String::from);
    let initial = match (send_initial, rv_param.as_deref()) {
        (Some(v), _) => v,
        (None, None | Some("0")) => true,
        (None, Some(_)) => false,
    };
    if send_initial == Some(true) && !bookmarks {
        return Err(ApiError::invalid(
            "ListOptions",
            "",
            vec![apimachinery::Cause::invalid(
                "allowWatchBookmarks",
                "false",
                "sendInitialEvents requires setting allowWatchBookmarks=true",
            )],
        ));
    }
    let mut encoder = Encoder {
        kind: ctx.kind,
        table: ctx.table,
        include: IncludeObject::parse(ctx.query.get("includeObject")),
        headers_sent: false,
    };
    let mut first: Vec<Bytes> = Vec::new();
    let from = if initial {
        let (items, rev, _) = ctx.list_objects().await?;
        for item in &items {
            first.push(encoder.event("ADDED", item));
        }
        if send_initial == Some(true) {
            first.push(encoder.bookmark(rev, true));
        }
        rev
    } else {
        let rv = rv_param.unwrap_or_default();
        rv.parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?
    };
    let compacted = ctx
        .state
        .store
        .compacted_revision()
        .await
        .map_err(|e| store_error(ctx.kind, "", e))?;
    let (replay, source) = if from < compacted.0 {
        first.push(error_event(&ApiError::gone(format!(
            "too old resource version: {from} ({})",
            compacted.0
        ))));
        (Vec::new(), None)
    } else {
        match ctx.state.cache.subscribe(&ctx.kind.prefix(None), from) {
            Subscription::Cached(replay, rx) => (replay, Some(Source::Cache(rx))),
            Subscription::TooOld => match ctx
                .state
                .store
                .watch(&ctx.kind.prefix(ctx.ns()), Revision(from))
                .await
            {
                Ok(s) => (Vec::new(), Some(Source::Store(s))),
                Err(e) => {
                    first.push(error_event(&store_error(ctx.kind, "", e)));
                    (Vec::new(), None)
                }
            },
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let prefix = ctx.kind.prefix(ctx.ns());
    let filter = Filter {
        ctx_kind: ctx.kind,
        labels,
        fields,
    };
    let mut shutdown = ctx.state.shutdown.clone();
    tokio::spawn(async move {
        for b in first {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let Some(mut source) = source else { return };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut last = from;
        let mut replay = replay.into_iter();
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            let ev = if let Some(ev) = replay.next() {
                ev
            } else {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = shutdown.changed() => return,
                    _ = tick.tick(), if bookmarks => {
                        if tx.send(encoder.bookmark(last, false)).await.is_err() { return; }
                        continue;
                    }
                    next = source.next() => match next {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => { let _ = tx.send(error_event(&e)).await; return; }
                        None => return,
                    },
                }
            };
            // This event and every one already waiting go out as one chunk: one wake-up of
            // the connection and one write for the lot, not one per event.
            let mut out = Vec::new();
            let mut next = Some(ev);
            let mut end = None;
            while let Some(ev) = next.take() {
                if ev.revision > last {
                    last = ev.revision;
                    if ev.key.starts_with(&prefix) {
                        if let Some((ty, obj)) = filter.translate(&ev) {
                            encoder.append(&mut out, ty, obj);
                        }
                    }
                }
                if out.len() >= CHUNK_BYTES {
                    break;
                }
                next = match replay.next() {
                    Some(ev) => Some(ev),
                    None => match source.try_next() {
                        None => None,
                        Some(Some(Ok(ev))) => Some(ev),
                        Some(Some(Err(e))) => {
                            end = Some(Some(e));
                            None
                        }
                        Some(None) => {
                            end = Some(None);
                            None
                        }
                    },
                };
            }
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return;
            }
            match end {
                None => {}
                Some(Some(e)) => {
                    let _ = tx.send(error_event(&e)).await;
                    return;
                }
                Some(None) => return,
            }
        }
    });
    let body = StreamBody::new(
        ReceiverStream::new(rx).map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))),
    );
    let mut r = Response::new(BodyExt::boxed(body));
    *r.status_mut() = StatusCode::OK;
    let ct = "application/json";
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(r)
}

struct Filter {
    ctx_kind: &'static crate::registry::Kind,
    labels: apimachinery::labels::Selector,
    fields: apimachinery::fields::FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Stored) -> bool {
        crate::object::matches(self.ctx_kind, obj, &self.labels, &self.fields)
    }

    /// The event type this watcher sees, if any.
    fn translate<'a>(&self, ev: &'a CachedEvent) -> Option<(&'static str, &'a Stored)> {
        match ev.kind {
            EventKind::Delete => self.matches(&ev.object).then_some(("DELETED", &ev.object)),
            EventKind::Put => {
                let now = self.matches(&ev.object);
                let before = ev.prev.as_ref().is_some_and(|p| self.matches(p));
                match (before, now) {
                    (true, true) => Some(("MODIFIED", &ev.object)),
                    (false, true) => Some(("ADDED", &ev.object)),
                    (true, false) => Some(("DELETED", &ev.object)),
                    (false, false) => None,
                }
            }
        }
    }
}
