//! Per-location vectors of a backbone's feature maps, whose sum is the image's embedding
//! (in the metric's space), and the correspondence of two images computed from them
//! ([`fam_core::decompose`]). The eval baselines of Stylianou and Zhu use the same vectors.

use fam_core::candle::{DType, Tensor};
use fam_core::decompose::{pairs, top_shares, Locations};
use fam_core::error::{FamError, Result};
use fam_core::explain::Target;
use fam_core::records::{Correspondence, Transform};
use fam_core::traits::{Backbone, Similarity};

/// The feature maps (`[C, h, w]`, row-major) and the raw embedding of one image.
pub struct ImageFeatures {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub maps: Vec<f32>,
    pub embedding: Vec<f32>,
}

impl ImageFeatures {
    /// One image's row of a batch of feature maps `[B, C, h, w]`; `embedding` may be empty
    /// (then [`locations`] does not check its split against it).
    pub fn from_batch(maps: &Tensor, index: usize, embedding: Vec<f32>) -> Result<Self> {
        let (_, c, h, w) = maps.dims4()?;
        Ok(Self {
            channels: c,
            height: h,
            width: w,
            maps: maps
                .get(index)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
            embedding,
        })
    }

    /// Runs one image (`[3, H, W]` normalized values) through the backbone.
    pub fn of(backbone: &dyn Backbone, input: Vec<f32>, (w, h): (usize, usize)) -> Result<Self> {
        let t = Tensor::from_vec(input, (1, 3, h, w), &backbone.device())?;
        let f = backbone.forward(&t)?;
        let (_, c, fh, fw) = f.maps.dims4()?;
        Ok(Self {
            channels: c,
            height: fh,
            width: fw,
            maps: f.maps.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            embedding: f
                .embeddings
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?,
        })
    }
}

pub(crate) fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The per-location vectors of an image in the target's embedding space (their sum is
/// `T(z)`): `a_i / N` for a pooled backbone; through an affine head `z = L(A) + z0`, each
/// location's share `L_i(a_i)` of every embedding dimension (the pullback of the unit
/// vectors, in chunks), with `z0` spread evenly. The transform's normalization is held at
/// the pooled embedding, which makes the split exact.
pub fn locations(backbone: &dyn Backbone, f: &ImageFeatures, target: &Target) -> Result<Locations> {
    let (c, n) = (f.channels, f.height * f.width);
    let d = f.embedding.len();
    let device = backbone.device();
    let mut data = vec![0f32; n * d];
    let mut offset = vec![0f32; d];
    let probe = Tensor::zeros((1, d), DType::F32, &device)?;
    if backbone.pullback(&probe)?.is_some() {
        let maps = Tensor::from_vec(f.maps.clone(), (1, c, f.height, f.width), &device)?;
        const CHUNK: usize = 64;
        for start in (0..d).step_by(CHUNK) {
            let k = CHUNK.min(d - start);
            let mut eye = vec![0f32; k * d];
            for i in 0..k {
                eye[i * d + start + i] = 1.0;
            }
            let u = Tensor::from_vec(eye, (k, d), &device)?;
            let (w, z0) = backbone
                .pullback(&u)?
                .ok_or_else(|| FamError::invalid("the backbone's pullback disappeared"))?;
            // [k, C, h, w] ⊙ A → sum over channels → [k, n]
            let share: Vec<Vec<f32>> = w
                .to_dtype(DType::F32)?
                .broadcast_mul(&maps)?
                .sum(1)?
                .reshape((k, n))?
                .to_vec2()?;
            for (i, row) in share.iter().enumerate() {
                for (loc, v) in row.iter().enumerate() {
                    data[loc * d + start + i] = *v;
                }
            }
            if start == 0 {
                offset.copy_from_slice(&z0[..d.min(z0.len())]);
            }
        }
    } else {
        if c != d {
            return Err(FamError::invalid(format!(
                "backbone `{}` gives {d}-d embeddings from {c} channels and no pullback, so its embedding is no sum of locations",
                backbone.describe()
            )));
        }
        for ch in 0..c {
            for loc in 0..n {
                data[loc * d + ch] = f.maps[ch * n + loc] / n as f32;
            }
        }
    }
    let raw = Locations::new(f.height, f.width, d, data)?;
    // The split must give the backbone's own embedding back.
    let sum: Vec<f32> = raw.sum().iter().zip(&offset).map(|(a, b)| a + b).collect();
    let err = norm(
        &sum.iter()
            .zip(&f.embedding)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
    );
    if err > 1e-3 * norm(&f.embedding).max(1e-6) {
        return Err(FamError::invalid(format!(
            "backbone `{}`: its locations add up to an embedding {err:.3e} away from its own",
            backbone.describe()
        )));
    }
    let z = &f.embedding;
    let (offset, scale) = match target.transform {
        Transform::None => (offset, 1.0),
        Transform::L2n => (offset, 1.0 / norm(z).max(f32::MIN_POSITIVE)),
        Transform::Cl2n => {
            let centred: Vec<f32> = z.iter().zip(&target.center).map(|(a, b)| a - b).collect();
            let o = offset
                .iter()
                .zip(&target.center)
                .map(|(a, b)| a - b)
                .collect();
            (o, 1.0 / norm(&centred).max(f32::MIN_POSITIVE))
        }
    };
    raw.affine(&offset, scale)
}

/// Correspondences are kept whole up to this many location pairs (a 32 x 32 map against
/// another); larger ones keep each location's [`TOP_K`] largest shares.
pub const MAX_PAIRS: usize = 1 << 20;

/// Shares kept per location of a correspondence larger than [`MAX_PAIRS`].
pub const TOP_K: usize = 16;

/// No correspondence beyond this many pairs (a 128 x 128 map against another): the cross
/// products alone would cost more than the run.
pub const MAX_TOP_PAIRS: usize = 1 << 28;

/// Whether a query and a reference image get a correspondence: `target` (what the query's
/// map explains) must be the plain similarity to the reference image's embedding (no
/// margin, no transform), within [`MAX_TOP_PAIRS`].
pub fn has_correspondence(
    target: &Target,
    query: &ImageFeatures,
    reference: &ImageFeatures,
) -> bool {
    target.others.is_empty()
        && target.transform == Transform::None
        && query.height * query.width * reference.height * reference.width <= MAX_TOP_PAIRS
        && target.reference == reference.embedding
}

/// The correspondence of a query and a reference image ([`has_correspondence`]) from their
/// per-location vectors ([`locations`]): the score split over their pairs of locations,
/// whole up to [`MAX_PAIRS`] pairs and as each location's [`TOP_K`] largest shares beyond,
/// or `None` where the metric has no inner-product form.
pub fn correspondence(
    similarity: &dyn Similarity,
    target: &Target,
    query: &ImageFeatures,
    e: &Locations,
    r: &Locations,
) -> Result<Option<Correspondence>> {
    let Some(form) = similarity.inner_product_form(&query.embedding, &target.reference)? else {
        return Ok(None);
    };
    let (pairs, top) = if e.len() * r.len() <= MAX_PAIRS {
        (pairs(&form, e, r)?, None)
    } else {
        (Vec::new(), Some(top_shares(&form, e, r, TOP_K)?))
    };
    Ok(Some(Correspondence {
        query_size: (e.height, e.width),
        reference_size: (r.height, r.width),
        pairs,
        top,
    }))
}
