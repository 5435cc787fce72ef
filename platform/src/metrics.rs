//! Prometheus metrics: counters labelled by tenant, source and outcome (bounded cardinality:
//! never a document or message id), rendered in the text exposition format.
//!
//! Tenant names are the operator's business: the public rendering sums over tenants and has
//! no `tenant` label; the admin's has one per tenant (see `GET /metrics` in `http`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

type Key = (&'static str, String, &'static str, &'static str);

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<BTreeMap<Key, u64>>,
}

/// What each counter means, for the `# HELP` lines.
const HELP: &[(&str, &str)] = &[
    (
        "mysimbdp_ingested_total",
        "Ingestions by tenant, source and status.",
    ),
    (
        "mysimbdp_ingested_bytes_total",
        "Bytes of stored records by tenant and source.",
    ),
    (
        "mysimbdp_published_total",
        "Messages published through the data broker.",
    ),
    (
        "mysimbdp_dead_lettered_total",
        "Stream messages moved to the dead-letter queue.",
    ),
    (
        "mysimbdp_http_rejected_total",
        "HTTP requests refused or cut off, by reason (tenant_limit, busy, body_timeout, request_timeout).",
    ),
];

impl Metrics {
    pub fn add(
        &self,
        name: &'static str,
        tenant: &str,
        source: &'static str,
        status: &'static str,
        n: u64,
    ) {
        if n == 0 {
            return;
        }
        if let Ok(mut c) = self.counters.lock() {
            *c.entry((name, tenant.to_owned(), source, status))
                .or_default() += n;
        }
    }

    /// The value of one counter; 0 if it was never bumped.
    pub fn get(
        &self,
        name: &'static str,
        tenant: &str,
        source: &'static str,
        status: &'static str,
    ) -> u64 {
        self.counters.lock().map_or(0, |c| {
            c.get(&(name, tenant.to_owned(), source, status))
                .copied()
                .unwrap_or(0)
        })
    }

    /// The text exposition: with `tenants`, one series per tenant (the admin's view);
    /// without, the same counters summed over tenants, with no tenant label (anyone's view).
    pub fn render(&self, tenants: bool) -> String {
        let mut out = String::new();
        let Ok(c) = self.counters.lock() else {
            return out;
        };
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let mut series: BTreeMap<(&str, &str, &str), u64> = BTreeMap::new();
            for ((n, tenant, source, status), v) in c.iter() {
                if n == name {
                    let tenant = if tenants { tenant.as_str() } else { "" };
                    *series.entry((tenant, source, status)).or_default() += v;
                }
            }
            for ((tenant, source, status), v) in series {
                let tenant = if tenant.is_empty() {
                    String::new()
                } else {
                    format!("tenant=\"{tenant}\",")
                };
                let _ = writeln!(
                    out,
                    "{name}{{{tenant}source=\"{source}\",status=\"{status}\"}} {v}"
                );
            }
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
            !public.contains("alice") && !public.contains("bob") && !public.contains("tenant=")
        );
        assert!(
            public.contains("mysimbdp_ingested_total{source=\"batch\",status=\"success\"} 7"),
            "{public}"
        );
        let admin = m.render(true);
        assert!(admin.contains(
            "mysimbdp_ingested_total{tenant=\"alice\",source=\"batch\",status=\"success\"} 3"
        ));
        assert!(
            admin.contains("mysimbdp_http_rejected_total{source=\"http\",status=\"busy\"} 1"),
            "{admin}"
        );
    }
}
