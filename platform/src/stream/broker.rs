//! The data broker: per-tenant RabbitMQ topology, publishing with publisher confirms, and
//! dead-lettering with a reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use rand::RngCore;
use tokio::sync::Mutex;

use crate::api::DeadLetter;
use crate::config::AmqpSettings;
use crate::tenants::TenantName;

pub const HEADER_PUBLISHED_US: &str = "x-published-us";
pub const HEADER_DATA_NAME: &str = "x-data-name";
pub const HEADER_REASON: &str = "x-mysimbdp-reason";
/// How many times a message was replayed from the dead-letter queue.
pub const HEADER_REPLAYS: &str = "x-mysimbdp-replays";
/// Most dead letters one list or replay request handles.
pub const MAX_DEAD_LETTERS_PER_REQUEST: usize = 1000;
/// Bytes of a dead letter's body shown in a listing.
const PREVIEW_BYTES: usize = 200;
/// Channels used for publishing, each with its own confirm sequence.
const PUBLISH_CHANNELS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("message broker unavailable: {0}")]
    Unavailable(String),
    #[error("message broker refused the message: {0}")]
    Refused(String),
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Names of a tenant's queues, under the platform namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    pub queue: String,
    pub dlq: String,
    pub dlx: String,
}

impl Topology {
    pub fn new(namespace: &str, tenant: &TenantName) -> Self {
        Self {
            queue: format!("{namespace}mysimbdp.{tenant}"),
            dlq: format!("{namespace}mysimbdp.{tenant}.dlq"),
            dlx: format!("{namespace}mysimbdp.dlx"),
        }
    }
}

pub async fn connect(
    uri: &str,
    settings: &AmqpSettings,
    name: &str,
) -> Result<Connection, BrokerError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(
        Duration::from_millis(settings.connect_timeout_ms),
        Connection::connect(uri, props),
    )
    .await
    .map_err(|_| BrokerError::Unavailable("connection timed out".into()))?
    .map_err(BrokerError::from)
}

/// Declares the tenant's queue, dead-letter exchange and dead-letter queue (idempotent).
pub async fn declare(
    ch: &Channel,
    t: &Topology,
    settings: &AmqpSettings,
) -> Result<(), BrokerError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    // Queues that expire (`amqp.queue_expires_ms`) take the dead-letter exchange with them:
    // it goes when the last queue bound to it does.
    // Settings refuse more than i32 holds; set in code past it, the longest it holds.
    let expires = settings
        .queue_expiry()
        .map(|e| i32::try_from(e.as_millis()).unwrap_or(i32::MAX));
    ch.exchange_declare(
        t.dlx.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            auto_delete: expires.is_some(),
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut dlq_args = FieldTable::default();
    let mut args = FieldTable::default();
    if let Some(ms) = expires {
        args.insert("x-expires".into(), AMQPValue::LongInt(ms));
        dlq_args.insert("x-expires".into(), AMQPValue::LongInt(ms));
    }
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(t.dlx.as_str().into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(t.dlq.as_str().into()),
    );
    if settings.quorum_queues {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(settings.delivery_limit as i32),
        );
        dlq_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    ch.queue_declare(t.dlq.as_str().into(), durable, dlq_args)
        .await?;
    ch.queue_bind(
        t.dlq.as_str().into(),
        t.dlx.as_str().into(),
        t.dlq.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(t.queue.as_str().into(), durable, args)
        .await?;
    Ok(())
}

/// The id of message `index` of a publish request. With an idempotency key it is derived
/// from (tenant, key, index), so a client that retries a request whose confirms it never saw
/// republishes the same ids, and the documents are recognised as duplicates. Without one it
/// is random. It becomes the prefix of the message's document ids.
pub fn message_id(tenant: &TenantName, key: Option<&str>, index: usize) -> String {
    match key {
        Some(k) => {
            use sha2::Digest;
            let h = sha2::Sha256::digest(format!("{tenant}\0{k}\0{index}").as_bytes());
            hex::encode(&h[..16])
        }
        None => new_message_id(),
    }
}

/// A random message id: 128 bits, hex.
pub fn new_message_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Publishes to tenant queues over a few confirm-mode channels, reconnecting on failure.
pub struct Broker {
    uri: String,
    settings: AmqpSettings,
    namespace: String,
    conn: Mutex<Option<Connection>>,
    channels: Vec<Mutex<Option<Channel>>>,
    next: AtomicUsize,
}

impl Broker {
    pub fn new(uri: &str, settings: &AmqpSettings, namespace: &str) -> Self {
        Self {
            uri: uri.to_owned(),
            settings: settings.clone(),
            namespace: namespace.to_owned(),
            conn: Mutex::new(None),
            channels: (0..PUBLISH_CHANNELS).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn topology(&self, tenant: &TenantName) -> Topology {
        Topology::new(&self.namespace, tenant)
    }

    async fn channel(&self) -> Result<(usize, Channel), BrokerError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let mut slot = self.channels[i].lock().await;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok((i, ch.clone()));
        }
        let mut conn = self.conn.lock().await;
        if !conn.as_ref().is_some_and(|c| c.status().connected()) {
            let name = format!("mysimbdp-broker-{}", self.namespace);
            *conn = Some(connect(&self.uri, &self.settings, &name).await?);
        }
        let ch = conn
            .as_ref()
            .ok_or_else(|| BrokerError::Unavailable("no connection".into()))?
            .create_channel()
            .await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *slot = Some(ch.clone());
        Ok((i, ch))
    }

    async fn forget(&self, i: usize) {
        *self.channels[i].lock().await = None;
    }

    pub async fn declare_topology(&self, tenant: &TenantName) -> Result<(), BrokerError> {
        let (i, ch) = self.channel().await?;
        let r = declare(&ch, &self.topology(tenant), &self.settings).await;
        if r.is_err() {
            self.forget(i).await;
        }
        r
    }

    /// Publishes persistent messages to the tenant's queue and returns their ids once the
    /// broker confirmed every one. `mandatory`: a missing queue is an error, never a loss.
    pub async fn publish(
        &self,
        tenant: &TenantName,
        data_name: &str,
        payloads: &[&[u8]],
        idempotency_key: Option<&str>,
    ) -> Result<Vec<String>, BrokerError> {
        let (i, ch) = self.channel().await?;
        let r = self
            .publish_on(&ch, tenant, data_name, payloads, idempotency_key)
            .await;
        if matches!(r, Err(BrokerError::Unavailable(_))) {
            self.forget(i).await;
        }
        r
    }

    async fn publish_on(
        &self,
        ch: &Channel,
        tenant: &TenantName,
        data_name: &str,
        payloads: &[&[u8]],
        idempotency_key: Option<&str>,
    ) -> Result<Vec<String>, BrokerError> {
        let queue = self.topology(tenant).queue;
        let mut ids = Vec::with_capacity(payloads.len());
        let mut confirms = Vec::with_capacity(payloads.len());
        for (n, p) in payloads.iter().enumerate() {
            let id = message_id(tenant, idempotency_key, n);
            let now_us = crate::model::now_us();
            let mut headers = FieldTable::default();
            headers.insert(HEADER_PUBLISHED_US.into(), AMQPValue::LongLongInt(now_us));
            headers.insert(
                HEADER_DATA_NAME.into(),
                AMQPValue::LongString(LongString::from(data_name)),
            );
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into())
                .with_timestamp((now_us / 1_000_000) as u64)
                .with_headers(headers);
            confirms.push(
                ch.basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    p,
                    props,
                )
                .await?,
            );
            ids.push(id);
        }
        for c in confirms {
            match c.await? {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => {
                    let why = match self.queue_expiry() {
                        // Publishing is no use of a queue: one nobody consumed has expired.
                        Some(_) => {
                            "create the tenant first, or start its consumers: its queue expires unused (amqp.queue_expires_ms)"
                        }
                        None => "create the tenant first",
                    };
                    return Err(BrokerError::Refused(format!(
                        "queue `{queue}` does not exist; {why}"
                    )));
                }
                Confirmation::Nack(_) => {
                    return Err(BrokerError::Refused(
                        "broker could not store the message".into(),
                    ));
                }
                Confirmation::NotRequested => {}
            }
        }
        Ok(ids)
    }
}

/// The next dead letter of `dlq`, unacknowledged; none when the queue is empty, or when it
/// does not exist (it expired, or was deleted: the broker's NOT_FOUND, which closes the
/// channel, is no outage).
async fn take_dead_letter(
    ch: &Channel,
    dlq: &str,
) -> Result<Option<lapin::message::BasicGetMessage>, BrokerError> {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    match ch
        .basic_get(dlq.into(), BasicGetOptions { no_ack: false })
        .await
    {
        Err(e)
            if matches!(
                e.kind(),
                lapin::ErrorKind::ProtocolError(a)
                    if matches!(a.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
            ) =>
        {
            Ok(None)
        }
        got => Ok(got?),
    }
}

fn header<'a>(d: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(name)
}

fn header_text(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    match header(d, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header_u32(d: &lapin::message::Delivery, name: &str) -> Option<u32> {
    match header(d, name)? {
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        _ => None,
    }
}

/// A dead letter as the tenant lists it.
fn listed(d: &lapin::message::Delivery) -> DeadLetter {
    let cut = d.data.len().min(PREVIEW_BYTES);
    DeadLetter {
        message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
        data_name: header_text(d, HEADER_DATA_NAME),
        reason: header_text(d, HEADER_REASON),
        bytes: d.data.len() as u64,
        preview: String::from_utf8_lossy(&d.data[..cut]).into_owned(),
        replays: header_u32(d, HEADER_REPLAYS).unwrap_or(0),
    }
}

impl Broker {
    /// A channel of its own (not one of the publishing channels), closed by the caller.
    async fn own_channel(&self) -> Result<Channel, BrokerError> {
        let mut conn = self.conn.lock().await;
        if !conn.as_ref().is_some_and(|c| c.status().connected()) {
            let name = format!("mysimbdp-broker-{}", self.namespace);
            *conn = Some(connect(&self.uri, &self.settings, &name).await?);
        }
        Ok(conn
            .as_ref()
            .ok_or_else(|| BrokerError::Unavailable("no connection".into()))?
            .create_channel()
            .await?)
    }

    /// Messages ready in each tenant's queue (declared passively: a queue that is missing is
    /// left out), on one channel of its own.
    pub async fn queue_depths(
        &self,
        tenants: &[TenantName],
    ) -> Result<HashMap<TenantName, u64>, BrokerError> {
        let mut out = HashMap::with_capacity(tenants.len());
        let mut ch = None;
        for t in tenants {
            let c = match ch.take() {
                Some(c) => c,
                None => self.own_channel().await?,
            };
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let queue = self.topology(t).queue;
            // A failed passive declare closes the channel: the next tenant opens another.
            if let Ok(q) = c
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
            {
                out.insert(t.clone(), u64::from(q.message_count()));
                ch = Some(c);
            }
        }
        if let Some(c) = ch {
            let _ = c.close(200, "queue depths read".into()).await;
        }
        Ok(out)
    }

    /// How long an unused tenant queue lives (`amqp.queue_expires_ms`), if it expires.
    pub fn queue_expiry(&self) -> Option<Duration> {
        self.settings.queue_expiry()
    }

    /// With expiring queues: each tenant's topology declared again, which RabbitMQ counts as
    /// a use of its classic queues, so that its dead-letter queue lives as long as the
    /// tenant has a stream target (nothing consumes it, and a message dead-lettered into it
    /// is no use of it); one that went meanwhile is declared anew, with its binding. The
    /// stream managers call it every quarter of the expiry or so; a tenant whose topology
    /// cannot be declared is warned about.
    pub async fn keep_dead_letter_queues(&self, tenants: &[TenantName]) -> Result<(), BrokerError> {
        if self.queue_expiry().is_none() {
            return Ok(());
        }
        let mut ch = None;
        for t in tenants {
            let c = match ch.take() {
                Some(c) => c,
                None => self.own_channel().await?,
            };
            // A failed declare closes the channel: the next tenant opens another.
            match declare(&c, &self.topology(t), &self.settings).await {
                Ok(()) => ch = Some(c),
                Err(e) => {
                    tracing::warn!(tenant = %t, error = %e, "a tenant's queues could not be declared again");
                }
            }
        }
        if let Some(c) = ch {
            let _ = c.close(200, "dead-letter queues kept".into()).await;
        }
        Ok(())
    }

    /// Up to `limit` of a tenant's dead letters, oldest first, left in the queue: they are
    /// taken unacknowledged and given back when the channel closes. `more`: others follow.
    pub async fn dead_letters(
        &self,
        tenant: &TenantName,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, bool), BrokerError> {
        let dlq = self.topology(tenant).dlq;
        let ch = self.own_channel().await?;
        let mut out = Vec::new();
        let mut more = false;
        let r = async {
            while out.len() < limit.min(MAX_DEAD_LETTERS_PER_REQUEST) {
                match take_dead_letter(&ch, &dlq).await? {
                    Some(m) => {
                        out.push(listed(&m.delivery));
                        more = m.message_count > 0;
                    }
                    None => {
                        more = false;
                        break;
                    }
                }
            }
            Ok::<_, BrokerError>(())
        }
        .await;
        // Closing the channel gives every message taken back to the queue, in its place.
        let _ = ch.close(200, "listed".into()).await;
        r.map(|()| (out, more))
    }

    /// Moves up to `limit` of a tenant's dead letters back to its queue, oldest first, for
    /// the stream app running now. Each keeps its message id (so its documents and log
    /// entries are those of its first ingestion) and leaves the dead-letter queue only once
    /// the broker confirmed its copy in the queue. Returns how many moved.
    pub async fn replay_dead_letters(
        &self,
        tenant: &TenantName,
        limit: usize,
    ) -> Result<u64, BrokerError> {
        let t = self.topology(tenant);
        let ch = self.own_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut moved = 0u64;
        let r = async {
            while (moved as usize) < limit.min(MAX_DEAD_LETTERS_PER_REQUEST) {
                let Some(m) = take_dead_letter(&ch, &t.dlq).await? else {
                    break;
                };
                let d = &m.delivery;
                let mut headers = d.properties.headers().clone().unwrap_or_default();
                let replays = header_u32(d, HEADER_REPLAYS).unwrap_or(0).saturating_add(1);
                let mut kept = FieldTable::default();
                for (k, v) in headers.inner() {
                    if k.as_str() != HEADER_REASON && !k.as_str().starts_with("x-death") {
                        kept.insert(k.clone(), v.clone());
                    }
                }
                headers = kept;
                headers.insert(HEADER_REPLAYS.into(), AMQPValue::LongInt(replays as i32));
                // Its ingestion time in the log counts from the replay.
                headers.insert(
                    HEADER_PUBLISHED_US.into(),
                    AMQPValue::LongLongInt(crate::model::now_us()),
                );
                let props = d.properties.clone().with_headers(headers);
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        t.queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &d.data,
                        props,
                    )
                    .await?
                    .await?;
                match confirm {
                    Confirmation::Ack(None) | Confirmation::NotRequested => {
                        d.acker.ack(BasicAckOptions::default()).await?;
                        moved += 1;
                    }
                    _ => {
                        return Err(BrokerError::Refused(format!(
                            "queue `{}` refused a replayed message",
                            t.queue
                        )));
                    }
                }
            }
            Ok(())
        }
        .await;
        let _ = ch.close(200, "replayed".into()).await;
        r.map(|()| moved)
    }
}

/// Copies a failed message to the tenant's dead-letter queue with the reason, confirmed.
pub async fn dead_letter(
    ch: &Channel,
    topology: &Topology,
    delivery: &lapin::message::Delivery,
    reason: &str,
) -> Result<(), BrokerError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let reason: String = reason.chars().take(1000).collect();
    headers.insert(
        HEADER_REASON.into(),
        AMQPValue::LongString(LongString::from(reason.as_str())),
    );
    let props = delivery.properties.clone().with_headers(headers);
    let confirm = ch
        .basic_publish(
            topology.dlx.as_str().into(),
            topology.dlq.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &delivery.data,
            props,
        )
        .await?;
    match confirm.await? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        _ => Err(BrokerError::Refused(
            "dead-letter queue refused the message".into(),
        )),
    }
}
