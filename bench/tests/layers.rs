//! No module imports a module that imports it back, and each imports only the layers below
//! its own. A module's imports are the `crate::<module>` paths in its files (`use` lines and
//! paths in code alike; comments left out), read as text, so the check works for any crate
//! of the workspace: give [`check_layers`] its `src` folder and its layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workbench's layers, bottom-up: a module may import the modules of the layers below
/// its own, never one of its layer or above.
const BENCH: &[&[&str]] = &[
    &["schema", "host", "progress"],
    &["dataset", "accounting"],
    &["report", "deploy"],
    &["load", "ceiling", "faults", "cost", "replicas"],
    &["run"],
];

/// A crate's top-level modules (a file `x.rs` or a folder `x/` under `src`), each with the
/// other top-level modules it names as `crate::<module>`. The crate root (`lib.rs`,
/// `main.rs`) and `bin/` are left out: the root declares every module; so is a module's use
/// of an item the root defines (`crate::Thing`), which this check does not see.
pub fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let entries = std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 file name")
            .to_owned();
        let files = if path.is_dir() {
            if name == "bin" {
                continue;
            }
            rust_files(&path)
        } else if path.extension().is_some_and(|x| x == "rs") {
            if name == "lib" || name == "main" {
                continue;
            }
            vec![path]
        } else {
            continue;
        };
        let refs = graph.entry(name.clone()).or_default();
        for f in files {
            let text =
                std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            refs.extend(crate_refs(&text).into_iter().filter(|m| *m != name));
        }
    }
    // Only modules: `crate::Thing` defined or re-exported by the root is left out.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for refs in graph.values_mut() {
        refs.retain(|r| modules.contains(r));
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    out
}

/// The first segment of every `crate::` path: `crate::a::B`, `crate::{a, b::{C, D}}`.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().next_back();
            let after = &rest[i + "crate::".len()..];
            rest = after;
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue; // `mycrate::`, `$crate::`
            }
            if let Some(group) = after.strip_prefix('{') {
                // Top-level items of the group, up to its closing brace.
                let (mut depth, mut item_start) = (0usize, true);
                for (k, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && !c.is_whitespace() => {
                            item_start = false;
                            out.insert(ident(&group[k..]));
                        }
                        _ => {}
                    }
                }
            } else {
                out.insert(ident(after));
            }
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// The groups of modules that import each other, directly or through others: each group a
/// cycle, with the imports that close it (`a -> b`).
pub fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for n in graph.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for (m, r) in &reaches {
        if done.contains(*m) || !r.contains(*m) {
            continue;
        }
        let group: BTreeSet<&String> = reaches
            .iter()
            .filter(|(n, rn)| rn.contains(*m) && r.contains(**n))
            .map(|(n, _)| *n)
            .collect();
        let mut edges = Vec::new();
        for a in &group {
            for b in graph[*a].iter().filter(|b| group.contains(b)) {
                edges.push(format!("{a} -> {b}"));
            }
        }
        done.extend(group.into_iter().cloned());
        out.push(edges);
    }
    out
}

/// What breaks the layering of the crate under `src` (`layers` bottom-up): a cycle, a
/// module importing one of its own layer or above, a module no layer names, a layer's name
/// that is no module. Empty when the crate keeps its layers.
pub fn check_layers(src: &Path, layers: &[&[&str]]) -> Vec<String> {
    let graph = imports(src);
    let mut problems: Vec<String> = cycles(&graph)
        .into_iter()
        .map(|c| format!("cycle: {}", c.join(", ")))
        .collect();
    let layer_of = |m: &str| layers.iter().position(|l| l.contains(&m));
    for (m, refs) in &graph {
        let Some(lm) = layer_of(m) else {
            problems.push(format!("`{m}` is in no layer: place it in the order"));
            continue;
        };
        for r in refs {
            if let Some(lr) = layer_of(r).filter(|lr| *lr >= lm) {
                problems.push(format!(
                    "`{m}` (layer {}) imports `{r}` (layer {}): only lower layers may be imported",
                    lm + 1,
                    lr + 1
                ));
            }
        }
    }
    for m in layers.iter().flat_map(|l| l.iter()) {
        if !graph.contains_key(*m) {
            problems.push(format!("`{m}` is named in the layers but is no module"));
        }
    }
    problems
}

#[test]
fn the_workbench_keeps_its_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = check_layers(&src, BENCH);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_finds_cycles_and_imports_against_the_layers() {
    let dir = std::env::temp_dir().join(format!("mysimbdp-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).expect("dir");
    let write = |p: &str, text: &str| std::fs::write(dir.join(p), text).expect("write");
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\n");
    write("a.rs", "use crate::b::Thing;\n// crate::d in a comment\n");
    write("b/mod.rs", "mod inner;\nfn f() { crate::a::g() }\n");
    write(
        "b/inner.rs",
        "use crate::{c::{X, Y}, self as me};\nmacro_rules! m { () => { $crate::d::z() } }\n",
    );
    write(
        "c.rs",
        "pub struct X;\npub struct Y;\nfn h() { crate::c::X; }\n",
    );
    write("d.rs", "use mycrate::a;\nuse crate::Root;\n");

    let graph = imports(&dir);
    let names = |m: &str| graph[m].iter().cloned().collect::<Vec<_>>();
    assert_eq!(names("a"), ["b"], "comments do not count");
    assert_eq!(
        names("b"),
        ["a", "c"],
        "a folder is one module; groups count"
    );
    assert!(
        names("c").is_empty(),
        "a module naming itself imports nothing"
    );
    assert!(
        names("d").is_empty(),
        "`mycrate::`, `$crate::` and root items are no module's"
    );
    assert_eq!(cycles(&graph), [["a -> b", "b -> a"]]);

    // `b` may import `c`, a layer below it.
    let problems = check_layers(&dir, &[&["c"], &["a", "b"], &["gone"]]);
    assert_eq!(
        problems,
        [
            "cycle: a -> b, b -> a",
            "`a` (layer 2) imports `b` (layer 2): only lower layers may be imported",
            "`b` (layer 2) imports `a` (layer 2): only lower layers may be imported",
            "`d` is in no layer: place it in the order",
            "`gone` is named in the layers but is no module",
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
