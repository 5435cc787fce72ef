//! A split deployment as child processes: `<program> serve coredms|batch|stream`, each a
//! real process reaching coredms over HTTP. The workbench's `separate` topology and the
//! split integration test start the platform this way; the workbench's `replicas` scenario
//! starts several batch and stream managers beside one coredms, adds one, kills one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::client::{Client, Split};
use crate::infra::Infra;

type Result<T, E = ProcessError> = std::result::Result<T, E>;

/// Why the component processes did not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The log directory or a component's log file.
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start `{} serve {component}`", program.display())]
    Spawn {
        program: PathBuf,
        component: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A free port, a log handle, the state of a child.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A component exited or stayed unhealthy at start: what happened, with its log's tail.
    #[error("{0}")]
    Unhealthy(String),
    /// A replica that was never started, or was killed already.
    #[error("no running {0}")]
    NoReplica(String),
    /// Components that had exited, exited non-zero or did not drain at stop.
    #[error("platform components: {}", .0.join("\n"))]
    Stop(Vec<String>),
}

/// The ingest managers, of which a deployment may run several (coredms runs once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Manager {
    Batch,
    Stream,
}

impl Manager {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Stream => "stream",
        }
    }
}

/// How many of each ingest manager to start beside coredms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub batch: usize,
    pub stream: usize,
}

const START_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The component processes, in start order (coredms first); killed if dropped without
/// [`stop`]. A manager's replicas are numbered from 0 in the order they started; a killed
/// one keeps its number, so the others' do not move.
///
/// [`stop`]: SplitProcesses::stop
pub struct SplitProcesses {
    children: Vec<Child>,
    /// What starting one more replica needs: the same program, settings and servers.
    program: PathBuf,
    overrides: Vec<String>,
    env: [(&'static str, String); 2],
    log_dir: PathBuf,
}

struct Child {
    component: &'static str,
    replica: usize,
    addr: String,
    process: tokio::process::Child,
    log: PathBuf,
    /// Killed on purpose ([`SplitProcesses::kill`]): not a failure at stop.
    killed: bool,
}

impl Child {
    /// `batch`, `batch-1`, `batch-2`, …: the first replica keeps the component's name, so a
    /// deployment of one of each reads as it always did.
    fn name(&self) -> String {
        replica_name(self.component, self.replica)
    }
}

fn replica_name(component: &str, replica: usize) -> String {
    match replica {
        0 => component.to_owned(),
        n => format!("{component}-{n}"),
    }
}

impl SplitProcesses {
    /// Runs `program serve <component> --set <override>…` for coredms, then batch and stream
    /// pointed at it, each on a free port, with the servers of `infra` in its environment
    /// and its output in `log_dir/<component>.log`. Waits for each to answer `/healthz`;
    /// the error of one that exits or stays unhealthy carries the tail of its log.
    pub async fn start(
        program: &Path,
        overrides: &[String],
        infra: &Infra,
        log_dir: &Path,
    ) -> Result<Self> {
        let one = Replicas {
            batch: 1,
            stream: 1,
        };
        Self::start_replicas(program, overrides, infra, log_dir, one).await
    }

    /// As [`start`](Self::start), with `replicas` batch and stream managers sharing the one
    /// coredms (and the settings, so the staging directory too); replica `n > 0` logs to
    /// `log_dir/<component>-<n>.log`.
    pub async fn start_replicas(
        program: &Path,
        overrides: &[String],
        infra: &Infra,
        log_dir: &Path,
        replicas: Replicas,
    ) -> Result<Self> {
        std::fs::create_dir_all(log_dir).map_err(|source| ProcessError::Create {
            path: log_dir.to_owned(),
            source,
        })?;
        let mut me = Self {
            children: Vec::new(),
            program: program.to_owned(),
            overrides: overrides.to_vec(),
            env: [
                ("MONGODB_URI", infra.mongodb_uri.clone()),
                ("AMQP_URI", infra.amqp_uri.clone()),
            ],
            log_dir: log_dir.to_owned(),
        };
        me.spawn("coredms").await?;
        for _ in 0..replicas.batch {
            me.add(Manager::Batch).await?;
        }
        for _ in 0..replicas.stream {
            me.add(Manager::Stream).await?;
        }
        Ok(me)
    }

    /// Starts one more replica of `manager` over the same coredms; returns its number.
    pub async fn add(&mut self, manager: Manager) -> Result<usize> {
        self.spawn(manager.as_str()).await
    }

    /// Starts `component` on a free port and waits until it is healthy; returns its replica
    /// number. Batch and stream are pointed at coredms, which must be running already.
    async fn spawn(&mut self, component: &'static str) -> Result<usize> {
        let replica = self
            .children
            .iter()
            .filter(|c| c.component == component)
            .count();
        let addr = free_addr()?;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(["serve", component]);
        let own = std::iter::once(format!("http.listen=\"{addr}\"")).chain(
            self.children
                .first()
                .map(|core| format!("http.coredms_url=\"http://{}\"", core.addr)),
        );
        for o in self.overrides.iter().cloned().chain(own) {
            cmd.arg("--set").arg(o);
        }
        let log = self
            .log_dir
            .join(format!("{}.log", replica_name(component, replica)));
        let out = std::fs::File::create(&log).map_err(|source| ProcessError::Create {
            path: log.clone(),
            source,
        })?;
        let process = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                program: self.program.clone(),
                component,
                source,
            })?;
        self.children.push(Child {
            component,
            replica,
            addr,
            process,
            log,
            killed: false,
        });
        // In order: batch and stream check coredms when they start.
        if let Err(e) = wait_healthy(self.children.last_mut().expect("just pushed")).await {
            // Dropped, so killed: a replica that never became healthy is not one of ours.
            self.children.pop();
            return Err(e);
        }
        Ok(replica)
    }

    /// A client that sends each request to the component that answers it (the first
    /// running replica of each manager).
    pub fn client(&self, token: Option<&str>) -> Client {
        let first = |m: Manager| {
            let r = self.running(m).first().copied()?;
            self.url(m, r)
        };
        Client::split(
            &format!("http://{}", self.children[0].addr),
            Split {
                batch: first(Manager::Batch).unwrap_or_default(),
                stream: first(Manager::Stream).unwrap_or_default(),
            },
            token,
        )
    }

    /// A client whose file requests go to batch replica `batch` and whose message and
    /// consumer requests go to stream replica `stream`; `None` if either is not running.
    pub fn client_at(&self, batch: usize, stream: usize, token: Option<&str>) -> Option<Client> {
        Some(Client::split(
            &format!("http://{}", self.children[0].addr),
            Split {
                batch: self.url(Manager::Batch, batch)?,
                stream: self.url(Manager::Stream, stream)?,
            },
            token,
        ))
    }

    fn url(&self, manager: Manager, replica: usize) -> Option<String> {
        self.replica_addr(manager, replica)
            .map(|a| format!("http://{a}"))
    }

    /// The address replica `replica` of `manager` listens on, while it runs.
    pub fn replica_addr(&self, manager: Manager, replica: usize) -> Option<&str> {
        self.find(manager.as_str(), replica)
            .filter(|c| !c.killed)
            .map(|c| c.addr.as_str())
    }

    fn find(&self, component: &str, replica: usize) -> Option<&Child> {
        self.children
            .iter()
            .find(|c| c.component == component && c.replica == replica)
    }

    /// The address `component` listens on (its first replica's).
    pub fn addr(&self, component: &str) -> Option<&str> {
        self.find(component, 0).map(|c| c.addr.as_str())
    }

    /// The replicas of `manager` still running (not killed), by number.
    pub fn running(&self, manager: Manager) -> Vec<usize> {
        self.children
            .iter()
            .filter(|c| c.component == manager.as_str() && !c.killed)
            .map(|c| c.replica)
            .collect()
    }

    /// The process id of each running replica of `manager`, by replica number: how a
    /// manager's own reports (which name it by host and process) are told apart.
    pub fn replica_pids(&self, manager: Manager) -> Vec<(usize, u32)> {
        self.children
            .iter()
            .filter(|c| c.component == manager.as_str() && !c.killed)
            .filter_map(|c| Some((c.replica, c.process.id()?)))
            .collect()
    }

    /// Each component and its process id (`None` once it has been reaped).
    pub fn pids(&self) -> impl Iterator<Item = (&'static str, Option<u32>)> + '_ {
        self.children.iter().map(|c| (c.component, c.process.id()))
    }

    /// SIGKILL to replica `replica` of `manager`, reaped before this returns: it gets no
    /// chance to release its leases or finish its batches, as in a crash. It stays dead;
    /// [`add`](Self::add) starts a replacement.
    pub async fn kill(&mut self, manager: Manager, replica: usize) -> Result<()> {
        let child = self
            .children
            .iter_mut()
            .find(|c| c.component == manager.as_str() && c.replica == replica && !c.killed)
            .ok_or_else(|| ProcessError::NoReplica(replica_name(manager.as_str(), replica)))?;
        // tokio's kill is SIGKILL on Unix, and waits for the process.
        child.process.kill().await?;
        child.killed = true;
        Ok(())
    }

    /// SIGTERM to each component still meant to run, last started first (coredms last);
    /// fails naming every component that had already exited, exited non-zero or did not
    /// drain within 30 s, with its log's tail. Replicas killed on purpose are left out.
    pub async fn stop(mut self) -> Result<()> {
        let mut failed = Vec::new();
        for c in self.children.iter_mut().rev().filter(|c| !c.killed) {
            let problem = if let Ok(Some(status)) = c.process.try_wait() {
                Some(format!("had exited ({status}) before the end"))
            } else {
                if let Some(pid) = c.process.id() {
                    let _ = std::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status();
                }
                match tokio::time::timeout(DRAIN_TIMEOUT, c.process.wait()).await {
                    Ok(Ok(s)) if s.success() => None,
                    Ok(Ok(s)) => Some(format!("exited with {s}")),
                    Ok(Err(e)) => Some(format!("could not be waited for: {e}")),
                    Err(_) => {
                        let _ = c.process.kill().await;
                        Some(format!("did not drain within {DRAIN_TIMEOUT:?}"))
                    }
                }
            };
            if let Some(p) = problem {
                failed.push(format!("{} {p}; {}", c.name(), log_tail(&c.log)));
            }
        }
        if !failed.is_empty() {
            return Err(ProcessError::Stop(failed));
        }
        Ok(())
    }
}

fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// The last 20 lines of a component's log, named by its path.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    format!("its log ({}):\n{}", log.display(), tail.join("\n"))
}

async fn wait_healthy(child: &mut Child) -> Result<()> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("http://{}/healthz", child.addr))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(());
        }
        let exited = child.process.try_wait()?;
        if exited.is_some() || started.elapsed() > START_TIMEOUT {
            return Err(ProcessError::Unhealthy(format!(
                "`serve {}` ({}) {} on {}; {}",
                child.component,
                child.name(),
                match exited {
                    Some(s) => format!("exited ({s})"),
                    None => format!("did not become healthy within {START_TIMEOUT:?}"),
                },
                child.addr,
                log_tail(&child.log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
