//! The stream consumers' AMQP connections: a few per process, shared by every consumer,
//! each consumer holding channels of its own on one of them.
//!
//! Why shared: lapin gives each connection an IO thread and two frame buffers of 32 ×
//! `frame_max` bytes (4 MiB each against RabbitMQ's default 128 KiB frames), zeroed when the
//! connection is tuned. One connection per consumer made every idle tenant cost about
//! 8 MiB, a thread and a broker connection; a channel costs the process a few KiB.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::Mutex;

use super::broker::{self, BrokerError, Topology};
use crate::config::AmqpSettings;

/// The pool: `amqp.consumer_connections` connections, opened when a consumer first needs
/// one and again when one was lost.
pub struct ConsumerConnections {
    uri: String,
    settings: AmqpSettings,
    namespace: String,
    slots: Vec<Arc<Slot>>,
}

struct Slot {
    conn: Mutex<Option<Arc<Connection>>>,
    /// Consumers holding channels on this slot's connection: a new one takes the least
    /// loaded slot, so consumers spread evenly and a lost connection stops few of them.
    consumers: AtomicUsize,
}

/// One consumer's channels on a shared connection: `deliveries` from the tenant's queue
/// (with its prefetch) and a confirm-mode channel for its dead letters. Closing them (or
/// dropping them) never closes the connection, and gives the consumer's unacknowledged
/// messages back to the queue.
pub struct ConsumerChannels {
    pub deliveries: Consumer,
    pub dead_letters: Channel,
    consume: Channel,
    _place: Place,
}

/// A consumer's place on a slot, given back when its channels go.
struct Place(Arc<Slot>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.consumers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConsumerConnections {
    pub fn new(uri: &str, settings: &AmqpSettings, namespace: &str) -> Self {
        let slots = (0..settings.consumer_connections.max(1))
            .map(|_| {
                Arc::new(Slot {
                    conn: Mutex::new(None),
                    consumers: AtomicUsize::new(0),
                })
            })
            .collect();
        Self {
            uri: uri.to_owned(),
            settings: settings.clone(),
            namespace: namespace.to_owned(),
            slots,
        }
    }

    /// Channels for a consumer of `topology`'s queue, its topology declared, on the least
    /// loaded connection (connected first if it is not).
    pub async fn open(
        &self,
        topology: &Topology,
        prefetch: u16,
    ) -> Result<ConsumerChannels, BrokerError> {
        let (index, slot) = self
            .slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.consumers.load(Ordering::Relaxed))
            .ok_or_else(|| BrokerError::Unavailable("no consumer connection".into()))?;
        slot.consumers.fetch_add(1, Ordering::Relaxed);
        let place = Place(slot.clone());
        let conn = self.connection(index, slot).await?;
        let consume = conn.create_channel().await?;
        broker::declare(&consume, topology, &self.settings).await?;
        consume
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let dead_letters = conn.create_channel().await?;
        dead_letters
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let deliveries = consume
            .basic_consume(
                topology.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(ConsumerChannels {
            deliveries,
            dead_letters,
            consume,
            _place: place,
        })
    }

    /// The slot's connection, connecting it when it has none or lost it. Consumers whose
    /// connection dropped all come here; the first reconnects, the others find it up.
    async fn connection(&self, index: usize, slot: &Slot) -> Result<Arc<Connection>, BrokerError> {
        let mut conn = slot.conn.lock().await;
        if let Some(c) = conn.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        // Named after the namespace, so operators (and fault tests) find a platform's
        // connections.
        let name = format!("mysimbdp-consumers-{}{index}", self.namespace);
        let fresh = Arc::new(broker::connect(&self.uri, &self.settings, &name).await?);
        *conn = Some(fresh.clone());
        Ok(fresh)
    }

    /// Closes every connection (once the consumers have stopped).
    pub async fn close(&self) {
        for slot in &self.slots {
            if let Some(c) = slot.conn.lock().await.take() {
                let _ = c.close(200, "stream manager stopped".into()).await;
            }
        }
    }
}

impl ConsumerChannels {
    /// Closes the consumer's channels, not the shared connection: the broker gives its
    /// unacknowledged messages back to the queue.
    pub async fn close(self) {
        let _ = self
            .dead_letters
            .close(200, "consumer stopped".into())
            .await;
        let _ = self.consume.close(200, "consumer stopped".into()).await;
    }
}
