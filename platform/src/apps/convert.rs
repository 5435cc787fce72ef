//! Values across the sandbox boundary: JSON into Luau tables and back, by the rules in the
//! module documentation of [`super`].

use mlua::{Lua, LuaSerdeExt, Table, Value};
use serde_json::{Map, Number, Value as Json};

/// Deepest nesting accepted from an app.
pub const MAX_DEPTH: usize = 64;
const MAX_SAFE_INT: f64 = 9_007_199_254_740_992.0; // 2^53

pub fn json_to_lua(lua: &Lua, v: &Json) -> mlua::Result<Value> {
    Ok(match v {
        Json::Null => lua.null(),
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, json_to_lua(lua, item)?)?;
            }
            t.set_metatable(Some(lua.array_metatable()))?;
            Value::Table(t)
        }
        Json::Object(m) => {
            let t = lua.create_table_with_capacity(0, m.len())?;
            for (k, item) in m {
                t.raw_set(k.as_str(), json_to_lua(lua, item)?)?;
            }
            Value::Table(t)
        }
    })
}

pub fn lua_to_json(lua: &Lua, v: &Value, depth: usize) -> Result<Json, String> {
    if depth > MAX_DEPTH {
        return Err(format!("nesting deeper than {MAX_DEPTH} levels"));
    }
    Ok(match v {
        Value::Nil => Json::Null,
        Value::LightUserData(p) if p.0.is_null() => Json::Null, // the `null` sentinel
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => Json::Number((*i).into()),
        Value::Number(n) => number(*n)?,
        Value::String(s) => Json::String(
            s.to_str()
                .map_err(|_| "a string is not valid UTF-8".to_owned())?
                .to_owned(),
        ),
        Value::Table(t) => table(lua, t, depth)?,
        Value::Buffer(b) => Json::String(String::from_utf8_lossy(&b.to_vec()).into_owned()),
        other => return Err(format!("a {} cannot be stored", other.type_name())),
    })
}

fn number(n: f64) -> Result<Json, String> {
    if !n.is_finite() {
        return Err(format!("{n} is not a JSON number"));
    }
    if n.fract() == 0.0 && n.abs() < MAX_SAFE_INT {
        return Ok(Json::Number((n as i64).into()));
    }
    Number::from_f64(n)
        .map(Json::Number)
        .ok_or_else(|| format!("{n} is not a JSON number"))
}

fn table(lua: &Lua, t: &Table, depth: usize) -> Result<Json, String> {
    let len = t.raw_len();
    let is_array_mt = t.metatable().is_some_and(|m| m == lua.array_metatable());
    let mut pairs = 0usize;
    let mut entries: Vec<(Value, Value)> = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| e.to_string())?;
        pairs += 1;
        entries.push((k, v));
    }
    if pairs == len && (len > 0 || is_array_mt) {
        let mut out = Vec::with_capacity(len);
        for i in 1..=len {
            let v: Value = t.raw_get(i).map_err(|e| e.to_string())?;
            out.push(lua_to_json(lua, &v, depth + 1)?);
        }
        return Ok(Json::Array(out));
    }
    let mut m = Map::with_capacity(pairs);
    for (k, v) in entries {
        let key = match &k {
            Value::String(s) => s
                .to_str()
                .map_err(|_| "a key is not valid UTF-8".to_owned())?
                .to_owned(),
            Value::Integer(i) => i.to_string(),
            Value::Number(n) if n.fract() == 0.0 => (*n as i64).to_string(),
            other => return Err(format!("a {} cannot be a document key", other.type_name())),
        };
        if key.starts_with('$') || key.contains('\0') {
            return Err(format!(
                "key `{key}` is not allowed (starts with `$` or holds NUL)"
            ));
        }
        m.insert(key, lua_to_json(lua, &v, depth + 1)?);
    }
    Ok(Json::Object(m))
}
