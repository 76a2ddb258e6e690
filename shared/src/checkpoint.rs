//! Checkpoints as [safetensors](https://github.com/huggingface/safetensors) bytes: the format
//! PyTorch, numpy and JAX users load with one call.
//!
//! Tensor names are the Burn module paths (`fc1.weight`, `blocks.0.qkv.weight`, …) and shapes
//! are Burn's: a `Linear` weight is `[in, out]`, the transpose of `torch.nn.Linear.weight`.
//! The flat parameter vector (the wire's order) is the tensors concatenated in file order.

use std::collections::BTreeMap;

use burn::module::{ModuleVisitor, Param};
use burn::prelude::*;

/// A tensor's name and shape within a module, in visiting (flat vector) order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

#[derive(Default)]
struct Layout {
    path: Vec<String>,
    tensors: Vec<TensorInfo>,
}

impl<B: Backend> ModuleVisitor<B> for Layout {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.tensors.push(TensorInfo {
            name: self.path.join("."),
            shape: param.dims().to_vec(),
        });
    }
}

/// Names and shapes of `module`'s float parameters, in flat-vector order.
pub fn layout<B: Backend, M: Module<B>>(module: &M) -> Vec<TensorInfo> {
    let mut layout = Layout::default();
    module.visit(&mut layout);
    layout.tensors
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("{got} values do not fill tensors of {expected} values")]
    Length { expected: usize, got: usize },
    #[error("not a safetensors file: {0}")]
    Malformed(String),
    #[error("tensor {0} is not F32")]
    Dtype(String),
}

/// Encodes `values` (flat, in `layout` order) as safetensors, with string `metadata`.
///
/// Written here rather than with `safetensors::serialize`, which orders the tensors' data by
/// dtype and then by name: this writer keeps the data in layout order, so that the file's data
/// is the flat parameter vector of the wire (the export test and `from_safetensors(..).flat()`
/// rely on it, and checkpoints written before read back the same). The crate reads it.
pub fn to_safetensors(
    layout: &[TensorInfo],
    values: &[f32],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, CheckpointError> {
    let expected: usize = layout
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    if expected != values.len() {
        return Err(CheckpointError::Length {
            expected,
            got: values.len(),
        });
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata)
                .map_err(|e| CheckpointError::Malformed(e.to_string()))?,
        );
    }
    let mut offset = 0usize;
    for t in layout {
        let bytes = 4 * t.shape.iter().product::<usize>();
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut json =
        serde_json::to_vec(&header).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
    // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + 4 * values.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    values
        .iter()
        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    Ok(out)
}

/// A decoded safetensors file: tensors in data order, and its metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub tensors: Vec<(TensorInfo, Vec<f32>)>,
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// All values, concatenated in data order: the flat parameter vector.
    pub fn flat(&self) -> Vec<f32> {
        self.tensors
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }
}

/// Decodes safetensors bytes holding F32 tensors, with the `safetensors` crate (which checks
/// the header, every offset and size: a bad file is an error, never a panic); tensors come in
/// data order.
pub fn from_safetensors(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let malformed = |e: safetensors::SafeTensorError| CheckpointError::Malformed(e.to_string());
    let (header_len, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(malformed)?;
    // `read_metadata` checked that the header and the data it describes lie within `bytes`.
    let data = &bytes[8 + header_len..];
    let mut tensors = Vec::new();
    for name in header.offset_keys() {
        let Some(info) = header.info(&name) else {
            continue;
        };
        if info.dtype != safetensors::Dtype::F32 {
            return Err(CheckpointError::Dtype(name));
        }
        let (begin, end) = info.data_offsets;
        let values = data
            .get(begin..end)
            .ok_or_else(|| CheckpointError::Malformed(format!("{name}: offsets {begin}..{end}")))?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push((
            TensorInfo {
                name,
                shape: info.shape.clone(),
            },
            values,
        ));
    }
    let metadata = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(Checkpoint { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DigitsMlpConfig;
    use burn::backend::NdArray;

    #[test]
    fn round_trip_with_names_shapes_and_metadata() {
        let model = DigitsMlpConfig::new()
            .with_hidden(8)
            .init::<NdArray>(&Default::default());
        let layout = layout(&model);
        let names: Vec<&str> = layout.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
        assert_eq!(layout[0].shape, [64, 8]);
        let values: Vec<f32> = (0..model.num_params()).map(|i| i as f32 * 0.5).collect();
        let metadata = BTreeMap::from([("round".to_owned(), "7".to_owned())]);
        let bytes = to_safetensors(&layout, &values, &metadata).expect("encode");
        assert_eq!(
            u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) % 8,
            0
        );
        let back = from_safetensors(&bytes).expect("decode");
        assert_eq!(back.flat(), values);
        assert_eq!(back.metadata, metadata);
        assert_eq!(
            back.tensors
                .iter()
                .map(|(t, _)| t.clone())
                .collect::<Vec<_>>(),
            layout
        );
        assert!(matches!(
            to_safetensors(&layout, &values[1..], &metadata),
            Err(CheckpointError::Length { .. })
        ));
    }

    #[test]
    fn malformed_files_are_errors() {
        let layout = [TensorInfo {
            name: "w".into(),
            shape: vec![2],
        }];
        let good = to_safetensors(&layout, &[1.0, 2.0], &BTreeMap::new()).expect("encode");
        for cut in 0..good.len() {
            assert!(
                from_safetensors(&good[..cut]).is_err(),
                "truncated at {cut}"
            );
        }
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(from_safetensors(&huge).is_err());
        let json = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
        let mut lying = (json.len() as u64).to_le_bytes().to_vec();
        lying.extend_from_slice(json);
        lying.extend_from_slice(&[0; 8]);
        assert!(matches!(
            from_safetensors(&lying),
            Err(CheckpointError::Malformed(_))
        ));
        let json = br#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut wrong = (json.len() as u64).to_le_bytes().to_vec();
        wrong.extend_from_slice(json);
        wrong.extend_from_slice(&[0; 8]);
        assert_eq!(
            from_safetensors(&wrong),
            Err(CheckpointError::Dtype("w".into()))
        );
    }
}
