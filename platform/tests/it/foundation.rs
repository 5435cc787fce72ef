use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use mongodb::bson::doc;

use crate::harness::{TestApp, unique};

#[tokio::test]
async fn platform_answers_health_and_metrics_and_knows_server_versions() {
    let app = TestApp::spawn().await;
    let h = app
        .admin
        .raw(reqwest::Method::GET, "/healthz", None, Vec::new())
        .await
        .expect("healthz");
    assert_eq!(h.status, 200);
    let (t, c) = app.tenant(&unique("metered")).await;
    c.publish(&t, "m", "{\"a\":1}\n").await.expect("publish");
    let m = app
        .admin
        .raw(reqwest::Method::GET, "/metrics", None, Vec::new())
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("# TYPE mysimbdp_published counter")
            && text.contains(&format!(
                "mysimbdp_published_total{{tenant=\"{t}\",source=\"stream\",status=\"success\"}} 1\n"
            ))
            && text.ends_with("# EOF\n"),
        "{text}"
    );
    assert_eq!(
        m.headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some(mysimbdp::metrics::CONTENT_TYPE)
    );
    assert!(!app.versions.mongodb.is_empty() && app.versions.mongodb != "unknown");
    assert!(
        app.versions.rabbitmq.contains("RabbitMQ"),
        "{:?}",
        app.versions
    );
    let nf = app
        .admin
        .raw(reqwest::Method::GET, "/nope", None, Vec::new())
        .await
        .expect("404");
    assert_eq!(nf.status, 404);
    assert_eq!(nf.json()["error"], "no such endpoint");
}

#[tokio::test]
async fn the_mongodb_server_stores_and_returns_a_document() {
    let app = TestApp::spawn().await;
    let coll = app
        .mongo()
        .await
        .database(&format!("{}probe", app.namespace))
        .collection::<mongodb::bson::Document>("probe");
    coll.insert_one(doc! {"_id": "x", "n": 42})
        .await
        .expect("insert");
    let back = coll
        .find_one(doc! {"_id": "x"})
        .await
        .expect("find")
        .expect("found");
    assert_eq!(back.get_i32("n").expect("n"), 42);
}

#[tokio::test]
async fn rabbitmq_delivers_a_published_message() {
    let uri = std::env::var("AMQP_URI")
        .unwrap_or_else(|_| panic!("set AMQP_URI: {}", mysimbdp::infra::HOW_TO_PROVIDE));
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = unique("probe-");
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"hello",
        Default::default(),
    )
    .await
    .expect("publish");
    let mut c = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .expect("delivered in time")
        .expect("a delivery")
        .expect("no error");
    assert_eq!(d.data, b"hello");
    d.ack(BasicAckOptions::default()).await.expect("ack");
}

#[tokio::test]
async fn serve_without_infrastructure_fails_fast_and_says_how_to_fix_it() {
    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mysimbdp"))
        .arg("serve")
        .env_remove("MONGODB_URI")
        .env_remove("AMQP_URI")
        // A Docker daemon that is configured but absent must fail as fast as none at all.
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env("MYSIMBDP_LISTEN", "127.0.0.1:0")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("exits within 30 s")
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MONGODB_URI") && err.contains("Docker"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn docker_compose_file_is_valid_and_binds_to_localhost() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("docker-compose.yml exists");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("valid YAML");
    let services = v["services"].as_mapping().expect("services");
    for name in ["mongodb", "rabbitmq", "platform"] {
        let s = &v["services"][name];
        assert!(s.is_mapping(), "service {name} missing");
        assert!(
            s["healthcheck"]["test"].is_sequence(),
            "{name} has no healthcheck"
        );
        for p in s["ports"].as_sequence().expect("ports") {
            let p = p.as_str().expect("port string");
            assert!(
                p.starts_with("127.0.0.1:"),
                "{name} port {p} is not bound to localhost"
            );
        }
    }
    assert_eq!(services.len(), 3);
    assert_eq!(
        v["services"]["platform"]["build"]["dockerfile"].as_str(),
        Some("Dockerfile")
    );
    assert!(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../Dockerfile")
            .exists()
    );
}
