//! The split topology: `mysimbdp serve coredms`, `serve batch` and `serve stream` as three
//! real processes, the two ingest managers reaching coredms only over HTTP.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use mysimbdp::client::{Client, Split};
use mysimbdp::config::Settings;
use mysimbdp::infra::Infra;

use crate::harness::{ADMIN_TOKEN, eventually, messages_stored, unique};

/// Three component processes; killed when dropped.
struct Components {
    children: Vec<(String, tokio::process::Child, PathBuf)>,
    dir: PathBuf,
}

impl Drop for Components {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.children {
            let _ = c.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("address").to_string()
}

impl Components {
    async fn start(infra: &Infra, ns: &str) -> (Self, Vec<String>) {
        let dir = std::env::temp_dir().join(format!("mysimbdp-it-split-{ns}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut me = Self {
            children: Vec::new(),
            dir: dir.clone(),
        };
        let mut addrs: Vec<String> = Vec::new();
        for component in ["coredms", "batch", "stream"] {
            let addr = free_addr();
            let mut sets = vec![
                format!("platform.namespace={ns}"),
                format!("staging.dir={}", dir.join("staging").display()),
                format!("auth.admin_token={ADMIN_TOKEN}"),
                format!("http.listen={addr}"),
                "mongodb.max_pool_size=4".to_owned(),
            ];
            if component != "coredms" {
                sets.push(format!("http.coredms_url=http://{}", addrs[0]));
            }
            let log = dir.join(format!("{component}.log"));
            let out = std::fs::File::create(&log).expect("log file");
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mysimbdp"));
            cmd.arg("serve").arg(component);
            for s in &sets {
                cmd.arg("--set").arg(s);
            }
            let child = cmd
                .env("MONGODB_URI", &infra.mongodb_uri)
                .env("AMQP_URI", &infra.amqp_uri)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log file"))
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .expect("mysimbdp serve starts");
            me.children.push((component.to_owned(), child, log.clone()));
            let http = reqwest::Client::new();
            let healthy = eventually(Duration::from_secs(60), || {
                let url = format!("http://{addr}/healthz");
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
                healthy,
                "`serve {component}` did not become healthy; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            addrs.push(addr);
        }
        (me, addrs)
    }

    /// SIGTERM to each, coredms last; each must drain and exit 0.
    async fn stop(mut self) {
        for (name, c, log) in self.children.iter_mut().rev() {
            let pid = c.id().expect("running");
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let status = tokio::time::timeout(Duration::from_secs(30), c.wait())
                .await
                .unwrap_or_else(|_| panic!("{name} did not drain within 30 s"))
                .expect("wait");
            assert!(
                status.success(),
                "{name} exited with {status}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

#[tokio::test]
async fn a_split_deployment_ingests_batch_files_and_streams_over_http() {
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
    let (components, addrs) = Components::start(&infra, &ns).await;
    let admin = Client::split(
        &format!("http://{}", addrs[0]),
        Split {
            batch: format!("http://{}", addrs[1]),
            stream: format!("http://{}", addrs[2]),
        },
        Some(ADMIN_TOKEN),
    );
    let t = admin
        .create_tenant("split", serde_json::json!({}))
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
    let batch_only = Client::new(&format!("http://{}", addrs[1]), Some(ADMIN_TOKEN));
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
    assert_eq!(
        (f["state"].as_str(), f["records_ok"].as_u64()),
        (Some("done"), Some(500)),
        "{f}"
    );
    let db = t.database.clone();
    let stored = eventually(Duration::from_secs(60), || {
        let (uri, db) = (infra.mongodb_uri.clone(), db.clone());
        async move { messages_stored(&uri, &db).await == (300, 300) }
    })
    .await;
    assert!(
        stored,
        "300 messages stored once each, got {:?}",
        messages_stored(&infra.mongodb_uri, &db).await
    );
    let status = c.stream_status(&t.name).await.expect("stream status");
    assert_eq!(status["consumers"], 1, "{status}");
    assert_eq!(status["since_start"]["stored"], 300, "{status}");

    // The log, kept by coredms, has every ingestion of both managers.
    let logs = c.logs(&t.name, "status=success").await.expect("logs");
    let logs: Vec<serde_json::Value> = serde_json::from_slice(&logs.body).expect("JSON");
    let by = |s: &str| logs.iter().filter(|e| e["source"] == s).count();
    assert_eq!((by("batch"), by("stream")), (500, 300));
    let doc = &c
        .documents(&t.name, "readings", 1, 0)
        .await
        .expect("documents")["documents"][0];
    assert_eq!(doc["seen"], t.name.as_str(), "the app ran: {doc}");

    c.stream_stop(&t.name).await.expect("stop consumers");
    components.stop().await;
}
