//! Reports: `report.json` (a stable, versioned format), `report.md`, a latency plot (SVG)
//! and the serialized HDR histograms; the plot of two lines over time other scenarios draw.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::accounting::{Counts, SecondPoint, Series, TenantAccount};
use crate::schema::{Expect, Scenario};

mod compare;
mod markdown;
mod plot;

pub use compare::compare;
pub use plot::{Line, over_time};

/// Bumped whenever a field changes meaning. 2: `accounting` (offered, stored, failed, lost
/// per tenant and path, from the database and the log), `phases`, `baseline`,
/// `platform_errors`, `problems`; `count` is the inputs stored (distinct, found in the
/// database) and `failures` the failure entries in the log.
pub const SCHEMA_VERSION: u32 = 2;
/// The original Python platform's figures (shared/seed/platform-description.txt).
pub const ORIGINAL_BATCH_MS: f64 = 38.7;
pub const ORIGINAL_STREAM_MS: f64 = 114.4;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
        Self {
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: h.max() as f64 / 1000.0,
            mean_ms: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathStats {
    pub count: u64,
    pub failures: u64,
    pub elapsed_s: f64,
    pub throughput_per_s: f64,
    /// Wall time divided by ingestions: the original platform's metric.
    pub ms_per_ingestion: f64,
    /// Per ingestion: batch record read → stored; stream publish → stored (corrected for
    /// coordinated omission at the offered rate).
    pub latency: Latency,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_file: Option<Latency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncorrected: Option<Latency>,
    /// Offered, stored, failed, lost (schema 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounting: Option<Counts>,
    /// Per second of the run: inputs completed, their p50 and p99.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<SecondPoint>,
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

impl PathStats {
    pub fn new(
        count: u64,
        failures: u64,
        elapsed: Duration,
        latency: Histogram<u64>,
        per_file: Option<Histogram<u64>>,
        uncorrected: Option<Histogram<u64>>,
    ) -> Self {
        let s = elapsed.as_secs_f64();
        Self {
            count,
            failures,
            elapsed_s: s,
            throughput_per_s: count as f64 / s.max(1e-9),
            ms_per_ingestion: s * 1000.0 / (count.max(1) as f64),
            latency: Latency::of(&latency),
            per_file: per_file.as_ref().map(Latency::of),
            uncorrected: uncorrected.as_ref().map(Latency::of),
            accounting: None,
            series: Vec::new(),
            histogram: Some(latency),
        }
    }
}

/// A path's figures before they are summarised, so groups and tenants can be added up.
#[derive(Debug, Clone)]
pub struct PathParts {
    pub counts: Counts,
    /// From the phase's start to the end of the load, as the runner saw it.
    pub ran: Duration,
    /// Where the work could begin and the last input logged (Unix ms), where both are known.
    pub span: Option<(i64, i64)>,
    pub latency: Histogram<u64>,
    pub per_file: Option<Histogram<u64>>,
    pub uncorrected: Option<Histogram<u64>>,
    pub series: Series,
}

fn merge(a: &mut Option<Histogram<u64>>, b: &Option<Histogram<u64>>) {
    match (a.as_mut(), b) {
        (Some(x), Some(y)) => {
            let _ = x.add(y);
        }
        (None, Some(y)) => *a = Some(y.clone()),
        _ => {}
    }
}

impl PathParts {
    /// How long the load took. It runs from where its work can begin (the consumers' start,
    /// the first ingest request) to its last input logged: the runner learns the end by
    /// asking (the log every second, the files' states every 200 ms), so the log's own time
    /// is the end, as the raw pipeline's is its last message stored. Never longer than the
    /// runner saw it run.
    pub fn elapsed(&self) -> Duration {
        Self::timed(self.ran, self.span)
    }

    /// [`Self::elapsed`] of a load that ran for `ran` over `span`.
    pub fn timed(ran: Duration, span: Option<(i64, i64)>) -> Duration {
        match span {
            Some((from, to)) if to > from => ran.min(Duration::from_millis(to.abs_diff(from))),
            _ => ran,
        }
    }

    /// Adds another tenant's (or group's) figures: the span from the earliest start to the
    /// latest end, so tenants that began apart are not timed as if they overlapped.
    pub fn add(&mut self, o: &PathParts) {
        self.counts.add(&o.counts);
        self.ran = self.ran.max(o.ran);
        self.span = match (self.span, o.span) {
            (Some((f1, t1)), Some((f2, t2))) => Some((f1.min(f2), t1.max(t2))),
            _ => None,
        };
        let _ = self.latency.add(&o.latency);
        merge(&mut self.per_file, &o.per_file);
        merge(&mut self.uncorrected, &o.uncorrected);
        self.series.add(&o.series);
    }

    /// Count: inputs stored; failures: failure entries; throughput: stored per second.
    pub fn stats(&self) -> PathStats {
        let mut s = PathStats::new(
            self.counts.stored,
            self.counts.failed,
            self.elapsed(),
            self.latency.clone(),
            self.per_file.clone(),
            self.uncorrected.clone(),
        );
        s.accounting = Some(self.counts.clone());
        s.series = self.series.points();
        s
    }
}

/// One group's figures in one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    pub group: String,
    pub expect: Expect,
    pub tenants: u32,
    pub batch: Option<PathStats>,
    pub stream: Option<PathStats>,
}

/// A phase: `main` (a one-phase scenario), or `baseline` then `mixed`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseReport {
    pub name: String,
    pub elapsed_s: f64,
    pub groups: Vec<GroupReport>,
}

/// A well-behaved group's path in one phase, for the side-by-side comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Side {
    pub stored: u64,
    pub offered: u64,
    pub throughput_per_s: f64,
    pub p99_ms: f64,
    /// Every tenant of the group finished this path before the deadline.
    pub finished: bool,
}

/// A well-behaved group alone (phase `baseline`) and beside the others (phase `mixed`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineRow {
    pub group: String,
    pub path: String,
    pub alone: Side,
    pub mixed: Side,
    /// Mixed over alone.
    pub throughput_ratio: f64,
    pub p99_ratio: f64,
}

/// What a run measured, for [`Report::new`].
#[derive(Default)]
pub struct Results {
    /// The headline paths: the groups that expect success, in the last phase.
    pub batch: Option<PathParts>,
    pub stream: Option<PathParts>,
    pub accounting: Vec<TenantAccount>,
    pub phases: Vec<PhaseReport>,
    /// Each round of a scenario with `rounds` > 1; `batch` is then the median round's.
    pub rounds: Vec<Round>,
    /// The stream's offered rate, when it was measured in the run rather than fixed.
    pub stream_rate: Option<StreamRate>,
}

/// An offered rate set from the platform's closed-loop rate measured first in the same run
/// (`[stream.rate_of_closed_loop]`; its phase is `closed loop`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRate {
    /// Messages per second the platform stored in the closed loop.
    pub closed_loop_per_s: f64,
    pub fraction: f64,
    /// The rate offered: `fraction` of `closed_loop_per_s`, rounded.
    pub rate: u32,
    /// Peak resident memory of the closed loop (the processes' sum). The report's
    /// `peak_rss_bytes` is the peak of what followed it: the peaks are reset in between.
    /// 0 in reports from before it was kept.
    #[serde(default)]
    pub closed_loop_peak_rss_bytes: u64,
}

/// One round of a scenario run several times: the raw driver on the same records just
/// before and just after the platform's load, and the platform set against their mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub round: usize,
    pub records_per_s: f64,
    /// The same writes as the platform's, before and after its load.
    pub ceiling_records_per_s: (f64, f64),
    /// The records alone, before and after its load.
    pub data_alone_records_per_s: (f64, f64),
    /// Over the mean of the two ceilings.
    pub fraction_of_ceiling: f64,
    pub fraction_of_data_alone: f64,
    /// The round the report's headline figures are of.
    #[serde(default)]
    pub median: bool,
}

impl Round {
    pub fn of(round: usize, parts: &PathParts, before: &Ceiling, after: &Ceiling) -> Self {
        let records_per_s = parts.stats().throughput_per_s;
        let alone = |c: &Ceiling| c.data_alone_records_per_s.unwrap_or(f64::NAN);
        let mean = Ceiling::around(before, after);
        Self {
            round,
            records_per_s,
            ceiling_records_per_s: (before.records_per_s, after.records_per_s),
            data_alone_records_per_s: (alone(before), alone(after)),
            fraction_of_ceiling: records_per_s / mean.records_per_s,
            fraction_of_data_alone: records_per_s / alone(&mean),
            median: false,
        }
    }

    /// The round as a line of progress.
    pub fn line(&self) -> String {
        format!(
            "round {}: platform {:.0} records/s; raw driver before and after it {:.0} and {:.0} (same writes), {:.0} and {:.0} (records alone): {:.2} and {:.2} of their means",
            self.round,
            self.records_per_s,
            self.ceiling_records_per_s.0,
            self.ceiling_records_per_s.1,
            self.data_alone_records_per_s.0,
            self.data_alone_records_per_s.1,
            self.fraction_of_ceiling,
            self.fraction_of_data_alone
        )
    }
}

impl Ceiling {
    /// The mean of two measurements of the same ceilings, one before and one after a load.
    pub fn around(before: &Ceiling, after: &Ceiling) -> Ceiling {
        let mean = |a: f64, b: f64| (a + b) / 2.0;
        Ceiling {
            documents: before.documents,
            records_per_s: mean(before.records_per_s, after.records_per_s),
            data_alone_records_per_s: before
                .data_alone_records_per_s
                .zip(after.data_alone_records_per_s)
                .map(|(a, b)| mean(a, b)),
            note: format!(
                "{}; the mean of a measurement just before the platform's load and one just after it",
                before.note
            ),
        }
    }
}

/// The side-by-side rows of the groups that expect success, when there are both phases.
fn baseline_rows(phases: &[PhaseReport], accounting: &[TenantAccount]) -> Vec<BaselineRow> {
    let (Some(alone), Some(mixed)) = (
        phases.iter().find(|p| p.name == "baseline"),
        phases.iter().find(|p| p.name == "mixed"),
    ) else {
        return Vec::new();
    };
    let side = |phase: &str, g: &GroupReport, path: &str, st: &PathStats| Side {
        stored: st.count,
        offered: st.accounting.as_ref().map_or(0, |c| c.offered),
        throughput_per_s: st.throughput_per_s,
        p99_ms: st.latency.p99_ms,
        finished: !accounting.iter().any(|a| {
            a.phase == phase && a.group == g.group && a.path == path && a.unfinished.is_some()
        }),
    };
    let mut rows = Vec::new();
    for g in alone.groups.iter().filter(|g| g.expect == Expect::Success) {
        let Some(m) = mixed.groups.iter().find(|m| m.group == g.group) else {
            continue;
        };
        for (path, a, b) in [
            ("batch", &g.batch, &m.batch),
            ("stream", &g.stream, &m.stream),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                let (a, b) = (side("baseline", g, path, a), side("mixed", m, path, b));
                rows.push(BaselineRow {
                    group: g.group.clone(),
                    path: path.into(),
                    throughput_ratio: b.throughput_per_s / a.throughput_per_s.max(1e-9),
                    p99_ratio: b.p99_ms / a.p99_ms.max(1e-9),
                    alone: a,
                    mixed: b,
                });
            }
        }
    }
    rows
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ceiling {
    pub documents: u64,
    /// The records and one log entry each, as the platform writes them.
    pub records_per_s: f64,
    /// The records alone, no log (absent in reports before it was measured).
    #[serde(default)]
    pub data_alone_records_per_s: Option<f64>,
    pub note: String,
}

/// The raw stream pipeline: the same messages at the same offered rate (or closed loop)
/// through RabbitMQ and the MongoDB driver alone, in the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamCeiling {
    pub messages: u64,
    pub elapsed_s: f64,
    pub throughput_per_s: f64,
    /// Publish → stored, corrected for coordinated omission at the offered rate.
    pub latency: Latency,
    pub uncorrected: Latency,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<SecondPoint>,
    pub note: String,
}

/// The baselines measured in the same run, each where the scenario has its path.
#[derive(Default)]
pub struct Ceilings {
    pub batch: Option<Ceiling>,
    pub stream: Option<StreamCeiling>,
}

/// The platform's stream path set against the raw stream pipeline of the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamVsRaw {
    /// Platform throughput over the raw pipeline's.
    pub throughput_ratio: f64,
    pub p50_ratio: f64,
    /// Platform p50 minus the raw pipeline's (ms).
    pub p50_excess_ms: f64,
    /// Platform p99 over the raw pipeline's (both corrected for coordinated omission).
    pub p99_ratio: f64,
}

impl StreamVsRaw {
    fn of(platform: &PathStats, raw: &StreamCeiling) -> Self {
        Self {
            throughput_ratio: platform.throughput_per_s / raw.throughput_per_s.max(1e-9),
            p50_ratio: platform.latency.p50_ms / raw.latency.p50_ms.max(1e-9),
            p50_excess_ms: platform.latency.p50_ms - raw.latency.p50_ms,
            p99_ratio: platform.latency.p99_ms / raw.latency.p99_ms.max(1e-9),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Environment {
    pub cores: usize,
    pub memory_bytes: u64,
    pub os: String,
    pub mongodb_version: String,
    pub mongodb_server: String,
    pub rabbitmq: String,
    pub commit: String,
    pub build: String,
    /// Peak resident memory (VmHWM) summed over the processes below.
    pub peak_rss_bytes: u64,
    /// Each process of the run and its peak resident memory: the runner alone (platform
    /// and load) in-process, or the runner and each component when they run apart.
    #[serde(default)]
    pub processes: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub scenario: Scenario,
    pub run_id: String,
    pub environment: Environment,
    pub wall_s: f64,
    pub batch: Option<PathStats>,
    pub stream: Option<PathStats>,
    pub ceiling: Option<Ceiling>,
    /// Batch throughput as a fraction of the raw driver ceiling.
    pub batch_fraction_of_ceiling: Option<f64>,
    /// Batch throughput as a fraction of the raw driver writing the records alone.
    #[serde(default)]
    pub batch_fraction_of_data_alone: Option<f64>,
    /// The raw stream pipeline of the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_raw: Option<StreamCeiling>,
    /// The stream path as a ratio to [`Report::stream_raw`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_vs_raw: Option<StreamVsRaw>,
    /// The offered rate, when it was measured in the run (the closed loop first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_rate: Option<StreamRate>,
    pub reference: serde_json::Value,
    /// Every tenant's path in every phase: offered, stored, failed, lost.
    #[serde(default)]
    pub accounting: Vec<TenantAccount>,
    #[serde(default)]
    pub phases: Vec<PhaseReport>,
    /// Each round of a scenario run several times (`rounds`); the figures above are the
    /// median round's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Round>,
    /// The groups that expect success, alone and beside the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub baseline: Vec<BaselineRow>,
    /// A component that died, or a platform that did not stop.
    #[serde(default)]
    pub platform_errors: Vec<String>,
    /// What `--strict` refuses, one line per tenant and path (`accounting::problems`).
    #[serde(default)]
    pub problems: Vec<String>,
}

impl Report {
    pub fn new(
        sc: &Scenario,
        run_id: &str,
        environment: Environment,
        results: Results,
        ceilings: Ceilings,
        wall: Duration,
    ) -> Self {
        let Ceilings {
            batch: ceiling,
            stream: stream_raw,
        } = ceilings;
        let batch = results.batch.as_ref().map(PathParts::stats);
        let stream = results.stream.as_ref().map(PathParts::stats);
        let baseline = baseline_rows(&results.phases, &results.accounting);
        let fraction = match (&batch, &ceiling) {
            (Some(b), Some(c)) => Some(b.throughput_per_s / c.records_per_s),
            _ => None,
        };
        let fraction_alone = match (&batch, &ceiling) {
            (Some(b), Some(c)) => c
                .data_alone_records_per_s
                .map(|alone| b.throughput_per_s / alone),
            _ => None,
        };
        let stream_vs_raw = stream
            .as_ref()
            .zip(stream_raw.as_ref())
            .map(|(s, r)| StreamVsRaw::of(s, r));
        let reference = serde_json::json!({
            "original_batch_ms_per_ingestion": ORIGINAL_BATCH_MS,
            "original_stream_ms_per_ingestion": ORIGINAL_STREAM_MS,
            "batch_speedup": batch.as_ref().map(|b| ORIGINAL_BATCH_MS / b.ms_per_ingestion),
            "stream_speedup": stream.as_ref().map(|s| ORIGINAL_STREAM_MS / s.ms_per_ingestion),
        });
        Self {
            schema_version: SCHEMA_VERSION,
            scenario: sc.clone(),
            run_id: run_id.to_owned(),
            environment,
            wall_s: wall.as_secs_f64(),
            batch,
            stream,
            ceiling,
            batch_fraction_of_ceiling: fraction,
            batch_fraction_of_data_alone: fraction_alone,
            stream_vs_raw,
            stream_raw,
            stream_rate: results.stream_rate,
            reference,
            accounting: results.accounting,
            phases: results.phases,
            rounds: results.rounds,
            baseline,
            platform_errors: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// Errors of the platform itself (a component that died, a stop that hung), then the
    /// problems `--strict` would refuse.
    pub fn with_platform_errors(mut self, errors: Vec<String>) -> Self {
        self.platform_errors = errors;
        self.problems = serde_json::to_value(&self)
            .map(|v| crate::accounting::problems(&v))
            .unwrap_or_default();
        self
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("latency.svg"), self.svg()?)?;
        std::fs::write(dir.join("series.svg"), self.series_svg()?)?;
        for (name, p) in [("batch", &self.batch), ("stream", &self.stream)] {
            if let Some(h) = p.as_ref().and_then(|p| p.histogram.as_ref()) {
                let mut buf = Vec::new();
                V2Serializer::new()
                    .serialize(h, &mut buf)
                    .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
                std::fs::write(dir.join(format!("{name}.hdr")), buf)?;
            }
        }
        Ok(())
    }
}
