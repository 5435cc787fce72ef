//! The load of one tenant on one path, driven through the public HTTP API. Every call is
//! bounded, and nothing a tenant's load meets (a refusal, a timeout, a component that stops
//! answering) stops the run: it is recorded in the tenant's [`PathRun`], and what has not
//! finished when the phase's deadline passes is reported as unfinished, with why.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mysimbdp::client::{Client, ClientError};

use crate::accounting::FileOutcome;

mod batch;
mod stream;

pub use batch::{UploadGate, drive_batch};
pub use stream::{drive_stream, schedule};

/// A tenant as the load drivers see it.
#[derive(Clone)]
pub struct TenantCtx {
    pub name: String,
    /// Its database, where the accounting looks for what was stored.
    pub database: String,
    pub client: Client,
    /// Its batch app has no `map`: a file is one input (the whole payload), not one per row.
    pub whole_file: bool,
}

/// What one tenant's load on one path did, as the runner saw it.
#[derive(Debug, Default)]
pub struct PathRun {
    /// Inputs the platform accepted: rows of the files whose ingestion it started; messages
    /// whose publish it confirmed.
    pub offered: u64,
    /// Inputs it would not take (the upload, the ingest request or the publish failed).
    pub refused: u64,
    /// The first few distinct 4xx answers.
    pub refusals: Vec<String>,
    /// The first few distinct errors: timeouts, 5xx, a component that stopped answering.
    pub errors: Vec<String>,
    /// Why the load had not finished when the deadline passed.
    pub unfinished: Option<String>,
    /// From the phase's start to the end of this tenant's load on this path.
    pub elapsed: Duration,
    /// Where its work can begin (Unix ms): stream, when its consumers were started; batch,
    /// its first ingest request.
    pub started_ms: Option<i64>,
    pub files: Vec<FileOutcome>,
    /// Ids of the confirmed messages.
    pub ids: HashSet<String>,
    /// Per file: ingest request → done.
    pub file_hist: Option<Histogram<u64>>,
}

const NOTES: usize = 5;

fn note(list: &mut Vec<String>, msg: String) {
    if list.len() < NOTES && !list.contains(&msg) {
        list.push(msg);
    }
}

/// Why a call did not succeed.
#[derive(Debug)]
pub enum Fail {
    /// The platform answered 4xx: it refused the request.
    Refused(String),
    /// 5xx, no answer in time, or the component could not be reached.
    Error(String),
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(m) | Self::Error(m) => f.write_str(m),
        }
    }
}

impl PathRun {
    /// `n` inputs not taken because `what` failed.
    fn refuse(&mut self, n: u64, what: &str, f: Fail) {
        self.refused += n;
        match f {
            Fail::Refused(m) => note(&mut self.refusals, format!("{what}: {m}")),
            Fail::Error(m) => note(&mut self.errors, format!("{what}: {m}")),
        }
    }
}

/// An error without the request's URL (the tenant and path are named beside it).
fn short(e: &str) -> String {
    match e.find(" for url (") {
        Some(i) => e[..i].to_owned(),
        None => e.to_owned(),
    }
}

/// A call bounded by `limit`.
pub async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(limit, call).await {
        Err(_) => Err(Fail::Error(format!(
            "no answer within {} s",
            limit.as_secs()
        ))),
        Ok(Err(e)) => match e.status() {
            Some(s) if s.is_client_error() => Err(Fail::Refused(e.to_string())),
            _ => Err(Fail::Error(e.to_string())),
        },
        Ok(Ok(v)) => Ok(v),
    }
}

/// How long a load call may take: up to the deadline, at least 5 s, at most 60 s.
fn limit(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// How long the platform may stay silent before a driver gives up on it.
const SILENCE: Duration = Duration::from_secs(15);
