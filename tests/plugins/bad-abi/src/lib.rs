//! A plugin built as if with another candle feature set: its ABI fingerprint says candle
//! was compiled with `cuda` where it was not, and without it (`cpu`) where it was (the
//! declaration says it by hand, exactly as the other build's fingerprint would). The host
//! must refuse it before calling anything but the fingerprint, naming the part that differs.

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

use fam_core::plugin::{PluginDeclaration, Registrar, DECLARATION_LAYOUT, MAGIC};

extern "C" fn fingerprint() -> *const c_char {
    static F: OnceLock<CString> = OnceLock::new();
    F.get_or_init(|| {
        let real = fam_core::abi::fingerprint();
        let changed = real
            .lines()
            .map(|l| {
                if let Some(features) = l.strip_prefix("candle-core features: ") {
                    let other = if features == "cpu" { "cuda" } else { "cpu" };
                    format!("candle-core features: {other}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        CString::new(changed).unwrap()
    })
    .as_ptr()
}

#[no_mangle]
pub static FAM_PLUGIN_DECLARATION: PluginDeclaration = PluginDeclaration {
    magic: MAGIC,
    layout: DECLARATION_LAYOUT,
    fingerprint,
    name: c"test_bad_abi".as_ptr(),
    version: c"0.0.0".as_ptr(),
    register,
};

fn register(_: &mut Registrar) {
    panic!("the host called register on a plugin with a mismatched ABI");
}
