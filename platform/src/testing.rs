//! The whole platform in this process, and the faults done to its servers: one launcher and
//! one set of fault helpers for the integration tests, the workbench and its fault scenarios.
//!
//! [`InProcess`] runs `start` + `serve` on a loopback port, either on the caller's runtime
//! or on a runtime of its own, which [`InProcess::kill`] drops whole, as a crash would.
//! The fault helpers cut a namespace's broker connections ([`cut_connections`]) and run a
//! MongoDB server that can be stopped and started again ([`OwnMongo`]). Nothing of the
//! platform's components uses this module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::Settings;
use crate::infra::ServerVersions;
use crate::{Component, StartError};

/// Where the platform's tasks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// On the caller's runtime, sharing its threads (the workbench's load and platform).
    Shared,
    /// On a runtime of its own with this many worker threads, so it can be killed.
    Own { workers: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Listen { port: u16, source: std::io::Error },
    #[error("cannot build the platform's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the platform's task ended before it answered (killed or panicked)")]
    Gone,
    #[error(
        "the platform did not stop within {} s: a worker is still busy (tenant code that never returned?)",
        .0.as_secs()
    )]
    StopTimeout(Duration),
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// A runtime that is shut down without waiting when dropped: dropping a `Runtime` from
/// inside another one would panic, and a killed platform must not be waited for.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The platform (every component) serving on `127.0.0.1`. Dropping it asks for a graceful
/// stop and, on its own runtime, drops every task without waiting.
pub struct InProcess {
    pub addr: SocketAddr,
    pub versions: ServerVersions,
    /// Where MongoDB is (given or provisioned).
    pub mongodb_uri: String,
    /// Where RabbitMQ is (given or provisioned).
    pub amqp_uri: String,
    stop: Option<oneshot::Sender<()>>,
    served: Option<oneshot::Receiver<std::io::Result<()>>>,
    runtime: OwnRuntime,
}

type Ready = Result<(SocketAddr, ServerVersions, String, String), LaunchError>;

impl InProcess {
    /// Starts the platform with `settings` and serves it on `port` (0: any free port).
    /// Returns once it listens.
    pub async fn start(
        settings: Settings,
        port: u16,
        runtime: Runtime,
    ) -> Result<Self, LaunchError> {
        let (ready_tx, ready_rx) = oneshot::channel::<Ready>();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (served_tx, served) = oneshot::channel();
        let run = async move {
            let up = async {
                let platform = crate::start(settings, Component::All).await?;
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .and_then(|l| Ok((l.local_addr()?, l)))
                    .map_err(|source| LaunchError::Listen { port, source })?;
                Ok::<_, LaunchError>((platform, listener))
            };
            match up.await {
                Ok((platform, (addr, listener))) => {
                    let ready = (
                        addr,
                        platform.versions.clone(),
                        platform.mongodb_uri.clone(),
                        platform.amqp_uri.clone(),
                    );
                    let _ = ready_tx.send(Ok(ready));
                    let r = crate::serve(listener, platform, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                    let _ = served_tx.send(r);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        };
        let runtime = match runtime {
            Runtime::Shared => {
                tokio::spawn(run);
                OwnRuntime(None)
            }
            Runtime::Own { workers } => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .enable_all()
                    .build()
                    .map_err(LaunchError::Runtime)?;
                rt.spawn(run);
                OwnRuntime(Some(rt))
            }
        };
        let (addr, versions, mongodb_uri, amqp_uri) =
            ready_rx.await.map_err(|_| LaunchError::Gone)??;
        Ok(Self {
            addr,
            versions,
            mongodb_uri,
            amqp_uri,
            stop: Some(stop),
            served: Some(served),
            runtime,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends the platform abruptly, as a crash would: no draining, no final writes. On its
    /// own runtime every task is dropped; on a shared one (whose tasks cannot be told from
    /// the caller's) this only asks for a stop and does not wait for it.
    pub fn kill(&mut self) {
        if self.runtime.0.is_some() {
            self.runtime = OwnRuntime(None);
        } else if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops gracefully: no new requests, in-flight ones and background work drain. A
    /// platform that has not stopped `within` is reported, not waited for.
    pub async fn stop(mut self, within: Duration) -> Result<(), LaunchError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = self.served.take().ok_or(LaunchError::Gone)?;
        match tokio::time::timeout(within, served).await {
            Ok(Ok(r)) => r.map_err(LaunchError::Serve),
            Ok(Err(_)) => Err(LaunchError::Gone),
            Err(_) => Err(LaunchError::StopTimeout(within)),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A free TCP port on the loopback interface (free when asked; bind it soon).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether `rabbitmqctl` can be run here (the broker faults need it).
pub fn rabbitmqctl_available() -> bool {
    std::process::Command::new("rabbitmqctl")
        .arg("status")
        .output()
        .is_ok()
}

/// Closes, from the broker side, every connection whose client properties carry
/// `namespace` (the platform names its connections after it); returns how many closed.
pub fn cut_connections(namespace: &str, reason: &str) -> std::io::Result<usize> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers"])
        .args(["pid", "client_properties"])
        .output()?;
    let mut cut = 0;
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(namespace))
    {
        if let Some(pid) = line.split_whitespace().next() {
            let ok = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid, reason])
                .output()
                .is_ok_and(|o| o.status.success());
            cut += usize::from(ok);
        }
    }
    Ok(cut)
}

/// How long the queues of a test's or a workbench run's namespace outlive their last use
/// (`amqp.queue_expires_ms`): long past any run's pause, yet a broker that serves run after
/// run (a developer's, CI's) does not keep thousands of empty queues.
pub const QUEUE_EXPIRES_MS: u64 = 15 * 60 * 1000;

/// The setting that makes a namespace's queues expire ([`QUEUE_EXPIRES_MS`]), as
/// `section.key=value`.
pub fn expiring_queues() -> String {
    format!("amqp.queue_expires_ms={QUEUE_EXPIRES_MS}")
}

/// The variable holding a command that starts a MongoDB server on `{port}` with its data in
/// `{dir}`, e.g. `secantusd-py --port {port} --storage-path {dir}`.
pub const MONGOD_COMMAND_VAR: &str = "MYSIMBDP_TEST_MONGOD";

/// How long a started MongoDB server may take to listen.
const MONGOD_START: Duration = Duration::from_secs(60);

/// A MongoDB server of one's own (from [`MONGOD_COMMAND_VAR`]), to stop and start again.
/// Dropping it kills the server and removes its data.
pub struct OwnMongo {
    command: String,
    pub port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl OwnMongo {
    /// Starts `command` on a free port with its data in `dir`; returns once it listens.
    pub async fn start(command: String, dir: PathBuf) -> std::io::Result<Self> {
        let mut db = Self {
            command,
            port: free_port()?,
            dir,
            child: None,
        };
        db.restart().await?;
        Ok(db)
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// Starts the (stopped) server again on the same port and data; returns once it listens.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        let cmd = self
            .command
            .replace("{port}", &self.port.to_string())
            .replace("{dir}", &self.dir.display().to_string());
        let mut parts = cmd.split_whitespace();
        let program = parts.next().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty database command")
        })?;
        let child = std::process::Command::new(program)
            .args(parts)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start `{cmd}`: {e}")))?;
        self.child = Some(child);
        let until = tokio::time::Instant::now() + MONGOD_START;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > until {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("`{cmd}` did not listen within {MONGOD_START:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// A clean stop (SIGTERM), as an operator restarting the server would do.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnMongo {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (documents, distinct `seq` values) in a database's `messages` collection, the stream
/// load's messages; zeros while the database cannot be reached (during an outage).
pub async fn messages_stored(mongodb_uri: &str, db: &str) -> (u64, u64) {
    let Ok(c) = mongodb::Client::with_uri_str(mongodb_uri).await else {
        return (0, 0);
    };
    let coll = c
        .database(db)
        .collection::<mongodb::bson::Document>("messages");
    let total = coll
        .count_documents(mongodb::bson::doc! {})
        .await
        .unwrap_or(0);
    let distinct = coll
        .distinct("seq", mongodb::bson::doc! {})
        .await
        .map_or(0, |d| d.len() as u64);
    (total, distinct)
}
