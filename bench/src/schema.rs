//! The scenario file: its types, their validation, and the groups of tenants it resolves
//! to. The bottom layer of the workbench: it imports nothing of the crate.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

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
    pub faults: Option<FaultLoad>,
    /// What each tenant with a consumer costs the platform; a scenario with it runs only it.
    pub cost: Option<CostLoad>,
    /// Several batch and stream managers as processes of their own: throughput by stream
    /// manager count, managers killed under load, the elastic controller under a load step;
    /// a scenario with it runs only it.
    pub replicas: Option<ReplicaLoad>,
    /// Bounds each phase's load: what has not finished by then is reported as unfinished.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Two phases in one run: first the groups that expect success alone (`baseline`), then
    /// every group at once (`mixed`); the report sets the well-behaved groups' figures side
    /// by side. Each phase has its own tenants.
    #[serde(default)]
    pub baseline: bool,
    /// The load run this many times, each round with tenants of its own, the raw driver's
    /// ceilings measured just before and just after it. The report's headline is the
    /// median round by its ratio to the records alone; every round is in its `rounds`. For
    /// batch scenarios, on a server whose rate drifts from one minute to the next.
    #[serde(default = "one_round")]
    pub rounds: u32,
}

fn default_timeout() -> u64 {
    600
}

fn one_round() -> u32 {
    1
}

/// Most rounds a scenario may ask for.
pub const MAX_ROUNDS: u32 = 15;

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
    /// Writes acknowledged by the server's journal (`j: true`, the platform's default);
    /// `false` to measure what that durability costs. The raw ceiling uses the same.
    pub journal: bool,
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
            journal: true,
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
    /// coordinated omission). Give this, `concurrency` or `rate_of_closed_loop`.
    #[serde(default)]
    pub rate: u32,
    /// An offered rate not fixed in the file: a fraction of the platform's closed-loop rate,
    /// measured first in the same run. The load runs at that rate; the report gives it in
    /// `stream_rate` (its scenario is this one, as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_of_closed_loop: Option<ClosedLoopRate>,
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

/// `[stream.rate_of_closed_loop]`: the platform's capacity measured first, in a phase of its
/// own (`closed loop`, its own tenant) under this closed-loop load; the scenario's load is
/// then offered at `fraction` of the messages per second it stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClosedLoopRate {
    pub fraction: f64,
    pub messages: u32,
    /// Publishers, each sending its next request when the last one was confirmed.
    pub concurrency: u32,
    #[serde(default = "one")]
    pub per_request: u32,
    #[serde(default = "one")]
    pub consumers: u32,
}

impl ClosedLoopRate {
    /// The closed-loop load that measures the rate: the scenario's messages' size, the
    /// calibration's count, publishers and consumers.
    pub fn load(&self, of: &StreamLoad) -> StreamLoad {
        StreamLoad {
            messages: self.messages,
            rate: 0,
            rate_of_closed_loop: None,
            concurrency: self.concurrency,
            per_request: self.per_request,
            consumers: self.consumers,
            message_bytes: of.message_bytes,
            poison_every: None,
        }
    }
}

/// How the platform runs during a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// All components in the runner's process (`mysimbdp serve`).
    #[default]
    InProcess,
    /// One process per component, each reaching coredms over HTTP.
    Separate,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::InProcess => "in-process",
            Self::Separate => "separate processes",
        })
    }
}

/// `[faults]`: each fault injected while batch and stream load run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultLoad {
    /// `kill-platform`, `broker-cut`, `db-restart`.
    pub kinds: Vec<String>,
    /// Stream messages offered per fault.
    pub messages: u32,
    /// Offered rate, messages per second.
    pub rate: u32,
    /// The CSV file ingested by batch during each fault.
    pub dataset: PathBuf,
    /// Seconds of load before the fault.
    #[serde(default = "two")]
    pub fault_after_s: u64,
}

fn two() -> u64 {
    2
}

/// `[cost]`: tenants created in steps (each step adds tenants up to its count), a consumer
/// started for each and a trickle of messages published by each; the platform's resident
/// memory, threads and broker connections measured idle and at every step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostLoad {
    /// Tenants at each step, increasing, e.g. `[10, 100, 1000]`.
    pub steps: Vec<u32>,
    /// Messages each tenant publishes at each step, in one request.
    pub messages: u32,
    /// Tenant creations, consumer starts and publishes in flight at once.
    #[serde(default = "eight")]
    pub concurrency: u32,
    /// Platform settings for the run (`section.key=value`, as `serve --set` takes them),
    /// e.g. `amqp.consumer_connections=4`.
    #[serde(default)]
    pub set: Vec<String>,
}

fn eight() -> u32 {
    8
}

fn check_cost(c: &CostLoad) -> Result<()> {
    if c.steps.is_empty() || c.steps[0] == 0 || c.steps.windows(2).any(|w| w[0] >= w[1]) {
        bail!("cost.steps must be increasing tenant counts, the first at least 1");
    }
    if c.steps.last().is_some_and(|&n| n > 99_999) {
        bail!("cost.steps: at most 99,999 tenants");
    }
    if c.messages == 0 || c.concurrency == 0 {
        bail!("cost.messages and cost.concurrency must be at least 1");
    }
    if let Some(bad) = c.set.iter().find(|kv| !kv.contains('=')) {
        bail!("cost.set: `{bad}` is not `section.key=value`");
    }
    Ok(())
}

/// `[replicas]`: coredms, `batch_managers` batch and up to `stream_managers` stream
/// managers, each a process of its own over one staging directory; three phases, each on
/// tenants of its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaLoad {
    #[serde(default = "three")]
    pub batch_managers: u32,
    /// The throughput phase runs with 1, 2, … up to this many; the others with all of them.
    #[serde(default = "three")]
    pub stream_managers: u32,
    #[serde(default)]
    pub throughput: ThroughputLoad,
    pub kill: KillLoad,
    #[serde(default)]
    pub elastic: ElasticLoad,
    /// Platform settings for the run (`section.key=value`, as `serve --set` takes them),
    /// after the scenario's own (`batch.lease_ms=3000`), e.g. `stream.reconcile_ms=500`.
    #[serde(default)]
    pub set: Vec<String>,
}

/// `[replicas.throughput]`: the same closed-loop publish load once per stream manager
/// count, each time on a fresh tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThroughputLoad {
    pub messages: u32,
    /// Publishers, each sending its next request when the last was confirmed.
    pub publishers: u32,
    pub per_request: u32,
    /// The tenant's consumers on each stream manager.
    pub consumers: u32,
}

impl Default for ThroughputLoad {
    fn default() -> Self {
        Self {
            messages: 4000,
            publishers: 4,
            per_request: 50,
            consumers: 1,
        }
    }
}

/// `[replicas.kill]`: files ingesting across every batch manager and messages published at
/// a fixed rate across every stream manager; `kill_after_s` in, one of each is killed
/// (SIGKILL) and not restarted, and the survivors must finish the work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillLoad {
    /// The files: uploaded and ingested in turn through each batch manager.
    pub batch: BatchLoad,
    pub messages: u32,
    /// Offered rate, messages per second, in requests of 20.
    pub rate: u32,
    #[serde(default = "two")]
    pub kill_after_s: u64,
}

/// `[replicas.elastic]`: a tenant whose consumers may range from `min_consumers` to
/// `max_consumers` on each stream manager, offered each step's rate in turn, then nothing
/// until its consumers are back at the minimum (at most `settle_s`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticLoad {
    pub min_consumers: u32,
    pub max_consumers: u32,
    pub per_request: u32,
    pub steps: Vec<RateStep>,
    pub settle_s: u64,
}

impl Default for ElasticLoad {
    fn default() -> Self {
        let step = |rate, seconds| RateStep { rate, seconds };
        Self {
            min_consumers: 1,
            max_consumers: 3,
            per_request: 50,
            steps: vec![step(100, 10), step(2000, 10), step(100, 20)],
            settle_s: 60,
        }
    }
}

/// An offered rate (messages per second) held for `seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateStep {
    pub rate: u32,
    pub seconds: u64,
}

fn three() -> u32 {
    3
}

fn check_replicas(r: &mut ReplicaLoad, base: &Path) -> Result<()> {
    if r.batch_managers < 2 || r.stream_managers < 2 {
        bail!(
            "replicas.batch_managers and replicas.stream_managers must be at least 2: one of each is killed and the others finish its work"
        );
    }
    if r.batch_managers > 8 || r.stream_managers > 8 {
        bail!("replicas: at most 8 batch and 8 stream managers");
    }
    let t = &r.throughput;
    if t.messages == 0 || t.publishers == 0 || t.per_request == 0 || t.consumers == 0 {
        bail!(
            "replicas.throughput: messages, publishers, per_request and consumers must be at least 1"
        );
    }
    check_batch(&mut r.kill.batch, base).context("replicas.kill")?;
    if r.kill.messages == 0 || r.kill.rate == 0 {
        bail!("replicas.kill.messages and replicas.kill.rate must be at least 1");
    }
    let e = &r.elastic;
    if e.min_consumers == 0 || e.max_consumers < e.min_consumers {
        bail!("replicas.elastic: 1 <= min_consumers <= max_consumers");
    }
    if e.per_request == 0
        || e.steps.is_empty()
        || e.steps.iter().any(|s| s.rate == 0 || s.seconds == 0)
    {
        bail!("replicas.elastic: per_request and each step's rate and seconds must be at least 1");
    }
    if let Some(bad) = r.set.iter().find(|kv| !kv.contains('=')) {
        bail!("replicas.set: `{bad}` is not `section.key=value`");
    }
    Ok(())
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
    /// The app's Luau source; `None` for no app.
    pub fn source(&self) -> Option<&str> {
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
    let modes = [
        st.rate > 0,
        st.concurrency > 0,
        st.rate_of_closed_loop.is_some(),
    ];
    if modes.iter().filter(|m| **m).count() != 1 {
        bail!(
            "give exactly one of stream.rate (fixed offered rate), stream.concurrency (closed loop) and [stream.rate_of_closed_loop] (a fraction of the closed-loop rate, measured first)"
        );
    }
    if let Some(c) = &st.rate_of_closed_loop {
        if !(c.fraction > 0.0 && c.fraction <= 1.0) {
            bail!("stream.rate_of_closed_loop.fraction must be more than 0 and at most 1");
        }
        if c.messages == 0 || c.concurrency == 0 || c.per_request == 0 || c.consumers == 0 {
            bail!(
                "stream.rate_of_closed_loop: messages, concurrency, per_request and consumers must be at least 1"
            );
        }
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
        if st.rate_of_closed_loop.is_some() {
            bail!(
                "group `{}`: [stream.rate_of_closed_loop] is for the scenario's own [stream] of one tenant",
                g.name
            );
        }
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
        if let Some(c) = &s.cost {
            check_cost(c)?;
        }
        if let Some(r) = &mut s.replicas {
            check_replicas(r, &base)?;
        }
        let kinds = [s.faults.is_some(), s.cost.is_some(), s.replicas.is_some()];
        if kinds.iter().filter(|k| **k).count() > 1 {
            bail!("give one of [faults], [cost] and [replicas]: each is a scenario of its own");
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
            .filter(|_| s.faults.is_none() && s.cost.is_none() && s.replicas.is_none())
        {
            bail!(
                "group `{}` has no load: give [batch] or [stream] (the scenario's or its own)",
                p.name
            );
        }
        if !(1..=MAX_ROUNDS).contains(&s.rounds) {
            bail!("rounds must be from 1 to {MAX_ROUNDS}");
        }
        if s.stream
            .as_ref()
            .is_some_and(|st| st.rate_of_closed_loop.is_some())
            && (s.rounds > 1
                || s.baseline
                || s.batch.is_some()
                || s.tenants.count != 1
                || !s.tenants.groups.is_empty()
                || s.faults.is_some()
                || s.cost.is_some()
                || s.replicas.is_some())
        {
            bail!(
                "[stream.rate_of_closed_loop] is for a stream load of one tenant in one phase: no rounds, baseline, [batch], groups, [faults], [cost] or [replicas]"
            );
        }
        if s.rounds > 1
            && (s.batch.is_none() || s.stream.is_some() || s.baseline || kinds.iter().any(|k| *k))
        {
            bail!(
                "rounds > 1 repeats a batch load against the raw driver's ceilings: it needs [batch], and no [stream], baseline, [faults], [cost] or [replicas]"
            );
        }
        if s.rounds > 1
            && !plans
                .iter()
                .any(|p| p.expect == Expect::Success && p.batch.is_some())
        {
            bail!(
                "rounds > 1 sets the batch load of the groups that expect success against the raw driver's: it needs one"
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
    fn rounds_need_a_batch_load_expected_to_succeed() {
        let dir = scenario_dir("rounds");
        let p = dir.join("x.toml");
        let batch = "[batch]\nfiles = 1\nrecords_per_file = 1\n";
        std::fs::write(
            &p,
            format!(
                "name = \"x\"\nrounds = 3\n{batch}[[tenants.group]]\nname = \"a\"\nexpect = \"failures\"\n"
            ),
        )
        .expect("write");
        let e = format!(
            "{:#}",
            Scenario::load(&p).expect_err("no group expects success")
        );
        assert!(e.contains("it needs one"), "{e}");
        std::fs::write(&p, format!("name = \"x\"\nrounds = 3\n{batch}")).expect("write");
        assert_eq!(Scenario::load(&p).expect("one group, success").rounds, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_groups_are_rejected_with_the_reason() {
        let dir = scenario_dir("badgroups");
        let p = dir.join("x.toml");
        let load = "[stream]\nmessages = 1\nrate = 1\n";
        let kill = "[replicas.kill]\nmessages = 1\nrate = 1\n[replicas.kill.batch]\nfiles = 1\nrecords_per_file = 1\n";
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
            (
                "[cost]\nsteps = [10, 10]\nmessages = 1\n",
                "cost.steps must be increasing",
            ),
            (
                "[cost]\nsteps = [0]\nmessages = 1\n",
                "the first at least 1",
            ),
            (
                "[cost]\nsteps = [1]\nmessages = 0\n",
                "cost.messages and cost.concurrency must be at least 1",
            ),
            (
                "[cost]\nsteps = [1]\nmessages = 1\nset = [\"amqp.consumer_connections\"]\n",
                "is not `section.key=value`",
            ),
            (
                format!("[replicas]\nbatch_managers = 1\n{kill}").as_str(),
                "must be at least 2: one of each is killed",
            ),
            (
                format!("[replicas.elastic]\nmin_consumers = 3\nmax_consumers = 2\n{kill}")
                    .as_str(),
                "1 <= min_consumers <= max_consumers",
            ),
            (
                format!("[replicas.elastic]\nsteps = [{{ rate = 0, seconds = 5 }}]\n{kill}")
                    .as_str(),
                "each step's rate and seconds must be at least 1",
            ),
            (
                format!("[replicas.throughput]\npublishers = 0\n{kill}").as_str(),
                "replicas.throughput: messages, publishers",
            ),
            (
                format!("[cost]\nsteps = [1]\nmessages = 1\n{kill}").as_str(),
                "give one of [faults], [cost] and [replicas]",
            ),
            ("rounds = 0\n", "rounds must be from 1 to 15"),
            ("rounds = 16\n", "rounds must be from 1 to 15"),
            // The stream load the cases share is what a round cannot repeat.
            (
                "rounds = 3\n[batch]\nfiles = 1\nrecords_per_file = 1\n",
                "needs [batch], and no [stream]",
            ),
        ] {
            std::fs::write(&p, format!("name = \"x\"\n{text}{load}")).expect("write");
            let e = format!("{:#}", Scenario::load(&p).expect_err(text));
            assert!(e.contains(expect), "{text}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_rate_of_the_closed_loop_is_one_tenants_only_rate() {
        let dir = scenario_dir("closedlooprate");
        let p = dir.join("x.toml");
        let stream = "[stream]\nmessages = 5\nmessage_bytes = 99\n";
        let closed = |body: &str| format!("[stream.rate_of_closed_loop]\n{body}");
        let ok = "fraction = 0.5\nmessages = 7\nconcurrency = 3\n";
        std::fs::write(&p, format!("name = \"x\"\n{stream}{}", closed(ok))).expect("write");
        let sc = Scenario::load(&p).expect("valid");
        let st = sc.stream.as_ref().expect("stream");
        let c = st.rate_of_closed_loop.as_ref().expect("closed loop");
        let measured = c.load(st);
        assert_eq!(
            (measured.messages, measured.rate, measured.concurrency),
            (7, 0, 3)
        );
        assert_eq!((measured.per_request, measured.consumers), (1, 1));
        assert_eq!(measured.message_bytes, 99, "the scenario's messages");
        assert!(measured.rate_of_closed_loop.is_none());
        // A report holds the scenario as given (its rate measured again when it is run
        // again): written back to a file, it loads.
        let again = dir.join("again.toml");
        std::fs::write(&again, toml::to_string(&sc).expect("as TOML")).expect("write");
        let back = Scenario::load(&again).expect("the report's scenario loads again");
        let st = back.stream.as_ref().expect("stream");
        assert_eq!(st.rate, 0);
        assert_eq!(
            st.rate_of_closed_loop.as_ref().map(|c| c.fraction),
            Some(0.5)
        );
        for (text, expect) in [
            (
                format!("[stream]\nmessages = 5\nrate = 9\n{}", closed(ok)),
                "give exactly one of stream.rate",
            ),
            (
                format!(
                    "{stream}{}",
                    closed("fraction = 0.0\nmessages = 7\nconcurrency = 3\n")
                ),
                "fraction must be more than 0 and at most 1",
            ),
            (
                format!(
                    "{stream}{}",
                    closed("fraction = 1.5\nmessages = 7\nconcurrency = 3\n")
                ),
                "fraction must be more than 0 and at most 1",
            ),
            (
                format!(
                    "{stream}{}",
                    closed("fraction = 0.5\nmessages = 7\nconcurrency = 0\n")
                ),
                "messages, concurrency, per_request and consumers must be at least 1",
            ),
            (
                format!("{stream}{}", closed("fraction = 0.5\nmessages = 7\n")),
                "missing field `concurrency`",
            ),
            (
                format!("[tenants]\ncount = 2\n{stream}{}", closed(ok)),
                "for a stream load of one tenant in one phase",
            ),
            (
                format!(
                    "[batch]\nfiles = 1\nrecords_per_file = 1\n{stream}{}",
                    closed(ok)
                ),
                "for a stream load of one tenant in one phase",
            ),
            (
                format!(
                    "[[tenants.group]]\nname = \"a\"\n[tenants.group.stream]\nmessages = 5\n{}",
                    closed(ok).replace("[stream.", "[tenants.group.stream.")
                ),
                "is for the scenario's own [stream] of one tenant",
            ),
        ] {
            std::fs::write(&p, format!("name = \"x\"\n{text}")).expect("write");
            let e = format!("{:#}", Scenario::load(&p).expect_err(&text));
            assert!(e.contains(expect), "{text}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
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
