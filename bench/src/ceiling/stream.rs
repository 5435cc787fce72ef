//! The raw stream pipeline: the stream load's messages through RabbitMQ and the MongoDB
//! driver alone, at the same offered rate (or closed loop) in the same run, for the report
//! to set the platform's stream path against. Publish with confirms → consume with the
//! same prefetch → `insert_many` of the documents the workbench's map app makes and of the
//! log entries coredms writes for them (encoded by coredms' own functions) → one
//! multiple-ack per batch. No app sandbox, no HTTP, no accounting, no pipelining.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use mongodb::bson::{Document, RawDocumentBuf};
use mongodb::options::WriteConcern;
use mysimbdp::coredms::{log_entries, prepare};
use mysimbdp::logs::{Source, Status};
use mysimbdp::model::{BulkWrite, DocWrite, InputRef, doc_id, now_us};
use mysimbdp::tenants::TenantName;

use crate::accounting::{Series, hist};
use crate::report::{Latency, StreamCeiling};
use crate::schema::StreamLoad;

/// Where the servers are and how the platform was set up for the run.
pub struct RawStream<'a> {
    pub amqp_uri: &'a str,
    pub mongodb_uri: &'a str,
    /// The run's namespace: the queue and database are named under it and removed after.
    pub ns: &'a str,
    pub load: &'a StreamLoad,
    /// The load's messages: (schedule slot, one publish request's messages).
    pub schedule: Vec<(u32, Vec<Vec<u8>>)>,
    pub batch_size: usize,
    pub prefetch: u16,
    pub write_concern: WriteConcern,
    pub timeout: Duration,
}

const PUBLISHED_US: &str = "x-published-us";

/// What the consumers measured, shared between them.
struct Measured {
    latency: Histogram<u64>,
    uncorrected: Histogram<u64>,
    series: Series,
    last_stored: Option<Instant>,
}

/// Runs the raw pipeline over the load's messages and measures it as the report measures
/// the platform: messages stored per second, publish → stored latency (corrected for
/// coordinated omission at the offered rate), per second over the run.
pub async fn raw_stream(r: RawStream<'_>) -> Result<StreamCeiling> {
    let queue = format!("{}raw.stream", r.ns);
    let db = mongodb::Client::with_uri_str(r.mongodb_uri)
        .await?
        .database(&format!("{}rawstream", r.ns));
    // The same index as the platform's log collection: both sides pay for it.
    db.collection::<Document>("logs")
        .create_index(
            mongodb::IndexModel::builder()
                .keys(mongodb::bson::doc! {"tenant": 1, "timestamp": 1})
                .build(),
        )
        .await?;
    let conn = Connection::connect(r.amqp_uri, ConnectionProperties::default())
        .await
        .context("the raw stream pipeline cannot reach RabbitMQ")?;
    let setup = conn.create_channel().await?;
    setup
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let measured = Arc::new(Mutex::new(Measured {
        latency: hist(),
        uncorrected: hist(),
        series: Series::default(),
        last_stored: None,
    }));
    let stored = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let interval_us = (r.load.rate > 0).then(|| (1_000_000 / u64::from(r.load.rate)).max(1));
    let tenant = TenantName::parse("raw").context("a tenant name")?;
    let mut consumers = Vec::new();
    for _ in 0..r.load.consumers.max(1) {
        let ch = conn.create_channel().await?;
        ch.basic_qos(r.prefetch, BasicQosOptions::default()).await?;
        let sink = Sink {
            data: db.collection::<RawDocumentBuf>("messages"),
            logs: db.collection::<Document>("logs"),
            write_concern: r.write_concern.clone(),
            tenant: tenant.clone(),
            interval_us,
        };
        let (queue, batch_size) = (queue.clone(), r.batch_size);
        let (measured, stored, done) = (measured.clone(), stored.clone(), done.clone());
        consumers.push(tokio::spawn(async move {
            consume(ch, &queue, batch_size, &sink, &measured, &stored, &done).await
        }));
    }
    let started = Instant::now();
    let deadline = started + r.timeout;
    // Publish and wait for every confirmed message to be stored, or for a consumer to fail,
    // or for the timeout; a broker that stops confirming does not hold the run past it.
    let outcome = async {
        let published = tokio::time::timeout(
            r.timeout + Duration::from_secs(30),
            publish(&conn, &queue, r.load, r.schedule, deadline),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the raw publishes were not confirmed in time"))??;
        while stored.load(Ordering::Relaxed) < published
            && Instant::now() < deadline
            && !consumers.iter().any(tokio::task::JoinHandle::is_finished)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, anyhow::Error>(published)
    }
    .await;
    done.store(true, Ordering::Relaxed);
    let mut failed = None;
    for c in consumers {
        let e = match tokio::time::timeout(Duration::from_secs(30), c).await {
            Ok(Ok(Ok(()))) => continue,
            Ok(Ok(Err(e))) => e,
            Ok(Err(e)) => anyhow::anyhow!("a raw consumer failed: {e}"),
            Err(_) => anyhow::anyhow!("a raw consumer did not stop"),
        };
        failed.get_or_insert(e);
    }
    // Whatever happened, the queue and the database go.
    let _ = setup
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "raw stream pipeline done".into()).await;
    let _ = db.drop().await;
    let published = outcome?;
    if let Some(e) = failed {
        return Err(e.context("the raw stream pipeline"));
    }
    let n = stored.load(Ordering::Relaxed);
    let m = measured
        .lock()
        .map_err(|_| anyhow::anyhow!("a raw consumer panicked"))?;
    // From the first publish to the last message stored, as the platform's stream path is
    // timed from its consumers' start to its last log entry.
    let elapsed = m.last_stored.unwrap_or_else(Instant::now) - started;
    if n < published {
        anyhow::bail!(
            "the raw stream pipeline stored {n} of {published} messages within {} s",
            r.timeout.as_secs()
        );
    }
    Ok(StreamCeiling {
        messages: n,
        elapsed_s: elapsed.as_secs_f64(),
        throughput_per_s: n as f64 / elapsed.as_secs_f64().max(1e-9),
        latency: Latency::of(&m.latency),
        uncorrected: Latency::of(&m.uncorrected),
        series: m.series.points(),
        note: format!(
            "raw pipeline: lapin publish with confirms ({} per request) → {} consumer(s), prefetch {} → insert_many of the map app's documents and coredms' log entries for them (coredms::prepare, coredms::log_entries), same write concern → one multiple-ack per batch of up to {} messages",
            r.load.per_request,
            r.load.consumers.max(1),
            r.prefetch,
            r.batch_size
        ),
    })
}

/// Publishes every request's messages, each request awaited for its confirms: at the
/// schedule's times (open loop) or by `concurrency` publishers (closed loop). Returns the
/// messages confirmed.
async fn publish(
    conn: &Connection,
    queue: &str,
    load: &StreamLoad,
    schedule: Vec<(u32, Vec<Vec<u8>>)>,
    deadline: Instant,
) -> Result<u64> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let confirmed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    if load.concurrency > 0 {
        let work = Arc::new(Mutex::new(schedule.into_iter()));
        for _ in 0..load.concurrency {
            let (ch, queue, work) = (ch.clone(), queue.to_owned(), work.clone());
            let confirmed = confirmed.clone();
            tasks.spawn(async move {
                loop {
                    let next = work.lock().ok().and_then(|mut w| w.next());
                    let Some((_, messages)) = next.filter(|_| Instant::now() < deadline) else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    let n = publish_request(&ch, &queue, &messages).await?;
                    confirmed.fetch_add(n, Ordering::Relaxed);
                }
            });
        }
    } else {
        let per_request = f64::from(load.per_request);
        let interval = Duration::from_secs_f64(per_request / f64::from(load.rate.max(1)));
        let t0 = tokio::time::Instant::now();
        for (slot, messages) in schedule {
            let at = t0 + interval * slot;
            if at.into_std() > deadline {
                break;
            }
            tokio::time::sleep_until(at).await;
            let (ch, queue) = (ch.clone(), queue.to_owned());
            let confirmed = confirmed.clone();
            tasks.spawn(async move {
                let n = publish_request(&ch, &queue, &messages).await?;
                confirmed.fetch_add(n, Ordering::Relaxed);
                Ok(())
            });
        }
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    Ok(confirmed.load(Ordering::Relaxed))
}

/// One request: its messages published persistent, with an id and the publish time as the
/// platform's broker stamps them, then every confirm awaited.
async fn publish_request(ch: &Channel, queue: &str, messages: &[Vec<u8>]) -> Result<u64> {
    let mut confirms = Vec::with_capacity(messages.len());
    for m in messages {
        // Ids as the platform's broker gives them (random, 128 bits): sequential ones would
        // insert at the end of every index, cheaper than the platform's writes.
        let id = mysimbdp::stream::broker::new_message_id();
        let mut headers = FieldTable::default();
        headers.insert(PUBLISHED_US.into(), AMQPValue::LongLongInt(now_us()));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_headers(headers);
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                m,
                props,
            )
            .await?,
        );
    }
    for c in confirms {
        match c.await? {
            Confirmation::Ack(_) | Confirmation::NotRequested => {}
            Confirmation::Nack(_) => anyhow::bail!("RabbitMQ refused a raw message"),
        }
    }
    Ok(messages.len() as u64)
}

/// Where a raw consumer writes, and how it measures.
struct Sink {
    data: mongodb::Collection<RawDocumentBuf>,
    logs: mongodb::Collection<Document>,
    write_concern: WriteConcern,
    tenant: TenantName,
    interval_us: Option<u64>,
}

/// Consumes until `done`: each batch is what is waiting (at least one message, at most
/// `batch_size`), written, then acknowledged with one multiple-ack.
async fn consume(
    ch: Channel,
    queue: &str,
    batch_size: usize,
    sink: &Sink,
    measured: &Mutex<Measured>,
    stored: &AtomicU64,
    done: &AtomicBool,
) -> Result<()> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    while !done.load(Ordering::Relaxed) {
        let Ok(first) = tokio::time::timeout(Duration::from_millis(50), consumer.next()).await
        else {
            continue;
        };
        let Some(first) = first else { break };
        let mut batch = vec![first?];
        while batch.len() < batch_size {
            match consumer.next().now_or_never() {
                Some(Some(d)) => batch.push(d?),
                _ => break,
            }
        }
        let Some(last) = batch.last() else { continue };
        let w = bulk(&sink.tenant, &batch);
        write(sink, &w, measured).await?;
        last.acker
            .ack(BasicAckOptions {
                multiple: batch.len() > 1,
            })
            .await?;
        stored.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

/// The batch as the platform's bulk write: the map app's document for each message (its
/// fields, `value` from `v` when it is a number, `tenant`), under the platform's ids.
fn bulk(tenant: &TenantName, batch: &[lapin::message::Delivery]) -> BulkWrite {
    let docs = batch
        .iter()
        .map(|d| {
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default();
            let published = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().iter().find(|(k, _)| k.as_str() == PUBLISHED_US))
                .and_then(|(_, v)| match v {
                    AMQPValue::LongLongInt(us) => Some(*us),
                    _ => None,
                })
                .unwrap_or_else(now_us);
            let mut doc: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&d.data).unwrap_or_default();
            if let Some(v) = doc.get("v").filter(|v| v.is_number()).cloned() {
                doc.insert("value".into(), v);
            }
            doc.insert("tenant".into(), tenant.as_str().into());
            DocWrite {
                id: doc_id(&id, 0, 0),
                collection: "messages".into(),
                doc,
                input: InputRef::Message { id },
                bytes: d.data.len() as u64,
                started_us: published,
                data_name: Some("reading".into()),
                encoded: None,
            }
        })
        .collect();
    BulkWrite {
        tenant: tenant.clone(),
        source: Source::Stream,
        data_name: "reading".into(),
        app_version: Some(1),
        docs,
        unstored: Vec::new(),
        origin: None,
        replay: false,
    }
}

/// The documents, then their log entries, each one unordered `insert_many`; the latencies
/// (publish → documents stored, as the platform's log measures them) are recorded once
/// both are written.
async fn write(sink: &Sink, w: &BulkWrite, measured: &Mutex<Measured>) -> Result<()> {
    let prepared = prepare(w);
    anyhow::ensure!(
        prepared.invalid.is_empty(),
        "a raw document cannot be encoded: {:?}",
        prepared.invalid.first()
    );
    for (_, _, docs) in prepared.collections {
        sink.data
            .insert_many(docs)
            .ordered(false)
            .write_concern(sink.write_concern.clone())
            .await?;
    }
    // Publish → documents stored, as coredms measures each entry's `latency_us`.
    let stored_us = now_us();
    let stored_at = Instant::now();
    let n = w.docs.len();
    let entries = log_entries(w, &vec![Status::Success; n], &vec![None; n]);
    sink.logs
        .insert_many(entries)
        .ordered(false)
        .write_concern(sink.write_concern.clone())
        .await?;
    let mut m = measured
        .lock()
        .map_err(|_| anyhow::anyhow!("a raw consumer panicked"))?;
    m.last_stored = Some(m.last_stored.map_or(stored_at, |t| t.max(stored_at)));
    for d in &w.docs {
        let us = u64::try_from(stored_us - d.started_us).unwrap_or(0).max(1);
        m.series.record(stored_us / 1000, us);
        m.uncorrected.saturating_record(us);
        match sink.interval_us {
            Some(i) => {
                let _ = m.latency.record_correct(us, i);
            }
            None => m.latency.saturating_record(us),
        }
    }
    Ok(())
}
