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
//!
//! Limits (invariant 6): memory, time and instructions inside the VM; emitted documents,
//! document size (counted as compact JSON, while the output is converted, before the host
//! allocates it) and the whole output of one call (at most `memory_bytes` of JSON and
//! `memory_bytes / 16` values, a value shared many times counting each time) outside it. A
//! limit, once hit, stays hit until the call returns: every later interrupt and host call
//! fails, `pcall`/`xpcall` re-raise it (a memory error they catch counts as the memory limit,
//! as does an app's own `error("not enough memory")`), and the call fails with the limit's
//! reason even if the app's code returns normally. A VM that hit a limit is discarded.

mod builtins;
mod convert;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mlua::{Function, Lua, LuaOptions, StdLib, Value, VmState};

pub use builtins::find_bytes;
pub use convert::{ConvertError, Exceeded, Meter, json_to_lua, lua_to_json};

use crate::config::AppLimits;
use crate::model::{AppKind, check_collection};
use crate::tenants::TenantName;

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
    Memory = 4,
    Document = 5,
    OutputBytes = 6,
    OutputValues = 7,
}

impl Limit {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Time,
            2 => Self::Instructions,
            3 => Self::Emits,
            4 => Self::Memory,
            5 => Self::Document,
            6 => Self::OutputBytes,
            7 => Self::OutputValues,
            _ => Self::None,
        }
    }

    fn of(e: Exceeded) -> Self {
        match e {
            Exceeded::Document => Self::Document,
            Exceeded::Bytes => Self::OutputBytes,
            Exceeded::Values => Self::OutputValues,
        }
    }
}

/// Values one call may output: a Luau value takes at least 16 bytes of VM memory.
fn output_values(limits: &AppLimits) -> usize {
    limits.memory_bytes / 16
}

/// The output budget of one call.
fn meter(limits: &AppLimits) -> Meter {
    Meter::new(
        limits.max_doc_bytes,
        limits.memory_bytes,
        output_values(limits),
    )
}

/// Per-call budget shared with the interrupt callback and the host functions. Once `hit` is
/// set it stays set until the next call is armed: the limit cannot be caught.
///
/// The time limit counts the CPU time of the thread running the call, so a call that waits
/// for a core on a busy machine (other tenants' apps, the database) is not failed for it.
/// The wall clock, cheap to read, says when the CPU clock (a system call) is worth reading;
/// a wall-clock backstop of [`WALL_BACKSTOP`] times the limit (at least 1 s) still ends a
/// call that somehow stops using CPU without returning.
struct Budget {
    /// When the CPU clock is read next (wall ns since `epoch`).
    soft_deadline_ns: AtomicU64,
    /// When the call ends whatever its CPU time (wall ns since `epoch`).
    hard_deadline_ns: AtomicU64,
    /// The thread's CPU time when the call was armed.
    cpu_start_ns: AtomicU64,
    time_ns: AtomicU64,
    ticks_left: AtomicU64,
    hit: AtomicU8,
    epoch: Instant,
}

/// The wall-clock backstop, as a multiple of the time limit.
const WALL_BACKSTOP: u64 = 20;

/// CPU time the calling thread has used, in ns.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

impl Budget {
    fn new(limits: &AppLimits) -> Self {
        let b = Self {
            soft_deadline_ns: AtomicU64::new(0),
            hard_deadline_ns: AtomicU64::new(0),
            cpu_start_ns: AtomicU64::new(0),
            time_ns: AtomicU64::new(0),
            ticks_left: AtomicU64::new(0),
            hit: AtomicU8::new(0),
            epoch: Instant::now(),
        };
        b.arm(limits);
        b
    }

    fn arm(&self, limits: &AppLimits) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let time_ns = limits.time_ms.saturating_mul(1_000_000);
        let backstop = time_ns.saturating_mul(WALL_BACKSTOP).max(1_000_000_000);
        self.time_ns.store(time_ns, Ordering::Relaxed);
        self.soft_deadline_ns
            .store(now.saturating_add(time_ns), Ordering::Relaxed);
        self.hard_deadline_ns
            .store(now.saturating_add(backstop), Ordering::Relaxed);
        self.cpu_start_ns.store(thread_cpu_ns(), Ordering::Relaxed);
        self.ticks_left
            .store(limits.instructions, Ordering::Relaxed);
        self.hit.store(Limit::None as u8, Ordering::Relaxed);
    }

    /// Whether the call has used up its time: its CPU time, read only once as much wall time
    /// has passed (a call cannot use more CPU than wall time), or the wall-clock backstop.
    fn out_of_time(&self) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64;
        if now <= self.soft_deadline_ns.load(Ordering::Relaxed) {
            return false;
        }
        if now > self.hard_deadline_ns.load(Ordering::Relaxed) {
            return true;
        }
        let used = thread_cpu_ns().saturating_sub(self.cpu_start_ns.load(Ordering::Relaxed));
        let limit = self.time_ns.load(Ordering::Relaxed);
        if used >= limit {
            return true;
        }
        // Not before the rest of the budget could have been used.
        self.soft_deadline_ns
            .store(now.saturating_add(limit - used), Ordering::Relaxed);
        false
    }

    fn hit(&self) -> Limit {
        Limit::from_u8(self.hit.load(Ordering::Relaxed))
    }

    /// Records that `l` was hit; the first limit hit is the one reported.
    fn trip(&self, l: Limit) {
        let _ = self.hit.compare_exchange(
            Limit::None as u8,
            l as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Fails once any limit was hit during this call.
    fn check_hit(&self) -> mlua::Result<()> {
        match self.hit() {
            Limit::None => Ok(()),
            l => Err(mlua::Error::runtime(format!("{l:?} limit exceeded"))),
        }
    }

    /// For host loops that run without interrupts: a limit already hit, or the time limit.
    fn check(&self) -> mlua::Result<()> {
        self.check_hit()?;
        if self.out_of_time() {
            self.trip(Limit::Time);
            return self.check_hit();
        }
        Ok(())
    }

    /// The interrupt: every function call and loop iteration, and every step of a pattern
    /// match. The clock is read every time: one step of a C built-in can take milliseconds.
    fn interrupt(&self) -> mlua::Result<VmState> {
        self.check_hit()?;
        let left = self.ticks_left.load(Ordering::Relaxed);
        if left == 0 {
            self.trip(Limit::Instructions);
            return self.check_hit().map(|()| VmState::Continue);
        }
        self.ticks_left.store(left - 1, Ordering::Relaxed);
        self.check().map(|()| VmState::Continue)
    }
}

/// Documents an `ingest` call emitted, and its `log()` output.
struct CallState {
    emits: Vec<(Option<String>, serde_json::Map<String, serde_json::Value>)>,
    /// The reason of the last invalid `emit`, reported as it is when it ends the call.
    emit_error: Option<String>,
    log: String,
    limits: AppLimits,
    /// What this call's emitted documents may still take.
    meter: Meter,
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
        let budget = Arc::new(Budget::new(limits));
        let b = budget.clone();
        lua.set_interrupt(move |_| b.interrupt());
        install_host_api(&lua, &budget).map_err(err)?;
        builtins::install(&lua, &budget, limits.memory_bytes).map_err(err)?;
        lua.sandbox(true).map_err(err)?;
        lua.set_memory_limit(limits.memory_bytes).map_err(err)?;
        lua.set_app_data(CallState {
            emits: Vec::new(),
            emit_error: None,
            log: String::new(),
            limits: *limits,
            meter: meter(limits),
        });
        budget.arm(limits);
        let run = lua
            .load(bytecode)
            .set_name(CHUNK_NAME)
            .set_mode(mlua::chunk::ChunkMode::Binary)
            .exec();
        let hit = budget.hit();
        if let Err(e) = run {
            return Err(VmError {
                reason: describe(&e, hit, limits),
            });
        }
        if hit != Limit::None {
            return Err(VmError {
                reason: limit_reason(hit, limits),
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
            st.meter = meter(limits);
        }
    }

    fn take_log(&self) -> Option<String> {
        let mut st = self.lua.app_data_mut::<CallState>()?;
        (!st.log.is_empty()).then(|| std::mem::take(&mut st.log))
    }

    /// A limit hit during a call that returned normally anyway (the app caught the error):
    /// the call still fails, with the limit's reason.
    fn caught_limit(&self, limits: &AppLimits) -> Option<AppFailure> {
        match self.budget.hit() {
            Limit::None => None,
            hit => Some(AppFailure {
                reason: limit_reason(hit, limits),
                limit: true,
            }),
        }
    }

    fn failure(&self, e: &mlua::Error, limits: &AppLimits) -> AppFailure {
        if is_memory(e) {
            self.budget.trip(Limit::Memory);
        }
        let hit = self.budget.hit();
        let emit_error = self
            .lua
            .app_data_mut::<CallState>()
            .and_then(|mut s| s.emit_error.take())
            .filter(|m| root_message(e) == Some(m.as_str()));
        AppFailure {
            reason: match (hit, emit_error) {
                (Limit::None, Some(m)) => m,
                _ => describe(e, hit, limits),
            },
            limit: hit != Limit::None,
        }
    }
}

fn root(e: &mlua::Error) -> &mlua::Error {
    let mut root = e;
    while let mlua::Error::CallbackError { cause, .. } = root {
        root = cause;
    }
    root
}

fn root_message(e: &mlua::Error) -> Option<&str> {
    match root(e) {
        mlua::Error::RuntimeError(m) => Some(m),
        _ => None,
    }
}

fn is_memory(e: &mlua::Error) -> bool {
    matches!(root(e), mlua::Error::MemoryError(_))
}

/// The reason for the ingestion log when `hit` stopped a call.
fn limit_reason(hit: Limit, limits: &AppLimits) -> String {
    match hit {
        Limit::Time => format!("app exceeded {} ms time limit", limits.time_ms),
        Limit::Instructions => format!("app exceeded {} instruction budget", limits.instructions),
        Limit::Emits => format!("app exceeded {} emitted documents limit", limits.max_emits),
        Limit::Memory => format!("app exceeded {} bytes memory limit", limits.memory_bytes),
        Limit::Document => format!(
            "app output exceeds {} bytes document limit",
            limits.max_doc_bytes
        ),
        Limit::OutputBytes => format!(
            "app output exceeds {} bytes memory limit (the JSON of all documents of one call)",
            limits.memory_bytes
        ),
        Limit::OutputValues => format!(
            "app output exceeds {} bytes memory limit (more than {} values in one call)",
            limits.memory_bytes,
            output_values(limits)
        ),
        Limit::None => "app stopped".into(),
    }
}

/// Longest app error message kept in a reason.
const MAX_REASON_CHARS: usize = 300;

/// A reason that names the limit, or the app's own error with its line.
fn describe(e: &mlua::Error, hit: Limit, limits: &AppLimits) -> String {
    if hit != Limit::None {
        return limit_reason(hit, limits);
    }
    let first_line = |m: &str| -> String {
        m.lines()
            .next()
            .unwrap_or("")
            .trim()
            .chars()
            .take(MAX_REASON_CHARS)
            .collect()
    };
    match root(e) {
        mlua::Error::MemoryError(_) => limit_reason(Limit::Memory, limits),
        mlua::Error::RuntimeError(m) => {
            let first = first_line(m);
            if first.contains("stack overflow") {
                "app exceeded the call depth limit (stack overflow)".into()
            } else {
                format!("app error: {first}")
            }
        }
        other => format!("app error: {}", first_line(&other.to_string())),
    }
}

/// What a host function tells the app when a conversion fails; a limit is also recorded.
fn convert_failure(budget: &Budget, what: &str, e: ConvertError) -> mlua::Error {
    match e {
        ConvertError::Invalid(m) => mlua::Error::runtime(format!("{what}: {m}")),
        ConvertError::Limit(x) => {
            budget.trip(Limit::of(x));
            budget
                .check_hit()
                .err()
                .unwrap_or_else(|| mlua::Error::runtime("limit exceeded"))
        }
        ConvertError::Lua(e) => {
            if is_memory(&e) {
                budget.trip(Limit::Memory);
            }
            e
        }
    }
}

fn install_host_api(lua: &Lua, budget: &Arc<Budget>) -> mlua::Result<()> {
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
        "coroutine",
    ] {
        g.raw_set(name, Value::Nil)?;
    }
    let b = budget.clone();
    g.set(
        "emit",
        lua.create_function(move |lua, args: mlua::MultiValue| {
            b.check_hit()?;
            let (collection, doc) = match args.len() {
                1 => (None, args.into_iter().next().unwrap_or(Value::Nil)),
                2 => {
                    let mut it = args.into_iter();
                    let c = it.next().unwrap_or(Value::Nil);
                    let d = it.next().unwrap_or(Value::Nil);
                    let c = match c {
                        // Longer than any valid name: refused below without copying it all.
                        Value::String(s) => {
                            let b = s.as_bytes();
                            String::from_utf8_lossy(&b[..b.len().min(65)]).into_owned()
                        }
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
                b.trip(Limit::Emits);
                return Err(b
                    .check_hit()
                    .err()
                    .unwrap_or_else(|| mlua::Error::runtime("emitted documents limit exceeded")));
            }
            if let Some(c) = &collection
                && let Err(e) = check_collection(c)
            {
                st.emit_error = Some(e.clone());
                return Err(mlua::Error::runtime(e));
            }
            st.meter.start_document();
            let doc = match lua_to_json(lua, &doc, 0, &mut st.meter) {
                Ok(serde_json::Value::Object(m)) => m,
                Ok(_) => {
                    return Err(mlua::Error::runtime(
                        "emit: a document must be a table with string keys",
                    ));
                }
                Err(e) => return Err(convert_failure(&b, "emit", e)),
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
                if room > 2 {
                    // Only what is kept is copied out of the VM.
                    let bytes = msg.as_bytes();
                    let m = String::from_utf8_lossy(&bytes[..bytes.len().min(room)]);
                    if !st.log.is_empty() {
                        st.log.push_str("; ");
                    }
                    let room = MAX_LOG_BYTES.saturating_sub(st.log.len());
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
    let b = budget.clone();
    g.set(
        "parse_json",
        lua.create_function(move |lua, text: mlua::LuaString| {
            b.check_hit()?;
            let r = convert::json_text_to_lua(lua, &text.as_bytes(), &|| b.check());
            if let Err(e) = &r
                && is_memory(e)
            {
                b.trip(Limit::Memory);
            }
            r
        })?,
    )?;
    let b = budget.clone();
    g.set(
        "parse_csv",
        lua.create_function(move |lua, text: mlua::LuaString| {
            b.check_hit()?;
            let r = parse_csv(lua, &text.as_bytes(), &b);
            if let Err(e) = &r
                && is_memory(e)
            {
                b.trip(Limit::Memory);
            }
            r
        })?,
    )?;
    Ok(())
}

/// Rows of CSV text (the first row names the fields) as a list of tables, built in the VM.
fn parse_csv(lua: &Lua, bytes: &[u8], budget: &Budget) -> mlua::Result<mlua::Table> {
    const ROWS_PER_CHECK: usize = 1024;
    let out = lua.create_table()?;
    let mut rdr = csv::ReaderBuilder::new().from_reader(bytes);
    let headers = rdr
        .headers()
        .map_err(|e| mlua::Error::runtime(format!("parse_csv: {e}")))?
        .iter()
        .map(|h| lua.create_string(h))
        .collect::<mlua::Result<Vec<_>>>()?;
    let mut row = csv::StringRecord::new();
    let mut i = 0usize;
    while rdr
        .read_record(&mut row)
        .map_err(|e| mlua::Error::runtime(format!("parse_csv: {e}")))?
    {
        let t = lua.create_table_with_capacity(0, headers.len())?;
        for (h, v) in headers.iter().zip(row.iter()) {
            t.raw_set(h, lua.create_string(v)?)?;
        }
        i += 1;
        out.raw_set(i, t)?;
        if i % ROWS_PER_CHECK == 0 {
            budget.check()?;
        }
    }
    Ok(out)
}

/// What one input asks of an app: `map` over a parsed record, or `ingest` of a payload.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    Map(&'a serde_json::Value),
    Ingest(&'a str),
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

    /// Runs each call in turn on one VM taken from the pool once; a VM that hits a limit is
    /// discarded and the next call takes a fresh one. One outcome per call, in order.
    /// Blocking: call from a blocking thread.
    pub fn run<'a>(&self, calls: impl IntoIterator<Item = (&'a str, Call<'a>)>) -> Vec<Outcome> {
        let mut calls = calls.into_iter();
        let mut out = Vec::with_capacity(calls.size_hint().0);
        let mut vm = None;
        let mut first = true;
        while let Some((data_name, call)) = calls.next() {
            let v = match vm.take() {
                Some(v) => v,
                None => match self.checkout() {
                    Ok(v) => v,
                    // The app does not load at all: the reason holds for every call.
                    Err(f) if first => {
                        out.push(Outcome {
                            result: Err(f.clone()),
                            log: None,
                        });
                        out.extend(calls.map(|_| Outcome {
                            result: Err(f.clone()),
                            log: None,
                        }));
                        return out;
                    }
                    Err(f) => {
                        out.push(Outcome {
                            result: Err(f),
                            log: None,
                        });
                        continue;
                    }
                },
            };
            first = false;
            let (outcome, keep) = match call {
                Call::Map(record) => self.map_one(v, data_name, record),
                Call::Ingest(data) => self.ingest_one(v, data_name, data),
            };
            out.push(outcome);
            vm = keep;
        }
        if let Some(v) = vm {
            self.checkin(v);
        }
        out
    }

    /// Runs `map` on each record. Blocking: call from a blocking thread.
    pub fn map_records(&self, data_name: &str, records: &[serde_json::Value]) -> Vec<Outcome> {
        self.run(records.iter().map(|r| (data_name, Call::Map(r))))
    }

    /// The VM ready to call `function` (the app's `name` function) for `data_name`: context
    /// set, budget armed. Or the outcome when it cannot be, with the VM unless it must be
    /// discarded.
    #[expect(
        clippy::result_large_err,
        reason = "the error is the call's outcome, returned at once"
    )]
    fn ready(
        &self,
        mut vm: Vm,
        function: Option<Function>,
        name: &str,
        data_name: &str,
    ) -> Result<(Vm, Function), (Outcome, Option<Vm>)> {
        let Some(function) = function else {
            let missing = Outcome {
                result: Err(AppFailure {
                    reason: format!("app defines no `{name}` function"),
                    limit: false,
                }),
                log: None,
            };
            return Err((missing, Some(vm)));
        };
        if let Err(e) = vm.set_context(self.tenant.as_str(), data_name) {
            let f = vm.failure(&e, &self.limits);
            return Err((
                Outcome {
                    result: Err(f),
                    log: None,
                },
                None,
            ));
        }
        vm.begin(&self.limits);
        Ok((vm, function))
    }

    /// One record through `map`; returns the VM unless it hit a limit and must be discarded.
    fn map_one(
        &self,
        vm: Vm,
        data_name: &str,
        record: &serde_json::Value,
    ) -> (Outcome, Option<Vm>) {
        let map = vm.map.clone();
        let (vm, map) = match self.ready(vm, map, "map", data_name) {
            Ok(ready) => ready,
            Err(done) => return done,
        };
        let result = json_to_lua(&vm.lua, record).and_then(|arg| map.call::<Value>(arg));
        let result = match result {
            Ok(v) => match vm.caught_limit(&self.limits) {
                Some(f) => Err(f),
                None => {
                    // `emit` means nothing to `map`: what it took is dropped, and what is
                    // left of the call's budget is what the returned documents may use.
                    let left = vm.lua.app_data_mut::<CallState>().map(|mut st| {
                        st.emits = Vec::new();
                        st.meter.clone()
                    });
                    self.documents_of(&vm.lua, v, left.unwrap_or_else(|| meter(&self.limits)))
                }
            },
            Err(e) => Err(vm.failure(&e, &self.limits)),
        };
        let log = vm.take_log();
        let keep = match &result {
            Err(f) if f.limit => None,
            _ => Some(vm),
        };
        (Outcome { result, log }, keep)
    }

    /// A `map` return value as documents: a table, a list of tables, or nil. Converted under
    /// the call's output budget; a list longer than the emitted-documents limit is refused
    /// before any of it is converted.
    fn documents_of(&self, lua: &Lua, v: Value, mut meter: Meter) -> Result<Emitted, AppFailure> {
        let fail = |reason: String, limit: bool| AppFailure { reason, limit };
        let converted = |e: ConvertError| match e {
            ConvertError::Invalid(m) => {
                fail(format!("app returned an invalid document: {m}"), false)
            }
            ConvertError::Limit(x) => fail(limit_reason(Limit::of(x), &self.limits), false),
            ConvertError::Lua(e) => fail(describe(&e, Limit::None, &self.limits), is_memory(&e)),
        };
        let t = match v {
            Value::Nil => return Ok(Vec::new()),
            Value::Table(t) => t,
            _ => {
                return Err(fail(
                    "map must return a table, a list of tables, or nil".into(),
                    false,
                ));
            }
        };
        let Some(len) = convert::array_len(lua, &t).map_err(|e| converted(ConvertError::Lua(e)))?
        else {
            return match lua_to_json(lua, &Value::Table(t), 0, &mut meter).map_err(converted)? {
                serde_json::Value::Object(m) => Ok(vec![(None, m)]),
                _ => Err(fail(
                    "map must return a table, a list of tables, or nil".into(),
                    false,
                )),
            };
        };
        if len > self.limits.max_emits {
            return Err(fail(limit_reason(Limit::Emits, &self.limits), false));
        }
        let mut docs = Vec::with_capacity(len);
        for i in 1..=len {
            let item: Value = t.raw_get(i).map_err(|e| converted(ConvertError::Lua(e)))?;
            if !matches!(item, Value::Table(_)) {
                return Err(fail(
                    "app returned a list holding a non-table".into(),
                    false,
                ));
            }
            meter.start_document();
            match lua_to_json(lua, &item, 1, &mut meter).map_err(converted)? {
                serde_json::Value::Object(m) => docs.push((None, m)),
                _ => {
                    return Err(fail(
                        "app returned a list holding a non-table".into(),
                        false,
                    ));
                }
            }
        }
        Ok(docs)
    }

    /// Runs `ingest(tenant, name, data)` on a whole payload. Blocking.
    pub fn ingest(&self, data_name: &str, data: &str) -> Outcome {
        self.run([(data_name, Call::Ingest(data))])
            .pop()
            .unwrap_or(Outcome {
                result: Ok(Vec::new()),
                log: None,
            })
    }

    /// One payload through `ingest`; returns the VM unless it hit a limit and must be
    /// discarded.
    fn ingest_one(&self, vm: Vm, data_name: &str, data: &str) -> (Outcome, Option<Vm>) {
        let ingest = vm.ingest.clone();
        let (vm, ingest) = match self.ready(vm, ingest, "ingest", data_name) {
            Ok(ready) => ready,
            Err(done) => return done,
        };
        let r = ingest.call::<()>((self.tenant.as_str(), data_name, data));
        let log = vm.take_log();
        if r.is_ok()
            && let Some(f) = vm.caught_limit(&self.limits)
        {
            return (
                Outcome {
                    result: Err(f),
                    log,
                },
                None,
            );
        }
        match r {
            Ok(()) => {
                let emits = vm
                    .lua
                    .app_data_mut::<CallState>()
                    .map(|mut s| std::mem::take(&mut s.emits))
                    .unwrap_or_default();
                (
                    Outcome {
                        result: Ok(emits),
                        log,
                    },
                    Some(vm),
                )
            }
            Err(e) => {
                let f = vm.failure(&e, &self.limits);
                let keep = (!f.limit).then_some(vm);
                (
                    Outcome {
                        result: Err(f),
                        log,
                    },
                    keep,
                )
            }
        }
    }

    pub fn limits(&self) -> &AppLimits {
        &self.limits
    }
}

#[cfg(test)]
mod tests;
