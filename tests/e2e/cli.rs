//! The CLI a user expects: starter pipelines, plugin scaffolds, shell completions, JSON
//! output, and validation errors that point at the line.

use crate::util::*;

#[test]
fn init_writes_a_starter_that_validates_and_runs() {
    let dir = scratch("init");
    for task in ["pair", "retrieval", "few_shot", "classify"] {
        let file = dir.join(format!("{task}.toml"));
        let r = run(fam().args(["init", task, "--output"]).arg(&file));
        assert_eq!(r.code, 0, "{task}: {}", r.stderr);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.starts_with("# "), "a commented starter: {text}");
        let r = run(fam().arg("validate").arg(&file));
        assert_eq!(r.code, 0, "{task}: {}{}", r.stdout, r.stderr);
    }
    // It never overwrites by accident.
    let file = dir.join("pair.toml");
    let r = run(fam().args(["init", "pair", "--output"]).arg(&file));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("pair.toml already exists (--force replaces it)"),
        "{}",
        r.stderr
    );
    let r = run(fam().args(["init", "segmentation"]));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("[possible values: pair, retrieval, few_shot, classify]"),
        "{}",
        r.stderr
    );
    // The pair starter runs as written and writes the report.
    let r = run(fam().args(["-q", "run"]).arg(&file));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(dir.join("out/pair/index.html").is_file());
    assert!(dir.join("out/pair/panels").is_dir());
}

#[test]
fn plugins_new_checks_its_arguments() {
    let dir = scratch("plugins-new");
    let r = run(fam()
        .args(["plugins", "new", "My-Plugin"])
        .current_dir(&dir));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("`My-Plugin` is not a plugin name"),
        "{}",
        r.stderr
    );
    std::fs::create_dir_all(dir.join("taken")).unwrap();
    std::fs::write(dir.join("taken/x"), "x").unwrap();
    let r = run(fam()
        .args(["plugins", "new", "ok", "--path", "taken"])
        .current_dir(&dir));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("taken already exists and is not empty"),
        "{}",
        r.stderr
    );
    let r = run(fam()
        .args(["plugins", "new", "my_metric"])
        .current_dir(&dir));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cargo = std::fs::read_to_string(dir.join("fam-plugin-my-metric/Cargo.toml")).unwrap();
    assert!(cargo.contains("name = \"fam_plugin_my_metric\""), "{cargo}");
    let fam_core = root().join("fam-core");
    assert!(
        cargo.contains(&format!("path = {:?}", fam_core.display().to_string())),
        "{cargo}"
    );
    let lib = std::fs::read_to_string(dir.join("fam-plugin-my-metric/src/lib.rs")).unwrap();
    assert!(lib.contains("export_plugin!(name: \"my_metric\""));
}

#[test]
fn completions_for_each_shell() {
    for (shell, needle) in [
        ("bash", "complete -F _fam__cli"),
        ("zsh", "#compdef fam-cli"),
        ("fish", "complete -c fam-cli"),
        ("powershell", "Register-ArgumentCompleter"),
        ("elvish", "edit:completion:arg-completer[fam-cli]"),
    ] {
        let r = run(fam().args(["completions", shell]));
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        assert!(r.stdout.contains(needle), "{shell}: `{needle}` missing");
        for sub in [
            "run", "validate", "init", "plugins", "eval", "bench", "merge",
        ] {
            assert!(r.stdout.contains(sub), "{shell}: `{sub}` missing");
        }
    }
    // The bash script is valid bash.
    let dir = scratch("completions");
    let script = dir.join("fam-cli.bash");
    std::fs::write(&script, run(fam().args(["completions", "bash"])).stdout).unwrap();
    let ok = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn validation_problems_point_at_their_lines() {
    let dir = scratch("lines");
    let file = dir.join("pair.toml");
    assert_eq!(
        run(fam().args(["init", "pair", "--output"]).arg(&file)).code,
        0
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let text = text
        .replace("layer = \"features.18\"", "layer = \"features.81\"")
        .replace("kind = \"cosine\"", "kind = \"cosin\"");
    std::fs::write(&file, &text).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let r = run(fam().arg("validate").arg(&file));
    assert_eq!(r.code, 2);
    for (needle, field) in [
        ("features.81", "backbone.layer"),
        ("\"cosin\"", "similarity.kind"),
    ] {
        let expected = format!("line {}: {field}: ", line_of(needle));
        assert!(
            r.stderr.contains(&expected),
            "`{expected}` missing from:\n{}",
            r.stderr
        );
    }
    // A syntax error is shown with its line by the TOML parser.
    std::fs::write(&file, text.replace("[task]", "[task")).unwrap();
    let r = run(fam().arg("validate").arg(&file));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains(&format!("line {}", line_of("[task]"))),
        "{}",
        r.stderr
    );
}

#[test]
fn eval_json_is_the_report() {
    let out = scratch("eval-json");
    let r = run(fam()
        .args([
            "-q",
            "eval",
            "pipelines/quickstart.toml",
            "--json",
            "--methods",
            "gradient,random",
        ])
        .args(["--steps", "2", "--max-items", "1", "--output"])
        .arg(&out)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let printed: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(printed, json(&out.join("eval.json")));
    assert_eq!(printed["summaries"][0]["method"], "fam");
}

#[test]
fn quiet_verbose_and_rust_log_set_the_logging() {
    let dir = scratch("logging");
    let file = dir.join("pair.toml");
    assert_eq!(
        run(fam().args(["init", "pair", "--output"]).arg(&file)).code,
        0
    );
    let stderr = |args: &[&str], rust_log: Option<&str>| {
        let mut c = fam();
        c.env_remove("RUST_LOG");
        if let Some(l) = rust_log {
            c.env("RUST_LOG", l);
        }
        let r = run(c.args(args).arg("run").arg(&file));
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.stderr
    };
    let default = stderr(&[], None);
    assert!(
        default.contains("INFO") && default.contains("models loaded"),
        "{default}"
    );
    assert!(!default.contains("DEBUG"), "{default}");
    let quiet = stderr(&["-q"], None);
    assert!(!quiet.contains("INFO"), "{quiet}");
    let verbose = stderr(&["-v"], None);
    assert!(verbose.contains("DEBUG"), "{verbose}");
    // RUST_LOG wins over the flags.
    let env = stderr(&["-v"], Some("warn"));
    assert!(!env.contains("DEBUG") && !env.contains("INFO"), "{env}");
}
