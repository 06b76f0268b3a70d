//! The ABI fingerprint follows the API's sources: the digest the build computed is the one of
//! these sources, and editing a trait (here, adding a method to `Backbone`) changes it.

use std::path::{Path, PathBuf};

#[path = "../abi_digest.rs"]
#[allow(dead_code)]
mod abi_digest;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

fn built_digest() -> String {
    let line = fam_core::abi::fingerprint()
        .lines()
        .find(|l| l.starts_with("fam-core: "))
        .unwrap()
        .to_string();
    line.rsplit(' ').next().unwrap().to_string()
}

#[test]
fn changing_a_trait_changes_the_fingerprint() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        abi_digest::api_digest(&here, &mut |_| {}),
        built_digest(),
        "the build's digest is not the digest of these sources"
    );

    let copy = std::env::temp_dir().join(format!("fam-abi-{}", std::process::id()));
    copy_dir(&here.join("src"), &copy.join("src"));
    for file in ["Cargo.toml", "build.rs", "abi_digest.rs"] {
        std::fs::copy(here.join(file), copy.join(file)).unwrap();
    }
    assert_eq!(abi_digest::api_digest(&copy, &mut |_| {}), built_digest());

    let traits = copy.join("src/traits.rs");
    let text = std::fs::read_to_string(&traits).unwrap();
    let changed = text.replacen(
        "pub trait Backbone: Send + Sync {\n",
        "pub trait Backbone: Send + Sync {\n    fn warm_up(&self) {}\n",
        1,
    );
    assert_ne!(changed, text);
    std::fs::write(&traits, changed).unwrap();
    let after = abi_digest::api_digest(&copy, &mut |_| {});
    std::fs::remove_dir_all(&copy).unwrap();
    assert_ne!(
        after,
        built_digest(),
        "a new trait method left the fingerprint unchanged"
    );
}

#[test]
fn the_lock_file_gives_the_versions_of_the_boundary_crates() {
    let lock = "[[package]]\nname = \"candle-core\"\nversion = \"0.11.1\"\n\n[[package]]\nname = \"toml\"\nversion = \"1.2.2+spec-1.1.0\"\n";
    assert_eq!(
        abi_digest::locked_versions(lock),
        vec![
            ("candle-core".to_string(), "0.11.1".to_string()),
            ("toml".to_string(), "1.2.2+spec-1.1.0".to_string())
        ]
    );
}
