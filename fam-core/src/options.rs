//! Typed plugin options. Each component (backbone, similarity, renderer kind) declares its
//! options as a serde struct with `#[serde(deny_unknown_fields)]` (defaults through
//! `#[serde(default)]`) and reads its [`Options`] table through this module: unknown and
//! misspelled keys, wrong types and missing keys become [`Problem`]s naming the key, with a
//! "did you mean" for a typo. What serde cannot say (ranges, non-empty lists, files that
//! must exist) is a small `check` function over the parsed struct.
//!
//! ```
//! use fam_core::{options, plugin::Options, Problem};
//!
//! #[derive(options::serde::Deserialize)]
//! #[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
//! struct Blur {
//!     #[serde(default = "one")]
//!     radius: u32,
//! }
//! fn one() -> u32 { 1 }
//!
//! fn check_blur(o: &Blur) -> Vec<Problem> {
//!     match o.radius {
//!         1..=64 => vec![],
//!         r => vec![Problem::new("radius", format!("{r} is not a radius from 1 to 64"))],
//!     }
//! }
//!
//! let mut o = Options::new();
//! o.insert("radus".into(), 3.into());
//! // validate: every problem; create: the struct, or an error listing them.
//! let problems = options::check::<Blur>(&o, "", check_blur);
//! assert_eq!(problems[0].message, "unknown option `radus`; did you mean `radius`?");
//! assert!(options::load::<Blur>(&o, "", check_blur).is_err());
//! assert_eq!(options::load::<Blur>(&Options::new(), "", check_blur).unwrap().radius, 1);
//! ```
//!
//! `table` names where the options sit inside the component's pipeline section, and so the
//! start of each problem's field: `"options"` for a backbone (`[backbone.options]`, giving
//! `options.size`), `""` for a similarity or renderer, whose options are the section's other
//! keys (`alpha`). The host prefixes the section (`backbone.`, `render[0].`).
//!
//! A plugin needs no serde dependency of its own: derive through [`serde`], re-exported here,
//! with `#[serde(crate = "fam_core::options::serde")]`.

pub use serde;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};

use crate::error::{closest, FamError, Problem, Result};
use crate::plugin::Options;

/// The options of a component that takes none: any key is an unknown option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

/// Parses `options` into `T`, or returns every problem serde finds (see [`parse_partial`]).
/// Fields are relative to the options table: `alpha`, `size[1]`; see [`parse_in`].
pub fn parse<T: DeserializeOwned>(options: &Options) -> std::result::Result<T, Vec<Problem>> {
    parse_in(options, "")
}

/// [`parse`] for options that sit in a sub-table `table` of the section (`"options"` for a
/// backbone): the problems' fields start with `table.`.
pub fn parse_in<T: DeserializeOwned>(
    options: &Options,
    table: &str,
) -> std::result::Result<T, Vec<Problem>> {
    match parse_partial(options, table) {
        (Some(t), problems) if problems.is_empty() => Ok(t),
        (_, problems) => Err(problems),
    }
}

/// Every problem serde finds in `options`, not only the first, and `T` built from the keys
/// that have none: each bad key is reported, then left out (so it takes its default) and the
/// rest parsed again. `None` where no `T` can be built, e.g. a required key is missing.
pub fn parse_partial<T: DeserializeOwned>(
    options: &Options,
    table: &str,
) -> (Option<T>, Vec<Problem>) {
    let mut options = options.clone();
    let mut problems = Vec::new();
    loop {
        match attempt::<T>(&options) {
            Ok(t) => return (Some(t), problems),
            Err((path, problem)) => {
                problems.push(nest_one(table, problem));
                // Left out, the bad key no longer stops the others from being checked.
                match path.first() {
                    Some(Segment::Key(k)) if options.remove(k).is_some() => {}
                    _ => return (None, problems),
                }
            }
        }
    }
}

/// What a `validate` closure returns: serde's problems ([`parse_partial`]), then those of
/// `semantic` on the struct built from the good keys. `semantic`'s fields are relative to the
/// options table, as [`parse`]'s.
pub fn check<T: DeserializeOwned>(
    options: &Options,
    table: &str,
    semantic: impl FnOnce(&T) -> Vec<Problem>,
) -> Vec<Problem> {
    let (parsed, mut problems) = parse_partial::<T>(options, table);
    if let Some(t) = &parsed {
        problems.extend(nest(table, semantic(t)));
    }
    problems
}

/// What a `create` closure builds from: `T` when [`check`] finds no problem, else an error
/// listing them all.
pub fn load<T: DeserializeOwned>(
    options: &Options,
    table: &str,
    semantic: impl FnOnce(&T) -> Vec<Problem>,
) -> Result<T> {
    let (parsed, mut problems) = parse_partial::<T>(options, table);
    if let Some(t) = &parsed {
        problems.extend(nest(table, semantic(t)));
    }
    match parsed {
        Some(t) if problems.is_empty() => Ok(t),
        _ => Err(to_error(&problems)),
    }
}

/// One error listing `problems` (`field: message; field: message`).
pub fn to_error(problems: &[Problem]) -> FamError {
    FamError::invalid(
        problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; "),
    )
}

/// `problems` with `table.` put before each field (the empty field becomes `table`).
pub fn nest(table: &str, problems: Vec<Problem>) -> Vec<Problem> {
    problems.into_iter().map(|p| nest_one(table, p)).collect()
}

fn nest_one(table: &str, mut p: Problem) -> Problem {
    p.field = join(table, &p.field);
    p
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ if b.starts_with('[') => format!("{a}{b}"),
        _ => format!("{a}.{b}"),
    }
}

/// One step of a field path: a key of a table or an index into an array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// Splits a dotted field path: `render[1].kind` is `render`, `[1]`, `kind`.
pub fn segments(field: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in field.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            out.push(Segment::Key(key.to_string()));
        }
        for index in rest.split('[') {
            if let Ok(i) = index.trim_end_matches(']').trim().parse() {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

/// The field path of `segments`: `render[1].kind`.
pub fn field_of(segments: &[Segment]) -> String {
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The byte span of the deepest part of `field` written in `root`: the key where it is
/// written, else (for a key that is absent) the key or array element that holds it, as far
/// as the path can be followed. `None` where not even its first key is there.
pub fn span_of(root: &DeTable<'_>, field: &str) -> Option<std::ops::Range<usize>> {
    let mut best = None;
    let mut table = Some(root);
    let mut value: Option<&DeValue<'_>> = None;
    for seg in segments(field) {
        let next = match (&seg, table, value) {
            (Segment::Key(k), Some(t), _) => t
                .get_key_value(k.as_str())
                .map(|(key, v)| (key.span(), v.get_ref())),
            (Segment::Index(i), _, Some(DeValue::Array(a))) => {
                a.get(*i).map(|v| (v.span(), v.get_ref()))
            }
            _ => None,
        };
        let Some((span, v)) = next else { break };
        best = Some(span);
        value = Some(v);
        table = v.as_table();
    }
    best
}

/// The path of the innermost key or array element whose key or value holds `span`.
fn path_at(table: &DeTable<'_>, span: &std::ops::Range<usize>) -> Option<Vec<Segment>> {
    let inside = |s: std::ops::Range<usize>| s.start <= span.start && span.end <= s.end;
    for (k, v) in table {
        let deeper = inner_path(v.get_ref(), span);
        if let Some(mut rest) = deeper {
            rest.insert(0, Segment::Key(k.get_ref().to_string()));
            return Some(rest);
        }
        if inside(k.span()) || inside(v.span()) {
            return Some(vec![Segment::Key(k.get_ref().to_string())]);
        }
    }
    None
}

fn inner_path(value: &DeValue<'_>, span: &std::ops::Range<usize>) -> Option<Vec<Segment>> {
    match value {
        DeValue::Table(t) => path_at(t, span),
        DeValue::Array(a) => a.iter().enumerate().find_map(|(i, v)| {
            let mut rest = inner_path(v.get_ref(), span).unwrap_or_default();
            let s = v.span();
            if rest.is_empty() && !(s.start <= span.start && span.end <= s.end) {
                return None;
            }
            rest.insert(0, Segment::Index(i));
            Some(rest)
        }),
        _ => None,
    }
}

/// One try at `T`: the options are written out as TOML and read back with the spans that
/// tell which key an error is about.
fn attempt<T: DeserializeOwned>(
    options: &Options,
) -> std::result::Result<T, (Vec<Segment>, Problem)> {
    let text = toml::to_string(options).map_err(|e| (vec![], Problem::new("", e.to_string())))?;
    let error = match toml::de::Deserializer::parse(&text).and_then(T::deserialize) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let path = match (error.span(), DeTable::parse(&text)) {
        (Some(span), Ok(root)) if !span.is_empty() => {
            path_at(root.get_ref(), &span).unwrap_or_default()
        }
        _ => vec![],
    };
    let message = describe(error.message());
    Err((path.clone(), Problem::new(field_of(&path), message)))
}

/// serde's message in the words of a pipeline file: options, not fields; numbers, not Rust
/// types; and the nearest known key for an unknown one.
fn describe(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or_default();
        // serde lists the fields the struct knows: "expected `a`", "expected `a` or `b`",
        // "expected one of `a`, `b`, `c`", or "there are no fields".
        let expected: Vec<&str> = rest
            .split_once("expected ")
            .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        return if expected.is_empty() {
            format!("unknown option `{key}` (this kind takes no options)")
        } else if let Some(best) = closest(key, &expected) {
            format!("unknown option `{key}`; did you mean `{best}`?")
        } else {
            format!(
                "unknown option `{key}` (known options: {})",
                expected.join(", ")
            )
        };
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or_default();
        return format!("missing option `{key}`");
    }
    if let Some((head, ty)) = message.rsplit_once(", expected ") {
        let ty = match ty {
            "f32" | "f64" => "a number",
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer",
            "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
            "wanted string or table" => "a string",
            other => other,
        };
        return format!("{head}, expected {ty}");
    }
    if message == "wanted string or table" {
        return "expected a string".into();
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Overlay {
        #[serde(default = "half")]
        alpha: f32,
        #[serde(default)]
        colormap: Option<String>,
        #[serde(default)]
        size: Option<Vec<u32>>,
    }

    fn half() -> f32 {
        0.5
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Needs {
        path: String,
        #[serde(default)]
        verbose: bool,
    }

    fn table(text: &str) -> Options {
        toml::from_str(text).unwrap()
    }

    fn check_alpha(o: &Overlay) -> Vec<Problem> {
        if (0.0..=1.0).contains(&o.alpha) {
            vec![]
        } else {
            vec![Problem::new(
                "alpha",
                format!("{:?} is not between 0 and 1", o.alpha),
            )]
        }
    }

    #[test]
    fn good_options_parse_with_defaults() {
        let o: Overlay = parse(&table("colormap = \"jet\"\nalpha = 1")).unwrap();
        assert_eq!(
            o,
            Overlay {
                alpha: 1.0,
                colormap: Some("jet".into()),
                size: None
            }
        );
        assert_eq!(parse::<Overlay>(&Options::new()).unwrap().alpha, 0.5);
        assert_eq!(parse::<NoOptions>(&Options::new()), Ok(NoOptions {}));
    }

    #[test]
    fn an_unknown_key_gets_a_suggestion_from_the_struct_s_fields() {
        let p = parse::<Overlay>(&table("colormp = \"jet\"")).unwrap_err();
        assert_eq!(
            p,
            vec![Problem::new(
                "colormp",
                "unknown option `colormp`; did you mean `colormap`?"
            )]
        );
        let p = parse_in::<Overlay>(&table("zzz = 1"), "options").unwrap_err();
        assert_eq!(p[0].field, "options.zzz");
        assert_eq!(
            p[0].message,
            "unknown option `zzz` (known options: alpha, colormap, size)"
        );
        let p = parse::<NoOptions>(&table("gamma = 2")).unwrap_err();
        assert_eq!(
            p[0].message,
            "unknown option `gamma` (this kind takes no options)"
        );
    }

    #[test]
    fn a_wrong_type_names_the_field_and_the_value() {
        let p = parse::<Overlay>(&table("alpha = \"high\"")).unwrap_err();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "alpha");
        assert_eq!(
            p[0].message,
            "invalid type: string \"high\", expected a number"
        );
        let p = parse_in::<Overlay>(&table("size = [224, -1]"), "options").unwrap_err();
        assert_eq!(p[0].field, "options.size[1]");
        assert_eq!(
            p[0].message,
            "invalid value: integer `-1`, expected a non-negative integer"
        );
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let p = parse_in::<Needs>(&table("verbose = true"), "options").unwrap_err();
        assert_eq!(p, vec![Problem::new("options", "missing option `path`")]);
        let p = parse::<Needs>(&table("verbose = 3")).unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].field, "verbose");
        assert_eq!(p[1].message, "missing option `path`");
    }

    #[test]
    fn every_problem_is_reported_and_the_checks_see_the_good_keys() {
        let o = table("alpha = 1.5\ncolormp = \"jet\"\nsize = \"big\"");
        let p = check::<Overlay>(&o, "", check_alpha);
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["colormp", "size", "alpha"], "{p:?}");
        assert_eq!(p[2].message, "1.5 is not between 0 and 1");
        let err = load::<Overlay>(&o, "", check_alpha)
            .unwrap_err()
            .to_string();
        assert!(err.contains("colormp: unknown option"), "{err}");
        assert!(err.contains("alpha: 1.5 is not between 0 and 1"), "{err}");
        let good = load::<Overlay>(&table("alpha = 0.25"), "", check_alpha).unwrap();
        assert_eq!(good.alpha, 0.25);
    }

    #[test]
    fn field_paths_split_and_join() {
        use Segment::*;
        assert_eq!(
            segments("task.pairs[0].a"),
            vec![
                Key("task".into()),
                Key("pairs".into()),
                Index(0),
                Key("a".into())
            ]
        );
        assert_eq!(field_of(&segments("render[1].kind")), "render[1].kind");
        assert_eq!(join("options", "size[1]"), "options.size[1]");
        assert_eq!(join("", "alpha"), "alpha");
        assert_eq!(join("options", ""), "options");
    }

    #[test]
    fn spans_of_fields() {
        let text = "[a]\nx = 1\n[[b]]\ny = [1, 2]\n";
        let root = DeTable::parse(text).unwrap();
        let at = |f: &str| span_of(root.get_ref(), f).map(|s| &text[s]);
        assert_eq!(at("a.x"), Some("x"));
        assert_eq!(at("a.missing"), Some("a"));
        assert_eq!(at("b[0].y[1]"), Some("2"));
        assert_eq!(at("b[3].y"), Some("b"));
        assert_eq!(at("c.d"), None);
    }
}
