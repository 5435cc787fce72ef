//! Guards around the built-ins that could do unbounded work, or let an app carry on past a
//! limit, where no interrupt fires. Installed before `sandbox(true)` freezes the libraries, so
//! the `string` table (which is also the string metatable's `__index`, for `s:find(...)`) and
//! the globals hold the guarded versions only.
//!
//! What Luau itself bounds, measured in `apps::tests` rather than assumed: pattern matching
//! (`find`/`match`/`gmatch`/`gsub` with patterns) calls the interrupt on every step of its
//! backtracking, so the time limit stops it; everything that allocates is bounded by the
//! memory limit. What it does not bound, and is guarded here:
//! - plain `string.find` (and `find` with a pattern that has no special characters) and
//!   `string.split` compare the needle at every position: quadratic, in C, with no interrupt.
//!   Large cases run in Rust in linear time instead;
//! - `table.move` walks every index of its range even when the table is empty (Luau's fix is
//!   behind a flag that is off), so `table.move({}, 1, 2^30, 2^30 + 1)` runs for minutes: a
//!   range longer than the memory limit could ever hold is refused as over that limit;
//! - `pcall`/`xpcall` would turn a limit error into a normal return: they re-raise it.

use std::sync::Arc;

use mlua::{Function, Lua, MultiValue, Table, Value};

use super::budget::{Budget, Limit};

/// Below this many byte comparisons (worst case), a search runs in Luau's own C code.
const NAIVE_WORK: usize = 1 << 22;
/// How many split pieces between two looks at the clock.
const PIECES_PER_CHECK: usize = 4096;

const WRAPPERS: &str = r#"
local guard, refuse_move, max_move = ...
local raw_pcall, raw_xpcall, raw_move = pcall, xpcall, table.move
local function after(ok, ...)
    guard(ok, (...))
    return ok, ...
end
pcall = function(f, ...)
    return after(raw_pcall(f, ...))
end
xpcall = function(f, handler, ...)
    return after(raw_xpcall(f, handler, ...))
end
table.move = function(a1, f, e, t, a2)
    local first, last = tonumber(f), tonumber(e)
    if first and last and last - first >= max_move then
        refuse_move(last - first + 1)
    end
    return raw_move(a1, f, e, t, a2)
end
"#;

/// Replaces the unbounded built-ins. `budget` is the VM's per-call budget.
pub(super) fn install(lua: &Lua, budget: &Arc<Budget>, memory_bytes: usize) -> mlua::Result<()> {
    let b = budget.clone();
    let guard = lua.create_function(move |_, (ok, err): (bool, Value)| {
        if !ok && is_memory_error(&err) {
            b.trip(Limit::Memory);
        }
        b.check_hit()
    })?;
    let b = budget.clone();
    let refuse_move = lua.create_function(move |_, n: f64| -> mlua::Result<()> {
        b.trip(Limit::Memory);
        Err(mlua::Error::runtime(format!(
            "table.move of {n} elements: more than the memory limit can hold"
        )))
    })?;
    // A Luau array slot takes 16 bytes: a longer range could never be filled.
    let max_move = (memory_bytes / 16).max(1) as f64;
    lua.load(WRAPPERS)
        .set_name("=host")
        .call::<()>((guard, refuse_move, max_move))?;

    let string: Table = lua.globals().raw_get("string")?;
    let find: Function = string.raw_get("find")?;
    let b = budget.clone();
    string.raw_set(
        "find",
        lua.create_function(move |_, args: MultiValue| plain_find(&b, &find, args))?,
    )?;
    let split: Function = string.raw_get("split")?;
    let b = budget.clone();
    string.raw_set(
        "split",
        lua.create_function(move |lua, args: MultiValue| split_large(lua, &b, &split, args))?,
    )?;
    Ok(())
}

/// A memory error as `pcall` hands it over: Luau's message, or mlua's error from a host call.
fn is_memory_error(v: &Value) -> bool {
    match v {
        Value::String(s) => s.as_bytes().starts_with(b"not enough memory"),
        Value::Error(e) => {
            let mut root: &mlua::Error = e;
            while let mlua::Error::CallbackError { cause, .. } = root {
                root = cause;
            }
            matches!(root, mlua::Error::MemoryError(_))
        }
        _ => false,
    }
}

/// `string.find`: a plain search that could take long runs in linear time here; everything
/// else (patterns, small searches, odd arguments) goes to Luau's own function.
fn plain_find(budget: &Budget, find: &Function, args: MultiValue) -> mlua::Result<MultiValue> {
    budget.check_hit()?;
    let (s, p) = match (args.front(), args.get(1)) {
        (Some(Value::String(s)), Some(Value::String(p))) => (s.as_bytes(), p.as_bytes()),
        _ => return find.call(args),
    };
    let plain = args
        .get(3)
        .is_some_and(|v| !matches!(v, Value::Nil | Value::Boolean(false)));
    const SPECIALS: &[u8] = b"^$*+?.([%-";
    if !plain && p.iter().any(|c| SPECIALS.contains(c)) {
        return find.call(args);
    }
    let init = match args.get(2) {
        None | Some(Value::Nil) => 1,
        Some(Value::Integer(i)) => *i,
        Some(Value::Number(n)) if n.is_finite() => *n as i64,
        _ => return find.call(args),
    };
    let from = usize::try_from(init_offset(s.len(), init)).unwrap_or(usize::MAX);
    if s.len().saturating_sub(from).saturating_mul(p.len()) <= NAIVE_WORK {
        drop((s, p));
        return find.call(args);
    }
    Ok(match find_plain(&s, &p, init) {
        Some((start, end)) => MultiValue::from_iter([Value::Integer(start), Value::Integer(end)]),
        None => MultiValue::from_iter([Value::Nil]),
    })
}

/// Where a search from Lua position `init` starts, as a byte offset (past the end: none).
fn init_offset(len: usize, init: i64) -> i64 {
    let len = len as i64;
    let init = if init < 0 { init + len + 1 } else { init };
    if init > len + 1 { -1 } else { init.max(1) - 1 }
}

/// `string.find(s, p, init, true)` as Luau answers it: the 1-based first and last positions.
pub(super) fn find_plain(s: &[u8], p: &[u8], init: i64) -> Option<(i64, i64)> {
    let from = usize::try_from(init_offset(s.len(), init)).ok()?;
    find_bytes(s, p, from).map(|at| (at as i64 + 1, (at + p.len()) as i64))
}

/// `string.split`: a separator of two bytes or more over a long string is split here, in
/// linear time; the rest goes to Luau's own function.
fn split_large(
    lua: &Lua,
    budget: &Budget,
    split: &Function,
    args: MultiValue,
) -> mlua::Result<Table> {
    budget.check_hit()?;
    let (s, sep) = match (args.front(), args.get(1)) {
        (Some(Value::String(s)), Some(Value::String(sep))) => (s.as_bytes(), sep.as_bytes()),
        _ => return split.call(args),
    };
    if sep.len() < 2 || s.len().saturating_mul(sep.len()) <= NAIVE_WORK {
        drop((s, sep));
        return split.call(args);
    }
    let out = lua.create_table()?;
    let mut start = 0;
    let mut pieces = 0usize;
    while let Some(at) = find_bytes(&s, &sep, start) {
        out.raw_push(lua.create_string(&s[start..at])?)?;
        start = at + sep.len();
        pieces += 1;
        if pieces % PIECES_PER_CHECK == 0 {
            budget.check()?;
        }
    }
    out.raw_push(lua.create_string(&s[start..])?)?;
    Ok(out)
}

const P: u64 = (1 << 61) - 1;

fn mul_mod(a: u64, b: u64) -> u64 {
    let x = u128::from(a) * u128::from(b);
    let r = ((x as u64) & P) + ((x >> 61) as u64);
    let r = (r & P) + (r >> 61);
    if r >= P { r - P } else { r }
}

/// The first occurrence of `needle` in `hay` at or after `from`, in time linear in their
/// lengths whatever the input (Rabin-Karp with a random base; each candidate is compared).
pub fn find_bytes(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let m = needle.len();
    if from > hay.len() {
        return None;
    }
    if m == 0 {
        return Some(from);
    }
    if hay.len() - from < m {
        return None;
    }
    if m <= 8 {
        return hay[from..]
            .windows(m)
            .position(|w| w == needle)
            .map(|i| i + from);
    }
    let base = rand::random::<u64>() % (P - 512) + 256;
    let mut top = 1u64; // base^(m-1)
    for _ in 1..m {
        top = mul_mod(top, base);
    }
    let hash = |w: &[u8]| {
        w.iter()
            .fold(0u64, |h, &c| (mul_mod(h, base) + u64::from(c)) % P)
    };
    let want = hash(needle);
    let mut h = hash(&hay[from..from + m]);
    let mut i = from;
    loop {
        if h == want && &hay[i..i + m] == needle {
            return Some(i);
        }
        if i + m >= hay.len() {
            return None;
        }
        // Drop hay[i], take hay[i + m].
        let out = mul_mod(u64::from(hay[i]), top);
        h = (h + P - out) % P;
        h = (mul_mod(h, base) + u64::from(hay[i + m])) % P;
        i += 1;
    }
}
