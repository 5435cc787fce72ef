//! coredms: the only component that talks to MongoDB. Tenant profiles, tenant databases,
//! app versions, staged-file status and the ingestion log all go through [`CoreDms`].
//!
//! [`CoreDms`] has two implementations with one interface: in-process ([`MongoStore`]) and
//! remote ([`Remote`], HTTP to a coredms service), so components run in one process or apart.

pub mod buckets;
mod mongodb;
mod ops;
mod remote;
mod router;

use std::borrow::Cow;
use std::sync::Arc;

use ::mongodb::bson::{self, Bson, DateTime, Document, RawDocumentBuf};
use serde::{Deserialize, Serialize};

pub use self::mongodb::MongoStore;
pub use ops::{Call, Param};
pub use remote::Remote;
pub use router::{CoredmsApi, CoredmsDoc, OnNewTenant, RPC_SLOTS, router, rpc_router};

use crate::logs::{LogEntry, Status};
use crate::model::{BulkWrite, InputRef, now_us};

#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum CoreError {
    #[error("tenant `{0}` not found")]
    TenantNotFound(String),
    #[error("tenant `{0}` already exists")]
    TenantExists(String),
    #[error("{0}")]
    Invalid(String),
    /// A compare-and-set lost: the record is not in the state the caller expected.
    #[error("{0}")]
    Conflict(String),
    /// MongoDB (or the coredms service) cannot be reached now; the caller may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
}

impl CoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<::mongodb::error::Error> for CoreError {
    fn from(e: ::mongodb::error::Error) -> Self {
        use ::mongodb::error::ErrorKind;
        match e.kind.as_ref() {
            ErrorKind::Io(_)
            | ErrorKind::ServerSelection { .. }
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::Shutdown => Self::Unavailable(e.to_string()),
            _ if e.contains_label("RetryableWriteError")
                || e.contains_label("TransientTransactionError") =>
            {
                Self::Unavailable(e.to_string())
            }
            ErrorKind::Command(c) if transient_code(c.code) => Self::Unavailable(e.to_string()),
            ErrorKind::Write(::mongodb::error::WriteFailure::WriteError(w))
                if transient_code(w.code) =>
            {
                Self::Unavailable(e.to_string())
            }
            _ => Self::Database(e.to_string()),
        }
    }
}

/// Server error codes that say the database cannot take writes now (shutting down, stepping
/// down, out of disk, over a time limit, busy, credentials): worth retrying, never a fault
/// of the documents written.
pub fn transient_code(code: i32) -> bool {
    matches!(
        code,
        6 | 7
            | 13
            | 18
            | 24
            | 46
            | 50
            | 63
            | 89
            | 91
            | 112
            | 133
            | 150
            | 189
            | 262
            | 9001
            | 10107
            | 11600
            | 11602
            | 12586
            | 12587
            | 13388
            | 13435
            | 13436
            | 14031
    )
}

/// Encodes `docs` now, for a bulk write to use ([`DocWrite::encoded`](crate::model::DocWrite)):
/// called off the write's path, on the thread that read and transformed them, where the
/// coredms is in this process ([`CoreDms::in_process`]); one in another process encodes
/// what it receives.
pub fn encode_ahead(docs: &mut [crate::model::DocWrite]) {
    for d in docs {
        d.encoded = Some(encode(&d.id, &d.doc).map_err(|e| e.to_string()));
    }
}

/// The documents of a bulk write as BSON, grouped by collection, ready to insert: those
/// encoded ahead borrowed from the write, not copied.
pub struct Prepared<'a> {
    /// (collection, indexes into `BulkWrite::docs`, encoded documents)
    pub collections: Vec<(String, Vec<usize>, Vec<Cow<'a, RawDocumentBuf>>)>,
    /// Documents the database would refuse, found before the write: (index, reason).
    pub invalid: Vec<(usize, String)>,
}

/// Largest document MongoDB stores (its `maxBsonObjectSize`).
pub const MAX_BSON_BYTES: usize = 16 * 1024 * 1024;
/// Deepest nesting MongoDB accepts in a stored document (the top level counts as one).
pub const MAX_BSON_DEPTH: usize = 100;

/// A document as it is stored: `_id` first, then its fields without any `_id` of its own.
struct WithId<'a> {
    id: &'a str,
    doc: &'a serde_json::Map<String, serde_json::Value>,
}

impl Serialize for WithId<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("_id", self.id)?;
        for (k, v) in self.doc {
            if k != "_id" {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

/// Why a document cannot be stored: the reason logged for it (the first 80 characters of
/// a key it names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    /// A key holding a NUL byte (shown as `\0`).
    #[error("key `{0}` holds a NUL byte, which the database cannot store")]
    NulInKey(String),
    #[error("document nests deeper than {MAX_BSON_DEPTH} levels, MongoDB's documented limit")]
    TooDeep,
    /// A value BSON cannot hold (such as an integer over `i64`).
    #[error("field `{field}` cannot be stored: {reason}")]
    Field { field: String, reason: String },
    /// A `$` key left once Extended JSON was read.
    #[error(
        "key `{0}` starts with `$`: only MongoDB Extended JSON ($date, $oid, $numberLong, …) may"
    )]
    DollarKey(String),
    #[error("document is {0} bytes as BSON, over the database's {MAX_BSON_BYTES} bytes limit")]
    TooLarge(usize),
    /// The BSON encoder refused it.
    #[error("document cannot be stored: {0}")]
    Encoding(String),
}

/// Why a document cannot be stored, found without asking the database: a key holding a NUL
/// byte, nesting deeper than [`MAX_BSON_DEPTH`]. `Ok(true)` when it has `$`-prefixed keys,
/// which are stored only as MongoDB Extended JSON (`{"$date": …}`, `{"$oid": …}`, …).
pub fn check_document(
    doc: &serde_json::Map<String, serde_json::Value>,
) -> Result<bool, DocumentError> {
    fn key(k: &str, dollar: &mut bool) -> Result<(), DocumentError> {
        if k.contains('\0') {
            return Err(DocumentError::NulInKey(
                k.replace('\0', "\\0").chars().take(80).collect(),
            ));
        }
        *dollar |= k.starts_with('$');
        Ok(())
    }
    fn walk(v: &serde_json::Value, depth: usize, dollar: &mut bool) -> Result<(), DocumentError> {
        let nested = matches!(
            v,
            serde_json::Value::Object(_) | serde_json::Value::Array(_)
        );
        if nested && depth > MAX_BSON_DEPTH {
            return Err(DocumentError::TooDeep);
        }
        match v {
            serde_json::Value::Object(m) => m.iter().try_for_each(|(k, v)| {
                key(k, dollar)?;
                walk(v, depth + 1, dollar)
            }),
            serde_json::Value::Array(items) => {
                items.iter().try_for_each(|i| walk(i, depth + 1, dollar))
            }
            _ => Ok(()),
        }
    }
    let mut dollar = false;
    doc.iter()
        .filter(|(k, _)| *k != "_id")
        .try_for_each(|(k, v)| {
            key(k, &mut dollar)?;
            walk(v, 2, &mut dollar)
        })?;
    Ok(dollar)
}

/// A `$`-prefixed key left once Extended JSON was read: not a BSON type, so not stored.
fn first_dollar_key(doc: &Document) -> Option<String> {
    fn walk(b: &Bson) -> Option<String> {
        match b {
            Bson::Document(d) => first_dollar_key(d),
            Bson::Array(a) => a.iter().find_map(walk),
            _ => None,
        }
    }
    doc.iter().find_map(|(k, v)| {
        if k.starts_with('$') {
            Some(k.clone())
        } else {
            walk(v)
        }
    })
}

/// One document encoded as stored BSON, or why it cannot be stored: a NUL in a key, too
/// deep, a number BSON cannot hold, a `$` key that is not Extended JSON, or over
/// [`MAX_BSON_BYTES`].
pub fn encode(
    id: &str,
    doc: &serde_json::Map<String, serde_json::Value>,
) -> Result<RawDocumentBuf, DocumentError> {
    let encoding = |e: bson::ser::Error| DocumentError::Encoding(e.to_string());
    let bytes = if check_document(doc)? {
        // Extended JSON: `{"$date": "…"}` becomes a date, as the driver reads it.
        let mut d = Document::new();
        d.insert("_id", id);
        for (k, v) in doc {
            if k == "_id" {
                continue;
            }
            let b = Bson::try_from(v.clone()).map_err(|e| DocumentError::Field {
                field: k.clone(),
                reason: e.to_string(),
            })?;
            d.insert(k.as_str(), b);
        }
        if let Some(k) = first_dollar_key(&d) {
            return Err(DocumentError::DollarKey(k.chars().take(80).collect()));
        }
        bson::to_vec(&d).map_err(encoding)?
    } else {
        bson::to_vec(&WithId { id, doc }).map_err(encoding)?
    };
    if bytes.len() > MAX_BSON_BYTES {
        return Err(DocumentError::TooLarge(bytes.len()));
    }
    RawDocumentBuf::from_bytes(bytes).map_err(|e| DocumentError::Encoding(e.to_string()))
}

/// Encodes a bulk write's documents as BSON with their ids, and sets aside each document the
/// database would refuse, so that one poison document fails alone: the CPU-bound part of a
/// write.
pub fn prepare(w: &BulkWrite) -> Prepared<'_> {
    let mut collections: Vec<(String, Vec<usize>, Vec<Cow<'_, RawDocumentBuf>>)> = Vec::new();
    let mut invalid = Vec::new();
    for (i, d) in w.docs.iter().enumerate() {
        let encoded: Result<Cow<'_, RawDocumentBuf>, String> = match &d.encoded {
            Some(ahead) => {
                // Bytes encoded ahead must be of the document as it is now: a change of `id`
                // or `doc` after `encode_ahead` that did not clear them fails every test.
                #[cfg(debug_assertions)]
                {
                    let now = encode(&d.id, &d.doc).map_err(|e| e.to_string());
                    let same = match (ahead, &now) {
                        (Ok(a), Ok(b)) => a.as_bytes() == b.as_bytes(),
                        (Err(a), Err(b)) => a == b,
                        _ => false,
                    };
                    assert!(same, "document {} changed after it was encoded ahead", d.id);
                }
                ahead.as_ref().map(Cow::Borrowed).map_err(Clone::clone)
            }
            None => encode(&d.id, &d.doc)
                .map(Cow::Owned)
                .map_err(|e| e.to_string()),
        };
        let doc = match encoded {
            Ok(doc) => doc,
            Err(reason) => {
                invalid.push((i, reason));
                continue;
            }
        };
        match collections.iter_mut().find(|(c, _, _)| *c == d.collection) {
            Some((_, idx, docs)) => {
                idx.push(i);
                docs.push(doc);
            }
            None => collections.push((d.collection.clone(), vec![i], vec![doc])),
        }
    }
    Prepared {
        collections,
        invalid,
    }
}

/// Fault injection for the platform's integration tests (feature `faults`), per tenant: a
/// bulk write that stops or fails between its data and its log entries (as in a process
/// killed, or a database gone, between the two), a lock take that stops once it landed, and
/// idle lock releases held.
#[cfg(feature = "faults")]
pub mod faults {
    use std::collections::HashSet;
    use std::sync::{LazyLock, Mutex};

    /// The tenants a fault is armed for.
    type Tenants = LazyLock<Mutex<HashSet<String>>>;

    fn arm(set: &Tenants, tenant: &str) {
        if let Ok(mut s) = set.lock() {
            s.insert(tenant.to_owned());
        }
    }

    /// Whether the fault was armed for `tenant`; disarms it.
    fn fire(set: &Tenants, tenant: &str) -> bool {
        set.lock().map(|mut s| s.remove(tenant)).unwrap_or(false)
    }

    fn armed(set: &Tenants, tenant: &str) -> bool {
        set.lock().is_ok_and(|s| s.contains(tenant))
    }

    static STALL_BEFORE_LOG: Tenants = LazyLock::new(Default::default);
    static FAIL_BEFORE_LOG: Tenants = LazyLock::new(Default::default);
    static STALL_AFTER_TAKE: Tenants = LazyLock::new(Default::default);
    static STALLED_AFTER_TAKE: Tenants = LazyLock::new(Default::default);
    static HOLD_IDLE_LOCKS: Tenants = LazyLock::new(Default::default);

    /// The next bulk write of `tenant` (in any in-process coredms) writes its documents, then
    /// never returns: the test kills the platform there.
    pub fn stall_before_log(tenant: &str) {
        arm(&STALL_BEFORE_LOG, tenant);
    }

    /// The next bulk write of `tenant` (in any in-process coredms) writes its documents, then
    /// fails as if the database went away before its log (a retryable error).
    pub fn fail_before_log(tenant: &str) {
        arm(&FAIL_BEFORE_LOG, tenant);
    }

    /// The next take of a file lock of `tenant` by an update (a take-over) lands, then never
    /// returns: the test cancels the attempt there, once [`stalled_after_take`] says so.
    pub fn stall_after_take(tenant: &str) {
        arm(&STALL_AFTER_TAKE, tenant);
    }

    /// Whether a take of `tenant`'s has landed and stopped there (see [`stall_after_take`]).
    pub fn stalled_after_take(tenant: &str) -> bool {
        armed(&STALLED_AFTER_TAKE, tenant)
    }

    /// While held, `tenant`'s file locks are not released idle (a test's way to take a run's
    /// next bulk within the idle time, however slow the machine), then as usual.
    pub fn hold_idle_locks(tenant: &str, hold: bool) {
        if hold {
            arm(&HOLD_IDLE_LOCKS, tenant);
        } else {
            fire(&HOLD_IDLE_LOCKS, tenant);
        }
    }

    /// Disarms every fault of `tenant` that has not fired (after a kill that came first, so
    /// that the restarted platform runs without it).
    pub fn clear(tenant: &str) {
        for set in [
            &STALL_BEFORE_LOG,
            &FAIL_BEFORE_LOG,
            &STALL_AFTER_TAKE,
            &STALLED_AFTER_TAKE,
            &HOLD_IDLE_LOCKS,
        ] {
            fire(set, tenant);
        }
    }

    pub(crate) async fn after_take(tenant: &str) {
        if fire(&STALL_AFTER_TAKE, tenant) {
            arm(&STALLED_AFTER_TAKE, tenant);
            std::future::pending::<()>().await;
        }
    }

    /// Waits while the tenant of lock `id` (`<tenant>/<origin>`) is held.
    pub(crate) async fn before_idle_release(id: &str) {
        let tenant = id.split('/').next().unwrap_or_default();
        while armed(&HOLD_IDLE_LOCKS, tenant) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub(crate) async fn before_log(tenant: &str) -> Result<(), super::CoreError> {
        if fire(&FAIL_BEFORE_LOG, tenant) {
            return Err(super::CoreError::Unavailable(
                "fault injected: the database went away between the data and the log".into(),
            ));
        }
        if fire(&STALL_BEFORE_LOG, tenant) {
            tracing::warn!(
                tenant,
                "fault injected: stopping between the data and the log"
            );
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// The `_id` of a log entry, derived from what it is about, never random: writing an entry
/// again (a retry after a crash, a redelivery) writes the same id, and the log keeps one.
///
/// A stored document has one `success` entry, whichever ingestion stored it; the other
/// entries are per (document or input, ingestion).
pub fn log_id(
    tenant: &str,
    status: Status,
    collection: &str,
    doc: Option<&str>,
    input: &InputRef,
) -> String {
    match (status, doc) {
        (Status::Success, Some(doc)) => format!("{tenant}/s/{collection}/{doc}"),
        (Status::Duplicate, Some(doc)) => format!("{tenant}/d/{collection}/{doc}/{}", input.key()),
        (Status::Failure, Some(doc)) => format!("{tenant}/f/{collection}/{doc}/{}", input.key()),
        (Status::Skipped, _) => format!("{tenant}/k/{}", input.key()),
        (_, _) => format!("{tenant}/f/{}", input.key()),
    }
}

/// What one log entry is about: an input, and for a document entry the document.
struct About<'a> {
    input: &'a InputRef,
    data_name: Option<&'a String>,
    collection: &'a str,
    bytes: u64,
    started_us: i64,
    document_id: Option<&'a str>,
}

fn entry(
    w: &BulkWrite,
    (now, now_us): (DateTime, i64),
    about: About<'_>,
    status: Status,
    reason: Option<String>,
) -> LogEntry {
    let About {
        input,
        data_name,
        collection,
        bytes,
        started_us,
        document_id,
    } = about;
    let (record, line, message_id) = match input {
        InputRef::Record { record, line, .. } => (Some(*record), *line, None),
        InputRef::File { .. } => (None, None, None),
        InputRef::Message { id } => (None, None, Some(id.clone())),
    };
    LogEntry {
        timestamp: now,
        tenant: w.tenant.to_string(),
        source: w.source,
        data_name: data_name.cloned().unwrap_or_else(|| w.data_name.clone()),
        collection: collection.to_owned(),
        status,
        reason,
        bytes,
        latency_us: u64::try_from(now_us - started_us).unwrap_or(0),
        app_version: w.app_version,
        ingestion: Some(input.ingestion().to_owned()),
        record,
        line,
        message_id,
        document_id: document_id.map(str::to_owned),
    }
}

/// An entry as a log document of its own, under its [`log_id`].
pub fn entry_document(e: &LogEntry) -> Document {
    let mut out = Document::new();
    // `_id` first, as the server would put it.
    out.insert("_id", buckets::identity(e));
    out.extend(e.to_document());
    out
}

/// The log entries of a bulk write as documents of their own: one per document (with its
/// outcome `status[i]`, and `reasons[i]` for a failed one) and one per input that stored
/// nothing.
pub fn log_entries(w: &BulkWrite, status: &[Status], reasons: &[Option<String>]) -> Vec<Document> {
    log_values(w, status, reasons)
        .iter()
        .map(entry_document)
        .collect()
}

/// The log entries of a bulk write, in the order of [`log_entries`].
pub fn log_values(w: &BulkWrite, status: &[Status], reasons: &[Option<String>]) -> Vec<LogEntry> {
    let now = (DateTime::now(), now_us());
    let mut out = Vec::with_capacity(w.docs.len() + w.unstored.len());
    for (i, reason) in reasons.iter().enumerate() {
        out.push(document_entry(w, now, i, status[i], reason.clone()));
    }
    for u in &w.unstored {
        let status = if u.reason.is_some() {
            Status::Failure
        } else {
            Status::Skipped
        };
        let about = About {
            input: &u.input,
            data_name: u.data_name.as_ref(),
            collection: &u.collection,
            bytes: u.bytes,
            started_us: u.started_us,
            document_id: u.document_id.as_deref(),
        };
        out.push(entry(w, now, about, status, u.reason.clone()));
    }
    out
}

/// The log entry of document `i` of `w`, with its outcome.
pub fn document_entry(
    w: &BulkWrite,
    now: (DateTime, i64),
    i: usize,
    status: Status,
    reason: Option<String>,
) -> LogEntry {
    let d = &w.docs[i];
    let about = About {
        input: &d.input,
        data_name: d.data_name.as_ref(),
        collection: &d.collection,
        bytes: d.bytes,
        started_us: d.started_us,
        document_id: Some(&d.id),
    };
    entry(w, now, about, status, reason)
}

/// The single interface every component uses to reach the database; its operations are
/// defined once, in [`ops`].
#[derive(Clone)]
pub enum CoreDms {
    Local(Arc<MongoStore>),
    Remote(Arc<Remote>),
}

impl CoreDms {
    /// Whether the database is reached from this process (bulk writes are encoded here).
    pub fn in_process(&self) -> bool {
        matches!(self, Self::Local(_))
    }
}

/// Converts stored BSON back to JSON for API responses: ids and dates as strings.
pub fn to_json(doc: Document) -> serde_json::Value {
    fn conv(b: Bson) -> serde_json::Value {
        match b {
            Bson::DateTime(d) => d
                .try_to_rfc3339_string()
                .map(serde_json::Value::String)
                .unwrap_or(serde_json::Value::Null),
            Bson::ObjectId(o) => serde_json::Value::String(o.to_hex()),
            Bson::Document(d) => {
                serde_json::Value::Object(d.into_iter().map(|(k, v)| (k, conv(v))).collect())
            }
            Bson::Array(a) => serde_json::Value::Array(a.into_iter().map(conv).collect()),
            other => other.into_relaxed_extjson(),
        }
    }
    conv(Bson::Document(doc))
}

pub(crate) fn bson_err(e: bson::ser::Error) -> CoreError {
    CoreError::Invalid(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Source;
    use crate::model::{DocWrite, Unstored, doc_id};
    use crate::tenants::TenantName;
    use serde_json::json;

    fn write(docs: Vec<serde_json::Value>) -> BulkWrite {
        BulkWrite {
            tenant: TenantName::parse("alice").expect("valid"),
            source: Source::Batch,
            data_name: "f.csv".into(),
            app_version: None,
            docs: docs
                .into_iter()
                .enumerate()
                .map(|(i, d)| DocWrite {
                    id: doc_id("abc", i as u64, 0),
                    collection: if i % 2 == 0 { "a".into() } else { "b".into() },
                    doc: d.as_object().cloned().unwrap_or_default(),
                    input: InputRef::Record {
                        job: "j1".into(),
                        record: i as u64,
                        line: Some(i as u64 + 2),
                    },
                    bytes: 3,
                    started_us: now_us(),
                    data_name: None,
                    encoded: None,
                })
                .collect(),
            unstored: vec![],
            origin: Some("abc".into()),
            replay: false,
        }
    }

    #[test]
    fn prepare_groups_by_collection_and_sets_ids() {
        let w = write(vec![
            json!({"x": 1}),
            json!({"y": 2.5}),
            json!({"_id": "mine", "z": [1]}),
        ]);
        let p = prepare(&w);
        assert!(p.invalid.is_empty());
        assert_eq!(p.collections.len(), 2);
        let (c, idx, docs) = &p.collections[0];
        assert_eq!((c.as_str(), idx.as_slice()), ("a", &[0usize, 2][..]));
        assert_eq!(docs[1].get_str("_id").expect("id"), "abc:2");
        assert_eq!(
            docs[1].iter().count(),
            2,
            "the document's own `_id` is replaced"
        );
        assert!(
            matches!(
                docs[0].get("x").expect("readable"),
                Some(bson::RawBsonRef::Int32(1) | bson::RawBsonRef::Int64(1))
            ),
            "integers stay integers: {:?}",
            docs[0]
        );
    }

    #[test]
    fn documents_the_database_would_refuse_fail_alone_with_their_reason() {
        let mut deep = json!(1);
        for _ in 0..=MAX_BSON_DEPTH {
            deep = json!({ "d": deep });
        }
        let w = write(vec![
            json!({"ok": 1}),
            json!({"a\u{0}b": 1}),
            json!({"nested": {"$set": 1}}),
            json!({"when": {"$date": "2026-11-28T16:00:00Z"}}),
            deep,
            json!({"big": "x".repeat(MAX_BSON_BYTES)}),
            json!({"n": u64::MAX}),
            json!({"ok": [1, {"k": "v"}]}),
        ]);
        let p = prepare(&w);
        let stored: Vec<usize> = p
            .collections
            .iter()
            .flat_map(|(_, idx, _)| idx.clone())
            .collect();
        assert_eq!(stored, vec![0, 3, 7], "Extended JSON is stored");
        let reasons: Vec<(usize, &str)> = p.invalid.iter().map(|(i, r)| (*i, r.as_str())).collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert!(reasons[0].1.contains("NUL"), "{reasons:?}");
        assert!(
            reasons[1].1.contains("`$set` starts with `$`"),
            "{reasons:?}"
        );
        assert!(reasons[2].1.contains("deeper than 100"), "{reasons:?}");
        assert!(reasons[3].1.contains("bytes limit"), "{reasons:?}");
        assert!(reasons[4].1.contains("cannot be stored"), "{reasons:?}");
        let when = p
            .collections
            .iter()
            .find_map(|(_, idx, docs)| idx.iter().position(|&i| i == 3).map(|k| &docs[k]))
            .expect("stored");
        assert!(
            when.get_datetime("when").is_ok(),
            "Extended JSON dates become dates: {when:?}"
        );
    }

    #[test]
    fn documents_encoded_ahead_are_written_as_prepare_would_encode_them() {
        let docs = vec![
            json!({"ok": 1, "s": "text", "f": 2.5}),
            json!({"a\u{0}b": 1}),
            json!({"_id": "mine", "nested": {"$set": 1}}),
            json!({"when": {"$date": "2026-11-28T16:00:00Z"}}),
            json!({"big": "x".repeat(MAX_BSON_BYTES)}),
            json!({"n": u64::MAX}),
            json!({"_id": "mine", "ok": [1, {"k": "v"}]}),
        ];
        let plain = write(docs.clone());
        let now = prepare(&plain);
        let mut w = write(docs);
        encode_ahead(&mut w.docs);
        assert!(w.docs.iter().all(|d| d.encoded.is_some()));
        let ahead = prepare(&w);
        assert_eq!(ahead.invalid, now.invalid);
        assert_eq!(ahead.invalid.len(), 4, "{:?}", ahead.invalid);
        let bytes = |p: &Prepared| -> Vec<(String, Vec<usize>, Vec<Vec<u8>>)> {
            p.collections
                .iter()
                .map(|(c, idx, docs)| {
                    let docs = docs.iter().map(|d| d.as_bytes().to_vec()).collect();
                    (c.clone(), idx.clone(), docs)
                })
                .collect()
        };
        assert_eq!(bytes(&ahead), bytes(&now));
        assert_eq!(
            ahead.collections.iter().map(|c| c.2.len()).sum::<usize>(),
            3
        );
        // What was encoded ahead is what is written, so it must be of the document as it is:
        // bytes left from before a change are caught in every debug build.
        if cfg!(debug_assertions) {
            w.docs[0].encoded = Some(Err("stale".into()));
            let stale = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prepare(&w)));
            assert!(stale.is_err(), "stale bytes encoded ahead are caught");
        }
    }

    #[test]
    fn refused_keys_are_found_at_any_depth_and_in_arrays() {
        for doc in [
            json!({"a": [{"b\u{0}c": 1}]}),
            json!({"a": {"b": [[{"$where": "1"}]]}}),
            json!({"a": [1, {"b": {"c": {"$set": 2}}}]}),
        ] {
            let m = doc.as_object().cloned().unwrap_or_default();
            assert!(encode("x", &m).is_err(), "{doc} must be refused");
        }
        // Extended JSON deep inside is read, not refused.
        let m = json!({"a": [{"when": {"$date": "2026-11-28T16:00:00Z"}}]});
        let m = m.as_object().cloned().unwrap_or_default();
        assert!(encode("x", &m).is_ok());
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        let mut deep = json!(1);
        for _ in 0..MAX_BSON_DEPTH {
            deep = json!({ "d": deep });
        }
        let doc = deep.as_object().cloned().unwrap_or_default();
        assert!(encode("x", &doc).is_ok());
    }

    #[test]
    fn ids_are_deterministic() {
        assert_eq!(doc_id("h", 7, 0), "h:7");
        assert_eq!(doc_id("h", 7, 2), "h:7:2");
    }

    #[test]
    fn every_document_and_unstored_input_gets_one_entry_under_an_id_of_what_it_is_about() {
        let mut w = write(vec![json!({"x": 1}), json!({"x": 2})]);
        let input = |record| InputRef::Record {
            job: "j1".into(),
            record,
            line: None,
        };
        for (record, reason) in [(2, Some("line 4: bad")), (3, None)] {
            w.unstored.push(Unstored {
                input: input(record),
                collection: "a".into(),
                document_id: None,
                reason: reason.map(str::to_owned),
                bytes: 1,
                started_us: now_us(),
                data_name: None,
            });
        }
        let logs = log_entries(&w, &[Status::Success, Status::Duplicate], &[None, None]);
        let ids: Vec<&str> = logs.iter().map(|d| d.get_str("_id").expect("id")).collect();
        assert_eq!(
            ids,
            [
                "alice/s/a/abc:0",
                "alice/d/b/abc:1/r/j1/1",
                "alice/f/r/j1/2",
                "alice/k/r/j1/3"
            ]
        );
        assert_eq!(logs[1].get_str("status").expect("status"), "duplicate");
        assert_eq!(logs[2].get_str("reason").expect("reason"), "line 4: bad");
        assert_eq!(logs[3].get_str("status").expect("status"), "skipped");
        assert_eq!(logs[0].get_i64("record").expect("record"), 0);
        assert_eq!(logs[0].get_i64("line").expect("line"), 2);
        assert_eq!(logs[0].get_str("document_id").expect("doc"), "abc:0");
        assert_eq!(logs[3].get_str("ingestion").expect("ingestion"), "j1");
        // Built again (a retry), every entry has the same id.
        let again = log_entries(&w, &[Status::Success, Status::Duplicate], &[None, None]);
        let again: Vec<&str> = again
            .iter()
            .map(|d| d.get_str("_id").expect("id"))
            .collect();
        assert_eq!(ids, again);
        // The one `success` entry of a document does not depend on which ingestion wrote it.
        assert_eq!(
            log_id(
                "alice",
                Status::Success,
                "a",
                Some("abc:0"),
                &InputRef::Message { id: "m".into() }
            ),
            "alice/s/a/abc:0"
        );
    }
}
