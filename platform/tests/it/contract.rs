//! The API document against the platform that serves it: the same document, and every
//! operation that takes a token refusing a request without one, with the error body.

use reqwest::Method;

use crate::harness::TestApp;

/// `body` sent as `application/json` by `client`, answered.
async fn send_json(
    client: &mysimbdp::client::Client,
    method: Method,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> mysimbdp::client::Raw {
    client
        .raw(method, path, Some("application/json"), body)
        .await
        .expect("answer")
}

/// An operation of the document: its method, its path with the parameters filled in, and
/// whether it needs a token (it names schemes, and none of its options is "no token").
struct Operation {
    method: Method,
    path: String,
    needs_token: bool,
    responses: serde_json::Value,
}

fn operations(doc: &serde_json::Value, tenant: &str) -> Vec<Operation> {
    let mut ops = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let Ok(m) = method.to_uppercase().parse::<Method>() else {
                continue;
            };
            let requirements: Vec<&serde_json::Value> =
                op["security"].as_array().into_iter().flatten().collect();
            let needs_token = !requirements.is_empty()
                && requirements
                    .iter()
                    .all(|r| r.as_object().is_some_and(|o| !o.is_empty()));
            ops.push(Operation {
                method: m,
                path: template
                    .replace("{t}", tenant)
                    .replace("{name}", "data.csv")
                    .replace("{kind}", "batch")
                    .replace("{c}", "data"),
                needs_token,
                responses: op["responses"].clone(),
            });
        }
    }
    ops
}

#[tokio::test]
async fn the_platform_serves_its_document_and_refuses_every_token_route_without_a_token() {
    let app = TestApp::spawn().await;
    let (t, _) = app.tenant("contract").await;
    let anonymous = app.admin.with_token(None);
    let served = anonymous
        .get("/v1/openapi.json")
        .await
        .expect("the document");
    assert_eq!(served, mysimbdp::openapi::document(), "served = generated");
    let ops = operations(&served, &t);
    assert!(ops.len() >= 25, "{} operations", ops.len());
    let mut checked = 0;
    for op in ops.iter().filter(|o| o.needs_token) {
        let (m, path) = (&op.method, &op.path);
        let r = send_json(&anonymous, m.clone(), path, "{}").await;
        let status = r.status.as_u16();
        assert!(
            status == 401 || status == 403,
            "{m} {path} without a token: {status}"
        );
        assert!(
            op.responses.get(status.to_string()).is_some(),
            "{m} {path}: {status} is not documented"
        );
        assert!(r.json()["error"].is_string(), "{m} {path}: {:?}", r.body);
        checked += 1;
    }
    assert!(checked >= 22, "{checked} operations need a token");
}

#[tokio::test]
async fn an_unknown_method_on_a_known_path_is_405_with_allow_and_the_error_body() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("methods").await;
    let r = c
        .raw(
            Method::DELETE,
            &format!("/v1/tenants/{t}/logs"),
            None,
            Vec::new(),
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 405);
    assert_eq!(
        r.headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("GET,HEAD")
    );
    assert!(r.json()["error"].is_string(), "{:?}", r.body);
}

#[tokio::test]
async fn json_bodies_must_be_objects_not_arrays_of_their_fields() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("arrays").await;
    for (path, body) in [
        (format!("/v1/tenants/{t}"), "[null, null]"),
        (format!("/v1/tenants/{t}/stream/start"), "[2]"),
    ] {
        let m = if path.ends_with("start") {
            Method::POST
        } else {
            Method::PATCH
        };
        let r = send_json(&c, m, &path, body).await;
        assert_eq!(r.status, 422, "{path} {body}: {:?}", r.body);
    }
    // Nested too: the admin's app limits.
    let r = send_json(
        &app.admin,
        Method::PATCH,
        &format!("/v1/tenants/{t}"),
        r#"{"app_limits": [null, null]}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("expected a map")),
        "{:?}",
        r.body
    );
}

#[tokio::test]
async fn query_numbers_past_their_documented_range_are_400_not_a_crash() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("ranges").await;
    for path in [
        format!("/v1/tenants/{t}/stream/report?period_s=9223372036854775808"),
        format!("/v1/tenants/{t}/stream/report?period_s=0"),
        format!("/v1/tenants/{t}/collections/data/documents?skip=9223372036854775808"),
        format!("/v1/tenants/{t}/logs?bucket_s=60"),
    ] {
        let r = c
            .raw(Method::GET, &path, None, Vec::new())
            .await
            .expect("an answer, not a closed connection");
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
    }
    let r = app
        .admin
        .raw(
            Method::GET,
            "/v1/logs/summary?bucket_s=18446744073709551615",
            None,
            Vec::new(),
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "{:?}", r.body);
}

/// Found by the fuzzer with the admin token: a limit past BSON's i64 was written wrapped
/// (negative) and every later read of the profile failed (500 on all the tenant's routes).
#[tokio::test]
async fn limits_a_profile_cannot_hold_are_refused_and_the_tenant_stays_whole() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("limits").await;
    let before = c.get(&format!("/v1/tenants/{t}")).await.expect("profile");
    for body in [
        r#"{"max_file_bytes": 18446744073709551614}"#,
        r#"{"max_file_bytes": 9223372036854775808}"#,
        r#"{"app_limits": {"memory_bytes": 0}}"#,
        r#"{"app_limits": {"time_ms": 0}}"#,
        r#"{"app_limits": {"instructions": 9223372036854775808}}"#,
        r#"{"app_limits": {"max_emits": 0}}"#,
    ] {
        let r = send_json(&app.admin, Method::PATCH, &format!("/v1/tenants/{t}"), body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert!(r.json()["error"].is_string(), "{body}: {:?}", r.body);
    }
    let after = c.get(&format!("/v1/tenants/{t}")).await.expect("profile");
    assert_eq!(before, after, "nothing of the refused patches was kept");
    let r = send_json(
        &app.admin,
        Method::POST,
        "/v1/tenants",
        r#"{"name": "limits2", "max_file_bytes": 18446744073709551614}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = app
        .admin
        .raw(
            Method::POST,
            "/v1/tenants",
            Some("application/json"),
            format!(
                r#"{{"name": "limits3", "description": "{}"}}"#,
                "x".repeat(5000)
            ),
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "{:?}", r.body);
    for refused in ["limits2", "limits3"] {
        let r = app
            .admin
            .raw(
                Method::GET,
                &format!("/v1/tenants/{refused}"),
                None,
                Vec::new(),
            )
            .await
            .expect("answer");
        assert_eq!(r.status, 404, "a refused creation left {refused} behind");
    }
    let r = send_json(
        &app.admin,
        Method::PATCH,
        &format!("/v1/tenants/{t}"),
        r#"{"max_file_bytes": 9223372036854775807}"#,
    )
    .await;
    assert_eq!(r.status, 200, "the largest documented value: {:?}", r.body);
}

/// The limits and profile beside the name, as the document and the CLI give them (serde's
/// flatten had refused every one of them as an unknown field).
#[tokio::test]
async fn a_tenant_is_created_with_its_limits_and_profile_and_unknown_fields_are_refused() {
    let app = TestApp::spawn().await;
    let name = format!("made{}", std::process::id());
    let body = serde_json::json!({
        "name": name,
        "max_file_bytes": 12345,
        "max_staged_files": 7,
        "formats": ["csv"],
        "app_limits": {"time_ms": 99},
        "auto_ingest": true,
        "description": "ops@example.com",
    });
    let r = send_json(&app.admin, Method::POST, "/v1/tenants", body.to_string()).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let p = &r.json()["profile"];
    assert_eq!(p["constraints"]["max_file_bytes"], 12345);
    assert_eq!(p["constraints"]["max_staged_files"], 7);
    assert_eq!(p["constraints"]["formats"], serde_json::json!(["csv"]));
    assert_eq!(p["constraints"]["app_limits"]["time_ms"], 99);
    assert_eq!(p["auto_ingest"], true);
    assert_eq!(p["description"], "ops@example.com");
    let r = send_json(
        &app.admin,
        Method::POST,
        "/v1/tenants",
        r#"{"name": "unknownfield", "max_file_byte": 1}"#,
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
}

/// An admin changing one app limit changes that one: the others stay the tenant's.
#[tokio::test]
async fn an_app_limit_patched_alone_leaves_the_others_as_they_were() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("onelimit").await;
    let before = c.tenant(&t).await.expect("profile").constraints.app_limits;
    for body in [
        r#"{"app_limits": {"time_ms": 123}}"#,
        r#"{"app_limits": {"max_emits": 77}}"#,
    ] {
        let r = send_json(&app.admin, Method::PATCH, &format!("/v1/tenants/{t}"), body).await;
        assert_eq!(r.status, 200, "{body}: {:?}", r.body);
    }
    let after = c.tenant(&t).await.expect("profile").constraints.app_limits;
    assert_eq!(after.time_ms, 123);
    assert_eq!(after.max_emits, 77);
    assert_eq!(after.memory_bytes, before.memory_bytes);
    assert_eq!(after.instructions, before.instructions);
    assert_eq!(after.max_doc_bytes, before.max_doc_bytes);
}
