use std::time::Duration;

use crate::harness::TestApp;
use crate::harness::patch;

const MAP_APP: &str = r#"
function map(r)
    local v = tonumber(r.result)
    if v == nil then return nil end
    return { site = r["sample.samplingPoint.notation"], determinand = r["determinand.label"], value = v }
end
"#;

#[tokio::test]
async fn a_map_app_transforms_every_record_and_new_versions_apply_to_the_next_file() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("mapper").await;
    let v = c.upload_app(&t, "batch", MAP_APP).await.expect("upload");
    assert_eq!((v.version, v.functions.map), (1, true));
    c.upload_file(
        &t,
        "s.csv",
        "sample.samplingPoint.notation,determinand.label,result\nAN-1,pH,7.5\nAN-2,Temp,n/a\n",
    )
    .await
    .expect("stage");
    c.ingest(&t, "s.csv").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "s.csv", Duration::from_secs(60))
        .await
        .expect("status");
    assert_eq!(
        (
            Some(f.state.as_str()),
            Some(f.records_ok),
            f.app_version.map(u64::from)
        ),
        (Some("done"), Some(1), Some(1))
    );
    let docs = c.documents(&t, "s", 10, 0).await.expect("docs");
    let d = &docs.documents[0];
    assert_eq!(
        (d["site"].as_str(), d["value"].as_f64()),
        (Some("AN-1"), Some(7.5))
    );

    let v2 = c
        .upload_app(
            &t,
            "batch",
            "function map(r) return { upper = string.upper(r.k) } end",
        )
        .await
        .expect("second version");
    assert_eq!(v2.version, 2);
    c.upload_file(&t, "t.csv", "k\nabc\n").await.expect("stage");
    c.ingest(&t, "t.csv").await.expect("ingest");
    c.wait_for_file(&t, "t.csv", Duration::from_secs(60))
        .await
        .expect("status");
    let docs = c.documents(&t, "t", 10, 0).await.expect("docs");
    assert_eq!(docs.documents[0]["upper"], "ABC");
}

#[tokio::test]
async fn a_syntax_error_is_a_400_with_the_line_and_the_previous_version_stays() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("syntax").await;
    c.upload_app(&t, "stream", MAP_APP).await.expect("v1");
    let e = c
        .upload_app(
            &t,
            "stream",
            "function map(r)\n  local x = \n  return x\nend\n",
        )
        .await
        .expect_err("syntax error");
    assert_eq!(e.status(), Some(reqwest::StatusCode::BAD_REQUEST));
    let mysimbdp::client::ClientError::Api { body, .. } = e else {
        panic!("api error expected")
    };
    assert_eq!(body.details["line"], 3, "{body:?}");
    assert!(body.error.contains("line 3"), "{}", body.error);
    let cur = c.app(&t, "stream").await.expect("current app");
    assert_eq!(cur.version, 1);
    let e = c
        .upload_app(&t, "nonsense", MAP_APP)
        .await
        .expect_err("unknown kind");
    assert_eq!(e.status(), Some(reqwest::StatusCode::NOT_FOUND));
}

#[tokio::test]
async fn an_ingest_app_emits_many_documents_into_two_collections() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("emitter").await;
    c.upload_app(
        &t,
        "batch",
        r#"
        function ingest(tenant, name, data)
            local rows = parse_json(data)
            for _, row in ipairs(rows) do
                emit("readings", { v = row.v, from = name })
                if row.v > 5 then emit("alerts", { v = row.v, tenant = tenant }) end
            end
        end"#,
    )
    .await
    .expect("upload");
    let rows: Vec<serde_json::Value> = (1..=10).map(|v| serde_json::json!({"v": v})).collect();
    c.upload_file(&t, "r.json", serde_json::to_vec(&rows).expect("json"))
        .await
        .expect("stage");
    c.ingest(&t, "r.json").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "r.json", Duration::from_secs(60))
        .await
        .expect("status");
    assert_eq!(f.state.as_str(), "done", "{f:?}");
    assert_eq!(app.count(&t, "readings").await, 10);
    assert_eq!(app.count(&t, "alerts").await, 5);
}

#[tokio::test]
async fn hostile_apps_are_stopped_with_named_reasons_while_others_are_served() {
    let app = TestApp::spawn().await;
    let (good, gc) = app.tenant("good").await;
    let (bad, bc) = app.tenant("bad").await;
    let hostile = [
        (
            "loop",
            "function map(r) while true do end end",
            "time limit",
        ),
        (
            "recurse",
            "local function f(n) return f(n+1)+1 end function map(r) return f(1) end",
            "stack overflow",
        ),
        (
            "bomb",
            "function map(r) local s = string.rep('x', 1024) while true do s = s .. s end end",
            "memory limit",
        ),
        (
            "escape",
            "function map(r) return { x = os.execute('id') } end",
            "app error",
        ),
        (
            "files",
            "function map(r) return { x = io.open('/etc/passwd') } end",
            "app error",
        ),
        (
            "load",
            "function map(r) return require('socket') end",
            "app error",
        ),
    ];
    gc.upload_app(&good, "batch", MAP_APP)
        .await
        .expect("good app");
    let body = std::fs::read(crate::harness::water_quality()).expect("dataset");
    gc.upload_file(&good, "wq.csv", body).await.expect("stage");
    gc.ingest(&good, "wq.csv").await.expect("ingest");
    for (name, src, reason) in hostile {
        bc.upload_app(&bad, "batch", src)
            .await
            .expect("hostile app uploads: it compiles");
        let file = format!("{name}.ndjson");
        bc.upload_file(&bad, &file, "{\"a\":1}\n{\"a\":2}\n")
            .await
            .expect("stage");
        bc.ingest(&bad, &file).await.expect("ingest");
        let f = bc
            .wait_for_file(&bad, &file, Duration::from_secs(60))
            .await
            .expect("status");
        assert_eq!(
            (f.state.as_str(), f.records_failed),
            ("done", 2),
            "{name}: {f:?}"
        );
        let logs = app.logs(&bc, &bad, "status=failure").await;
        let last = logs.last().expect("a failure entry");
        let r = last.reason.as_deref().unwrap_or("");
        let limit_reason =
            r.contains(reason) || (name == "loop" && r.contains("instruction budget"));
        assert!(limit_reason, "{name}: reason was `{r:?}`");
    }
    let f = gc
        .wait_for_file(&good, "wq.csv", Duration::from_secs(120))
        .await
        .expect("status");
    assert_eq!(f.state.as_str(), "done", "{f:?}");
    assert_eq!(f.records_failed, 0);
}

#[tokio::test]
async fn a_million_emits_fail_that_file_only() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("emits").await;
    // The admin overrides this tenant's limits; the time limit is raised so the emit limit trips.
    app.admin
        .patch_tenant(
            &t,
            &patch(serde_json::json!({"app_limits": {"max_emits": 1000, "time_ms": 10000}})),
        )
        .await
        .expect("admin sets app limits");
    c.upload_app(
        &t,
        "batch",
        "function ingest(t, n, d) for i = 1, 1000000 do emit({i = i}) end end",
    )
    .await
    .expect("upload");
    c.upload_file(&t, "x.json", "{}").await.expect("stage");
    c.ingest(&t, "x.json").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "x.json", Duration::from_secs(60))
        .await
        .expect("status");
    assert_eq!(f.records_failed, 1, "{f:?}");
    let logs = app.logs(&c, &t, "status=failure").await;
    assert!(
        logs[0]
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("1000 emitted documents limit"),
        "{logs:?}"
    );
    assert_eq!(app.count(&t, "x").await, 0);
}
