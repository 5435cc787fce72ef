//! The ingestion pipeline shared by batch and stream: inputs (parsed records or raw
//! payloads) → the tenant's active app → validated documents and failures → a bulk write
//! through coredms, retried while the database is unavailable → its outcome.
//!
//! Batch and stream both import this module and never each other; the apps runtime below it
//! stays pure (source in, documents or failures out) and knows nothing of coredms or writes.

mod router;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::apps::{AppFailure, AppHandle, Call, Outcome, compile};
use crate::config::AppLimits;
use crate::coredms::{CoreDms, CoreError};
use crate::model::{
    AppKind, BulkOutcome, BulkWrite, DocWrite, InputRef, StoredApp, Unstored, doc_id,
};
use crate::tenants::TenantName;

pub use router::{AppsApi, AppsDoc, router as apps_router};

/// Why the active app of a tenant cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// coredms could not give the stored app.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The stored source no longer compiles (with these limits): the tenant must upload
    /// another version.
    #[error("stored app does not compile: {0}")]
    DoesNotCompile(String),
    /// The compiling task panicked or was cancelled.
    #[error("the app's compile task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// An error [`with_retry`] may wait out: a coredms error, or one that can carry one.
pub trait RetryableError: From<CoreError> + std::fmt::Display {
    /// The database cannot be reached now; trying again later may succeed.
    fn is_retryable(&self) -> bool;
}

impl RetryableError for CoreError {
    fn is_retryable(&self) -> bool {
        CoreError::is_retryable(self)
    }
}

impl RetryableError for AppError {
    fn is_retryable(&self) -> bool {
        matches!(self, Self::Core(e) if e.is_retryable())
    }
}

/// How often the VMs of quiet apps (`platform.idle_vm_ms`) are looked for. A busy tenant's
/// VMs come back every batch and are never dropped.
pub const VM_SWEEP: Duration = Duration::from_secs(1);

/// The compiled, active app of each tenant and kind, refreshed when a new version appears.
#[derive(Default)]
pub struct AppCache {
    apps: Mutex<HashMap<(TenantName, AppKind), Arc<AppHandle>>>,
}

impl AppCache {
    /// The active app for a tenant: compiled once per version, then served from the cache.
    /// `None` when the tenant has not uploaded one (records are stored as parsed).
    pub async fn active(
        &self,
        coredms: &CoreDms,
        tenant: &TenantName,
        kind: AppKind,
        limits: AppLimits,
    ) -> Result<Option<Arc<AppHandle>>, AppError> {
        let Some(stored) = coredms.active_app(tenant, kind).await? else {
            return Ok(None);
        };
        self.handle(tenant, stored, limits).await.map(Some)
    }

    /// Version `version` of a tenant's app, active or not (a resumed job keeps the version
    /// it started with); `None` when there is no such version.
    pub async fn version(
        &self,
        coredms: &CoreDms,
        tenant: &TenantName,
        kind: AppKind,
        version: u32,
        limits: AppLimits,
    ) -> Result<Option<Arc<AppHandle>>, AppError> {
        if let Some(h) = self.cached(tenant, kind, version, limits) {
            return Ok(Some(h));
        }
        let Some(stored) = coredms.app_version(tenant, kind, version).await? else {
            return Ok(None);
        };
        self.handle(tenant, stored, limits).await.map(Some)
    }

    fn cached(
        &self,
        tenant: &TenantName,
        kind: AppKind,
        version: u32,
        limits: AppLimits,
    ) -> Option<Arc<AppHandle>> {
        let h = self
            .apps
            .lock()
            .ok()
            .and_then(|m| m.get(&(tenant.clone(), kind)).cloned())?;
        (h.version == version && *h.limits() == limits).then_some(h)
    }

    /// `stored` compiled with `limits`, from the cache when it holds that version; a newer
    /// version than the cache's replaces it.
    async fn handle(
        &self,
        tenant: &TenantName,
        stored: StoredApp,
        limits: AppLimits,
    ) -> Result<Arc<AppHandle>, AppError> {
        let kind = stored.kind;
        if let Some(h) = self.cached(tenant, kind, stored.version, limits) {
            return Ok(h);
        }
        let version = stored.version;
        let source = stored.source;
        let compiled = tokio::task::spawn_blocking(move || compile(&source, &limits))
            .await
            .map_err(AppError::Task)?
            .map_err(|e| AppError::DoesNotCompile(e.to_string()))?;
        let h = Arc::new(AppHandle::new(
            tenant.clone(),
            kind,
            version,
            compiled,
            limits,
        ));
        if let Ok(mut m) = self.apps.lock() {
            let key = (tenant.clone(), kind);
            if m.get(&key).is_none_or(|old| old.version <= version) {
                m.insert(key, h.clone());
            }
        }
        Ok(h)
    }

    /// Drops the pooled VMs of every app none of whose VMs came back for `idle`; how many.
    pub fn drop_idle_vms(&self, idle: Duration) -> usize {
        let handles: Vec<Arc<AppHandle>> = self
            .apps
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        handles.iter().map(|h| h.drop_idle_vms(idle)).sum()
    }

    /// Every `every`, drops the VMs idle for `idle` (see [`AppCache::drop_idle_vms`]), until
    /// `stop`.
    pub async fn drop_idle_vms_forever(
        self: Arc<Self>,
        every: Duration,
        idle: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            let n = self.drop_idle_vms(idle);
            if n > 0 {
                tracing::debug!(vms = n, "idle app VMs dropped");
            }
        }
    }
}

/// One input to transform: a parsed record (or the reason it could not be parsed), or for
/// `ingest` apps the raw payload as a JSON string.
#[derive(Debug, Clone)]
pub struct Input {
    /// Stable origin of the input (file hash, message id): the prefix of its document ids.
    pub origin: String,
    pub index: u64,
    /// The input's identity in the log.
    pub input: InputRef,
    pub bytes: u64,
    pub started_us: i64,
    pub data_name: String,
    pub value: Result<serde_json::Value, String>,
}

/// Documents to write and inputs that store nothing (to log), with which inputs failed (for
/// dead-lettering) and which the app skipped.
#[derive(Debug, Default)]
pub struct Transformed {
    pub docs: Vec<DocWrite>,
    pub unstored: Vec<Unstored>,
    /// (index into the inputs, reason)
    pub failed_inputs: Vec<(usize, String)>,
    /// Indexes of the inputs the app returned nothing for.
    pub skipped_inputs: Vec<usize>,
    /// For each of `docs`, the index of the input it came from.
    pub doc_inputs: Vec<usize>,
}

struct CountingWriter(usize);

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_size(m: &serde_json::Map<String, serde_json::Value>) -> usize {
    let mut w = CountingWriter(0);
    let _ = serde_json::to_writer(&mut w, m);
    w.0
}

/// Runs the app (or none: records are stored as parsed) over inputs. Blocking.
pub fn transform(
    app: Option<&AppHandle>,
    collection: &str,
    max_doc_bytes: usize,
    inputs: &[Input],
) -> Transformed {
    let mut out = Transformed::default();
    let outcomes: Vec<Outcome> = match app {
        None => inputs
            .iter()
            .map(|i| Outcome {
                result: match &i.value {
                    Ok(serde_json::Value::Object(m)) => Ok(vec![(None, m.clone())]),
                    Ok(_) => Err(AppFailure {
                        reason: "record is not a JSON object (upload an app to map it)".into(),
                        limit: false,
                    }),
                    Err(e) => Err(AppFailure {
                        reason: e.clone(),
                        limit: false,
                    }),
                },
                log: None,
            })
            .collect(),
        Some(app) => {
            // Payloads for `ingest` that are not already text are serialized first, so every
            // call below borrows from the inputs.
            let texts: Vec<Option<String>> = inputs
                .iter()
                .map(|i| match &i.value {
                    Ok(v) if !app.shape.has_map && !v.is_string() => Some(v.to_string()),
                    _ => None,
                })
                .collect();
            let calls = inputs.iter().zip(&texts).filter_map(|(i, text)| {
                let v = i.value.as_ref().ok()?;
                let call = match (v, text) {
                    _ if app.shape.has_map => Call::Map(v),
                    (serde_json::Value::String(raw), _) => Call::Ingest(raw),
                    (_, text) => Call::Ingest(text.as_deref().unwrap_or_default()),
                };
                Some((i.data_name.as_str(), call))
            });
            // One VM for the whole batch: the pool is locked once, not once per record.
            let mut ran = app.run(calls).into_iter();
            inputs
                .iter()
                .map(|i| match &i.value {
                    Err(e) => Outcome {
                        result: Err(AppFailure {
                            reason: e.clone(),
                            limit: false,
                        }),
                        log: None,
                    },
                    // One outcome per call; were one missing, the record fails rather than
                    // pass for skipped.
                    Ok(_) => ran.next().unwrap_or(Outcome {
                        result: Err(AppFailure {
                            reason: "internal error: the app run gave no outcome for this record"
                                .into(),
                            limit: false,
                        }),
                        log: None,
                    }),
                })
                .collect()
        }
    };
    for (n, (input, outcome)) in inputs.iter().zip(outcomes).enumerate() {
        let unstored = |reason: Option<String>| Unstored {
            input: input.input.clone(),
            collection: collection.to_owned(),
            document_id: None,
            reason,
            bytes: input.bytes,
            started_us: input.started_us,
            data_name: Some(input.data_name.clone()),
        };
        let fail = |out: &mut Transformed, reason: String| {
            out.unstored.push(unstored(Some(reason.clone())));
            out.failed_inputs.push((n, reason));
        };
        let docs = match outcome.result {
            Ok(d) => d,
            Err(f) => {
                let reason = match outcome.log {
                    Some(l) => format!("{} (app log: {l})", f.reason),
                    None => f.reason,
                };
                fail(&mut out, reason);
                continue;
            }
        };
        // An app's documents were measured while they were converted; records stored as
        // parsed are measured here.
        if app.is_none() && docs.iter().any(|(_, d)| json_size(d) > max_doc_bytes) {
            fail(
                &mut out,
                format!("document exceeds {max_doc_bytes} bytes limit"),
            );
            continue;
        }
        if docs.is_empty() {
            out.unstored.push(unstored(None));
            out.skipped_inputs.push(n);
            continue;
        }
        let per_doc_bytes = input.bytes / (docs.len().max(1) as u64);
        for (k, (coll, doc)) in docs.into_iter().enumerate() {
            out.doc_inputs.push(n);
            out.docs.push(DocWrite {
                id: doc_id(&input.origin, input.index, k as u32),
                collection: coll.unwrap_or_else(|| collection.to_owned()),
                doc,
                input: input.input.clone(),
                bytes: per_doc_bytes,
                started_us: input.started_us,
                data_name: Some(input.data_name.clone()),
                encoded: None,
            });
        }
    }
    out
}

/// Runs a coredms call; while the database is unavailable, waits with backoff (nothing is
/// acknowledged meanwhile: staged files stay on disk, messages stay in the queue), up to a
/// few minutes. Other errors return at once. Cancelling interrupts a wait, not a call.
pub async fn with_retry<T, E, F, Fut>(cancel: &CancellationToken, mut call: F) -> Result<T, E>
where
    E: RetryableError,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    use backon::{ExponentialBuilder, Retryable};
    // 100 ms, doubling, at most 5 s between tries; no new wait after 300 s.
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(5))
        .without_max_times();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let stop = cancel.clone();
    let mut tried = false;
    let attempt = || {
        // A wait cut short by cancelling ends the retries without another call.
        let shutting_down = std::mem::replace(&mut tried, true) && cancel.is_cancelled();
        let call = (!shutting_down).then(&mut call);
        async move {
            match call {
                Some(call) => call.await,
                None => Err(CoreError::Unavailable("shutting down".into()).into()),
            }
        }
    };
    attempt
        .retry(backoff)
        .sleep(move |delay| {
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {}
                }
            }
        })
        .when(|e| e.is_retryable() && !cancel.is_cancelled() && tokio::time::Instant::now() < deadline)
        .notify(|e, delay| {
            tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database unavailable, retrying");
        })
        .await
}

/// A bulk write through coredms, retried while the database is unavailable.
pub async fn write_with_retry(
    coredms: &CoreDms,
    write: BulkWrite,
    cancel: &CancellationToken,
) -> Result<BulkOutcome, CoreError> {
    with_retry(cancel, || coredms.bulk_write(&write)).await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn inputs(values: Vec<Result<serde_json::Value, String>>) -> Vec<Input> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, value)| Input {
                origin: "h".into(),
                index: i as u64,
                input: InputRef::Record {
                    job: "j".into(),
                    record: i as u64,
                    line: None,
                },
                bytes: 5,
                started_us: 0,
                data_name: "f".into(),
                value,
            })
            .collect()
    }

    fn app(src: &str) -> AppHandle {
        let limits = AppLimits {
            time_ms: 200,
            ..AppLimits::default()
        };
        let c = compile(src, &limits).expect("app compiles");
        AppHandle::new(
            TenantName::parse("alice").expect("valid"),
            AppKind::Batch,
            1,
            c,
            limits,
        )
    }

    #[test]
    fn transform_without_app_stores_objects_and_fails_the_rest() {
        let inputs = inputs(vec![
            Ok(json!({"a": 1})),
            Ok(json!([1])),
            Err("line 3: bad".to_owned()),
        ]);
        let t = transform(None, "c", 1000, &inputs);
        assert_eq!(t.docs.len(), 1);
        assert_eq!(t.docs[0].id, "h:0");
        assert_eq!(t.failed_inputs.len(), 2);
        assert_eq!(t.unstored[1].reason.as_deref(), Some("line 3: bad"));
    }

    #[test]
    fn transform_keeps_each_outcome_with_its_input_around_parse_errors_and_limits() {
        // Record 2 loops until the time limit: its VM is discarded, and the records after it
        // still run (on a fresh VM) and keep their own ids.
        let a = app("function map(r) if r.spin then while true do end end return {n = r.n} end");
        let inputs = inputs(vec![
            Ok(json!({"n": 0})),
            Err("line 2: bad".to_owned()),
            Ok(json!({"n": 2, "spin": true})),
            Ok(json!({"n": 3})),
        ]);
        let t = transform(Some(&a), "c", 1 << 20, &inputs);
        let ids: Vec<&str> = t.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["h:0", "h:3"]);
        assert_eq!(t.docs[1].doc.get("n"), Some(&json!(3)));
        assert_eq!(t.doc_inputs, [0, 3]);
        let failed: Vec<usize> = t.failed_inputs.iter().map(|(n, _)| *n).collect();
        assert_eq!(failed, [1, 2]);
        assert_eq!(t.failed_inputs[0].1, "line 2: bad");
        assert!(
            t.failed_inputs[1].1.contains("time"),
            "reason: {}",
            t.failed_inputs[1].1
        );
    }

    #[test]
    fn an_input_the_app_returns_nothing_for_is_skipped_once_and_fan_outs_keep_their_input() {
        let a = app("function map(r) if r.n == 1 then return nil end \
             if r.n == 2 then return {{n = 20}, {n = 21}} end return {n = r.n} end");
        let inputs = inputs(vec![
            Ok(json!({"n": 0})),
            Ok(json!({"n": 1})),
            Ok(json!({"n": 2})),
        ]);
        let t = transform(Some(&a), "c", 1 << 20, &inputs);
        assert!(t.failed_inputs.is_empty(), "{:?}", t.failed_inputs);
        assert_eq!(t.skipped_inputs, [1]);
        assert_eq!(t.unstored.len(), 1);
        assert_eq!(t.unstored[0].reason, None);
        assert_eq!(t.unstored[0].input, inputs[1].input);
        let ids: Vec<&str> = t.docs.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["h:0", "h:2", "h:2:1"]);
        assert_eq!(t.doc_inputs, [0, 2, 2]);
        assert_eq!(t.docs[2].input, inputs[2].input);
    }

    #[test]
    fn transform_gives_ingest_apps_text_as_it_is_and_other_values_as_json() {
        let a = app("function ingest(t, name, data) emit({data = data}) end");
        let inputs = inputs(vec![Ok(json!("a,b\n1,2")), Ok(json!({"k": 1}))]);
        let t = transform(Some(&a), "c", 1 << 20, &inputs);
        assert!(t.failed_inputs.is_empty(), "{:?}", t.failed_inputs);
        let data: Vec<&serde_json::Value> = t.docs.iter().map(|d| &d.doc["data"]).collect();
        assert_eq!(data, [&json!("a,b\n1,2"), &json!("{\"k\":1}")]);
    }

    /// Calls `with_retry` on a call that fails with `errors` in turn, then succeeds; returns
    /// the result and the instants of the calls.
    async fn retried(
        cancel: &CancellationToken,
        errors: Vec<CoreError>,
    ) -> (Result<u32, CoreError>, Vec<tokio::time::Instant>) {
        let errors = Mutex::new(errors.into_iter());
        let calls = Mutex::new(Vec::new());
        let r = with_retry(cancel, || {
            calls
                .lock()
                .expect("calls")
                .push(tokio::time::Instant::now());
            let next = errors.lock().expect("errors").next();
            async move { next.map_or(Ok(7), Err) }
        })
        .await;
        (r, calls.into_inner().expect("calls"))
    }

    #[tokio::test]
    async fn with_retry_waits_100_ms_doubling_while_the_database_is_unavailable() {
        let unavailable = || CoreError::Unavailable("down".into());
        let (r, calls) = retried(
            &CancellationToken::new(),
            vec![unavailable(), unavailable(), unavailable()],
        )
        .await;
        assert_eq!(r.expect("the fourth call succeeds"), 7);
        let gaps: Vec<u128> = calls
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(gaps.len(), 3, "{gaps:?}");
        for (gap, want) in gaps.iter().zip([100, 200, 400]) {
            assert!(*gap >= want, "waited {gap} ms, want {want}: {gaps:?}");
        }
        assert!(gaps[0] < gaps[2], "the wait grows: {gaps:?}");
    }

    #[tokio::test]
    async fn with_retry_returns_other_errors_at_once() {
        let (r, calls) = retried(
            &CancellationToken::new(),
            vec![CoreError::Database("bad".into())],
        )
        .await;
        assert!(matches!(r, Err(CoreError::Database(_))), "{r:?}");
        assert_eq!(calls.len(), 1);
    }

    #[tokio::test]
    async fn cancelling_ends_a_wait_without_another_call() {
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let cancelled = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let at = tokio::time::Instant::now();
            stop.cancel();
            at
        });
        let errors = (0..100)
            .map(|_| CoreError::Unavailable("down".into()))
            .collect();
        let (r, calls) = tokio::time::timeout(Duration::from_secs(10), retried(&cancel, errors))
            .await
            .expect("cancelling ends the retries");
        assert!(matches!(r, Err(CoreError::Unavailable(_))), "{r:?}");
        // Calls at 0, 100 and 300 ms (later on a stalled machine); the cancel at 500 ms cuts
        // the wait it falls in short, and no call follows it.
        let cancelled = cancelled.await.expect("the cancel ran");
        assert!(
            calls.iter().all(|c| *c < cancelled),
            "a call after the cancel: {calls:?}, cancelled at {cancelled:?}"
        );
        assert!(calls.len() >= 2, "it retried before the cancel: {calls:?}");
    }

    #[tokio::test]
    async fn with_retry_waits_out_an_unavailable_database_behind_an_app_error_only() {
        let cancel = CancellationToken::new();
        let mut calls = 0;
        let r: Result<(), AppError> = with_retry(&cancel, || {
            calls += 1;
            let e = if calls == 1 {
                AppError::Core(CoreError::Unavailable("down".into()))
            } else {
                AppError::DoesNotCompile("line 1: syntax".into())
            };
            async move { Err(e) }
        })
        .await;
        assert_eq!(calls, 2, "retried the outage, not the compile error");
        // The reason a tenant reads, word for word as when it was a CoreError::Invalid.
        assert_eq!(
            r.expect_err("does not compile").to_string(),
            "stored app does not compile: line 1: syntax"
        );
    }
}
