//! An app version ready to run: its pool of VMs, and `map` and `ingest` calls on them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlua::{Lua, Value};

use super::budget::{CpuClock, Limit, is_memory, limit_reason, meter};
use super::compile::{Compiled, Shape};
use super::convert::{self, ConvertError, Meter, OutputKeys, lua_to_json_keyed};
use super::host::CallState;
use super::vm::{AppFailure, Emitted, Outcome, Vm, describe};
use crate::config::AppLimits;
use crate::model::AppKind;
use crate::tenants::TenantName;

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
    pub(super) pool: Mutex<Vec<Vm>>,
    /// When a VM last came back to the pool.
    used: Mutex<Instant>,
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
            used: Mutex::new(Instant::now()),
        }
    }

    /// Drops the pooled VMs when none came back for `idle`: a tenant whose queue is quiet
    /// does not keep a Luau heap (about 180 KiB each) for its next message, which builds a
    /// VM again from the bytecode. The VMs dropped.
    pub fn drop_idle_vms(&self, idle: Duration) -> usize {
        let quiet = self.used.lock().is_ok_and(|u| u.elapsed() >= idle);
        if !quiet {
            return 0;
        }
        // Taken out under the lock, dropped (closing each Luau state) after it.
        let vms = self.pool.lock().map(|mut p| std::mem::take(&mut *p));
        vms.map_or(0, |v| v.len())
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
        if let Ok(mut u) = self.used.lock() {
            *u = Instant::now();
        }
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
        // This thread runs every call of the batch.
        let mut clock = CpuClock::of_this_thread();
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
                Call::Map(record) => self.map_one(v, data_name, record, &mut clock),
                Call::Ingest(data) => self.ingest_one(v, data_name, data, &mut clock),
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

    /// The VM ready to call the app's `name` function for `data_name` (`defined`: the app
    /// has it): context set, budget armed. Or the outcome when it cannot be, with the VM
    /// unless it must be discarded.
    #[expect(
        clippy::result_large_err,
        reason = "the error is the call's outcome, returned at once"
    )]
    fn ready(
        &self,
        mut vm: Vm,
        defined: bool,
        name: &str,
        data_name: &str,
        clock: &mut CpuClock,
    ) -> Result<Vm, (Outcome, Option<Vm>)> {
        if !defined {
            let missing = Outcome {
                result: Err(AppFailure {
                    reason: format!("app defines no `{name}` function"),
                    limit: false,
                }),
                log: None,
            };
            return Err((missing, Some(vm)));
        }
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
        vm.begin(&self.limits, clock);
        Ok(vm)
    }

    /// One record through `map`; returns the VM unless it hit a limit and must be discarded.
    fn map_one(
        &self,
        vm: Vm,
        data_name: &str,
        record: &serde_json::Value,
        clock: &mut CpuClock,
    ) -> (Outcome, Option<Vm>) {
        let defined = vm.map.is_some();
        let mut vm = match self.ready(vm, defined, "map", data_name, clock) {
            Ok(ready) => ready,
            Err(done) => return done,
        };
        let result = vm
            .record_to_lua(record, &self.limits)
            .and_then(|arg| vm.call_map(arg));
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
                    let meter = left.unwrap_or_else(|| meter(&self.limits));
                    self.documents_of(&vm.lua, v, meter, &mut vm.out_keys)
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
    fn documents_of(
        &self,
        lua: &Lua,
        v: Value,
        mut meter: Meter,
        keys: &mut OutputKeys,
    ) -> Result<Emitted, AppFailure> {
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
            return match lua_to_json_keyed(lua, &Value::Table(t), 0, &mut meter, keys)
                .map_err(converted)?
            {
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
            match lua_to_json_keyed(lua, &item, 1, &mut meter, keys).map_err(converted)? {
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
    fn ingest_one(
        &self,
        vm: Vm,
        data_name: &str,
        data: &str,
        clock: &mut CpuClock,
    ) -> (Outcome, Option<Vm>) {
        let defined = vm.ingest.is_some();
        let vm = match self.ready(vm, defined, "ingest", data_name, clock) {
            Ok(ready) => ready,
            Err(done) => return done,
        };
        let r = vm.call_ingest((self.tenant.as_str(), data_name, data));
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
