//! Plugins: the declaration a plugin library exports, the registrar it fills, the guards
//! that turn a panic inside a plugin into an error, and the host that finds and loads them.
//!
//! A plugin is a `cdylib` that exports one symbol, [`DECLARATION_SYMBOL`], a
//! [`PluginDeclaration`] whose leading fields are plain C data (ABI version, fam-core version,
//! rustc version, build features). The host checks all of them before it calls anything in
//! the library, and refuses a mismatch with an error that names both sides. Plugin objects
//! are Rust trait objects, so a plugin must be built by the same rustc against the same
//! fam-core; that is exactly what the declaration checks.
//!
//! Loaded libraries are never unloaded: every object a plugin creates can rely on its code
//! staying mapped for the life of the process (unloading a Rust library whose thread pools
//! still run is a crash waiting to happen).

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{FamError, Problem, Result};
use crate::explain::Explanation;
use crate::output::OutputSink;
use crate::traits::{Backbone, Features, InputSpec, LayerInfo, Renderer, Similarity};

/// Bumped whenever the declaration or any trait crossing the boundary changes.
pub const ABI_VERSION: u32 = 3;
/// The fam-core version a plugin was compiled against.
pub const CORE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The compiler that built this copy of fam-core.
pub const RUSTC_VERSION: &str = env!("FAM_RUSTC_VERSION");
/// Build features that change the layout of types crossing the boundary.
pub const FEATURES: &str = if cfg!(feature = "cuda") {
    "cuda"
} else {
    "cpu"
};

/// Name of the symbol every plugin library exports.
pub const DECLARATION_SYMBOL: &[u8] = b"FAM_PLUGIN_DECLARATION\0";

#[doc(hidden)]
pub const CORE_VERSION_C: &CStr = c_str(concat!(env!("CARGO_PKG_VERSION"), "\0"));
#[doc(hidden)]
pub const RUSTC_VERSION_C: &CStr = c_str(concat!(env!("FAM_RUSTC_VERSION"), "\0"));
#[doc(hidden)]
pub const FEATURES_C: &CStr = if cfg!(feature = "cuda") {
    c"cuda"
} else {
    c"cpu"
};

#[doc(hidden)]
pub const fn c_str(s: &'static str) -> &'static CStr {
    match CStr::from_bytes_with_nul(s.as_bytes()) {
        Ok(c) => c,
        Err(_) => panic!("not a NUL-terminated string"),
    }
}

/// Options table of a pipeline section, checked by the plugin itself.
pub type Options = toml::Table;

/// What a plugin library exports. The fields before `register` are C data that the host can
/// read from any library; `register` is called only after they all match.
#[repr(C)]
pub struct PluginDeclaration {
    pub abi_version: u32,
    pub core_version: *const c_char,
    pub rustc_version: *const c_char,
    pub features: *const c_char,
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
                abi_version: $crate::plugin::ABI_VERSION,
                core_version: $crate::plugin::CORE_VERSION_C.as_ptr(),
                rustc_version: $crate::plugin::RUSTC_VERSION_C.as_ptr(),
                features: $crate::plugin::FEATURES_C.as_ptr(),
                name: $crate::plugin::c_str(concat!($name, "\0")).as_ptr(),
                version: $crate::plugin::c_str(concat!(env!("CARGO_PKG_VERSION"), "\0")).as_ptr(),
                register: __fam_plugin_register,
            };

        fn __fam_plugin_register(r: &mut $crate::plugin::Registrar) {
            r.set_plugin_name($name);
            r.install_log_dispatch();
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
    log: Option<tracing::Dispatch>,
    backbones: Vec<BackboneEntry>,
    similarities: Vec<SimilarityEntry>,
    renderers: Vec<RendererEntry>,
    error: Option<FamError>,
}

impl Registrar {
    /// A registrar for statically linked plugins (tests, embedding fam as a library).
    pub fn new() -> Self {
        Self::default()
    }

    #[doc(hidden)]
    pub fn set_plugin_name(&mut self, name: &str) {
        self.plugin = name.to_string();
    }

    #[doc(hidden)]
    pub fn fail(&mut self, e: FamError) {
        self.error = Some(e);
    }

    /// Forwards the plugin's `tracing` events to the host's subscriber (each library has its
    /// own copy of `tracing`'s global state).
    #[doc(hidden)]
    pub fn install_log_dispatch(&self) {
        if let Some(d) = &self.log {
            // A `Dispatch` made here registers with this library's callsites; the host's own
            // `Dispatch` value would not, and every event would be filtered out.
            let _ =
                tracing::dispatcher::set_global_default(tracing::Dispatch::new(Forward(d.clone())));
        }
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
                Ok(Box::new(GuardedBackbone {
                    plugin: plugin.clone(),
                    inner,
                }))
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
                Ok(Box::new(GuardedSimilarity {
                    plugin: plugin.clone(),
                    inner,
                }))
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
                Ok(Box::new(GuardedRenderer {
                    plugin: plugin.clone(),
                    inner,
                }))
            }),
        });
    }
}

/// A subscriber that hands everything to the host's dispatcher.
struct Forward(tracing::Dispatch);

impl tracing::Subscriber for Forward {
    fn register_callsite(
        &self,
        m: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.0.register_callsite(m)
    }
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        self.0.enabled(m)
    }
    fn new_span(&self, a: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(a)
    }
    fn record(&self, id: &tracing::span::Id, v: &tracing::span::Record<'_>) {
        self.0.record(id, v)
    }
    fn record_follows_from(&self, id: &tracing::span::Id, follows: &tracing::span::Id) {
        self.0.record_follows_from(id, follows)
    }
    fn event(&self, e: &tracing::Event<'_>) {
        self.0.event(e)
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.0.enter(id)
    }
    fn exit(&self, id: &tracing::span::Id) {
        self.0.exit(id)
    }
    fn clone_span(&self, id: &tracing::span::Id) -> tracing::span::Id {
        self.0.clone_span(id)
    }
    fn try_close(&self, id: tracing::span::Id) -> bool {
        self.0.try_close(id)
    }
}

fn guarded_validate(plugin: &str, f: impl FnOnce() -> Vec<Problem>) -> Vec<Problem> {
    guard(plugin, "validate", || Ok(f()))
        .unwrap_or_else(|e| vec![Problem::new("plugin", e.to_string())])
}

struct GuardedBackbone {
    plugin: String,
    inner: Box<dyn Backbone>,
}

impl Backbone for GuardedBackbone {
    fn describe(&self) -> String {
        guard(&self.plugin, "describe", || Ok(self.inner.describe()))
            .unwrap_or_else(|e| e.to_string())
    }
    fn input_spec(&self) -> InputSpec {
        // A pure accessor; a panic here is a plugin bug reported by the default spec's use.
        guard(&self.plugin, "input_spec", || Ok(self.inner.input_spec()))
            .unwrap_or_else(|_| InputSpec::imagenet())
    }
    fn device(&self) -> Device {
        guard(&self.plugin, "device", || Ok(self.inner.device())).unwrap_or(Device::Cpu)
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

struct GuardedSimilarity {
    plugin: String,
    inner: Box<dyn Similarity>,
}

impl Similarity for GuardedSimilarity {
    fn name(&self) -> String {
        guard(&self.plugin, "name", || Ok(self.inner.name())).unwrap_or_else(|e| e.to_string())
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
}

struct GuardedRenderer {
    plugin: String,
    inner: Box<dyn Renderer>,
}

impl Renderer for GuardedRenderer {
    fn name(&self) -> String {
        guard(&self.plugin, "name", || Ok(self.inner.name())).unwrap_or_else(|e| e.to_string())
    }
    fn render(&self, explanation: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        guard(&self.plugin, "Renderer::render", || {
            self.inner.render(explanation, out)
        })
    }
    fn render_eval(
        &self,
        report: &crate::eval::EvalReport,
        out: &mut dyn OutputSink,
    ) -> Result<()> {
        guard(&self.plugin, "Renderer::render_eval", || {
            self.inner.render_eval(report, out)
        })
    }
    fn runs_last(&self) -> bool {
        guard(&self.plugin, "Renderer::runs_last", || {
            Ok(self.inner.runs_last())
        })
        .unwrap_or(false)
    }
}

/// What a loaded plugin declared and registered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub path: PathBuf,
    pub backbones: Vec<(String, String)>,
    pub similarities: Vec<(String, String)>,
    pub renderers: Vec<(String, String)>,
}

/// Finds, checks and loads plugin libraries, and holds what they registered.
#[derive(Default)]
pub struct PluginHost {
    dirs: Vec<PathBuf>,
    loaded: BTreeMap<String, PluginInfo>,
    backbones: Vec<BackboneEntry>,
    similarities: Vec<SimilarityEntry>,
    renderers: Vec<RendererEntry>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("dirs", &self.dirs)
            .field("loaded", &self.loaded.keys())
            .finish()
    }
}

/// File name of a plugin library on this platform: `metrics` -> `libfam_plugin_metrics.so`.
pub fn library_file_name(plugin: &str) -> String {
    format!(
        "{}fam_plugin_{}{}",
        std::env::consts::DLL_PREFIX,
        plugin.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

impl PluginHost {
    /// A host searching `extra_dirs` first, then `FAM_PLUGIN_PATH`, then the folder of the
    /// running executable.
    pub fn new(extra_dirs: &[PathBuf]) -> Self {
        let mut dirs: Vec<PathBuf> = extra_dirs.to_vec();
        if let Some(p) = std::env::var_os("FAM_PLUGIN_PATH") {
            dirs.extend(std::env::split_paths(&p).filter(|p| !p.as_os_str().is_empty()));
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            dirs.push(dir);
        }
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|d| seen.insert(d.clone()));
        Self {
            dirs,
            ..Self::default()
        }
    }

    pub fn search_dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Adds plugins linked into this binary (no dynamic loading).
    pub fn add_static(&mut self, name: &str, register: fn(&mut Registrar)) -> Result<()> {
        let mut r = Registrar::new();
        r.set_plugin_name(name);
        guard(name, "register", || {
            register(&mut r);
            Ok(())
        })?;
        self.absorb(name, "static", PathBuf::from("<static>"), r)
    }

    /// Where the library of plugin `name` would be found, if anywhere.
    pub fn locate(&self, name: &str) -> Option<PathBuf> {
        let file = library_file_name(name);
        self.dirs
            .iter()
            .map(|d| d.join(&file))
            .find(|p| p.is_file())
    }

    /// Loads plugin `name` (once) from the search folders.
    pub fn load(&mut self, name: &str) -> Result<&PluginInfo> {
        if self.loaded.contains_key(name) {
            return Ok(&self.loaded[name]);
        }
        let path = self.locate(name).ok_or_else(|| FamError::Plugin {
            path: PathBuf::from(library_file_name(name)),
            message: format!(
                "plugin `{name}` not found in {}; build it with `cargo build --release` or add its folder to `run.plugin_dirs` or FAM_PLUGIN_PATH",
                self.dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        let declared = self.load_path(&path)?;
        if declared != name {
            return Err(FamError::Plugin {
                path,
                message: format!("declares the name `{declared}`, expected `{name}`"),
            });
        }
        Ok(&self.loaded[name])
    }

    /// Loads the library at `path`, checks its declaration and registers what it provides.
    /// Returns the plugin's declared name.
    pub fn load_path(&mut self, path: &Path) -> Result<String> {
        let perr = |message: String| FamError::Plugin {
            path: path.to_path_buf(),
            message,
        };
        // SAFETY: loading a library runs its initializers; plugin folders are trusted
        // configuration, like the PATH.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| perr(format!("cannot load library: {e}")))?;
        // Never unloaded: see the module docs.
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        // SAFETY: the symbol is a `PluginDeclaration` whose leading fields are C data.
        let decl: &'static PluginDeclaration = unsafe {
            let sym = lib
                .get::<*const PluginDeclaration>(DECLARATION_SYMBOL)
                .map_err(|_| {
                    perr("not a fam plugin: it exports no FAM_PLUGIN_DECLARATION symbol (use fam_core::export_plugin!)".into())
                })?;
            &**sym
        };
        if decl.abi_version != ABI_VERSION {
            return Err(FamError::PluginMismatch {
                path: path.to_path_buf(),
                what: "plugin ABI version",
                plugin: decl.abi_version.to_string(),
                host: ABI_VERSION.to_string(),
            });
        }
        // SAFETY: with a matching ABI version these are NUL-terminated static strings.
        let text = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        for (what, theirs, ours) in [
            ("fam-core", text(decl.core_version), CORE_VERSION),
            ("rustc", text(decl.rustc_version), RUSTC_VERSION),
            ("build features", text(decl.features), FEATURES),
        ] {
            if theirs != ours {
                return Err(FamError::PluginMismatch {
                    path: path.to_path_buf(),
                    what,
                    plugin: theirs,
                    host: ours.to_string(),
                });
            }
        }
        let name = text(decl.name);
        let version = text(decl.version);
        if let Some(prev) = self.loaded.get(&name) {
            if prev.path != path {
                tracing::debug!(plugin = %name, kept = %prev.path.display(), skipped = %path.display(), "plugin already loaded");
            }
            return Ok(name);
        }
        let mut r = Registrar {
            log: Some(tracing::dispatcher::get_default(|d| d.clone())),
            ..Registrar::default()
        };
        (decl.register)(&mut r);
        if let Some(e) = r.error.take() {
            return Err(e);
        }
        tracing::debug!(plugin = %name, version = %version, path = %path.display(), "plugin loaded");
        self.absorb(&name, &version, path.to_path_buf(), r)?;
        Ok(name)
    }

    fn absorb(&mut self, name: &str, version: &str, path: PathBuf, r: Registrar) -> Result<()> {
        let kinds = |v: Vec<(&String, &String)>| {
            v.into_iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect::<Vec<_>>()
        };
        let info = PluginInfo {
            name: name.to_string(),
            version: version.to_string(),
            path,
            backbones: kinds(
                r.backbones
                    .iter()
                    .map(|e| (&e.kind, &e.description))
                    .collect(),
            ),
            similarities: kinds(
                r.similarities
                    .iter()
                    .map(|e| (&e.kind, &e.description))
                    .collect(),
            ),
            renderers: kinds(
                r.renderers
                    .iter()
                    .map(|e| (&e.kind, &e.description))
                    .collect(),
            ),
        };
        self.backbones.extend(r.backbones.into_iter().map(|mut e| {
            e.plugin = name.to_string();
            e
        }));
        self.similarities
            .extend(r.similarities.into_iter().map(|mut e| {
                e.plugin = name.to_string();
                e
            }));
        self.renderers.extend(r.renderers.into_iter().map(|mut e| {
            e.plugin = name.to_string();
            e
        }));
        self.loaded.insert(name.to_string(), info);
        Ok(())
    }

    /// Every plugin library in the search folders, loaded, with its info or its error.
    pub fn discover(&mut self) -> Vec<(PathBuf, Result<PluginInfo>)> {
        let prefix = format!("{}fam_plugin_", std::env::consts::DLL_PREFIX);
        let mut out = Vec::new();
        let mut seen_files = std::collections::HashSet::new();
        for dir in self.dirs.clone() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut paths: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with(&prefix) && n.ends_with(std::env::consts::DLL_SUFFIX)
                    })
                })
                .collect();
            paths.sort();
            for p in paths {
                let file = p.file_name().map(|f| f.to_os_string());
                if !seen_files.insert(file) {
                    continue;
                }
                let r = self.load_path(&p).map(|name| self.loaded[&name].clone());
                out.push((p, r));
            }
        }
        out
    }

    pub fn plugins(&self) -> impl Iterator<Item = &PluginInfo> {
        self.loaded.values()
    }

    pub fn backbone(&self, plugin: &str, kind: &str) -> Result<&BackboneEntry> {
        find(&self.backbones, "backbone", plugin, kind, |e| {
            (&e.plugin, &e.kind)
        })
    }

    pub fn similarity(&self, plugin: &str, kind: &str) -> Result<&SimilarityEntry> {
        find(&self.similarities, "similarity", plugin, kind, |e| {
            (&e.plugin, &e.kind)
        })
    }

    pub fn renderer(&self, plugin: &str, kind: &str) -> Result<&RendererEntry> {
        find(&self.renderers, "renderer", plugin, kind, |e| {
            (&e.plugin, &e.kind)
        })
    }
}

fn find<'a, E>(
    entries: &'a [E],
    what: &'static str,
    plugin: &str,
    kind: &str,
    key: impl Fn(&E) -> (&String, &String),
) -> Result<&'a E> {
    entries
        .iter()
        .find(|e| {
            let (p, k) = key(e);
            p == plugin && k == kind
        })
        .ok_or_else(|| FamError::UnknownKind {
            what,
            name: format!("{plugin}::{kind}"),
            available: entries
                .iter()
                .map(|e| {
                    let (p, k) = key(e);
                    format!("{p}::{k}")
                })
                .collect(),
        })
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

    fn register(r: &mut Registrar) {
        r.similarity("boom", "panics", |_| vec![], |_| Ok(Box::new(Boom)));
    }

    #[test]
    fn panics_in_plugin_methods_become_errors() {
        let mut host = PluginHost::default();
        host.add_static("test", register).unwrap();
        let sim = host
            .similarity("test", "boom")
            .unwrap()
            .create(&Options::new())
            .unwrap();
        let err = sim.score(&[1.0], &[1.0]).unwrap_err();
        assert!(
            err.to_string()
                .contains("plugin `test` panicked in Similarity::score: kaboom"),
            "{err}"
        );
    }

    #[test]
    fn unknown_kind_lists_what_exists() {
        let mut host = PluginHost::default();
        host.add_static("test", register).unwrap();
        let err = host.similarity("test", "cosine").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no similarity named `test::cosine` (available: test::boom)"
        );
    }

    #[test]
    fn library_names_follow_the_platform() {
        let n = library_file_name("metrics");
        assert!(n.contains("fam_plugin_metrics"));
    }
}
