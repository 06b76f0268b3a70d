//! Pipeline files (DESIGN.md section 4): the TOML schema, loading, and validation that
//! reports every problem at once before any model is loaded.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::loader::PluginHost;
use fam_core::error::{FamError, Problem, Result};
use fam_core::explain::Weighting;
use fam_core::plugin::{BackboneConfig, Options};
use fam_core::traits::{InputSpec, ResizePolicy};

/// A whole pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub run: RunSection,
    pub backbone: BackboneSection,
    pub similarity: PluginRef,
    #[serde(default)]
    pub explain: ExplainSection,
    pub task: TaskSection,
    /// Overrides of the backbone's own input pipeline.
    #[serde(default)]
    pub preprocess: Option<PreprocessSection>,
    #[serde(default)]
    pub render: Vec<PluginRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Output folder (relative to the pipeline file).
    pub output: PathBuf,
    /// Extra folders searched for plugin libraries (relative to the pipeline file).
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    /// Save each forward batch to `<output>/.fam-checkpoint/` so that `--resume` can
    /// continue an interrupted run (deleted when the run finishes).
    #[serde(default = "default_true")]
    pub checkpoint: bool,
    /// `strict`: an image that decodes only in part (a truncated JPEG or PNG) is an item
    /// failure; `lenient`: what decodes is explained, and the manifest lists the image.
    #[serde(default)]
    pub decoding: crate::preprocess::Decoding,
}

fn default_device() -> String {
    "cpu".into()
}

fn default_batch_size() -> usize {
    16
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSection {
    pub plugin: String,
    pub kind: String,
    #[serde(default)]
    pub weights: Option<PathBuf>,
    #[serde(default)]
    pub layer: Option<String>,
    /// Checked by the plugin itself.
    #[serde(default)]
    pub options: Options,
}

/// A plugin-provided object: `plugin`, `kind`, and options checked by the plugin.
#[derive(Debug, Clone, Deserialize)]
pub struct PluginRef {
    pub plugin: String,
    pub kind: String,
    #[serde(flatten)]
    pub options: Options,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainSection {
    #[serde(default)]
    pub weighting: Weighting,
    /// Beside each plain map of a query against one of several references (retrieval hits,
    /// few-shot classes), its contrast map against the other references (DESIGN.md §1.2).
    /// On by default; a few extra maps, no extra forward pass.
    #[serde(default = "yes")]
    pub contrast_maps: bool,
}

impl Default for ExplainSection {
    fn default() -> Self {
        Self {
            weighting: Weighting::default(),
            contrast_maps: true,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSection {
    /// Shorter side after resizing (with `crop`).
    pub resize: Option<u32>,
    /// Square center crop (with `resize`).
    pub crop: Option<u32>,
    /// Exact input width and height (instead of resize + crop).
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl PreprocessSection {
    /// Applies these overrides to a backbone's own input spec.
    pub fn apply(&self, mut spec: InputSpec) -> InputSpec {
        match (self.resize, self.crop, self.width, self.height) {
            (Some(resize), Some(crop), _, _) => {
                spec.resize = ResizePolicy::ResizeCrop { resize, crop }
            }
            (Some(resize), None, _, _) => {
                let crop = match spec.resize {
                    ResizePolicy::ResizeCrop { crop, .. } => crop.min(resize),
                    ResizePolicy::Exact { width, .. } => width.min(resize),
                };
                spec.resize = ResizePolicy::ResizeCrop { resize, crop }
            }
            (None, Some(crop), _, _) => {
                spec.resize = ResizePolicy::ResizeCrop { resize: crop, crop }
            }
            (None, None, Some(width), Some(height)) => {
                spec.resize = ResizePolicy::Exact { width, height }
            }
            _ => {}
        }
        if let Some(m) = self.mean {
            spec.mean = m;
        }
        if let Some(s) = self.std {
            spec.std = s;
        }
        spec
    }

    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (name, v) in [
            ("resize", self.resize),
            ("crop", self.crop),
            ("width", self.width),
            ("height", self.height),
        ] {
            if let Some(v) = v {
                if v == 0 || v > 4096 {
                    out.push(Problem::new(
                        format!("preprocess.{name}"),
                        format!("{v} is not a usable size (1 to 4096)"),
                    ));
                }
            }
        }
        if let (Some(r), Some(c)) = (self.resize, self.crop) {
            if c > r {
                out.push(Problem::new(
                    "preprocess.crop",
                    format!("crop {c} is larger than the resized shorter side {r}"),
                ));
            }
        }
        if (self.width.is_some() != self.height.is_some())
            || (self.width.is_some() && (self.resize.is_some() || self.crop.is_some()))
        {
            out.push(Problem::new(
                "preprocess",
                "give either `resize`/`crop` or both `width` and `height`",
            ));
        }
        if let Some(s) = self.std {
            if s.iter().any(|v| *v == 0.0 || !v.is_finite()) {
                out.push(Problem::new(
                    "preprocess.std",
                    format!("{s:?} has a zero or non-finite value"),
                ));
            }
        }
        out
    }
}

/// What to explain.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskSection {
    /// Explicit pairs of images: one score and two maps per pair.
    Pair { pairs: Vec<PairSpec> },
    /// Query images against a gallery: rank, keep `top_k`, map both sides of every hit.
    Retrieval {
        queries: ImageSet,
        /// The images to search; `fam-cli index` embeds them into `index`.
        #[serde(default)]
        gallery: Option<ImageSet>,
        /// A gallery index (`fam-cli index`) to search instead of embedding `gallery`.
        #[serde(default)]
        index: Option<PathBuf>,
        #[serde(default = "default_top_k")]
        top_k: usize,
        /// Skip gallery images with the same content as the query.
        #[serde(default = "default_true")]
        exclude_self: bool,
        /// Cache gallery embeddings (and hit feature maps) on disk, keyed by model file
        /// hash, layer, preprocessing and image content.
        #[serde(default = "default_true")]
        cache: bool,
        /// Where the cache lives (default: `<output>/cache`).
        #[serde(default)]
        cache_dir: Option<PathBuf>,
    },
    /// An N-way K-shot episode: `support/<class>/*` and `query/*` (or `query/<class>/*` for
    /// accuracy). Prototypes are mean support embeddings.
    FewShot {
        support: PathBuf,
        query: PathBuf,
        /// Map each query against every class, not only the predicted one.
        #[serde(default)]
        all_classes: bool,
        /// Feature transform before matching: "none", "l2n", or "cl2n" (SimpleShot:
        /// centre on the mean support embedding, then L2-normalize).
        #[serde(default)]
        transform: Transform,
        /// "none", or "others": explain the margin of the class over the other classes.
        #[serde(default)]
        contrast: Contrast,
    },
    /// Contrastive-model evaluation: a labelled reference bank (`bank/<class>/*`), queries
    /// (`queries/*` or `queries/<class>/*`), kNN or nearest centroid.
    Classify {
        bank: PathBuf,
        queries: PathBuf,
        #[serde(default)]
        method: ClassifyMethod,
        /// Neighbours for kNN (similarity-weighted vote).
        #[serde(default = "default_k")]
        k: usize,
        #[serde(default)]
        transform: Transform,
    },
}

fn default_k() -> usize {
    5
}

/// One of `count` contiguous parts of a run's items (`--shard K/N`): pairs for `pair`,
/// queries for the other tasks. Contiguous blocks keep the items in order, so merging the
/// shards' outputs in shard order gives the single run's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Shard {
    /// From 0.
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `K/N` (K from 1 to N).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a shard: write K/N, e.g. 2/8"))?;
        let (k, n): (usize, usize) = (
            k.trim()
                .parse()
                .map_err(|_| format!("`{k}` in `{s}` is not a number"))?,
            n.trim()
                .parse()
                .map_err(|_| format!("`{n}` in `{s}` is not a number"))?,
        );
        if n == 0 || k == 0 || k > n {
            return Err(format!("shard `{s}`: K must be between 1 and N"));
        }
        Ok(Self {
            index: k - 1,
            count: n,
        })
    }

    /// The items of this shard among `len`.
    pub fn range(&self, len: usize) -> std::ops::Range<usize> {
        len * self.index / self.count..len * (self.index + 1) / self.count
    }

    /// `K-of-N`, for folder names.
    pub fn label(&self) -> String {
        format!("{}-of-{}", self.index + 1, self.count)
    }
}

pub use fam_core::explain::{Contrast, Transform};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassifyMethod {
    #[default]
    Knn,
    Centroid,
}

fn default_top_k() -> usize {
    5
}

fn default_true() -> bool {
    true
}

/// A set of images: a folder (every PNG/JPEG in it, sorted by name) or a list of files.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageSet {
    Folder(PathBuf),
    Files(Vec<PathBuf>),
}

/// File extensions read from image folders.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "PNG"];

impl ImageSet {
    fn resolve(&mut self, fix: &impl Fn(&mut PathBuf)) {
        match self {
            ImageSet::Folder(p) => fix(p),
            ImageSet::Files(ps) => ps.iter_mut().for_each(fix),
        }
    }

    /// The image files, in a stable order.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        match self {
            ImageSet::Files(ps) => Ok(ps.clone()),
            ImageSet::Folder(dir) => {
                let rd = std::fs::read_dir(dir).map_err(|e| FamError::io(dir, e))?;
                let mut files: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.is_file()
                            && p.extension().is_some_and(|e| {
                                let e = e.to_string_lossy().to_ascii_lowercase();
                                IMAGE_EXTENSIONS.contains(&e.as_str())
                            })
                    })
                    .collect();
                files.sort();
                Ok(files)
            }
        }
    }

    fn problems(&self, field: &str) -> Vec<Problem> {
        match self.files() {
            Err(e) => vec![Problem::new(field, e.to_string())],
            Ok(f) if f.is_empty() => vec![Problem::new(field, "no images (PNG or JPEG) found")],
            Ok(f) => f
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.is_file())
                .map(|(i, p)| {
                    Problem::new(
                        format!("{field}[{i}]"),
                        format!("{} does not exist", p.display()),
                    )
                })
                .collect(),
        }
    }
}

impl TaskSection {
    pub fn name(&self) -> &'static str {
        match self {
            TaskSection::Pair { .. } => "pair",
            TaskSection::Retrieval { .. } => "retrieval",
            TaskSection::FewShot { .. } => "few_shot",
            TaskSection::Classify { .. } => "classify",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSpec {
    pub a: PathBuf,
    pub b: PathBuf,
}

/// Images of a folder: `folder/<class>/*` gives labelled images; plain files in `folder` are
/// unlabelled. Sorted by class, then by name.
pub fn labelled_images(folder: &Path) -> Result<Vec<(Option<String>, PathBuf)>> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| FamError::io(folder, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            let class = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for f in ImageSet::Folder(p.clone()).files()? {
                out.push((Some(class.clone()), f));
            }
        } else if p.extension().is_some_and(|e| {
            IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
        }) {
            out.push((None, p));
        }
    }
    Ok(out)
}

fn labelled_problems(folder: &Path, field: &str, need_labels: bool) -> Vec<Problem> {
    match labelled_images(folder) {
        Err(e) => vec![Problem::new(field, e.to_string())],
        Ok(v) if v.is_empty() => vec![Problem::new(
            field,
            format!("no images (PNG or JPEG) in {}", folder.display()),
        )],
        Ok(v) if need_labels && v.iter().any(|(c, _)| c.is_none()) => vec![Problem::new(
            field,
            format!(
                "{} must hold one folder per class (<class>/*.png); found loose files",
                folder.display()
            ),
        )],
        Ok(v) if need_labels => {
            // A class folder with no images is an error, not a silently smaller episode.
            let mut problems = Vec::new();
            if let Ok(rd) = std::fs::read_dir(folder) {
                for d in rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_dir())
                {
                    let name = d
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if !v.iter().any(|(c, _)| c.as_deref() == Some(name.as_str())) {
                        problems.push(Problem::new(field, format!("class `{name}` has no images")));
                    }
                }
            }
            problems
        }
        Ok(_) => vec![],
    }
}

/// A parsed pipeline with its paths resolved against the pipeline file's folder.
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    pub path: PathBuf,
    pub pipeline: Pipeline,
    /// The file's text, to point problems at their lines.
    pub source: String,
}

impl LoadedPipeline {
    /// Reads and parses a pipeline file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| FamError::io(path, e))?;
        Self::parse(path, &text)
    }

    /// Parses pipeline text as if it were the file at `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut pipeline: Pipeline = toml::from_str(text).map_err(|e| FamError::Config {
            path: path.to_path_buf(),
            message: describe_toml_error(&e, text),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut pipeline.run.output);
        pipeline.run.plugin_dirs.iter_mut().for_each(fix);
        if let Some(w) = pipeline.backbone.weights.as_mut() {
            fix(w);
        }
        match &mut pipeline.task {
            TaskSection::Pair { pairs } => {
                for p in pairs {
                    fix(&mut p.a);
                    fix(&mut p.b);
                }
            }
            TaskSection::Retrieval {
                queries,
                gallery,
                cache_dir,
                index,
                ..
            } => {
                queries.resolve(&fix);
                if let Some(g) = gallery.as_mut() {
                    g.resolve(&fix);
                }
                if let Some(d) = cache_dir.as_mut() {
                    fix(d);
                }
                if let Some(d) = index.as_mut() {
                    fix(d);
                }
            }
            TaskSection::FewShot { support, query, .. } => {
                fix(support);
                fix(query);
            }
            TaskSection::Classify { bank, queries, .. } => {
                fix(bank);
                fix(queries);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            pipeline,
            source: text.to_string(),
        })
    }

    pub fn backbone_config(&self) -> BackboneConfig {
        let b = &self.pipeline.backbone;
        BackboneConfig {
            kind: b.kind.clone(),
            weights: b.weights.clone(),
            layer: b.layer.clone(),
            options: b.options.clone(),
        }
    }

    /// Names of the plugins this pipeline uses, in order, without repeats.
    pub fn plugin_names(&self) -> Vec<String> {
        let p = &self.pipeline;
        let mut names = vec![p.backbone.plugin.clone(), p.similarity.plugin.clone()];
        names.extend(p.render.iter().map(|r| r.plugin.clone()));
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }

    /// Loads the plugins the pipeline names and checks everything that can be checked
    /// without loading a model. Returns every problem found, not just the first.
    pub fn validate(&self, host: &mut PluginHost, device_override: Option<&str>) -> Vec<Problem> {
        let mut problems = self.validate_fields(host, device_override);
        if let Ok(root) = toml::de::DeTable::parse(&self.source) {
            for pr in &mut problems {
                pr.line = pr
                    .line
                    .or_else(|| locate_in(&self.source, root.get_ref(), &pr.field));
            }
        }
        problems
    }

    fn validate_fields(
        &self,
        host: &mut PluginHost,
        device_override: Option<&str>,
    ) -> Vec<Problem> {
        let p = &self.pipeline;
        let mut problems = Vec::new();

        let device = device_override.unwrap_or(&p.run.device);
        if let Err(e) = crate::device::parse_device_name(device) {
            problems.push(Problem::new("run.device", e));
        }
        if p.run.batch_size == 0 || p.run.batch_size > 4096 {
            problems.push(Problem::new(
                "run.batch_size",
                format!("{} is out of range (1 to 4096)", p.run.batch_size),
            ));
        }
        for (i, d) in p.run.plugin_dirs.iter().enumerate() {
            if !d.is_dir() {
                problems.push(Problem::new(
                    format!("run.plugin_dirs[{i}]"),
                    format!("{} is not a folder", d.display()),
                ));
            }
        }

        for name in self.plugin_names() {
            if let Err(e) = host.load(&name) {
                problems.push(Problem::new("plugin", e.to_string()));
            }
        }

        let bcfg = self.backbone_config();
        if let Some(w) = &bcfg.weights {
            if !w.is_file() {
                problems.push(Problem::new(
                    "backbone.weights",
                    format!("{} does not exist", w.display()),
                ));
            }
        }
        if host.plugins().any(|i| i.name == p.backbone.plugin) {
            match host.backbone(&p.backbone.plugin, &p.backbone.kind) {
                Ok(entry) => problems.extend(prefix("backbone", entry.validate(&bcfg))),
                Err(e) => problems.push(Problem::new("backbone.kind", e.to_string())),
            }
        }
        if host.plugins().any(|i| i.name == p.similarity.plugin) {
            match host.similarity(&p.similarity.plugin, &p.similarity.kind) {
                Ok(entry) => {
                    problems.extend(prefix("similarity", entry.validate(&p.similarity.options)))
                }
                Err(e) => problems.push(Problem::new("similarity.kind", e.to_string())),
            }
        }
        for (i, r) in p.render.iter().enumerate() {
            if host.plugins().any(|info| info.name == r.plugin) {
                match host.renderer(&r.plugin, &r.kind) {
                    Ok(entry) => {
                        problems.extend(prefix(&format!("render[{i}]"), entry.validate(&r.options)))
                    }
                    Err(e) => {
                        problems.push(Problem::new(format!("render[{i}].kind"), e.to_string()))
                    }
                }
            }
        }
        if p.render.is_empty() {
            problems.push(Problem::new(
                "render",
                "no [[render]] entries: the run would write nothing but its manifest",
            ));
        }

        if let Some(pre) = &p.preprocess {
            problems.extend(pre.problems());
        }

        match &p.task {
            TaskSection::Pair { pairs } => {
                if pairs.is_empty() {
                    problems.push(Problem::new("task.pairs", "no pairs given"));
                }
                for (i, pair) in pairs.iter().enumerate() {
                    for (side, path) in [("a", &pair.a), ("b", &pair.b)] {
                        if !path.is_file() {
                            problems.push(Problem::new(
                                format!("task.pairs[{i}].{side}"),
                                format!("{} does not exist", path.display()),
                            ));
                        }
                    }
                }
            }
            TaskSection::Retrieval {
                queries,
                gallery,
                index,
                top_k,
                ..
            } => {
                problems.extend(queries.problems("task.queries"));
                match (gallery, index) {
                    (Some(g), _) => problems.extend(g.problems("task.gallery")),
                    (None, Some(_)) => {}
                    (None, None) => problems.push(Problem::new(
                        "task.gallery",
                        "no `gallery` (the images to search) and no `index` (a gallery indexed by `fam-cli index`)",
                    )),
                }
                if *top_k == 0 {
                    problems.push(Problem::new("task.top_k", "0 keeps no hits; use 1 or more"));
                }
            }
            TaskSection::FewShot { support, query, .. } => {
                problems.extend(labelled_problems(support, "task.support", true));
                problems.extend(labelled_problems(query, "task.query", false));
            }
            TaskSection::Classify {
                bank, queries, k, ..
            } => {
                problems.extend(labelled_problems(bank, "task.bank", true));
                problems.extend(labelled_problems(queries, "task.queries", false));
                if *k == 0 {
                    problems.push(Problem::new("task.k", "0 neighbours; use 1 or more"));
                }
            }
        }
        problems
    }
}

/// The line (from 1) of a field such as `backbone.layer`, `render[1].kind` or
/// `task.pairs[0].a` in a pipeline's text, from the TOML parser's spans: the key's line, or,
/// where the key is not written out, the line of the deepest part of the path that is (the
/// table's header, the array's key). `None` where neither is found or the text is not TOML.
pub fn locate(text: &str, field: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    locate_in(text, root.get_ref(), field)
}

fn locate_in(text: &str, root: &toml::de::DeTable<'_>, field: &str) -> Option<usize> {
    fam_core::options::span_of(root, field).map(|span| position(text, span.start).0)
}

/// The line and column (both from 1, the column in characters) of byte `offset` of `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

fn prefix(section: &str, problems: Vec<Problem>) -> Vec<Problem> {
    problems
        .into_iter()
        .map(|mut p| {
            p.field = if p.field.is_empty() {
                section.to_string()
            } else {
                format!("{section}.{}", p.field)
            };
            p
        })
        .collect()
}

/// A TOML syntax or schema error at its line and column (from the error's span), with the
/// line quoted and, for a misspelled key, the closest key serde expects.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let mut message = e.message().trim_end().to_string();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let bad = rest.split('`').next().unwrap_or_default();
        // serde lists the expected fields: "expected `a` or `b`", "expected one of `a`, `b`".
        let expected: Vec<&str> = rest
            .split_once("expected ")
            .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        if let Some(best) = closest(bad, &expected) {
            message = format!("{message}; did you mean `{best}`?");
        }
    }
    let Some(span) = e.span() else {
        return message;
    };
    let (line, column) = position(text, span.start);
    let content = text.lines().nth(line - 1).unwrap_or_default();
    let width = text
        .get(span.clone())
        .map(|s| s.lines().next().unwrap_or_default().chars().count())
        .unwrap_or(0)
        .clamp(1, content.chars().count().saturating_sub(column - 1).max(1));
    let gutter = " ".repeat(line.to_string().len());
    format!(
        "line {line}, column {column}: {message}\n  {line} | {content}\n  {gutter} | {}{}",
        " ".repeat(column - 1),
        "^".repeat(width)
    )
}

pub use fam_core::error::closest;

#[cfg(test)]
mod tests {
    #[test]
    fn problems_point_at_their_lines() {
        let text = "[run]\noutput = \"o\"\n\n[backbone]\nplugin = \"p\"\nkind = \"k\"\nlayer = \"x\"\n[backbone.options]\nsize = 3\n\n[[render]]\nkind = \"a\"\n[[render]]\nplugin = \"r\"\nkind = \"b\"\n[task]\nkind = \"pair\"\npairs = []\n";
        assert_eq!(super::locate(text, "backbone.layer"), Some(7));
        assert_eq!(super::locate(text, "backbone.options.size"), Some(9));
        assert_eq!(super::locate(text, "backbone.options"), Some(8));
        assert_eq!(super::locate(text, "backbone.weights"), Some(4));
        assert_eq!(super::locate(text, "render[0].kind"), Some(12));
        assert_eq!(super::locate(text, "render[1].kind"), Some(15));
        assert_eq!(super::locate(text, "task.pairs[0].a"), Some(18));
        assert_eq!(super::locate(text, "similarity.kind"), None);
        assert_eq!(super::locate(text, "run.device"), Some(1));
    }

    #[test]
    fn lines_come_from_the_parser_s_spans() {
        let text = "[run]\noutput = \"o\"\n[backbone]\noptions = { size = 3 }\n[[render]]\nkind = \"overlay\"\nalpha = 2.0\n[task]\nkind = \"pair\"\npairs = [\n  { a = \"x.png\", b = \"y.png\" },\n  { a = \"z.png\",\n    b = \"w.png\" },\n]\nqueries.files = [\"q.png\"]\n";
        let at = |f: &str| super::locate(text, f);
        // Inline tables, array elements across lines, dotted keys.
        assert_eq!(at("backbone.options.size"), Some(4));
        assert_eq!(at("task.pairs[0].b"), Some(11));
        assert_eq!(at("task.pairs[1].b"), Some(13));
        assert_eq!(at("task.pairs[1]"), Some(12));
        assert_eq!(at("task.pairs[7].a"), Some(10));
        assert_eq!(at("task.queries.files"), Some(15));
        // A renderer's options are the section's own keys; a path through a missing
        // `options` table stops at the section.
        assert_eq!(at("render[0].alpha"), Some(7));
        assert_eq!(at("render[0].options.colormap"), Some(5));
        assert_eq!(at("plugin"), None);
        assert_eq!(super::locate("not = [toml", "not"), None);
    }

    #[test]
    fn syntax_errors_point_at_their_line_and_column() {
        let text = "[run]\noutput = \"o\"\n[task\nkind = \"pair\"\n";
        let err = LoadedPipeline::parse(Path::new("p.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("p.toml: line 3, column 6: "), "{err}");
        assert!(err.contains("  3 | [task\n"), "{err}");
        let text = GOOD
            .replace("top_k", "x")
            .replace("[run]", "[run]\nbatch_size = \"8\"");
        let err = LoadedPipeline::parse(Path::new("p.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3, column 14: invalid type: string \"8\""),
            "{err}"
        );
        assert!(
            err.contains("  3 | batch_size = \"8\"\n    |              ^^^"),
            "{err}"
        );
    }

    use super::*;

    const GOOD: &str = r#"
[run]
output = "out"
[backbone]
plugin = "retrieval"
kind = "mobilenet_v2"
weights = "w.safetensors"
layer = "features.18"
[similarity]
plugin = "metrics"
kind = "cosine"
[task]
kind = "pair"
pairs = [{ a = "x.png", b = "/abs/y.png" }]
[[render]]
plugin = "render"
kind = "overlay"
alpha = 0.4
"#;

    #[test]
    fn parses_and_resolves_paths_against_the_file() {
        let p = LoadedPipeline::parse(Path::new("/p/pipe.toml"), GOOD).unwrap();
        assert_eq!(p.pipeline.run.output, PathBuf::from("/p/out"));
        assert_eq!(p.pipeline.run.batch_size, 16);
        assert_eq!(p.pipeline.run.device, "cpu");
        let TaskSection::Pair { pairs } = &p.pipeline.task else {
            panic!("not a pair task")
        };
        assert_eq!(pairs[0].a, PathBuf::from("/p/x.png"));
        assert_eq!(pairs[0].b, PathBuf::from("/abs/y.png"));
        assert_eq!(p.pipeline.render[0].options["alpha"].as_float(), Some(0.4));
        assert_eq!(p.plugin_names(), vec!["retrieval", "metrics", "render"]);
    }

    #[test]
    fn misspelled_keys_are_errors_with_a_suggestion_and_a_line() {
        let bad = GOOD.replace("weights =", "wieghts =");
        let err = LoadedPipeline::parse(Path::new("p.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `wieghts`"), "{err}");
        assert!(err.contains("did you mean `weights`?"), "{err}");
        assert!(err.contains("line 7"), "{err}");
        assert!(err.starts_with("p.toml: "), "{err}");
    }

    #[test]
    fn unknown_task_kind_is_an_error() {
        let bad = GOOD.replace("kind = \"pair\"", "kind = \"pear\"");
        let err = LoadedPipeline::parse(Path::new("p.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pear"), "{err}");
    }

    #[test]
    fn validation_reports_every_problem_at_once() {
        let bad = GOOD
            .replace(
                "output = \"out\"",
                "output = \"out\"\nbatch_size = 0\ndevice = \"tpu\"",
            )
            .replace("plugin = \"metrics\"", "plugin = \"no_such_plugin\"");
        let p = LoadedPipeline::parse(Path::new("/nonexistent/p.toml"), &bad).unwrap();
        let mut host = PluginHost::default();
        let problems = p.validate(&mut host, None);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "run.device",
            "run.batch_size",
            "plugin",
            "backbone.weights",
            "task.pairs[0].a",
        ] {
            assert!(fields.contains(&f), "{f} missing from {problems:#?}");
        }
    }

    #[test]
    fn closest_finds_typos_only() {
        assert_eq!(closest("wieghts", &["weights", "layer"]), Some("weights"));
        assert_eq!(closest("zzz", &["weights", "layer"]), None);
    }

    #[test]
    fn preprocess_overrides_apply() {
        let pre = PreprocessSection {
            resize: Some(160),
            crop: Some(128),
            width: None,
            height: None,
            mean: None,
            std: Some([0.5; 3]),
        };
        let s = pre.apply(InputSpec::imagenet());
        assert_eq!(
            s.resize,
            ResizePolicy::ResizeCrop {
                resize: 160,
                crop: 128
            }
        );
        assert_eq!(s.std, [0.5; 3]);
        let bad = PreprocessSection {
            crop: Some(300),
            ..pre
        };
        assert_eq!(bad.problems()[0].field, "preprocess.crop");
    }
}
