//! ARCHITECTURE.md's invariants, read from the source itself: every path a
//! file names (`use crate::..`, `use super::..`, `crate::a::b::f(..)` in
//! code) is resolved to the module file it leads to, and
//!
//! - a file imports only from its own layer or the layers below it (the
//!   engine from nothing but the engine; transport from the engine; ...);
//! - no two files import each other, directly or through others;
//! - only the transport and the runtime (its listeners) touch sockets.
//!
//! No clock, no build: it reads text, so it runs in milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import from its own layer and
/// from any layer listed before it. Layers in one group (the same number)
/// do not import each other.
const LAYERS: &[(&str, u8)] = &[
    ("engine", 0),
    ("clock", 0),
    ("auth", 1),
    ("transport", 1),
    ("config", 2),
    ("integrations", 3),
    ("worker", 4),
    ("session", 5),
    ("frontends", 6),
    ("runtime", 7),
    ("cli", 7),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every module file of the library, by module path (`engine::shard`).
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    let mut map = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src()).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|l| l == "mod") {
            parts.pop();
        }
        let name = parts.join("::");
        // The binary is not part of the library's graph.
        if name == "main" {
            continue;
        }
        let name = if name == "lib" { String::new() } else { name };
        map.insert(name, f);
    }
    map
}

/// The code of a file without comments and string literals (their text is
/// not a dependency).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // A raw string's hashes are not tracked: raw strings holding
            // `"` are rare in this tree and only shorten what is skipped.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '"'.
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into whole paths.
fn expand(tree: &str) -> Vec<String> {
    fn go(prefix: &str, t: &str, out: &mut Vec<String>) {
        let t = t.trim();
        match t.find('{') {
            None => {
                // `a::b as c` names `a::b`.
                let t = t.split(" as ").next().unwrap_or(t).trim();
                out.push(format!("{prefix}{t}"));
            }
            Some(open) => {
                let head = t[..open].trim();
                let inner = &t[open + 1..t.rfind('}').unwrap_or(t.len())];
                let prefix = format!("{prefix}{head}");
                let mut depth = 0;
                let mut start = 0;
                for (i, c) in inner.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            if !inner[start..i].trim().is_empty() {
                                go(&prefix, &inner[start..i], out);
                            }
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                if !inner[start..].trim().is_empty() {
                    go(&prefix, &inner[start..], out);
                }
            }
        }
    }
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.replace(":: ", "::").replace(" ::", "::");
    let mut out = Vec::new();
    go("", &tree, &mut out);
    out
}

/// The paths a module's code names, made absolute (`engine::shard::Shard`):
/// `super` and `self` are resolved against `module`.
fn paths_named(module: &str, code: &str) -> Vec<String> {
    let mut raw = Vec::new();
    // `use` statements, possibly spanning lines.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let after = &rest[at + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = after.find(';') else { break };
        let tree = after[..end].trim();
        if tree.starts_with("crate::") || tree.starts_with("super::") || tree.starts_with("self::")
        {
            raw.extend(expand(tree));
        }
    }
    // Paths in code: `crate::a::b`, `super::a`.
    for anchor in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(anchor) {
            let before = rest[..at].chars().last();
            let tail = &rest[at..];
            rest = &rest[at + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            let path = tail[..end].trim_end_matches(':');
            if path.len() > anchor.len() {
                raw.push(path.to_string());
            }
        }
    }
    let mut seen = BTreeSet::new();
    raw.retain(|p| seen.insert(p.clone()));
    raw.into_iter()
        .map(|p| {
            let mut base: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
            let mut p = p.as_str();
            if let Some(r) = p.strip_prefix("crate::") {
                return r.to_string();
            }
            if let Some(r) = p.strip_prefix("self::") {
                p = r;
            } else {
                while let Some(r) = p.strip_prefix("super::") {
                    base.pop();
                    p = r;
                }
            }
            base.push(p);
            base.join("::")
        })
        .collect()
}

/// A file's code, and its `mod tests { .. }` (the last item, by this
/// tree's habit) apart: inside it, `super` is the file's own module.
fn split_tests(code: &str) -> (&str, &str) {
    match code.find("mod tests {") {
        Some(at) => (&code[..at], &code[at..]),
        None => (code, ""),
    }
}

/// The module file a path leads to: its longest prefix that is a module.
fn resolve<'a>(path: &str, modules: &'a BTreeMap<String, PathBuf>) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .map(|n| parts[..n].join("::"))
        .find_map(|p| modules.get_key_value(&p).map(|(k, _)| k.as_str()))
}

fn layer(module: &str) -> Option<(&'static str, u8)> {
    let top = module.split("::").next().unwrap_or("");
    LAYERS.iter().find(|(name, _)| *name == top).copied()
}

/// Every edge of the library: module -> modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules();
    let mut g = BTreeMap::new();
    for (name, file) in &modules {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let (outer, tests) = split_tests(&code);
        let inner = if name.is_empty() {
            "tests".to_string()
        } else {
            format!("{name}::tests")
        };
        let mut named = paths_named(name, outer);
        named.extend(paths_named(&inner, tests));
        let mut deps = BTreeSet::new();
        for p in named {
            if let Some(target) = resolve(&p, &modules) {
                // A module naming itself, or the crate root, is no edge.
                if target != name && !target.is_empty() {
                    deps.insert(target.to_string());
                }
            }
        }
        g.insert(name.clone(), deps);
    }
    g
}

#[test]
fn the_parser_sees_what_rust_sees() {
    assert_eq!(
        expand("crate::engine::{core::Core, message::{self, Message}}"),
        vec![
            "crate::engine::core::Core",
            "crate::engine::message::self",
            "crate::engine::message::Message"
        ]
    );
    assert_eq!(
        expand("crate::a::{b as c, d}"),
        vec!["crate::a::b", "crate::a::d"]
    );
    let code = code_of(
        "use super::x; // crate::not::this\nlet s = \"crate::nor::this\"; crate::a::b::f();",
    );
    let named = paths_named("frontends::pusher::api", &code);
    assert_eq!(named, vec!["frontends::pusher::x", "a::b::f"]);
    let named = paths_named("frontends::pusher", "use super::endpoint::Upgrade;");
    assert_eq!(named, vec!["frontends::endpoint::Upgrade"]);
    let named = paths_named("engine::shard::tests", "use super::*;");
    assert_eq!(named, vec!["engine::shard::*"]);
    let g = graph();
    assert!(
        g["frontends::native"].contains("frontends::endpoint"),
        "a known edge is found: {:?}",
        g["frontends::native"]
    );
    assert!(g.len() > 40, "every module is read ({})", g.len());
}

#[test]
fn each_layer_imports_only_from_below() {
    let mut wrong = Vec::new();
    for (from, deps) in graph() {
        let Some((fl, fr)) = layer(&from) else {
            continue;
        };
        for to in deps {
            let Some((tl, tr)) = layer(&to) else {
                wrong.push(format!("{from} -> {to}: {to} belongs to no layer"));
                continue;
            };
            if tr > fr || (tr == fr && tl != fl) {
                wrong.push(format!("{from} ({fl}) -> {to} ({tl})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_module_imports_itself_through_others() {
    let g = graph();
    // Tarjan's strongly connected components.
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        cycles: Vec<Vec<&'a str>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on.insert(v);
            for w in self.g.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[w].min(self.low[v]);
                    self.low.insert(v, l);
                } else if self.on.contains(w) {
                    let l = self.index[w].min(self.low[v]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.cycles.push(comp);
                }
            }
        }
    }
    let mut t = T {
        g: &g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        cycles: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    let described: Vec<String> = t
        .cycles
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    g[*a]
                        .iter()
                        .filter(|b| c.contains(&b.as_str()))
                        .map(move |b| format!("  {a} -> {b}"))
                })
                .collect();
            format!("{}:\n{}", c.join(", "), edges.join("\n"))
        })
        .collect();
    assert!(
        described.is_empty(),
        "import cycles:\n{}",
        described.join("\n")
    );
}

#[test]
fn only_the_transport_and_the_runtime_touch_sockets() {
    let mut wrong = Vec::new();
    for (name, file) in modules() {
        let top = name.split("::").next().unwrap_or("");
        if matches!(top, "transport" | "runtime" | "") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        for needle in [
            "as_raw_fd",
            "RawFd",
            "libc::recv(",
            "libc::send(",
            "libc::shutdown(",
            "libc::setsockopt(",
            "libc::close(",
            "libc::read(",
            "libc::write(",
        ] {
            if code.contains(needle) {
                wrong.push(format!("{name}: {needle}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "sockets touched outside the transport:\n{}",
        wrong.join("\n")
    );
}
