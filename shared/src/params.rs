//! Flat parameter vectors: the form in which models are hashed, sent and aggregated.
//!
//! Parameters are visited in the module's field order (for `Linear`: weight, then bias).

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::backend::ExecutionError;

/// Why a flat vector could not be loaded into a module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("parameter vector has {got} values, the model has {expected}")]
    Length { expected: usize, got: usize },
    #[error("could not read parameters back from the device: {0}")]
    Readback(String),
}

impl From<ExecutionError> for ParamsError {
    fn from(e: ExecutionError) -> Self {
        Self::Readback(e.to_string())
    }
}

struct Collect<B: Backend>(Vec<Tensor<B, 1>>);

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.val().reshape([-1]));
    }
}

/// All float parameters of `module` concatenated on its device (no readback).
pub fn flatten<B: Backend, M: Module<B>>(module: &M) -> Tensor<B, 1> {
    let mut collect = Collect(Vec::new());
    module.visit(&mut collect);
    Tensor::cat(collect.0, 0)
}

/// Reads all float parameters of `module` into host memory, asynchronously (browser-safe).
pub async fn to_vec<B: Backend, M: Module<B>>(module: &M) -> Result<Vec<f32>, ParamsError> {
    let data = flatten(module).into_data_async().await?;
    Ok(data.iter::<f32>().collect())
}

struct Load<'a> {
    values: &'a [f32],
    offset: usize,
}

impl<B: Backend> ModuleMapper<B> for Load<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, old, mapper) = param.consume();
        let shape = old.shape();
        let n = shape.num_elements();
        let end = (self.offset + n).min(self.values.len());
        let mut values = self.values[self.offset.min(end)..end].to_vec();
        // A short vector is reported by `load` before mapping; pad only to keep shapes valid.
        values.resize(n, 0.0);
        self.offset += n;
        let tensor = Tensor::<B, D>::from_data(TensorData::new(values, shape), &old.device())
            .set_require_grad(old.is_require_grad());
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Replaces every float parameter of `module` with values from `values`, in visiting order.
pub fn load<B: Backend, M: Module<B>>(module: M, values: &[f32]) -> Result<M, ParamsError> {
    let expected = module.num_params();
    if values.len() != expected {
        return Err(ParamsError::Length {
            expected,
            got: values.len(),
        });
    }
    Ok(module.map(&mut Load { values, offset: 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DigitsMlpConfig;
    use burn::backend::NdArray;

    #[test]
    fn flatten_then_load_is_the_identity() {
        let device = Default::default();
        let config = DigitsMlpConfig::new().with_hidden(8);
        let model = config.init::<NdArray>(&device);
        let flat = futures::executor::block_on(to_vec(&model)).expect("readback");
        assert_eq!(flat.len(), config.num_params());

        let shifted: Vec<f32> = flat.iter().map(|v| v + 1.0).collect();
        let other = load(config.init::<NdArray>(&device), &shifted).expect("load");
        assert_eq!(
            futures::executor::block_on(to_vec(&other)).expect("readback"),
            shifted
        );

        let err = load(model, &shifted[1..]).unwrap_err();
        assert_eq!(
            err,
            ParamsError::Length {
                expected: flat.len(),
                got: flat.len() - 1
            }
        );
    }
}
