//! Routing and the generic verbs. One code path serves every kind: the registry says how.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use apimachinery::fields::FieldSelector;
use apimachinery::labels::Selector;
use apimachinery::{managed, patch, patch_meta, strategic, ApiError};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use store::{RangeRequest, Revision, StoreError};

use crate::codec::{self, Media, MAX_BODY_BYTES};
use crate::object::{self, decode, Stored};
use crate::pipeline::{self, Attributes, UserInfo};
use crate::registry::{lookup, Kind};
use crate::table::{self, IncludeObject};
use crate::{discovery, protobuf, servicealloc, strategy, watch, State};

pub type Body = BoxBody<Bytes, Infallible>;

/// A request's body: as it arrives on a connection, or whole from a component in this process
/// (`crate::Local`).
pub type RequestBody = Either<Incoming, Full<Bytes>>;

/// Applies a patch document to a value in place.
type Patcher<'a> = &'a (dyn Fn(&mut Value, &Value) -> Result<(), ApiError> + Sync);

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    json_bytes_response(code, serde_json::to_vec(v).unwrap_or_default())
}

/// A JSON body that is already serialised.
fn json_bytes_response(code: StatusCode, json: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(json));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(code, &e.to_status());
    if let Some(s) = e.details.retry_after_seconds {
        if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

fn text_response(code: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Map a storage error to the Status upstream would return.
pub fn store_error(kind: &Kind, name: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::AlreadyExists { .. } => {
            ApiError::already_exists(&kind.qualified(), name).on(kind.group, kind.plural, name)
        }
        StoreError::NotFound { .. } => {
            ApiError::not_found(&kind.qualified(), name).on(kind.group, kind.plural, name)
        }
        StoreError::Conflict { .. } => ApiError::conflict(
            &kind.qualified(),
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
        .on(kind.group, kind.plural, name),
        StoreError::Compacted { requested, compacted } => ApiError::gone(format!(
            "too old resource version: {requested} ({compacted})"
        )),
        StoreError::FutureRevision { .. } => ApiError::timeout("Too large resource version"),
        StoreError::TooLarge { .. } => ApiError::too_large("etcdserver: request is too large"),
        StoreError::Unavailable(_) => ApiError::new(503, "ServiceUnavailable", e.to_string()),
        StoreError::Closed | StoreError::Backend(_) => ApiError::internal(e.to_string()),
    }
}

/// Decoded query parameters (last value wins, as Go's `Get` returns the first: both rare).
pub struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        let mut m = HashMap::new();
        for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
            m.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
        Query(m)
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|s| !s.is_empty())
    }
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.get("dryRun") {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "Invalid dry run value: {other}: supported values: \"All\""
            ))),
        }
    }
}

fn accepts_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|part| part.contains("as=Table") && part.contains("g=meta.k8s.io"))
        })
}

fn accept(headers: &HeaderMap) -> String {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

pub async fn handle(
    state: Arc<State>,
    user: Option<Arc<UserInfo>>,
    req: Request<RequestBody>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::debug_span!("request", %method, %path);
    let mut counted = None;
    let response = match tracing::Instrument::instrument(
        route(state.clone(), user, req, &mut counted),
        span,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            if e.code >= 500 {
                tracing::warn!(%method, %path, code = e.code, message = %e.message, "request failed");
            }
            error_response(&e)
        }
    };
    if let Some(mut labels) = counted {
        labels.code = response.status().as_u16().to_string();
        state.metrics.request(labels);
    }
    response
}

/// Where a resource request points.
pub struct Target {
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

fn parse_target(group: &str, version: &str, segs: &[&str]) -> Result<Target, ApiError> {
    let nf = ApiError::not_found_path;
    let (namespace, rest) = if segs.len() >= 3
        && segs[0] == "namespaces"
        && lookup(group, version, segs[2]).is_some_and(|k| k.namespaced)
    {
        (Some(segs[1].to_string()), &segs[2..])
    } else {
        (None, segs)
    };
    let plural = rest.first().ok_or_else(nf)?;
    let kind = lookup(group, version, plural).ok_or_else(nf)?;
    if rest.len() > 3 {
        return Err(nf());
    }
    let name = rest.get(1).map(|s| s.to_string());
    let sub = rest.get(2).map(|s| s.to_string());
    if let Some(s) = &sub {
        let finalize = kind.plural == "namespaces" && s == "finalize";
        if !(finalize || kind.subresources().contains(&s.as_str())) {
            return Err(nf());
        }
    }
    if name.as_deref() == Some("") {
        return Err(nf());
    }
    Ok(Target {
        kind,
        namespace,
        name,
        sub,
    })
}

async fn route(
    state: Arc<State>,
    user: Option<Arc<UserInfo>>,
    req: Request<RequestBody>,
    counted: &mut Option<crate::metrics::RequestLabels>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    if pipeline::is_public(&path) {
        return Ok(match path.as_str() {
            "/version" | "/version/" => json_response(StatusCode::OK, &discovery::version()),
            _ => text_response(StatusCode::OK, "ok"),
        });
    }
    let headers = req.headers().clone();
    let user = match user {
        Some(u) => u,
        None => pipeline::authenticate_token(&state, &headers).await?,
    };
    let user = pipeline::impersonate(user, &headers)?;
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get_only = |r: Response<Body>| -> Result<Response<Body>, ApiError> {
        if req.method() != Method::GET {
            return Err(ApiError::method_not_allowed(req.method().as_str()));
        }
        Ok(r)
    };
    let aggregated = |legacy: bool| {
        let mut r = json_response(StatusCode::OK, &discovery::aggregated(legacy));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(discovery::AGGREGATED_CONTENT_TYPE),
        );
        r
    };
    let nf = ApiError::not_found_path;
    match segs.as_slice() {
        ["api"] => {
            return get_only(if discovery::wants_aggregated(&accept(&headers)) {
                aggregated(true)
            } else {
                json_response(StatusCode::OK, &discovery::api_versions())
            })
        }
        ["apis"] => {
            return get_only(if discovery::wants_aggregated(&accept(&headers)) {
                aggregated(false)
            } else {
                json_response(StatusCode::OK, &discovery::api_group_list())
            })
        }
        ["apis", g] => {
            return get_only(json_response(
                StatusCode::OK,
                &discovery::api_group(g).ok_or_else(nf)?,
            ))
        }
        ["api", v] => {
            return get_only(json_response(
                StatusCode::OK,
                &discovery::resource_list("", v).ok_or_else(nf)?,
            ))
        }
        ["apis", g, v] => {
            return get_only(json_response(
                StatusCode::OK,
                &discovery::resource_list(g, v).ok_or_else(nf)?,
            ))
        }
        ["metrics"] => {
            let mut r = Response::new(full(state.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return get_only(r);
        }
        ["openapi", "v3"] => {
            return get_only(json_response(
                StatusCode::OK,
                &discovery::openapi_v3_index(),
            ))
        }
        ["openapi", "v3", "api", v] => {
            return get_only(json_bytes_response(
                StatusCode::OK,
                discovery::openapi_v3_gv("", v).ok_or_else(nf)?,
            ))
        }
        ["openapi", "v3", "apis", g, v] => {
            return get_only(json_bytes_response(
                StatusCode::OK,
                discovery::openapi_v3_gv(g, v).ok_or_else(nf)?,
            ))
        }
        _ => {}
    }
    let target = match segs.as_slice() {
        ["api", v, rest @ ..] if !rest.is_empty() => parse_target("", v, rest)?,
        ["apis", g, v, rest @ ..] if !rest.is_empty() => parse_target(g, v, rest)?,
        _ => return Err(nf()),
    };
    let query = Query::parse(req.uri().query());
    let method = req.method().clone();
    let verb = match (&method, &target.name) {
        (&Method::GET, None) if query.flag("watch") => "watch",
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => return Err(ApiError::method_not_allowed(method.as_str())),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    *counted = Some(crate::metrics::RequestLabels {
        verb: crate::metrics::canonical_verb(verb, content_type.as_deref()),
        group: target.kind.group,
        version: target.kind.version,
        resource: target.kind.plural,
        subresource: target.sub.clone().unwrap_or_default(),
        code: String::new(),
    });
    pipeline::authorize(
        &user,
        &Attributes {
            verb,
            kind: target.kind,
            namespace: target.namespace.as_deref(),
            subresource: target.sub.as_deref(),
        },
    )?;
    if target.kind.namespaced && target.namespace.is_none() && !matches!(verb, "list" | "watch") {
        return Err(ApiError::method_not_allowed(method.as_str()));
    }
    if target.kind.plural == "pods"
        && target
            .sub
            .as_deref()
            .is_some_and(|s| crate::proxy::SUBRESOURCES.contains(&s))
    {
        return crate::proxy::pod_stream(&state, &target, req).await;
    }
    let body = if matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        read_body(req.into_body()).await?
    } else {
        Bytes::new()
    };
    let manager = query
        .get("fieldManager")
        .map(String::from)
        .unwrap_or_else(|| {
            headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .and_then(|ua| ua.split('/').next())
                .filter(|m| !m.is_empty())
                .unwrap_or("unknown")
                .to_string()
        });
    let ctx = Ctx {
        manager,
        state,
        kind: target.kind,
        namespace: target.namespace.clone(),
        query,
        table: accepts_table(&headers),
        written: Default::default(),
    };
    let name = target.name.clone().unwrap_or_default();
    if target.kind.review {
        if verb != "create" || target.name.is_some() {
            return Err(ApiError::method_not_allowed(method.as_str()));
        }
        let (obj, _) = ctx.decode_object(&body, content_type.as_deref())?;
        return Ok(json_response(
            StatusCode::CREATED,
            &pipeline::review(&user, target.kind, obj),
        ));
    }
    match (verb, target.sub.as_deref()) {
        ("watch", None) => watch::serve(&ctx).await,
        ("list", None) => ctx.list().await,
        ("get", None | Some("status")) => ctx.get(&name).await,
        ("get", Some("scale")) => ctx.get_scale(&name).await,
        ("create", None) => ctx.create(&body, content_type.as_deref()).await,
        ("create", Some("binding")) => ctx.bind(&name, &body, content_type.as_deref()).await,
        ("create", Some("token")) => ctx.token(&name, &body, content_type.as_deref()).await,
        ("update", sub) => ctx.update(&name, sub, &body, content_type.as_deref()).await,
        ("patch", sub) => ctx.patch(&name, sub, &body, content_type.as_deref()).await,
        ("delete", None) => ctx.delete(&name, &body, content_type.as_deref()).await,
        ("deletecollection", None) => ctx.delete_collection(&body, content_type.as_deref()).await,
        _ => Err(ApiError::method_not_allowed(method.as_str())),
    }
}

async fn read_body(body: RequestBody) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::too_large(
                    "the request entity is too large: limit is 3145728 bytes",
                ))
            } else {
                Err(ApiError::bad_request(format!(
                    "reading the request body failed: {e}"
                )))
            }
        }
    }
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn random_suffix() -> String {
    // Upstream's alphabet for generateName: no vowels, no confusable characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let id = uuid::Uuid::new_v4();
    id.as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

/// Kinds whose spec changes bump `metadata.generation`.
fn tracks_generation(kind: &Kind) -> bool {
    kind.status && !matches!(kind.kind, "Node" | "Namespace")
}

/// Make `new` equal to `cur` in every top-level field but `keep`. Only what differs is copied:
/// a status write usually changed nothing else, and comparing costs less than cloning.
fn restore_all_but(new: &mut Value, cur: &Value, keep: &str) {
    let (Some(n), Some(c)) = (new.as_object_mut(), cur.as_object()) else {
        let kept = new.get(keep).cloned();
        *new = cur.clone();
        match kept {
            Some(v) => new[keep] = v,
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove(keep);
                }
            }
        }
        return;
    };
    n.retain(|k, _| k == keep || c.contains_key(k));
    for (k, v) in c {
        if k != keep && n.get(k) != Some(v) {
            n.insert(k.clone(), v.clone());
        }
    }
}

/// Whether `a` and `b` differ outside `metadata` and `status` (what bumps `generation`),
/// compared in place.
fn spec_differs(a: &Value, b: &Value) -> bool {
    fn spec(o: &Value) -> Option<Vec<(&String, &Value)>> {
        o.as_object().map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "metadata" && *k != "status")
                .collect()
        })
    }
    match (spec(a), spec(b)) {
        (Some(x), Some(y)) => x != y,
        _ => a != b,
    }
}

fn pod_qos(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .flat_map(|l| pod["spec"][*l].as_array().into_iter().flatten())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &containers {
        let req = &c["resources"]["requests"];
        let lim = &c["resources"]["limits"];
        for r in ["cpu", "memory"] {
            let (rq, lm) = (&req[r], &lim[r]);
            if !rq.is_null() || !lm.is_null() {
                any = true;
            }
            if lm.is_null() || (!rq.is_null() && rq != lm) {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// A request against one kind.
pub struct Ctx {
    /// Who is writing, for managedFields: `?fieldManager=`, else the client's program name.
    pub manager: String,
    pub state: Arc<State>,
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub query: Query,
    pub table: bool,
    /// The resourceVersion and stored JSON of this request's last write, so that answering
    /// with the object just written copies those bytes instead of serialising it again.
    pub written: Written,
}

/// See `Ctx::written`.
#[derive(Default)]
pub struct Written(std::sync::Mutex<Option<(Revision, Bytes)>>);

impl Ctx {
    pub fn ns(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    fn key(&self, name: &str) -> String {
        self.kind.key(self.ns(), name)
    }

    fn not_found(&self, name: &str) -> ApiError {
        ApiError::not_found(&self.kind.qualified(), name).on(
            self.kind.group,
            self.kind.plural,
            name,
        )
    }

    fn err(&self, name: &str, e: StoreError) -> ApiError {
        store_error(self.kind, name, e)
    }

    /// The response for one object: itself, or a one-row Table.
    fn object_response(&self, code: StatusCode, obj: &Value) -> Response<Body> {
        if !self.table {
            if let Some(json) = self.written_json(obj) {
                return json_bytes_response(code, json);
            }
        }
        if self.table {
            let t = table::table(
                self.kind,
                std::slice::from_ref(obj),
                IncludeObject::parse(self.query.get("includeObject")),
                json!({"resourceVersion": meta_str(obj, "resourceVersion")}),
                true,
            );
            return json_response(code, &t);
        }
        json_response(code, obj)
    }

    /// Remember what a write stored (see `Ctx::written`).
    fn remember(&self, rev: Revision, stored: Bytes) {
        if let Ok(mut w) = self.written.0.lock() {
            *w = Some((rev, stored));
        }
    }

    /// `obj` as JSON from the bytes stored for it, if it is what this request last wrote: a
    /// resourceVersion names one write, and nothing changes an object after it is written.
    fn written_json(&self, obj: &Value) -> Option<Bytes> {
        let rev = obj["metadata"]["resourceVersion"]
            .as_str()?
            .parse::<i64>()
            .ok()?;
        let w = self.written.0.lock().ok()?;
        let (written, stored) = w.as_ref()?;
        (written.0 == rev).then(|| crate::object::Stored::from_store(stored, rev).json)
    }

    pub async fn load(&self, name: &str) -> Result<(Value, Revision), ApiError> {
        let kv = self
            .state
            .store
            .get(&self.key(name))
            .await
            .map_err(|e| self.err(name, e))?
            .ok_or_else(|| self.not_found(name))?;
        Ok((decode(&kv.value, kv.mod_revision.0), kv.mod_revision))
    }

    async fn get(&self, name: &str) -> Result<Response<Body>, ApiError> {
        let (obj, _) = self.load(name).await?;
        Ok(self.object_response(StatusCode::OK, &obj))
    }

    pub fn selectors(&self) -> Result<(Selector, FieldSelector), ApiError> {
        let labels = Selector::parse(self.query.get("labelSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(self.query.get("fieldSelector").unwrap_or(""))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        fields
            .check_supported(|f| self.kind.supports_field(f))
            .map_err(|e| ApiError::bad_request(format!("{e}")))?;
        Ok((labels, fields))
    }

    /// List matching objects; returns (items, revision, continue token).
    pub async fn list_objects(&self) -> Result<(Vec<Stored>, i64, Option<String>), ApiError> {
        let (labels, fields) = self.selectors()?;
        let prefix = self.kind.prefix(self.ns());
        let limit: usize = match self.query.get("limit") {
            Some(l) => l
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?
                .max(0) as usize,
            None => 0,
        };
        let mut start_after = None;
        let mut revision = None;
        if let Some(token) = self.query.get("continue") {
            let (rv, start) = decode_continue(token, &prefix)?;
            revision = Some(Revision(rv));
            start_after = Some(start);
        } else if let Some(rv) = self.query.get("resourceVersion") {
            let rv: i64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?;
            let current = self
                .state
                .store
                .current_revision()
                .await
                .map_err(|e| self.err("", e))?
                .0;
            match self.query.get("resourceVersionMatch") {
                Some("Exact") => revision = Some(Revision(rv)),
                Some("NotOlderThan") | None => {
                    if rv > current {
                        return Err(ApiError::timeout("Too large resource version"));
                    }
                }
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "resourceVersionMatch: Unsupported value: \"{other}\": supported values: \"Exact\", \"NotOlderThan\""
                    )))
                }
            }
        }
        // A name selector needs one key, not a range.
        if let (Some(name), None) = (fields.exact("metadata.name"), &start_after) {
            if self.ns().is_some() || !self.kind.namespaced {
                let revision_now = self
                    .state
                    .store
                    .current_revision()
                    .await
                    .map_err(|e| self.err(name, e))?;
                let at = revision.unwrap_or(revision_now);
                let resp = self
                    .state
                    .store
                    .range(RangeRequest {
                        prefix: self.key(name),
                        start_after: None,
                        limit: 0,
                        revision: Some(at),
                    })
                    .await
                    .map_err(|e| self.err(name, e))?;
                let items = resp
                    .kvs
                    .iter()
                    .filter(|kv| kv.key == self.key(name))
                    .map(|kv| Stored::from_store(&kv.value, kv.mod_revision.0))
                    .filter(|o| object::matches(self.kind, o, &labels, &fields))
                    .collect();
                return Ok((items, resp.revision.0, None));
            }
        }
        let mut items = Vec::new();
        let page = if limit == 0 { 0 } else { limit.max(100) };
        loop {
            let resp = self
                .state
                .store
                .range(RangeRequest {
                    prefix: prefix.clone(),
                    start_after: start_after.clone(),
                    limit: page,
                    revision,
                })
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if self.query.get("continue").is_some() => ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ),
                    e => self.err("", e),
                })?;
            revision = Some(resp.revision);
            let mut last_key = None;
            for kv in &resp.kvs {
                last_key = Some(kv.key.clone());
                let obj = Stored::from_store(&kv.value, kv.mod_revision.0);
                if object::matches(self.kind, &obj, &labels, &fields) {
                    items.push(obj);
                    if limit > 0 && items.len() == limit {
                        break;
                    }
                }
            }
            let rev = resp.revision.0;
            let exhausted = !resp.more && last_key.as_ref() == resp.kvs.last().map(|kv| &kv.key);
            if limit > 0 && items.len() == limit {
                let token = if exhausted {
                    None
                } else {
                    last_key.map(|k| encode_continue(rev, &k))
                };
                return Ok((items, rev, token));
            }
            if !resp.more {
                return Ok((items, rev, None));
            }
            start_after = last_key;
        }
    }

    async fn list(&self) -> Result<Response<Body>, ApiError> {
        // A whole, current list (what `kubectl get -o json` and informers ask for) streams from
        // one store snapshot; pages, past revisions and tables take the general path.
        let whole = !self.table
            && self.query.get("limit").is_none()
            && self.query.get("continue").is_none()
            && matches!(self.query.get("resourceVersion"), None | Some("0"));
        if whole {
            let (labels, fields) = self.selectors()?;
            let rs = self
                .state
                .store
                .range_stream(&self.kind.prefix(self.ns()), 1000)
                .await
                .map_err(|e| self.err("", e))?;
            let kind = self.kind;
            let meta = json!({"resourceVersion": rs.revision.0.to_string()});
            let stream = object::list_from_store(
                kind.kind,
                &kind.api_version(),
                &meta,
                rs.chunks,
                move |o| object::matches(kind, o, &labels, &fields),
            );
            // Drive the stream from a task; the body reads a small channel (and stops the task
            // by going away when the client does).
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(b) = futures::StreamExt::next(&mut stream).await {
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
            });
            let body = http_body_util::StreamBody::new(futures::StreamExt::map(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                |b| Ok::<_, Infallible>(hyper::body::Frame::data(b)),
            ));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(r);
        }
        let (items, rev, token) = self.list_objects().await?;
        let mut meta = json!({"resourceVersion": rev.to_string()});
        if let Some(t) = token {
            meta["continue"] = json!(t);
        }
        if self.table {
            let values: Vec<Value> = items.iter().map(Stored::value).collect();
            let t = table::table(
                self.kind,
                &values,
                IncludeObject::parse(self.query.get("includeObject")),
                meta,
                true,
            );
            return Ok(json_response(StatusCode::OK, &t));
        }
        let stream = object::list_stream(self.kind.kind, &self.kind.api_version(), &meta, items);
        let body = http_body_util::StreamBody::new(futures::StreamExt::map(stream, |b| {
            Ok::<_, Infallible>(hyper::body::Frame::data(b))
        }));
        let mut r = Response::new(BodyExt::boxed(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(r)
    }

    /// Decode a body into an object of this kind: media type, apiVersion/kind, typed round trip,
    /// and `fieldValidation`. Returns the object and any warnings.
    fn decode_object(
        &self,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<(Value, Vec<String>), ApiError> {
        let media = codec::media_type(content_type)?;
        match media {
            Media::Json | Media::Yaml | Media::Protobuf => {}
            _ => {
                return Err(ApiError::unsupported_media_type(
                    content_type.unwrap_or_default(),
                ))
            }
        }
        if media == Media::Protobuf {
            return self.check_object(protobuf::to_json(self.kind, body)?);
        }
        let (input, duplicates) = codec::parse_body_reporting_duplicates(body, media)?;
        self.check_object_with(input, &duplicates, None)
    }

    fn check_object(&self, input: Value) -> Result<(Value, Vec<String>), ApiError> {
        self.check_object_with(input, &[], None)
    }

    /// `duplicates`: paths of keys the body repeated (found before parsing dropped them).
    /// `parts`: when `input` is a stored object with only these top-level fields changed (a
    /// patch), only they need the typed check (`codec::roundtrip_parts`).
    fn check_object_with(
        &self,
        input: Value,
        duplicates: &[String],
        parts: Option<&[String]>,
    ) -> Result<(Value, Vec<String>), ApiError> {
        if !input.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        // Missing apiVersion or kind default from the endpoint, as upstream's decoder does; a
        // different one is an error.
        let mut input = input;
        for (field, want) in [
            ("apiVersion", self.kind.api_version()),
            ("kind", self.kind.kind.to_string()),
        ] {
            match input.get(field) {
                None | Some(Value::Null) => input[field] = json!(want),
                Some(Value::String(s)) if s.is_empty() => input[field] = json!(want),
                Some(_) => {}
            }
        }
        let api_version = input["apiVersion"].as_str().unwrap_or_default();
        let kind = input["kind"].as_str().unwrap_or_default();
        if api_version != self.kind.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({})",
                self.kind.api_version()
            ))
            .on(self.kind.group, self.kind.plural, ""));
        }
        if kind != self.kind.kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({kind}) does not match the expected kind ({})",
                self.kind.kind
            ))
            .on(self.kind.group, self.kind.plural, ""));
        }
        let (typed, unknown) = match parts {
            Some(parts) => codec::roundtrip_parts(self.kind, input, parts)?,
            None => codec::roundtrip(self.kind, &input)?,
        };
        let mut warnings = Vec::new();
        let mut problems: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        problems.extend(
            duplicates
                .iter()
                .map(|f| format!("duplicate field \"{f}\"")),
        );
        if !problems.is_empty() {
            match self.query.get("fieldValidation").unwrap_or("Warn") {
                "Strict" => {
                    let list = &problems;
                    return Err(ApiError::bad_request(format!(
                        "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
                        self.kind.kind,
                        self.kind.version,
                        self.kind.kind,
                        list.join(", ")
                    )));
                }
                "Ignore" => {}
                "Warn" => warnings.extend(problems),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "fieldValidation: Unsupported value: \"{other}\": supported values: \"Ignore\", \"Strict\", \"Warn\""
                    )))
                }
            }
        }
        Ok((typed, warnings))
    }

    async fn create(
        &self,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let (obj, warnings) = self.decode_object(body, content_type)?;
        let created = self.create_object(obj).await?;
        let mut r = self.object_response(StatusCode::CREATED, &created);
        add_warnings(&mut r, &warnings);
        Ok(r)
    }

    /// The create pipeline, shared with internal callers.
    pub async fn create_object(&self, mut obj: Value) -> Result<Value, ApiError> {
        let dry_run = self.query.dry_run()?;
        let kind = self.kind;
        {
            let meta = obj
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| ApiError::bad_request("metadata is required"))?;
            if kind.namespaced {
                let path_ns = self.ns().unwrap_or_default();
                match meta.get("namespace").and_then(Value::as_str) {
                    Some(ns) if !ns.is_empty() && ns != path_ns => {
                        return Err(ApiError::bad_request(
                            "the namespace of the provided object does not match the namespace sent on the request",
                        ))
                    }
                    _ => {
                        meta.insert("namespace".into(), json!(path_ns));
                    }
                }
            } else {
                meta.remove("namespace");
            }
            let name = meta
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let generate = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if name.is_empty() && !generate.is_empty() {
                meta.insert(
                    "name".into(),
                    json!(format!("{generate}{}", random_suffix())),
                );
            }
            meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
            for f in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                meta.remove(f);
            }
            if tracks_generation(kind) {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        if kind.reset_status_on_create {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        strategy::apply_defaults(kind, &mut obj);
        if kind.kind == "Pod" && kind.group.is_empty() {
            let qos = pod_qos(&obj);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
            self.admit_priority(&mut obj).await?;
            default_toleration_seconds(&mut obj);
        }
        let name = meta_str(&obj, "name").to_string();
        let causes = strategy::validate(kind, &obj);
        if !causes.is_empty() {
            return Err(ApiError::invalid(kind.kind, &name, causes).on(
                kind.group,
                kind.plural,
                &name,
            ));
        }
        if obj["metadata"].get("managedFields").is_none() {
            managed::record_update(
                None,
                &mut obj,
                &self.manager,
                &kind.api_version(),
                &now_rfc3339(),
                "",
                Some(patch_meta::for_kind(kind.group, kind.kind)),
            );
        }
        pipeline::admit(
            &self.state,
            &Attributes {
                verb: "create",
                kind,
                namespace: self.ns(),
                subresource: None,
            },
            &name,
        )
        .await?;
        // Services get their ClusterIP and node ports last, once nothing else can refuse them.
        let held = if is_service(kind) {
            let h = self.state.services.allocate(&mut obj).map_err(|causes| {
                ApiError::invalid(kind.kind, &name, causes).on(kind.group, kind.plural, &name)
            })?;
            Some(h)
        } else {
            None
        };
        let release = |state: &State| {
            if let Some(h) = &held {
                state.services.release(h);
            }
        };
        if dry_run {
            release(&self.state);
            // Existence is still checked, as upstream's dry run does.
            if self
                .state
                .store
                .get(&self.key(&name))
                .await
                .map_err(|e| self.err(&name, e))?
                .is_some()
            {
                return Err(ApiError::already_exists(&kind.qualified(), &name).on(
                    kind.group,
                    kind.plural,
                    &name,
                ));
            }
            return Ok(obj);
        }
        drop_empty_metadata(&mut obj);
        let bytes =
            Bytes::from(serde_json::to_vec(&obj).map_err(|e| ApiError::internal(e.to_string()))?);
        let rev = match self
            .state
            .store
            .create(&self.key(&name), bytes.clone())
            .await
        {
            Ok(rev) => {
                self.state.cache.written(&self.key(&name));
                self.remember(rev, bytes);
                rev
            }
            Err(e) => {
                release(&self.state);
                return Err(self.err(&name, e));
            }
        };
        obj["metadata"]["resourceVersion"] = json!(rev.0.to_string());
        Ok(obj)
    }

    /// Read, change, compare-and-swap, retrying on conflicts unless the caller pinned a
    /// resourceVersion. `mutate` returns the desired object from the current one; `sub` is the
    /// subresource written (None for the main resource, "status" for /status).
    /// `manager`: who to record the changed fields for in managedFields (None: the mutation
    /// maintains managedFields itself, as server-side apply does).
    pub async fn guaranteed_update<F>(
        &self,
        name: &str,
        sub: Option<&str>,
        manager: Option<&str>,
        mutate: F,
    ) -> Result<Value, ApiError>
    where
        F: Fn(&Value) -> Result<Value, ApiError>,
    {
        let dry_run = self.query.dry_run()?;
        let kind = self.kind;
        for _ in 0..16 {
            let (cur, cur_rev) = self.load(name).await?;
            let mut new = mutate(&cur)?;
            let pinned = match new["metadata"]["resourceVersion"].as_str() {
                Some(rv) if !rv.is_empty() => {
                    if rv != cur_rev.0.to_string() {
                        return Err(self.err(
                            name,
                            StoreError::Conflict {
                                key: self.key(name),
                                expected: Revision(0),
                                actual: cur_rev,
                            },
                        ));
                    }
                    true
                }
                _ => false,
            };
            if meta_str(&new, "name") != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    meta_str(&new, "name")
                )));
            }
            if kind.namespaced
                && !meta_str(&new, "namespace").is_empty()
                && meta_str(&new, "namespace") != self.ns().unwrap_or_default()
            {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            // What this write may change: status only through /status, the rest only through the main resource.
            if kind.status {
                match sub {
                    // The binding subresource sets spec.nodeName and a status condition at once.
                    Some("binding") => {}
                    Some("status") => restore_all_but(&mut new, &cur, "status"),
                    _ => match cur.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    },
                }
            }
            // Metadata the server owns.
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
            ] {
                match cur["metadata"].get(f) {
                    Some(v) => new["metadata"][f] = v.clone(),
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
            if let Some(m) = new["metadata"].as_object_mut() {
                m.remove("selfLink");
            }
            new["apiVersion"] = json!(kind.api_version());
            new["kind"] = json!(kind.kind);
            strategy::apply_defaults(kind, &mut new);
            if is_service(kind) {
                servicealloc::carry_allocated(&cur, &mut new);
            }
            if tracks_generation(kind) && spec_differs(&new, &cur) {
                let g = cur["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                new["metadata"]["generation"] = json!(g);
            }
            new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
            let mut causes = strategy::validate(kind, &new);
            causes.extend(strategy::validate_update(kind, &cur, &new));
            if !causes.is_empty() {
                return Err(ApiError::invalid(kind.kind, name, causes).on(
                    kind.group,
                    kind.plural,
                    name,
                ));
            }
            if let Some(m) = manager {
                managed::record_update(
                    Some(&cur),
                    &mut new,
                    m,
                    &kind.api_version(),
                    &now_rfc3339(),
                    sub.unwrap_or_default(),
                    Some(patch_meta::for_kind(kind.group, kind.kind)),
                );
            }
            if new == cur {
                return Ok(cur);
            }
            let finalized =
                !cur["metadata"]["deletionTimestamp"].is_null() && no_finalizers(kind, &new);
            // A Service's newly needed IP or ports are reserved before the write, given back if
            // it fails; what it no longer holds is freed once the write lands.
            let services = &self.state.services;
            let got = if is_service(kind) && !finalized {
                services
                    .allocate_changes(Some(&cur), &mut new)
                    .map_err(|causes| {
                        ApiError::invalid(kind.kind, name, causes).on(kind.group, kind.plural, name)
                    })?
            } else {
                Default::default()
            };
            if dry_run {
                services.release(&got);
                return Ok(new);
            }
            if finalized {
                let res = self
                    .state
                    .store
                    .delete(&self.key(name), Some(cur_rev))
                    .await;
                match res {
                    Ok(_) => {
                        self.state.cache.written(&self.key(name));
                        if is_service(kind) {
                            services.release(&services.holding(&cur));
                        }
                        return Ok(new);
                    }
                    Err(StoreError::Conflict { .. }) if !pinned => continue,
                    Err(e) => return Err(self.err(name, e)),
                }
            }
            match self.write_back(name, &mut new, cur_rev).await {
                Ok(()) => {
                    if is_service(kind) {
                        services.release(&services.freed(&cur, &new));
                    }
                    return Ok(new);
                }
                Err(StoreError::Conflict { .. }) if !pinned => {
                    services.release(&got);
                    continue;
                }
                Err(e) => {
                    services.release(&got);
                    return Err(self.err(name, e));
                }
            }
        }
        Err(ApiError::conflict(
            &kind.qualified(),
            name,
            "too many concurrent updates; try again",
        )
        .on(kind.group, kind.plural, name))
    }

    /// Compare-and-swap `obj` over the version at `expected`. The stored value never carries a
    /// resourceVersion; on success `obj` gets the new one.
    async fn write_back(
        &self,
        name: &str,
        obj: &mut Value,
        expected: Revision,
    ) -> Result<(), StoreError> {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        drop_empty_metadata(obj);
        let bytes =
            Bytes::from(serde_json::to_vec(&*obj).map_err(|e| StoreError::Backend(e.to_string()))?);
        let rev = self
            .state
            .store
            .update(&self.key(name), bytes.clone(), expected)
            .await?;
        self.state.cache.written(&self.key(name));
        self.remember(rev, bytes);
        obj["metadata"]["resourceVersion"] = json!(rev.0.to_string());
        Ok(())
    }

    async fn update(
        &self,
        name: &str,
        sub: Option<&str>,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        if sub == Some("scale") {
            return self.update_scale(name, body, content_type, None).await;
        }
        let (obj, warnings) = self.decode_object(body, content_type)?;
        let sub = if sub == Some("finalize") { None } else { sub };
        let updated = self
            .guaranteed_update(name, sub, Some(&self.manager), |_| Ok(obj.clone()))
            .await?;
        let mut r = self.object_response(StatusCode::OK, &updated);
        add_warnings(&mut r, &warnings);
        Ok(r)
    }

    async fn patch(
        &self,
        name: &str,
        sub: Option<&str>,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let media = codec::media_type(content_type)?;
        // The scale subresource is an autoscaling/v1 Scale: no merge lists.
        let smp_meta = match sub {
            Some("scale") => None,
            _ => Some(patch_meta::for_kind(self.kind.group, self.kind.kind)),
        };
        let apply = |target: &mut Value, patch_doc: &Value| -> Result<(), ApiError> {
            match media {
                Media::JsonPatch => patch::json_patch(target, patch_doc).map_err(|e| match e {
                    patch::PatchError::TooManyOperations(_) => ApiError::too_large(e.to_string()),
                    patch::PatchError::TestFailed { .. } => {
                        ApiError::new(422, "Invalid", e.to_string())
                    }
                    _ => ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                    ),
                }),
                Media::MergePatch => {
                    if !patch_doc.is_object() {
                        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                    }
                    patch::merge_patch(target, patch_doc);
                    Ok(())
                }
                Media::StrategicMergePatch => {
                    *target = strategic::strategic_merge(target, patch_doc, smp_meta).map_err(|e| {
                        ApiError::new(422, "Invalid", format!("the server rejected our request due to an error in our request: {e}"))
                    })?;
                    Ok(())
                }
                _ => Err(ApiError::unsupported_media_type(
                    content_type.unwrap_or_default(),
                )),
            }
        };
        // Refuse what cannot be a patch before reading anything.
        match media {
            Media::JsonPatch | Media::MergePatch | Media::StrategicMergePatch => {}
            Media::ApplyPatch if sub.is_none() => return self.server_side_apply(name, body).await,
            _ => {
                return Err(ApiError::unsupported_media_type(
                    content_type.unwrap_or_default(),
                ))
            }
        }
        let patch_doc = codec::parse_body(body, media)?;
        if sub == Some("scale") {
            return self
                .update_scale(name, body, content_type, Some(&apply))
                .await;
        }
        let parts = codec::patched_parts(media == Media::JsonPatch, &patch_doc);
        let doc = patch_doc.to_string();
        let pins_rv =
            doc.contains("\"resourceVersion\"") || doc.contains("/metadata/resourceVersion");
        let warnings = std::sync::Mutex::new(Vec::new());
        let updated = self
            .guaranteed_update(name, sub, Some(&self.manager), |cur| {
                let mut target = cur.clone();
                apply(&mut target, &patch_doc)?;
                // Only a patch that names a resourceVersion is a precondition; otherwise it
                // applies to whatever is current, retrying on conflicts.
                if !pins_rv {
                    if let Some(m) = target["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                }
                let (obj, w) = self.check_object_with(target, &[], parts.as_deref())?;
                if let Ok(mut ws) = warnings.lock() {
                    *ws = w;
                }
                Ok(obj)
            })
            .await?;
        let mut r = self.object_response(StatusCode::OK, &updated);
        add_warnings(&mut r, &warnings.into_inner().unwrap_or_default());
        Ok(r)
    }

    /// `serviceaccounts/<name>/token`: issue a signed token for the service account.
    async fn token(
        &self,
        name: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let media = codec::media_type(content_type)?;
        let req = match media {
            Media::Protobuf => protobuf::to_json_as(
                "authentication.k8s.io/v1",
                "TokenRequest",
                "serviceaccounts/token",
                body,
            )?,
            Media::Json | Media::Yaml => {
                let v = codec::parse_body(body, media)?;
                if v.get("kind").is_some_and(|k| k != "TokenRequest") {
                    return Err(ApiError::bad_request(
                        "the body must be an authentication.k8s.io/v1 TokenRequest",
                    ));
                }
                v
            }
            _ => {
                return Err(ApiError::unsupported_media_type(
                    content_type.unwrap_or_default(),
                ))
            }
        };
        let (sa, _) = self.load(name).await?;
        let expiration = req["spec"]["expirationSeconds"].as_i64().unwrap_or(3600);
        if expiration < 600 {
            return Err(ApiError::invalid(
                "TokenRequest",
                name,
                vec![apimachinery::Cause::invalid(
                    "spec.expirationSeconds",
                    expiration,
                    "may not specify a duration less than 10 minutes",
                )],
            ));
        }
        let audiences: Vec<String> = req["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .filter(|a: &Vec<String>| !a.is_empty())
            .unwrap_or_else(|| vec![crate::tokens::ISSUER.to_string()]);
        let now = chrono::Utc::now();
        let expires = now + chrono::Duration::seconds(expiration);
        let ns = self.ns().unwrap_or_default();
        let claims = crate::tokens::service_account_claims(
            ns,
            name,
            meta_str(&sa, "uid"),
            &audiences,
            now.timestamp(),
            expires.timestamp(),
        );
        let token = self
            .state
            .signer
            .sign(&claims)
            .map_err(|_| ApiError::internal("signing the token failed"))?;
        let mut spec = json!({"audiences": audiences, "expirationSeconds": expiration});
        if req["spec"]["boundObjectRef"].is_object() {
            spec["boundObjectRef"] = req["spec"]["boundObjectRef"].clone();
        }
        Ok(json_response(
            StatusCode::CREATED,
            &json!({
                "kind": "TokenRequest",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": ns, "creationTimestamp": now_rfc3339()},
                "spec": spec,
                "status": {"token": token, "expirationTimestamp": expires.format("%Y-%m-%dT%H:%M:%SZ").to_string()},
            }),
        ))
    }

    /// Server-side apply: `body` is the manager's complete intent for the fields it manages.
    async fn server_side_apply(&self, name: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
        let kind = self.kind;
        let manager = self.query.get("fieldManager").ok_or_else(|| {
            ApiError::invalid(
                "PatchOptions",
                "",
                vec![apimachinery::Cause::new(
                    "FieldValueRequired",
                    "fieldManager",
                    "Required value: is required for apply patch",
                )],
            )
        })?;
        let force = self.query.flag("force");
        let applied = codec::parse_body(body, Media::ApplyPatch)?;
        // Validate (types, unknown fields) through the typed round trip, but apply what was sent:
        // the round trip would add fields the manager never mentioned.
        let (_, warnings) = self.check_object(applied.clone())?;
        let mut applied = applied;
        applied["apiVersion"] = json!(kind.api_version());
        applied["kind"] = json!(kind.kind);
        if meta_str(&applied, "name") != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&applied, "name")
            )));
        }
        let pins_rv = !meta_str(&applied, "resourceVersion").is_empty();
        let meta = Some(patch_meta::for_kind(kind.group, kind.kind));
        let conflict = |c: Vec<managed::Conflict>| -> ApiError {
            let n = c.len();
            let list: Vec<String> = c
                .iter()
                .map(|c| {
                    format!(
                        "conflict with \"{}\" using {}: {}",
                        c.manager, c.api_version, c.path
                    )
                })
                .collect();
            let mut e = ApiError::conflict(
                &kind.qualified(),
                name,
                &format!(
                    "Apply failed with {n} conflict{}: {}",
                    if n == 1 { "" } else { "s" },
                    list.join("\n")
                ),
            )
            .on(kind.group, kind.plural, name);
            e.message = format!(
                "Apply failed with {n} conflict{}: {}",
                if n == 1 { "" } else { "s" },
                list.join("\n")
            );
            e.details.causes = c
                .iter()
                .map(|c| {
                    apimachinery::Cause::new(
                        "FieldManagerConflict",
                        &c.path,
                        format!("conflict with \"{}\" using {}", c.manager, c.api_version),
                    )
                })
                .collect();
            e
        };
        let apply_to = |live: Option<&Value>| {
            let now = now_rfc3339();
            managed::apply(
                live,
                &applied,
                manager,
                force,
                &kind.api_version(),
                &now,
                meta,
            )
            .map_err(conflict)
        };
        let (obj, code) = match self.load(name).await {
            Err(e) if e.code == 404 => {
                let obj = apply_to(None)?;
                (self.create_object(obj).await?, StatusCode::CREATED)
            }
            Err(e) => return Err(e),
            Ok(_) => {
                let updated = self
                    .guaranteed_update(name, None, None, |cur| {
                        let mut out = apply_to(Some(cur))?;
                        if !pins_rv {
                            if let Some(m) = out["metadata"].as_object_mut() {
                                m.remove("resourceVersion");
                            }
                        }
                        Ok(out)
                    })
                    .await?;
                (updated, StatusCode::OK)
            }
        };
        let mut r = self.object_response(code, &obj);
        add_warnings(&mut r, &warnings);
        Ok(r)
    }

    fn scale_of(&self, obj: &Value) -> Value {
        let selector = if obj["spec"]["selector"]["matchLabels"].is_object()
            || obj["spec"]["selector"]["matchExpressions"].is_array()
        {
            label_selector_string(&obj["spec"]["selector"])
        } else {
            obj["spec"]["selector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": obj["metadata"]["name"],
                "namespace": obj["metadata"]["namespace"],
                "uid": obj["metadata"]["uid"],
                "resourceVersion": obj["metadata"]["resourceVersion"],
                "creationTimestamp": obj["metadata"]["creationTimestamp"],
            },
            "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
            "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
        })
    }

    async fn get_scale(&self, name: &str) -> Result<Response<Body>, ApiError> {
        let (obj, _) = self.load(name).await?;
        Ok(json_response(StatusCode::OK, &self.scale_of(&obj)))
    }

    async fn update_scale(
        &self,
        name: &str,
        body: &[u8],
        content_type: Option<&str>,
        patcher: Option<Patcher<'_>>,
    ) -> Result<Response<Body>, ApiError> {
        let media = codec::media_type(content_type)?;
        let input = codec::parse_body(body, media)?;
        let updated = self
            .guaranteed_update(name, None, Some(&self.manager), |cur| {
                let mut scale = self.scale_of(cur);
                match patcher {
                    Some(p) => p(&mut scale, &input)?,
                    None => {
                        if input["kind"] != "Scale" {
                            return Err(ApiError::bad_request(
                                "the body must be an autoscaling/v1 Scale",
                            ));
                        }
                        scale = input.clone();
                    }
                }
                let replicas = scale["spec"]["replicas"].as_i64().ok_or_else(|| {
                    ApiError::invalid(
                        "Scale",
                        name,
                        vec![apimachinery::Cause::required("spec.replicas")],
                    )
                })?;
                if replicas < 0 {
                    return Err(ApiError::invalid(
                        "Scale",
                        name,
                        vec![apimachinery::Cause::invalid(
                            "spec.replicas",
                            replicas,
                            "must be greater than or equal to 0",
                        )],
                    ));
                }
                let mut new = cur.clone();
                new["spec"]["replicas"] = json!(replicas);
                if let Some(rv) = scale["metadata"]["resourceVersion"].as_str() {
                    new["metadata"]["resourceVersion"] = json!(rv);
                }
                Ok(new)
            })
            .await?;
        Ok(json_response(StatusCode::OK, &self.scale_of(&updated)))
    }

    async fn bind(
        &self,
        name: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let media = codec::media_type(content_type)?;
        let binding = codec::parse_body(body, media)?;
        let node = binding["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding",
                name,
                vec![apimachinery::Cause::required("target.name")],
            ));
        }
        let annotations = binding["metadata"]["annotations"].clone();
        // One write, as upstream's binding storage does: the node name, the Binding's
        // annotations and PodScheduled=True. Like upstream's (it writes to storage directly),
        // a binding records no managedFields entry.
        self.guaranteed_update(name, Some("binding"), None, |cur| {
            let bound = cur["spec"]["nodeName"].as_str().unwrap_or_default();
            if !bound.is_empty() {
                return Err(ApiError::conflict(
                    "pods",
                    name,
                    &format!("pod {name} is already assigned to node \"{bound}\""),
                )
                .on("", "pods", name));
            }
            if !cur["metadata"]["deletionTimestamp"].is_null() {
                return Err(ApiError::conflict(
                    "pods",
                    name,
                    &format!("pod {name} is being deleted, cannot be assigned to a host"),
                ));
            }
            let mut new = cur.clone();
            new["spec"]["nodeName"] = json!(node);
            if let Some(extra) = annotations.as_object().filter(|a| !a.is_empty()) {
                for (k, v) in extra {
                    new["metadata"]["annotations"][k] = v.clone();
                }
            }
            let conds = new["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut conds: Vec<Value> = conds.into_iter().filter(|c| c["type"] != "PodScheduled").collect();
            conds.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": now_rfc3339()}));
            new["status"]["conditions"] = json!(conds);
            Ok(new)
        })
        .await?;
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        ))
    }

    /// The Priority admission step: `spec.priority` (and `preemptionPolicy`) from the pod's
    /// PriorityClass, or from the global default class, or 0, as upstream resolves them.
    async fn admit_priority(&self, pod: &mut Value) -> Result<(), ApiError> {
        let Some(classes) = crate::registry::lookup("scheduling.k8s.io", "v1", "priorityclasses")
        else {
            return Ok(());
        };
        let wanted = pod["spec"]["priorityClassName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let generation = self.state.cache.admission_generation();
        let cached: Option<Option<Value>> = {
            let c = crate::AdmissionCache::at(&self.state.admission, generation);
            match wanted.as_str() {
                "" => c.default_priority.clone(),
                name => c.priority_by_name.get(name).cloned().map(Some),
            }
        };
        let class: Option<Value> = match (wanted.as_str(), cached) {
            ("system-node-critical", _) => Some(json!({"value": 2000001000})),
            ("system-cluster-critical", _) => Some(json!({"value": 2000000000})),
            (_, Some(hit)) => hit,
            ("", None) => {
                // The global default, if one is marked so.
                let list = self
                    .state
                    .store
                    .range(store::RangeRequest {
                        prefix: classes.prefix(None),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| store_error(classes, "", e))?;
                let found = list
                    .kvs
                    .iter()
                    .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
                    .find(|c| c["globalDefault"] == json!(true));
                crate::AdmissionCache::at(&self.state.admission, generation).default_priority =
                    Some(found.clone());
                found
            }
            (name, None) => {
                let kv = self
                    .state
                    .store
                    .get(&classes.key(None, name))
                    .await
                    .map_err(|e| store_error(classes, name, e))?;
                match kv.and_then(|kv| serde_json::from_slice::<Value>(&kv.value).ok()) {
                    Some(found) => {
                        crate::AdmissionCache::at(&self.state.admission, generation)
                            .priority_by_name
                            .insert(name.to_string(), found.clone());
                        Some(found)
                    }
                    None => {
                        return Err(ApiError::forbidden(format!(
                            "pods \"{}\" is forbidden: no PriorityClass with name {name} was found",
                            meta_str(pod, "name")
                        )))
                    }
                }
            }
        };
        let value = class
            .as_ref()
            .and_then(|c| c["value"].as_i64())
            .unwrap_or(0);
        if let Some(given) = pod["spec"]["priority"].as_i64() {
            if given != value {
                return Err(ApiError::forbidden(format!(
                    "pods \"{}\" is forbidden: the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name",
                    meta_str(pod, "name")
                )));
            }
        }
        pod["spec"]["priority"] = json!(value);
        if let Some(c) = &class {
            if let Some(name) = c["metadata"]["name"].as_str() {
                if wanted.is_empty() {
                    pod["spec"]["priorityClassName"] = json!(name);
                }
            }
            if pod["spec"].get("preemptionPolicy").is_none() {
                pod["spec"]["preemptionPolicy"] = c
                    .get("preemptionPolicy")
                    .cloned()
                    .unwrap_or(json!("PreemptLowerPriority"));
            }
        }
        Ok(())
    }

    /// Delete options from the body (a DeleteOptions) and the query string.
    fn delete_options(&self, body: &[u8], content_type: Option<&str>) -> Result<Value, ApiError> {
        let mut opts = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else if codec::media_type(content_type)? == Media::Protobuf {
            protobuf::delete_options(body)?
        } else {
            let v = codec::parse_body(body, Media::Json)?;
            if !v.is_object() {
                return Err(ApiError::bad_request("DeleteOptions must be a JSON object"));
            }
            v
        };
        if let Some(g) = self.query.get("gracePeriodSeconds") {
            let g: i64 = g
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?;
            opts["gracePeriodSeconds"] = json!(g);
        }
        if let Some(p) = self.query.get("propagationPolicy") {
            opts["propagationPolicy"] = json!(p);
        }
        if self.query.dry_run()? {
            opts["dryRun"] = json!(["All"]);
        }
        if let Some(p) = opts["propagationPolicy"].as_str() {
            if !["Orphan", "Background", "Foreground"].contains(&p) {
                return Err(ApiError::invalid(
                    "DeleteOptions",
                    "",
                    vec![apimachinery::Cause::not_supported(
                        "propagationPolicy",
                        p,
                        &["Foreground", "Background", "Orphan"],
                    )],
                ));
            }
        }
        if let Some(dr) = opts["dryRun"].as_array() {
            if dr.iter().any(|d| d != "All") {
                return Err(ApiError::bad_request(
                    "Invalid dry run value: supported values: \"All\"",
                ));
            }
        }
        Ok(opts)
    }

    async fn delete(
        &self,
        name: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let opts = self.delete_options(body, content_type)?;
        let (obj, code) = self.delete_object(name, &opts).await?;
        Ok(self.object_response(code, &obj))
    }

    /// The delete pipeline: preconditions, graceful deletion of bound pods, finalizers.
    pub async fn delete_object(
        &self,
        name: &str,
        opts: &Value,
    ) -> Result<(Value, StatusCode), ApiError> {
        let kind = self.kind;
        let dry_run = opts["dryRun"].as_array().is_some_and(|a| !a.is_empty());
        pipeline::admit(
            &self.state,
            &Attributes {
                verb: "delete",
                kind,
                namespace: self.ns(),
                subresource: None,
            },
            name,
        )
        .await?;
        for _ in 0..16 {
            let (cur, cur_rev) = self.load(name).await?;
            if let Some(uid) = opts["preconditions"]["uid"].as_str() {
                if uid != meta_str(&cur, "uid") {
                    return Err(ApiError::conflict(&kind.qualified(), name, &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}", meta_str(&cur, "uid")
                    )).on(kind.group, kind.plural, name));
                }
            }
            if let Some(rv) = opts["preconditions"]["resourceVersion"].as_str() {
                if rv != cur_rev.0.to_string() {
                    return Err(ApiError::conflict(&kind.qualified(), name, &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {cur_rev}"
                    )).on(kind.group, kind.plural, name));
                }
            }
            if dry_run {
                return Ok((cur, StatusCode::OK));
            }
            // Graceful deletion: a pod running on a node is finished by that node.
            let mut new = cur.clone();
            let mut deferred = false;
            if kind.kind == "Pod" && kind.group.is_empty() {
                let bound = !cur["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .is_empty();
                let terminal = matches!(
                    cur["status"]["phase"].as_str(),
                    Some("Succeeded" | "Failed")
                );
                let grace = opts["gracePeriodSeconds"]
                    .as_i64()
                    .or_else(|| cur["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30)
                    .max(0);
                if bound && !terminal && grace > 0 {
                    let existing = cur["metadata"]["deletionGracePeriodSeconds"].as_i64();
                    if existing.is_some_and(|e| e <= grace) {
                        return Ok((cur, StatusCode::OK));
                    }
                    let at = chrono::Utc::now() + chrono::Duration::seconds(grace);
                    new["metadata"]["deletionTimestamp"] =
                        json!(at.format("%Y-%m-%dT%H:%M:%SZ").to_string());
                    new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                    deferred = true;
                }
            }
            gc_finalizers(&mut new, opts);
            if !no_finalizers(kind, &new) {
                if new["metadata"]["deletionTimestamp"].is_null() {
                    new["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                    new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
                }
                if kind.kind == "Namespace" {
                    new["status"]["phase"] = json!("Terminating");
                }
                deferred = true;
            }
            if deferred {
                if new == cur {
                    return Ok((cur, StatusCode::OK));
                }
                match self.write_back(name, &mut new, cur_rev).await {
                    Ok(()) => return Ok((new, StatusCode::OK)),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(self.err(name, e)),
                }
            }
            match self
                .state
                .store
                .delete(&self.key(name), Some(cur_rev))
                .await
            {
                Ok((rev, _)) => {
                    self.state.cache.written(&self.key(name));
                    if is_service(kind) {
                        let services = &self.state.services;
                        services.release(&services.holding(&cur));
                    }
                    let mut gone = cur;
                    gone["metadata"]["resourceVersion"] = json!(rev.0.to_string());
                    return Ok((gone, StatusCode::OK));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(self.err(name, e)),
            }
        }
        Err(ApiError::conflict(
            &kind.qualified(),
            name,
            "too many concurrent updates; try again",
        ))
    }

    async fn delete_collection(
        &self,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let opts = self.delete_options(body, content_type)?;
        let (items, rev, _) = self.list_objects().await?;
        let mut deleted = Vec::new();
        for item in items {
            let name = item.meta_str("name").to_string();
            let ns = item.meta_str("namespace");
            let ns = ns.as_str();
            let ctx = Ctx {
                manager: self.manager.clone(),
                state: self.state.clone(),
                kind: self.kind,
                namespace: if ns.is_empty() {
                    self.namespace.clone()
                } else {
                    Some(ns.to_string())
                },
                query: Query(HashMap::new()),
                table: false,
                written: Default::default(),
            };
            match ctx.delete_object(&name, &opts).await {
                Ok((obj, _)) => deleted.push(obj),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "kind": format!("{}List", self.kind.kind),
                "apiVersion": self.kind.api_version(),
                "metadata": {"resourceVersion": rev.to_string()},
                "items": deleted,
            }),
        ))
    }
}

/// Empty metadata lists and maps are not kept (upstream's `omitempty`): a patch that removes
/// the last owner reference or finalizer leaves no `[]` behind.
fn drop_empty_metadata(obj: &mut Value) {
    if let Some(m) = obj["metadata"].as_object_mut() {
        m.retain(|k, v| {
            let empty = match v {
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            };
            !(empty
                && matches!(
                    k.as_str(),
                    "ownerReferences" | "finalizers" | "labels" | "annotations" | "managedFields"
                ))
        });
    }
}

/// Upstream's DefaultTolerationSeconds admission: a pod that does not tolerate the
/// `not-ready` and `unreachable` NoExecute taints tolerates them for 300 s, so the node
/// lifecycle controller evicts it five minutes after its node fails.
pub fn default_toleration_seconds(pod: &mut Value) {
    const SECONDS: i64 = 300;
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let tolerated = pod["spec"]["tolerations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| {
                let effect = t["effect"].as_str().unwrap_or_default();
                let tkey = t["key"].as_str().unwrap_or_default();
                let op = t["operator"].as_str().unwrap_or("Equal");
                (effect.is_empty() || effect == "NoExecute")
                    && (tkey == key || (tkey.is_empty() && op == "Exists"))
            });
        if tolerated {
            continue;
        }
        if !pod["spec"]["tolerations"].is_array() {
            pod["spec"]["tolerations"] = json!([]);
        }
        if let Some(t) = pod["spec"]["tolerations"].as_array_mut() {
            t.push(
                json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                          "tolerationSeconds": SECONDS}),
            );
        }
    }
}

/// The garbage collector's finalizers for a delete's propagation policy (upstream's
/// deletionFinalizersForGarbageCollection): `Orphan` adds `orphan`, `Foreground` adds
/// `foregroundDeletion`, an explicit `Background` removes both; no policy keeps what is there.
/// The garbage collector removes them when the dependents are orphaned or gone.
fn gc_finalizers(obj: &mut Value, opts: &Value) {
    let policy = match opts["propagationPolicy"].as_str() {
        Some(p) => p,
        None => match opts["orphanDependents"].as_bool() {
            Some(true) => "Orphan",
            Some(false) => "Background",
            None => return,
        },
    };
    let mut fins: Vec<Value> = obj["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let before = fins.clone();
    fins.retain(|f| f != "orphan" && f != "foregroundDeletion");
    match policy {
        "Orphan" => fins.push(json!("orphan")),
        "Foreground" => fins.push(json!("foregroundDeletion")),
        _ => {}
    }
    if fins != before {
        obj["metadata"]["finalizers"] = if fins.is_empty() {
            Value::Null
        } else {
            Value::Array(fins)
        };
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.retain(|_, v| !v.is_null());
        }
    }
}

fn no_finalizers(kind: &Kind, obj: &Value) -> bool {
    let meta_empty = obj["metadata"]["finalizers"]
        .as_array()
        .is_none_or(|a| a.is_empty());
    let spec_empty = kind.kind != "Namespace"
        || obj["spec"]["finalizers"]
            .as_array()
            .is_none_or(|a| a.is_empty());
    meta_empty && spec_empty
}

fn label_selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = sel["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    for e in sel["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str().unwrap_or_default();
        let vals: Vec<&str> = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(match e["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", vals.join(",")),
            "NotIn" => format!("{key} notin ({})", vals.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    parts.join(",")
}

fn add_warnings(r: &mut Response<Body>, warnings: &[String]) {
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "'"))) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
}

fn encode_continue(rev: i64, last_key: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rev, "start": last_key});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str, prefix: &str) -> Result<(i64, String), ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad("not base64"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not JSON"))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(bad("incorrect encoded key version"));
    }
    let rv = v["rv"]
        .as_i64()
        .filter(|r| *r > 0)
        .ok_or_else(|| bad("no resource version"))?;
    let start = v["start"].as_str().ok_or_else(|| bad("no start key"))?;
    if !start.starts_with(prefix) {
        return Err(bad("the key does not belong to this list"));
    }
    Ok((rv, start.to_string()))
}

/// Create what every cluster has from the start: the built-in namespaces.
pub async fn bootstrap(state: &Arc<State>) -> anyhow::Result<()> {
    let kind =
        lookup("", "v1", "namespaces").ok_or_else(|| anyhow::anyhow!("namespaces kind missing"))?;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let ctx = Ctx {
            manager: "rkube".into(),
            state: state.clone(),
            kind,
            namespace: None,
            query: Query(HashMap::new()),
            table: false,
            written: Default::default(),
        };
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        match ctx.create_object(obj).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => anyhow::bail!("creating namespace {ns}: {e}"),
        }
    }
    Ok(())
}

/// Mark the ClusterIPs and node ports every stored Service holds.
pub async fn restore_service_allocations(state: &Arc<State>) -> anyhow::Result<()> {
    use futures::StreamExt;
    let kind = lookup("", "v1", "services").ok_or_else(|| anyhow::anyhow!("no services kind"))?;
    let mut stream = state.store.range_stream(&kind.prefix(None), 1000).await?;
    let mut n = 0;
    while let Some(chunk) = stream.chunks.next().await {
        for kv in chunk? {
            if let Ok(svc) = serde_json::from_slice::<Value>(&kv.value) {
                state.services.restore(&svc);
                n += 1;
            }
        }
    }
    tracing::debug!(services = n, "service allocations restored");
    Ok(())
}

/// The `kubernetes` Service in `default` (the first ClusterIP of the range, port 443) and its Endpoints and
/// EndpointSlice pointing at this API server (upstream's API server keeps these itself: the
/// Service has no selector, so the endpoints controller leaves it alone).
pub async fn publish_self(
    state: &Arc<State>,
    ip: std::net::IpAddr,
    port: u16,
) -> anyhow::Result<()> {
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let first = state.services.net.nth(1).to_string();
    let objects = [
        (
            "",
            "v1",
            "services",
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": first, "clusterIPs": [first],
                     "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}]}}),
        ),
        (
            "",
            "v1",
            "endpoints",
            json!({"apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
            "subsets": [{"addresses": [{"ip": ip.to_string()}],
                         "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}]}),
        ),
        (
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": family,
            "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}),
        ),
    ];
    for (group, version, plural, obj) in objects {
        let kind = lookup(group, version, plural)
            .ok_or_else(|| anyhow::anyhow!("{plural} kind missing"))?;
        let ctx = Ctx {
            manager: "kube-apiserver".into(),
            state: state.clone(),
            kind,
            namespace: Some("default".into()),
            query: Query(HashMap::new()),
            table: false,
            written: Default::default(),
        };
        match ctx.create_object(obj.clone()).await {
            Ok(_) => {}
            // 422: the Service exists and holds its ClusterIP.
            Err(e) if e.code == 409 || e.code == 422 => {
                // Keep it pointing here (the address or port may have changed).
                let want = obj.clone();
                let r = ctx
                    .guaranteed_update("kubernetes", None, Some("kube-apiserver"), move |cur| {
                        let mut new = cur.clone();
                        for k in ["subsets", "endpoints", "ports", "addressType"] {
                            if let Some(v) = want.get(k) {
                                new[k] = v.clone();
                            }
                        }
                        if want["kind"] == "Service" {
                            new["spec"]["ports"] = want["spec"]["ports"].clone();
                        }
                        Ok(new)
                    })
                    .await;
                if let Err(e) = r {
                    anyhow::bail!("updating the kubernetes {plural}: {e}");
                }
            }
            Err(e) => anyhow::bail!("creating the kubernetes {plural}: {e}"),
        }
    }
    Ok(())
}

fn is_service(kind: &Kind) -> bool {
    kind.group.is_empty() && kind.kind == "Service"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_write_keeps_only_the_new_status() {
        let cur = json!({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"x": 1},
                         "status": {"phase": "Pending"}});
        let mut new = json!({"metadata": {"name": "p"}, "spec": {"x": 2}, "extra": true,
                             "status": {"phase": "Running"}});
        restore_all_but(&mut new, &cur, "status");
        assert_eq!(
            new,
            json!({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"x": 1},
                   "status": {"phase": "Running"}})
        );
        let mut cleared = json!({"metadata": {"name": "p"}});
        restore_all_but(&mut cleared, &cur, "status");
        assert_eq!(
            cleared,
            json!({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"x": 1}})
        );
        let mut not_an_object = json!([1]);
        restore_all_but(&mut not_an_object, &cur, "status");
        let mut want = cur.clone();
        want.as_object_mut().unwrap().remove("status");
        assert_eq!(not_an_object, want);
    }

    #[test]
    fn only_changes_outside_metadata_and_status_bump_the_generation() {
        let d = json!({"metadata": {"name": "d", "generation": 1}, "spec": {"replicas": 1},
                       "status": {"replicas": 0}});
        let mut status = d.clone();
        status["status"]["replicas"] = json!(1);
        status["metadata"]["labels"] = json!({"a": "b"});
        assert!(!spec_differs(&d, &status));
        let mut spec = d.clone();
        spec["spec"]["replicas"] = json!(2);
        assert!(spec_differs(&d, &spec));
        let mut added = d.clone();
        added["template"] = json!({});
        assert!(spec_differs(&d, &added));
        let mut removed = d.clone();
        removed.as_object_mut().unwrap().remove("spec");
        assert!(spec_differs(&d, &removed));
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let t = encode_continue(42, "/registry/pods/default/b");
        assert_eq!(
            decode_continue(&t, "/registry/pods/").unwrap(),
            (42, "/registry/pods/default/b".into())
        );
        assert_eq!(
            decode_continue(&t, "/registry/secrets/").unwrap_err().code,
            400
        );
        for bad in [
            "!!!",
            "e30",
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode("{\"v\":\"meta.k8s.io/v1\",\"rv\":0}"),
        ] {
            assert_eq!(
                decode_continue(bad, "/registry/pods/").unwrap_err().code,
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn default_toleration_seconds_adds_what_is_missing() {
        let mut pod = json!({"spec": {"tolerations": [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]}});
        default_toleration_seconds(&mut pod);
        let t = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0]["tolerationSeconds"], 5);
        assert_eq!(t[1]["key"], "node.kubernetes.io/not-ready");
        assert_eq!(t[1]["tolerationSeconds"], 300);
        let mut all = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        default_toleration_seconds(&mut all);
        assert_eq!(all["spec"]["tolerations"].as_array().unwrap().len(), 1);
        let mut none = json!({"spec": {}});
        default_toleration_seconds(&mut none);
        assert_eq!(none["spec"]["tolerations"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn targets() {
        let t = parse_target("", "v1", &["namespaces", "default", "pods", "p", "status"]).unwrap();
        assert_eq!(
            (
                t.kind.plural,
                t.namespace.as_deref(),
                t.name.as_deref(),
                t.sub.as_deref()
            ),
            ("pods", Some("default"), Some("p"), Some("status"))
        );
        let t = parse_target("", "v1", &["namespaces", "foo"]).unwrap();
        assert_eq!(
            (t.kind.plural, t.namespace, t.name.as_deref()),
            ("namespaces", None, Some("foo"))
        );
        let t = parse_target("", "v1", &["namespaces", "foo", "finalize"]).unwrap();
        assert_eq!(t.sub.as_deref(), Some("finalize"));
        assert!(parse_target("", "v1", &["pods", "p", "nope"]).is_err());
        assert!(parse_target("", "v1", &["widgets"]).is_err());
        assert_eq!(
            parse_target("", "v1", &["nodes"]).unwrap().kind.kind,
            "Node"
        );
    }

    #[test]
    fn qos_classes() {
        assert_eq!(
            pod_qos(&json!({"spec": {"containers": [{"name": "a"}]}})),
            "BestEffort"
        );
        assert_eq!(
            pod_qos(
                &json!({"spec": {"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}})
            ),
            "Guaranteed"
        );
        assert_eq!(
            pod_qos(&json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "1"}}}]}})),
            "Burstable"
        );
    }
}
