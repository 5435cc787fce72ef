//! The stream path: the data broker (publishing with confirms) and the stream ingest manager
//! (consumers that store what the tenant's stream app makes of each message).

pub mod broker;
mod connections;
mod control;
mod manager;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, OpenApi};

pub use broker::{Broker, BrokerError, Topology};
pub use manager::StreamManager;

use crate::api::{
    self, ConsumerTarget, Consumers, DeadLetters, ErrorBody, Replayed, StartConsumers, StreamStatus,
};
use crate::config::StreamSettings;
use crate::coredms::CoreDms;
use crate::events::Published;
use crate::http::{ApiError, Auth, BodyBytes, Caller, PathArgs, QueryArgs, json_object};
use crate::metrics::Metrics;

/// What the message and consumer endpoints need: this process's broker and consumers.
#[derive(Clone)]
pub struct StreamApi {
    pub broker: Arc<Broker>,
    pub manager: Arc<StreamManager>,
    pub coredms: CoreDms,
    pub settings: Arc<StreamSettings>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
}

impl FromRef<StreamApi> for Auth {
    fn from_ref(s: &StreamApi) -> Auth {
        s.auth.clone()
    }
}

/// A new tenant's queues are declared before its creation is answered.
impl crate::coredms::OnNewTenant for Broker {
    fn tenant_created<'a>(
        &'a self,
        tenant: &'a crate::tenants::TenantName,
    ) -> futures::future::BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>> {
        Box::pin(async move { Ok(self.declare_topology(tenant).await?) })
    }
}

pub fn router(state: StreamApi) -> Router {
    Router::new()
        .route("/v1/tenants/{t}/messages", post(publish))
        .route("/v1/tenants/{t}/stream", get(stream_status))
        .route("/v1/tenants/{t}/stream/start", post(start))
        .route("/v1/tenants/{t}/stream/stop", post(stop))
        .route("/v1/tenants/{t}/dead-letters", get(dead_letters))
        .route("/v1/tenants/{t}/dead-letters/replay", post(replay))
        .with_state(state)
}

/// The stream manager's part of the API document.
#[derive(OpenApi)]
#[openapi(paths(publish, stream_status, start, stop, dead_letters, replay))]
pub struct StreamDoc;

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

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PublishQuery {
    /// The message type (the original's "name of the data"); or the `X-Data-Name` header.
    data_name: Option<String>,
}

/// How a publish request's body is cut into messages, from its content type.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// `application/json`: one message, valid UTF-8 JSON.
    Json,
    /// `application/x-ndjson` (or `application/ndjson`, `application/jsonl`): one message per
    /// non-blank line, each valid UTF-8 JSON.
    Ndjson,
    /// `text/plain`: one message, UTF-8 text, published unchanged.
    Text,
    /// `application/octet-stream`: one message, bytes published unchanged.
    Bytes,
}

/// A publish request's content type the broker does not take (answered 415).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentTypeError {
    #[error(
        "content type `{0}` is not accepted: send application/json (one message), application/x-ndjson (one per line), or, for stream apps that define `ingest`, text/plain or application/octet-stream (one message, published as sent)"
    )]
    Type(String),
    #[error("charset `{0}` is not accepted: send UTF-8")]
    Charset(String),
}

impl From<ContentTypeError> for ApiError {
    fn from(e: ContentTypeError) -> Self {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string())
    }
}

/// A message that is not what its content type declares; `line` is the NDJSON line.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("{}invalid UTF-8 at byte {at} of the message", line_prefix(*.line))]
    Utf8 { line: Option<usize>, at: usize },
    #[error("{}invalid JSON: {error}", line_prefix(*.line))]
    Json {
        line: Option<usize>,
        error: serde_json::Error,
    },
}

fn line_prefix(line: Option<usize>) -> String {
    line.map(|l| format!("line {l}: ")).unwrap_or_default()
}

impl Framing {
    fn of(content_type: &str) -> Result<Self, ContentTypeError> {
        let mut parts = content_type.split(';');
        let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let charset = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
            .map(|(_, v)| v.trim().trim_matches('"').to_ascii_lowercase());
        let framing = match mime.as_str() {
            "application/json" => Self::Json,
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Self::Ndjson,
            "text/plain" => Self::Text,
            "application/octet-stream" => Self::Bytes,
            other => return Err(ContentTypeError::Type(other.to_owned())),
        };
        if framing != Self::Bytes
            && let Some(c) = charset
            && c != "utf-8"
            && c != "utf8"
        {
            return Err(ContentTypeError::Charset(c));
        }
        Ok(framing)
    }
}

/// The messages of a body, each with its line number (1 for single-message bodies); blank
/// NDJSON lines are skipped but counted.
fn split_messages(body: &[u8], framing: Framing) -> Vec<(usize, &[u8])> {
    match framing {
        Framing::Ndjson => body
            .split(|b| *b == b'\n')
            .enumerate()
            .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
            .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
            .collect(),
        _ if body.iter().all(u8::is_ascii_whitespace) => Vec::new(),
        _ => vec![(1, body)],
    }
}

/// Checks that each message is what its content type declares, before anything is
/// published: UTF-8 JSON for the JSON types (the error names the NDJSON line), UTF-8 for
/// `text/plain`. Bytes are not checked.
fn check_messages(messages: &[(usize, &[u8])], framing: Framing) -> Result<(), MessageError> {
    for &(line, m) in messages {
        let line = (framing == Framing::Ndjson).then_some(line);
        let text = match framing {
            Framing::Bytes => continue,
            _ => std::str::from_utf8(m).map_err(|e| MessageError::Utf8 {
                line,
                at: e.valid_up_to(),
            })?,
        };
        if matches!(framing, Framing::Json | Framing::Ndjson) {
            // Parsed as the consumer will parse it (a lone surrogate escape, which a
            // validating skip lets through, fails there), then dropped.
            serde_json::from_str::<serde_json::Value>(text)
                .map_err(|error| MessageError::Json { line, error })?;
        }
    }
    Ok(())
}

/// Bodies up to this size are checked on the async thread; larger ones off it.
const INLINE_CHECK_BYTES: usize = 64 * 1024;

/// Publishes one message or many, by content type:
/// - `application/json`: one JSON message; `application/x-ndjson`: one per line. Each must be
///   valid UTF-8 JSON, or the request gets 400 naming the line (`line 7: invalid JSON: …`)
///   and nothing of it is published.
/// - `text/plain` (UTF-8) or `application/octet-stream`: one message, published byte for
///   byte, for stream apps that define `ingest` (they receive the payload as text). A map app,
///   or no app, fails such a message at ingestion if it is not JSON, and it is dead-lettered
///   with the reason.
///
/// With an `Idempotency-Key` header, retrying the same request (after a 503 or a timeout)
/// publishes the same message ids, so nothing is stored twice.
#[utoipa::path(
    post,
    path = "/v1/tenants/{t}/messages",
    tag = "stream",
    params(
        ("t" = String, Path, description = "the tenant's name"),
        PublishQuery,
        ("X-Data-Name" = Option<String>, Header, description = "the data name, when the query does not give one"),
        ("Idempotency-Key" = Option<String>, Header, description = "1-128 ASCII characters: a retry with the same key publishes the same message ids"),
    ),
    request_body(
        description = "one message (JSON, text or bytes) or NDJSON, one message per line; a JSON message is any JSON value (a `map` app maps objects, an `ingest` app gets the text)",
        content(
            (serde_json::Value = "application/json"),
            (String = "application/x-ndjson"),
            (String = "text/plain"),
            (Vec<u8> = "application/octet-stream"),
        )
    ),
    responses(
        (status = 202, description = "published, confirmed by the broker", body = api::Published),
        (status = 400, description = "no message, a message that is not what its type declares (nothing published), or a bad header", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
        (status = 413, description = "a message or the request over its limit", body = ErrorBody),
        (status = 415, description = "a content type or charset not accepted", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn publish(
    State(p): State<StreamApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    QueryArgs(q): QueryArgs<PublishQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let broker = &p.broker;
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
    let framing = Framing::of(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    )?;
    let limits = &p.settings;
    let body = axum::body::to_bytes(body, limits.max_request_bytes)
        .await
        .map_err(|e| {
            if e.to_string().contains("length limit") {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request exceeds the {} bytes limit",
                        limits.max_request_bytes
                    ),
                )
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
    let messages = split_messages(&body, framing);
    if messages.is_empty() {
        return Err(ApiError::bad_request("no message in the request body"));
    }
    if let Some((i, (line, m))) = messages
        .iter()
        .enumerate()
        .find(|(_, (_, m))| m.len() > limits.max_message_bytes)
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "message {} (line {line}) is {} bytes, over the {} bytes limit",
                i + 1,
                m.len(),
                limits.max_message_bytes
            ),
        ));
    }
    let checked = if body.len() <= INLINE_CHECK_BYTES {
        check_messages(&messages, framing)
    } else {
        let body = body.clone();
        tokio::task::spawn_blocking(move || {
            check_messages(&split_messages(&body, framing), framing)
        })
        .await?
    };
    checked.map_err(|reason| {
        ApiError::bad_request(format!("{reason} (nothing of this request was published)"))
            .with_details(json!({ "published": 0 }))
    })?;
    let messages: Vec<&[u8]> = messages.into_iter().map(|(_, m)| m).collect();
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
        Json(api::Published {
            published: ids.len() as u64,
            ids,
        }),
    )
        .into_response())
}

/// Sets the tenant's consumer target, which every stream manager follows: `consumers` each
/// (default 1), up to `max_consumers` (default `consumers`) while the queue backs up. The
/// manager that answers applies it at once, the others within `stream.reconcile_ms`.
#[utoipa::path(
    post,
    path = "/v1/tenants/{t}/stream/start",
    tag = "stream",
    params(("t" = String, Path, description = "the tenant's name")),
    request_body(content = Option<StartConsumers>, description = "optional: no body starts one consumer"),
    responses(
        (status = 200, description = "the consumers now running in the manager that answered", body = Consumers),
        (status = 400, description = "malformed JSON, or a count out of range", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
        (status = 413, description = "a body over the limit", body = ErrorBody),
        (status = 415, description = "a body that is not application/json", body = ErrorBody),
        (status = 422, description = "JSON that is not an object of consumers", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn start(
    State(p): State<StreamApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    // The body is optional: no body starts one consumer.
    let body: StartConsumers = if body.iter().all(u8::is_ascii_whitespace) {
        StartConsumers::default()
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
        let value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
        json_object(value)?
    };
    let t = caller.for_tenant(&t)?;
    p.coredms.tenant(&t).await?;
    let target = consumer_target(&body, p.settings.max_consumers).map_err(ApiError::bad_request)?;
    let consumers = p.manager.start(&t, target).await?;
    Ok(Json(Consumers { consumers }).into_response())
}

/// The target a start asks for, within 1 and `max` (`stream.max_consumers`).
fn consumer_target(body: &StartConsumers, max: u32) -> Result<ConsumerTarget, String> {
    let min = body.consumers.unwrap_or(1);
    let most = body.max_consumers.unwrap_or(min);
    if min == 0 || min > max {
        return Err(format!("consumers must be between 1 and {max}"));
    }
    if most < min || most > max {
        return Err(format!(
            "max_consumers must be between consumers ({min}) and {max}"
        ));
    }
    Ok(ConsumerTarget { min, max: most })
}

/// Removes the tenant's consumer target: the manager that answers stops its consumers at
/// once (each finishing its batch), the others within `stream.reconcile_ms`.
#[utoipa::path(
    post,
    path = "/v1/tenants/{t}/stream/stop",
    tag = "stream",
    params(("t" = String, Path, description = "the tenant's name")),
    responses(
        (status = 200, description = "no consumer left in the manager that answered", body = Consumers),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn stop(
    State(p): State<StreamApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let consumers = p.manager.stop(&t).await?;
    Ok(Json(Consumers { consumers }).into_response())
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeadLetterQuery {
    /// How many, 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

impl DeadLetterQuery {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit.unwrap_or(100) {
            n @ 1..=broker::MAX_DEAD_LETTERS_PER_REQUEST => Ok(n),
            n => Err(ApiError::bad_request(format!(
                "limit must be 1 to {}, not {n}",
                broker::MAX_DEAD_LETTERS_PER_REQUEST
            ))),
        }
    }
}

/// The tenant's dead letters, oldest first, with why each failed; they stay in the queue.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/dead-letters",
    tag = "stream",
    params(("t" = String, Path, description = "the tenant's name"), DeadLetterQuery),
    responses(
        (status = 200, description = "the oldest dead letters", body = DeadLetters),
        (status = 400, description = "a limit out of range", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn dead_letters(
    State(p): State<StreamApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    QueryArgs(q): QueryArgs<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let (letters, more) = p.broker.dead_letters(&t, q.limit()?).await?;
    Ok(Json(DeadLetters {
        dead_letters: letters,
        more,
    })
    .into_response())
}

/// Moves dead letters back to the tenant's queue, for the stream app running now: each
/// keeps its message id, so what it stores and logs belongs to its first ingestion.
#[utoipa::path(
    post,
    path = "/v1/tenants/{t}/dead-letters/replay",
    tag = "stream",
    params(("t" = String, Path, description = "the tenant's name"), DeadLetterQuery),
    responses(
        (status = 200, description = "how many went back to the queue", body = Replayed),
        (status = 400, description = "a limit out of range", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn replay(
    State(p): State<StreamApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    QueryArgs(q): QueryArgs<DeadLetterQuery>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let replayed = p.broker.replay_dead_letters(&t, q.limit()?).await?;
    tracing::info!(tenant = %t, replayed, "dead letters replayed");
    Ok(Json(Replayed { replayed }).into_response())
}

#[derive(Deserialize, Default, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StatusQuery {
    /// Count only entries from this time on (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
}

/// The consumers running in the stream manager that answered, the target every manager
/// follows, and the tenant's stream ingestions as the log counts them.
#[utoipa::path(
    get,
    path = "/v1/tenants/{t}/stream",
    tag = "stream",
    params(("t" = String, Path, description = "the tenant's name"), StatusQuery),
    responses(
        (status = 200, description = "consumers, target and counts", body = StreamStatus),
        (status = 400, description = "a time that does not parse", body = ErrorBody),
        (status = 404, description = "no such tenant (or another tenant's)", body = ErrorBody),
    ),
    security(("tenant" = []), ("admin" = []))
)]
async fn stream_status(
    State(p): State<StreamApi>,
    caller: Caller,
    PathArgs(t): PathArgs<String>,
    QueryArgs(q): QueryArgs<StatusQuery>,
) -> Result<Response, ApiError> {
    let t = caller.for_tenant(&t)?;
    let since = crate::logs::LogQuery {
        since: q.since,
        ..Default::default()
    }
    .parse()
    .map_err(ApiError::bad_request)?
    .since
    .map(|d| d.timestamp_millis());
    p.coredms.tenant(&t).await?;
    let (target, logged) = tokio::try_join!(
        p.coredms.stream_target(&t),
        p.coredms.stream_counts(&t, since)
    )?;
    Ok(Json(StreamStatus {
        consumers: p.manager.running(&t).await,
        target,
        logged,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &[u8], ct: &str) -> Result<usize, String> {
        let f = Framing::of(ct).map_err(|e| e.to_string())?;
        let m = split_messages(body, f);
        check_messages(&m, f)
            .map(|()| m.len())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn json_types_are_checked_line_by_line_and_name_the_line() {
        assert_eq!(
            check(b"{\"a\":1}\n\n[2]\r\n\"s\"\n", "application/x-ndjson"),
            Ok(3)
        );
        let e = check(b"{\"a\":1}\n\n{\"a\":2}\n{nope\n", "application/x-ndjson").expect_err("bad");
        assert!(e.starts_with("line 4: invalid JSON: "), "{e}");
        let e = check(b"{\"a\":1}\n{\"s\":\"\xff\"}\n", "application/x-ndjson").expect_err("bad");
        assert!(e.starts_with("line 2: invalid UTF-8"), "{e}");
        let e = check(b"{\"a\":1} trailing", "application/json; charset=utf-8").expect_err("bad");
        assert!(e.starts_with("invalid JSON: trailing characters"), "{e}");
        assert!(
            check(b"{\"a\":\"\\ud800\"}", "application/json").is_err(),
            "lone surrogate"
        );
    }

    #[test]
    fn raw_types_pass_what_they_declare() {
        assert_eq!(check(b"a,b\nc,d\n", "text/plain"), Ok(1));
        assert!(
            check(b"caf\xe9", "text/plain")
                .expect_err("latin-1")
                .contains("UTF-8")
        );
        assert_eq!(check(b"\x00\xff\xfe", "application/octet-stream"), Ok(1));
        assert!(check(b"x", "text/plain; charset=latin1").is_err());
        assert!(check(b"x", "text/csv").is_err());
        assert_eq!(check(b" \n ", "text/plain"), Ok(0));
    }
}
