//! A typed client for the HTTP API, used by the `mysimbdp` CLI, the tests and the workbench.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{status}: {message}")]
    Api {
        status: StatusCode,
        message: String,
        body: Value,
    },
    #[error("cannot reach the platform: {0}")]
    Transport(#[from] reqwest::Error),
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Transport(_) => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CreatedTenant {
    pub name: String,
    pub database: String,
    pub token: String,
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
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, token: Option<&str>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.map(str::to_owned),
            http,
        }
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
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.body(body).send().await?;
        Ok(Raw {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.bytes().await?,
        })
    }

    /// A request whose non-2xx answers become [`ClientError::Api`].
    async fn call_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> Result<Value, ClientError> {
        let r = self.request(method, path, headers, body).await?;
        let v = r.json();
        if r.status.is_success() {
            Ok(v)
        } else {
            Err(ClientError::Api {
                status: r.status,
                message: v["error"].as_str().unwrap_or("no error message").to_owned(),
                body: v,
            })
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<Value, ClientError> {
        let ct = content_type.map(|ct| ("content-type", ct));
        self.call_with(method, path, ct.as_slice(), body).await
    }

    async fn json(&self, method: Method, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call(method, path, Some("application/json"), body.to_string())
            .await
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None, Vec::new()).await
    }

    pub async fn create_tenant(
        &self,
        name: &str,
        limits: Value,
    ) -> Result<CreatedTenant, ClientError> {
        let mut body = limits;
        if !body.is_object() {
            body = serde_json::json!({});
        }
        body["name"] = name.into();
        let v = self.json(Method::POST, "/v1/tenants", &body).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Api {
            status: StatusCode::OK,
            message: format!("unexpected response: {e}"),
            body: Value::Null,
        })
    }

    pub async fn tenant(&self, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/tenants/{name}")).await
    }

    pub async fn patch_tenant(&self, name: &str, patch: &Value) -> Result<Value, ClientError> {
        self.json(Method::PATCH, &format!("/v1/tenants/{name}"), patch)
            .await
    }

    pub async fn upload_app(
        &self,
        tenant: &str,
        kind: &str,
        source: &str,
    ) -> Result<Value, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/tenants/{tenant}/apps/{kind}"),
            Some("text/plain"),
            source.to_owned(),
        )
        .await
    }

    pub async fn upload_file(
        &self,
        tenant: &str,
        name: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Value, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/tenants/{tenant}/files/{name}"),
            Some("application/octet-stream"),
            body,
        )
        .await
    }

    pub async fn ingest(&self, tenant: &str, name: &str) -> Result<Value, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/tenants/{tenant}/files/{name}/ingest"),
            None,
            Vec::new(),
        )
        .await
    }

    pub async fn file(&self, tenant: &str, name: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/tenants/{tenant}/files/{name}"))
            .await
    }

    /// Polls a file until its ingestion is done or failed.
    pub async fn wait_for_file(
        &self,
        tenant: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let f = self.file(tenant, name).await?;
            let state = f["state"].as_str().unwrap_or("");
            if state == "done" || state == "failed" || tokio::time::Instant::now() > until {
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
    ) -> Result<Value, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/tenants/{tenant}/messages?data_name={data_name}"),
            Some("application/x-ndjson"),
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
    ) -> Result<Value, ClientError> {
        self.call_with(
            Method::POST,
            &format!("/v1/tenants/{tenant}/messages?data_name={data_name}"),
            &[
                ("content-type", "application/x-ndjson"),
                ("idempotency-key", key),
            ],
            ndjson,
        )
        .await
    }

    pub async fn stream_start(&self, tenant: &str, consumers: u32) -> Result<Value, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/tenants/{tenant}/stream/start"),
            &serde_json::json!({ "consumers": consumers }),
        )
        .await
    }

    pub async fn stream_stop(&self, tenant: &str) -> Result<Value, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/tenants/{tenant}/stream/stop"),
            None,
            Vec::new(),
        )
        .await
    }

    pub async fn stream_report(&self, tenant: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/tenants/{tenant}/stream/report"))
            .await
    }

    /// The tenant's log file (a JSON array), filtered by a query string such as `status=failure`.
    pub async fn logs(&self, tenant: &str, query: &str) -> Result<Raw, ClientError> {
        let r = self
            .raw(
                Method::GET,
                &format!("/v1/tenants/{tenant}/logs?{query}"),
                None,
                Vec::new(),
            )
            .await?;
        if r.status.is_success() {
            Ok(r)
        } else {
            let v = r.json();
            Err(ClientError::Api {
                status: r.status,
                message: v["error"].as_str().unwrap_or("").to_owned(),
                body: v,
            })
        }
    }

    pub async fn documents(
        &self,
        tenant: &str,
        collection: &str,
        limit: u32,
        skip: u64,
    ) -> Result<Value, ClientError> {
        self.get(&format!(
            "/v1/tenants/{tenant}/collections/{collection}/documents?limit={limit}&skip={skip}"
        ))
        .await
    }

    pub async fn summary(&self, query: &str) -> Result<Value, ClientError> {
        self.get(&format!("/v1/logs/summary?{query}")).await
    }
}
