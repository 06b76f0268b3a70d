//! The activations the engine fuses into an operator's epilogue.

/// An activation, applied in the epilogue of the operator that precedes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    None,
    Relu,
    /// `min(max(x, lo), hi)` (ReLU6 is `Clip(0, 6)`).
    Clip(f32, f32),
    LeakyRelu(f32),
    /// `clamp(a·x + b, 0, 1)`
    HardSigmoid(f32, f32),
    HardSwish,
    Sigmoid,
    /// `x · sigmoid(x)`
    Silu,
    Tanh,
    /// `x · Φ(x)` with the exact (erf) normal CDF.
    Gelu,
    /// The error function itself (GELU as exporters decompose it).
    Erf,
}
