//! The batch ingest manager: stages uploaded files, runs ingestion jobs over them (file →
//! parse → tenant app → bulk write through coredms), and records per-file status.
//!
//! Jobs checkpoint after every bulk write; on start the manager resumes any file left
//! `ingesting` from its checkpoint. Ids derive from (content hash, record index), so records
//! written again after a crash are duplicates, never new documents.

pub mod parse;
mod router;
mod staging;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use router::{BatchApi, router};
pub use staging::{Staging, check_file_name};

use crate::apps::AppHandle;
use crate::config::BatchSettings;
use crate::coredms::{CoreDms, CoreError};
use crate::events::Ingested;
use crate::logs::Source;
use crate::metrics::Metrics;
use crate::model::{AppKind, BulkWrite, FileRecord, FileState, now_us};
use crate::pipeline::{AppCache, AppError, Input, transform, with_retry, write_with_retry};
use crate::tenants::TenantName;

/// Bulk writes a job runs before yielding its worker to another tenant.
const SLICE_BATCHES: usize = 4;

/// A running job: the open file and where it is.
struct Job {
    record: FileRecord,
    tenant: TenantName,
    source: Option<Box<dyn parse::RecordSource>>,
    app: Option<Arc<AppHandle>>,
    started: bool,
}

/// Round-robin over tenants with pending jobs, so one tenant's huge file does not starve
/// the others: each turn runs a slice of one job, then the next tenant goes.
/// Tenants in turn order, and each tenant's queued jobs.
type Queues = (VecDeque<TenantName>, HashMap<TenantName, VecDeque<Job>>);

#[derive(Default)]
struct Scheduler {
    inner: Mutex<Queues>,
    notify: Notify,
}

impl Scheduler {
    fn push(&self, job: Job) {
        if let Ok(mut g) = self.inner.lock() {
            let (order, queues) = &mut *g;
            let t = job.tenant.clone();
            queues.entry(t.clone()).or_default().push_back(job);
            if !order.contains(&t) {
                order.push_back(t);
            }
        }
        self.notify.notify_one();
    }

    /// The next job of the next tenant in turn; a tenant with more jobs goes to the back.
    fn pop(&self) -> Option<Job> {
        let mut g = self.inner.lock().ok()?;
        let (order, queues) = &mut *g;
        while let Some(t) = order.pop_front() {
            if let Some(q) = queues.get_mut(&t)
                && let Some(job) = q.pop_front()
            {
                if q.is_empty() {
                    queues.remove(&t);
                } else {
                    order.push_back(t);
                }
                return Some(job);
            }
            queues.remove(&t);
        }
        None
    }

    async fn next(&self, cancel: &CancellationToken) -> Option<Job> {
        loop {
            let notified = self.notify.notified();
            if let Some(j) = self.pop() {
                return Some(j);
            }
            tokio::select! {
                _ = notified => {}
                _ = cancel.cancelled() => return None,
            }
        }
    }
}

pub struct BatchManager {
    coredms: CoreDms,
    apps: Arc<AppCache>,
    pub staging: Staging,
    settings: BatchSettings,
    scheduler: Scheduler,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("file `{0}` is not staged")]
    NotStaged(String),
    #[error("file `{0}` is already being ingested")]
    Busy(String),
    #[error("cannot read staged file: {0}")]
    Io(#[from] std::io::Error),
}

/// Why an ingestion job failed: the reason its file's log entry and status carry.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// coredms (profile, file status, bulk write) failed for good.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The tenant's active batch app cannot be had (not compiling, or coredms).
    #[error(transparent)]
    App(#[from] AppError),
    #[error("cannot open staged file: {0}")]
    Open(#[source] std::io::Error),
    #[error("cannot read staged file: {0}")]
    Read(#[source] std::io::Error),
    /// The parsing/transforming task panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

impl BatchManager {
    pub fn new(
        coredms: CoreDms,
        apps: Arc<AppCache>,
        staging: Staging,
        settings: BatchSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            coredms,
            apps,
            staging,
            settings,
            scheduler: Scheduler::default(),
            metrics,
        }
    }

    /// Runs the worker pool until `cancel`; first re-queues jobs a previous run left unfinished.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        match self.coredms.files_in_state(FileState::Ingesting).await {
            Ok(files) => {
                for rec in files {
                    tracing::info!(tenant = %rec.tenant, file = %rec.name, from = rec.next_record, "resuming interrupted ingestion");
                    if let Err(e) = self.enqueue(rec).await {
                        tracing::warn!(error = %e, "cannot resume ingestion");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for interrupted ingestions"),
        }
        let mut workers = Vec::new();
        for _ in 0..self.settings.workers {
            let me = self.clone();
            let cancel = cancel.clone();
            workers.push(tokio::spawn(async move {
                while let Some(job) = me.scheduler.next(&cancel).await {
                    me.run_slice(job, &cancel).await;
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
    }

    /// Marks a staged file `ingesting` and queues its job.
    pub async fn start(&self, tenant: &TenantName, name: &str) -> Result<FileRecord, BatchError> {
        let mut rec = self
            .coredms
            .file(tenant, name)
            .await?
            .ok_or_else(|| BatchError::NotStaged(name.to_owned()))?;
        if rec.state == FileState::Ingesting {
            return Err(BatchError::Busy(name.to_owned()));
        }
        rec.state = FileState::Ingesting;
        rec.restart(crate::model::new_id());
        rec.updated_at = crate::model::rfc3339_now();
        self.coredms.put_file(&rec).await?;
        self.enqueue(rec.clone()).await?;
        Ok(rec)
    }

    async fn enqueue(&self, record: FileRecord) -> Result<(), BatchError> {
        let tenant = TenantName::parse(&record.tenant)
            .map_err(|e| BatchError::Core(CoreError::Invalid(e.to_string())))?;
        self.scheduler.push(Job {
            record,
            tenant,
            source: None,
            app: None,
            started: false,
        });
        Ok(())
    }

    async fn run_slice(&self, mut job: Job, cancel: &CancellationToken) {
        if !job.started {
            if let Err(e) = self.open(&mut job, cancel).await {
                if cancel.is_cancelled() {
                    return;
                }
                self.finish(job, Some(e)).await;
                return;
            }
            job.started = true;
        }
        for _ in 0..SLICE_BATCHES {
            if cancel.is_cancelled() {
                // Left `ingesting`: the next start resumes from the checkpoint.
                return;
            }
            match self.step(&mut job, cancel).await {
                Ok(true) => continue,
                Ok(false) => {
                    self.finish(job, None).await;
                    return;
                }
                Err(e) => {
                    if cancel.is_cancelled() {
                        return;
                    }
                    self.finish(job, Some(e)).await;
                    return;
                }
            }
        }
        self.scheduler.push(job);
    }

    async fn open(&self, job: &mut Job, cancel: &CancellationToken) -> Result<(), JobError> {
        let profile = with_retry(cancel, || self.coredms.tenant(&job.tenant)).await?;
        let limits = profile.constraints.app_limits;
        job.app = with_retry(cancel, || {
            self.apps
                .active(&self.coredms, &job.tenant, AppKind::Batch, limits)
        })
        .await?;
        job.record.app_version = job.app.as_ref().map(|a| a.version);
        let path = self.staging.path(&job.tenant, &job.record.name);
        let format = job.record.format;
        let skip = job.record.next_record;
        let whole = job.app.as_ref().is_some_and(|a| !a.shape.has_map);
        let source = tokio::task::spawn_blocking(
            move || -> Result<Box<dyn parse::RecordSource>, JobError> {
                let file = std::fs::File::open(&path).map_err(JobError::Open)?;
                if whole {
                    return Ok(Box::new(WholeFile(Some(file))));
                }
                let mut src =
                    parse::open(format, std::io::BufReader::with_capacity(256 * 1024, file));
                for _ in 0..skip {
                    match src.next_record() {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(JobError::Read(e)),
                        None => break,
                    }
                }
                Ok(src)
            },
        )
        .await??;
        job.source = Some(source);
        Ok(())
    }

    /// One bulk write's worth of records. Ok(false) at the end of the file.
    async fn step(&self, job: &mut Job, cancel: &CancellationToken) -> Result<bool, JobError> {
        let Some(mut source) = job.source.take() else {
            return Ok(false);
        };
        let app = job.app.clone();
        let batch = self.settings.batch_size;
        let origin = job.record.sha256.get(..16).unwrap_or("0").to_owned();
        let collection = job.record.collection.clone();
        let data_name = job.record.name.clone();
        let max_doc = app
            .as_ref()
            .map_or(crate::config::AppLimits::default().max_doc_bytes, |a| {
                a.limits().max_doc_bytes
            });
        let (source, inputs, transformed, more) = tokio::task::spawn_blocking(move || {
            let mut inputs = Vec::with_capacity(batch);
            let mut more = true;
            while inputs.len() < batch {
                match source.next_record() {
                    Some(Ok(r)) => inputs.push(Input {
                        origin: origin.clone(),
                        index: r.index,
                        bytes: r.bytes,
                        started_us: now_us(),
                        data_name: data_name.clone(),
                        value: r.value.map_err(|e| e.to_string()),
                    }),
                    Some(Err(e)) => return Err(JobError::Read(e)),
                    None => {
                        more = false;
                        break;
                    }
                }
            }
            let t = transform(app.as_deref(), &collection, max_doc, &inputs);
            Ok((source, inputs.len(), t, more))
        })
        .await??;
        job.source = Some(source);
        if inputs == 0 {
            return Ok(false);
        }
        let write = BulkWrite {
            tenant: job.tenant.clone(),
            source: Source::Batch,
            data_name: job.record.name.clone(),
            app_version: job.record.app_version,
            docs: transformed.docs,
            failures: transformed.failures,
        };
        let failures = write.failures.len() as u64;
        let bytes: u64 = write.docs.iter().map(|d| d.bytes).sum();
        let outcome = write_with_retry(&self.coredms, write, cancel).await?;
        let failed = failures + outcome.failed.len() as u64;
        job.record.records_ok += outcome.inserted;
        job.record.records_duplicate += outcome.duplicates;
        job.record.records_failed += failed;
        job.record.next_record += inputs as u64;
        job.record.updated_at = crate::model::rfc3339_now();
        Ingested {
            tenant: &job.record.tenant,
            source: Source::Batch,
            stored: outcome.inserted,
            duplicates: outcome.duplicates,
            failed,
            bytes,
        }
        .emit(&self.metrics);
        let record = &job.record;
        with_retry(cancel, || self.coredms.put_file(record)).await?;
        Ok(more)
    }

    async fn finish(&self, mut job: Job, error: Option<JobError>) {
        // The reason as the tenant reads it, in the log entry and the file's status.
        let error = error.map(|e| e.to_string());
        job.record.state = if error.is_some() {
            FileState::Failed
        } else {
            FileState::Done
        };
        if let Some(e) = &error {
            tracing::warn!(tenant = %job.tenant, file = %job.record.name, error = %e, "ingestion failed");
            // A file that could not be processed at all still gets its one log entry.
            let _ = self
                .coredms
                .bulk_write(&BulkWrite {
                    tenant: job.tenant.clone(),
                    source: Source::Batch,
                    data_name: job.record.name.clone(),
                    app_version: job.record.app_version,
                    docs: vec![],
                    failures: vec![crate::model::Failure {
                        collection: job.record.collection.clone(),
                        reason: e.clone(),
                        bytes: job.record.bytes,
                        started_us: now_us(),
                        data_name: None,
                    }],
                })
                .await;
        } else {
            tracing::info!(tenant = %job.tenant, file = %job.record.name, ok = job.record.records_ok,
                failed = job.record.records_failed, duplicates = job.record.records_duplicate, "ingestion done");
        }
        job.record.error = error;
        job.record.updated_at = crate::model::rfc3339_now();
        // Ten tries, 200 ms apart at first, doubling up to 6.4 s.
        let backoff = backon::ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_millis(6400))
            .with_max_times(9);
        let record = &job.record;
        if let Err(e) = backon::Retryable::retry(|| self.coredms.put_file(record), backoff)
            .sleep(tokio::time::sleep)
            .notify(|e, delay| tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot record file status"))
            .await
        {
            tracing::warn!(error = %e, "cannot record file status: gave up after 10 tries");
        }
    }
}

/// The whole file as one input, for `ingest` apps.
struct WholeFile(Option<std::fs::File>);

impl parse::RecordSource for WholeFile {
    fn next_record(&mut self) -> Option<Result<parse::Record, std::io::Error>> {
        use std::io::Read;
        let mut f = self.0.take()?;
        let mut buf = Vec::new();
        if let Err(e) = f.read_to_end(&mut buf) {
            return Some(Err(e));
        }
        let bytes = buf.len() as u64;
        let value = String::from_utf8(buf)
            .map(serde_json::Value::String)
            .map_err(|_| parse::ParseErrorKind::NotUtf8.into());
        Some(Ok(parse::Record {
            index: 0,
            line: 1,
            bytes,
            value,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;

    fn job(tenant: &str, name: &str) -> Job {
        let t = TenantName::parse(tenant).expect("valid");
        Job {
            record: FileRecord::staged(&t, name, Format::Csv, 0, String::new(), "c".into()),
            tenant: t,
            source: None,
            app: None,
            started: false,
        }
    }

    fn order(s: &Scheduler) -> Vec<String> {
        std::iter::from_fn(|| s.pop())
            .map(|j| j.record.name)
            .collect()
    }

    #[test]
    fn every_queued_job_of_one_tenant_is_served() {
        let s = Scheduler::default();
        for n in ["a1", "a2", "a3"] {
            s.push(job("a", n));
        }
        assert_eq!(order(&s), ["a1", "a2", "a3"]);
    }

    #[test]
    fn tenants_take_turns_so_a_busy_one_does_not_starve_the_others() {
        let s = Scheduler::default();
        for n in ["a1", "a2", "a3"] {
            s.push(job("a", n));
        }
        s.push(job("b", "b1"));
        s.push(job("c", "c1"));
        let first = s.pop().expect("a job");
        assert_eq!(first.record.name, "a1");
        // A slice of a1 ran; it goes back in line behind the other tenants.
        s.push(first);
        assert_eq!(order(&s), ["b1", "c1", "a2", "a3", "a1"]);
    }
}
