//! Finding, checking and loading plugin libraries (the host side of the plugin boundary).

use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};

use fam_core::error::{FamError, Result};
use fam_core::host::HostServices;
use fam_core::plugin::*;

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
        self.absorb(name, "static", PathBuf::from("<static>"), r.finish()?)
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
        // SAFETY: the declaration is at least as long as its two leading fields in every
        // fam that exported this symbol (the oldest had a `u32` and pointers).
        if decl.magic != MAGIC || decl.layout != DECLARATION_LAYOUT {
            // fam before the ABI fingerprint began its declaration with a `u32` version.
            let old =
                u32::from_le_bytes([decl.magic[0], decl.magic[1], decl.magic[2], decl.magic[3]]);
            let theirs = if decl.magic == MAGIC {
                format!("declaration layout {}", decl.layout)
            } else if (1..1000).contains(&old) {
                format!("plugin ABI version {old}, from before ABI fingerprints")
            } else {
                "a declaration fam does not know".to_string()
            };
            return Err(FamError::PluginMismatch {
                path: path.to_path_buf(),
                what: "plugin declaration",
                plugin: theirs,
                host: format!("declaration layout {DECLARATION_LAYOUT} with an ABI fingerprint"),
            });
        }
        // SAFETY: a declaration of this layout holds a plain C function returning a static
        // NUL-terminated string.
        let theirs = unsafe { fam_core::abi::read_c((decl.fingerprint)()) };
        let differences = fam_core::abi::compare(&theirs, fam_core::abi::fingerprint());
        if !differences.is_empty() {
            return Err(FamError::AbiMismatch {
                path: path.to_path_buf(),
                differences: differences.iter().map(|d| d.to_string()).collect(),
            });
        }
        // SAFETY: with a matching fingerprint these are NUL-terminated static strings.
        let text = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        let name = text(decl.name);
        let version = text(decl.version);
        if let Some(prev) = self.loaded.get(&name) {
            if prev.path != path {
                tracing::debug!(plugin = %name, kept = %prev.path.display(), skipped = %path.display(), "plugin already loaded");
            }
            return Ok(name);
        }
        let mut r = Registrar::with_services(HostServices::of_this_process());
        (decl.register)(&mut r);
        let r = r.finish()?;
        tracing::debug!(plugin = %name, version = %version, path = %path.display(), "plugin loaded");
        self.absorb(&name, &version, path.to_path_buf(), r)?;
        Ok(name)
    }

    fn absorb(&mut self, name: &str, version: &str, path: PathBuf, r: Registered) -> Result<()> {
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
