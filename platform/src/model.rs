//! The stored model: what every component reads and writes through coredms (file records,
//! app records, bulk writes and their outcomes), how document ids are made, and the clock.
//!
//! This is the bottom layer above configuration and tenant names: it imports no component
//! (apps, batch, stream, coredms), so every component can use it without a cycle.

use mongodb::bson::DateTime;
use serde::{Deserialize, Serialize};

use crate::config::Format;
use crate::logs::Source;
use crate::tenants::TenantName;

// ---- files (batch) ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    Staged,
    Ingesting,
    Done,
    Failed,
}

impl FileState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staged => "staged",
            Self::Ingesting => "ingesting",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }
}

/// A staged file and its ingestion status, stored through coredms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    pub tenant: String,
    pub name: String,
    pub format: Format,
    pub bytes: u64,
    pub sha256: String,
    pub state: FileState,
    pub collection: String,
    /// Bumped each time a file of this name is staged: the version compare-and-set updates
    /// name, so a job of an older upload cannot write over a newer one.
    #[serde(default)]
    pub version: u64,
    /// The ingestion run: a new id each time the file is started, kept when a job resumes
    /// or changes owner. Log entries of this file name it (`ingestion`), so entries written
    /// again by a retried run are the same entries.
    #[serde(default)]
    pub job: String,
    /// Records (inputs) read so far and what became of each: at least one document stored
    /// and none failed (`ok`), every document already stored before (`duplicate`), nothing
    /// to store (`skipped`: the app returned nothing), or failed (parse, app or a document).
    pub records_ok: u64,
    pub records_failed: u64,
    pub records_duplicate: u64,
    #[serde(default)]
    pub records_skipped: u64,
    /// Documents the app produced, by what the database did with them.
    #[serde(default)]
    pub documents_stored: u64,
    #[serde(default)]
    pub documents_duplicate: u64,
    #[serde(default)]
    pub documents_failed: u64,
    /// Records before this index are stored and logged: where a resumed job starts.
    pub next_record: u64,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub app_version: Option<u32>,
    pub staged_at: String,
    pub updated_at: String,
}

impl FileRecord {
    /// Clears the counters and the checkpoint for a new run `job`.
    pub fn restart(&mut self, job: String) {
        self.job = job;
        self.records_ok = 0;
        self.records_failed = 0;
        self.records_duplicate = 0;
        self.records_skipped = 0;
        self.documents_stored = 0;
        self.documents_duplicate = 0;
        self.documents_failed = 0;
        self.next_record = 0;
        self.error = None;
    }

    /// A freshly staged file: nothing ingested yet.
    pub fn staged(
        tenant: &TenantName,
        name: &str,
        format: Format,
        bytes: u64,
        sha256: String,
        collection: String,
    ) -> Self {
        let now = rfc3339_now();
        Self {
            tenant: tenant.to_string(),
            name: name.to_owned(),
            format,
            bytes,
            sha256,
            state: FileState::Staged,
            collection,
            version: 0,
            job: String::new(),
            records_ok: 0,
            records_failed: 0,
            records_duplicate: 0,
            records_skipped: 0,
            documents_stored: 0,
            documents_duplicate: 0,
            documents_failed: 0,
            next_record: 0,
            error: None,
            app_version: None,
            staged_at: now.clone(),
            updated_at: now,
        }
    }
}

// ---- apps ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    Batch,
    Stream,
}

impl AppKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Stream => "stream",
        }
    }
}

/// An uploaded app version as stored through coredms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredApp {
    pub tenant: String,
    pub kind: AppKind,
    pub version: u32,
    pub source: String,
    pub created_at: String,
}

// ---- bulk writes ----

/// A collection name tenants may not write to (its first 80 characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid collection name `{0}`: use 1-64 of [A-Za-z0-9_.-], not starting with `system.`")]
pub struct InvalidCollection(pub String);

/// A collection name tenants may write to.
pub fn check_collection(c: &str) -> Result<(), InvalidCollection> {
    let ok = !c.is_empty()
        && c.len() <= 64
        && !c.starts_with("system.")
        && !c.starts_with('.')
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(InvalidCollection(c.chars().take(80).collect()))
    }
}

/// A batch of documents for one tenant, written in bulk with its log entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BulkWrite {
    pub tenant: TenantName,
    pub source: Source,
    pub data_name: String,
    pub app_version: Option<u32>,
    pub docs: Vec<DocWrite>,
    /// Records that failed before reaching the database (parse errors, app errors).
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocWrite {
    /// Deterministic id (see [`doc_id`]): a retry writes the same id, and is a duplicate.
    pub id: String,
    pub collection: String,
    pub doc: serde_json::Map<String, serde_json::Value>,
    /// Size of the input this document came from.
    pub bytes: u64,
    /// When ingestion of its input began (record read, or message published), Unix µs.
    pub started_us: i64,
    /// A different data name than the batch's (e.g. per stream message type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub collection: String,
    pub reason: String,
    pub bytes: u64,
    pub started_us: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_name: Option<String>,
}

/// What a bulk write did, per document: `failed` holds (index into `docs`, reason).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BulkOutcome {
    pub inserted: u64,
    pub duplicates: u64,
    pub failed: Vec<(usize, String)>,
}

/// A document id derived from where the record came from, never random: the same input
/// position always yields the same id, so re-ingestion cannot duplicate.
pub fn doc_id(origin: &str, record: u64, emitted: u32) -> String {
    if emitted == 0 {
        format!("{origin}:{record}")
    } else {
        format!("{origin}:{record}:{emitted}")
    }
}

/// A new random id (16 bytes, hex): ingestion runs, leases.
pub fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

// ---- the clock ----

/// Now, in Unix microseconds (ingestion timings, message publish times).
pub fn now_us() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1000
}

/// The current time as RFC 3339, for profile and file timestamps.
pub fn rfc3339_now() -> String {
    DateTime::now().try_to_rfc3339_string().unwrap_or_default()
}
