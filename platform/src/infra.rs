//! Obtaining MongoDB and RabbitMQ: from `MONGODB_URI` / `AMQP_URI`, else through
//! testcontainers with the official images when a Docker daemon answers, else a clear error.
//!
//! Connectivity is checked here, at start-up, and the server versions are read so that logs
//! and workbench reports can say what they ran on.

use std::time::Duration;

use mongodb::bson::doc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Settings;

/// The message every caller shows when infrastructure is missing.
pub const HOW_TO_PROVIDE: &str = "set MONGODB_URI (e.g. mongodb://127.0.0.1:27017) and AMQP_URI \
(e.g. amqp://guest:guest@127.0.0.1:5672/%2f), or start a Docker daemon so testcontainers can run \
the official `mongo` and `rabbitmq` images";

#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("no {what} available: {HOW_TO_PROVIDE}")]
    Missing { what: &'static str },
    #[error("cannot reach MongoDB at {uri}: {reason}")]
    Mongo { uri: String, reason: String },
    #[error("cannot reach RabbitMQ at {uri}: {reason}")]
    Amqp { uri: String, reason: String },
    #[error("cannot start the {image} container through Docker: {reason}; {HOW_TO_PROVIDE}")]
    Container { image: &'static str, reason: String },
}

/// Where the infrastructure is and what it runs. Dropping it stops any containers it started.
pub struct Infra {
    pub mongodb_uri: String,
    pub amqp_uri: String,
    pub versions: ServerVersions,
    #[cfg(feature = "docker")]
    _containers: Vec<testcontainers::ContainerAsync<testcontainers::GenericImage>>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ServerVersions {
    /// `buildInfo.version` of the MongoDB server.
    pub mongodb: String,
    /// The server's own name and version: `MongoDB 8.0.4`, or a compatible server's name
    /// when it gives one (`Secantus 0.7.0b3 (MongoDB-compatible, reports MongoDB 8.2.11)`).
    pub mongodb_server: String,
    /// `product` and `version` from the broker's AMQP server properties.
    pub rabbitmq: String,
}

impl Infra {
    /// Finds or provisions both services and checks that they answer.
    pub async fn provision(settings: &Settings) -> Result<Self, InfraError> {
        #[cfg(feature = "docker")]
        let mut containers = Vec::new();
        let mongodb_uri = if !settings.mongodb.uri.is_empty() {
            settings.mongodb.uri.clone()
        } else {
            #[cfg(feature = "docker")]
            {
                let (c, uri) = docker::start_mongo().await?;
                containers.push(c);
                uri
            }
            #[cfg(not(feature = "docker"))]
            return Err(InfraError::Missing { what: "MongoDB" });
        };
        let amqp_uri = if !settings.amqp.uri.is_empty() {
            settings.amqp.uri.clone()
        } else {
            #[cfg(feature = "docker")]
            {
                let (c, uri) = docker::start_rabbitmq().await?;
                containers.push(c);
                uri
            }
            #[cfg(not(feature = "docker"))]
            return Err(InfraError::Missing { what: "RabbitMQ" });
        };
        let timeout = Duration::from_millis(settings.mongodb.connect_timeout_ms);
        let (mongodb, mongodb_server) = mongodb_version(&mongodb_uri, timeout).await?;
        let rabbitmq = rabbitmq_version(
            &amqp_uri,
            Duration::from_millis(settings.amqp.connect_timeout_ms),
        )
        .await?;
        Ok(Self {
            mongodb_uri,
            amqp_uri,
            versions: ServerVersions {
                mongodb,
                mongodb_server,
                rabbitmq,
            },
            #[cfg(feature = "docker")]
            _containers: containers,
        })
    }
}

/// Runs `buildInfo` and returns (version, server name if the server gives one).
pub async fn mongodb_version(uri: &str, timeout: Duration) -> Result<(String, String), InfraError> {
    let fail = |reason: String| InfraError::Mongo {
        uri: redact(uri),
        reason,
    };
    let mut opts = mongodb::options::ClientOptions::parse(uri)
        .await
        .map_err(|e| fail(e.to_string()))?;
    opts.server_selection_timeout = Some(timeout);
    opts.connect_timeout = Some(timeout);
    opts.max_pool_size = Some(1);
    let client = mongodb::Client::with_options(opts).map_err(|e| fail(e.to_string()))?;
    let info = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        client.database("admin").run_command(doc! {"buildInfo": 1}),
    )
    .await
    .map_err(|_| fail("timed out".into()))?
    .map_err(|e| fail(e.to_string()))?;
    let version = info.get_str("version").unwrap_or("unknown").to_owned();
    // Compatible servers announce themselves with a `<name>Version` field (SecantusDB:
    // `secantusVersion`); a server without one is taken to be MongoDB itself.
    let server = info
        .iter()
        .find_map(|(k, v)| match v {
            mongodb::bson::Bson::String(s)
                if k.ends_with("Version") && k != "gitVersion" && !s.is_empty() =>
            {
                let name = k.trim_end_matches("Version");
                let mut name = name.to_owned();
                if let Some(first) = name.get_mut(0..1) {
                    first.make_ascii_uppercase();
                }
                Some(format!(
                    "{name} {s} (MongoDB-compatible, reports MongoDB {version})"
                ))
            }
            _ => None,
        })
        .unwrap_or_else(|| format!("MongoDB {version}"));
    Ok((version, server))
}

/// Opens an AMQP 0-9-1 handshake and reads `product` and `version` from the server
/// properties of `Connection.Start` (the client library does not expose them).
pub async fn rabbitmq_version(uri: &str, timeout: Duration) -> Result<String, InfraError> {
    let fail = |reason: String| InfraError::Amqp {
        uri: redact(uri),
        reason,
    };
    let (host, port) = amqp_host_port(uri).ok_or_else(|| fail("malformed AMQP URI".into()))?;
    let probe = async {
        let mut sock = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        sock.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut header = [0u8; 7];
        sock.read_exact(&mut header).await?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut body = vec![0u8; size.min(1 << 20)];
        sock.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let product = long_string_field(&body, b"product").unwrap_or_else(|| "AMQP broker".into());
    let version = long_string_field(&body, b"version").unwrap_or_else(|| "unknown".into());
    // The handshake proves the port speaks AMQP; a real connection proves the credentials.
    let conn = tokio::time::timeout(
        timeout,
        lapin::Connection::connect(uri, lapin::ConnectionProperties::default()),
    )
    .await
    .map_err(|_| fail("timed out logging in".into()))?
    .map_err(|e| fail(e.to_string()))?;
    let _ = conn.close(200, "version probe".into()).await;
    Ok(format!("{product} {version}"))
}

/// Finds `<len><key>S<u32 len><bytes>` in an AMQP field table.
fn long_string_field(frame: &[u8], key: &[u8]) -> Option<String> {
    let mut needle = vec![u8::try_from(key.len()).ok()?];
    needle.extend_from_slice(key);
    needle.push(b'S');
    let at = frame.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let len = u32::from_be_bytes(frame.get(at..at + 4)?.try_into().ok()?) as usize;
    let bytes = frame.get(at + 4..at + 4 + len)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

/// The host and port of an AMQP URI (`amqps` defaults to 5671), read by lapin's own parser
/// so the version probe reaches the server lapin connects to.
fn amqp_host_port(uri: &str) -> Option<(String, u16)> {
    let a = uri.parse::<amq_protocol_uri::AMQPUri>().ok()?.authority;
    Some((a.host, a.port))
}

/// A URI with its password replaced, for messages and reports.
pub fn redact(uri: &str) -> String {
    if let Some((scheme, rest)) = uri.split_once("://")
        && let Some((cred, host)) = rest.split_once('@')
        && let Some((user, _)) = cred.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    uri.to_owned()
}

#[cfg(feature = "docker")]
mod docker {
    use testcontainers::core::{IntoContainerPort, WaitFor};
    use testcontainers::runners::AsyncRunner;
    use testcontainers::{ContainerAsync, GenericImage};

    use super::InfraError;

    /// True when a Docker daemon is configured; a dead one fails at start with the reason.
    fn docker_configured() -> bool {
        std::env::var_os("DOCKER_HOST").is_some()
            || std::path::Path::new("/var/run/docker.sock").exists()
    }

    pub async fn start_mongo() -> Result<(ContainerAsync<GenericImage>, String), InfraError> {
        if !docker_configured() {
            return Err(InfraError::Missing { what: "MongoDB" });
        }
        let fail = |e: testcontainers::TestcontainersError| InfraError::Container {
            image: "mongo",
            reason: e.to_string(),
        };
        let c = GenericImage::new("mongo", "8.0")
            .with_exposed_port(27017.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Waiting for connections"))
            .start()
            .await
            .map_err(fail)?;
        let port = c.get_host_port_ipv4(27017).await.map_err(fail)?;
        Ok((c, format!("mongodb://127.0.0.1:{port}")))
    }

    pub async fn start_rabbitmq() -> Result<(ContainerAsync<GenericImage>, String), InfraError> {
        if !docker_configured() {
            return Err(InfraError::Missing { what: "RabbitMQ" });
        }
        let fail = |e: testcontainers::TestcontainersError| InfraError::Container {
            image: "rabbitmq",
            reason: e.to_string(),
        };
        let c = GenericImage::new("rabbitmq", "4-management")
            .with_exposed_port(5672.tcp())
            .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
            .start()
            .await
            .map_err(fail)?;
        let port = c.get_host_port_ipv4(5672).await.map_err(fail)?;
        Ok((c, format!("amqp://guest:guest@127.0.0.1:{port}/%2f")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_uris_give_host_and_port() {
        assert_eq!(
            amqp_host_port("amqp://guest:guest@127.0.0.1:5673/%2f"),
            Some(("127.0.0.1".into(), 5673))
        );
        assert_eq!(
            amqp_host_port("amqp://rabbit"),
            Some(("rabbit".into(), 5672))
        );
        assert_eq!(
            amqp_host_port("amqps://u:p@10.0.0.5/vh?heartbeat=10"),
            Some(("10.0.0.5".into(), 5671))
        );
        // lapin's own parser: an IPv6 literal is read as `localhost`, where lapin connects.
        assert_eq!(
            amqp_host_port("amqp://[::1]:5673"),
            Some(("localhost".into(), 5673))
        );
        assert_eq!(amqp_host_port("http://x"), None);
        assert_eq!(amqp_host_port("amqp://h:notaport"), None);
    }

    #[test]
    fn server_properties_are_read_from_the_start_frame() {
        let mut frame = b"\x00\x0a\x00\x0a\x00\x09".to_vec();
        frame.extend_from_slice(b"\x07productS\x00\x00\x00\x08RabbitMQ");
        frame.extend_from_slice(b"\x07versionS\x00\x00\x00\x064.1.4x");
        assert_eq!(
            long_string_field(&frame, b"product").as_deref(),
            Some("RabbitMQ")
        );
        assert_eq!(
            long_string_field(&frame, b"version").as_deref(),
            Some("4.1.4x")
        );
        assert_eq!(long_string_field(&frame, b"platform"), None);
    }

    /// The request testcontainers' Docker client sends, read off a socket standing in for
    /// the daemon: a versioned path (`/v1.53/version`) would be refused by an engine that
    /// speaks an older API, as Debian's docker.io 20.10 (1.41) does. See the pin in the
    /// workspace Cargo.toml.
    #[cfg(feature = "docker")]
    #[tokio::test]
    async fn docker_requests_carry_no_api_version() {
        use testcontainers::bollard::{API_DEFAULT_VERSION, Docker};
        let dir = std::env::temp_dir().join(format!("mysimbdp-docker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sock = dir.join("docker.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let daemon = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "the client closed before its request ended");
                head.extend_from_slice(&buf[..n]);
            }
            let body = r#"{"Version":"20.10.24","ApiVersion":"1.41"}"#;
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(reply.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&head).into_owned()
        });
        let path = sock.to_str().expect("utf-8 path");
        let docker = Docker::connect_with_unix(path, 5, API_DEFAULT_VERSION).expect("client");
        let version = docker.version().await;
        let head = daemon.await.expect("daemon task");
        let _ = std::fs::remove_dir_all(&dir);
        let request_line = head.lines().next().unwrap_or_default();
        assert_eq!(
            request_line, "GET /version HTTP/1.1",
            "the Docker client now sends a versioned path; an engine older than API {}.{} \
             refuses it: negotiate the version before upgrading testcontainers",
            API_DEFAULT_VERSION.major_version, API_DEFAULT_VERSION.minor_version
        );
        assert_eq!(
            version.expect("the version answer").api_version.as_deref(),
            Some("1.41")
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact("mongodb://h:27017"), "mongodb://h:27017");
    }
}
