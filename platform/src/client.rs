//! A typed client for the HTTP API, used by the `mysimbdp` CLI, the tests and the workbench.
//! Requests and answers are the wire types of [`crate::api`], the structs the handlers
//! serialize; [`Client::raw`] is the escape hatch for calls that check statuses and bodies
//! themselves.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{
    ActiveApp, AppUploaded, Consumers, CreateTenant, CreatedTenant, DeadLetters, DocumentsPage,
    ErrorBody, FileList, IngestStarted, LogEntry, Published, Replayed, StartConsumers,
    StreamReportAnswer, StreamStatus, SummaryAnswer,
};
use crate::model::{FileRecord, FileState};
use crate::tenants::{AdminPatch, Profile};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A non-2xx answer, with its error body (`{"error": ..., details}`; a body that is not
    /// one has its text as the message).
    #[error("{status}: {}", body.error)]
    Api { status: StatusCode, body: ErrorBody },
    /// A 2xx answer that is not the expected type: client and server disagree.
    #[error("unexpected answer ({status}): {error}")]
    Decode {
        status: StatusCode,
        error: serde_json::Error,
    },
    /// A request body that could not be written as JSON.
    #[error("cannot encode the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot reach the platform: {0}")]
    Transport(#[from] reqwest::Error),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } | Self::Decode { status, .. } => Some(*status),
            Self::Encode(_) | Self::Transport(_) => None,
        }
    }

    /// The error message of an API answer.
    pub fn message(&self) -> Option<&str> {
        match self {
            Self::Api { body, .. } => Some(&body.error),
            _ => None,
        }
    }
}

/// What an HTTP call returned, for callers that check statuses themselves.
#[derive(Debug)]
pub struct Raw {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

impl Raw {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The answer as `T` if it is a 2xx, else [`ClientError::Api`].
    pub fn into_typed<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        let Raw { status, body, .. } = self.success()?;
        serde_json::from_slice(&body).map_err(|error| ClientError::Decode { status, error })
    }

    /// The answer itself if it is a 2xx, else [`ClientError::Api`].
    pub fn success(self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            return Ok(self);
        }
        Err(api_error(self.status, &self.body))
    }
}

/// A non-2xx answer as [`ClientError::Api`].
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let body = serde_json::from_slice::<ErrorBody>(body).unwrap_or_else(|_| ErrorBody {
        error: String::from_utf8_lossy(body).chars().take(500).collect(),
        details: serde_json::Map::new(),
    });
    ClientError::Api { status, body }
}

#[derive(Clone)]
pub struct Client {
    base: String,
    /// Where the batch and stream components answer when they run as separate services;
    /// `None` when one address serves everything.
    split: Option<std::sync::Arc<Split>>,
    token: Option<String>,
    http: reqwest::Client,
}

/// The addresses of a split deployment (`serve coredms`, `serve batch`, `serve stream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub batch: String,
    pub stream: String,
}

/// Which component answers `path` in a split deployment: `files` and batch apps go to the
/// batch ingest manager, `messages`, `stream[/start|/stop]` and stream apps to the stream
/// ingest manager, everything else (tenants, logs, the stream report drawn from the logs,
/// documents) to coredms.
fn component_of(path: &str) -> Option<&'static str> {
    let rest = path.strip_prefix("/v1/tenants/")?;
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let mut segs = rest.split('/').skip(1);
    match (segs.next(), segs.next()) {
        (Some("files"), _) | (Some("apps"), Some("batch")) => Some("batch"),
        (Some("stream"), Some("report")) => None,
        (Some("messages" | "stream" | "dead-letters"), _) | (Some("apps"), Some("stream")) => {
            Some("stream")
        }
        _ => None,
    }
}

const JSON: &str = "application/json";

impl Client {
    pub fn new(base: &str, token: Option<&str>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            split: None,
            token: token.map(str::to_owned),
            http,
        }
    }

    /// A client of a split deployment: `base` is coredms, `split` the other two components.
    pub fn split(base: &str, split: Split, token: Option<&str>) -> Self {
        let split = Split {
            batch: split.batch.trim_end_matches('/').to_owned(),
            stream: split.stream.trim_end_matches('/').to_owned(),
        };
        Self {
            split: Some(std::sync::Arc::new(split)),
            ..Self::new(base, token)
        }
    }

    /// The address that answers `path`.
    pub fn url(&self, path: &str) -> String {
        let base = match (&self.split, component_of(path)) {
            (Some(s), Some("batch")) => &s.batch,
            (Some(s), Some("stream")) => &s.stream,
            _ => &self.base,
        };
        format!("{base}{path}")
    }

    /// The same platform, as another caller.
    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Any request, its answer as it came (whatever the status).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<Raw, ClientError> {
        let ct = content_type.map(|ct| ("content-type", ct));
        self.request(method, path, ct.as_slice(), body).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Result<Raw, ClientError> {
        let resp = self.send(method, path, headers, body).await?;
        Ok(Raw {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.bytes().await?,
        })
    }

    /// The answer's status and headers; its body is left to the caller to read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Ok(req.body(body).send().await?)
    }

    /// A request whose 2xx answer is read as `T` and whose other answers become
    /// [`ClientError::Api`].
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Result<T, ClientError> {
        self.request(method, path, headers, body)
            .await?
            .into_typed()
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(ClientError::Encode)?;
        self.call(method, path, &[("content-type", JSON)], body)
            .await
    }

    async fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, &[], Vec::new()).await
    }

    /// Any GET whose answer is JSON, untyped: for paths this client has no method for.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.get_as(path).await
    }

    /// Creates a tenant (admin) with `limits` changed from the defaults.
    pub async fn create_tenant(
        &self,
        name: &str,
        limits: AdminPatch,
    ) -> Result<CreatedTenant, ClientError> {
        let req = CreateTenant::new(name, limits);
        self.send_json(Method::POST, "/v1/tenants", &req).await
    }

    pub async fn tenant(&self, name: &str) -> Result<Profile, ClientError> {
        self.get_as(&format!("/v1/tenants/{}", enc(name))).await
    }

    /// Changes a profile: a tenant may send only the [`crate::tenants::ProfilePatch`] part.
    pub async fn patch_tenant(
        &self,
        name: &str,
        patch: &AdminPatch,
    ) -> Result<Profile, ClientError> {
        self.send_json(Method::PATCH, &format!("/v1/tenants/{}", enc(name)), patch)
            .await
    }

    pub async fn upload_app(
        &self,
        tenant: &str,
        kind: &str,
        source: &str,
    ) -> Result<AppUploaded, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/tenants/{}/apps/{}", enc(tenant), enc(kind)),
            &[("content-type", "text/plain")],
            source.to_owned(),
        )
        .await
    }

    /// The active app version of a kind.
    pub async fn app(&self, tenant: &str, kind: &str) -> Result<ActiveApp, ClientError> {
        self.get_as(&format!("/v1/tenants/{}/apps/{}", enc(tenant), enc(kind)))
            .await
    }

    pub async fn upload_file(
        &self,
        tenant: &str,
        name: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<FileRecord, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/tenants/{}/files/{}", enc(tenant), enc(name)),
            &[("content-type", "application/octet-stream")],
            body,
        )
        .await
    }

    pub async fn ingest(&self, tenant: &str, name: &str) -> Result<IngestStarted, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/tenants/{}/files/{}/ingest", enc(tenant), enc(name)),
            &[],
            Vec::new(),
        )
        .await
    }

    /// Re-ingests the failed records of the file's last run, with the current app.
    pub async fn replay_file(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<IngestStarted, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/tenants/{}/files/{}/replay", enc(tenant), enc(name)),
            &[],
            Vec::new(),
        )
        .await
    }

    pub async fn file(&self, tenant: &str, name: &str) -> Result<FileRecord, ClientError> {
        self.get_as(&format!("/v1/tenants/{}/files/{}", enc(tenant), enc(name)))
            .await
    }

    pub async fn files(&self, tenant: &str) -> Result<FileList, ClientError> {
        self.get_as(&format!("/v1/tenants/{}/files", enc(tenant)))
            .await
    }

    /// Polls a file until its ingestion is done or failed, or `timeout` passed (then the
    /// record as it is).
    pub async fn wait_for_file(
        &self,
        tenant: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<FileRecord, ClientError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let f = self.file(tenant, name).await?;
            if matches!(f.state, FileState::Done | FileState::Failed)
                || tokio::time::Instant::now() > until
            {
                return Ok(f);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes NDJSON (one message per line) with a data name.
    pub async fn publish(
        &self,
        tenant: &str,
        data_name: &str,
        ndjson: impl Into<reqwest::Body>,
    ) -> Result<Published, ClientError> {
        self.call(
            Method::POST,
            &format!(
                "/v1/tenants/{}/messages?data_name={}",
                enc(tenant),
                enc(data_name)
            ),
            &[("content-type", "application/x-ndjson")],
            ndjson,
        )
        .await
    }

    /// Publishes NDJSON with an idempotency key: retrying with the same key and body never
    /// stores a message twice.
    pub async fn publish_idempotent(
        &self,
        tenant: &str,
        data_name: &str,
        key: &str,
        ndjson: impl Into<reqwest::Body>,
    ) -> Result<Published, ClientError> {
        self.call(
            Method::POST,
            &format!(
                "/v1/tenants/{}/messages?data_name={}",
                enc(tenant),
                enc(data_name)
            ),
            &[
                ("content-type", "application/x-ndjson"),
                ("idempotency-key", key),
            ],
            ndjson,
        )
        .await
    }

    /// The consumers running in the stream manager that answers, the tenant's target, and
    /// its stream ingestions as the log counts them.
    pub async fn stream_status(&self, tenant: &str) -> Result<StreamStatus, ClientError> {
        self.get_as(&format!("/v1/tenants/{}/stream", enc(tenant)))
            .await
    }

    /// As [`Client::stream_status`], counting the log's entries from `since` (RFC 3339) on.
    pub async fn stream_status_since(
        &self,
        tenant: &str,
        since: &str,
    ) -> Result<StreamStatus, ClientError> {
        self.get_as(&format!(
            "/v1/tenants/{}/stream?since={}",
            enc(tenant),
            enc(since)
        ))
        .await
    }

    /// `consumers` consumers of the tenant's queue in every stream manager.
    pub async fn stream_start(
        &self,
        tenant: &str,
        consumers: u32,
    ) -> Result<Consumers, ClientError> {
        self.stream_start_range(tenant, consumers, consumers).await
    }

    /// `min` consumers in every stream manager, up to `max` while the queue backs up.
    pub async fn stream_start_range(
        &self,
        tenant: &str,
        min: u32,
        max: u32,
    ) -> Result<Consumers, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/tenants/{}/stream/start", enc(tenant)),
            &StartConsumers {
                consumers: Some(min),
                max_consumers: (max != min).then_some(max),
            },
        )
        .await
    }

    pub async fn stream_stop(&self, tenant: &str) -> Result<Consumers, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/tenants/{}/stream/stop", enc(tenant)),
            &[],
            Vec::new(),
        )
        .await
    }

    /// Up to `limit` dead letters, oldest first, left in the queue.
    pub async fn dead_letters(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<DeadLetters, ClientError> {
        self.get_as(&format!(
            "/v1/tenants/{}/dead-letters?limit={limit}",
            enc(tenant)
        ))
        .await
    }

    /// Moves up to `limit` dead letters back to the tenant's queue.
    pub async fn replay_dead_letters(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Replayed, ClientError> {
        self.call(
            Method::POST,
            &format!(
                "/v1/tenants/{}/dead-letters/replay?limit={limit}",
                enc(tenant)
            ),
            &[],
            Vec::new(),
        )
        .await
    }

    pub async fn stream_report(&self, tenant: &str) -> Result<StreamReportAnswer, ClientError> {
        self.get_as(&format!("/v1/tenants/{}/stream/report", enc(tenant)))
            .await
    }

    /// The tenant's log file (a JSON array), filtered by a query string such as
    /// `status=failure`, as it came (for its headers, or to save it as it is).
    pub async fn logs_raw(&self, tenant: &str, query: &str) -> Result<Raw, ClientError> {
        self.request(
            Method::GET,
            &format!("/v1/tenants/{}/logs?{query}", enc(tenant)),
            &[],
            Vec::new(),
        )
        .await?
        .success()
    }

    /// The tenant's log download as it arrives (a 2xx, else [`ClientError::Api`]), for
    /// callers that fold a long log chunk by chunk (`Response::chunk`) instead of holding it.
    pub async fn logs_streamed(
        &self,
        tenant: &str,
        query: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let path = format!("/v1/tenants/{}/logs?{query}", enc(tenant));
        let resp = self.send(Method::GET, &path, &[], Vec::new()).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        Err(api_error(status, &resp.bytes().await?))
    }

    /// The tenant's log entries, filtered by a query string such as `status=failure`.
    pub async fn logs(&self, tenant: &str, query: &str) -> Result<Vec<LogEntry>, ClientError> {
        self.logs_raw(tenant, query).await?.into_typed()
    }

    pub async fn documents(
        &self,
        tenant: &str,
        collection: &str,
        limit: u32,
        skip: u64,
    ) -> Result<DocumentsPage, ClientError> {
        self.get_as(&format!(
            "/v1/tenants/{}/collections/{}/documents?limit={limit}&skip={skip}",
            enc(tenant),
            enc(collection)
        ))
        .await
    }

    /// The operator's analytics (admin), filtered by a query string such as `bucket_s=10`.
    pub async fn summary(&self, query: &str) -> Result<SummaryAnswer, ClientError> {
        self.get_as(&format!("/v1/logs/summary?{query}")).await
    }
}

/// A query string (`k=v&k2=v2`) with each value percent-encoded, for [`Client::logs`] and
/// [`Client::summary`]: an RFC 3339 time's `+` stays a `+`.
pub fn query(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A path segment or query value as sent: everything but unreserved characters
/// (`A-Z a-z 0-9 - . _ ~`) percent-encoded, so a name holding `/`, `?`, `#`, `&` or a space
/// reaches the server as one value.
fn enc(s: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, RESERVED).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_and_query_values_are_percent_encoded() {
        assert_eq!(super::enc("water-quality_1.csv"), "water-quality_1.csv");
        assert_eq!(
            super::enc("a b/../c?d#e%f&g=h"),
            "a%20b%2F..%2Fc%3Fd%23e%25f%26g%3Dh"
        );
        assert_eq!(super::enc("é"), "%C3%A9");
        assert_eq!(
            super::query(&[
                ("since", "2026-12-01T20:00:00+01:00"),
                ("status", "failure")
            ]),
            "since=2026-12-01T20%3A00%3A00%2B01%3A00&status=failure"
        );
    }

    use super::*;

    #[test]
    fn a_split_client_sends_each_path_to_its_component() {
        let c = Client::split(
            "http://core/",
            Split {
                batch: "http://batch".into(),
                stream: "http://stream/".into(),
            },
            None,
        );
        let cases = [
            ("/v1/tenants", "http://core"),
            ("/v1/tenants/acme", "http://core"),
            ("/v1/tenants/acme/logs?status=failure", "http://core"),
            ("/v1/tenants/acme/collections/c/documents", "http://core"),
            ("/v1/logs/summary", "http://core"),
            ("/v1/tenants/acme/files", "http://batch"),
            ("/v1/tenants/acme/files/a.csv/ingest", "http://batch"),
            ("/v1/tenants/acme/apps/batch", "http://batch"),
            ("/v1/tenants/acme/apps/stream", "http://stream"),
            ("/v1/tenants/acme/messages?data_name=x", "http://stream"),
            ("/v1/tenants/acme/stream", "http://stream"),
            ("/v1/tenants/acme/stream/start", "http://stream"),
            ("/v1/tenants/acme/stream/report", "http://core"),
        ];
        for (path, base) in cases {
            assert_eq!(c.url(path), format!("{base}{path}"), "{path}");
        }
        let one = Client::new("http://all", None);
        assert_eq!(
            one.url("/v1/tenants/a/files"),
            "http://all/v1/tenants/a/files"
        );
    }
}
