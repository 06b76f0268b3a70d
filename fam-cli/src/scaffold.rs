//! `fam-cli plugins new NAME` (a plugin crate from `examples/plugin-template`) and
//! `fam-cli init TASK` (a commented starter pipeline).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The fam source tree this binary was built from, if it is still there (it holds the
/// fam-core sources a plugin builds against, and the committed model and images).
pub fn source_tree() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("fam-core/Cargo.toml")
        .is_file()
        .then(|| root.canonicalize().ok())
        .flatten()
}

const TEMPLATE: [(&str, &str); 6] = [
    (
        "Cargo.toml",
        include_str!("../../examples/plugin-template/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../examples/plugin-template/src/lib.rs"),
    ),
    (
        "pipeline.toml",
        include_str!("../../examples/plugin-template/pipeline.toml"),
    ),
    (
        "README.md",
        include_str!("../../examples/plugin-template/README.md"),
    ),
    (
        ".gitignore",
        include_str!("../../examples/plugin-template/.gitignore"),
    ),
    // The exact dependency versions fam itself was tested with.
    ("Cargo.lock", include_str!("../../Cargo.lock")),
];

/// A plugin name: what pipelines write as `plugin = "NAME"`.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!("`{name}` is not a plugin name: use lowercase letters, digits and `_`, starting with a letter (e.g. `my_metric`)");
    }
    Ok(())
}

/// Writes a plugin crate named `name` into `dir` (default `fam-plugin-NAME`); returns the
/// folder.
pub fn new_plugin(name: &str, dir: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let dir =
        dir.unwrap_or_else(|| PathBuf::from(format!("fam-plugin-{}", name.replace('_', "-"))));
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} already exists and is not empty", dir.display());
    }
    let tree = source_tree();
    let fam_core = match &tree {
        Some(t) => format!("path = {:?}", t.join("fam-core").display().to_string()),
        None => {
            tracing::warn!("the fam sources this fam-cli was built from are gone: edit the fam-core dependency in Cargo.toml");
            format!("version = {:?}", env!("CARGO_PKG_VERSION"))
        }
    };
    let data = tree
        .as_ref()
        .map(|t| format!("\"{}/", t.display()))
        .unwrap_or_else(|| "\"/path/to/fam/".into());
    for (rel, text) in TEMPLATE {
        let text = text
            .replace(
                "fam-plugin-template",
                &format!("fam-plugin-{}", name.replace('_', "-")),
            )
            .replace("fam_plugin_template", &format!("fam_plugin_{name}"))
            .replace("name: \"template\"", &format!("name: \"{name}\""))
            .replace("plugin = \"template\"", &format!("plugin = \"{name}\""))
            .replace("path = \"../../fam-core\"", &fam_core)
            .replace("\"../../", &data);
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
        }
        std::fs::write(&path, text).with_context(|| path.display().to_string())?;
    }
    Ok(dir)
}

/// Tasks `init` knows.
pub const TASKS: [&str; 4] = ["pair", "retrieval", "few_shot", "classify"];

/// The starter pipeline for `task`, with paths into the fam source tree where it exists.
pub fn starter(task: &str) -> anyhow::Result<String> {
    let (header, body) = match task {
        "pair" => (
            "Why do these images match? One score and two maps per pair.",
            STARTER_PAIR,
        ),
        "retrieval" => (
            "Which gallery images does each query find, and why?",
            STARTER_RETRIEVAL,
        ),
        "few_shot" => (
            "A few-shot episode: which class prototype does each query match, and why?",
            STARTER_FEW_SHOT,
        ),
        "classify" => (
            "A contrastive model classified by its nearest neighbours in a labelled bank.",
            STARTER_CLASSIFY,
        ),
        other => bail!("`{other}` is not a task: {}", TASKS.join(", ")),
    };
    let root = source_tree()
        .map(|t| t.display().to_string())
        .unwrap_or_else(|| "/path/to/fam".into());
    Ok(format!(
        "# {header}\n# Written by `fam-cli init {task}`. Every key: docs/pipeline-reference.md.\n# Check it with `fam-cli validate FILE`, run it with `fam-cli run FILE`.\n\n{}",
        body.replace("{FAM}", &root)
    ))
}

const STARTER_PAIR: &str = r#"[run]
output = "out/pair"             # the output folder (relative to this file)
device = "cpu"                  # or "cuda" / "cuda:N" in a build with --features cuda
batch_size = 16                 # images per forward pass

[backbone]
plugin = "retrieval"            # `fam-cli plugins` lists the plugins and their kinds
kind = "mobilenet_v2"
weights = "{FAM}/models/mobilenet_v2.safetensors"   # safetensors or PyTorch .pth
layer = "features.18"           # the conv layer to explain (`fam-cli layers MODEL`)

[similarity]
plugin = "metrics"
kind = "cosine"                 # or "euclidean"

[explain]
weighting = "contribution"      # FAM; "gradient": Grad-CAM on the similarity; "activation"

[task]
kind = "pair"
pairs = [
  { a = "{FAM}/data/images/chelsea.png", b = "{FAM}/data/images/coffee.png" },
  { a = "{FAM}/data/images/motorcycle_left.png", b = "{FAM}/data/images/motorcycle_right.png" },
]

[[render]]
plugin = "render"
kind = "panel"                  # panels/*.png: both images, both maps, the score

[[render]]
plugin = "render"
kind = "npy"                    # maps/*.npy: the raw and upsampled maps

[[render]]
plugin = "render"
kind = "scores"                 # scores.json

[[render]]
plugin = "render"
kind = "html"                   # index.html: every panel, the scores, links to the maps
"#;

const STARTER_RETRIEVAL: &str = r#"[run]
output = "out/retrieval"
device = "cpu"
batch_size = 16

[backbone]
plugin = "retrieval"
kind = "mobilenet_v2"
weights = "{FAM}/models/mobilenet_v2.safetensors"
layer = "features.18"

[similarity]
plugin = "metrics"
kind = "cosine"

[task]
kind = "retrieval"
queries = ["{FAM}/data/images/chelsea_mirror.png"]   # a folder, or a list of files
gallery = "{FAM}/data/images"   # every PNG/JPEG in the folder
top_k = 3                       # hits kept (and explained) per query
exclude_self = true             # skip gallery images identical to the query
cache = true                    # keep gallery embeddings on disk for the next run
# index = "gallery-index"       # large galleries: `fam-cli index` this pipeline once
                                # (in parts: --shard K/N), then runs search the index

[[render]]
plugin = "render"
kind = "panel"                  # panels/<query>.png: the query, the hits, all maps

[[render]]
plugin = "render"
kind = "scores"

[[render]]
plugin = "render"
kind = "html"                   # index.html: the ranking with every panel
"#;

const STARTER_FEW_SHOT: &str = r#"[run]
output = "out/few_shot"
batch_size = 64

[backbone]
plugin = "fewshot"
kind = "conv4"                  # ProtoNet's 4-block CNN (28 x 28 inputs)
weights = "{FAM}/models/fewshot/protonet_conv4_mnist.safetensors"
layer = "encoder.3"

[backbone.options]
embedding = "flatten"           # ProtoNet's embedding: the flattened feature map

[similarity]
plugin = "metrics"
kind = "euclidean"              # ProtoNet's metric

[task]
kind = "few_shot"
support = "{FAM}/data/digits/episode/support"   # support/<class>/*.png
query = "{FAM}/data/digits/episode/query"       # query/*.png or query/<class>/*.png
all_classes = false             # true: map each query against every class
transform = "none"              # "l2n" or "cl2n" (SimpleShot)
contrast = "others"             # explain the margin over the other classes

[[render]]
plugin = "render"
kind = "panel"

[[render]]
plugin = "render"
kind = "html"                   # index.html: the episode with every panel
"#;

const STARTER_CLASSIFY: &str = r#"[run]
output = "out/classify"
batch_size = 64

[backbone]
plugin = "fewshot"
kind = "conv4"
weights = "{FAM}/models/contrastive/simclr_conv4_mnist.safetensors"
layer = "encoder.3"

[similarity]
plugin = "metrics"
kind = "cosine"                 # SimCLR's similarity

[task]
kind = "classify"
bank = "{FAM}/data/digits/bank"         # bank/<class>/*.png
queries = "{FAM}/data/digits/queries"   # queries/*.png or queries/<class>/*.png
method = "knn"                  # or "centroid"
k = 5                           # neighbours that vote

[[render]]
plugin = "render"
kind = "panel"

[[render]]
plugin = "render"
kind = "html"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("my_metric2").is_ok());
        for bad in ["", "My", "2x", "a-b", "a/b", "../x"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_task_has_a_starter_that_parses() {
        for t in TASKS {
            let text = starter(t).unwrap();
            fam_engine::pipeline::LoadedPipeline::parse(Path::new("/x/p.toml"), &text)
                .unwrap_or_else(|e| panic!("{t}: {e}"));
        }
        assert!(starter("segmentation").is_err());
    }
}
