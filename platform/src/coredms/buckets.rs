//! The batch log's storage: a bulk's entries kept in a few bucket documents instead of one
//! document each, so the log costs about one write (and one index key) per bulk.
//!
//! A bucket holds the entries of one bulk for one block of [`BLOCK`] consecutive records of
//! a file, under an id derived from (tenant, origin, block, run, first record): the file's
//! every run, whatever its bulk size, finds all entries about a record range by one range
//! query on `_id`, the index every collection has. The fields all of a bucket's entries
//! share (time, tenant, source, run, data name, app version) are stored once, in the bucket;
//! each entry keeps the rest. The entries are stored packed: their BSON, deflated, in one
//! binary field (`packed`), with the statuses they hold beside it (`statuses`, for queries
//! by status). A server pays for every element it parses and stores: 1,000 entries as an
//! array of documents cost SecantusDB about 9% of the time of writing their 1,000 records,
//! packed about 2%. What tenants download is the same entries, one by one ([`expand`]).
//! Stream entries stay one document each (their ids make redeliveries idempotent: see
//! `log_id`).

use std::collections::HashSet;
use std::io::{Read, Write};

use ::mongodb::bson::spec::BinarySubtype;
use ::mongodb::bson::{Binary, Bson, Document, RawArrayBuf, RawBsonRef, RawDocumentBuf, doc};

use super::log_id;
use crate::logs::{LogEntry, Status};
use crate::model::InputRef;

/// Records per block: a bucket never holds entries of two blocks.
pub const BLOCK: u64 = 1024;
/// Entries per bucket at most, and their approximate BSON bytes (well under MongoDB's 16 MiB).
const MAX_ENTRIES: usize = 4096;
const MAX_BYTES: usize = 4 << 20;
/// The fields a bucket holds once for all its entries.
const SHARED: [&str; 6] = [
    "timestamp",
    "tenant",
    "source",
    "ingestion",
    "data_name",
    "app_version",
];

/// The `_id` prefix of the buckets of a file's origin.
pub fn prefix(tenant: &str, origin: &str) -> String {
    format!("{tenant}/b/{origin}/")
}

/// The block a record's entries go to; entries of a whole file (no record) go to `f`.
fn block(record: Option<u64>) -> String {
    record.map_or_else(|| "f".to_owned(), |r| format!("{:09}", r / BLOCK))
}

/// The `_id` ranges `[from, to)` holding every bucket about `records` (and, with `file`, the
/// whole-file entries) of an origin, in any run.
pub fn ranges(tenant: &str, origin: &str, records: &[u64], file: bool) -> Vec<(String, String)> {
    let p = prefix(tenant, origin);
    let mut blocks: Vec<u64> = records.iter().map(|r| r / BLOCK).collect();
    blocks.sort_unstable();
    blocks.dedup();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i];
        let mut end = start;
        while i + 1 < blocks.len() && blocks[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        // Block ids are fixed-width digits followed by `/`: block `end + 1` sorts after all
        // of block `end`.
        out.push((format!("{p}{start:09}/"), format!("{p}{:09}/", end + 1)));
        i += 1;
    }
    if file {
        // `0` is the character after `/`.
        out.push((format!("{p}f/"), format!("{p}f0")));
    }
    out
}

/// A bulk's entries (all of one tenant, source and run) as bucket documents: grouped by
/// block in order, split at [`MAX_ENTRIES`] or [`MAX_BYTES`]. Ids are derived from the
/// first record of each bucket (and `suffix`), so the same bulk written again has the same
/// ids.
pub fn buckets(tenant: &str, origin: &str, entries: &[LogEntry], suffix: &str) -> Vec<Document> {
    let p = prefix(tenant, origin);
    let mut out = Vec::new();
    let mut parts: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut start = 0;
    while start < entries.len() {
        let b = block(entries[start].record);
        let mut end = start;
        let mut bytes = 0;
        while end < entries.len()
            && end - start < MAX_ENTRIES
            && bytes < MAX_BYTES
            && block(entries[end].record) == b
        {
            bytes += approximate_bytes(&entries[end]);
            end += 1;
        }
        let first = &entries[start];
        let job = first.ingestion.as_deref().unwrap_or("-");
        let mut at = first
            .record
            .map_or_else(|| format!("f{start:08}"), |r| format!("{r:012}"));
        // A record's documents may fill more than one bucket: the next ones are numbered.
        let n = parts.entry(at.clone()).or_insert(0u32);
        if *n > 0 {
            at = format!("{at}.{n}");
        }
        *n += 1;
        let id = format!("{p}{b}/{job}/{at}{suffix}");
        out.push(bucket(id, &entries[start..end]));
        start = end;
    }
    out
}

fn approximate_bytes(e: &LogEntry) -> usize {
    160 + e.collection.len()
        + e.reason.as_ref().map_or(0, String::len)
        + e.document_id.as_ref().map_or(0, String::len)
}

/// One bucket: the shared fields from its first entry, and each entry without the fields it
/// shares with the bucket.
fn bucket(id: String, entries: &[LogEntry]) -> Document {
    let first = &entries[0];
    let shared = first.to_document();
    let mut out = doc! {"_id": id};
    for k in SHARED {
        if let Some(v) = shared.get(k) {
            out.insert(k, v.clone());
        }
    }
    let mut statuses: Vec<&str> = Vec::new();
    let mut list = RawArrayBuf::new();
    for e in entries {
        let status = crate::logs::status_str(e.status);
        if !statuses.contains(&status) {
            statuses.push(status);
        }
        list.push(packed_entry(e, first));
    }
    let mut packed = RawDocumentBuf::new();
    packed.append("entries", list);
    out.insert("statuses", statuses);
    out.insert(
        "packed",
        Binary {
            subtype: BinarySubtype::Generic,
            bytes: deflate(packed.as_bytes()),
        },
    );
    out
}

/// Entry `e` of a bucket whose shared fields are `first`'s: the fields `LogEntry::to_document`
/// writes, less those equal to `first`'s. A shared field `e` lacks and `first` has is
/// written as null, so that [`expand`] does not give it `first`'s. Encoded straight to BSON:
/// this runs for every entry of every bulk, between its data write and its log write.
fn packed_entry(e: &LogEntry, first: &LogEntry) -> RawDocumentBuf {
    fn opt<'a>(d: &mut RawDocumentBuf, k: &str, v: Option<RawBsonRef<'a>>, shared: bool) {
        match v {
            Some(v) => d.append_ref(k, v),
            None if shared => d.append_ref(k, RawBsonRef::Null),
            None => {}
        }
    }
    let mut d = RawDocumentBuf::new();
    if e.timestamp != first.timestamp {
        d.append_ref("timestamp", e.timestamp);
    }
    if e.tenant != first.tenant {
        d.append_ref("tenant", e.tenant.as_str());
    }
    if e.source != first.source {
        d.append_ref("source", crate::logs::source_str(e.source));
    }
    if e.data_name != first.data_name {
        d.append_ref("data_name", e.data_name.as_str());
    }
    d.append_ref("collection", e.collection.as_str());
    d.append_ref("status", crate::logs::status_str(e.status));
    opt(
        &mut d,
        "reason",
        e.reason.as_deref().map(RawBsonRef::String),
        false,
    );
    d.append_ref("bytes", e.bytes as i64);
    d.append_ref("latency_us", e.latency_us as i64);
    if e.app_version != first.app_version {
        let v = e.app_version.map(|v| RawBsonRef::Int64(i64::from(v)));
        opt(&mut d, "app_version", v, true);
    }
    if e.ingestion != first.ingestion {
        let v = e.ingestion.as_deref().map(RawBsonRef::String);
        opt(&mut d, "ingestion", v, true);
    }
    opt(
        &mut d,
        "record",
        e.record.map(|v| RawBsonRef::Int64(v as i64)),
        false,
    );
    opt(
        &mut d,
        "line",
        e.line.map(|v| RawBsonRef::Int64(v as i64)),
        false,
    );
    let v = e.message_id.as_deref().map(RawBsonRef::String);
    opt(&mut d, "message_id", v, false);
    let v = e.document_id.as_deref().map(RawBsonRef::String);
    opt(&mut d, "document_id", v, false);
    d
}

/// Bytes deflated (fast level: the entries are repetitive, the CPU is shared).
fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::fast(),
    );
    // Writing to a Vec fails only when memory does.
    z.write_all(bytes).expect("deflate into memory");
    z.finish().expect("deflate into memory")
}

/// What [`deflate`] made of a document, back; `None` for bytes that are not.
fn unpack(bytes: &[u8]) -> Option<Document> {
    let mut raw = Vec::new();
    flate2::read::DeflateDecoder::new(bytes)
        .take(4 * MAX_BYTES as u64)
        .read_to_end(&mut raw)
        .ok()?;
    Document::from_reader(&raw[..]).ok()
}

/// The entries a stored log document holds: a bucket's, each with the bucket's shared
/// fields, or the document itself (a stream entry). Buckets stored before entries were
/// packed hold them as an `entries` array; they read the same.
pub fn expand(mut d: Document) -> Vec<Document> {
    if let Some(Bson::Binary(b)) = d.remove("packed") {
        d.remove("statuses");
        match unpack(&b.bytes).and_then(|mut p| p.remove("entries")) {
            Some(e) => {
                d.insert("entries", e);
            }
            None => {
                tracing::warn!(bucket = ?d.get("_id"), "a log bucket's entries cannot be read");
                return Vec::new();
            }
        }
    }
    let Some(Bson::Array(entries)) = d.remove("entries") else {
        d.remove("_id");
        return vec![d];
    };
    entries
        .into_iter()
        .filter_map(|e| match e {
            Bson::Document(e) => {
                let mut full = Document::new();
                for k in SHARED {
                    if let Some(v) = e.get(k).or_else(|| d.get(k)) {
                        full.insert(k, v.clone());
                    }
                }
                for (k, v) in e {
                    if !full.contains_key(&k) {
                        full.insert(k, v);
                    }
                }
                Some(full)
            }
            _ => None,
        })
        .collect()
}

/// A stored entry decoded; `None` for a document that is not one.
pub fn decode(d: Document) -> Option<LogEntry> {
    ::mongodb::bson::from_document(d).ok()
}

/// The input an entry is about, as its fields name it.
pub fn input_of(e: &LogEntry) -> InputRef {
    let ingestion = e.ingestion.clone().unwrap_or_default();
    match (&e.message_id, e.record) {
        (Some(id), _) => InputRef::Message { id: id.clone() },
        (None, Some(record)) => InputRef::Record {
            job: ingestion,
            record,
            line: e.line,
        },
        (None, None) => InputRef::File { job: ingestion },
    }
}

/// What the log already says about a bulk's records: the identities ([`log_id`]) of the
/// entries of the bulk's own run, and the documents another run stored.
#[derive(Debug, Default)]
pub struct Logged {
    pub mine: HashSet<String>,
    /// (collection, document id) with a `success` entry of another run.
    pub others_stored: HashSet<(String, String)>,
}

impl Logged {
    /// Folds one stored entry in, for a bulk of run `job`.
    pub fn add(&mut self, job: &str, e: &LogEntry) {
        if e.ingestion.as_deref() == Some(job) {
            self.mine.insert(identity(e));
        } else if e.status == Status::Success
            && let Some(d) = &e.document_id
        {
            self.others_stored.insert((e.collection.clone(), d.clone()));
        }
    }
}

/// An entry's identity: the id it would have as an entry of its own.
pub fn identity(e: &LogEntry) -> String {
    log_id(
        &e.tenant,
        e.status,
        &e.collection,
        e.document_id.as_deref(),
        &input_of(e),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Source;
    use ::mongodb::bson::DateTime;

    fn entry(record: Option<u64>, status: Status) -> LogEntry {
        LogEntry {
            timestamp: DateTime::from_millis(1_700_000_000_000),
            tenant: "alice".into(),
            source: Source::Batch,
            data_name: "f.csv".into(),
            collection: "c".into(),
            status,
            reason: (status == Status::Failure).then(|| "bad".to_owned()),
            bytes: 10,
            latency_us: 5,
            app_version: Some(2),
            ingestion: Some("job1".into()),
            record,
            line: record.map(|r| r + 2),
            message_id: None,
            document_id: record.map(|r| format!("abc:{r}")),
        }
    }

    /// The entries stored log documents hold, as a download reads them.
    fn read_back(docs: Vec<Document>) -> Vec<LogEntry> {
        docs.into_iter()
            .flat_map(expand)
            .map(|d| decode(d).expect("an entry"))
            .collect()
    }

    #[test]
    fn a_bulk_becomes_one_bucket_per_block_and_expands_back_to_its_entries() {
        let entries: Vec<LogEntry> = (1000..1100)
            .map(|r| entry(Some(r), Status::Success))
            .chain([entry(None, Status::Failure)])
            .collect();
        let docs = buckets("alice", "abc", &entries, "");
        let ids: Vec<&str> = docs.iter().map(|d| d.get_str("_id").expect("id")).collect();
        assert_eq!(
            ids,
            [
                "alice/b/abc/000000000/job1/000000001000",
                "alice/b/abc/000000001/job1/000000001024",
                "alice/b/abc/f/job1/f00000100"
            ]
        );
        assert_eq!(read_back(docs), entries);
    }

    #[test]
    fn a_bucket_holds_its_entries_packed_with_their_statuses_beside_them() {
        let entries: Vec<LogEntry> = (0..1000)
            .map(|r| entry(Some(r), Status::Success))
            .chain([entry(Some(1000), Status::Failure)])
            .collect();
        let docs = buckets("alice", "abc", &entries[..1000], "");
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert!(!d.contains_key("entries"), "{d:?}");
        assert_eq!(
            d.get_array("statuses").expect("statuses"),
            &vec![Bson::from("success")]
        );
        let packed = d.get_binary_generic("packed").expect("packed");
        // Deflated: a fraction of the entries' own BSON.
        let plain = ::mongodb::bson::to_vec(&unpack(packed).expect("unpacks")).expect("bson");
        assert!(
            packed.len() * 4 < plain.len(),
            "{} bytes packed, {} plain",
            packed.len(),
            plain.len()
        );
        let mixed = buckets("alice", "abc", &entries[990..], "");
        assert_eq!(
            mixed[0].get_array("statuses").expect("statuses"),
            &vec![Bson::from("success"), Bson::from("failure")]
        );
    }

    #[test]
    fn entries_that_differ_from_the_first_in_shared_fields_keep_their_own() {
        let mut entries: Vec<LogEntry> = (0..4).map(|r| entry(Some(r), Status::Success)).collect();
        entries[1].app_version = None;
        entries[2].ingestion = None;
        entries[3].timestamp = DateTime::from_millis(1_700_000_000_001);
        entries[3].data_name = "g.csv".into();
        entries[3].reason = Some("why".into());
        assert_eq!(read_back(buckets("alice", "abc", &entries, "")), entries);
    }

    #[test]
    fn buckets_stored_before_packing_read_the_same_and_a_corrupt_one_reads_as_none() {
        let entries: Vec<LogEntry> = (0..10).map(|r| entry(Some(r), Status::Success)).collect();
        let mut old = buckets("alice", "abc", &entries, "").remove(0);
        let packed = old.remove("packed");
        old.remove("statuses");
        let Some(Bson::Binary(b)) = packed else {
            panic!("packed")
        };
        let inner = unpack(&b.bytes).expect("unpacks");
        old.insert(
            "entries",
            inner.get_array("entries").expect("entries").clone(),
        );
        assert_eq!(read_back(vec![old]), entries);

        let mut corrupt = buckets("alice", "abc", &entries, "").remove(0);
        corrupt.insert(
            "packed",
            Binary {
                subtype: BinarySubtype::Generic,
                bytes: vec![1, 2, 3],
            },
        );
        assert!(expand(corrupt).is_empty());
    }

    #[test]
    fn the_documents_of_one_record_fill_buckets_of_distinct_ids() {
        let entries: Vec<LogEntry> = (0..10_000)
            .map(|k| {
                let mut e = entry(Some(0), Status::Success);
                e.document_id = Some(format!("abc:0:{k}"));
                e
            })
            .collect();
        let docs = buckets("alice", "abc", &entries, "");
        let ids: HashSet<&str> = docs.iter().map(|d| d.get_str("_id").expect("id")).collect();
        assert_eq!((docs.len(), ids.len()), (3, 3));
        assert!(ids.contains("alice/b/abc/000000000/job1/000000000000.2"));
    }

    #[test]
    fn ranges_cover_every_block_of_the_records_and_no_other() {
        let r = ranges("t", "o", &[5, 1030, 1024, 4096], true);
        assert_eq!(
            r,
            [
                ("t/b/o/000000000/".into(), "t/b/o/000000002/".into()),
                ("t/b/o/000000004/".into(), "t/b/o/000000005/".into()),
                ("t/b/o/f/".into(), "t/b/o/f0".into()),
            ]
        );
        // A bucket of block 1 is inside the first range, one of block 2 is not.
        let inside = "t/b/o/000000001/job/000000001500".to_owned();
        assert!(inside >= r[0].0 && inside < r[0].1);
        let outside = "t/b/o/000000002/job/000000002048".to_owned();
        assert!(outside >= r[0].1);
    }

    #[test]
    fn the_identity_of_an_entry_is_its_id_as_an_entry_of_its_own() {
        let mut l = Logged::default();
        l.add("job1", &entry(Some(3), Status::Success));
        let mut other = entry(Some(4), Status::Success);
        other.ingestion = Some("job0".into());
        l.add("job1", &other);
        assert!(l.mine.contains("alice/s/c/abc:3"));
        assert!(l.others_stored.contains(&("c".into(), "abc:4".into())));
    }
}
