//! The ingestion log: one entry per ingestion attempt, the tenant's download format, and the
//! operator's analytics. Storage and queries live in coredms; this module is the pure part.

use std::collections::BTreeMap;

use mongodb::bson::{self, DateTime};
use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Batch,
    Stream,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    Failure,
    /// The document was already stored by an earlier ingestion (the tenant sent the same
    /// data again): nothing new.
    Duplicate,
    /// The input stored nothing because the app returned nothing for it.
    Skipped,
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "success" => Ok(Self::Success),
            "failure" => Ok(Self::Failure),
            "duplicate" => Ok(Self::Duplicate),
            "skipped" => Ok(Self::Skipped),
            _ => Err(format!(
                "unknown status `{s}`: use success, failure, duplicate or skipped"
            )),
        }
    }
}

/// One ingestion, as stored in the `logs` database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LogEntry {
    /// A BSON date where stored, RFC 3339 in JSON (the download): see [`timestamp`].
    #[serde(with = "timestamp")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp: DateTime,
    pub tenant: String,
    pub source: Source,
    pub data_name: String,
    pub collection: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub bytes: u64,
    pub latency_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<u32>,
    /// The ingestion the entry belongs to: a batch run's job id, or the stream message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingestion: Option<String>,
    /// Batch: the record's index in its file (0-based) and, where the format has lines, its
    /// line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// Stream: the message's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The stored (or duplicate, or refused) document's `_id` in `collection`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_id: Option<String>,
}

impl LogEntry {
    pub fn to_document(&self) -> bson::Document {
        let mut d = bson::Document::new();
        d.insert("timestamp", self.timestamp);
        d.insert("tenant", self.tenant.as_str());
        d.insert("source", source_str(self.source));
        d.insert("data_name", self.data_name.as_str());
        d.insert("collection", self.collection.as_str());
        d.insert("status", status_str(self.status));
        if let Some(r) = &self.reason {
            d.insert("reason", r.as_str());
        }
        d.insert("bytes", self.bytes as i64);
        d.insert("latency_us", self.latency_us as i64);
        if let Some(v) = self.app_version {
            d.insert("app_version", i64::from(v));
        }
        if let Some(v) = &self.ingestion {
            d.insert("ingestion", v.as_str());
        }
        if let Some(v) = self.record {
            d.insert("record", v as i64);
        }
        if let Some(v) = self.line {
            d.insert("line", v as i64);
        }
        if let Some(v) = &self.message_id {
            d.insert("message_id", v.as_str());
        }
        if let Some(v) = &self.document_id {
            d.insert("document_id", v.as_str());
        }
        d
    }

    /// The entry as tenants download it: RFC 3339 timestamps, no internal ids. The same
    /// serde form the client reads back as a `LogEntry`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// A log entry's time: written as a BSON date for the database (whose raw serializer is
/// not human-readable) and as an RFC 3339 string in JSON (the download the tenant reads);
/// read back from either. `bson::to_document` is human-readable by default: entries are
/// stored through [`LogEntry::to_document`], not through it.
pub mod timestamp {
    use std::fmt;

    use mongodb::bson::DateTime;
    use serde::de::{self, Error, MapAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // Out of RFC 3339's range (past year 9999): the milliseconds, as text.
            let text = t
                .try_to_rfc3339_string()
                .unwrap_or_else(|_| t.timestamp_millis().to_string());
            s.serialize_str(&text)
        } else {
            t.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime, D::Error> {
        d.deserialize_any(Time)
    }

    struct Time;

    impl<'de> Visitor<'de> for Time {
        type Value = DateTime;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a BSON date or an RFC 3339 time")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<DateTime, E> {
            DateTime::parse_rfc3339_str(text)
                .or_else(|_| text.parse::<i64>().map(DateTime::from_millis))
                .map_err(|_| E::custom(format!("`{text}` is not an RFC 3339 time")))
        }

        /// A BSON date, as the BSON deserializers present it (`{"$date": ...}`).
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DateTime, A::Error> {
            DateTime::deserialize(de::value::MapAccessDeserializer::new(map))
        }
    }
}

pub fn source_str(s: Source) -> &'static str {
    match s {
        Source::Batch => "batch",
        Source::Stream => "stream",
    }
}

pub fn status_str(s: Status) -> &'static str {
    match s {
        Status::Success => "success",
        Status::Failure => "failure",
        Status::Duplicate => "duplicate",
        Status::Skipped => "skipped",
    }
}

/// Filters for a tenant's log download and for analytics; times in RFC 3339.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Entries at or after this time (RFC 3339).
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// Entries before this time (RFC 3339).
    #[param(format = DateTime)]
    pub until: Option<String>,
    /// Only entries of this status.
    #[param(value_type = Option<Status>)]
    pub status: Option<String>,
}

/// The longest time bucket or report period, in seconds (a year): longer ones say nothing
/// a year does not, and their milliseconds would overflow.
pub const MAX_PERIOD_S: u64 = 366 * 24 * 3600;

/// The operator's analytics: the log filters and the bucket width.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SummaryQuery {
    /// Entries at or after this time (RFC 3339).
    #[param(format = DateTime)]
    pub since: Option<String>,
    /// Entries before this time (RFC 3339).
    #[param(format = DateTime)]
    pub until: Option<String>,
    /// Only entries of this status.
    #[param(value_type = Option<Status>)]
    pub status: Option<String>,
    /// Bucket width in seconds, 1 to a year (default 60).
    #[param(minimum = 1, maximum = 31622400)]
    pub bucket_s: Option<u64>,
}

impl SummaryQuery {
    /// The filter, and the bucket width checked.
    pub fn parse(&self) -> Result<(LogFilter, u64), String> {
        let filter = LogQuery {
            since: self.since.clone(),
            until: self.until.clone(),
            status: self.status.clone(),
        }
        .parse()?;
        Ok((filter, period_s(self.bucket_s, 60, "bucket_s")?))
    }
}

/// A bucket or period width from a query: `default` when absent, else 1 to [`MAX_PERIOD_S`].
pub fn period_s(value: Option<u64>, default: u64, name: &str) -> Result<u64, String> {
    match value.unwrap_or(default) {
        s @ 1..=MAX_PERIOD_S => Ok(s),
        s => Err(format!(
            "`{name}` must be 1 to {MAX_PERIOD_S} seconds, not {s}"
        )),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogFilter {
    pub since: Option<DateTime>,
    pub until: Option<DateTime>,
    pub status: Option<Status>,
    pub source: Option<Source>,
}

impl LogQuery {
    pub fn parse(&self) -> Result<LogFilter, String> {
        let time = |s: &Option<String>, name: &str| -> Result<Option<DateTime>, String> {
            s.as_deref()
                .map(|t| {
                    DateTime::parse_rfc3339_str(t).map_err(|_| {
                        format!("`{name}` must be an RFC 3339 time such as 2026-01-31T12:00:00Z")
                    })
                })
                .transpose()
        };
        Ok(LogFilter {
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            status: self.status.as_deref().map(str::parse).transpose()?,
            source: None,
        })
    }
}

/// One group of the operator's analytics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SummaryRow {
    pub tenant: String,
    pub status: Status,
    pub reason: Option<String>,
    /// Start of the time bucket, RFC 3339.
    pub bucket: String,
    pub count: u64,
    pub bytes: u64,
}

/// Folds log entries into counts and bytes by (tenant, status, reason, time bucket).
/// (tenant, status, reason, bucket start in ms)
type GroupKey = (String, Status, Option<String>, i64);

#[derive(Debug, Default)]
pub struct Summary {
    bucket_ms: i64,
    groups: BTreeMap<GroupKey, (u64, u64)>,
}

/// Reasons are grouped by their first 80 characters: enough to tell causes apart
/// while keeping the number of groups bounded.
const REASON_KEY_CHARS: usize = 80;

impl Summary {
    pub fn new(bucket_s: u64) -> Self {
        Self {
            bucket_ms: i64::try_from(bucket_s.max(1).saturating_mul(1000)).unwrap_or(60_000),
            groups: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, e: &LogEntry) {
        let ms = e.timestamp.timestamp_millis();
        let bucket = ms - ms.rem_euclid(self.bucket_ms);
        let reason = e
            .reason
            .as_ref()
            .map(|r| r.chars().take(REASON_KEY_CHARS).collect());
        let g = self
            .groups
            .entry((e.tenant.clone(), e.status, reason, bucket))
            .or_default();
        g.0 += 1;
        g.1 += e.bytes;
    }

    pub fn rows(self) -> Vec<SummaryRow> {
        self.groups
            .into_iter()
            .map(
                |((tenant, status, reason, bucket), (count, bytes))| SummaryRow {
                    tenant,
                    status,
                    reason,
                    bucket: DateTime::from_millis(bucket)
                        .try_to_rfc3339_string()
                        .unwrap_or_default(),
                    count,
                    bytes,
                },
            )
            .collect()
    }
}

/// One period of a tenant's stream report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StreamPeriod {
    pub period_start: String,
    pub messages: u64,
    pub failures: u64,
    pub duplicates: u64,
    #[serde(default)]
    pub skipped: u64,
    pub bytes: u64,
    pub avg_ingestion_ms: f64,
    pub p99_ingestion_ms: f64,
}

/// Folds stream log entries into per-period figures with an HDR histogram per period.
pub struct StreamReport {
    period_ms: i64,
    periods: BTreeMap<i64, Period>,
}

/// One period's counts while folding: messages (successes), failures, duplicates, skipped,
/// bytes, and the latency histogram.
struct Period {
    ok: u64,
    failed: u64,
    duplicates: u64,
    skipped: u64,
    bytes: u64,
    latency: hdrhistogram::Histogram<u64>,
}

impl StreamReport {
    pub fn new(period_s: u64) -> Self {
        Self {
            period_ms: i64::try_from(period_s.max(1).saturating_mul(1000)).unwrap_or(60_000),
            periods: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, e: &LogEntry) {
        let ms = e.timestamp.timestamp_millis();
        let start = ms - ms.rem_euclid(self.period_ms);
        let p = self.periods.entry(start).or_insert_with(|| Period {
            ok: 0,
            failed: 0,
            duplicates: 0,
            skipped: 0,
            bytes: 0,
            latency: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid"),
        });
        match e.status {
            Status::Success => {
                p.ok += 1;
                p.bytes += e.bytes;
                p.latency.saturating_record(e.latency_us.max(1));
            }
            Status::Failure => p.failed += 1,
            Status::Duplicate => p.duplicates += 1,
            Status::Skipped => p.skipped += 1,
        }
    }

    pub fn periods(self) -> Vec<StreamPeriod> {
        self.periods
            .into_iter()
            .map(|(start, p)| StreamPeriod {
                period_start: DateTime::from_millis(start)
                    .try_to_rfc3339_string()
                    .unwrap_or_default(),
                messages: p.ok,
                failures: p.failed,
                duplicates: p.duplicates,
                skipped: p.skipped,
                bytes: p.bytes,
                avg_ingestion_ms: if p.latency.is_empty() {
                    0.0
                } else {
                    p.latency.mean() / 1000.0
                },
                p99_ingestion_ms: p.latency.value_at_quantile(0.99) as f64 / 1000.0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ms: i64, status: Status, reason: Option<&str>) -> LogEntry {
        LogEntry {
            timestamp: DateTime::from_millis(ms),
            tenant: "alice".into(),
            source: Source::Stream,
            data_name: "d".into(),
            collection: "c".into(),
            status,
            reason: reason.map(str::to_owned),
            bytes: 10,
            latency_us: 2000,
            app_version: Some(1),
            ingestion: Some("m1".into()),
            record: None,
            line: None,
            message_id: Some("m1".into()),
            document_id: (status != Status::Failure).then(|| "m1".into()),
        }
    }

    #[test]
    fn an_entry_is_a_bson_date_where_stored_and_rfc3339_where_downloaded() {
        let e = entry(1_764_600_000_123, Status::Failure, Some("line 2: bad"));
        let json = e.to_json();
        assert_eq!(json["timestamp"], "2025-12-01T14:40:00.123Z");
        assert_eq!(json["reason"], "line 2: bad");
        let back: LogEntry = serde_json::from_value(json).expect("the download reads back");
        assert_eq!(back, e);
        // What the driver does with a stored entry: raw BSON in, not human-readable.
        let raw = bson::to_vec(&e.to_document()).expect("bson");
        let stored: LogEntry = bson::from_slice(&raw).expect("a stored entry reads back");
        assert_eq!(stored, e);
        let stored: LogEntry = bson::from_document(e.to_document()).expect("from a document");
        assert_eq!(stored, e);
        let raw = bson::to_vec(&e).expect("serialized as BSON");
        let doc: bson::Document = bson::from_slice(&raw).expect("a document");
        assert!(doc.get_datetime("timestamp").is_ok(), "{doc}");
    }

    #[test]
    fn summary_groups_by_tenant_status_reason_and_bucket() {
        let mut s = Summary::new(60);
        s.add(&entry(1_000, Status::Success, None));
        s.add(&entry(2_000, Status::Success, None));
        s.add(&entry(61_000, Status::Failure, Some("bad json")));
        let rows = s.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].count, rows[0].bytes), (2, 20));
        assert_eq!(rows[1].reason.as_deref(), Some("bad json"));
        assert_eq!(rows[1].bucket, "1970-01-01T00:01:00Z");
    }

    #[test]
    fn stream_report_averages_successes_per_period() {
        let mut r = StreamReport::new(10);
        r.add(&entry(1_000, Status::Success, None));
        r.add(&entry(1_500, Status::Failure, Some("x")));
        let p = r.periods();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].messages, p[0].failures), (1, 1));
        assert!((p[0].avg_ingestion_ms - 2.0).abs() < 0.01);
    }

    #[test]
    fn log_query_rejects_bad_times_and_statuses() {
        let q = LogQuery {
            since: Some("yesterday".into()),
            ..Default::default()
        };
        assert!(q.parse().expect_err("bad time").contains("RFC 3339"));
        let q = LogQuery {
            status: Some("meh".into()),
            ..Default::default()
        };
        assert!(
            q.parse()
                .expect_err("bad status")
                .contains("unknown status")
        );
    }

    #[test]
    fn entries_round_trip_through_bson() {
        let e = entry(5, Status::Failure, Some("r"));
        let back: LogEntry = bson::from_document(e.to_document()).expect("decodes");
        assert_eq!(back, e);
    }
}
