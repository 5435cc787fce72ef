//! Starting the platform for a scenario: in the runner's process, or as separate component
//! processes (`serve coredms`, `serve batch`, `serve stream`) talking over HTTP, the way a
//! split deployment runs.

use anyhow::{Context, Result};
use mysimbdp::Component;
use mysimbdp::client::Client;
use mysimbdp::config::Settings;
use mysimbdp::infra::{Infra, ServerVersions};
use mysimbdp::processes::SplitProcesses;
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
        processes: SplitProcesses,
        _infra: Infra,
    },
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
        let processes = SplitProcesses::start(&exe, &overrides, &infra, &logs).await?;
        Ok(Self {
            admin: processes.client(Some(admin)),
            versions: infra.versions.clone(),
            mongodb_uri: infra.mongodb_uri.clone(),
            running: Running::Separate {
                processes,
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
            Running::Separate { processes, .. } => {
                out.push(("runner (load)".into(), crate::report::peak_rss(None)));
                for (component, pid) in processes.pids() {
                    // A reaped component has no /proc entry left: unknown, 0.
                    let rss = pid.map_or(0, |p| crate::report::peak_rss(Some(p)));
                    out.push((component.to_owned(), rss));
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
            Running::Separate { processes, .. } => processes.stop().await?,
        }
        Ok(())
    }
}
