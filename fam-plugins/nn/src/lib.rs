//! fam-nn: inference layers shared by the CNN plugins, with BatchNorm folded into the
//! convolutions at load time, and a fast depthwise convolution.

use fam_core::candle::{DType, Device, IndexOp, Tensor};
use fam_core::weights::{self, StateDict};
use fam_core::{FamError, Result};
use std::path::Path;

/// Activation applied after a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Relu6,
    /// LeakyReLU with slope 0.1 (ResNet-12 of the few-shot literature).
    LeakyRelu01,
}

/// A convolution with its BatchNorm folded in: `y = act(conv(x, W') + b')` with
/// `W' = W γ/σ`, `b' = β − μ γ/σ`, `σ = sqrt(var + eps)`.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// `[O, I/groups, k, k]`
    weight: Tensor,
    /// `[O]`
    bias: Tensor,
    stride: usize,
    padding: usize,
    groups: usize,
    act: Act,
}

impl ConvBn {
    /// Loads `{conv}.weight` and the BatchNorm `{bn}.*` from a state dict and folds them.
    pub fn load(
        sd: &StateDict,
        path: &Path,
        conv: &str,
        bn: &str,
        stride: usize,
        act: Act,
        device: &Device,
    ) -> Result<Self> {
        let w = weights::get(sd, path, &format!("{conv}.weight"))?.to_dtype(DType::F32)?;
        let get = |n: &str| -> Result<Tensor> {
            Ok(weights::get(sd, path, &format!("{bn}.{n}"))?.to_dtype(DType::F32)?)
        };
        let (gamma, beta, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        let (o, i, kh, kw) = w.dims4().map_err(|e| {
            FamError::weights(
                path,
                format!("`{conv}.weight` is not a 4-D convolution kernel: {e}"),
            )
        })?;
        if gamma.dims1()? != o {
            return Err(FamError::weights(
                path,
                format!(
                    "`{bn}.weight` has {} channels, `{conv}.weight` has {o}",
                    gamma.dims1()?
                ),
            ));
        }
        if kh != kw {
            return Err(FamError::weights(
                path,
                format!("`{conv}` has a non-square kernel {kh}x{kw}"),
            ));
        }
        let scale = (gamma / (var + 1e-5)?.sqrt()?)?;
        let weight = w.broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        // Input channels: a depthwise kernel has one per output channel.
        let groups = if i == 1 && o > 1 { o } else { 1 };
        Ok(Self {
            weight: weight.to_device(device)?,
            bias: bias.to_device(device)?,
            stride,
            padding: kh / 2,
            groups,
            act,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, _, k, _) = self.weight.dims4()?;
        let y = if self.groups > 1 {
            depthwise(x, &self.weight, self.stride, self.padding)?
        } else if k == 1 && self.stride == 1 {
            // Pointwise: one matrix product per image, no im2col copy.
            let (b, c, h, w) = x.dims4()?;
            self.weight
                .reshape((o, c))?
                .broadcast_matmul(&x.reshape((b, c, h * w))?)?
                .reshape((b, o, h, w))?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        let y = y.broadcast_add(&self.bias.reshape((1, o, 1, 1))?)?;
        Ok(match self.act {
            Act::None => y,
            Act::Relu => y.relu()?,
            Act::Relu6 => y.clamp(0f32, 6f32)?,
            Act::LeakyRelu01 => (y.relu()? + (y.minimum(0f32)? * 0.1)?)?,
        })
    }
}

/// Depthwise convolution as a sum over kernel taps of shifted, strided input slices scaled
/// per channel. candle's grouped convolution runs one convolution per group, which for
/// MobileNet's 1000-channel depthwise layers is far slower than this.
pub fn depthwise(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, one, k, _) = weight.dims4()?;
    if o != c || one != 1 {
        return Err(FamError::invalid(format!(
            "depthwise kernel {:?} does not match {c} input channels",
            weight.dims()
        )));
    }
    let ho = (h + 2 * padding - k) / stride + 1;
    let wo = (w + 2 * padding - k) / stride + 1;
    // Pad so that every tap can take `stride * out` rows/cols starting at its offset.
    let need_h = k - 1 + stride * ho;
    let need_w = k - 1 + stride * wo;
    let xp = x
        .pad_with_zeros(2, padding, need_h.saturating_sub(h + padding))?
        .pad_with_zeros(3, padding, need_w.saturating_sub(w + padding))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        let rows = xp.narrow(2, ky, stride * ho)?;
        let rows = if stride > 1 {
            rows.reshape((b, c, ho, stride, need_w))?
                .i((.., .., .., 0, ..))?
        } else {
            rows
        };
        for kx in 0..k {
            let tap = rows.narrow(3, kx, stride * wo)?;
            let tap = if stride > 1 {
                tap.reshape((b, c, ho, wo, stride))?
                    .i((.., .., .., .., 0))?
            } else {
                tap
            };
            let wk = weight.i((.., 0, ky, kx))?.reshape((1, c, 1, 1))?;
            let term = tap.broadcast_mul(&wk)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    acc.ok_or_else(|| FamError::invalid("empty depthwise kernel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depthwise_matches_grouped_convolution() {
        let dev = Device::Cpu;
        for (h, w, stride) in [(7, 7, 1), (7, 7, 2), (8, 6, 2), (5, 9, 1)] {
            let x = Tensor::randn(0f32, 1., (2, 4, h, w), &dev).unwrap();
            let k = Tensor::randn(0f32, 1., (4, 1, 3, 3), &dev).unwrap();
            let ours = depthwise(&x, &k, stride, 1).unwrap();
            let reference = x.conv2d(&k, 1, stride, 1, 4).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "{h}x{w} s{stride}");
            let diff = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        }
    }
}
