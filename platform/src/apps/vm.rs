//! One Luau state with an app loaded: built, sandboxed and limited, and the failure a call
//! ends with.

use std::sync::Arc;

use mlua::{Function, Lua, LuaOptions, StdLib, Value};

use super::budget::{Budget, CpuClock, Limit, is_memory, limit_reason, meter, root};
use super::builtins;
use super::convert::{self, OutputKeys, RecordKeys};
use super::host::{CallState, install_host_api};
use crate::config::AppLimits;

const CHUNK_NAME: &str = "=app";

/// Memory Luau may take beyond what its objects need: it allocates small objects in pages
/// of 16 KiB, one size class at a time.
const PAGE_ROOM: usize = 1 << 20;

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

pub(super) struct VmError {
    pub(super) reason: String,
}

impl std::fmt::Display for VmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// One Luau state with the app loaded. Not `Sync`: one thread uses it at a time.
pub(super) struct Vm {
    pub(super) lua: Lua,
    pub(super) budget: Arc<Budget>,
    pub(super) map: Option<Function>,
    pub(super) ingest: Option<Function>,
    context: Option<(String, String)>,
    keys: RecordKeys,
    /// The keys of the documents `map` returned before.
    pub(super) out_keys: OutputKeys,
}

impl Vm {
    pub(super) fn new(bytecode: &[u8], limits: &AppLimits) -> Result<Self, VmError> {
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
            keys: RecordKeys::default(),
            out_keys: OutputKeys::default(),
        })
    }

    pub(super) fn set_context(&mut self, tenant: &str, data_name: &str) -> mlua::Result<()> {
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

    /// Arms the budget for a call on the thread `clock` is of.
    pub(super) fn begin(&self, limits: &AppLimits, clock: &mut CpuClock) {
        self.budget.arm_at(limits, clock.now_at_most());
        if let Some(mut st) = self.lua.app_data_mut::<CallState>() {
            st.emits.clear();
            st.emit_error = None;
            st.log.clear();
            st.meter = meter(limits);
        }
    }

    /// `record` as the argument of `map`. The conversion runs with the memory limit lifted
    /// when the limit has room for what it can take, so that mlua takes its fast paths (no
    /// protected call per string and per table slot), and the limit is set back after.
    ///
    /// The room asked for covers the bound of what the record takes twice, Luau's string
    /// table growing (at most the memory already used) and its allocation in pages
    /// ([`PAGE_ROOM`]): the VM stays under its limit, and should it not, the record fails on
    /// the memory limit before the app runs. Without that room, it converts metered.
    pub(super) fn record_to_lua(
        &mut self,
        record: &serde_json::Value,
        limits: &AppLimits,
    ) -> mlua::Result<Value> {
        let room = self
            .lua
            .used_memory()
            .saturating_mul(2)
            .saturating_add(convert::lua_bytes_bound(record).saturating_mul(2))
            .saturating_add(PAGE_ROOM);
        if room > limits.memory_bytes {
            return convert::record_to_lua(&self.lua, record, &mut self.keys);
        }
        self.lua.set_memory_limit(0)?;
        let arg = convert::record_to_lua(&self.lua, record, &mut self.keys);
        self.lua.set_memory_limit(limits.memory_bytes)?;
        if self.lua.used_memory() > limits.memory_bytes {
            return Err(mlua::Error::MemoryError(
                "not enough memory for the record".into(),
            ));
        }
        arg
    }

    /// The app's `map` on `arg`.
    pub(super) fn call_map(&self, arg: Value) -> mlua::Result<Value> {
        match &self.map {
            Some(map) => map.call(arg),
            None => Err(mlua::Error::runtime("app defines no `map` function")),
        }
    }

    /// The app's `ingest` on `(tenant, data name, data)`.
    pub(super) fn call_ingest(&self, args: (&str, &str, &str)) -> mlua::Result<()> {
        match &self.ingest {
            Some(ingest) => ingest.call(args),
            None => Err(mlua::Error::runtime("app defines no `ingest` function")),
        }
    }

    pub(super) fn take_log(&self) -> Option<String> {
        let mut st = self.lua.app_data_mut::<CallState>()?;
        (!st.log.is_empty()).then(|| std::mem::take(&mut st.log))
    }

    /// A limit hit during a call that returned normally anyway (the app caught the error):
    /// the call still fails, with the limit's reason.
    pub(super) fn caught_limit(&self, limits: &AppLimits) -> Option<AppFailure> {
        match self.budget.hit() {
            Limit::None => None,
            hit => Some(AppFailure {
                reason: limit_reason(hit, limits),
                limit: true,
            }),
        }
    }

    pub(super) fn failure(&self, e: &mlua::Error, limits: &AppLimits) -> AppFailure {
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

fn root_message(e: &mlua::Error) -> Option<&str> {
    match root(e) {
        mlua::Error::RuntimeError(m) => Some(m),
        _ => None,
    }
}

/// Longest app error message kept in a reason.
const MAX_REASON_CHARS: usize = 300;

/// A reason that names the limit, or the app's own error with its line.
pub(super) fn describe(e: &mlua::Error, hit: Limit, limits: &AppLimits) -> String {
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
