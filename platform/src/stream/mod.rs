//! The stream path: the data broker (publishing with confirms) and the stream ingest manager
//! (consumers that store what the tenant's stream app makes of each message).

pub mod broker;
mod manager;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

pub use broker::{Broker, BrokerError, Topology};
pub use manager::StreamManager;

use crate::Platform;
use crate::events::Published;
use crate::http::{ApiError, Caller, PathArgs, QueryArgs};

pub fn router() -> Router<Arc<Platform>> {
    Router::new()
        .route("/v1/tenants/{t}/messages", post(publish))
        .route("/v1/tenants/{t}/stream", get(stream_status))
        .route("/v1/tenants/{t}/stream/start", post(start))
        .route("/v1/tenants/{t}/stream/stop", post(stop))
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Unavailable(_) => {
                tracing::warn!(error = %e, "broker unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "message broker unavailable, retry later",
                )
            }
            BrokerError::Refused(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PublishQuery {
    /// The message type (the original's "name of the data"); or the `X-Data-Name` header.
    data_name: Option<String>,
}

/// One JSON message (`application/json`), or one message per line (`application/x-ndjson`).
/// With an `Idempotency-Key` header, retrying the same request (after a 503 or a timeout)
/// publishes the same message ids, so nothing is stored twice.
/// Payloads reach the tenant's app as they were sent: a payload that is not valid JSON fails
/// at ingestion and is dead-lettered with the reason, like any other poison message.
async fn publish(
    State(p): State<Arc<Platform>>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    QueryArgs(q): QueryArgs<PublishQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let broker = p.broker.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "publishing is served by the stream service",
        )
    })?;
    let data_name = q
        .data_name
        .or_else(|| {
            headers
                .get("x-data-name")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "message".into());
    if data_name.is_empty() || data_name.len() > 128 {
        return Err(ApiError::bad_request("data name must be 1-128 bytes"));
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let ndjson = match ctype.as_str() {
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => true,
        "application/json" => false,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "content type `{other}` is not accepted: send application/json (one message) or application/x-ndjson (one per line)"
                ),
            ));
        }
    };
    let limits = &p.settings.stream;
    let body = axum::body::to_bytes(body, limits.max_request_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request exceeds the {} bytes limit",
                    limits.max_request_bytes
                ),
            )
        })?;
    let messages: Vec<&[u8]> = if ndjson {
        body.split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .collect()
    } else {
        vec![&body[..]]
    };
    if messages.is_empty() || messages[0].is_empty() {
        return Err(ApiError::bad_request("no message in the request body"));
    }
    if let Some((i, m)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| m.len() > limits.max_message_bytes)
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "message {} is {} bytes, over the {} bytes limit",
                i + 1,
                m.len(),
                limits.max_message_bytes
            ),
        ));
    }
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::trim))
        .transpose()
        .map_err(|_| ApiError::bad_request("Idempotency-Key must be ASCII"))?;
    if key.is_some_and(|k| k.is_empty() || k.len() > 128) {
        return Err(ApiError::bad_request(
            "Idempotency-Key must be 1-128 characters",
        ));
    }
    let ids = broker.publish(&t, &data_name, &messages, key).await?;
    Published {
        tenant: t.as_str(),
        messages: ids.len() as u64,
    }
    .emit(&p.metrics);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "published": ids.len(), "ids": ids })),
    )
        .into_response())
}

fn manager(p: &Platform) -> Result<&StreamManager, ApiError> {
    p.stream.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "stream consumers are run by the stream service",
        )
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Start {
    consumers: Option<u32>,
}

async fn start(
    State(p): State<Arc<Platform>>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // The body is optional: no body starts one consumer.
    let body: Start = if body.iter().all(u8::is_ascii_whitespace) {
        Start::default()
    } else if !headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().starts_with("application/json"))
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the body as application/json",
        ));
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    let t = caller.for_tenant(&t)?;
    let m = manager(&p)?;
    p.coredms.tenant(&t).await?;
    let want = body.consumers.unwrap_or(1);
    let max = p.settings.stream.max_consumers;
    if want == 0 || want > max {
        return Err(ApiError::bad_request(format!(
            "consumers must be between 1 and {max}"
        )));
    }
    let running = m.scale(&t, want).await;
    Ok(Json(json!({ "consumers": running })).into_response())
}

async fn stop(
    State(p): State<Arc<Platform>>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let running = manager(&p)?.scale(&t, 0).await;
    Ok(Json(json!({ "consumers": running })).into_response())
}

async fn stream_status(
    State(p): State<Arc<Platform>>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let running = manager(&p)?.running(&t).await;
    let count = |name, status| p.metrics.get(name, t.as_str(), "stream", status);
    Ok(Json(json!({
        "consumers": running,
        // What this process's consumers did since it started: a cheap live view. The log
        // (`/stream/report`, `/logs`) is the record.
        "since_start": {
            "stored": count("mysimbdp_ingested_total", "success"),
            "duplicates": count("mysimbdp_ingested_total", "duplicate"),
            "failed": count("mysimbdp_ingested_total", "failure"),
            "dead_lettered": count("mysimbdp_dead_lettered_total", "failure"),
        }
    }))
    .into_response())
}
