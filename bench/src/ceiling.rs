//! The ceilings: what the MongoDB driver alone achieves on the same server in the same run,
//! for the report to set the platform's batch throughput against; and the raw stream
//! pipeline (`stream`), RabbitMQ and the driver alone, for its stream path.

use std::time::{Duration, Instant};

use mongodb::bson::Document;

use anyhow::Result;

use crate::dataset::make_files;
use crate::report::Ceiling;
use crate::schema::BatchLoad;

mod stream;

pub use stream::{RawStream, raw_stream};

/// The driver alone: the same documents and the platform's log of them (its buckets: one
/// entry per record, a few documents per bulk) bulk-inserted in batches of the same size;
/// then the same documents with no log, the baseline of a loader that keeps no record
/// (`alone_first`: the other way round, so that a load measured between two ceilings has
/// each kind once next to it).
pub async fn raw_ceiling(
    uri: &str,
    ns: &str,
    b: &BatchLoad,
    batch: usize,
    wc: &str,
    journal: bool,
    alone_first: bool,
) -> Result<Ceiling> {
    let files = make_files(b, ceiling_files(b))?;
    let client = mongodb::Client::with_uri_str(uri).await?;
    let wc = mysimbdp::config::write_concern(wc, journal);
    let db = client.database(&format!("{ns}ceiling"));
    let ((n, elapsed), alone_elapsed) = if alone_first {
        let alone = write_alone(&db, &files, batch, &wc).await?;
        (write_logged(&db, &files, batch, &wc).await?, alone)
    } else {
        let logged = write_logged(&db, &files, batch, &wc).await?;
        (logged, write_alone(&db, &files, batch, &wc).await?)
    };
    let _ = db.drop().await;
    Ok(Ceiling {
        documents: n as u64,
        records_per_s: n as f64 / elapsed.as_secs_f64(),
        data_alone_records_per_s: Some(n as f64 / alone_elapsed.as_secs_f64()),
        note: "raw driver: insert_many of the same records plus their log entries in the platform's buckets, unordered, same batch size and write concern (w, j); and the records alone, no log; each bulk parsed from the CSV and built as it is written, as a loader would".into(),
    })
}

/// The records and their log entries, as the platform writes them: how many, in how long.
async fn write_logged(
    db: &mongodb::Database,
    files: &[Vec<u8>],
    batch: usize,
    wc: &mongodb::options::WriteConcern,
) -> Result<(usize, Duration)> {
    let data = db.collection::<Document>("data");
    let logs = db.collection::<Document>("logs");
    // The same index as the platform's log collection: both sides pay for it.
    logs.create_index(
        mongodb::IndexModel::builder()
            .keys(mongodb::bson::doc! {"tenant": 1, "timestamp": 1})
            .build(),
    )
    .await?;
    // Each bulk's documents are built from the CSV as it is written, as a loader script
    // would, and handed over: never all held at once (scale's 100,000 were 500 MiB).
    let (mut n, mut elapsed) = (0, Duration::ZERO);
    let mut docs = documents(files);
    for c in 0.. {
        let started = Instant::now();
        let chunk = docs.by_ref().take(batch).collect::<Result<Vec<_>>>()?;
        if chunk.is_empty() {
            break;
        }
        let len = chunk.len();
        n += len;
        data.insert_many(chunk)
            .ordered(false)
            .write_concern(wc.clone())
            .await?;
        // Log entries in the platform's own buckets, so both sides write the same bytes.
        let now = mongodb::bson::DateTime::now();
        let entries: Vec<mysimbdp::logs::LogEntry> = (0..len)
            .map(|k| {
                let record = (c * batch + k) as u64;
                mysimbdp::logs::LogEntry {
                    timestamp: now,
                    tenant: "raw".into(),
                    source: mysimbdp::logs::Source::Batch,
                    data_name: "f0.csv".into(),
                    collection: "f0".into(),
                    status: mysimbdp::logs::Status::Success,
                    reason: None,
                    bytes: 360,
                    latency_us: 1000,
                    app_version: Some(1),
                    ingestion: Some("0123456789abcdef0123456789abcdef".into()),
                    record: Some(record),
                    line: Some(record + 2),
                    message_id: None,
                    document_id: Some(format!("0123456789abcdef:{record}")),
                }
            })
            .collect();
        let log = mysimbdp::coredms::buckets::buckets("raw", "0123456789abcdef", &entries, "");
        logs.insert_many(log)
            .ordered(false)
            .write_concern(wc.clone())
            .await?;
        elapsed += started.elapsed();
    }
    Ok((n, elapsed))
}

/// The stronger baseline: the same records with no log at all, as a loader that does not
/// account for its inputs would write them.
async fn write_alone(
    db: &mongodb::Database,
    files: &[Vec<u8>],
    batch: usize,
    wc: &mongodb::options::WriteConcern,
) -> Result<Duration> {
    let alone = db.collection::<Document>("data_alone");
    let mut alone_elapsed = Duration::ZERO;
    let mut docs = documents(files);
    loop {
        let started = Instant::now();
        let chunk = docs.by_ref().take(batch).collect::<Result<Vec<_>>>()?;
        if chunk.is_empty() {
            break;
        }
        alone
            .insert_many(chunk)
            .ordered(false)
            .write_concern(wc.clone())
            .await?;
        alone_elapsed += started.elapsed();
    }
    Ok(alone_elapsed)
}

/// Records the ceilings write at most: the files of one tenant, or as many of them as hold
/// this many records (at least one), so a large scenario does not spend its time on them.
const CEILING_RECORDS: u32 = 100_000;

/// How many of one tenant's files the ceilings write: all of them up to [`CEILING_RECORDS`],
/// so that `seed-batch` compares the same 24,000 records on both sides.
fn ceiling_files(b: &BatchLoad) -> u32 {
    b.files
        .min((CEILING_RECORDS / b.records_per_file.max(1)).max(1))
}

/// The files' records as documents under ids of their own, one at a time.
fn documents(files: &[Vec<u8>]) -> impl Iterator<Item = Result<Document>> + '_ {
    files.iter().enumerate().flat_map(|(f, body)| {
        let mut rdr = csv::Reader::from_reader(&body[..]);
        let records: Box<dyn Iterator<Item = Result<Document>>> = match rdr.headers().cloned() {
            Ok(headers) => Box::new(rdr.into_records().enumerate().map(move |(i, r)| {
                let mut d = Document::new();
                d.insert("_id", format!("raw{f}:{i}"));
                for (h, v) in headers.iter().zip(r?.iter()) {
                    d.insert(h, v);
                }
                Ok(d)
            })),
            Err(e) => Box::new(std::iter::once(Err(e.into()))),
        };
        records
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: u32, records_per_file: u32) -> BatchLoad {
        BatchLoad {
            files,
            records_per_file,
            record_bytes: None,
            dataset: None,
            poison_every: None,
        }
    }

    #[test]
    fn the_ceilings_write_one_tenants_files_up_to_their_record_cap() {
        // seed-batch: the same 24,000 records as the platform.
        assert_eq!(ceiling_files(&load(3, 8000)), 3);
        // scale: 2 of its 5 files of 50,000.
        assert_eq!(ceiling_files(&load(5, 50_000)), 2);
        // One file larger than the cap is still written whole.
        assert_eq!(ceiling_files(&load(4, 250_000)), 1);
        assert_eq!(ceiling_files(&load(0, 0)), 0);
    }
}
