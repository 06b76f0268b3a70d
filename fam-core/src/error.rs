//! The one error type of fam. Every message names the file, the field or the value at fault.

use std::path::PathBuf;

/// Result alias used throughout fam.
pub type Result<T, E = FamError> = std::result::Result<T, E>;

/// One problem found while validating a pipeline. Validation collects all of them before
/// anything runs, so the user fixes a file in one round.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// Dotted path of the field, e.g. `backbone.layer` or `task.pairs[1].b`.
    pub field: String,
    /// What is wrong, naming the bad value.
    pub message: String,
    /// The line of the pipeline file the field is on (from 1), where it can be found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

impl Problem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            line: None,
        }
    }
}

impl Problem {
    /// An option a plugin does not know, with the closest known one as a hint.
    pub fn unknown_option(field: impl Into<String>, key: &str, allowed: &[&str]) -> Self {
        let hint = closest(key, allowed)
            .map(|c| format!("; did you mean `{c}`?"))
            .unwrap_or_default();
        Self::new(field, format!("unknown option `{key}`{hint}"))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FamError {
    /// A file could not be read or written. The cause is part of the message, not a
    /// separate source, so that it is printed once.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },

    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Validation {
        path: PathBuf,
        problems: Vec<Problem>,
    },

    #[error("plugin {path}: {message}")]
    Plugin { path: PathBuf, message: String },

    #[error("plugin {path} was built for {what} {plugin}, but this fam-cli has {host}; rebuild the plugin against this fam-core")]
    PluginMismatch {
        path: PathBuf,
        what: &'static str,
        plugin: String,
        host: String,
    },

    #[error("plugin {path} was built differently from this fam-cli, so their types cannot cross between them ({}); rebuild the plugin against this fam-core with the same toolchain and features", differences.join("; "))]
    AbiMismatch {
        path: PathBuf,
        differences: Vec<String>,
    },

    #[error("plugin `{plugin}` panicked in {method}: {message}")]
    PluginPanic {
        plugin: String,
        method: String,
        message: String,
    },

    #[error("no {what} named `{name}`{}", if available.is_empty() { String::new() } else { format!(" (available: {})", available.join(", ")) })]
    UnknownKind {
        what: &'static str,
        name: String,
        available: Vec<String>,
    },

    #[error("{path}: weights: {message}")]
    Weights { path: PathBuf, message: String },

    /// A tensor operation failed; `context` says which.
    #[error("{context}: {cause}")]
    Candle {
        context: String,
        cause: candle_core::Error,
    },

    /// A model file uses operators this build does not implement (all of them listed).
    #[error("{path}: weights: {message}")]
    UnsupportedOperator { path: PathBuf, message: String },

    /// A plugin object broke its trait's contract: a backbone returned maps and embeddings
    /// of the wrong shapes, a similarity contributions of the wrong length.
    /// `message` continues the sentence that `component` starts (`backbone `x``
    /// `returned ...`).
    #[error("{component} {message}")]
    Contract { component: String, message: String },

    /// One item of the run (a pair, a query, an image) could not be completed; the run goes
    /// on with the others. `message` names the item's file.
    #[error("{message}")]
    Item { item: String, message: String },

    /// An output document (`manifest.json`, `scores.json`, ...) that fam did not write or
    /// that disagrees with the other shards' (`fam-cli merge`).
    #[error("{path}: {message}")]
    Document { path: PathBuf, message: String },

    #[error(
        "interrupted: every file written so far is complete (no partial files); run again with `--resume` to skip the images already through the backbone"
    )]
    Interrupted,

    /// Anything else, named in the message.
    #[error("{0}")]
    Invalid(String),

    #[error("device `{0}` is not available: {1}")]
    Device(String, String),
}

impl FamError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    /// A broken contract of `component` (a backbone or similarity, by name).
    pub fn contract(component: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Contract {
            component: component.into(),
            message: message.into(),
        }
    }

    /// A problem with an output document.
    pub fn document(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Document {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Weights {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for FamError {
    fn from(source: candle_core::Error) -> Self {
        Self::Candle {
            context: "tensor operation".into(),
            cause: source,
        }
    }
}

/// Adds a human context to candle errors: `t.matmul(&w).ctx("map for pair 3")?`.
pub trait CandleContext<T> {
    fn ctx(self, context: impl std::fmt::Display) -> Result<T>;
}

impl<T> CandleContext<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl std::fmt::Display) -> Result<T> {
        self.map_err(|cause| FamError::Candle {
            context: context.to_string(),
            cause,
        })
    }
}

/// The closest candidate by edit distance, if any is close enough to be a typo.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
