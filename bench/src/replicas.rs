//! The `replicas` scenario: coredms beside several batch and stream managers, each a process
//! of its own over one staging directory. Three phases, each on tenants of its own: the same
//! closed-loop stream load with 1, 2, … stream managers; one batch and one stream manager
//! killed (SIGKILL) while files and messages are in flight, then every input accounted for
//! from the database and the log; and a load step (low, high, low) on a tenant whose
//! consumers may range, sampled every second, beside the elastic controller's decisions.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use mysimbdp::api::{ScalingDecision, StreamStatus};
use mysimbdp::client::{Client, ClientError};
use mysimbdp::config::Settings;
use mysimbdp::infra::{Infra, ServerVersions};
use mysimbdp::model::FileState;
use mysimbdp::processes::{Manager, Replicas, SplitProcesses};
use mysimbdp::tenants::AdminPatch;
use serde::Serialize;

use crate::accounting::{
    self, Counts, FileOutcome, LogFold, LogTally, Matcher, TenantAccount, split_id,
};
use crate::dataset::{GroupFiles, make_files};
use crate::host;
use crate::report::{Line, over_time};
use crate::schema::{ElasticLoad, Expect, KillLoad, ReplicaLoad, Scenario, ThroughputLoad};

/// How long a tenant's consumers may take to appear on every stream manager (they follow
/// the target within `stream.reconcile_ms`).
const CONSUMERS_WITHIN: Duration = Duration::from_secs(30);
/// Messages per publish request in the kill phase.
const KILL_PER_REQUEST: u32 = 20;
/// Publish requests in flight at most in the load step: past it the schedule slips, and the
/// samples show the rate the platform took.
const STEP_IN_FLIGHT: usize = 32;

/// The tenant's stream status from the manager `c` reaches; with `since`, the log's
/// entries counted from then on only (cheap: the count is a scan on SecantusDB).
async fn stream_status(
    c: &Client,
    tenant: &str,
    since: Option<&str>,
) -> Result<StreamStatus, ClientError> {
    match since {
        Some(s) => c.stream_status_since(tenant, s).await,
        None => c.stream_status(tenant).await,
    }
}

/// Inputs the tenant's stream log holds, whatever became of them.
fn logged(s: &StreamStatus) -> u64 {
    let l = &s.logged;
    l.stored + l.duplicates + l.failed + l.skipped
}

// ---- figures ----

/// One throughput step: the load with `managers` stream managers.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputStep {
    pub managers: usize,
    /// The tenant's consumers on all of them, once started.
    pub consumers: u32,
    /// Messages confirmed to the publishers.
    pub messages: u64,
    /// From the first publish to the last confirm.
    pub publish_s: f64,
    /// From the first publish until the log held every confirmed message.
    pub stored_s: f64,
    pub per_s: f64,
    /// The machine's one-minute load average when the step ended (this run's processes and
    /// anything else running).
    pub load_average: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unfinished: Option<String>,
}

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

/// The load step, once a second: what was offered, what the queue held, the consumers.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    /// The step's offered rate (0 after the last step).
    pub offered_per_s: u32,
    /// Messages confirmed so far.
    pub published: u64,
    /// Log entries written since the sample before, by their stamps in the log downloaded
    /// at the end (a count while the load runs costs the database a scan each time).
    pub logged: u64,
    /// Messages ready in the tenant's queue (not those delivered and unacknowledged), and
    /// the queue's consumers on all managers, as the broker counts them (`None`: no answer).
    pub ready: Option<u64>,
    pub consumers: Option<u32>,
    /// Each manager's consumers by its own decisions so far, in the order of
    /// [`ElasticFigures::managers`].
    pub per_manager: Vec<u32>,
}

/// A scaling decision as the report shows it: when, relative to the load step's start, and
/// which stream manager made it.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub t_s: f64,
    pub manager: String,
    #[serde(flatten)]
    pub decision: ScalingDecision,
}

/// What the samples show of the controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ElasticSummary {
    pub min_total: u32,
    pub peak_total: u32,
    /// First sample above the starting consumers, and first one back at them after the peak.
    pub scaled_up_at_s: Option<f64>,
    pub back_down_at_s: Option<f64>,
    pub max_ready: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ElasticFigures {
    pub managers: Vec<String>,
    pub min_consumers: u32,
    pub max_consumers: u32,
    pub published: u64,
    pub logged: u64,
    pub summary: ElasticSummary,
    pub decisions: Vec<Decision>,
    pub samples: Vec<Sample>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

// ---- the run ----

/// What every phase works with.
struct Run {
    procs: SplitProcesses,
    ns: String,
    admin: String,
    app: Option<String>,
    db: mongodb::Client,
    amqp_uri: String,
    timeout: Duration,
}

/// A tenant of the run, with the scenario's app as its batch and stream app.
struct Tenant {
    name: String,
    token: String,
    database: String,
}

impl Run {
    async fn tenant(&self, name: &str) -> Result<Tenant> {
        let admin = self.procs.client(Some(&self.admin));
        let t = retry(|| admin.create_tenant(name, AdminPatch::default()))
            .await
            .with_context(|| format!("creating tenant {name}"))?;
        let c = admin.with_token(Some(&t.token));
        if let Some(src) = &self.app {
            for kind in ["batch", "stream"] {
                retry(|| c.upload_app(&t.name, kind, src.as_str()))
                    .await
                    .with_context(|| format!("uploading {name}'s {kind} app"))?;
            }
        }
        Ok(Tenant {
            name: t.name,
            token: t.token,
            database: t.database,
        })
    }

    /// The tenant's client whose file requests go to batch manager `batch` and whose stream
    /// requests go to stream manager `stream`.
    fn client(&self, t: &Tenant, batch: usize, stream: usize) -> Result<Client> {
        self.procs
            .client_at(batch, stream, Some(&t.token))
            .with_context(|| format!("batch-{batch} or stream-{stream} is not running"))
    }

    /// A client for each running stream manager, in replica order.
    fn stream_clients(&self, t: &Tenant) -> Result<Vec<(usize, Client)>> {
        let batch = self.procs.running(Manager::Batch)[0];
        self.procs
            .running(Manager::Stream)
            .into_iter()
            .map(|s| Ok((s, self.client(t, batch, s)?)))
            .collect()
    }

    /// Waits until every running stream manager runs at least `n` of the tenant's
    /// consumers; their sum, or why not.
    async fn consumers_started(&self, t: &Tenant, n: u32) -> Result<u32, String> {
        let clients = self.stream_clients(t).map_err(|e| format!("{e:#}"))?;
        let until = Instant::now() + CONSUMERS_WITHIN;
        loop {
            let now = consumers(&clients, &t.name).await;
            if now.iter().all(|(_, c)| c.is_some_and(|c| c >= n)) {
                return Ok(now.iter().filter_map(|c| c.1).sum());
            }
            if Instant::now() > until {
                return Err(format!(
                    "consumers after {} s: {}",
                    CONSUMERS_WITHIN.as_secs(),
                    per_manager(&now)
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The tenant's consumers on each stream manager (`None`: no answer within 3 s), asked
/// with `since` = now so the answer costs no count of the log.
async fn consumers(clients: &[(usize, Client)], tenant: &str) -> Vec<(usize, Option<u32>)> {
    let now = rfc3339(time::OffsetDateTime::now_utc());
    let asks = clients.iter().map(|(i, c)| {
        let now = now.clone();
        async move {
            let s =
                tokio::time::timeout(Duration::from_secs(3), stream_status(c, tenant, Some(&now)))
                    .await;
            (*i, s.ok().and_then(Result::ok).map(|s| s.consumers))
        }
    });
    futures::future::join_all(asks).await
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `stream 1 / stream-1 2 / stream-2 ?`.
fn per_manager(c: &[(usize, Option<u32>)]) -> String {
    c.iter()
        .map(|(i, n)| {
            let n = n.map_or("?".to_owned(), |n| n.to_string());
            format!("{} {n}", manager_name("stream", *i))
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The name `SplitProcesses` gives a replica (its log file's name).
fn manager_name(component: &str, replica: usize) -> String {
    match replica {
        0 => component.to_owned(),
        n => format!("{component}-{n}"),
    }
}

/// Retries a call the platform may refuse while busy or restarting (no answer, 503, 429):
/// every 200 ms for up to a minute.
async fn retry<T, F, Fut>(f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    use backon::{ConstantBuilder, Retryable};
    let every = ConstantBuilder::new()
        .with_delay(Duration::from_millis(200))
        .with_max_times(300);
    f.retry(every)
        .sleep(tokio::time::sleep)
        .when(transient)
        .await
}

fn transient(e: &ClientError) -> bool {
    e.status()
        .is_none_or(|s| s.as_u16() == 503 || s.as_u16() == 429)
}

/// NDJSON of messages `from..to`, as the other stream loads send them.
fn messages(from: u32, to: u32) -> Vec<u8> {
    (from..to)
        .flat_map(|seq| format!("{{\"seq\":{seq},\"v\":{}}}\n", seq % 97).into_bytes())
        .collect()
}

fn note(list: &mut Vec<String>, msg: String) {
    if list.len() < 5 && !list.contains(&msg) {
        list.push(msg);
    }
}

// ---- phase 1: throughput by stream manager count ----

/// The closed-loop load on a fresh tenant with `managers` stream managers running.
async fn throughput_step(
    run: &Run,
    load: &ThroughputLoad,
    managers: usize,
) -> Result<ThroughputStep> {
    let t = run.tenant(&format!("tp{managers}")).await?;
    let clients = run.stream_clients(&t)?;
    retry(|| clients[0].1.stream_start(&t.name, load.consumers))
        .await
        .context("starting the consumers")?;
    let mut errors = Vec::new();
    let consumers = run
        .consumers_started(&t, load.consumers)
        .await
        .unwrap_or_else(|e| {
            note(&mut errors, e);
            0
        });
    let requests = load.messages.div_ceil(load.per_request);
    let next = Arc::new(AtomicU32::new(0));
    let confirmed = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let wall_start = time::OffsetDateTime::now_utc();
    let mut publishers = tokio::task::JoinSet::new();
    for _ in 0..load.publishers {
        let (clients, next, confirmed, failures) = (
            clients.clone(),
            next.clone(),
            confirmed.clone(),
            failures.clone(),
        );
        let (tenant, per, total) = (t.name.clone(), load.per_request, load.messages);
        publishers.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= requests {
                    return;
                }
                // Requests spread over the managers, as a load balancer in front would.
                let c = &clients[k as usize % clients.len()].1;
                let body = messages(k * per, ((k + 1) * per).min(total));
                match c.publish(&tenant, "reading", body).await {
                    Ok(p) => {
                        confirmed.fetch_add(p.published, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut f) = failures.lock() {
                            note(&mut f, format!("publish: {e}"));
                        }
                    }
                }
            }
        });
    }
    while publishers.join_next().await.is_some() {}
    let publish_s = started.elapsed().as_secs_f64();
    let messages = confirmed.load(Ordering::Relaxed);
    let deadline = started + run.timeout;
    let mut unfinished = None;
    let mut seen = 0;
    loop {
        if let Ok(s) = stream_status(&clients[0].1, &t.name, None).await {
            seen = logged(&s);
            if seen >= messages {
                break;
            }
        }
        if Instant::now() > deadline {
            unfinished = Some(format!(
                "{seen} of {messages} confirmed messages in the log after {} s",
                run.timeout.as_secs()
            ));
            break;
        }
        // Seldom: each look counts the log on the database the load is measuring.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let polled_s = started.elapsed().as_secs_f64();
    // When the last entry was written, not when the poll saw it.
    let stored_s = match retry(|| clients[0].1.logs_raw(&t.name, "")).await {
        Ok(log) if unfinished.is_none() => last_entry_at(&log.body)
            .map(|at| (at - wall_start).as_seconds_f64())
            .filter(|s| *s > 0.0)
            .unwrap_or(polled_s),
        _ => polled_s,
    };
    if let Err(e) = retry(|| clients[0].1.stream_stop(&t.name)).await {
        note(&mut errors, format!("stream/stop: {e}"));
    }
    for f in failures.lock().map(|f| f.clone()).unwrap_or_default() {
        note(&mut errors, f);
    }
    Ok(ThroughputStep {
        managers,
        consumers,
        messages,
        publish_s,
        stored_s,
        per_s: messages as f64 / stored_s.max(1e-9),
        load_average: host::load_average(),
        errors,
        unfinished,
    })
}

/// The stamps of a log download's entries: coredms stamps an entry when it writes it, after
/// its documents. `None` if the download is not a log.
fn entry_times(body: &[u8]) -> Option<Vec<time::OffsetDateTime>> {
    #[derive(serde::Deserialize)]
    struct Stamp<'a> {
        #[serde(borrow)]
        timestamp: &'a str,
    }
    let entries: Vec<Stamp> = serde_json::from_slice(body).ok()?;
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    Some(
        entries
            .iter()
            .filter_map(|e| time::OffsetDateTime::parse(e.timestamp, rfc3339).ok())
            .collect(),
    )
}

/// The time of a log download's latest entry.
fn last_entry_at(body: &[u8]) -> Option<time::OffsetDateTime> {
    entry_times(body)?.into_iter().max()
}

/// How many of `times` fall after each sample's predecessor and at or before it (the first
/// sample takes everything before it; what follows the last is left out).
fn per_sample(times: &[f64], samples: &[f64]) -> Vec<u64> {
    let mut out = vec![0; samples.len()];
    for t in times {
        if let Some(i) = samples.iter().position(|s| t <= s) {
            out[i] += 1;
        }
    }
    out
}

/// 1, 2, … `managers` stream managers, one more started before each step.
async fn throughput(
    run: &mut Run,
    load: &ThroughputLoad,
    managers: usize,
) -> Result<Vec<ThroughputStep>> {
    let mut steps = Vec::new();
    for k in 1..=managers {
        while run.procs.running(Manager::Stream).len() < k {
            run.procs.add(Manager::Stream).await?;
        }
        let s = throughput_step(run, load, k).await?;
        eprintln!(
            "throughput, {k} stream manager(s), {} consumers: {} messages stored in {:.1} s, {:.0}/s{}",
            s.consumers,
            s.messages,
            s.stored_s,
            s.per_s,
            s.unfinished
                .as_deref()
                .map(|u| format!(" (unfinished: {u})"))
                .unwrap_or_default()
        );
        steps.push(s);
    }
    Ok(steps)
}

// ---- phase 2: kills ----

/// The kill phase's figures and the accounting of its tenant's two paths.
struct KillOutcome {
    figures: KillFigures,
    accounts: Vec<TenantAccount>,
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
async fn kill(run: &mut Run, load: &KillLoad) -> Result<KillOutcome> {
    let t = run.tenant("kill").await?;
    let files = GroupFiles::new(make_files(&load.batch, load.batch.files)?);
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
    for (i, body) in files.bodies.iter().enumerate() {
        let c = run.client(&t, batch[i % batch.len()], streams[0].0)?;
        let name = format!("f{i}.csv");
        let sent = async {
            retry(|| c.upload_file(&t.name, &name, body.clone())).await?;
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
        messages_confirmed: tally.lock().map_or(0, |t| t.offered),
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
        at_kill.messages_logged = logged(&s);
    }
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
    let mut runs = HashMap::new();
    for f in &outcomes {
        let r = retry(|| survivor.file(&t.name, &f.name)).await?;
        runs.insert(r.job, f.inputs);
    }
    let (found, stored_ids) =
        scan(&run.db.database(&t.database), &outcomes, &confirmed.ids).await?;
    let body = retry(|| survivor.logs_raw(&t.name, "")).await?.body;
    let mut fold = LogFold::new(None);
    fold.feed(&body)?;
    let tally_log: LogTally = fold.finish()?;
    let cover = accounting::coverage(&body, &runs, &stored_ids)?;
    let batch_counts = Counts {
        offered: outcomes.iter().map(|f| f.inputs).sum(),
        refused,
        stored: found.batch_stored,
        failed: tally_log.batch.failure,
        skipped: tally_log.batch.skipped,
        lost: 0,
        documents: found.batch_documents,
        logged_stored: tally_log.batch.success + tally_log.batch.duplicate,
    }
    .settle();
    let stream_counts = Counts {
        offered: confirmed.offered,
        refused: confirmed.refused,
        stored: found.stream_stored,
        failed: tally_log.stream.failure,
        skipped: tally_log.stream.skipped,
        lost: 0,
        documents: found.stream_documents,
        logged_stored: tally_log.stream.success + tally_log.stream.duplicate,
    }
    .settle();
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
    batch_account.files_failed = outcomes
        .iter()
        .filter(|f| f.state == "failed")
        .map(|f| {
            format!(
                "{} ended `failed`: {}",
                f.name,
                f.error.as_deref().unwrap_or("no error given")
            )
        })
        .collect();
    let mut stream_account = account("stream", &stream_counts, &tally_log.stream);
    for e in &confirmed.errors {
        note(&mut stream_account.errors, e.clone());
    }
    if found.stray > 0 {
        note(
            &mut stream_account.errors,
            format!("{} documents no offered input explains", found.stray),
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
            .map_or(0, |s| logged(&s));
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

// ---- phase 3: the elastic controller under a load step ----

/// A queue as the broker sees it, by a passive declare: the messages ready in it and its
/// consumers, on every manager. Cheap and beside the platform: RabbitMQ's management API is
/// not assumed, `rabbitmqctl` costs a second and a half of CPU a call, and the platform's
/// `GET …/stream` counts the log even with `since=now` (on SecantusDB, 2–5 s a call once a
/// run's log held some 50,000 entries; asked of every manager every second, no answer came
/// within 3 s at all).
struct QueueLook {
    connection: lapin::Connection,
    channel: Option<lapin::Channel>,
    queue: String,
}

impl QueueLook {
    async fn connect(uri: &str, queue: String) -> Result<Self> {
        let props = lapin::ConnectionProperties::default()
            .with_connection_name("mysimbdp-bench-queue-look".into());
        let connection = lapin::Connection::connect(uri, props)
            .await
            .context("connecting to the broker to look at the queue")?;
        Ok(Self {
            connection,
            channel: None,
            queue,
        })
    }

    /// (ready messages, consumers); `None` when the broker did not answer. A failed
    /// declare closes its channel, so the next call opens another.
    async fn look(&mut self) -> Option<(u64, u32)> {
        if self
            .channel
            .as_ref()
            .is_none_or(|c| !c.status().connected())
        {
            self.channel = self.connection.create_channel().await.ok();
        }
        let ch = self.channel.as_ref()?;
        let opts = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = ch
            .queue_declare(self.queue.as_str().into(), opts, Default::default())
            .await
            .ok()?;
        Some((u64::from(q.message_count()), q.consumer_count()))
    }
}

/// What the load step's publisher and sampler share.
#[derive(Default)]
struct StepState {
    rate: AtomicU32,
    published: AtomicU64,
    done: AtomicBool,
    errors: Mutex<Vec<String>>,
}

/// Open loop at each step's rate in requests of `per` messages, spread over the stream
/// managers; at most [`STEP_IN_FLIGHT`] requests at once.
async fn offer_steps(
    clients: Vec<(usize, Client)>,
    tenant: String,
    load: ElasticLoad,
    state: Arc<StepState>,
) {
    let per = load.per_request;
    let slots = Arc::new(tokio::sync::Semaphore::new(STEP_IN_FLIGHT));
    let mut inflight = tokio::task::JoinSet::new();
    let mut seq = 0u32;
    for step in &load.steps {
        state.rate.store(step.rate, Ordering::Relaxed);
        let interval = Duration::from_secs_f64(f64::from(per) / f64::from(step.rate));
        let t0 = tokio::time::Instant::now();
        let end = t0 + Duration::from_secs(step.seconds);
        let mut k = 0u32;
        loop {
            let at = t0 + interval * k;
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at).await;
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let c = clients[(seq / per) as usize % clients.len()].1.clone();
            let (tenant, state) = (tenant.clone(), state.clone());
            let body = messages(seq, seq + per);
            seq += per;
            k += 1;
            inflight.spawn(async move {
                match c.publish(&tenant, "reading", body).await {
                    Ok(p) => {
                        state.published.fetch_add(p.published, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut errs) = state.errors.lock() {
                            note(&mut errs, format!("publish: {e}"));
                        }
                    }
                }
                drop(permit);
            });
        }
    }
    state.rate.store(0, Ordering::Relaxed);
    while inflight.join_next().await.is_some() {}
    state.done.store(true, Ordering::Relaxed);
}

/// Every stream manager runs again (a replacement for the one killed), and a tenant with a
/// consumer range gets the load step; sampled once a second until its consumers are back at
/// the minimum with nothing left to store, or `settle_s` after the last step.
async fn elastic(run: &mut Run, load: &ElasticLoad, managers: usize) -> Result<ElasticFigures> {
    while run.procs.running(Manager::Stream).len() < managers {
        run.procs.add(Manager::Stream).await?;
    }
    let t = run.tenant("elastic").await?;
    let clients = run.stream_clients(&t)?;
    retry(|| {
        clients[0]
            .1
            .stream_start_range(&t.name, load.min_consumers, load.max_consumers)
    })
    .await
    .context("starting the consumers")?;
    let mut errors = Vec::new();
    if let Err(e) = run.consumers_started(&t, load.min_consumers).await {
        note(&mut errors, e);
    }
    let mut queue =
        QueueLook::connect(&run.amqp_uri, format!("{}mysimbdp.{}", run.ns, t.name)).await?;
    let state = Arc::new(StepState::default());
    let wall_start = time::OffsetDateTime::now_utc();
    let started = Instant::now();
    let offer = tokio::spawn(offer_steps(
        clients.clone(),
        t.name.clone(),
        load.clone(),
        state.clone(),
    ));
    let floor = load.min_consumers * clients.len() as u32;
    let mut samples: Vec<Sample> = Vec::new();
    let mut settle_until = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let seen = queue.look().await;
        let s = Sample {
            t_s: started.elapsed().as_secs_f64(),
            offered_per_s: state.rate.load(Ordering::Relaxed),
            published: state.published.load(Ordering::Relaxed),
            logged: 0,
            ready: seen.map(|s| s.0),
            consumers: seen.map(|s| s.1),
            per_manager: Vec::new(),
        };
        let done = state.done.load(Ordering::Relaxed);
        let idle = done && seen == Some((0, floor));
        let published = s.published;
        samples.push(s);
        // The log is counted only once all is idle: then the count competes with nothing.
        if idle
            && tokio::time::timeout(
                Duration::from_secs(30),
                stream_status(&clients[0].1, &t.name, None),
            )
            .await
            .is_ok_and(|s| s.is_ok_and(|s| logged(&s) >= published))
        {
            break;
        }
        if done && settle_until.is_none() {
            settle_until = Some(Instant::now() + Duration::from_secs(load.settle_s));
        }
        if settle_until.is_some_and(|u| Instant::now() > u) {
            break;
        }
    }
    let _ = offer.await;
    let published = state.published.load(Ordering::Relaxed);
    let mut in_log = 0;
    match retry(|| clients[0].1.logs_raw(&t.name, "")).await {
        Ok(log) => {
            let times: Vec<f64> = entry_times(&log.body)
                .unwrap_or_default()
                .into_iter()
                .map(|at| (at - wall_start).as_seconds_f64())
                .collect();
            in_log = times.len() as u64;
            let at: Vec<f64> = samples.iter().map(|s| s.t_s).collect();
            for (s, n) in samples.iter_mut().zip(per_sample(&times, &at)) {
                s.logged = n;
            }
        }
        Err(e) => note(&mut errors, format!("log download: {e}")),
    }
    let decisions = match retry(|| clients[0].1.stream_report(&t.name)).await {
        Ok(r) => r.scaling,
        Err(e) => {
            note(&mut errors, format!("stream/report: {e}"));
            Vec::new()
        }
    };
    if let Err(e) = retry(|| clients[0].1.stream_stop(&t.name)).await {
        note(&mut errors, format!("stream/stop: {e}"));
    }
    for e in state.errors.lock().map(|e| e.clone()).unwrap_or_default() {
        note(&mut errors, e);
    }
    let pids = run.procs.replica_pids(Manager::Stream);
    let decisions: Vec<Decision> = decisions
        .into_iter()
        .filter_map(|d| {
            // All of them: the tenant is the phase's own, from its start on.
            Some(Decision {
                t_s: seconds_since(wall_start, &d.at)?,
                manager: manager_of(&d.replica, &pids),
                decision: d,
            })
        })
        .collect();
    let managers: Vec<String> = clients
        .iter()
        .map(|(i, _)| manager_name("stream", *i))
        .collect();
    for s in &mut samples {
        s.per_manager = consumers_by_decisions(s.t_s, &decisions, &managers);
    }
    Ok(ElasticFigures {
        managers,
        min_consumers: load.min_consumers,
        max_consumers: load.max_consumers,
        published,
        logged: in_log,
        summary: summarize(&samples),
        decisions,
        samples,
        errors,
    })
}

fn seconds_since(start: time::OffsetDateTime, at: &str) -> Option<f64> {
    let at =
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
    Some((at - start).as_seconds_f64())
}

/// Which of our stream managers a decision's `replica` (its host and process) names: the
/// one whose process id ends it; else the name as given (a manager since killed).
fn manager_of(replica: &str, pids: &[(usize, u32)]) -> String {
    let digits: String = replica
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    pids.iter()
        .find(|(_, pid)| digits == pid.to_string())
        .map_or_else(|| replica.to_owned(), |(i, _)| manager_name("stream", *i))
}

/// Each manager's consumers at `t_s` by its decisions up to then (0 before its first).
fn consumers_by_decisions(t_s: f64, decisions: &[Decision], managers: &[String]) -> Vec<u32> {
    managers
        .iter()
        .map(|m| {
            decisions
                .iter()
                .filter(|d| &d.manager == m && d.t_s <= t_s)
                .max_by(|a, b| a.t_s.total_cmp(&b.t_s))
                .map_or(0, |d| d.decision.to)
        })
        .collect()
}

/// The controller as the samples show it: its range of total consumers, when it first went
/// above where it started, when it was back there after the peak, the deepest queue.
fn summarize(samples: &[Sample]) -> ElasticSummary {
    // Only the samples the broker answered: a missing answer is not a consumer less.
    let seen: Vec<(f64, u32)> = samples
        .iter()
        .filter_map(|s| Some((s.t_s, s.consumers?)))
        .collect();
    let start = seen.first().map_or(0, |w| w.1);
    let peak_total = seen.iter().map(|w| w.1).max().unwrap_or(0);
    let peak_at = seen.iter().position(|w| w.1 == peak_total).unwrap_or(0);
    ElasticSummary {
        min_total: seen.iter().map(|w| w.1).min().unwrap_or(0),
        peak_total,
        scaled_up_at_s: seen.iter().find(|w| w.1 > start).map(|w| w.0),
        back_down_at_s: seen[peak_at..]
            .iter()
            .find(|w| peak_total > start && w.1 <= start)
            .map(|w| w.0),
        max_ready: samples.iter().filter_map(|s| s.ready).max().unwrap_or(0),
    }
}

// ---- the report ----

/// Runs the three phases and writes `<out>/<name>/<run>/report.{json,md}` and
/// `elastic.svg`.
pub async fn run(sc: &Scenario, load: &ReplicaLoad, out: &Path, run_id: &str) -> Result<PathBuf> {
    let ns = format!("rp{:06x}_", std::process::id() & 0xffffff);
    let staging = std::env::temp_dir().join(format!("mysimbdp-replicas-{ns}"));
    let admin = format!("replicas-admin-{:010}", std::process::id());
    let p = &sc.platform;
    let mut overrides = vec![
        format!("platform.namespace={ns}"),
        format!("staging.dir={}", staging.display()),
        format!("auth.admin_token={admin}"),
        format!("batch.batch_size={}", p.batch_size),
        format!("batch.workers={}", p.batch_workers),
        format!("stream.batch_size={}", p.stream_batch_size),
        format!("stream.prefetch={}", p.prefetch),
        format!("stream.linger_ms={}", p.stream_linger_ms),
        format!("mongodb.write_concern=\"{}\"", p.write_concern),
        format!("mongodb.journal={}", p.journal),
        "mongodb.max_pool_size=4".into(),
        // A killed batch manager's jobs pass to the others once its lease expires: short
        // here, so the kill phase measures the takeover, not the default 30 s lease.
        "batch.lease_ms=3000".into(),
    ];
    overrides.extend(load.set.iter().cloned());
    let settings = Settings::load(None, &overrides)?;
    if settings.mongodb.uri.is_empty() || settings.amqp.uri.is_empty() {
        bail!(
            "the replicas scenario needs MONGODB_URI and AMQP_URI: {}",
            mysimbdp::infra::HOW_TO_PROVIDE
        );
    }
    let infra = Infra::provision(&settings).await?;
    let exe = std::env::current_exe().context("cannot find the scenario executable")?;
    eprintln!(
        "scenario {}: coredms, {} batch managers, 1 stream manager to start with",
        sc.name, load.batch_managers
    );
    let procs = SplitProcesses::start_replicas(
        &exe,
        &overrides,
        &infra,
        &staging.with_extension("logs"),
        Replicas {
            batch: load.batch_managers as usize,
            stream: 1,
        },
    )
    .await?;
    let mut run = Run {
        procs,
        ns,
        admin,
        app: sc
            .plans()?
            .first()
            .and_then(|g| g.app.source())
            .map(str::to_owned),
        db: mongodb::Client::with_uri_str(&infra.mongodb_uri).await?,
        amqp_uri: infra.amqp_uri.clone(),
        timeout: Duration::from_secs(sc.timeout_s),
    };
    let load_before = host::load_average();
    let measured = phases(&mut run, load).await;
    let stopped = run.procs.stop().await;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(staging.with_extension("logs"));
    let (steps, killed, elastic) = measured?;
    let errors: Vec<String> = stopped
        .err()
        .map(|e| accounting::strip_ansi(&format!("{e:#}")))
        .into_iter()
        .collect();
    let dir = out.join(&sc.name).join(run_id);
    std::fs::create_dir_all(&dir)?;
    let mut accounts: Vec<serde_json::Value> = unfinished_steps(&steps, &elastic);
    for a in &killed.accounts {
        accounts.push(serde_json::to_value(a)?);
    }
    let json = serde_json::json!({
        "schema_version": crate::report::SCHEMA_VERSION,
        "scenario": sc.name,
        "run_id": run_id,
        "environment": environment(&infra.versions, sc, load_before),
        "load": load,
        "throughput": steps,
        // Read by `--strict` as a fault's figures, like the faults scenario's.
        "faults": [killed.figures],
        "elastic": elastic,
        // Read by `scenario run`: the kill phase's tenant, and any step that did not finish.
        "accounting": accounts,
        "platform_errors": errors,
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
    let svg = elastic_svg(&elastic)?;
    std::fs::write(dir.join("elastic.svg"), svg)?;
    std::fs::write(
        dir.join("report.md"),
        markdown(
            sc,
            run_id,
            &infra.versions,
            &steps,
            &killed.figures,
            &elastic,
            load_before,
        ),
    )?;
    Ok(dir)
}

async fn phases(
    run: &mut Run,
    load: &ReplicaLoad,
) -> Result<(Vec<ThroughputStep>, KillOutcome, ElasticFigures)> {
    let managers = load.stream_managers as usize;
    let steps = throughput(run, &load.throughput, managers).await?;
    let killed = kill(run, &load.kill).await?;
    let f = &killed.figures;
    eprintln!(
        "kill: batch {}/{} stored, {} failed, {} lost; stream {}/{} stored, {} failed, {} lost; duplicated {} + {}, unlogged {} + {}, logged twice {}; done {:.1} s after the kill",
        f.batch.stored,
        f.batch.offered,
        f.batch.failed,
        f.batch.lost,
        f.stream.stored,
        f.stream.offered,
        f.stream.failed,
        f.stream.lost,
        f.batch_duplicated,
        f.stream_duplicated,
        f.batch_unlogged,
        f.stream_unlogged,
        f.logged_twice,
        f.recovered_s
    );
    let e = elastic(run, &load.elastic, managers).await?;
    eprintln!(
        "elastic: consumers {} → {} → back at {:?} s; deepest queue {}; {} decisions",
        e.summary.min_total,
        e.summary.peak_total,
        e.summary.back_down_at_s,
        e.summary.max_ready,
        e.decisions.len()
    );
    Ok((steps, killed, e))
}

/// An `accounting` entry for each throughput step, and the load step, whose messages did
/// not all reach the log: what `scenario run` fails on.
fn unfinished_steps(steps: &[ThroughputStep], elastic: &ElasticFigures) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = steps
        .iter()
        .filter_map(|s| {
            Some(serde_json::json!({
                "phase": format!("throughput, {} stream managers", s.managers),
                "tenant": format!("tp{}", s.managers),
                "path": "stream",
                "unfinished": s.unfinished.as_ref()?,
            }))
        })
        .collect();
    if elastic.logged < elastic.published {
        out.push(serde_json::json!({
            "phase": "elastic",
            "tenant": "elastic",
            "path": "stream",
            "unfinished": format!("{} of {} confirmed messages in the log when sampling ended", elastic.logged, elastic.published),
        }));
    }
    out
}

fn environment(
    versions: &ServerVersions,
    sc: &Scenario,
    load_before: Option<f64>,
) -> serde_json::Value {
    serde_json::json!({
        "mongodb_version": versions.mongodb,
        "mongodb_server": versions.mongodb_server,
        "rabbitmq": versions.rabbitmq,
        "cores": host::cores(),
        "memory_bytes": host::memory_bytes(),
        "commit": host::commit(),
        "build": host::build(),
        "stream_batch_size": sc.platform.stream_batch_size,
        "prefetch": sc.platform.prefetch,
        "load_average_before": load_before,
    })
}

/// The queue's depth and the consumers over the load step.
fn elastic_svg(e: &ElasticFigures) -> Result<String> {
    let ready: Vec<(f64, f64)> = e
        .samples
        .iter()
        .filter_map(|s| Some((s.t_s, s.ready? as f64)))
        .collect();
    let consumers: Vec<(f64, f64)> = e
        .samples
        .iter()
        .filter_map(|s| Some((s.t_s, f64::from(s.consumers?))))
        .collect();
    over_time(
        "load step: queue depth and consumers",
        &Line {
            name: "messages ready",
            points: &ready,
        },
        &Line {
            name: "consumers (all managers)",
            points: &consumers,
        },
    )
}

fn throughput_table(steps: &[ThroughputStep]) -> String {
    let mut md = String::from(
        "| stream managers | consumers | messages | published in s | in the log in s | messages/s | vs 1 manager | load average |\n|---|---|---|---|---|---|---|---|\n",
    );
    let base = steps.first().map_or(0.0, |s| s.per_s);
    for s in steps {
        md.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.2}× | {} |\n",
            s.managers,
            s.consumers,
            s.messages,
            s.publish_s,
            s.stored_s,
            s.per_s,
            if base > 0.0 { s.per_s / base } else { 0.0 },
            s.load_average.map_or("?".into(), |l| format!("{l:.1}")),
        ));
    }
    for s in steps {
        for e in &s.errors {
            md.push_str(&format!("\n- {} managers: {e}", s.managers));
        }
        if let Some(u) = &s.unfinished {
            md.push_str(&format!("\n- {} managers: unfinished: {u}", s.managers));
        }
    }
    md
}

fn kill_table(f: &KillFigures) -> String {
    let mut md = format!(
        "{}, {:.1} s into the load: {} file(s) ingesting ({} records read), {} of {} confirmed messages in the log. Every input accounted for {:.1} s after the kill; {} publish requests retried on another stream manager.\n\n| path | offered | stored | failed | lost | duplicated | stored, no log entry |\n|---|---|---|---|---|---|---|\n",
        f.fault,
        f.at_kill.after_s,
        f.at_kill.files_ingesting,
        f.at_kill.records_read,
        f.at_kill.messages_logged,
        f.at_kill.messages_confirmed,
        f.recovered_s,
        f.publish_retries,
    );
    for (path, c, dup, unlogged) in [
        ("batch", &f.batch, f.batch_duplicated, f.batch_unlogged),
        ("stream", &f.stream, f.stream_duplicated, f.stream_unlogged),
    ] {
        md.push_str(&format!(
            "| {path} | {} | {} | {} | {} | {dup} | {unlogged} |\n",
            c.offered, c.stored, c.failed, c.lost
        ));
    }
    md.push_str(&format!(
        "\nLog entries written twice: {}. Lost: offered − stored − failed − skipped (negative: counted twice). Duplicated: `duplicate` entries (an input another ingestion had stored). Batch \"no log entry\": records of a file's run that no entry names; stream: stored messages no entry names.\n",
        f.logged_twice
    ));
    md
}

/// Each sample's row, with the decisions made since the sample before it.
fn timeline<'a>(samples: &[Sample], decisions: &'a [Decision]) -> Vec<Vec<&'a Decision>> {
    let mut rows: Vec<Vec<&Decision>> = vec![Vec::new(); samples.len()];
    for d in decisions {
        let i = samples
            .iter()
            .position(|s| d.t_s <= s.t_s)
            .unwrap_or(samples.len().saturating_sub(1));
        if let Some(r) = rows.get_mut(i) {
            r.push(d);
        }
    }
    rows
}

fn elastic_tables(e: &ElasticFigures) -> String {
    let s = &e.summary;
    let mut md = format!(
        "{} stream managers ({}), each running {} to {} consumers of the tenant's queue. The queue's consumers, as the broker counts them: from {} to {} (first above where they started at {}, back there after the peak at {}); deepest queue {} ready messages. {} of {} confirmed messages in the log at the end.\n\n",
        e.managers.len(),
        e.managers.join(", "),
        e.min_consumers,
        e.max_consumers,
        s.min_total,
        s.peak_total,
        s.scaled_up_at_s
            .map_or("never".into(), |t| format!("{t:.0} s")),
        s.back_down_at_s
            .map_or("never".into(), |t| format!("{t:.0} s")),
        s.max_ready,
        e.logged,
        e.published,
    );
    md.push_str("The controller's decisions (from `GET …/stream/report`, `scaling`):\n\n| s | manager | consumers | queue depth | reason |\n|---|---|---|---|---|\n");
    for d in &e.decisions {
        md.push_str(&format!(
            "| {:.1} | {} | {} → {} | {} | {} |\n",
            d.t_s,
            d.manager,
            d.decision.from,
            d.decision.to,
            d.decision.queue_depth,
            d.decision.reason
        ));
    }
    if e.decisions.is_empty() {
        md.push_str("| – | – | – | – | none reported |\n");
    }
    md.push_str(&format!("\nOnce a second: ready (messages waiting in the queue, not those delivered and unacknowledged) and consumers as the broker counts them; consumers per manager ({}) by the managers' own decisions; published and in the log per second, the latter by the stamps of the log's entries:\n\n| s | offered /s | published /s | in the log /s | ready | consumers | per manager | decisions |\n|---|---|---|---|---|---|---|---|\n", e.managers.join(" / ")));
    let rows = timeline(&e.samples, &e.decisions);
    let mut before: Option<&Sample> = None;
    for (smp, ds) in e.samples.iter().zip(rows) {
        let dt = (smp.t_s - before.map_or(0.0, |b| b.t_s)).max(1e-9);
        let published = smp.published - before.map_or(0, |b| b.published);
        let per_s = |n: u64| format!("{:.0}", n as f64 / dt);
        let (published, logged) = (per_s(published), per_s(smp.logged));
        md.push_str(&format!(
            "| {:.0} | {} | {published} | {logged} | {} | {} | {} | {} |\n",
            smp.t_s,
            smp.offered_per_s,
            smp.ready.map_or("?".into(), |r| r.to_string()),
            smp.consumers.map_or("?".into(), |n| n.to_string()),
            smp.per_manager
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" / "),
            ds.iter()
                .map(|d| format!("{} {}→{}", d.manager, d.decision.from, d.decision.to))
                .collect::<Vec<_>>()
                .join(", "),
        ));
        before = Some(smp);
    }
    for err in &e.errors {
        md.push_str(&format!("\n- {err}"));
    }
    md
}

fn markdown(
    sc: &Scenario,
    run_id: &str,
    versions: &ServerVersions,
    steps: &[ThroughputStep],
    killed: &KillFigures,
    elastic: &ElasticFigures,
    load_before: Option<f64>,
) -> String {
    format!(
        "# Scenario `{}` — run {run_id}\n\n{}\n\nPlatform: coredms, batch and stream managers as processes of their own ({} build, commit {}, {} cores); database: {}; broker: {}. Stream batches of {}, prefetch {}. Load average (1 min) before the run: {} (it counts whatever else the machine was running).\n\n## Throughput by stream managers\n\nThe same closed-loop load on a fresh tenant each time; messages/s from the first publish until the log held every confirmed message.\n\n{}\n\n## Managers killed under load\n\n{}\n## The elastic controller under a load step\n\n![queue depth and consumers](elastic.svg)\n\n{}\n",
        sc.name,
        sc.description,
        host::build(),
        host::commit(),
        host::cores(),
        versions.mongodb_server,
        versions.rabbitmq,
        sc.platform.stream_batch_size,
        sc.platform.prefetch,
        load_before.map_or("?".into(), |l| format!("{l:.1}")),
        throughput_table(steps),
        kill_table(killed),
        elastic_tables(elastic),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, ready: u64, consumers: u32) -> Sample {
        Sample {
            t_s,
            offered_per_s: 100,
            published: 0,
            logged: 0,
            ready: Some(ready),
            consumers: Some(consumers),
            per_manager: Vec::new(),
        }
    }

    fn decision(t_s: f64, from: u32, to: u32) -> Decision {
        Decision {
            t_s,
            manager: "stream-1".into(),
            decision: ScalingDecision {
                at: String::new(),
                replica: "host:42".into(),
                from,
                to,
                queue_depth: 5000,
                max_latency_ms: 0,
                reason: "queue".into(),
            },
        }
    }

    #[test]
    fn the_summary_finds_the_scale_up_the_peak_and_the_way_back() {
        let samples = [
            sample(1.0, 0, 3),
            sample(2.0, 3000, 3),
            sample(3.0, 6000, 5),
            sample(4.0, 4000, 9),
            sample(5.0, 0, 8),
            sample(6.0, 0, 3),
        ];
        assert_eq!(
            summarize(&samples),
            ElasticSummary {
                min_total: 3,
                peak_total: 9,
                scaled_up_at_s: Some(3.0),
                back_down_at_s: Some(6.0),
                max_ready: 6000,
            }
        );
        let flat = [sample(1.0, 0, 2), sample(2.0, 10, 2)];
        let s = summarize(&flat);
        assert_eq!(
            (s.scaled_up_at_s, s.back_down_at_s),
            (None, None),
            "never scaled"
        );
        assert_eq!(summarize(&[]), ElasticSummary::default());
    }

    #[test]
    fn a_look_the_broker_did_not_answer_is_not_a_consumer_less() {
        let mut gap = sample(2.0, 0, 0);
        gap.consumers = None;
        let samples = [sample(1.0, 0, 3), gap, sample(3.0, 0, 4)];
        let s = summarize(&samples);
        assert_eq!((s.min_total, s.peak_total), (3, 4));
        assert_eq!(s.scaled_up_at_s, Some(3.0));
        assert_eq!(s.back_down_at_s, None, "the gap is not a way back");
    }

    #[test]
    fn each_managers_consumers_follow_its_own_latest_decision() {
        let mut ds = vec![
            decision(-0.5, 0, 1),
            decision(4.0, 1, 2),
            decision(6.0, 2, 1),
        ];
        let mut other = decision(0.0, 0, 1);
        other.manager = "stream-2".into();
        ds.push(other);
        let managers = [
            "stream-1".to_owned(),
            "stream-2".to_owned(),
            "stream-3".to_owned(),
        ];
        let at = |t| consumers_by_decisions(t, &ds, &managers);
        assert_eq!(at(-1.0), [0, 0, 0], "before any");
        assert_eq!(at(1.0), [1, 1, 0], "stream-3 never decided");
        assert_eq!(at(4.0), [2, 1, 0]);
        assert_eq!(at(9.0), [1, 1, 0]);
    }

    #[test]
    fn log_entries_are_counted_in_the_sample_that_follows_them() {
        let times = [-0.5, 0.2, 1.0, 1.01, 2.5, 9.0];
        assert_eq!(per_sample(&times, &[1.0, 2.0, 3.0]), [3, 1, 1]);
        assert_eq!(per_sample(&times, &[]), Vec::<u64>::new());
    }

    #[test]
    fn decisions_land_in_the_row_of_the_first_sample_after_them() {
        let samples = [sample(1.0, 0, 1), sample(2.0, 0, 1), sample(3.0, 0, 1)];
        let ds = [
            decision(-0.5, 1, 1),
            decision(1.5, 1, 2),
            decision(2.0, 2, 3),
            decision(9.0, 3, 2),
        ];
        let rows = timeline(&samples, &ds);
        let tos: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| r.iter().map(|d| d.decision.to).collect())
            .collect();
        assert_eq!(
            tos,
            [vec![1], vec![2, 3], vec![2]],
            "a late one goes in the last row"
        );
    }

    #[test]
    fn a_decision_names_the_manager_whose_process_made_it() {
        let pids = [(0, 4100), (2, 4242)];
        assert_eq!(manager_of("box:4242", &pids), "stream-2");
        assert_eq!(manager_of("box-4100", &pids), "stream");
        assert_eq!(
            manager_of("box:14242", &pids),
            "box:14242",
            "not a suffix match"
        );
        assert_eq!(manager_of("box:999", &pids), "box:999", "one since killed");
    }

    #[test]
    fn the_last_entry_is_the_latest_stamp_not_the_last_in_the_download() {
        let log = serde_json::json!([
            {"timestamp": "2026-12-02T06:00:01.250Z", "status": "success"},
            {"timestamp": "2026-12-02T06:00:03.500Z", "status": "success"},
            {"timestamp": "2026-12-02T06:00:02Z", "status": "failure"},
        ]);
        let at = last_entry_at(log.to_string().as_bytes()).expect("a stamp");
        assert_eq!(rfc3339(at), "2026-12-02T06:00:03.5Z");
        assert_eq!(last_entry_at(b"[]"), None);
        assert_eq!(last_entry_at(b"not json"), None);
    }

    #[test]
    fn the_throughput_table_sets_each_count_beside_one_manager() {
        let step = |managers, per_s| ThroughputStep {
            managers,
            consumers: managers as u32,
            messages: 4000,
            publish_s: 1.0,
            stored_s: 4000.0 / per_s,
            per_s,
            load_average: Some(1.5),
            errors: vec![],
            unfinished: None,
        };
        let md = throughput_table(&[step(1, 800.0), step(2, 1200.0), step(3, 1000.0)]);
        let rows: Vec<&str> = md.lines().skip(2).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[0].ends_with("| 800 | 1.00× | 1.5 |"), "{}", rows[0]);
        assert!(rows[1].ends_with("| 1200 | 1.50× | 1.5 |"), "{}", rows[1]);
        assert!(rows[2].ends_with("| 1000 | 1.25× | 1.5 |"), "{}", rows[2]);
    }

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
