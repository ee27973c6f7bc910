//! A tidy test: the modules of tools/ import each other without a cycle.
//!
//! Each `src/NAME.rs` is a node; a path `crate::X` (in a `use`, a `use crate::{X, ..}` group or
//! inline) outside comments and the file's test module is an edge to `X`, or to the crate root
//! (`main`) when `X` is not a module. The root declares every module, so it counts as depending
//! on all of them: a module that uses an item of `main.rs` closes a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name → the modules its non-test code names.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("reading src/") {
        let path = entry.expect("listing src/").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            files.insert(name, std::fs::read_to_string(&path).expect("reading a module"));
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut out = BTreeMap::new();
    for (name, text) in &files {
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let code: String =
            code.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
        let mut deps = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let targets: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(|t| t.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![rest
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or("")],
            };
            for t in targets.into_iter().filter(|t| !t.is_empty()) {
                let to = if modules.contains(t) { t } else { "main" };
                if to != name {
                    deps.insert(to.to_string());
                }
            }
        }
        if name == "main" {
            deps.extend(modules.iter().filter(|m| *m != "main").cloned());
        }
        out.insert(name.clone(), deps);
    }
    out
}

/// A cycle in `g`, as the path around it, if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // 0: unvisited, 1: on the current path, 2: done.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            match state.get(d.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == d).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(d.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(d, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn tools_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(g.len() > 10, "found only {:?}", g.keys());
    assert!(g["rpc"].contains("volumes"), "the scan sees `crate::volumes::METHODS`");
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle in tools/src: {}", cycle.join(" -> "));
    }
    // The shared state depends on no method module.
    for leaf in ["control", "registry"] {
        for m in ["rpc", "rpc_bdev", "rpc_export", "rpc_nvmf", "volumes", "metrics", "serve"] {
            assert!(!g[leaf].contains(m), "{leaf} imports {m}");
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c")])), None);
    let c = find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).unwrap();
    assert_eq!(c.first(), c.last());
    assert_eq!(c.len(), 4);
}
