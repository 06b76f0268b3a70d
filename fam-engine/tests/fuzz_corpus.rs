//! Every input under `fuzz/corpus/<target>/` and `fuzz/crashes/` (inputs the fuzzer found,
//! kept as regression cases) goes through its parser without a panic. The fuzzer itself is
//! `fam-core/examples/fuzz.rs`.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn run(target: &str, data: &[u8]) {
    let name = PathBuf::from(format!("input.{target}"));
    match target {
        "pipeline" => {
            let text = String::from_utf8_lossy(data);
            if let Ok(p) = fam_engine::pipeline::LoadedPipeline::parse(&name, &text) {
                let _ = p.validate(&mut fam_engine::PluginHost::new(&[]), None);
            }
        }
        "checkpoint" => {
            let _ = fam_weights::state_dict_from_bytes(data, &name);
        }
        "image" => {
            if let Ok(img) = fam_engine::preprocess::decode_rgb8(data, &name) {
                let _ =
                    fam_engine::preprocess::prepare(&img, &fam_core::traits::InputSpec::imagenet());
            }
        }
        _ => panic!("unknown fuzz target {target}"),
    }
}

#[test]
fn corpus_and_crash_inputs_do_not_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for target in ["pipeline", "checkpoint", "image"] {
        for path in inputs(&root.join("corpus").join(target)) {
            run(target, &std::fs::read(&path).unwrap());
            n += 1;
        }
    }
    for path in inputs(&root.join("crashes")) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let target = file.split('-').next().unwrap().to_string();
        if target == "onnx" {
            continue; // replayed by fam-plugins/onnx/tests/fuzz_corpus.rs
        }
        run(&target, &std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n >= 10, "only {n} inputs found under {}", root.display());
}

#[test]
fn the_seed_inputs_are_valid() {
    // The seeds must parse, or the fuzzer only explores error paths.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for path in inputs(&root.join("checkpoint")) {
        let data = std::fs::read(&path).unwrap();
        fam_weights::state_dict_from_bytes(&data, &path).unwrap();
    }
    for path in inputs(&root.join("image")) {
        let data = std::fs::read(&path).unwrap();
        fam_engine::preprocess::decode_rgb8(&data, &path).unwrap();
    }
    for path in inputs(&root.join("pipeline")) {
        let text = std::fs::read_to_string(&path).unwrap();
        fam_engine::pipeline::LoadedPipeline::parse(&path, &text).unwrap();
    }
}
