//! The load of one tenant on one path, driven through the public HTTP API. Every call is
//! bounded, and nothing a tenant's load meets (a refusal, a timeout, a component that stops
//! answering) stops the run: it is recorded in the tenant's [`PathRun`], and what has not
//! finished when the phase's deadline passes is reported as unfinished, with why.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mysimbdp::client::{Client, ClientError};

use crate::progress::Progress;
use crate::scenario::StreamLoad;

/// A tenant as the load drivers see it.
#[derive(Clone)]
pub struct TenantCtx {
    pub name: String,
    /// Its database, where the accounting looks for what was stored.
    pub database: String,
    pub client: Client,
    /// Its batch app has no `map`: a file is one input (the whole payload), not one per row.
    pub whole_file: bool,
}

/// The files a group's tenants upload: their bytes, the origin the platform derives their
/// document ids from (the first 16 hex digits of the content's SHA-256) and their rows.
pub struct GroupFiles {
    pub bodies: Vec<Vec<u8>>,
    pub origins: Vec<String>,
    pub records: Vec<u64>,
}

impl GroupFiles {
    pub fn new(bodies: Vec<Vec<u8>>) -> Self {
        use sha2::Digest;
        let origins = bodies
            .iter()
            .map(|b| hex::encode(sha2::Sha256::digest(b))[..16].to_owned())
            .collect();
        let records = bodies
            .iter()
            .map(|b| {
                let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(&b[..]);
                rdr.byte_records().count() as u64
            })
            .collect();
        Self {
            bodies,
            origins,
            records,
        }
    }
}

/// A batch file the platform accepted for ingestion, and how it ended.
#[derive(Debug, Clone)]
pub struct FileOutcome {
    pub name: String,
    pub origin: String,
    /// Inputs in it: its rows, or 1 for a whole-file (`ingest`) app.
    pub inputs: u64,
    /// The platform's last word: `done`, `failed`, or the state it was in at the deadline.
    pub state: String,
    pub error: Option<String>,
}

/// What one tenant's load on one path did, as the runner saw it.
#[derive(Debug, Default)]
pub struct PathRun {
    /// Inputs the platform accepted: rows of the files whose ingestion it started; messages
    /// whose publish it confirmed.
    pub offered: u64,
    /// Inputs it would not take (the upload, the ingest request or the publish failed).
    pub refused: u64,
    /// The first few distinct 4xx answers.
    pub refusals: Vec<String>,
    /// The first few distinct errors: timeouts, 5xx, a component that stopped answering.
    pub errors: Vec<String>,
    /// Why the load had not finished when the deadline passed.
    pub unfinished: Option<String>,
    /// From the phase's start to the end of this tenant's load on this path.
    pub elapsed: Duration,
    pub files: Vec<FileOutcome>,
    /// Ids of the confirmed messages.
    pub ids: HashSet<String>,
    /// Per file: ingest request → done.
    pub file_hist: Option<Histogram<u64>>,
}

const NOTES: usize = 5;

fn note(list: &mut Vec<String>, msg: String) {
    if list.len() < NOTES && !list.contains(&msg) {
        list.push(msg);
    }
}

/// Why a call did not succeed.
#[derive(Debug)]
pub enum Fail {
    /// The platform answered 4xx: it refused the request.
    Refused(String),
    /// 5xx, no answer in time, or the component could not be reached.
    Error(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(m) | Self::Error(m) => f.write_str(m),
        }
    }
}

impl PathRun {
    /// `n` inputs not taken because `what` failed.
    fn refuse(&mut self, n: u64, what: &str, f: Fail) {
        self.refused += n;
        match f {
            Fail::Refused(m) => note(&mut self.refusals, format!("{what}: {m}")),
            Fail::Error(m) => note(&mut self.errors, format!("{what}: {m}")),
        }
    }
}

/// An error without the request's URL (the tenant and path are named beside it).
fn short(e: &str) -> String {
    match e.find(" for url (") {
        Some(i) => e[..i].to_owned(),
        None => e.to_owned(),
    }
}

/// A call bounded by `limit`.
pub async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(limit, call).await {
        Err(_) => Err(Fail::Error(format!(
            "no answer within {} s",
            limit.as_secs()
        ))),
        Ok(Err(e)) => match e.status() {
            Some(s) if s.is_client_error() => Err(Fail::Refused(e.to_string())),
            _ => Err(Fail::Error(e.to_string())),
        },
        Ok(Ok(v)) => Ok(v),
    }
}

/// How long a load call may take: up to the deadline, at least 5 s, at most 60 s.
fn limit(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// How long the platform may stay silent before a driver gives up on it.
const SILENCE: Duration = Duration::from_secs(15);

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Uploads and ingests each file, then follows them until they are `done` or `failed`.
pub async fn drive_batch(
    t: TenantCtx,
    files: Arc<GroupFiles>,
    started: Instant,
    deadline: Instant,
    progress: Arc<Progress>,
) -> PathRun {
    let track = progress.track("batch");
    let mut run = PathRun {
        file_hist: Some(hist()),
        ..PathRun::default()
    };
    // (index into run.files, when its ingestion was requested, last state, next record)
    let mut pending: Vec<(usize, Instant, String, u64)> = Vec::new();
    for (i, body) in files.bodies.iter().enumerate() {
        let name = format!("f{i}.csv");
        let inputs = if t.whole_file { 1 } else { files.records[i] };
        if Instant::now() > deadline {
            run.unfinished = Some(format!("the timeout passed before {name} was uploaded"));
            break;
        }
        if let Err(f) = bounded(
            limit(deadline),
            t.client.upload_file(&t.name, &name, body.clone()),
        )
        .await
        {
            run.refuse(inputs, &format!("upload of {name}"), f);
            continue;
        }
        let t0 = Instant::now();
        if let Err(f) = bounded(limit(deadline), t.client.ingest(&t.name, &name)).await {
            run.refuse(inputs, &format!("ingest of {name}"), f);
            continue;
        }
        run.offered += inputs;
        pending.push((run.files.len(), t0, "ingesting".into(), 0));
        run.files.push(FileOutcome {
            name,
            origin: files.origins[i].clone(),
            inputs,
            state: "ingesting".into(),
            error: None,
        });
    }
    let mut shown = 0u64;
    let mut finished = 0u64;
    let mut heard = Instant::now();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            let left: Vec<String> = pending
                .iter()
                .map(|(i, _, state, next)| {
                    let f = &run.files[*i];
                    format!(
                        "{} still `{state}` at record {next} of {}",
                        f.name, f.inputs
                    )
                })
                .collect();
            run.unfinished = Some(left.join(", "));
            break;
        }
        let mut still = Vec::new();
        let mut in_flight = 0u64;
        let mut last_error = None;
        for (i, t0, state, next) in pending {
            let name = run.files[i].name.clone();
            match bounded(Duration::from_secs(10), t.client.file(&t.name, &name)).await {
                Ok(f) => {
                    heard = Instant::now();
                    let s = f["state"].as_str().unwrap_or("?").to_owned();
                    if s == "done" || s == "failed" {
                        if let Some(h) = &mut run.file_hist {
                            h.saturating_record(t0.elapsed().as_micros() as u64);
                        }
                        run.files[i].error = f["error"].as_str().map(str::to_owned);
                        run.files[i].state = s;
                        finished += run.files[i].inputs;
                    } else {
                        let n = f["next_record"].as_u64().unwrap_or(next);
                        in_flight += n.min(run.files[i].inputs);
                        still.push((i, t0, s, n));
                    }
                }
                Err(e) => {
                    last_error = Some(e.to_string());
                    still.push((i, t0, state, next));
                }
            }
        }
        pending = still;
        let now = finished + in_flight;
        track.add(now.saturating_sub(shown));
        shown = shown.max(now);
        if let Some(e) = last_error
            && heard.elapsed() > SILENCE
        {
            run.unfinished = Some(format!(
                "the batch component has not answered for {} s, {} file(s) left (last: {})",
                SILENCE.as_secs(),
                pending.len(),
                short(&e)
            ));
            break;
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    run.elapsed = started.elapsed();
    run
}

/// One publish request: its schedule slot, body and messages.
struct Request {
    slot: u32,
    body: Vec<u8>,
    messages: u64,
}

/// The requests of one tenant's stream load: request k carries messages k·per .. (k+1)·per,
/// numbered by `seq`; poison messages go alone, in requests of their own at the same slot.
fn requests(s: &StreamLoad) -> Vec<Request> {
    let pad = "x".repeat(s.message_bytes.saturating_sub(40));
    let mut out = Vec::new();
    for k in 0..s.messages.div_ceil(s.per_request) {
        let mut good = Vec::new();
        let mut n = 0;
        for seq in k * s.per_request..((k + 1) * s.per_request).min(s.messages) {
            let line = match s.poison_every {
                Some(p) if (seq + 1) % p == 0 => {
                    let bad = if (seq + 1) / p % 2 == 1 {
                        format!("{{\"seq\":{seq},\"v\":\n")
                    } else {
                        format!("{{\"seq\":{seq},\"v\":\"n/a\",\"pad\":\"{pad}\"}}\n")
                    };
                    out.push(Request {
                        slot: k,
                        body: bad.into_bytes(),
                        messages: 1,
                    });
                    continue;
                }
                _ => format!("{{\"seq\":{seq},\"v\":{},\"pad\":\"{pad}\"}}\n", seq % 97),
            };
            good.extend_from_slice(line.as_bytes());
            n += 1;
        }
        if n > 0 {
            out.push(Request {
                slot: k,
                body: good,
                messages: n,
            });
        }
    }
    out
}

/// What the publishers learnt; shared so that what was confirmed before a deadline counts.
#[derive(Default)]
struct Published {
    run: PathRun,
    sent: u64,
}

async fn publish_one(
    c: &Client,
    tenant: &str,
    r: Request,
    deadline: Instant,
    tally: &Mutex<Published>,
) {
    let res = bounded(limit(deadline), c.publish(tenant, "reading", r.body)).await;
    let Ok(mut p) = tally.lock() else { return };
    p.sent += 1;
    match res {
        Ok(v) => {
            p.run.offered += v["published"].as_u64().unwrap_or(0);
            for id in v["ids"].as_array().into_iter().flatten() {
                if let Some(id) = id.as_str() {
                    p.run.ids.insert(id.to_owned());
                }
            }
        }
        Err(f) => p.run.refuse(r.messages, "publish", f),
    }
}

/// Publishes the requests: at the fixed rate (each request at its slot's time, whatever
/// happened before) or closed loop; stops scheduling at the deadline.
async fn publish_all(
    c: Client,
    tenant: String,
    s: StreamLoad,
    deadline: Instant,
    tally: Arc<Mutex<Published>>,
) {
    let reqs = requests(&s);
    if s.concurrency > 0 {
        let queue = Arc::new(Mutex::new(reqs.into_iter()));
        let mut workers = Vec::new();
        for _ in 0..s.concurrency {
            let (c, tenant, queue, tally) =
                (c.clone(), tenant.clone(), queue.clone(), tally.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    match next {
                        Some(r) if Instant::now() < deadline => {
                            publish_one(&c, &tenant, r, deadline, &tally).await;
                        }
                        _ => return,
                    }
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
        return;
    }
    let interval = Duration::from_secs_f64(f64::from(s.per_request) / f64::from(s.rate.max(1)));
    let t0 = tokio::time::Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    for r in reqs {
        let at = t0 + interval * r.slot;
        if at.into_std() > deadline {
            break;
        }
        tokio::time::sleep_until(at).await;
        let (c, tenant, tally) = (c.clone(), tenant.clone(), tally.clone());
        inflight.spawn(async move { publish_one(&c, &tenant, r, deadline, &tally).await });
    }
    while inflight.join_next().await.is_some() {}
}

/// Starts the tenant's consumers, publishes, and follows the log until every confirmed
/// message is in it (stored, duplicate or failed), then stops the consumers.
pub async fn drive_stream(
    t: TenantCtx,
    s: StreamLoad,
    started: Instant,
    deadline: Instant,
    progress: Arc<Progress>,
) -> PathRun {
    let track = progress.track("stream");
    if let Err(f) = bounded(limit(deadline), t.client.stream_start(&t.name, s.consumers)).await {
        let mut run = PathRun::default();
        note(&mut run.errors, format!("stream/start: {f}"));
        run.unfinished = Some("its consumers did not start".into());
        run.elapsed = started.elapsed();
        return run;
    }
    let requests = u64::from(s.messages.div_ceil(s.per_request));
    let tally = Arc::new(Mutex::new(Published::default()));
    let mut sender = tokio::spawn(publish_all(
        t.client.clone(),
        t.name.clone(),
        s.clone(),
        deadline,
        tally.clone(),
    ));
    let mut sending = true;
    let mut shown = 0u64;
    let mut last_report: Option<Instant> = None;
    let mut heard = Instant::now();
    let mut logged = 0u64;
    let mut unfinished = None;
    let mut errors = Vec::new();
    loop {
        if sending {
            tokio::select! {
                _ = &mut sender => sending = false,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let offered = tally.lock().map_or(0, |p| p.run.offered);
        if Instant::now() > deadline {
            let sent = tally.lock().map_or(0, |p| p.sent);
            let mut why = format!(
                "{logged} of {offered} confirmed messages in the log when the timeout passed"
            );
            if sending {
                why.push_str(&format!("; {sent} of {requests} publish requests answered"));
            }
            unfinished = Some(why);
            break;
        }
        // Progress from the consumers' live counters (cheap, may not answer while a
        // consumer is stuck); the end from the log, which is the record.
        let mut live = 0u64;
        if let Ok(st) = bounded(Duration::from_secs(2), t.client.stream_status(&t.name)).await {
            let n = &st["since_start"];
            live = ["stored", "duplicates", "failed"]
                .iter()
                .map(|k| n[k].as_u64().unwrap_or(0))
                .sum();
        }
        let now = live.max(logged).min(offered);
        track.add(now.saturating_sub(shown));
        shown = shown.max(now);
        let due = last_report.is_none_or(|at| at.elapsed() > Duration::from_secs(5));
        if sending || (live < offered && !due) {
            continue;
        }
        last_report = Some(Instant::now());
        match bounded(Duration::from_secs(10), t.client.stream_report(&t.name)).await {
            Ok(r) => {
                heard = Instant::now();
                logged = r["periods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        ["messages", "duplicates", "failures"]
                            .iter()
                            .map(|k| p[k].as_u64().unwrap_or(0))
                            .sum::<u64>()
                    })
                    .sum();
                if logged >= offered {
                    break;
                }
            }
            Err(e) if heard.elapsed() > SILENCE => {
                unfinished = Some(format!(
                    "the log has not answered for {} s (last: {})",
                    SILENCE.as_secs(),
                    short(&e.to_string())
                ));
                break;
            }
            Err(_) => {}
        }
    }
    let elapsed = started.elapsed();
    track.add(logged.saturating_sub(shown));
    // Publishers stop scheduling at the deadline and each call is bounded: give the last
    // ones their time, then give up on them.
    if sending
        && tokio::time::timeout(Duration::from_secs(65), &mut sender)
            .await
            .is_err()
    {
        sender.abort();
    }
    if let Err(f) = bounded(Duration::from_secs(15), t.client.stream_stop(&t.name)).await {
        note(
            &mut errors,
            format!("stream/stop: {}", short(&f.to_string())),
        );
    }
    let mut run = tally
        .lock()
        .map(|mut p| std::mem::take(&mut p.run))
        .unwrap_or_default();
    for e in errors {
        note(&mut run.errors, e);
    }
    run.unfinished = unfinished;
    run.elapsed = elapsed;
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(messages: u32, per: u32, poison: Option<u32>) -> StreamLoad {
        StreamLoad {
            messages,
            rate: 10,
            concurrency: 0,
            per_request: per,
            consumers: 1,
            message_bytes: 60,
            poison_every: poison,
        }
    }

    #[test]
    fn requests_carry_every_message_once_and_poison_goes_alone() {
        let rs = requests(&load(25, 10, None));
        assert_eq!(
            rs.iter().map(|r| r.messages).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        let rs = requests(&load(20, 10, Some(4)));
        assert_eq!(rs.iter().map(|r| r.messages).sum::<u64>(), 20);
        let poison: Vec<&Request> = rs.iter().filter(|r| r.messages == 1).collect();
        assert_eq!(poison.len(), 5, "messages 3, 7, 11, 15, 19");
        let invalid = poison
            .iter()
            .filter(|r| serde_json::from_slice::<serde_json::Value>(&r.body).is_err())
            .count();
        assert_eq!(invalid, 3, "alternately invalid JSON and a reading of n/a");
        for r in rs.iter().filter(|r| r.messages > 1) {
            for line in r.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line).expect("good JSON");
                assert!(v["v"].is_number(), "{v}");
            }
        }
    }

    #[test]
    fn files_know_their_origin_and_rows() {
        let f = GroupFiles::new(vec![b"a,b\n1,2\n3\n".to_vec()]);
        assert_eq!(f.records, [2], "a short row is still a row offered");
        assert_eq!(f.origins[0].len(), 16);
    }
}
