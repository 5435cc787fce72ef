//! Hostile tenant apps against the whole platform: output bombs built from shared
//! references, limits caught with `pcall`/`xpcall`, and built-ins that backtrack. Each attack
//! runs as tenant A's app on one record of a small file while tenant B ingests an ordinary
//! file beside it: the platform keeps answering, B's data is all stored, A's hostile record
//! fails with a reason naming the limit, A's good records are stored exactly once, and the
//! attack holds a worker for seconds at most (the elapsed times and the test process's peak
//! memory are printed for the closing note).

use std::time::{Duration, Instant};

use mysimbdp::client::Client;

use crate::harness::{TestApp, eventually};

/// How long a file under attack may take, from ingest request to done.
const ATTACK_BOUND: Duration = Duration::from_secs(20);
/// Rows in B's file for each attack.
const B_ROWS: usize = 200;
/// Rows in A's file: all good but the one at `HOSTILE_ROW`.
const A_ROWS: usize = 10;
const HOSTILE_ROW: usize = 5;

/// Peak resident memory of this test process so far (all tests in it, platform included).
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The first `rows` records of the water-quality dataset, as CSV.
fn bystander_csv(rows: usize) -> String {
    let all = std::fs::read_to_string(crate::harness::water_quality()).expect("dataset");
    all.lines().take(rows + 1).collect::<Vec<_>>().join("\n") + "\n"
}

/// A's records: `{"n": i}`, the hostile one marked `"attack": true`.
fn a_file() -> String {
    (0..A_ROWS)
        .map(|n| {
            if n == HOSTILE_ROW {
                format!("{{\"n\":{n},\"attack\":true}}\n")
            } else {
                format!("{{\"n\":{n}}}\n")
            }
        })
        .collect()
}

/// A map app that stores `{n}` for good records and runs `attack` on the marked one.
fn map_app(attack: &str) -> String {
    format!(
        "function map(r)\n  if r.attack then\n    {attack}\n  end\n  return {{ n = r.n }}\nend\n"
    )
}

struct Tenants {
    a: String,
    ac: Client,
    b: String,
    bc: Client,
}

async fn tenants(app: &TestApp) -> Tenants {
    let (a, ac) = app.tenant("hostile").await;
    let (b, bc) = app.tenant("bystander").await;
    Tenants { a, ac, b, bc }
}

async fn healthy(app: &TestApp) {
    let r = app
        .admin
        .raw(reqwest::Method::GET, "/healthz", None, Vec::new())
        .await
        .expect("the platform answers");
    assert!(r.status.is_success(), "/healthz answered {}", r.status);
}

/// Distinct values of `field` in a collection of a tenant's database, and the document count.
async fn distinct(app: &TestApp, tenant: &str, collection: &str, field: &str) -> (u64, usize) {
    let db = app
        .mongo()
        .await
        .database(&format!("{}tenant_{tenant}", app.namespace));
    let coll = db.collection::<mongodb::bson::Document>(collection);
    let total = coll
        .count_documents(mongodb::bson::doc! {})
        .await
        .expect("count");
    let values = coll
        .distinct(field, mongodb::bson::doc! {})
        .await
        .expect("distinct");
    (total, values.len())
}

/// Stages and starts B's ordinary file for one attack; returns its name.
async fn start_bystander(t: &Tenants, name: &str) -> String {
    let file = format!("{name}.csv");
    t.bc.upload_file(&t.b, &file, bystander_csv(B_ROWS))
        .await
        .expect("B stages");
    t.bc.ingest(&t.b, &file).await.expect("B ingests");
    file
}

/// B's file is done with every record stored.
async fn bystander_done(app: &TestApp, t: &Tenants, file: &str) {
    let f =
        t.bc.wait_for_file(&t.b, file, Duration::from_secs(120))
            .await
            .expect("B's status");
    assert_eq!(
        (f.state.as_str(), f.records_ok),
        ("done", B_ROWS as u64),
        "B's file {file}: {f:?}"
    );
    let collection = file.trim_end_matches(".csv");
    assert_eq!(app.count(&t.b, collection).await, B_ROWS as u64);
}

/// Runs one attack as A's batch map app over A's file while B ingests, and checks everything
/// the module promises.
async fn map_attack(app: &TestApp, t: &Tenants, name: &str, attack: &str, reason: &str) {
    t.ac.upload_app(&t.a, "batch", &map_app(attack))
        .await
        .expect("the hostile app compiles");
    let b_file = start_bystander(t, &format!("b-{name}")).await;
    let file = format!("{name}.ndjson");
    t.ac.upload_file(&t.a, &file, a_file())
        .await
        .expect("A stages");
    let started = Instant::now();
    t.ac.ingest(&t.a, &file).await.expect("A ingests");
    let f =
        t.ac.wait_for_file(&t.a, &file, ATTACK_BOUND)
            .await
            .expect("A's status");
    let took = started.elapsed();
    eprintln!(
        "attack `{name}`: A's file done in {took:?} (peak RSS of the test process {})",
        peak_rss()
    );
    assert_eq!(
        (f.state.as_str(), f.records_ok, f.records_failed),
        ("done", A_ROWS as u64 - 1, 1),
        "{name}: A's file was not done within {ATTACK_BOUND:?}: {f:?}"
    );
    healthy(app).await;
    let failures: Vec<mysimbdp::api::LogEntry> = app
        .logs(&t.ac, &t.a, "status=failure")
        .await
        .into_iter()
        .filter(|e| e.data_name == file.as_str())
        .collect();
    assert_eq!(failures.len(), 1, "{name}: {failures:?}");
    let logged = failures[0].reason.as_deref().unwrap_or_default();
    assert!(
        logged.contains(reason),
        "{name}: the logged reason `{logged}` does not name `{reason}`"
    );
    assert_eq!(
        distinct(app, &t.a, name, "n").await,
        (A_ROWS as u64 - 1, A_ROWS - 1),
        "{name}: A's good records are stored exactly once"
    );
    bystander_done(app, t, &b_file).await;
}

#[tokio::test]
async fn output_bombs_from_map_fail_only_their_record() {
    let app = TestApp::spawn().await;
    let t = tenants(&app).await;
    map_attack(
        &app,
        &t,
        "sharedstring",
        r#"local s = string.rep("x", 1e6); local t = {}; for i = 1, 1000 do t[i] = s end; return {a = t}"#,
        "1048576 bytes document limit",
    )
    .await;
    map_attack(
        &app,
        &t,
        "sharedtable",
        "local t = {1}; for i = 1, 40 do t = {t, t} end; return {x = t}",
        "1048576 bytes document limit",
    )
    .await;
}

#[tokio::test]
async fn limits_caught_with_pcall_or_xpcall_still_fail_the_record() {
    let app = TestApp::spawn().await;
    let t = tenants(&app).await;
    map_attack(
        &app,
        &t,
        "pcallloop",
        "while true do pcall(function() while true do end end) end",
        "time limit",
    )
    .await;
    map_attack(
        &app,
        &t,
        "xpcallhandler",
        "while true do xpcall(function() while true do end end, function(e) while true do end end) end",
        "time limit",
    )
    .await;
    map_attack(
        &app,
        &t,
        "pcallmemory",
        // Two large allocations reach the memory limit long before the time limit, even
        // in a debug build on a busy machine.
        r#"pcall(function() local s = string.rep("x", 2^24); local t = { s .. s, s .. "y" } end)"#,
        "memory limit",
    )
    .await;
}

#[tokio::test]
async fn backtracking_patterns_fail_only_their_record() {
    let app = TestApp::spawn().await;
    let t = tenants(&app).await;
    // Minutes of backtracking in C if nothing interrupted it.
    map_attack(
        &app,
        &t,
        "pattern",
        r#"local s = string.rep("a", 5000); while true do pcall(string.find, s, ".-.-.-.-.-.-.-.-b") end"#,
        "time limit",
    )
    .await;
}

#[tokio::test]
async fn emitted_bombs_fail_their_input_and_the_next_file_is_stored_once() {
    let app = TestApp::spawn().await;
    let t = tenants(&app).await;
    // An ingest app gets the whole file as one input: the attack fails that input.
    t.ac.upload_app(
        &t.a,
        "batch",
        r#"
        function ingest(tenant, name, data)
            for line in string.gmatch(data, "[^\n]+") do
                local r = parse_json(line)
                if r.attack then
                    local x = {1}
                    for i = 1, 40 do x = {x, x} end
                    pcall(emit, "rows", {x = x})
                    local s = string.rep("y", 1e6)
                    for i = 1, 100000 do pcall(emit, "rows", {s = s}) end
                end
                emit("rows", {n = r.n})
            end
        end"#,
    )
    .await
    .expect("upload");
    let b_file = start_bystander(&t, "b-emits").await;
    t.ac.upload_file(&t.a, "bomb.ndjson", a_file())
        .await
        .expect("stage");
    let started = Instant::now();
    t.ac.ingest(&t.a, "bomb.ndjson").await.expect("ingest");
    let f =
        t.ac.wait_for_file(&t.a, "bomb.ndjson", ATTACK_BOUND)
            .await
            .expect("status");
    eprintln!(
        "attack `emit bombs`: A's file done in {:?} (peak RSS of the test process {})",
        started.elapsed(),
        peak_rss()
    );
    assert_eq!((f.state.as_str(), f.records_failed), ("done", 1), "{f:?}");
    healthy(&app).await;
    let logs = app.logs(&t.ac, &t.a, "status=failure").await;
    let reason = logs
        .iter()
        .find(|e| e.data_name == "bomb.ndjson")
        .and_then(|e| e.reason.as_deref())
        .unwrap_or("");
    assert!(
        reason.contains("1048576 bytes document limit"),
        "reason `{reason}`"
    );
    assert_eq!(
        app.count(&t.a, "rows").await,
        0,
        "the failed input stored nothing"
    );
    // The same app on a good file: a fresh VM, every record once.
    let good: String = (0..A_ROWS).map(|n| format!("{{\"n\":{n}}}\n")).collect();
    t.ac.upload_file(&t.a, "good.ndjson", good)
        .await
        .expect("stage");
    t.ac.ingest(&t.a, "good.ndjson").await.expect("ingest");
    let f =
        t.ac.wait_for_file(&t.a, "good.ndjson", ATTACK_BOUND)
            .await
            .expect("status");
    assert_eq!(f.state.as_str(), "done", "{f:?}");
    assert_eq!(
        distinct(&app, &t.a, "rows", "n").await,
        (A_ROWS as u64, A_ROWS)
    );
    bystander_done(&app, &t, &b_file).await;
}

#[tokio::test]
async fn a_stream_app_caught_in_a_pcall_loop_is_dead_lettered_without_blocking_others() {
    let app = TestApp::spawn().await;
    let t = tenants(&app).await;
    t.ac.upload_app(
        &t.a,
        "stream",
        &map_app("while true do pcall(function() while true do end end) end"),
    )
    .await
    .expect("upload");
    let body: String = a_file();
    t.ac.publish(&t.a, "hostile", body).await.expect("publish");
    let started = Instant::now();
    t.ac.stream_start(&t.a, 1).await.expect("A starts");
    // B starts and stops its consumers while A's consumer meets the attack: each answer is
    // bounded, where a worker held forever would block them.
    for round in 0..3 {
        let s = Instant::now();
        tokio::time::timeout(Duration::from_secs(20), t.bc.stream_start(&t.b, 1))
            .await
            .expect("B's stream/start answers within 20 s")
            .expect("B's stream/start");
        tokio::time::timeout(Duration::from_secs(20), t.bc.stream_stop(&t.b))
            .await
            .expect("B's stream/stop answers within 20 s")
            .expect("B's stream/stop");
        eprintln!("B's stream start+stop, round {round}: {:?}", s.elapsed());
    }
    let b_msgs: String = (0..100).map(|i| format!("{{\"seq\":{i}}}\n")).collect();
    t.bc.publish(&t.b, "reading", b_msgs)
        .await
        .expect("B publishes");
    t.bc.stream_start(&t.b, 1).await.expect("B starts");
    let stored = eventually(ATTACK_BOUND, || async {
        app.count(&t.a, "messages").await >= A_ROWS as u64 - 1
            && app.logs(&t.ac, &t.a, "status=failure").await.len() == 1
    })
    .await;
    eprintln!(
        "attack `stream pcall loop`: A's messages handled in {:?} (peak RSS of the test process {})",
        started.elapsed(),
        peak_rss()
    );
    assert!(
        stored,
        "A's messages were not all handled within {ATTACK_BOUND:?}"
    );
    healthy(&app).await;
    let logs = app.logs(&t.ac, &t.a, "status=failure").await;
    let reason = logs[0].reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("time limit") || reason.contains("instruction budget"),
        "reason `{reason}`"
    );
    assert_eq!(
        distinct(&app, &t.a, "messages", "n").await,
        (A_ROWS as u64 - 1, A_ROWS - 1)
    );
    let b_all = eventually(Duration::from_secs(60), || async {
        app.count(&t.b, "messages").await >= 100
    })
    .await;
    assert!(b_all, "B stored {}", app.count(&t.b, "messages").await);
    t.ac.stream_stop(&t.a).await.expect("A stops");
    t.bc.stream_stop(&t.b).await.expect("B stops");

    // The hostile message is in A's dead-letter queue, with the limit as its reason.
    let dead = crate::harness::dead_letters(&app.namespace, &t.a).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].0.contains("\"attack\":true"), "{dead:?}");
    assert!(
        dead[0].1.contains("time limit") || dead[0].1.contains("instruction budget"),
        "{dead:?}"
    );
}
