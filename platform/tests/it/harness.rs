//! `TestApp`: the whole platform on its own runtime, so a test can stop it gracefully or
//! kill it mid-work (dropping every task, as a crash would) and start it again.

use std::path::PathBuf;
use std::time::Duration;

use mysimbdp::api::LogEntry;
use mysimbdp::client::Client;
use mysimbdp::config::Settings;
use mysimbdp::infra::ServerVersions;
use mysimbdp::tenants::AdminPatch;
pub use mysimbdp::testing::messages_stored;
use mysimbdp::testing::{InProcess, Runtime};

pub const ADMIN_TOKEN: &str = "test-admin-token";

pub fn water_quality() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/data/water-quality-10k.csv")
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:08x}", rand::random::<u32>())
}

pub struct TestApp {
    pub admin: Client,
    pub namespace: String,
    pub staging: PathBuf,
    pub versions: ServerVersions,
    pub settings: Settings,
    overrides: Vec<String>,
    platform: Option<InProcess>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(&[]).await
    }

    /// A platform with settings overridden (`section.key=value`).
    pub async fn spawn_with(overrides: &[&str]) -> Self {
        let ns = unique("t");
        let staging = std::env::temp_dir().join(format!("mysimbdp-it-{ns}"));
        Self::start(
            ns + "_",
            staging,
            overrides.iter().map(|s| (*s).to_owned()).collect(),
        )
        .await
    }

    async fn start(namespace: String, staging: PathBuf, overrides: Vec<String>) -> Self {
        let env: Vec<(String, String)> = ["MONGODB_URI", "AMQP_URI"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
            .collect();
        let mut all = vec![
            format!("platform.namespace={namespace}"),
            format!("staging.dir={}", staging.display()),
            format!("auth.admin_token={ADMIN_TOKEN}"),
            "http.listen=127.0.0.1:0".to_owned(),
            "mongodb.max_pool_size=4".to_owned(),
            mysimbdp::testing::expiring_queues(),
        ];
        all.extend(overrides.iter().cloned());
        let settings = Settings::load_from(None, &env, &all).expect("test settings are valid");
        let own = Runtime::Own { workers: 2 };
        let started = InProcess::start(settings.clone(), 0, own);
        let platform = match tokio::time::timeout(Duration::from_secs(60), started).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => panic!(
                "the platform did not start: {e}\n\
                 Integration tests need MongoDB and RabbitMQ: {}",
                mysimbdp::infra::HOW_TO_PROVIDE
            ),
            Err(_) => panic!("the platform did not start within 60 s"),
        };
        Self {
            admin: Client::new(&platform.url(), Some(ADMIN_TOKEN)),
            namespace,
            staging,
            versions: platform.versions.clone(),
            settings,
            overrides,
            platform: Some(platform),
        }
    }

    /// Creates a tenant and returns its name and a client with its token.
    pub async fn tenant(&self, name: &str) -> (String, Client) {
        let t = self
            .admin
            .create_tenant(name, AdminPatch::default())
            .await
            .expect("tenant created");
        (t.name, self.admin.with_token(Some(&t.token)))
    }

    /// Ends the platform abruptly, as a crash would: no draining, no final writes.
    pub fn kill(&mut self) {
        if let Some(p) = &mut self.platform {
            p.kill();
        }
    }

    /// Kills the platform, then starts a new one on the same namespace and staging directory.
    pub async fn restart(mut self) -> Self {
        self.kill();
        // The staging directory now belongs to the new platform: this one must not remove it.
        let (ns, staging, overrides) = (
            self.namespace.clone(),
            std::mem::take(&mut self.staging),
            self.overrides.clone(),
        );
        Self::start(ns, staging, overrides).await
    }

    /// A direct driver connection, for checking what the platform stored.
    pub async fn mongo(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(&self.settings.mongodb.uri)
            .await
            .expect("driver connects")
    }

    pub async fn count(&self, tenant: &str, collection: &str) -> u64 {
        self.mongo()
            .await
            .database(&format!("{}tenant_{tenant}", self.namespace))
            .collection::<mongodb::bson::Document>(collection)
            .count_documents(mongodb::bson::doc! {})
            .await
            .expect("count")
    }

    /// The tenant's downloaded log, parsed.
    pub async fn logs(&self, client: &Client, tenant: &str, query: &str) -> Vec<LogEntry> {
        client.logs(tenant, query).await.expect("log download")
    }

    /// A stream counter of this process for the tenant (from the admin's `/metrics`): what
    /// its consumers did, deliveries included, where the log counts each ingestion once.
    pub async fn stream_metric(&self, name: &str, tenant: &str, status: &str) -> u64 {
        let r = self
            .admin
            .raw(reqwest::Method::GET, "/metrics", None, Vec::new())
            .await
            .expect("metrics");
        let text = String::from_utf8_lossy(&r.body);
        let series =
            format!("{name}{{tenant=\"{tenant}\",source=\"stream\",status=\"{status}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Stops the platform (without waiting) before its staging directory goes.
        drop(self.platform.take());
        if !self.staging.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// A profile change, written as the JSON an admin would send.
pub fn patch(v: serde_json::Value) -> AdminPatch {
    serde_json::from_value(v).expect("a valid profile change")
}

/// Polls `f` until it returns true or `timeout` passes; returns the last answer.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tenant's queue as the broker holds it now (its ready messages, its consumers), by a
/// passive declare over a connection of the test's own.
pub async fn tenant_queue(amqp_uri: &str, namespace: &str, tenant: &str) -> lapin::Queue {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    let conn = lapin::Connection::connect(amqp_uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let queue = format!("{namespace}mysimbdp.{tenant}");
    let q = ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the tenant's queue exists");
    let _ = conn.close(200, "counted".into()).await;
    q
}

/// Takes every message off a tenant's dead-letter queue: (body, reason header) each; a dead
/// letter without its reason fails the test.
pub async fn dead_letters(namespace: &str, tenant: &str) -> Vec<(String, String)> {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let uri = std::env::var("AMQP_URI").expect("AMQP_URI");
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let dlq = format!("{namespace}mysimbdp.{tenant}.dlq");
    let mut consumer = ch
        .basic_consume(
            dlq.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume dlq");
    let mut dead = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        let reason = match d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-mysimbdp-reason").cloned())
        {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("dead letter without a reason: {other:?}"),
        };
        d.ack(BasicAckOptions::default()).await.expect("ack");
        dead.push((String::from_utf8_lossy(&d.data).into_owned(), reason));
    }
    let _ = conn.close(200, "done".into()).await;
    dead
}
