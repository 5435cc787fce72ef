//! Compiling an uploaded app on the host and validating what it defines.

use std::sync::Arc;

use super::vm::Vm;
use crate::config::AppLimits;

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

/// The functions an app defines, found when it is validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub has_map: bool,
    pub has_ingest: bool,
}

/// An app compiled and validated on the host.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub(super) bytecode: Arc<Vec<u8>>,
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
