//! A plugin whose methods panic: the host must turn each panic into an error.

use fam_core::plugin::Registrar;
use fam_core::{Result, Similarity};

fam_core::export_plugin!(name: "test_panicky", register: register);

fn register(r: &mut Registrar) {
    r.similarity(
        "panic",
        "panics in score",
        |_| vec![],
        |_| Ok(Box::new(Panicky)),
    );
    r.similarity(
        "panic_on_create",
        "panics when created",
        |_| vec![],
        |_| panic!("cannot create"),
    );
}

struct Panicky;

impl Similarity for Panicky {
    fn name(&self) -> String {
        "panic".into()
    }
    fn score(&self, _: &[f32], _: &[f32]) -> Result<f32> {
        panic!("deliberate panic in score")
    }
    fn contributions(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
        panic!("deliberate panic in contributions")
    }
    fn gradient(&self, _: &[f32], _: &[f32]) -> Result<Vec<f32>> {
        panic!("deliberate panic in gradient")
    }
}
