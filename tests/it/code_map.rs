//! The README's code map is the rule for where a change goes: one row per entry of
//! `src/`, saying what it may import. This holds it against the code: every entry is
//! listed, every `crate::` path an entry uses is one its row allows, and the allowed
//! imports have no cycle (no module imports from one that depends on it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `entry` (`cache.rs`, `admin/`) -> modules it may import (`None`: anything).
fn code_map() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let section = readme
        .split("\n## Code map")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a `## Code map` section");
    let mut map = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let entry = cols[1].trim_matches('`').to_string();
        let allowed = match cols[3] {
            "anything" => None,
            "nothing" => Some(BTreeSet::new()),
            list => Some(
                list.split(',')
                    .map(|m| m.trim().trim_matches('`').to_string())
                    .collect(),
            ),
        };
        assert!(
            map.insert(entry.clone(), allowed).is_none(),
            "{entry} twice"
        );
    }
    map
}

fn module_of(entry: &str) -> &str {
    entry.trim_end_matches('/').trim_end_matches(".rs")
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The modules named by `crate::<name>` anywhere in `entry`'s files.
fn imports(entry: &str) -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join("src").join(entry), &mut files);
    let mut found = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let before = text[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `keygate_crate::`, not ours
            }
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found.remove(module_of(entry));
    found
}

#[test]
fn the_code_map_lists_every_entry_of_src() {
    let map = code_map();
    let mut entries = BTreeSet::new();
    for e in std::fs::read_dir(Path::new(ROOT).join("src")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() {
            entries.insert(format!("{name}/"));
        } else if name.ends_with(".rs") {
            entries.insert(name);
        }
    }
    let listed: BTreeSet<String> = map.keys().cloned().collect();
    assert_eq!(listed, entries, "README code map vs src/");
}

#[test]
fn every_module_imports_only_what_the_code_map_allows() {
    for (entry, allowed) in code_map() {
        let Some(allowed) = allowed else { continue };
        let extra: Vec<String> = imports(&entry).difference(&allowed).cloned().collect();
        assert!(
            extra.is_empty(),
            "{entry} imports {extra:?}, which the README's code map does not allow"
        );
    }
}

#[test]
fn the_allowed_imports_have_no_cycle() {
    let map = code_map();
    let edges: BTreeMap<&str, Vec<&str>> = map
        .iter()
        .filter_map(|(e, a)| {
            a.as_ref()
                .map(|a| (module_of(e), a.iter().map(String::as_str).collect()))
        })
        .collect();
    // Depth-first search with colours: 1 on the path, 2 done.
    fn visit<'a>(
        m: &'a str,
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        colour: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) {
        match colour.get(m) {
            Some(2) => return,
            Some(1) => panic!("import cycle: {} -> {m}", path.join(" -> ")),
            _ => {}
        }
        colour.insert(m, 1);
        path.push(m);
        for next in edges.get(m).into_iter().flatten() {
            visit(next, edges, colour, path);
        }
        path.pop();
        colour.insert(m, 2);
    }
    let mut colour = BTreeMap::new();
    for m in edges.keys() {
        visit(m, &edges, &mut colour, &mut Vec::new());
    }
}
