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
//! Conversions (Luau numbers are doubles): a whole number within ±2^63 is stored as a 64-bit
//! integer, the double's exact value (beyond ±2^53 a double holds only some integers, so it
//! may not be the one the app computed), any other number as a double; NaN and
//! infinities are rejected; a table with keys exactly 1..n (or made by `parse_json` from an
//! array) is an array, any other table an object with string keys (a whole-number key within
//! ±2^63 becomes its decimal text, any other number key fails the record, as does a number
//! key meeting a string key of the same text); an empty table is `{}`;
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
//!
//! Modules, each using only those before it: `convert` (Luau values and JSON), `budget`
//! (limits and the CPU clock), `builtins` (bounded string built-ins), `host` (the host API),
//! `vm` (one limited Luau state), `compile` (validating an upload), `handle` (an app
//! version's VM pool and its calls).

mod budget;
mod builtins;
mod compile;
mod convert;
mod handle;
mod host;
mod vm;

pub use builtins::find_bytes;
pub use compile::{CompileError, Compiled, MAX_SOURCE_BYTES, Shape, compile};
pub use convert::{ConvertError, Exceeded, Meter, json_to_lua, lua_to_json};
pub use handle::{AppHandle, Call};
pub use vm::{AppFailure, Emitted, Outcome};

#[cfg(test)]
mod tests;
