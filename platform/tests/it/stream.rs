use std::time::Duration;

use mysimbdp::logs::Status;

use crate::harness::{TestApp, eventually, messages_stored};

fn ndjson(from: usize, to: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in from..to {
        out.extend_from_slice(format!("{{\"seq\":{i},\"v\":{}}}\n", i % 97).as_bytes());
    }
    out
}

async fn distinct_seqs(app: &TestApp, tenant: &str) -> (u64, u64) {
    let db = format!("{}tenant_{tenant}", app.namespace);
    messages_stored(&app.settings.mongodb.uri, &db).await
}

#[tokio::test]
async fn ten_thousand_messages_published_before_any_consumer_are_all_stored_once() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("early").await;
    for chunk in 0..10 {
        let r = c
            .publish(&t, "reading", ndjson(chunk * 1000, (chunk + 1) * 1000))
            .await
            .expect("published with confirms");
        assert_eq!(r.published, 1000);
    }
    c.stream_start(&t, 2).await.expect("start");
    let all = eventually(Duration::from_secs(120), || async {
        app.count(&t, "messages").await >= 10_000
    })
    .await;
    assert!(all, "stored {}", app.count(&t, "messages").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(distinct_seqs(&app, &t).await, (10_000, 10_000));
    let report = c.stream_report(&t).await.expect("report");
    let total: u64 = report.periods.iter().map(|p| p.messages).sum();
    assert_eq!(total, 10_000);
    assert!(report.periods[0].avg_ingestion_ms > 0.0);
    c.stream_stop(&t).await.expect("stop");
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_reasons_and_the_queue_keeps_moving() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("poison").await;
    c.upload_app(
        &t,
        "stream",
        r#"
        function map(m)
            if m.kind == "throw" then error("cannot handle " .. m.kind) end
            if m.kind == "loop" then while true do end end
            return { seq = m.seq }
        end"#,
    )
    .await
    .expect("app");
    let mut body = Vec::new();
    for i in 0..300 {
        let line = match i % 50 {
            // The broker refuses invalid JSON declared as JSON; sent as bytes, it reaches
            // the map app's consumer, which dead-letters it.
            7 => {
                let r = c
                    .raw(
                        reqwest::Method::POST,
                        &format!("/v1/tenants/{t}/messages?data_name=mixed"),
                        Some("application/octet-stream"),
                        "{not json",
                    )
                    .await
                    .expect("answer");
                assert_eq!(r.status, 202, "{:?}", r.body);
                continue;
            }
            8 => format!("{{\"seq\":{i},\"kind\":\"throw\"}}"),
            9 => format!("{{\"seq\":{i},\"kind\":\"loop\"}}"),
            _ => format!("{{\"seq\":{i}}}"),
        };
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
    }
    c.publish(&t, "mixed", body).await.expect("publish");
    c.stream_start(&t, 1).await.expect("start");
    let good = 300 - 18;
    let done = eventually(Duration::from_secs(120), || async {
        app.count(&t, "messages").await >= good
    })
    .await;
    assert!(done, "stored {}", app.count(&t, "messages").await);
    let failures = eventually(Duration::from_secs(30), || async {
        app.logs(&c, &t, "status=failure").await.len() >= 18
    })
    .await;
    assert!(failures);
    let logs = app.logs(&c, &t, "status=failure").await;
    let reasons: Vec<&str> = logs.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("invalid JSON message"))
            .count(),
        6,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("cannot handle throw"))
            .count(),
        6,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("time limit") || r.contains("instruction budget"))
            .count(),
        6,
        "{reasons:?}"
    );
    assert_eq!(distinct_seqs(&app, &t).await, (good, good));
    c.stream_stop(&t).await.expect("stop");

    // The dead letters are in the tenant's DLQ, each with its reason.
    let dead = crate::harness::dead_letters(&app.namespace, &t).await.len();
    assert_eq!(dead, 18);
}

#[tokio::test]
async fn a_consumer_killed_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let app = TestApp::spawn_with(&["stream.batch_size=100"]).await;
    let (t, c) = app.tenant("crash").await;
    c.publish(&t, "reading", ndjson(0, 6000))
        .await
        .expect("publish");
    c.stream_start(&t, 1).await.expect("start");
    let progressed = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await >= 500
    })
    .await;
    assert!(progressed);
    // From here the consumer's next bulk stops between its documents and its log, so the
    // stream cannot drain during the kill (the runtime shuts down in the background).
    // Before it, the 5,500 messages left cannot go in one poll (100 ms).
    mysimbdp::coredms::faults::stall_before_log(&t);
    let mut app = app;
    app.kill();
    let before = app.count(&t, "messages").await;
    assert!(before < 6000, "killed mid-stream with {before} stored");
    // Should the kill have come first, the restarted platform must not stop there.
    mysimbdp::coredms::faults::clear(&t);
    let app = app.restart().await;
    let c = app.admin.clone();
    c.publish(&t, "reading", ndjson(6000, 7000))
        .await
        .expect("publish after restart");
    c.stream_start(&t, 2).await.expect("restart consumers");
    let all = eventually(Duration::from_secs(120), || async {
        app.count(&t, "messages").await >= 7000
    })
    .await;
    assert!(all, "stored {}", app.count(&t, "messages").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(distinct_seqs(&app, &t).await, (7000, 7000));
    c.stream_stop(&t).await.expect("stop");
}

#[tokio::test]
async fn publishing_checks_type_size_and_emptiness() {
    let app = TestApp::spawn_with(&["stream.max_message_bytes=100"]).await;
    let (t, c) = app.tenant("pub").await;
    let r = c
        .raw(
            reqwest::Method::POST,
            &format!("/v1/tenants/{t}/messages"),
            Some("text/csv"),
            "a,b",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 415);
    let r = c
        .raw(
            reqwest::Method::POST,
            &format!("/v1/tenants/{t}/messages"),
            Some("application/json"),
            "",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 400);
    let big = format!("{{\"x\":\"{}\"}}", "y".repeat(200));
    let r = c
        .raw(
            reqwest::Method::POST,
            &format!("/v1/tenants/{t}/messages"),
            Some("application/json"),
            big,
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 413);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("100 bytes limit")
    );
    let r = c
        .raw(
            reqwest::Method::POST,
            &format!("/v1/tenants/{t}/messages?data_name=one"),
            Some("application/json"),
            "{\"a\":1}",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["published"], 1);
}

#[tokio::test]
async fn a_publish_retried_with_the_same_idempotency_key_is_stored_once() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("retry").await;
    let first = c
        .publish_idempotent(&t, "reading", "batch-1", ndjson(0, 50))
        .await
        .expect("publish");
    // The client did not see the answer (a timeout, a 503 after the broker had the
    // messages) and sends the same request again.
    let again = c
        .publish_idempotent(&t, "reading", "batch-1", ndjson(0, 50))
        .await
        .expect("retry");
    assert_eq!(
        first.ids, again.ids,
        "the same key gives the same message ids"
    );
    c.publish_idempotent(&t, "reading", "batch-2", ndjson(50, 60))
        .await
        .expect("another request");
    c.stream_start(&t, 1).await.expect("start");
    // 110 deliveries: the retried request's 50 are the same messages (same ids), so the
    // same ingestions: stored once and logged once, neither as new nor as duplicates.
    let done = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await >= 60 && app.logs(&c, &t, "").await.len() >= 60
    })
    .await;
    assert!(done, "every message was logged");
    let all_delivered = eventually(Duration::from_secs(30), || async {
        app.stream_metric("mysimbdp_ingested_total", &t, "success")
            .await
            >= 110
    })
    .await;
    assert!(all_delivered, "the consumer took all 110 deliveries");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(distinct_seqs(&app, &t).await, (60, 60));
    let log = app.logs(&c, &t, "").await;
    assert_eq!(log.len(), 60, "one entry per message");
    assert!(
        log.iter().all(|e| e.status == Status::Success),
        "{:?}",
        log[0]
    );
    let r = c
        .raw(
            reqwest::Method::POST,
            &format!("/v1/tenants/{t}/messages"),
            Some("application/json"),
            "{}",
        )
        .await
        .expect("answer");
    assert_eq!(r.status, 202, "the key is optional");
    c.stream_stop(&t).await.expect("stop");
}

#[tokio::test]
async fn a_data_name_with_reserved_characters_arrives_whole() {
    let app = TestApp::spawn().await;
    let (t, c) = app.tenant("names").await;
    let name = "temp & humidity=1/2?#%";
    c.publish(&t, name, b"{\"seq\":1}\n".to_vec())
        .await
        .expect("the client encodes the name");
    c.stream_start(&t, 1).await.expect("start");
    let logged = eventually(Duration::from_secs(30), || async {
        !app.logs(&c, &t, "status=success").await.is_empty()
    })
    .await;
    assert!(logged);
    c.stream_stop(&t).await.expect("stop");
    let logs = app.logs(&c, &t, "status=success").await;
    assert_eq!(logs[0].data_name, name, "{logs:?}");
}

/// Messages of the tenant's queue that are ready (delivered to no consumer, or delivered
/// and never acknowledged by a consumer that went away), as the broker counts them.
async fn ready_messages(namespace: &str, tenant: &str) -> u32 {
    let uri = std::env::var("AMQP_URI").expect("AMQP_URI");
    crate::harness::tenant_queue(&uri, namespace, tenant)
        .await
        .message_count()
}

#[tokio::test]
async fn a_stalled_write_holds_back_the_batches_behind_it_and_acknowledges_nothing() {
    // The consumer collects and transforms the next batch while one is written, but writes
    // one batch at a time and acknowledges none before its write: while the first bulk
    // hangs between its documents and its log, nothing behind it is written or acked (a
    // multiple-ack from a later batch would take the stalled batch's messages with it).
    let mut app = TestApp::spawn_with(&["stream.batch_size=50"]).await;
    let (t, c) = app.tenant("held").await;
    c.publish(&t, "reading", ndjson(0, 500))
        .await
        .expect("publish");
    mysimbdp::coredms::faults::stall_before_log(&t);
    c.stream_start(&t, 1).await.expect("start");
    let reached = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await > 0
    })
    .await;
    assert!(reached, "the first batch reaches the database");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = app.count(&t, "messages").await;
    assert!(
        written <= 50,
        "only the stalled batch was written: {written}"
    );
    app.kill();
    // The consumer's connection is gone: every message is back in the queue, none acked.
    let requeued = eventually(Duration::from_secs(30), || async {
        ready_messages(&app.namespace, &t).await == 500
    })
    .await;
    assert!(
        requeued,
        "{} of 500 messages back in the queue",
        ready_messages(&app.namespace, &t).await
    );
    let app = app.restart().await;
    let c = app.admin.clone();
    c.stream_start(&t, 1).await.expect("start again");
    let all = eventually(Duration::from_secs(120), || async {
        app.logs(&c, &t, "").await.len() >= 500
    })
    .await;
    assert!(all, "every message logged");
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.stream_stop(&t).await.expect("stop");
    assert_eq!(distinct_seqs(&app, &t).await, (500, 500));
    let log = app.logs(&c, &t, "").await;
    assert_eq!(log.len(), 500, "one entry per message");
    assert!(log.iter().all(|e| e.status == Status::Success));
}

#[tokio::test]
async fn a_message_on_a_quiet_queue_is_not_held_for_the_linger() {
    // The linger only lets a batch fill while the one before it is written: with nothing
    // in flight a batch goes with what has arrived. A minute of linger would otherwise
    // hold each of these messages for a minute.
    let app = TestApp::spawn_with(&["stream.linger_ms=60000"]).await;
    let (t, c) = app.tenant("quiet").await;
    c.stream_start(&t, 1).await.expect("start");
    for i in 0..3 {
        c.publish(&t, "reading", ndjson(i, i + 1))
            .await
            .expect("publish");
        let stored = eventually(Duration::from_secs(20), || async {
            app.count(&t, "messages").await > i as u64
        })
        .await;
        assert!(stored, "message {i} waited for the linger");
    }
    c.stream_stop(&t).await.expect("stop");
    assert_eq!(distinct_seqs(&app, &t).await, (3, 3));
}

/// Whether the broker has queue `name` (a passive declare, on a channel of its own: a
/// missing queue closes the channel).
async fn queue_exists(conn: &lapin::Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), passive, Default::default())
        .await
        .is_ok()
}

async fn exchange_exists(conn: &lapin::Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(
        name.into(),
        lapin::ExchangeKind::Direct,
        passive,
        Default::default(),
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn expiring_queues_outlive_their_pauses_and_go_with_their_namespace() {
    const EXPIRES_MS: u64 = 5_000;
    let uri = std::env::var("AMQP_URI").expect("AMQP_URI");
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let app = TestApp::spawn_with(&[&format!("amqp.queue_expires_ms={EXPIRES_MS}")]).await;
    let (t, c) = app.tenant("brief").await;
    let queue = format!("{}mysimbdp.{t}", app.namespace);
    let dlq = format!("{queue}.dlq");
    let dlx = format!("{}mysimbdp.dlx", app.namespace);
    c.upload_app(
        &t,
        "stream",
        r#"
        function map(m)
            if m.bad then error("a bad message") end
            return m
        end"#,
    )
    .await
    .expect("app");
    // Published with no consumer, then a pause shorter than the expiry: nothing is lost.
    let mut body = ndjson(0, 99);
    body.extend_from_slice(b"{\"seq\":99,\"bad\":true}\n");
    c.publish(&t, "reading", body).await.expect("published");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    c.stream_start(&t, 1).await.expect("start");
    let first = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await >= 99
    })
    .await;
    assert!(first, "stored {}", app.count(&t, "messages").await);
    // Twice the expiry with the consumer on: the queue is in use, and the dead-letter
    // queue, which nothing consumes, is kept by the stream manager. Not looked at meanwhile
    // (a look is a use).
    tokio::time::sleep(Duration::from_millis(2 * EXPIRES_MS + 1_000)).await;
    let dead = c.dead_letters(&t, 10).await.expect("dead letters");
    assert_eq!(
        dead.dead_letters.len(),
        1,
        "the dead letter outlived the expiry: {dead:?}"
    );
    c.publish(&t, "reading", ndjson(100, 200))
        .await
        .expect("published to the same queue");
    let all = eventually(Duration::from_secs(60), || async {
        app.count(&t, "messages").await >= 199
    })
    .await;
    assert!(all, "stored {}", app.count(&t, "messages").await);
    assert_eq!(distinct_seqs(&app, &t).await, (199, 199));
    // Stopped, the tenant's queues are no longer kept: they go, with the dead letter. What
    // asks for them then gets an answer, not a broker error.
    c.stream_stop(&t).await.expect("stop");
    tokio::time::sleep(Duration::from_millis(2 * EXPIRES_MS + 2_000)).await;
    let dead = c
        .dead_letters(&t, 10)
        .await
        .expect("no dead-letter queue: none listed");
    assert!(dead.dead_letters.is_empty() && !dead.more, "{dead:?}");
    let replayed = c.replay_dead_letters(&t, 10).await.expect("none to replay");
    assert_eq!(replayed.replayed, 0);
    let refused = c
        .publish(&t, "reading", ndjson(200, 201))
        .await
        .expect_err("its queue expired");
    assert!(refused.to_string().contains("expires unused"), "{refused}");
    // The platform gone, its queues, and the dead-letter exchange with them, go too. Looked
    // at less often than the expiry: a look at a queue is a use of it.
    let mut app = app;
    app.kill();
    let mut gone = false;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(EXPIRES_MS + 1_000)).await;
        gone = !queue_exists(&conn, &queue).await
            && !queue_exists(&conn, &dlq).await
            && !exchange_exists(&conn, &dlx).await;
        if gone {
            break;
        }
    }
    assert!(
        gone,
        "left behind: queue {}, dlq {}, dlx {}",
        queue_exists(&conn, &queue).await,
        queue_exists(&conn, &dlq).await,
        exchange_exists(&conn, &dlx).await
    );
    let _ = conn.close(200, "done".into()).await;
}
