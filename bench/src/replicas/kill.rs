//! Phase 2: files through every batch manager and messages through every stream manager;
//! one of each killed (SIGKILL) and left dead; the survivors' work waited for and every
//! input accounted for from the database and the log.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use mysimbdp::client::Client;
use mysimbdp::model::FileState;
use mysimbdp::processes::Manager;
use serde::Serialize;

use crate::accounting::{
    self, Counts, FileOutcome, LogFold, LogTally, Matcher, TenantAccount, split_id,
};
use crate::dataset::GroupFiles;
use crate::schema::{Expect, KillLoad};

use super::{Run, Tenant, manager_name, messages, note, retry, stream_status, transient};

/// Messages per publish request in the kill phase.
const KILL_PER_REQUEST: u32 = 20;

/// Where the load stood when the managers were killed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AtKill {
    pub after_s: f64,
    /// Files still `ingesting`, and their records read so far.
    pub files_ingesting: u32,
    pub records_read: u64,
    pub messages_confirmed: u64,
    pub messages_logged: u64,
}

/// The kill phase. The top-level counts are what `--strict` reads (as a fault's figures,
/// like the faults scenario's): each must be 0. Lost and failed inputs are in `batch` and
/// `stream`, checked through the run's `accounting`.
#[derive(Debug, Clone, Serialize)]
pub struct KillFigures {
    pub fault: String,
    pub at_kill: AtKill,
    pub batch: Counts,
    pub stream: Counts,
    /// `duplicate` entries: inputs another ingestion had stored (none can have here: every
    /// file and message is new).
    pub batch_duplicated: u64,
    pub stream_duplicated: u64,
    /// Records of a file's run, or stored messages, with no log entry.
    pub batch_unlogged: u64,
    pub stream_unlogged: u64,
    /// Log entries about the same thing written more than once.
    pub logged_twice: u64,
    /// Publish requests retried on another stream manager (same idempotency key).
    pub publish_retries: u64,
    /// From the kill until every file ended and every confirmed message was in the log.
    pub recovered_s: f64,
}

/// The kill phase's figures and the accounting of its tenant's two paths.
pub(super) struct KillOutcome {
    pub(super) figures: KillFigures,
    pub(super) accounts: Vec<TenantAccount>,
}

/// What the kill phase's publisher learnt.
#[derive(Default)]
struct Confirmed {
    ids: HashSet<String>,
    offered: u64,
    refused: u64,
    retries: u64,
    errors: Vec<String>,
}

/// Publishes `messages` at `rate` in requests of [`KILL_PER_REQUEST`], request k through
/// stream manager k mod n; a request that gets no answer (or 5xx) is sent again with the same
/// idempotency key through the next manager, so a dead one costs a retry, never a message.
async fn publish_through_kills(
    clients: Vec<(usize, Client)>,
    tenant: String,
    messages: u32,
    rate: u32,
    tally: Arc<Mutex<Confirmed>>,
) {
    let per = KILL_PER_REQUEST;
    let interval = Duration::from_secs_f64(f64::from(per) / f64::from(rate.max(1)));
    let t0 = tokio::time::Instant::now();
    let clients = Arc::new(clients);
    let mut inflight = tokio::task::JoinSet::new();
    for k in 0..messages.div_ceil(per) {
        tokio::time::sleep_until(t0 + interval * k).await;
        let (clients, tenant, tally) = (clients.clone(), tenant.clone(), tally.clone());
        inflight.spawn(async move {
            let body = messages_body(k, per, messages);
            let key = format!("kill-{k}");
            let mut attempt = 0usize;
            let answer = loop {
                let c = &clients[(k as usize + attempt) % clients.len()].1;
                match c
                    .publish_idempotent(&tenant, "reading", &key, body.clone())
                    .await
                {
                    Err(e) if transient(&e) || e.status().is_some_and(|s| s.is_server_error()) => {
                        attempt += 1;
                        if attempt > 100 {
                            break Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => break other,
                }
            };
            let Ok(mut t) = tally.lock() else { return };
            t.retries += attempt.min(100) as u64;
            match answer {
                Ok(p) => {
                    t.offered += p.published;
                    t.ids.extend(p.ids);
                }
                Err(e) => {
                    t.refused += u64::from(((k + 1) * per).min(messages) - k * per);
                    note(&mut t.errors, format!("publish: {e}"));
                }
            }
        });
    }
    while inflight.join_next().await.is_some() {}
}

fn messages_body(k: u32, per: u32, total: u32) -> Vec<u8> {
    messages(k * per, ((k + 1) * per).min(total))
}

/// Files through every batch manager in turn and messages through every stream manager;
/// `kill_after_s` in, the first of each killed and left dead; then the survivors' work
/// waited for and every input accounted for.
pub(super) async fn run(run: &mut Run, load: &KillLoad) -> Result<KillOutcome> {
    let t = run.tenant("kill").await?;
    let files = GroupFiles::new(&load.batch, load.batch.files)?;
    let batch = run.procs.running(Manager::Batch);
    let streams = run.stream_clients(&t)?;
    let (victim_batch, victim_stream) = (batch[0], streams[0].0);
    let survivor = run.client(&t, batch[1], streams[1].0)?;
    retry(|| streams[0].1.stream_start(&t.name, 1))
        .await
        .context("starting the consumers")?;
    let mut errors = Vec::new();
    if let Err(e) = run.consumers_started(&t, 1).await {
        note(&mut errors, e);
    }
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut refusals = Vec::new();
    let mut refused = 0;
    for i in 0..files.len() {
        let c = run.client(&t, batch[i % batch.len()], streams[0].0)?;
        let name = format!("f{i}.csv");
        let sent = async {
            retry(|| c.upload_file(&t.name, &name, files.body(i))).await?;
            retry(|| c.ingest(&t.name, &name)).await
        };
        match sent.await {
            Ok(_) => outcomes.push(FileOutcome {
                name,
                origin: files.origins[i].clone(),
                inputs: files.records[i],
                state: "ingesting".into(),
                error: None,
            }),
            Err(e) => {
                refused += files.records[i];
                note(&mut refusals, format!("{name}: {e}"));
            }
        }
    }
    let tally = Arc::new(Mutex::new(Confirmed::default()));
    let publisher = tokio::spawn(publish_through_kills(
        streams.clone(),
        t.name.clone(),
        load.messages,
        load.rate,
        tally.clone(),
    ));

    tokio::time::sleep(Duration::from_secs(load.kill_after_s)).await;
    let mut at_kill = AtKill {
        after_s: started.elapsed().as_secs_f64(),
        ..AtKill::default()
    };
    for f in &outcomes {
        if let Ok(r) = survivor.file(&t.name, &f.name).await
            && r.state == FileState::Ingesting
        {
            at_kill.files_ingesting += 1;
            at_kill.records_read += r.next_record;
        }
    }
    if let Ok(s) = stream_status(&survivor, &t.name, None).await {
        at_kill.messages_logged = s.logged.total();
    }
    // Confirmed counted after the log was asked: the load goes on meanwhile, and the log
    // cannot hold more than was confirmed (it read "604 of 600" counted the other way).
    at_kill.messages_confirmed = tally.lock().map_or(0, |t| t.offered);
    run.procs.kill(Manager::Batch, victim_batch).await?;
    run.procs.kill(Manager::Stream, victim_stream).await?;
    let killed_at = Instant::now();
    eprintln!(
        "kill: {} and {} killed {:.1} s in ({} files ingesting, {} records read; {} of {} confirmed messages in the log)",
        manager_name("batch", victim_batch),
        manager_name("stream", victim_stream),
        at_kill.after_s,
        at_kill.files_ingesting,
        at_kill.records_read,
        at_kill.messages_logged,
        at_kill.messages_confirmed
    );

    let deadline = started + run.timeout;
    let unfinished =
        finish_after_kill(&survivor, &t, &mut outcomes, &publisher, &tally, deadline).await;
    let recovered_s = killed_at.elapsed().as_secs_f64();
    if !publisher.is_finished() {
        publisher.abort();
    }
    if let Err(e) = retry(|| survivor.stream_stop(&t.name)).await {
        note(&mut errors, format!("stream/stop: {e}"));
    }
    let confirmed = std::mem::take(
        &mut *tally
            .lock()
            .map_err(|_| anyhow::anyhow!("publisher panicked"))?,
    );
    let Accounted {
        batch: batch_counts,
        stream: stream_counts,
        log: tally_log,
        cover,
        stray,
    } = account_for(run, &survivor, &t, &outcomes, &confirmed, refused).await?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let account = |path: &str, counts: &Counts, tally: &accounting::Tally| TenantAccount {
        phase: "kill".into(),
        group: "kill".into(),
        tenant: t.name.clone(),
        path: path.into(),
        expect: Expect::Success,
        counts: counts.clone(),
        files_failed: Vec::new(),
        unfinished: unfinished.clone(),
        errors: errors.clone(),
        refusals: Vec::new(),
        reasons: tally.top_reasons(3),
        elapsed_s,
    };
    let mut batch_account = account("batch", &batch_counts, &tally_log.batch);
    batch_account.refusals = refusals;
    batch_account.files_failed = accounting::failed_files(&outcomes);
    let mut stream_account = account("stream", &stream_counts, &tally_log.stream);
    for e in &confirmed.errors {
        note(&mut stream_account.errors, e.clone());
    }
    if stray > 0 {
        note(
            &mut stream_account.errors,
            format!("{stray} documents no offered input explains"),
        );
    }
    let figures = KillFigures {
        fault: format!(
            "SIGKILL to `{}` and `{}` (a batch and a stream manager; not restarted)",
            manager_name("batch", victim_batch),
            manager_name("stream", victim_stream)
        ),
        at_kill,
        batch: batch_counts,
        stream: stream_counts,
        batch_duplicated: tally_log.batch.duplicate,
        stream_duplicated: tally_log.stream.duplicate,
        batch_unlogged: cover.batch_unlogged,
        stream_unlogged: cover.stream_unlogged,
        logged_twice: cover.logged_twice,
        publish_retries: confirmed.retries,
        recovered_s,
    };
    Ok(KillOutcome {
        figures,
        accounts: vec![batch_account, stream_account],
    })
}

/// The kill phase's tenant as its database and log show it.
struct Accounted {
    batch: Counts,
    stream: Counts,
    log: LogTally,
    cover: accounting::Coverage,
    /// Documents whose id matches no offered input.
    stray: u64,
}

/// Each path's inputs found stored (by their document ids), and the log folded and checked
/// for coverage (each file by its run: the job id a taken-over job keeps).
async fn account_for(
    run: &Run,
    c: &Client,
    t: &Tenant,
    files: &[FileOutcome],
    confirmed: &Confirmed,
    refused: u64,
) -> Result<Accounted> {
    let mut runs = HashMap::new();
    for f in files {
        let r = retry(|| c.file(&t.name, &f.name)).await?;
        runs.insert(r.job, f.inputs);
    }
    let (found, stored_ids) = scan(&run.db.database(&t.database), files, &confirmed.ids).await?;
    let body = retry(|| c.logs_raw(&t.name, "")).await?.body;
    let mut fold = LogFold::new(None);
    fold.feed(&body)?;
    let log = fold.finish()?;
    let cover = accounting::coverage(&body, &runs, &stored_ids)?;
    let batch = Counts {
        offered: files.iter().map(|f| f.inputs).sum(),
        refused,
        stored: found.batch_stored,
        failed: log.batch.failure,
        skipped: log.batch.skipped,
        lost: 0,
        documents: found.batch_documents,
        logged_stored: log.batch.success + log.batch.duplicate,
    }
    .settle();
    let stream = Counts {
        offered: confirmed.offered,
        refused: confirmed.refused,
        stored: found.stream_stored,
        failed: log.stream.failure,
        skipped: log.stream.skipped,
        lost: 0,
        documents: found.stream_documents,
        logged_stored: log.stream.success + log.stream.duplicate,
    }
    .settle();
    Ok(Accounted {
        batch,
        stream,
        log,
        cover,
        stray: found.stray,
    })
}

/// Follows the survivors until every file ended and every confirmed message is in the log,
/// or the deadline: why not, if not.
async fn finish_after_kill(
    c: &Client,
    t: &Tenant,
    files: &mut [FileOutcome],
    publisher: &tokio::task::JoinHandle<()>,
    tally: &Mutex<Confirmed>,
    deadline: Instant,
) -> Option<String> {
    loop {
        for f in files.iter_mut().filter(|f| f.state == "ingesting") {
            if let Ok(r) = c.file(&t.name, &f.name).await
                && matches!(r.state, FileState::Done | FileState::Failed)
            {
                f.state = r.state.as_str().to_owned();
                f.error = r.error;
            }
        }
        let files_left = files.iter().filter(|f| f.state == "ingesting").count();
        let offered = tally.lock().map_or(0, |t| t.offered);
        let in_log = stream_status(c, &t.name, None)
            .await
            .map_or(0, |s| s.logged.total());
        let published = publisher.is_finished();
        if files_left == 0 && published && in_log >= offered {
            return None;
        }
        if Instant::now() > deadline {
            return Some(format!(
                "{files_left} file(s) still ingesting, {in_log} of {offered} confirmed messages in the log{}",
                if published {
                    ""
                } else {
                    ", publishing not done"
                }
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The tenant's document ids matched to the offered files and messages, and the ids of the
/// messages found stored.
async fn scan(
    db: &mongodb::Database,
    files: &[FileOutcome],
    ids: &HashSet<String>,
) -> Result<(accounting::Found, HashSet<String>)> {
    use mongodb::bson::{Bson, Document, doc};
    let mut m = Matcher::new(files, ids.iter().map(String::as_str));
    let mut stored = HashSet::new();
    for name in db.list_collection_names().await? {
        let mut cursor = db
            .collection::<Document>(&name)
            .find(doc! {})
            .projection(doc! {"_id": 1})
            .await?;
        while let Some(d) = cursor.try_next().await? {
            match d.get("_id") {
                Some(Bson::String(id)) => {
                    m.see(id);
                    if let Some((origin, 0)) = split_id(id)
                        && ids.contains(origin)
                    {
                        stored.insert(origin.to_owned());
                    }
                }
                _ => m.see_other(),
            }
        }
    }
    Ok((m.found(), stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kill_figures_are_what_strict_reads_as_a_fault() {
        let c = |offered: u64, stored: u64| {
            Counts {
                offered,
                stored,
                documents: stored,
                logged_stored: stored,
                ..Counts::default()
            }
            .settle()
        };
        let mut f = KillFigures {
            fault: "SIGKILL batch and stream".into(),
            at_kill: AtKill::default(),
            batch: c(9000, 9000),
            stream: c(3000, 3000),
            batch_duplicated: 0,
            stream_duplicated: 0,
            batch_unlogged: 0,
            stream_unlogged: 0,
            logged_twice: 0,
            publish_retries: 3,
            recovered_s: 4.0,
        };
        let report = |f: &KillFigures| serde_json::json!({ "faults": [f] });
        assert_eq!(accounting::problems(&report(&f)), Vec::<String>::new());
        f.logged_twice = 2;
        f.batch_duplicated = 1;
        let p = accounting::problems(&report(&f));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|l| l.ends_with("logged_twice = 2")), "{p:?}");
        assert!(
            p.iter().any(|l| l.ends_with("batch_duplicated = 1")),
            "{p:?}"
        );
    }
}
