//! Scenario files and the runner.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use mysimbdp::client::Client;
use serde::{Deserialize, Serialize};

use crate::deploy::{Deployment, Topology};
use crate::progress::{Progress, Track};
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
    /// `in-process` (all components in the runner's process) or `separate` (one process
    /// per component: `serve coredms`, `serve batch`, `serve stream`).
    pub topology: Topology,
    pub batch_size: usize,
    pub batch_workers: usize,
    pub stream_batch_size: usize,
    /// How long a consumer waits to fill a batch (ms): longer means fewer, larger writes.
    pub stream_linger_ms: u64,
    pub prefetch: u16,
    pub write_concern: String,
}

impl Default for PlatformCfg {
    fn default() -> Self {
        Self {
            topology: Topology::InProcess,
            batch_size: 1000,
            batch_workers: 2,
            stream_batch_size: 500,
            stream_linger_ms: 10,
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
    /// Pad each record with a `pad` field to about this many bytes (CSV row length).
    #[serde(default)]
    pub record_bytes: Option<usize>,
    /// A CSV file with a header row, relative to the scenario file; without one, records
    /// come from a deterministic generator (id, site, time, value).
    #[serde(default)]
    pub dataset: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamLoad {
    /// Messages per tenant.
    pub messages: u32,
    /// Offered rate per tenant, messages per second (open loop, latency corrected for
    /// coordinated omission). Give this or `concurrency`.
    #[serde(default)]
    pub rate: u32,
    /// Closed loop instead: this many publishers per tenant, each sending its next request
    /// when the last one was confirmed. Measures capacity; latency is not corrected.
    #[serde(default)]
    pub concurrency: u32,
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
            if let Some(d) = &mut b.dataset {
                *d = base.join(&*d);
                if !d.exists() {
                    bail!("dataset {} does not exist", d.display());
                }
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
        if let Some(st) = &s.stream {
            if st.messages == 0 || st.per_request == 0 {
                bail!("stream.messages and stream.per_request must be at least 1");
            }
            if (st.rate == 0) == (st.concurrency == 0) {
                bail!(
                    "give exactly one of stream.rate (fixed offered rate) and stream.concurrency (closed loop)"
                );
            }
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

/// Files of `n` records each from the dataset, each starting at a different offset so every
/// file has its own content (and so its own document ids), or from the generator; rows are
/// padded to `record_bytes` when given.
fn make_files(b: &BatchLoad, files: u32) -> Result<Vec<Vec<u8>>> {
    let (header, rows) = match &b.dataset {
        Some(path) => {
            let text = std::fs::read(path)?;
            let mut rdr = csv::ReaderBuilder::new().from_reader(&text[..]);
            let header = rdr.byte_headers()?.clone();
            let rows: Vec<csv::ByteRecord> =
                rdr.byte_records().collect::<std::result::Result<_, _>>()?;
            (header, rows)
        }
        None => generated(10_007),
    };
    if rows.is_empty() {
        bail!("dataset has no rows");
    }
    let mut out = Vec::new();
    for f in 0..files as usize {
        let mut w = csv::Writer::from_writer(Vec::new());
        let mut h = header.clone();
        if b.record_bytes.is_some() {
            h.push_field(b"pad");
        }
        w.write_byte_record(&h)?;
        for i in 0..b.records_per_file as usize {
            let mut r = rows[(f * 7919 + i) % rows.len()].clone();
            if let Some(want) = b.record_bytes {
                // Fields plus their commas and the newline; the pad brings it to `want`.
                let len = r.as_slice().len() + r.len() + 1;
                r.push_field("x".repeat(want.saturating_sub(len)).as_bytes());
            }
            w.write_byte_record(&r)?;
        }
        out.push(w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    Ok(out)
}

/// `n` deterministic readings: the same on every run and machine.
fn generated(n: usize) -> (csv::ByteRecord, Vec<csv::ByteRecord>) {
    let header = csv::ByteRecord::from(vec!["id", "site", "time", "value"]);
    let rows = (0..n)
        .map(|i| {
            let x = (i as u64).wrapping_mul(2_654_435_761) % 100_000;
            csv::ByteRecord::from(vec![
                i.to_string(),
                format!("S{:03}", i % 97),
                format!(
                    "2026-01-01T{:02}:{:02}:{:02}Z",
                    i / 3600 % 24,
                    i / 60 % 60,
                    i % 60
                ),
                format!("{}.{:02}", x / 100, x % 100),
            ])
        })
        .collect();
    (header, rows)
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
    let admin = format!("scenario-admin-{:08x}", rand_u32());
    let overrides = vec![
        format!("platform.namespace={ns}"),
        format!("staging.dir={}", staging.display()),
        format!("auth.admin_token={admin}"),
        format!("batch.batch_size={}", sc.platform.batch_size),
        format!("batch.workers={}", sc.platform.batch_workers),
        format!("stream.batch_size={}", sc.platform.stream_batch_size),
        format!("stream.prefetch={}", sc.platform.prefetch),
        format!("stream.linger_ms={}", sc.platform.stream_linger_ms),
        format!("mongodb.write_concern=\"{}\"", sc.platform.write_concern),
        "mongodb.max_pool_size=4".into(),
        "limits.max_file_bytes=1000000000".into(),
    ];
    eprintln!(
        "scenario {}: provisioning, platform {}",
        sc.name, sc.platform.topology
    );
    let deployment = Deployment::start(sc.platform.topology, overrides, &admin).await?;
    let versions = deployment.versions.clone();
    let mongodb_uri = deployment.mongodb_uri.clone();
    let admin = deployment.admin.clone();
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
    let n = u64::from(sc.tenants.count);
    let mut tracks = Vec::new();
    if let Some(b) = &sc.batch {
        tracks.push((
            "batch",
            n * u64::from(b.files) * u64::from(b.records_per_file),
        ));
    }
    if let Some(s) = &sc.stream {
        tracks.push(("stream", n * u64::from(s.messages)));
    }
    let progress = Progress::new(&tracks);
    let drawing = progress.spawn();
    let started = Instant::now();
    let (batch, stream) = tokio::join!(
        async {
            match &sc.batch {
                Some(b) => Some(run_batch(b, &tenants, deadline, progress.track("batch")).await),
                None => None,
            }
        },
        async {
            match &sc.stream {
                Some(s) => Some(run_stream(s, &tenants, deadline, progress.track("stream")).await),
                None => None,
            }
        }
    );
    let wall = started.elapsed();
    progress.finish(drawing).await;
    let batch = batch.transpose()?;
    let stream = stream.transpose()?;
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
    let processes = deployment.peak_rss();
    deployment.stop().await?;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(staging.with_extension("logs"));
    let report =
        Report::new(&sc, &run_id, versions, batch, stream, ceiling, wall).with_processes(processes);
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
    progress: &Track,
) -> Result<PathStats> {
    let files = Arc::new(make_files(b, b.files)?);
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
        progress.set((done_records + failures + in_flight).min(total));
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
    progress: &Track,
) -> Result<PathStats> {
    let started = Instant::now();
    for (t, c) in tenants {
        c.stream_start(t, s.consumers).await?;
    }
    let pad = "x".repeat(s.message_bytes.saturating_sub(40));
    let requests = s.messages.div_ceil(s.per_request);
    let (per, total) = (s.per_request, s.messages);
    // Request k of a tenant: messages k·per .. min((k+1)·per, total), numbered by `seq`.
    let body = move |k: u32, pad: &str| {
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
        body
    };
    let mut sends = Vec::new();
    for (t, c) in tenants {
        let (t, c, pad) = (t.clone(), c.clone(), pad.clone());
        if s.concurrency > 0 {
            // Closed loop: each publisher sends its next request once the last is confirmed.
            let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
            for _ in 0..s.concurrency {
                let (t, c, pad, next) = (t.clone(), c.clone(), pad.clone(), next.clone());
                sends.push(tokio::spawn(async move {
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if k >= requests {
                            return Ok::<_, anyhow::Error>(());
                        }
                        c.publish(&t, "reading", body(k, &pad)).await?;
                    }
                }));
            }
            continue;
        }
        // Fixed offered rate: request k is sent at t0 + k·per_request/rate, whatever happened
        // before; lateness is then corrected for in the histogram (coordinated omission).
        let interval = Duration::from_secs_f64(f64::from(s.per_request) / f64::from(s.rate));
        sends.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let mut inflight = Vec::new();
            for k in 0..requests {
                tokio::time::sleep_until(t0 + interval * k).await;
                let (c, t, b) = (c.clone(), t.clone(), body(k, &pad));
                inflight.push(tokio::spawn(
                    async move { c.publish(&t, "reading", b).await },
                ));
            }
            for f in inflight {
                f.await??;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    // Progress from the consumers' live counters while the load runs (cheap); the end
    // from the log (`stream/report`), which is the record.
    let total = u64::from(s.messages) * tenants.len() as u64;
    let mut sends = futures::future::try_join_all(sends);
    let mut sending = true;
    let mut last_report = Instant::now();
    let (stored, failed) = loop {
        if Instant::now() > deadline {
            bail!("stream load did not finish before the scenario timeout");
        }
        if sending {
            tokio::select! {
                r = &mut sends => {
                    for r in r? {
                        r?;
                    }
                    sending = false;
                }
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut live = 0u64;
        for (t, c) in tenants {
            let st = c.stream_status(t).await?;
            let n = &st["since_start"];
            live += ["stored", "duplicates", "failed"]
                .iter()
                .map(|k| n[k].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        progress.set(live.min(total));
        // Live counters count documents, the log counts messages: they agree for the
        // workbench's 1:1 apps, and the log is asked every few seconds anyway.
        if sending || (live < total && last_report.elapsed() < Duration::from_secs(5)) {
            continue;
        }
        last_report = Instant::now();
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
        if stored + failed >= total {
            break (stored, failed);
        }
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
            if s.rate > 0 {
                let _ = corrected.record_correct(v, expected);
            } else {
                // A closed loop has no intended schedule to correct against.
                corrected.saturating_record(v);
            }
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
    let files = make_files(b, b.files.min(2))?;
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
    // The same index as the platform's log collection: both sides pay for it.
    logs.create_index(
        mongodb::IndexModel::builder()
            .keys(mongodb::bson::doc! {"tenant": 1, "timestamp": 1})
            .build(),
    )
    .await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed scenario loads, and the topology names parse.
    #[test]
    fn the_committed_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut topologies = Vec::new();
        for e in std::fs::read_dir(&dir).expect("scenarios/") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                topologies.push(s.platform.topology);
            }
        }
        assert!(topologies.contains(&Topology::InProcess));
        assert!(topologies.contains(&Topology::Separate));
    }

    #[test]
    fn generated_and_padded_files_are_deterministic_and_sized() {
        let b = BatchLoad {
            files: 2,
            records_per_file: 50,
            record_bytes: Some(1000),
            dataset: None,
        };
        let a = make_files(&b, 2).expect("files");
        assert_eq!(
            a,
            make_files(&b, 2).expect("again"),
            "same bytes every time"
        );
        assert_ne!(a[0], a[1], "each file has its own records");
        let mut rdr = csv::Reader::from_reader(&a[0][..]);
        assert_eq!(
            rdr.headers().expect("header"),
            vec!["id", "site", "time", "value", "pad"]
        );
        let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.expect("row")).collect();
        assert_eq!(rows.len(), 50);
        for r in &rows {
            // Field bytes, the commas between the fields, the newline.
            let len = r.as_slice().len() + (r.len() - 1) + 1;
            assert_eq!(len, 1000, "{r:?}");
        }
    }

    #[test]
    fn unknown_keys_and_topologies_are_rejected() {
        let dir = std::env::temp_dir().join(format!("mysimbdp-sc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("x.toml");
        for (text, expect) in [
            ("name = \"x\"\nspeed = 3\n", "unknown field `speed`"),
            (
                "name = \"x\"\n[platform]\ntopology = \"cluster\"\n",
                "unknown variant `cluster`",
            ),
        ] {
            std::fs::write(&p, text).expect("write");
            let e = format!("{:#}", Scenario::load(&p).expect_err(text));
            assert!(e.contains(expect), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
