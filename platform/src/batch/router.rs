//! The batch API: stage files, start ingestion, read per-file status.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use super::staging::UploadError;
use super::{BatchError, BatchManager, check_file_name};
use crate::api::{ErrorBody, FileList, IngestStarted};
use crate::config::Format;
use crate::coredms::CoreDms;
use crate::http::{ApiError, Auth, Caller, PathArgs, QueryArgs};
use crate::model::{FileRecord, FileState};
use crate::tenants::TenantName;

/// What the file endpoints need: this process's batch manager, and coredms for file status.
#[derive(Clone)]
pub struct BatchApi {
    pub manager: Arc<BatchManager>,
    pub coredms: CoreDms,
    pub auth: Auth,
}

impl FromRef<BatchApi> for Auth {
    fn from_ref(s: &BatchApi) -> Auth {
        s.auth.clone()
    }
}

pub fn router(state: BatchApi) -> Router {
    Router::new()
        .route("/v1/tenants/{t}/files", get(list))
        .route(
            "/v1/tenants/{t}/files/{name}",
            put(upload)
                .get(status)
                .delete(remove)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/tenants/{t}/files/{name}/ingest", post(ingest))
        .route("/v1/tenants/{t}/files/{name}/replay", post(replay))
        .with_state(state)
}

/// The batch manager's part of the API document.
#[derive(OpenApi)]
#[openapi(paths(upload, ingest, replay, status, list, remove))]
pub struct BatchDoc;

impl From<BatchError> for ApiError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Core(c) => c.into(),
            BatchError::NotStaged(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            BatchError::Busy(_)
            | BatchError::Raced(_)
            | BatchError::NeverIngested(_)
            | BatchError::NothingToReplay(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            BatchError::Io(io) => {
                tracing::error!(error = %io, "staging io error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

/// The default collection for a file: its name without extension, as a collection name.
fn collection_for(name: &str) -> String {
    let stem = name.rsplit_once('.').map_or(name, |(s, _)| s);
    let c: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if c.is_empty() { "data".into() } else { c }
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    /// Collection the records go to (default: the file name without extension).
    collection: Option<String>,
}

/// Stages a data file, streamed to disk and checked against the tenant's limits; with
/// `auto_ingest` its ingestion starts too.
#[utoipa::path(
    put,
    path = "/v1/tenants/{t}/files/{name}",
    tag = "files",
    params(("t" = String, Path, description = "the tenant's name"), ("name" = String, Path, description = "the file's name: its extension gives its format (.csv, .json, .ndjson, .jsonl)"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes"),
    responses(
        (status = 201, description = "staged", body = FileRecord),
        (status = 400, description = "an invalid file or collection name, or an empty body", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
        (status = 409, description = "the file is being ingested", body = ErrorBody),
        (status = 413, description = "over the tenant's file size limit", body = ErrorBody),
        (status = 415, description = "a format the tenant may not upload, or none", body = ErrorBody),
        (status = 429, description = "the tenant has its limit of staged files", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn upload(
    State(p): State<BatchApi>,
    caller: Caller,
    PathArgs((t, name)): PathArgs<(String, String)>,
    QueryArgs(q): QueryArgs<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let m = &p.manager;
    check_file_name(&name).map_err(ApiError::bad_request)?;
    let collection = q.collection.unwrap_or_else(|| collection_for(&name));
    crate::model::check_collection(&collection).map_err(ApiError::bad_request)?;
    let profile = p.coredms.tenant(&t).await?;
    let c = &profile.constraints;
    let format = Format::from_file_name(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unknown format for `{name}`: name files .csv, .json, .ndjson or .jsonl"),
        )
    })?;
    if !c.formats.contains(&format) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("format {format} is not accepted for tenant `{t}`"),
        ));
    }
    // Saves reading a body only to refuse it; the compare-and-set below is what decides.
    if let Some(rec) = p.coredms.file(&t, &name).await?
        && rec.state == FileState::Ingesting
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("file `{name}` is being ingested; upload it again when it is done"),
        ));
    }
    let names = m.staging.names(&t).await.map_err(BatchError::Io)?;
    if !names.contains(&name) && names.len() >= c.max_staged_files as usize {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "tenant `{t}` already has {} staged files, the limit",
                c.max_staged_files
            ),
        ));
    }
    let staged = m
        .staging
        .write(&t, &name, body.into_data_stream(), c.max_file_bytes)
        .await
        .map_err(|e| match e {
            UploadError::TooLarge(_) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            UploadError::Body(_) | UploadError::Empty => ApiError::bad_request(e.to_string()),
            UploadError::Io(io) => BatchError::Io(io).into(),
        })?;
    let rec = FileRecord::staged(
        &t,
        &name,
        format,
        staged.bytes,
        staged.sha256,
        collection,
        staged.upload,
    );
    // The copy is in place under its own upload id; the record now names it, or (409, the
    // name went `ingesting` meanwhile) the copy goes and the record is untouched.
    let rec = m.stage(rec).await?;
    let rec = if profile.auto_ingest {
        m.start(&t, &name).await?
    } else {
        rec
    };
    Ok((StatusCode::CREATED, Json(public(rec))).into_response())
}

/// Starts ingesting a staged file.
#[utoipa::path(
    post,
    path = "/v1/tenants/{t}/files/{name}/ingest",
    tag = "files",
    params(("t" = String, Path, description = "the tenant's name"), ("name" = String, Path, description = "the file's name: its extension gives its format (.csv, .json, .ndjson, .jsonl)")),
    responses(
        (status = 202, description = "started", body = IngestStarted),
        (status = 400, description = "an invalid file name", body = ErrorBody),
        (status = 404, description = "no such file or tenant", body = ErrorBody),
        (status = 409, description = "being ingested already, or an upload or another start came first", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn ingest(
    State(p): State<BatchApi>,
    caller: Caller,
    PathArgs((t, name)): PathArgs<(String, String)>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    check_file_name(&name).map_err(ApiError::bad_request)?;
    let rec = p.manager.start(&t, &name).await?;
    Ok(started(&t, rec))
}

/// 202 with the job and the file as it started.
fn started(t: &TenantName, rec: FileRecord) -> Response {
    let job = format!("{t}/{}", rec.name);
    (
        StatusCode::ACCEPTED,
        Json(IngestStarted {
            job,
            file: public(rec),
        }),
    )
        .into_response()
}

/// Re-ingests, with the current app, the records of the file's last run that its log
/// shows failed or never reached, under that run: 202 with the file, 409 while it is
/// ingesting or before it ever was.
#[utoipa::path(
    post,
    path = "/v1/tenants/{t}/files/{name}/replay",
    tag = "files",
    params(("t" = String, Path, description = "the tenant's name"), ("name" = String, Path, description = "the file's name: its extension gives its format (.csv, .json, .ndjson, .jsonl)")),
    responses(
        (status = 202, description = "started", body = IngestStarted),
        (status = 400, description = "an invalid file name", body = ErrorBody),
        (status = 404, description = "no such file or tenant", body = ErrorBody),
        (status = 409, description = "being ingested, never ingested, or nothing to replay", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn replay(
    State(p): State<BatchApi>,
    caller: Caller,
    PathArgs((t, name)): PathArgs<(String, String)>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    check_file_name(&name).map_err(ApiError::bad_request)?;
    let rec = p.manager.replay(&t, &name).await?;
    Ok(started(&t, rec))
}

/// A staged file: its state and counts.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/files/{name}",
    tag = "files",
    params(("t" = String, Path, description = "the tenant's name"), ("name" = String, Path, description = "the file's name: its extension gives its format (.csv, .json, .ndjson, .jsonl)")),
    responses(
        (status = 200, description = "the file", body = FileRecord),
        (status = 400, description = "an invalid file name", body = ErrorBody),
        (status = 404, description = "no such file or tenant", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn status(
    State(p): State<BatchApi>,
    caller: Caller,
    PathArgs((t, name)): PathArgs<(String, String)>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    check_file_name(&name).map_err(ApiError::bad_request)?;
    match p.coredms.file(&t, &name).await? {
        Some(rec) => Ok(Json(public(rec)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("file `{name}` is not staged"),
        )),
    }
}

/// Every staged file of the tenant, with its state and counts.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/files",
    tag = "files",
    params(("t" = String, Path, description = "the tenant's name")),
    responses(
        (status = 200, description = "the files", body = FileList),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn list(
    State(p): State<BatchApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
) -> Result<Response, ApiError> {
    let t: TenantName = caller.for_tenant(&t)?;
    let files: Vec<FileRecord> = p.coredms.files(&t).await?.into_iter().map(public).collect();
    Ok(Json(FileList { files }).into_response())
}

/// Removes a staged file.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{t}/files/{name}",
    tag = "files",
    params(("t" = String, Path, description = "the tenant's name"), ("name" = String, Path, description = "the file's name: its extension gives its format (.csv, .json, .ndjson, .jsonl)")),
    responses(
        (status = 204, description = "removed"),
        (status = 400, description = "an invalid file name", body = ErrorBody),
        (status = 404, description = "no such file or tenant", body = ErrorBody),
        (status = 409, description = "the file is being ingested", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn remove(
    State(p): State<BatchApi>,
    caller: Caller,
    PathArgs((t, name)): PathArgs<(String, String)>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    check_file_name(&name).map_err(ApiError::bad_request)?;
    // The record goes first, if no job holds it (409); then its copy.
    match p.coredms.delete_file(&t, &name).await? {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("file `{name}` is not staged"),
        )),
        Some(r) => {
            p.manager
                .staging
                .remove(&t, &name, &r.upload)
                .await
                .map_err(BatchError::Io)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// A file record as tenants see it: which manager holds its job is the platform's business.
fn public(mut rec: FileRecord) -> FileRecord {
    rec.lease = None;
    rec
}
