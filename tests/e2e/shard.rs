//! `run --shard K/N` then `merge`: the merged output equals a single run's, file for file.

use crate::util::*;

fn sharded_equals_single(pipeline: &str, n: usize, name: &str) {
    let base = scratch(name);
    let single = base.join("single");
    let r = run(fam()
        .args(["-q", "run", pipeline, "--output"])
        .arg(&single)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut shards = Vec::new();
    for k in 1..=n {
        let dir = base.join(format!("part-{k}"));
        let r = run(fam()
            .args([
                "-q",
                "run",
                pipeline,
                "--shard",
                &format!("{k}/{n}"),
                "--output",
            ])
            .arg(&dir)
            .current_dir(root()));
        assert_eq!(r.code, 0, "shard {k}: {}", r.stderr);
        shards.push(dir);
    }
    // Given out of order: merge sorts by the shard recorded in each manifest.
    shards.reverse();
    let merged = base.join("merged");
    let r = run(fam()
        .args(["-q", "merge", "--output"])
        .arg(&merged)
        .args(&shards)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_same_outputs(&single, &merged);
    let (ms, mm) = (
        json(&single.join("manifest.json")),
        json(&merged.join("manifest.json")),
    );
    let paths = |m: &serde_json::Value| {
        let mut v: Vec<String> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(paths(&ms), paths(&mm));
}

#[test]
fn sharded_pairs_merge_into_the_single_run() {
    sharded_equals_single("pipelines/quickstart.toml", 3, "shard-pairs");
}

#[test]
fn sharded_few_shot_queries_merge_into_the_single_run() {
    sharded_equals_single("pipelines/fewshot-digits.toml", 4, "shard-fewshot");
}

#[test]
fn merge_refuses_an_incomplete_set_of_shards() {
    let base = scratch("shard-incomplete");
    let part = base.join("part-1");
    let r = run(fam()
        .args([
            "-q",
            "run",
            "pipelines/quickstart.toml",
            "--shard",
            "1/2",
            "--output",
        ])
        .arg(&part)
        .current_dir(root()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(fam()
        .args(["-q", "merge", "--output"])
        .arg(base.join("merged"))
        .arg(&part)
        .current_dir(root()));
    assert_eq!(r.code, 2);
    assert!(
        r.stderr
            .contains("run of 2 shards, but 1 folders were given"),
        "{}",
        r.stderr
    );
}

#[test]
fn sharded_retrieval_queries_merge_into_the_single_run() {
    sharded_equals_single("pipelines/retrieval-imagenet.toml", 2, "shard-retrieval");
}
