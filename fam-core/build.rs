//! Computes the build half of the plugin ABI fingerprint (`fam_core::abi`): what must be the
//! same in the host and in every plugin for Rust trait objects to cross between them.
//!
//! - `fam-core`: the version and a digest of this crate's sources (every trait, record and
//!   helper that crosses the boundary is defined here, so any change to them changes it);
//! - `rustc`: the compiler's release and commit (Rust has no stable ABI between compilers);
//! - `target` and `panic`: the target triple and the panic strategy (a plugin built with
//!   `panic = "abort"` would defeat the host's panic guards);
//! - the versions of the crates whose types cross the boundary, from the `Cargo.lock` of the
//!   build (the top-level build's, found above the build folder, else above this crate).
//!
//! The run-time half (the features those crates were compiled with, and type layouts) is
//! computed in `src/abi.rs` by the copy of fam-core inside each library.

use std::path::PathBuf;

#[path = "abi_digest.rs"]
mod abi_digest;

/// Crates whose types appear in the traits, records and declaration of fam-core.
const BOUNDARY_CRATES: [&str; 6] = [
    "candle-core",
    "serde",
    "serde_json",
    "toml",
    "tracing",
    "tracing-core",
];

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let mut lines = Vec::new();

    let digest = abi_digest::api_digest(&dir, &mut |f| {
        println!("cargo:rerun-if-changed={}", f.display())
    });
    println!("cargo:rerun-if-changed={}", dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("abi_digest.rs").display()
    );
    lines.push(format!(
        "fam-core: {} api {digest}",
        std::env::var("CARGO_PKG_VERSION").unwrap()
    ));

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let vv = std::process::Command::new(rustc)
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let field = |k: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or("unknown")
            .to_string()
    };
    lines.push(format!(
        "rustc: {} ({})",
        field("release"),
        field("commit-hash")
    ));
    println!("cargo:rerun-if-env-changed=RUSTC");
    lines.push(format!("target: {}", std::env::var("TARGET").unwrap()));
    lines.push(format!(
        "panic: {}",
        std::env::var("CARGO_CFG_PANIC").unwrap_or_else(|_| "unwind".into())
    ));

    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let lock = out
        .ancestors()
        .chain(dir.ancestors())
        .map(|d| d.join("Cargo.lock"))
        .find(|p| p.is_file());
    let versions = lock
        .as_deref()
        .map(|p| {
            println!("cargo:rerun-if-changed={}", p.display());
            abi_digest::locked_versions(&std::fs::read_to_string(p).unwrap_or_default())
        })
        .unwrap_or_default();
    for krate in BOUNDARY_CRATES {
        let v = versions
            .iter()
            .filter(|(n, _)| n == krate)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>();
        let v = if v.is_empty() {
            "unknown (no Cargo.lock found)".to_string()
        } else {
            v.join(" and ")
        };
        lines.push(format!("{krate}: {v}"));
    }
    std::fs::write(out.join("abi-build.txt"), lines.join("\n") + "\n").unwrap();
}
