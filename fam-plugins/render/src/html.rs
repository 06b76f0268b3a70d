//! `html`: `index.html`, the report page (`page.rs`) beside the run's other files.
//! It runs after the other renderers and links only the files they wrote.

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
        let files = out.written_files();
        let data = ReportData::new(self.title.as_deref(), e);
        out.write("index.html", page(&data, &files).as_bytes())
    }
}
