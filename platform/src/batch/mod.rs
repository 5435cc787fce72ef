//! The batch ingest manager: stages uploaded files, runs ingestion jobs over them (file →
//! parse → tenant app → bulk write through coredms), and records per-file status.
//!
//! Every change of a file's record is a compare-and-set through coredms: staging a new
//! version (not while it is ingesting), starting a job (on the version read, not twice),
//! each checkpoint and the finish (only by the manager holding the job, on the same version
//! and job). A job belongs to one manager at a time through a lease in its record (owner =
//! this process's id, expiry renewed at each checkpoint and by a heartbeat every third of
//! `batch.lease_ms`); the heartbeat also claims `ingesting` files whose lease expired (their
//! manager died), as many as this manager has free workers, so N replicas over one staging
//! directory share the work and resume each other's from the last checkpoint (stored every
//! few bulks, at most a second apart; what a resumed job writes again is logged
//! once, as its run's). A job that loses its compare-and-set stops without writing. Ids derive from (content hash, record
//! index), so records written again after a crash are duplicates, never new documents.

pub mod parse;
mod router;
mod staging;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use router::{BatchApi, BatchDoc, router};
pub use staging::{Staging, check_file_name};

use crate::apps::AppHandle;
use crate::config::BatchSettings;
use crate::coredms::{CoreDms, CoreError};
use crate::events::Ingested;
use crate::logs::Source;
use crate::metrics::Metrics;
use crate::model::{
    AppKind, BulkOutcome, BulkWrite, FileRecord, FileState, InputRef, JobRecords, now_us,
};
use crate::pipeline::{AppCache, AppError, Input, transform, with_retry, write_with_retry};
use crate::tenants::TenantName;

/// Bulk writes a job runs before yielding its worker to another tenant.
const SLICE_BATCHES: usize = 4;

/// A partial upload (or a staged copy no record names) not written to for this long is left
/// over from an upload that died, not one in progress in some replica: removed at start.
const STALE_AFTER: Duration = Duration::from_secs(15 * 60);

/// A running job: the open file and where it is.
struct Job {
    record: FileRecord,
    tenant: TenantName,
    source: Option<Box<dyn parse::RecordSource>>,
    app: Option<Arc<AppHandle>>,
    started: bool,
    /// A replay: the records its log shows settled, passed over.
    settled: Option<Arc<JobRecords>>,
    /// When this manager last stored the job's progress (and so renewed its lease).
    checkpointed: Option<std::time::Instant>,
    /// Bulks written since then.
    unsaved: bool,
    /// Opened, and its first bulk read, while the file before it was written: its first
    /// bulk, or why it could not be opened (reported when its turn comes).
    warmed: Option<Result<Ahead, JobError>>,
}

/// A bulk being read and transformed on a blocking thread.
type Ahead = tokio::task::JoinHandle<Result<Option<Prepared>, JobError>>;

/// The longest a job's progress goes unstored while its bulks are written (a third of the
/// lease, when that is shorter).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How long a stopping manager waits to store the progress of a job it leaves.
const LAST_CHECKPOINT: Duration = Duration::from_secs(2);

impl Job {
    fn checkpoint_due(&self, every: Duration) -> bool {
        self.checkpointed.is_none_or(|t| t.elapsed() >= every)
    }
}

/// One bulk read and transformed, not yet written: the file's source (to read on from),
/// the records read (settled ones passed over in a replay included), the inputs and what the
/// app made of them, and whether the file goes on.
struct Prepared {
    source: Option<Box<dyn parse::RecordSource>>,
    read: u64,
    inputs: usize,
    transformed: crate::pipeline::Transformed,
    more: bool,
}

/// Round-robin over tenants with pending jobs, so one tenant's huge file does not starve
/// the others: each turn runs a slice of one job, then the next tenant goes. A tenant's own
/// files go in the order they were started (a job whose slice ended stays first in its
/// tenant's line), so its first file is done first rather than all at the end.
/// Tenants in turn order, and each tenant's queued jobs.
type Queues = (VecDeque<TenantName>, HashMap<TenantName, VecDeque<Job>>);

#[derive(Default)]
struct Scheduler {
    inner: Mutex<Queues>,
    notify: Notify,
}

impl Scheduler {
    /// A new job: last in its tenant's line.
    fn push(&self, job: Job) {
        self.queue(job, false);
    }

    /// A job whose slice ended: first in its tenant's line, the tenant behind the others.
    fn resume(&self, job: Job) {
        self.queue(job, true);
    }

    fn queue(&self, job: Job, first: bool) {
        if let Ok(mut g) = self.inner.lock() {
            let (order, queues) = &mut *g;
            let t = job.tenant.clone();
            let q = queues.entry(t.clone()).or_default();
            if first {
                q.push_front(job);
                // Behind every tenant waiting now, even if its other files kept it in line.
                order.retain(|x| x != &t);
                order.push_back(t);
            } else {
                q.push_back(job);
                if !order.contains(&t) {
                    order.push_back(t);
                }
            }
        }
        self.notify.notify_one();
    }

    /// The next job of `tenant`, taken out of line while its current one ends, when it is the
    /// one a worker would run next anyway: no other tenant waits.
    fn take_next_of(&self, tenant: &TenantName) -> Option<Job> {
        let mut g = self.inner.lock().ok()?;
        let (order, queues) = &mut *g;
        if order.iter().any(|t| t != tenant) {
            return None;
        }
        let q = queues.get_mut(tenant)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            queues.remove(tenant);
            order.retain(|t| t != tenant);
        }
        Some(job)
    }

    /// A job taken by [`Self::take_next_of`], back first in its tenant's line; the tenant
    /// keeps its turn, or is first when it had left the turns (no other tenant waited then).
    fn put_back(&self, job: Job) {
        if let Ok(mut g) = self.inner.lock() {
            let (order, queues) = &mut *g;
            let t = job.tenant.clone();
            queues.entry(t.clone()).or_default().push_front(job);
            if !order.contains(&t) {
                order.push_front(t);
            }
        }
        self.notify.notify_one();
    }

    /// Whether a tenant other than `tenant` has a job waiting for its turn.
    fn others_waiting(&self, tenant: &TenantName) -> bool {
        self.inner
            .lock()
            .map(|g| g.0.iter().any(|t| t != tenant))
            .unwrap_or(true)
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
    /// This manager's id as the owner of job leases: one per process (per manager).
    owner: String,
    /// The files (`tenant/name`) whose jobs this manager holds, queued or running.
    held: Mutex<HashSet<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("file `{0}` is not staged")]
    NotStaged(String),
    #[error("file `{0}` is already being ingested")]
    Busy(String),
    #[error("file `{0}` has not been ingested since it was staged: ingest it first")]
    NeverIngested(String),
    #[error("file `{0}` has no failed records to replay")]
    NothingToReplay(String),
    /// `start` lost its compare-and-set to another start or a new upload of the name.
    #[error(
        "file `{0}` changed while its ingestion was starting (another start or upload came first); read its status and retry"
    )]
    Raced(String),
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
    /// The app version a resumed job started with is no longer stored.
    #[error("batch app version {0}, which this ingestion started with, is gone")]
    AppGone(u32),
    #[error("cannot read staged file: {0}")]
    Read(#[source] std::io::Error),
    /// The parsing/transforming task panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
    /// This manager no longer holds the job (its lease was taken over, or the file was
    /// staged again): it stops without writing the record.
    #[error("the job was taken over")]
    Lost,
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
            owner: crate::model::new_id(),
            held: Mutex::new(HashSet::new()),
        }
    }

    /// Runs the worker pool and the lease heartbeat until `cancel`, after sweeping what dead
    /// uploads left in the staging directory; then lets go of the jobs left unfinished.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        self.sweep().await;
        let heartbeat = tokio::spawn(self.clone().heartbeat(cancel.clone()));
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
        let _ = heartbeat.await;
        // Unfinished jobs stay `ingesting` at their checkpoint; released, another manager
        // (or this one, restarted) resumes them now rather than when the lease runs out.
        match self.coredms.release_leases(&self.owner).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "released unfinished jobs"),
            Err(e) => tracing::warn!(error = %e, "cannot release job leases; they expire"),
        }
    }

    /// Every third of the lease: renews the leases of the jobs held, then claims expired
    /// ones (a dead manager's, or left by a stopped one) for the workers that are free.
    /// The first beat, at start, resumes only such jobs, never one another manager holds.
    async fn heartbeat(self: Arc<Self>, cancel: CancellationToken) {
        let lease_ms = self.settings.lease_ms;
        let every = Duration::from_millis(lease_ms / 3);
        loop {
            let held: Vec<String> = self
                .held
                .lock()
                .map(|h| h.iter().cloned().collect())
                .unwrap_or_default();
            if !held.is_empty()
                && let Err(e) = self
                    .coredms
                    .renew_leases(&self.owner, lease_ms, &held)
                    .await
            {
                tracing::warn!(error = %e, "cannot renew job leases");
            }
            let free = self.settings.workers.saturating_sub(self.held_count());
            if free > 0 {
                match self
                    .coredms
                    .claim_files(&self.owner, lease_ms, free as u64)
                    .await
                {
                    Ok(files) => {
                        for rec in files {
                            if !self.hold(&rec) {
                                // Ours already: its lease had lapsed and is ours again.
                                continue;
                            }
                            tracing::info!(tenant = %rec.tenant, file = %rec.name, from = rec.next_record, "resuming interrupted ingestion");
                            if let Err(e) = self.enqueue(rec).await {
                                tracing::warn!(error = %e, "cannot resume ingestion");
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot look for interrupted ingestions"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    fn held_count(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Marks `rec`'s job as held here; false if it already was.
    fn hold(&self, rec: &FileRecord) -> bool {
        self.held
            .lock()
            .is_ok_and(|mut h| h.insert(format!("{}/{}", rec.tenant, rec.name)))
    }

    fn let_go(&self, rec: &FileRecord) {
        if let Ok(mut h) = self.held.lock() {
            h.remove(&format!("{}/{}", rec.tenant, rec.name));
        }
    }

    /// Removes partial uploads left by uploads that died, and staged copies no record names
    /// (an upload that died between writing its copy and its record, or a replaced copy
    /// whose removal failed), when not written to for [`STALE_AFTER`]: an upload in
    /// progress in another replica sharing the directory is never touched.
    async fn sweep(&self) {
        let sweep = match self.staging.sweep(STALE_AFTER).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sweep the staging directory");
                return;
            }
        };
        if sweep.parts_removed > 0 {
            tracing::info!(files = sweep.parts_removed, "removed partial uploads");
        }
        // The copies each tenant's records name, read once per tenant.
        let mut named: HashMap<String, HashSet<(String, String)>> = HashMap::new();
        for (tenant, name, upload) in sweep.copies {
            let Ok(t) = TenantName::parse(&tenant) else {
                continue;
            };
            if check_file_name(&name).is_err() {
                continue;
            }
            if !named.contains_key(&tenant) {
                match self.coredms.files(&t).await {
                    Ok(files) => {
                        let copies = files.into_iter().map(|f| (f.name, f.upload)).collect();
                        named.insert(tenant.clone(), copies);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check staged copies against their records");
                        return;
                    }
                }
            }
            if named
                .get(&tenant)
                .is_some_and(|n| !n.contains(&(name.clone(), upload.clone())))
            {
                tracing::info!(tenant = %t, file = %name, upload = %upload, "removing a staged copy no record names");
                if let Err(e) = self.staging.remove(&t, &name, &upload).await {
                    tracing::warn!(error = %e, "cannot remove a stale staged copy");
                }
            }
        }
    }

    /// Records `rec`, a new upload whose copy is in place, as the next version of its name
    /// (409 while the name is being ingested), then removes the copy it replaced. On a
    /// lost or failed compare-and-set the new copy goes, unless the record names it after
    /// all (the answer, not the write, was lost).
    pub async fn stage(&self, mut rec: FileRecord) -> Result<FileRecord, BatchError> {
        let tenant = TenantName::parse(&rec.tenant)
            .map_err(|e| BatchError::Core(CoreError::Invalid(e.to_string())))?;
        match self.coredms.stage_file(&rec).await {
            Ok(replaced) => {
                rec.version = replaced.as_ref().map_or(1, |p| p.version + 1);
                if let Some(old) = replaced
                    && old.upload != rec.upload
                    && let Err(e) = self.staging.remove(&tenant, &old.name, &old.upload).await
                {
                    tracing::warn!(error = %e, tenant = %tenant, file = %rec.name, "cannot remove a replaced staged copy");
                }
                Ok(rec)
            }
            Err(e) => {
                match self.coredms.file(&tenant, &rec.name).await {
                    Ok(Some(r)) if r.upload == rec.upload => {}
                    Ok(_) => {
                        let _ = self.staging.remove(&tenant, &rec.name, &rec.upload).await;
                    }
                    // Unknown: left for the sweep at the next start.
                    Err(_) => {}
                }
                Err(e.into())
            }
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
        rec.restart(crate::model::new_id());
        self.launch(rec).await
    }

    /// Re-ingests, with the tenant's current app, the records of the file's last run that
    /// its log shows failed (or never reached), under the same run: what they store and log
    /// belongs to that ingestion, and the records already settled are not read again.
    pub async fn replay(&self, tenant: &TenantName, name: &str) -> Result<FileRecord, BatchError> {
        let mut rec = self
            .coredms
            .file(tenant, name)
            .await?
            .ok_or_else(|| BatchError::NotStaged(name.to_owned()))?;
        match rec.state {
            FileState::Ingesting => return Err(BatchError::Busy(name.to_owned())),
            FileState::Staged => return Err(BatchError::NeverIngested(name.to_owned())),
            FileState::Done | FileState::Failed if rec.job.is_empty() => {
                return Err(BatchError::NeverIngested(name.to_owned()));
            }
            FileState::Done if rec.records_failed == 0 => {
                return Err(BatchError::NothingToReplay(name.to_owned()));
            }
            FileState::Done | FileState::Failed => {}
        }
        rec.replay = true;
        rec.next_record = 0;
        rec.error = None;
        self.launch(rec).await
    }

    /// Moves the file to `ingesting` under this manager's lease, by compare-and-set on the
    /// version read (another start or upload first: `Raced`), and queues its job.
    async fn launch(&self, mut rec: FileRecord) -> Result<FileRecord, BatchError> {
        rec.state = FileState::Ingesting;
        rec.updated_at = crate::model::rfc3339_now();
        rec.lease = None;
        if !self
            .coredms
            .start_file(&rec, &self.owner, self.settings.lease_ms)
            .await?
        {
            return Err(BatchError::Raced(rec.name));
        }
        self.hold(&rec);
        if let Err(e) = self.enqueue(rec.clone()).await {
            self.let_go(&rec);
            return Err(e);
        }
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
            settled: None,
            checkpointed: None,
            unsaved: false,
            warmed: None,
        });
        Ok(())
    }

    async fn run_slice(&self, job: Job, cancel: &CancellationToken) {
        let mut next = None;
        self.run_slice_warming(job, &mut next, cancel).await;
        if let Some(n) = next {
            self.scheduler.put_back(n);
        }
    }

    /// Runs a slice of `job`; while the last bulk of its file is written, the tenant's next
    /// file (`next`, taken out of line when it is the one to run next and this is the only
    /// worker) is opened and its first bulk read, so the worker does not wait for it when
    /// the file ends.
    async fn run_slice_warming(
        &self,
        mut job: Job,
        next: &mut Option<Job>,
        cancel: &CancellationToken,
    ) {
        if let Some(Err(e)) = job.warmed.take_if(|w| w.is_err()) {
            self.finish(job, Some(e)).await;
            return;
        }
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
        // Two bulks deep: while one bulk is written, the next is read and transformed on a
        // blocking thread (the database and the app's CPU work at once). Bulks are written
        // and checkpointed in order; a bulk read ahead but not written is read again from
        // the checkpoint by whoever resumes the job. The slice goes on past SLICE_BATCHES
        // while no other tenant waits, so a lone tenant's pipeline never drains.
        let mut ahead = match job.warmed.take() {
            Some(Ok(first)) => Some(first),
            _ => job.source.take().map(|source| self.prepare(&job, source)),
        };
        // The bulk read ahead, once awaited (see `warming` below).
        let mut done: Option<Result<Option<Prepared>, JobError>> = None;
        let every = CHECKPOINT_EVERY.min(Duration::from_millis(self.settings.lease_ms / 3));
        for n in 0.. {
            if cancel.is_cancelled() {
                // Left `ingesting`: the next start resumes from the checkpoint.
                self.last_checkpoint(job.unsaved, job.record.clone()).await;
                return;
            }
            let prepared = match (done.take(), ahead.take()) {
                (Some(r), _) => r,
                (None, Some(task)) => task.await.map_err(JobError::from).and_then(|r| r),
                (None, None) => Ok(None),
            };
            let outcome = match prepared {
                Ok(Some(mut bulk)) => {
                    let source = bulk.source.take();
                    let last = n + 1 >= SLICE_BATCHES && self.scheduler.others_waiting(&job.tenant);
                    // Every SLICE_BATCHES bulks the progress is stored, slice or not: what
                    // another manager resumes from if this one dies.
                    let boundary = (n + 1) % SLICE_BATCHES == 0;
                    // The last bulk of the slice hands the source back to the job instead.
                    match source {
                        Some(src) if bulk.more && !last => {
                            ahead = Some(self.prepare(&job, src));
                        }
                        src => job.source = src,
                    }
                    let more = bulk.more;
                    // The checkpoint every SLICE_BATCHES bulks (and at the end, by `finish`), and before
                    // a bulk when the last is `every` old: a manager that stalled past its
                    // lease learns it lost the job before it writes again. A job resumed
                    // from the checkpoint writes again what followed, which the log takes
                    // as this run's, once.
                    let fence = if job.checkpoint_due(every) {
                        self.checkpoint(&mut job, cancel).await
                    } else {
                        Ok(())
                    };
                    // While the bulk is written: when the file ends with it (or the bulk read
                    // ahead finds its end), the tenant's next file is opened and its first
                    // bulk read, if it is the one to run next.
                    let tenant = job.tenant.clone();
                    let warming = async {
                        // The bulk read ahead is awaited here, once: the loop takes it from
                        // `done`.
                        let ends = !more
                            || match ahead.take() {
                                Some(task) => {
                                    let r = task.await.map_err(JobError::from).and_then(|r| r);
                                    let ends = matches!(r, Ok(None));
                                    done = Some(r);
                                    ends
                                }
                                None => false,
                            };
                        // With more workers, an idle one would have taken it already, and one
                        // that becomes idle must find it in line, in its order.
                        if ends && next.is_none() && self.settings.workers == 1 {
                            *next = self.scheduler.take_next_of(&tenant);
                        }
                        self.warm(next.as_mut(), cancel).await;
                    };
                    match fence {
                        Ok(()) => {
                            match tokio::join!(self.commit(&mut job, bulk, cancel), warming).0 {
                                Ok(()) if more && (last || boundary) => {
                                    self.checkpoint(&mut job, cancel).await.map(|()| more)
                                }
                                r => r.map(|()| more),
                            }
                        }
                        Err(e) => Err(e),
                    }
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(true) if ahead.is_some() || done.is_some() => continue,
                Ok(true) => break,
                Ok(false) => {
                    self.finish(job, None).await;
                    return;
                }
                Err(e) => {
                    if cancel.is_cancelled() {
                        self.last_checkpoint(job.unsaved, job.record.clone()).await;
                        return;
                    }
                    self.finish(job, Some(e)).await;
                    return;
                }
            }
        }
        self.scheduler.resume(job);
    }

    /// Opens `job` (the next file, see [`Self::run_slice_warming`]) and starts reading its
    /// first bulk; a failure to open it is kept for its turn.
    async fn warm(&self, job: Option<&mut Job>, cancel: &CancellationToken) {
        let Some(job) = job else { return };
        if job.started || job.warmed.is_some() {
            return;
        }
        match self.open(job, cancel).await {
            Ok(()) => {
                job.started = true;
                if let Some(source) = job.source.take() {
                    job.warmed = Some(Ok(self.prepare(job, source)));
                }
                tracing::debug!(tenant = %job.tenant, file = %job.record.name, "opened while the file before it is written");
            }
            // Cancelled: its next run opens it again.
            Err(_) if cancel.is_cancelled() => {}
            Err(e) => job.warmed = Some(Err(e)),
        }
    }

    /// On the way out (the manager stopping): the progress of bulks written since the last
    /// checkpoint, stored once if it can be at once, so a restart does not write them again.
    async fn last_checkpoint(&self, unsaved: bool, record: FileRecord) {
        if !unsaved {
            return;
        }
        let store = self
            .coredms
            .checkpoint_file(&record, &self.owner, self.settings.lease_ms);
        let _ = tokio::time::timeout(LAST_CHECKPOINT, store).await;
    }

    async fn open(&self, job: &mut Job, cancel: &CancellationToken) -> Result<(), JobError> {
        let profile = with_retry(cancel, || self.coredms.tenant(&job.tenant)).await?;
        let limits = profile.constraints.app_limits;
        // A job resumed mid-file (after a crash or a takeover) keeps the app version it
        // started with, so every record of a run goes through one version; a new job and a
        // replay take the active one.
        let pinned = job.record.app_version.filter(|_| !job.record.replay);
        job.app = match pinned {
            Some(v) => {
                let app = with_retry(cancel, || {
                    self.apps
                        .version(&self.coredms, &job.tenant, AppKind::Batch, v, limits)
                })
                .await?;
                Some(app.ok_or(JobError::AppGone(v))?)
            }
            None => {
                with_retry(cancel, || {
                    self.apps
                        .active(&self.coredms, &job.tenant, AppKind::Batch, limits)
                })
                .await?
            }
        };
        let first_open = pinned.is_none();
        job.record.app_version = job.app.as_ref().map(|a| a.version);
        if first_open && job.record.app_version.is_some() {
            // Recorded before any bulk, so a job resumed even after its first bulk keeps it.
            self.checkpoint(job, cancel).await?;
        }
        if job.record.replay {
            let (tenant, run) = (&job.tenant, &job.record.job);
            let settled = with_retry(cancel, || self.coredms.job_records(tenant, run)).await?;
            job.settled = Some(Arc::new(settled));
        }
        let path = self
            .staging
            .path(&job.tenant, &job.record.name, &job.record.upload);
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

    /// Reads and transforms one bulk write's worth of records from `source` on a blocking
    /// thread: `None` at the end of the file.
    fn prepare(
        &self,
        job: &Job,
        mut source: Box<dyn parse::RecordSource>,
    ) -> tokio::task::JoinHandle<Result<Option<Prepared>, JobError>> {
        let app = job.app.clone();
        let batch = self.settings.batch_size;
        let origin = origin_of(&job.record);
        let run = job.record.job.clone();
        let settled = job.settled.clone();
        let collection = job.record.collection.clone();
        let data_name = job.record.name.clone();
        let max_doc = app
            .as_ref()
            .map_or(crate::config::AppLimits::default().max_doc_bytes, |a| {
                a.limits().max_doc_bytes
            });
        let in_process = self.coredms.in_process();
        tokio::task::spawn_blocking(move || {
            let mut inputs = Vec::with_capacity(batch);
            let mut more = true;
            // Records read: a replay passes over the settled ones without an input.
            let mut read = 0u64;
            while inputs.len() < batch {
                match source.next_record() {
                    Some(Ok(r)) if settled.as_ref().is_some_and(|s| s.is_settled(r.index)) => {
                        read += 1;
                    }
                    Some(Ok(r)) => inputs.push(Input {
                        origin: origin.clone(),
                        index: r.index,
                        input: InputRef::Record {
                            job: run.clone(),
                            record: r.index,
                            line: Some(r.line),
                        },
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
            read += inputs.len() as u64;
            if read == 0 {
                return Ok(None);
            }
            let mut transformed = transform(app.as_deref(), &collection, max_doc, &inputs);
            if in_process {
                crate::coredms::encode_ahead(&mut transformed.docs);
            }
            Ok(Some(Prepared {
                source: Some(source),
                read,
                inputs: inputs.len(),
                transformed,
                more,
            }))
        })
    }

    /// Writes a prepared bulk and moves the job's checkpoint past its records.
    async fn commit(
        &self,
        job: &mut Job,
        bulk: Prepared,
        cancel: &CancellationToken,
    ) -> Result<(), JobError> {
        let Prepared {
            read,
            inputs,
            transformed,
            ..
        } = bulk;
        if inputs == 0 {
            // Only settled records: nothing to write, the checkpoint moves on.
            job.record.next_record += read;
            job.unsaved = true;
            return Ok(());
        }
        let doc_inputs = transformed.doc_inputs;
        let failed_inputs: Vec<usize> = transformed.failed_inputs.iter().map(|(i, _)| *i).collect();
        let skipped_inputs = transformed.skipped_inputs;
        let write = BulkWrite {
            tenant: job.tenant.clone(),
            source: Source::Batch,
            data_name: job.record.name.clone(),
            app_version: job.record.app_version,
            docs: transformed.docs,
            unstored: transformed.unstored,
            origin: Some(origin_of(&job.record)),
            replay: job.record.replay,
        };
        let bytes: u64 = write.docs.iter().map(|d| d.bytes).sum();
        let outcome = write_with_retry(&self.coredms, write, cancel).await?;
        let records = RecordCounts::of(
            inputs,
            &doc_inputs,
            &failed_inputs,
            &skipped_inputs,
            &outcome,
        );
        // A replay's counts are recounted from the log when it ends: its records were
        // counted once already.
        if !job.record.replay {
            records.add_to(&mut job.record);
            job.record.documents_stored += outcome.inserted;
            job.record.documents_duplicate += outcome.duplicates;
            job.record.documents_failed += outcome.failed.len() as u64;
        }
        job.record.next_record += read;
        job.unsaved = true;
        Ingested {
            tenant: &job.record.tenant,
            source: Source::Batch,
            stored: outcome.inserted,
            duplicates: outcome.duplicates,
            failed: records.failed,
            bytes,
        }
        .emit(&self.metrics);
        Ok(())
    }

    /// Stores the job's progress (and renews its lease) unless it lost the job.
    async fn checkpoint(&self, job: &mut Job, cancel: &CancellationToken) -> Result<(), JobError> {
        job.checkpointed = Some(std::time::Instant::now());
        job.unsaved = false;
        job.record.updated_at = crate::model::rfc3339_now();
        let (record, owner, lease_ms) = (&job.record, &self.owner, self.settings.lease_ms);
        if with_retry(cancel, || {
            self.coredms.checkpoint_file(record, owner, lease_ms)
        })
        .await?
        {
            Ok(())
        } else {
            Err(JobError::Lost)
        }
    }

    async fn finish(&self, mut job: Job, error: Option<JobError>) {
        if matches!(error, Some(JobError::Lost)) {
            tracing::info!(tenant = %job.tenant, file = %job.record.name, "job taken over or file staged again: stopping");
            self.let_go(&job.record);
            return;
        }
        // The reason as the tenant reads it, in the log entry and the file's status.
        let error = error.map(|e| e.to_string());
        if let Some(e) = &error {
            tracing::warn!(tenant = %job.tenant, file = %job.record.name, error = %e, "ingestion failed");
            // Only the job's holder logs its failure: one that lost it says nothing, and one
            // that cannot tell (coredms unreachable) logs nothing either; its `finish_file`
            // below is a compare-and-set too.
            let holds = match self
                .coredms
                .checkpoint_file(&job.record, &self.owner, self.settings.lease_ms)
                .await
            {
                Ok(true) => true,
                Ok(false) => {
                    self.let_go(&job.record);
                    return;
                }
                Err(_) => false,
            };
            // A file that could not be processed at all still gets its one log entry.
            if holds {
                let _ = self
                    .coredms
                    .bulk_write(&BulkWrite {
                        tenant: job.tenant.clone(),
                        source: Source::Batch,
                        data_name: job.record.name.clone(),
                        app_version: job.record.app_version,
                        docs: vec![],
                        unstored: vec![crate::model::Unstored {
                            input: InputRef::File {
                                job: job.record.job.clone(),
                            },
                            collection: job.record.collection.clone(),
                            document_id: None,
                            reason: Some(e.clone()),
                            bytes: job.record.bytes,
                            started_us: now_us(),
                            data_name: None,
                        }],
                        origin: Some(origin_of(&job.record)),
                        replay: job.record.replay,
                    })
                    .await;
            }
        } else {
            tracing::info!(tenant = %job.tenant, file = %job.record.name, ok = job.record.records_ok,
                failed = job.record.records_failed, duplicates = job.record.records_duplicate, "ingestion done");
        }
        if job.record.replay {
            // The file's counts as its log now tells them, replayed records included.
            let (tenant, run) = (&job.tenant, &job.record.job);
            match self.coredms.job_records(tenant, run).await {
                Ok(counts) => counts.count_into(&mut job.record),
                Err(e) => {
                    tracing::warn!(tenant = %job.tenant, file = %job.record.name, error = %e, "cannot recount the replayed file: its counts are those before the replay");
                }
            }
            job.record.replay = false;
        }
        job.record.state = if error.is_some() {
            FileState::Failed
        } else {
            FileState::Done
        };
        job.record.error = error;
        job.record.updated_at = crate::model::rfc3339_now();
        // Ten tries, 200 ms apart at first, doubling up to 6.4 s.
        let backoff = backon::ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_millis(6400))
            .with_max_times(9);
        let record = &job.record;
        match backon::Retryable::retry(|| self.coredms.finish_file(record, &self.owner), backoff)
            .sleep(tokio::time::sleep)
            .notify(|e, delay| tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot record file status"))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(tenant = %job.tenant, file = %job.record.name, "job taken over before its end was recorded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record file status: gave up after 10 tries");
            }
        }
        self.let_go(&job.record);
    }
}

/// What became of each record of one bulk: each counted once, as failed (its input or any
/// of its documents), skipped (no documents), duplicate (every document already stored by
/// another ingestion) or ok.
#[derive(Debug, Default, PartialEq)]
struct RecordCounts {
    ok: u64,
    failed: u64,
    duplicate: u64,
    skipped: u64,
}

impl RecordCounts {
    fn of(
        inputs: usize,
        doc_inputs: &[usize],
        failed_inputs: &[usize],
        skipped_inputs: &[usize],
        outcome: &BulkOutcome,
    ) -> Self {
        #[derive(Clone, Copy, PartialEq)]
        enum R {
            Ok,
            AllDuplicate,
            Failed,
            Skipped,
        }
        let mut r = vec![None::<R>; inputs];
        for &i in failed_inputs {
            r[i] = Some(R::Failed);
        }
        for &i in skipped_inputs {
            r[i] = Some(R::Skipped);
        }
        for &d in &outcome.duplicate {
            if let Some(&i) = doc_inputs.get(d)
                && r[i].is_none()
            {
                r[i] = Some(R::AllDuplicate);
            }
        }
        for (d, &i) in doc_inputs.iter().enumerate() {
            if outcome.duplicate.binary_search(&d).is_err() && r[i] == Some(R::AllDuplicate) {
                // One document of it was stored by this ingestion.
                r[i] = Some(R::Ok);
            }
        }
        for (d, _) in &outcome.failed {
            if let Some(&i) = doc_inputs.get(*d) {
                r[i] = Some(R::Failed);
            }
        }
        let mut c = Self::default();
        for x in r {
            match x.unwrap_or(R::Ok) {
                R::Ok => c.ok += 1,
                R::AllDuplicate => c.duplicate += 1,
                R::Failed => c.failed += 1,
                R::Skipped => c.skipped += 1,
            }
        }
        c
    }

    fn add_to(&self, rec: &mut FileRecord) {
        rec.records_ok += self.ok;
        rec.records_failed += self.failed;
        rec.records_duplicate += self.duplicate;
        rec.records_skipped += self.skipped;
    }
}

/// The whole file as one input, for `ingest` apps.
/// A file's origin: the prefix of its document ids and its log buckets' ids, from its
/// content, so every run of the same content writes (and finds) the same ones.
fn origin_of(rec: &FileRecord) -> String {
    rec.sha256.get(..16).unwrap_or("0").to_owned()
}

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
            record: FileRecord::staged(
                &t,
                name,
                Format::Csv,
                0,
                String::new(),
                "c".into(),
                String::new(),
            ),
            tenant: t,
            source: None,
            app: None,
            started: false,
            settled: None,
            checkpointed: None,
            unsaved: false,
            warmed: None,
        }
    }

    fn order(s: &Scheduler) -> Vec<String> {
        std::iter::from_fn(|| s.pop())
            .map(|j| j.record.name)
            .collect()
    }

    #[test]
    fn each_record_is_counted_once_by_what_became_of_it() {
        // Records: 0 one doc stored; 1 failed parse; 2 skipped; 3 two docs, one duplicate
        // (ok); 4 two docs both duplicate; 5 two docs, one refused (failed).
        let doc_inputs = [0, 3, 3, 4, 4, 5, 5];
        let outcome = BulkOutcome {
            inserted: 3,
            duplicates: 3,
            failed: vec![(6, "refused".into())],
            duplicate: vec![2, 3, 4],
        };
        let c = RecordCounts::of(6, &doc_inputs, &[1], &[2], &outcome);
        assert_eq!(
            c,
            RecordCounts {
                ok: 2,
                failed: 2,
                duplicate: 1,
                skipped: 1
            }
        );
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
        // A slice of a1 ran; it goes back in line behind the other tenants, and before
        // its tenant's later files.
        assert!(s.others_waiting(&first.tenant), "b and c wait");
        s.resume(first);
        assert_eq!(order(&s), ["b1", "c1", "a1", "a2", "a3"]);
    }

    #[test]
    fn a_lone_tenants_slice_goes_on_while_no_other_tenant_waits() {
        let s = Scheduler::default();
        for n in ["a1", "a2"] {
            s.push(job("a", n));
        }
        let a1 = s.pop().expect("a job");
        assert!(
            !s.others_waiting(&a1.tenant),
            "only a's own later file waits: it comes after a1 anyway"
        );
        s.push(job("b", "b1"));
        assert!(s.others_waiting(&a1.tenant));
    }

    #[test]
    fn the_next_file_is_taken_early_only_when_it_would_run_next_and_goes_back_first() {
        let s = Scheduler::default();
        for n in ["a1", "a2", "a3"] {
            s.push(job("a", n));
        }
        let a1 = s.pop().expect("a job");
        let a2 = s.take_next_of(&a1.tenant).expect("a2 runs next");
        assert_eq!(a2.record.name, "a2");
        // Not run (a1 failed, or the manager stops): first in line again.
        s.put_back(a2);
        assert_eq!(order(&s), ["a2", "a3"]);

        s.push(job("a", "a4"));
        s.push(job("b", "b1"));
        assert!(
            s.take_next_of(&a1.tenant).is_none(),
            "b waits: its turn comes before a's next file"
        );
        assert!(
            s.take_next_of(&TenantName::parse("c").expect("valid"))
                .is_none()
        );
        assert_eq!(order(&s), ["a4", "b1"]);
    }
}
