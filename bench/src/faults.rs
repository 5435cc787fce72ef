//! The `faults` scenario: each fault injected while batch and stream load run, then the
//! figures that matter: offered, stored, duplicated, lost, and the time to recover.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mysimbdp::client::Client;
use mysimbdp::config::Settings;
use mysimbdp::model::FileState;
use mysimbdp::tenants::AdminPatch;
use mysimbdp::testing::{
    InProcess, MONGOD_COMMAND_VAR, OwnMongo, Runtime, cut_connections, messages_stored,
};
use serde::{Deserialize, Serialize};

use crate::host;
use crate::schema::FaultLoad;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultFigures {
    pub fault: String,
    pub stream_offered: u64,
    pub stream_stored: u64,
    pub stream_duplicated: u64,
    pub stream_lost: u64,
    pub batch_offered: u64,
    pub batch_stored: u64,
    pub batch_lost: u64,
    /// Batch records and stored stream messages without any log entry, and log entries
    /// written twice (all must be 0: every input accounted for in the log, once).
    #[serde(default)]
    pub batch_unlogged: u64,
    #[serde(default)]
    pub stream_unlogged: u64,
    #[serde(default)]
    pub logged_twice: u64,
    /// From the fault to the first document stored after it.
    pub recovery_ms: u64,
    pub total_s: f64,
}

/// (stream documents, distinct stream messages, batch documents) stored for a tenant.
async fn counts(uri: &str, db: &str) -> (u64, u64, u64) {
    let (total, distinct) = messages_stored(uri, db).await;
    let Ok(c) = mongodb::Client::with_uri_str(uri).await else {
        return (total, distinct, 0);
    };
    let batch = c
        .database(db)
        .collection::<mongodb::bson::Document>("data")
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap_or(0);
    (total, distinct, batch)
}

/// The ids of the stream messages a tenant's `messages` collection holds documents of.
async fn stored_messages(uri: &str, db: &str) -> Result<std::collections::HashSet<String>> {
    use futures::TryStreamExt;
    let c = mongodb::Client::with_uri_str(uri).await?;
    let mut cursor = c
        .database(db)
        .collection::<mongodb::bson::Document>("messages")
        .find(mongodb::bson::doc! {})
        .projection(mongodb::bson::doc! {"_id": 1})
        .await?;
    let mut ids = std::collections::HashSet::new();
    while let Some(d) = cursor.try_next().await? {
        if let Some((m, _)) = d.get_str("_id").ok().and_then(crate::accounting::split_id) {
            ids.insert(m.to_owned());
        }
    }
    Ok(ids)
}

/// Retries an API call while the platform restarts or reconnects (no answer, or 503):
/// every 100 ms for up to a minute.
async fn retry<T, F, Fut>(f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, mysimbdp::client::ClientError>>,
{
    use backon::{ConstantBuilder, Retryable};
    let every = ConstantBuilder::new()
        .with_delay(Duration::from_millis(100))
        .with_max_times(599);
    Ok(f.retry(every)
        .sleep(tokio::time::sleep)
        .when(|e| e.status().is_none_or(|s| s.as_u16() == 503))
        .await?)
}

async fn one_fault(
    kind: &str,
    load: &FaultLoad,
    base_settings: &Settings,
    dataset: &[u8],
) -> Result<FaultFigures> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let ns = format!("f{:06x}_", nanos & 0xffffff);
    let staging = std::env::temp_dir().join(format!("mysimbdp-faults-{ns}"));
    let mut db = None;
    let mut settings = base_settings.clone();
    if kind == "db-restart" {
        let command = std::env::var(MONGOD_COMMAND_VAR)
            .context("db-restart needs MYSIMBDP_TEST_MONGOD: a command starting a MongoDB server on {port} with data in {dir}")?;
        let dir = std::env::temp_dir().join(format!("mysimbdp-faults-db-{ns}"));
        let d = OwnMongo::start(command, dir).await?;
        settings.mongodb.uri = d.uri();
        db = Some(d);
    }
    settings.platform.namespace = ns.clone();
    settings.amqp.queue_expires_ms = mysimbdp::testing::QUEUE_EXPIRES_MS;
    settings.staging.dir = staging.clone();
    let uri = settings.mongodb.uri.clone();
    // A runtime of its own, so the platform can be killed; restarted on the same port.
    let own = Runtime::Own { workers: 2 };
    let mut platform = InProcess::start(settings.clone(), 0, own).await?;
    let port = platform.addr.port();
    let admin = Client::new(&platform.url(), Some(&settings.auth.admin_token));
    let t = admin.create_tenant("faulty", AdminPatch::default()).await?;
    let c = admin.with_token(Some(&t.token));
    let tdb = format!("{ns}tenant_faulty");
    c.upload_file(&t.name, "data.csv", dataset.to_vec()).await?;
    c.ingest(&t.name, "data.csv").await?;
    c.stream_start(&t.name, 1).await?;
    let batch_offered = dataset.iter().filter(|b| **b == b'\n').count() as u64 - 1;

    // Offered load: requests of 20 messages at the fixed rate, retried through the fault.
    let (rate, total) = (load.rate.max(1), load.messages);
    let pc = c.clone();
    let tn = t.name.clone();
    let publisher = tokio::spawn(async move {
        let per = 20u32;
        let interval = Duration::from_secs_f64(f64::from(per) / f64::from(rate));
        let t0 = tokio::time::Instant::now();
        let mut k = 0u32;
        while k * per < total {
            tokio::time::sleep_until(t0 + interval * k).await;
            let body: Vec<u8> = (k * per..((k + 1) * per).min(total))
                .flat_map(|i| format!("{{\"seq\":{i}}}\n").into_bytes())
                .collect();
            // One key per request: a retry after a lost confirm republishes the same ids.
            let key = format!("req-{k}");
            retry(|| pc.publish_idempotent(&tn, "reading", &key, body.clone())).await?;
            k += 1;
        }
        Ok::<_, anyhow::Error>(())
    });

    tokio::time::sleep(Duration::from_secs(load.fault_after_s)).await;
    let started = Instant::now();
    let (_, before, _) = counts(&uri, &tdb).await;
    let fault_at = Instant::now();
    match kind {
        "kill-platform" => {
            platform.kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            platform = InProcess::start(settings.clone(), port, own).await?;
            retry(|| c.stream_start(&t.name, 1)).await?;
        }
        "broker-cut" => {
            let n =
                cut_connections(&ns, "faults scenario").context("broker-cut needs rabbitmqctl")?;
            if n == 0 {
                bail!("broker-cut found no connection of this platform to close");
            }
        }
        "db-restart" => {
            let d = db.as_mut().context("own database")?;
            d.stop();
            tokio::time::sleep(Duration::from_secs(3)).await;
            d.restart().await?;
        }
        other => bail!("unknown fault `{other}`: use kill-platform, broker-cut or db-restart"),
    }
    let mut recovery = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (total_docs, distinct, batch) = counts(&uri, &tdb).await;
        if recovery.is_none() && distinct > before {
            recovery = Some(fault_at.elapsed());
        }
        let file_done = c
            .file(&t.name, "data.csv")
            .await
            .is_ok_and(|f| matches!(f.state, FileState::Done | FileState::Failed));
        if (distinct >= u64::from(total) && file_done && publisher.is_finished())
            || Instant::now() > deadline
        {
            let _ = total_docs;
            let _ = batch;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publisher.await??;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (total_docs, distinct, batch) = counts(&uri, &tdb).await;
    let _ = c.stream_stop(&t.name).await;
    let log = retry(|| c.logs_raw(&t.name, "")).await?;
    let job = retry(|| c.file(&t.name, "data.csv")).await?.job;
    let cover = crate::accounting::coverage(
        &log.body,
        &[(job, batch_offered)].into(),
        &stored_messages(&uri, &tdb).await?,
    )?;
    drop(platform);
    let _ = std::fs::remove_dir_all(&staging);
    Ok(FaultFigures {
        fault: kind.to_owned(),
        stream_offered: u64::from(total),
        stream_stored: distinct,
        stream_duplicated: total_docs.saturating_sub(distinct),
        stream_lost: u64::from(total).saturating_sub(distinct),
        batch_offered,
        batch_stored: batch,
        batch_lost: batch_offered.saturating_sub(batch),
        batch_unlogged: cover.batch_unlogged,
        stream_unlogged: cover.stream_unlogged,
        logged_twice: cover.logged_twice,
        recovery_ms: recovery.map_or(u64::MAX, |d| d.as_millis() as u64),
        total_s: started.elapsed().as_secs_f64(),
    })
}

/// Runs every fault of the scenario and writes `reports/<name>/<run>/report.{json,md}`.
pub async fn run(
    name: &str,
    description: &str,
    load: &FaultLoad,
    out: &Path,
    run_id: &str,
) -> Result<PathBuf> {
    let admin = format!("faults-admin-{:010}", std::process::id());
    let settings = Settings::load(
        None,
        &[
            format!("auth.admin_token={admin}"),
            "stream.batch_size=100".into(),
            "batch.batch_size=250".into(),
            "batch.workers=1".into(),
            // A killed platform's jobs are resumed once their lease expires: short here, so
            // recovery measures the platform, not the default 30 s lease.
            "batch.lease_ms=3000".into(),
            "mongodb.max_pool_size=4".into(),
        ],
    )?;
    if settings.mongodb.uri.is_empty() || settings.amqp.uri.is_empty() {
        bail!(
            "the faults scenario needs MONGODB_URI and AMQP_URI: {}",
            mysimbdp::infra::HOW_TO_PROVIDE
        );
    }
    let versions = mysimbdp::infra::Infra::provision(&settings)
        .await?
        .versions
        .clone();
    let dataset = std::fs::read(&load.dataset)
        .with_context(|| format!("cannot read {}", load.dataset.display()))?;
    let mut figures = Vec::new();
    for kind in &load.kinds {
        eprintln!("fault {kind}: running");
        let f = one_fault(kind, load, &settings, &dataset).await?;
        eprintln!(
            "fault {kind}: stream {}/{} stored, {} duplicated, {} lost; batch {}/{}; unlogged {} + {}, logged twice {}; recovered in {} ms",
            f.stream_stored,
            f.stream_offered,
            f.stream_duplicated,
            f.stream_lost,
            f.batch_stored,
            f.batch_offered,
            f.batch_unlogged,
            f.stream_unlogged,
            f.logged_twice,
            f.recovery_ms
        );
        figures.push(f);
    }
    let dir = out.join(name).join(run_id);
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::json!({
        "schema_version": crate::report::SCHEMA_VERSION,
        "scenario": name,
        "run_id": run_id,
        "environment": {
            "mongodb_version": versions.mongodb,
            "mongodb_server": versions.mongodb_server,
            "rabbitmq": versions.rabbitmq,
            "cores": host::cores(),
        },
        "load": load,
        "faults": figures,
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&json)?)?;
    let mut md = format!(
        "# Scenario `{name}` — run {run_id}\n\n{description}\n\nServer: {}; broker: {}.\n\n| fault | stream offered | stored | duplicated | lost | without log entry | batch offered | stored | lost | without log entry | entries twice | recovery ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        versions.mongodb_server, versions.rabbitmq
    );
    for f in &figures {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            f.fault,
            f.stream_offered,
            f.stream_stored,
            f.stream_duplicated,
            f.stream_lost,
            f.stream_unlogged,
            f.batch_offered,
            f.batch_stored,
            f.batch_lost,
            f.batch_unlogged,
            f.logged_twice,
            f.recovery_ms
        ));
    }
    md.push_str("\nRecovery: from the fault to the first new stream document stored after it. Duplicated: documents beyond one per message. Without log entry: batch records, or stored stream messages, that no log entry names; entries twice: log entries about the same document or input written more than once (both must be 0).\n");
    std::fs::write(dir.join("report.md"), md)?;
    Ok(dir)
}
