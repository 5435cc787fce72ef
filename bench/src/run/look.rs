//! Looking at what the platform stored and logged after a phase's load: every tenant's
//! database (document ids only) and its log, folded by `accounting`.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::TryStreamExt;
use mysimbdp::client::Client;

use crate::accounting::{Found, LogFold, LogTally, Matcher};
use crate::load::{PathRun, TenantCtx};
use crate::schema::{GroupPlan, PathKind};

/// How long the accounting waits for inputs still on their way (e.g. a stream app that
/// stores several documents per message makes the log look complete early).
const SETTLE: Duration = Duration::from_secs(10);

/// One tenant's database and log as found, or why they could not be read.
pub(super) type Looked = (Result<Found, String>, Result<LogTally, String>);

/// Each tenant's database and log, in the order of `tenants`. While inputs seem lost they
/// may still be on their way: look again for a few seconds (not after a timeout).
pub(super) async fn look(
    tenants: &[(usize, TenantCtx)],
    plans: &[GroupPlan],
    runs: &[(usize, PathKind, PathRun)],
    db: &mongodb::Client,
) -> Vec<Looked> {
    let unfinished = runs.iter().any(|(_, _, r)| r.unfinished.is_some());
    let settle_until = Instant::now() + if unfinished { Duration::ZERO } else { SETTLE };
    loop {
        let mut looked = Vec::new();
        for (ti, (gi, t)) in tenants.iter().enumerate() {
            let mine = || runs.iter().filter(move |(i, _, _)| *i == ti);
            let files = mine().flat_map(|(_, _, r)| &r.files);
            let ids = mine().flat_map(|(_, _, r)| r.ids.iter().map(String::as_str));
            let interval = plans[*gi]
                .stream
                .as_ref()
                .filter(|s| s.rate > 0)
                .map(|s| (1_000_000 / u64::from(s.rate)).max(1));
            let found = tokio::time::timeout(
                Duration::from_secs(300),
                scan(&db.database(&t.database), Matcher::new(files, ids)),
            )
            .await
            .map_err(|_| "no answer within 300 s".to_owned())
            .and_then(|r| r.map_err(|e| format!("{e:#}")));
            let log = read_log(&t.client, &t.name, interval)
                .await
                .map_err(|e| format!("{e:#}"));
            looked.push((found, log));
        }
        let lost = runs.iter().any(|(ti, kind, r)| {
            let (found, log) = &looked[*ti];
            let (Ok(f), Ok(l)) = (found, log) else {
                return false;
            };
            let (stored, logged) = match kind {
                PathKind::Batch => (f.batch_stored, l.batch.failure + l.batch.skipped),
                PathKind::Stream => (f.stream_stored, l.stream.failure + l.stream.skipped),
            };
            stored + logged < r.offered
        });
        if !lost || Instant::now() >= settle_until {
            return looked;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads every document id of the tenant's database (ids only) and matches them.
async fn scan(db: &mongodb::Database, mut m: Matcher<'_>) -> Result<Found> {
    use mongodb::bson::{Bson, Document, doc};
    for name in db.list_collection_names().await? {
        let mut cursor = db
            .collection::<Document>(&name)
            .find(doc! {})
            .projection(doc! {"_id": 1})
            .await?;
        while let Some(d) = cursor.try_next().await? {
            match d.get("_id") {
                Some(Bson::String(id)) => m.see(id),
                _ => m.see_other(),
            }
        }
    }
    Ok(m.found())
}

/// Downloads a tenant's whole log, folding it as it arrives.
async fn read_log(c: &Client, tenant: &str, stream_interval_us: Option<u64>) -> Result<LogTally> {
    let download = async {
        let mut resp = c.logs_streamed(tenant, "").await?;
        let mut fold = LogFold::new(stream_interval_us);
        while let Some(chunk) = resp.chunk().await? {
            fold.feed(&chunk)?;
        }
        fold.finish()
    };
    tokio::time::timeout(Duration::from_secs(300), download)
        .await
        .map_err(|_| anyhow::anyhow!("the log download did not finish within 300 s"))?
}
