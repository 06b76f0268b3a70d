//! `html`: `index.html`, the report page (`page.rs`) beside the run's other files.
//! It runs after the other renderers and links only the files they wrote.

use fam_core::explain::Explanation;
use fam_core::output::OutputSink;
use fam_core::plugin::Options;
use crate::page::page;
use fam_core::records::ReportData;
use fam_core::{Renderer, Result};

/// The `html` renderer.
pub struct Html {
    pub title: Option<String>,
}

impl Html {
    pub fn from_options(o: &Options) -> Result<Self> {
        Ok(Self {
            title: o.get("title").and_then(|v| v.as_str()).map(String::from),
        })
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
