//! Plugins: the declaration a plugin library exports, the registrar it fills and the guards
//! that turn a panic inside a plugin into an error. The host side (finding and loading
//! libraries) is `fam_engine::loader`.
//!
//! A plugin is a `cdylib` that exports one symbol, [`DECLARATION_SYMBOL`], a
//! [`PluginDeclaration`] whose layout never changes: a magic tag, the layout number, and a
//! function returning the library's ABI fingerprint ([`crate::abi`]). The host compares the
//! fingerprint with its own before it calls anything else, and refuses a mismatch with an
//! error that names each part that differs.
//!
//! Loaded libraries are never unloaded: every object a plugin creates can rely on its code
//! staying mapped for the life of the process (unloading a Rust library whose thread pools
//! still run is a crash waiting to happen).

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use candle_core::{Device, Tensor};

use crate::error::{FamError, Problem, Result};
use crate::host::HostServices;
use crate::output::OutputSink;
use crate::records::EvalReport;
use crate::records::Explanation;
use crate::traits::{Backbone, Features, InputSpec, LayerInfo, Renderer, Similarity};

/// Name of the symbol every plugin library exports.
pub const DECLARATION_SYMBOL: &[u8] = b"FAM_PLUGIN_DECLARATION\0";
/// The first bytes of every declaration.
pub const MAGIC: [u8; 8] = *b"FAMPLUG\0";
/// The layout of [`PluginDeclaration`]; it has never changed, and the ABI fingerprint, not
/// this number, covers everything behind it.
pub const DECLARATION_LAYOUT: u32 = 1;

#[doc(hidden)]
pub const fn c_str(s: &'static str) -> &'static CStr {
    match CStr::from_bytes_with_nul(s.as_bytes()) {
        Ok(c) => c,
        Err(_) => panic!("not a NUL-terminated string"),
    }
}

/// Options table of a pipeline section, checked by the plugin itself.
pub type Options = toml::Table;

/// What a plugin library exports. The host reads `magic` and `layout`, then calls
/// `fingerprint` (plain C), and calls `register` only if the fingerprints match.
#[repr(C)]
pub struct PluginDeclaration {
    pub magic: [u8; 8],
    pub layout: u32,
    pub fingerprint: extern "C" fn() -> *const c_char,
    pub name: *const c_char,
    pub version: *const c_char,
    pub register: fn(&mut Registrar),
}

// SAFETY: the pointers refer to immutable static C strings.
unsafe impl Sync for PluginDeclaration {}

/// Declares a plugin library. `register` is a `fn(&mut fam_core::plugin::Registrar)`.
///
/// ```ignore
/// fam_core::export_plugin!(name: "metrics", register: register);
/// fn register(r: &mut fam_core::plugin::Registrar) { /* r.similarity(...) */ }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name: $name:literal, register: $register:path $(,)?) => {
        #[no_mangle]
        pub static FAM_PLUGIN_DECLARATION: $crate::plugin::PluginDeclaration =
            $crate::plugin::PluginDeclaration {
                magic: $crate::plugin::MAGIC,
                layout: $crate::plugin::DECLARATION_LAYOUT,
                fingerprint: $crate::abi::fingerprint_c,
                name: $crate::plugin::c_str(concat!($name, "\0")).as_ptr(),
                version: $crate::plugin::c_str(concat!(env!("CARGO_PKG_VERSION"), "\0")).as_ptr(),
                register: __fam_plugin_register,
            };

        fn __fam_plugin_register(r: &mut $crate::plugin::Registrar) {
            r.set_plugin_name($name);
            r.adopt_host_services();
            if let Err(e) = $crate::plugin::guard($name, "register", || {
                $register(r);
                Ok(())
            }) {
                r.fail(e);
            }
        }
    };
}

/// Runs `f`, turning a panic into [`FamError::PluginPanic`]. Used on the plugin side of
/// every call, so a panic never unwinds across the library boundary.
pub fn guard<T>(plugin: &str, method: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(FamError::PluginPanic {
                plugin: plugin.to_string(),
                method: method.to_string(),
                message,
            })
        }
    }
}

/// Everything a backbone factory gets from the pipeline.
#[derive(Debug, Clone, Default)]
pub struct BackboneConfig {
    pub kind: String,
    /// Absolute path of the weights file, if the pipeline names one.
    pub weights: Option<PathBuf>,
    /// The feature layer, if the pipeline names one (else the backbone's default).
    pub layer: Option<String>,
    pub options: Options,
}

type ValidateFn<C> = Box<dyn Fn(&C) -> Vec<Problem> + Send + Sync>;
type CreateFn<C, T> = Box<dyn Fn(&C) -> Result<Box<T>> + Send + Sync>;
type CreateBackboneFn =
    Box<dyn Fn(&BackboneConfig, &Device) -> Result<Box<dyn Backbone>> + Send + Sync>;

/// A backbone kind provided by a plugin.
pub struct BackboneEntry {
    pub plugin: String,
    pub kind: String,
    pub description: String,
    validate: ValidateFn<BackboneConfig>,
    create: CreateBackboneFn,
}

/// A similarity kind provided by a plugin.
pub struct SimilarityEntry {
    pub plugin: String,
    pub kind: String,
    pub description: String,
    validate: ValidateFn<Options>,
    create: CreateFn<Options, dyn Similarity>,
}

/// A renderer kind provided by a plugin.
pub struct RendererEntry {
    pub plugin: String,
    pub kind: String,
    pub description: String,
    validate: ValidateFn<Options>,
    create: CreateFn<Options, dyn Renderer>,
}

macro_rules! entry_api {
    ($entry:ty, $cfg:ty) => {
        impl $entry {
            /// Checks a configuration without loading anything heavy.
            pub fn validate(&self, cfg: &$cfg) -> Vec<Problem> {
                (self.validate)(cfg)
            }
        }
        impl std::fmt::Debug for $entry {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}::{}", self.plugin, self.kind)
            }
        }
    };
}
entry_api!(BackboneEntry, BackboneConfig);
entry_api!(SimilarityEntry, Options);
entry_api!(RendererEntry, Options);

impl BackboneEntry {
    pub fn create(&self, cfg: &BackboneConfig, device: &Device) -> Result<Box<dyn Backbone>> {
        (self.create)(cfg, device)
    }
}
impl SimilarityEntry {
    pub fn create(&self, options: &Options) -> Result<Box<dyn Similarity>> {
        (self.create)(options)
    }
}
impl RendererEntry {
    pub fn create(&self, options: &Options) -> Result<Box<dyn Renderer>> {
        (self.create)(options)
    }
}

/// What a plugin fills in when it registers. Its generic methods are instantiated inside the
/// plugin, so the panic guards they install run on the plugin's side of the boundary.
#[derive(Default)]
pub struct Registrar {
    plugin: String,
    services: Option<HostServices>,
    backbones: Vec<BackboneEntry>,
    similarities: Vec<SimilarityEntry>,
    renderers: Vec<RendererEntry>,
    error: Option<FamError>,
}

/// What a plugin registered, taken by the host.
#[derive(Debug, Default)]
pub struct Registered {
    pub backbones: Vec<BackboneEntry>,
    pub similarities: Vec<SimilarityEntry>,
    pub renderers: Vec<RendererEntry>,
}

impl Registrar {
    /// A registrar for statically linked plugins (tests, embedding fam as a library).
    pub fn new() -> Self {
        Self::default()
    }

    /// A registrar handing `services` to the plugin (the host, loading a library).
    #[doc(hidden)]
    pub fn with_services(services: HostServices) -> Self {
        Self {
            services: Some(services),
            ..Self::default()
        }
    }

    #[doc(hidden)]
    pub fn set_plugin_name(&mut self, name: &str) {
        self.plugin = name.to_string();
    }

    #[doc(hidden)]
    pub fn fail(&mut self, e: FamError) {
        self.error = Some(e);
    }

    /// Makes the plugin's copies of the shared things the host's ([`crate::host`]).
    #[doc(hidden)]
    pub fn adopt_host_services(&self) {
        if let Some(s) = &self.services {
            s.adopt();
        }
    }

    /// What was registered, or the error registration ended with.
    #[doc(hidden)]
    pub fn finish(mut self) -> Result<Registered> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        Ok(Registered {
            backbones: self.backbones,
            similarities: self.similarities,
            renderers: self.renderers,
        })
    }

    /// Registers a backbone kind. `validate` must not load weights.
    pub fn backbone<V, C>(&mut self, kind: &str, description: &str, validate: V, create: C)
    where
        V: Fn(&BackboneConfig) -> Vec<Problem> + Send + Sync + 'static,
        C: Fn(&BackboneConfig, &Device) -> Result<Box<dyn Backbone>> + Send + Sync + 'static,
    {
        let plugin = self.plugin.clone();
        let p2 = plugin.clone();
        self.backbones.push(BackboneEntry {
            plugin: plugin.clone(),
            kind: kind.to_string(),
            description: description.to_string(),
            validate: Box::new(move |cfg| guarded_validate(&p2, || validate(cfg))),
            create: Box::new(move |cfg, device| {
                let inner = guard(&plugin, "create backbone", || create(cfg, device))?;
                Ok(Box::new(GuardedBackbone::new(&plugin, inner)?))
            }),
        });
    }

    /// Registers a similarity kind.
    pub fn similarity<V, C>(&mut self, kind: &str, description: &str, validate: V, create: C)
    where
        V: Fn(&Options) -> Vec<Problem> + Send + Sync + 'static,
        C: Fn(&Options) -> Result<Box<dyn Similarity>> + Send + Sync + 'static,
    {
        let plugin = self.plugin.clone();
        let p2 = plugin.clone();
        self.similarities.push(SimilarityEntry {
            plugin: plugin.clone(),
            kind: kind.to_string(),
            description: description.to_string(),
            validate: Box::new(move |o| guarded_validate(&p2, || validate(o))),
            create: Box::new(move |o| {
                let inner = guard(&plugin, "create similarity", || create(o))?;
                Ok(Box::new(GuardedSimilarity::new(&plugin, inner)?))
            }),
        });
    }

    /// Registers a renderer kind.
    pub fn renderer<V, C>(&mut self, kind: &str, description: &str, validate: V, create: C)
    where
        V: Fn(&Options) -> Vec<Problem> + Send + Sync + 'static,
        C: Fn(&Options) -> Result<Box<dyn Renderer>> + Send + Sync + 'static,
    {
        let plugin = self.plugin.clone();
        let p2 = plugin.clone();
        self.renderers.push(RendererEntry {
            plugin: plugin.clone(),
            kind: kind.to_string(),
            description: description.to_string(),
            validate: Box::new(move |o| guarded_validate(&p2, || validate(o))),
            create: Box::new(move |o| {
                let inner = guard(&plugin, "create renderer", || create(o))?;
                Ok(Box::new(GuardedRenderer::new(&plugin, inner)?))
            }),
        });
    }
}

fn guarded_validate(plugin: &str, f: impl FnOnce() -> Vec<Problem>) -> Vec<Problem> {
    guard(plugin, "validate", || Ok(f()))
        .unwrap_or_else(|e| vec![Problem::new("plugin", e.to_string())])
}

/// A plugin's backbone behind panic guards. Its plain values (description, input spec,
/// device) are asked for once, under a guard, when it is created: a panic there fails the
/// creation with an error naming the method, and no later call can turn into a default.
struct GuardedBackbone {
    plugin: String,
    inner: Box<dyn Backbone>,
    describe: String,
    input_spec: InputSpec,
    device: Device,
}

impl GuardedBackbone {
    fn new(plugin: &str, inner: Box<dyn Backbone>) -> Result<Self> {
        let describe = guard(plugin, "Backbone::describe", || Ok(inner.describe()))?;
        let input_spec = guard(plugin, "Backbone::input_spec", || Ok(inner.input_spec()))?;
        let device = guard(plugin, "Backbone::device", || Ok(inner.device()))?;
        Ok(Self {
            plugin: plugin.to_string(),
            inner,
            describe,
            input_spec,
            device,
        })
    }
}

impl Backbone for GuardedBackbone {
    fn describe(&self) -> String {
        self.describe.clone()
    }
    fn input_spec(&self) -> InputSpec {
        self.input_spec.clone()
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    fn forward(&self, batch: &Tensor) -> Result<Features> {
        guard(&self.plugin, "Backbone::forward", || {
            self.inner.forward(batch)
        })
    }
    fn layers(&self) -> Result<Vec<LayerInfo>> {
        guard(&self.plugin, "Backbone::layers", || self.inner.layers())
    }
    fn pullback(&self, u: &Tensor) -> Result<Option<(Tensor, Vec<f32>)>> {
        guard(&self.plugin, "Backbone::pullback", || {
            self.inner.pullback(u)
        })
    }
}

/// A plugin's similarity behind panic guards; its name is asked for once, at creation.
struct GuardedSimilarity {
    plugin: String,
    inner: Box<dyn Similarity>,
    name: String,
}

impl GuardedSimilarity {
    fn new(plugin: &str, inner: Box<dyn Similarity>) -> Result<Self> {
        let name = guard(plugin, "Similarity::name", || Ok(inner.name()))?;
        Ok(Self {
            plugin: plugin.to_string(),
            inner,
            name,
        })
    }
}

impl Similarity for GuardedSimilarity {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn score(&self, e: &[f32], r: &[f32]) -> Result<f32> {
        guard(&self.plugin, "Similarity::score", || self.inner.score(e, r))
    }
    fn contributions(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        guard(&self.plugin, "Similarity::contributions", || {
            self.inner.contributions(e, r)
        })
    }
    fn gradient(&self, e: &[f32], r: &[f32]) -> Result<Vec<f32>> {
        guard(&self.plugin, "Similarity::gradient", || {
            self.inner.gradient(e, r)
        })
    }
    fn distance(&self, e: &[f32], r: &[f32]) -> Result<Option<f32>> {
        guard(&self.plugin, "Similarity::distance", || {
            self.inner.distance(e, r)
        })
    }
    fn keys_from_inner_products(
        &self,
        dots: &mut [f32],
        e_sq: &[f32],
        r_sq: &[f32],
    ) -> Result<bool> {
        guard(&self.plugin, "Similarity::keys_from_inner_products", || {
            self.inner.keys_from_inner_products(dots, e_sq, r_sq)
        })
    }
    fn inner_product_form(
        &self,
        e: &[f32],
        r: &[f32],
    ) -> Result<Option<crate::traits::InnerProductForm>> {
        guard(&self.plugin, "Similarity::inner_product_form", || {
            self.inner.inner_product_form(e, r)
        })
    }
}

/// A plugin's renderer behind panic guards; its name and `runs_last` are asked for once,
/// at creation.
struct GuardedRenderer {
    plugin: String,
    inner: Box<dyn Renderer>,
    name: String,
    runs_last: bool,
}

impl GuardedRenderer {
    fn new(plugin: &str, inner: Box<dyn Renderer>) -> Result<Self> {
        let name = guard(plugin, "Renderer::name", || Ok(inner.name()))?;
        let runs_last = guard(plugin, "Renderer::runs_last", || Ok(inner.runs_last()))?;
        Ok(Self {
            plugin: plugin.to_string(),
            inner,
            name,
            runs_last,
        })
    }
}

impl Renderer for GuardedRenderer {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn render(&self, explanation: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        guard(&self.plugin, "Renderer::render", || {
            self.inner.render(explanation, out)
        })
    }
    fn render_eval(&self, report: &EvalReport, out: &mut dyn OutputSink) -> Result<()> {
        guard(&self.plugin, "Renderer::render_eval", || {
            self.inner.render_eval(report, out)
        })
    }
    fn runs_last(&self) -> bool {
        self.runs_last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Boom;
    impl Similarity for Boom {
        fn name(&self) -> String {
            "boom".into()
        }
        fn score(&self, _: &[f32], _: &[f32]) -> Result<f32> {
            panic!("kaboom")
        }
        fn contributions(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            Ok(vec![])
        }
        fn gradient(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            Ok(vec![])
        }
    }

    struct NoName;
    impl Similarity for NoName {
        fn name(&self) -> String {
            panic!("no name")
        }
        fn score(&self, _: &[f32], _: &[f32]) -> Result<f32> {
            Ok(0.0)
        }
        fn contributions(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            Ok(vec![])
        }
        fn gradient(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
            Ok(vec![])
        }
    }

    fn registered() -> Registered {
        let mut r = Registrar::new();
        r.set_plugin_name("test");
        r.similarity("boom", "panics", |_| vec![], |_| Ok(Box::new(Boom)));
        r.similarity(
            "noname",
            "panics in name",
            |_| vec![],
            |_| Ok(Box::new(NoName)),
        );
        r.finish().unwrap()
    }

    #[test]
    fn panics_in_plugin_methods_become_errors() {
        let r = registered();
        let sim = r.similarities[0].create(&Options::new()).unwrap();
        let err = sim.score(&[1.0], &[1.0]).unwrap_err();
        assert!(
            err.to_string()
                .contains("plugin `test` panicked in Similarity::score: kaboom"),
            "{err}"
        );
    }

    #[test]
    fn a_panic_in_a_plain_value_method_is_an_error_not_a_default() {
        let r = registered();
        let err = r.similarities[1].create(&Options::new()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "plugin `test` panicked in Similarity::name: no name"
        );
    }
}
