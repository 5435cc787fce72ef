//! Fault injection under load: the platform process SIGKILLed, broker connections cut from
//! the broker side, the database stopped and restarted. Each ends with published = stored
//! and no duplicates.
//!
//! The broker and database faults need tools a machine may lack: `rabbitmqctl`, and a
//! command that starts a MongoDB server (`MYSIMBDP_TEST_MONGOD`, e.g.
//! `secantusd-py --port {port} --storage-path {dir}`; `.ci/run` sets it). In CI (`CI` set)
//! a missing tool fails the test; elsewhere the test says what it needs and returns.

use std::process::Stdio;
use std::time::Duration;

use mysimbdp::client::Client;
use mysimbdp::testing::{
    MONGOD_COMMAND_VAR, OwnMongo, cut_connections, free_port, rabbitmqctl_available,
};

use crate::harness::{ADMIN_TOKEN, TestApp, eventually, messages_stored, unique, water_quality};
use mysimbdp::tenants::AdminPatch;

fn ndjson(from: usize, to: usize) -> Vec<u8> {
    (from..to)
        .flat_map(|i| format!("{{\"seq\":{i}}}\n").into_bytes())
        .collect()
}

/// Says why a fault test cannot run here; fails in CI, where it must run.
fn unavailable(what: &str) {
    let msg = format!("this fault test needs {what}");
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (required in CI)");
    }
    eprintln!("NOT RUN: {msg}; CI runs it");
}

/// The `mysimbdp serve` binary as a child process, so it can be SIGKILLed.
struct Proc {
    child: tokio::process::Child,
    client: Client,
}

async fn spawn_serve(namespace: &str, staging: &std::path::Path) -> Proc {
    let port = free_port().expect("free port");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mysimbdp"))
        .args([
            "serve",
            "--set",
            "stream.batch_size=100",
            "--set",
            "batch.batch_size=250",
            // The killed process's job lease runs out soon, so the restarted one resumes it.
            "--set",
            "batch.lease_ms=2000",
            // As the in-process platforms of the tests declare them.
            "--set",
            &mysimbdp::testing::expiring_queues(),
        ])
        .env("MYSIMBDP_LISTEN", format!("127.0.0.1:{port}"))
        .env("MYSIMBDP_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("MYSIMBDP_PLATFORM__NAMESPACE", namespace)
        .env("MYSIMBDP_STAGING_DIR", staging)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("mysimbdp serve starts");
    let client = Client::new(&format!("http://127.0.0.1:{port}"), Some(ADMIN_TOKEN));
    let up = eventually(Duration::from_secs(60), || async {
        client.get("/healthz").await.is_ok()
            || client
                .raw(reqwest::Method::GET, "/healthz", None, Vec::new())
                .await
                .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(up, "mysimbdp serve answered /healthz within 60 s");
    Proc { child, client }
}

#[tokio::test]
async fn the_platform_process_sigkilled_under_load_loses_and_duplicates_nothing() {
    let ns = format!("{}_", unique("k"));
    let staging = std::env::temp_dir().join(format!("mysimbdp-it-{ns}"));
    let mongodb_uri = std::env::var("MONGODB_URI").expect("MONGODB_URI");
    let mut p = spawn_serve(&ns, &staging).await;
    let t = p
        .client
        .create_tenant("victim", AdminPatch::default())
        .await
        .expect("tenant");
    let c = p.client.with_token(Some(&t.token));
    c.publish(&t.name, "reading", ndjson(0, 5000))
        .await
        .expect("publish");
    c.upload_file(
        &t.name,
        "wq.csv",
        std::fs::read(water_quality()).expect("dataset"),
    )
    .await
    .expect("stage");
    c.ingest(&t.name, "wq.csv").await.expect("ingest");
    c.stream_start(&t.name, 1).await.expect("start");
    let db = format!("{ns}tenant_victim");
    let progressed = eventually(Duration::from_secs(60), || async {
        messages_stored(&mongodb_uri, &db).await.0 >= 500
    })
    .await;
    assert!(progressed, "the stream made progress before the kill");
    p.child.kill().await.expect("SIGKILL");
    let (at_kill, _) = messages_stored(&mongodb_uri, &db).await;
    assert!(at_kill < 5000, "killed mid-stream ({at_kill} stored)");

    let p = spawn_serve(&ns, &staging).await;
    let c = p.client.with_token(Some(&t.token));
    c.publish(&t.name, "reading", ndjson(5000, 6000))
        .await
        .expect("publish after restart");
    c.stream_start(&t.name, 2).await.expect("restart consumers");
    let all = eventually(Duration::from_secs(180), || async {
        messages_stored(&mongodb_uri, &db).await.0 >= 6000
    })
    .await;
    assert!(all, "stored {:?}", messages_stored(&mongodb_uri, &db).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(messages_stored(&mongodb_uri, &db).await, (6000, 6000));
    let f = c
        .wait_for_file(&t.name, "wq.csv", Duration::from_secs(180))
        .await
        .expect("status");
    assert_eq!(
        f.state.as_str(),
        "done",
        "the interrupted batch job resumed: {f:?}"
    );
    let docs = c.documents(&t.name, "wq", 1, 0).await.expect("docs");
    assert_eq!(docs.total, 9999);
    drop(p);
    let _ = std::fs::remove_dir_all(&staging);
}

/// Publishes, retrying on 503 as a client should while the platform reconnects: 20 tries,
/// 250 ms apart.
async fn publish_retrying(c: &Client, tenant: &str, body: Vec<u8>) {
    use backon::{ConstantBuilder, Retryable};
    let key = unique("retry-");
    let publish = || c.publish_idempotent(tenant, "reading", &key, body.clone());
    let every = ConstantBuilder::new()
        .with_delay(Duration::from_millis(250))
        .with_max_times(19);
    if let Err(e) = publish
        .retry(every)
        .sleep(tokio::time::sleep)
        .when(|e| e.status() == Some(reqwest::StatusCode::SERVICE_UNAVAILABLE))
        .await
    {
        panic!("publish failed: {e}");
    }
}

#[tokio::test]
async fn broker_connections_cut_mid_stream_are_recovered_without_loss() {
    if !rabbitmqctl_available() {
        return unavailable("rabbitmqctl, to close connections from the broker side");
    }
    let app = TestApp::spawn_with(&["stream.batch_size=100"]).await;
    let (t, c) = app.tenant("cut").await;
    c.publish(&t, "reading", ndjson(0, 5000))
        .await
        .expect("publish");
    c.stream_start(&t, 2).await.expect("start");
    let db = format!("{}tenant_{t}", app.namespace);
    let uri = app.settings.mongodb.uri.clone();
    let progressed = eventually(Duration::from_secs(60), || async {
        messages_stored(&uri, &db).await.0 >= 500
    })
    .await;
    assert!(progressed);
    let cut = cut_connections(&app.namespace, "fault test: connection cut").expect("rabbitmqctl");
    assert!(
        cut >= 2,
        "cut the consumers' and the publisher's connections ({cut})"
    );
    publish_retrying(&c, &t, ndjson(5000, 6000)).await;
    let all = eventually(Duration::from_secs(120), || async {
        messages_stored(&uri, &db).await.0 >= 6000
    })
    .await;
    assert!(all, "stored {:?}", messages_stored(&uri, &db).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(messages_stored(&uri, &db).await, (6000, 6000));
}

#[tokio::test]
async fn a_database_outage_pauses_ingestion_and_nothing_is_lost() {
    let Ok(command) = std::env::var(MONGOD_COMMAND_VAR) else {
        return unavailable(
            "MYSIMBDP_TEST_MONGOD, a command starting a MongoDB server on {port} with data in {dir}",
        );
    };
    let dir = std::env::temp_dir().join(unique("mysimbdp-db-"));
    let mut db = OwnMongo::start(command, dir)
        .await
        .expect("own database listening");
    let uri = db.uri();
    let app = TestApp::spawn_with(&[
        &format!("mongodb.uri=\"{uri}\""),
        "stream.batch_size=100",
        "batch.batch_size=250",
    ])
    .await;
    let (t, c) = app.tenant("outage").await;
    c.upload_file(
        &t,
        "wq.csv",
        std::fs::read(water_quality()).expect("dataset"),
    )
    .await
    .expect("stage");
    c.publish(&t, "reading", ndjson(0, 3000))
        .await
        .expect("publish");
    c.ingest(&t, "wq.csv").await.expect("ingest");
    c.stream_start(&t, 1).await.expect("start");
    let mdb = format!("{}tenant_{t}", app.namespace);
    let progressed = eventually(Duration::from_secs(60), || async {
        messages_stored(&uri, &mdb).await.0 >= 300
    })
    .await;
    assert!(progressed);

    db.stop();
    // Publishing does not need the database: messages wait in the queue, unacknowledged.
    c.publish(&t, "reading", ndjson(3000, 4000))
        .await
        .expect("publish during the outage");
    tokio::time::sleep(Duration::from_secs(3)).await;
    db.restart().await.expect("own database back");

    let all = eventually(Duration::from_secs(180), || async {
        messages_stored(&uri, &mdb).await.0 >= 4000
    })
    .await;
    assert!(all, "stored {:?}", messages_stored(&uri, &mdb).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(messages_stored(&uri, &mdb).await, (4000, 4000));
    let f = c
        .wait_for_file(&t, "wq.csv", Duration::from_secs(180))
        .await
        .expect("status");
    assert_eq!(f.state.as_str(), "done", "{f:?}");
    assert_eq!(app.count(&t, "wq").await, 9999);
}

/// The namespace's connections as the broker lists them, and how many of them are the
/// stream consumers' shared ones.
fn broker_connections(namespace: &str) -> (usize, usize) {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mine: Vec<&str> = text.lines().filter(|l| l.contains(namespace)).collect();
    let consumers = mine
        .iter()
        .filter(|l| l.contains("mysimbdp-consumers-"))
        .count();
    (mine.len(), consumers)
}

#[tokio::test]
async fn consumers_of_many_tenants_share_few_connections_and_all_come_back_after_a_cut() {
    if !rabbitmqctl_available() {
        return unavailable("rabbitmqctl, to list and close connections from the broker side");
    }
    let app = TestApp::spawn_with(&["amqp.consumer_connections=2", "stream.batch_size=50"]).await;
    let uri = app.settings.mongodb.uri.clone();
    let mut tenants = Vec::new();
    for i in 0..6 {
        let (t, c) = app.tenant(&format!("share{i}")).await;
        c.publish(&t, "reading", ndjson(0, 200))
            .await
            .expect("publish");
        // Two consumers for one tenant: still on the same two connections.
        c.stream_start(&t, if i == 0 { 2 } else { 1 })
            .await
            .expect("start");
        tenants.push((format!("{}tenant_{t}", app.namespace), t, c));
    }
    let stored = |n: u64| {
        let (uri, tenants) = (&uri, &tenants);
        async move {
            for (db, _, _) in tenants {
                if messages_stored(uri, db).await.0 < n {
                    return false;
                }
            }
            true
        }
    };
    assert!(eventually(Duration::from_secs(60), || stored(200)).await);
    let (_, consumers) = broker_connections(&app.namespace);
    assert_eq!(
        consumers, 2,
        "seven consumers of six tenants on two connections"
    );

    // Every consumer on a cut connection reconnects; what was published meanwhile arrives.
    let cut =
        cut_connections(&app.namespace, "fault test: shared connections cut").expect("rabbitmqctl");
    assert!(cut >= 2, "cut the consumers' connections ({cut})");
    for (_, t, c) in &tenants {
        publish_retrying(c, t, ndjson(200, 300)).await;
    }
    assert!(
        eventually(Duration::from_secs(120), || stored(300)).await,
        "every tenant's messages stored after the cut"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (db, t, _) in &tenants {
        assert_eq!(messages_stored(&uri, db).await, (300, 300), "{t}");
    }
    assert_eq!(
        broker_connections(&app.namespace).1,
        2,
        "the pool reconnected, no more"
    );
}
