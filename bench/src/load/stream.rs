//! The stream load: publish at a fixed rate (open loop) or with a fixed number of
//! publishers (closed loop), then follow the tenant's log until every confirmed message is
//! in it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysimbdp::client::Client;

use super::{PathRun, SILENCE, TenantCtx, bounded, limit, note, short};
use crate::progress::Progress;
use crate::schema::StreamLoad;

/// One publish request: its schedule slot, body and messages.
struct Request {
    slot: u32,
    body: Vec<u8>,
    messages: u64,
}

/// The requests of one tenant's stream load: request k carries messages k·per .. (k+1)·per,
/// numbered by `seq`; poison messages go alone, in requests of their own at the same slot.
/// Made as they are sent, not held (scale's 10,000 requests per tenant were 30 MiB).
fn requests(s: &StreamLoad) -> impl Iterator<Item = Request> + Send + 'static {
    let pad = "x".repeat(s.message_bytes.saturating_sub(40));
    let (messages, per, poison) = (s.messages, s.per_request, s.poison_every);
    (0..messages.div_ceil(per)).flat_map(move |k| {
        let mut out = Vec::new();
        let mut good = Vec::with_capacity(per as usize * (pad.len() + 40));
        let mut n = 0;
        for seq in k * per..((k + 1) * per).min(messages) {
            let line = match poison {
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
        out
    })
}

/// The stream load's messages as its publish requests carry them: (schedule slot, the
/// request's messages), for a baseline that publishes the same messages on the same
/// schedule.
pub fn schedule(s: &StreamLoad) -> Vec<(u32, Vec<Vec<u8>>)> {
    requests(s)
        .map(|r| {
            let messages = r
                .body
                .split(|b| *b == b'\n')
                .filter(|m| !m.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            (r.slot, messages)
        })
        .collect()
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
            p.run.offered += v.published;
            p.run.ids.extend(v.ids);
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
        let queue = Arc::new(Mutex::new(reqs));
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
    let consumers_started_ms = mysimbdp::model::now_us() / 1000;
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
    let mut last_look: Option<Instant> = None;
    let mut pause = Duration::from_secs(1);
    let mut heard = Instant::now();
    let mut logged = 0u64;
    let mut unfinished = None;
    let mut errors = Vec::new();
    loop {
        if sending {
            tokio::select! {
                _ = &mut sender => {
                    sending = false;
                    // The last messages are still being written: the first ask waits a
                    // second, not to stall them (the path's end is the log's own time).
                    last_look = Some(Instant::now());
                }
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let offered = tally.lock().map_or(0, |p| p.run.offered);
        if Instant::now() > deadline {
            let sent = tally.lock().map_or(0, |p| p.sent);
            if sending {
                // Not asked while sending: ask once, for the figure below.
                if let Ok(st) =
                    bounded(Duration::from_secs(10), t.client.stream_status(&t.name)).await
                {
                    logged = st.logged.total();
                }
            }
            let mut why = format!(
                "{logged} of {offered} confirmed messages in the log when the timeout passed"
            );
            if sending {
                why.push_str(&format!("; {sent} of {requests} publish requests answered"));
            }
            unfinished = Some(why);
            break;
        }
        // The log counts cost the database a pass over the tenant's entries (seconds for
        // tens of thousands on SecantusDB), and asking for them while the load is offered
        // stalled the very writes being measured (series.svg showed a p99 spike every 5 s):
        // while sending, progress is the messages confirmed; once all are sent, the log is
        // asked again a second after the last answer, or four times as long as that answer
        // took, whichever is longer: a count that takes the database seconds (the log grows
        // with the run) would otherwise keep it busy while the backlog drains. The path's
        // end is the log's own time, so asking less often does not lengthen it.
        if sending {
            track.add(offered.saturating_sub(shown));
            shown = shown.max(offered);
            heard = Instant::now();
            continue;
        }
        if last_look.is_some_and(|at| at.elapsed() < pause) {
            continue;
        }
        let asked = Instant::now();
        let answer = bounded(Duration::from_secs(10), t.client.stream_status(&t.name)).await;
        pause = Duration::from_secs(1).max(asked.elapsed() * 4);
        last_look = Some(Instant::now());
        match answer {
            Ok(st) => {
                heard = Instant::now();
                logged = st.logged.total();
                let now = logged.min(offered);
                track.add(now.saturating_sub(shown));
                shown = shown.max(now);
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
    run.started_ms = Some(consumers_started_ms);
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(messages: u32, per: u32, poison: Option<u32>) -> StreamLoad {
        StreamLoad {
            messages,
            rate: 10,
            rate_of_closed_loop: None,
            concurrency: 0,
            per_request: per,
            consumers: 1,
            message_bytes: 60,
            poison_every: poison,
        }
    }

    #[test]
    fn requests_carry_every_message_once_and_poison_goes_alone() {
        let rs: Vec<Request> = requests(&load(25, 10, None)).collect();
        assert_eq!(
            rs.iter().map(|r| r.messages).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        let rs: Vec<Request> = requests(&load(20, 10, Some(4))).collect();
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
}
