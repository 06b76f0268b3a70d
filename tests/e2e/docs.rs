//! The docs are tested: `docs/pipeline-reference.md` lists exactly the keys of the schema,
//! and its examples use every key and validate with the real plugins.

use std::collections::{BTreeMap, BTreeSet};

use crate::util::*;
use fam_core::toml;

const BASE: &str = r#"[run]
output = "o"
[backbone]
plugin = "p"
kind = "k"
[similarity]
plugin = "m"
kind = "c"
[explain]
[preprocess]
[task]
kind = "pair"
pairs = []
"#;

/// The fields serde expects where `text` has the unknown key `zzz_unknown`, from its error
/// ("unknown field `zzz_unknown`, expected one of `a`, `b`"): the schema itself, not a copy.
fn expected_fields(text: &str) -> BTreeSet<String> {
    let err = toml::from_str::<fam_engine::pipeline::Pipeline>(text)
        .err()
        .unwrap_or_else(|| panic!("`zzz_unknown` accepted in:\n{text}"))
        .to_string();
    let list = err
        .split("unknown field `zzz_unknown`, expected ")
        .nth(1)
        .unwrap_or_else(|| panic!("no field list in: {err}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// The schema's keys per section (`run`, `task.pair`, ...).
fn schema() -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    out.insert(
        "top".to_string(),
        expected_fields(&format!("zzz_unknown = 1\n{BASE}")),
    );
    for section in ["run", "backbone", "explain", "preprocess"] {
        let header = format!("[{section}]\n");
        let text = BASE.replacen(&header, &format!("{header}zzz_unknown = 1\n"), 1);
        out.insert(section.to_string(), expected_fields(&text));
    }
    for kind in ["pair", "retrieval", "few_shot", "classify"] {
        let text = BASE.replace(
            "[task]\nkind = \"pair\"\npairs = []\n",
            &format!("[task]\nkind = \"{kind}\"\nzzz_unknown = 1\n"),
        );
        let mut keys = expected_fields(&text);
        keys.remove("kind");
        out.insert(format!("task.{kind}"), keys);
    }
    // `[similarity]` and `[[render]]` take `plugin`, `kind` and any option for the plugin
    // (`PluginRef` flattens its options, so serde has no list to give).
    for s in ["similarity", "render"] {
        out.insert(s.to_string(), ["plugin", "kind"].map(String::from).into());
    }
    out
}

/// The keys documented in each section's `| key | type | default | meaning |` table.
fn documented(page: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut in_key_table = false;
    for line in page.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = match h.split('`').nth(1) {
                Some("[[render]]") => Some("render".into()),
                Some(s) if s.starts_with('[') => Some(s.trim_matches(['[', ']']).to_string()),
                _ => None,
            };
            if let Some(s) = &section {
                out.entry(s.clone()).or_default();
            }
            in_key_table = false;
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            // `### kind = "pair"` sections document a task kind; other subsections (built-in
            // backbones, plugin options) are not the pipeline schema.
            section = h
                .strip_prefix("`kind = \"")
                .and_then(|k| k.split('"').next())
                .map(|k| format!("task.{k}"));
            if let Some(s) = &section {
                out.entry(s.clone()).or_default();
            }
            in_key_table = false;
            continue;
        }
        if line.starts_with("| key |") && section.is_some() {
            assert_eq!(
                line.trim(),
                "| key | type | default | meaning |",
                "every key table gives type, default and meaning"
            );
            in_key_table = section.is_some();
            continue;
        }
        if !line.starts_with('|') {
            in_key_table = false;
            continue;
        }
        let Some(s) = section.as_ref().filter(|_| in_key_table) else {
            continue;
        };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells[1].starts_with("---") {
            continue;
        }
        assert!(
            cells.len() >= 6 && cells[2..5].iter().all(|c| !c.is_empty()),
            "a row without type, default or meaning: {line}"
        );
        for key in cells[1].split('`').skip(1).step_by(2) {
            let key = key.trim_matches(['[', ']']);
            let key = key.strip_prefix(&format!("{s}.")).unwrap_or(key);
            out.entry(s.clone()).or_default().insert(key.to_string());
        }
    }
    out
}

#[test]
fn the_pipeline_reference_lists_exactly_the_schema() {
    let page = std::fs::read_to_string(root().join("docs/pipeline-reference.md")).unwrap();
    let schema = schema();
    let mut docs = documented(&page);
    // The top level: one `##` section per table of the schema.
    let sections: BTreeSet<String> = docs
        .keys()
        .filter(|k| !k.starts_with("task."))
        .cloned()
        .collect();
    assert_eq!(
        sections, schema["top"],
        "`## [section]` headings vs the schema's tables"
    );
    docs.remove("task");
    for (section, keys) in &schema {
        if section == "top" {
            continue;
        }
        let doc = docs.get(section).cloned().unwrap_or_default();
        let missing: Vec<_> = keys.difference(&doc).collect();
        let stale: Vec<_> = doc.difference(keys).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "docs/pipeline-reference.md, section `{section}`: undocumented keys {missing:?}, documented keys the schema lacks {stale:?}"
        );
    }
}

/// The ```toml blocks of a Markdown page.
fn toml_blocks(page: &str) -> Vec<String> {
    page.split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().to_string())
        .collect()
}

#[test]
fn the_reference_examples_validate_and_use_every_key() {
    let page = std::fs::read_to_string(root().join("docs/pipeline-reference.md")).unwrap();
    let examples: Vec<String> = toml_blocks(&page)
        .into_iter()
        .filter(|b| b.starts_with("[run]"))
        .collect();
    assert_eq!(examples.len(), 4, "one complete example per task");
    let mut host = fam_engine::PluginHost::new(&[plugin_dir()]);
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, text) in examples.iter().enumerate() {
        // Paths in the examples are relative to `pipelines/`, like the shipped pipelines.
        let path = root().join(format!("pipelines/reference-example-{i}.toml"));
        let p = fam_engine::pipeline::LoadedPipeline::parse(&path, text)
            .unwrap_or_else(|e| panic!("example {i}: {e}\n{text}"));
        let problems = p.validate(&mut host, None);
        assert!(problems.is_empty(), "example {i}: {problems:?}\n{text}");
        let table: toml::Table = toml::from_str(text).unwrap();
        for (section, value) in &table {
            let tables: Vec<&toml::Table> = match value {
                toml::Value::Table(t) => vec![t],
                toml::Value::Array(a) => a.iter().filter_map(|v| v.as_table()).collect(),
                _ => vec![],
            };
            for t in tables {
                let name = match (section.as_str(), t.get("kind").and_then(|k| k.as_str())) {
                    ("task", Some(kind)) => format!("task.{kind}"),
                    _ => section.clone(),
                };
                let keys = used.entry(name).or_default();
                keys.extend(
                    t.keys()
                        .filter(|k| *k != "kind" || !section.eq("task"))
                        .cloned(),
                );
            }
        }
    }
    for (section, keys) in schema() {
        if section == "top" {
            continue;
        }
        let unused: Vec<_> = keys
            .difference(&used.get(&section).cloned().unwrap_or_default())
            .cloned()
            .collect();
        assert!(
            unused.is_empty(),
            "section `{section}`: keys without an example: {unused:?}"
        );
    }
}
