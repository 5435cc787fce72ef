//! HTTP plumbing shared by every component: the one error-to-status mapping, bearer-token
//! authentication, JSON extractors with JSON errors, and the composition of routers.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::Platform;
use crate::coredms::CoreError;
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

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let (Some(serde_json::Value::Object(d)), Some(b)) = (self.details, body.as_object_mut())
        {
            b.extend(d);
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match &e {
            CoreError::TenantNotFound(t) => Self::tenant_not_found(t),
            CoreError::TenantExists(_) => Self::new(StatusCode::CONFLICT, e.to_string()),
            CoreError::Invalid(_) => Self::bad_request(e.to_string()),
            CoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "database unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database unavailable, retry later",
                )
            }
            CoreError::Database(detail) => {
                tracing::error!(error = %detail, "database error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
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

/// `axum::Json` whose rejections are JSON errors like every other error.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// `axum::extract::Query` with JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryArgs<T>(pub T);

/// `axum::extract::Path` with JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct PathArgs<T>(pub T);

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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequestParts<Arc<Platform>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        platform: &Arc<Platform>,
    ) -> Result<Self, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthorized("missing bearer token in the Authorization header"))?;
        let auth = &platform.settings.auth;
        if !auth.admin_token.is_empty()
            && constant_time_eq(token.as_bytes(), auth.admin_token.as_bytes())
        {
            return Ok(Self::Admin);
        }
        let internal = auth.internal();
        if !internal.is_empty() && constant_time_eq(token.as_bytes(), internal.as_bytes()) {
            return Ok(Self::Internal);
        }
        if token.len() > 128 || !token.starts_with("msb_") {
            return Err(unauthorized("invalid token"));
        }
        match platform.coredms.authenticate(token).await? {
            Some(t) => Ok(Self::Tenant(t)),
            None => Err(unauthorized("invalid token")),
        }
    }
}

/// Bounds the requests served at once; the rest wait their turn.
async fn limit_in_flight(State(p): State<Arc<Platform>>, req: Request, next: Next) -> Response {
    let Ok(_permit) = p.in_flight.acquire().await else {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    };
    next.run(req).await
}

async fn healthz() -> &'static str {
    "ok"
}

async fn metrics(State(p): State<Arc<Platform>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        p.metrics.render(),
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The routers of the given components with health, metrics and the shared middleware.
pub fn compose(platform: Arc<Platform>, components: Vec<Router<Arc<Platform>>>) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics));
    for c in components {
        app = app.merge(c);
    }
    app.fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            platform.clone(),
            limit_in_flight,
        ))
        .with_state(platform)
}
