//! Reports: `report.json` (a stable, versioned format), `report.md`, a latency plot (SVG)
//! and the serialized HDR histograms.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

use crate::accounting::{Counts, TenantAccount};
use crate::scenario::{Expect, Scenario};

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
    fn of(h: &Histogram<u64>) -> Self {
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
            histogram: Some(latency),
        }
    }
}

/// A path's figures before they are summarised, so groups and tenants can be added up.
#[derive(Debug, Clone)]
pub struct PathParts {
    pub counts: Counts,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    pub per_file: Option<Histogram<u64>>,
    pub uncorrected: Option<Histogram<u64>>,
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
    pub fn add(&mut self, o: &PathParts) {
        self.counts.add(&o.counts);
        self.elapsed = self.elapsed.max(o.elapsed);
        let _ = self.latency.add(&o.latency);
        merge(&mut self.per_file, &o.per_file);
        merge(&mut self.uncorrected, &o.uncorrected);
    }

    /// Count: inputs stored; failures: failure entries; throughput: stored per second.
    pub fn stats(&self) -> PathStats {
        let mut s = PathStats::new(
            self.counts.stored,
            self.counts.failed,
            self.elapsed,
            self.latency.clone(),
            self.per_file.clone(),
            self.uncorrected.clone(),
        );
        s.accounting = Some(self.counts.clone());
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
    pub records_per_s: f64,
    pub note: String,
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
    pub reference: serde_json::Value,
    /// Every tenant's path in every phase: offered, stored, failed, lost.
    #[serde(default)]
    pub accounting: Vec<TenantAccount>,
    #[serde(default)]
    pub phases: Vec<PhaseReport>,
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

/// A plotted line: name, colour, (log10 of 1/(1-percentile), milliseconds) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Peak resident memory (VmHWM) of a process (`None`: this one); 0 where unknown.
pub fn peak_rss(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

impl Report {
    pub fn new(
        sc: &Scenario,
        run_id: &str,
        versions: mysimbdp::infra::ServerVersions,
        results: Results,
        ceiling: Option<Ceiling>,
        wall: Duration,
    ) -> Self {
        let batch = results.batch.as_ref().map(PathParts::stats);
        let stream = results.stream.as_ref().map(PathParts::stats);
        let baseline = baseline_rows(&results.phases, &results.accounting);
        let fraction = match (&batch, &ceiling) {
            (Some(b), Some(c)) => Some(b.throughput_per_s / c.records_per_s),
            _ => None,
        };
        let reference = serde_json::json!({
            "original_batch_ms_per_ingestion": ORIGINAL_BATCH_MS,
            "original_stream_ms_per_ingestion": ORIGINAL_STREAM_MS,
            "batch_speedup": batch.as_ref().map(|b| ORIGINAL_BATCH_MS / b.ms_per_ingestion),
            "stream_speedup": stream.as_ref().map(|s| ORIGINAL_STREAM_MS / s.ms_per_ingestion),
        });
        let rss = peak_rss(None);
        Self {
            schema_version: SCHEMA_VERSION,
            scenario: sc.clone(),
            run_id: run_id.to_owned(),
            environment: Environment {
                cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
                memory_bytes: memory_bytes(),
                os: std::env::consts::OS.to_owned(),
                mongodb_version: versions.mongodb,
                mongodb_server: versions.mongodb_server,
                rabbitmq: versions.rabbitmq,
                commit: commit(),
                build: if cfg!(debug_assertions) {
                    "debug".into()
                } else {
                    "release".into()
                },
                peak_rss_bytes: rss,
                processes: vec![("runner".into(), rss)],
            },
            wall_s: wall.as_secs_f64(),
            batch,
            stream,
            ceiling,
            batch_fraction_of_ceiling: fraction,
            reference,
            accounting: results.accounting,
            phases: results.phases,
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

    /// The processes the platform and the load ran in, with their peak resident memory.
    pub fn with_processes(mut self, processes: Vec<(String, u64)>) -> Self {
        self.environment.peak_rss_bytes = processes.iter().map(|(_, b)| b).sum();
        self.environment.processes = processes;
        self
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("latency.svg"), self.svg())?;
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

    fn markdown(&self) -> String {
        let e = &self.environment;
        let mut s = format!(
            "# Scenario `{}` — run {}\n\n{}\n\n## Environment\n\n| | |\n|---|---|\n| cores | {} |\n| memory | {:.1} GiB |\n| MongoDB server | {} (buildInfo version {}) |\n| RabbitMQ | {} |\n| commit | {} ({} build) |\n| platform topology | {} |\n| peak RSS | {:.0} MiB ({}) |\n\n## Results\n\n| path | offered | stored | failed | lost | throughput /s | ms per ingestion | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | original ms | speed-up |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.scenario.name,
            self.run_id,
            self.scenario.description,
            e.cores,
            e.memory_bytes as f64 / (1u64 << 30) as f64,
            e.mongodb_server,
            e.mongodb_version,
            e.rabbitmq,
            e.commit,
            e.build,
            match self.scenario.platform.topology {
                crate::deploy::Topology::InProcess => "in-process (one process: platform + load)",
                crate::deploy::Topology::Separate =>
                    "separate processes (coredms, batch, stream; the load in the runner)",
            },
            e.peak_rss_bytes as f64 / (1u64 << 20) as f64,
            e.processes
                .iter()
                .map(|(n, b)| format!("{n} {:.0} MiB", *b as f64 / (1u64 << 20) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (name, p, orig) in [
            ("batch", &self.batch, ORIGINAL_BATCH_MS),
            ("stream", &self.stream, ORIGINAL_STREAM_MS),
        ] {
            if let Some(p) = p {
                let l = &p.latency;
                let (offered, lost) = p.accounting.as_ref().map_or(("?".into(), "?".into()), |c| {
                    (c.offered.to_string(), c.lost.to_string())
                });
                s.push_str(&format!(
                    "| {name} | {offered} | {} | {} | {lost} | {:.0} | {:.4} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {orig} | {:.0}× |\n",
                    p.count, p.failures, p.throughput_per_s, p.ms_per_ingestion, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms,
                    orig / p.ms_per_ingestion
                ));
            }
        }
        match self.scenario.stream.as_ref() {
            Some(st) if st.concurrency > 0 => s.push_str(&format!(
                "\nBatch latency: record read → stored. Stream latency: publish → stored, closed loop with {} publishers per tenant (not corrected: a closed loop has no intended schedule)",
                st.concurrency
            )),
            _ => s.push_str("\nBatch latency: record read → stored. Stream latency: publish → stored, corrected for coordinated omission at the offered rate"),
        }
        if let Some(u) = self.stream.as_ref().and_then(|p| p.uncorrected.as_ref()) {
            s.push_str(&format!(
                " (uncorrected p50 {:.2} ms, p99 {:.2} ms)",
                u.p50_ms, u.p99_ms
            ));
        }
        s.push_str(".\n\n\"ms per ingestion\" is wall time divided by ingestions, as the original measured it: it is the platform's capacity only when the offered load exceeds it (the seed scenarios); at a sustainable fixed rate it reflects the rate.\n");
        if let Some(f) = self.batch.as_ref().and_then(|p| p.per_file.as_ref()) {
            s.push_str(&format!(
                "\nPer file (ingest request → done): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.\n",
                f.p50_ms, f.p99_ms, f.max_ms
            ));
        }
        if let (Some(c), Some(f)) = (&self.ceiling, self.batch_fraction_of_ceiling) {
            s.push_str(&format!(
                "\n## Ceiling\n\nRaw driver on the same server in the same run: {:.0} records/s ({}). The platform's batch path reached {:.0}% of it.\n",
                c.records_per_s,
                c.note,
                f * 100.0
            ));
        }
        s.push_str(&self.accounting_md());
        s
    }

    /// The groups (with both phases, side by side), every tenant's accounting, the problems.
    fn accounting_md(&self) -> String {
        let mut s = String::new();
        let grouped = self.phases.len() > 1 || self.phases.iter().any(|p| p.groups.len() > 1);
        if !self.baseline.is_empty() {
            s.push_str("\n## Well-behaved tenants alone and beside the others\n\nThe groups that expect success, first alone (phase `baseline`), then with every other group running at the same time (phase `mixed`), in the same run.\n\n| group | path | alone stored/s | alone p99 ms | mixed stored/s | mixed p99 ms | throughput mixed/alone | p99 mixed/alone |\n|---|---|---|---|---|---|---|---|\n");
            let fin = |x: &Side| if x.finished { "" } else { " (unfinished)" };
            for r in &self.baseline {
                s.push_str(&format!(
                    "| {} | {} | {:.0}{} | {:.2} | {:.0}{} | {:.2} | {:.2} | {:.2} |\n",
                    r.group,
                    r.path,
                    r.alone.throughput_per_s,
                    fin(&r.alone),
                    r.alone.p99_ms,
                    r.mixed.throughput_per_s,
                    fin(&r.mixed),
                    r.mixed.p99_ms,
                    r.throughput_ratio,
                    r.p99_ratio
                ));
            }
        }
        if grouped {
            s.push_str("\n## Groups\n\n| phase | group | expect | tenants | path | offered | stored | failed | lost | stored/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
            for p in &self.phases {
                for g in &p.groups {
                    for (path, st) in [("batch", &g.batch), ("stream", &g.stream)] {
                        let Some(st) = st else { continue };
                        let c = st.accounting.clone().unwrap_or_default();
                        s.push_str(&format!(
                            "| {} | {} | {} | {} | {path} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} |\n",
                            p.name,
                            g.group,
                            g.expect.as_str(),
                            g.tenants,
                            c.offered,
                            c.stored,
                            c.failed,
                            c.lost,
                            st.throughput_per_s,
                            st.latency.p50_ms,
                            st.latency.p99_ms
                        ));
                    }
                }
            }
        }
        if !self.accounting.is_empty() {
            s.push_str("\n## Accounting\n\nPer tenant and path: offered (accepted by the platform: rows of the files whose ingestion it started, messages whose publish it confirmed), refused (turned away at the door), stored (inputs with a document in the tenant's database), failed (failure entries in its log), lost = offered − stored − failed (negative: counted twice), documents found and success/duplicate log entries.\n\n| phase | tenant | expect | path | offered | refused | stored | failed | lost | documents | logged stored | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
            for a in &self.accounting {
                let c = &a.counts;
                let mut notes: Vec<String> = Vec::new();
                if let Some(u) = &a.unfinished {
                    notes.push(format!("unfinished: {u}"));
                }
                notes.extend(a.files_failed.iter().map(|f| format!("file {f}")));
                notes.extend(a.errors.iter().cloned());
                notes.extend(a.refusals.iter().cloned());
                if let Some((r, n)) = a.reasons.first() {
                    notes.push(format!("top failure ({n}×): {r}"));
                }
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    a.phase,
                    a.tenant,
                    a.expect.as_str(),
                    a.path,
                    c.offered,
                    c.refused,
                    c.stored,
                    c.failed,
                    c.lost,
                    c.documents,
                    c.logged_stored,
                    notes.join("; ").replace('|', "\\|").replace('\n', " ")
                ));
            }
        }
        if !self.platform_errors.is_empty() {
            s.push_str("\n## Platform errors\n\n");
            for e in &self.platform_errors {
                s.push_str(&format!("```\n{e}\n```\n"));
            }
        }
        s.push_str("\n## Strict check\n\n");
        if self.problems.is_empty() {
            s.push_str("Pass: every offered input was stored or, for groups that expect failures, logged as failed.\n");
        } else {
            for p in &self.problems {
                s.push_str(&format!("- {}\n", p.replace('\n', " ")));
            }
        }
        s
    }

    fn svg(&self) -> String {
        // Latency by percentile on a log scale of 1/(1-p): the usual HDR percentile plot.
        let (w, h, m) = (720.0, 400.0, 60.0);
        let mut paths = String::new();
        let mut max_ms: f64 = 1.0;
        let series: Vec<Series> = [
            ("batch", "#1f77b4", &self.batch),
            ("stream", "#d62728", &self.stream),
        ]
        .into_iter()
        .filter_map(|(n, col, p)| {
            let h = p.as_ref()?.histogram.as_ref()?;
            let pts: Vec<(f64, f64)> = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999]
                .iter()
                .map(|q: &f64| {
                    (
                        (1.0 / (1.0 - q)).log10(),
                        h.value_at_quantile(*q) as f64 / 1000.0,
                    )
                })
                .collect();
            Some((n, col, pts))
        })
        .collect();
        for (_, _, pts) in &series {
            for (_, v) in pts {
                max_ms = max_ms.max(*v);
            }
        }
        let x = |lx: f64| m + lx / 4.0 * (w - 2.0 * m);
        let y = |v: f64| h - m - v / max_ms * (h - 2.0 * m);
        for (i, (name, col, pts)) in series.iter().enumerate() {
            let d: Vec<String> = pts
                .iter()
                .map(|(lx, v)| format!("{:.1},{:.1}", x(*lx), y(*v)))
                .collect();
            paths.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{}\" y=\"{}\" fill=\"{col}\">{name}</text>",
                d.join(" "),
                w - m - 60.0,
                m + 20.0 * (i as f64 + 1.0)
            ));
        }
        let mut axes = String::new();
        for (lx, label) in [
            (0.0, "0%"),
            (1.0, "90%"),
            (2.0, "99%"),
            (3.0, "99.9%"),
            (4.0, "99.99%"),
        ] {
            axes.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
                x(lx),
                h - m + 20.0
            ));
        }
        axes.push_str(&format!(
            "<text x=\"{}\" y=\"{}\">{max_ms:.1} ms</text><text x=\"10\" y=\"{}\">0</text>",
            5.0,
            m,
            h - m
        ));
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"{m}\" y=\"25\" font-size=\"14\">{} — latency by percentile (ms)</text><line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>{axes}{paths}</svg>",
            self.scenario.name,
            h - m,
            w - m,
            h - m,
            h - m
        )
    }
}

/// A table of B/A ratios for the headline figures of two reports.
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let load = |p: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&std::fs::read(p).with_context(
            || format!("cannot read {}", p.display()),
        )?)?)
    };
    let (ra, rb) = (load(a)?, load(b)?);
    let mut out = format!("{:<34} {:>14} {:>14} {:>9}\n", "figure", "A", "B", "B/A");
    for path in ["batch", "stream"] {
        for (field, label) in [
            ("throughput_per_s", "throughput /s"),
            ("ms_per_ingestion", "ms per ingestion"),
        ] {
            if let (Some(x), Some(y)) = (ra[path][field].as_f64(), rb[path][field].as_f64()) {
                out.push_str(&format!(
                    "{:<34} {x:>14.4} {y:>14.4} {:>9.3}\n",
                    format!("{path} {label}"),
                    y / x
                ));
            }
        }
        for (field, label) in [
            ("offered", "offered"),
            ("stored", "stored"),
            ("failed", "failed"),
            ("lost", "lost"),
        ] {
            if let (Some(x), Some(y)) = (
                ra[path]["accounting"][field].as_i64(),
                rb[path]["accounting"][field].as_i64(),
            ) {
                let ratio = if x == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.3}", y as f64 / x as f64)
                };
                out.push_str(&format!(
                    "{:<34} {x:>14} {y:>14} {ratio:>9}\n",
                    format!("{path} {label}")
                ));
            }
        }
        for q in ["p50_ms", "p99_ms", "p999_ms", "max_ms"] {
            if let (Some(x), Some(y)) = (
                ra[path]["latency"][q].as_f64(),
                rb[path]["latency"][q].as_f64(),
            ) {
                out.push_str(&format!(
                    "{:<34} {x:>14.3} {y:>14.3} {:>9.3}\n",
                    format!("{path} latency {q}"),
                    y / x.max(1e-9)
                ));
            }
        }
    }
    Ok(out)
}
