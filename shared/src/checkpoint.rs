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

/// Decodes safetensors bytes holding F32 tensors. Every offset and size is checked; a bad file
/// is an error, never a panic.
pub fn from_safetensors(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let bad = |m: &str| CheckpointError::Malformed(m.to_owned());
    let len = bytes
        .get(..8)
        .ok_or_else(|| bad("shorter than its 8-byte header length"))?;
    let len = u64::from_le_bytes(len.try_into().map_err(|_| bad("header length"))?);
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(8))
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| bad("header runs past the end"))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..end])
        .map_err(|e| CheckpointError::Malformed(format!("header: {e}")))?;
    let data = &bytes[end..];
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(entry)
                .map_err(|e| CheckpointError::Malformed(format!("metadata: {e}")))?;
            continue;
        }
        if entry.get("dtype").and_then(|d| d.as_str()) != Some("F32") {
            return Err(CheckpointError::Dtype(name));
        }
        let shape: Vec<usize> =
            serde_json::from_value(entry.get("shape").cloned().unwrap_or_default())
                .map_err(|e| CheckpointError::Malformed(format!("{name} shape: {e}")))?;
        let [begin, stop]: [usize; 2] =
            serde_json::from_value(entry.get("data_offsets").cloned().unwrap_or_default())
                .map_err(|e| CheckpointError::Malformed(format!("{name} offsets: {e}")))?;
        let count = shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .ok_or_else(|| bad("shape overflows"))?;
        if begin > stop
            || stop > data.len()
            || stop - begin != count.checked_mul(4).ok_or_else(|| bad("size overflows"))?
        {
            return Err(CheckpointError::Malformed(format!(
                "{name}: offsets {begin}..{stop} do not match shape {shape:?}"
            )));
        }
        let values = data[begin..stop]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push((begin, TensorInfo { name, shape }, values));
    }
    tensors.sort_by_key(|(begin, ..)| *begin);
    Ok(Checkpoint {
        tensors: tensors
            .into_iter()
            .map(|(_, info, values)| (info, values))
            .collect(),
        metadata,
    })
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
