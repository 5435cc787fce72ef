//! Fair, bounded HTTP: one tenant's slow requests hold neither the other tenants nor
//! `/healthz`; slow bodies are cut off with 408; a tenant over its share gets 429; `/metrics`
//! names no tenant to the public; the admin token is checked at start; and the data broker
//! refuses JSON that is not JSON before publishing anything.

use std::time::{Duration, Instant};

use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{TestApp, eventually, unique};
use mysimbdp::logs::Status;
use mysimbdp::tenants::AdminPatch;

/// A response read off a raw connection.
struct RawAnswer {
    status: u16,
    head: String,
    body: String,
    after: Duration,
}

/// `PUT`s a file whose body trickles one byte every `every` (it announces 100,000 bytes),
/// over a raw connection, and returns the answer once the server gives one.
async fn slow_upload(
    addr: &str,
    tenant: &str,
    token: &str,
    name: &str,
    every: Duration,
) -> RawAnswer {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "PUT /v1/tenants/{tenant}/files/{name} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {token}\r\nContent-Type: text/csv\r\n\
         Content-Length: 100000\r\n\r\nid,v\n"
    );
    wr.write_all(head.as_bytes()).await.expect("send head");
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if wr.write_all(b"1").await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(Duration::from_secs(60), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = rd.read(&mut chunk).await.unwrap_or(0);
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len || n == 0 {
                    let body = String::from_utf8_lossy(&buf[end + 4..]).to_string();
                    return (head, body);
                }
            }
            assert!(n > 0, "connection closed without an answer: {buf:?}");
        }
    })
    .await
    .expect("the server answers a slow upload within 60 s");
    trickle.abort();
    let status = answer
        .0
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    RawAnswer {
        status,
        head: answer.0,
        body: answer.1,
        after: started.elapsed(),
    }
}

/// A plain-text GET (for `/metrics`).
async fn text(c: &mysimbdp::client::Client, path: &str) -> String {
    let r = c
        .raw(Method::GET, path, None, Vec::new())
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{path}");
    String::from_utf8_lossy(&r.body).into_owned()
}

/// Runs `f` and returns its result and how long it took, failing past `bound`.
async fn within<T>(what: &str, bound: Duration, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let out = tokio::time::timeout(bound, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not answer within {bound:?}"));
    eprintln!("{what}: answered in {:?}", t.elapsed());
    out
}

#[tokio::test]
async fn slow_uploads_of_one_tenant_hold_neither_other_tenants_nor_healthz_and_are_cut_off() {
    let body_timeout = Duration::from_millis(4000);
    let app = TestApp::spawn_with(&[
        "http.max_in_flight=6",
        "http.max_in_flight_per_tenant=3",
        "http.body_timeout_ms=4000",
        "http.queue_timeout_ms=500",
    ])
    .await;
    let addr = app.admin.base().trim_start_matches("http://").to_owned();
    let a = app
        .admin
        .create_tenant(&unique("slowa"), AdminPatch::default())
        .await
        .expect("tenant a");
    let (b, bc) = app.tenant(&unique("fastb")).await;

    // Tenant A opens eight uploads that trickle a byte every 200 ms, more than the six
    // global slots: three take A's share, five are over it.
    let slow: Vec<_> = (0..8)
        .map(|i| {
            let (addr, t, token) = (addr.clone(), a.name.clone(), a.token.clone());
            tokio::spawn(async move {
                slow_upload(
                    &addr,
                    &t,
                    &token,
                    &format!("slow{i}.csv"),
                    Duration::from_millis(200),
                )
                .await
            })
        })
        .collect();
    // While A's three are held, B and /healthz answer at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bound = Duration::from_secs(2);
    let h = within("/healthz during the attack", bound, async {
        app.admin
            .raw(Method::GET, "/healthz", None, Vec::new())
            .await
            .expect("healthz")
    })
    .await;
    assert_eq!(h.status, 200);
    within("tenant B's upload during the attack", bound, async {
        bc.upload_file(&b, "b.csv", "id,v\n1,2\n3,4\n")
            .await
            .expect("B stages a file")
    })
    .await;
    within("tenant B's ingest during the attack", bound, async {
        bc.ingest(&b, "b.csv").await.expect("B starts ingestion")
    })
    .await;
    within("tenant B's publish during the attack", bound, async {
        bc.publish(&b, "m", "{\"seq\":1}\n")
            .await
            .expect("B publishes")
    })
    .await;
    let f = bc
        .wait_for_file(&b, "b.csv", Duration::from_secs(30))
        .await
        .expect("file status");
    assert_eq!(f.records_ok, 2, "B's ingestion goes on: {f:?}");

    let mut answers = Vec::new();
    for s in slow {
        answers.push(s.await.expect("slow upload task"));
    }
    let too_many: Vec<&RawAnswer> = answers.iter().filter(|r| r.status == 429).collect();
    let cut: Vec<&RawAnswer> = answers.iter().filter(|r| r.status == 408).collect();
    assert_eq!(
        (too_many.len(), cut.len()),
        (5, 3),
        "{:?}",
        answers
            .iter()
            .map(|r| (r.status, &r.body))
            .collect::<Vec<_>>()
    );
    for r in &too_many {
        assert!(
            r.after < Duration::from_secs(2),
            "429 at once, not after {:?}",
            r.after
        );
        assert!(
            r.head.to_ascii_lowercase().contains("retry-after: 1"),
            "{}",
            r.head
        );
        let e: serde_json::Value = serde_json::from_str(&r.body).expect("JSON error");
        assert!(
            e["error"].as_str().is_some_and(|m| m.contains("in flight")),
            "{e}"
        );
    }
    for r in &cut {
        eprintln!("slow upload cut off with 408 after {:?}", r.after);
        assert!(
            r.after >= body_timeout && r.after < body_timeout + Duration::from_secs(4),
            "cut off after {:?}, timeout {body_timeout:?}",
            r.after
        );
        let e: serde_json::Value = serde_json::from_str(&r.body).expect("JSON error");
        assert!(
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("arrived too slowly")),
            "{e}"
        );
    }
    // A's share is free again, and nothing of the cut uploads was staged.
    let ac = app.admin.with_token(Some(&a.token));
    ac.upload_file(&a.name, "ok.csv", "id\n1\n")
        .await
        .expect("A uploads again once its slow requests are gone");
    let files = ac.files(&a.name).await.expect("files");
    assert_eq!(files.files.len(), 1, "{files:?}");
    let m = text(&app.admin, "/metrics").await;
    assert!(
        m.contains("mysimbdp_http_rejected_total{tenant=")
            && m.contains("status=\"tenant_limit\"} 5")
            && m.contains("status=\"body_timeout\"} 3"),
        "{m}"
    );
}

#[tokio::test]
async fn a_handler_slower_than_the_request_timeout_gets_503_with_retry_after() {
    // With the body check off, a trickling upload keeps its handler waiting: the request
    // timeout is what ends it.
    let app =
        TestApp::spawn_with(&["http.request_timeout_ms=1500", "http.body_timeout_ms=0"]).await;
    let addr = app.admin.base().trim_start_matches("http://").to_owned();
    let t = app
        .admin
        .create_tenant(&unique("stuck"), AdminPatch::default())
        .await
        .expect("tenant");
    let r = slow_upload(
        &addr,
        &t.name,
        &t.token,
        "stuck.csv",
        Duration::from_millis(100),
    )
    .await;
    eprintln!("stuck request answered {} after {:?}", r.status, r.after);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.after >= Duration::from_millis(1500) && r.after < Duration::from_secs(6),
        "{:?}",
        r.after
    );
    assert!(
        r.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        r.head
    );
    assert!(r.body.contains("not answered within 1500 ms"), "{}", r.body);
    // The dropped upload left no partial file behind.
    let left: Vec<_> = std::fs::read_dir(app.staging.join(&t.name))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let h = app
        .admin
        .raw(Method::GET, "/healthz", None, Vec::new())
        .await
        .expect("healthz");
    assert_eq!(h.status, 200);
}

#[tokio::test]
async fn public_metrics_name_no_tenant_and_the_admin_sees_each() {
    let app = TestApp::spawn().await;
    let name = unique("secretname");
    let (t, c) = app.tenant(&name).await;
    c.publish(&t, "m", "{\"a\":1}\n").await.expect("publish");
    let anyone = app.admin.with_token(None);
    let public = text(&anyone, "/metrics").await;
    assert!(
        public.contains("mysimbdp_published_total{source=\"stream\",status=\"success\"}"),
        "{public}"
    );
    assert!(
        !public.contains(&name) && !public.contains("tenant="),
        "{public}"
    );
    let forged = app.admin.with_token(Some("not-the-admin-token"));
    assert!(!text(&forged, "/metrics").await.contains(&name));
    let admin = text(&app.admin, "/metrics").await;
    assert!(admin.contains(&format!("tenant=\"{name}\"")), "{admin}");
}

#[tokio::test]
async fn a_short_admin_token_is_refused_at_start_with_the_reason() {
    let env: Vec<(String, String)> = ["MONGODB_URI", "AMQP_URI"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect();
    let settings =
        mysimbdp::config::Settings::load_from(None, &env, &["auth.admin_token=change-me".into()])
            .expect("settings load: the check is at start");
    let e = match mysimbdp::start(settings, mysimbdp::Component::All).await {
        Ok(_) => panic!("a 9-character admin token must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("auth.admin_token") && e.contains("9 characters") && e.contains("16"),
        "{e}"
    );

    // The binary says so and exits non-zero, before it touches any server.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mysimbdp"))
        .arg("serve")
        .env("MYSIMBDP_ADMIN_TOKEN", "short")
        .env("MYSIMBDP_LISTEN", "127.0.0.1:0")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("exits within 30 s")
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MYSIMBDP_ADMIN_TOKEN") && err.contains("5 characters"),
        "{err}"
    );
}

#[tokio::test]
async fn without_an_admin_token_the_admin_api_is_off_and_says_so() {
    let app = TestApp::spawn_with(&["auth.admin_token="]).await;
    assert!(app.settings.auth.admin_token.is_empty());
    let e = app
        .admin
        .create_tenant("nobody", AdminPatch::default())
        .await
        .expect_err("no admin");
    assert_eq!(e.status(), Some(reqwest::StatusCode::FORBIDDEN));
    assert!(e.to_string().contains("admin API is off"), "{e}");
    let r = app
        .admin
        .raw(Method::GET, "/v1/logs/summary", None, Vec::new())
        .await
        .expect("answer");
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|m| m.contains("admin API is off")),
        "{:?}",
        r.body
    );

    // The process announces it.
    let dir = std::env::temp_dir().join(unique("mysimbdp-it-noadmin-"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mysimbdp"))
        .arg("serve")
        .env_remove("MYSIMBDP_ADMIN_TOKEN")
        .env("MYSIMBDP_LISTEN", "127.0.0.1:0")
        .env("MYSIMBDP_STAGING_DIR", &dir)
        .env("MYSIMBDP_PLATFORM__NAMESPACE", unique("n") + "_")
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("runs");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    let announced = tokio::time::timeout(Duration::from_secs(30), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stderr.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&seen).contains("admin API off") {
                return true;
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(announced, "{}", String::from_utf8_lossy(&seen));
}

/// Documents in the tenant's `messages` collection and its log entries by status, once the
/// log holds `entries` entries (within 60 s).
async fn settled(
    app: &TestApp,
    c: &mysimbdp::client::Client,
    t: &str,
    entries: usize,
) -> Vec<mysimbdp::api::LogEntry> {
    let done = eventually(Duration::from_secs(60), || async {
        app.logs(c, t, "").await.len() >= entries
    })
    .await;
    let logs = app.logs(c, t, "").await;
    assert!(
        done,
        "{} log entries, expected {entries}: {logs:?}",
        logs.len()
    );
    logs
}

#[tokio::test]
async fn the_broker_refuses_json_that_is_not_json_naming_the_line_and_publishes_nothing() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant(&unique("json")).await;
    c.upload_app(&t, "stream", "function map(m) return { seq = m.seq } end")
        .await
        .expect("app");
    let path = format!("/v1/tenants/{t}/messages?data_name=m");
    let mut ndjson = String::new();
    for seq in 0..10 {
        ndjson.push_str(&if seq == 6 {
            "{\"seq\": 6,}\n".to_owned()
        } else {
            format!("{{\"seq\":{seq}}}\n")
        });
    }
    let r = c
        .raw(Method::POST, &path, Some("application/x-ndjson"), ndjson)
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "{:?}", r.body);
    let e = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        e.starts_with("line 7: invalid JSON: ")
            && e.contains("nothing of this request was published"),
        "{e}"
    );
    let mut bad_utf8 = b"{\"seq\":1}\n\n{\"seq\":\"".to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(b"\"}\n");
    let r = c
        .raw(
            Method::POST,
            &path,
            Some("application/x-ndjson"),
            bad_utf8.clone(),
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|m| m.starts_with("line 3: invalid UTF-8")),
        "{:?}",
        r.body
    );
    for (ct, body) in [
        ("application/json", b"{\"seq\":\"\xff\"}".to_vec()),
        ("application/json", b"{\"seq\": 1".to_vec()),
        ("text/plain", b"caf\xe9".to_vec()),
    ] {
        let r = c
            .raw(Method::POST, &path, Some(ct), body)
            .await
            .expect("answer");
        assert_eq!(r.status, 400, "{ct}: {:?}", r.body);
    }

    // Then one good message, and one that is not JSON sent as text (accepted, as for an
    // `ingest` app; this map app's consumer dead-letters it). The consumer sees those two
    // only: none of the refused requests reached the queue.
    c.publish(&t, "m", "{\"seq\":100}\n")
        .await
        .expect("publish");
    let r = c
        .raw(Method::POST, &path, Some("text/plain"), "seq=101")
        .await
        .expect("answer");
    assert_eq!(r.status, 202, "{:?}", r.body);
    c.stream_start(&t, 1).await.expect("start");
    let logs = settled(&app, &c, &t, 2).await;
    // Anything else in the queue would have been consumed by now, in order, before these.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs_after = app.logs(&c, &t, "").await;
    assert_eq!(logs_after.len(), 2, "{logs_after:?}");
    let statuses: Vec<Status> = logs.iter().map(|e| e.status).collect();
    assert!(
        statuses.contains(&Status::Success) && statuses.contains(&Status::Failure),
        "{logs:?}"
    );
    let failure = logs
        .iter()
        .find(|e| e.status == Status::Failure)
        .expect("failure entry");
    assert!(
        failure
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("invalid JSON message")),
        "{failure:?}"
    );
    assert_eq!(app.count(&t, "messages").await, 1);
    c.stream_stop(&t).await.expect("stop");
}

#[tokio::test]
async fn raw_payloads_reach_an_ingest_app_as_sent() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant(&unique("raw")).await;
    c.upload_app(
        &t,
        "stream",
        "function ingest(tenant, name, data) emit({ raw = data, name = name }) end",
    )
    .await
    .expect("app");
    let path = format!("/v1/tenants/{t}/messages?data_name=rows");
    let sent = [
        ("text/plain; charset=utf-8", "a,b\n1,2\n  not json {\n"),
        ("application/octet-stream", "plain bytes: ü ∑ \t end"),
        ("application/json", "[1, \"two\", {\"three\": 3}]"),
    ];
    for (ct, body) in sent {
        let r = c
            .raw(Method::POST, &path, Some(ct), body)
            .await
            .expect("answer");
        assert_eq!(r.status, 202, "{ct}: {:?}", r.body);
    }
    c.stream_start(&t, 1).await.expect("start");
    let stored = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await == 3
    })
    .await;
    assert!(stored, "stored {}", app.count(&t, "messages").await);
    let docs = c.documents(&t, "messages", 10, 0).await.expect("documents");
    let mut raws: Vec<String> = docs
        .documents
        .iter()
        .map(|d| d["raw"].as_str().expect("raw").to_owned())
        .collect();
    raws.sort();
    let mut want: Vec<String> = sent.iter().map(|(_, b)| (*b).to_owned()).collect();
    want.sort();
    assert_eq!(raws, want, "stored exactly as sent");
    c.stream_stop(&t).await.expect("stop");
}
