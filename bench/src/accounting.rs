//! Accounting for every offered input, from what the platform stored and logged rather than
//! from what the runner assumes: per tenant and path, offered (accepted by the platform),
//! stored (inputs with a document in the tenant's database, found by their derived ids),
//! failed (failure entries in the tenant's log) and lost = offered − stored − failed. A
//! negative `lost` means something was counted twice. [`problems`] is what `--strict` checks
//! ([`check`]); [`completed`], whether the run finished at all.
//!
//! Figures only: the runner (`run`) reads the database and the log and hands them here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use hdrhistogram::Histogram;
use mysimbdp::logs::{Source, Status};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::schema::Expect;

/// A batch file the platform accepted for ingestion, and how it ended.
#[derive(Debug, Clone)]
pub struct FileOutcome {
    pub name: String,
    pub origin: String,
    /// Inputs in it: its rows, or 1 for a whole-file (`ingest`) app.
    pub inputs: u64,
    /// The platform's last word: `done`, `failed`, or the state it was in at the deadline.
    pub state: String,
    pub error: Option<String>,
}

/// One line per file that ended `failed`, with the platform's reason.
pub fn failed_files(files: &[FileOutcome]) -> Vec<String> {
    files
        .iter()
        .filter(|f| f.state == "failed")
        .map(|f| {
            format!(
                "{} ended `failed`: {}",
                f.name,
                f.error.as_deref().unwrap_or("no error given")
            )
        })
        .collect()
}

/// The histogram every latency is recorded in: 1 µs to 1 h, three significant digits.
pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Completions by the second they happened in, with their latencies: the run over time,
/// where a stall shows as a second with few completions or a high p99.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Unix second → latencies (µs, saturating at about 71 minutes) of the inputs completed
    /// in it: 4 bytes an input, where a histogram per second took 13 KiB or more (scale's
    /// 650 seconds × 2 paths × 4 tenants were 68 MiB of histograms, for 4 MiB of inputs).
    seconds: BTreeMap<i64, Vec<u32>>,
}

/// One second of a run, counted from the series' first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondPoint {
    pub second: u64,
    /// Inputs completed in this second.
    pub completed: u64,
    /// Latencies of those inputs, as measured (none completed: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

impl Series {
    /// An input completed at `done_ms` (Unix milliseconds) after `latency_us`.
    pub fn record(&mut self, done_ms: i64, latency_us: u64) {
        self.seconds
            .entry(done_ms.div_euclid(1000))
            .or_default()
            .push(u32::try_from(latency_us.max(1)).unwrap_or(u32::MAX));
    }

    /// Adds another series (another tenant's) second by second.
    pub fn add(&mut self, other: &Series) {
        for (s, v) in &other.seconds {
            self.seconds.entry(*s).or_default().extend_from_slice(v);
        }
    }

    /// Every second from the first completion to the last, empty ones included.
    pub fn points(&self) -> Vec<SecondPoint> {
        let (Some(first), Some(last)) = (
            self.seconds.keys().next().copied(),
            self.seconds.keys().next_back().copied(),
        ) else {
            return Vec::new();
        };
        (first..=last)
            .map(|s| {
                let mut v = self.seconds.get(&s).cloned().unwrap_or_default();
                v.sort_unstable();
                // Nearest rank: the smallest latency at least a fraction x of them reach.
                let q = |x: f64| {
                    let rank = (x * v.len() as f64).ceil() as usize;
                    v.get(rank.clamp(1, v.len().max(1)) - 1)
                        .map(|us| f64::from(*us) / 1000.0)
                };
                SecondPoint {
                    second: (s - first) as u64,
                    completed: v.len() as u64,
                    p50_ms: q(0.5),
                    p99_ms: q(0.99),
                }
            })
            .collect()
    }
}

/// The figures of one tenant's path, or of several added up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Inputs the platform accepted: records of the files whose ingestion it started (one
    /// per file for an app without `map`), messages whose publish it confirmed.
    pub offered: u64,
    /// Inputs it refused at the door (upload, ingest or publish failed): not offered.
    pub refused: u64,
    /// Offered inputs with at least one document in the tenant's database.
    pub stored: u64,
    /// Failure entries in the tenant's log.
    pub failed: u64,
    /// Skipped entries in the tenant's log: inputs the app returned nothing for.
    #[serde(default)]
    pub skipped: u64,
    /// offered − stored − failed − skipped: inputs neither stored nor logged as failed or
    /// skipped. Negative: something was counted twice.
    pub lost: i64,
    /// Documents found for the offered inputs (an input may store several).
    pub documents: u64,
    /// Success and duplicate entries in the log: one per document written.
    pub logged_stored: u64,
}

impl Counts {
    pub fn settle(mut self) -> Self {
        self.lost =
            self.offered as i64 - self.stored as i64 - self.failed as i64 - self.skipped as i64;
        self
    }

    pub fn add(&mut self, o: &Counts) {
        self.offered += o.offered;
        self.refused += o.refused;
        self.stored += o.stored;
        self.failed += o.failed;
        self.skipped += o.skipped;
        self.lost += o.lost;
        self.documents += o.documents;
        self.logged_stored += o.logged_stored;
    }
}

/// One tenant's path in one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantAccount {
    pub phase: String,
    pub group: String,
    pub tenant: String,
    pub path: String,
    pub expect: Expect,
    #[serde(flatten)]
    pub counts: Counts,
    /// Files whose state ended `failed`, with the platform's error.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_failed: Vec<String>,
    /// Why the load had not finished by the phase's deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unfinished: Option<String>,
    /// Timeouts, 5xx answers, a component that stopped answering, an unreadable log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// 4xx answers to uploads, ingest requests or publishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refusals: Vec<String>,
    /// The most frequent failure reasons in the log, with their counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<(String, u64)>,
    pub elapsed_s: f64,
}

/// Where a document id comes from: `<origin>:<index>[:<k>]` (coredms::doc_id), the origin
/// being a batch file's content hash prefix or a stream message's id.
pub fn split_id(id: &str) -> Option<(&str, u64)> {
    let mut parts = id.split(':');
    let origin = parts.next()?;
    let index = parts.next()?.parse().ok()?;
    match parts.next() {
        None => Some((origin, index)),
        Some(k) if k.parse::<u32>().is_ok() && parts.next().is_none() => Some((origin, index)),
        Some(_) => None,
    }
}

/// What a tenant's database holds for the inputs it was offered.
#[derive(Debug, Default, PartialEq)]
pub struct Found {
    pub batch_stored: u64,
    pub batch_documents: u64,
    pub stream_stored: u64,
    pub stream_documents: u64,
    /// Documents whose id matches no offered input.
    pub stray: u64,
}

/// Matches document ids to the offered inputs: files (origin, inputs) and message ids,
/// borrowed from the runner's own lists (a large run offers millions).
#[derive(Debug)]
pub struct Matcher<'a> {
    files: HashMap<&'a str, Vec<bool>>,
    messages: HashMap<&'a str, bool>,
    found: Found,
}

impl<'a> Matcher<'a> {
    pub fn new(
        files: impl IntoIterator<Item = &'a FileOutcome>,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        Self {
            files: files
                .into_iter()
                .map(|f| (f.origin.as_str(), vec![false; f.inputs as usize]))
                .collect(),
            messages: ids.into_iter().map(|i| (i, false)).collect(),
            found: Found::default(),
        }
    }

    pub fn see(&mut self, id: &str) {
        let Some((origin, index)) = split_id(id) else {
            self.found.stray += 1;
            return;
        };
        if let Some(seen) = self.files.get_mut(origin) {
            match seen.get_mut(index as usize) {
                Some(s) => {
                    self.found.batch_documents += 1;
                    if !*s {
                        *s = true;
                        self.found.batch_stored += 1;
                    }
                }
                None => self.found.stray += 1,
            }
        } else if let Some(s) = self.messages.get_mut(origin).filter(|_| index == 0) {
            self.found.stream_documents += 1;
            if !*s {
                *s = true;
                self.found.stream_stored += 1;
            }
        } else {
            self.found.stray += 1;
        }
    }

    /// A document whose id is not a string: no input's.
    pub fn see_other(&mut self) {
        self.found.stray += 1;
    }

    pub fn found(self) -> Found {
        self.found
    }
}

/// One path's entries in a tenant's log.
#[derive(Debug)]
pub struct Tally {
    pub success: u64,
    pub duplicate: u64,
    pub failure: u64,
    pub skipped: u64,
    pub reasons: BTreeMap<String, u64>,
    /// Batch: every entry's latency. Stream: successes, corrected for coordinated omission
    /// at the offered rate when one is given.
    pub latency: Histogram<u64>,
    /// Stream: successes as measured.
    pub uncorrected: Histogram<u64>,
    /// Batch: every entry; stream: successes; by the second they were logged in.
    pub series: Series,
    /// When the latest entry was logged, Unix ms: where the path's work ended, whenever
    /// the runner learnt it.
    pub last_ms: Option<i64>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            success: 0,
            duplicate: 0,
            failure: 0,
            skipped: 0,
            reasons: BTreeMap::new(),
            latency: hist(),
            uncorrected: hist(),
            series: Series::default(),
            last_ms: None,
        }
    }
}

impl Tally {
    /// The most frequent reasons first.
    pub fn top_reasons(&self, n: usize) -> Vec<(String, u64)> {
        let mut r: Vec<(String, u64)> = self.reasons.iter().map(|(k, v)| (k.clone(), *v)).collect();
        r.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        r.truncate(n);
        r
    }
}

#[derive(Debug, Default)]
pub struct LogTally {
    pub batch: Tally,
    pub stream: Tally,
}

/// The part of a downloaded `mysimbdp::logs::LogEntry` the tally reads, borrowed from the
/// body: a large run's log is millions of entries, and owning each entry's strings would
/// double the memory the download already takes. Source and status are the platform's own
/// enums, so a new status is a compile error here, not a silent skip.
#[derive(Deserialize)]
struct Line<'a> {
    source: Source,
    status: Status,
    #[serde(default)]
    latency_us: u64,
    #[serde(with = "mysimbdp::logs::timestamp")]
    timestamp: mongodb::bson::DateTime,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
}

/// Distinct reasons kept per path; the rest are counted under one key.
const REASONS: usize = 50;
const REASON_CHARS: usize = 160;

/// Folds a log download as it arrives, chunk by chunk: each entry is read and counted as
/// soon as its last byte is in, so the runner holds figures and one entry, never the log
/// (a large run's log is hundreds of megabytes per tenant).
pub struct LogFold {
    tally: LogTally,
    stream_interval_us: Option<u64>,
    cut: ArrayCut,
}

impl LogFold {
    /// `stream_interval_us`: the interval between messages at the offered rate, for the
    /// coordinated-omission correction.
    pub fn new(stream_interval_us: Option<u64>) -> Self {
        Self {
            tally: LogTally::default(),
            stream_interval_us,
            cut: ArrayCut::default(),
        }
    }

    /// The next bytes of the download, cut anywhere.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<()> {
        let Self {
            tally,
            stream_interval_us,
            cut,
        } = self;
        cut.feed(chunk, |entry| {
            add_entry(tally, serde_json::from_slice(entry)?, *stream_interval_us);
            Ok(())
        })
    }

    /// The figures, once the download ended; fails if its array never closed.
    pub fn finish(self) -> Result<LogTally> {
        self.cut.finish()?;
        Ok(self.tally)
    }
}

fn add_entry(t: &mut LogTally, l: Line, stream_interval_us: Option<u64>) {
    let (p, stream) = match l.source {
        Source::Batch => (&mut t.batch, false),
        Source::Stream => (&mut t.stream, true),
    };
    let v = l.latency_us.max(1);
    let at = l.timestamp.timestamp_millis();
    p.last_ms = Some(p.last_ms.map_or(at, |m| m.max(at)));
    match l.status {
        Status::Success => p.success += 1,
        Status::Duplicate => p.duplicate += 1,
        Status::Skipped => p.skipped += 1,
        Status::Failure => {
            p.failure += 1;
            let mut r: String = l
                .reason
                .as_deref()
                .unwrap_or("(no reason)")
                .chars()
                .take(REASON_CHARS)
                .collect();
            if p.reasons.len() >= REASONS && !p.reasons.contains_key(&r) {
                r = "(other reasons)".into();
            }
            *p.reasons.entry(r).or_default() += 1;
        }
    }
    if !stream {
        p.latency.saturating_record(v);
        p.series.record(at, v);
    } else if l.status == Status::Success {
        p.series.record(at, v);
        p.uncorrected.saturating_record(v);
        match stream_interval_us {
            Some(i) => {
                let _ = p.latency.record_correct(v, i);
            }
            None => p.latency.saturating_record(v),
        }
    }
}

/// Where the cut of a JSON array is.
#[derive(Debug, Default, PartialEq)]
enum Cut {
    /// Before the `[`.
    #[default]
    Open,
    /// After the `[`: an item or the `]` of an empty array.
    First,
    /// After a `,`: an item.
    Next,
    /// Inside an item.
    Item,
    /// After the `]`.
    Closed,
}

/// Cuts a JSON array arriving in pieces into its items, each handed over whole (its bytes
/// kept only until it is complete). Only the array's structure is checked here: strings
/// (with their escapes) and nesting, so that a `,` or `]` inside an item does not end it;
/// the items themselves are checked by whoever reads them.
#[derive(Debug, Default)]
struct ArrayCut {
    at: Cut,
    /// Open `{` and `[` inside the current item.
    depth: usize,
    in_string: bool,
    escaped: bool,
    item: Vec<u8>,
}

impl ArrayCut {
    fn feed(&mut self, bytes: &[u8], mut each: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        for &b in bytes {
            match self.at {
                Cut::Open if b == b'[' => self.at = Cut::First,
                Cut::First if b == b']' => self.at = Cut::Closed,
                Cut::Open | Cut::First | Cut::Next | Cut::Closed if b.is_ascii_whitespace() => {}
                Cut::Open => anyhow::bail!("the log is not a JSON array"),
                Cut::Closed => anyhow::bail!("bytes after the end of the log's array"),
                Cut::First | Cut::Next => {
                    self.at = Cut::Item;
                    self.take(b);
                }
                Cut::Item if self.depth == 0 && !self.in_string && (b == b',' || b == b']') => {
                    each(&self.item)?;
                    self.item.clear();
                    self.at = if b == b',' { Cut::Next } else { Cut::Closed };
                }
                Cut::Item => self.take(b),
            }
        }
        Ok(())
    }

    /// One byte of the current item.
    fn take(&mut self, b: u8) {
        self.item.push(b);
        if self.in_string {
            match b {
                _ if self.escaped => self.escaped = false,
                b'\\' => self.escaped = true,
                b'"' => self.in_string = false,
                _ => {}
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }

    fn finish(&self) -> Result<()> {
        match self.at {
            Cut::Closed => Ok(()),
            _ => anyhow::bail!("the log download ended before its array closed"),
        }
    }
}

/// How well a log covers the inputs of a run: inputs without any entry, entries twice.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// Batch records (by index in their file's run) with no entry at all.
    pub batch_unlogged: u64,
    /// Stored stream messages (by id) with no entry at all.
    pub stream_unlogged: u64,
    /// Entries about the same thing written more than once: two `success` entries for one
    /// document, or two entries of one status for one input of one ingestion.
    pub logged_twice: u64,
}

/// Folds a log download against what was offered and stored: the records of each file's
/// run (its job id, which a resumed or taken-over job keeps, and its records), and the ids
/// of the stream messages found stored. Entries of other runs count only for `logged_twice`.
pub fn coverage(
    body: &[u8],
    batch_runs: &HashMap<String, u64>,
    stored_messages: &HashSet<String>,
) -> Result<Coverage> {
    let entries: Vec<Value> = serde_json::from_slice(body)?;
    let mut records: HashMap<&str, Vec<bool>> = batch_runs
        .iter()
        .map(|(job, n)| (job.as_str(), vec![false; *n as usize]))
        .collect();
    let mut messages: HashSet<&str> = HashSet::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut c = Coverage::default();
    for e in &entries {
        let status = e["status"].as_str().unwrap_or("");
        let doc = e["document_id"].as_str();
        let input = match (e["record"].as_u64(), e["message_id"].as_str()) {
            (Some(r), _) => {
                let run = e["ingestion"].as_str().and_then(|j| records.get_mut(j));
                if let Some(slot) = run.and_then(|rs| rs.get_mut(r as usize)) {
                    *slot = true;
                }
                format!("r{r}")
            }
            (None, Some(m)) => {
                messages.insert(m);
                format!("m{m}")
            }
            (None, None) => "file".to_owned(),
        };
        let key = match (status, doc) {
            ("success", Some(d)) => format!("s {} {d}", e["collection"]),
            _ => format!("{status} {} {input} {}", e["ingestion"], doc.unwrap_or("-")),
        };
        if !seen.insert(key) {
            c.logged_twice += 1;
        }
    }
    c.batch_unlogged = records.values().flatten().filter(|r| !**r).count() as u64;
    c.stream_unlogged = stored_messages
        .iter()
        .filter(|m| !messages.contains(m.as_str()))
        .count() as u64;
    Ok(c)
}

/// One line per tenant and path that `--strict` refuses, and one per platform error.
pub fn problems(report: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match report["accounting"].as_array() {
        Some(accounts) => {
            for a in accounts {
                if let Some(p) = account_problem(a) {
                    out.push(p);
                }
            }
        }
        None => {
            // A schema 1 report: only logged failures were counted.
            for path in ["batch", "stream"] {
                if let Some(f) = report[path]["failures"].as_u64().filter(|f| *f > 0) {
                    out.push(format!("{path}: {f} failed ingestions"));
                }
            }
        }
    }
    for e in report["platform_errors"].as_array().into_iter().flatten() {
        out.push(format!("platform: {}", condense(e.as_str().unwrap_or("?"))));
    }
    for f in report["faults"].as_array().into_iter().flatten() {
        for key in [
            "stream_lost",
            "stream_duplicated",
            "batch_duplicated",
            "batch_lost",
            "batch_unlogged",
            "stream_unlogged",
            "logged_twice",
        ] {
            if let Some(n) = f[key].as_u64().filter(|n| *n > 0) {
                out.push(format!(
                    "{}: {key} = {n}",
                    f["fault"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    out
}

/// Fails when a report shows an offered input neither stored nor logged as failed, a
/// failure of a group that expects success, a load that did not finish, a platform error,
/// or (faults) data lost or stored twice: one line per tenant and path.
pub fn check(report: &std::path::Path) -> anyhow::Result<()> {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let problems = problems(&r);
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "strict: {} problem(s):\n  {}",
            problems.len(),
            problems.join("\n  ")
        )
    }
}

/// Fails when the run itself did not complete: a load unfinished at its deadline or a
/// platform error (a component that died, a platform that did not stop). Checked with or
/// without `--strict`.
pub fn completed(report: &std::path::Path) -> anyhow::Result<()> {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report)?)?;
    let mut out: Vec<String> = r["accounting"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some(format!(
                "{} {} {}: {}",
                a["phase"].as_str().unwrap_or("?"),
                a["tenant"].as_str().unwrap_or("?"),
                a["path"].as_str().unwrap_or("?"),
                a["unfinished"].as_str()?
            ))
        })
        .collect();
    for e in r["platform_errors"].as_array().into_iter().flatten() {
        out.push(format!("platform: {}", condense(e.as_str().unwrap_or("?"))));
    }
    if out.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("the run did not complete:\n  {}", out.join("\n  "))
    }
}

/// Terminal colour codes out of a component's log.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A platform error on one line: its own lines, without the log lines quoted under it
/// (those start with a timestamp) that the report keeps in full.
pub fn condense(e: &str) -> String {
    let log_line = |l: &str| {
        let b = l.trim_start().as_bytes();
        b.len() > 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
    };
    e.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !log_line(l) && !l.starts_with("note: ") && *l != "stack backtrace:"
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

pub(crate) fn account_problem(a: &Value) -> Option<String> {
    let n = |k: &str| a[k].as_u64().unwrap_or(0);
    let (offered, stored, failed, refused) = (n("offered"), n("stored"), n("failed"), n("refused"));
    let lost = a["lost"].as_i64().unwrap_or(0);
    let strs = |k: &str| -> Vec<&str> {
        a[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    };
    let mut issues = Vec::new();
    if lost > 0 {
        issues.push(format!(
            "{lost} of {offered} offered inputs neither stored nor logged as failed"
        ));
    }
    if lost < 0 {
        issues.push(format!(
            "stored {stored} + failed {failed} exceed offered {offered} by {}: counted twice",
            -lost
        ));
    }
    let unlogged = n("documents").saturating_sub(n("logged_stored"));
    if unlogged > 0 {
        issues.push(format!("{unlogged} stored documents have no log entry"));
    }
    if let Some(u) = a["unfinished"].as_str() {
        issues.push(format!("did not finish: {u}"));
    }
    for e in strs("errors") {
        issues.push(e.to_owned());
    }
    if a["expect"] != "failures" {
        if failed > 0 {
            let first = a["reasons"][0][0].as_str().unwrap_or("?");
            issues.push(format!("{failed} failed (e.g. {first})"));
        }
        if refused > 0 {
            let first = strs("refusals").first().copied().unwrap_or("?");
            issues.push(format!("{refused} inputs refused ({first})"));
        }
        for f in strs("files_failed") {
            issues.push(format!("file {f}"));
        }
    }
    if issues.is_empty() {
        return None;
    }
    let phase = a["phase"].as_str().unwrap_or("");
    let who = format!(
        "{}{} ({}) {}",
        if phase.is_empty() || phase == "main" {
            String::new()
        } else {
            format!("{phase} ")
        },
        a["tenant"].as_str().unwrap_or("?"),
        a["group"].as_str().unwrap_or("?"),
        a["path"].as_str().unwrap_or("?"),
    );
    Some(format!("{who}: {}", issues.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(expect: Expect, c: Counts) -> TenantAccount {
        TenantAccount {
            phase: "main".into(),
            group: "g".into(),
            tenant: "g-0".into(),
            path: "batch".into(),
            expect,
            counts: c.settle(),
            files_failed: vec![],
            unfinished: None,
            errors: vec![],
            refusals: vec![],
            reasons: vec![],
            elapsed_s: 1.0,
        }
    }

    fn counts(offered: u64, stored: u64, failed: u64) -> Counts {
        Counts {
            offered,
            stored,
            failed,
            documents: stored,
            logged_stored: stored,
            ..Counts::default()
        }
    }

    fn report(accounts: &[TenantAccount]) -> Value {
        serde_json::json!({ "schema_version": 2, "accounting": accounts })
    }

    #[test]
    fn document_ids_name_their_input() {
        assert_eq!(
            split_id("0123456789abcdef:41"),
            Some(("0123456789abcdef", 41))
        );
        assert_eq!(
            split_id("0123456789abcdef:41:3"),
            Some(("0123456789abcdef", 41))
        );
        assert_eq!(split_id("abc"), None);
        assert_eq!(split_id("abc:x"), None);
        assert_eq!(split_id("abc:1:2:3"), None);
    }

    #[test]
    fn the_matcher_counts_inputs_once_and_documents_each_time() {
        let files = vec![FileOutcome {
            name: "f0.csv".into(),
            origin: "aaaa".into(),
            inputs: 3,
            state: "done".into(),
            error: None,
        }];
        let ids: HashSet<String> = ["m1".to_owned(), "m2".to_owned()].into();
        let mut m = Matcher::new(&files, ids.iter().map(String::as_str));
        for id in [
            "aaaa:0", "aaaa:0:1", "aaaa:2", "aaaa:3", "m1:0", "m1:0:1", "m3:0", "junk",
        ] {
            m.see(id);
        }
        assert_eq!(
            m.found(),
            Found {
                batch_stored: 2,
                batch_documents: 3,
                stream_stored: 1,
                stream_documents: 2,
                // aaaa:3 (past the file's rows), m3 (never offered), junk.
                stray: 3,
            }
        );
    }

    #[test]
    fn lost_is_what_is_neither_stored_nor_failed_and_negative_when_counted_twice() {
        assert_eq!(counts(10, 7, 2).settle().lost, 1);
        assert_eq!(counts(10, 9, 2).settle().lost, -1);
        assert_eq!(counts(10, 10, 0).settle().lost, 0);
    }

    #[test]
    fn a_file_that_failed_whole_is_lost_and_strict_says_so() {
        // 1,000 records offered; the platform logged one failure for the file and stored
        // nothing, and the file ended `failed`.
        let mut a = account(Expect::Success, counts(1000, 0, 1));
        a.files_failed = vec!["f0.csv ended `failed`: cannot read staged file".into()];
        a.reasons = vec![("cannot read staged file".into(), 1)];
        assert_eq!(a.counts.lost, 999);
        let p = problems(&report(&[a]));
        assert_eq!(p.len(), 1, "one line per tenant and path: {p:?}");
        assert!(
            p[0].starts_with(
                "g-0 (g) batch: 999 of 1000 offered inputs neither stored nor logged as failed"
            ),
            "{}",
            p[0]
        );
        assert!(
            p[0].contains("1 failed (e.g. cannot read staged file)"),
            "{}",
            p[0]
        );
        assert!(p[0].contains("file f0.csv ended `failed`"), "{}", p[0]);
    }

    #[test]
    fn attackers_may_fail_but_not_lose_inputs() {
        let mut fine = account(Expect::Failures, counts(10, 0, 10));
        fine.tenant = "m-pcall-0".into();
        fine.files_failed = vec!["f0.csv ended `failed`: x".into()];
        let mut lossy = account(Expect::Failures, counts(10, 2, 3));
        lossy.tenant = "m-bomb-0".into();
        lossy.phase = "mixed".into();
        let p = problems(&report(&[fine, lossy]));
        assert_eq!(
            p,
            [
                "mixed m-bomb-0 (g) batch: 5 of 10 offered inputs neither stored nor logged as failed"
            ]
        );
    }

    #[test]
    fn twice_counted_unfinished_unlogged_and_refused_are_problems() {
        let twice = account(Expect::Success, counts(5, 5, 1));
        let mut late = account(Expect::Failures, counts(5, 5, 0));
        late.unfinished = Some("f0.csv still `ingesting`".into());
        late.errors = vec!["stream/stop: no answer within 15 s".into()];
        let mut unlogged = account(Expect::Success, counts(5, 5, 0));
        unlogged.counts.logged_stored = 3;
        let mut refused = account(Expect::Success, counts(5, 5, 0));
        refused.counts.refused = 2;
        refused.refusals = vec!["publish: 400 Bad Request: invalid JSON".into()];
        let p = problems(&report(&[twice, late, unlogged, refused]));
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].contains("stored 5 + failed 1 exceed offered 5 by 1: counted twice"));
        assert!(p[1].contains("did not finish: f0.csv still `ingesting`; stream/stop: no answer"));
        assert!(p[2].contains("2 stored documents have no log entry"));
        assert!(p[3].contains("2 inputs refused (publish: 400 Bad Request"));
    }

    #[test]
    fn a_clean_run_has_no_problem_and_old_reports_are_still_checked() {
        assert!(problems(&report(&[account(Expect::Success, counts(9, 9, 0))])).is_empty());
        let old = serde_json::json!({"schema_version": 1, "batch": {"failures": 3}, "stream": {"failures": 0}});
        assert_eq!(problems(&old), ["batch: 3 failed ingestions"]);
        let dead = serde_json::json!({"accounting": [], "platform_errors": [
            "platform components: batch had exited (signal: 6) before the end; its log (x):\n2026-11-28T16:19:48Z INFO ingestion done\nmemory allocation of 1048576 bytes failed\nstack backtrace:\nnote: Some details are omitted"
        ]});
        assert_eq!(
            problems(&dead),
            [
                "platform: platform components: batch had exited (signal: 6) before the end; its log (x): / memory allocation of 1048576 bytes failed"
            ]
        );
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m INFO \u{1b}[3mtenant\u{1b}[0m=a"),
            "2026 INFO tenant=a"
        );
    }

    #[test]
    fn coverage_finds_inputs_without_entries_and_entries_written_twice() {
        let log = serde_json::json!([
            {"status": "success", "collection": "data", "document_id": "h:0", "record": 0, "ingestion": "j"},
            {"status": "skipped", "collection": "data", "record": 1, "ingestion": "j"},
            {"status": "failure", "collection": "data", "record": 1, "ingestion": "j"},
            {"status": "success", "collection": "messages", "document_id": "m1:0", "message_id": "m1", "ingestion": "m1"},
            // The same document's success written again by a retry: twice.
            {"status": "success", "collection": "data", "document_id": "h:0", "record": 0, "ingestion": "j"},
            // The tenant sent record 0 again in another run: not twice.
            {"status": "duplicate", "collection": "data", "document_id": "h:0", "record": 0, "ingestion": "k"},
        ]);
        let stored: HashSet<String> = ["m1", "m2"].map(str::to_owned).into();
        // Run `j` of 3 records, and run `i` of another file, of 1 record, that logged none:
        // `k`'s entry about its record 0 is not `i`'s.
        let runs: HashMap<String, u64> = [("j".to_owned(), 3), ("i".to_owned(), 1)].into();
        let c = coverage(log.to_string().as_bytes(), &runs, &stored).expect("folds");
        assert_eq!(
            c,
            Coverage {
                batch_unlogged: 2,
                stream_unlogged: 1,
                logged_twice: 1
            }
        );
    }

    /// A log download held whole, folded.
    fn tally(body: &[u8], stream_interval_us: Option<u64>) -> Result<LogTally> {
        let mut fold = LogFold::new(stream_interval_us);
        fold.feed(body)?;
        fold.finish()
    }

    /// success, duplicate, failure, skipped, latencies and the top reasons of one path.
    type Figures = (u64, u64, u64, u64, u64, Vec<(String, u64)>);

    /// What a fold found, comparable.
    fn figures(t: &LogTally) -> Vec<Figures> {
        [&t.batch, &t.stream]
            .map(|p| {
                (
                    p.success,
                    p.duplicate,
                    p.failure,
                    p.skipped,
                    p.latency.len(),
                    p.top_reasons(REASONS),
                )
            })
            .to_vec()
    }

    #[test]
    fn a_log_folded_as_it_arrives_counts_the_same_however_it_is_cut() {
        // Reasons holding the array's own punctuation, escaped quotes and backslashes, and
        // an entry with nested values the fold does not read.
        let at = "2026-12-01T10:00:00.500Z";
        let body = serde_json::to_string_pretty(&serde_json::json!([
            {"source": "batch", "status": "failure", "latency_us": 7, "timestamp": at, "reason": "a, b] c} \"q\" \\"},
            {"source": "batch", "status": "success", "latency_us": 10, "timestamp": at, "extra": {"x": [1, {"y": "]"}]}},
            {"source": "stream", "status": "success", "latency_us": 1000, "timestamp": at, "reason": null},
            {"source": "batch", "status": "failure", "latency_us": 3, "timestamp": at, "reason": "\\"},
            {"source": "stream", "status": "skipped", "latency_us": 5, "timestamp": at},
        ]))
        .expect("json");
        let whole = tally(body.as_bytes(), Some(100)).expect("whole");
        assert_eq!(whole.batch.failure, 2);
        assert_eq!(
            whole.batch.top_reasons(2),
            [("\\".to_owned(), 1), ("a, b] c} \"q\" \\".to_owned(), 1)],
            "both reasons whole, ties in name order"
        );
        let bytes = body.as_bytes();
        for cut in 0..=bytes.len() {
            let mut fold = LogFold::new(Some(100));
            fold.feed(&bytes[..cut]).expect("first part");
            fold.feed(&bytes[cut..]).expect("second part");
            let t = fold.finish().expect("closed");
            assert_eq!(figures(&t), figures(&whole), "cut at {cut}");
        }
        let mut fold = LogFold::new(Some(100));
        for b in bytes.chunks(1) {
            fold.feed(b).expect("byte");
        }
        assert_eq!(figures(&fold.finish().expect("closed")), figures(&whole));
    }

    #[test]
    fn a_log_download_that_is_cut_short_or_not_an_array_is_an_error() {
        assert_eq!(
            figures(&tally(b" [ ] ", None).expect("empty")),
            figures(&LogTally::default())
        );
        let entry = r#"{"source": "batch", "status": "success", "latency_us": 1, "timestamp": "2026-12-01T10:00:00Z"}"#;
        let short = format!("[{entry},{entry}");
        let mut fold = LogFold::new(None);
        fold.feed(short.as_bytes()).expect("the entries so far");
        assert!(fold.finish().is_err(), "the array never closed");
        for bad in [
            r#"{"error": "x"}"#.to_owned(),
            format!("[{entry}] x"),
            format!("[{entry},]"),
            r#"[{"source": "batch"}]"#.to_owned(),
        ] {
            assert!(tally(bad.as_bytes(), None).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_log_is_folded_per_path_with_reasons() {
        let at = "2026-12-01T10:00:00.500Z";
        let body = serde_json::json!([
            {"source": "batch", "status": "success", "latency_us": 10, "timestamp": at},
            {"source": "batch", "status": "failure", "latency_us": 10, "reason": "app error: x", "timestamp": at},
            {"source": "batch", "status": "failure", "latency_us": 10, "reason": "app error: x", "timestamp": at},
            {"source": "stream", "status": "duplicate", "latency_us": 10, "timestamp": at},
            {"source": "stream", "status": "success", "latency_us": 1000, "timestamp": at},
        ])
        .to_string();
        let t = tally(body.as_bytes(), Some(100)).expect("tally");
        assert_eq!((t.batch.success, t.batch.failure), (1, 2));
        assert_eq!(t.batch.top_reasons(3), [("app error: x".to_owned(), 2)]);
        assert_eq!((t.stream.success, t.stream.duplicate), (1, 1));
        assert_eq!(t.stream.uncorrected.len(), 1);
        assert!(t.stream.latency.len() > 1, "corrected for the missed sends");
        let stream = t.stream.series.points();
        assert_eq!(stream.len(), 1, "{stream:?}");
        assert_eq!(stream[0].completed, 1, "successes only");
    }

    #[test]
    fn the_series_counts_each_second_and_shows_the_empty_ones() {
        let mut s = Series::default();
        // Seconds 0 and 3 of the run; 1 and 2 were a stall.
        for k in 0..100u64 {
            s.record(1_000_000 + k as i64, 1000 + k);
        }
        s.record(1_003_999, 50_000);
        let mut other = Series::default();
        other.record(1_003_000, 70_000);
        s.add(&other);
        let p = s.points();
        let completed: Vec<u64> = p.iter().map(|p| p.completed).collect();
        assert_eq!(completed, [100, 0, 0, 2]);
        assert_eq!(p[1].p50_ms, None, "no latency without completions");
        assert_eq!(p[0].p50_ms, Some(1.049), "the 50th of 1.000..1.099 ms");
        assert_eq!(p[0].p99_ms, Some(1.098));
        assert_eq!(p[3].p50_ms, Some(50.0));
        assert_eq!(p[3].p99_ms, Some(70.0));
        assert_eq!(p[3].second, 3);
    }
}
