//! Declares a plugin ABI version this host does not speak; the host must refuse it before
//! calling anything.

use fam_core::plugin::{PluginDeclaration, Registrar};

#[no_mangle]
pub static FAM_PLUGIN_DECLARATION: PluginDeclaration = PluginDeclaration {
    abi_version: 999,
    core_version: fam_core::plugin::CORE_VERSION_C.as_ptr(),
    rustc_version: fam_core::plugin::RUSTC_VERSION_C.as_ptr(),
    features: fam_core::plugin::FEATURES_C.as_ptr(),
    name: c"test_bad_abi".as_ptr(),
    version: c"0.0.0".as_ptr(),
    register,
};

fn register(_: &mut Registrar) {
    panic!("the host called register on a plugin with a mismatched ABI");
}
