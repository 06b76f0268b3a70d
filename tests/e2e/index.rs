//! The gallery index (`fam-cli index`, `task.index`): the recipes of docs/gallery-index.md
//! run with parallel processes standing in for Slurm and Kubernetes, each checked against a
//! plain run file for file; `index --check`; refusing another model's index.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::util::*;

/// Writes `plain.toml` (retrieval-imagenet with absolute paths, output `out`) and
/// `gallery.toml` (the same with `index = "index"`) into `dir`.
fn write_pipelines(dir: &Path, layer: &str) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(root().join("pipelines/retrieval-imagenet.toml")).unwrap();
    let text = text
        .replace("\"../", &format!("\"{}/", root().display()))
        .replace("layer = \"features.18\"", &format!("layer = \"{layer}\""))
        .lines()
        .map(|l| {
            if l.starts_with("output = ") {
                "output = \"out\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let plain = dir.join("plain.toml");
    std::fs::write(&plain, &text).unwrap();
    let indexed = dir.join("gallery.toml");
    std::fs::write(
        &indexed,
        text.replace("[task]\n", "[task]\nindex = \"index\"\n"),
    )
    .unwrap();
    (plain, indexed)
}

/// The fenced blocks of a markdown file with this info string.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        match &mut cur {
            None if line.trim_start() == format!("```{lang}") => cur = Some(String::new()),
            Some(b) if line.trim_start() == "```" => {
                out.push(std::mem::take(b));
                cur = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    out
}

/// One phase of a recipe: a shell command run once per task, with its environment.
struct Phase {
    name: String,
    shell: &'static str,
    script: String,
    tasks: usize,
    env: fn(usize, usize) -> Vec<(&'static str, String)>,
}

fn slurm_env(k: usize, n: usize) -> Vec<(&'static str, String)> {
    vec![
        ("SLURM_ARRAY_TASK_ID", (k + 1).to_string()),
        ("SLURM_ARRAY_TASK_COUNT", n.to_string()),
    ]
}

fn k8s_env(k: usize, _n: usize) -> Vec<(&'static str, String)> {
    vec![("JOB_COMPLETION_INDEX", k.to_string())]
}

/// The Slurm scripts (`#SBATCH --job-name=fam-*`), with their array sizes.
fn slurm_phases(doc: &str) -> Vec<Phase> {
    blocks(doc, "bash")
        .into_iter()
        .filter(|b| b.contains("#SBATCH --job-name=fam-"))
        .map(|b| {
            let name = b
                .split("--job-name=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap()
                .to_string();
            let tasks = b
                .split("--array=1-")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .map_or(1, |n| n.parse().unwrap());
            Phase {
                name,
                shell: "bash",
                script: b,
                tasks,
                env: slurm_env,
            }
        })
        .collect()
}

/// The Kubernetes Jobs: each one's name, completions and container command (`args`).
fn k8s_phases(doc: &str) -> Vec<Phase> {
    blocks(doc, "yaml")
        .into_iter()
        .filter(|b| b.contains("kind: Job"))
        .map(|b| {
            let field = |key: &str| {
                b.lines()
                    .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
                    .unwrap()
            };
            let mut lines = b.lines().skip_while(|l| l.trim() != "args:");
            lines.next();
            let script = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("- "))
                .unwrap()
                .to_string();
            Phase {
                name: field("name:"),
                shell: "sh",
                script,
                tasks: field("completions:").parse().unwrap(),
                env: k8s_env,
            }
        })
        .collect()
}

/// Runs every task of a phase at once, in `dir`, with `fam-cli` on the PATH.
fn run_phase(dir: &Path, phase: &Phase) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("fam-cli");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_fam-cli"), &link).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let children: Vec<(usize, Child)> = (0..phase.tasks)
        .map(|k| {
            let mut c = Command::new(phase.shell);
            c.arg("-c")
                .arg(&phase.script)
                .current_dir(dir)
                .env("PATH", &path)
                .env("FAM_PLUGIN_PATH", plugin_dir())
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            for (key, value) in (phase.env)(k, phase.tasks) {
                c.env(key, value);
            }
            (k, c.spawn().unwrap())
        })
        .collect();
    for (k, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{} task {k}: {}",
            phase.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs a recipe's phases in `dir` and checks the merged output against a plain run.
fn recipe_equals_plain_run(name: &str, phases: Vec<Phase>) {
    let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["fam-index", "fam-query", "fam-merge"], "{name}");
    let dir = scratch(name);
    let (plain, _) = write_pipelines(&dir, "features.18");
    let r = run(fam()
        .args(["-q", "run"])
        .arg(&plain)
        .arg("--output")
        .arg(dir.join("single")));
    assert_eq!(r.code, 0, "{}", r.stderr);

    run_phase(&dir, &phases[0]);
    // Every gallery image was forwarded once, by the part that holds it.
    let r = run(fam().args(["index", "--check"]).arg(dir.join("index")));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ok: complete"), "{}", r.stdout);
    let mut forwarded = 0;
    let mut parts = 0;
    for e in std::fs::read_dir(dir.join("index")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            forwarded += json(&p)["counts"]["images_forwarded"].as_u64().unwrap();
            parts += 1;
        }
    }
    assert_eq!(parts, phases[0].tasks);
    let gallery = std::fs::read_dir(root().join("data/images"))
        .unwrap()
        .filter(|e| {
            let p = e.as_ref().unwrap().path();
            p.extension()
                .is_some_and(|x| ["png", "jpg"].contains(&x.to_str().unwrap()))
        })
        .count() as u64;
    assert_eq!(
        forwarded, gallery,
        "each gallery image forwarded exactly once"
    );

    run_phase(&dir, &phases[1]);
    // A query shard forwards its queries and its hits, never the gallery.
    for k in 1..=phases[1].tasks {
        let shard = dir.join(format!("out/shard-{k}-of-{}", phases[1].tasks));
        let m = json(&shard.join("manifest.json"));
        let doc = json(&shard.join("retrieval.json"));
        let queries = doc["queries"].as_array().unwrap();
        let mut hits: Vec<&str> = queries
            .iter()
            .flat_map(|q| q["hits"].as_array().unwrap())
            .map(|h| h["image"].as_str().unwrap())
            .collect();
        hits.sort();
        hits.dedup();
        assert_eq!(
            m["counts"]["images_forwarded"].as_u64().unwrap() as usize,
            queries.len() + hits.len(),
            "shard {k}"
        );
    }

    run_phase(&dir, &phases[2]);
    assert_same_outputs(&dir.join("single"), &dir.join("out/merged"));
}

fn doc() -> String {
    std::fs::read_to_string(root().join("docs/gallery-index.md")).unwrap()
}

#[test]
fn the_slurm_recipe_indexes_in_3_parts_queries_in_2_and_equals_a_plain_run() {
    let phases = slurm_phases(&doc());
    assert_eq!((phases[0].tasks, phases[1].tasks), (3, 2));
    recipe_equals_plain_run("index-slurm", phases);
}

#[test]
fn the_kubernetes_recipe_equals_a_plain_run() {
    recipe_equals_plain_run("index-k8s", k8s_phases(&doc()));
}

#[test]
fn an_index_of_another_model_is_refused_naming_both() {
    let dir = scratch("index-other-model");
    let (_, other) = write_pipelines(&dir, "features.17");
    let r = run(fam().args(["-q", "index"]).arg(&other));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (_, ours) = write_pipelines(&dir, "features.18");
    let r = run(fam().args(["-q", "run"]).arg(&ours));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("built with model `mobilenet_v2@features.17`")
            && r.stderr.contains("uses model `mobilenet_v2@features.18`"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn check_reports_missing_parts_and_changed_files() {
    let dir = scratch("index-check");
    let gallery = dir.join("gallery");
    std::fs::create_dir_all(&gallery).unwrap();
    for f in ["chelsea.png", "coffee.png", "rocket.jpg", "camera.png"] {
        std::fs::copy(root().join("data/images").join(f), gallery.join(f)).unwrap();
    }
    let (_, p) = write_pipelines(&dir, "features.18");
    let text = std::fs::read_to_string(&p).unwrap().replace(
        &format!("gallery = \"{}/data/images\"", root().display()),
        "gallery = \"gallery\"",
    );
    std::fs::write(&p, text).unwrap();
    for k in 1..=2 {
        let r = run(fam()
            .args(["-q", "index"])
            .arg(&p)
            .args(["--shard", &format!("{k}/2")]));
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let index = dir.join("index");
    let r = run(fam().args(["index", "--check"]).arg(&index));
    assert_eq!(r.code, 0, "{}", r.stdout);

    // A file changes after indexing: reported by --check; a run does not explain it with
    // the old embedding.
    std::fs::copy(
        root().join("data/images/flower.jpg"),
        gallery.join("rocket.jpg"),
    )
    .unwrap();
    let r = run(fam().args(["index", "--check"]).arg(&index));
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stdout.contains("rocket.jpg: ") && r.stdout.contains("changed"),
        "{}",
        r.stdout
    );

    // A part goes missing: --check and the run name it.
    std::fs::remove_file(index.join("part-00002-of-00002.json")).unwrap();
    let r = run(fam().args(["index", "--json", "--check"]).arg(&index));
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        report["problems"][0]
            .as_str()
            .unwrap()
            .contains("parts missing of 2: 2"),
        "{}",
        r.stdout
    );
    let r = run(fam().args(["-q", "run"]).arg(&p));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("parts missing of 2: 2"), "{}", r.stderr);
}
