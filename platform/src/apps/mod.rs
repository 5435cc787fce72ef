//! Tenant ingest apps: Luau source compiled on the host, run in sandboxed VMs with limits on
//! memory, time, instructions, emitted documents and document size.
//!
//! Host API (the contract tenants write against):
//! - `function ingest(tenant, name, data)`: the whole payload as a string; calls
//!   `emit(doc)` or `emit(collection, doc)` any number of times;
//! - `function map(record)`: one parsed record; returns a document, `nil` to drop it, or a
//!   list of documents;
//! - helpers: `parse_csv(text)`, `parse_json(text)`, `log(msg)`, and the values `tenant` and
//!   `data_name`.
//!
//! Conversions (Luau numbers are doubles): a whole number within ±2^53 is stored as a 64-bit
//! integer, any other number as a double (integers beyond 2^53 lose precision); NaN and
//! infinities are rejected; a table with keys exactly 1..n (or made by `parse_json` from an
//! array) is an array, any other table an object with string keys; an empty table is `{}`;
//! `nil` fields are absent and JSON `null` arrives as the sentinel `null`.

mod convert;
mod router;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mlua::{Function, Lua, LuaOptions, StdLib, Value, VmState};
use serde::{Deserialize, Serialize};

pub use convert::{json_to_lua, lua_to_json};
pub use router::router;

use crate::config::AppLimits;
use crate::tenants::TenantName;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppKind {
    Batch,
    Stream,
}

impl AppKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Stream => "stream",
        }
    }
}

/// An uploaded app version as stored through coredms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredApp {
    pub tenant: String,
    pub kind: AppKind,
    pub version: u32,
    pub source: String,
    pub created_at: String,
}

/// A syntax or validation error in an uploaded app, with where it is.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct CompileError {
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub message: String,
}

/// Largest app source accepted.
pub const MAX_SOURCE_BYTES: usize = 256 * 1024;
/// Bytes of `log()` output kept per call.
const MAX_LOG_BYTES: usize = 1024;
const CHUNK_NAME: &str = "=app";

/// A collection name tenants may write to.
pub fn check_collection(c: &str) -> Result<(), String> {
    let ok = !c.is_empty()
        && c.len() <= 64
        && !c.starts_with("system.")
        && !c.starts_with('.')
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid collection name `{}`: use 1-64 of [A-Za-z0-9_.-], not starting with `system.`",
            c.chars().take(80).collect::<String>()
        ))
    }
}

/// The functions an app defines, found when it is validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub has_map: bool,
    pub has_ingest: bool,
}

/// An app compiled and validated on the host.
#[derive(Debug, Clone)]
pub struct Compiled {
    bytecode: Arc<Vec<u8>>,
    pub shape: Shape,
}

/// Compiles `source`, then runs its top level once in a sandbox to check that it defines
/// `map` or `ingest` within the limits.
pub fn compile(source: &str, limits: &AppLimits) -> Result<Compiled, CompileError> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(CompileError {
            line: None,
            column: None,
            message: format!("app source exceeds {MAX_SOURCE_BYTES} bytes"),
        });
    }
    let bytecode = mlua::chunk::Compiler::new()
        .set_optimization_level(2)
        .compile(source)
        .map_err(|e| syntax_error(&e))?;
    let compiled = Compiled {
        bytecode: Arc::new(bytecode),
        shape: Shape {
            has_map: false,
            has_ingest: false,
        },
    };
    let vm = Vm::new(&compiled.bytecode, limits).map_err(|e| CompileError {
        line: error_line(&e.to_string()),
        column: None,
        message: format!("app failed to load: {}", e.reason),
    })?;
    let shape = Shape {
        has_map: vm.map.is_some(),
        has_ingest: vm.ingest.is_some(),
    };
    if !shape.has_map && !shape.has_ingest {
        return Err(CompileError {
            line: None,
            column: None,
            message: "app defines neither `function map(record)` nor `function ingest(tenant, name, data)`".into(),
        });
    }
    Ok(Compiled { shape, ..compiled })
}

fn syntax_error(e: &mlua::Error) -> CompileError {
    let msg = match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        other => other.to_string(),
    };
    // Luau reports `<chunk>:<line>: <message>`; it gives no column.
    let line = error_line(&msg);
    let message = match msg.split_once(": ") {
        Some((prefix, rest)) if prefix.ends_with(|c: char| c.is_ascii_digit()) => rest.to_owned(),
        _ => msg.clone(),
    };
    CompileError {
        line,
        column: None,
        message,
    }
}

/// The first `:<digits>:` in an error message: the tenant's line number.
fn error_line(msg: &str) -> Option<u32> {
    // The compiler's own messages start with `<line>: `.
    if let Some((n, _)) = msg.split_once(": ")
        && let Ok(line) = n.trim().parse()
    {
        return Some(line);
    }
    let bytes = msg.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b':' {
            let start = i + 1;
            let mut j = start;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            if j > start && j < bytes.len() && bytes[j] == b':' {
                return msg[start..j].parse().ok();
            }
        }
        i += 1;
    }
    None
}

/// Why a call was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Limit {
    None = 0,
    Time = 1,
    Instructions = 2,
    Emits = 3,
}

/// Per-call budget shared with the interrupt callback.
struct Budget {
    deadline_ns: AtomicU64,
    ticks_left: AtomicU64,
    hit: AtomicU8,
    epoch: Instant,
}

impl Budget {
    fn arm(&self, limits: &AppLimits) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.deadline_ns
            .store(now + limits.time_ms * 1_000_000, Ordering::Relaxed);
        self.ticks_left
            .store(limits.instructions, Ordering::Relaxed);
        self.hit.store(Limit::None as u8, Ordering::Relaxed);
    }

    fn hit(&self) -> Limit {
        match self.hit.load(Ordering::Relaxed) {
            1 => Limit::Time,
            2 => Limit::Instructions,
            3 => Limit::Emits,
            _ => Limit::None,
        }
    }
}

/// Documents an `ingest` call emitted, and its `log()` output.
#[derive(Default)]
struct CallState {
    emits: Vec<(Option<String>, serde_json::Map<String, serde_json::Value>)>,
    emit_error: Option<String>,
    log: String,
    limits: AppLimits,
}

/// A failure of one record or payload, with a reason for the ingestion log.
#[derive(Debug, Clone, PartialEq)]
pub struct AppFailure {
    pub reason: String,
    /// The VM hit a limit and was discarded.
    pub limit: bool,
}

/// What an app made of one input: documents (with an optional target collection), or why not.
pub type Emitted = Vec<(Option<String>, serde_json::Map<String, serde_json::Value>)>;

#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Emitted, AppFailure>,
    /// What the app wrote with `log()`, bounded.
    pub log: Option<String>,
}

struct VmError {
    reason: String,
}

impl std::fmt::Display for VmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// One Luau state with the app loaded. Not `Sync`: one thread uses it at a time.
struct Vm {
    lua: Lua,
    budget: Arc<Budget>,
    map: Option<Function>,
    ingest: Option<Function>,
    context: Option<(String, String)>,
}

impl Vm {
    fn new(bytecode: &[u8], limits: &AppLimits) -> Result<Self, VmError> {
        let err = |e: mlua::Error| VmError {
            reason: e.to_string(),
        };
        let lua = Lua::new_with(
            StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::BUFFER,
            LuaOptions::default(),
        )
        .map_err(err)?;
        let budget = Arc::new(Budget {
            deadline_ns: AtomicU64::new(0),
            ticks_left: AtomicU64::new(limits.instructions),
            hit: AtomicU8::new(0),
            epoch: Instant::now(),
        });
        let b = budget.clone();
        lua.set_interrupt(move |_| {
            let left = b.ticks_left.fetch_sub(1, Ordering::Relaxed);
            if left == 0 {
                b.ticks_left.store(0, Ordering::Relaxed);
                b.hit.store(Limit::Instructions as u8, Ordering::Relaxed);
                return Err(mlua::Error::runtime("instruction budget exhausted"));
            }
            // The clock is read every 256 checks: cheap, and still within microseconds.
            if left % 256 == 0
                && b.epoch.elapsed().as_nanos() as u64 > b.deadline_ns.load(Ordering::Relaxed)
            {
                b.hit.store(Limit::Time as u8, Ordering::Relaxed);
                return Err(mlua::Error::runtime("time limit exceeded"));
            }
            Ok(VmState::Continue)
        });
        install_host_api(&lua).map_err(err)?;
        lua.sandbox(true).map_err(err)?;
        lua.set_memory_limit(limits.memory_bytes).map_err(err)?;
        lua.set_app_data(CallState {
            limits: *limits,
            ..Default::default()
        });
        budget.arm(limits);
        let run = lua
            .load(bytecode)
            .set_name(CHUNK_NAME)
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .exec();
        if let Err(e) = run {
            return Err(VmError {
                reason: describe(&e, budget.hit(), limits),
            });
        }
        let globals = lua.globals();
        let map = globals.get::<Option<Function>>("map").map_err(err)?;
        let ingest = globals.get::<Option<Function>>("ingest").map_err(err)?;
        Ok(Self {
            lua,
            budget,
            map,
            ingest,
            context: None,
        })
    }

    fn set_context(&mut self, tenant: &str, data_name: &str) -> mlua::Result<()> {
        if self
            .context
            .as_ref()
            .is_some_and(|(t, d)| t == tenant && d == data_name)
        {
            return Ok(());
        }
        let g = self.lua.globals();
        g.set("tenant", tenant)?;
        g.set("data_name", data_name)?;
        self.context = Some((tenant.to_owned(), data_name.to_owned()));
        Ok(())
    }

    fn begin(&self, limits: &AppLimits) {
        self.budget.arm(limits);
        if let Some(mut st) = self.lua.app_data_mut::<CallState>() {
            st.emits.clear();
            st.emit_error = None;
            st.log.clear();
        }
    }

    fn take_log(&self) -> Option<String> {
        let mut st = self.lua.app_data_mut::<CallState>()?;
        (!st.log.is_empty()).then(|| std::mem::take(&mut st.log))
    }

    fn failure(&self, e: &mlua::Error, limits: &AppLimits) -> AppFailure {
        let hit = self.budget.hit();
        let emit_error = self
            .lua
            .app_data_mut::<CallState>()
            .and_then(|mut s| s.emit_error.take());
        let memory = matches!(e, mlua::Error::MemoryError(_))
            || matches!(e, mlua::Error::CallbackError { cause, .. } if matches!(**cause, mlua::Error::MemoryError(_)));
        AppFailure {
            reason: emit_error.unwrap_or_else(|| describe(e, hit, limits)),
            limit: hit != Limit::None || memory,
        }
    }
}

/// A reason that names the limit, or the app's own error with its line.
fn describe(e: &mlua::Error, hit: Limit, limits: &AppLimits) -> String {
    match hit {
        Limit::Time => return format!("app exceeded {} ms time limit", limits.time_ms),
        Limit::Instructions => {
            return format!("app exceeded {} instruction budget", limits.instructions);
        }
        Limit::Emits => {
            return format!("app exceeded {} emitted documents limit", limits.max_emits);
        }
        Limit::None => {}
    }
    let mut root = e;
    while let mlua::Error::CallbackError { cause, .. } = root {
        root = cause;
    }
    match root {
        mlua::Error::MemoryError(_) => {
            format!("app exceeded {} bytes memory limit", limits.memory_bytes)
        }
        mlua::Error::RuntimeError(m) => {
            let first = m.lines().next().unwrap_or(m);
            if first.contains("stack overflow") {
                "app exceeded the call depth limit (stack overflow)".into()
            } else {
                format!("app error: {}", first.trim())
            }
        }
        other => format!(
            "app error: {}",
            other.to_string().lines().next().unwrap_or("")
        ),
    }
}

fn install_host_api(lua: &Lua) -> mlua::Result<()> {
    let g = lua.globals();
    // Nothing that loads code, reaches the environment or writes outside the VM.
    for name in [
        "require",
        "loadstring",
        "load",
        "dofile",
        "loadfile",
        "getfenv",
        "setfenv",
        "print",
        "collectgarbage",
        "gcinfo",
        "newproxy",
        "os",
        "io",
        "debug",
        "package",
    ] {
        g.raw_set(name, Value::Nil)?;
    }
    g.set(
        "emit",
        lua.create_function(|lua, args: mlua::MultiValue| {
            let (collection, doc) = match args.len() {
                1 => (None, args.into_iter().next().unwrap_or(Value::Nil)),
                2 => {
                    let mut it = args.into_iter();
                    let c = it.next().unwrap_or(Value::Nil);
                    let d = it.next().unwrap_or(Value::Nil);
                    let c = match c {
                        Value::String(s) => s.to_str()?.to_owned(),
                        _ => {
                            return Err(mlua::Error::runtime(
                                "emit(collection, doc): collection must be a string",
                            ));
                        }
                    };
                    (Some(c), d)
                }
                _ => {
                    return Err(mlua::Error::runtime(
                        "emit takes (doc) or (collection, doc)",
                    ));
                }
            };
            let mut st = lua
                .app_data_mut::<CallState>()
                .ok_or_else(|| mlua::Error::runtime("emit called outside an ingestion"))?;
            if st.emits.len() >= st.limits.max_emits {
                let reason = format!(
                    "app exceeded {} emitted documents limit",
                    st.limits.max_emits
                );
                st.emit_error = Some(reason.clone());
                return Err(mlua::Error::runtime(reason));
            }
            if let Some(c) = &collection
                && let Err(e) = check_collection(c)
            {
                st.emit_error = Some(e.clone());
                return Err(mlua::Error::runtime(e));
            }
            let doc = match lua_to_json(lua, &doc, 0) {
                Ok(serde_json::Value::Object(m)) => m,
                Ok(_) => {
                    return Err(mlua::Error::runtime(
                        "emit: a document must be a table with string keys",
                    ));
                }
                Err(e) => return Err(mlua::Error::runtime(format!("emit: {e}"))),
            };
            st.emits.push((collection, doc));
            Ok(())
        })?,
    )?;
    g.set(
        "log",
        lua.create_function(|lua, msg: mlua::LuaString| {
            if let Some(mut st) = lua.app_data_mut::<CallState>() {
                let room = MAX_LOG_BYTES.saturating_sub(st.log.len());
                if room > 0 {
                    let m = msg.to_string_lossy();
                    if !st.log.is_empty() {
                        st.log.push_str("; ");
                    }
                    let mut end = m.len().min(room);
                    while !m.is_char_boundary(end) {
                        end -= 1;
                    }
                    st.log.push_str(&m[..end]);
                }
            }
            Ok(())
        })?,
    )?;
    g.set(
        "parse_json",
        lua.create_function(|lua, text: mlua::LuaString| {
            let v: serde_json::Value = serde_json::from_slice(&text.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("parse_json: {e}")))?;
            json_to_lua(lua, &v)
        })?,
    )?;
    g.set(
        "parse_csv",
        lua.create_function(|lua, text: mlua::LuaString| {
            let bytes = text.as_bytes();
            let out = lua.create_table()?;
            let mut rdr = csv::ReaderBuilder::new().from_reader(&bytes[..]);
            let headers = rdr
                .headers()
                .map_err(|e| mlua::Error::runtime(format!("parse_csv: {e}")))?
                .clone();
            for (i, row) in rdr.records().enumerate() {
                let row = row.map_err(|e| mlua::Error::runtime(format!("parse_csv: {e}")))?;
                let t = lua.create_table_with_capacity(0, headers.len())?;
                for (h, v) in headers.iter().zip(row.iter()) {
                    t.raw_set(h, v)?;
                }
                out.raw_set(i + 1, t)?;
            }
            Ok(out)
        })?,
    )?;
    Ok(())
}

/// An app version ready to run, with its pool of VMs (one per worker thread that used it).
pub struct AppHandle {
    pub tenant: TenantName,
    pub kind: AppKind,
    pub version: u32,
    pub shape: Shape,
    limits: AppLimits,
    bytecode: Arc<Vec<u8>>,
    pool: Mutex<Vec<Vm>>,
}

/// How many idle VMs an app version keeps.
const MAX_IDLE_VMS: usize = 8;

impl AppHandle {
    pub fn new(
        tenant: TenantName,
        kind: AppKind,
        version: u32,
        compiled: Compiled,
        limits: AppLimits,
    ) -> Self {
        Self {
            tenant,
            kind,
            version,
            shape: compiled.shape,
            limits,
            bytecode: compiled.bytecode,
            pool: Mutex::new(Vec::new()),
        }
    }

    fn checkout(&self) -> Result<Vm, AppFailure> {
        if let Some(vm) = self.pool.lock().ok().and_then(|mut p| p.pop()) {
            return Ok(vm);
        }
        Vm::new(&self.bytecode, &self.limits).map_err(|e| AppFailure {
            reason: format!("app failed to load: {e}"),
            limit: true,
        })
    }

    fn checkin(&self, vm: Vm) {
        if let Ok(mut p) = self.pool.lock()
            && p.len() < MAX_IDLE_VMS
        {
            p.push(vm);
        }
    }

    /// Runs `map` on each record. Blocking: call from a blocking thread.
    pub fn map_records(&self, data_name: &str, records: &[serde_json::Value]) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(records.len());
        let mut vm = match self.checkout() {
            Ok(vm) => Some(vm),
            Err(f) => {
                return records
                    .iter()
                    .map(|_| Outcome {
                        result: Err(f.clone()),
                        log: None,
                    })
                    .collect();
            }
        };
        for record in records {
            let v = match vm.take() {
                Some(v) => v,
                None => match self.checkout() {
                    Ok(v) => v,
                    Err(f) => {
                        out.push(Outcome {
                            result: Err(f),
                            log: None,
                        });
                        continue;
                    }
                },
            };
            let (outcome, keep) = self.map_one(v, data_name, record);
            out.push(outcome);
            vm = keep;
        }
        if let Some(v) = vm {
            self.checkin(v);
        }
        out
    }

    /// One record through `map`; returns the VM unless it hit a limit and must be discarded.
    fn map_one(
        &self,
        mut vm: Vm,
        data_name: &str,
        record: &serde_json::Value,
    ) -> (Outcome, Option<Vm>) {
        let Some(map) = vm.map.clone() else {
            return (
                Outcome {
                    result: Err(AppFailure {
                        reason: "app defines no `map` function".into(),
                        limit: false,
                    }),
                    log: None,
                },
                Some(vm),
            );
        };
        if let Err(e) = vm.set_context(self.tenant.as_str(), data_name) {
            let f = vm.failure(&e, &self.limits);
            return (
                Outcome {
                    result: Err(f),
                    log: None,
                },
                None,
            );
        }
        vm.begin(&self.limits);
        let result = json_to_lua(&vm.lua, record).and_then(|arg| map.call::<Value>(arg));
        let result = match result {
            Ok(v) => self.documents_of(&vm.lua, v),
            Err(e) => Err(vm.failure(&e, &self.limits)),
        };
        let log = vm.take_log();
        let keep = match &result {
            Err(f) if f.limit => None,
            _ => Some(vm),
        };
        (Outcome { result, log }, keep)
    }

    /// A `map` return value as documents: a table, a list of tables, or nil.
    fn documents_of(&self, lua: &Lua, v: Value) -> Result<Emitted, AppFailure> {
        let fail = |reason: String| AppFailure {
            reason,
            limit: false,
        };
        match lua_to_json(lua, &v, 0)
            .map_err(|e| fail(format!("app returned an invalid document: {e}")))?
        {
            serde_json::Value::Null => Ok(Vec::new()),
            serde_json::Value::Object(m) => Ok(vec![(None, m)]),
            serde_json::Value::Array(items) => {
                if items.len() > self.limits.max_emits {
                    return Err(fail(format!(
                        "app exceeded {} emitted documents limit",
                        self.limits.max_emits
                    )));
                }
                items
                    .into_iter()
                    .map(|i| match i {
                        serde_json::Value::Object(m) => Ok((None, m)),
                        _ => Err(fail("app returned a list holding a non-table".into())),
                    })
                    .collect()
            }
            _ => Err(fail(
                "map must return a table, a list of tables, or nil".into(),
            )),
        }
    }

    /// Runs `ingest(tenant, name, data)` on a whole payload. Blocking.
    pub fn ingest(&self, data_name: &str, data: &str) -> Outcome {
        let mut vm = match self.checkout() {
            Ok(vm) => vm,
            Err(f) => {
                return Outcome {
                    result: Err(f),
                    log: None,
                };
            }
        };
        let Some(ingest) = vm.ingest.clone() else {
            self.checkin(vm);
            return Outcome {
                result: Err(AppFailure {
                    reason: "app defines no `ingest` function".into(),
                    limit: false,
                }),
                log: None,
            };
        };
        if let Err(e) = vm.set_context(self.tenant.as_str(), data_name) {
            let f = vm.failure(&e, &self.limits);
            return Outcome {
                result: Err(f),
                log: None,
            };
        }
        vm.begin(&self.limits);
        let r = ingest.call::<()>((self.tenant.as_str(), data_name, data));
        let log = vm.take_log();
        match r {
            Ok(()) => {
                let emits = vm
                    .lua
                    .app_data_mut::<CallState>()
                    .map(|mut s| std::mem::take(&mut s.emits))
                    .unwrap_or_default();
                self.checkin(vm);
                Outcome {
                    result: Ok(emits),
                    log,
                }
            }
            Err(e) => {
                let f = vm.failure(&e, &self.limits);
                if !f.limit {
                    self.checkin(vm);
                }
                Outcome {
                    result: Err(f),
                    log,
                }
            }
        }
    }

    pub fn limits(&self) -> &AppLimits {
        &self.limits
    }
}

/// The compiled, active app of each tenant and kind, refreshed when a new version appears.
#[derive(Default)]
pub struct AppCache {
    apps: Mutex<HashMap<(TenantName, AppKind), Arc<AppHandle>>>,
}

impl AppCache {
    /// The active app for a tenant: compiled once per version, then served from the cache.
    /// `None` when the tenant has not uploaded one (records are stored as parsed).
    pub async fn active(
        &self,
        coredms: &crate::coredms::CoreDms,
        tenant: &TenantName,
        kind: AppKind,
        limits: AppLimits,
    ) -> Result<Option<Arc<AppHandle>>, crate::coredms::CoreError> {
        let Some(stored) = coredms.active_app(tenant, kind).await? else {
            return Ok(None);
        };
        let key = (tenant.clone(), kind);
        if let Some(h) = self.apps.lock().ok().and_then(|m| m.get(&key).cloned())
            && h.version == stored.version
            && h.limits == limits
        {
            return Ok(Some(h));
        }
        let source = stored.source;
        let compiled = tokio::task::spawn_blocking(move || compile(&source, &limits))
            .await
            .map_err(|e| crate::coredms::CoreError::Database(e.to_string()))?
            .map_err(|e| {
                crate::coredms::CoreError::Invalid(format!("stored app does not compile: {e}"))
            })?;
        let h = Arc::new(AppHandle::new(
            tenant.clone(),
            kind,
            stored.version,
            compiled,
            limits,
        ));
        if let Ok(mut m) = self.apps.lock() {
            m.insert(key, h.clone());
        }
        Ok(Some(h))
    }
}

/// One input to transform: a parsed record (or the reason it could not be parsed), or for
/// `ingest` apps the raw payload as a JSON string.
#[derive(Debug, Clone)]
pub struct Input {
    /// Stable origin of the input (file hash, message id): the prefix of its document ids.
    pub origin: String,
    pub index: u64,
    pub bytes: u64,
    pub started_us: i64,
    pub data_name: String,
    pub value: Result<serde_json::Value, String>,
}

/// Documents to write and failures to log, with which inputs failed (for dead-lettering).
#[derive(Debug, Default)]
pub struct Transformed {
    pub docs: Vec<crate::coredms::DocWrite>,
    pub failures: Vec<crate::coredms::Failure>,
    /// (index into the inputs, reason)
    pub failed_inputs: Vec<(usize, String)>,
    /// For each of `docs`, the index of the input it came from.
    pub doc_inputs: Vec<usize>,
}

struct CountingWriter(usize);

impl std::io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_size(m: &serde_json::Map<String, serde_json::Value>) -> usize {
    let mut w = CountingWriter(0);
    let _ = serde_json::to_writer(&mut w, m);
    w.0
}

/// Runs the app (or none: records are stored as parsed) over inputs. Blocking.
pub fn transform(
    app: Option<&AppHandle>,
    collection: &str,
    max_doc_bytes: usize,
    inputs: &[Input],
) -> Transformed {
    let mut out = Transformed::default();
    let outcomes: Vec<Outcome> = match app {
        None => inputs
            .iter()
            .map(|i| Outcome {
                result: match &i.value {
                    Ok(serde_json::Value::Object(m)) => Ok(vec![(None, m.clone())]),
                    Ok(_) => Err(AppFailure {
                        reason: "record is not a JSON object (upload an app to map it)".into(),
                        limit: false,
                    }),
                    Err(e) => Err(AppFailure {
                        reason: e.clone(),
                        limit: false,
                    }),
                },
                log: None,
            })
            .collect(),
        Some(app) => inputs
            .iter()
            .map(|i| match &i.value {
                Err(e) => Outcome {
                    result: Err(AppFailure {
                        reason: e.clone(),
                        limit: false,
                    }),
                    log: None,
                },
                Ok(v) if app.shape.has_map => app
                    .map_records(&i.data_name, std::slice::from_ref(v))
                    .pop()
                    .unwrap_or(Outcome {
                        result: Ok(Vec::new()),
                        log: None,
                    }),
                Ok(serde_json::Value::String(raw)) => app.ingest(&i.data_name, raw),
                Ok(v) => app.ingest(&i.data_name, &v.to_string()),
            })
            .collect(),
    };
    for (n, (input, outcome)) in inputs.iter().zip(outcomes).enumerate() {
        let fail = |out: &mut Transformed, reason: String| {
            out.failures.push(crate::coredms::Failure {
                collection: collection.to_owned(),
                reason: reason.clone(),
                bytes: input.bytes,
                started_us: input.started_us,
                data_name: Some(input.data_name.clone()),
            });
            out.failed_inputs.push((n, reason));
        };
        let docs = match outcome.result {
            Ok(d) => d,
            Err(f) => {
                let reason = match outcome.log {
                    Some(l) => format!("{} (app log: {l})", f.reason),
                    None => f.reason,
                };
                fail(&mut out, reason);
                continue;
            }
        };
        if let Some((_, big)) = docs.iter().find(|(_, d)| json_size(d) > max_doc_bytes) {
            let _ = big;
            fail(
                &mut out,
                format!("document exceeds {max_doc_bytes} bytes limit"),
            );
            continue;
        }
        let per_doc_bytes = input.bytes / (docs.len().max(1) as u64);
        for (k, (coll, doc)) in docs.into_iter().enumerate() {
            out.doc_inputs.push(n);
            out.docs.push(crate::coredms::DocWrite {
                id: crate::coredms::doc_id(&input.origin, input.index, k as u32),
                collection: coll.unwrap_or_else(|| collection.to_owned()),
                doc,
                bytes: per_doc_bytes,
                started_us: input.started_us,
                data_name: Some(input.data_name.clone()),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
