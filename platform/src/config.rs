//! Layered configuration: defaults → TOML file → environment → flags, into one typed tree.
//!
//! Every layer is merged as a TOML table before the typed [`Settings`] is deserialized, so an
//! unknown key in any layer (a typo in the file, a stray `MYSIMBDP_BATCH__SIZEE`) is an error
//! rather than a silently ignored setting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variables with a short, conventional name, and the setting each one sets.
const SHORT_ENV: &[(&str, &str, &str)] = &[
    ("MONGODB_URI", "mongodb", "uri"),
    ("AMQP_URI", "amqp", "uri"),
    ("MYSIMBDP_ADMIN_TOKEN", "auth", "admin_token"),
    ("MYSIMBDP_INTERNAL_TOKEN", "auth", "internal_token"),
    ("MYSIMBDP_LISTEN", "http", "listen"),
    ("MYSIMBDP_STAGING_DIR", "staging", "dir"),
];
const ENV_PREFIX: &str = "MYSIMBDP_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    File {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting `{0}`: expected MYSIMBDP_<SECTION>__<KEY>")]
    EnvKey(String),
    #[error("invalid override `{0}`: expected section.key=value")]
    Override(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole platform configuration. Every field has a default that works on a laptop.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub mongodb: MongoSettings,
    pub amqp: AmqpSettings,
    pub http: HttpSettings,
    pub auth: AuthSettings,
    pub staging: StagingSettings,
    pub limits: TenantLimits,
    pub apps: AppLimits,
    pub batch: BatchSettings,
    pub stream: StreamSettings,
    pub platform: PlatformSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoSettings {
    /// Empty: provisioned through testcontainers when Docker answers.
    pub uri: String,
    /// `majority`, or a number of acknowledging nodes.
    pub write_concern: String,
    /// Writes are acknowledged only once in the server's journal (`j: true`), so a message
    /// is acked and a file marked done only after its documents and log entries would
    /// survive a crash of the server. `false` trades that for speed.
    pub journal: bool,
    /// Kept small: every connection costs the server, and bulk writes need few.
    pub max_pool_size: u32,
    pub connect_timeout_ms: u64,
}

/// The write concern `w` (`majority`, or a number of acknowledging nodes) and `j` ask for:
/// coredms writes with it, and the workbench's raw baselines write as coredms does.
pub fn write_concern(w: &str, journal: bool) -> mongodb::options::WriteConcern {
    use mongodb::options::{Acknowledgment, WriteConcern};
    let w = match w.parse::<u32>() {
        Ok(n) => Acknowledgment::Nodes(n),
        Err(_) => Acknowledgment::Majority,
    };
    WriteConcern::builder().w(w).journal(journal).build()
}

impl Default for MongoSettings {
    fn default() -> Self {
        Self {
            uri: String::new(),
            write_concern: "majority".into(),
            journal: true,
            max_pool_size: 8,
            connect_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// Empty: provisioned through testcontainers when Docker answers.
    pub uri: String,
    /// Declare tenant queues as quorum queues (for RabbitMQ clusters).
    pub quorum_queues: bool,
    /// With quorum queues: deliveries after which a message is dead-lettered by the broker.
    pub delivery_limit: u32,
    pub connect_timeout_ms: u64,
    /// Connections the stream consumers of one process share (each consumer has two
    /// channels on one of them). Each costs the process a thread and lapin's two frame
    /// buffers (8 MiB with RabbitMQ's default frame size); RabbitMQ allows 2,047 channels
    /// per connection by default, so each carries up to about 1,000 consumers.
    pub consumer_connections: usize,
    /// When not 0, tenant queues are declared with RabbitMQ's `x-expires`: a queue left
    /// unused this long (no consumer, not declared again, no `basic.get`) is deleted by the
    /// broker **with the messages in it**, and the dead-letter exchange with the last queue
    /// bound to it. The stream managers declare the queues of the tenants with a stream
    /// target again about every quarter of it, so a dead-letter queue (which nothing
    /// consumes) lives as long as its tenant's target. For namespaces that end (tests,
    /// workbench runs), so that they leave nothing behind on a broker that outlives them;
    /// never for tenants whose messages matter. Classic queues only (not with
    /// `quorum_queues`); at most 2^31 - 1 (about 24 days). 0 (the default): queues stay.
    pub queue_expires_ms: u64,
}

impl AmqpSettings {
    /// How long an unused tenant queue lives (`queue_expires_ms`), if it expires.
    pub fn queue_expiry(&self) -> Option<std::time::Duration> {
        (self.queue_expires_ms > 0).then(|| std::time::Duration::from_millis(self.queue_expires_ms))
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            uri: String::new(),
            quorum_queues: false,
            delivery_limit: 20,
            connect_timeout_ms: 5_000,
            consumer_connections: 4,
            queue_expires_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: String,
    /// Base URL of a separate coredms service; empty in the one-process topology.
    pub coredms_url: String,
    /// Requests served at once per process, all tenants together. `/healthz`, `/metrics` and
    /// the internal RPC are outside this limit.
    pub max_in_flight: usize,
    /// Requests one tenant may have in flight at once per process; more get 429.
    pub max_in_flight_per_tenant: usize,
    /// How long a request may wait for one of the `max_in_flight` slots before it gets 503.
    pub queue_timeout_ms: u64,
    /// How long a handler may take to answer, on top of the time its body took to arrive
    /// (see `body_min_rate`); past it the request is abandoned with 503.
    pub request_timeout_ms: u64,
    /// Time allowed to receive a request body, extended by one second per `body_min_rate`
    /// bytes received: a body that arrives slower is cut off with 408. 0 disables the check.
    pub body_timeout_ms: u64,
    /// Bytes per second a request body must average to keep its deadline moving.
    pub body_min_rate: u64,
    /// Largest JSON body accepted on API endpoints other than file uploads and messages.
    pub max_json_bytes: usize,
    /// Largest body the internal coredms RPC accepts (it carries bulk writes).
    pub max_rpc_bytes: usize,
    /// Bulk writes sent over the internal RPC are split into chunks of at most this many
    /// serialized bytes (a single larger document travels alone).
    pub rpc_chunk_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8800".into(),
            coredms_url: String::new(),
            max_in_flight: 1024,
            max_in_flight_per_tenant: 64,
            queue_timeout_ms: 5_000,
            request_timeout_ms: 120_000,
            body_timeout_ms: 30_000,
            body_min_rate: 16 * 1024,
            max_json_bytes: 1 << 20,
            max_rpc_bytes: 64 << 20,
            rpc_chunk_bytes: 8 << 20,
        }
    }
}

/// Shortest admin or internal token accepted at start.
pub const MIN_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// The operator's token, at least [`MIN_TOKEN_CHARS`] characters. Empty: the admin API
    /// is off (admin endpoints say so).
    pub admin_token: String,
    /// Token components use to call coredms over HTTP. Empty: the admin token.
    pub internal_token: String,
}

impl AuthSettings {
    pub fn internal(&self) -> &str {
        if self.internal_token.is_empty() {
            &self.admin_token
        } else {
            &self.internal_token
        }
    }

    pub fn admin_api_on(&self) -> bool {
        !self.admin_token.is_empty()
    }

    /// Refuses tokens too short to resist guessing, saying which one and why.
    pub fn check(&self) -> Result<(), TokenError> {
        for (name, env, token) in [
            (
                "auth.admin_token",
                "MYSIMBDP_ADMIN_TOKEN",
                &self.admin_token,
            ),
            (
                "auth.internal_token",
                "MYSIMBDP_INTERNAL_TOKEN",
                &self.internal_token,
            ),
        ] {
            let n = token.chars().count();
            if n > 0 && n < MIN_TOKEN_CHARS {
                return Err(TokenError::TooShort {
                    name,
                    env,
                    chars: n,
                });
            }
            if token.trim() != token.as_str() || token.chars().any(char::is_control) {
                return Err(TokenError::Malformed { name, env });
            }
        }
        Ok(())
    }
}

/// A token [`AuthSettings::check`] refuses, named by its key and environment variable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "{name} ({env}) is {chars} characters long: use at least {MIN_TOKEN_CHARS} \
         (e.g. `openssl rand -hex 16`), or leave it empty to turn the admin API off"
    )]
    TooShort {
        name: &'static str,
        env: &'static str,
        chars: usize,
    },
    #[error("{name} ({env}) has spaces at its ends or control characters")]
    Malformed {
        name: &'static str,
        env: &'static str,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagingSettings {
    pub dir: PathBuf,
}

impl Default for StagingSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("staging"),
        }
    }
}

/// Data formats the platform parses into records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    /// A JSON array of objects, or a single JSON object.
    Json,
    /// One JSON value per line.
    Ndjson,
}

impl Format {
    /// The format a file name announces by its extension.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Self::Csv),
            "json" => Some(Self::Json),
            "ndjson" | "jsonl" => Some(Self::Ndjson),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Csv => "csv",
            Self::Json => "json",
            Self::Ndjson => "ndjson",
        })
    }
}

/// Constraints a new tenant gets unless the admin sets others.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    pub max_file_bytes: u64,
    pub max_staged_files: u32,
    pub formats: Vec<Format>,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 5 * 1024 * 1024,
            max_staged_files: 100,
            formats: vec![Format::Csv, Format::Json, Format::Ndjson],
        }
    }
}

/// Limits on tenant app execution; the admin may override them per tenant.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AppLimits {
    /// The app's Luau VM memory, at least 1 MiB.
    #[schema(value_type = u64, minimum = 1048576)]
    pub memory_bytes: usize,
    /// CPU time one call (a record, a message, a payload) may use; a call still running at
    /// 20 times this in wall time (at least 1 s) is stopped too.
    #[schema(minimum = 1)]
    pub time_ms: u64,
    /// Interrupt checks (function calls and loop iterations) allowed per call.
    #[schema(minimum = 1)]
    pub instructions: u64,
    /// Documents one call may emit.
    #[schema(value_type = u64, minimum = 1)]
    pub max_emits: usize,
    /// The largest document an app may emit, as BSON.
    #[schema(value_type = u64, minimum = 1)]
    pub max_doc_bytes: usize,
}

/// The largest integer a stored limit may hold: profiles are BSON, whose integers are i64.
pub const MAX_STORED_INT: u64 = i64::MAX as u64;

/// A tenant's largest file as a profile can hold it (BSON's i64).
pub fn check_max_file_bytes(v: u64) -> Result<(), String> {
    if v > MAX_STORED_INT {
        return Err(format!(
            "max_file_bytes must be at most {MAX_STORED_INT}, not {v}"
        ));
    }
    Ok(())
}

/// The smallest memory limit an app may be given: a Luau VM and its standard library need
/// about half a MiB, and a limit of 0 would mean none at all.
pub const MIN_APP_MEMORY_BYTES: usize = 1024 * 1024;

impl AppLimits {
    /// Every limit at least 1 (memory at least [`MIN_APP_MEMORY_BYTES`]) and at most
    /// [`MAX_STORED_INT`]; the error names the first that is not.
    pub fn check(&self) -> Result<(), String> {
        AppLimitsPatch::from(*self).check()
    }
}

/// App limits as the admin changes them (`PATCH /v1/tenants/{t}`, or at creation): the
/// limits given change, the others stay as they were.
///
/// Read through a map, not derived: serde would also read the struct from an array of its
/// fields in order (`[null, null]`), a form no client means (the fuzzer sent it).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(try_from = "std::collections::BTreeMap<String, Option<u64>>")]
pub struct AppLimitsPatch {
    /// The app's Luau VM memory, at least 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>, minimum = 1048576)]
    pub memory_bytes: Option<usize>,
    /// CPU time one call may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub time_ms: Option<u64>,
    /// Interrupt checks allowed per call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub instructions: Option<u64>,
    /// Documents one call may emit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub max_emits: Option<usize>,
    /// The largest document an app may emit, as BSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<u64>, minimum = 1)]
    pub max_doc_bytes: Option<usize>,
}

impl TryFrom<std::collections::BTreeMap<String, Option<u64>>> for AppLimitsPatch {
    type Error = String;

    fn try_from(m: std::collections::BTreeMap<String, Option<u64>>) -> Result<Self, String> {
        let mut p = Self::default();
        for (k, v) in m {
            match k.as_str() {
                "memory_bytes" => p.memory_bytes = v.map(|v| v as usize),
                "time_ms" => p.time_ms = v,
                "instructions" => p.instructions = v,
                "max_emits" => p.max_emits = v.map(|v| v as usize),
                "max_doc_bytes" => p.max_doc_bytes = v.map(|v| v as usize),
                other => {
                    return Err(format!(
                        "unknown field `{other}`, expected one of `memory_bytes`, `time_ms`, \
                         `instructions`, `max_emits`, `max_doc_bytes`"
                    ));
                }
            }
        }
        Ok(p)
    }
}

impl From<AppLimits> for AppLimitsPatch {
    fn from(l: AppLimits) -> Self {
        Self {
            memory_bytes: Some(l.memory_bytes),
            time_ms: Some(l.time_ms),
            instructions: Some(l.instructions),
            max_emits: Some(l.max_emits),
            max_doc_bytes: Some(l.max_doc_bytes),
        }
    }
}

impl AppLimitsPatch {
    /// The limits given, each with the key it is stored under in a profile's
    /// `constraints.app_limits`.
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        [
            ("memory_bytes", self.memory_bytes.map(|v| v as u64)),
            ("time_ms", self.time_ms),
            ("instructions", self.instructions),
            ("max_emits", self.max_emits.map(|v| v as u64)),
            ("max_doc_bytes", self.max_doc_bytes.map(|v| v as u64)),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
    }

    /// Each limit given at least 1 (memory at least [`MIN_APP_MEMORY_BYTES`]) and at most
    /// [`MAX_STORED_INT`]; the error names the first that is not.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in self.fields() {
            let min = if name == "memory_bytes" {
                MIN_APP_MEMORY_BYTES as u64
            } else {
                1
            };
            if !(min..=MAX_STORED_INT).contains(&v) {
                return Err(format!(
                    "app_limits.{name} must be {min} to {MAX_STORED_INT}, not {v}"
                ));
            }
        }
        Ok(())
    }

    /// `base` with the limits given changed.
    pub fn apply(&self, base: AppLimits) -> AppLimits {
        AppLimits {
            memory_bytes: self.memory_bytes.unwrap_or(base.memory_bytes),
            time_ms: self.time_ms.unwrap_or(base.time_ms),
            instructions: self.instructions.unwrap_or(base.instructions),
            max_emits: self.max_emits.unwrap_or(base.max_emits),
            max_doc_bytes: self.max_doc_bytes.unwrap_or(base.max_doc_bytes),
        }
    }
}

impl Default for AppLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 32 * 1024 * 1024,
            time_ms: 50,
            instructions: 10_000_000,
            max_emits: 100_000,
            max_doc_bytes: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Records per bulk write.
    pub batch_size: usize,
    /// Ingestion jobs running at once, across tenants.
    pub workers: usize,
    /// How long a batch manager holds a job without renewing it (it renews every third of
    /// this, and at each checkpoint). A manager that dies loses its jobs to another after
    /// this long; shorter hands them over sooner and costs more renewals.
    pub lease_ms: u64,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            workers: 2,
            lease_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    pub batch_size: usize,
    /// How long a batch may wait for more messages while the batch before it is being
    /// written; with nothing in flight it goes with the messages already received.
    pub linger_ms: u64,
    pub prefetch: u16,
    pub max_message_bytes: usize,
    pub max_request_bytes: usize,
    pub max_consumers: u32,
    /// Width of the buckets in the stream report.
    pub report_period_s: u64,
    /// Deliveries of a message that ended without it being stored or dead-lettered (its
    /// batch failed) before it is dead-lettered with the last error, instead of looping.
    pub max_deliveries: u32,
    /// Message bytes a consumer's batch holds at most (it may pass this by one message).
    pub max_batch_bytes: usize,
    /// How often each stream manager reads the tenants' consumer targets (kept by coredms,
    /// set by `stream/start` on any manager) and looks at the queues of tenants whose target
    /// is a range.
    pub reconcile_ms: u64,
    /// A manager adds a consumer (up to the tenant's `max_consumers`) when the queue held more
    /// ready messages than this, or a batch took longer than `scale_up_latency_ms` from
    /// publish to stored, at `scale_up_ticks` looks in a row.
    pub scale_up_depth: u64,
    pub scale_up_latency_ms: u64,
    pub scale_up_ticks: u32,
    /// It removes one (down to `consumers`) when the queue held at most `scale_down_depth`
    /// ready messages at `scale_down_ticks` looks in a row: slower down than up, so a load
    /// that comes and goes does not make consumers flap.
    pub scale_down_depth: u64,
    pub scale_down_ticks: u32,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            linger_ms: 10,
            prefetch: 1000,
            max_message_bytes: 1024 * 1024,
            max_request_bytes: 16 * 1024 * 1024,
            max_consumers: 16,
            report_period_s: 60,
            max_deliveries: 5,
            max_batch_bytes: 4 * 1024 * 1024,
            reconcile_ms: 1000,
            scale_up_depth: 2000,
            scale_up_latency_ms: 2000,
            scale_up_ticks: 2,
            scale_down_depth: 10,
            scale_down_ticks: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformSettings {
    /// Prefix for databases and queues, so several platforms (or tests) share one server.
    pub namespace: String,
    /// How long a tenant app's VMs stay pooled once none is in use. A quiet tenant then
    /// holds its bytecode but no Luau heap (about 180 KiB a VM); its next input builds a VM
    /// again, which runs the app's top level once more.
    pub idle_vm_ms: u64,
}

impl Default for PlatformSettings {
    fn default() -> Self {
        Self {
            namespace: String::new(),
            idle_vm_ms: 30_000,
        }
    }
}

impl Settings {
    /// Loads defaults, then `file` (if any), then the process environment, then `overrides`
    /// (`section.key=value`, as given on the command line).
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, &env, overrides)
    }

    pub fn load_from(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::try_from(Settings::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let layer: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                source: Box::new(e),
            })?;
            merge(&mut table, layer);
        }
        merge(&mut table, env_layer(env)?);
        let mut flags = toml::Table::new();
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| ConfigError::Override(o.clone()))?;
            let (section, key) = key
                .split_once('.')
                .ok_or_else(|| ConfigError::Override(o.clone()))?;
            set(&mut flags, section, key, value);
        }
        merge(&mut table, flags);
        let settings: Settings = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_owned()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("batch.batch_size", self.batch.batch_size),
            ("batch.workers", self.batch.workers),
            ("stream.batch_size", self.stream.batch_size),
            ("stream.prefetch", usize::from(self.stream.prefetch)),
            ("http.max_in_flight", self.http.max_in_flight),
            (
                "http.max_in_flight_per_tenant",
                self.http.max_in_flight_per_tenant,
            ),
            ("http.rpc_chunk_bytes", self.http.rpc_chunk_bytes),
            ("stream.scale_up_ticks", self.stream.scale_up_ticks as usize),
            (
                "stream.scale_down_ticks",
                self.stream.scale_down_ticks as usize,
            ),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.http.rpc_chunk_bytes > self.http.max_rpc_bytes / 2 {
            return Err(ConfigError::Invalid(format!(
                "http.rpc_chunk_bytes ({}) must be at most half of http.max_rpc_bytes ({})",
                self.http.rpc_chunk_bytes, self.http.max_rpc_bytes
            )));
        }
        self.apps.check().map_err(ConfigError::Invalid)?;
        check_max_file_bytes(self.limits.max_file_bytes)
            .map_err(|e| ConfigError::Invalid(format!("limits.{e}")))?;
        if !(50..=60_000).contains(&self.stream.reconcile_ms) {
            return Err(ConfigError::Invalid(format!(
                "stream.reconcile_ms must be 50 to 60000, not {}",
                self.stream.reconcile_ms
            )));
        }
        if self.batch.lease_ms < 300 {
            return Err(ConfigError::Invalid(format!(
                "batch.lease_ms must be at least 300, not {}",
                self.batch.lease_ms
            )));
        }
        if self.amqp.queue_expires_ms > i32::MAX as u64 {
            return Err(ConfigError::Invalid(format!(
                "amqp.queue_expires_ms must be at most {} (0: queues stay), not {}",
                i32::MAX,
                self.amqp.queue_expires_ms
            )));
        }
        if self.amqp.queue_expires_ms > 0 && self.amqp.quorum_queues {
            // A quorum queue's lease is not renewed by a declare: the dead-letter queues,
            // which nothing consumes, would go while their tenants run.
            return Err(ConfigError::Invalid(
                "amqp.queue_expires_ms is for classic queues: it cannot go with amqp.quorum_queues"
                    .into(),
            ));
        }
        if self.mongodb.write_concern != "majority"
            && self.mongodb.write_concern.parse::<u32>().is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "mongodb.write_concern must be `majority` or a number, not `{}`",
                self.mongodb.write_concern
            )));
        }
        Ok(())
    }
}

fn env_layer(env: &[(String, String)]) -> Result<toml::Table, ConfigError> {
    let mut layer = toml::Table::new();
    for (name, value) in env {
        if let Some((_, section, key)) = SHORT_ENV.iter().find(|(n, _, _)| n == name) {
            set(&mut layer, section, key, value);
        } else if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
            // Variables of the test harness and tools that share the prefix are not settings.
            if !rest.contains("__") {
                continue;
            }
            let (section, key) = rest
                .split_once("__")
                .filter(|(s, k)| !s.is_empty() && !k.is_empty())
                .ok_or_else(|| ConfigError::EnvKey(name.clone()))?;
            set(
                &mut layer,
                &section.to_ascii_lowercase(),
                &key.to_ascii_lowercase(),
                value,
            );
        }
    }
    Ok(layer)
}

/// Sets `section.key` from a raw string: a TOML literal if it parses as one
/// (numbers, booleans, arrays), else the string itself.
fn set(table: &mut toml::Table, section: &str, key: &str, raw: &str) {
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key.to_owned(), value);
    }
}

fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (k, v) in layer {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(l)) => merge(b, l),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_extensions() {
        assert_eq!(Format::from_file_name("x.CSV"), Some(Format::Csv));
        assert_eq!(Format::from_file_name("x.jsonl"), Some(Format::Ndjson));
        assert_eq!(Format::from_file_name("x.parquet"), None);
        assert_eq!(Format::from_file_name("noext"), None);
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_defaults_env_flags() {
        let s = Settings::load_from(
            None,
            &env(&[
                ("MONGODB_URI", "mongodb://db:27017"),
                ("MYSIMBDP_BATCH__BATCH_SIZE", "250"),
                ("MYSIMBDP_AUTH__ADMIN_TOKEN", "s3cret"),
            ]),
            &["batch.batch_size=300".into()],
        )
        .expect("settings load");
        assert_eq!(s.mongodb.uri, "mongodb://db:27017");
        assert_eq!(s.batch.batch_size, 300);
        assert_eq!(s.auth.admin_token, "s3cret");
        assert_eq!(s.stream.prefetch, 1000);
    }

    #[test]
    fn unknown_keys_are_an_error() {
        let err = Settings::load_from(None, &env(&[("MYSIMBDP_BATCH__SIZEE", "3")]), &[])
            .expect_err("unknown key must fail");
        assert!(err.to_string().contains("sizee"), "{err}");
        let err = Settings::load_from(None, &[], &["nosuch.key=1".into()]).expect_err("fails");
        assert!(err.to_string().contains("nosuch"), "{err}");
    }

    #[test]
    fn file_layer_is_read_and_validated() {
        let dir = std::env::temp_dir().join(format!("mysimbdp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "[stream]\nlinger_ms = 7\n[mongodb]\nwrite_concern = \"x\"\n",
        )
        .expect("write");
        let err = Settings::load_from(Some(&path), &[], &[]).expect_err("bad write concern");
        assert!(err.to_string().contains("write_concern"), "{err}");
        std::fs::write(&path, "[stream]\nlinger_ms = 7\n").expect("write");
        let s = Settings::load_from(Some(&path), &[], &[]).expect("loads");
        assert_eq!(s.stream.linger_ms, 7);
    }

    #[test]
    fn short_tokens_are_refused_with_the_reason_and_none_turns_the_admin_api_off() {
        let mut a = AuthSettings::default();
        assert!(a.check().is_ok() && !a.admin_api_on());
        a.admin_token = "change-me".into();
        let e = a.check().expect_err("9 characters").to_string();
        assert!(
            e.contains("auth.admin_token") && e.contains("9 characters") && e.contains("16"),
            "{e}"
        );
        a.admin_token = "0123456789abcdef".into();
        assert!(a.check().is_ok() && a.admin_api_on());
        a.internal_token = "short".into();
        assert!(
            a.check()
                .expect_err("short")
                .to_string()
                .contains("auth.internal_token")
        );
        a.internal_token = " 0123456789abcdef".into();
        assert!(
            a.check()
                .expect_err("padded")
                .to_string()
                .contains("spaces")
        );
    }

    #[test]
    fn the_rpc_chunk_must_fit_the_rpc_body_limit() {
        let err = Settings::load_from(
            None,
            &[],
            &[
                "http.max_rpc_bytes=1000".into(),
                "http.rpc_chunk_bytes=600".into(),
            ],
        )
        .expect_err("chunk over half the limit");
        assert!(err.to_string().contains("rpc_chunk_bytes"), "{err}");
    }

    #[test]
    fn a_queue_expiry_is_what_the_broker_can_take() {
        let at = |ms: u64| Settings::load_from(None, &[], &[format!("amqp.queue_expires_ms={ms}")]);
        assert_eq!(at(0).expect("off").amqp.queue_expires_ms, 0);
        let max = i32::MAX as u64;
        assert_eq!(at(max).expect("the largest").amqp.queue_expires_ms, max);
        let err = at(max + 1).expect_err("past a signed 32-bit count of ms");
        assert!(err.to_string().contains("amqp.queue_expires_ms"), "{err}");
        let err = Settings::load_from(
            None,
            &[],
            &[
                "amqp.queue_expires_ms=60000".into(),
                "amqp.quorum_queues=true".into(),
            ],
        )
        .expect_err("quorum queues do not renew on a look");
        assert!(err.to_string().contains("quorum_queues"), "{err}");
    }
}
