//! Phase 3: a tenant whose consumers may range, offered a low, a high and a low rate,
//! sampled every second at the broker, beside the elastic controller's decisions.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mysimbdp::api::ScalingDecision;
use mysimbdp::client::Client;
use mysimbdp::processes::Manager;
use serde::Serialize;

use crate::schema::ElasticLoad;

use super::{Run, entry_times, manager_name, messages, note, retry, stream_status};

/// Publish requests in flight at most in the load step: past it the schedule slips, and the
/// samples show the rate the platform took.
const STEP_IN_FLIGHT: usize = 32;

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
pub(super) async fn run(
    run: &mut Run,
    load: &ElasticLoad,
    managers: usize,
) -> Result<ElasticFigures> {
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
            .is_ok_and(|s| s.is_ok_and(|s| s.logged.total() >= published))
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
    // Where the consumers stood when the load rose (the last look before the first step
    // up), not at the first look, which may still see a manager's consumer starting.
    let first_rate = samples.first().map_or(0, |s| s.offered_per_s);
    let rise_at = samples
        .iter()
        .find(|s| s.offered_per_s > first_rate)
        .map(|s| s.t_s);
    let start = rise_at
        .and_then(|t| seen.iter().rev().find(|w| w.0 < t))
        .or(seen.first())
        .map_or(0, |w| w.1);
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

/// Each sample's row, with the decisions made since the sample before it.
pub(super) fn timeline<'a>(
    samples: &[Sample],
    decisions: &'a [Decision],
) -> Vec<Vec<&'a Decision>> {
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
                queue_depth: Some(5000),
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
    fn the_start_is_where_the_consumers_stood_when_the_load_rose() {
        // The first look sees 2 of 3 managers' consumers; the load rises at 3 s.
        let mut samples = [
            sample(1.0, 0, 2),
            sample(2.0, 0, 3),
            sample(3.0, 500, 3),
            sample(4.0, 900, 6),
            sample(5.0, 0, 3),
        ];
        for s in &mut samples[2..4] {
            s.offered_per_s = 2000;
        }
        let s = summarize(&samples);
        assert_eq!((s.scaled_up_at_s, s.back_down_at_s), (Some(4.0), Some(5.0)));
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
}
