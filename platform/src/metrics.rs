//! Prometheus metrics: counters labelled by tenant, source and outcome (bounded cardinality:
//! never a document or message id), kept and rendered by `prometheus-client` in the
//! OpenMetrics text format (which Prometheus scrapes).
//!
//! Tenant names are the operator's business: the public rendering sums over tenants and has
//! no `tenant` label; the admin's has one per tenant (see `GET /metrics` in `http`). Each
//! counter is kept twice, once per view, so neither rendering has to fold the other.

use std::fmt;

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The counters, by their exposed name, and what each means (the `# HELP` lines; the
/// library ends each with a period). A counter is declared once it has a series.
const COUNTERS: &[(&str, &str)] = &[
    (
        "mysimbdp_ingested_total",
        "Ingestions by tenant, source and status",
    ),
    (
        "mysimbdp_ingested_bytes_total",
        "Bytes of stored records by tenant and source",
    ),
    (
        "mysimbdp_published_total",
        "Messages published through the data broker",
    ),
    (
        "mysimbdp_dead_lettered_total",
        "Stream messages moved to the dead-letter queue",
    ),
    (
        "mysimbdp_consumers_added_total",
        "Stream consumers a stream manager started, by tenant and cause (target, controller)",
    ),
    (
        "mysimbdp_consumers_removed_total",
        "Stream consumers a stream manager stopped, by tenant and cause (target, controller)",
    ),
    (
        "mysimbdp_http_rejected_total",
        "HTTP requests refused or cut off, by reason (tenant_limit, busy, body_timeout, request_timeout)",
    ),
];

/// A series' labels. An empty tenant (the public view, or a count that belongs to no
/// tenant) has no `tenant` label at all rather than `tenant=""`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Labels {
    tenant: String,
    source: &'static str,
    status: &'static str,
}

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        if !self.tenant.is_empty() {
            ("tenant", self.tenant.as_str()).encode(encoder.encode_label())?;
        }
        ("source", self.source).encode(encoder.encode_label())?;
        ("status", self.status).encode(encoder.encode_label())
    }
}

type Counters = Family<Labels, Counter>;

pub struct Metrics {
    /// Per counter (in [`COUNTERS`] order): the admin's family and the public one.
    families: Vec<(&'static str, Counters, Counters)>,
    admin: Registry,
    public: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let (mut admin, mut public) = (Registry::default(), Registry::default());
        let families = COUNTERS
            .iter()
            .map(|&(name, help)| {
                let (a, p) = (Counters::default(), Counters::default());
                // The library appends `_total` to a counter's name.
                let family = name.strip_suffix("_total").unwrap_or(name);
                admin.register(family, help, a.clone());
                public.register(family, help, p.clone());
                (name, a, p)
            })
            .collect();
        Self {
            families,
            admin,
            public,
        }
    }
}

impl Metrics {
    fn family(&self, name: &str) -> Option<&(&'static str, Counters, Counters)> {
        let f = self.families.iter().find(|(n, ..)| *n == name);
        debug_assert!(f.is_some(), "no counter {name} in COUNTERS");
        f
    }

    pub fn add(
        &self,
        name: &'static str,
        tenant: &str,
        source: &'static str,
        status: &'static str,
        n: u64,
    ) {
        let Some((_, admin, public)) = self.family(name) else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut labels = Labels {
            tenant: tenant.to_owned(),
            source,
            status,
        };
        admin.get_or_create(&labels).inc_by(n);
        labels.tenant.clear();
        public.get_or_create(&labels).inc_by(n);
    }

    /// The value of one counter; 0 if it was never bumped.
    pub fn get(
        &self,
        name: &'static str,
        tenant: &str,
        source: &'static str,
        status: &'static str,
    ) -> u64 {
        let labels = Labels {
            tenant: tenant.to_owned(),
            source,
            status,
        };
        self.family(name)
            .and_then(|(_, admin, _)| admin.get(&labels).map(|c| c.get()))
            .unwrap_or(0)
    }

    /// The text exposition ([`CONTENT_TYPE`]): with `tenants`, one series per tenant (the
    /// admin's view); without, the same counters summed over tenants, with no tenant label
    /// (anyone's view).
    pub fn render(&self, tenants: bool) -> String {
        let mut out = String::new();
        let registry = if tenants { &self.admin } else { &self.public };
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
            tracing::error!(error = %e, "metrics could not be rendered");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_rendering_sums_over_tenants_and_names_none() {
        let m = Metrics::default();
        m.add("mysimbdp_ingested_total", "alice", "batch", "success", 3);
        m.add("mysimbdp_ingested_total", "bob", "batch", "success", 4);
        m.add("mysimbdp_http_rejected_total", "", "http", "busy", 1);
        let public = m.render(false);
        assert!(
            !public.contains("alice") && !public.contains("bob") && !public.contains("tenant="),
            "{public}"
        );
        assert!(
            public.contains("mysimbdp_ingested_total{source=\"batch\",status=\"success\"} 7"),
            "{public}"
        );
        let admin = m.render(true);
        assert!(
            admin.contains(
                "mysimbdp_ingested_total{tenant=\"alice\",source=\"batch\",status=\"success\"} 3"
            ),
            "{admin}"
        );
        assert!(
            admin.contains("mysimbdp_http_rejected_total{source=\"http\",status=\"busy\"} 1"),
            "{admin}"
        );
        assert_eq!(
            m.get("mysimbdp_ingested_total", "bob", "batch", "success"),
            4
        );
        assert_eq!(
            m.get("mysimbdp_ingested_total", "bob", "stream", "success"),
            0
        );
    }

    #[test]
    fn the_rendering_is_openmetrics_text_each_counter_declared_and_the_end_marked() {
        let m = Metrics::default();
        for (name, _) in COUNTERS {
            m.add(name, "a\"b\nc", "stream", "success", 2);
        }
        let admin = m.render(true);
        for (name, help) in COUNTERS {
            let family = name.strip_suffix("_total").unwrap_or(name);
            let declared = format!("# HELP {family} {help}.\n# TYPE {family} counter\n");
            assert!(admin.contains(&declared), "{admin}");
        }
        // A label value is escaped: a tenant name cannot forge a series.
        assert!(
            admin.contains(
                "mysimbdp_published_total{tenant=\"a\\\"b\\nc\",source=\"stream\",status=\"success\"} 2\n"
            ),
            "{admin}"
        );
        assert!(admin.ends_with("# EOF\n"), "{admin}");
    }
}
