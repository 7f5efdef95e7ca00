//! The `/v2/` API. Handlers are thin: parse the request, call the store, map errors.
//!
//! **Architecture invariant:** this is the only layer that knows HTTP; it never touches
//! the file system or SQL, only [`Store`].

pub mod access_log;
mod api;
mod authz;
mod body;
pub mod error;
mod incoming;
mod metrics;
pub mod route;
mod token;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body::Body as _;
use serde::Serialize;

use error::upload_range;
pub use error::{ApiError, OciErrorCode};
pub use metrics::Metrics;
use metrics::Route;
use route::Endpoint;

use crate::auth::{Action, Auth, Principal};
use crate::oci::manifest::{Descriptor, OCI_INDEX, is_manifest_type};
use crate::oci::{Digest, Reference, RepoName};
use crate::sendfile;
use crate::store::{ByteStream, Store};

const API_VERSION: &str = "registry/2.0";
/// The page size of `_catalog` when the client gives no `n`, and the largest `n` served.
const DEFAULT_PAGE: u32 = 1000;
const MAX_PAGE: u32 = 10_000;
/// The most tags one manifest PUT may set with `?tag=`.
const MAX_TAG_PARAMS: usize = 100;

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// What the handlers share.
pub struct AppState {
    pub store: Arc<Store>,
    pub auth: Arc<Auth>,
    /// The URL clients reach the registry by, when a proxy in front changes it.
    pub public_url: Option<String>,
    pub tls: bool,
    pub metrics: Metrics,
    /// Body timeouts and other bounds (`[limits]`).
    pub limits: crate::config::Limits,
    pub access_log: Option<access_log::AccessLog>,
    /// Uploads writing now, per user.
    pub uploaders: Uploaders,
}

/// Uploads writing now, per user, so that one account (or one leaked token) cannot hold
/// every place of `max_uploads` with slow bodies.
#[derive(Default)]
pub struct Uploaders(std::sync::Mutex<std::collections::HashMap<String, usize>>);

/// A user's place among their uploads writing now.
pub struct Uploading<'a> {
    of: &'a Uploaders,
    user: String,
}

impl Uploaders {
    fn enter(&self, caller: &authz::Caller, max: usize) -> Result<Uploading<'_>> {
        let user = caller.principal.name().unwrap_or("").to_owned();
        let mut map = self.0.lock().expect("uploaders");
        let n = map.entry(user.clone()).or_insert(0);
        if *n >= max {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                OciErrorCode::Toomanyrequests,
                format!("{user} has {max} uploads being written at once, the most one user may; retry when one ends"),
            )
            .with_header(header::RETRY_AFTER, "1"));
        }
        *n += 1;
        Ok(Uploading { of: self, user })
    }
}

impl Drop for Uploading<'_> {
    fn drop(&mut self) {
        let mut map = self.of.0.lock().expect("uploaders");
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// Builds the router serving the registry API and the token endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// What a request's handling learned for the logs: its route and who called.
#[derive(Default)]
struct Seen {
    route: Route,
    user: Option<String>,
    credential: Option<String>,
}

async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let method = req.method().clone();
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (parts, body) = req.into_parts();
    let (incoming, body) = incoming::Incoming::wrap(body, state.limits.anonymous_body_timeout);
    let mut seen = Seen::default();
    let mut resp = match handle(&state, &parts, body, client, &mut seen, incoming.deadline()).await
    {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // What the handler left of the body is read now if it is little, or the client is
    // told that this connection ends here.
    let drain = if seen.user.is_some() {
        incoming::DRAIN_LIMIT
    } else {
        incoming::DRAIN_LIMIT_ANONYMOUS
    };
    match incoming.leftover(expects_continue, drain) {
        incoming::Leftover::Nothing => {}
        incoming::Leftover::Close => {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        // The answer goes out now; hyper reads the next request once this is done.
        incoming::Leftover::Drain(d) => {
            tokio::spawn(d.run());
        }
    }
    state.metrics.count(seen.route, &method, resp.status());
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    if let Some(log) = &state.access_log {
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        log.record(&access_log::Entry {
            time: access_log::now(),
            client: client.map(|c| c.to_string()),
            method: method.as_str(),
            path,
            status: resp.status().as_u16(),
            bytes: resp.body().size_hint().exact().or_else(|| {
                resp.headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
            }),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            user: seen.user.as_deref(),
            credential: seen.credential.as_deref(),
        });
    }
    resp
}

/// `/healthz`: the process answers (no authentication, nothing checked: a load balancer
/// or an orchestrator restarts what does not). `/readyz`: the database and the blob
/// storage answer too, else 503 with what is down, so a load balancer sends requests to
/// other replicas meanwhile. Neither needs credentials nor tells anything but up or down.
async fn health(store: &crate::store::Store, m: &Method, ready: bool) -> Result<Response> {
    if m != Method::GET && m != Method::HEAD {
        return Err(method_not_allowed());
    }
    if !ready {
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "status": "alive" }),
        ));
    }
    let r = store.ready().await;
    let part = |e: &Option<String>| e.as_deref().map_or("ok", |_| "unavailable");
    if r.ok() {
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "status": "ready", "database": "ok", "storage": "ok" }),
        ));
    }
    // The causes go to the log, not to anonymous callers (paths, hosts).
    tracing::warn!(database = ?r.database, storage = ?r.storage, "not ready");
    let down: Vec<&str> = [("database", &r.database), ("storage", &r.storage)]
        .into_iter()
        .filter(|(_, e)| e.is_some())
        .map(|(n, _)| n)
        .collect();
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        error::OciErrorCode::Unavailable,
        format!("not ready: the {} does not answer", down.join(" and the ")),
    )
    .with_detail(serde_json::json!({
        "database": part(&r.database),
        "storage": part(&r.storage),
    }))
    .with_header(header::RETRY_AFTER, "1"))
}

/// Query parameters, in order, repeated keys kept.
pub(crate) struct Query(pub(crate) Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The permission an endpoint needs.
enum Need<'a> {
    /// Any valid credentials (`GET /v2/`).
    Login,
    /// Anyone; the answer lists only what the caller may pull.
    Catalog,
    Repo(&'a str, Action),
}

fn need<'a>(endpoint: &Endpoint<'a>, m: &Method) -> Need<'a> {
    let by_method = |name| match *m {
        Method::PUT => Need::Repo(name, Action::Push),
        Method::DELETE => Need::Repo(name, Action::Delete),
        _ => Need::Repo(name, Action::Pull),
    };
    match *endpoint {
        Endpoint::Base => Need::Login,
        Endpoint::Catalog => Need::Catalog,
        Endpoint::Tags { name } | Endpoint::Referrers { name, .. } => {
            Need::Repo(name, Action::Pull)
        }
        Endpoint::Manifest { name, .. } | Endpoint::Blob { name, .. } => by_method(name),
        Endpoint::UploadStart { name } | Endpoint::Upload { name, .. } => {
            Need::Repo(name, Action::Push)
        }
    }
}

async fn handle(
    state: &AppState,
    parts: &axum::http::request::Parts,
    body: Body,
    client: Option<std::net::IpAddr>,
    seen: &mut Seen,
    deadline: &incoming::Deadline,
) -> Result<Response> {
    let (store, auth) = (&*state.store, &*state.auth);
    let site = authz::Site {
        base_url: authz::base_url(
            state.public_url.as_deref(),
            state.tls,
            &parts.headers,
            &parts.uri,
        )?,
        service: auth.service(),
    };
    let path = parts.uri.path();
    let q = Query::parse(parts.uri.query());
    if path == "/healthz" || path == "/readyz" {
        seen.route = Route::Health;
        return health(store, &parts.method, path == "/readyz").await;
    }
    if path == "/token" {
        seen.route = Route::Token;
        return token::handle(auth, &site, &parts.method, &q, &parts.headers, body, client).await;
    }
    // Who calls: authenticated callers get the longer body timeout.
    let authenticated = |caller: &authz::Caller, seen: &mut Seen| {
        if caller.principal != Principal::Anonymous {
            deadline.set(state.limits.body_idle_timeout);
        }
        seen.user = caller.principal.name().map(str::to_owned);
        seen.credential = caller.principal.credential().map(str::to_owned);
    };
    if let Some(api) = api::parse(path) {
        seen.route = Route::Api;
        let caller = authz::authenticate(auth, &site, &parts.headers, client).await?;
        authenticated(&caller, seen);
        let req = api::ApiRequest {
            method: &parts.method,
            q: &q,
            client,
            body,
        };
        return api::handle(state, &site, &caller, api, req).await;
    }
    let rest = match path {
        "/v2" => "",
        _ => path.strip_prefix("/v2/").ok_or_else(ApiError::not_found)?,
    };
    let endpoint = route::parse(rest).ok_or_else(ApiError::not_found)?;
    seen.route = Route::of(&endpoint, q.get("mount").is_some());
    let m = &parts.method;
    let h = &parts.headers;
    let caller = authz::authenticate(auth, &site, h, client).await?;
    authenticated(&caller, seen);
    match need(&endpoint, m) {
        Need::Login if caller.principal == Principal::Anonymous => {
            return Err(site.unauthorized("authentication required", None, None));
        }
        Need::Repo(name, action) => {
            repo(name)?;
            authz::require(auth, &site, &caller, name, action, client).await?;
        }
        Need::Login | Need::Catalog => {}
    }
    let by = crate::store::Who {
        actor: caller.principal.name().map(str::to_owned),
        credential: caller.principal.credential().map(str::to_owned),
        client: client.map(|c| c.to_string()),
    };
    match endpoint {
        Endpoint::Base if m == Method::GET || m == Method::HEAD => {
            Ok(json(StatusCode::OK, &serde_json::json!({})))
        }
        Endpoint::Catalog if m == Method::GET => catalog(store, auth, &caller, &q).await,
        Endpoint::Tags { name } if m == Method::GET => tags(store, &repo(name)?, &q).await,
        Endpoint::Manifest { name, reference } => {
            let name = repo(name)?;
            match *m {
                Method::GET | Method::HEAD => {
                    manifest_get(store, &name, reference, h, m == Method::HEAD).await
                }
                // The audit row is written in the transaction of the change. A body of
                // up to 4 MiB is held whole, so it counts among the uploads.
                Method::PUT => {
                    let _user = state
                        .uploaders
                        .enter(&caller, state.limits.max_uploads_per_user)?;
                    let _writing = store.writing_permit()?;
                    manifest_put(store, &name, reference, &q, h, body, by).await
                }
                Method::DELETE => manifest_delete(store, &name, reference, &by).await,
                _ => Err(method_not_allowed()),
            }
        }
        Endpoint::Blob { name, digest } => {
            let name = repo(name)?;
            let digest: Digest = percent_colon(digest).parse()?;
            match *m {
                Method::GET | Method::HEAD => {
                    let zero_copy = parts.extensions.get::<sendfile::Queue>();
                    blob_get(store, &name, &digest, h, m == Method::HEAD, zero_copy).await
                }
                Method::DELETE => {
                    store.blob_delete(&name, &digest, &by).await?;
                    Ok(empty(StatusCode::ACCEPTED))
                }
                _ => Err(method_not_allowed()),
            }
        }
        Endpoint::UploadStart { name } if m == Method::POST => {
            let _writing = match q.get("digest") {
                Some(_) => Some(
                    state
                        .uploaders
                        .enter(&caller, state.limits.max_uploads_per_user)?,
                ),
                None => None,
            };
            // A mount reads from another repository: the caller must be able to pull it.
            let from_ok = match q.get("from").map(RepoName::parse) {
                Some(Ok(from)) => {
                    authz::permits(auth, &caller, from.as_str(), Action::Pull).await?
                }
                _ => true,
            };
            upload_start(store, &repo(name)?, &q, h, body, from_ok, &by).await
        }
        Endpoint::Upload { name, id } => {
            let name = repo(name)?;
            if uuid::Uuid::try_parse(id).is_err() {
                return Err(crate::store::StoreError::UploadUnknown.into());
            }
            match *m {
                Method::GET => {
                    let size = store.upload_status(&name, id).await?;
                    Ok(upload_progress(StatusCode::NO_CONTENT, &name, id, size))
                }
                Method::PATCH => {
                    let _writing = state
                        .uploaders
                        .enter(&caller, state.limits.max_uploads_per_user)?;
                    let (start, len) = chunk_bounds(h)?;
                    let size = store
                        .upload_append(&name, id, start, len, body_stream(body))
                        .await?;
                    Ok(upload_progress(StatusCode::ACCEPTED, &name, id, size))
                }
                Method::PUT => {
                    let _writing = state
                        .uploaders
                        .enter(&caller, state.limits.max_uploads_per_user)?;
                    upload_finish(store, &name, id, &q, h, body).await
                }
                Method::DELETE => {
                    store.upload_cancel(&name, id).await?;
                    Ok(empty(StatusCode::NO_CONTENT))
                }
                _ => Err(method_not_allowed()),
            }
        }
        Endpoint::Referrers { name, digest } if m == Method::GET => {
            referrers(store, &repo(name)?, &percent_colon(digest).parse()?, &q).await
        }
        _ => Err(method_not_allowed()),
    }
}

pub(crate) fn repo(name: &str) -> Result<RepoName> {
    Ok(RepoName::parse(name)?)
}

/// Clients may escape the colon of a digest in a path.
fn percent_colon(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('%') {
        std::borrow::Cow::Owned(s.replace("%3A", ":").replace("%3a", ":"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

pub(crate) fn method_not_allowed() -> ApiError {
    ApiError::unsupported(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

fn empty(status: StatusCode) -> Response {
    let mut r = status.into_response();
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).expect("response serializes");
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn set(r: &mut Response, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

fn body_stream(body: Body) -> ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

fn header_u64(h: &HeaderMap, name: header::HeaderName) -> Result<Option<u64>> {
    match h.get(&name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::upload_invalid(format!("invalid {name} header"))),
    }
}

/// `start-end` (inclusive) from a chunk's Content-Range; `bytes=`/`bytes ` prefixes and
/// a `/total` suffix are tolerated.
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v
        .strip_prefix("bytes")
        .map_or(v, |r| r.trim_start_matches(['=', ' ']));
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// Where a chunk must start and how long it is, from Content-Range and Content-Length.
fn chunk_bounds(h: &HeaderMap) -> Result<(Option<u64>, Option<u64>)> {
    let len = header_u64(h, header::CONTENT_LENGTH)?;
    let Some(cr) = h.get(header::CONTENT_RANGE) else {
        return Ok((None, len));
    };
    let (start, end) = cr
        .to_str()
        .ok()
        .and_then(parse_content_range)
        .ok_or_else(|| ApiError::upload_invalid("Content-Range must be <start>-<end>"))?;
    let range_len = (end - start).checked_add(1).ok_or_else(|| {
        ApiError::upload_invalid("Content-Range covers more bytes than can be counted")
    })?;
    if let Some(len) = len {
        if len != range_len {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::SizeInvalid,
                format!("Content-Range covers {range_len} bytes but Content-Length is {len}"),
            ));
        }
    }
    Ok((Some(start), Some(range_len)))
}

fn upload_location(name: &RepoName, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn upload_progress(status: StatusCode, name: &RepoName, id: &str, size: u64) -> Response {
    let mut r = empty(status);
    set(&mut r, header::LOCATION, &upload_location(name, id));
    set(&mut r, header::RANGE, &upload_range(size));
    set(&mut r, "docker-upload-uuid", id);
    r
}

fn blob_created(name: &RepoName, digest: &Digest) -> Response {
    let mut r = empty(StatusCode::CREATED);
    set(
        &mut r,
        header::LOCATION,
        &format!("/v2/{name}/blobs/{digest}"),
    );
    set(&mut r, "docker-content-digest", digest.as_str());
    r
}

// ---- blobs ----

/// A single byte range of a `size`-byte blob, from a `Range` header. `Ok(None)` means
/// serve the whole blob (no header, or one this server ignores, as RFC 9110 allows).
fn blob_range(h: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(v) = h.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // several ranges: answer with the whole blob
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let unsatisfiable = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            OciErrorCode::RangeInvalid,
            format!("the requested range lies outside the blob's {size} bytes"),
        )
        .with_header(header::CONTENT_RANGE, &format!("bytes */{size}"))
    };
    let range = if a.is_empty() {
        let Ok(suffix) = b.parse::<u64>() else {
            return Ok(None);
        };
        if suffix == 0 || size == 0 {
            return Err(unsatisfiable());
        }
        (size.saturating_sub(suffix), size - 1)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            let Ok(end) = b.parse::<u64>() else {
                return Ok(None);
            };
            if end < start {
                return Err(unsatisfiable());
            }
            end.min(size.saturating_sub(1))
        };
        if start >= size {
            return Err(unsatisfiable());
        }
        (start, end)
    };
    Ok(Some(range))
}

async fn blob_get(
    store: &Store,
    name: &RepoName,
    digest: &Digest,
    h: &HeaderMap,
    head: bool,
    zero_copy: Option<&sendfile::Queue>,
) -> Result<Response> {
    let size = store.blob_size(name, digest).await?;
    if !head {
        // The object store serves the bytes (and the client's Range) itself.
        if let Some(url) = store.blob_redirect(digest) {
            let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
            set(&mut r, header::LOCATION, &url);
            set(&mut r, "docker-content-digest", digest.as_str());
            return Ok(r);
        }
    }
    let range = blob_range(h, size)?;
    let (status, start, end) = match range {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e + 1),
        None => (StatusCode::OK, 0, size),
    };
    let len = end - start;
    let mut r = if head {
        status.into_response()
    } else {
        let file = match zero_copy {
            Some(queue) => store.blob_file(digest).await?.map(|f| (f, queue.clone())),
            None => None,
        };
        let body = match file {
            Some((file, queue)) => Body::new(sendfile::FileBody::new(file, start, len, queue)),
            None => {
                let stream = store.blob_read(digest, start..end).await?;
                Body::new(body::Sized::new(stream, len))
            }
        };
        (status, body).into_response()
    };
    set(&mut r, header::CONTENT_LENGTH, &len.to_string());
    set(&mut r, header::CONTENT_TYPE, "application/octet-stream");
    set(&mut r, "docker-content-digest", digest.as_str());
    set(&mut r, header::ACCEPT_RANGES, "bytes");
    set(&mut r, header::ETAG, &format!("\"{digest}\""));
    if range.is_some() {
        set(
            &mut r,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    Ok(r)
}

// ---- uploads ----

async fn upload_start(
    store: &Store,
    name: &RepoName,
    q: &Query,
    h: &HeaderMap,
    body: Body,
    from_readable: bool,
    by: &crate::store::Who,
) -> Result<Response> {
    if let Some(mount) = q.get("mount") {
        let digest: Digest = mount.parse()?;
        let mounted = match q.get("from") {
            // A source the caller may not read is treated as not holding the blob.
            Some(from) => {
                let from = repo(from)?;
                from_readable && store.blob_mount(name, &from, &digest, by).await?.is_some()
            }
            // Without `from`, only a blob this repository already holds counts: knowing a
            // digest is not access to it.
            None => store.blob_size(name, &digest).await.is_ok(),
        };
        if mounted {
            return Ok(blob_created(name, &digest));
        }
    } else if let Some(d) = q.get("digest") {
        let digest: Digest = d.parse()?;
        let len = header_u64(h, header::CONTENT_LENGTH)?;
        store
            .blob_put(name, &digest, len, body_stream(body))
            .await?;
        return Ok(blob_created(name, &digest));
    }
    let id = store.upload_start(name).await?;
    Ok(upload_progress(StatusCode::ACCEPTED, name, &id, 0))
}

async fn upload_finish(
    store: &Store,
    name: &RepoName,
    id: &str,
    q: &Query,
    h: &HeaderMap,
    body: Body,
) -> Result<Response> {
    let digest: Digest = q
        .get("digest")
        .ok_or_else(|| {
            ApiError::digest_invalid("the digest query parameter is required to finish an upload")
        })?
        .parse()?;
    let (start, len) = chunk_bounds(h)?;
    let has_body = !body.is_end_stream() && body.size_hint().exact() != Some(0);
    let last = if has_body || start.is_some() {
        Some((start, len, body_stream(body)))
    } else {
        None
    };
    store.upload_finish(name, id, &digest, last).await?;
    Ok(blob_created(name, &digest))
}

// ---- manifests ----

/// A reference on a read: an invalid tag names nothing, so it is unknown (404), while a
/// malformed digest is a bad request (400).
fn read_reference(reference: &str) -> Result<Reference> {
    let reference = percent_colon(reference);
    match Reference::parse(&reference) {
        Ok(r) => Ok(r),
        Err(crate::oci::name::ReferenceError::Name(_)) => {
            Err(crate::store::StoreError::ManifestUnknown.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether a client sending `h` accepts a manifest of `media_type`. A client that names
/// manifest types gets only those; one that names none (or a wildcard) gets any.
fn accepts(h: &HeaderMap, media_type: &str) -> bool {
    let mut named_manifest_type = false;
    for v in h
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for item in v.split(',') {
            let t = item.split(';').next().unwrap_or("").trim();
            if t == media_type || t == "*/*" || t == "application/*" || t == "application/json" {
                return true;
            }
            named_manifest_type |= is_manifest_type(t);
        }
    }
    !named_manifest_type
}

async fn manifest_get(
    store: &Store,
    name: &RepoName,
    reference: &str,
    h: &HeaderMap,
    head: bool,
) -> Result<Response> {
    let reference = read_reference(reference)?;
    let m = store.manifest_get(name, &reference).await?;
    if !accepts(h, &m.media_type) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            OciErrorCode::ManifestUnknown,
            format!(
                "the manifest is {}, which the request's Accept header does not allow",
                m.media_type
            ),
        )
        .with_detail(serde_json::json!({ "mediaType": m.media_type })));
    }
    if !head {
        // For retention's keep-pulled rules; written in batches, never on this path.
        store.note_pull(name.as_str(), &m.digest);
    }

    let len = m.content.len();
    let mut r = if head {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::OK, m.content).into_response()
    };
    set(&mut r, header::CONTENT_TYPE, &m.media_type);
    set(&mut r, header::CONTENT_LENGTH, &len.to_string());
    set(&mut r, "docker-content-digest", &m.digest);
    set(&mut r, header::ETAG, &format!("\"{}\"", m.digest));
    Ok(r)
}

async fn manifest_put(
    store: &Store,
    name: &RepoName,
    reference: &str,
    q: &Query,
    h: &HeaderMap,
    body: Body,
    by: crate::store::Who,
) -> Result<Response> {
    let reference = Reference::parse(&percent_colon(reference))?;
    let extra_tags: Vec<String> = q.all("tag").map(str::to_owned).collect();
    if !extra_tags.is_empty() {
        if matches!(reference, Reference::Tag(_)) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::TagInvalid,
                "the tag query parameter is only allowed when pushing by digest",
            ));
        }
        if extra_tags.len() > MAX_TAG_PARAMS {
            return Err(ApiError::new(
                StatusCode::URI_TOO_LONG,
                OciErrorCode::TagInvalid,
                format!("at most {MAX_TAG_PARAMS} tag parameters"),
            ));
        }
        for t in &extra_tags {
            Reference::parse(t)
                .ok()
                .filter(|r| matches!(r, Reference::Tag(_)))
                .ok_or_else(|| {
                    ApiError::from(crate::oci::name::NameError::InvalidTag(t.clone()))
                })?;
        }
    }
    let limit = store.max_manifest();
    let bytes = read_limited(body, limit).await.map_err(|seen| match seen {
        Some(size) => ApiError::from(crate::store::StoreError::ManifestTooLarge { size, limit }),
        None => ApiError::from(crate::store::StoreError::Body(std::io::Error::other(
            "request body failed",
        ))),
    })?;
    let content_type = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let put = store
        .manifest_put(
            name,
            &reference,
            extra_tags.clone(),
            content_type,
            bytes,
            by,
        )
        .await?;
    let mut r = empty(StatusCode::CREATED);
    set(
        &mut r,
        header::LOCATION,
        &format!("/v2/{name}/manifests/{}", put.digest),
    );
    set(&mut r, "docker-content-digest", put.digest.as_str());
    if let Some(subject) = &put.subject {
        set(&mut r, "oci-subject", subject.as_str());
    }
    for t in &extra_tags {
        if let Ok(v) = HeaderValue::from_str(t) {
            r.headers_mut().append("oci-tag", v);
        }
    }
    Ok(r)
}

/// Reads a body of at most `limit` bytes. Over the limit: `Err(Some(bytes seen))`, after
/// reading on up to [`incoming::DRAIN_LIMIT`] to tell how large; a failed body:
/// `Err(None)`.
pub(crate) async fn read_limited(
    body: Body,
    limit: usize,
) -> std::result::Result<Bytes, Option<usize>> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| None)?;
        seen += chunk.len();
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        } else if seen as u64 > incoming::DRAIN_LIMIT {
            break;
        }
    }
    if seen > limit {
        Err(Some(seen))
    } else {
        Ok(buf.freeze())
    }
}

async fn manifest_delete(
    store: &Store,
    name: &RepoName,
    reference: &str,
    by: &crate::store::Who,
) -> Result<Response> {
    let reference = read_reference(reference)?;
    store.manifest_delete(name, &reference, by).await?;
    Ok(empty(StatusCode::ACCEPTED))
}

// ---- listings ----

/// `n` and `last` of a paginated listing. `n` absent means `default`; over MAX_PAGE it is
/// lowered (the `Link` header then leads on).
fn page(q: &Query, default: Option<u32>) -> Result<(Option<u32>, Option<&str>)> {
    let n = match q.get("n") {
        None | Some("") => default,
        Some(v) => Some(v.parse::<u32>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                OciErrorCode::PaginationNumberInvalid,
                format!("n must be a non-negative integer, not {v:?}"),
            )
        })?),
    };
    Ok((
        n.map(|n| n.min(MAX_PAGE)),
        q.get("last").filter(|l| !l.is_empty()),
    ))
}

fn link_next(r: &mut Response, path: &str, n: u32, last: &str) {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("n", &n.to_string())
        .append_pair("last", last)
        .finish();
    set(r, header::LINK, &format!("<{path}?{q}>; rel=\"next\""));
}

/// Fetches one page through `fetch(last, limit)`, asking one more than `n` to learn
/// whether another page follows.
async fn paginate<F, Fut>(
    n: Option<u32>,
    last: Option<&str>,
    fetch: F,
) -> Result<(Vec<String>, bool)>
where
    F: FnOnce(Option<String>, u32) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, crate::store::StoreError>>,
{
    let limit = n.map_or(u32::MAX, |n| n + 1);
    let mut items = fetch(last.map(str::to_owned), limit).await?;
    let more = n.is_some_and(|n| items.len() > n as usize);
    if let Some(n) = n {
        items.truncate(n as usize);
    }
    Ok((items, more))
}

/// The catalog lists only repositories the caller may pull. What they may pull is a few
/// ranges of names ([`crate::auth::Rights::pullable`]), and a page is read with range
/// scans of those: the work is bounded by the page, not by how many repositories the
/// registry holds that the caller may not see.
async fn catalog(
    store: &Store,
    auth: &Auth,
    caller: &authz::Caller,
    q: &Query,
) -> Result<Response> {
    let (n, last) = page(q, Some(DEFAULT_PAGE))?;
    let n = n.unwrap_or(DEFAULT_PAGE) as usize;
    let rights = auth
        .rights(&caller.principal)
        .await
        .map_err(authz::auth_error_plain)?;
    let keys = rights.pullable();
    let mut repos = store.repositories_in(&keys, last, n as u32 + 1).await?;
    let more = repos.len() > n;
    repos.truncate(n);
    #[derive(Serialize)]
    struct Catalog<'a> {
        repositories: &'a [String],
    }
    let mut r = json(
        StatusCode::OK,
        &Catalog {
            repositories: &repos,
        },
    );
    if let (true, Some(l)) = (more, repos.last()) {
        link_next(&mut r, "/v2/_catalog", n as u32, l);
    }
    Ok(r)
}

async fn tags(store: &Store, name: &RepoName, q: &Query) -> Result<Response> {
    let (n, last) = page(q, None)?;
    let (tags, more) = paginate(n, last, |last, limit| async move {
        store.tags(name, last.as_deref(), limit).await
    })
    .await?;
    #[derive(Serialize)]
    struct TagList<'a> {
        name: &'a str,
        tags: &'a [String],
    }
    let mut r = json(
        StatusCode::OK,
        &TagList {
            name: name.as_str(),
            tags: &tags,
        },
    );
    if let (true, Some(n), Some(l)) = (more, n, tags.last()) {
        link_next(&mut r, &format!("/v2/{name}/tags/list"), n, l);
    }
    Ok(r)
}

async fn referrers(
    store: &Store,
    name: &RepoName,
    subject: &Digest,
    q: &Query,
) -> Result<Response> {
    let filter = q.get("artifactType").filter(|t| !t.is_empty());
    let manifests: Vec<Descriptor> = store
        .referrers(name, subject)
        .await?
        .into_iter()
        .filter(|m| filter.is_none_or(|f| m.artifact_type.as_deref() == Some(f)))
        .map(|m| Descriptor {
            media_type: m.media_type,
            digest: m.digest,
            size: m.size,
            artifact_type: m.artifact_type,
            annotations: m.annotations.and_then(|a| serde_json::from_str(&a).ok()),
            urls: None,
            platform: None,
        })
        .collect();
    let index =
        serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let mut r = json(StatusCode::OK, &index);
    set(&mut r, header::CONTENT_TYPE, OCI_INDEX);
    if filter.is_some() {
        set(&mut r, "oci-filters-applied", "artifactType");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes=10-19"), Some((10, 19)));
        assert_eq!(parse_content_range("bytes 10-19/*"), Some((10, 19)));
        assert_eq!(parse_content_range("19-10"), None);
        assert_eq!(parse_content_range("x-1"), None);
        assert_eq!(parse_content_range("-1"), None);
    }

    fn range(v: &str, size: u64) -> Result<Option<(u64, u64)>, StatusCode> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        blob_range(&h, size).map_err(|e| e.status)
    }

    #[test]
    fn blob_ranges() {
        assert_eq!(range("bytes=500-1499", 2048), Ok(Some((500, 1499))));
        assert_eq!(range("bytes=500-", 2048), Ok(Some((500, 2047))));
        assert_eq!(range("bytes=-500", 2048), Ok(Some((1548, 2047))));
        assert_eq!(range("bytes=-5000", 2048), Ok(Some((0, 2047))));
        assert_eq!(range("bytes=2000-5000", 2048), Ok(Some((2000, 2047))));
        assert_eq!(
            range("bytes=500-0", 2048),
            Err(StatusCode::RANGE_NOT_SATISFIABLE)
        );
        assert_eq!(
            range("bytes=5000-10000", 2048),
            Err(StatusCode::RANGE_NOT_SATISFIABLE)
        );
        assert_eq!(
            range("bytes=0-0", 0),
            Err(StatusCode::RANGE_NOT_SATISFIABLE)
        );
        assert_eq!(range("bytes=0-1,5-6", 2048), Ok(None));
        assert_eq!(range("items=0-1", 2048), Ok(None));
        assert_eq!(range("bytes=a-b", 2048), Ok(None));
    }

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(accepts(&h, OCI_INDEX));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
        );
        assert!(!accepts(&h, OCI_INDEX));
        assert!(accepts(&h, "application/vnd.oci.image.manifest.v1+json"));
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json;q=0.5"),
        );
        assert!(accepts(&h, OCI_INDEX));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(accepts(&h, OCI_INDEX));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        assert!(accepts(&h, OCI_INDEX));
    }
}
