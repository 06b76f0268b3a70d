//! `html`: `index.html`, the report page (`page.rs`) beside the run's other files, and
//! each comparison's own page `compare/<id>.html` (`compare.rs`). It runs after the other
//! renderers and links only the files they wrote.

use crate::draw::Colormap;
use crate::page::page;
use fam_core::explain::Explanation;
use fam_core::options::{self, serde::Deserialize};
use fam_core::output::OutputSink;
use fam_core::plugin::Options;
use fam_core::records::ReportData;
use fam_core::{Renderer, Result};

/// Options of `html`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(crate = "fam_core::options::serde", deny_unknown_fields)]
pub struct HtmlOptions {
    /// The page's title (default: `fam: <task> with <backbone>`).
    #[serde(default)]
    pub title: Option<String>,
}

/// The `html` renderer.
pub struct Html {
    pub title: Option<String>,
}

impl Html {
    pub fn from_options(o: &Options) -> Result<Self> {
        let o = options::load::<HtmlOptions>(o, "", |_| vec![])?;
        Ok(Self { title: o.title })
    }
}

impl Renderer for Html {
    fn name(&self) -> String {
        "html".into()
    }

    fn runs_last(&self) -> bool {
        true
    }

    fn render(&self, e: &Explanation, out: &mut dyn OutputSink) -> Result<()> {
        // Each comparison's own page (where it has an image; not from `fam-cli merge`,
        // whose explanation has none, so the shards' pages stay).
        for c in &e.comparisons {
            let name = format!("compare/{}.html", c.id);
            if out.reuse(&name) {
                continue;
            }
            if let Some(page) = crate::compare::page(e, c, Colormap::Jet)? {
                out.write(&name, page.as_bytes())?;
            }
        }
        let files = out.written_files();
        let data = ReportData::new(self.title.as_deref(), e);
        out.write("index.html", page(&data, &files).as_bytes())
    }
}
