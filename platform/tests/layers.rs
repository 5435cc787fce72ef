//! The layers of the library, checked over its source: which top-level module may import
//! which. No servers needed.
//!
//! The graph is built from every `crate::<name>` path in `platform/src` (comments left out),
//! plus the crate root's own `<module>::` paths; an item of the crate root (such as
//! `crate::Platform`) counts as the module `lib`. A module's sub-modules count as the module.
//! Every edge must point to a strictly lower layer of [`LAYERS`], so no two modules import
//! each other, directly or around a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The allowed order, bottom-up. A module may import only modules of lower layers.
const LAYERS: &[(&str, &[&str])] = &[
    ("configuration; the allocator", &["config", "memory"]),
    (
        "vocabulary: tenant names, log entries, counters",
        &["tenants", "logs", "metrics"],
    ),
    (
        "the stored model; the servers; the HTTP edge (auth, errors, limits)",
        &["model", "infra", "http"],
    ),
    (
        "the HTTP API's wire types, shared by the handlers and the client",
        &["api"],
    ),
    (
        "storage, the pure apps runtime, ingestion events, the HTTP client",
        &["coredms", "apps", "events", "client"],
    ),
    (
        "the ingestion pipeline shared by batch and stream; local processes (through the client)",
        &["pipeline", "processes"],
    ),
    ("the components", &["batch", "stream"]),
    (
        "the API document, from the components' handlers and types",
        &["openapi"],
    ),
    ("the process that assembles what it runs", &["lib"]),
    (
        "the platform in one process, and faults done to its servers, for tests and the workbench",
        &["testing"],
    ),
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to, or `None` for binaries (a separate crate).
fn module_of(file: &Path, src: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    if first == "bin" {
        return None;
    }
    Some(first.strip_suffix(".rs").unwrap_or(&first).to_owned())
}

/// The code of a file without `//` comments (doc links are not imports).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segments of the paths `prefix` starts in `code`, including grouped imports
/// (`crate::{a::X, b}` names `a` and `b`).
fn first_segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start => {
                        out.insert(ident_at(&group[i..]).to_owned());
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident_at(rest).to_owned());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// module → the modules it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f, &src)).collect();
    assert!(modules.contains("lib"), "no lib.rs under {}", src.display());
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(file, &src) else {
            continue;
        };
        let text = code(&std::fs::read_to_string(file).expect("read source"));
        let mut names = first_segments(&text, "crate::");
        if from == "lib" {
            // The crate root names its modules without `crate::`.
            for m in &modules {
                if text.contains(&format!("{m}::"))
                    && !first_segments(&text, &format!("{m}::")).is_empty()
                {
                    names.insert(m.clone());
                }
            }
        }
        let deps = g.entry(from.clone()).or_default();
        for name in names {
            let to = if modules.contains(&name) {
                name
            } else {
                "lib".to_owned()
            };
            if to != from {
                deps.insert(to);
            }
        }
    }
    g
}

/// Whether `to` can be reached from `from` along the edges of `g`.
fn reaches(g: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_owned()];
    while let Some(m) = todo.pop() {
        if m == to {
            return true;
        }
        if seen.insert(m.clone()) {
            todo.extend(g.get(&m).into_iter().flatten().cloned());
        }
    }
    false
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

#[test]
fn every_module_has_a_layer() {
    let g = graph();
    let missing: Vec<&String> = g.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        missing.is_empty(),
        "modules with no layer in tests/layers.rs: {missing:?}"
    );
    let listed: Vec<&str> = LAYERS
        .iter()
        .flat_map(|(_, ms)| ms.iter().copied())
        .collect();
    let gone: Vec<&&str> = listed.iter().filter(|m| !g.contains_key(**m)).collect();
    assert!(
        gone.is_empty(),
        "layers name modules that no longer exist: {gone:?}"
    );
}

#[test]
fn modules_import_only_lower_layers_and_never_each_other() {
    let g = graph();
    let mut wrong = Vec::new();
    for (from, deps) in &g {
        for to in deps {
            match (layer_of(from), layer_of(to)) {
                (Some(a), Some(b)) if b < a => {}
                _ => wrong.push(format!("{from} -> {to}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that do not point to a lower layer (see LAYERS): {wrong:?}"
    );
    // Implied by the layers, and said plainly: no module reaches itself.
    for (m, deps) in &g {
        for d in deps {
            assert!(!reaches(&g, d, m), "cycle: {m} -> {d} -> ... -> {m}");
        }
    }
}

#[test]
fn the_scanner_sees_plain_grouped_and_root_paths() {
    let text = code(
        "use crate::model::X;\nuse crate::{apps::Y, tenants};\n// crate::batch in a comment\nlet p: crate::Platform;",
    );
    let found = first_segments(&text, "crate::");
    let want: BTreeSet<String> = ["model", "apps", "tenants", "Platform"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
    // The real graph has the edges this file's layers are about.
    let g = graph();
    assert!(g["pipeline"].contains("apps"), "{:?}", g["pipeline"]);
    assert!(g["batch"].contains("pipeline"), "{:?}", g["batch"]);
    assert!(g["lib"].contains("batch"), "{:?}", g["lib"]);
}

/// The modules of `apps`, bottom-up: each may import (`super::<module>`) only those before it.
const APPS_ORDER: &[&str] = &[
    "convert", "budget", "builtins", "host", "vm", "compile", "handle",
];

#[test]
fn apps_submodules_import_only_those_before_them() {
    let dir = src_dir().join("apps");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for file in &files {
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name");
        if name == "mod" || name == "tests" {
            continue;
        }
        let at = APPS_ORDER
            .iter()
            .position(|m| *m == name)
            .unwrap_or_else(|| panic!("apps/{name}.rs has no place in APPS_ORDER"));
        seen.insert(name.to_owned());
        let text = code(&std::fs::read_to_string(file).expect("read source"));
        for dep in first_segments(&text, "super::") {
            match APPS_ORDER.iter().position(|m| *m == dep) {
                Some(b) if b < at => {}
                _ => wrong.push(format!("{name} -> {dep}")),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "apps imports that do not name an earlier module of APPS_ORDER: {wrong:?}"
    );
    let listed: BTreeSet<String> = APPS_ORDER.iter().map(|m| m.to_string()).collect();
    assert_eq!(seen, listed, "APPS_ORDER and the files of apps/ differ");
}
