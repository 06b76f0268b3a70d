//! The activations the built-in layers fuse after a convolution.

use crate::engine;

/// Activation applied after a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Relu6,
    /// LeakyReLU with slope 0.1 (ResNet-12 of the few-shot literature).
    LeakyRelu01,
}

impl From<Act> for engine::Act {
    fn from(a: Act) -> Self {
        match a {
            Act::None => engine::Act::None,
            Act::Relu => engine::Act::Relu,
            Act::Relu6 => engine::Act::Clip(0.0, 6.0),
            Act::LeakyRelu01 => engine::Act::LeakyRelu(0.1),
        }
    }
}
