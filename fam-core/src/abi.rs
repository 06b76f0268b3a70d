//! The plugin ABI fingerprint: everything that must agree between the host and a plugin for
//! Rust trait objects and records to cross between them, as `part: value` lines. The host
//! compares a plugin's lines with its own before it calls anything else in the library, and
//! a refusal names each part that differs with both values. No constant is bumped by hand.
//!
//! The build half comes from `build.rs` (fam-core's source digest, rustc, target, panic
//! strategy, the locked versions of the boundary crates). The run-time half is computed
//! here, by the copy of fam-core inside each library, so it describes how *that* library was
//! compiled: the features candle was built with and the layout of the types that cross.

use std::ffi::{c_char, CStr, CString};
use std::sync::OnceLock;

const BUILD: &str = include_str!(concat!(env!("OUT_DIR"), "/abi-build.txt"));

/// This library's fingerprint, one `part: value` per line.
pub fn fingerprint() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| format!("{BUILD}{}", runtime_part()))
}

fn runtime_part() -> String {
    use candle_core::utils;
    let on = |b: bool, name: &'static str| if b { Some(name) } else { None };
    let features: Vec<&str> = [
        on(utils::cuda_is_available(), "cuda"),
        on(utils::metal_is_available(), "metal"),
        on(utils::has_mkl(), "mkl"),
        on(utils::has_accelerate(), "accelerate"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let features = if features.is_empty() {
        "cpu".to_string()
    } else {
        features.join("+")
    };
    macro_rules! layout {
        ($($t:ty),* $(,)?) => {
            [$(format!("{} {}/{}", short(std::any::type_name::<$t>()), std::mem::size_of::<$t>(), std::mem::align_of::<$t>())),*].join(", ")
        };
    }
    format!(
        "candle-core features: {features}\nlayout: {}\n",
        layout!(
            candle_core::Tensor,
            candle_core::Device,
            candle_core::Error,
            serde_json::Value,
            serde_json::Map<String, serde_json::Value>,
            serde_json::Number,
            toml::Table,
            toml::Value,
            tracing::Dispatch,
            crate::error::FamError,
            crate::error::Problem,
            crate::records::Explanation,
            crate::traits::Features,
            crate::traits::InputSpec,
            crate::plugin::Registrar,
            crate::host::HostServices,
        )
    )
}

fn short(name: &str) -> &str {
    name.split('<').next().unwrap_or(name)
}

/// The fingerprint as a C string, for [`PluginDeclaration`](crate::plugin::PluginDeclaration).
#[doc(hidden)]
pub extern "C" fn fingerprint_c() -> *const c_char {
    static C: OnceLock<CString> = OnceLock::new();
    C.get_or_init(|| CString::new(fingerprint().replace('\0', "")).unwrap_or_default())
        .as_ptr()
}

/// Reads a fingerprint a library returned.
///
/// # Safety
/// `p` must be a NUL-terminated string that stays valid for the call.
#[doc(hidden)]
pub unsafe fn read_c(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// One part that differs between two fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub part: String,
    pub plugin: String,
    pub host: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: plugin has `{}`, host has `{}`",
            self.part, self.plugin, self.host
        )
    }
}

fn parts(text: &str) -> Vec<(&str, &str)> {
    text.lines().filter_map(|l| l.split_once(": ")).collect()
}

/// The parts of `plugin` that differ from `host` (a part only one side has differs too).
pub fn compare(plugin: &str, host: &str) -> Vec<Difference> {
    let (p, h) = (parts(plugin), parts(host));
    let mut out = Vec::new();
    let value = |v: &[(&str, &str)], k: &str| {
        v.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| "(missing)".into())
    };
    let mut keys: Vec<&str> = h.iter().map(|(k, _)| *k).collect();
    keys.extend(
        p.iter()
            .map(|(k, _)| *k)
            .filter(|k| !h.iter().any(|(hk, _)| hk == k)),
    );
    for k in keys {
        let (pv, hv) = (value(&p, k), value(&h, k));
        if pv != hv {
            out.push(Difference {
                part: k.to_string(),
                plugin: pv,
                host: hv,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_names_every_part() {
        let f = fingerprint();
        for part in [
            "fam-core: ",
            "rustc: ",
            "target: ",
            "panic: ",
            "candle-core: ",
            "serde_json: ",
            "toml: ",
            "tracing: ",
            "candle-core features: ",
            "layout: ",
        ] {
            assert!(
                f.contains(&format!("\n{part}")) || f.starts_with(part),
                "{part} in\n{f}"
            );
        }
        assert!(!f.contains("no Cargo.lock"), "{f}");
        assert!(compare(f, f).is_empty());
    }

    #[test]
    fn another_candle_feature_set_is_a_named_difference() {
        let host = fingerprint();
        let (mine, other) = if cfg!(feature = "cuda") {
            ("cuda", "cpu")
        } else {
            ("cpu", "cuda")
        };
        let plugin = host.replace(
            &format!("candle-core features: {mine}\n"),
            &format!("candle-core features: {other}\n"),
        );
        let d = compare(&plugin, host);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            d[0].to_string(),
            format!("candle-core features: plugin has `{other}`, host has `{mine}`")
        );
        let abort = host.replace("panic: unwind", "panic: abort");
        assert_eq!(compare(&abort, host)[0].part, "panic");
    }
}
