//! Scenario files and the runner: the load of each group of tenants, in one phase or two
//! (the well-behaved groups alone, then beside the others), then the accounting of every
//! offered input from what the platform stored and logged (`accounting`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::accounting::{self, Counts, TenantAccount};
use crate::deploy::{Deployment, Topology};
use crate::load::{GroupFiles, PathRun, TenantCtx};
use crate::progress::Progress;
use crate::report::{Ceiling, GroupReport, PathParts, PhaseReport, Report, Results};

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
    /// Bounds each phase's load: what has not finished by then is reported as unfinished.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Two phases in one run: first the groups that expect success alone (`baseline`), then
    /// every group at once (`mixed`); the report sets the well-behaved groups' figures side
    /// by side. Each phase has its own tenants.
    #[serde(default)]
    pub baseline: bool,
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
    /// Groups of tenants, each with its own app, load and expectation (`[[tenants.group]]`).
    /// Without any, the scenario has one group: `count` tenants `<prefix><i>` running `app`
    /// on the scenario's `[batch]` and `[stream]` load.
    #[serde(rename = "group", skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
}

impl Default for Tenants {
    fn default() -> Self {
        Self {
            count: 1,
            prefix: "tenant".into(),
            app: "map".into(),
            groups: Vec::new(),
        }
    }
}

/// What a group's inputs are expected to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Every input is stored: any failure is a problem (`--strict`).
    #[default]
    Success,
    /// Inputs are meant to fail (hostile apps, poison data); each must still be stored or
    /// logged as failed, never lost.
    Failures,
}

impl Expect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failures => "failures",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Batch,
    Stream,
}

impl PathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Stream => "stream",
        }
    }
}

/// `[[tenants.group]]`: `count` tenants `<name>-<i>` with one app, one load, one expectation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    #[serde(default = "one")]
    pub count: u32,
    /// `map` (the workbench's transform app) or `none`; the default when no `app_source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// A Luau file, relative to the scenario file, uploaded as the group's batch and stream
    /// app (e.g. `apps/pcall_loop.luau`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_source: Option<PathBuf>,
    /// The paths the group drives; default: every path it has a load for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<PathKind>>,
    /// The group's own batch load; default: the scenario's `[batch]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchLoad>,
    /// The group's own stream load; default: the scenario's `[stream]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamLoad>,
    #[serde(default)]
    pub expect: Expect,
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
    /// `separate` only: caps each component's address space (MiB, `prlimit --as`), so a
    /// component that tenant code makes grow fails alone instead of exhausting the machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_mb: Option<u64>,
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
            memory_limit_mb: None,
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
    /// Poison: every n-th row is broken, alternately a row with too few fields (fails to
    /// parse) and a row whose number is `n/a` (breaks an app that needs numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poison_every: Option<u32>,
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
    /// Poison: every n-th message is broken, alternately invalid JSON and a reading whose
    /// number is `n/a`; each is published in a request of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poison_every: Option<u32>,
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

/// The app a group's tenants run.
#[derive(Debug, Clone)]
pub enum AppChoice {
    None,
    Map,
    /// Source text and the file it came from.
    Source(String, PathBuf),
}

impl AppChoice {
    fn source(&self) -> Option<&str> {
        match self {
            Self::None => None,
            Self::Map => Some(MAP_APP),
            Self::Source(s, _) => Some(s),
        }
    }
}

/// A group as the runner drives it: its app read, its loads resolved.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    pub name: String,
    pub count: u32,
    pub app: AppChoice,
    pub batch: Option<BatchLoad>,
    pub stream: Option<StreamLoad>,
    pub expect: Expect,
    /// Tenants are `<name><i>` (a scenario without groups) or `<name>-<i>`.
    pub separator: &'static str,
}

fn check_batch(b: &mut BatchLoad, base: &Path) -> Result<()> {
    if let Some(d) = &mut b.dataset {
        *d = base.join(&*d);
        if !d.exists() {
            bail!("dataset {} does not exist", d.display());
        }
    }
    if b.files == 0 || b.records_per_file == 0 {
        bail!("batch.files and batch.records_per_file must be at least 1");
    }
    if b.poison_every == Some(0) {
        bail!("batch.poison_every must be at least 1");
    }
    Ok(())
}

fn check_stream(st: &StreamLoad) -> Result<()> {
    if st.messages == 0 || st.per_request == 0 {
        bail!("stream.messages and stream.per_request must be at least 1");
    }
    if (st.rate == 0) == (st.concurrency == 0) {
        bail!(
            "give exactly one of stream.rate (fixed offered rate) and stream.concurrency (closed loop)"
        );
    }
    if st.poison_every == Some(0) {
        bail!("stream.poison_every must be at least 1");
    }
    Ok(())
}

fn check_group(g: &mut Group, base: &Path) -> Result<()> {
    let name_ok = g.name.len() <= 20
        && g.name
            .starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && g.name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !name_ok {
        bail!(
            "group name `{}`: 1-20 characters, a-z 0-9 - _, starting with a letter or digit",
            g.name
        );
    }
    if g.count == 0 || g.count > 9999 {
        bail!("group `{}`: count must be 1-9999", g.name);
    }
    match (&g.app, &mut g.app_source) {
        (Some(_), Some(_)) => bail!("group `{}`: give app or app_source, not both", g.name),
        (Some(a), None) if !["none", "map"].contains(&a.as_str()) => {
            bail!("group `{}`: app must be `none` or `map`", g.name)
        }
        (_, Some(src)) => {
            *src = base.join(&*src);
            if !src.exists() {
                bail!(
                    "group `{}`: app_source {} does not exist",
                    g.name,
                    src.display()
                );
            }
        }
        _ => {}
    }
    if let Some(b) = &mut g.batch {
        check_batch(b, base).with_context(|| format!("group `{}`", g.name))?;
    }
    if let Some(st) = &g.stream {
        check_stream(st).with_context(|| format!("group `{}`", g.name))?;
    }
    Ok(())
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut s: Scenario = toml::from_str(&text)
            .with_context(|| format!("invalid scenario {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_owned();
        if let Some(b) = &mut s.batch {
            check_batch(b, &base)?;
        }
        if let Some(f) = &mut s.faults {
            f.dataset = base.join(&f.dataset);
            if f.kinds.is_empty() || f.messages == 0 {
                bail!("faults.kinds and faults.messages must not be empty");
            }
        }
        if let Some(st) = &s.stream {
            check_stream(st)?;
        }
        if !["none", "map"].contains(&s.tenants.app.as_str()) {
            bail!("tenants.app must be `none` or `map`");
        }
        if s.tenants.count == 0 {
            bail!("tenants.count must be at least 1");
        }
        let mut groups = std::mem::take(&mut s.tenants.groups);
        if !groups.is_empty() {
            let d = Tenants::default();
            if s.tenants.count != d.count || s.tenants.prefix != d.prefix || s.tenants.app != d.app
            {
                bail!(
                    "with [[tenants.group]], give each group its count and app; tenants.count, prefix and app are for scenarios without groups"
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for g in &mut groups {
            check_group(g, &base)?;
            if !names.insert(g.name.clone()) {
                bail!("two groups are named `{}`", g.name);
            }
        }
        s.tenants.groups = groups;
        if s.platform.memory_limit_mb.is_some() && s.platform.topology != Topology::Separate {
            bail!(
                "platform.memory_limit_mb needs topology = \"separate\": in-process, the limit would fall on the runner"
            );
        }
        let plans = s.plans_unread();
        if let Some(p) = plans
            .iter()
            .find(|p| p.batch.is_none() && p.stream.is_none())
            .filter(|_| s.faults.is_none())
        {
            bail!(
                "group `{}` has no load: give [batch] or [stream] (the scenario's or its own)",
                p.name
            );
        }
        if s.baseline
            && !(plans.iter().any(|p| p.expect == Expect::Success)
                && plans.iter().any(|p| p.expect == Expect::Failures))
        {
            bail!(
                "baseline = true compares the groups that expect success alone and beside the others: it needs groups of both kinds"
            );
        }
        Ok(s)
    }

    /// The groups as the runner drives them, app sources read.
    pub fn plans(&self) -> Result<Vec<GroupPlan>> {
        let mut plans = self.plans_unread();
        for p in &mut plans {
            if let AppChoice::Source(text, path) = &mut p.app {
                *text = std::fs::read_to_string(&*path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
            }
        }
        Ok(plans)
    }

    fn plans_unread(&self) -> Vec<GroupPlan> {
        if self.tenants.groups.is_empty() {
            return vec![GroupPlan {
                name: self.tenants.prefix.clone(),
                count: self.tenants.count,
                app: if self.tenants.app == "map" {
                    AppChoice::Map
                } else {
                    AppChoice::None
                },
                batch: self.batch.clone(),
                stream: self.stream.clone(),
                expect: Expect::Success,
                separator: "",
            }];
        }
        self.tenants
            .groups
            .iter()
            .map(|g| {
                let drives = |k: PathKind| g.paths.as_ref().is_none_or(|p| p.contains(&k));
                GroupPlan {
                    name: g.name.clone(),
                    count: g.count,
                    app: match (&g.app_source, g.app.as_deref()) {
                        (Some(p), _) => AppChoice::Source(String::new(), p.clone()),
                        (None, Some("none")) => AppChoice::None,
                        _ => AppChoice::Map,
                    },
                    batch: g
                        .batch
                        .clone()
                        .or_else(|| self.batch.clone())
                        .filter(|_| drives(PathKind::Batch)),
                    stream: g
                        .stream
                        .clone()
                        .or_else(|| self.stream.clone())
                        .filter(|_| drives(PathKind::Stream)),
                    expect: g.expect,
                    separator: "-",
                }
            })
            .collect()
    }
}

/// Files of `n` records each from the dataset, each starting at a different offset so every
/// file has its own content (and so its own document ids), or from the generator; rows are
/// padded to `record_bytes` when given, and every `poison_every`-th row broken.
pub(crate) fn make_files(b: &BatchLoad, files: u32) -> Result<Vec<Vec<u8>>> {
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
    // The number a poison row breaks: `result` (the water-quality data), `value`, else the last.
    let number = header
        .iter()
        .position(|h| h == b"result" || h == b"value")
        .unwrap_or(header.len().saturating_sub(1));
    let mut out = Vec::new();
    for f in 0..files as usize {
        // Flexible: a poison row has fewer fields than the header.
        let mut w = csv::WriterBuilder::new()
            .flexible(true)
            .from_writer(Vec::new());
        let mut h = header.clone();
        if b.record_bytes.is_some() {
            h.push_field(b"pad");
        }
        w.write_byte_record(&h)?;
        for i in 0..b.records_per_file as usize {
            let mut r = rows[(f * 7919 + i) % rows.len()].clone();
            match b.poison_every.map(|n| n as usize) {
                Some(n) if (i + 1) % n == 0 && (i + 1) / n % 2 == 1 => {
                    r = csv::ByteRecord::from(vec![&r[0]]);
                }
                Some(n) if (i + 1) % n == 0 => {
                    r = r
                        .iter()
                        .enumerate()
                        .map(|(k, v)| if k == number { &b"n/a"[..] } else { v })
                        .collect();
                }
                _ => {}
            }
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

/// A phase: its name, the prefix of its tenants' names, the groups it runs.
struct PhaseSpec {
    name: &'static str,
    prefix: &'static str,
    groups: Vec<usize>,
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
    let plans = sc.plans()?;
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
    let phases = if sc.baseline {
        vec![
            PhaseSpec {
                name: "baseline",
                prefix: "b-",
                groups: (0..plans.len())
                    .filter(|&i| plans[i].expect == Expect::Success)
                    .collect(),
            },
            PhaseSpec {
                name: "mixed",
                prefix: "m-",
                groups: (0..plans.len()).collect(),
            },
        ]
    } else {
        vec![PhaseSpec {
            name: "main",
            prefix: "",
            groups: (0..plans.len()).collect(),
        }]
    };
    let started = Instant::now();
    let measured = async {
        if let Some(mb) = sc.platform.memory_limit_mb {
            deployment.limit_memory(mb.saturating_mul(1 << 20))?;
        }
        let db = mongodb::Client::with_uri_str(&mongodb_uri).await?;
        let mut results = Results::default();
        for ph in &phases {
            let o = run_phase(&sc, &plans, ph, &admin, &db).await?;
            results.accounting.extend(o.accounts);
            results.phases.push(o.report);
            (results.batch, results.stream) = (o.batch, o.stream);
        }
        let wall = started.elapsed();
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
        Ok::<_, anyhow::Error>((results, ceiling, wall))
    }
    .await;
    let processes = deployment.peak_rss();
    let stopped = deployment.stop().await;
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_dir_all(staging.with_extension("logs"));
    let (results, ceiling, wall) = match (measured, &stopped) {
        (Ok(m), _) => m,
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(s)) => return Err(e.context(format!("and the platform: {s:#}"))),
    };
    let report = Report::new(&sc, &run_id, versions, results, ceiling, wall)
        .with_processes(processes)
        .with_platform_errors(
            stopped
                .err()
                .map(|e| accounting::strip_ansi(&format!("{e:#}")))
                .into_iter()
                .collect(),
        );
    let dir = out.join(&sc.name).join(&run_id);
    report.write(&dir)?;
    Ok(dir)
}

/// One phase's figures.
struct PhaseOutcome {
    report: PhaseReport,
    accounts: Vec<TenantAccount>,
    /// The groups that expect success, added up.
    batch: Option<PathParts>,
    stream: Option<PathParts>,
}

/// How long the accounting waits for inputs still on their way (e.g. a stream app that
/// stores several documents per message makes the log look complete early).
const SETTLE: Duration = Duration::from_secs(10);

async fn run_phase(
    sc: &Scenario,
    plans: &[GroupPlan],
    ph: &PhaseSpec,
    admin: &mysimbdp::client::Client,
    db: &mongodb::Client,
) -> Result<PhaseOutcome> {
    // Tenants, with their apps.
    let mut tenants: Vec<(usize, TenantCtx)> = Vec::new();
    for &gi in &ph.groups {
        let g = &plans[gi];
        for i in 0..g.count {
            let name = format!("{}{}{}{i}", ph.prefix, g.name, g.separator);
            let t = crate::load::bounded(
                Duration::from_secs(60),
                admin.create_tenant(&name, serde_json::json!({})),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot create tenant {name}: {e}"))?;
            let client = admin.with_token(Some(&t.token));
            let mut whole_file = false;
            if let Some(src) = g.app.source() {
                for kind in ["batch", "stream"] {
                    let v = crate::load::bounded(
                        Duration::from_secs(60),
                        client.upload_app(&t.name, kind, src),
                    )
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("group `{}`: the {kind} app was not accepted: {e}", g.name)
                    })?;
                    if kind == "batch" {
                        whole_file = v["functions"]["map"] == false;
                    }
                }
            }
            tenants.push((
                gi,
                TenantCtx {
                    name: t.name,
                    database: t.database,
                    client,
                    whole_file,
                },
            ));
        }
    }
    let mut files = std::collections::HashMap::new();
    for &gi in &ph.groups {
        if let Some(b) = &plans[gi].batch {
            files.insert(gi, Arc::new(GroupFiles::new(make_files(b, b.files)?)));
        }
    }
    let (mut batch_total, mut stream_total) = (0u64, 0u64);
    for (gi, t) in &tenants {
        if let Some(f) = files.get(gi) {
            batch_total += if t.whole_file {
                f.records.len() as u64
            } else {
                f.records.iter().sum()
            };
        }
        if let Some(s) = &plans[*gi].stream {
            stream_total += u64::from(s.messages);
        }
    }
    let mut tracks = Vec::new();
    if files.values().next().is_some() {
        tracks.push(("batch", batch_total));
    }
    if ph.groups.iter().any(|&gi| plans[gi].stream.is_some()) {
        tracks.push(("stream", stream_total));
    }
    if ph.name != "main" {
        eprintln!(
            "phase {}: {} tenants ({})",
            ph.name,
            tenants.len(),
            ph.groups
                .iter()
                .map(|&gi| format!("{} {}", plans[gi].count, plans[gi].name))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let progress = Progress::new(&tracks);
    let drawing = progress.spawn();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(sc.timeout_s);
    let mut drivers = Vec::new();
    for (ti, (gi, t)) in tenants.iter().enumerate() {
        if let Some(f) = files.get(gi) {
            let fut =
                crate::load::drive_batch(t.clone(), f.clone(), started, deadline, progress.clone());
            drivers.push((ti, PathKind::Batch, tokio::spawn(fut)));
        }
        if let Some(s) = &plans[*gi].stream {
            let fut = crate::load::drive_stream(
                t.clone(),
                s.clone(),
                started,
                deadline,
                progress.clone(),
            );
            drivers.push((ti, PathKind::Stream, tokio::spawn(fut)));
        }
    }
    let mut runs: Vec<(usize, PathKind, PathRun)> = Vec::new();
    for (ti, kind, d) in drivers {
        let run = d.await.unwrap_or_else(|e| PathRun {
            errors: vec![format!("the load driver failed: {e}")],
            unfinished: Some("the load driver failed".into()),
            ..PathRun::default()
        });
        runs.push((ti, kind, run));
    }
    progress.finish(drawing).await;
    let load_elapsed = started.elapsed();

    // The accounting, from the database and the log; while inputs seem lost, they may still
    // be on their way: look again for a few seconds (not after a timeout).
    let unfinished = runs.iter().any(|(_, _, r)| r.unfinished.is_some());
    let settle_until = Instant::now() + if unfinished { Duration::ZERO } else { SETTLE };
    let looked = loop {
        let mut looked = Vec::new();
        for (ti, (gi, t)) in tenants.iter().enumerate() {
            let mut m_files = Vec::new();
            let mut ids = std::collections::HashSet::new();
            for (_, _, r) in runs.iter().filter(|(i, _, _)| *i == ti) {
                m_files.extend(r.files.iter().cloned());
                ids.extend(r.ids.iter().cloned());
            }
            let interval = plans[*gi]
                .stream
                .as_ref()
                .filter(|s| s.rate > 0)
                .map(|s| (1_000_000 / u64::from(s.rate)).max(1));
            let found = tokio::time::timeout(
                Duration::from_secs(300),
                accounting::scan(
                    &db.database(&t.database),
                    accounting::Matcher::new(&m_files, &ids),
                ),
            )
            .await
            .map_err(|_| "no answer within 300 s".to_owned())
            .and_then(|r| r.map_err(|e| format!("{e:#}")));
            let log = accounting::read_log(&t.client, &t.name, interval)
                .await
                .map_err(|e| format!("{e:#}"));
            looked.push((found, log));
        }
        let lost = runs.iter().any(|(ti, kind, r)| {
            let (found, log) = &looked[*ti];
            let (Ok(f), Ok(l)) = (found, log) else {
                return false;
            };
            let (stored, failed) = match kind {
                PathKind::Batch => (f.batch_stored, l.batch.failure),
                PathKind::Stream => (f.stream_stored, l.stream.failure),
            };
            stored + failed < r.offered
        });
        if !lost || Instant::now() >= settle_until {
            break looked;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let mut accounts = Vec::new();
    let mut parts: Vec<(usize, PathKind, PathParts)> = Vec::new();
    for (ti, kind, r) in runs {
        let (gi, t) = &tenants[ti];
        let g = &plans[*gi];
        let (found, log) = &looked[ti];
        let mut errors = r.errors.clone();
        let empty = accounting::Tally::default();
        let tally = match (log, kind) {
            (Ok(l), PathKind::Batch) => &l.batch,
            (Ok(l), PathKind::Stream) => &l.stream,
            (Err(e), _) => {
                errors.push(format!("cannot read its log: {e}"));
                &empty
            }
        };
        let (stored, documents) = match (found, kind) {
            (Ok(f), PathKind::Batch) => (f.batch_stored, f.batch_documents),
            (Ok(f), PathKind::Stream) => (f.stream_stored, f.stream_documents),
            (Err(e), _) => {
                errors.push(format!("cannot read its database: {e}"));
                (0, 0)
            }
        };
        let counts = Counts {
            offered: r.offered,
            refused: r.refused,
            stored,
            failed: tally.failure,
            lost: 0,
            documents,
            logged_stored: tally.success + tally.duplicate,
        }
        .settle();
        let a = TenantAccount {
            phase: ph.name.into(),
            group: g.name.clone(),
            tenant: t.name.clone(),
            path: kind.as_str().into(),
            expect: g.expect,
            counts: counts.clone(),
            files_failed: r
                .files
                .iter()
                .filter(|f| f.state == "failed")
                .map(|f| {
                    format!(
                        "{} ended `failed`: {}",
                        f.name,
                        f.error.as_deref().unwrap_or("no error given")
                    )
                })
                .collect(),
            unfinished: r.unfinished.clone(),
            errors,
            refusals: r.refusals.clone(),
            reasons: tally.top_reasons(3),
            elapsed_s: r.elapsed.as_secs_f64(),
        };
        if let Some(u) = &a.unfinished {
            eprintln!("  {} {}: unfinished: {u}", a.tenant, a.path);
        }
        accounts.push(a);
        let p = PathParts {
            counts,
            elapsed: r.elapsed,
            latency: tally.latency.clone(),
            per_file: r.file_hist,
            uncorrected: (kind == PathKind::Stream).then(|| tally.uncorrected.clone()),
        };
        match parts.iter_mut().find(|(x, k, _)| *x == *gi && *k == kind) {
            Some((_, _, q)) => q.add(&p),
            None => parts.push((*gi, kind, p)),
        }
    }
    let mut headline: [Option<PathParts>; 2] = [None, None];
    for (gi, kind, p) in &parts {
        if plans[*gi].expect != Expect::Success {
            continue;
        }
        let slot = &mut headline[usize::from(*kind == PathKind::Stream)];
        match slot {
            Some(h) => h.add(p),
            None => *slot = Some(p.clone()),
        }
    }
    let groups = ph
        .groups
        .iter()
        .map(|&gi| {
            let stats = |k: PathKind| {
                parts
                    .iter()
                    .find(|(x, kind, _)| *x == gi && *kind == k)
                    .map(|(_, _, p)| p.stats())
            };
            GroupReport {
                group: plans[gi].name.clone(),
                expect: plans[gi].expect,
                tenants: plans[gi].count,
                batch: stats(PathKind::Batch),
                stream: stats(PathKind::Stream),
            }
        })
        .collect();
    let [batch, stream] = headline;
    Ok(PhaseOutcome {
        report: PhaseReport {
            name: ph.name.into(),
            elapsed_s: load_elapsed.as_secs_f64(),
            groups,
        },
        accounts,
        batch,
        stream,
    })
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(13)) ^ std::process::id()
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

    /// Every committed scenario loads, its apps compile with the platform's own compiler,
    /// and the topology names parse.
    #[test]
    fn the_committed_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut topologies = Vec::new();
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).expect("scenarios/") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                for g in s
                    .plans()
                    .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()))
                {
                    if let Some(src) = g.app.source() {
                        let limits = mysimbdp::config::AppLimits::default();
                        if let Err(e) = mysimbdp::apps::compile(src, &limits) {
                            panic!("{} group {}: {e:?}", p.display(), g.name);
                        }
                    }
                }
                topologies.push(s.platform.topology);
                names.push(s.name);
            }
        }
        assert!(topologies.contains(&Topology::InProcess));
        assert!(topologies.contains(&Topology::Separate));
        assert!(names.contains(&"hostile".to_owned()), "{names:?}");
    }

    #[test]
    fn the_hostile_scenario_sets_attackers_beside_well_behaved_tenants() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/hostile.toml");
        let s = Scenario::load(&p).expect("hostile.toml");
        assert!(s.baseline);
        let plans = s.plans().expect("plans");
        let good: Vec<&GroupPlan> = plans
            .iter()
            .filter(|g| g.expect == Expect::Success)
            .collect();
        assert!(!good.is_empty());
        assert!(
            good.iter().all(|g| g.batch.is_some() && g.stream.is_some()),
            "the well-behaved drive both paths"
        );
        let attackers: Vec<&GroupPlan> = plans
            .iter()
            .filter(|g| g.expect == Expect::Failures)
            .collect();
        assert!(attackers.len() >= 5, "{attackers:?}");
        assert!(
            attackers
                .iter()
                .all(|g| matches!(g.app, AppChoice::Source(..)) || g.name == "poison")
        );
        assert!(
            attackers
                .iter()
                .any(|g| g.stream.as_ref().is_some_and(|s| s.poison_every.is_some())),
            "a tenant sends poison messages"
        );
    }

    fn scenario_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mysimbdp-sc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("apps")).expect("dir");
        std::fs::write(dir.join("apps/a.luau"), "function map(r) return r end").expect("app");
        dir
    }

    #[test]
    fn groups_take_the_scenario_load_unless_they_bring_their_own() {
        let dir = scenario_dir("groups");
        let p = dir.join("g.toml");
        std::fs::write(
            &p,
            r#"
name = "g"
baseline = true
[batch]
files = 2
records_per_file = 10
[stream]
messages = 10
rate = 5
[[tenants.group]]
name = "good"
count = 3
[[tenants.group]]
name = "bad"
app_source = "apps/a.luau"
paths = ["stream"]
expect = "failures"
[tenants.group.stream]
messages = 4
rate = 2
poison_every = 2
"#,
        )
        .expect("write");
        let s = Scenario::load(&p).expect("valid");
        let plans = s.plans().expect("plans");
        assert_eq!(plans.len(), 2);
        let (good, bad) = (&plans[0], &plans[1]);
        assert_eq!((good.count, good.separator), (3, "-"));
        assert!(matches!(good.app, AppChoice::Map));
        assert_eq!(good.batch.as_ref().map(|b| b.files), Some(2));
        assert_eq!(good.stream.as_ref().map(|s| s.messages), Some(10));
        assert!(bad.batch.is_none(), "paths = [stream]");
        assert_eq!(bad.stream.as_ref().map(|s| s.messages), Some(4));
        assert!(matches!(&bad.app, AppChoice::Source(src, _) if src.contains("function map")));
        // Without groups: one group named by the prefix, tenants `<prefix><i>`, as before.
        let q = dir.join("q.toml");
        std::fs::write(&q, "name = \"q\"\n[tenants]\ncount = 2\nprefix = \"p\"\n[stream]\nmessages = 1\nrate = 1\n")
            .expect("write");
        let plans = Scenario::load(&q).expect("valid").plans().expect("plans");
        assert_eq!(
            (plans[0].name.as_str(), plans[0].count, plans[0].separator),
            ("p", 2, "")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_groups_are_rejected_with_the_reason() {
        let dir = scenario_dir("badgroups");
        let p = dir.join("x.toml");
        let load = "[stream]\nmessages = 1\nrate = 1\n";
        for (text, expect) in [
            (
                "[[tenants.group]]\nname = \"a\"\nspeed = 1\n",
                "unknown field `speed`",
            ),
            ("[[tenants.group]]\nname = \"A!\"\n", "group name `A!`"),
            (
                "[[tenants.group]]\nname = \"a\"\napp = \"map\"\napp_source = \"apps/a.luau\"\n",
                "give app or app_source, not both",
            ),
            (
                "[[tenants.group]]\nname = \"a\"\napp_source = \"apps/none.luau\"\n",
                "does not exist",
            ),
            (
                "[[tenants.group]]\nname = \"a\"\n[[tenants.group]]\nname = \"a\"\n",
                "two groups are named `a`",
            ),
            (
                "[tenants]\ncount = 4\n[[tenants.group]]\nname = \"a\"\n",
                "give each group its count and app",
            ),
            (
                "baseline = true\n[[tenants.group]]\nname = \"a\"\n",
                "needs groups of both kinds",
            ),
            (
                "[[tenants.group]]\nname = \"a\"\npaths = [\"batch\"]\n",
                "group `a` has no load",
            ),
            (
                "[platform]\nmemory_limit_mb = 100\n",
                "needs topology = \"separate\"",
            ),
            (
                "[[tenants.group]]\nname = \"a\"\n[tenants.group.stream]\nmessages = 1\nrate = 1\npoison_every = 0\n",
                "poison_every must be at least 1",
            ),
        ] {
            std::fs::write(&p, format!("name = \"x\"\n{text}{load}")).expect("write");
            let e = format!("{:#}", Scenario::load(&p).expect_err(text));
            assert!(e.contains(expect), "{text}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn generated_and_padded_files_are_deterministic_and_sized() {
        let b = BatchLoad {
            files: 2,
            records_per_file: 50,
            record_bytes: Some(1000),
            dataset: None,
            poison_every: None,
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
    fn poison_rows_alternate_between_unparseable_and_not_a_number() {
        let b = BatchLoad {
            files: 1,
            records_per_file: 20,
            record_bytes: None,
            dataset: None,
            poison_every: Some(5),
        };
        let f = make_files(&b, 1).expect("files");
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(&f[0][..]);
        let rows: Vec<csv::StringRecord> = rdr.records().map(|r| r.expect("row")).collect();
        assert_eq!(rows.len(), 20, "poison rows are rows offered too");
        let short: Vec<usize> = (0..20).filter(|&i| rows[i].len() < 4).collect();
        let nan: Vec<usize> = (0..20)
            .filter(|&i| rows[i].get(3).unwrap_or("") == "n/a")
            .collect();
        assert_eq!(short, [4, 14]);
        assert_eq!(nan, [9, 19]);
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
