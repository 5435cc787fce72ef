//! Scenario files and the runner.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use mysimbdp::client::Client;
use mysimbdp::config::Settings;
use serde::{Deserialize, Serialize};

use crate::report::{Ceiling, PathStats, Report};

/// A scenario file. Unknown keys are rejected.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tenants: Tenants,
    #[serde(default)]
    pub platform: PlatformCfg,
    pub batch: Option<BatchLoad>,
    pub stream: Option<StreamLoad>,
    /// Fault injection under load; a scenario with faults runs only them.
    pub faults: Option<crate::faults::FaultLoad>,
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_timeout() -> u64 {
    600
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tenants {
    pub count: u32,
    pub prefix: String,
    /// `none` (store records as parsed) or `map` (a small transform app).
    pub app: String,
}

impl Default for Tenants {
    fn default() -> Self {
        Self {
            count: 1,
            prefix: "tenant".into(),
            app: "map".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformCfg {
    /// Only `in-process` (all components in the runner's process) is implemented.
    pub topology: String,
    pub batch_size: usize,
    pub batch_workers: usize,
    pub stream_batch_size: usize,
    pub prefetch: u16,
    pub write_concern: String,
}

impl Default for PlatformCfg {
    fn default() -> Self {
        Self {
            topology: "in-process".into(),
            batch_size: 1000,
            batch_workers: 2,
            stream_batch_size: 500,
            prefetch: 1000,
            write_concern: "1".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLoad {
    /// Files per tenant.
    pub files: u32,
    /// Records per file, taken from the dataset (cycled, each file from another offset).
    pub records_per_file: u32,
    /// A CSV file with a header row, relative to the scenario file.
    pub dataset: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamLoad {
    /// Messages per tenant.
    pub messages: u32,
    /// Offered rate per tenant, messages per second.
    pub rate: u32,
    /// Messages per publish request.
    #[serde(default = "one")]
    pub per_request: u32,
    #[serde(default = "one")]
    pub consumers: u32,
    /// Approximate message size in bytes.
    #[serde(default = "default_msg")]
    pub message_bytes: usize,
}

fn one() -> u32 {
    1
}
fn default_msg() -> usize {
    200
}

const MAP_APP: &str = r#"
function map(r)
    local out = {}
    for k, v in pairs(r) do out[k] = v end
    local n = tonumber(r.result or r.v)
    if n then out.value = n end
    out.tenant = tenant
    return out
end
"#;

impl Scenario {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut s: Scenario = toml::from_str(&text)
            .with_context(|| format!("invalid scenario {}", path.display()))?;
        if let Some(b) = &mut s.batch {
            let base = path.parent().unwrap_or(Path::new("."));
            b.dataset = base.join(&b.dataset);
            if !b.dataset.exists() {
                bail!("dataset {} does not exist", b.dataset.display());
            }
            if b.files == 0 || b.records_per_file == 0 {
                bail!("batch.files and batch.records_per_file must be at least 1");
            }
        }
        if let Some(f) = &mut s.faults {
            let base = path.parent().unwrap_or(Path::new("."));
            f.dataset = base.join(&f.dataset);
            if f.kinds.is_empty() || f.messages == 0 {
                bail!("faults.kinds and faults.messages must not be empty");
            }
        }
        if let Some(st) = &s.stream
            && (st.messages == 0 || st.rate == 0 || st.per_request == 0)
        {
            bail!("stream.messages, stream.rate and stream.per_request must be at least 1");
        }
        if s.platform.topology != "in-process" {
            bail!(
                "topology `{}` is not implemented: use in-process",
                s.platform.topology
            );
        }
        if !["none", "map"].contains(&s.tenants.app.as_str()) {
            bail!("tenants.app must be `none` or `map`");
        }
        if s.tenants.count == 0 {
            bail!("tenants.count must be at least 1");
        }
        Ok(s)
    }
}

fn progress(what: &str, done: u64, total: u64, started: Instant) {
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
    eprint!("\r{what}: {done}/{total} ({rate:.0}/s)        ");
}

/// Files of `n` records each from the dataset, each starting at a different offset so every
/// file has its own content (and so its own document ids).
fn make_files(dataset: &Path, files: u32, n: u32) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read(dataset)?;
    let mut rdr = csv::ReaderBuilder::new().from_reader(&text[..]);
    let header = rdr.byte_headers()?.clone();
    let rows: Vec<csv::ByteRecord> = rdr.byte_records().collect::<std::result::Result<_, _>>()?;
    if rows.is_empty() {
        bail!("dataset has no rows");
    }
    let mut out = Vec::new();
    for f in 0..files as usize {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_byte_record(&header)?;
        for i in 0..n as usize {
            w.write_byte_record(&rows[(f * 7919 + i) % rows.len()])?;
        }
        out.push(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    Ok(out)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Runs a scenario and writes its report under `out/<name>/<run-id>/`.
pub async fn run(path: &Path, out: &Path) -> Result<PathBuf> {
    let sc = Scenario::load(path)?;
    let run_id = time::OffsetDateTime::now_utc().format(&time::format_description::parse(
        "[year][month][day]T[hour][minute][second]Z",
    )?)?;
    if let Some(f) = &sc.faults {
        return crate::faults::run(&sc.name, &sc.description, f, out, &run_id).await;
    }
    let ns = format!("sc{:06x}_", rand_u32() & 0xffffff);
    let staging = std::env::temp_dir().join(format!("mysimbdp-scenario-{ns}"));
    let admin = format!("scenario-{:x}", rand_u32());
    let overrides = vec![
        format!("platform.namespace={ns}"),
        format!("staging.dir={}", staging.display()),
        format!("auth.admin_token={admin}"),
        format!("batch.batch_size={}", sc.platform.batch_size),
        format!("batch.workers={}", sc.platform.batch_workers),
        format!("stream.batch_size={}", sc.platform.stream_batch_size),
        format!("stream.prefetch={}", sc.platform.prefetch),
        format!("mongodb.write_concern=\"{}\"", sc.platform.write_concern),
        "mongodb.max_pool_size=4".into(),
        "limits.max_file_bytes=1000000000".into(),
    ];
    let settings = Settings::load(None, &overrides)?;
    eprintln!("scenario {}: provisioning", sc.name);
    let platform = mysimbdp::start(settings, mysimbdp::Component::All).await?;
    let versions = platform.versions.clone();
    let mongodb_uri = platform.mongodb_uri.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mysimbdp::serve(listener, platform, async {
        let _ = stop_rx.await;
    }));
    let admin = Client::new(&format!("http://{addr}"), Some(&admin));
    let mut tenants = Vec::new();
    for i in 0..sc.tenants.count {
        let t = admin
            .create_tenant(&format!("{}{i}", sc.tenants.prefix), serde_json::json!({}))
            .await?;
        let c = admin.with_token(Some(&t.token));
        if sc.tenants.app == "map" {
            c.upload_app(&t.name, "batch", MAP_APP).await?;
            c.upload_app(&t.name, "stream", MAP_APP).await?;
        }
        tenants.push((t.name, c));
    }
    let deadline = Instant::now() + Duration::from_secs(sc.timeout_s);
    let started = Instant::now();
    let (batch, stream) = tokio::join!(
        async {
            match &sc.batch {
                Some(b) => Some(run_batch(b, &tenants, deadline).await),
                None => None,
            }
        },
        async {
            match &sc.stream {
                Some(s) => Some(run_stream(s, &tenants, deadline).await),
                None => None,
            }
        }
    );
    let wall = started.elapsed();
    let batch = batch.transpose()?;
    let stream = stream.transpose()?;
    eprintln!();
    // The ceiling: the same documents straight into the same server with the raw driver.
    let ceiling = match &sc.batch {
        Some(b) => Some(
            raw_ceiling(
                &mongodb_uri,
                &ns,
                b,
                sc.platform.batch_size,
                &sc.platform.write_concern,
            )
            .await?,
        ),
        None => None,
    };
    let _ = stop_tx.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&staging);
    let report = Report::new(&sc, &run_id, versions, batch, stream, ceiling, wall);
    let dir = out.join(&sc.name).join(&run_id);
    report.write(&dir)?;
    Ok(dir)
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(13)) ^ std::process::id()
}

async fn run_batch(
    b: &BatchLoad,
    tenants: &[(String, Client)],
    deadline: Instant,
) -> Result<PathStats> {
    let files = Arc::new(make_files(&b.dataset, b.files, b.records_per_file)?);
    let total = u64::from(b.files) * u64::from(b.records_per_file) * tenants.len() as u64;
    let started = Instant::now();
    let mut file_hist = hist();
    let mut jobs = Vec::new();
    for (t, c) in tenants {
        for (i, body) in files.iter().enumerate() {
            let name = format!("f{i}.csv");
            c.upload_file(t, &name, body.clone()).await?;
            let t0 = Instant::now();
            c.ingest(t, &name).await?;
            jobs.push((t.clone(), c.clone(), name, t0));
        }
    }
    let mut pending = jobs;
    let mut done_records = 0u64;
    let mut failures = 0u64;
    while !pending.is_empty() {
        if Instant::now() > deadline {
            bail!("batch load did not finish before the scenario timeout");
        }
        let mut still = Vec::new();
        let mut in_flight = 0u64;
        for (t, c, name, t0) in pending {
            let f = c.file(&t, &name).await?;
            match f["state"].as_str() {
                Some("done") | Some("failed") => {
                    file_hist.saturating_record(t0.elapsed().as_micros() as u64);
                    done_records += f["records_ok"].as_u64().unwrap_or(0)
                        + f["records_duplicate"].as_u64().unwrap_or(0);
                    failures += f["records_failed"].as_u64().unwrap_or(0);
                }
                _ => {
                    in_flight += f["next_record"].as_u64().unwrap_or(0);
                    still.push((t, c, name, t0));
                }
            }
        }
        pending = still;
        progress(
            "batch records",
            done_records + failures + in_flight,
            total,
            started,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let mut latency = hist();
    for (t, c) in tenants {
        let logs = c.logs(t, "").await?;
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&logs.body)?;
        for e in entries.iter().filter(|e| e["source"] == "batch") {
            latency.saturating_record(e["latency_us"].as_u64().unwrap_or(0).max(1));
        }
    }
    Ok(PathStats::new(
        done_records,
        failures,
        elapsed,
        latency,
        Some(file_hist),
        None,
    ))
}

async fn run_stream(
    s: &StreamLoad,
    tenants: &[(String, Client)],
    deadline: Instant,
) -> Result<PathStats> {
    let started = Instant::now();
    for (t, c) in tenants {
        c.stream_start(t, s.consumers).await?;
    }
    // Fixed offered rate: request k is sent at t0 + k·per_request/rate, whatever happened
    // before; lateness is then corrected for in the histogram (coordinated omission).
    let interval = Duration::from_secs_f64(f64::from(s.per_request) / f64::from(s.rate));
    let pad = "x".repeat(s.message_bytes.saturating_sub(40));
    let requests = s.messages.div_ceil(s.per_request);
    let mut sends = Vec::new();
    for (t, c) in tenants {
        let (t, c, pad) = (t.clone(), c.clone(), pad.clone());
        let per = s.per_request;
        let total = s.messages;
        sends.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let mut inflight = Vec::new();
            for k in 0..requests {
                tokio::time::sleep_until(t0 + interval * k).await;
                let mut body = Vec::new();
                for j in 0..per.min(total - k * per) {
                    body.extend_from_slice(
                        format!(
                            "{{\"seq\":{},\"v\":{},\"pad\":\"{pad}\"}}\n",
                            k * per + j,
                            j % 97
                        )
                        .as_bytes(),
                    );
                }
                let (c, t) = (c.clone(), t.clone());
                inflight.push(tokio::spawn(
                    async move { c.publish(&t, "reading", body).await },
                ));
            }
            for f in inflight {
                f.await??;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for s in sends {
        s.await??;
    }
    let total = u64::from(s.messages) * tenants.len() as u64;
    let (stored, failed) = loop {
        if Instant::now() > deadline {
            bail!("stream load did not finish before the scenario timeout");
        }
        let mut stored = 0u64;
        let mut failed = 0u64;
        for (t, c) in tenants {
            let r = c.stream_report(t).await?;
            for p in r["periods"].as_array().into_iter().flatten() {
                stored +=
                    p["messages"].as_u64().unwrap_or(0) + p["duplicates"].as_u64().unwrap_or(0);
                failed += p["failures"].as_u64().unwrap_or(0);
            }
        }
        progress("stream messages", stored + failed, total, started);
        if stored + failed >= total {
            break (stored, failed);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = started.elapsed();
    let mut raw = hist();
    let mut corrected = hist();
    let expected = (1_000_000 / u64::from(s.rate).max(1)).max(1);
    for (t, c) in tenants {
        c.stream_stop(t).await?;
        let logs = c.logs(t, "").await?;
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&logs.body)?;
        for e in entries
            .iter()
            .filter(|e| e["source"] == "stream" && e["status"] == "success")
        {
            let v = e["latency_us"].as_u64().unwrap_or(0).max(1);
            raw.saturating_record(v);
            let _ = corrected.record_correct(v, expected);
        }
    }
    Ok(PathStats::new(
        stored,
        failed,
        elapsed,
        corrected,
        None,
        Some(raw),
    ))
}

/// The driver alone: the same documents (and as many log-sized documents, since the platform
/// writes one log entry per record) bulk-inserted in batches of the same size.
async fn raw_ceiling(
    uri: &str,
    ns: &str,
    b: &BatchLoad,
    batch: usize,
    wc: &str,
) -> Result<Ceiling> {
    use mongodb::bson::Document;
    let files = make_files(&b.dataset, b.files.min(2), b.records_per_file)?;
    let mut docs: Vec<Document> = Vec::new();
    for (f, body) in files.iter().enumerate() {
        let mut rdr = csv::Reader::from_reader(&body[..]);
        let headers = rdr.headers()?.clone();
        for (i, r) in rdr.records().enumerate() {
            let r = r?;
            let mut d = Document::new();
            d.insert("_id", format!("raw{f}:{i}"));
            for (h, v) in headers.iter().zip(r.iter()) {
                d.insert(h, v);
            }
            docs.push(d);
        }
    }
    let client = mongodb::Client::with_uri_str(uri).await?;
    let w = match wc.parse::<u32>() {
        Ok(n) => mongodb::options::Acknowledgment::Nodes(n),
        Err(_) => mongodb::options::Acknowledgment::Majority,
    };
    let wc = mongodb::options::WriteConcern::builder().w(w).build();
    let db = client.database(&format!("{ns}ceiling"));
    let data = db.collection::<Document>("data");
    let logs = db.collection::<Document>("logs");
    // The same indexes as the platform's log collection: both sides pay for them.
    for keys in [
        mongodb::bson::doc! {"tenant": 1, "timestamp": 1},
        mongodb::bson::doc! {"timestamp": 1},
    ] {
        logs.create_index(mongodb::IndexModel::builder().keys(keys).build())
            .await?;
    }
    let n = docs.len();
    let started = Instant::now();
    for chunk in docs.chunks(batch) {
        data.insert_many(chunk.to_vec())
            .ordered(false)
            .write_concern(wc.clone())
            .await?;
        // Log entries of the platform's own shape, so both sides write the same bytes.
        let log: Vec<Document> = chunk
            .iter()
            .map(|_| {
                mysimbdp::logs::LogEntry {
                    timestamp: mongodb::bson::DateTime::now(),
                    tenant: "raw".into(),
                    source: mysimbdp::logs::Source::Batch,
                    data_name: "f0.csv".into(),
                    collection: "f0".into(),
                    status: mysimbdp::logs::Status::Success,
                    reason: None,
                    bytes: 360,
                    latency_us: 1000,
                    app_version: Some(1),
                }
                .to_document()
            })
            .collect();
        logs.insert_many(log)
            .ordered(false)
            .write_concern(wc.clone())
            .await?;
    }
    let elapsed = started.elapsed();
    let _ = db.drop().await;
    Ok(Ceiling {
        documents: n as u64,
        records_per_s: n as f64 / elapsed.as_secs_f64(),
        note: "raw driver: insert_many of the same records plus one log entry of the platform's shape each, unordered, same batch size and write concern".into(),
    })
}
