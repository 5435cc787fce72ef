//! Starting the platform for a scenario: in the runner's process, or as separate component
//! processes (`serve coredms`, `serve batch`, `serve stream`) talking over HTTP, the way a
//! split deployment runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use mysimbdp::client::{Client, ClientError};
use mysimbdp::config::Settings;
use mysimbdp::infra::{Infra, ServerVersions};
use mysimbdp::processes::SplitProcesses;
use mysimbdp::testing::{InProcess, Runtime};

use crate::host;
use crate::schema::Topology;

/// How long an in-process platform may take to drain when the run ends.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A running platform and a client that reaches every part of it.
pub struct Deployment {
    /// The platform's address(es), authenticated as the operator.
    pub admin: Client,
    pub versions: ServerVersions,
    /// Where MongoDB is, for the raw driver ceiling.
    pub mongodb_uri: String,
    /// Where RabbitMQ is, for the raw stream pipeline.
    pub amqp_uri: String,
    running: Running,
}

enum Running {
    /// On the runner's runtime, sharing its threads with the load.
    InProcess(InProcess),
    Separate {
        processes: SplitProcesses,
        _infra: Infra,
        /// Each component's peak resident memory, sampled while it runs: a component that
        /// dies keeps the peak it reached.
        peaks: Arc<Mutex<HashMap<&'static str, u64>>>,
        sampler: tokio::task::JoinHandle<()>,
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
        let platform = InProcess::start(settings, 0, Runtime::Shared).await?;
        Ok(Self {
            admin: Client::new(&platform.url(), Some(admin)),
            versions: platform.versions.clone(),
            mongodb_uri: platform.mongodb_uri.clone(),
            amqp_uri: platform.amqp_uri.clone(),
            running: Running::InProcess(platform),
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
        let peaks = Arc::new(Mutex::new(HashMap::new()));
        let pids: Vec<(&'static str, u32)> = processes
            .pids()
            .filter_map(|(c, p)| Some((c, p?)))
            .collect();
        let sampled = peaks.clone();
        let sampler = tokio::spawn(async move {
            loop {
                for (c, pid) in &pids {
                    // Read under the lock: a reading from before a reset of the peaks
                    // (`reset_peak_rss`) cannot land after it.
                    if let Ok(mut m) = sampled.lock() {
                        let rss = host::peak_rss(Some(*pid));
                        let e = m.entry(*c).or_insert(0);
                        *e = (*e).max(rss);
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        });
        Ok(Self {
            admin: processes.client(Some(admin)),
            versions: infra.versions.clone(),
            mongodb_uri: infra.mongodb_uri.clone(),
            amqp_uri: infra.amqp_uri.clone(),
            running: Running::Separate {
                processes,
                _infra: infra,
                peaks,
                sampler,
            },
        })
    }

    /// The platform's processes and their ids: the runner's own when the platform runs in
    /// it, else each component still running.
    pub fn processes(&self) -> Vec<(String, u32)> {
        match &self.running {
            Running::InProcess(_) => vec![("runner (platform + load)".into(), std::process::id())],
            Running::Separate { processes, .. } => processes
                .pids()
                .filter_map(|(c, p)| Some((c.to_owned(), p?)))
                .collect(),
        }
    }

    /// Peak resident memory (VmHWM) of each process: the runner, and each component when
    /// they run apart.
    pub fn peak_rss(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        match &self.running {
            Running::InProcess(_) => {
                out.push(("runner (platform + load)".into(), host::peak_rss(None)));
            }
            Running::Separate {
                processes, peaks, ..
            } => {
                out.push(("runner (load)".into(), host::peak_rss(None)));
                let sampled = peaks.lock().map(|m| m.clone()).unwrap_or_default();
                for (component, pid) in processes.pids() {
                    // A dead component has no memory figures left: its sampled peak.
                    let now = pid.map_or(0, |p| host::peak_rss(Some(p)));
                    let rss = now.max(sampled.get(component).copied().unwrap_or(0));
                    out.push((component.to_owned(), rss));
                }
            }
        }
        out
    }

    /// Starts each process's peak resident memory afresh, so [`Self::peak_rss`] gives the
    /// peak from now on (a load's own, not that of a closed loop run before it to measure
    /// its rate). The processes' peak sum until now, or `None` when a process's could not
    /// be reset (the peaks then go on from before).
    pub fn reset_peak_rss(&self) -> Option<u64> {
        let before = self.peak_rss().iter().map(|(_, b)| b).sum();
        let mut all = host::reset_peak_rss(None);
        if let Running::Separate {
            processes, peaks, ..
        } = &self.running
        {
            // Under the sampler's lock; a component's sampled peak is forgotten only when
            // its own was reset (a dead one's stays: it has no other figure).
            let Ok(mut m) = peaks.lock() else {
                return None;
            };
            for (component, pid) in processes.pids() {
                if pid.is_some_and(|p| host::reset_peak_rss(Some(p))) {
                    m.remove(component);
                } else {
                    all = false;
                }
            }
        }
        all.then_some(before)
    }

    /// Caps each component's address space (`prlimit --as`), so a component that tenant
    /// code makes grow fails alone (an allocation fails, the process aborts) instead of
    /// exhausting the machine. Separate processes only.
    pub fn limit_memory(&self, bytes: u64) -> Result<()> {
        let Running::Separate { processes, .. } = &self.running else {
            anyhow::bail!("a memory limit needs the platform in processes of its own");
        };
        for (component, pid) in processes.pids() {
            let pid = pid.with_context(|| format!("{component} is not running"))?;
            let out = std::process::Command::new("prlimit")
                .arg(format!("--pid={pid}"))
                .arg(format!("--as={bytes}"))
                .output()
                .context("a memory limit needs `prlimit` (util-linux)")?;
            if !out.status.success() {
                anyhow::bail!(
                    "prlimit on {component}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    /// Stops the platform gracefully (SIGTERM to each component, coredms last) and reports a
    /// component that had already died or failed to drain. Bounded: a platform whose
    /// workers never return (tenant code that was not stopped) is reported, not waited for.
    pub async fn stop(self) -> Result<()> {
        match self.running {
            Running::InProcess(platform) => platform.stop(STOP_TIMEOUT).await?,
            Running::Separate {
                processes, sampler, ..
            } => {
                sampler.abort();
                processes.stop().await?;
            }
        }
        Ok(())
    }
}

/// Retries a call the platform may refuse while busy or restarting (no answer, 503, 429):
/// every 200 ms for up to a minute.
pub async fn retry<T, F, Fut>(f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    use backon::{ConstantBuilder, Retryable};
    let every = ConstantBuilder::new()
        .with_delay(std::time::Duration::from_millis(200))
        .with_max_times(300);
    f.retry(every)
        .sleep(tokio::time::sleep)
        .when(transient)
        .await
}

/// An answer worth asking again: none at all, 503 (busy) or 429 (over the tenant's share).
pub fn transient(e: &ClientError) -> bool {
    e.status()
        .is_none_or(|s| s.as_u16() == 503 || s.as_u16() == 429)
}
