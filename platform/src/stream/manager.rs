//! The stream ingest manager: consumers per tenant that collect messages into batches, run
//! the tenant's stream app, write each batch in bulk through coredms, dead-letter poison
//! messages, and only then acknowledge.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::broker::{self, Broker, BrokerError, HEADER_DATA_NAME, HEADER_PUBLISHED_US, Topology};
use super::connections::ConsumerConnections;
use super::control::{Control, Seen};
use crate::api::{ConsumerTarget, ScalingDecision, StreamCounts};
use crate::config::{AmqpSettings, StreamSettings};
use crate::coredms::{CoreDms, CoreError};
use crate::events::{ConsumersChanged, DeadLettered, Ingested};
use crate::logs::Source;
use crate::metrics::Metrics;
use crate::model::{AppKind, BulkWrite, InputRef, now_us};
use crate::pipeline::{AppCache, AppError, Input, transform, write_with_retry};
use crate::tenants::TenantName;

/// Why a consumer session ended (it reconnects after a backoff): the broker, or coredms
/// not answering or not storing a batch (its messages stay unacknowledged, for redelivery).
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// coredms could not give the tenant's profile or active app now.
    #[error("message broker unavailable: coredms: {0}")]
    Coredms(#[source] CoreError),
    /// coredms did not store a batch.
    #[error("message broker unavailable: not stored: {0}")]
    NotStored(#[source] CoreError),
    /// The task running the app over a batch panicked or was cancelled.
    #[error("the app's task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl From<lapin::Error> for ConsumerError {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(e.into())
    }
}

struct Consumer {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

pub struct StreamManager {
    ctx: Arc<Ctx>,
    consumers: Mutex<HashMap<TenantName, Vec<Consumer>>>,
    /// The elastic controller of each tenant whose target is a range.
    control: std::sync::Mutex<HashMap<TenantName, Control>>,
    /// This manager, as its decisions name it: host (the pod, under Kubernetes) and process.
    replica: String,
    /// Held by a start or stop and by a look while it changes consumers, never across a
    /// wait for a consumer or the broker.
    turn: Mutex<()>,
    /// Bumped by each start or stop: a look that read the targets before one is dropped, so
    /// it never undoes it.
    epoch: std::sync::atomic::AtomicU64,
    /// Tasks waiting for cancelled consumers to finish their batch.
    stopping: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The log's latest counts per tenant and `since`, one reader at a time per key.
    counts: std::sync::Mutex<HashMap<(TenantName, Option<i64>), CountSlot>>,
    shutdown: CancellationToken,
}

struct Ctx {
    /// The few connections every consumer of this process has its channels on.
    connections: ConsumerConnections,
    settings: StreamSettings,
    namespace: String,
    coredms: CoreDms,
    apps: Arc<AppCache>,
    metrics: Arc<Metrics>,
    /// Messages whose batch failed before it was acknowledged, by `<tenant>/<message id>`:
    /// how often, and the last error. Such a message is retried alone, and dead-lettered
    /// after `max_deliveries`, so one message can never make its queue loop forever.
    attempts: std::sync::Mutex<HashMap<TenantName, HashMap<String, Attempt>>>,
    /// Per tenant, the highest publish-to-stored latency (ms) of a batch since the elastic
    /// controller last looked.
    latency: std::sync::Mutex<HashMap<TenantName, u64>>,
}

#[derive(Clone)]
struct Attempt {
    failures: u32,
    last_error: String,
}

/// Most messages of one tenant whose failed attempts are remembered; past it that tenant's
/// memory is dropped (and counting starts again), so it cannot grow without bound and one
/// tenant cannot reset another's counts.
const MAX_REMEMBERED_ATTEMPTS: usize = 10_000;

/// How long the log's counts of a tenant are answered again without asking the log.
const COUNTS_FRESH: Duration = Duration::from_millis(250);
/// Most (tenant, since) counts kept; past it they are all forgotten.
const COUNTS_KEPT: usize = 10_000;

/// Counts and when the log gave them.
type Counted = (tokio::time::Instant, StreamCounts);
/// One key's counts, locked while the log is asked.
type CountSlot = Arc<Mutex<Option<Counted>>>;

/// How long a stopped consumer may take to finish its batch before it is aborted (its
/// unacknowledged messages then go back to the queue).
const CONSUMER_STOP: Duration = Duration::from_secs(30);

/// Waits for cancelled consumers to finish their batch, all at once, each at most
/// [`CONSUMER_STOP`].
async fn wait_stopped(stopping: Vec<Consumer>) {
    futures::future::join_all(
        stopping
            .into_iter()
            .map(|c| stop_within(c.task, CONSUMER_STOP)),
    )
    .await;
}

async fn stop_within(mut task: tokio::task::JoinHandle<()>, limit: Duration) {
    if tokio::time::timeout(limit, &mut task).await.is_err() {
        tracing::warn!(
            after_s = limit.as_secs(),
            "a stream consumer did not stop in time; aborting it"
        );
        task.abort();
    }
}

impl StreamManager {
    #[expect(
        clippy::too_many_arguments,
        reason = "wiring of one component, called once"
    )]
    pub fn new(
        uri: &str,
        amqp: &AmqpSettings,
        settings: &StreamSettings,
        namespace: &str,
        coredms: CoreDms,
        apps: Arc<AppCache>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            ctx: Arc::new(Ctx {
                connections: ConsumerConnections::new(uri, amqp, namespace),
                settings: settings.clone(),
                namespace: namespace.to_owned(),
                coredms,
                apps,
                metrics,
                attempts: std::sync::Mutex::new(HashMap::new()),
                latency: std::sync::Mutex::new(HashMap::new()),
            }),
            consumers: Mutex::new(HashMap::new()),
            control: std::sync::Mutex::new(HashMap::new()),
            replica: replica_name(),
            turn: Mutex::new(()),
            epoch: std::sync::atomic::AtomicU64::new(0),
            stopping: std::sync::Mutex::new(Vec::new()),
            counts: std::sync::Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Starts consumers up to `n`, or takes those past `n` out and cancels them at once
    /// (before any wait, so that a caller that is dropped cannot leave one running unseen):
    /// they finish their batch, and the caller waits for them ([`wait_stopped`]) or hands
    /// them over ([`Self::stop_later`]). The consumers now running.
    async fn resize(&self, tenant: &TenantName, n: u32) -> (u32, Vec<Consumer>) {
        let n = n.min(self.ctx.settings.max_consumers) as usize;
        let mut all = self.consumers.lock().await;
        let list = all.entry(tenant.clone()).or_default();
        list.retain(|c| !c.task.is_finished());
        let stopping = list.split_off(n.min(list.len()));
        for c in &stopping {
            c.cancel.cancel();
        }
        while list.len() < n {
            let cancel = self.shutdown.child_token();
            let ctx = self.ctx.clone();
            let t = tenant.clone();
            let c = cancel.clone();
            let task = tokio::spawn(async move { consume_forever(ctx, t, c).await });
            list.push(Consumer { cancel, task });
        }
        let running = list.len() as u32;
        if running == 0 {
            all.remove(tenant);
        }
        (running, stopping)
    }

    /// Cancelled consumers finishing their batch in a task of their own, which
    /// [`Self::stop_all`] waits for too.
    fn stop_later(&self, stopping: Vec<Consumer>) {
        if stopping.is_empty() {
            return;
        }
        let mut tasks = lock(&self.stopping);
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(wait_stopped(stopping)));
    }

    /// A change of a tenant's consumers here, said: a tracing line and the metrics now, and
    /// the decision for the stream report (written by the caller, outside the turn).
    fn said(
        &self,
        tenant: &TenantName,
        from: u32,
        to: u32,
        seen: Option<Seen>,
        by_controller: bool,
        reason: &str,
    ) -> Option<ScalingDecision> {
        if from == to {
            return None;
        }
        let queue_depth = seen.and_then(|s| s.depth);
        ConsumersChanged {
            tenant: tenant.as_str(),
            from,
            to,
            queue_depth,
            by_controller,
            reason,
        }
        .emit(&self.ctx.metrics);
        Some(ScalingDecision {
            at: mongodb::bson::DateTime::now()
                .try_to_rfc3339_string()
                .unwrap_or_default(),
            replica: self.replica.clone(),
            from,
            to,
            queue_depth,
            max_latency_ms: seen.map_or(0, |s| s.max_latency_ms),
            reason: reason.to_owned(),
        })
    }

    /// Keeps a decision for the tenant's stream report; a failure is only logged.
    async fn record(&self, tenant: &TenantName, decision: Option<ScalingDecision>) {
        let Some(d) = decision else {
            return;
        };
        if let Err(e) = self.ctx.coredms.record_scaling(tenant, d).await {
            tracing::warn!(tenant = %tenant, error = %e, "could not record a change of consumers");
        }
    }

    /// Stores the tenant's target (or removes it, `None`) and brings its consumers here
    /// within it; every other manager follows at its next look. Waits for consumers that
    /// stop to finish their batch. The consumers now running here.
    async fn set_target(
        &self,
        tenant: &TenantName,
        target: Option<ConsumerTarget>,
    ) -> Result<u32, CoreError> {
        let (running, stopping, decision) = {
            let _turn = self.turn.lock().await;
            self.ctx.coredms.set_stream_target(tenant, target).await?;
            // A look that read the targets before this does not apply them.
            self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let from = self.running(tenant).await;
            let (to, reason) = match target {
                Some(t) => (
                    from.clamp(t.min, t.max),
                    format!("stream/start: target {}..{}", t.min, t.max),
                ),
                None => (0, "stream/stop".to_owned()),
            };
            let (running, stopping) = self.resize(tenant, to).await;
            let decision = self.said(tenant, from, running, None, false, &reason);
            (running, stopping, decision)
        };
        self.record(tenant, decision).await;
        wait_stopped(stopping).await;
        Ok(running)
    }

    /// `stream/start` on this manager: `target` stored and applied here now.
    pub async fn start(
        &self,
        tenant: &TenantName,
        target: ConsumerTarget,
    ) -> Result<u32, CoreError> {
        self.set_target(tenant, Some(target)).await
    }

    /// `stream/stop` on this manager: the target removed and the consumers here stopped,
    /// each finishing its batch.
    pub async fn stop(&self, tenant: &TenantName) -> Result<u32, CoreError> {
        self.set_target(tenant, None).await
    }

    /// Follows the tenants' targets until shutdown: every `stream.reconcile_ms`, the targets
    /// from coredms and the queue depths of tenants whose target is a range (read outside
    /// the turn, bounded in time), then each tenant's consumers here brought within its
    /// target by the elastic controller. A look that a start or stop overtook is dropped;
    /// when coredms does not answer, the consumers stay as they are.
    pub async fn reconcile_forever(self: Arc<Self>, broker: Arc<Broker>) {
        use std::sync::atomic::Ordering::SeqCst;
        let every = Duration::from_millis(self.ctx.settings.reconcile_ms.max(1));
        let depth_limit = every.max(Duration::from_secs(2));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        // With expiring queues, the topologies of the tenants with a target are declared
        // again about every quarter of the expiry (see `Broker::keep_dead_letter_queues`),
        // from the last targets read: a database out of reach does not stop it.
        let keep_every = broker.queue_expiry().map(|e| e / 4);
        let mut kept: Option<(tokio::time::Instant, tokio::task::JoinHandle<()>)> = None;
        let mut known: Vec<TenantName> = Vec::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => {
                    if let Some((_, task)) = kept.take() {
                        task.abort();
                    }
                    return;
                }
            }
            // A task of its own, one at a time, given the period at most: a thousand tenants'
            // declares take a while, and the loop does not wait for them.
            if let Some(every) = keep_every
                && !known.is_empty()
                && kept
                    .as_ref()
                    .is_none_or(|(at, task)| at.elapsed() >= every && task.is_finished())
            {
                let tenants = known.clone();
                let broker = broker.clone();
                let task = tokio::spawn(async move {
                    let keep = broker.keep_dead_letter_queues(&tenants);
                    match tokio::time::timeout(every, keep).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "tenant queues not declared again")
                        }
                        Err(_) => tracing::warn!("tenant queues not all declared again in time"),
                    }
                });
                kept = Some((tokio::time::Instant::now(), task));
            }
            let epoch = self.epoch.load(SeqCst);
            let targets: HashMap<TenantName, ConsumerTarget> = match self
                .ctx
                .coredms
                .stream_targets()
                .await
            {
                Ok(t) => {
                    warned = false;
                    t.into_iter().collect()
                }
                Err(e) => {
                    if !warned {
                        warned = true;
                        tracing::warn!(error = %e, "cannot read the tenants' consumer targets; consumers stay as they are");
                    }
                    continue;
                }
            };
            if keep_every.is_some() {
                known = targets.keys().cloned().collect();
            }
            let elastic: Vec<TenantName> = targets
                .iter()
                .filter(|(_, g)| g.max > g.min)
                .map(|(t, _)| t.clone())
                .collect();
            let depths = if elastic.is_empty() {
                HashMap::new()
            } else {
                match tokio::time::timeout(depth_limit, broker.queue_depths(&elastic)).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "cannot read queue depths");
                        HashMap::new()
                    }
                    Err(_) => {
                        tracing::debug!("queue depths not read in time");
                        HashMap::new()
                    }
                }
            };
            let (decisions, stopping) = {
                let _turn = self.turn.lock().await;
                if self.epoch.load(SeqCst) != epoch {
                    continue;
                }
                self.apply(&targets, &depths).await
            };
            for (t, d) in decisions {
                self.record(&t, Some(d)).await;
            }
            self.stop_later(stopping);
        }
    }

    /// One look's changes, made under the turn: consumers of tenants without a target
    /// stopped, the others within their target as the controller says. What was decided,
    /// and the consumers cancelled.
    async fn apply(
        &self,
        targets: &HashMap<TenantName, ConsumerTarget>,
        depths: &HashMap<TenantName, u64>,
    ) -> (Vec<(TenantName, ScalingDecision)>, Vec<Consumer>) {
        let mut decisions = Vec::new();
        let mut stopping = Vec::new();
        let here: Vec<TenantName> = self.consumers.lock().await.keys().cloned().collect();
        for t in here.iter().filter(|t| !targets.contains_key(*t)) {
            let from = self.running(t).await;
            let (to, stopped) = self.resize(t, 0).await;
            stopping.extend(stopped);
            if let Some(d) = self.said(t, from, to, None, false, "stopped: no target") {
                decisions.push((t.clone(), d));
            }
        }
        let latencies = self.ctx.take_latencies();
        let mut control = std::mem::take(&mut *lock(&self.control));
        for (t, target) in targets {
            let running = self.running(t).await;
            let seen = Seen {
                depth: depths.get(t).copied(),
                max_latency_ms: latencies.get(t).copied().unwrap_or(0),
            };
            let c = control.entry(t.clone()).or_default();
            let Some(change) = c.step(running, *target, seen, &self.ctx.settings) else {
                continue;
            };
            let by_controller = (target.min..=target.max).contains(&running);
            let (to, stopped) = self.resize(t, change.to).await;
            stopping.extend(stopped);
            if let Some(d) = self.said(t, running, to, Some(seen), by_controller, &change.reason) {
                decisions.push((t.clone(), d));
            }
        }
        control.retain(|t, _| targets.get(t).is_some_and(|g| g.max > g.min));
        *lock(&self.control) = control;
        (decisions, stopping)
    }

    /// The tenant's stream entries as the log counts them (since `since_ms`): asked of the
    /// log at most once per [`COUNTS_FRESH`] per tenant and filter, however many callers
    /// poll, since each asking costs the database a pass over the tenant's entries.
    pub async fn logged(
        &self,
        tenant: &TenantName,
        since_ms: Option<i64>,
    ) -> Result<StreamCounts, CoreError> {
        let slot = {
            let mut m = lock(&self.counts);
            if m.len() >= COUNTS_KEPT {
                m.clear();
            }
            m.entry((tenant.clone(), since_ms)).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some((at, c)) = *slot
            && at.elapsed() < COUNTS_FRESH
        {
            return Ok(c);
        }
        let c = self.ctx.coredms.stream_counts(tenant, since_ms).await?;
        *slot = Some((tokio::time::Instant::now(), c));
        Ok(c)
    }

    pub async fn running(&self, tenant: &TenantName) -> u32 {
        let all = self.consumers.lock().await;
        all.get(tenant).map_or(0, |l| {
            l.iter().filter(|c| !c.task.is_finished()).count() as u32
        })
    }

    /// Stops every consumer and waits for in-flight batches to finish, those stopping
    /// already included.
    pub async fn stop_all(&self) {
        let all: Vec<Consumer> = {
            let _turn = self.turn.lock().await;
            let mut all = self.consumers.lock().await;
            all.drain().flat_map(|(_, list)| list).collect()
        };
        for c in &all {
            c.cancel.cancel();
        }
        wait_stopped(all).await;
        let stopping = std::mem::take(&mut *lock(&self.stopping));
        futures::future::join_all(stopping).await;
        self.ctx.connections.close().await;
    }
}

/// This process as its decisions name it: `HOSTNAME` (a pod's name under Kubernetes) or the
/// kernel's host name, and the process id.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}/{}", std::process::id())
}

/// A lock that a panicking holder did not spoil: the maps behind it stay consistent at
/// every step.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Consumes until cancelled, reconnecting with backoff. Unacknowledged messages go back to
/// the queue when a connection drops, so a failure here loses nothing.
async fn consume_forever(ctx: Arc<Ctx>, tenant: TenantName, cancel: CancellationToken) {
    use backon::BackoffBuilder;
    // 200 ms, doubling, at most 10 s between reconnections; jittered, so the consumers of
    // a lost shared connection do not all come back at the same instant.
    let backoff = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let mut delays = backoff.build();
    while !cancel.is_cancelled() {
        let began = tokio::time::Instant::now();
        match consume(&ctx, &tenant, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                // A session that ran a while was healthy: the backoff starts over.
                if began.elapsed() > Duration::from_secs(30) {
                    delays = backoff.build();
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(tenant = %tenant, error = %e, retry_in_ms = delay.as_millis() as u64, "stream consumer failed, reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}

async fn consume(
    ctx: &Ctx,
    tenant: &TenantName,
    cancel: &CancellationToken,
) -> Result<(), ConsumerError> {
    let topology = Topology::new(&ctx.namespace, tenant);
    // Channels of its own on one of the process's shared connections.
    let mut session = ctx
        .connections
        .open(&topology, ctx.settings.prefetch)
        .await?;
    tracing::info!(tenant = %tenant, queue = %topology.queue, "stream consumer started");
    let dlq_ch = session.dead_letters.clone();
    let result = pipeline(
        ctx,
        tenant,
        &topology,
        &dlq_ch,
        &mut session.deliveries,
        cancel,
    )
    .await;
    // Closing the channels (never the shared connection) gives the broker back every
    // unacknowledged message.
    session.close().await;
    result
}

/// The consume loop, two batches deep: while one batch is written and acknowledged, the
/// next is collected and transformed. A batch is written only once the one before it was
/// acknowledged, so acknowledgements go out in delivery order and a multiple-ack never
/// covers a message not yet written. On any error the loop returns at once: the caller
/// closes the consumer's channels and the broker redelivers every unacknowledged message.
async fn pipeline<'a>(
    ctx: &'a Ctx,
    tenant: &'a TenantName,
    topology: &'a Topology,
    dlq_ch: &'a lapin::Channel,
    consumer: &mut lapin::Consumer,
    cancel: &'a CancellationToken,
) -> Result<(), ConsumerError> {
    let mut active = ActiveApp::default();
    let mut writing = InFlight::default();
    loop {
        let Some(batch) = collect(ctx, tenant, consumer, &mut writing, &mut active, cancel).await?
        else {
            return writing.finish().await;
        };
        for unit in split_suspects(ctx, tenant, batch) {
            let ids: Vec<String> = unit.iter().map(message_id).collect();
            let prepared = match writing
                .alongside(prepare(ctx, tenant, unit, &mut active))
                .await?
            {
                Ok(p) => p,
                Err(e) => {
                    // The batch in flight is not this one's: let it be acknowledged, so
                    // that only this batch comes back.
                    writing.finish().await?;
                    return settle(ctx, tenant, &ids, Err(e), cancel);
                }
            };
            writing.finish().await?;
            writing.start(
                async move {
                    let r = commit(ctx, tenant, topology, dlq_ch, prepared, cancel).await;
                    settle(ctx, tenant, &ids, r, cancel)
                }
                .boxed(),
            );
        }
    }
}

/// The batch being written and acknowledged, if any.
#[derive(Default)]
struct InFlight<'a>(Option<BoxFuture<'a, Result<(), ConsumerError>>>);

impl<'a> InFlight<'a> {
    fn is_idle(&self) -> bool {
        self.0.is_none()
    }

    fn start(&mut self, write: BoxFuture<'a, Result<(), ConsumerError>>) {
        debug_assert!(self.0.is_none(), "one batch in flight at a time");
        self.0 = Some(write);
    }

    /// Waits until the batch in flight is acknowledged (or failed); never returns when
    /// there is none, so it can race other events. Cancel-safe: the batch stays in flight.
    async fn written(&mut self) -> Result<(), ConsumerError> {
        let Some(write) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let r = write.await;
        self.0 = None;
        r
    }

    /// Waits for the batch in flight, if any.
    async fn finish(&mut self) -> Result<(), ConsumerError> {
        if self.is_idle() {
            return Ok(());
        }
        self.written().await
    }

    /// Runs `work` while the batch in flight goes on; its failure ends the work early.
    async fn alongside<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, ConsumerError> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                t = &mut work => return Ok(t),
                r = self.written() => r?,
            }
        }
    }
}

/// The next batch, or `None` once cancelled. A batch ends at its count or its bytes
/// (parsed JSON takes many times its text, so a batch of large messages must stay small).
/// It waits for more messages only while the batch before it is still being written, and
/// at most `linger_ms`: with nothing in flight it goes with the messages already received,
/// so a quiet queue adds no wait to a message's latency.
async fn collect(
    ctx: &Ctx,
    tenant: &TenantName,
    consumer: &mut lapin::Consumer,
    writing: &mut InFlight<'_>,
    active: &mut ActiveApp,
    cancel: &CancellationToken,
) -> Result<Option<Vec<Delivery>>, ConsumerError> {
    let settings = &ctx.settings;
    let linger = Duration::from_millis(settings.linger_ms);
    let mut batch: Vec<Delivery> = Vec::new();
    let mut bytes = 0;
    let mut until = tokio::time::Instant::now();
    while batch.len() < settings.batch_size && bytes < settings.max_batch_bytes {
        let next = if batch.is_empty() {
            tokio::select! {
                d = consumer.next() => d,
                r = writing.written() => {
                    r?;
                    continue;
                }
                // Waiting for messages is the time to ask coredms, not the next batch's.
                () = active.refresh_ahead(ctx, tenant), if writing.is_idle() => continue,
                _ = cancel.cancelled() => return Ok(None),
            }
        } else if writing.is_idle() {
            match consumer.next().now_or_never() {
                Some(d) => d,
                None => break,
            }
        } else {
            tokio::select! {
                d = consumer.next() => d,
                r = writing.written() => {
                    r?;
                    continue;
                }
                _ = tokio::time::sleep_until(until) => break,
            }
        };
        let Some(d) = next else {
            return Err(BrokerError::Unavailable("consumer cancelled by the broker".into()).into());
        };
        let d = d?;
        if batch.is_empty() {
            until = tokio::time::Instant::now() + linger;
        }
        bytes += d.data.len();
        batch.push(d);
    }
    Ok(Some(batch))
}

/// Messages whose earlier batch failed go alone, each acknowledged by itself, so a message
/// that keeps failing fails only itself; the rest go as one batch, after them.
fn split_suspects(ctx: &Ctx, tenant: &TenantName, batch: Vec<Delivery>) -> Vec<Vec<Delivery>> {
    if !ctx.has_attempts(tenant) {
        return vec![batch];
    }
    let (suspects, rest): (Vec<Delivery>, Vec<Delivery>) = batch
        .into_iter()
        .partition(|d| ctx.attempt(tenant, &message_id(d)).is_some());
    let mut units: Vec<Vec<Delivery>> = suspects.into_iter().map(|d| vec![d]).collect();
    if !rest.is_empty() {
        units.push(rest);
    }
    units
}

fn header<'a>(d: &'a Delivery, key: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()?
        .inner()
        .iter()
        .find(|(k, _)| k.as_str() == key)
        .map(|(_, v)| v)
}

fn header_i64(d: &Delivery, key: &str) -> Option<i64> {
    match header(d, key)? {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::Timestamp(t) => i64::try_from(*t).ok(),
        _ => None,
    }
}

fn header_str(d: &Delivery, key: &str) -> Option<String> {
    match header(d, key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// How long a consumer uses the tenant's limits and app before asking coredms again: a new
/// app version takes effect within this time, without two lookups per batch.
const APP_REFRESH: Duration = Duration::from_secs(1);
/// Age at which an idle consumer (no batch to collect or write) refreshes the app ahead of
/// time, so the lookups seldom fall in a batch's path.
const APP_REFRESH_IDLE: Duration = Duration::from_millis(500);

/// The tenant's stream app and limits as a consumer last saw them.
#[derive(Default)]
struct ActiveApp {
    fetched: Option<tokio::time::Instant>,
    /// The last refresh ahead of time, answered or not.
    tried_ahead: Option<tokio::time::Instant>,
    limits: crate::config::AppLimits,
    app: Option<Arc<crate::apps::AppHandle>>,
    /// The stored app no longer compiles or loads: every message fails with this reason
    /// (and is dead-lettered) until the tenant uploads a working version.
    broken: Option<String>,
}

impl ActiveApp {
    fn older_than(&self, age: Duration) -> bool {
        self.fetched.is_none_or(|t| t.elapsed() >= age)
    }

    /// Asks coredms again once the app is [`APP_REFRESH`] old.
    async fn refresh(&mut self, ctx: &Ctx, tenant: &TenantName) -> Result<(), ConsumerError> {
        if !self.older_than(APP_REFRESH) {
            return Ok(());
        }
        self.fetch(ctx, tenant).await
    }

    /// Refreshes the app ahead of time (it is [`APP_REFRESH_IDLE`] old), at most once per
    /// that time; never returns otherwise, so that it can race the next message. A failure
    /// is left for [`ActiveApp::refresh`] to meet in a batch's path. Cancel-safe: nothing
    /// changes until both lookups have answered.
    async fn refresh_ahead(&mut self, ctx: &Ctx, tenant: &TenantName) {
        let tried_lately = self
            .tried_ahead
            .is_some_and(|t| t.elapsed() < APP_REFRESH_IDLE);
        if !self.older_than(APP_REFRESH_IDLE) || tried_lately {
            return std::future::pending().await;
        }
        self.tried_ahead = Some(tokio::time::Instant::now());
        if let Err(e) = self.fetch(ctx, tenant).await {
            tracing::debug!(tenant = %tenant, error = %e, "refreshing the stream app ahead of time failed");
        }
    }

    async fn fetch(&mut self, ctx: &Ctx, tenant: &TenantName) -> Result<(), ConsumerError> {
        let profile = ctx
            .coredms
            .tenant(tenant)
            .await
            .map_err(ConsumerError::Coredms)?;
        let limits = profile.constraints.app_limits;
        let active = ctx
            .apps
            .active(&ctx.coredms, tenant, AppKind::Stream, limits)
            .await;
        self.limits = limits;
        match active {
            Ok(app) => {
                self.app = app;
                self.broken = None;
            }
            Err(AppError::Core(e)) if e.is_retryable() => return Err(ConsumerError::Coredms(e)),
            Err(e) => {
                let reason = match e {
                    AppError::DoesNotCompile(_) => e.to_string(),
                    other => format!("the stored stream app cannot be loaded: {other}"),
                };
                tracing::warn!(tenant = %tenant, reason = %reason, "the stored stream app cannot run; its messages are dead-lettered");
                self.app = None;
                self.broken = Some(reason);
            }
        }
        self.fetched = Some(tokio::time::Instant::now());
        Ok(())
    }
}

/// A message's identity: the id the broker stamped, or for a message published around the
/// broker API (no id) a hash of its content.
fn message_id(d: &Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(&d.data)[..16])
        })
}

impl Ctx {
    /// A batch of `tenant` stored `ms` after its oldest message was published.
    fn note_latency(&self, tenant: &TenantName, ms: u64) {
        let mut m = lock(&self.latency);
        let worst = m.entry(tenant.clone()).or_insert(0);
        *worst = (*worst).max(ms);
    }

    /// The highest latency of each tenant since the last call.
    fn take_latencies(&self) -> HashMap<TenantName, u64> {
        std::mem::take(&mut *lock(&self.latency))
    }

    fn has_attempts(&self, tenant: &TenantName) -> bool {
        self.attempts
            .lock()
            .map(|m| m.get(tenant).is_some_and(|t| !t.is_empty()))
            .unwrap_or(false)
    }

    fn attempt(&self, tenant: &TenantName, id: &str) -> Option<Attempt> {
        let m = self.attempts.lock().ok()?;
        m.get(tenant)?.get(id).cloned()
    }

    fn note_failure(&self, tenant: &TenantName, ids: &[String], error: &str) {
        let Ok(mut m) = self.attempts.lock() else {
            return;
        };
        let mine = m.entry(tenant.clone()).or_default();
        if mine.len() + ids.len() > MAX_REMEMBERED_ATTEMPTS {
            tracing::warn!(tenant = %tenant, remembered = mine.len(), "too many failing messages remembered; forgetting their attempts");
            mine.clear();
        }
        for id in ids {
            let a = mine.entry(id.clone()).or_insert(Attempt {
                failures: 0,
                last_error: String::new(),
            });
            a.failures += 1;
            a.last_error = error.to_owned();
        }
    }

    fn forget(&self, tenant: &TenantName, ids: &[String]) {
        if let Ok(mut m) = self.attempts.lock()
            && let Some(mine) = m.get_mut(tenant)
        {
            for id in ids {
                mine.remove(id);
            }
            if mine.is_empty() {
                m.remove(tenant);
            }
        }
    }
}

/// The end of a batch's attempt: its messages forgotten when it was acknowledged, or the
/// failure remembered against them unless it was the broker's, an outage, or the platform
/// shutting down.
fn settle(
    ctx: &Ctx,
    tenant: &TenantName,
    ids: &[String],
    result: Result<(), Failed>,
    cancel: &CancellationToken,
) -> Result<(), ConsumerError> {
    match result {
        Ok(()) => {
            ctx.forget(tenant, ids);
            Ok(())
        }
        Err(Failed::NotStored(e)) => {
            // An outage is nobody's message's fault: only other errors count.
            if !cancel.is_cancelled() && !e.is_retryable() {
                ctx.note_failure(tenant, ids, &e.to_string());
            }
            Err(ConsumerError::NotStored(e))
        }
        Err(Failed::Task(e)) => {
            let e = ConsumerError::Task(e);
            if !cancel.is_cancelled() {
                ctx.note_failure(tenant, ids, &e.to_string());
            }
            Err(e)
        }
        Err(Failed::Broker(e)) => Err(e),
    }
}

/// Why a batch was left unacknowledged.
enum Failed {
    /// coredms did not store it.
    NotStored(CoreError),
    /// The app's task panicked or was cancelled.
    Task(tokio::task::JoinError),
    Broker(ConsumerError),
}

impl From<ConsumerError> for Failed {
    fn from(e: ConsumerError) -> Self {
        Self::Broker(e)
    }
}

impl From<BrokerError> for Failed {
    fn from(e: BrokerError) -> Self {
        Self::Broker(e.into())
    }
}

impl From<lapin::Error> for Failed {
    fn from(e: lapin::Error) -> Self {
        Self::Broker(e.into())
    }
}

/// A batch transformed, ready to be written: its messages, what the app made of them, and
/// how many of them had failed too often already.
struct Prepared {
    batch: Vec<Delivery>,
    write: BulkWrite,
    failed_inputs: Vec<(usize, String)>,
    doc_inputs: Vec<usize>,
    exhausted: usize,
}

/// The first half of a batch, which needs no write: the tenant's app (refreshed now and
/// then), each message as an input, the app run over them. A message that failed
/// `max_deliveries` times already fails here with its last error.
async fn prepare(
    ctx: &Ctx,
    tenant: &TenantName,
    batch: Vec<Delivery>,
    active: &mut ActiveApp,
) -> Result<Prepared, Failed> {
    active.refresh(ctx, tenant).await?;
    let limits = active.limits;
    let app = active.app.clone();
    let raw = app.as_ref().is_some_and(|a| !a.shape.has_map);
    let max_deliveries = ctx.settings.max_deliveries.max(1);
    let mut exhausted = 0usize;
    // Failed attempts are looked up only when this tenant has any: not once per message.
    let remembered = ctx.has_attempts(tenant);
    let inputs: Vec<Input> = batch
        .iter()
        .map(|d| {
            let origin = message_id(d);
            let value = if let Some(a) = remembered
                .then(|| ctx.attempt(tenant, &origin))
                .flatten()
                .filter(|a| a.failures >= max_deliveries)
            {
                exhausted += 1;
                Err(format!(
                    "not stored after {} deliveries: {}",
                    a.failures, a.last_error
                ))
            } else if let Some(reason) = &active.broken {
                Err(reason.clone())
            } else if raw {
                std::str::from_utf8(&d.data)
                    .map(|s| serde_json::Value::String(s.to_owned()))
                    .map_err(|_| "message is not valid UTF-8".to_owned())
            } else {
                serde_json::from_slice(&d.data).map_err(|e| format!("invalid JSON message: {e}"))
            };
            Input {
                input: InputRef::Message { id: origin.clone() },
                origin,
                index: 0,
                bytes: d.data.len() as u64,
                started_us: header_i64(d, HEADER_PUBLISHED_US).unwrap_or_else(now_us),
                data_name: header_str(d, HEADER_DATA_NAME).unwrap_or_else(|| "message".into()),
                value,
            }
        })
        .collect();
    let app2 = app.clone();
    let max_doc = limits.max_doc_bytes;
    let in_process = ctx.coredms.in_process();
    let (inputs, t) = tokio::task::spawn_blocking(move || {
        let mut t = transform(app2.as_deref(), "messages", max_doc, &inputs);
        if in_process {
            crate::coredms::encode_ahead(&mut t.docs);
        }
        (inputs, t)
    })
    .await
    .map_err(Failed::Task)?;
    let write = BulkWrite {
        tenant: tenant.clone(),
        source: Source::Stream,
        data_name: inputs
            .first()
            .map_or_else(|| "message".into(), |i| i.data_name.clone()),
        app_version: app.as_ref().map(|a| a.version),
        docs: t.docs,
        unstored: t.unstored,
        origin: None,
        replay: false,
    };
    Ok(Prepared {
        batch,
        write,
        failed_inputs: t.failed_inputs,
        doc_inputs: t.doc_inputs,
        exhausted,
    })
}

/// The second half of a batch: one bulk write → dead letters → acknowledgement (one
/// multiple-ack). Any error before the ack leaves every message of the batch
/// unacknowledged, for redelivery. A message whose input, app run or documents failed is
/// dead-lettered with the reason (and logged).
async fn commit(
    ctx: &Ctx,
    tenant: &TenantName,
    topology: &Topology,
    dlq_ch: &lapin::Channel,
    p: Prepared,
    cancel: &CancellationToken,
) -> Result<(), Failed> {
    let Prepared {
        batch,
        write,
        failed_inputs,
        doc_inputs,
        exhausted,
    } = p;
    let bytes: u64 = write.docs.iter().map(|d| d.bytes).sum();
    let failed = failed_inputs.len() as u64;
    let outcome = match write_with_retry(&ctx.coredms, write, cancel).await {
        Ok(o) => o,
        // The batch is only messages that failed too often: they leave the queue for the
        // dead-letter queue, which keeps them, even though their failure entry could not
        // be written either.
        Err(e) if exhausted == batch.len() && !cancel.is_cancelled() => {
            tracing::error!(tenant = %tenant, error = %e, "cannot log the failure of messages past their delivery limit; dead-lettering them anyway");
            crate::model::BulkOutcome::default()
        }
        Err(e) => return Err(Failed::NotStored(e)),
    };
    if let Some(oldest) = batch
        .iter()
        .filter_map(|d| header_i64(d, HEADER_PUBLISHED_US))
        .min()
    {
        ctx.note_latency(
            tenant,
            u64::try_from((now_us() - oldest) / 1000).unwrap_or(0),
        );
    }
    // Every message with a failed input or a document the database refused goes to the
    // dead-letter queue once, with the first reason.
    let mut dead: Vec<(usize, &str)> = failed_inputs
        .iter()
        .map(|(i, r)| (*i, r.as_str()))
        .collect();
    for (doc, reason) in &outcome.failed {
        if let Some(&i) = doc_inputs.get(*doc)
            && !dead.iter().any(|(j, _)| *j == i)
        {
            dead.push((i, reason.as_str()));
        }
    }
    for (i, reason) in &dead {
        broker::dead_letter(dlq_ch, topology, &batch[*i], reason).await?;
        DeadLettered {
            tenant: tenant.as_str(),
            reason,
        }
        .emit(&ctx.metrics);
    }
    Ingested {
        tenant: tenant.as_str(),
        source: Source::Stream,
        stored: outcome.inserted,
        duplicates: outcome.duplicates,
        failed: failed + outcome.failed.len() as u64,
        bytes,
    }
    .emit(&ctx.metrics);
    // A message retried alone is acknowledged alone: a multiple-ack would also take the
    // batch collected with it, not yet processed.
    if let Some(last) = batch.last() {
        last.acker
            .ack(BasicAckOptions {
                multiple: batch.len() > 1,
            })
            .await?;
    }
    Ok(())
}
