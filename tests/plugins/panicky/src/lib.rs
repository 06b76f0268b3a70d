//! A plugin whose methods panic or misbehave: the host must turn each panic into an error,
//! and each bad value into a clear message.

use std::sync::atomic::{AtomicUsize, Ordering};

use fam_core::candle::{Device, Tensor};
use fam_core::plugin::Registrar;
use fam_core::{Backbone, Features, InputSpec, Result, Similarity};

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
    r.backbone(
        "pooled_pixels",
        "3x7x7 maps: ReLU of the normalized image, average-pooled (a black image gives all zeros)",
        |_| vec![],
        |_, d| {
            Ok(Box::new(PooledPixels {
                device: d.clone(),
                ragged: false,
                calls: AtomicUsize::new(0),
            }))
        },
    );
    r.backbone(
        "ragged",
        "like pooled_pixels, but every second batch has 6 channels instead of 3",
        |_| vec![],
        |_, d| {
            Ok(Box::new(PooledPixels {
                device: d.clone(),
                ragged: true,
                calls: AtomicUsize::new(0),
            }))
        },
    );
}

/// A tiny real backbone: the normalized image's positive part, average-pooled to 7x7.
struct PooledPixels {
    device: Device,
    ragged: bool,
    calls: AtomicUsize,
}

impl Backbone for PooledPixels {
    fn describe(&self) -> String {
        format!("pooled_pixels(ragged={})", self.ragged)
    }
    fn input_spec(&self) -> InputSpec {
        InputSpec::imagenet()
    }
    fn device(&self) -> Device {
        self.device.clone()
    }
    fn forward(&self, batch: &Tensor) -> Result<Features> {
        let maps = batch.relu()?.avg_pool2d(32)?;
        let odd = self.calls.fetch_add(1, Ordering::SeqCst) % 2 == 1;
        let maps = if self.ragged && odd {
            Tensor::cat(&[&maps, &maps], 1)?
        } else {
            maps
        };
        Features::from_maps(maps)
    }
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
