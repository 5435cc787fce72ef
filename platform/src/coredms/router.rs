//! coredms's HTTP API: tenants, logs, analytics, stored documents, and the internal RPC
//! endpoint other components use when they run in their own processes.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRef, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use super::Call;
use super::{CoreDms, CoreError, MongoStore};
use crate::api::{
    CreateTenant, CreatedTenant, DocumentsPage, ErrorBody, LogEntry, StreamReportAnswer,
    SummaryAnswer,
};
use crate::config::Settings;
use crate::http::{
    ApiError, Auth, Caller, InternalCaller, JsonBody, PathArgs, QueryArgs, TenantTokens,
};
use crate::logs::{LogFilter, LogQuery, Source, StreamReport, Summary, SummaryQuery, period_s};
use crate::tenants::{
    AdminPatch, Constraints, Profile, ProfilePatch, TenantName, check_description,
};

/// How a coredms error answers an HTTP request (the HTTP edge below knows no storage).
impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match &e {
            CoreError::TenantNotFound(t) => Self::tenant_not_found(t),
            CoreError::TenantExists(_) => Self::new(StatusCode::CONFLICT, e.to_string()),
            CoreError::Invalid(_) => Self::bad_request(e.to_string()),
            CoreError::Conflict(_) => Self::new(StatusCode::CONFLICT, e.to_string()),
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

impl TenantTokens for CoreDms {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<TenantName>, ApiError>> {
        Box::pin(async move { Ok(CoreDms::authenticate(self, token).await?) })
    }
}

/// Something done when a tenant is created, before the request is answered: the data
/// broker declares the tenant's queues, so it can publish at once.
/// Its error is the implementor's own (boxed: coredms knows no component above it).
pub trait OnNewTenant: Send + Sync {
    fn tenant_created<'a>(
        &'a self,
        tenant: &'a TenantName,
    ) -> BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>;
}

/// What coredms' endpoints need: the store this process holds, the defaults for new tenants,
/// and the internal RPC's slots.
#[derive(Clone)]
pub struct CoredmsApi {
    store: Arc<MongoStore>,
    coredms: CoreDms,
    settings: Arc<Settings>,
    on_new_tenant: Option<Arc<dyn OnNewTenant>>,
    rpc_slots: Arc<tokio::sync::Semaphore>,
    auth: Auth,
}

impl CoredmsApi {
    pub fn new(
        store: Arc<MongoStore>,
        settings: Arc<Settings>,
        on_new_tenant: Option<Arc<dyn OnNewTenant>>,
        auth: Auth,
    ) -> Self {
        Self {
            coredms: CoreDms::Local(store.clone()),
            store,
            settings,
            on_new_tenant,
            rpc_slots: Arc::new(tokio::sync::Semaphore::new(RPC_SLOTS)),
            auth,
        }
    }
}

impl FromRef<CoredmsApi> for Auth {
    fn from_ref(s: &CoredmsApi) -> Auth {
        s.auth.clone()
    }
}

pub fn router(state: CoredmsApi) -> Router {
    Router::new()
        .route("/v1/tenants", post(create_tenant))
        .route("/v1/tenants/{t}", get(get_tenant).patch(patch_tenant))
        .route("/v1/tenants/{t}/logs", get(download_logs))
        .route("/v1/tenants/{t}/stream/report", get(stream_report))
        .route("/v1/tenants/{t}/collections/{c}/documents", get(documents))
        .route("/v1/logs/summary", get(summary))
        .with_state(state)
}

/// coredms' part of the API document: its routes above, and the RPC.
#[derive(OpenApi)]
#[openapi(paths(
    create_tenant,
    get_tenant,
    patch_tenant,
    download_logs,
    summary,
    stream_report,
    documents,
    rpc
))]
pub struct CoredmsDoc;

/// The internal RPC, accepting bodies up to `http.max_rpc_bytes`: bulk writes arrive in
/// chunks well under it (`http.rpc_chunk_bytes`).
pub fn rpc_router(state: CoredmsApi) -> Router {
    let max_bytes = state.settings.http.max_rpc_bytes;
    Router::new()
        .route(
            "/internal/v1/rpc",
            post(rpc).layer(axum::extract::DefaultBodyLimit::max(max_bytes)),
        )
        .with_state(state)
}

/// Creates a tenant (admin): its database, its queues and its token, shown this once.
#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    request_body = CreateTenant,
    responses(
        (status = 201, description = "created; the token is shown only here", body = CreatedTenant),
        (status = 400, description = "invalid name or malformed JSON", body = ErrorBody),
        (status = 403, description = "not the admin, or the admin API is off", body = ErrorBody),
        (status = 409, description = "the tenant exists", body = ErrorBody),
        (status = 415, description = "the body is not application/json", body = ErrorBody),
        (status = 422, description = "JSON that is not a tenant", body = ErrorBody),
    ),
    security(("admin" = []))
)]
async fn create_tenant(
    State(p): State<CoredmsApi>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateTenant>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let (name, limits) = req.into_parts();
    let name = TenantName::parse(&name)?;
    let mut c = Constraints::from_defaults(&p.settings.limits, &p.settings.apps);
    if let Some(v) = limits.max_file_bytes {
        c.max_file_bytes = v;
    }
    if let Some(v) = limits.max_staged_files {
        c.max_staged_files = v;
    }
    if let Some(v) = limits.formats {
        c.formats = v;
    }
    if let Some(v) = limits.app_limits {
        c.app_limits = v.apply(c.app_limits);
    }
    // Refused before anything is created, so a bad request leaves no tenant behind (the
    // constraints are checked by `create_tenant` itself; the description is set after it).
    if let Some(d) = &limits.tenant.description {
        check_description(d).map_err(ApiError::bad_request)?;
    }
    let (mut profile, token) = p.coredms.create_tenant(&name, c).await?;
    // The stream topology exists before the tenant can publish anything.
    if let Some(hook) = &p.on_new_tenant {
        hook.tenant_created(&name).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("tenant created but its queues could not be declared: {e}; retry"),
            )
        })?;
    }
    if limits.tenant.auto_ingest.is_some() || limits.tenant.description.is_some() {
        profile = p
            .coredms
            .update_tenant(
                &name,
                AdminPatch {
                    tenant: limits.tenant,
                    ..Default::default()
                },
            )
            .await?;
    }
    tracing::info!(tenant = %name, "tenant created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedTenant {
            name: profile.name.to_string(),
            database: profile.database.clone(),
            token,
            profile,
        }),
    )
        .into_response())
}

/// A tenant's profile (the tenant itself or the admin).
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}",
    tag = "tenants",
    params(("t" = String, Path, description = "the tenant's name")),
    responses(
        (status = 200, description = "the profile", body = Profile),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn get_tenant(
    State(p): State<CoredmsApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    Ok(Json(p.coredms.tenant(&t).await?).into_response())
}

/// Changes a profile: a tenant changes `description` and `auto_ingest`, the admin also the
/// limits.
#[utoipa::path(
    patch,
    path = "/v1/tenants/{t}",
    tag = "tenants",
    params(("t" = String, Path, description = "the tenant's name")),
    request_body = AdminPatch,
    responses(
        (status = 200, description = "the profile changed", body = Profile),
        (status = 400, description = "malformed JSON, or a change the admin cannot make", body = ErrorBody),
        (status = 403, description = "a tenant changing its limits", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
        (status = 415, description = "the body is not application/json", body = ErrorBody),
        (status = 422, description = "JSON that is not an object", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn patch_tenant(
    State(p): State<CoredmsApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let patch = if caller == Caller::Admin {
        serde_json::from_value::<AdminPatch>(body)
            .map_err(|e| ApiError::bad_request(format!("invalid profile change: {e}")))?
    } else {
        let tenant: ProfilePatch = serde_json::from_value(body).map_err(|e| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                format!("invalid profile change: {e} (limits are changed by the admin)"),
            )
        })?;
        AdminPatch {
            tenant,
            ..Default::default()
        }
    };
    Ok(Json(p.coredms.update_tenant(&t, patch).await?).into_response())
}

/// Entries per chunk of the streamed download.
const LOG_CHUNK: usize = 512;

/// The tenant's ingestion log as a JSON file, oldest first, streamed.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/logs",
    tag = "logs",
    params(("t" = String, Path, description = "the tenant's name"), LogQuery),
    responses(
        (status = 200, description = "the log entries, as a file to save", body = [LogEntry],
            headers(("Content-Disposition" = String, description = "`attachment; filename=\"<tenant>-logs.json\"`"))),
        (status = 400, description = "a filter that does not parse", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn download_logs(
    State(p): State<CoredmsApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    QueryArgs(q): QueryArgs<LogQuery>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let filter = q.parse().map_err(ApiError::bad_request)?;
    // A JSON array written entry by entry: memory stays flat however long the log is.
    let stream = log_array_stream(p.store.log_cursor(Some(&t), &filter).await?);
    let file = format!("{t}-logs.json");
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `[entry,entry,...]` from a cursor, in chunks.
fn log_array_stream(
    cursor: super::mongodb::LogStream,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    enum St {
        Open(super::mongodb::LogStream, bool),
        Done,
    }
    futures::stream::unfold(St::Open(cursor, false), |st| async move {
        let St::Open(mut cursor, mut started) = st else {
            return None;
        };
        let mut out = Vec::with_capacity(LOG_CHUNK * 200);
        for _ in 0..LOG_CHUNK {
            match cursor.next().await {
                Some(Ok(e)) => {
                    out.push(if started { b',' } else { b'[' });
                    started = true;
                    if let Err(e) = serde_json::to_writer(&mut out, &e) {
                        return Some((Err(std::io::Error::other(e)), St::Done));
                    }
                }
                Some(Err(e)) => return Some((Err(std::io::Error::other(e)), St::Done)),
                None => {
                    out.extend_from_slice(if started { b"]" } else { b"[]" });
                    return Some((Ok(Bytes::from(out)), St::Done));
                }
            }
        }
        Some((Ok(Bytes::from(out)), St::Open(cursor, started)))
    })
}

/// Counts and bytes by tenant, status, reason and time bucket over every tenant's log
/// (admin).
#[utoipa::path(
    get,
    path = "/v1/logs/summary",
    tag = "logs",
    params(SummaryQuery),
    responses(
        (status = 200, description = "the groups", body = SummaryAnswer),
        (status = 400, description = "a filter that does not parse", body = ErrorBody),
        (status = 403, description = "not the admin", body = ErrorBody),
    ),
    security(("admin" = []))
)]
async fn summary(
    State(p): State<CoredmsApi>,
    caller: Caller,
    QueryArgs(q): QueryArgs<SummaryQuery>,
) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let (filter, bucket_s) = q.parse().map_err(ApiError::bad_request)?;
    let mut cursor = p.store.log_cursor(None, &filter).await?;
    let mut s = Summary::new(bucket_s);
    let mut total = 0u64;
    while let Some(e) = cursor.next().await {
        let e = e?;
        total += 1;
        s.add(&e);
    }
    Ok(Json(SummaryAnswer {
        entries: total,
        groups: s.rows(),
    })
    .into_response())
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ReportQuery {
    /// Entries at or after this time (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Entries before this time (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// Period length in seconds, 1 to a year (default `stream.report_period_s`).
    #[param(minimum = 1, maximum = 31622400)]
    period_s: Option<u64>,
}

/// Per period: messages stored, failures, duplicates, skipped, bytes, average and p99
/// ingestion time, from the log; and the stream managers' latest changes of the tenant's
/// consumers.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/stream/report",
    tag = "stream",
    params(("t" = String, Path, description = "the tenant's name"), ReportQuery),
    responses(
        (status = 200, description = "the periods, oldest first", body = StreamReportAnswer),
        (status = 400, description = "a filter that does not parse", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn stream_report(
    State(p): State<CoredmsApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    QueryArgs(q): QueryArgs<ReportQuery>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let period = period_s(q.period_s, p.settings.stream.report_period_s, "period_s")
        .map_err(ApiError::bad_request)?;
    let mut filter: LogFilter = LogQuery {
        since: q.since,
        until: q.until,
        ..Default::default()
    }
    .parse()
    .map_err(ApiError::bad_request)?;
    filter.source = Some(Source::Stream);
    let mut cursor = p.store.log_cursor(Some(&t), &filter).await?;
    let mut r = StreamReport::new(period);
    while let Some(e) = cursor.next().await {
        r.add(&e?);
    }
    let scaling = p.store.scaling(&t).await?;
    Ok(Json(StreamReportAnswer {
        tenant: t.to_string(),
        periods: r.periods(),
        scaling,
    })
    .into_response())
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Page {
    /// Documents in the page, 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Documents passed over first, 0 to 2^53 (default 0).
    #[param(maximum = 9007199254740992.0)]
    skip: Option<u64>,
}

const MAX_PAGE: i64 = 1000;

/// The largest `skip`: the largest integer every JSON client holds exactly (the database
/// refuses one past `i64::MAX`).
const MAX_SKIP: u64 = 1 << 53;

/// A page of a collection's stored documents, and the collection's size.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/collections/{c}/documents",
    tag = "documents",
    params(("t" = String, Path, description = "the tenant's name"), ("c" = String, Path, description = "the collection"), Page),
    responses(
        (status = 200, description = "the page", body = DocumentsPage),
        (status = 400, description = "an invalid collection name or page", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn documents(
    State(p): State<CoredmsApi>,
    caller: Caller,
    PathArgs((t, c)): PathArgs<(String, String)>,
    QueryArgs(page): QueryArgs<Page>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    crate::model::check_collection(&c).map_err(ApiError::bad_request)?;
    let limit = page.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let skip = page.skip.unwrap_or(0);
    if skip > MAX_SKIP {
        return Err(ApiError::bad_request(format!(
            "skip must be at most {MAX_SKIP}"
        )));
    }
    let docs = p.coredms.documents(&t, &c, limit, skip).await?;
    let total = p.coredms.count_documents(&t, &c).await?;
    Ok(Json(DocumentsPage {
        total,
        documents: docs,
    })
    .into_response())
}

/// Bodies above this are decoded off the async threads.
const RPC_INLINE_DECODE: usize = 256 * 1024;

/// RPC calls served at once: each holds its decoded body (many times its bytes), and the
/// route is outside the tenants' in-flight limits.
pub const RPC_SLOTS: usize = 16;

/// The internal RPC the other components of a split deployment call coredms with:
/// `{"op": "<operation>", ...arguments}`, answered with the operation's result.
#[utoipa::path(
    post,
    path = "/internal/v1/rpc",
    tag = "internal",
    request_body(content = Object, description = "a call: `op` and its arguments"),
    responses(
        (status = 200, description = "the operation's result", body = Object),
        (status = 400, description = "not a call", body = ErrorBody),
        (status = 403, description = "not the internal (or admin) token", body = ErrorBody),
        (status = 413, description = "over `http.max_rpc_bytes`", body = ErrorBody),
    ),
    security(("internal" = []), ("admin" = []))
)]
async fn rpc(
    State(p): State<CoredmsApi>,
    _caller: InternalCaller,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    // The caller is checked, and a slot taken, before the body is read.
    let _slot = p
        .rpc_slots
        .acquire()
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
    let limit = p.settings.http.max_rpc_bytes;
    let body: Bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("RPC body over {limit} bytes (http.max_rpc_bytes)"),
        )
    })?;
    let decode = |b: &[u8]| {
        serde_json::from_slice::<Call>(b)
            .map_err(|e| ApiError::bad_request(format!("invalid RPC call: {e}")))
    };
    let call = if body.len() <= RPC_INLINE_DECODE {
        decode(&body)?
    } else {
        tokio::task::spawn_blocking(move || decode(&body)).await??
    };
    Ok(call.serve(&p.store).await)
}
