//! A split deployment as child processes: `<program> serve coredms|batch|stream`, each a
//! real process reaching coredms over HTTP. The workbench's `separate` topology and the
//! split integration test start the platform this way.

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
    /// Components that had exited, exited non-zero or did not drain at stop.
    #[error("platform components: {}", .0.join("\n"))]
    Stop(Vec<String>),
}

const COMPONENTS: [&str; 3] = ["coredms", "batch", "stream"];
const START_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The three component processes, in start order; killed if dropped without [`stop`].
///
/// [`stop`]: SplitProcesses::stop
pub struct SplitProcesses {
    children: Vec<Child>,
    /// Listen addresses, in the order of `COMPONENTS`.
    addrs: Vec<String>,
}

struct Child {
    component: &'static str,
    process: tokio::process::Child,
    log: PathBuf,
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
        std::fs::create_dir_all(log_dir).map_err(|source| ProcessError::Create {
            path: log_dir.to_owned(),
            source,
        })?;
        let mut me = Self {
            children: Vec::new(),
            addrs: Vec::new(),
        };
        for component in COMPONENTS {
            let addr = free_addr()?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(["serve", component]);
            let own = std::iter::once(format!("http.listen=\"{addr}\"")).chain(
                me.addrs
                    .first()
                    .map(|core| format!("http.coredms_url=\"http://{core}\"")),
            );
            for o in overrides.iter().cloned().chain(own) {
                cmd.arg("--set").arg(o);
            }
            let log = log_dir.join(format!("{component}.log"));
            let out = std::fs::File::create(&log).map_err(|source| ProcessError::Create {
                path: log.clone(),
                source,
            })?;
            let process = cmd
                .env("MONGODB_URI", &infra.mongodb_uri)
                .env("AMQP_URI", &infra.amqp_uri)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| ProcessError::Spawn {
                    program: program.to_owned(),
                    component,
                    source,
                })?;
            me.children.push(Child {
                component,
                process,
                log,
            });
            // In order: batch and stream check coredms when they start.
            wait_healthy(&addr, me.children.last_mut().expect("just pushed")).await?;
            me.addrs.push(addr);
        }
        Ok(me)
    }

    /// A client that sends each request to the component that answers it.
    pub fn client(&self, token: Option<&str>) -> Client {
        Client::split(
            &format!("http://{}", self.addrs[0]),
            Split {
                batch: format!("http://{}", self.addrs[1]),
                stream: format!("http://{}", self.addrs[2]),
            },
            token,
        )
    }

    /// The address `component` listens on.
    pub fn addr(&self, component: &str) -> Option<&str> {
        let i = COMPONENTS.iter().position(|c| *c == component)?;
        self.addrs.get(i).map(String::as_str)
    }

    /// Each component and its process id (`None` once it has been reaped).
    pub fn pids(&self) -> impl Iterator<Item = (&'static str, Option<u32>)> + '_ {
        self.children.iter().map(|c| (c.component, c.process.id()))
    }

    /// SIGTERM to each component, coredms last; fails naming every component that had
    /// already exited, exited non-zero or did not drain within 30 s, with its log's tail.
    pub async fn stop(mut self) -> Result<()> {
        let mut failed = Vec::new();
        for c in self.children.iter_mut().rev() {
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
                failed.push(format!("{} {p}; {}", c.component, log_tail(&c.log)));
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

async fn wait_healthy(addr: &str, child: &mut Child) -> Result<()> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        let exited = child.process.try_wait()?;
        if exited.is_some() || started.elapsed() > START_TIMEOUT {
            return Err(ProcessError::Unhealthy(format!(
                "`serve {}` {} on {addr}; {}",
                child.component,
                match exited {
                    Some(s) => format!("exited ({s})"),
                    None => format!("did not become healthy within {START_TIMEOUT:?}"),
                },
                log_tail(&child.log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
