//! Typed ingestion events: one `emit()` writes the tracing line and bumps the metrics
//! together, so logs and metrics never disagree.

use crate::logs::{Source, source_str};
use crate::metrics::Metrics;

/// A bulk write finished: what it stored, found already stored, or failed.
pub struct Ingested<'a> {
    pub tenant: &'a str,
    pub source: Source,
    pub stored: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub bytes: u64,
}

impl Ingested<'_> {
    pub fn emit(&self, m: &Metrics) {
        let s = source_str(self.source);
        tracing::debug!(
            tenant = self.tenant,
            source = s,
            stored = self.stored,
            duplicates = self.duplicates,
            failed = self.failed,
            bytes = self.bytes,
            "ingested"
        );
        m.add(
            "mysimbdp_ingested_total",
            self.tenant,
            s,
            "success",
            self.stored,
        );
        m.add(
            "mysimbdp_ingested_total",
            self.tenant,
            s,
            "duplicate",
            self.duplicates,
        );
        m.add(
            "mysimbdp_ingested_total",
            self.tenant,
            s,
            "failure",
            self.failed,
        );
        m.add(
            "mysimbdp_ingested_bytes_total",
            self.tenant,
            s,
            "success",
            self.bytes,
        );
    }
}

/// Messages accepted by the broker for a tenant.
pub struct Published<'a> {
    pub tenant: &'a str,
    pub messages: u64,
}

impl Published<'_> {
    pub fn emit(&self, m: &Metrics) {
        tracing::debug!(tenant = self.tenant, messages = self.messages, "published");
        m.add(
            "mysimbdp_published_total",
            self.tenant,
            "stream",
            "success",
            self.messages,
        );
    }
}

/// A stream message moved to the dead-letter queue.
pub struct DeadLettered<'a> {
    pub tenant: &'a str,
    pub reason: &'a str,
}

impl DeadLettered<'_> {
    pub fn emit(&self, m: &Metrics) {
        tracing::info!(
            tenant = self.tenant,
            reason = self.reason,
            "message dead-lettered"
        );
        m.add(
            "mysimbdp_dead_lettered_total",
            self.tenant,
            "stream",
            "failure",
            1,
        );
    }
}

/// A stream manager changed how many consumers of a tenant's queue it runs: to follow the
/// tenant's target (`stream/start`, `stream/stop`, another manager's start) or by its
/// elastic controller.
pub struct ConsumersChanged<'a> {
    pub tenant: &'a str,
    pub from: u32,
    pub to: u32,
    pub queue_depth: Option<u64>,
    pub by_controller: bool,
    pub reason: &'a str,
}

impl ConsumersChanged<'_> {
    pub fn emit(&self, m: &Metrics) {
        tracing::info!(
            tenant = self.tenant,
            from = self.from,
            to = self.to,
            queue_depth = self.queue_depth,
            reason = self.reason,
            "stream consumers changed"
        );
        let cause = if self.by_controller {
            "controller"
        } else {
            "target"
        };
        let (name, n) = if self.to >= self.from {
            ("mysimbdp_consumers_added_total", self.to - self.from)
        } else {
            ("mysimbdp_consumers_removed_total", self.from - self.to)
        };
        m.add(name, self.tenant, "stream", cause, u64::from(n));
    }
}
