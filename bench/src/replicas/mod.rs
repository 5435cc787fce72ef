//! The `replicas` scenario: coredms beside several batch and stream managers, each a process
//! of its own over one staging directory. Three phases, each on tenants of its own: the same
//! closed-loop stream load with 1, 2, … stream managers; one batch and one stream manager
//! killed (SIGKILL) while files and messages are in flight, then every input accounted for
//! from the database and the log; and a load step (low, high, low) on a tenant whose
//! consumers may range, sampled every second, beside the elastic controller's decisions.
//!
//! `throughput`, `kill` and `elastic` run the phases; `report` writes what they found.

mod elastic;
mod kill;
mod report;
mod throughput;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mysimbdp::api::StreamStatus;
use mysimbdp::client::{Client, ClientError};
use mysimbdp::config::Settings;
use mysimbdp::infra::Infra;
use mysimbdp::processes::{Manager, Replicas, SplitProcesses};
use mysimbdp::tenants::AdminPatch;

use crate::accounting;
use crate::deploy::{retry, transient};
use crate::host;
use crate::schema::{ReplicaLoad, Scenario};

use elastic::ElasticFigures;
use kill::KillOutcome;
use throughput::ThroughputStep;

/// How long a tenant's consumers may take to appear on every stream manager (they follow
/// the target within `stream.reconcile_ms`).
const CONSUMERS_WITHIN: Duration = Duration::from_secs(30);

/// The tenant's stream status from the manager `c` reaches; with `since`, the log's
/// entries counted from then on only (still an aggregate over the log in coredms: not cheap
/// on SecantusDB, so asked seldom).
async fn stream_status(
    c: &Client,
    tenant: &str,
    since: Option<&str>,
) -> Result<StreamStatus, ClientError> {
    match since {
        Some(s) => c.stream_status_since(tenant, s).await,
        None => c.stream_status(tenant).await,
    }
}

/// What every phase works with.
struct Run {
    procs: SplitProcesses,
    ns: String,
    admin: String,
    app: Option<String>,
    db: mongodb::Client,
    amqp_uri: String,
    timeout: Duration,
}

/// A tenant of the run, with the scenario's app as its batch and stream app.
struct Tenant {
    name: String,
    token: String,
    database: String,
}

impl Run {
    async fn tenant(&self, name: &str) -> Result<Tenant> {
        let admin = self.procs.client(Some(&self.admin));
        let t = retry(|| admin.create_tenant(name, AdminPatch::default()))
            .await
            .with_context(|| format!("creating tenant {name}"))?;
        let c = admin.with_token(Some(&t.token));
        if let Some(src) = &self.app {
            for kind in ["batch", "stream"] {
                retry(|| c.upload_app(&t.name, kind, src.as_str()))
                    .await
                    .with_context(|| format!("uploading {name}'s {kind} app"))?;
            }
        }
        Ok(Tenant {
            name: t.name,
            token: t.token,
            database: t.database,
        })
    }

    /// The tenant's client whose file requests go to batch manager `batch` and whose stream
    /// requests go to stream manager `stream`.
    fn client(&self, t: &Tenant, batch: usize, stream: usize) -> Result<Client> {
        self.procs
            .client_at(batch, stream, Some(&t.token))
            .with_context(|| format!("batch-{batch} or stream-{stream} is not running"))
    }

    /// A client for each running stream manager, in replica order.
    fn stream_clients(&self, t: &Tenant) -> Result<Vec<(usize, Client)>> {
        let batch = self.procs.running(Manager::Batch)[0];
        self.procs
            .running(Manager::Stream)
            .into_iter()
            .map(|s| Ok((s, self.client(t, batch, s)?)))
            .collect()
    }

    /// Waits until every running stream manager runs at least `n` of the tenant's
    /// consumers; their sum, or why not.
    async fn consumers_started(&self, t: &Tenant, n: u32) -> Result<u32, String> {
        let clients = self.stream_clients(t).map_err(|e| format!("{e:#}"))?;
        let until = Instant::now() + CONSUMERS_WITHIN;
        loop {
            let now = consumers(&clients, &t.name).await;
            if now.iter().all(|(_, c)| c.is_some_and(|c| c >= n)) {
                return Ok(now.iter().filter_map(|c| c.1).sum());
            }
            if Instant::now() > until {
                return Err(format!(
                    "consumers after {} s: {}",
                    CONSUMERS_WITHIN.as_secs(),
                    per_manager(&now)
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The tenant's consumers on each stream manager (`None`: no answer within 3 s), asked
/// with `since` = now so the answer costs no count of the log.
async fn consumers(clients: &[(usize, Client)], tenant: &str) -> Vec<(usize, Option<u32>)> {
    let now = rfc3339(time::OffsetDateTime::now_utc());
    let asks = clients.iter().map(|(i, c)| {
        let now = now.clone();
        async move {
            let s =
                tokio::time::timeout(Duration::from_secs(3), stream_status(c, tenant, Some(&now)))
                    .await;
            (*i, s.ok().and_then(Result::ok).map(|s| s.consumers))
        }
    });
    futures::future::join_all(asks).await
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `stream 1 / stream-1 2 / stream-2 ?`.
fn per_manager(c: &[(usize, Option<u32>)]) -> String {
    c.iter()
        .map(|(i, n)| {
            let n = n.map_or("?".to_owned(), |n| n.to_string());
            format!("{} {n}", manager_name("stream", *i))
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The name `SplitProcesses` gives a replica (its log file's name).
fn manager_name(component: &str, replica: usize) -> String {
    match replica {
        0 => component.to_owned(),
        n => format!("{component}-{n}"),
    }
}

/// NDJSON of messages `from..to`, as the other stream loads send them.
fn messages(from: u32, to: u32) -> Vec<u8> {
    (from..to)
        .flat_map(|seq| format!("{{\"seq\":{seq},\"v\":{}}}\n", seq % 97).into_bytes())
        .collect()
}

fn note(list: &mut Vec<String>, msg: String) {
    if list.len() < 5 && !list.contains(&msg) {
        list.push(msg);
    }
}

/// The stamps of a log download's entries: coredms stamps an entry when it writes it, after
/// its documents. `None` if the download is not a log.
fn entry_times(body: &[u8]) -> Option<Vec<time::OffsetDateTime>> {
    #[derive(serde::Deserialize)]
    struct Stamp<'a> {
        #[serde(borrow)]
        timestamp: &'a str,
    }
    let entries: Vec<Stamp> = serde_json::from_slice(body).ok()?;
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    Some(
        entries
            .iter()
            .filter_map(|e| time::OffsetDateTime::parse(e.timestamp, rfc3339).ok())
            .collect(),
    )
}

/// The time of a log download's latest entry.
fn last_entry_at(body: &[u8]) -> Option<time::OffsetDateTime> {
    entry_times(body)?.into_iter().max()
}

/// Runs the three phases and writes `<out>/<name>/<run>/report.{json,md}` and
/// `elastic.svg`.
pub async fn run(sc: &Scenario, load: &ReplicaLoad, out: &Path, run_id: &str) -> Result<PathBuf> {
    // Not the process id alone: a broker that outlives runs may hold an earlier run's.
    let ns = format!("rp{:06x}_", crate::host::rand_u32() & 0xffffff);
    let staging = std::env::temp_dir().join(format!("mysimbdp-replicas-{ns}"));
    let admin = format!("replicas-admin-{:010}", std::process::id());
    let p = &sc.platform;
    let mut overrides = vec![
        format!("platform.namespace={ns}"),
        format!("staging.dir={}", staging.display()),
        format!("auth.admin_token={admin}"),
        format!("batch.batch_size={}", p.batch_size),
        format!("batch.workers={}", p.batch_workers),
        format!("stream.batch_size={}", p.stream_batch_size),
        format!("stream.prefetch={}", p.prefetch),
        format!("stream.linger_ms={}", p.stream_linger_ms),
        format!("mongodb.write_concern=\"{}\"", p.write_concern),
        format!("mongodb.journal={}", p.journal),
        "mongodb.max_pool_size=4".into(),
        // A killed batch manager's jobs pass to the others once its lease expires: short
        // here, so the kill phase measures the takeover, not the default 30 s lease.
        "batch.lease_ms=3000".into(),
        mysimbdp::testing::expiring_queues(),
    ];
    overrides.extend(load.set.iter().cloned());
    let settings = Settings::load(None, &overrides)?;
    if settings.mongodb.uri.is_empty() || settings.amqp.uri.is_empty() {
        bail!(
            "the replicas scenario needs MONGODB_URI and AMQP_URI: {}",
            mysimbdp::infra::HOW_TO_PROVIDE
        );
    }
    let infra = Infra::provision(&settings).await?;
    let exe = std::env::current_exe().context("cannot find the scenario executable")?;
    eprintln!(
        "scenario {}: coredms, {} batch managers, 1 stream manager to start with",
        sc.name, load.batch_managers
    );
    let procs = SplitProcesses::start_replicas(
        &exe,
        &overrides,
        &infra,
        &staging.with_extension("logs"),
        Replicas {
            batch: load.batch_managers as usize,
            stream: 1,
        },
    )
    .await?;
    let mut run = Run {
        procs,
        ns,
        admin,
        app: sc
            .plans()?
            .first()
            .and_then(|g| g.app.source())
            .map(str::to_owned),
        db: mongodb::Client::with_uri_str(&infra.mongodb_uri).await?,
        amqp_uri: infra.amqp_uri.clone(),
        timeout: Duration::from_secs(sc.timeout_s),
    };
    let load_before = host::load_average();
    let measured = phases(&mut run, load).await;
    let stopped = run.procs.stop().await;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(staging.with_extension("logs"));
    let (steps, killed, elastic) = measured?;
    let errors: Vec<String> = stopped
        .err()
        .map(|e| accounting::strip_ansi(&format!("{e:#}")))
        .into_iter()
        .collect();
    let dir = out.join(&sc.name).join(run_id);
    std::fs::create_dir_all(&dir)?;
    let mut accounts: Vec<serde_json::Value> = report::unfinished_steps(&steps, &elastic);
    for a in &killed.accounts {
        accounts.push(serde_json::to_value(a)?);
    }
    let json = serde_json::json!({
        "schema_version": crate::report::SCHEMA_VERSION,
        "scenario": sc.name,
        "run_id": run_id,
        "environment": report::environment(&infra.versions, sc, load_before),
        "load": load,
        "throughput": steps,
        // Read by `--strict` as a fault's figures, like the faults scenario's.
        "faults": [killed.figures],
        "elastic": elastic,
        // Read by `scenario run`: the kill phase's tenant, and any step that did not finish.
        "accounting": accounts,
        "platform_errors": errors,
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
    let svg = report::elastic_svg(&elastic)?;
    std::fs::write(dir.join("elastic.svg"), svg)?;
    std::fs::write(
        dir.join("report.md"),
        report::markdown(
            sc,
            run_id,
            &infra.versions,
            &steps,
            &killed.figures,
            &elastic,
            load_before,
        ),
    )?;
    Ok(dir)
}

async fn phases(
    run: &mut Run,
    load: &ReplicaLoad,
) -> Result<(Vec<ThroughputStep>, KillOutcome, ElasticFigures)> {
    let managers = load.stream_managers as usize;
    let steps = throughput::run(run, &load.throughput, managers).await?;
    let killed = kill::run(run, &load.kill).await?;
    let f = &killed.figures;
    eprintln!(
        "kill: batch {}/{} stored, {} failed, {} lost; stream {}/{} stored, {} failed, {} lost; duplicated {} + {}, unlogged {} + {}, logged twice {}; done {:.1} s after the kill",
        f.batch.stored,
        f.batch.offered,
        f.batch.failed,
        f.batch.lost,
        f.stream.stored,
        f.stream.offered,
        f.stream.failed,
        f.stream.lost,
        f.batch_duplicated,
        f.stream_duplicated,
        f.batch_unlogged,
        f.stream_unlogged,
        f.logged_twice,
        f.recovered_s
    );
    let e = elastic::run(run, &load.elastic, managers).await?;
    eprintln!(
        "elastic: consumers {} → {} → back at {:?} s; deepest queue {}; {} decisions",
        e.summary.min_total,
        e.summary.peak_total,
        e.summary.back_down_at_s,
        e.summary.max_ready,
        e.decisions.len()
    );
    Ok((steps, killed, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_entry_is_the_latest_stamp_not_the_last_in_the_download() {
        let log = serde_json::json!([
            {"timestamp": "2026-12-02T06:00:01.250Z", "status": "success"},
            {"timestamp": "2026-12-02T06:00:03.500Z", "status": "success"},
            {"timestamp": "2026-12-02T06:00:02Z", "status": "failure"},
        ]);
        let at = last_entry_at(log.to_string().as_bytes()).expect("a stamp");
        assert_eq!(rfc3339(at), "2026-12-02T06:00:03.5Z");
        assert_eq!(last_entry_at(b"[]"), None);
        assert_eq!(last_entry_at(b"not json"), None);
    }
}
