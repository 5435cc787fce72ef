//! Bad input on every surface gets a clear error for that input and disturbs nothing else.

use std::time::Duration;

use reqwest::Method;

use crate::harness::TestApp;
use crate::harness::patch;

#[tokio::test]
async fn malformed_bodies_and_wrong_content_types_get_4xx_json_errors_everywhere() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("bodies").await;
    let admin_json = [
        (Method::POST, "/v1/tenants".to_owned()),
        (Method::PATCH, format!("/v1/tenants/{t}")),
    ];
    let tenant_json = [(Method::POST, format!("/v1/tenants/{t}/stream/start"))];
    let cases: Vec<(&mysimbdp::client::Client, Method, String)> = admin_json
        .iter()
        .map(|(m, p)| (&app.admin, m.clone(), p.clone()))
        .chain(tenant_json.iter().map(|(m, p)| (&c, m.clone(), p.clone())))
        .collect();
    for (client, m, path) in cases {
        for (ct, body) in [
            (Some("application/json"), "{not json"),
            (Some("application/json"), "[1,2]"),
            (Some("application/json"), "{\"unknown_field\": 1}"),
            (Some("text/plain"), "{}"),
            (None, "{\"consumers\": \"many\"}"),
        ] {
            let r = client
                .raw(m.clone(), &path, ct, body)
                .await
                .expect("answer");
            let status = r.status.as_u16();
            assert!(
                (400..500).contains(&status),
                "{m} {path} {ct:?} {body}: {status:?}"
            );
            assert!(
                r.json()["error"].is_string(),
                "{m} {path}: error body {:?}",
                r.body
            );
        }
    }
    let r = c
        .raw(
            Method::POST,
            &format!("/v1/tenants/{t}/messages"),
            Some("application/x-ndjson"),
            "\n\n",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "no message in the body");
    let r = c
        .raw(
            Method::GET,
            &format!("/v1/tenants/{t}/collections/system.users/documents"),
            None,
            Vec::new(),
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "system collections are not readable");
    let r = c
        .raw(
            Method::GET,
            &format!("/v1/tenants/{t}/collections/x/documents?limit=100000"),
            None,
            Vec::new(),
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "pages are bounded");
    let r = c
        .raw(
            Method::GET,
            &format!("/v1/tenants/{t}/logs?status=meh&x=1"),
            None,
            Vec::new(),
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn empty_bom_truncated_and_huge_inputs_fail_alone() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("inputs").await;
    app.admin
        .patch_tenant(
            &t,
            &patch(serde_json::json!({"max_file_bytes": 40_000_000})),
        )
        .await
        .expect("bigger files for this tenant");

    let e = c
        .upload_file(&t, "empty.csv", Vec::new())
        .await
        .expect_err("empty");
    assert_eq!(e.status(), Some(reqwest::StatusCode::BAD_REQUEST));
    assert!(e.to_string().contains("empty"), "{e}");
    assert!(c.file(&t, "empty.csv").await.is_err(), "nothing staged");

    c.upload_file(&t, "bom.csv", "\u{feff}id,name\n1,a\n")
        .await
        .expect("stage");
    c.ingest(&t, "bom.csv").await.expect("ingest");
    c.wait_for_file(&t, "bom.csv", Duration::from_secs(60))
        .await
        .expect("status");
    let d = &c.documents(&t, "bom", 1, 0).await.expect("docs").documents[0];
    assert_eq!(
        d["id"], "1",
        "the BOM is not part of the first column name: {d}"
    );

    c.upload_file(&t, "cut.json", "[{\"a\":1},{\"a\":2},{\"a\":")
        .await
        .expect("stage");
    c.ingest(&t, "cut.json").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "cut.json", Duration::from_secs(60))
        .await
        .expect("status");
    assert_eq!((f.records_ok, f.records_failed), (2, 1), "{f:?}");

    let mut huge = b"{\"a\":1}\n{\"big\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 17 * 1024 * 1024));
    huge.extend_from_slice(b"\"}\n{\"a\":3}\n");
    c.upload_file(&t, "huge.ndjson", huge).await.expect("stage");
    c.ingest(&t, "huge.ndjson").await.expect("ingest");
    let f = c
        .wait_for_file(&t, "huge.ndjson", Duration::from_secs(120))
        .await
        .expect("status");
    assert_eq!((f.records_ok, f.records_failed), (2, 1), "{f:?}");
    let failures = app.logs(&c, &t, "status=failure").await;
    assert!(
        failures.iter().any(|e| e
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("line 2: record exceeds")),
        "{failures:?}"
    );
    let health = app
        .admin
        .raw(Method::GET, "/healthz", None, Vec::new())
        .await
        .expect("alive");
    assert_eq!(health.status, 200);
}
