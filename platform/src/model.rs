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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FileRecord {
    pub tenant: String,
    pub name: String,
    pub format: Format,
    pub bytes: u64,
    pub sha256: String,
    pub state: FileState,
    pub collection: String,
    /// The staged copy on disk this record describes (`<name>~<upload>` in the tenant's
    /// staging folder): each upload writes a file of its own, so a record and the file it
    /// names never disagree, whichever of two racing uploads wins. Empty for a file staged
    /// before uploads had ids (its copy is `<name>`).
    #[serde(default)]
    pub upload: String,
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
    /// The running job is a replay of run `job`: it ingests only the records its log does
    /// not show settled (failed ones, and any never reached), with the tenant's current
    /// app, under the same `job`; the counters are recounted from the log when it ends.
    #[serde(default)]
    pub replay: bool,
    /// While `ingesting`: the batch manager that runs the job, until when. Internal: never
    /// shown to tenants.
    #[serde(default)]
    pub lease: Option<Lease>,
    pub staged_at: String,
    pub updated_at: String,
}

/// A batch manager's hold on a job: `owner` (one id per manager process) runs it until
/// `expires_us` (Unix µs, coredms' clock) unless it renews; after that another may claim it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Lease {
    pub owner: String,
    pub expires_us: i64,
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
        self.replay = false;
        self.app_version = None;
    }

    /// A freshly staged file: nothing ingested yet.
    pub fn staged(
        tenant: &TenantName,
        name: &str,
        format: Format,
        bytes: u64,
        sha256: String,
        collection: String,
        upload: String,
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
            upload,
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
            replay: false,
            lease: None,
            staged_at: now.clone(),
            updated_at: now,
        }
    }
}

// ---- apps ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Which input a document or log entry comes from: its identity in the log, so an entry
/// written again by a retry is the same entry, never a second one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputRef {
    /// Record `record` (0-based; `line` in the file where the format has lines) of the file
    /// ingested by run `job` (see [`FileRecord::job`]).
    Record {
        job: String,
        record: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        line: Option<u64>,
    },
    /// A whole file of run `job`: one that could not be read at all.
    File { job: String },
    /// A stream message, by the id the broker stamped (kept across redeliveries).
    Message { id: String },
}

impl InputRef {
    /// The ingestion this input belongs to: a batch run's `job`, or the message id.
    pub fn ingestion(&self) -> &str {
        match self {
            Self::Record { job, .. } | Self::File { job } => job,
            Self::Message { id } => id,
        }
    }

    /// A key unique to this input among the tenant's inputs, for log entry ids.
    pub fn key(&self) -> String {
        match self {
            Self::Record { job, record, .. } => format!("r/{job}/{record}"),
            Self::File { job } => format!("f/{job}"),
            Self::Message { id } => format!("m/{id}"),
        }
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
    /// Inputs that store nothing: failed before reaching the database (parse errors, app
    /// errors) or skipped (the app returned nothing). Each gets one log entry.
    pub unstored: Vec<Unstored>,
    /// Batch: the file's origin (its content hash prefix, the prefix of its document ids).
    /// The log entries of a bulk with an origin are kept in buckets, a few documents per
    /// bulk, and written under the origin's lock (see `coredms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Batch: part of a replay of its run, so its entries are checked against the run's log.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocWrite {
    /// Deterministic id (see [`doc_id`]): a retry writes the same id, and is a duplicate.
    pub id: String,
    pub collection: String,
    pub doc: serde_json::Map<String, serde_json::Value>,
    /// The input it came from.
    pub input: InputRef,
    /// Size of the input this document came from.
    pub bytes: u64,
    /// When ingestion of its input began (record read, or message published), Unix µs.
    pub started_us: i64,
    /// A different data name than the batch's (e.g. per stream message type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_name: Option<String>,
    /// `doc` under `id` as coredms stores it, or why it cannot be (the reason logged), when
    /// it was encoded ahead (`coredms::encode_ahead`): the batch and stream stages encode on
    /// their read-ahead thread while the bulk before is written, so the write does not wait
    /// for it. Whoever changes `id` or `doc` afterwards sets it back to `None` (a debug build's
    /// write checks the bytes against the document). Never sent: a coredms in another
    /// process encodes what it receives.
    #[serde(skip)]
    pub encoded: Option<Result<mongodb::bson::RawDocumentBuf, String>>,
}

/// An input that stores nothing, and why: `reason` is `None` when the app returned nothing
/// for it (logged `skipped`), else why it failed (logged `failure`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unstored {
    pub input: InputRef,
    pub collection: String,
    /// The document that failed, for a failure of one document of the input (one too large
    /// to send to coredms, say): logged per document, as the database's refusals are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub bytes: u64,
    pub started_us: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_name: Option<String>,
}

/// What a bulk write did, per document: `failed` holds (index into `docs`, reason),
/// `duplicate` the indexes of documents an earlier ingestion had stored. The rest were
/// stored by this ingestion (now, or by an earlier attempt of it that a retry completes).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BulkOutcome {
    pub inserted: u64,
    pub duplicates: u64,
    pub failed: Vec<(usize, String)>,
    #[serde(default)]
    pub duplicate: Vec<usize>,
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

/// What a batch run's log says of its records: each record's outcome counted once (as in
/// [`FileRecord`]), and the records settled (stored, duplicate or skipped; not failed) as
/// sorted, disjoint `[start, end)` ranges. A record with no entry is neither.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecords {
    pub records_ok: u64,
    pub records_failed: u64,
    pub records_duplicate: u64,
    pub records_skipped: u64,
    pub documents_stored: u64,
    pub documents_duplicate: u64,
    pub documents_failed: u64,
    pub settled: Vec<(u64, u64)>,
}

impl JobRecords {
    /// Whether `record` is settled.
    pub fn is_settled(&self, record: u64) -> bool {
        let i = self.settled.partition_point(|(_, end)| *end <= record);
        self.settled
            .get(i)
            .is_some_and(|(start, _)| *start <= record)
    }

    /// Sets the counters of `rec` to these.
    pub fn count_into(&self, rec: &mut FileRecord) {
        rec.records_ok = self.records_ok;
        rec.records_failed = self.records_failed;
        rec.records_duplicate = self.records_duplicate;
        rec.records_skipped = self.records_skipped;
        rec.documents_stored = self.documents_stored;
        rec.documents_duplicate = self.documents_duplicate;
        rec.documents_failed = self.documents_failed;
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
