//! HTTP plumbing shared by every component: the one error-to-status mapping, bearer-token
//! authentication, JSON extractors with JSON errors, the composition of routers, and the
//! limits that keep one client from holding the server: in-flight requests (global and per
//! tenant), request and body-read timeouts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRef, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{AuthSettings, HttpSettings};
use crate::metrics::Metrics;
use crate::tenants::{InvalidTenantName, TenantName};

/// An API error: a status, a message that reads after "failed to", and optional details.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            details: None,
        }
    }

    /// A 400 whose message is the error's own text (a tenant-facing check's error).
    pub fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message.to_string())
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The same answer whether or not the tenant exists, so names do not leak.
    pub fn tenant_not_found(t: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("tenant `{t}` not found"))
    }
}

/// Every error answer: the message, and details some errors add beside it (such as
/// `published` for a refused publish, `line`/`column` for an app that does not compile).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// The error body as the API document gives it: `error` and any details beside it.
impl utoipa::PartialSchema for ErrorBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::{ObjectBuilder, Type, schema::AdditionalProperties};
        ObjectBuilder::new()
            .description(Some(
                "An error: `error` says what failed; some errors add details beside it",
            ))
            .property(
                "error",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("what failed, in words")),
            )
            .required("error")
            .additional_properties(Some(AdditionalProperties::FreeForm(true)))
            .into()
    }
}

impl utoipa::ToSchema for ErrorBody {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let details = match self.details {
            Some(serde_json::Value::Object(d)) => d,
            _ => serde_json::Map::new(),
        };
        let body = ErrorBody {
            error: self.message,
            details,
        };
        (self.status, Json(body)).into_response()
    }
}

/// A handler's blocking task that panicked (or was cancelled): a bug, logged here and
/// answered with the same 500 wherever it happens, its detail never sent.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        tracing::error!(error = %e, "request task failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl From<InvalidTenantName> for ApiError {
    fn from(e: InvalidTenantName) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::new(r.status(), format!("invalid JSON body: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::new(r.status(), format!("invalid query: {}", r.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::new(r.status(), format!("invalid path: {}", r.body_text()))
    }
}

/// A JSON object body (`application/json`) read as `T`, with JSON errors like every other
/// error. Only an object: serde would also read a struct from an array of its fields in
/// order (`[null, null]`), a form no client means.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<serde_json::Value>::from_request(req, state).await?;
        json_object(value).map(Self)
    }
}

/// `value` as `T` if it is a JSON object; otherwise, or if it is not a `T`, a 422.
pub fn json_object<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid JSON body: expected a JSON object",
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid JSON body: {e}"),
        )
    })
}

/// `axum::extract::Query` with JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryArgs<T>(pub T);

/// `axum::extract::Path` with JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathArgs<T>(pub T);

/// The whole request body, with JSON errors (413 over the route's body limit).
pub struct BodyBytes(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for BodyBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(Self)
            .map_err(|r| {
                ApiError::new(
                    r.status(),
                    format!("cannot read the request body: {}", r.body_text()),
                )
            })
    }
}

/// Resolves a tenant's API token to its tenant (coredms does, through whichever store the
/// process has): the HTTP edge needs it but must not import storage.
pub trait TenantTokens: Send + Sync {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<TenantName>, ApiError>>;
}

/// What the `Caller` and `InternalCaller` extractors need: the configured tokens and the
/// tenant tokens. Every router's state provides one (`FromRef`).
#[derive(Clone)]
pub struct Auth {
    pub settings: Arc<AuthSettings>,
    pub tenants: Arc<dyn TenantTokens>,
}

/// The state of the HTTP edge around every router: auth, the in-flight limits, timeouts and
/// the counters (`/metrics`).
#[derive(Clone)]
pub struct Edge {
    pub auth: Auth,
    pub http: Arc<HttpSettings>,
    pub in_flight: Arc<InFlight>,
    pub metrics: Arc<Metrics>,
}

impl FromRef<Edge> for Auth {
    fn from_ref(e: &Edge) -> Auth {
        e.auth.clone()
    }
}

/// Who is calling, from the bearer token.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    Admin,
    /// Another component of the platform, calling coredms.
    Internal,
    Tenant(TenantName),
}

impl Caller {
    /// Admit the admin and the tenant itself; anyone else gets the same 404 as for a tenant
    /// that does not exist.
    pub fn for_tenant(&self, raw: &str) -> Result<TenantName, ApiError> {
        let name = TenantName::parse(raw).map_err(|_| ApiError::tenant_not_found(raw))?;
        match self {
            Self::Admin | Self::Internal => Ok(name),
            Self::Tenant(t) if *t == name => Ok(name),
            Self::Tenant(_) => Err(ApiError::tenant_not_found(raw)),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Self::Admin => Ok(()),
            _ => Err(ApiError::new(StatusCode::FORBIDDEN, "admin token required")),
        }
    }
}

/// What a caller presenting an admin token hears when no admin token is configured.
pub const ADMIN_API_OFF: &str = "the admin API is off: this platform was started without an admin token (set auth.admin_token or MYSIMBDP_ADMIN_TOKEN, at least 16 characters)";

/// Equal tokens, compared in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(a, b).into()
}

/// The bearer token of a request, if it has a non-empty one.
fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether `token` is the configured token `configured` (never when none is configured),
/// compared in constant time.
fn is_token(token: &str, configured: &str) -> bool {
    !token.is_empty()
        && !configured.is_empty()
        && constant_time_eq(token.as_bytes(), configured.as_bytes())
}

/// A caller holding the internal (or admin) token: another component of the platform.
/// Checked against the configured tokens only, never the database, so a flood of random
/// tokens on the internal route costs no lookups.
pub struct InternalCaller;

impl<S> FromRequestParts<S> for InternalCaller
where
    S: Send + Sync,
    Auth: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let token = bearer(parts).unwrap_or("");
        let auth = Auth::from_ref(state).settings;
        if is_token(token, auth.internal()) || is_token(token, &auth.admin_token) {
            Ok(Self)
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "internal token required",
            ))
        }
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    Auth: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // Resolved once per request by `limit_in_flight`, which keys the tenant's share on it.
        if let Some(c) = parts.extensions.get::<Caller>() {
            return Ok(c.clone());
        }
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
        let token = bearer(parts)
            .ok_or_else(|| unauthorized("missing bearer token in the Authorization header"))?;
        let Auth {
            settings: auth,
            tenants,
        } = Auth::from_ref(state);
        if is_token(token, &auth.admin_token) {
            return Ok(Self::Admin);
        }
        if is_token(token, auth.internal()) {
            return Ok(Self::Internal);
        }
        if !token.starts_with("msb_") && !auth.admin_api_on() {
            // Not a tenant token, so meant for the admin: say why it cannot work.
            return Err(ApiError::new(StatusCode::FORBIDDEN, ADMIN_API_OFF));
        }
        if token.len() > 128 || !token.starts_with("msb_") {
            return Err(unauthorized("invalid token"));
        }
        match tenants.authenticate(token).await? {
            Some(t) => Ok(Self::Tenant(t)),
            None => Err(unauthorized("invalid token")),
        }
    }
}

/// The in-flight limits of one process: a global pool of request slots, and a cap per
/// tenant so one tenant's slow requests cannot take every slot.
pub struct InFlight {
    global: Arc<Semaphore>,
    per_tenant: Mutex<HashMap<TenantName, usize>>,
    per_tenant_max: usize,
    queue_timeout: Duration,
}

impl InFlight {
    pub fn new(s: &HttpSettings) -> Self {
        Self {
            global: Arc::new(Semaphore::new(s.max_in_flight)),
            per_tenant: Mutex::new(HashMap::new()),
            per_tenant_max: s.max_in_flight_per_tenant,
            queue_timeout: Duration::from_millis(s.queue_timeout_ms),
        }
    }

    /// Refuses new requests (they get 503); those running finish.
    pub fn close(&self) {
        self.global.close();
    }

    /// Requests `tenant` has in flight now.
    pub fn of(&self, tenant: &TenantName) -> usize {
        self.per_tenant
            .lock()
            .map_or(0, |m| m.get(tenant).copied().unwrap_or(0))
    }

    /// A slot of `tenant`'s share, or `None` when it already has `per_tenant_max`.
    fn enter(self: &Arc<Self>, tenant: &TenantName) -> Option<TenantSlot> {
        let mut m = self.per_tenant.lock().ok()?;
        let n = m.entry(tenant.clone()).or_default();
        if *n >= self.per_tenant_max {
            return None;
        }
        *n += 1;
        Some(TenantSlot {
            limits: self.clone(),
            tenant: tenant.clone(),
        })
    }
}

/// One request of a tenant's share; given back when dropped. The map only holds tenants with
/// requests in flight, so it stays as small as the traffic.
struct TenantSlot {
    limits: Arc<InFlight>,
    tenant: TenantName,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.limits.per_tenant.lock()
            && let Some(n) = m.get_mut(&self.tenant)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.tenant);
            }
        }
    }
}

/// Seconds a client told to come back (429, 503) should wait.
const RETRY_AFTER_S: &str = "1";

fn retry_later(status: StatusCode, message: String) -> Response {
    let mut r = ApiError::new(status, message).into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    r
}

/// Bounds the requests served at once: a request waits at most `queue_timeout_ms` for a
/// global slot (then 503), and a tenant over its share gets 429 at once. Both answers carry
/// `Retry-After`. The caller is resolved here, once, under the global slot, so token lookups
/// are bounded too; the handler's `Caller` extractor reuses it.
async fn limit_in_flight(State(p): State<Edge>, req: Request, next: Next) -> Response {
    let limits = &p.in_flight;
    let _global: OwnedSemaphorePermit =
        match tokio::time::timeout(limits.queue_timeout, limits.global.clone().acquire_owned())
            .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => {
                return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                    .into_response();
            }
            Err(_) => {
                p.metrics
                    .add("mysimbdp_http_rejected_total", "", "http", "busy", 1);
                return retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "server busy: no request slot freed within {} ms; retry later",
                        limits.queue_timeout.as_millis()
                    ),
                );
            }
        };
    let (mut parts, body) = req.into_parts();
    let mut _slot = None;
    if parts.headers.contains_key(header::AUTHORIZATION) {
        // An error is left for the handler's extractor to report, in its place.
        if let Ok(caller) = Caller::from_request_parts(&mut parts, &p).await {
            if let Caller::Tenant(t) = &caller {
                match limits.enter(t) {
                    Some(slot) => _slot = Some(slot),
                    None => {
                        p.metrics.add(
                            "mysimbdp_http_rejected_total",
                            t.as_str(),
                            "http",
                            "tenant_limit",
                            1,
                        );
                        return retry_later(
                            StatusCode::TOO_MANY_REQUESTS,
                            format!(
                                "tenant `{t}` already has {} requests in flight, its limit; retry when one has finished",
                                limits.per_tenant_max
                            ),
                        );
                    }
                }
            }
            parts.extensions.insert(caller);
        }
    }
    next.run(Request::from_parts(parts, body)).await
}

/// How far a body's deadline has moved for the bytes received: one second per `min_rate`.
fn earned(received: u64, min_rate: u64) -> Duration {
    if min_rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs(received / min_rate)
        + Duration::from_nanos((received % min_rate) * 1_000_000_000 / min_rate)
}

/// What the body of one request has done so far.
#[derive(Default)]
struct BodyProgress {
    received: AtomicU64,
    timed_out: AtomicBool,
}

/// The request body, cut off with an error when it falls behind its deadline:
/// `start + body_timeout + received / min_rate` (so a slow trickle cannot hold a handler, and
/// a large upload at a decent rate is never cut).
fn guarded_body(
    body: axum::body::Body,
    start: Instant,
    timeout: Duration,
    min_rate: u64,
    progress: Arc<BodyProgress>,
) -> axum::body::Body {
    let stream = futures::stream::unfold(Some(body.into_data_stream()), move |state| {
        let progress = progress.clone();
        async move {
            let mut stream = state?;
            let deadline =
                start + timeout + earned(progress.received.load(Ordering::Relaxed), min_rate);
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    progress
                        .received
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    Some((Ok(chunk), Some(stream)))
                }
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
                Ok(None) => None,
                Err(_) => {
                    progress.timed_out.store(true, Ordering::Relaxed);
                    Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "request body timed out",
                        )),
                        None,
                    ))
                }
            }
        }
    });
    axum::body::Body::from_stream(stream)
}

/// Request and body-read timeouts. A body that falls behind its deadline (see
/// [`guarded_body`]) makes the request end with 408, whatever the handler made of the
/// error, and the connection is closed. A handler that has not answered
/// `request_timeout_ms` (plus the time its body earned) after the request arrived is
/// dropped, and the client gets 503.
async fn timeouts(State(p): State<Edge>, req: Request, next: Next) -> Response {
    let s = &p.http;
    let start = Instant::now();
    let progress = Arc::new(BodyProgress::default());
    let req = if s.body_timeout_ms > 0 {
        req.map(|b| {
            guarded_body(
                b,
                start,
                Duration::from_millis(s.body_timeout_ms),
                s.body_min_rate,
                progress.clone(),
            )
        })
    } else {
        req
    };
    let request_timeout = Duration::from_millis(s.request_timeout_ms);
    let deadline = || {
        start + request_timeout + earned(progress.received.load(Ordering::Relaxed), s.body_min_rate)
    };
    let path = req.uri().path().to_owned();
    let handler = next.run(req);
    tokio::pin!(handler);
    let response = loop {
        tokio::select! {
            r = &mut handler => break r,
            () = tokio::time::sleep_until(deadline()) => {
                // The deadline may have moved while this timer slept.
                if Instant::now() < deadline() {
                    continue;
                }
                p.metrics.add("mysimbdp_http_rejected_total", "", "http", "request_timeout", 1);
                tracing::warn!(%path, timeout_ms = s.request_timeout_ms, "request timed out");
                return retry_later(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the request was not answered within {} ms; retry later", s.request_timeout_ms),
                );
            }
        }
    };
    if progress.timed_out.load(Ordering::Relaxed) {
        let received = progress.received.load(Ordering::Relaxed);
        p.metrics.add(
            "mysimbdp_http_rejected_total",
            "",
            "http",
            "body_timeout",
            1,
        );
        tracing::warn!(%path, received, "request body too slow: cut off");
        let mut r = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body arrived too slowly: {received} bytes in {:.1} s (allowed: {} ms, plus one second per {} bytes received)",
                start.elapsed().as_secs_f64(),
                s.body_timeout_ms,
                s.body_min_rate
            ),
        )
        .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    response
}

/// Liveness: answers while the process serves, never waiting behind tenant traffic.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "platform",
    responses((status = 200, description = "alive", body = String, content_type = "text/plain", example = "ok"))
)]
async fn healthz() -> &'static str {
    "ok"
}

/// Anyone gets the counters summed over tenants; the admin token adds the tenant label.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "platform",
    responses((status = 200, description = "Prometheus counters, OpenMetrics text; per tenant with the admin token", body = String, content_type = "application/openmetrics-text")),
    security((), ("admin" = []))
)]
async fn metrics(State(p): State<Edge>, headers: axum::http::HeaderMap) -> Response {
    let admin = &p.auth.settings.admin_token;
    let is_admin = !admin.is_empty()
        && headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), admin.as_bytes()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        p.metrics.render(is_admin),
    )
        .into_response()
}

/// The HTTP edge's own routes in the API document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(healthz, metrics))]
pub struct EdgeDoc;

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// A known path with a method it does not have (axum adds the `Allow` header).
async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed here"),
    )
}

/// The routers of the components a process runs (each already holding its own state) with
/// health, metrics and the shared middleware. A component the process does not run has no
/// routes here, so its paths answer 404 like any unknown path. `public` routes are under the
/// in-flight limits; `internal` ones (the coredms RPC, whose callers are other components,
/// each bounded by its own limits) and `/healthz` and `/metrics` are not, so they never
/// wait behind tenant traffic. Every route has the request and body-read timeouts.
pub fn compose(edge: Edge, public: Vec<Router>, internal: Vec<Router>) -> Router {
    let mut app = Router::new();
    for c in public {
        app = app.merge(c);
    }
    let mut app = app
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            edge.clone(),
            limit_in_flight,
        ))
        // Merged after the limit layer, so outside it.
        .merge(
            Router::new()
                .route("/healthz", get(healthz))
                .route("/metrics", get(metrics))
                .with_state(edge.clone()),
        );
    for c in internal {
        app = app.merge(c);
    }
    // After every route: it applies to the routes registered so far.
    app.method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(edge, timeouts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_equal_only_when_every_byte_and_the_length_match() {
        assert!(constant_time_eq(b"s3cret-token", b"s3cret-token"));
        assert!(!constant_time_eq(b"s3cret-token", b"s3cret-tokem"));
        assert!(!constant_time_eq(b"s3cret-token", b"s3cret-toke"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn a_body_earns_one_second_per_min_rate_bytes() {
        assert_eq!(earned(0, 1000), Duration::ZERO);
        assert_eq!(earned(2500, 1000), Duration::from_millis(2500));
        assert_eq!(earned(u64::MAX, 0), Duration::ZERO);
    }

    #[test]
    fn a_tenant_gets_at_most_its_share_and_slots_come_back() {
        let limits = Arc::new(InFlight::new(&HttpSettings {
            max_in_flight_per_tenant: 2,
            ..Default::default()
        }));
        let a = TenantName::parse("a").expect("name");
        let b = TenantName::parse("b").expect("name");
        let s1 = limits.enter(&a).expect("first");
        let _s2 = limits.enter(&a).expect("second");
        assert!(limits.enter(&a).is_none(), "a third is over the share");
        assert!(limits.enter(&b).is_some(), "another tenant is not affected");
        drop(s1);
        assert_eq!(limits.of(&a), 1);
        assert!(limits.enter(&a).is_some());
    }
}
