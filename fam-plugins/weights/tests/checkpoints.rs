//! PyTorch checkpoints in both formats (fixtures written by scripts/make-pth-fixtures.py),
//! and safetensors round trips.

use std::path::Path;

use fam_weights::{load_state_dict, save_safetensors};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn check(sd: &fam_weights::StateDict) {
    assert_eq!(sd.len(), 4);
    let w = sd["layer.w"].to_vec2::<f32>().unwrap();
    assert_eq!(w, vec![vec![0.5, -1.0, 2.0], vec![3.25, 4.0, -5.5]]);
    let wt = sd["layer.wt"].to_vec2::<f32>().unwrap();
    assert_eq!(wt, vec![vec![0.5, 3.25], vec![-1.0, 4.0], vec![2.0, -5.5]]);
    assert_eq!(sd["layer.b"].to_vec1::<f32>().unwrap(), vec![7.0, 8.0, 9.0]);
    assert_eq!(sd["layer.n"].to_scalar::<i64>().unwrap(), 42);
}

#[test]
fn zip_checkpoint() {
    check(&load_state_dict(&fixture("tiny_zip.pth")).unwrap());
}

#[test]
fn legacy_checkpoint() {
    check(&load_state_dict(&fixture("tiny_legacy.pth")).unwrap());
}

#[test]
fn safetensors_round_trip() {
    let sd = load_state_dict(&fixture("tiny_legacy.pth")).unwrap();
    let out = std::env::temp_dir().join(format!("fam-rt-{}.safetensors", std::process::id()));
    save_safetensors(&sd, &out).unwrap();
    check(&load_state_dict(&out).unwrap());
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn truncated_checkpoints_are_errors_naming_the_file() {
    for name in ["tiny_zip.pth", "tiny_legacy.pth"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let dir = std::env::temp_dir().join(format!("fam-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for cut in [bytes.len() / 4, bytes.len() / 2, bytes.len() - 5] {
            let p = dir.join(format!("cut-{cut}-{name}"));
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = load_state_dict(&p).unwrap_err().to_string();
            assert!(err.contains(&format!("cut-{cut}-{name}")), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
