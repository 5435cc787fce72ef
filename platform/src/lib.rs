//! mysimbdp: a multi-tenant big-data ingestion platform. Tenants ingest batch files and
//! RabbitMQ streams through their own sandboxed ingest apps into their own MongoDB
//! databases, and every ingestion is logged.
//!
//! The library does the work; the `mysimbdp` binary parses flags and calls [`start`] and
//! [`serve`]. See ARCHITECTURE.md for the map.

pub mod api;
pub mod apps;
pub mod batch;
pub mod client;
pub mod config;
pub mod coredms;
pub mod events;
pub mod http;
pub mod infra;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod pipeline;
pub mod processes;
pub mod stream;
pub mod tenants;
#[cfg(feature = "testing")]
pub mod testing;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::batch::{BatchApi, BatchManager, Staging};
use crate::config::Settings;
use crate::coredms::{CoreDms, CoredmsApi, MongoStore, OnNewTenant, Remote};
use crate::http::{Auth, Edge};
use crate::infra::{Infra, ServerVersions};
use crate::metrics::Metrics;
use crate::pipeline::{AppCache, AppsApi};
use crate::stream::{Broker, StreamApi, StreamManager};

/// Which part of the platform a process runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    /// Everything in one process (the default topology).
    All,
    /// Tenants, logs and the database; the only component with a MongoDB client.
    Coredms,
    /// The batch ingest manager; reaches coredms over HTTP.
    Batch,
    /// The data broker and stream ingest manager; reaches coredms over HTTP.
    Stream,
}

/// A running process: the components it was started with, assembled into one HTTP
/// application, and what it must stop. Each router holds its own state; a component this
/// process does not run has no routes at all.
pub struct Platform {
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub versions: ServerVersions,
    /// Where MongoDB is (given or provisioned), for tools that measure the raw server.
    pub mongodb_uri: String,
    /// Where RabbitMQ is (given or provisioned), likewise.
    pub amqp_uri: String,
    pub component: Component,
    app: axum::Router,
    /// Requests in flight, globally and per tenant (see [`http::InFlight`]).
    in_flight: Arc<http::InFlight>,
    shutdown: CancellationToken,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    _infra: Option<Infra>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Infra(#[from] infra::InfraError),
    #[error("cannot connect to MongoDB: {0}")]
    Core(#[from] coredms::CoreError),
    #[error("cannot create the staging directory {path}: {source}")]
    Staging {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("refusing to start: {0}")]
    Auth(#[from] config::TokenError),
    #[error(
        "`serve {0:?}` needs auth.internal_token or auth.admin_token (MYSIMBDP_INTERNAL_TOKEN): the components of a split deployment authenticate to each other with it"
    )]
    NoInternalToken(Component),
    #[error(
        "`serve {0:?}` needs http.coredms_url (MYSIMBDP_HTTP__COREDMS_URL): the address of the coredms service"
    )]
    NoCoredms(Component),
}

/// Provisions or connects to the infrastructure and builds the components of `component`.
/// Refuses a short admin or internal token before anything else happens, and announces
/// an admin API that is off.
pub async fn start(settings: Settings, component: Component) -> Result<Arc<Platform>, StartError> {
    settings.auth.check().map_err(StartError::Auth)?;
    if component != Component::All && settings.auth.internal().is_empty() {
        return Err(StartError::NoInternalToken(component));
    }
    if settings.auth.admin_api_on() {
        tracing::info!("admin API on");
    } else {
        tracing::warn!(
            "admin API off: no admin token is set (auth.admin_token / MYSIMBDP_ADMIN_TOKEN); admin endpoints answer 403 saying so"
        );
    }
    let infra = Infra::provision(&settings).await?;
    tracing::info!(
        mongodb = %infra::redact(&infra.mongodb_uri),
        mongodb_version = %infra.versions.mongodb,
        mongodb_server = %infra.versions.mongodb_server,
        amqp = %infra::redact(&infra.amqp_uri),
        rabbitmq = %infra.versions.rabbitmq,
        "infrastructure ready"
    );
    let ns = settings.platform.namespace.clone();
    let coredms = match component {
        Component::All | Component::Coredms => CoreDms::Local(Arc::new(
            MongoStore::connect(&infra.mongodb_uri, &settings.mongodb, &ns).await?,
        )),
        other => {
            if settings.http.coredms_url.is_empty() {
                return Err(StartError::NoCoredms(other));
            }
            CoreDms::Remote(Arc::new(Remote::new(
                &settings.http.coredms_url,
                settings.auth.internal(),
                &settings.http,
            )?))
        }
    };
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let apps = Arc::new(AppCache::default());
    let settings = Arc::new(settings);
    let auth = Auth {
        settings: Arc::new(settings.auth.clone()),
        tenants: Arc::new(coredms.clone()),
    };
    let runs = |c: Component| component == Component::All || component == c;
    // Every process serves the whole API's document, whichever components it runs.
    let mut public = vec![openapi::router()];
    let mut internal = Vec::new();
    let mut tasks = Vec::new();
    // coredms declares each new tenant's queues, so it holds a broker too.
    let broker = (runs(Component::Stream) || component == Component::Coredms)
        .then(|| Arc::new(Broker::new(&infra.amqp_uri, &settings.amqp, &ns)));
    if let CoreDms::Local(store) = &coredms {
        let on_new_tenant = broker.clone().map(|b| b as Arc<dyn OnNewTenant>);
        let api = CoredmsApi::new(store.clone(), settings.clone(), on_new_tenant, auth.clone());
        public.push(coredms::router(api.clone()));
        internal.push(coredms::rpc_router(api));
    }
    if runs(Component::Batch) || runs(Component::Stream) {
        public.push(pipeline::apps_router(AppsApi {
            coredms: coredms.clone(),
            auth: auth.clone(),
        }));
    }
    if runs(Component::Batch) {
        let dir = settings.staging.dir.clone();
        let staging = Staging::new(dir.clone())
            .map_err(|source| StartError::Staging { path: dir, source })?;
        let manager = Arc::new(BatchManager::new(
            coredms.clone(),
            apps.clone(),
            staging,
            settings.batch.clone(),
            metrics.clone(),
        ));
        public.push(batch::router(BatchApi {
            manager: manager.clone(),
            coredms: coredms.clone(),
            auth: auth.clone(),
        }));
        tasks.push(tokio::spawn(manager.run(shutdown.clone())));
    }
    if runs(Component::Batch) || runs(Component::Stream) {
        // A quiet tenant's app keeps its bytecode, not its VMs.
        tasks.push(tokio::spawn(apps.clone().drop_idle_vms_forever(
            pipeline::VM_SWEEP,
            std::time::Duration::from_millis(settings.platform.idle_vm_ms),
            shutdown.clone(),
        )));
    }
    if let (true, Some(broker)) = (runs(Component::Stream), broker) {
        let manager = Arc::new(StreamManager::new(
            &infra.amqp_uri,
            &settings.amqp,
            &settings.stream,
            &ns,
            coredms.clone(),
            apps.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        // Every stream manager follows the tenants' consumer targets, whichever took them.
        tasks.push(tokio::spawn(
            manager.clone().reconcile_forever(broker.clone()),
        ));
        public.push(stream::router(StreamApi {
            broker,
            manager: manager.clone(),
            coredms: coredms.clone(),
            settings: Arc::new(settings.stream.clone()),
            metrics: metrics.clone(),
            auth: auth.clone(),
        }));
        // On stop, consumers finish their batch.
        let stopped = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            stopped.cancelled().await;
            manager.stop_all().await;
        }));
    }
    let in_flight = Arc::new(http::InFlight::new(&settings.http));
    let edge = Edge {
        auth,
        http: Arc::new(settings.http.clone()),
        in_flight: in_flight.clone(),
        metrics: metrics.clone(),
    };
    let app = http::compose(edge, public, internal);
    Ok(Arc::new(Platform {
        settings,
        metrics,
        versions: infra.versions.clone(),
        mongodb_uri: infra.mongodb_uri.clone(),
        amqp_uri: infra.amqp_uri.clone(),
        component,
        app,
        in_flight,
        shutdown,
        tasks: std::sync::Mutex::new(tasks),
        _infra: Some(infra),
    }))
}

impl Platform {
    /// The HTTP application of this process's components.
    pub fn router(&self) -> axum::Router {
        self.app.clone()
    }

    /// Stops background work: batch workers stop after their current bulk write (the file
    /// stays `ingesting` and resumes on the next start), consumers finish their batch.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
        self.in_flight.close();
    }
}

/// Serves the platform on an already bound listener until `shutdown` resolves, then drains
/// in-flight requests and background work.
pub async fn serve(
    listener: TcpListener,
    platform: Arc<Platform>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = platform.router();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    platform.stop().await;
    Ok(())
}

/// The log filter a platform process uses when `RUST_LOG` is not set: the platform at info,
/// the chatty drivers at warn.
pub const DEFAULT_LOG_FILTER: &str = "info,lapin=warn,mongodb=warn";

/// What `mysimbdp serve [component]` does: start `component`, listen on `http.listen`, serve
/// until SIGINT or SIGTERM, then drain. The workbench runs split topologies through this too.
pub async fn serve_component(settings: Settings, component: Component) -> Result<(), ServeError> {
    let listen = settings.http.listen.clone();
    let platform = start(settings, component).await?;
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|source| ServeError::Listen {
            address: listen.clone(),
            source,
        })?;
    tracing::info!(address = %listener.local_addr().map_err(ServeError::Serve)?, component = ?component, "serving");
    serve(listener, platform, shutdown_signal())
        .await
        .map_err(ServeError::Serve)?;
    Ok(())
}

/// Why [`serve_component`] stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on {address}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(std::io::Error),
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: draining in-flight work");
}
