//! A small decoder-only transformer language model over bytes, generic over the Burn backend.
//!
//! Pre-norm blocks (LayerNorm → causal multi-head self-attention → residual, LayerNorm → GELU
//! MLP → residual), learned absolute positions, no biases in the linear layers (as in most
//! modern LMs), and a final LayerNorm before the output projection. Tokens are bytes
//! ([`crate::text::ByteTokenizer`]), so any UTF-8 text trains it without a vocabulary file.
//!
//! Initial parameters come from [`LmConfig::init_params`]: a seeded, platform-independent
//! N(0, 0.02²) draw of every matrix (GPT-2's scheme, without its 1/√(2·layers) scaling of the
//! residual projections), LayerNorm gains of one and biases of zero, so the same seed gives the
//! same θ₀ on every backend and in every process.

use burn::module::{ModuleMapper, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};

use crate::data::SplitMix64;
use crate::params::{self, ParamsError};
use crate::privacy::standard_normal;

/// Shape of the language model. Every field is part of the run's spec: peers must agree on it.
#[derive(Config, Debug, PartialEq, Eq)]
pub struct LmConfig {
    /// Vocabulary size: 256 for byte tokens.
    #[config(default = 256)]
    pub vocab: usize,
    /// Context length in tokens.
    #[config(default = 64)]
    pub context: usize,
    /// Embedding width.
    #[config(default = 64)]
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    #[config(default = 4)]
    pub heads: usize,
    /// Transformer blocks.
    #[config(default = 2)]
    pub layers: usize,
    /// MLP hidden width as a multiple of `d_model`.
    #[config(default = 4)]
    pub mlp_ratio: usize,
}

/// One pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    attn_norm: LayerNorm<B>,
    qkv: Linear<B>,
    proj: Linear<B>,
    mlp_norm: LayerNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
    heads: usize,
}

/// The language model: bytes `[batch, time]` → next-byte logits `[batch, time, vocab]`.
#[derive(Module, Debug)]
pub struct Lm<B: Backend> {
    tokens: Embedding<B>,
    positions: Embedding<B>,
    blocks: Vec<Block<B>>,
    norm: LayerNorm<B>,
    head: Linear<B>,
}

impl LmConfig {
    /// Builds the module. Its values are placeholders until [`params::load`] fills them, normally
    /// from [`Self::init_params`].
    pub fn init<B: Backend>(&self, device: &B::Device) -> Lm<B> {
        let d = self.d_model;
        let linear = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Lm {
            tokens: EmbeddingConfig::new(self.vocab, d).init(device),
            positions: EmbeddingConfig::new(self.context, d).init(device),
            blocks: (0..self.layers)
                .map(|_| Block {
                    attn_norm: LayerNormConfig::new(d).init(device),
                    qkv: linear(d, 3 * d),
                    proj: linear(d, d),
                    mlp_norm: LayerNormConfig::new(d).init(device),
                    up: linear(d, self.mlp_ratio * d),
                    down: linear(self.mlp_ratio * d, d),
                    heads: self.heads,
                })
                .collect(),
            norm: LayerNormConfig::new(d).init(device),
            head: linear(d, self.vocab),
        }
    }

    /// Number of f32 parameters.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let block = 2 * 2 * d + 3 * d * d + d * d + 2 * self.mlp_ratio * d * d;
        self.vocab * d + self.context * d + self.layers * block + 2 * d + d * self.vocab
    }

    /// Checks the shape before anything is allocated; a bad spec from a relay is an error.
    pub fn validate(&self) -> Result<(), String> {
        if self.vocab == 0
            || self.context == 0
            || self.d_model == 0
            || self.layers == 0
            || self.mlp_ratio == 0
        {
            return Err("every LM dimension must be positive".into());
        }
        if self.heads == 0 || !self.d_model.is_multiple_of(self.heads) {
            return Err(format!(
                "{} heads do not divide d_model {}",
                self.heads, self.d_model
            ));
        }
        if self.num_params() > 64 << 20 {
            return Err(format!(
                "{} parameters is more than this system sends",
                self.num_params()
            ));
        }
        Ok(())
    }

    /// θ₀ for `seed`: every matrix (embeddings and linear weights) ~ N(0, 0.02²), LayerNorm
    /// gains 1 and biases 0. Identical on every backend and platform for a given seed.
    pub async fn init_params<B: Backend>(
        &self,
        device: &B::Device,
        seed: u64,
    ) -> Result<Vec<f32>, ParamsError> {
        let module = self
            .init::<B>(device)
            .map(&mut NormalInit(SplitMix64::new(seed)));
        params::to_vec(&module).await
    }
}

/// Redraws every matrix from N(0, 0.02²) in visiting order; vectors (LayerNorm's gain of ones
/// and bias of zeros, as Burn creates them) are kept.
struct NormalInit(SplitMix64);

impl<B: Backend> ModuleMapper<B> for NormalInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if D == 1 {
            return param;
        }
        let (id, old, mapper) = param.consume();
        let shape = old.shape();
        let values: Vec<f32> = (0..shape.num_elements())
            .map(|_| (standard_normal(&mut self.0) * 0.02) as f32)
            .collect();
        let tensor = Tensor::<B, D>::from_data(TensorData::new(values, shape), &old.device())
            .set_require_grad(old.is_require_grad());
        Param::from_mapped_value(id, tensor, mapper)
    }
}

impl<B: Backend> Block<B> {
    fn forward(&self, x: Tensor<B, 3>, mask: Tensor<B, 4, Bool>) -> Tensor<B, 3> {
        let [batch, time, d] = x.dims();
        let (heads, head_dim) = (self.heads, d / self.heads);
        let qkv = self.qkv.forward(self.attn_norm.forward(x.clone())); // [b, t, 3d]
        let split = |i: usize| {
            qkv.clone()
                .narrow(2, i * d, d)
                .reshape([batch, time, heads, head_dim])
                .swap_dims(1, 2) // [b, h, t, hd]
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (head_dim as f64).sqrt()); // [b, h, t, t]
        let weights = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3);
        let attended = weights.matmul(v).swap_dims(1, 2).reshape([batch, time, d]); // [b, t, d]
        let x = x + self.proj.forward(attended);
        let hidden = gelu(self.up.forward(self.mlp_norm.forward(x.clone()))); // [b, t, ratio·d]
        x + self.down.forward(hidden)
    }
}

impl<B: Backend> Lm<B> {
    /// Bytes `[batch, time]` (time ≤ context) → logits `[batch, time, vocab]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let device = tokens.device();
        let [_, time] = tokens.dims();
        let positions = Tensor::<B, 1, Int>::arange(0..time as i64, &device).reshape([1, time]);
        let mut x = self.tokens.forward(tokens) + self.positions.forward(positions); // [b, t, d]
        // True above the diagonal: a position never attends to later ones.
        let mask =
            Tensor::<B, 2, Bool>::tril_mask([time, time], 0, &device).reshape([1, 1, time, time]);
        for block in &self.blocks {
            x = block.forward(x, mask.clone());
        }
        self.head.forward(self.norm.forward(x))
    }

    /// Each window's mean next-token cross-entropy (nats): `windows` `[batch, time + 1]` →
    /// `[batch]`, each window's first `time` bytes predicting its last `time`.
    pub fn window_losses(&self, windows: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [batch, len] = windows.dims();
        let time = len - 1;
        let inputs = windows.clone().narrow(1, 0, time);
        let targets = windows.narrow(1, 1, time).reshape([batch, time, 1]);
        let log_p = burn::tensor::activation::log_softmax(self.forward(inputs), 2);
        log_p
            .gather(2, targets)
            .reshape([batch, time])
            .mean_dim(1)
            .reshape([batch])
            .neg()
    }

    /// Mean next-token cross-entropy (nats) of `windows` `[batch, time + 1]`: each window's
    /// first `time` bytes predict its last `time`.
    pub fn loss(&self, windows: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [batch, len] = windows.dims();
        let time = len - 1;
        let inputs = windows.clone().narrow(1, 0, time);
        let targets = windows.narrow(1, 1, time).reshape([batch * time]);
        let logits = self.forward(inputs);
        let vocab = logits.dims()[2];
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.reshape([batch * time, vocab]), targets)
    }
}

/// What [`sample`] generates.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    /// The bytes the text starts from (may be empty: it then starts after a newline).
    pub prompt: Vec<u8>,
    /// Bytes to generate.
    pub len: usize,
    /// Softmax temperature; 0 takes the most likely byte.
    pub temperature: f32,
    /// Fixes the draws: the same θ, prompt and seed give the same text on one backend.
    pub seed: u64,
}

/// Generates text from the model with parameters `params`: one byte at a time, each drawn from
/// the softmax of the last position's logits at `temperature`, with the context cut to the
/// model's window. Reads the logits back asynchronously (safe in browsers). Returns the prompt
/// followed by the generated bytes.
pub async fn sample<B: Backend>(
    device: &B::Device,
    config: &LmConfig,
    params: &[f32],
    sample: &SampleConfig,
) -> Result<Vec<u8>, ParamsError> {
    let model = params::load(config.init::<B>(device), params)?;
    let mut rng = SplitMix64::new(sample.seed);
    let mut text = if sample.prompt.is_empty() {
        vec![b'\n']
    } else {
        sample.prompt.clone()
    };
    let skip = if sample.prompt.is_empty() { 1 } else { 0 };
    for _ in 0..sample.len {
        let start = text.len().saturating_sub(config.context);
        let window: Vec<i64> = text[start..].iter().map(|&b| i64::from(b)).collect();
        let time = window.len();
        let logits = model.forward(Tensor::<B, 2, Int>::from_data(
            TensorData::new(window, [1, time]),
            device,
        )); // [1, time, vocab]
        let last = logits
            .narrow(1, time - 1, 1)
            .reshape([config.vocab])
            .into_data_async()
            .await?;
        let logits: Vec<f32> = last.iter::<f32>().collect();
        text.push(draw(&logits, sample.temperature, &mut rng));
    }
    Ok(text.split_off(skip))
}

/// Draws an index from softmax(logits / temperature) (the arg-max at temperature 0).
fn draw(logits: &[f32], temperature: f32, rng: &mut SplitMix64) -> u8 {
    let best = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv { (i, v) } else { (bi, bv) }
        });
    if temperature <= 0.0 || !best.1.is_finite() {
        return best.0 as u8;
    }
    let t = f64::from(temperature);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| ((f64::from(v) - f64::from(best.1)) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    // 53 random bits as a uniform draw in [0, total).
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u8;
        }
        u -= w;
    }
    best.0 as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use futures::executor::block_on;

    fn config() -> LmConfig {
        LmConfig::new()
            .with_context(8)
            .with_d_model(16)
            .with_heads(2)
            .with_layers(2)
    }

    #[test]
    fn parameter_count_and_seeded_init() {
        let device = Default::default();
        let c = config();
        assert_eq!(c.num_params(), c.init::<NdArray>(&device).num_params());
        let a = block_on(c.init_params::<NdArray>(&device, 1)).expect("init");
        assert_eq!(
            a,
            block_on(c.init_params::<NdArray>(&device, 1)).expect("init"),
            "same seed, same θ₀"
        );
        assert_ne!(
            a,
            block_on(c.init_params::<NdArray>(&device, 2)).expect("init")
        );
        // The first LayerNorm gain (after the two embeddings) is ones, its bias zeros.
        let ln = (c.vocab + c.context) * c.d_model;
        assert!(
            a[ln..ln + 16].iter().all(|v| *v == 1.0)
                && a[ln + 16..ln + 32].iter().all(|v| *v == 0.0)
        );
        let std = (a[..ln].iter().map(|v| v * v).sum::<f32>() / ln as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "embedding std {std}");
        assert!(LmConfig::new().with_heads(3).validate().is_err());
    }

    #[test]
    fn attention_is_causal() {
        let device = Default::default();
        let c = config();
        let theta = block_on(c.init_params::<NdArray>(&device, 3)).expect("init");
        let model = params::load(c.init::<NdArray>(&device), &theta).expect("load");
        let logits = |tokens: [i64; 8]| {
            model
                .forward(Tensor::<NdArray, 2, Int>::from_data([tokens], &device))
                .into_data()
                .to_vec::<f32>()
                .expect("f32")
        };
        let a = logits([1, 2, 3, 4, 5, 6, 7, 8]);
        let b = logits([1, 2, 3, 4, 5, 6, 7, 200]);
        let per_position = c.vocab;
        assert_eq!(
            a[..7 * per_position],
            b[..7 * per_position],
            "earlier positions never see later bytes"
        );
        assert_ne!(a[7 * per_position..], b[7 * per_position..]);
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_model() {
        let device = Default::default();
        let c = config();
        let theta = block_on(c.init_params::<NdArray>(&device, 3)).expect("init");
        let run = |seed, temperature| {
            block_on(sample::<NdArray>(
                &device,
                &c,
                &theta,
                &SampleConfig {
                    prompt: b"ab".to_vec(),
                    len: 20,
                    temperature,
                    seed,
                },
            ))
            .expect("sample")
        };
        let a = run(1, 1.0);
        assert_eq!(
            a.len(),
            22,
            "prompt and 20 bytes (longer than the context of 8)"
        );
        assert_eq!(&a[..2], b"ab");
        assert_eq!(a, run(1, 1.0), "same seed, same text");
        assert_ne!(a, run(2, 1.0), "another seed, other text");
        assert_eq!(run(1, 0.0), run(2, 0.0), "temperature 0 is the arg-max");
        let mut rng = SplitMix64::new(0);
        let mut logits = vec![-50.0f32; 256];
        logits[b'x' as usize] = 50.0;
        assert!((0..100).all(|_| draw(&logits, 1.0, &mut rng) == b'x'));
    }
}
