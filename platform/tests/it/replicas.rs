//! File state by compare-and-set and job leases: racing uploads and starts end consistent
//! (the loser gets 409), and batch managers in separate processes over one staging directory
//! share the work, each file ingested once, a killed one's job taken over after its lease.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use mongodb::bson::{Document, doc};
use mysimbdp::client::{Client, Split};
use mysimbdp::config::{Format, MongoSettings, Settings};
use mysimbdp::coredms::{CoreError, MongoStore};
use mysimbdp::infra::Infra;
use mysimbdp::logs::Status;
use mysimbdp::model::{FileRecord, FileState};
use mysimbdp::tenants::{AdminPatch, TenantName};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use crate::harness::{ADMIN_TOKEN, TestApp, eventually, unique, water_quality};

fn mongodb_uri() -> String {
    std::env::var("MONGODB_URI").unwrap_or_else(|_| {
        panic!(
            "MONGODB_URI is not set: {}",
            mysimbdp::infra::HOW_TO_PROVIDE
        )
    })
}

/// The store's operations one by one, as two managers would interleave them.
#[tokio::test]
async fn file_records_move_only_by_compare_and_set_and_a_lease_passes_only_once_expired() {
    let ns = unique("r") + "_";
    let store = MongoStore::connect(&mongodb_uri(), &MongoSettings::default(), &ns)
        .await
        .expect("store connects");
    let t = TenantName::parse("alice").expect("valid");
    let staged = |upload: &str| {
        FileRecord::staged(
            &t,
            "f.csv",
            Format::Csv,
            3,
            format!("sha-{upload}"),
            "f".into(),
            upload.into(),
        )
    };
    assert_eq!(store.stage_file(&staged("u1")).await, Ok(None));
    let replaced = store.stage_file(&staged("u2")).await.expect("staged again");
    assert_eq!(
        replaced.map(|r| (r.upload, r.version)),
        Some(("u1".into(), 1))
    );
    let mut rec = store.file(&t, "f.csv").await.expect("read").expect("there");
    assert_eq!((rec.upload.as_str(), rec.version), ("u2", 2));

    // Long enough to hold on any machine; a lease that must run out is taken short (`SHORT`)
    // just before the test waits for it.
    let lease = 60_000;
    const SHORT: u64 = 300;
    let mut old = rec.clone();
    old.version = 1;
    old.state = FileState::Ingesting;
    assert_eq!(
        store.start_file(&old, "a", lease).await,
        Ok(false),
        "a stale version"
    );
    rec.state = FileState::Ingesting;
    rec.restart("job-1".into());
    assert_eq!(store.start_file(&rec, "a", lease).await, Ok(true));
    assert_eq!(
        store.start_file(&rec, "b", lease).await,
        Ok(false),
        "started twice"
    );
    let r = store.stage_file(&staged("u3")).await;
    assert!(matches!(r, Err(CoreError::Conflict(_))), "{r:?}");
    let r = store.delete_file(&t, "f.csv").await;
    assert!(matches!(r, Err(CoreError::Conflict(_))), "{r:?}");
    let now = store.file(&t, "f.csv").await.expect("read").expect("there");
    assert_eq!(
        (now.upload.as_str(), now.state),
        ("u2", FileState::Ingesting)
    );

    rec.next_record = 10;
    assert_eq!(
        store.checkpoint_file(&rec, "b", lease).await,
        Ok(false),
        "not b's"
    );
    assert_eq!(store.checkpoint_file(&rec, "a", lease).await, Ok(true));
    assert_eq!(
        store.claim_files("b", lease, 10).await,
        Ok(vec![]),
        "a's lease holds"
    );

    // a's last renewal is short, then a stops: once its lease runs out, b claims the job
    // where a left it.
    assert_eq!(store.checkpoint_file(&rec, "a", SHORT).await, Ok(true));
    tokio::time::sleep(Duration::from_millis(SHORT + 200)).await;
    let claimed = store.claim_files("b", lease, 10).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].job.as_str(), claimed[0].next_record),
        ("job-1", 10)
    );
    assert_eq!(
        claimed[0].lease.as_ref().map(|l| l.owner.as_str()),
        Some("b")
    );
    assert_eq!(
        store.claim_files("c", lease, 10).await,
        Ok(vec![]),
        "claimed once"
    );
    rec.next_record = 20;
    assert_eq!(
        store.checkpoint_file(&rec, "a", lease).await,
        Ok(false),
        "a lost it"
    );
    rec.state = FileState::Done;
    assert_eq!(
        store.finish_file(&rec, "a",).await,
        Ok(false),
        "a cannot finish it"
    );

    // b stops cleanly: it lets go, and c resumes at once.
    let held = [format!("{}/{}", rec.tenant, rec.name)];
    assert_eq!(
        store.renew_leases("b", lease, &[]).await,
        Ok(0),
        "none named"
    );
    assert_eq!(store.renew_leases("b", lease, &held).await, Ok(1));
    assert_eq!(store.release_leases("b").await, Ok(1));
    assert_eq!(
        store.claim_files("c", lease, 10).await.map(|v| v.len()),
        Ok(1)
    );
    assert_eq!(store.finish_file(&rec, "c").await, Ok(true));
    let done = store.file(&t, "f.csv").await.expect("read").expect("there");
    assert_eq!(
        (done.state, done.next_record, done.lease),
        (FileState::Done, 20, None)
    );

    let replaced = store
        .stage_file(&staged("u4"))
        .await
        .expect("staged after the job");
    assert_eq!(replaced.map(|r| r.version), Some(2));
    let gone = store.delete_file(&t, "f.csv").await.expect("deleted");
    assert_eq!(gone.map(|r| (r.upload, r.version)), Some(("u4".into(), 3)));
    assert_eq!(store.delete_file(&t, "f.csv").await, Ok(None));
}

/// The copies of `name` in the tenant's staging folder: (upload id, sha-256 of the bytes).
fn copies(staging: &Path, tenant: &str, name: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(staging.join(tenant)).expect("tenant folder") {
        let e = e.expect("entry");
        let entry = e.file_name().to_string_lossy().into_owned();
        if let Some(upload) = entry.strip_prefix(&format!("{name}~")) {
            let bytes = std::fs::read(e.path()).expect("copy");
            out.push((upload.to_owned(), hex::encode(Sha256::digest(&bytes))));
        }
    }
    out
}

/// The record and the one copy on disk agree: same upload, same bytes.
async fn record_matches_disk(app: &TestApp, c: &Client, t: &str, name: &str) -> FileRecord {
    let f = c.file(t, name).await.expect("status");
    let on_disk = copies(&app.staging, t, name);
    assert_eq!(
        on_disk,
        [(f.upload.clone(), f.sha256.clone())],
        "one copy on disk, the one the record describes: {f:?}"
    );
    assert!(f.lease.is_none(), "no lease shown: {f:?}");
    f
}

fn conflict<T>(r: &Result<T, mysimbdp::client::ClientError>) -> bool {
    matches!(r, Err(e) if e.status() == Some(StatusCode::CONFLICT))
}

#[tokio::test]
async fn racing_uploads_and_ingest_requests_end_consistent_and_the_losers_get_409() {
    let app = TestApp::spawn_with(&["batch.batch_size=10"]).await;
    let (t, c) = app.tenant("racer").await;
    let body = std::fs::read(water_quality()).expect("dataset");
    c.upload_file(&t, "wq.csv", body.clone())
        .await
        .expect("stage");

    // Two ingest requests at once: one job.
    let (a, b) = tokio::join!(c.ingest(&t, "wq.csv"), c.ingest(&t, "wq.csv"));
    assert!(
        a.is_ok() != b.is_ok() && (conflict(&a) || conflict(&b)),
        "one 202 and one 409: {a:?} {b:?}"
    );
    // A new version while it runs: refused, nothing changes.
    let staged = c.file(&t, "wq.csv").await.expect("status");
    assert_eq!(staged.state, FileState::Ingesting, "{staged:?}");
    let r = c.upload_file(&t, "wq.csv", "x\n1\n").await;
    assert!(conflict(&r), "an upload while ingesting: {r:?}");
    let r = c.ingest(&t, "wq.csv").await;
    assert!(conflict(&r), "an ingest while ingesting: {r:?}");
    let r = c
        .raw(
            reqwest::Method::DELETE,
            &format!("/v1/tenants/{t}/files/wq.csv"),
            None,
            Vec::new(),
        )
        .await
        .expect("delete answers");
    assert_eq!(r.status, StatusCode::CONFLICT, "a delete while ingesting");

    let f = c
        .wait_for_file(&t, "wq.csv", Duration::from_secs(300))
        .await
        .expect("status");
    assert_eq!(
        (f.state, f.records_ok, f.version),
        (FileState::Done, 9999, 1),
        "{f:?}"
    );
    assert_eq!(f.sha256, hex::encode(Sha256::digest(&body)));
    record_matches_disk(&app, &c, &t, "wq.csv").await;
    assert_eq!(app.count(&t, "wq").await, 9999);
    let logs = app.logs(&c, &t, "").await;
    let success = logs.iter().filter(|e| e.status == Status::Success).count();
    assert_eq!((success, logs.len()), (9999, 9999), "ingested once");

    // An upload racing an ingest request, round after round: whoever wins, the record, the
    // copy on disk and what was ingested agree. Small versions, so each round is quick.
    c.upload_file(&t, "wq.csv", "k\na\nb\n")
        .await
        .expect("a small version");
    let mongo = app.mongo().await;
    let wq = mongo
        .database(&format!("{}tenant_{t}", app.namespace))
        .collection::<Document>("wq");
    let mut version = 2;
    for round in 0..6_u64 {
        let content = format!("k\n{}\n{}\n", round * 10, round * 10 + 1);
        let sha = hex::encode(Sha256::digest(content.as_bytes()));
        let before = c.file(&t, "wq.csv").await.expect("status");
        let old_sha = before.sha256.clone();
        let (up, ing) = tokio::join!(c.upload_file(&t, "wq.csv", content), c.ingest(&t, "wq.csv"));
        assert!(up.is_ok() || conflict(&up), "round {round}: {up:?}");
        assert!(ing.is_ok() || conflict(&ing), "round {round}: {ing:?}");
        assert!(up.is_ok() || ing.is_ok(), "round {round}: someone wins");
        if up.is_ok() {
            version += 1;
        }
        let settled = eventually(Duration::from_secs(120), || async {
            c.file(&t, "wq.csv")
                .await
                .is_ok_and(|f| f.state != FileState::Ingesting)
        })
        .await;
        assert!(settled, "round {round}: the job ends");
        let f = c.file(&t, "wq.csv").await.expect("status");
        assert_eq!(f.version, version, "round {round}: {f:?}");
        let expect_sha = if up.is_ok() {
            sha.clone()
        } else {
            old_sha.clone()
        };
        assert_eq!(f.sha256, expect_sha, "round {round}: {f:?}");
        if let Ok(started) = &ing {
            // The job ran on the version its answer named: the one recorded, or the one
            // before if the job was done before the upload's compare-and-set.
            let ran = started.file.sha256.clone();
            if ran == expect_sha {
                assert_eq!(f.state, FileState::Done, "round {round}: {f:?}");
            } else {
                assert!(
                    up.is_ok() && ran == old_sha,
                    "round {round}: ran {ran}, {f:?}"
                );
                assert_eq!(f.state, FileState::Staged, "round {round}: {f:?}");
            }
            let ids: Vec<String> = (0..2).map(|i| format!("{}:{i}", &ran[..16])).collect();
            let n = wq
                .count_documents(doc! {"_id": {"$in": ids}})
                .await
                .expect("count");
            assert_eq!(n, 2, "round {round}: the version it ran is stored");
        }
        record_matches_disk(&app, &c, &t, "wq.csv").await;
    }
}

// ---- several batch managers, each its own process ----

/// A `mysimbdp serve <component>` child process, killed if dropped.
struct Proc {
    child: tokio::process::Child,
    addr: String,
    log: PathBuf,
}

impl Proc {
    async fn start(component: &str, overrides: &[String], infra: &Infra, log: PathBuf) -> Self {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("addr").to_string()
        };
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mysimbdp"));
        cmd.args(["serve", component]);
        for o in overrides
            .iter()
            .cloned()
            .chain([format!("http.listen=\"{addr}\"")])
        {
            cmd.arg("--set").arg(o);
        }
        let child = cmd
            .env("MONGODB_URI", &infra.mongodb_uri)
            .env("AMQP_URI", &infra.amqp_uri)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("`mysimbdp serve` starts");
        let mut p = Self { child, addr, log };
        let http = reqwest::Client::new();
        let healthy = eventually(Duration::from_secs(60), || {
            let url = format!("http://{}/healthz", p.addr);
            let http = http.clone();
            async move {
                http.get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        assert!(
            healthy && p.child.try_wait().expect("state").is_none(),
            "`serve {component}` did not become healthy; its log:\n{}",
            std::fs::read_to_string(&p.log).unwrap_or_default()
        );
        p
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// coredms and `n` batch managers sharing one staging directory, and stream managers, in
/// their own namespace.
struct Replicas {
    infra: Infra,
    ns: String,
    dir: PathBuf,
    coredms: Proc,
    batch: Vec<Proc>,
    stream: Vec<Proc>,
    overrides: Vec<String>,
}

impl Replicas {
    async fn start(n: usize, extra: &[&str]) -> Self {
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
        let ns = unique("rep") + "_";
        let dir = std::env::temp_dir().join(format!("mysimbdp-it-replicas-{ns}"));
        std::fs::create_dir_all(&dir).expect("test dir");
        let mut overrides = vec![
            format!("platform.namespace={ns}"),
            format!("staging.dir={}", dir.join("staging").display()),
            format!("auth.admin_token={ADMIN_TOKEN}"),
            "mongodb.max_pool_size=4".to_owned(),
            mysimbdp::testing::expiring_queues(),
        ];
        overrides.extend(extra.iter().map(|s| (*s).to_owned()));
        let coredms = Proc::start("coredms", &overrides, &infra, dir.join("coredms.log")).await;
        overrides.push(format!("http.coredms_url=\"{}\"", coredms.url()));
        let mut me = Self {
            infra,
            ns,
            dir,
            coredms,
            batch: Vec::new(),
            stream: Vec::new(),
            overrides,
        };
        for _ in 0..n {
            me.add_batch().await;
        }
        me
    }

    /// One more batch manager over the same coredms and staging directory.
    async fn add_batch(&mut self) {
        let log = self.dir.join(format!("batch-{}.log", self.batch.len()));
        let p = Proc::start("batch", &self.overrides, &self.infra, log).await;
        self.batch.push(p);
    }

    /// One more stream manager over the same coredms and broker.
    async fn add_stream(&mut self) {
        let log = self.dir.join(format!("stream-{}.log", self.stream.len()));
        let p = Proc::start("stream", &self.overrides, &self.infra, log).await;
        self.stream.push(p);
    }

    /// A client whose message and consumer requests go to stream manager `i`.
    fn stream_client(&self, i: usize, token: &str) -> Client {
        let s = self.stream[i].url();
        Client::split(
            &self.coredms.url(),
            Split {
                batch: s.clone(),
                stream: s,
            },
            Some(token),
        )
    }

    /// A client whose file requests go to batch manager `i`.
    fn client(&self, i: usize, token: &str) -> Client {
        let b = self.batch[i].url();
        Client::split(
            &self.coredms.url(),
            Split {
                batch: b.clone(),
                stream: b,
            },
            Some(token),
        )
    }

    async fn files(&self) -> mongodb::Collection<Document> {
        mongodb::Client::with_uri_str(&self.infra.mongodb_uri)
            .await
            .expect("driver")
            .database(&format!("{}customers", self.ns))
            .collection("files")
    }

    async fn documents(&self, db: &str, collection: &str) -> (u64, usize) {
        let c = mongodb::Client::with_uri_str(&self.infra.mongodb_uri)
            .await
            .expect("driver")
            .database(db)
            .collection::<Document>(collection);
        let n = c.count_documents(doc! {}).await.expect("count");
        let ids = c.distinct("_id", doc! {}).await.expect("distinct").len();
        (n, ids)
    }

    fn logs_of_all(&self) -> String {
        let mut out = String::new();
        let procs = self.batch.iter().map(|p| ("batch", p));
        for (i, (what, p)) in procs
            .chain(self.stream.iter().map(|p| ("stream", p)))
            .enumerate()
        {
            out.push_str(&format!(
                "--- {what} ({i}, {}):\n{}\n",
                p.log.display(),
                std::fs::read_to_string(&p.log).unwrap_or_default()
            ));
        }
        out
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn csv(file: usize, rows: usize) -> String {
    let mut s = String::from("file,row\n");
    for r in 0..rows {
        s.push_str(&format!("{file},{r}\n"));
    }
    s
}

async fn log_statuses(c: &Client, t: &str) -> (usize, usize, usize) {
    let logs = c.logs(t, "").await.expect("log download");
    let n = |s: Status| logs.iter().filter(|e| e.status == s).count();
    (n(Status::Success), n(Status::Duplicate), logs.len())
}

#[tokio::test]
async fn three_batch_managers_in_separate_processes_ingest_thirty_files_once_each() {
    let mut r = Replicas::start(2, &["batch.batch_size=25", "batch.lease_ms=3000"]).await;
    let admin = r.client(0, ADMIN_TOKEN);
    let tenant = admin
        .create_tenant("shared", AdminPatch::default())
        .await
        .expect("tenant");
    let mut clients: Vec<Client> = (0..2).map(|i| r.client(i, &tenant.token)).collect();
    let (files, rows) = (30, 100);
    for f in 0..files {
        if f == 20 {
            // A manager joining while the others' jobs run resumes none of them: they are
            // under live leases. It gets its share of what comes next.
            r.add_batch().await;
            clients.push(r.client(2, &tenant.token));
        }
        let c = &clients[f % clients.len()];
        let name = format!("f{f}.csv");
        c.upload_file(&tenant.name, &name, csv(f, rows))
            .await
            .expect("stage");
        c.ingest(&tenant.name, &name).await.expect("ingest");
    }
    for f in 0..files {
        let s = clients[0]
            .wait_for_file(&tenant.name, &format!("f{f}.csv"), Duration::from_secs(300))
            .await
            .expect("status");
        assert_eq!(
            (s.state, s.records_ok, s.records_duplicate, s.next_record),
            (FileState::Done, rows as u64, 0, rows as u64),
            "f{f}.csv: {s:?}\n{}",
            r.logs_of_all()
        );
    }
    let total = files * rows;
    let mut stored = (0, 0);
    for f in 0..files {
        let (n, ids) = r.documents(&tenant.database, &format!("f{f}")).await;
        stored = (stored.0 + n as usize, stored.1 + ids);
    }
    assert_eq!(stored, (total, total), "every record stored once");
    assert_eq!(
        log_statuses(&clients[1], &tenant.name).await,
        (total, 0, total),
        "one success entry per record, no duplicate: no job ran twice"
    );
}

#[tokio::test]
async fn a_batch_manager_killed_mid_file_loses_its_jobs_to_the_others_once_its_lease_expires() {
    let lease_ms = 1500_i64;
    let r = Replicas::start(
        3,
        &[
            "batch.batch_size=20",
            "batch.workers=1",
            &format!("batch.lease_ms={lease_ms}"),
        ],
    )
    .await;
    let admin = r.client(0, ADMIN_TOKEN);
    let tenant = admin
        .create_tenant("orphan", AdminPatch::default())
        .await
        .expect("tenant");
    let c0 = r.client(0, &tenant.token);
    let c1 = r.client(1, &tenant.token);
    // All jobs started through manager 0: it holds them all, one running, the rest queued.
    let (files, rows) = (6, 600);
    for f in 0..files {
        let name = format!("f{f}.csv");
        c0.upload_file(&tenant.name, &name, csv(f, rows))
            .await
            .expect("stage");
        c0.ingest(&tenant.name, &name).await.expect("ingest");
    }
    let coll = r.files().await;
    let running = || async {
        coll.find_one(doc! {"state": "ingesting", "next_record": {"$gte": 40}})
            .await
            .expect("files")
    };
    let mid = eventually(Duration::from_secs(120), || async {
        running().await.is_some()
    })
    .await;
    assert!(mid, "manager 0 got into a file\n{}", r.logs_of_all());
    let mut r = r;
    let mut victim = r.batch.remove(0);
    victim.child.kill().await.expect("SIGKILL");
    let killed_at = Instant::now();

    // Its jobs, as it left them: under its lease, which nobody renews now.
    let held: Vec<Document> = {
        use futures::TryStreamExt;
        coll.find(doc! {"state": "ingesting"})
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("files")
    };
    assert!(!held.is_empty());
    let owner = |d: &Document| {
        d.get_document("lease")
            .ok()
            .and_then(|l| l.get_str("owner").ok())
            .map(str::to_owned)
    };
    let expiry = |d: &Document| {
        d.get_document("lease")
            .ok()
            .and_then(|l| l.get_i64("expires_us").ok())
            .unwrap_or(0)
    };
    let dead = owner(&held[0]).expect("a lease");
    assert!(
        held.iter()
            .all(|d| owner(d).as_deref() == Some(dead.as_str())),
        "all manager 0's"
    );
    let expired_at: std::collections::HashMap<String, i64> = held
        .iter()
        .map(|d| (d.get_str("_id").expect("id").to_owned(), expiry(d)))
        .collect();

    // Another manager takes a job over, and not before its lease ran out.
    let until = Instant::now() + Duration::from_secs(60);
    let taken = loop {
        let d = coll
            .find_one(doc! {"state": "ingesting", "lease.owner": {"$ne": &dead}})
            .await
            .expect("files");
        if d.is_some() || Instant::now() > until {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(taken.is_some(), "a job taken over\n{}", r.logs_of_all());
    println!(
        "a job taken over {:?} after the kill (lease {lease_ms} ms)",
        killed_at.elapsed()
    );
    let d = taken.expect("checked");
    let id = d.get_str("_id").expect("id").to_owned();
    assert!(
        expiry(&d) - lease_ms * 1000 >= expired_at[&id],
        "claimed only after the dead manager's lease expired: {d}"
    );

    for f in 0..files {
        let s = c1
            .wait_for_file(&tenant.name, &format!("f{f}.csv"), Duration::from_secs(300))
            .await
            .expect("status");
        assert_eq!(
            (s.state, s.next_record),
            (FileState::Done, rows as u64),
            "f{f}.csv: {s:?}\n{}",
            r.logs_of_all()
        );
    }
    let total = files * rows;
    let mut stored = (0, 0);
    for f in 0..files {
        let (n, ids) = r.documents(&tenant.database, &format!("f{f}")).await;
        stored = (stored.0 + n as usize, stored.1 + ids);
    }
    assert_eq!(stored, (total, total), "every record stored once");
    let (success, duplicate, all) = log_statuses(&c1, &tenant.name).await;
    // The bulk in flight at the kill (after the last checkpoint) is written again by the
    // job's new owner, under the same job: its documents are this ingestion's, and their
    // log entries (ids derived from what they are about) are written once, whether the kill
    // came before or after them.
    assert_eq!(
        (success, duplicate, all),
        (total, 0, total),
        "one success entry per record, none twice"
    );
}

// ---- several stream managers, each its own process ----

fn messages(from: usize, to: usize) -> Vec<u8> {
    (from..to)
        .flat_map(|i| format!("{{\"seq\": {i}}}\n").into_bytes())
        .collect()
}

/// What every stream manager says of the tenant: (consumers running there, target, stored).
async fn stream_views(
    clients: &[Client],
    t: &str,
) -> Vec<(u32, Option<mysimbdp::api::ConsumerTarget>, u64)> {
    let mut out = Vec::new();
    for c in clients {
        let s = c.stream_status(t).await.expect("stream status");
        out.push((s.consumers, s.target, s.logged.stored));
    }
    out
}

/// Consumers subscribed to the tenant's queue, as the broker counts them.
async fn consumers_at_the_broker(r: &Replicas, tenant: &str) -> u32 {
    crate::harness::tenant_queue(&r.infra.amqp_uri, &r.ns, tenant)
        .await
        .consumer_count()
}

#[tokio::test]
async fn consumers_started_on_one_stream_manager_run_on_every_one_and_stop_from_any() {
    use mysimbdp::api::ConsumerTarget;
    let mut r = Replicas::start(0, &["stream.reconcile_ms=200"]).await;
    r.add_stream().await;
    r.add_stream().await;
    let admin = r.stream_client(0, ADMIN_TOKEN);
    let tenant = admin
        .create_tenant("competing", AdminPatch::default())
        .await
        .expect("tenant");
    let t = tenant.name.as_str();
    let mut clients: Vec<Client> = (0..2).map(|i| r.stream_client(i, &tenant.token)).collect();
    assert_eq!(
        clients[0]
            .stream_start(t, 2)
            .await
            .expect("start")
            .consumers,
        2,
        "the manager asked starts its consumers at once"
    );
    let two = Some(ConsumerTarget { min: 2, max: 2 });
    let all_run = eventually(Duration::from_secs(10), || async {
        stream_views(&clients, t)
            .await
            .iter()
            .all(|v| (v.0, v.1) == (2, two))
    })
    .await;
    assert!(
        all_run,
        "every manager runs the target: {:?}\n{}",
        stream_views(&clients, t).await,
        r.logs_of_all()
    );

    // A manager counts a consumer as running once started, before the broker has its
    // subscription: wait for all four there, or the first to subscribe take every message.
    let subscribed = eventually(Duration::from_secs(30), || async {
        consumers_at_the_broker(&r, t).await == 4
    })
    .await;
    assert!(
        subscribed,
        "four consumers subscribed at the broker: {}",
        consumers_at_the_broker(&r, t).await
    );
    // Published through either, consumed by whichever consumer gets each message.
    for (i, c) in clients.iter().enumerate() {
        c.publish(t, "reading", messages(i * 200, i * 200 + 200))
            .await
            .expect("publish");
    }
    let stored = eventually(Duration::from_secs(60), || async {
        stream_views(&clients, t).await.iter().all(|v| v.2 == 400)
    })
    .await;
    assert!(
        stored,
        "each manager counts the tenant's 400 stored messages from the log: {:?}",
        stream_views(&clients, t).await
    );
    let (n, ids) = r.documents(&tenant.database, "messages").await;
    assert_eq!((n, ids), (400, 400), "every message stored once");
    // The broker hands deliveries round the four consumers: each manager stored some.
    for p in &r.stream {
        let m = Client::new(&p.url(), Some(ADMIN_TOKEN))
            .raw(reqwest::Method::GET, "/metrics", None, Vec::new())
            .await
            .expect("metrics");
        let text = String::from_utf8_lossy(&m.body).into_owned();
        let series = format!(
            "mysimbdp_ingested_total{{tenant=\"{t}\",source=\"stream\",status=\"success\"}} "
        );
        let stored: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(stored > 0, "{} consumed nothing:\n{text}", p.url());
    }

    // A manager that starts later follows the target it finds.
    r.add_stream().await;
    clients.push(r.stream_client(2, &tenant.token));
    let joined = eventually(Duration::from_secs(10), || async {
        stream_views(&clients[2..], t).await[0].0 == 2
    })
    .await;
    assert!(joined, "a new manager starts the tenant's consumers");

    // Stopped through another manager: every one stops.
    assert_eq!(clients[1].stream_stop(t).await.expect("stop").consumers, 0);
    let stopped = eventually(Duration::from_secs(10), || async {
        stream_views(&clients, t)
            .await
            .iter()
            .all(|v| (v.0, v.1) == (0, None))
    })
    .await;
    assert!(
        stopped,
        "every manager stops: {:?}",
        stream_views(&clients, t).await
    );
    let report = clients[0].stream_report(t).await.expect("report");
    let replicas: std::collections::BTreeSet<&str> =
        report.scaling.iter().map(|d| d.replica.as_str()).collect();
    assert_eq!(
        replicas.len(),
        3,
        "each manager's changes are in the report: {:?}",
        report.scaling
    );
    assert!(
        report
            .scaling
            .iter()
            .any(|d| d.reason == "stream/stop" && d.from == 2 && d.to == 0),
        "{:?}",
        report.scaling
    );
}

#[tokio::test]
async fn a_backlog_makes_a_stream_manager_add_consumers_and_an_empty_queue_takes_them_away() {
    // Small batches and a backlog of 10,000, so that one consumer takes seconds over it (at
    // most a few hundred milliseconds pass between looks; 2,000 were gone in about a second
    // on a fast night, before the third consumer came).
    let app = TestApp::spawn_with(&[
        "stream.reconcile_ms=200",
        "stream.scale_up_depth=100",
        "stream.scale_up_ticks=2",
        "stream.scale_down_depth=0",
        "stream.scale_down_ticks=5",
        "stream.batch_size=20",
        "stream.prefetch=20",
    ])
    .await;
    let (t, c) = app.tenant("elastic").await;
    let n = 10_000;
    for i in (0..n).step_by(500) {
        c.publish(&t, "reading", messages(i, i + 500))
            .await
            .expect("publish");
    }
    assert_eq!(
        c.stream_start_range(&t, 1, 3)
            .await
            .expect("start")
            .consumers,
        1
    );
    let mut most = 0;
    let started = Instant::now();
    let mut stored = 0;
    while started.elapsed() < Duration::from_secs(240) {
        let s = c.stream_status(&t).await.expect("status");
        most = most.max(s.consumers);
        stored = s.logged.stored;
        if stored == n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stored, n as u64, "the backlog is stored");
    assert_eq!(most, 3, "the backlog took the consumers to the maximum");
    let back = eventually(Duration::from_secs(30), || async {
        c.stream_status(&t).await.is_ok_and(|s| s.consumers == 1)
    })
    .await;
    assert!(back, "an empty queue takes them back to the minimum");
    let scaling = c.stream_report(&t).await.expect("report").scaling;
    let ups: Vec<_> = scaling
        .iter()
        .filter(|d| d.to > d.from && d.from > 0)
        .collect();
    let downs: Vec<_> = scaling.iter().filter(|d| d.to < d.from).collect();
    assert_eq!(ups.len(), 2, "{scaling:?}");
    assert!(
        ups.iter()
            .all(|d| d.queue_depth.is_some_and(|q| q > 100) || d.max_latency_ms > 2000),
        "each addition saw the backlog: {scaling:?}"
    );
    assert_eq!(downs.len(), 2, "{scaling:?}");
    assert!(
        downs.iter().all(|d| d.queue_depth == Some(0)),
        "{scaling:?}"
    );
    assert_eq!(
        app.stream_metric("mysimbdp_consumers_added_total", &t, "controller")
            .await,
        2
    );
    assert_eq!(
        app.stream_metric("mysimbdp_consumers_removed_total", &t, "controller")
            .await,
        2
    );
}
