use mysimbdp::coredms::MongoStore;
use mysimbdp::logs::Source;
use mysimbdp::model::{BulkOutcome, BulkWrite, DocWrite, InputRef, doc_id, now_us};
use mysimbdp::tenants::TenantName;
use reqwest::Method;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::TestApp;
use crate::harness::patch;
use mysimbdp::api::LogEntry;
use mysimbdp::logs::Status;
use mysimbdp::tenants::AdminPatch;

#[tokio::test]
async fn tenants_are_created_read_and_modified_with_clear_errors() {
    let app = TestApp::spawn().await;
    let (name, alice) = app.tenant("alice").await;
    let p = alice.tenant(&name).await.expect("own profile");
    assert_eq!(p.database, format!("{}tenant_alice", app.namespace));
    assert_eq!(p.constraints.max_staged_files, 100);
    let raw = alice
        .get(&format!("/v1/tenants/{name}"))
        .await
        .expect("own profile");
    assert!(
        raw.get("token_sha256").is_none(),
        "the token hash never leaves coredms"
    );

    let p = alice
        .patch_tenant(
            &name,
            &patch(json!({"description": "water data", "auto_ingest": true})),
        )
        .await
        .expect("tenant edits its profile");
    assert_eq!(
        (p.description.as_str(), p.auto_ingest),
        ("water data", true)
    );
    let e = alice
        .patch_tenant(&name, &patch(json!({"max_file_bytes": 1})))
        .await
        .expect_err("limits are the admin's");
    assert_eq!(e.status(), Some(reqwest::StatusCode::FORBIDDEN));
    let p = app
        .admin
        .patch_tenant(&name, &patch(json!({"max_file_bytes": 1024})))
        .await
        .expect("admin changes limits");
    assert_eq!(p.constraints.max_file_bytes, 1024);

    let e = app
        .admin
        .create_tenant("alice", AdminPatch::default())
        .await
        .expect_err("duplicate");
    assert_eq!(e.status(), Some(reqwest::StatusCode::CONFLICT));
    let e = app
        .admin
        .create_tenant("Bad/Name", AdminPatch::default())
        .await
        .expect_err("invalid");
    assert_eq!(e.status(), Some(reqwest::StatusCode::BAD_REQUEST));
    assert!(e.to_string().contains("[a-z0-9][a-z0-9_-]{0,31}"), "{e}");
    let e = alice
        .create_tenant("bob", AdminPatch::default())
        .await
        .expect_err("tenants cannot create tenants");
    assert_eq!(e.status(), Some(reqwest::StatusCode::FORBIDDEN));

    let bad = app
        .admin
        .raw(
            Method::POST,
            "/v1/tenants",
            Some("application/json"),
            "{not json",
        )
        .await
        .expect("answer");
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .expect("json error")
            .contains("invalid JSON")
    );
    let wrong_type = app
        .admin
        .raw(Method::POST, "/v1/tenants", Some("text/plain"), "{}")
        .await
        .expect("answer");
    assert_eq!(wrong_type.status, 415);
}

#[tokio::test]
async fn concurrent_creation_of_one_name_yields_exactly_one_tenant() {
    let app = TestApp::spawn().await;
    let attempts = (0..8).map(|_| app.admin.create_tenant("same", AdminPatch::default()));
    let results = futures::future::join_all(attempts).await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(|r| {
            r.as_ref().err().and_then(|e| e.status()) == Some(reqwest::StatusCode::CONFLICT)
        })
        .count();
    assert_eq!((created, conflicts), (1, 7));
}

/// How a bulk's log is kept: a batch bulk (a file's records, `origin` set) in buckets, a
/// stream bulk (messages) one document per entry. The log's promises hold for both.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Stream,
    Batch,
}

impl Shape {
    /// A tenant name of this shape's own.
    fn tenant(self, name: &str) -> String {
        match self {
            Self::Stream => format!("{name}s"),
            Self::Batch => format!("{name}b"),
        }
    }
}

/// `n` documents `feed:<i>` of one ingestion, as a stream bulk (messages) or as a batch bulk
/// (records of a file run `ingestion`).
fn bulk_shaped(tenant: &TenantName, ingestion: &str, n: u64, shape: Shape) -> BulkWrite {
    let mut w = bulk_of(tenant, ingestion, n);
    if let Shape::Batch = shape {
        w.source = Source::Batch;
        w.origin = Some("feed".into());
        for (i, d) in w.docs.iter_mut().enumerate() {
            d.input = InputRef::Record {
                job: ingestion.to_owned(),
                record: i as u64,
                line: Some(i as u64 + 2),
            };
        }
    }
    w
}

fn bulk_of(tenant: &TenantName, ingestion: &str, n: u64) -> BulkWrite {
    BulkWrite {
        tenant: tenant.clone(),
        source: Source::Stream,
        data_name: "gen".into(),
        app_version: None,
        docs: (0..n)
            .map(|i| DocWrite {
                id: doc_id("feed", i, 0),
                collection: "items".into(),
                doc: json!({"i": i, "s": format!("item {i}")})
                    .as_object()
                    .cloned()
                    .expect("object"),
                input: InputRef::Message {
                    id: ingestion.to_owned(),
                },
                bytes: 20,
                started_us: now_us(),
                data_name: None,
                encoded: None,
            })
            .collect(),
        unstored: vec![],
        origin: None,
        replay: false,
    }
}

#[tokio::test]
async fn a_bulk_write_of_10000_documents_is_stored_and_logged_once_and_only_another_ingestion_is_a_duplicate()
 {
    let app = TestApp::spawn().await;
    for shape in [Shape::Stream, Shape::Batch] {
        bulk_write_of_10000(&app, shape).await;
    }
}

async fn bulk_write_of_10000(app: &TestApp, shape: Shape) {
    let (name, alice) = app.tenant(&shape.tenant("bulk")).await;
    let store = store(app).await;
    let tenant = TenantName::parse(&name).expect("valid");
    let write = bulk_shaped(&tenant, "first", 10_000, shape);
    let first = store.bulk_write(&write).await.expect("first write");
    assert_eq!((first.inserted, first.duplicates), (10_000, 0));
    // The same ingestion again (a retry after a lost answer): nothing new, in data or log.
    let again = store.bulk_write(&write).await.expect("retried write");
    assert_eq!((again.inserted, again.duplicates), (10_000, 0));
    // Another ingestion of the same documents: the tenant sent them again.
    let other = store
        .bulk_write(&bulk_shaped(&tenant, "second", 10_000, shape))
        .await
        .expect("second ingestion");
    assert_eq!((other.inserted, other.duplicates), (0, 10_000));
    assert_eq!(other.duplicate.len(), 10_000);
    assert_eq!(app.count(&name, "items").await, 10_000);
    let logs = app.logs(&alice, &name, "").await;
    assert_eq!(logs.len(), 20_000, "{shape:?}");
    let of = |status: Status, by: &str| {
        logs.iter()
            .filter(|e| e.status == status && e.ingestion.as_deref() == Some(by))
            .count()
    };
    assert_eq!(
        (
            of(Status::Success, "first"),
            of(Status::Duplicate, "second")
        ),
        (10_000, 10_000)
    );
    let docs = alice
        .documents(&name, "items", 5, 0)
        .await
        .expect("read back");
    assert_eq!(docs.total, 10_000);
    assert_eq!(docs.documents.len(), 5);
}

#[tokio::test]
async fn a_write_stopped_between_the_data_and_the_log_is_completed_by_its_retry_as_success() {
    let app = TestApp::spawn().await;
    for shape in [Shape::Stream, Shape::Batch] {
        write_stopped_between_data_and_log(&app, shape).await;
    }
}

async fn write_stopped_between_data_and_log(app: &TestApp, shape: Shape) {
    let (name, alice) = app.tenant(&shape.tenant("halfway")).await;
    let store = store(app).await;
    let tenant = TenantName::parse(&name).expect("valid");
    let write = bulk_shaped(&tenant, "m1", 500, shape);
    mysimbdp::coredms::faults::stall_before_log(&name);
    let stalled = tokio::time::timeout(Duration::from_secs(20), store.bulk_write(&write)).await;
    assert!(stalled.is_err(), "the fault stops the write: {stalled:?}");
    assert_eq!(app.count(&name, "items").await, 500, "the data is written");
    assert!(
        app.logs(&alice, &name, "").await.is_empty(),
        "the log is not"
    );
    let retry = store.bulk_write(&write).await.expect("retry");
    assert_eq!((retry.inserted, retry.duplicates), (500, 0), "{retry:?}");
    let logs = app.logs(&alice, &name, "").await;
    assert_eq!(logs.len(), 500, "{shape:?}");
    // Again (a second retry): nothing new.
    let again = store.bulk_write(&write).await.expect("second retry");
    assert_eq!((again.inserted, again.duplicates), (500, 0), "{again:?}");
    assert_eq!(app.logs(&alice, &name, "").await.len(), 500, "{shape:?}");
    assert!(
        logs.iter().all(|e| e.status == Status::Success),
        "{:?}",
        logs[0]
    );
}

#[tokio::test]
async fn another_tenant_sees_nothing_and_names_do_not_leak() {
    let app = TestApp::spawn().await;
    let (a, alice) = app.tenant("alice").await;
    let (_b, bob) = app.tenant("bob").await;
    alice
        .upload_file(&a, "x.ndjson", "{\"v\":1}\n")
        .await
        .expect("alice stages a file");
    let paths = [
        (Method::GET, format!("/v1/tenants/{a}")),
        (Method::PATCH, format!("/v1/tenants/{a}")),
        (Method::GET, format!("/v1/tenants/{a}/logs")),
        (
            Method::GET,
            format!("/v1/tenants/{a}/collections/x/documents"),
        ),
        (Method::GET, format!("/v1/tenants/{a}/files")),
        (Method::GET, format!("/v1/tenants/{a}/files/x.ndjson")),
        (Method::PUT, format!("/v1/tenants/{a}/files/y.ndjson")),
        (
            Method::POST,
            format!("/v1/tenants/{a}/files/x.ndjson/ingest"),
        ),
        (Method::PUT, format!("/v1/tenants/{a}/apps/batch")),
        (Method::POST, format!("/v1/tenants/{a}/messages")),
        (Method::POST, format!("/v1/tenants/{a}/stream/start")),
        (Method::GET, format!("/v1/tenants/{a}/stream/report")),
    ];
    let nobody = app.admin.with_token(None);
    let forged = app.admin.with_token(Some(
        "msb_0000000000000000000000000000000000000000000000000000000000000000",
    ));
    for (m, path) in &paths {
        let r = bob
            .raw(m.clone(), path, Some("application/json"), "{}")
            .await
            .expect("answer");
        assert_eq!(r.status, 404, "bob on {m} {path}");
        let missing = path.replace(&format!("/{a}"), "/nosuchtenant");
        let r2 = bob
            .raw(m.clone(), &missing, Some("application/json"), "{}")
            .await
            .expect("answer");
        assert_eq!(r2.status, 404, "bob on {m} {missing}");
        assert_eq!(
            r.json()["error"].as_str().map(|s| s.replace(&a, "T")),
            r2.json()["error"]
                .as_str()
                .map(|s| s.replace("nosuchtenant", "T")),
            "the answer for an existing tenant is the same as for none"
        );
        let r = nobody
            .raw(m.clone(), path, Some("application/json"), "{}")
            .await
            .expect("answer");
        assert_eq!(r.status, 401, "no token on {m} {path}");
        let r = forged
            .raw(m.clone(), path, Some("application/json"), "{}")
            .await
            .expect("answer");
        assert_eq!(r.status, 401, "forged token on {m} {path}");
    }
    let e = bob
        .summary("")
        .await
        .expect_err("analytics are the admin's");
    assert_eq!(e.status(), Some(reqwest::StatusCode::FORBIDDEN));
}

#[tokio::test]
async fn the_log_download_is_a_json_file_of_the_tenants_entries_only() {
    let app = TestApp::spawn().await;
    let (a, alice) = app.tenant("alice").await;
    let (b, bob) = app.tenant("bob").await;
    alice
        .upload_file(&a, "a.ndjson", "{\"v\":1}\n{\"v\":2}\nnot json\n")
        .await
        .expect("stage");
    bob.upload_file(&b, "b.ndjson", "{\"v\":1}\n")
        .await
        .expect("stage");
    alice.ingest(&a, "a.ndjson").await.expect("ingest");
    bob.ingest(&b, "b.ndjson").await.expect("ingest");
    for (c, t, f) in [(&alice, &a, "a.ndjson"), (&bob, &b, "b.ndjson")] {
        let s = c
            .wait_for_file(t, f, std::time::Duration::from_secs(60))
            .await
            .expect("status");
        assert_eq!(s.state.as_str(), "done", "{s:?}");
    }
    let r = alice.logs_raw(&a, "").await.expect("download");
    let cd = r
        .headers
        .get("content-disposition")
        .expect("attachment header");
    assert!(cd.to_str().expect("ascii").starts_with("attachment"));
    let entries: Vec<LogEntry> = r.into_typed().expect("a JSON array of log entries");
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().all(|e| e.tenant == a));
    let failures = app.logs(&alice, &a, "status=failure").await;
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0]
            .reason
            .as_deref()
            .expect("reason")
            .starts_with("line 3: invalid JSON")
    );
    let none = app.logs(&alice, &a, "since=2999-01-01T00:00:00Z").await;
    assert!(none.is_empty());
    let bad = alice
        .logs(&a, "since=yesterday")
        .await
        .expect_err("bad time");
    assert_eq!(bad.status(), Some(reqwest::StatusCode::BAD_REQUEST));

    let s = app.admin.summary("bucket_s=3600").await.expect("summary");
    let count = |t: &str, st: Status| -> u64 {
        s.groups
            .iter()
            .filter(|g| g.tenant == t && g.status == st)
            .map(|g| g.count)
            .sum()
    };
    assert_eq!(
        (
            count(&a, Status::Success),
            count(&a, Status::Failure),
            count(&b, Status::Success)
        ),
        (2, 1, 1)
    );
}

#[tokio::test]
async fn two_ingestions_storing_the_same_documents_at_once_log_one_success_and_one_duplicate_each()
{
    let app = TestApp::spawn().await;
    for shape in [Shape::Stream, Shape::Batch] {
        two_ingestions_at_once(&app, shape).await;
    }
}

async fn two_ingestions_at_once(app: &TestApp, shape: Shape) {
    let (name, alice) = app.tenant(&shape.tenant("race")).await;
    let store = store(app).await;
    let tenant = TenantName::parse(&name).expect("valid");
    for round in 0..3 {
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        let (wa, wb) = (
            bulk_shaped(&tenant, &a, 2000, shape),
            bulk_shaped(&tenant, &b, 2000, shape),
        );
        let (ra, rb) = tokio::join!(store.bulk_write(&wa), store.bulk_write(&wb));
        let (ra, rb) = (ra.expect("a"), rb.expect("b"));
        if round == 0 {
            assert_eq!(ra.inserted + rb.inserted, 2000, "{shape:?} {ra:?} {rb:?}");
            assert_eq!(ra.duplicates + rb.duplicates, 2000);
        } else {
            assert_eq!((ra.inserted, rb.inserted), (0, 0), "stored before");
        }
        let logs = app.logs(&alice, &name, "").await;
        for by in [a.as_str(), b.as_str()] {
            let mine: Vec<_> = logs
                .iter()
                .filter(|e| e.ingestion.as_deref() == Some(by))
                .collect();
            assert_eq!(
                mine.len(),
                2000,
                "each ingestion names every document once: {by}"
            );
        }
    }
    let logs = app.logs(&alice, &name, "").await;
    let success: std::collections::HashSet<_> = logs
        .iter()
        .filter(|e| e.status == Status::Success)
        .map(|e| e.document_id.clone())
        .collect();
    assert_eq!(success.len(), 2000, "one success entry per document");
    assert_eq!(
        logs.iter().filter(|e| e.status == Status::Success).count(),
        2000
    );
}

/// A coredms store of its own on the test's database (as another replica would have).
async fn store(app: &TestApp) -> MongoStore {
    MongoStore::connect(
        &app.settings.mongodb.uri,
        &app.settings.mongodb,
        &app.namespace,
    )
    .await
    .expect("store")
}

/// The file origins' log locks.
async fn locks(app: &TestApp) -> mongodb::Collection<mongodb::bson::Document> {
    app.mongo()
        .await
        .database(&format!("{}logs", app.namespace))
        .collection("locks")
}

/// The lock of tenant `name`'s file origin `feed` as it is now (empty when there is none).
async fn feed_lock(
    locks: &mongodb::Collection<mongodb::bson::Document>,
    name: &str,
) -> mongodb::bson::Document {
    locks
        .find_one(mongodb::bson::doc! {"_id": format!("{name}/feed")})
        .await
        .expect("read")
        .unwrap_or_default()
}

type BulkTask = tokio::task::JoinHandle<Result<BulkOutcome, mysimbdp::coredms::CoreError>>;

/// `w` written through `store` in a task of its own.
fn spawn_bulk(store: &Arc<MongoStore>, w: BulkWrite) -> BulkTask {
    let store = store.clone();
    tokio::spawn(async move { store.bulk_write(&w).await })
}

/// Run x's retry of `w` through `store`: it never waits for a lock's expiry.
async fn retry_via(store: &MongoStore, w: &BulkWrite) -> BulkOutcome {
    tokio::time::timeout(Duration::from_secs(30), store.bulk_write(w))
        .await
        .expect("the retry does not wait for an expiry")
        .expect("retry")
}

/// Run y's bulk, which waited for x's retry.
async fn turn_after_the_retry(y: BulkTask) -> BulkOutcome {
    tokio::time::timeout(Duration::from_secs(30), y)
        .await
        .expect("y gets its turn after the retry")
        .expect("y's task")
        .expect("y's bulk")
}

/// Bulk `k` (records 300k..300k+300) of run `job` of the file origin `feed`.
fn slice_of(tenant: &TenantName, job: &str, k: u64) -> BulkWrite {
    let mut w = bulk_shaped(tenant, job, 1200, Shape::Batch);
    w.docs.drain(..(300 * k) as usize);
    w.docs.truncate(300);
    w
}

#[tokio::test]
async fn two_runs_of_one_file_through_two_replicas_take_turns_and_log_each_document_once() {
    let app = TestApp::spawn().await;
    let (name, alice) = app.tenant("turns").await;
    let tenant = TenantName::parse(&name).expect("valid");
    let (one, two) = (store(&app).await, store(&app).await);
    // Run x alternates between the two stores (its lock is taken over by its own run);
    // run y, of the same file, writes through the second one at the same time.
    let done = std::sync::Mutex::new(Vec::new());
    let x = async {
        for k in 0..4 {
            let store = if k % 2 == 0 { &one } else { &two };
            store
                .bulk_write(&slice_of(&tenant, "x", k))
                .await
                .expect("x");
            done.lock().expect("order").push("x");
        }
    };
    let y = async {
        for k in 0..4 {
            two.bulk_write(&slice_of(&tenant, "y", k)).await.expect("y");
            done.lock().expect("order").push("y");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(x, y) })
        .await
        .expect("neither run waits for an expiry");
    // The lock stays with a run between its bulks, but one that waits gets the next turn.
    let done = done.into_inner().expect("order");
    assert!(
        done[..4].iter().any(|r| *r != done[0]),
        "the runs take turns, not whole files: {done:?}"
    );
    let logs = app.logs(&alice, &name, "").await;
    for run in ["x", "y"] {
        let mine: std::collections::HashSet<_> = logs
            .iter()
            .filter(|e| e.ingestion.as_deref() == Some(run))
            .map(|e| e.document_id.clone())
            .collect();
        assert_eq!(mine.len(), 1200, "run {run} names every document");
    }
    assert_eq!(logs.len(), 2400, "each run logs each document once");
    let success: std::collections::HashSet<_> = logs
        .iter()
        .filter(|e| e.status == Status::Success)
        .map(|e| e.document_id.clone())
        .collect();
    assert_eq!(success.len(), 1200);
    assert_eq!(
        logs.iter().filter(|e| e.status == Status::Success).count(),
        1200,
        "one success entry per document"
    );
    // Idle, the lock is released (well before its 60 s expiry): a third run is not kept
    // waiting.
    let locks = locks(&app).await;
    let mine = mongodb::bson::doc! {"_id": {"$regex": format!("^{name}/")}};
    assert!(
        crate::harness::eventually(Duration::from_secs(20), || async {
            locks.count_documents(mine.clone()).await.expect("count") == 0
        })
        .await,
        "released once idle"
    );
}

#[tokio::test]
async fn a_retry_through_another_replica_keeps_its_files_lock_from_a_waiting_run() {
    let app = TestApp::spawn().await;
    // The retried bulk first, then the second of two (as the second chunk of a bulk sent in
    // chunks, whose retry sends the first again before it).
    for k in [0, 1] {
        retry_keeps_the_lock(&app, k).await;
    }
}

/// Run x writes its bulks up to `k` through one replica, and its attempt at bulk `k` hangs
/// between its data and its log; run y waits for bulk `k` of the same file through another
/// replica; x retries its bulks from the first through that replica.
async fn retry_keeps_the_lock(app: &TestApp, k: u64) {
    let (name, alice) = app.tenant(&format!("overlap{k}")).await;
    let tenant = TenantName::parse(&name).expect("valid");
    let (one, two) = (Arc::new(store(app).await), Arc::new(store(app).await));
    let locks = locks(app).await;
    let lock = || feed_lock(&locks, &name);
    for before in 0..k {
        one.bulk_write(&slice_of(&tenant, "x", before))
            .await
            .expect("x");
    }
    // The attempt that hangs: its caller gives up on it and retries through another replica.
    mysimbdp::coredms::faults::stall_before_log(&name);
    let first = spawn_bulk(&one, slice_of(&tenant, "x", k));
    let stored = 300 * (k + 1);
    assert!(
        crate::harness::eventually(Duration::from_secs(20), || async {
            app.count(&name, "items").await == stored
        })
        .await,
        "the first attempt stores its documents"
    );
    let y = spawn_bulk(&two, slice_of(&tenant, "y", k));
    assert!(
        crate::harness::eventually(Duration::from_secs(20), || async {
            lock().await.get_str("wanted") == Ok("y")
        })
        .await,
        "y asks for the lock: {:?}",
        lock().await
    );
    // Not y's turn yet at any of these: the first attempt may still be writing. (Each bulk
    // of the retry takes the lock from the one before: the machine's speed is not tested.)
    mysimbdp::coredms::faults::hold_idle_locks(&name, true);
    let mut retry = None;
    for again in 0..=k {
        retry = Some(retry_via(&two, &slice_of(&tenant, "x", again)).await);
    }
    mysimbdp::coredms::faults::hold_idle_locks(&name, false);
    let retry = retry.expect("retried");
    let y = turn_after_the_retry(y).await;
    first.abort();
    assert_eq!(
        (retry.inserted, retry.duplicates, y.inserted, y.duplicates),
        (300, 0, 0, 300),
        "bulk {k}: the run that stored the documents is the one credited"
    );
    let logs = app.logs(&alice, &name, "").await;
    let of = |run: &str, status: Status| {
        logs.iter()
            .filter(|e| e.ingestion.as_deref() == Some(run) && e.status == status)
            .count()
    };
    assert_eq!(
        (of("x", Status::Success), of("y", Status::Duplicate)),
        (stored as usize, 300),
        "bulk {k}: x stored them, y found them stored"
    );
    assert_eq!(
        logs.len(),
        stored as usize + 300,
        "bulk {k}: each run logs each document once"
    );
}

#[tokio::test]
async fn a_retry_cancelled_as_it_took_its_runs_lock_over_leaves_the_lock_to_its_run() {
    let app = TestApp::spawn().await;
    let (name, alice) = app.tenant("cancelled").await;
    let tenant = TenantName::parse(&name).expect("valid");
    let (one, two) = (Arc::new(store(&app).await), Arc::new(store(&app).await));
    let locks = locks(&app).await;
    let lock = || feed_lock(&locks, &name);
    // x's first attempt hangs between its data and its log; y waits and asks.
    mysimbdp::coredms::faults::stall_before_log(&name);
    let first = spawn_bulk(&one, slice_of(&tenant, "x", 0));
    assert!(
        crate::harness::eventually(Duration::from_secs(20), || async {
            app.count(&name, "items").await == 300
        })
        .await,
        "the first attempt stores its documents"
    );
    let y = spawn_bulk(&two, slice_of(&tenant, "y", 0));
    assert!(
        crate::harness::eventually(Duration::from_secs(20), || async {
            lock().await.get_str("wanted") == Ok("y")
        })
        .await,
        "y asks for the lock"
    );
    // x's retry takes its run's lock over and is cancelled right then (its caller's
    // timeout): the lock stays x's, for the first attempt may still write under it.
    mysimbdp::coredms::faults::stall_after_take(&name);
    let cancelled = spawn_bulk(&two, slice_of(&tenant, "x", 0));
    assert!(
        crate::harness::eventually(Duration::from_secs(30), || async {
            mysimbdp::coredms::faults::stalled_after_take(&name)
        })
        .await,
        "the retry takes the lock over"
    );
    cancelled.abort();
    assert!(cancelled.await.is_err_and(|e| e.is_cancelled()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = lock().await;
    assert_eq!(
        held.get_str("by"),
        Ok("x"),
        "the cancelled retry left its run's lock: {held:?}"
    );
    assert!(!y.is_finished(), "y still waits");
    // The next retry goes through; then y's turn.
    let retry = retry_via(&two, &slice_of(&tenant, "x", 0)).await;
    let y = turn_after_the_retry(y).await;
    first.abort();
    assert_eq!(
        (retry.inserted, retry.duplicates, y.inserted, y.duplicates),
        (300, 0, 0, 300),
        "the run that stored the documents is the one credited"
    );
    assert_eq!(app.logs(&alice, &name, "").await.len(), 600);
}

#[tokio::test]
async fn a_bulk_that_failed_after_its_data_keeps_its_files_lock_for_its_retry() {
    let app = TestApp::spawn().await;
    // The bulk retried through the same replica; then the second of two chunks, retried
    // from the first through another replica, slower than the lock's idle release.
    for k in [0, 1] {
        failed_bulk_keeps_the_lock(&app, k).await;
    }
}

/// Run x writes its bulks up to `k` through one replica; bulk `k` stores its documents and
/// fails before its log. Run y waits for bulk `k` of the same file. x retries from bulk 0.
async fn failed_bulk_keeps_the_lock(app: &TestApp, k: u64) {
    let (name, alice) = app.tenant(&format!("failed{k}")).await;
    let tenant = TenantName::parse(&name).expect("valid");
    let (one, two) = (Arc::new(store(app).await), Arc::new(store(app).await));
    for before in 0..k {
        one.bulk_write(&slice_of(&tenant, "x", before))
            .await
            .expect("x");
    }
    mysimbdp::coredms::faults::fail_before_log(&name);
    let failed = one.bulk_write(&slice_of(&tenant, "x", k)).await;
    assert!(
        failed.as_ref().is_err_and(|e| e.is_retryable()),
        "{failed:?}"
    );
    let stored = 300 * (k + 1);
    assert_eq!(
        app.count(&name, "items").await,
        stored,
        "the data is written"
    );
    // y asks for the file while x's retry waits out its backoff (longer than the lock's
    // idle release).
    let y = spawn_bulk(&two, slice_of(&tenant, "y", k));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!y.is_finished(), "bulk {k}: y waits for x's retry");
    let mut retry = None;
    for again in 0..=k {
        let via = if k == 0 { &one } else { &two };
        retry = Some(retry_via(via, &slice_of(&tenant, "x", again)).await);
        if again < k {
            // The next chunk comes later than the idle release.
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!y.is_finished(), "bulk {k}: y waits for all of x's retry");
        }
    }
    let retry = retry.expect("retried");
    let y = turn_after_the_retry(y).await;
    assert_eq!(
        (retry.inserted, retry.duplicates, y.inserted, y.duplicates),
        (300, 0, 0, 300),
        "bulk {k}: the run that stored the documents is the one credited"
    );
    assert_eq!(
        app.logs(&alice, &name, "").await.len(),
        stored as usize + 300
    );
}

#[tokio::test]
async fn a_runs_last_chunk_carrying_its_failures_lets_its_files_lock_go_when_idle() {
    let app = TestApp::spawn().await;
    let (name, _alice) = app.tenant("lastchunk").await;
    let tenant = TenantName::parse(&name).expect("valid");
    let store = store(&app).await;
    // A bulk of records 300..900 sent in two chunks, its first record failed: the last
    // chunk carries the bulk's inputs that store nothing, so it holds record 300.
    let mut first = slice_of(&tenant, "x", 1);
    first.docs.remove(0);
    store.bulk_write(&first).await.expect("first chunk");
    let mut last = slice_of(&tenant, "x", 2);
    last.unstored.push(mysimbdp::model::Unstored {
        input: InputRef::Record {
            job: "x".into(),
            record: 300,
            line: Some(302),
        },
        collection: "items".into(),
        document_id: None,
        reason: Some("not a number".into()),
        bytes: 20,
        started_us: now_us(),
        data_name: None,
    });
    store.bulk_write(&last).await.expect("last chunk");
    // The run is over: its lock goes after the idle time, not at its 60 s expiry.
    let locks = locks(&app).await;
    let mine = mongodb::bson::doc! {"_id": format!("{name}/feed")};
    assert!(
        crate::harness::eventually(Duration::from_secs(10), || async {
            locks.count_documents(mine.clone()).await.expect("count") == 0
        })
        .await,
        "released once idle: {:?}",
        locks.find_one(mine.clone()).await
    );
}

#[tokio::test]
async fn a_run_that_stops_waiting_for_a_files_lock_takes_its_request_back() {
    use mongodb::bson::{doc, oid::ObjectId};
    let app = TestApp::spawn().await;
    let (name, _alice) = app.tenant("gone").await;
    let tenant = TenantName::parse(&name).expect("valid");
    let locks = locks(&app).await;
    let id = format!("{name}/feed");
    let lock = || async { locks.find_one(doc! {"_id": &id}).await.expect("read") };
    let holder = store(&app).await;
    // The waiter goes away while it waits; then right after the lock was handed over to it
    // (as the holder's next bulk does), before it claimed it. Should it claim the lock in
    // the moment between the two (its bulk is then cancelled under it, and the lock left to
    // expire, as documented), that attempt is set aside and the case tried again.
    let mut attempts = 0;
    for (round, hand_over) in [false, true].into_iter().enumerate() {
        loop {
            attempts += 1;
            assert!(
                attempts <= 6,
                "the waiter claimed the handed lock every time"
            );
            let (x, y) = (format!("x{attempts}"), format!("y{attempts}"));
            // Run x holds the file's lock, as between two of its bulks.
            locks
                .insert_one(doc! {"_id": &id, "by": &x, "until_us": now_us() + 60_000_000, "token": ObjectId::new()})
                .await
                .expect("lock");
            // Run y waits for it, through another replica, until its caller goes away.
            let waiter = store(&app).await;
            let w = slice_of(&tenant, &y, 0);
            let waiting = tokio::spawn(async move { waiter.bulk_write(&w).await });
            let asked = crate::harness::eventually(Duration::from_secs(20), || async {
                lock()
                    .await
                    .is_some_and(|l| l.get_str("wanted").ok() == Some(y.as_str()))
            })
            .await;
            assert!(asked, "y asks for the lock");
            if hand_over {
                // As x's next bulk does: under the token of y's attempt that asked.
                let asking = lock()
                    .await
                    .and_then(|l| l.get_object_id("wanted_token").ok())
                    .expect("the asking attempt's token");
                locks
                    .update_one(
                        doc! {"_id": &id, "by": &x, "wanted": &y},
                        doc! {"$set": {"by": &y, "until_us": now_us() + 5_000_000, "token": asking, "handed": true}, "$unset": {"wanted": "", "wanted_token": ""}},
                    )
                    .await
                    .expect("hand over");
            }
            waiting.abort();
            let _ = waiting.await;
            let withdrawn = crate::harness::eventually(Duration::from_secs(10), || async {
                lock().await.is_none_or(|l| {
                    l.get_str("wanted").is_err() && l.get_str("by").ok() != Some(y.as_str())
                })
            })
            .await;
            if !withdrawn {
                let l = lock().await.expect("held");
                let claimed = l.get_str("by").ok() == Some(y.as_str())
                    && l.get_bool("handed").is_err()
                    && l.get_str("wanted").is_err();
                assert!(
                    hand_over && claimed,
                    "round {round}: y's request is taken back: {l:?}"
                );
                locks.delete_one(doc! {"_id": &id}).await.expect("clear");
                continue;
            }
            // x's next bulk takes the lock itself: nothing is handed to a run that is gone
            // (which would hold x for 5 s). Watched while it runs.
            let handed_to_y = std::sync::atomic::AtomicBool::new(false);
            let next_bulk = slice_of(&tenant, &x, 1);
            let bulk = holder.bulk_write(&next_bulk);
            let watch = async {
                loop {
                    if lock()
                        .await
                        .is_some_and(|l| l.get_str("by").ok() == Some(y.as_str()))
                    {
                        handed_to_y.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let next = tokio::time::timeout(Duration::from_secs(60), async {
                tokio::select! {
                    r = bulk => r,
                    () = watch => unreachable!("the watch never ends"),
                }
            })
            .await;
            assert!(next.is_ok_and(|r| r.is_ok()), "round {round}: x's bulk");
            assert!(
                !handed_to_y.load(std::sync::atomic::Ordering::Relaxed),
                "round {round}: x handed its lock to a run that is gone"
            );
            assert!(
                crate::harness::eventually(Duration::from_secs(20), || async {
                    lock().await.is_none()
                })
                .await,
                "released once idle"
            );
            break;
        }
    }
}
