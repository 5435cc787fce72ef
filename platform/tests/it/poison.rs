//! A poison record never takes others with it: documents the database would refuse fail
//! alone (logged, and on the stream path dead-lettered with the reason), the good records
//! around them are stored exactly once, and the queue keeps moving. A stored app that can no
//! longer run fails its messages instead of looping.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::patch;
use crate::harness::{self, TestApp, eventually, messages_stored};

/// NDJSON lines: `n` good messages with a `seq`, and after every tenth a document the
/// database would refuse, of one of four kinds. Returns the body and the poison count.
fn mixed(n: usize) -> (Vec<u8>, usize) {
    let mut deep = json!(1);
    for _ in 0..=100 {
        deep = json!({ "d": deep });
    }
    let poison = [
        json!({"a\u{0}b": 1}).to_string(),
        json!({"$set": {"x": 1}}).to_string(),
        json!({"nested": [{"$where": "1"}]}).to_string(),
        json!({"deep": deep}).to_string(),
    ];
    let mut body = Vec::new();
    let mut bad = 0;
    for i in 0..n {
        body.extend_from_slice(json!({ "seq": i }).to_string().as_bytes());
        body.push(b'\n');
        if i % 10 == 3 {
            body.extend_from_slice(poison[bad % poison.len()].as_bytes());
            body.push(b'\n');
            bad += 1;
        }
    }
    (body, bad)
}

/// The reasons of a tenant's dead letters.
async fn dead_letters(app: &TestApp, tenant: &str) -> Vec<String> {
    harness::dead_letters(&app.namespace, tenant)
        .await
        .into_iter()
        .map(|(_, reason)| reason)
        .collect()
}

fn count_matching(reasons: &[String], needle: &str) -> usize {
    reasons.iter().filter(|r| r.contains(needle)).count()
}

#[tokio::test]
async fn stream_documents_the_database_would_refuse_are_dead_lettered_and_the_rest_stored_once() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("poisondb").await;
    // Another tenant streams and ingests a file at the same time.
    let (b, bc) = app.tenant("bystander").await;
    let (body, bad) = mixed(400);
    c.publish(&t, "reading", body).await.expect("publish");
    let b_msgs: Vec<u8> = (0..300)
        .flat_map(|i| format!("{}\n", json!({ "seq": i })).into_bytes())
        .collect();
    bc.publish(&b, "reading", b_msgs)
        .await
        .expect("B publishes");
    let b_rows: String = std::iter::once("seq,v\n".to_owned())
        .chain((0..500).map(|i| format!("{i},{}\n", i * 2)))
        .collect();
    bc.upload_file(&b, "rows.csv", b_rows)
        .await
        .expect("B stages");
    c.stream_start(&t, 1).await.expect("start");
    bc.stream_start(&b, 1).await.expect("B starts");
    bc.ingest(&b, "rows.csv").await.expect("B ingests");
    let stored = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await >= 400
    })
    .await;
    assert!(stored, "stored {}", app.count(&t, "messages").await);
    let f = bc
        .wait_for_file(&b, "rows.csv", Duration::from_secs(60))
        .await
        .expect("B's file");
    assert_eq!((f.state.as_str(), f.records_ok), ("done", 500), "{f:?}");
    let b_stored = eventually(Duration::from_secs(30), || async {
        app.count(&b, "messages").await >= 300
    })
    .await;
    assert!(b_stored, "B's stream goes on beside the poison");
    bc.stream_stop(&b).await.expect("B stops");
    let logged = eventually(Duration::from_secs(30), || async {
        app.logs(&c, &t, "status=failure").await.len() >= bad
    })
    .await;
    assert!(logged, "every poison message has its failure entry");

    // The queue kept moving: a batch published after the poison is stored too.
    let later: Vec<u8> = (400..450)
        .flat_map(|i| format!("{}\n", json!({ "seq": i })).into_bytes())
        .collect();
    c.publish(&t, "reading", later)
        .await
        .expect("publish later");
    let moved = eventually(Duration::from_secs(30), || async {
        app.count(&t, "messages").await >= 450
    })
    .await;
    assert!(moved, "messages behind the poison are stored");
    c.stream_stop(&t).await.expect("stop");

    let db = format!("{}tenant_{t}", app.namespace);
    let (total, distinct) = messages_stored(&std::env::var("MONGODB_URI").expect("uri"), &db).await;
    assert_eq!(
        (total, distinct),
        (450, 450),
        "good messages stored exactly once"
    );

    let logs = app.logs(&c, &t, "status=failure").await;
    let reasons: Vec<String> = logs
        .iter()
        .filter_map(|e| e.reason.as_deref().map(str::to_owned))
        .collect();
    assert_eq!(
        reasons.len(),
        bad,
        "one failure entry per poison message: {reasons:?}"
    );
    assert_eq!(
        count_matching(&reasons, "NUL byte"),
        bad.div_ceil(4),
        "{reasons:?}"
    );
    assert_eq!(
        count_matching(&reasons, "starts with `$`"),
        bad / 2,
        "{reasons:?}"
    );
    assert_eq!(
        count_matching(&reasons, "deeper than 100"),
        bad / 4,
        "{reasons:?}"
    );
    let successes = app.logs(&c, &t, "status=success").await.len();
    assert_eq!(successes, 450);

    let dead = dead_letters(&app, &t).await;
    assert_eq!(
        dead.len(),
        bad,
        "each poison message dead-lettered once: {dead:?}"
    );
    assert_eq!(
        count_matching(&dead, "NUL byte"),
        bad.div_ceil(4),
        "{dead:?}"
    );
}

#[tokio::test]
async fn batch_documents_the_database_would_refuse_fail_alone_and_the_file_completes() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("poisonfile").await;
    let (body, bad) = mixed(600);
    c.upload_file(&t, "mixed.ndjson", body)
        .await
        .expect("upload");
    c.ingest(&t, "mixed.ndjson").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "mixed.ndjson", Duration::from_secs(60))
        .await
        .expect("file finishes");
    assert_eq!(f.state.as_str(), "done", "{f:?}");
    assert_eq!(f.records_ok, 600, "{f:?}");
    assert_eq!(f.records_failed, bad as u64, "{f:?}");
    let logs = app.logs(&c, &t, "status=failure").await;
    assert_eq!(logs.len(), bad);
    assert!(
        logs.iter().all(
            |e| e.reason.as_deref().is_some_and(|r| r.contains("NUL byte")
                || r.contains("starts with `$`")
                || r.contains("deeper than 100"))
        ),
        "{logs:?}"
    );
    assert_eq!(app.count(&t, &f.collection).await, 600);
}

#[tokio::test]
async fn a_stored_stream_app_that_can_no_longer_load_dead_letters_its_messages_instead_of_looping()
{
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("brokenapp").await;
    // Loads within the default 32 MiB; not once the operator lowers the tenant's memory.
    c.upload_app(
        &t,
        "stream",
        r#"
        local big = string.rep("x", 8 * 1024 * 1024)
        function map(m) return { seq = m.seq, n = #big } end"#,
    )
    .await
    .expect("app");
    app.admin
        .patch_tenant(
            &t,
            &patch(json!({"app_limits": {"memory_bytes": 2 * 1024 * 1024}})),
        )
        .await
        .expect("lower the memory limit");
    let body: Vec<u8> = (0..20)
        .flat_map(|i| format!("{}\n", json!({ "seq": i })).into_bytes())
        .collect();
    let started = Instant::now();
    c.publish(&t, "reading", body).await.expect("publish");
    c.stream_start(&t, 1).await.expect("start");
    let failed = eventually(Duration::from_secs(30), || async {
        app.logs(&c, &t, "status=failure").await.len() >= 20
    })
    .await;
    assert!(failed, "every message fails with the app's reason");
    eprintln!(
        "20 messages of a broken app failed within {:?}",
        started.elapsed()
    );
    let logs = app.logs(&c, &t, "status=failure").await;
    assert_eq!(logs.len(), 20, "one entry each, no loop: {logs:?}");
    assert!(
        logs.iter().all(|e| e
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("memory limit"))),
        "{logs:?}"
    );
    let dead = dead_letters(&app, &t).await;
    assert_eq!(dead.len(), 20, "{dead:?}");

    // A working version is picked up and stores what comes next.
    c.upload_app(&t, "stream", "function map(m) return { seq = m.seq } end")
        .await
        .expect("fixed app");
    let body: Vec<u8> = (20..30)
        .flat_map(|i| format!("{}\n", json!({ "seq": i })).into_bytes())
        .collect();
    c.publish(&t, "reading", body).await.expect("publish");
    let stored = eventually(Duration::from_secs(30), || async {
        app.count(&t, "messages").await >= 10
    })
    .await;
    assert!(stored, "the fixed app stores new messages");
    c.stream_stop(&t).await.expect("stop");
}

#[tokio::test]
async fn a_message_whose_document_the_database_rejects_is_dead_lettered_not_dropped() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("rejected").await;
    // The operator's schema on the tenant's collection: the server refuses `seq` over 99,
    // one document at a time (a write error per document, not a failed bulk).
    let db = app
        .mongo()
        .await
        .database(&format!("{}tenant_{t}", app.namespace));
    db.create_collection("messages")
        .validator(mongodb::bson::doc! {
            "$jsonSchema": {"bsonType": "object", "properties": {"seq": {"maximum": 99}}}
        })
        .await
        .expect("collection with a validator");
    let body: Vec<u8> = (0..150)
        .flat_map(|i| format!("{}\n", json!({ "seq": i })).into_bytes())
        .collect();
    c.publish(&t, "reading", body).await.expect("publish");
    c.stream_start(&t, 1).await.expect("start");
    let logged = eventually(Duration::from_secs(60), || async {
        app.logs(&c, &t, "status=failure").await.len() >= 50
    })
    .await;
    assert!(logged, "each rejected document has its failure entry");
    c.stream_stop(&t).await.expect("stop");
    assert_eq!(app.count(&t, "messages").await, 100);
    let logs = app.logs(&c, &t, "status=failure").await;
    assert_eq!(logs.len(), 50, "{logs:?}");
    assert!(
        logs.iter().all(|e| e
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("rejected by the database"))),
        "{logs:?}"
    );
    let dead = dead_letters(&app, &t).await;
    assert_eq!(
        dead.len(),
        50,
        "the rejected messages are kept in the DLQ: {dead:?}"
    );
    assert!(
        dead.iter()
            .all(|r| r.starts_with("rejected by the database"))
    );
}

#[tokio::test]
async fn a_message_that_keeps_failing_its_batch_is_dead_lettered_after_its_delivery_limit() {
    let app = TestApp::spawn_with(&["stream.max_deliveries=3"]).await;
    let (t, c) = app.tenant("loops").await;
    // A fault the platform cannot route around: the log refuses the entries of messages
    // named `poison`, so every batch holding one fails after its data was written.
    let logs_db = app
        .mongo()
        .await
        .database(&format!("{}logs", app.namespace));
    logs_db
        .run_command(mongodb::bson::doc! {
            "collMod": "logs",
            "validator": {"data_name": {"$ne": "poison"}},
        })
        .await
        .expect("validator on the log");
    let good: Vec<u8> = (0..40)
        .flat_map(|i| format!("{}\n", json!({ "seq": i })).into_bytes())
        .collect();
    c.publish(&t, "reading", good.clone())
        .await
        .expect("publish");
    c.publish(&t, "poison", b"{\"seq\": 1000}\n".to_vec())
        .await
        .expect("publish poison");
    let later: Vec<u8> = (40..80)
        .flat_map(|i| format!("{}\n", json!({ "seq": i })).into_bytes())
        .collect();
    c.publish(&t, "reading", later).await.expect("publish");
    let started = Instant::now();
    c.stream_start(&t, 1).await.expect("start");
    let logged = eventually(Duration::from_secs(60), || async {
        app.logs(&c, &t, "status=success").await.len() >= 80
    })
    .await;
    assert!(
        logged,
        "the good messages around the poison are stored and logged"
    );
    let dead = eventually(Duration::from_secs(60), || async {
        app.stream_metric("mysimbdp_dead_lettered_total", &t, "failure")
            .await
            >= 1
    })
    .await;
    assert!(dead, "the poison message leaves the queue");
    eprintln!(
        "a message failing its batch was dead-lettered after {:?}",
        started.elapsed()
    );
    c.stream_stop(&t).await.expect("stop");
    let dead = dead_letters(&app, &t).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].starts_with("not stored after 3 deliveries"),
        "{dead:?}"
    );
    let db = format!("{}tenant_{t}", app.namespace);
    let (total, distinct) = messages_stored(&std::env::var("MONGODB_URI").expect("uri"), &db).await;
    assert_eq!(
        distinct, 81,
        "every message's document was written once: {total}"
    );
}
