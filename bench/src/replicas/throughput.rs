//! Phase 1: the same closed-loop stream load with 1, 2, … stream managers, each time on a
//! fresh tenant; messages/s from the first publish to the log's last entry.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mysimbdp::processes::Manager;
use serde::Serialize;

use crate::host;
use crate::schema::ThroughputLoad;

use super::{Run, last_entry_at, messages, note, retry, stream_status};

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
            seen = s.logged.total();
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

/// 1, 2, … `managers` stream managers, one more started before each step.
pub(super) async fn run(
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
