//! Prometheus metrics: counters labelled by tenant, source and outcome (bounded cardinality:
//! never a document or message id), rendered in the text exposition format.

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

    pub fn render(&self) -> String {
        let mut out = String::new();
        let Ok(c) = self.counters.lock() else {
            return out;
        };
        for (name, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((n, tenant, source, status), v) in c.iter() {
                if n == name {
                    let _ = writeln!(
                        out,
                        "{name}{{tenant=\"{tenant}\",source=\"{source}\",status=\"{status}\"}} {v}"
                    );
                }
            }
        }
        out
    }
}
