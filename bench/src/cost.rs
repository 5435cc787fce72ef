//! The `tenants` scenario: what each tenant with a running consumer costs the platform.
//! Tenants are created in steps; at each step every tenant has one consumer and publishes a
//! trickle of messages, and the platform's resident memory, threads and broker connections
//! are measured: idle before any tenant, with the consumers started, after the trickle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use mysimbdp::client::Client;
use mysimbdp::tenants::AdminPatch;
use serde::Serialize;

use crate::deploy::{Deployment, retry};
use crate::host;
use crate::schema::{CostLoad, Scenario};

/// How long the platform settles before a sample (consumers started, messages acked).
const SETTLE: Duration = Duration::from_secs(3);

/// One process of the platform at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessSample {
    pub process: String,
    pub rss_bytes: u64,
    pub threads: u64,
}

/// The platform at one moment: its processes, and its connections and channels as the
/// broker lists them.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub processes: Vec<ProcessSample>,
    pub rss_bytes: u64,
    pub threads: u64,
    pub amqp_connections: u64,
    /// The stream consumers' shared connections among them.
    pub consumer_connections: u64,
    pub amqp_channels: u64,
}

/// One step: its tenants, how long setting them up took, the platform with their consumers
/// idle and after their trickle, and what was stored.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub tenants: u32,
    /// Tenants created in this step, and the time it took (`concurrency` at once).
    pub created: u32,
    pub create_s: f64,
    pub start_s: f64,
    pub with_consumers: Sample,
    /// From the first publish of the step to every message stored.
    pub trickle_s: f64,
    pub after_trickle: Sample,
    pub messages_expected: u64,
    pub messages_stored: u64,
    /// Tenants holding fewer documents than they published.
    pub tenants_short: u32,
    /// (RSS with the consumers idle − idle RSS) / tenants.
    pub idle_cost_per_tenant_bytes: u64,
    /// (RSS after the trickle − idle RSS) / tenants.
    pub cost_per_tenant_bytes: u64,
    /// Once the tenants were quiet for `platform.idle_vm_ms` (their app VMs dropped).
    pub after_quiet: Sample,
    /// (RSS once quiet − idle RSS) / tenants.
    pub quiet_cost_per_tenant_bytes: u64,
}

/// The namespace's connections as RabbitMQ lists them: (connections, consumer connections,
/// channels). Needs `rabbitmqctl`.
fn broker_connections(namespace: &str) -> Result<(u64, u64, u64)> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers"])
        .args(["channels", "client_properties"])
        .output()
        .context("counting the broker's connections needs rabbitmqctl")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl list_connections: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let (mut conns, mut consumers, mut channels) = (0, 0, 0);
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(namespace))
    {
        conns += 1;
        consumers += u64::from(line.contains("mysimbdp-consumers-"));
        channels += line
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok((conns, consumers, channels))
}

fn sample(deployment: &Deployment, namespace: &str) -> Result<Sample> {
    let processes: Vec<ProcessSample> = deployment
        .processes()
        .into_iter()
        .filter_map(|(process, pid)| {
            let (rss_bytes, threads) = host::rss_and_threads(pid)?;
            Some(ProcessSample {
                process,
                rss_bytes,
                threads,
            })
        })
        .collect();
    let (amqp_connections, consumer_connections, amqp_channels) = broker_connections(namespace)?;
    Ok(Sample {
        rss_bytes: processes.iter().map(|p| p.rss_bytes).sum(),
        threads: processes.iter().map(|p| p.threads).sum(),
        processes,
        amqp_connections,
        consumer_connections,
        amqp_channels,
    })
}

/// A tenant of the run: its name, its client, the documents it should hold.
struct Tenant {
    name: String,
    client: Client,
    db: String,
    expected: u64,
}

/// Runs `f` over `items`, `concurrency` at once, failing on the first error.
async fn bounded<I, T, F, Fut>(items: I, concurrency: u32, f: F) -> Result<Vec<T>>
where
    I: IntoIterator,
    F: FnMut(I::Item) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    futures::stream::iter(items)
        .map(f)
        .buffer_unordered(concurrency as usize)
        .try_collect()
        .await
}

/// Documents in each tenant's `messages` collection, counted `concurrency` at once.
async fn stored(db: &mongodb::Client, tenants: &[Tenant], concurrency: u32) -> Result<Vec<u64>> {
    futures::stream::iter(tenants)
        .map(|t| async move {
            let n = db
                .database(&t.db)
                .collection::<mongodb::bson::Document>("messages")
                .count_documents(mongodb::bson::doc! {})
                .await?;
            Ok::<_, anyhow::Error>(n)
        })
        .buffered(concurrency as usize)
        .try_collect()
        .await
}

/// Adds tenants up to `count`, each with `app` as its stream app (if any), starts a consumer
/// for each new one, and samples the platform.
async fn grow(
    deployment: &Deployment,
    ns: &str,
    load: &CostLoad,
    app: Option<&str>,
    tenants: &mut Vec<Tenant>,
    count: u32,
) -> Result<(u32, f64, f64, Sample)> {
    let from = tenants.len() as u32;
    let began = Instant::now();
    let admin = &deployment.admin;
    let mut created = bounded(from..count, load.concurrency, |i| async move {
        let name = format!("c{i:05}");
        let t = retry(|| admin.create_tenant(&name, AdminPatch::default()))
            .await
            .with_context(|| format!("creating tenant {name}"))?;
        let client = admin.with_token(Some(&t.token));
        if let Some(src) = app {
            retry(|| client.upload_app(&t.name, "stream", src))
                .await
                .with_context(|| format!("uploading {name}'s stream app"))?;
        }
        Ok(Tenant {
            db: format!("{ns}tenant_{}", t.name),
            client,
            name: t.name,
            expected: 0,
        })
    })
    .await?;
    let create_s = began.elapsed().as_secs_f64();
    let began = Instant::now();
    bounded(&created, load.concurrency, |t| async move {
        retry(|| t.client.stream_start(&t.name, 1))
            .await
            .with_context(|| format!("starting {}'s consumer", t.name))?;
        Ok(())
    })
    .await?;
    let start_s = began.elapsed().as_secs_f64();
    tenants.append(&mut created);
    tokio::time::sleep(SETTLE).await;
    Ok((count - from, create_s, start_s, sample(deployment, ns)?))
}

/// Every tenant publishes its trickle; returns once every one holds what it published, or
/// at `timeout`: (seconds, stored per tenant).
async fn trickle(
    db: &mongodb::Client,
    load: &CostLoad,
    tenants: &mut [Tenant],
    step: usize,
    timeout: Duration,
) -> Result<(f64, Vec<u64>)> {
    let began = Instant::now();
    let body: Vec<u8> = (0..load.messages)
        .flat_map(|k| format!("{{\"step\":{step},\"seq\":{k}}}\n").into_bytes())
        .collect();
    let body = &body;
    bounded(&*tenants, load.concurrency, |t| async move {
        retry(|| t.client.publish(&t.name, "trickle", body.clone()))
            .await
            .with_context(|| format!("publishing {}'s trickle", t.name))?;
        Ok(())
    })
    .await?;
    for t in tenants.iter_mut() {
        t.expected += u64::from(load.messages);
    }
    loop {
        let counts = stored(db, tenants, load.concurrency).await?;
        let done = counts.iter().zip(&*tenants).all(|(n, t)| *n >= t.expected);
        if done || began.elapsed() > timeout {
            return Ok((began.elapsed().as_secs_f64(), counts));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the scenario's steps and writes `<out>/<name>/<run>/report.{json,md}`.
pub async fn run(sc: &Scenario, load: &CostLoad, out: &Path, run_id: &str) -> Result<PathBuf> {
    // Not the process id alone: a broker that outlives runs may hold an earlier run's.
    let ns = format!("tc{:06x}_", crate::host::rand_u32() & 0xffffff);
    let staging = std::env::temp_dir().join(format!("mysimbdp-tenants-{ns}"));
    let admin = format!("tenants-admin-{:010}", std::process::id());
    let mut overrides = vec![
        format!("platform.namespace={ns}"),
        format!("staging.dir={}", staging.display()),
        format!("auth.admin_token={admin}"),
        format!("stream.batch_size={}", sc.platform.stream_batch_size),
        format!("stream.prefetch={}", sc.platform.prefetch),
        format!("stream.linger_ms={}", sc.platform.stream_linger_ms),
        format!("mongodb.write_concern=\"{}\"", sc.platform.write_concern),
        format!("mongodb.journal={}", sc.platform.journal),
        "mongodb.max_pool_size=4".into(),
        mysimbdp::testing::expiring_queues(),
    ];
    overrides.extend(load.set.iter().cloned());
    eprintln!(
        "scenario {}: provisioning, platform {}",
        sc.name, sc.platform.topology
    );
    let deployment = Deployment::start(sc.platform.topology, overrides, &admin).await?;
    let versions = deployment.versions.clone();
    let measured = measure(sc, load, &deployment, &ns).await;
    let stopped = deployment.stop().await;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(staging.with_extension("logs"));
    let (idle, steps, short) = measured?;
    let errors: Vec<String> = stopped
        .err()
        .map(|e| crate::accounting::strip_ansi(&format!("{e:#}")))
        .into_iter()
        .collect();
    let dir = out.join(&sc.name).join(run_id);
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::json!({
        "schema_version": crate::report::SCHEMA_VERSION,
        "scenario": sc.name,
        "run_id": run_id,
        "environment": {
            "mongodb_version": versions.mongodb,
            "mongodb_server": versions.mongodb_server,
            "rabbitmq": versions.rabbitmq,
            "cores": host::cores(),
            "memory_bytes": host::memory_bytes(),
            "commit": host::commit(),
            "build": host::build(),
            "topology": sc.platform.topology.to_string(),
        },
        "load": load,
        "idle": idle,
        "steps": steps,
        // Read by `scenario run`: tenants whose trickle was not all stored.
        "accounting": short,
        "platform_errors": errors,
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(
        dir.join("report.md"),
        markdown(sc, run_id, &versions, &idle, &steps),
    )?;
    Ok(dir)
}

/// Idle, then each step: (the idle sample, the steps, an `accounting` entry per tenant whose
/// trickle was not all stored).
async fn measure(
    sc: &Scenario,
    load: &CostLoad,
    deployment: &Deployment,
    ns: &str,
) -> Result<(Sample, Vec<Step>, Vec<serde_json::Value>)> {
    let db = mongodb::Client::with_uri_str(&deployment.mongodb_uri).await?;
    let plans = sc.plans()?;
    let app = plans.first().and_then(|p| p.app.source());
    tokio::time::sleep(SETTLE).await;
    let idle = sample(deployment, ns)?;
    eprintln!(
        "idle: {:.1} MiB, {} threads, {} AMQP connections",
        mib(idle.rss_bytes),
        idle.threads,
        idle.amqp_connections
    );
    let (mut tenants, mut steps, mut short) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &count) in load.steps.iter().enumerate() {
        let (created, create_s, start_s, with_consumers) =
            grow(deployment, ns, load, app, &mut tenants, count).await?;
        let timeout = Duration::from_secs(sc.timeout_s);
        let (trickle_s, counts) = trickle(&db, load, &mut tenants, i, timeout).await?;
        tokio::time::sleep(SETTLE).await;
        let after_trickle = sample(deployment, ns)?;
        // The platform drops a quiet app's VMs after `platform.idle_vm_ms` (swept every
        // second): what a tenant costs between trickles.
        let quiet = Duration::from_millis(mysimbdp::config::PlatformSettings::default().idle_vm_ms);
        tokio::time::sleep(quiet.saturating_sub(SETTLE) + Duration::from_secs(2)).await;
        let after_quiet = sample(deployment, ns)?;
        let mut tenants_short = 0;
        for (t, n) in tenants
            .iter()
            .zip(&counts)
            .filter(|(t, n)| **n < t.expected)
        {
            tenants_short += 1;
            short.push(serde_json::json!({
                "phase": format!("{count} tenants"),
                "tenant": t.name,
                "path": "stream",
                "unfinished": format!("{n} of {} messages stored", t.expected),
            }));
        }
        let per_tenant = |s: &Sample| s.rss_bytes.saturating_sub(idle.rss_bytes) / u64::from(count);
        let step = Step {
            tenants: count,
            created,
            create_s,
            start_s,
            idle_cost_per_tenant_bytes: per_tenant(&with_consumers),
            cost_per_tenant_bytes: per_tenant(&after_trickle),
            quiet_cost_per_tenant_bytes: per_tenant(&after_quiet),
            after_quiet,
            with_consumers,
            trickle_s,
            after_trickle,
            messages_expected: tenants.iter().map(|t| t.expected).sum(),
            messages_stored: counts.iter().sum(),
            tenants_short,
        };
        eprintln!(
            "{count} tenants: created in {:.1} s, consumers in {:.1} s, trickle stored in {:.1} s; {:.1} MiB ({:.0} KiB per tenant), once quiet {:.1} MiB ({:.0} KiB per tenant), {} threads, {} AMQP connections, {} channels; {}/{} messages stored",
            step.create_s,
            step.start_s,
            step.trickle_s,
            mib(step.after_trickle.rss_bytes),
            step.cost_per_tenant_bytes as f64 / 1024.0,
            mib(step.after_quiet.rss_bytes),
            step.quiet_cost_per_tenant_bytes as f64 / 1024.0,
            step.after_trickle.threads,
            step.after_trickle.amqp_connections,
            step.after_trickle.amqp_channels,
            step.messages_stored,
            step.messages_expected
        );
        steps.push(step);
    }
    Ok((idle, steps, short))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

fn processes_line(s: &Sample) -> String {
    s.processes
        .iter()
        .map(|p| {
            format!(
                "{} {:.1} MiB, {} threads",
                p.process,
                mib(p.rss_bytes),
                p.threads
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn markdown(
    sc: &Scenario,
    run_id: &str,
    versions: &mysimbdp::infra::ServerVersions,
    idle: &Sample,
    steps: &[Step],
) -> String {
    let mut md = format!(
        "# Scenario `{}` — run {run_id}\n\n{}\n\nPlatform: {} ({} build, commit {}, {} cores); database: {}; broker: RabbitMQ {}. Memory is the resident size (VmRSS) of the platform's processes, summed; connections and channels are the platform's as `rabbitmqctl list_connections` shows them.\n\nIdle (no tenant): {:.1} MiB, {} threads, {} AMQP connections ({}).\n\n",
        sc.name,
        sc.description,
        sc.platform.topology,
        host::build(),
        host::commit(),
        host::cores(),
        versions.mongodb_server,
        versions.rabbitmq,
        mib(idle.rss_bytes),
        idle.threads,
        idle.amqp_connections,
        processes_line(idle),
    );
    md.push_str("| tenants | created in s | consumers started in s | trickle stored in s | RSS, consumers idle (MiB) | per tenant (KiB) | RSS after trickle (MiB) | per tenant (KiB) | RSS once quiet (MiB) | per tenant (KiB) | threads | AMQP connections (consumers') | channels | messages stored / published |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in steps {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} | {:.1} | {:.0} | {} | {} ({}) | {} | {} / {} |\n",
            s.tenants,
            s.create_s,
            s.start_s,
            s.trickle_s,
            mib(s.with_consumers.rss_bytes),
            s.idle_cost_per_tenant_bytes as f64 / 1024.0,
            mib(s.after_trickle.rss_bytes),
            s.cost_per_tenant_bytes as f64 / 1024.0,
            mib(s.after_quiet.rss_bytes),
            s.quiet_cost_per_tenant_bytes as f64 / 1024.0,
            s.after_trickle.threads,
            s.after_trickle.amqp_connections,
            s.after_trickle.consumer_connections,
            s.after_trickle.amqp_channels,
            s.messages_stored,
            s.messages_expected,
        ));
    }
    md.push_str(&format!("\nPer tenant: the RSS above the idle platform's, divided by the tenants. Created in: the step's new tenants only. Once quiet: {} s after the trickle, when the platform has dropped the tenants' idle app VMs (`platform.idle_vm_ms`).\n\nAfter the trickle, by process:\n\n", mysimbdp::config::PlatformSettings::default().idle_vm_ms / 1000 + 2));
    for s in steps {
        md.push_str(&format!(
            "- {} tenants: {}\n",
            s.tenants,
            processes_line(&s.after_trickle)
        ));
    }
    md
}
