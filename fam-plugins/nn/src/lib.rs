//! fam-nn: inference layers shared by the CNN plugins, with BatchNorm folded into the
//! convolutions at load time. On the CPU the convolutions run on the direct kernels of
//! [`cpu`] (fused bias and activation, a direct depthwise convolution); on other devices
//! they are composed from candle's tensor operations.

mod act;
pub mod cpu;
pub mod engine;

pub use act::Act;

use fam_core::candle::{DType, Device, IndexOp, Tensor};
use fam_core::{FamError, Result};
use fam_weights::{self as weights, StateDict};
use std::path::Path;

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
    /// The same convolution in host memory, for the CPU kernels and the engine (CPU models
    /// only).
    host: Option<std::sync::Arc<cpu::HostConv>>,
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
        let host = match device {
            Device::Cpu => Some(std::sync::Arc::new(cpu::HostConv {
                weight: weight.flatten_all()?.to_vec1()?,
                bias: bias.to_vec1()?,
                out_channels: o,
                in_per_group: i,
                k: kh,
                stride,
                padding: kh / 2,
                groups,
                act,
            })),
            _ => None,
        };
        Ok(Self {
            weight: weight.to_device(device)?,
            bias: bias.to_device(device)?,
            stride,
            padding: kh / 2,
            groups,
            act,
            host,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// This convolution as an engine operator (CPU models only: the folded weights live in
    /// host memory there).
    pub fn engine_spec(&self) -> Option<engine::ConvSpec> {
        let h = self.host.as_ref()?;
        Some(engine::ConvSpec {
            weight: h.weight.clone(),
            dims: (h.out_channels, h.in_per_group, h.k, h.k),
            bias: h.bias.clone(),
            groups: h.groups,
            stride: (h.stride, h.stride),
            dilation: (1, 1),
            pads: [h.padding; 4],
            act: h.act.into(),
            prelu: None,
        })
    }

    pub fn in_channels(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (Some(host), Device::Cpu, DType::F32) = (&self.host, x.device(), x.dtype()) {
            let dims = x.dims4()?;
            if dims.1 != self.in_channels() {
                return Err(FamError::invalid(format!(
                    "convolution expects {} input channels, got {:?}",
                    self.in_channels(),
                    x.dims()
                )));
            }
            return with_host_slice(x, |data| {
                let (out, shape) = cpu::conv2d(data, dims, host);
                Ok(Tensor::from_vec(out, shape, &Device::Cpu)?)
            });
        }
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

/// Calls `f` with the values of an f32 CPU tensor as one contiguous slice (no copy when the
/// tensor is already contiguous).
pub fn with_host_slice<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let fam_core::candle::Storage::Cpu(cs) = &*storage else {
        return Err(FamError::invalid("expected a tensor in CPU memory"));
    };
    let data = cs.as_slice::<f32>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| FamError::invalid("non-contiguous tensor"))?;
    f(&data[start..end])
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

    /// The CPU kernels and the tensor-operation path (used on GPUs) agree, for every kind of
    /// convolution MobileNetV2 and the ResNets use.
    #[test]
    fn cpu_kernels_match_the_tensor_path() {
        let dev = Device::Cpu;
        // (in, out, k, stride, depthwise, act)
        for (c, o, k, stride, dw, act) in [
            (3, 8, 3, 2, false, Act::Relu6),
            (8, 16, 1, 1, false, Act::None),
            (8, 8, 3, 1, true, Act::Relu6),
            (8, 8, 3, 2, true, Act::Relu),
            (8, 4, 1, 2, false, Act::LeakyRelu01),
            (4, 6, 3, 1, false, Act::LeakyRelu01),
        ] {
            let i = if dw { 1 } else { c };
            let weight = Tensor::randn(0f32, 1., (o, i, k, k), &dev).unwrap();
            let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let mut conv = ConvBn {
                weight: weight.clone(),
                bias: bias.clone(),
                stride,
                padding: k / 2,
                groups: if dw { c } else { 1 },
                act,
                host: None,
            };
            let x = Tensor::randn(0f32, 1., (3, c, 9, 7), &dev).unwrap();
            let reference = conv.forward(&x).unwrap();
            conv.host = Some(std::sync::Arc::new(cpu::HostConv {
                weight: weight.flatten_all().unwrap().to_vec1().unwrap(),
                bias: bias.to_vec1().unwrap(),
                out_channels: o,
                in_per_group: i,
                k,
                stride,
                padding: k / 2,
                groups: conv.groups,
                act,
            }));
            let ours = conv.forward(&x).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let diff: f32 = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-4, "{c}->{o} k{k} s{stride} dw={dw}: {diff}");
        }
    }

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
