//! Starting the platform for a scenario: in the runner's process, or as separate component
//! processes (`serve coredms`, `serve batch`, `serve stream`) talking over HTTP, the way a
//! split deployment runs.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mysimbdp::Component;
use mysimbdp::client::{Client, Split};
use mysimbdp::config::Settings;
use mysimbdp::infra::{Infra, ServerVersions};
use serde::{Deserialize, Serialize};

/// How the platform runs during a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// All components in the runner's process (`mysimbdp serve`).
    #[default]
    InProcess,
    /// One process per component, each reaching coredms over HTTP.
    Separate,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::InProcess => "in-process",
            Self::Separate => "separate processes",
        })
    }
}

/// A running platform and a client that reaches every part of it.
pub struct Deployment {
    /// The platform's address(es), authenticated as the operator.
    pub admin: Client,
    pub versions: ServerVersions,
    /// Where MongoDB is, for the raw driver ceiling.
    pub mongodb_uri: String,
    running: Running,
}

enum Running {
    InProcess {
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    },
    Separate {
        children: Vec<Child>,
        _infra: Infra,
    },
}

struct Child {
    component: &'static str,
    process: tokio::process::Child,
    log: PathBuf,
}

impl Deployment {
    /// Starts the platform with `overrides` (`section.key=value`, as `--set` takes them).
    pub async fn start(topology: Topology, overrides: Vec<String>, admin: &str) -> Result<Self> {
        match topology {
            Topology::InProcess => Self::in_process(overrides, admin).await,
            Topology::Separate => Self::separate(overrides, admin).await,
        }
    }

    async fn in_process(overrides: Vec<String>, admin: &str) -> Result<Self> {
        let settings = Settings::load(None, &overrides)?;
        let platform = mysimbdp::start(settings, Component::All).await?;
        let versions = platform.versions.clone();
        let mongodb_uri = platform.mongodb_uri.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(mysimbdp::serve(listener, platform, async {
            let _ = stop_rx.await;
        }));
        Ok(Self {
            admin: Client::new(&format!("http://{addr}"), Some(admin)),
            versions,
            mongodb_uri,
            running: Running::InProcess { stop, server },
        })
    }

    /// Provisions the infrastructure here (so testcontainers, if used, outlive the
    /// components), then runs this executable's `serve <component>` once per component.
    async fn separate(overrides: Vec<String>, admin: &str) -> Result<Self> {
        let settings = Settings::load(None, &overrides)?;
        let infra = Infra::provision(&settings).await?;
        let exe = std::env::current_exe().context("cannot find the scenario executable")?;
        let logs = settings.staging.dir.with_extension("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let mut addrs = Vec::new();
        let mut children = Vec::new();
        for component in ["coredms", "batch", "stream"] {
            let addr = free_port()?;
            let mut args = vec!["serve".to_owned(), component.to_owned()];
            for o in overrides
                .iter()
                .cloned()
                .chain([format!("http.listen=\"{addr}\"")])
                .chain(
                    (component != "coredms")
                        .then(|| format!("http.coredms_url=\"http://{}\"", addrs[0])),
                )
            {
                args.push("--set".into());
                args.push(o);
            }
            let log = logs.join(format!("{component}.log"));
            let out = std::fs::File::create(&log)?;
            let process = tokio::process::Command::new(&exe)
                .args(&args)
                .env("MONGODB_URI", &infra.mongodb_uri)
                .env("AMQP_URI", &infra.amqp_uri)
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start `{} serve {component}`", exe.display()))?;
            children.push(Child {
                component,
                process,
                log,
            });
            // coredms first: the others check it at start.
            wait_healthy(&addr, children.last_mut().expect("just pushed")).await?;
            addrs.push(addr);
        }
        let admin = Client::split(
            &format!("http://{}", addrs[0]),
            Split {
                batch: format!("http://{}", addrs[1]),
                stream: format!("http://{}", addrs[2]),
            },
            Some(admin),
        );
        Ok(Self {
            admin,
            versions: infra.versions.clone(),
            mongodb_uri: infra.mongodb_uri.clone(),
            running: Running::Separate {
                children,
                _infra: infra,
            },
        })
    }

    /// Peak resident memory (VmHWM) of each process: the runner, and each component when
    /// they run apart.
    pub fn peak_rss(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        match &self.running {
            Running::InProcess { .. } => {
                out.push((
                    "runner (platform + load)".into(),
                    crate::report::peak_rss(None),
                ));
            }
            Running::Separate { children, .. } => {
                out.push(("runner (load)".into(), crate::report::peak_rss(None)));
                for c in children {
                    out.push((
                        c.component.to_owned(),
                        crate::report::peak_rss(c.process.id()),
                    ));
                }
            }
        }
        out
    }

    /// Stops the platform gracefully (SIGTERM to each component, coredms last) and reports a
    /// component that had already died or failed to drain.
    pub async fn stop(self) -> Result<()> {
        match self.running {
            Running::InProcess { stop, server } => {
                let _ = stop.send(());
                server.await??;
            }
            Running::Separate { mut children, .. } => {
                let mut failed = Vec::new();
                for c in children.iter_mut().rev() {
                    if let Ok(Some(status)) = c.process.try_wait() {
                        failed.push(format!(
                            "{} had exited ({status}) before the end; see {}",
                            c.component,
                            c.log.display()
                        ));
                        continue;
                    }
                    if let Some(pid) = c.process.id() {
                        let _ = std::process::Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status();
                    }
                    match tokio::time::timeout(Duration::from_secs(30), c.process.wait()).await {
                        Ok(Ok(s)) if s.success() => {}
                        Ok(Ok(s)) => failed.push(format!(
                            "{} exited with {s}; see {}",
                            c.component,
                            c.log.display()
                        )),
                        _ => {
                            let _ = c.process.kill().await;
                            failed.push(format!("{} did not drain within 30 s", c.component));
                        }
                    }
                }
                if !failed.is_empty() {
                    bail!("platform components: {}", failed.join("; "));
                }
            }
        }
        Ok(())
    }
}

fn free_port() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// Waits until a component answers `/healthz`, or fails with the tail of its log if it exits
/// or takes too long.
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
        if exited.is_some() || started.elapsed() > Duration::from_secs(60) {
            let log = std::fs::read_to_string(&child.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "`serve {}` {} on {addr}; its log ({}):\n{}",
                child.component,
                match exited {
                    Some(s) => format!("exited ({s})"),
                    None => "did not become healthy within 60 s".into(),
                },
                child.log.display(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
