//! The public HTTP API's wire types: the requests and answers the handlers serialize and
//! [`crate::client`] reads back. Both sides use these structs, so they cannot drift.
//!
//! The stored records travel as they are: a file's status is [`FileRecord`], a tenant's
//! profile [`Profile`], a downloaded log entry [`LogEntry`] (its timestamp in RFC 3339).
//! Error answers are `{"error": "<message>", ...details}` ([`ErrorBody`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::logs::{StreamPeriod, SummaryRow};
use crate::model::{AppKind, FileRecord};
use crate::tenants::{AdminPatch, Profile};

pub use crate::http::ErrorBody;
pub use crate::logs::LogEntry;

/// `POST /v1/tenants` (admin): the name and, beside it, the limits and profile to start
/// with (an [`AdminPatch`]'s fields). Written out rather than `#[serde(flatten)]`: serde
/// cannot refuse unknown fields around a flattened struct that flattens another (it refused
/// every limit as unknown).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staged_files: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formats: Option<Vec<crate::config::Format>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The app limits that differ from the platform's (`apps` settings).
    pub app_limits: Option<crate::config::AppLimitsPatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_ingest: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl CreateTenant {
    pub fn new(name: &str, limits: AdminPatch) -> Self {
        Self {
            name: name.to_owned(),
            max_file_bytes: limits.max_file_bytes,
            max_staged_files: limits.max_staged_files,
            formats: limits.formats,
            app_limits: limits.app_limits,
            auto_ingest: limits.tenant.auto_ingest,
            description: limits.tenant.description,
        }
    }

    /// The name and what to change from the defaults.
    pub fn into_parts(self) -> (String, AdminPatch) {
        let patch = AdminPatch {
            tenant: crate::tenants::ProfilePatch {
                auto_ingest: self.auto_ingest,
                description: self.description,
            },
            max_file_bytes: self.max_file_bytes,
            max_staged_files: self.max_staged_files,
            formats: self.formats,
            app_limits: self.app_limits,
        };
        (self.name, patch)
    }
}

/// The answer to `POST /v1/tenants`: the only time the token is shown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CreatedTenant {
    pub name: String,
    pub database: String,
    pub token: String,
    pub profile: Profile,
}

/// `GET /v1/tenants/{t}/files`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct FileList {
    pub files: Vec<FileRecord>,
}

/// The answer to `POST /v1/tenants/{t}/files/{name}/ingest`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct IngestStarted {
    /// `<tenant>/<file name>`.
    pub job: String,
    pub file: FileRecord,
}

/// The answer to `PUT /v1/tenants/{t}/apps/{kind}`: the new active version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AppUploaded {
    pub version: u32,
    pub kind: AppKind,
    pub functions: AppFunctions,
}

/// Which entry points an uploaded app defines.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct AppFunctions {
    pub map: bool,
    pub ingest: bool,
}

/// `GET /v1/tenants/{t}/apps/{kind}`: the active version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ActiveApp {
    pub version: u32,
    pub kind: AppKind,
    pub source: String,
    pub created_at: String,
}

/// The answer to `POST /v1/tenants/{t}/messages`: the ids of the messages published, in
/// request order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Published {
    pub published: u64,
    pub ids: Vec<String>,
}

/// `POST /v1/tenants/{t}/stream/start`: how many consumers every stream manager runs on the
/// tenant's queue: `consumers` (default 1), and up to `max_consumers` (default `consumers`)
/// when its queue backs up.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartConsumers {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub consumers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_consumers: Option<u32>,
}

/// The answer to `stream/start` and `stream/stop`: the consumers now running in the stream
/// manager that answered (the others follow within `stream.reconcile_ms`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Consumers {
    pub consumers: u32,
}

/// How many consumers of a tenant's queue each stream manager runs: `min` always, up to
/// `max` while the queue backs up. Kept by coredms, so every stream manager reads the same.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct ConsumerTarget {
    pub min: u32,
    pub max: u32,
}

/// A stream manager's change of a tenant's consumers, and what it saw when it decided.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ScalingDecision {
    /// When (RFC 3339).
    pub at: String,
    /// The stream manager that decided (its host and process).
    pub replica: String,
    pub from: u32,
    pub to: u32,
    /// Messages ready in the tenant's queue, when the manager looked at it (the controller
    /// does; a start or stop does not).
    pub queue_depth: Option<u64>,
    /// The highest publish-to-stored latency of this manager's batches since its last look.
    pub max_latency_ms: u64,
    pub reason: String,
}

/// `GET /v1/tenants/{t}/stream`: the consumers running in the stream manager that answered,
/// the target every manager follows, and the tenant's stream ingestions as the log counts
/// them (the same whichever manager answers).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct StreamStatus {
    pub consumers: u32,
    /// `null` once stopped (or never started).
    pub target: Option<ConsumerTarget>,
    pub logged: StreamCounts,
}

/// Stream log entries by status: documents stored, duplicates, failed inputs, skipped.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct StreamCounts {
    pub stored: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl StreamCounts {
    /// Inputs logged, whatever became of them.
    pub fn total(&self) -> u64 {
        self.stored + self.duplicates + self.failed + self.skipped
    }
}

/// A message in a tenant's dead-letter queue, as the tenant lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetter {
    /// The message's id: its ingestion in the log, kept when it is replayed.
    pub message_id: Option<String>,
    pub data_name: Option<String>,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    pub bytes: u64,
    /// The first bytes of its body (lossy UTF-8).
    pub preview: String,
    /// Times it was replayed before.
    pub replays: u32,
}

/// `GET /v1/tenants/{t}/dead-letters`: the oldest dead letters, left in the queue; `more`
/// when others follow.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DeadLetters {
    pub dead_letters: Vec<DeadLetter>,
    pub more: bool,
}

/// `POST /v1/tenants/{t}/dead-letters/replay`: how many moved back to the queue.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Replayed {
    pub replayed: u64,
}

/// `GET /v1/tenants/{t}/stream/report`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct StreamReportAnswer {
    pub tenant: String,
    pub periods: Vec<StreamPeriod>,
    /// The stream managers' latest changes of the tenant's consumers (at most 200), oldest
    /// first.
    #[serde(default)]
    pub scaling: Vec<ScalingDecision>,
}

/// `GET /v1/logs/summary` (admin).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SummaryAnswer {
    pub entries: u64,
    pub groups: Vec<SummaryRow>,
}

/// `GET /v1/tenants/{t}/collections/{c}/documents`: one page, and the collection's size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DocumentsPage {
    pub total: u64,
    /// The stored documents as they are, each with its `_id`.
    #[schema(value_type = Vec<Object>)]
    pub documents: Vec<serde_json::Value>,
}
