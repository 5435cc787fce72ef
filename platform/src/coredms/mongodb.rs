//! The in-process coredms: the platform's one MongoDB client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use futures::stream::BoxStream;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{self, DateTime, Document, RawDocumentBuf, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument, WriteConcern};
use mongodb::{Client, Collection, IndexModel};

use super::{
    CoreError, bson_err, buckets, document_entry, entry_document, log_entries, log_id, prepare,
};
use crate::api::{ConsumerTarget, ScalingDecision, StreamCounts};
use crate::config::MongoSettings;
use crate::logs::{LogEntry, LogFilter, Status};
use crate::model::{
    AppKind, BulkOutcome, BulkWrite, FileRecord, FileState, JobRecords, StoredApp, now_us,
};
use crate::tenants::{AdminPatch, Constraints, Profile, TenantName, hash_token, new_token};

const DUPLICATE_KEY: i32 = 11000;
/// How long a verified token is trusted without asking the database again.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(30);
const AUTH_CACHE_MAX: usize = 10_000;
/// BSON bytes one page of documents holds at most (a response is about twice this as JSON).
pub const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;
/// How long a file origin's log lock holds without its holder releasing it (µs): far longer
/// than any bulk write takes; a lock this old belongs to a run that died.
const ORIGIN_LOCK_US: i64 = 60_000_000;

/// Log entries as they are read, one by one.
pub type LogStream = BoxStream<'static, Result<LogEntry, CoreError>>;

pub struct MongoStore {
    client: Client,
    namespace: String,
    write_concern: WriteConcern,
    auth_cache: Mutex<HashMap<String, (TenantName, Instant)>>,
    /// This store's takes of file origins' log locks (see [`Self::lock_origin`]).
    takes: Arc<Mutex<HashMap<String, Take>>>,
}

/// The last take of one origin lock by this store: the run it was for, the token it wrote,
/// and whether a bulk write is under it now.
struct Take {
    job: String,
    token: ObjectId,
    busy: bool,
}

/// An origin lock taken for one bulk write. Dropped after its bulk ended, it stays in the
/// database for the run's next bulk, and is released [`LOCK_IDLE`] after unless taken again
/// since, or unless its run had gone further in the file under it (the lock's `from` beyond
/// this bulk's: a retry of an earlier chunk, or a resumed run, whose later records may be
/// stored and not yet logged). Dropped mid-bulk (cancelled: writes already sent may still
/// land), or after a bulk that failed retryably (its data may be in and its log not), it
/// stays busy and is left to the run's next take (the retry) or to its expiry.
struct OriginLock {
    ended: bool,
    id: String,
    token: ObjectId,
    /// Where this bulk begins in the file (see [`MongoStore::lock_origin`]).
    from: i64,
    takes: Arc<Mutex<HashMap<String, Take>>>,
    locks: Collection<Document>,
}

/// How long an origin lock stays after its run's last bulk: a run's bulks follow each other
/// within it, so each takes the lock with one write and none releases it.
const LOCK_IDLE: Duration = Duration::from_millis(200);
/// How long a lock handed over to a waiting run stays its own without being claimed.
const HANDOVER_US: i64 = 5_000_000;

impl Drop for OriginLock {
    fn drop(&mut self) {
        if !self.ended {
            return;
        }
        if let Ok(mut takes) = self.takes.lock()
            && let Some(t) = takes.get_mut(&self.id)
            && t.token == self.token
        {
            t.busy = false;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (id, token, from, takes, locks) = (
            self.id.clone(),
            self.token,
            self.from,
            self.takes.clone(),
            self.locks.clone(),
        );
        rt.spawn(async move {
            tokio::time::sleep(LOCK_IDLE).await;
            #[cfg(feature = "faults")]
            super::faults::before_idle_release(&id).await;
            let idle = takes.lock().is_ok_and(|mut takes| {
                let idle = takes.get(&id).is_some_and(|t| t.token == token && !t.busy);
                if idle {
                    takes.remove(&id);
                }
                idle
            });
            // The token: a take since (this run's next bulk, through another replica too,
            // or another run's) is not released. `from`: nor is one its run took further.
            let mine = doc! {"_id": &id, "token": token, "from": {"$lte": from}};
            if idle && let Err(e) = locks.delete_one(mine).await {
                tracing::warn!(lock = id, error = %e, "cannot release a log lock; it expires");
            }
        });
    }
}

/// One attempt of a run waiting for an origin lock, by its token. Dropped before it took the
/// lock (it gave up, or its caller went away: a client's HTTP timeout cancels the request),
/// it takes back what it asked for: its `wanted` mark, and the lock where it bears its token
/// (handed over to it and not claimed, or taken by a write that landed after the attempt was
/// cancelled): no write is under such a lock. Left there, either keeps the file's other runs
/// waiting [`HANDOVER_US`] or [`ORIGIN_LOCK_US`] for an attempt that is gone. Keyed by the
/// attempt's token, a late cleanup cannot touch another attempt's mark or lock, even of the
/// same run. A lock its run held already and it took over (`keep`) stays, though: an earlier
/// attempt of the run may still be writing under it, so it is left to the run's next take
/// (its retry) or its expiry.
struct Waiting {
    id: String,
    token: ObjectId,
    locks: Collection<Document>,
    took: bool,
    keep: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.took {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (id, token, locks) = (std::mem::take(&mut self.id), self.token, self.locks.clone());
        let keep = self.keep;
        rt.spawn(async move {
            let unmark = locks
                .update_one(
                    doc! {"_id": &id, "wanted_token": token},
                    doc! {"$unset": {"wanted": "", "wanted_token": ""}},
                )
                .await;
            let unlock = if keep {
                Ok(())
            } else {
                locks
                    .delete_one(doc! {"_id": &id, "token": token})
                    .await
                    .map(drop)
            };
            if let Err(e) = unmark.and(unlock) {
                tracing::warn!(lock = id, error = %e, "cannot withdraw a wait for a log lock");
            }
        });
    }
}

impl MongoStore {
    /// Connects and creates the indexes coredms relies on (idempotent).
    pub async fn connect(
        uri: &str,
        settings: &MongoSettings,
        namespace: &str,
    ) -> Result<Self, CoreError> {
        let mut opts = ClientOptions::parse(uri).await?;
        opts.app_name = Some("mysimbdp".into());
        opts.max_pool_size = Some(settings.max_pool_size);
        opts.server_selection_timeout = Some(Duration::from_millis(settings.connect_timeout_ms));
        opts.connect_timeout = Some(Duration::from_millis(settings.connect_timeout_ms));
        let write_concern = crate::config::write_concern(&settings.write_concern, settings.journal);
        let store = Self {
            client: Client::with_options(opts)?,
            namespace: namespace.to_owned(),
            write_concern,
            auth_cache: Mutex::new(HashMap::new()),
            takes: Arc::default(),
        };
        store.ensure_indexes().await?;
        Ok(store)
    }

    async fn ensure_indexes(&self) -> Result<(), CoreError> {
        let unique = IndexOptions::builder().unique(true).build();
        self.customers()
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"token_sha256": 1})
                    .options(unique)
                    .build(),
            )
            .await?;
        // The log's one secondary index: every entry pays for each index on the write path
        // (on SecantusDB a second index, on `timestamp` alone, cost 15% of batch
        // throughput). Tenant downloads and stream reports use this one; the operator's
        // summary scans, unsorted.
        self.logs()
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"tenant": 1, "timestamp": 1})
                    .build(),
            )
            .await?;
        self.file_status()
            .create_index(IndexModel::builder().keys(doc! {"state": 1}).build())
            .await?;
        Ok(())
    }

    pub fn database_name(&self, tenant: &TenantName) -> String {
        format!("{}tenant_{}", self.namespace, tenant)
    }

    fn customers(&self) -> Collection<Document> {
        self.client
            .database(&format!("{}customers", self.namespace))
            .collection("customers")
    }

    fn apps(&self) -> Collection<Document> {
        self.client
            .database(&format!("{}customers", self.namespace))
            .collection("apps")
    }

    fn file_status(&self) -> Collection<Document> {
        self.client
            .database(&format!("{}customers", self.namespace))
            .collection("files")
    }

    pub fn logs(&self) -> Collection<Document> {
        self.client
            .database(&format!("{}logs", self.namespace))
            .collection("logs")
    }

    /// Locks of file origins' logs (see [`Self::lock_origin`]).
    fn locks(&self) -> Collection<Document> {
        self.client
            .database(&format!("{}logs", self.namespace))
            .collection("locks")
    }

    /// A collection of a tenant's own database: the only way to reach tenant data.
    pub fn tenant_collection(&self, tenant: &TenantName, collection: &str) -> Collection<Document> {
        self.client
            .database(&self.database_name(tenant))
            .collection(collection)
    }

    pub async fn ping(&self) -> Result<(), CoreError> {
        self.client
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await?;
        Ok(())
    }

    pub async fn create_tenant(
        &self,
        name: &TenantName,
        constraints: Constraints,
    ) -> Result<(Profile, String), CoreError> {
        constraints.check().map_err(CoreError::Invalid)?;
        let token = new_token();
        let profile = Profile {
            name: name.clone(),
            database: self.database_name(name),
            constraints,
            auto_ingest: false,
            description: String::new(),
            created_at: crate::model::rfc3339_now(),
        };
        let mut d = bson::to_document(&profile).map_err(bson_err)?;
        d.insert("_id", name.as_str());
        d.insert("token_sha256", hash_token(&token));
        match self
            .customers()
            .insert_one(d)
            .with_options(
                mongodb::options::InsertOneOptions::builder()
                    .write_concern(self.write_concern.clone())
                    .build(),
            )
            .await
        {
            Ok(_) => Ok((profile, token)),
            Err(e) if is_duplicate(&e) => Err(CoreError::TenantExists(name.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn tenant(&self, name: &TenantName) -> Result<Profile, CoreError> {
        let d = self
            .customers()
            .find_one(doc! {"_id": name.as_str()})
            .await?
            .ok_or_else(|| CoreError::TenantNotFound(name.to_string()))?;
        bson::from_document(d).map_err(|e| CoreError::Database(e.to_string()))
    }

    pub async fn update_tenant(
        &self,
        name: &TenantName,
        patch: AdminPatch,
    ) -> Result<Profile, CoreError> {
        let mut set = Document::new();
        if let Some(v) = patch.tenant.auto_ingest {
            set.insert("auto_ingest", v);
        }
        if let Some(v) = patch.tenant.description {
            crate::tenants::check_description(&v).map_err(CoreError::Invalid)?;
            set.insert("description", v);
        }
        if let Some(v) = patch.max_file_bytes {
            crate::config::check_max_file_bytes(v).map_err(CoreError::Invalid)?;
            set.insert("constraints.max_file_bytes", v as i64);
        }
        if let Some(v) = patch.max_staged_files {
            set.insert("constraints.max_staged_files", i64::from(v));
        }
        if let Some(v) = patch.formats {
            set.insert("constraints.formats", bson::to_bson(&v).map_err(bson_err)?);
        }
        if let Some(v) = patch.app_limits {
            // Field by field, so the limits not given stay as they are (and two patches at
            // once each keep theirs).
            v.check().map_err(CoreError::Invalid)?;
            for (key, value) in v.fields() {
                set.insert(format!("constraints.app_limits.{key}"), value as i64);
            }
        }
        if !set.is_empty() {
            let r = self
                .customers()
                .update_one(doc! {"_id": name.as_str()}, doc! {"$set": set})
                .await?;
            if r.matched_count == 0 {
                return Err(CoreError::TenantNotFound(name.to_string()));
            }
        }
        self.tenant(name).await
    }

    pub async fn authenticate(&self, token: &str) -> Result<Option<TenantName>, CoreError> {
        let hash = hash_token(token);
        if let Ok(cache) = self.auth_cache.lock()
            && let Some((t, at)) = cache.get(&hash)
            && at.elapsed() < AUTH_CACHE_TTL
        {
            return Ok(Some(t.clone()));
        }
        let found = self
            .customers()
            .find_one(doc! {"token_sha256": &hash})
            .projection(doc! {"_id": 1})
            .await?;
        let tenant = found
            .and_then(|d| d.get_str("_id").ok().map(str::to_owned))
            .and_then(|n| TenantName::parse(&n).ok());
        if let (Some(t), Ok(mut cache)) = (&tenant, self.auth_cache.lock()) {
            if cache.len() >= AUTH_CACHE_MAX {
                cache.clear();
            }
            cache.insert(hash, (t.clone(), Instant::now()));
        }
        Ok(tenant)
    }

    /// Unordered bulk inserts per collection, then the log entries, so that a retry never
    /// adds an entry: a batch bulk's (it names its file's origin) in a few buckets
    /// ([`buckets`](super::buckets)) under the origin's lock; a stream bulk's one document
    /// each, under an id derived from what it is about ([`log_id`]).
    ///
    /// A document the database already holds is this ingestion's when no other ingestion
    /// logged it as stored (an earlier attempt stopped between the data and the log: the
    /// retry completes it); it is a `duplicate` only when another ingestion stored it.
    /// A document the database would refuse fails alone: it is set aside before the write
    /// ([`prepare`]), or, when the server still rejects a whole insert, the insert is split
    /// until the document that causes it is isolated.
    pub async fn bulk_write(&self, w: &BulkWrite) -> Result<BulkOutcome, CoreError> {
        let Some(origin) = w.origin.as_deref() else {
            return self.bulk_write_entries(w).await;
        };
        let job = w
            .docs
            .first()
            .map(|d| d.input.ingestion())
            .or_else(|| w.unstored.first().map(|u| u.input.ingestion()))
            .unwrap_or_default()
            .to_owned();
        if w.docs.is_empty() {
            // Nothing another run could store too: no lock needed.
            return self.bulk_write_bucketed(w, origin, &job).await;
        }
        let mut lock = self
            .lock_origin(&w.tenant, origin, &job, first_record(w))
            .await?;
        let r = self.bulk_write_bucketed(w, origin, &job).await;
        // A bulk that failed in a way its retry may complete (the database went away, maybe
        // after its data and before its log) keeps the lock for that retry: released idle
        // before it came, another run would find the documents stored and unlogged, and log
        // them as its own.
        lock.ended = !r.as_ref().is_err_and(CoreError::is_retryable);
        r
    }

    /// The data of a bulk write: what became of each document (`Success` until the log says
    /// another ingestion stored it, or `Failure` with its reason), and which documents the
    /// database held already.
    async fn insert_data(
        &self,
        w: &BulkWrite,
    ) -> Result<(Vec<Status>, Vec<Option<String>>, BulkOutcome, Vec<usize>), CoreError> {
        let prepared = prepare(w);
        let mut status = vec![Status::Success; w.docs.len()];
        let mut reasons: Vec<Option<String>> = vec![None; w.docs.len()];
        let mut outcome = BulkOutcome::default();
        let mut rejected = prepared.invalid;
        let mut held = Vec::new();
        for (collection, idx, docs) in prepared.collections {
            let coll = self
                .tenant_collection(&w.tenant, &collection)
                .clone_with_type::<RawDocumentBuf>();
            let results = self.insert_isolating(&coll, &docs).await?;
            for (k, r) in results.into_iter().enumerate() {
                let i = idx[k];
                match r {
                    Inserted::Yes => {}
                    Inserted::Duplicate => held.push(i),
                    Inserted::Rejected(reason) => {
                        rejected.push((i, format!("rejected by the database: {reason}")));
                    }
                }
            }
        }
        for (i, reason) in rejected {
            status[i] = Status::Failure;
            reasons[i] = Some(reason.clone());
            outcome.failed.push((i, reason));
        }
        outcome.failed.sort_by_key(|(i, _)| *i);
        held.sort_unstable();
        #[cfg(feature = "faults")]
        super::faults::before_log(w.tenant.as_str()).await?;
        Ok((status, reasons, outcome, held))
    }

    /// A batch bulk (run `job` of file `origin`): data, then its entries in buckets. Whatever
    /// the run logged already about these records (a retry, a resumed job, a replay) is not
    /// logged again; documents another run of the same file logged as stored are
    /// duplicates. The caller holds the origin's lock, so no other run is between its data
    /// and its log for these documents.
    async fn bulk_write_bucketed(
        &self,
        w: &BulkWrite,
        origin: &str,
        job: &str,
    ) -> Result<BulkOutcome, CoreError> {
        let (mut status, reasons, mut outcome, held) = self.insert_data(w).await?;
        let mut logged = if held.is_empty() && !w.replay {
            None
        } else {
            Some(self.logged(w, origin, job).await?)
        };
        if let Some(l) = &logged {
            for &i in &held {
                let d = &w.docs[i];
                if l.others_stored
                    .contains(&(d.collection.clone(), d.id.clone()))
                {
                    status[i] = Status::Duplicate;
                    outcome.duplicate.push(i);
                }
            }
        }
        let mut entries = super::log_values(w, &status, &reasons);
        // A replay's buckets start where the run's may have: a suffix of their own.
        let mut suffix = if w.replay {
            format!("/r{}", now_us())
        } else {
            String::new()
        };
        for attempt in 0.. {
            if let Some(l) = &logged {
                entries.retain(|e| !l.mine.contains(&buckets::identity(e)));
            }
            let docs = buckets::buckets(w.tenant.as_str(), origin, &entries, &suffix);
            if self.insert_log_entries(docs).await?.is_empty() {
                break;
            }
            // A bucket of these records is there already: an earlier attempt of this bulk
            // logged it. What it holds is not logged again; the rest goes under new ids.
            if attempt > 0 {
                return Err(CoreError::Database(
                    "log buckets collided twice for one bulk".into(),
                ));
            }
            logged = Some(self.logged(w, origin, job).await?);
            suffix = format!("/a{}", now_us());
        }
        outcome.inserted = status.iter().filter(|s| **s == Status::Success).count() as u64;
        outcome.duplicates = outcome.duplicate.len() as u64;
        Ok(outcome)
    }

    /// What the log holds about the records of batch bulk `w`: the entries of run `job`, and
    /// the documents other runs of the file stored. One range query on `_id` per run of
    /// blocks ([`buckets::ranges`]).
    async fn logged(
        &self,
        w: &BulkWrite,
        origin: &str,
        job: &str,
    ) -> Result<buckets::Logged, CoreError> {
        let mut records = Vec::new();
        let mut file = false;
        let inputs = w
            .docs
            .iter()
            .map(|d| &d.input)
            .chain(w.unstored.iter().map(|u| &u.input));
        for input in inputs {
            match input {
                crate::model::InputRef::Record { record, .. } => records.push(*record),
                _ => file = true,
            }
        }
        let mut out = buckets::Logged::default();
        for (from, to) in buckets::ranges(w.tenant.as_str(), origin, &records, file) {
            let mut cursor = self
                .logs()
                .find(doc! {"_id": {"$gte": from, "$lt": to}})
                .await?;
            while let Some(d) = cursor.try_next().await? {
                for e in buckets::expand(d).into_iter().filter_map(buckets::decode) {
                    out.add(job, &e);
                }
            }
        }
        Ok(out)
    }

    /// Takes the lock of a file origin's log for run `job`, waiting while another run holds
    /// it: two runs of the same file must not both find a document stored and neither
    /// logged. A lock not released within [`ORIGIN_LOCK_US`] (its holder died) is taken over;
    /// the same run takes its own over at once (a retry, or its bulk through another
    /// replica). Every take is a write the database checks, with a token of its own; the
    /// lock is not released after the bulk but [`LOCK_IDLE`] after the run's last one, so a
    /// run's next bulk takes it with one conditional update. A run that waits asks for it
    /// (`wanted`): the holder's next bulk hands it over instead of taking it, so runs of the
    /// same file still take turns per bulk; a run that stops waiting takes its request back
    /// ([`Waiting`]).
    ///
    /// The lock holds how far into the file its run's takes have reached (`from`: the
    /// furthest first record of a bulk taken under it; a take of the same run never lowers
    /// it). Only a bulk that begins further on hands the lock over: its run has moved past
    /// every bulk taken before, so none of their writes is still due from an attempt whose
    /// retry it follows. One that does not is a retry overlapping an attempt that may still
    /// be writing (through another replica, too; or a chunk of such a retry, or a resumed
    /// run): it takes the lock over for its own run instead. What this cannot cover: an
    /// attempt still writing after its run's lock was released idle or expired.
    async fn lock_origin(
        &self,
        tenant: &TenantName,
        origin: &str,
        job: &str,
        from: i64,
    ) -> Result<OriginLock, CoreError> {
        let id = format!("{tenant}/{origin}");
        let locks = self.locks();
        let token = ObjectId::new();
        let taken = |busy_token: ObjectId| {
            if let Ok(mut takes) = self.takes.lock() {
                takes.insert(
                    id.clone(),
                    Take {
                        job: job.to_owned(),
                        token: busy_token,
                        busy: true,
                    },
                );
            }
            OriginLock {
                ended: false,
                id: id.clone(),
                token: busy_token,
                from,
                takes: self.takes.clone(),
                locks: locks.clone(),
            }
        };
        let mine = self
            .takes
            .lock()
            .is_ok_and(|t| t.get(&id).is_some_and(|t| t.job == job));
        if mine {
            let renewed = locks
                .update_one(
                    doc! {"_id": &id, "by": job, "wanted": {"$exists": false}},
                    doc! {
                        "$set": {"until_us": now_us() + ORIGIN_LOCK_US, "token": token},
                        "$max": {"from": from},
                        "$unset": {"handed": ""},
                    },
                )
                .await?;
            if renewed.matched_count == 1 {
                return Ok(taken(token));
            }
        }
        let began = Instant::now();
        let mut wait = Duration::from_millis(2);
        let mut waiting = Waiting {
            id: id.clone(),
            token,
            locks: locks.clone(),
            took: false,
            keep: false,
        };
        loop {
            if began.elapsed() > Duration::from_micros(2 * ORIGIN_LOCK_US as u64) {
                return Err(CoreError::Unavailable(format!(
                    "the log of `{origin}` stays locked by another run"
                )));
            }
            let until = now_us() + ORIGIN_LOCK_US;
            waiting.keep = false;
            let inserted = locks
                .insert_one(
                    doc! {"_id": &id, "by": job, "until_us": until, "token": token, "from": from},
                )
                .await;
            match inserted {
                Ok(_) => {
                    waiting.took = true;
                    return Ok(taken(token));
                }
                Err(e) if is_duplicate(&e) => {}
                Err(e) => return Err(e.into()),
            }
            let Some(held) = locks.find_one(doc! {"_id": &id}).await? else {
                continue; // released meanwhile
            };
            // Each change below applies to the lock exactly as read.
            let mut exact = doc! {"_id": &id};
            match held.get("token") {
                Some(t) => exact.insert("token", t.clone()),
                None => exact.insert("token", doc! {"$exists": false}),
            };
            let by = held.get_str("by").unwrap_or_default();
            let wanted = held.get_str("wanted").ok();
            let expired = held.get_i64("until_us").is_ok_and(|u| u < now_us());
            // Handed over to this run by another: its turn, whoever waits now.
            let handed = held.get_bool("handed").unwrap_or(false);
            // A bulk of this run still under it here (a retry overlapping its attempt) keeps it.
            let busy_here = self
                .takes
                .lock()
                .is_ok_and(|t| t.get(&id).is_some_and(|t| t.job == job && t.busy));
            // Taken for a bulk this one does not come after: an attempt of it, here or through
            // another replica, may still be writing. (A lock that says nothing is older.)
            let overlapping = held.get_i64("from").is_ok_and(|f| f >= from);
            if by == job
                && !expired
                && !handed
                && !busy_here
                && !overlapping
                && let Some(other) = wanted.filter(|w| *w != job)
            {
                // Ours since an earlier bulk, and another run waits: its turn, under the
                // token of the attempt that asked (so that it can take back an unclaimed
                // lock), and only while that one still asks.
                let to = held
                    .get_object_id("wanted_token")
                    .unwrap_or_else(|_| ObjectId::new());
                exact.insert("wanted", other);
                locks
                    .update_one(
                        exact,
                        doc! {
                            "$set": {"by": other, "until_us": now_us() + HANDOVER_US, "token": to, "handed": true},
                            "$unset": {"wanted": "", "wanted_token": "", "from": ""},
                        },
                    )
                    .await?;
            } else if by == job || expired {
                let mut set = doc! {"by": job, "until_us": until, "token": token};
                let mut change = doc! {};
                // This run's furthest take stays; another run's (expired) goes.
                if by == job {
                    change.insert("$max", doc! {"from": from});
                } else {
                    set.insert("from", from);
                }
                change.insert("$set", set);
                let mut clear = doc! {"handed": ""};
                if wanted == Some(job) {
                    clear.insert("wanted", "");
                    clear.insert("wanted_token", "");
                }
                change.insert("$unset", clear);
                // Its run's already (not handed to it), and an attempt of the run may still
                // write under it: kept should this attempt go now.
                waiting.keep = by == job && !handed && (overlapping || busy_here);
                if locks.update_one(exact, change).await?.matched_count == 1 {
                    #[cfg(feature = "faults")]
                    super::faults::after_take(tenant.as_str()).await;
                    waiting.took = true;
                    return Ok(taken(token));
                }
                continue; // changed since read
            } else if wanted.is_none() {
                // Another run's: ask for it, whichever of its takes holds it by now.
                locks
                    .update_one(
                        doc! {"_id": &id, "by": {"$ne": job}, "wanted": {"$exists": false}},
                        doc! {"$set": {"wanted": job, "wanted_token": token}},
                    )
                    .await?;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(100));
        }
    }

    /// A stream bulk: data, then one log document per entry.
    async fn bulk_write_entries(&self, w: &BulkWrite) -> Result<BulkOutcome, CoreError> {
        let (mut status, reasons, mut outcome, _held) = self.insert_data(w).await?;
        let logs = log_entries(w, &status, &reasons);
        let existing = self.insert_log_entries(logs).await?;
        // Documents whose `success` entry was there already: whose is it? (Not only those
        // the database already had: two ingestions storing the same document at once may
        // see one insert it and the other claim its entry first.)
        let taken: Vec<usize> = existing
            .into_iter()
            .filter(|&k| k < w.docs.len() && status[k] == Status::Success)
            .collect();
        if !taken.is_empty() {
            let ids: Vec<String> = taken
                .iter()
                .map(|&i| {
                    let d = &w.docs[i];
                    log_id(
                        w.tenant.as_str(),
                        Status::Success,
                        &d.collection,
                        Some(&d.id),
                        &d.input,
                    )
                })
                .collect();
            let mut holders: HashMap<String, String> = HashMap::new();
            let mut cursor = self
                .logs()
                .find(doc! {"_id": {"$in": &ids}})
                .projection(doc! {"ingestion": 1})
                .await?;
            while let Some(d) = cursor.try_next().await? {
                if let Ok(id) = d.get_str("_id") {
                    let by = d.get_str("ingestion").unwrap_or_default();
                    holders.insert(id.to_owned(), by.to_owned());
                }
            }
            for (i, id) in taken.into_iter().zip(&ids) {
                let mine = holders
                    .get(id)
                    .is_some_and(|by| by == w.docs[i].input.ingestion());
                if !mine {
                    status[i] = Status::Duplicate;
                    outcome.duplicate.push(i);
                }
            }
            if !outcome.duplicate.is_empty() {
                let now = (DateTime::now(), now_us());
                let dup: Vec<Document> = outcome
                    .duplicate
                    .iter()
                    .map(|&i| entry_document(&document_entry(w, now, i, Status::Duplicate, None)))
                    .collect();
                self.insert_log_entries(dup).await?;
            }
        }
        outcome.inserted = status.iter().filter(|s| **s == Status::Success).count() as u64;
        outcome.duplicates = outcome.duplicate.len() as u64;
        Ok(outcome)
    }

    /// Inserts log entries unordered; an entry whose id is already in the log was written
    /// before (by a retried attempt, or, for a `success` entry, by whichever ingestion stored
    /// the document) and is left as it is. Returns the indexes of those.
    async fn insert_log_entries(&self, logs: Vec<Document>) -> Result<Vec<usize>, CoreError> {
        if logs.is_empty() {
            return Ok(Vec::new());
        }
        let e = match self
            .logs()
            .insert_many(logs)
            .with_options(
                mongodb::options::InsertManyOptions::builder()
                    .ordered(false)
                    .write_concern(self.write_concern.clone())
                    .build(),
            )
            .await
        {
            Ok(_) => return Ok(Vec::new()),
            Err(e) => e,
        };
        if let ErrorKind::InsertMany(ime) = e.kind.as_ref() {
            let errors = ime.write_errors.as_deref().unwrap_or_default();
            if ime.write_concern_error.is_some()
                || errors.iter().any(|we| super::transient_code(we.code))
            {
                return Err(CoreError::Unavailable(e.to_string()));
            }
            if errors.iter().all(|we| we.code == DUPLICATE_KEY) {
                let mut existing: Vec<usize> = errors.iter().map(|we| we.index).collect();
                existing.sort_unstable();
                return Ok(existing);
            }
        }
        Err(CoreError::from(e))
    }

    /// Inserts `docs` unordered and says what became of each. A rejection of the whole insert
    /// that is not the database being unavailable is narrowed down by halves, so it costs
    /// only the documents that cause it (log2(n) extra round trips per such document).
    fn insert_isolating<'a>(
        &'a self,
        coll: &'a Collection<RawDocumentBuf>,
        docs: &'a [std::borrow::Cow<'a, RawDocumentBuf>],
    ) -> futures::future::BoxFuture<'a, Result<Vec<Inserted>, CoreError>> {
        Box::pin(async move {
            let opts = mongodb::options::InsertManyOptions::builder()
                .ordered(false)
                .write_concern(self.write_concern.clone())
                .build();
            let e = match coll
                .insert_many(docs.iter().map(AsRef::as_ref))
                .with_options(opts)
                .await
            {
                Ok(_) => return Ok(docs.iter().map(|_| Inserted::Yes).collect()),
                Err(e) => e,
            };
            if let ErrorKind::InsertMany(ime) = e.kind.as_ref() {
                if ime.write_concern_error.is_some() {
                    return Err(CoreError::Unavailable(e.to_string()));
                }
                if let Some(errors) = &ime.write_errors {
                    if errors.iter().any(|we| super::transient_code(we.code)) {
                        return Err(CoreError::Unavailable(e.to_string()));
                    }
                    let mut out: Vec<Inserted> = docs.iter().map(|_| Inserted::Yes).collect();
                    for we in errors {
                        if let Some(slot) = out.get_mut(we.index) {
                            *slot = if we.code == DUPLICATE_KEY {
                                Inserted::Duplicate
                            } else {
                                Inserted::Rejected(we.message.clone())
                            };
                        }
                    }
                    return Ok(out);
                }
            }
            let err = CoreError::from(e);
            if err.is_retryable() {
                return Err(err);
            }
            if docs.len() == 1 {
                tracing::warn!(collection = %coll.name(), error = %err, "the database rejected a document");
                return Ok(vec![Inserted::Rejected(err.to_string())]);
            }
            tracing::warn!(collection = %coll.name(), documents = docs.len(), error = %err,
                "the database rejected a whole insert; narrowing it down");
            let (left, right) = docs.split_at(docs.len() / 2);
            let mut out = self.insert_isolating(coll, left).await?;
            out.extend(self.insert_isolating(coll, right).await?);
            Ok(out)
        })
    }

    pub async fn save_app(
        &self,
        tenant: &TenantName,
        kind: AppKind,
        source: &str,
    ) -> Result<u32, CoreError> {
        // Versions are claimed through the unique `_id`: two concurrent uploads get two numbers.
        for _ in 0..16 {
            let version = self
                .active_app(tenant, kind)
                .await?
                .map_or(1, |a| a.version + 1);
            let app = StoredApp {
                tenant: tenant.to_string(),
                kind,
                version,
                source: source.to_owned(),
                created_at: crate::model::rfc3339_now(),
            };
            let mut d = bson::to_document(&app).map_err(bson_err)?;
            d.insert("_id", format!("{tenant}:{}:{version}", kind.as_str()));
            match self.apps().insert_one(d).await {
                Ok(_) => return Ok(version),
                Err(e) if is_duplicate(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CoreError::Unavailable(
            "too many concurrent app uploads".into(),
        ))
    }

    pub async fn active_app(
        &self,
        tenant: &TenantName,
        kind: AppKind,
    ) -> Result<Option<StoredApp>, CoreError> {
        let d = self
            .apps()
            .find_one(doc! {"tenant": tenant.as_str(), "kind": kind.as_str()})
            .sort(doc! {"version": -1})
            .await?;
        d.map(|d| bson::from_document(d).map_err(|e| CoreError::Database(e.to_string())))
            .transpose()
    }

    pub async fn app_version(
        &self,
        tenant: &TenantName,
        kind: AppKind,
        version: u32,
    ) -> Result<Option<StoredApp>, CoreError> {
        let d = self
            .apps()
            .find_one(doc! {"_id": format!("{tenant}:{}:{version}", kind.as_str())})
            .await?;
        d.map(|d| bson::from_document(d).map_err(|e| CoreError::Database(e.to_string())))
            .transpose()
    }

    // ---- file records: every change after staging is a compare-and-set ----

    /// Stages `rec`, a new upload, as the next version of its name (`version` + 1), unless a
    /// job is ingesting the name: then nothing changes and the answer is `Conflict`. Returns
    /// the record it replaced, whose staged copy the caller removes.
    pub async fn stage_file(&self, rec: &FileRecord) -> Result<Option<FileRecord>, CoreError> {
        let id = file_id(&rec.tenant, &rec.name);
        let mut set = bson::to_document(rec).map_err(bson_err)?;
        set.remove("version");
        set.insert("lease", bson::Bson::Null);
        let r = self
            .file_status()
            .find_one_and_update(
                doc! {"_id": &id, "state": {"$ne": FileState::Ingesting.as_str()}},
                doc! {"$set": set, "$inc": {"version": 1_i64}},
            )
            .upsert(true)
            .return_document(ReturnDocument::Before)
            .write_concern(self.write_concern.clone())
            .await;
        match r {
            Ok(prev) => prev.map(decode_file).transpose(),
            // The record exists and is `ingesting`, so the upsert's insert collided.
            Err(e) if is_duplicate(&e) => Err(CoreError::Conflict(format!(
                "file `{}` is being ingested; upload it again when it is done",
                rec.name
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts the job `rec` describes (state `ingesting`, a new `job`, counters cleared) under
    /// a lease of `owner`, if the stored record is still the version `rec` was read at and
    /// not ingesting. False when it lost: another start won, or the name was staged again.
    pub async fn start_file(
        &self,
        rec: &FileRecord,
        owner: &str,
        lease_ms: u64,
    ) -> Result<bool, CoreError> {
        let mut set = bson::to_document(rec).map_err(bson_err)?;
        set.insert("lease", lease_doc(owner, lease_ms));
        let r = self
            .file_status()
            .update_one(
                doc! {
                    "_id": file_id(&rec.tenant, &rec.name),
                    "version": rec.version as i64,
                    "state": {"$ne": FileState::Ingesting.as_str()},
                },
                doc! {"$set": set},
            )
            .write_concern(self.write_concern.clone())
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Stores a running job's progress and renews its lease, if `owner` still holds the job
    /// (same version, same job, still `ingesting`). False when it lost: the job must stop.
    pub async fn checkpoint_file(
        &self,
        rec: &FileRecord,
        owner: &str,
        lease_ms: u64,
    ) -> Result<bool, CoreError> {
        self.update_held(rec, owner, lease_doc(owner, lease_ms))
            .await
    }

    /// Ends a job: `rec` carries its final state (`done` or `failed`) and counts; the lease
    /// goes. False when `owner` no longer held the job, and nothing was written.
    pub async fn finish_file(&self, rec: &FileRecord, owner: &str) -> Result<bool, CoreError> {
        self.update_held(rec, owner, bson::Bson::Null).await
    }

    async fn update_held(
        &self,
        rec: &FileRecord,
        owner: &str,
        lease: bson::Bson,
    ) -> Result<bool, CoreError> {
        let mut set = bson::to_document(rec).map_err(bson_err)?;
        set.insert("lease", lease);
        let r = self
            .file_status()
            .update_one(
                doc! {
                    "_id": file_id(&rec.tenant, &rec.name),
                    "version": rec.version as i64,
                    "job": &rec.job,
                    "state": FileState::Ingesting.as_str(),
                    "lease.owner": owner,
                },
                doc! {"$set": set},
            )
            .write_concern(self.write_concern.clone())
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Claims for `owner`, one at a time, up to `limit` `ingesting` files whose lease has
    /// expired (their manager died or stalled) or that have none (left by a version without
    /// leases). Each claim is atomic: two managers never claim the same file.
    pub async fn claim_files(
        &self,
        owner: &str,
        lease_ms: u64,
        limit: u64,
    ) -> Result<Vec<FileRecord>, CoreError> {
        let mut claimed = Vec::new();
        while (claimed.len() as u64) < limit {
            let d = self
                .file_status()
                .find_one_and_update(
                    doc! {
                        "state": FileState::Ingesting.as_str(),
                        "$or": [{"lease": null}, {"lease.expires_us": {"$lt": now_us()}}],
                    },
                    doc! {"$set": {"lease": lease_doc(owner, lease_ms)}},
                )
                .return_document(ReturnDocument::After)
                .write_concern(self.write_concern.clone())
                .await?;
            match d {
                Some(d) => claimed.push(decode_file(d)?),
                None => break,
            }
        }
        Ok(claimed)
    }

    /// Extends the lease of every job `owner` holds; the number it still holds.
    pub async fn renew_leases(
        &self,
        owner: &str,
        lease_ms: u64,
        files: &[String],
    ) -> Result<u64, CoreError> {
        // Only the jobs it still runs: one it gave up on (its end could not be recorded)
        // must expire, for another manager to claim.
        let r = self
            .file_status()
            .update_many(
                doc! {
                    "_id": {"$in": files},
                    "state": FileState::Ingesting.as_str(),
                    "lease.owner": owner,
                },
                doc! {"$set": {"lease.expires_us": now_us() + lease_ms_us(lease_ms)}},
            )
            .write_concern(self.write_concern.clone())
            .await?;
        Ok(r.matched_count)
    }

    /// Lets go of every job `owner` holds (a manager stopping), so another claims them at
    /// once; their checkpoints stay.
    pub async fn release_leases(&self, owner: &str) -> Result<u64, CoreError> {
        let r = self
            .file_status()
            .update_many(
                doc! {"state": FileState::Ingesting.as_str(), "lease.owner": owner},
                doc! {"$set": {"lease.expires_us": 0_i64}},
            )
            .write_concern(self.write_concern.clone())
            .await?;
        Ok(r.matched_count)
    }

    pub async fn file(
        &self,
        tenant: &TenantName,
        name: &str,
    ) -> Result<Option<FileRecord>, CoreError> {
        let d = self
            .file_status()
            .find_one(doc! {"_id": file_id(tenant.as_str(), name)})
            .await?;
        d.map(decode_file).transpose()
    }

    pub async fn files(&self, tenant: &TenantName) -> Result<Vec<FileRecord>, CoreError> {
        self.find_files(doc! {"tenant": tenant.as_str()}).await
    }

    async fn find_files(&self, filter: Document) -> Result<Vec<FileRecord>, CoreError> {
        let docs: Vec<Document> = self
            .file_status()
            .find(filter)
            .sort(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?;
        docs.into_iter().map(decode_file).collect()
    }

    /// Removes a file's record unless a job is ingesting it (`Conflict`); returns the record
    /// removed (`None`: there was none), whose staged copy the caller removes.
    pub async fn delete_file(
        &self,
        tenant: &TenantName,
        name: &str,
    ) -> Result<Option<FileRecord>, CoreError> {
        let id = file_id(tenant.as_str(), name);
        let gone = self
            .file_status()
            .find_one_and_delete(doc! {"_id": &id, "state": {"$ne": FileState::Ingesting.as_str()}})
            .write_concern(self.write_concern.clone())
            .await?;
        if let Some(d) = gone {
            return Ok(Some(decode_file(d)?));
        }
        match self.file(tenant, name).await? {
            Some(_) => Err(CoreError::Conflict(format!(
                "file `{name}` is being ingested"
            ))),
            None => Ok(None),
        }
    }

    /// What the log says of batch run `job`'s records, folded from its entries: a record is
    /// failed while it has a document failure no later entry of the same document
    /// supersedes, or a record failure and nothing else; otherwise skipped, duplicate
    /// (documents stored by another ingestion only) or ok. Memory: a few bytes per record,
    /// and the failed documents' ids. The log has no index on the run: this reads the
    /// tenant's entries (replays are rare; an index would cost every log write).
    pub async fn job_records(
        &self,
        tenant: &TenantName,
        job: &str,
    ) -> Result<JobRecords, CoreError> {
        #[derive(Default, Clone, Copy)]
        struct Seen {
            any: bool,
            stored: u32,
            duplicate: u32,
            skipped: bool,
            failed: bool,
        }
        let filter = doc! {"tenant": tenant.as_str(), "source": "batch", "ingestion": job};
        // First the documents that failed (few, usually), then every entry: a failed
        // document stays failed unless an entry of the same document says it was stored.
        let mut failed_docs: HashMap<(u64, String), bool> = HashMap::new();
        let mut failures = filter.clone();
        failures.insert(
            "$or",
            vec![
                doc! {"status": "failure"},
                doc! {"statuses": "failure"},
                // Buckets stored before entries were packed.
                doc! {"entries.status": "failure"},
            ],
        );
        let mut cursor = self.logs().find(failures).await?;
        while let Some(d) = cursor.try_next().await? {
            for e in buckets::expand(d).into_iter().filter_map(buckets::decode) {
                if let (Status::Failure, Some(r), Some(d)) = (e.status, e.record, e.document_id) {
                    failed_docs.insert((r, d), true);
                }
            }
        }
        // One small slot per record, by index: records are numbered from 0 in their file.
        let mut records: Vec<Seen> = Vec::new();
        let mut cursor = self.logs().find(filter).batch_size(200).await?;
        while let Some(d) = cursor.try_next().await? {
            for e in buckets::expand(d).into_iter().filter_map(buckets::decode) {
                let Some(record) = e.record.and_then(|r| usize::try_from(r).ok()) else {
                    continue;
                };
                if record >= records.len() {
                    records.resize(record + 1, Seen::default());
                }
                let seen = &mut records[record];
                seen.any = true;
                if let (Status::Success | Status::Duplicate, Some(d)) = (e.status, &e.document_id)
                    && !failed_docs.is_empty()
                    && let Some(failed) = failed_docs.get_mut(&(record as u64, d.clone()))
                {
                    *failed = false;
                }
                match e.status {
                    Status::Success => seen.stored += 1,
                    Status::Duplicate => seen.duplicate += 1,
                    Status::Skipped => seen.skipped = true,
                    Status::Failure if e.document_id.is_none() => seen.failed = true,
                    Status::Failure => {}
                }
            }
        }
        let mut out = JobRecords::default();
        let mut doc_failed: HashMap<u64, u32> = HashMap::new();
        for ((record, _), failed) in failed_docs {
            if failed {
                *doc_failed.entry(record).or_default() += 1;
            }
        }
        let mut settled: Vec<u64> = Vec::new();
        for (record, seen) in records.iter().enumerate() {
            if !seen.any {
                continue;
            }
            let record = record as u64;
            let docs_failed = doc_failed.get(&record).copied().unwrap_or(0);
            out.documents_stored += u64::from(seen.stored);
            out.documents_duplicate += u64::from(seen.duplicate);
            out.documents_failed += u64::from(docs_failed);
            let stored_any = seen.stored + seen.duplicate > 0;
            if docs_failed > 0 || (seen.failed && !stored_any && !seen.skipped) {
                out.records_failed += 1;
                continue;
            }
            if seen.skipped && !stored_any {
                out.records_skipped += 1;
            } else if seen.stored == 0 && seen.duplicate > 0 {
                out.records_duplicate += 1;
            } else {
                out.records_ok += 1;
            }
            settled.push(record);
        }
        settled.sort_unstable();
        for r in settled {
            match out.settled.last_mut() {
                Some((_, end)) if *end == r => *end = r + 1,
                _ => out.settled.push((r, r + 1)),
            }
        }
        Ok(out)
    }

    /// Log entries, a tenant's in time order; callers stream them, never collect them whole.
    /// Buckets are read as their entries.
    pub async fn log_cursor(
        &self,
        tenant: Option<&TenantName>,
        filter: &LogFilter,
    ) -> Result<LogStream, CoreError> {
        let mut q = Document::new();
        if let Some(t) = tenant {
            q.insert("tenant", t.as_str());
        }
        let mut ts = Document::new();
        if let Some(s) = filter.since {
            ts.insert("$gte", s);
        }
        if let Some(u) = filter.until {
            ts.insert("$lt", u);
        }
        if !ts.is_empty() {
            q.insert("timestamp", ts);
        }
        let status = filter.status;
        if let Some(s) = status {
            let s = crate::logs::status_str(s);
            // A stream entry, a bucket, a bucket stored before entries were packed.
            q.insert(
                "$or",
                vec![
                    doc! {"status": s},
                    doc! {"statuses": s},
                    doc! {"entries.status": s},
                ],
            );
        }
        if let Some(s) = filter.source {
            q.insert("source", crate::logs::source_str(s));
        }
        let logs = self.logs();
        let find = logs.find(q);
        // A tenant's entries come in time order (the index gives it; a bucket's entries share
        // their time); all tenants' come in storage order, since sorting the whole log would
        // need the index writes avoid.
        let find = if tenant.is_some() {
            find.sort(doc! {"timestamp": 1})
        } else {
            find
        };
        let cursor = find.batch_size(200).await?;
        let entries = cursor
            .map_err(CoreError::from)
            .map_ok(move |d| {
                let entries = buckets::expand(d)
                    .into_iter()
                    .filter_map(buckets::decode)
                    .filter(move |e| status.is_none_or(|s| e.status == s))
                    .map(Ok);
                futures::stream::iter(entries)
            })
            .try_flatten();
        Ok(Box::pin(entries))
    }

    /// A page of a tenant's documents, in id order: at most `limit`, and no more than
    /// [`MAX_PAGE_BYTES`] of BSON (at least one document), so a page of large documents
    /// cannot take the process's memory.
    pub async fn documents(
        &self,
        tenant: &TenantName,
        collection: &str,
        limit: i64,
        skip: u64,
    ) -> Result<Vec<serde_json::Value>, CoreError> {
        let mut cursor = self
            .tenant_collection(tenant, collection)
            .clone_with_type::<RawDocumentBuf>()
            .find(doc! {})
            .sort(doc! {"_id": 1})
            .skip(skip)
            .limit(limit)
            .await?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(raw) = cursor.try_next().await? {
            bytes += raw.as_bytes().len();
            if bytes > MAX_PAGE_BYTES && !out.is_empty() {
                break;
            }
            out.push(super::to_json(
                raw.to_document()
                    .map_err(|e| CoreError::Database(e.to_string()))?,
            ));
        }
        Ok(out)
    }

    pub async fn count_documents(
        &self,
        tenant: &TenantName,
        collection: &str,
    ) -> Result<u64, CoreError> {
        Ok(self
            .tenant_collection(tenant, collection)
            .count_documents(doc! {})
            .await?)
    }
}

/// How many of a tenant's consumer changes the stream report keeps.
const SCALING_KEPT: i32 = 200;

impl MongoStore {
    /// Tenants' consumer targets and their stream managers' latest changes, one document
    /// per tenant that ever started consumers.
    fn stream_targets_coll(&self) -> Collection<Document> {
        self.client
            .database(&format!("{}customers", self.namespace))
            .collection("stream_targets")
    }

    pub async fn stream_targets(&self) -> Result<Vec<(TenantName, ConsumerTarget)>, CoreError> {
        let mut cursor = self
            .stream_targets_coll()
            .find(doc! {"target": {"$ne": null}})
            .projection(doc! {"target": 1})
            .await?;
        let mut out = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            let (Ok(name), Ok(target)) = (d.get_str("_id"), d.get_document("target")) else {
                continue;
            };
            let (Ok(tenant), Ok(target)) = (
                TenantName::parse(name),
                bson::from_document::<ConsumerTarget>(target.clone()),
            ) else {
                tracing::warn!(tenant = name, "unreadable consumer target ignored");
                continue;
            };
            out.push((tenant, target));
        }
        Ok(out)
    }

    pub async fn stream_target(
        &self,
        tenant: &TenantName,
    ) -> Result<Option<ConsumerTarget>, CoreError> {
        let d = self
            .stream_targets_coll()
            .find_one(doc! {"_id": tenant.as_str()})
            .projection(doc! {"target": 1})
            .await?;
        Ok(d.and_then(|d| d.get_document("target").ok().cloned())
            .and_then(|t| bson::from_document(t).ok()))
    }

    pub async fn set_stream_target(
        &self,
        tenant: &TenantName,
        target: Option<ConsumerTarget>,
    ) -> Result<(), CoreError> {
        let target = match target {
            Some(t) => bson::to_bson(&t).map_err(bson_err)?,
            None => bson::Bson::Null,
        };
        self.stream_targets_coll()
            .update_one(
                doc! {"_id": tenant.as_str()},
                doc! {"$set": {"target": target, "updated_at": DateTime::now()}},
            )
            .upsert(true)
            .write_concern(self.write_concern.clone())
            .await?;
        Ok(())
    }

    pub async fn record_scaling(
        &self,
        tenant: &TenantName,
        decision: ScalingDecision,
    ) -> Result<(), CoreError> {
        let d = bson::to_bson(&decision).map_err(bson_err)?;
        self.stream_targets_coll()
            .update_one(
                doc! {"_id": tenant.as_str()},
                doc! {"$push": {"decisions": {"$each": [d], "$slice": -SCALING_KEPT}}},
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    pub async fn scaling(&self, tenant: &TenantName) -> Result<Vec<ScalingDecision>, CoreError> {
        let Some(d) = self
            .stream_targets_coll()
            .find_one(doc! {"_id": tenant.as_str()})
            .projection(doc! {"decisions": 1})
            .await?
        else {
            return Ok(Vec::new());
        };
        let Ok(list) = d.get_array("decisions") else {
            return Ok(Vec::new());
        };
        Ok(list
            .iter()
            .filter_map(|b| bson::from_bson(b.clone()).ok())
            .collect())
    }

    /// Counted by the database, one group per status. Stream entries are documents of their
    /// own (batch entries are bucketed), so each counts once.
    pub async fn stream_counts(
        &self,
        tenant: &TenantName,
        since_ms: Option<i64>,
    ) -> Result<StreamCounts, CoreError> {
        let mut m = doc! {"tenant": tenant.as_str()};
        if let Some(ms) = since_ms {
            m.insert("timestamp", doc! {"$gte": DateTime::from_millis(ms)});
        }
        m.insert(
            "source",
            crate::logs::source_str(crate::logs::Source::Stream),
        );
        let mut cursor = self
            .logs()
            .aggregate([
                doc! {"$match": m},
                doc! {"$group": {"_id": "$status", "n": {"$sum": 1}}},
            ])
            .await?;
        let mut out = StreamCounts::default();
        while let Some(g) = cursor.try_next().await? {
            let n = match g.get("n") {
                Some(bson::Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
                Some(bson::Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
                Some(bson::Bson::Double(n)) => *n as u64,
                _ => 0,
            };
            match g.get_str("_id").ok().and_then(|s| s.parse::<Status>().ok()) {
                Some(Status::Success) => out.stored += n,
                Some(Status::Duplicate) => out.duplicates += n,
                Some(Status::Failure) => out.failed += n,
                Some(Status::Skipped) => out.skipped += n,
                None => {}
            }
        }
        Ok(out)
    }
}

/// What became of one document of an insert.
enum Inserted {
    Yes,
    /// An earlier attempt stored it.
    Duplicate,
    Rejected(String),
}

fn file_id(tenant: &str, name: &str) -> String {
    format!("{tenant}/{name}")
}

fn decode_file(d: Document) -> Result<FileRecord, CoreError> {
    bson::from_document(d).map_err(|e| CoreError::Database(e.to_string()))
}

fn lease_ms_us(lease_ms: u64) -> i64 {
    i64::try_from(lease_ms.saturating_mul(1000)).unwrap_or(i64::MAX / 2)
}

/// A lease of `owner` from now, on this process's clock: coredms is the one that compares.
fn lease_doc(owner: &str, lease_ms: u64) -> bson::Bson {
    bson::Bson::Document(doc! {"owner": owner, "expires_us": now_us() + lease_ms_us(lease_ms)})
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(we)) => we.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(ime) => ime
            .write_errors
            .as_ref()
            .is_some_and(|w| w.iter().any(|we| we.code == DUPLICATE_KEY)),
        // findAndModify reports it as a command error.
        ErrorKind::Command(ce) => ce.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// Where in its file a batch bulk begins: the first record of its documents (see
/// [`MongoStore::lock_origin`]). Not of its inputs that store nothing: a remote bulk's last
/// chunk carries all of the bulk's, which would put it before the chunks it follows.
fn first_record(w: &BulkWrite) -> i64 {
    w.docs
        .iter()
        .map(|d| &d.input)
        .filter_map(|i| match i {
            crate::model::InputRef::Record { record, .. } => Some(*record),
            _ => None,
        })
        .min()
        .map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX))
}
