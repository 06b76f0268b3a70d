//! The layout docs/architecture.md describes, checked: no import cycle among the modules of
//! any crate, fam-core (the plugin API) holds no application code, and plugins link only
//! fam-core and their own libraries, never the application.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::util::root;
use fam_core::toml;

/// `src/` of every workspace member.
fn crates() -> Vec<(String, PathBuf)> {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let dir = root().join(m.as_str().unwrap());
            let name = package(&dir)["package"]["name"]
                .as_str()
                .unwrap()
                .to_string();
            (name, dir)
        })
        .collect()
}

fn package(dir: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap()
}

/// Module path of a source file: `src/lib.rs` → ``, `src/a.rs` and `src/a/mod.rs` → `a`,
/// `src/a/b.rs` → `a::b`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments, string contents and its `#[cfg(test)] mod tests`
/// (tests may use anything). Macro bodies' `$crate::` paths are not imports of the module
/// that defines the macro: they expand in the caller.
fn code(text: &str) -> String {
    let text = [
        "#[cfg(test)]\nmod tests",
        "#[cfg(test)]\npub(crate) mod tests",
        "#[cfg(test)]\npub mod tests",
    ]
    .iter()
    .filter_map(|m| text.find(m))
    .min()
    .map_or(text, |i| &text[..i]);
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("$crate::", "")
}

/// The modules a piece of code names through `crate::`, `super::` or a child module.
fn references(code: &str, module: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let resolve = |path: Vec<String>| -> String {
        // The longest prefix of `path` that is a module (else the crate root).
        (0..=path.len())
            .rev()
            .map(|n| path[..n].join("::"))
            .find(|m| modules.contains(m))
            .unwrap_or_default()
    };
    let bytes = code.as_bytes();
    let ident = |i: usize| -> (String, usize) {
        let mut j = i;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        (code[i..j].to_string(), j)
    };
    // Reads `a::b::{c::d, e}` after a prefix, giving every path in it.
    fn paths(code: &str, mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
        let b = code.as_bytes();
        let mut path = prefix;
        loop {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && b[i] == b'{' {
                i += 1;
                loop {
                    i = paths(code, i, path.clone(), out);
                    while i < b.len() && b[i].is_ascii_whitespace() {
                        i += 1;
                    }
                    if i < b.len() && b[i] == b',' {
                        i += 1;
                        continue;
                    }
                    if i < b.len() && b[i] == b'}' {
                        i += 1;
                    }
                    return i;
                }
            }
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            if s == i {
                out.push(path);
                return i;
            }
            path.push(code[s..i].to_string());
            if code[i..].starts_with("::") {
                i += 2;
            } else {
                out.push(path);
                return i;
            }
        }
    }
    let here: Vec<String> = if module.is_empty() {
        vec![]
    } else {
        module.split("::").map(String::from).collect()
    };
    let children: BTreeSet<String> = modules
        .iter()
        .filter_map(|m| {
            let rest = if module.is_empty() {
                Some(m.as_str())
            } else {
                m.strip_prefix(&format!("{module}::"))
            }?;
            (!rest.is_empty() && !rest.contains("::")).then(|| rest.to_string())
        })
        .collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        if !starts_word || !(bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
            i += 1;
            continue;
        }
        let (word, j) = ident(i);
        if !code[j..].starts_with("::") {
            i = j;
            continue;
        }
        let base: Option<Vec<String>> = match word.as_str() {
            "crate" => Some(vec![]),
            "super" => Some(here[..here.len().saturating_sub(1)].to_vec()),
            "self" => Some(here.clone()),
            w if children.contains(w) => {
                let mut p = here.clone();
                p.push(w.to_string());
                // `child::x`: read from the child's name.
                let mut found = Vec::new();
                let end = paths(code, j + 2, p, &mut found);
                for f in found {
                    out.insert(resolve(f));
                }
                i = end;
                continue;
            }
            _ => None,
        };
        if let Some(base) = base {
            let mut found = Vec::new();
            let end = paths(code, j + 2, base, &mut found);
            for f in found {
                out.insert(resolve(f));
            }
            i = end;
        } else {
            i = j;
        }
    }
    out.remove(module);
    out
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn module_graph(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let src = dir.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // Binaries under src/bin are crates of their own; examples are not under src.
    files.retain(|f| !f.strip_prefix(&src).unwrap().starts_with("bin"));
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    files
        .iter()
        .map(|f| {
            let m = module_of(&src, f);
            let text = code(&std::fs::read_to_string(f).unwrap());
            let refs = references(&text, &m, &modules);
            (
                if m.is_empty() { "(root)".into() } else { m },
                refs.into_iter()
                    .map(|r| if r.is_empty() { "(root)".into() } else { r })
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let modules: BTreeSet<String> = ["", "a", "b", "t", "t::x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let refs = references(
        "use crate::{a::F, b::{G, H}};\nfn f() { super::helper(); }",
        "t::x",
        &modules,
    );
    assert_eq!(
        refs,
        ["a", "b", "t"].iter().map(|s| s.to_string()).collect()
    );
    let refs = references("use x::Y;", "t", &modules);
    assert!(refs.contains("t::x"), "{refs:?}");
    let g: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
            .collect();
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn no_crate_has_an_import_cycle_among_its_modules() {
    let mut cycles = Vec::new();
    for (name, dir) in crates() {
        let g = module_graph(&dir);
        assert!(!g.is_empty(), "{name}: no modules found");
        if let Some(c) = find_cycle(&g) {
            cycles.push(format!("{name}: {}", c.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn fam_core_is_the_api_and_plugins_link_no_application() {
    let deps = |dir: &Path| -> Vec<String> {
        package(dir)
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    };
    let core = root().join("fam-core");
    for d in deps(&core) {
        assert!(
            !d.starts_with("fam-") && !["libloading", "zip", "sha2", "clap"].contains(&d.as_str()),
            "fam-core depends on `{d}`: application code belongs in fam-engine"
        );
    }
    let g = module_graph(&core);
    for application in [
        "pipeline",
        "run",
        "loader",
        "tasks",
        "cache",
        "eval",
        "bench",
        "merge",
        "preprocess",
    ] {
        assert!(
            !g.contains_key(application),
            "fam-core has a `{application}` module"
        );
    }
    for (name, dir) in crates() {
        if dir.starts_with(root().join("fam-plugins"))
            || dir.starts_with(root().join("tests/plugins"))
        {
            for d in deps(&dir) {
                assert!(
                    d != "fam-engine" && d != "fam-cli",
                    "{name} depends on `{d}`: plugins link fam-core and their own libraries only"
                );
            }
        }
    }
}
