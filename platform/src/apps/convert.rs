//! Values across the sandbox boundary: JSON into Luau tables and back, by the rules in the
//! module documentation of [`super`].
//!
//! Converting an app's output is host work done on the tenant's behalf, so it is metered
//! (invariant 6): every value reached is counted, a string or table reached twice counts
//! twice, and each document's size is counted exactly as its compact JSON text, before the
//! host allocates anything for it. A few kilobytes of shared references inside the VM cannot
//! become gigabytes outside it.

use std::fmt::Write as _;

use mlua::{Either, Lua, LuaSerdeExt, LuaString, Table, Value};
use serde_json::{Map, Number, Value as Json};

/// Deepest nesting accepted from an app.
pub const MAX_DEPTH: usize = 64;
const MAX_SAFE_INT: f64 = 9_007_199_254_740_992.0; // 2^53

/// Which output budget a conversion ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// One document's JSON text would pass the document-size limit.
    Document,
    /// The documents of one call together would pass the output byte budget.
    Bytes,
    /// The documents of one call together would hold more values than the value budget.
    Values,
}

/// Why a value could not be converted.
#[derive(Debug)]
pub enum ConvertError {
    /// The value has no document form (NaN, a function, a `$` key, ...).
    Invalid(String),
    /// A budget would be passed: nothing past it was allocated.
    Limit(Exceeded),
    /// The VM failed while being read (out of memory, for one).
    Lua(mlua::Error),
}

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m) => f.write_str(m),
            Self::Limit(e) => write!(f, "output budget exceeded: {e:?}"),
            Self::Lua(e) => write!(f, "{e}"),
        }
    }
}

fn invalid(m: impl Into<String>) -> ConvertError {
    ConvertError::Invalid(m.into())
}

/// What one call may still produce. `doc_limit` applies to each document (reset with
/// [`Meter::start_document`]); bytes and values are shared by all documents of the call.
#[derive(Debug, Clone)]
pub struct Meter {
    doc_limit: usize,
    doc_used: usize,
    bytes_left: usize,
    values_left: usize,
}

impl Meter {
    pub fn new(doc_limit: usize, bytes: usize, values: usize) -> Self {
        Self {
            doc_limit,
            doc_used: 0,
            bytes_left: bytes,
            values_left: values,
        }
    }

    /// No budget: for values the host made itself.
    pub fn unlimited() -> Self {
        Self::new(usize::MAX, usize::MAX, usize::MAX)
    }

    /// The next bytes charged belong to a new document.
    pub fn start_document(&mut self) {
        self.doc_used = 0;
    }

    /// JSON bytes of the document being converted so far.
    pub fn document_bytes(&self) -> usize {
        self.doc_used
    }

    /// Fails unless `n` more bytes fit, without charging them.
    fn fits(&self, n: usize) -> Result<(), ConvertError> {
        if n > self.doc_limit - self.doc_used {
            return Err(ConvertError::Limit(Exceeded::Document));
        }
        if n > self.bytes_left {
            return Err(ConvertError::Limit(Exceeded::Bytes));
        }
        Ok(())
    }

    fn charge(&mut self, n: usize) -> Result<(), ConvertError> {
        self.fits(n)?;
        self.doc_used += n;
        self.bytes_left -= n;
        Ok(())
    }

    fn value(&mut self) -> Result<(), ConvertError> {
        if self.values_left == 0 {
            return Err(ConvertError::Limit(Exceeded::Values));
        }
        self.values_left -= 1;
        Ok(())
    }
}

/// A JSON value as a Luau value.
pub fn json_to_lua(lua: &Lua, v: &Json) -> mlua::Result<Value> {
    Ok(match pushable(lua, v)? {
        Either::Left(s) => Value::String(lua.create_string(s)?),
        Either::Right(v) => v,
    })
}

/// A record (an app's `map` argument) as a Luau value. Its keys, and its strings that
/// repeat the last record's at the same position, are pushed as the Luau strings the VM
/// holds ([`RecordKeys`]); a record of scalars (a CSV row, most NDJSON lines) goes straight
/// into its table, with nothing collected on the host first. When the VM's memory limit is
/// lifted (see `Vm::record_to_lua`), mlua pushes the strings straight onto the Luau stack
/// and sets the table's slots without a protected call each: most of what converting costs.
pub fn record_to_lua(lua: &Lua, record: &Json, keys: &mut RecordKeys) -> mlua::Result<Value> {
    let Json::Object(m) = record else {
        return json_to_lua(lua, record);
    };
    keys.learn(lua, m)?;
    if m.values()
        .all(|v| !matches!(v, Json::Array(_) | Json::Object(_)))
    {
        let fields = m.iter().enumerate().map(|(i, (k, v))| {
            let value = match keys.value(i) {
                Some(held) => Either::Left(held),
                None => Either::Right(scalar(lua, v)),
            };
            (keys.key(i, k), value)
        });
        return Ok(Value::Table(lua.create_table_from(fields)?));
    }
    let values = m
        .values()
        .map(|v| pushable(lua, v))
        .collect::<mlua::Result<Vec<_>>>()?;
    let names = m.keys().enumerate().map(|(i, k)| keys.key(i, k));
    let t = lua.create_table_from(names.zip(values))?;
    Ok(Value::Table(t))
}

/// The keys of the last record converted, by position, as the Luau strings the VM holds,
/// and its short string values: the records of one file (or stream) carry the same keys in
/// the same order, and often the same value as the record before in a column (a sampling
/// point, a unit, a date). Pushing a string the VM holds costs less than hashing and
/// interning it again, and is the same value to the app: Luau strings are interned and
/// immutable. A value is held from its second record in a row (an empty one from its
/// first). At most [`KEPT_KEYS`] positions, keys and values of at most [`KEPT_BYTES`]
/// bytes, are kept.
#[derive(Default)]
pub struct RecordKeys(Vec<Kept>);

struct Kept {
    key: String,
    lua_key: LuaString,
    /// The record being converted has `key` at this position.
    key_now: bool,
    value: String,
    lua_value: Option<LuaString>,
    /// The record being converted has `value` at this position, held as `lua_value`.
    value_now: bool,
}

const KEPT_KEYS: usize = 64;
const KEPT_BYTES: usize = 64;

impl RecordKeys {
    /// Learns the keys and values of `record`, the one converted next.
    fn learn(&mut self, lua: &Lua, record: &Map<String, Json>) -> mlua::Result<()> {
        for (i, (k, v)) in record.iter().take(KEPT_KEYS).enumerate() {
            if i == self.0.len() {
                if k.len() > KEPT_BYTES {
                    // Positions past a key not kept are not kept either.
                    break;
                }
                self.0.push(Kept {
                    key: k.clone(),
                    lua_key: lua.create_string(k)?,
                    key_now: true,
                    value: String::new(),
                    lua_value: None,
                    value_now: false,
                });
            }
            let kept = &mut self.0[i];
            kept.key_now = kept.key == *k;
            if !kept.key_now && k.len() <= KEPT_BYTES {
                kept.lua_key = lua.create_string(k)?;
                kept.key.clone_from(k);
                kept.key_now = true;
            }
            kept.learn_value(lua, v)?;
        }
        Ok(())
    }

    /// The key at position `i`: the string the VM holds when it is the one kept.
    fn key<'a>(&'a self, i: usize, k: &'a str) -> Either<&'a LuaString, &'a str> {
        match self.0.get(i) {
            Some(kept) if kept.key_now => Either::Left(&kept.lua_key),
            _ => Either::Right(k),
        }
    }

    /// The value at position `i` as the string the VM holds, when it is held.
    fn value(&self, i: usize) -> Option<&LuaString> {
        let kept = self.0.get(i)?;
        kept.lua_value.as_ref().filter(|_| kept.value_now)
    }
}

impl Kept {
    fn learn_value(&mut self, lua: &Lua, v: &Json) -> mlua::Result<()> {
        self.value_now = false;
        match v {
            Json::String(s) if s.len() <= KEPT_BYTES => {
                if self.value != *s {
                    self.value.clone_from(s);
                    self.lua_value = None;
                    return Ok(());
                }
                if self.lua_value.is_none() {
                    self.lua_value = Some(lua.create_string(s)?);
                }
                self.value_now = true;
            }
            _ => {
                self.value.clear();
                self.lua_value = None;
            }
        }
        Ok(())
    }
}

/// A scalar as what is pushed for it: a string stays the host's `&str`.
fn scalar<'a>(lua: &Lua, v: &'a Json) -> Either<&'a str, Value> {
    Either::Right(match v {
        Json::String(s) => return Either::Left(s.as_str()),
        Json::Null => lua.null(),
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        // Not scalars: callers convert them with `pushable`.
        Json::Array(_) | Json::Object(_) => Value::Nil,
    })
}

/// A string stays the host's `&str` until it is pushed into its table (no reference to it
/// is taken); anything else becomes its Luau value, tables built with their items.
fn pushable<'a>(lua: &Lua, v: &'a Json) -> mlua::Result<Either<&'a str, Value>> {
    Ok(Either::Right(match v {
        Json::Array(items) => {
            let items = items
                .iter()
                .map(|item| pushable(lua, item))
                .collect::<mlua::Result<Vec<_>>>()?;
            let t = lua.create_sequence_from(items)?;
            t.set_metatable(Some(lua.array_metatable()))?;
            Value::Table(t)
        }
        Json::Object(m) => {
            let fields = m
                .iter()
                .map(|(k, item)| Ok((k.as_str(), pushable(lua, item)?)))
                .collect::<mlua::Result<Vec<_>>>()?;
            Value::Table(lua.create_table_from(fields)?)
        }
        other => return Ok(scalar(lua, other)),
    }))
}

/// Bytes of VM memory that converting `v` can allocate, at most: a string takes its bytes
/// and a header of under 32; a table slot, hash or array, 32 bytes, a table's part at most
/// twice its items (sizes are powers of two), its header under 64. Luau's allocation in
/// pages is not in it: the caller adds room for that.
pub fn lua_bytes_bound(v: &Json) -> usize {
    const STRING: usize = 32;
    const SLOT: usize = 2 * 32;
    const TABLE: usize = 64;
    match v {
        Json::Null | Json::Bool(_) | Json::Number(_) => 0,
        Json::String(s) => STRING + s.len(),
        Json::Array(items) => {
            TABLE
                + items
                    .iter()
                    .map(|i| SLOT + lua_bytes_bound(i))
                    .sum::<usize>()
        }
        Json::Object(m) => {
            TABLE
                + m.iter()
                    .map(|(k, i)| SLOT + STRING + k.len() + lua_bytes_bound(i))
                    .sum::<usize>()
        }
    }
}

/// Converts an app's value to JSON, charging `meter` for every value and byte as it goes.
pub fn lua_to_json(
    lua: &Lua,
    v: &Value,
    depth: usize,
    meter: &mut Meter,
) -> Result<Json, ConvertError> {
    to_json(lua, v, depth, meter, None)
}

/// [`lua_to_json`] for the documents an app returns call after call, its keys looked up in
/// `keys` and learnt there.
pub fn lua_to_json_keyed(
    lua: &Lua,
    v: &Value,
    depth: usize,
    meter: &mut Meter,
    keys: &mut OutputKeys,
) -> Result<Json, ConvertError> {
    to_json(lua, v, depth, meter, Some(keys))
}

fn to_json(
    lua: &Lua,
    v: &Value,
    depth: usize,
    meter: &mut Meter,
    keys: Option<&mut OutputKeys>,
) -> Result<Json, ConvertError> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!("nesting deeper than {MAX_DEPTH} levels")));
    }
    meter.value()?;
    Ok(match v {
        Value::Nil => {
            meter.charge(4)?;
            Json::Null
        }
        Value::LightUserData(p) if p.0.is_null() => {
            // the `null` sentinel
            meter.charge(4)?;
            Json::Null
        }
        Value::Boolean(b) => {
            meter.charge(if *b { 4 } else { 5 })?;
            Json::Bool(*b)
        }
        Value::Integer(i) => {
            meter.charge(int_len(*i))?;
            Json::Number((*i).into())
        }
        Value::Number(n) => {
            let n = number(*n)?;
            meter.charge(number_len(&n))?;
            Json::Number(n)
        }
        Value::String(s) => {
            let b = s.as_bytes();
            meter.charge(escaped_len(&b))?;
            let s = std::str::from_utf8(&b).map_err(|_| invalid("a string is not valid UTF-8"))?;
            Json::String(s.to_owned())
        }
        Value::Table(t) => table(lua, t, depth, meter, keys)?,
        Value::Buffer(b) => {
            // The lossy text is never shorter than the buffer: check before copying it out.
            meter.fits(b.len() + 2)?;
            let text = String::from_utf8_lossy(&b.to_vec()).into_owned();
            meter.charge(escaped_len(text.as_bytes()))?;
            Json::String(text)
        }
        other => return Err(invalid(format!("a {} cannot be stored", other.type_name()))),
    })
}

/// `Some(n)` when the table converts to a JSON array of `n` items: its keys are exactly
/// 1..n, and n > 0 or it carries the array metatable (an empty array made by `parse_json`).
pub fn array_len(lua: &Lua, t: &Table) -> mlua::Result<Option<usize>> {
    let len = t.raw_len();
    let array_mt = t.has_metatable() && t.metatable().is_some_and(|m| m == lua.array_metatable());
    if len == 0 && !array_mt {
        return Ok(None);
    }
    // Count the pairs without taking references to keys or values.
    let mut pairs = 0usize;
    t.for_each::<bool, bool>(|_, _| {
        pairs += 1;
        Ok(())
    })?;
    Ok((pairs == len).then_some(len))
}

fn table(
    lua: &Lua,
    t: &Table,
    depth: usize,
    meter: &mut Meter,
    mut keys: Option<&mut OutputKeys>,
) -> Result<Json, ConvertError> {
    if let Some(len) = array_len(lua, t).map_err(ConvertError::Lua)? {
        // Brackets and commas, then at least one byte per item: known before allocating.
        meter.charge(2 + len.saturating_sub(1))?;
        meter.fits(len)?;
        let mut out = Vec::with_capacity(len);
        for i in 1..=len {
            let v: Value = t.raw_get(i).map_err(ConvertError::Lua)?;
            out.push(to_json(lua, &v, depth + 1, meter, keys.as_deref_mut())?);
        }
        return Ok(Json::Array(out));
    }
    meter.charge(2)?;
    // Grown as members are charged: an empty table the app shares a million times must not
    // hold host memory a million times.
    let mut m = Map::new();
    let mut failed: Option<ConvertError> = None;
    let walked = t.for_each::<Value, Value>(|k, v| {
        let member = entry(lua, &k, &v, depth, meter, m.is_empty(), keys.as_deref_mut()).and_then(
            |(key, value)| match m.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                    Ok(())
                }
                // Only a number key and a string key can meet (`[1]` and `["1"]`): neither
                // is dropped in silence.
                serde_json::map::Entry::Occupied(o) => Err(invalid(format!(
                    "key `{}` appears twice (as a number and as a string)",
                    o.key().chars().take(64).collect::<String>()
                ))),
            },
        );
        match member {
            Ok(()) => Ok(()),
            Err(e) => {
                failed = Some(e);
                // Stops the walk; the reason is in `failed`.
                Err(mlua::Error::runtime("conversion stopped"))
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked.map_err(ConvertError::Lua)?;
    Ok(Json::Object(m))
}

/// The keys of the documents an app returned before, by the identity of their Luau
/// strings: an app's documents carry the same keys call after call (constants of its code,
/// or the keys of the record it was given), and a key found here is taken as it was read the
/// first time (its text, its length in JSON, its check) without reading it out of the VM
/// again. Each string is held while it is here, so its address stays its own (Luau does not
/// move objects). At most [`KEPT_KEYS`] keys of at most [`KEPT_BYTES`] bytes; when full, it
/// starts over.
#[derive(Default)]
pub struct OutputKeys {
    keys: Vec<OutputKey>,
    /// Where a key is looked for first: after the last one found.
    next: usize,
}

struct OutputKey {
    /// The string's address while it is held.
    at: usize,
    _held: LuaString,
    text: String,
    /// Bytes of `"text":` in JSON.
    json_len: usize,
}

impl OutputKeys {
    fn find(&mut self, at: usize) -> Option<&OutputKey> {
        let n = self.keys.len();
        let i = (0..n)
            .map(|j| (self.next + j) % n)
            .find(|&i| self.keys[i].at == at)?;
        self.next = i + 1;
        Some(&self.keys[i])
    }

    fn learn(&mut self, at: usize, s: &LuaString, text: &str, json_len: usize) {
        if text.len() > KEPT_BYTES {
            return;
        }
        if self.keys.len() == KEPT_KEYS {
            self.keys.clear();
            self.next = 0;
        }
        self.keys.push(OutputKey {
            at,
            _held: s.clone(),
            text: text.to_owned(),
            json_len,
        });
    }
}

/// One object member: its key (charged with the quotes, colon and separating comma) and value.
fn entry(
    lua: &Lua,
    k: &Value,
    v: &Value,
    depth: usize,
    meter: &mut Meter,
    first: bool,
    mut keys: Option<&mut OutputKeys>,
) -> Result<(String, Json), ConvertError> {
    let comma = usize::from(!first);
    let key = match (k, keys.as_deref_mut()) {
        (Value::String(s), Some(known)) => {
            let at = s.to_pointer() as usize;
            if let Some(key) = known.find(at) {
                meter.charge(key.json_len + comma)?;
                key.text.clone()
            } else {
                // Checked before it is learnt: a key found is never checked again.
                let text = string_key(s, meter, comma)?;
                known.learn(at, s, &text, escaped_len(text.as_bytes()) + 1);
                text
            }
        }
        (Value::String(s), None) => string_key(s, meter, comma)?,
        (Value::Integer(i), _) => {
            meter.charge(int_len(*i) + 3 + comma)?;
            i.to_string()
        }
        // A whole number is an `Integer` up to ±2^63 (its exact value, as a value would be
        // stored); a `Number` here is a fraction, past ±2^63 (where a cast would saturate to
        // i64::MAX), or -0.
        (Value::Number(n), _) if *n == 0.0 => {
            meter.charge(1 + 3 + comma)?;
            "0".to_owned()
        }
        (Value::Number(n), _) => {
            return Err(invalid(format!(
                "a number key must be a whole number within ±2^63, not {n}"
            )));
        }
        (other, _) => {
            return Err(invalid(format!(
                "a {} cannot be a document key",
                other.type_name()
            )));
        }
    };
    let value = to_json(lua, v, depth + 1, meter, keys)?;
    Ok((key, value))
}

/// A string key's text, charged as `"key":` and its separating comma, and checked.
fn string_key(s: &LuaString, meter: &mut Meter, comma: usize) -> Result<String, ConvertError> {
    let b = s.as_bytes();
    meter.charge(escaped_len(&b) + 1 + comma)?;
    let key = std::str::from_utf8(&b).map_err(|_| invalid("a key is not valid UTF-8"))?;
    if key.starts_with('$') || key.contains('\0') {
        return Err(invalid(format!(
            "key `{}` is not allowed (starts with `$` or holds NUL)",
            key.chars().take(64).collect::<String>()
        )));
    }
    Ok(key.to_owned())
}

fn number(n: f64) -> Result<Number, ConvertError> {
    if !n.is_finite() {
        return Err(invalid(format!("{n} is not a JSON number")));
    }
    if n.fract() == 0.0 && n.abs() < MAX_SAFE_INT {
        return Ok((n as i64).into());
    }
    Number::from_f64(n).ok_or_else(|| invalid(format!("{n} is not a JSON number")))
}

/// Length of `i` written in decimal.
fn int_len(i: i64) -> usize {
    let mut n = i.unsigned_abs();
    let mut len = usize::from(i < 0) + 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

struct Count(usize);

impl std::fmt::Write for Count {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// Length of a number as serde_json writes it.
fn number_len(n: &Number) -> usize {
    if let Some(i) = n.as_i64() {
        return int_len(i);
    }
    let mut c = Count(0);
    let _ = write!(c, "{n}");
    c.0
}

/// Length of `b` as a JSON string, quotes included, escaped as serde_json escapes it.
pub fn escaped_len(b: &[u8]) -> usize {
    let extra: usize = b
        .iter()
        .map(|&c| match c {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0a | 0x0c | 0x0d => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    b.len() + 2 + extra
}

/// Parses JSON text straight into Luau values, without building it on the host first: what
/// the text makes is allocated inside the VM, under its memory limit, as it is read.
/// `check` is called every few thousand values (the host's look at the time limit).
pub fn json_text_to_lua(
    lua: &Lua,
    text: &[u8],
    check: &dyn Fn() -> mlua::Result<()>,
) -> mlua::Result<Value> {
    let state = ParseState {
        lua,
        check,
        failed: std::cell::RefCell::new(None),
        values: std::cell::Cell::new(0),
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    let parsed = serde::de::DeserializeSeed::deserialize(LuaSeed(&state), &mut de)
        .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => Ok(v),
        Err(e) => Err(state
            .failed
            .borrow_mut()
            .take()
            .unwrap_or_else(|| mlua::Error::runtime(format!("parse_json: {e}")))),
    }
}

const VALUES_PER_CHECK: usize = 4096;

struct ParseState<'a> {
    lua: &'a Lua,
    check: &'a dyn Fn() -> mlua::Result<()>,
    /// The VM's own error (out of memory, a limit), returned as it is rather than as text.
    failed: std::cell::RefCell<Option<mlua::Error>>,
    values: std::cell::Cell<usize>,
}

impl ParseState<'_> {
    fn vm<T, E: serde::de::Error>(&self, r: mlua::Result<T>) -> Result<T, E> {
        r.map_err(|e| {
            let msg = e.to_string();
            *self.failed.borrow_mut() = Some(e);
            E::custom(msg)
        })
    }

    fn count<E: serde::de::Error>(&self) -> Result<(), E> {
        let n = self.values.get() + 1;
        self.values.set(n);
        if n % VALUES_PER_CHECK == 0 {
            self.vm((self.check)())?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct LuaSeed<'s, 'a>(&'s ParseState<'a>);

impl<'de> serde::de::DeserializeSeed<'de> for LuaSeed<'_, '_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for LuaSeed<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.count()?;
        Ok(Value::Boolean(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.count()?;
        Ok(Value::Number(v as f64))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.count()?;
        Ok(Value::Number(v as f64))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.count()?;
        Ok(Value::Number(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.count()?;
        self.0.vm(self.0.lua.create_string(v).map(Value::String))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.0.count()?;
        Ok(self.0.lua.null())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.count()?;
        let lua = self.0.lua;
        let t = self.0.vm(lua.create_table())?;
        let mut i = 0usize;
        while let Some(v) = seq.next_element_seed(self)? {
            i += 1;
            self.0.vm(t.raw_set(i, v))?;
        }
        self.0.vm(t.set_metatable(Some(lua.array_metatable())))?;
        Ok(Value::Table(t))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.count()?;
        let t = self.0.vm(self.0.lua.create_table())?;
        while let Some(k) = map.next_key_seed(self)? {
            let v = map.next_value_seed(self)?;
            self.0.vm(t.raw_set(k, v))?;
        }
        Ok(Value::Table(t))
    }
}
