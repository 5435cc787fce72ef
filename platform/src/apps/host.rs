//! The host API installed in every VM: what is removed from the globals, and `emit`,
//! `log`, `parse_json` and `parse_csv`, each under the call's budget.

use std::sync::Arc;

use mlua::{Lua, Value};

use super::budget::{Budget, Limit, is_memory};
use super::convert::{self, ConvertError, Meter, lua_to_json};
use crate::config::AppLimits;
use crate::model::check_collection;

/// Bytes of `log()` output kept per call.
const MAX_LOG_BYTES: usize = 1024;

/// Documents an `ingest` call emitted, and its `log()` output.
pub(super) struct CallState {
    pub(super) emits: Vec<(Option<String>, serde_json::Map<String, serde_json::Value>)>,
    /// The reason of the last invalid `emit`, reported as it is when it ends the call.
    pub(super) emit_error: Option<String>,
    pub(super) log: String,
    pub(super) limits: AppLimits,
    /// What this call's emitted documents may still take.
    pub(super) meter: Meter,
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

pub(super) fn install_host_api(lua: &Lua, budget: &Arc<Budget>) -> mlua::Result<()> {
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
                st.emit_error = Some(e.to_string());
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
