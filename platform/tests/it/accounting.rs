//! Every input accounted for in the log, exactly once: records the app drops, fans out or
//! fails, parse errors and refused documents, across re-ingestion and across a crash
//! between the data and the log.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use mysimbdp::api::LogEntry;
use mysimbdp::logs::Status;
use mysimbdp::model::{FileRecord, FileState};

use crate::harness::{TestApp, eventually};

/// Drops every record with `i % 10 == 3`, fans out `5` into two documents, fails `7` in the
/// app, and makes one record in a thousand a document no database stores (refused as the
/// app's output is read).
const APP: &str = r#"
function map(r)
    local m = r.i % 10
    if r.i % 1000 == 1 then return { ["$refused"] = 1 } end
    if m == 3 then return nil end
    if m == 5 then return { { i = r.i, k = 0 }, { i = r.i, k = 1 } } end
    if m == 7 then error("record " .. r.i .. " is bad") end
    return { i = r.i }
end
"#;

/// 10,000 NDJSON lines; one in a thousand (`i % 1000 == 999`) is not JSON.
fn file() -> String {
    (0..10_000)
        .map(|i| {
            if i % 1000 == 999 {
                "{not json\n".to_owned()
            } else {
                format!("{{\"i\": {i}}}\n")
            }
        })
        .collect()
}

/// What each record should become: (stored documents, skipped, failed).
fn expected(i: u64) -> (u64, bool, bool) {
    match (i % 1000, i % 10) {
        (999, _) | (1, _) => (0, false, true),
        (_, 3) => (0, true, false),
        (_, 5) => (2, false, false),
        (_, 7) => (0, false, true),
        _ => (1, false, false),
    }
}

/// Checks one run's log entries (`ingestion` = the file's job) against the file: every
/// record appears, as its documents' entries or one skipped/failed entry, and no entry
/// twice. `stored` is the status its documents' entries must have.
fn check_run(entries: &[&LogEntry], stored: Status) {
    let mut per_record: BTreeMap<u64, Vec<&LogEntry>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for e in entries {
        let record = e.record.unwrap_or_else(|| panic!("no record: {e:?}"));
        assert_eq!(e.line, Some(record + 1), "{e:?}");
        let key = (e.status, record, e.document_id.clone());
        assert!(seen.insert(key), "an entry written twice: {e:?}");
        per_record.entry(record).or_default().push(e);
    }
    assert_eq!(per_record.len(), 10_000, "every record appears in the log");
    for (record, es) in per_record {
        let statuses: Vec<Status> = es.iter().map(|e| e.status).collect();
        match expected(record) {
            (_, true, _) => assert_eq!(statuses, [Status::Skipped], "record {record}"),
            (_, _, true) => assert_eq!(statuses, [Status::Failure], "record {record}: {es:?}"),
            (n, _, _) => {
                assert_eq!(statuses, vec![stored; n as usize], "record {record}");
                assert!(
                    es.iter()
                        .all(|e| e.document_id.is_some() && e.collection == "acc"),
                    "{es:?}"
                );
            }
        }
    }
}

/// A file's counters: records ok, skipped, failed, duplicate; documents stored, duplicate,
/// failed.
fn counts(f: &FileRecord) -> [u64; 7] {
    [
        f.records_ok,
        f.records_skipped,
        f.records_failed,
        f.records_duplicate,
        f.documents_stored,
        f.documents_duplicate,
        f.documents_failed,
    ]
}

#[tokio::test]
async fn every_record_of_a_file_is_in_the_log_once_and_the_counts_match_the_file() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("acct").await;
    c.upload_app(&t, "batch", APP).await.expect("app");
    c.upload_file(&t, "acc.ndjson", file())
        .await
        .expect("stage");
    c.ingest(&t, "acc.ndjson").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "acc.ndjson", Duration::from_secs(300))
        .await
        .expect("status");
    // Skipped 1,000 (i % 10 == 3); failed 1,000 in the app, 10 not JSON, 10 refused;
    // stored 7,980 records as 8,980 documents (1,000 fan-outs of two).
    assert_eq!(f.state, FileState::Done, "{f:?}");
    assert_eq!(counts(&f), [7980, 1000, 1020, 0, 8980, 0, 0], "{f:?}");
    assert_eq!(f.next_record, 10_000);
    assert_eq!(app.count(&t, "acc").await, 8980);
    let first_job = f.job.clone();

    let log = app.logs(&c, &t, "").await;
    let run: Vec<&LogEntry> = log
        .iter()
        .filter(|e| e.ingestion.as_deref() == Some(first_job.as_str()))
        .collect();
    assert_eq!(run.len(), log.len(), "only this run's entries");
    assert_eq!(log.len(), 8980 + 1000 + 1020);
    check_run(&run, Status::Success);
    let refused: Vec<&&LogEntry> = run
        .iter()
        .filter(|e| e.record.is_some_and(|r| r % 1000 == 1))
        .collect();
    assert!(
        refused
            .iter()
            .all(|e| e.reason.as_deref().is_some_and(|r| r.contains("$refused"))),
        "{refused:?}"
    );

    // The tenant sends the same file again: its documents are duplicates, logged under the
    // new run, and the first run's entries stay as they were.
    c.ingest(&t, "acc.ndjson").await.expect("ingest again");
    assert!(
        eventually(Duration::from_secs(300), || async {
            c.file(&t, "acc.ndjson")
                .await
                .is_ok_and(|f| f.state == FileState::Done && f.job != first_job)
        })
        .await
    );
    let f = c.file(&t, "acc.ndjson").await.expect("status");
    assert_eq!(counts(&f), [0, 1000, 1020, 7980, 0, 8980, 0], "{f:?}");
    let log = app.logs(&c, &t, "").await;
    assert_eq!(log.len(), 2 * (8980 + 1000 + 1020));
    let second: Vec<&LogEntry> = log
        .iter()
        .filter(|e| e.ingestion.as_deref() == Some(f.job.as_str()))
        .collect();
    check_run(&second, Status::Duplicate);
    assert_eq!(app.count(&t, "acc").await, 8980);
}

/// Each stored document has exactly one `success` entry, and nothing else was logged.
async fn one_success_per_document(app: &TestApp, t: &str, collection: &str, n: u64) {
    let log = app.logs(&app.admin, t, "").await;
    let docs: Vec<&str> = log
        .iter()
        .filter(|e| e.collection == collection)
        .map(|e| {
            assert_eq!(e.status, Status::Success, "{e:?}");
            e.document_id.as_deref().expect("document id")
        })
        .collect();
    let distinct: HashSet<&str> = docs.iter().copied().collect();
    assert_eq!((docs.len(), distinct.len()), (n as usize, n as usize));
    assert_eq!(app.count(t, collection).await, n);
}

#[tokio::test]
async fn a_platform_killed_between_the_data_and_the_log_ends_with_one_success_per_document() {
    // Batch: the job's first bulk stores its documents, then the process dies before their
    // log entries; the resumed job writes the same documents again and must log them as
    // this ingestion's successes, not as duplicates.
    let mut app = TestApp::spawn_with(&["batch.batch_size=500", "batch.lease_ms=2000"]).await;
    let (t, c) = app.tenant("halt").await;
    let rows: String = (0..3000).map(|i| format!("{{\"i\": {i}}}\n")).collect();
    c.upload_file(&t, "rows.ndjson", rows).await.expect("stage");
    mysimbdp::coredms::faults::stall_before_log(&t);
    c.ingest(&t, "rows.ndjson").await.expect("ingest");
    let reached = eventually(Duration::from_secs(60), || async {
        app.count(&t, "rows").await >= 500
    })
    .await;
    assert!(reached, "the first bulk reaches the database");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        app.logs(&c, &t, "").await.is_empty(),
        "stopped before the log"
    );
    app.kill();
    let app = app.restart().await;
    let f = app
        .admin
        .wait_for_file(&t, "rows.ndjson", Duration::from_secs(120))
        .await
        .expect("status");
    assert_eq!(
        (f.state, f.records_ok, f.records_duplicate),
        (FileState::Done, 3000, 0),
        "{f:?}"
    );
    one_success_per_document(&app, &t, "rows", 3000).await;

    // Stream: the same between a batch of messages' documents and their log entries; the
    // messages, never acked, come back to the restarted platform.
    let mut app = app;
    let c = app.admin.clone();
    let msgs: String = (0..300).map(|i| format!("{{\"m\": {i}}}\n")).collect();
    c.publish(&t, "m", msgs).await.expect("publish");
    mysimbdp::coredms::faults::stall_before_log(&t);
    c.stream_start(&t, 1).await.expect("start");
    let reached = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await > 0
    })
    .await;
    assert!(reached, "the first batch reaches the database");
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.kill();
    let app = app.restart().await;
    let c = app.admin.clone();
    c.stream_start(&t, 1).await.expect("start again");
    let all = eventually(Duration::from_secs(120), || async {
        app.logs(&app.admin, &t, "").await.len() >= 3300
    })
    .await;
    assert!(all, "every message logged");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.stream_stop(&t).await.expect("stop");
    one_success_per_document(&app, &t, "messages", 300).await;
    one_success_per_document(&app, &t, "rows", 3000).await;
}

#[tokio::test]
async fn dead_letters_replayed_after_an_app_fix_are_stored_once_and_logged_once() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("replay").await;
    c.upload_app(
        &t,
        "stream",
        r#"function map(r) if r.bad then error("cannot read " .. r.n) end return { n = r.n } end"#,
    )
    .await
    .expect("app v1");
    let body: String = (0..100)
        .map(|n| format!("{{\"n\": {n}, \"bad\": {}}}\n", n % 10 == 0))
        .collect();
    c.publish(&t, "reading", body).await.expect("publish");
    c.stream_start(&t, 1).await.expect("start");
    let logged = eventually(Duration::from_secs(60), || async {
        app.logs(&c, &t, "").await.len() >= 100
    })
    .await;
    assert!(logged, "every message logged");
    // Their failure entries are written before they reach the dead-letter queue.
    let all_dead = eventually(Duration::from_secs(30), || async {
        c.dead_letters(&t, 100)
            .await
            .is_ok_and(|dl| dl.dead_letters.len() == 10)
    })
    .await;
    assert!(all_dead, "ten dead letters");

    // Listing leaves them where they are.
    for _ in 0..2 {
        let dl = c.dead_letters(&t, 100).await.expect("list");
        assert_eq!(dl.dead_letters.len(), 10, "{dl:?}");
        assert!(!dl.more);
        assert!(
            dl.dead_letters.iter().all(|l| l
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("cannot read"))
                && l.message_id.is_some()
                && l.data_name.as_deref() == Some("reading")),
            "{dl:?}"
        );
    }
    let r = c
        .raw(
            reqwest::Method::GET,
            &format!("/v1/tenants/{t}/dead-letters?limit=0"),
            None,
            "",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "{:?}", r.json());

    // The tenant fixes its app, then replays; running consumers pick the new version up
    // within a second or so (an idle consumer asks coredms every half second once its app
    // is a second old): three seconds leave room for a lookup slowed by a loaded database.
    c.upload_app(
        &t,
        "stream",
        "function map(r) return { n = r.n, fixed = true } end",
    )
    .await
    .expect("app v2");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let r = c.replay_dead_letters(&t, 1000).await.expect("replay");
    assert_eq!(r.replayed, 10, "{r:?}");
    let stored = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await >= 100
    })
    .await;
    assert!(stored, "stored {}", app.count(&t, "messages").await);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(app.count(&t, "messages").await, 100);
    let log = app.logs(&c, &t, "").await;
    assert_eq!(log.len(), 110, "100 successes and the 10 first failures");
    let mut by_message: BTreeMap<&str, Vec<Status>> = BTreeMap::new();
    for e in &log {
        by_message
            .entry(e.message_id.as_deref().expect("message id"))
            .or_default()
            .push(e.status);
    }
    assert_eq!(by_message.len(), 100);
    let fixed = [Status::Failure, Status::Success];
    let replayed = by_message
        .values()
        .filter(|s| s.as_slice() == fixed)
        .count();
    assert_eq!(replayed, 10, "{by_message:?}");
    assert!(
        by_message
            .values()
            .all(|s| s.as_slice() == [Status::Success] || s.as_slice() == fixed)
    );
    let dl = c.dead_letters(&t, 100).await.expect("list");
    assert!(dl.dead_letters.is_empty(), "{dl:?}");
    let r = c.replay_dead_letters(&t, 1000).await.expect("replay again");
    assert_eq!(r.replayed, 0);
    c.stream_stop(&t).await.expect("stop");
}

#[tokio::test]
async fn a_file_replayed_after_an_app_fix_ingests_its_failed_records_only_under_its_run() {
    let app = TestApp::spawn_with(&["batch.batch_size=300"]).await;
    let (t, c) = app.tenant("refile").await;
    let v1 = "function map(r) if r.i % 7 == 0 then error('bad ' .. r.i) end \
              if r.i % 10 == 3 then return nil end return { i = r.i } end";
    let v2 = "function map(r) if r.i % 10 == 3 then return nil end return { i = r.i, v = 2 } end";
    c.upload_app(&t, "batch", v1).await.expect("app v1");
    let not_json = |i: u64| i % 500 == 499;
    let body: String = (0..2000)
        .map(|i| {
            if not_json(i) {
                "{oops\n".to_owned()
            } else {
                format!("{{\"i\": {i}}}\n")
            }
        })
        .collect();
    // What each record should be: failed, skipped or ok, with v1 and then with v2.
    let outcome = |i: u64, fixed: bool| -> Status {
        if not_json(i) || (!fixed && i % 7 == 0) {
            Status::Failure
        } else if i % 10 == 3 {
            Status::Skipped
        } else {
            Status::Success
        }
    };
    let expect = |fixed: bool| {
        let n = |s| (0..2000).filter(|&i| outcome(i, fixed) == s).count() as u64;
        (n(Status::Success), n(Status::Skipped), n(Status::Failure))
    };
    let r = c.replay_file(&t, "nothing.ndjson").await;
    assert!(r.is_err(), "no such file: {r:?}");
    c.upload_file(&t, "r.ndjson", body).await.expect("stage");
    let r = c.replay_file(&t, "r.ndjson").await;
    assert_eq!(
        r.as_ref().err().and_then(|e| e.status()),
        Some(reqwest::StatusCode::CONFLICT),
        "never ingested: {r:?}"
    );
    c.ingest(&t, "r.ndjson").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "r.ndjson", Duration::from_secs(120))
        .await
        .expect("status");
    let (ok, skipped, failed) = expect(false);
    assert_eq!(
        (f.records_ok, f.records_skipped, f.records_failed),
        (ok, skipped, failed),
        "{f:?}"
    );
    let job = f.job.clone();
    let before = app.logs(&c, &t, "").await;
    assert_eq!(before.len(), 2000);

    c.upload_app(&t, "batch", v2).await.expect("app v2");
    let started = c.replay_file(&t, "r.ndjson").await.expect("replay");
    assert_eq!(started.file.job, job, "the same run");
    let done = eventually(Duration::from_secs(120), || async {
        c.file(&t, "r.ndjson")
            .await
            .is_ok_and(|f| f.state == FileState::Done && !f.replay)
    })
    .await;
    assert!(done, "the replay ends");
    let f = c.file(&t, "r.ndjson").await.expect("status");
    let (ok, skipped, failed) = expect(true);
    assert_eq!(
        (
            f.records_ok,
            f.records_skipped,
            f.records_failed,
            f.documents_stored,
            f.job.as_str()
        ),
        (ok, skipped, failed, ok, job.as_str()),
        "recounted from the log: {f:?}"
    );
    assert_eq!(app.count(&t, "r").await, ok);

    // Every entry belongs to the first run; the records that failed in it and were fixed have
    // their failure and then their new outcome; the rest have exactly what they had.
    let log = app.logs(&c, &t, "").await;
    let mut per_record: BTreeMap<u64, Vec<Status>> = BTreeMap::new();
    for e in &log {
        assert_eq!(e.ingestion.as_deref(), Some(job.as_str()), "{e:?}");
        per_record
            .entry(e.record.expect("record"))
            .or_default()
            .push(e.status);
    }
    assert_eq!(per_record.len(), 2000);
    for (i, statuses) in &per_record {
        let (was, now) = (outcome(*i, false), outcome(*i, true));
        let want = if was == now {
            vec![was]
        } else {
            vec![was, now]
        };
        assert_eq!(statuses, &want, "record {i}");
    }
    // The v2 documents are the replayed records'; the others kept their v1 form.
    let replayed = app
        .mongo()
        .await
        .database(&format!("{}tenant_{t}", app.namespace))
        .collection::<mongodb::bson::Document>("r")
        .count_documents(mongodb::bson::doc! {"v": 2})
        .await
        .expect("count");
    let fixed = (0..2000)
        .filter(|&i| outcome(i, false) == Status::Failure && outcome(i, true) == Status::Success)
        .count() as u64;
    assert_eq!(replayed, fixed);

    // Replaying again changes nothing: no record is failed but the unreadable ones.
    c.replay_file(&t, "r.ndjson").await.expect("replay again");
    let done = eventually(Duration::from_secs(120), || async {
        c.file(&t, "r.ndjson")
            .await
            .is_ok_and(|f| f.state == FileState::Done && !f.replay)
    })
    .await;
    assert!(done);
    let again = c.file(&t, "r.ndjson").await.expect("status");
    assert_eq!(
        (
            again.records_ok,
            again.records_skipped,
            again.records_failed
        ),
        (ok, skipped, failed)
    );
    assert_eq!(app.logs(&c, &t, "").await.len(), log.len());
}

#[tokio::test]
async fn a_job_resumed_after_a_crash_keeps_the_app_version_it_started_with() {
    let mut app = TestApp::spawn_with(&["batch.batch_size=200", "batch.lease_ms=2000"]).await;
    let (t, c) = app.tenant("pinned").await;
    c.upload_app(&t, "batch", "function map(r) return { i = r.i, v = 1 } end")
        .await
        .expect("app v1");
    let rows: String = (0..1000).map(|i| format!("{{\"i\": {i}}}\n")).collect();
    c.upload_file(&t, "p.ndjson", rows).await.expect("stage");
    mysimbdp::coredms::faults::stall_before_log(&t);
    c.ingest(&t, "p.ndjson").await.expect("ingest");
    let reached = eventually(Duration::from_secs(60), || async {
        app.count(&t, "p").await >= 200
    })
    .await;
    assert!(reached, "the first bulk reaches the database");
    // A new version while the job is stuck in its first bulk: the job that resumes after
    // the crash still runs version 1, for every record.
    c.upload_app(&t, "batch", "function map(r) return { i = r.i, v = 2 } end")
        .await
        .expect("app v2");
    app.kill();
    let app = app.restart().await;
    let f = app
        .admin
        .wait_for_file(&t, "p.ndjson", Duration::from_secs(120))
        .await
        .expect("status");
    assert_eq!(
        (f.state, f.records_ok, f.app_version),
        (FileState::Done, 1000, Some(1)),
        "{f:?}"
    );
    let v2 = app
        .mongo()
        .await
        .database(&format!("{}tenant_{t}", app.namespace))
        .collection::<mongodb::bson::Document>("p")
        .count_documents(mongodb::bson::doc! {"v": 2})
        .await
        .expect("count");
    assert_eq!(v2, 0, "no record went through version 2");
    one_success_per_document(&app, &t, "p", 1000).await;
    // A new ingestion takes the active version.
    app.admin.ingest(&t, "p.ndjson").await.expect("again");
    let done = eventually(Duration::from_secs(120), || async {
        app.admin
            .file(&t, "p.ndjson")
            .await
            .is_ok_and(|f| f.state == FileState::Done && f.app_version == Some(2))
    })
    .await;
    assert!(done, "the next run uses version 2");
}

#[tokio::test]
async fn a_replay_is_refused_while_ingesting_with_nothing_failed_and_past_its_limits() {
    let app = TestApp::spawn_with(&["batch.batch_size=100"]).await;
    let (t, c) = app.tenant("noreplay").await;
    let rows: String = (0..2000).map(|i| format!("{{\"i\": {i}}}\n")).collect();
    c.upload_file(&t, "n.ndjson", rows).await.expect("stage");
    c.ingest(&t, "n.ndjson").await.expect("ingest");
    let conflict = |r: &Result<_, mysimbdp::client::ClientError>| {
        r.as_ref().err().and_then(|e| e.status()) == Some(reqwest::StatusCode::CONFLICT)
    };
    // The file is `ingesting` from the moment its start is answered.
    let r = c.replay_file(&t, "n.ndjson").await;
    assert!(conflict(&r), "while ingesting: {r:?}");
    let f = c
        .wait_for_file(&t, "n.ndjson", Duration::from_secs(120))
        .await
        .expect("status");
    assert_eq!((f.state, f.records_failed), (FileState::Done, 0), "{f:?}");
    let r = c.replay_file(&t, "n.ndjson").await;
    assert!(conflict(&r), "nothing failed: {r:?}");
    assert_eq!(app.logs(&c, &t, "").await.len(), 2000, "no entry added");
    for limit in ["0", "1001", "x"] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let path = match method {
                reqwest::Method::GET => format!("/v1/tenants/{t}/dead-letters?limit={limit}"),
                _ => format!("/v1/tenants/{t}/dead-letters/replay?limit={limit}"),
            };
            let r = c
                .raw(method.clone(), &path, None, "")
                .await
                .expect("answer");
            assert_eq!(r.status, 400, "{method} limit={limit}");
        }
    }
}
