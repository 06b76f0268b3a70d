//! Dynamic plugin loading: the built-ins load, mismatches are refused, panics are caught.

use crate::util::*;

#[test]
fn plugins_lists_builtins_and_refuses_a_foreign_abi() {
    let r = run(fam().arg("plugins"));
    assert_eq!(r.code, 0, "{}", r.stderr);
    for needle in [
        "metrics 0.1.0",
        "similarity cosine",
        "similarity euclidean",
        "render 0.1.0",
        "renderer   overlay",
        "renderer   panel",
        "renderer   npy",
        "renderer   scores",
        "retrieval 0.1.0",
        "backbone   mobilenet_v2",
        "test_panicky 0.1.0",
    ] {
        assert!(
            r.stdout.contains(needle),
            "`{needle}` missing from:\n{}",
            r.stdout
        );
    }
    let bad = r
        .stdout
        .lines()
        .find(|l| l.contains("libfam_plugin_test_bad_abi"))
        .expect("bad-ABI plugin listed");
    let (plugin, host) = if cfg!(feature = "cuda") {
        ("cpu", "cuda")
    } else {
        ("cuda", "cpu")
    };
    assert!(
        bad.contains("was built differently from this fam-cli")
            && bad.contains(&format!(
                "candle-core features: plugin has `{plugin}`, host has `{host}`"
            )),
        "{bad}"
    );
}

#[test]
fn plugins_json_is_machine_readable() {
    let r = run(fam().args(["plugins", "--json"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for n in ["metrics", "render", "retrieval"] {
        assert!(names.contains(&n), "{names:?}");
    }
}

#[test]
fn a_panic_inside_a_plugin_method_is_an_error_not_an_abort() {
    let dir = scratch("panic");
    let p = write_pipeline(
        &dir,
        "plugin = \"test_panicky\"\nkind = \"panic\"",
        "contribution",
        &[(&image("chelsea.png"), &image("coffee.png"))],
        &["scores"],
    );
    let r = run(fam().arg("run").arg(&p));
    assert_eq!(r.code, 1, "stderr: {}", r.stderr);
    let manifest = json(&dir.join("out/manifest.json"));
    let err = manifest["failures"][0]["error"].as_str().unwrap();
    assert_eq!(
        err,
        "plugin `test_panicky` panicked in Similarity::score: deliberate panic in score"
    );
}

#[test]
fn a_panic_while_creating_an_object_stops_the_run_with_exit_2() {
    let dir = scratch("panic-create");
    let p = write_pipeline(
        &dir,
        "plugin = \"test_panicky\"\nkind = \"panic_on_create\"",
        "contribution",
        &[(&image("chelsea.png"), &image("coffee.png"))],
        &["scores"],
    );
    let r = run(fam().arg("run").arg(&p));
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    assert!(
        r.stderr
            .contains("plugin `test_panicky` panicked in create similarity: cannot create"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_missing_plugin_names_where_it_looked() {
    let dir = scratch("missing-plugin");
    let p = write_pipeline(
        &dir,
        "plugin = \"nope\"\nkind = \"cosine\"",
        "contribution",
        &[(&image("chelsea.png"), &image("coffee.png"))],
        &["scores"],
    );
    let r = run(fam().arg("validate").arg(&p));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("plugin `nope` not found in"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("libfam_plugin_nope"), "{}", r.stderr);
}
