//! Uploading and reading tenant apps: `PUT/GET /v1/tenants/{t}/apps/{batch|stream}`.

use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use serde_json::json;
use utoipa::OpenApi;

use crate::api::{ActiveApp, AppFunctions, AppUploaded, ErrorBody};
use crate::apps::{MAX_SOURCE_BYTES, compile};
use crate::coredms::CoreDms;
use crate::http::{ApiError, Auth, BodyBytes, Caller, PathArgs};
use crate::model::AppKind;

/// What the app endpoints need: apps are stored through coredms.
#[derive(Clone)]
pub struct AppsApi {
    pub coredms: CoreDms,
    pub auth: Auth,
}

impl FromRef<AppsApi> for Auth {
    fn from_ref(s: &AppsApi) -> Auth {
        s.auth.clone()
    }
}

pub fn router(state: AppsApi) -> Router {
    Router::new()
        .route(
            "/v1/tenants/{t}/apps/{kind}",
            put(upload)
                .get(current)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_SOURCE_BYTES)),
        )
        .with_state(state)
}

/// The apps API's part of the API document.
#[derive(OpenApi)]
#[openapi(paths(upload, current))]
pub struct AppsDoc;

fn kind(raw: &str) -> Result<AppKind, ApiError> {
    match raw {
        "batch" => Ok(AppKind::Batch),
        "stream" => Ok(AppKind::Stream),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no app kind `{raw}`: use batch or stream"),
        )),
    }
}

/// Uploads the tenant's batch or stream app (Luau source), compiled and checked first; it
/// becomes the active version.
#[utoipa::path(
    put,
    path = "/v1/tenants/{t}/apps/{kind}",
    tag = "apps",
    params(("t" = String, Path, description = "the tenant's name"), ("kind" = AppKind, Path, description = "which app")),
    request_body(content = String, content_type = "text/plain", description = "the app's Luau source, UTF-8"),
    responses(
        (status = 200, description = "the new active version", body = AppUploaded),
        (status = 400, description = "not UTF-8, or does not compile (`line`, `column` where known)", body = ErrorBody),
        (status = 404, description = "no such tenant or app kind", body = ErrorBody),
        (status = 413, description = "over the source size limit", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn upload(
    State(p): State<AppsApi>,
    caller: Caller,
    PathArgs((t, k)): PathArgs<(String, String)>,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let kind = kind(&k)?;
    let source = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("app source is not valid UTF-8"))?
        .to_owned();
    let profile = p.coredms.tenant(&t).await?;
    let limits = profile.constraints.app_limits;
    let src = source.clone();
    let compiled = tokio::task::spawn_blocking(move || compile(&src, &limits))
        .await?
        .map_err(|e| {
            let at = match (e.line, e.column) {
                (Some(l), Some(c)) => format!(" at line {l}, column {c}"),
                (Some(l), None) => format!(" at line {l}"),
                _ => String::new(),
            };
            ApiError::bad_request(format!("app does not compile{at}: {}", e.message))
                .with_details(json!({"line": e.line, "column": e.column}))
        })?;
    let version = p.coredms.save_app(&t, kind, &source).await?;
    tracing::info!(tenant = %t, kind = kind.as_str(), version, "app uploaded");
    Ok(Json(AppUploaded {
        version,
        kind,
        functions: AppFunctions {
            map: compiled.shape.has_map,
            ingest: compiled.shape.has_ingest,
        },
    })
    .into_response())
}

/// The tenant's active app of a kind.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/apps/{kind}",
    tag = "apps",
    params(("t" = String, Path, description = "the tenant's name"), ("kind" = AppKind, Path, description = "which app")),
    responses(
        (status = 200, description = "the active version", body = ActiveApp),
        (status = 404, description = "no app uploaded, or no such tenant or kind", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn current(
    State(p): State<AppsApi>,
    caller: Caller,
    PathArgs((t, k)): PathArgs<(String, String)>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let kind = kind(&k)?;
    match p.coredms.active_app(&t, kind).await? {
        Some(app) => Ok(Json(ActiveApp {
            version: app.version,
            kind,
            source: app.source,
            created_at: app.created_at,
        })
        .into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no {} app uploaded", kind.as_str()),
        )),
    }
}
