//! The split topology: `mysimbdp serve coredms`, `serve batch` and `serve stream` as three
//! real processes, the two ingest managers reaching coredms only over HTTP.

use std::time::Duration;

use mysimbdp::client::Client;
use mysimbdp::config::{HttpSettings, Settings};
use mysimbdp::coredms::{CoreDms, Remote};
use mysimbdp::infra::Infra;
use mysimbdp::model::FileState;
use mysimbdp::processes::{Manager, Replicas, SplitProcesses};
use mysimbdp::tenants::TenantName;

use crate::harness::{ADMIN_TOKEN, eventually, messages_stored, unique};
use mysimbdp::logs::{Source, Status};
use mysimbdp::tenants::AdminPatch;

#[tokio::test]
async fn a_split_deployment_ingests_batch_files_and_streams_over_http() {
    let (infra, dir, components) = start(&[]).await;
    let admin = components.client(Some(ADMIN_TOKEN));
    let t = admin
        .create_tenant("split", AdminPatch::default())
        .await
        .expect("coredms creates the tenant");
    let c = admin.with_token(Some(&t.token));
    let app = "function map(r) r.seen = tenant return r end";
    c.upload_app(&t.name, "batch", app)
        .await
        .expect("batch app");
    c.upload_app(&t.name, "stream", app)
        .await
        .expect("stream app");

    // Each ingest manager answers only its own routes: tenants belong to coredms.
    let batch_addr = components.addr("batch").expect("batch runs");
    let batch_only = Client::new(&format!("http://{batch_addr}"), Some(ADMIN_TOKEN));
    let e = batch_only
        .tenant(&t.name)
        .await
        .expect_err("not the batch manager's");
    assert_eq!(e.status(), Some(reqwest::StatusCode::NOT_FOUND));

    let mut csv = String::from("id,v\n");
    for i in 0..500 {
        csv.push_str(&format!("{i},{}\n", i * 3));
    }
    c.upload_file(&t.name, "readings.csv", csv)
        .await
        .expect("stage");
    c.ingest(&t.name, "readings.csv").await.expect("ingest");

    let mut body = String::new();
    for seq in 0..300 {
        body.push_str(&format!("{{\"seq\":{seq}}}\n"));
    }
    c.publish_idempotent(&t.name, "messages", "split-1", body)
        .await
        .expect("publish");
    c.stream_start(&t.name, 1).await.expect("start consumers");

    let f = c
        .wait_for_file(&t.name, "readings.csv", Duration::from_secs(120))
        .await
        .expect("file status");
    assert_eq!((f.state.as_str(), f.records_ok), ("done", 500), "{f:?}");
    messages_stored_once(
        &infra,
        &c,
        &t.name,
        &t.database,
        300,
        Duration::from_secs(60),
    )
    .await;
    let status = c.stream_status(&t.name).await.expect("stream status");
    assert_eq!(status.consumers, 1, "{status:?}");
    assert_eq!(status.logged.stored, 300, "{status:?}");
    assert_eq!(
        status.target,
        Some(mysimbdp::api::ConsumerTarget { min: 1, max: 1 }),
        "{status:?}"
    );

    // The log, kept by coredms, has every ingestion of both managers.
    let logs = c.logs(&t.name, "status=success").await.expect("logs");
    let by = |s: Source| logs.iter().filter(|e| e.source == s).count();
    assert_eq!((by(Source::Batch), by(Source::Stream)), (500, 300));
    let doc = &c
        .documents(&t.name, "readings", 1, 0)
        .await
        .expect("documents")
        .documents[0];
    assert_eq!(doc["seen"], t.name.as_str(), "the app ran: {doc}");
    // Any component reads documents through coredms' interface, over the internal RPC.
    let core = components.addr("coredms").expect("coredms runs");
    let remote = Remote::new(
        &format!("http://{core}"),
        ADMIN_TOKEN,
        &HttpSettings::default(),
    )
    .expect("remote coredms");
    let remote = CoreDms::Remote(std::sync::Arc::new(remote));
    let tenant = TenantName::parse(&t.name).expect("name");
    let total = remote.count_documents(&tenant, "readings").await;
    assert_eq!(total, Ok(500));
    let page = remote
        .documents(&tenant, "readings", 2, 1)
        .await
        .expect("a page over the RPC");
    let endpoint = c
        .documents(&t.name, "readings", 2, 1)
        .await
        .expect("documents");
    assert_eq!(page, endpoint.documents, "the same page as the endpoint's");
    assert_eq!(endpoint.documents.len(), 2);

    c.stream_stop(&t.name).await.expect("stop consumers");
    // SIGTERM to each, coredms last; each must drain and exit 0.
    components
        .stop()
        .await
        .expect("every component drains and exits 0");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bulks of several megabytes cross the internal RPC: a batch file of 3,000 records of
/// 4 KiB written in one 12 MB bulk, and 60 stream messages of 200 KiB consumed as one 12 MB
/// batch, are split into chunks under the RPC's limit and every document is stored once.
#[tokio::test]
async fn a_split_deployment_stores_bulks_of_several_megabytes_once() {
    // One bulk for the whole file, room for the file itself, and stream batches large
    // enough to need chunks too.
    let (infra, dir, components) = start(&[
        "batch.batch_size=3000",
        "limits.max_file_bytes=64000000",
        "stream.max_batch_bytes=16000000",
    ])
    .await;
    let admin = components.client(Some(ADMIN_TOKEN));
    let t = admin
        .create_tenant("bulky", AdminPatch::default())
        .await
        .expect("coredms creates the tenant");
    let c = admin.with_token(Some(&t.token));

    let pad = "p".repeat(4096);
    let mut csv = String::from("id,pad\n");
    for i in 0..3000 {
        csv.push_str(&format!("{i},{pad}\n"));
    }
    assert!(csv.len() > 12_000_000);
    c.upload_file(&t.name, "big.csv", csv).await.expect("stage");
    c.ingest(&t.name, "big.csv").await.expect("ingest");

    let pad = "m".repeat(200 * 1024);
    for part in 0..3 {
        let mut body = String::new();
        for seq in part * 20..(part + 1) * 20 {
            body.push_str(&format!("{{\"seq\":{seq},\"pad\":\"{pad}\"}}\n"));
        }
        c.publish_idempotent(&t.name, "messages", &format!("bulky-{part}"), body)
            .await
            .expect("publish");
    }
    c.stream_start(&t.name, 1).await.expect("start consumers");

    let f = c
        .wait_for_file(&t.name, "big.csv", Duration::from_secs(180))
        .await
        .expect("file status");
    assert_eq!(
        (f.state.as_str(), f.records_ok, f.records_failed),
        ("done", 3000, 0),
        "{f:?}"
    );
    let mongo = mongodb::Client::with_uri_str(&infra.mongodb_uri)
        .await
        .expect("driver");
    let big = mongo
        .database(&t.database)
        .collection::<mongodb::bson::Document>("big");
    let ids = big
        .distinct("id", mongodb::bson::doc! {})
        .await
        .expect("distinct")
        .len();
    let docs = big
        .count_documents(mongodb::bson::doc! {})
        .await
        .expect("count");
    assert_eq!((docs, ids), (3000, 3000), "every record stored once");

    messages_stored_once(
        &infra,
        &c,
        &t.name,
        &t.database,
        60,
        Duration::from_secs(120),
    )
    .await;
    let logs = c.logs(&t.name, "").await.expect("logs");
    let count = |source: Source, status: Status| {
        logs.iter()
            .filter(|e| e.source == source && e.status == status)
            .count()
    };
    assert_eq!(
        (
            count(Source::Batch, Status::Success),
            count(Source::Stream, Status::Success)
        ),
        (3000, 60)
    );
    assert_eq!(
        logs.len(),
        3060,
        "no failures or duplicates: {:?}",
        logs.iter().find(|e| e.status != Status::Success)
    );

    c.stream_stop(&t.name).await.expect("stop consumers");
    components
        .stop()
        .await
        .expect("every component drains and exits 0");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Several managers of each kind beside one coredms: each answers at its own address over
/// the shared store; one killed (SIGKILL) stops answering, keeps its number and is no failure
/// at stop; one added takes the next number.
#[tokio::test]
async fn replicas_answer_at_their_own_addresses_and_a_killed_one_is_left_out_at_stop() {
    let two = Replicas {
        batch: 2,
        stream: 2,
    };
    let (_infra, dir, mut components) = start_replicas(&[], two).await;
    assert_eq!(components.running(Manager::Batch), [0, 1]);
    assert_eq!(components.running(Manager::Stream), [0, 1]);
    let pids = components.replica_pids(Manager::Stream);
    assert!(pids.len() == 2 && pids[0].1 != pids[1].1, "{pids:?}");
    let admin = components.client(Some(ADMIN_TOKEN));
    let t = admin
        .create_tenant("replicas", AdminPatch::default())
        .await
        .expect("tenant");
    let at = |p: &SplitProcesses, b, s| p.client_at(b, s, Some(&t.token));
    let c1 = at(&components, 1, 1).expect("batch-1 and stream-1 run");
    c1.upload_file(&t.name, "a.csv", "k\n1\n")
        .await
        .expect("batch-1 stages");
    let seen = at(&components, 0, 0)
        .expect("batch and stream run")
        .file(&t.name, "a.csv")
        .await
        .expect("batch sees batch-1's file");
    assert_eq!(seen.state, FileState::Staged);
    let started = c1.stream_start(&t.name, 1).await.expect("stream-1 answers");
    assert_eq!(started.consumers, 1);

    components
        .kill(Manager::Batch, 1)
        .await
        .expect("SIGKILL batch-1");
    assert_eq!(components.running(Manager::Batch), [0]);
    assert!(
        components.client_at(1, 0, None).is_none(),
        "no client of a dead one"
    );
    assert_eq!(components.replica_addr(Manager::Batch, 1), None);
    assert!(components.replica_addr(Manager::Stream, 1).is_some());
    let e = c1
        .file(&t.name, "a.csv")
        .await
        .expect_err("batch-1 is gone");
    assert_eq!(e.status(), None, "no answer at all: {e}");
    assert!(
        components.kill(Manager::Batch, 1).await.is_err(),
        "killed once"
    );

    components
        .kill(Manager::Stream, 0)
        .await
        .expect("SIGKILL stream");
    let survivors = components.client(Some(&t.token));
    survivors
        .file(&t.name, "a.csv")
        .await
        .expect("the client reaches the first running batch manager");
    survivors
        .stream_status(&t.name)
        .await
        .expect("and stream-1 in place of the dead stream");
    let n = components.add(Manager::Batch).await.expect("a replacement");
    assert_eq!(n, 2, "a new number: the dead one keeps its own");
    assert!(dir.join("batch-2.log").exists());
    let f = at(&components, 2, 1)
        .expect("batch-2 and stream-1 run")
        .file(&t.name, "a.csv")
        .await
        .expect("batch-2 answers for the shared store");
    assert_eq!(f.name, "a.csv");
    at(&components, 0, 1)
        .expect("batch and stream-1 run")
        .stream_stop(&t.name)
        .await
        .expect("stop consumers");
    components
        .stop()
        .await
        .expect("the living drain and exit 0; the killed one is no failure");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The three components as real processes over the servers of `MONGODB_URI`/`AMQP_URI`, in a
/// namespace and directory of their own, with `extra` settings.
async fn start(extra: &[&str]) -> (Infra, std::path::PathBuf, SplitProcesses) {
    let one = Replicas {
        batch: 1,
        stream: 1,
    };
    start_replicas(extra, one).await
}

/// As [`start`], with `replicas` batch and stream managers.
async fn start_replicas(
    extra: &[&str],
    replicas: Replicas,
) -> (Infra, std::path::PathBuf, SplitProcesses) {
    let env: Vec<(String, String)> = ["MONGODB_URI", "AMQP_URI"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    let settings = Settings::load_from(None, &env, &[]).expect("settings");
    let infra = Infra::provision(&settings).await.unwrap_or_else(|e| {
        panic!(
            "{e}\nIntegration tests need MongoDB and RabbitMQ: {}",
            mysimbdp::infra::HOW_TO_PROVIDE
        )
    });
    let ns = unique("s") + "_";
    let dir = std::env::temp_dir().join(format!("mysimbdp-it-split-{ns}"));
    let mut overrides = vec![
        format!("platform.namespace={ns}"),
        format!("staging.dir={}", dir.join("staging").display()),
        format!("auth.admin_token={ADMIN_TOKEN}"),
        "mongodb.max_pool_size=4".to_owned(),
        mysimbdp::testing::expiring_queues(),
    ];
    overrides.extend(extra.iter().map(|s| (*s).to_owned()));
    let components = SplitProcesses::start_replicas(
        std::path::Path::new(env!("CARGO_BIN_EXE_mysimbdp")),
        &overrides,
        &infra,
        &dir,
        replicas,
    )
    .await
    .expect("every `mysimbdp serve <component>` becomes healthy");
    (infra, dir, components)
}

/// Waits until `n` messages are stored once each in `db`, then until the stream process
/// has counted them: the documents become visible before their log entries are written and
/// before the stream process hears back from coredms, so after the count the log is
/// complete too.
async fn messages_stored_once(
    infra: &Infra,
    c: &Client,
    tenant: &str,
    db: &str,
    n: u64,
    timeout: Duration,
) {
    let stored = eventually(timeout, || async {
        messages_stored(&infra.mongodb_uri, db).await == (n, n)
    })
    .await;
    assert!(
        stored,
        "{n} messages stored once each, got {:?}",
        messages_stored(&infra.mongodb_uri, db).await
    );
    eventually(Duration::from_secs(30), || async {
        c.stream_status(tenant)
            .await
            .is_ok_and(|s| s.logged.stored == n)
    })
    .await;
}
