//! The remote coredms: the same operations as [`super::MongoStore`], over HTTP to a coredms
//! service, for components running in their own processes.
//!
//! A bulk write travels in chunks of at most `http.rpc_chunk_bytes` serialized bytes, so the
//! largest bulk the platform makes (`batch_size` records of up to `max_doc_bytes` each) fits
//! the RPC's body limit (`http.max_rpc_bytes`); their outcomes are merged into one.

use std::io::Write;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Call, CoreError};
use crate::config::HttpSettings;
use crate::model::{BulkOutcome, BulkWrite, DocWrite, Unstored};

/// [`Call`]s that borrow what they carry, so a (retried) bulk write is serialized straight
/// from the caller's data, never copied.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum CallRef<'a> {
    BulkWrite { write: &'a BulkWrite },
}

pub struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
    /// Target serialized size of one bulk-write chunk.
    chunk_bytes: usize,
    /// What the coredms service accepts in one RPC body.
    max_rpc_bytes: usize,
}

/// Room left in an RPC body for everything around the documents of a chunk.
const ENVELOPE_BYTES: usize = 64 * 1024;

impl Remote {
    pub fn new(
        base_url: &str,
        internal_token: &str,
        settings: &HttpSettings,
    ) -> Result<Self, CoreError> {
        let http = reqwest::Client::builder()
            // Above coredms's own request timeout, so a slow chunk is answered, not cut.
            .timeout(Duration::from_secs(180))
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| CoreError::Invalid(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            token: internal_token.to_owned(),
            http,
            chunk_bytes: settings.rpc_chunk_bytes,
            max_rpc_bytes: settings.max_rpc_bytes,
        })
    }

    pub(super) async fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T, CoreError> {
        self.send(&call).await
    }

    async fn send<T: DeserializeOwned, B: Serialize>(&self, call: &B) -> Result<T, CoreError> {
        let body = serde_json::to_vec(call)
            .map_err(|e| CoreError::Invalid(format!("cannot encode the call: {e}")))?;
        self.send_body(body).await
    }

    async fn send_body<T: DeserializeOwned>(&self, body: Vec<u8>) -> Result<T, CoreError> {
        let resp = self
            .http
            .post(format!("{}/internal/v1/rpc", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| CoreError::Unavailable(format!("coredms service: {e}")))?;
        let status = resp.status();
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Err(CoreError::Unavailable("coredms service unavailable".into()));
        }
        if !status.is_success() {
            return Err(CoreError::Database(format!(
                "coredms service answered {status}"
            )));
        }
        resp.json::<Result<T, CoreError>>()
            .await
            .map_err(|e| CoreError::Unavailable(format!("coredms service: {e}")))?
    }

    /// One RPC when the bulk fits a chunk (the usual case: serialized once, as before);
    /// else one RPC per chunk of at most `rpc_chunk_bytes`, in order, with the outcomes
    /// merged and `failed` indexes mapped back to `write.docs`. The failures (records that
    /// never became documents) travel with the last chunk. A document too large for any RPC
    /// is not sent: it becomes a failure, logged with the reason, like a database rejection.
    /// An error in any chunk is the bulk's error; the caller's retry rewrites the chunks
    /// already stored as duplicates (deterministic ids).
    pub async fn bulk_write(&self, write: &BulkWrite) -> Result<BulkOutcome, CoreError> {
        // A document that cannot be stored fails here, alone: sent, one nested near the JSON
        // parser's depth limit would make coredms refuse the whole call.
        let unstorable: Vec<(usize, String)> = write
            .docs
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                super::check_document(&d.doc)
                    .err()
                    .map(|r| (i, r.to_string()))
            })
            .collect();
        if unstorable.is_empty() {
            let body = serde_json::to_vec(&CallRef::BulkWrite { write })
                .map_err(|e| CoreError::Invalid(format!("cannot encode the bulk write: {e}")))?;
            if body.len() <= self.chunk_bytes {
                return self.send_body(body).await;
            }
        }
        let mut plan = plan_chunks(
            &write.docs,
            self.chunk_bytes,
            self.max_rpc_bytes.saturating_sub(ENVELOPE_BYTES),
        );
        if !unstorable.is_empty() {
            for chunk in &mut plan.chunks {
                chunk.retain(|i| !unstorable.iter().any(|(j, _)| j == i));
            }
            plan.chunks.retain(|c| !c.is_empty());
            plan.oversize
                .retain(|(i, _)| !unstorable.iter().any(|(j, _)| j == i));
        }
        let mut outcome = BulkOutcome::default();
        let mut oversize: Vec<Unstored> = Vec::new();
        let mut fail = |i: usize, reason: String| {
            let d = &write.docs[i];
            oversize.push(Unstored {
                input: d.input.clone(),
                collection: d.collection.clone(),
                document_id: Some(d.id.clone()),
                reason: Some(reason.clone()),
                bytes: d.bytes,
                started_us: d.started_us,
                data_name: d.data_name.clone(),
            });
            outcome.failed.push((i, reason));
        };
        for (i, reason) in unstorable {
            fail(i, reason);
        }
        for (i, size) in &plan.oversize {
            fail(
                *i,
                format!(
                    "document is {size} bytes serialized, over the {} bytes the internal RPC carries (http.max_rpc_bytes)",
                    self.max_rpc_bytes
                ),
            );
        }
        let n = plan.chunks.len();
        if n == 0 {
            // Nothing left to store but failures: they still need their log entries.
            let part = self.send_chunk(write, &[], &oversize, true).await?;
            merge(&mut outcome, part, &[]);
        }
        for (k, idx) in plan.chunks.iter().enumerate() {
            let last = k + 1 == n;
            let part = self.send_chunk(write, idx, &oversize, last).await?;
            merge(&mut outcome, part, idx);
        }
        outcome.failed.sort_by_key(|(i, _)| *i);
        outcome.duplicate.sort_unstable();
        Ok(outcome)
    }

    /// The documents `idx` of `write` as one bulk write; with `last`, its failures too.
    async fn send_chunk(
        &self,
        write: &BulkWrite,
        idx: &[usize],
        oversize: &[Unstored],
        last: bool,
    ) -> Result<BulkOutcome, CoreError> {
        let chunk = BulkWrite {
            tenant: write.tenant.clone(),
            source: write.source,
            data_name: write.data_name.clone(),
            app_version: write.app_version,
            docs: idx.iter().map(|&i| write.docs[i].clone()).collect(),
            unstored: if last {
                write.unstored.iter().chain(oversize).cloned().collect()
            } else {
                Vec::new()
            },
            origin: write.origin.clone(),
            replay: write.replay,
        };
        self.send(&Call::bulk_write { write: chunk }).await
    }
}

/// Counts the bytes written to it, to size a document's JSON without keeping it.
#[derive(Default)]
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_size(d: &DocWrite) -> usize {
    let mut c = Counter::default();
    // Writing to a counter cannot fail, and a `DocWrite` always serializes.
    let _ = serde_json::to_writer(&mut c, d);
    c.0
}

/// How a bulk is sent: chunks of indexes into its documents, in order, and the documents
/// (index, serialized size) too large for any RPC.
#[derive(Debug, PartialEq)]
struct Plan {
    chunks: Vec<Vec<usize>>,
    oversize: Vec<(usize, usize)>,
}

/// Groups consecutive documents into chunks of at most `chunk_bytes` serialized bytes (one
/// document larger than that travels alone, up to `max_doc_bytes`; larger ones are set apart).
fn plan_chunks(docs: &[DocWrite], chunk_bytes: usize, max_doc_bytes: usize) -> Plan {
    let mut plan = Plan {
        chunks: Vec::new(),
        oversize: Vec::new(),
    };
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0usize;
    for (i, d) in docs.iter().enumerate() {
        let size = json_size(d) + 1;
        if size > max_doc_bytes {
            plan.oversize.push((i, size));
            continue;
        }
        if !current.is_empty() && bytes + size > chunk_bytes {
            plan.chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        current.push(i);
        bytes += size;
    }
    if !current.is_empty() {
        plan.chunks.push(current);
    }
    plan
}

/// Adds a chunk's outcome to the bulk's, mapping its `failed` and `duplicate` indexes
/// through `idx`.
fn merge(total: &mut BulkOutcome, part: BulkOutcome, idx: &[usize]) {
    let BulkOutcome {
        inserted,
        duplicates,
        failed,
        duplicate,
    } = part;
    total.inserted += inserted;
    total.duplicates += duplicates;
    total.failed.extend(
        failed
            .into_iter()
            .filter_map(|(i, r)| Some((*idx.get(i)?, r))),
    );
    total
        .duplicate
        .extend(duplicate.into_iter().filter_map(|i| idx.get(i).copied()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenants::TenantName;

    fn doc(i: usize, len: usize) -> DocWrite {
        let mut m = serde_json::Map::new();
        m.insert("v".into(), serde_json::Value::String("x".repeat(len)));
        DocWrite {
            id: format!("h:{i}"),
            collection: "c".into(),
            doc: m,
            input: crate::model::InputRef::Message {
                id: format!("m{i}"),
            },
            bytes: len as u64,
            started_us: 0,
            data_name: None,
            encoded: None,
        }
    }

    #[test]
    fn chunks_stay_under_the_size_and_keep_every_document_once_in_order() {
        let docs: Vec<DocWrite> = (0..100).map(|i| doc(i, 1000 + i * 37)).collect();
        let plan = plan_chunks(&docs, 20_000, 1 << 20);
        assert!(plan.oversize.is_empty());
        assert!(plan.chunks.len() > 5, "{} chunks", plan.chunks.len());
        let flat: Vec<usize> = plan.chunks.iter().flatten().copied().collect();
        assert_eq!(flat, (0..100).collect::<Vec<_>>());
        for c in &plan.chunks {
            let size: usize = c.iter().map(|&i| json_size(&docs[i]) + 1).sum();
            assert!(size <= 20_000, "chunk of {size} bytes");
        }
        // What travels is what was planned: a chunk's JSON is within the envelope of its size.
        let w = BulkWrite {
            tenant: TenantName::parse("t").expect("name"),
            source: crate::logs::Source::Batch,
            data_name: "f".into(),
            app_version: Some(3),
            docs: plan.chunks[0].iter().map(|&i| docs[i].clone()).collect(),
            unstored: vec![],
            origin: Some("abc".into()),
            replay: false,
        };
        let unchunked = serde_json::to_vec(&CallRef::BulkWrite { write: &w }).expect("json");
        let sent = serde_json::to_vec(&Call::bulk_write { write: w }).expect("json");
        assert!(sent.len() <= 20_000 + ENVELOPE_BYTES);
        assert_eq!(unchunked, sent, "the borrowed call is the call");
    }

    #[test]
    fn a_large_document_travels_alone_and_one_too_large_is_set_apart() {
        let docs = vec![
            doc(0, 10),
            doc(1, 50_000),
            doc(2, 10),
            doc(3, 200_000),
            doc(4, 10),
        ];
        let plan = plan_chunks(&docs, 20_000, 100_000);
        assert_eq!(plan.chunks, vec![vec![0], vec![1], vec![2, 4]]);
        assert_eq!(plan.oversize.len(), 1);
        assert_eq!(plan.oversize[0].0, 3);
    }

    #[test]
    fn merged_outcomes_name_documents_of_the_whole_bulk() {
        let mut total = BulkOutcome::default();
        merge(
            &mut total,
            BulkOutcome {
                inserted: 2,
                duplicates: 1,
                failed: vec![(1, "bad".into())],
                duplicate: vec![2],
            },
            &[0, 1, 2, 3],
        );
        merge(
            &mut total,
            BulkOutcome {
                inserted: 1,
                duplicates: 0,
                failed: vec![(0, "worse".into())],
                duplicate: vec![],
            },
            &[5, 6],
        );
        assert_eq!(
            total,
            BulkOutcome {
                inserted: 3,
                duplicates: 1,
                failed: vec![(1, "bad".into()), (5, "worse".into())],
                duplicate: vec![2],
            }
        );
    }
}
