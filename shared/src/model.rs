//! Models, generic over the Burn backend.

use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;

/// A two-layer perceptron for the 8×8 digits: 64 pixels → `hidden` → 10 classes.
#[derive(Module, Debug)]
pub struct DigitsMlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    activation: Relu,
}

#[derive(Config, Debug, PartialEq, Eq)]
pub struct DigitsMlpConfig {
    #[config(default = 64)]
    pub hidden: usize,
}

/// Input features per image.
pub const DIGITS_INPUTS: usize = 64;
/// Output classes.
pub const DIGITS_CLASSES: usize = 10;

impl DigitsMlpConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> DigitsMlp<B> {
        DigitsMlp {
            fc1: LinearConfig::new(DIGITS_INPUTS, self.hidden).init(device),
            fc2: LinearConfig::new(self.hidden, DIGITS_CLASSES).init(device),
            activation: Relu::new(),
        }
    }

    /// Number of f32 parameters of the model.
    pub fn num_params(&self) -> usize {
        DIGITS_INPUTS * self.hidden + self.hidden + self.hidden * DIGITS_CLASSES + DIGITS_CLASSES
    }
}

impl<B: Backend> DigitsMlp<B> {
    /// Pixels scaled to [0, 1], `[batch, 64]` → logits `[batch, 10]`.
    pub fn forward(&self, pixels: Tensor<B, 2>) -> Tensor<B, 2> {
        let hidden = self.activation.forward(self.fc1.forward(pixels)); // [batch, hidden]
        self.fc2.forward(hidden) // [batch, 10]
    }
}
