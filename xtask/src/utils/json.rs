//! Reading the JSON that benchmarks leave behind (criterion's estimates, the Python comparisons,
//! `simulate --out`, `swarmtrain-peer loadtest`) with serde_json.

use std::fs;

use serde_json::Value;

use crate::Result;
use crate::utils::target_dir;

/// `text` as JSON; `what` names it in the error.
pub(crate) fn parse(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| format!("{what} is not JSON: {e}"))
}

/// The number at `key` of the object `json`.
pub(crate) fn number(json: &Value, key: &str) -> Result<f64> {
    json.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("no number {key:?} in {json}"))
}

/// The string at `key` of the object `json`, or "?" when it is missing.
pub(crate) fn string(json: &Value, key: &str) -> String {
    json.get(key)
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}

/// The median point estimate, in seconds, from a criterion `estimates.json`.
pub(crate) fn criterion_median(group: &str, name: &str) -> Result<f64> {
    let path = target_dir()
        .join("criterion")
        .join(group)
        .join(name)
        .join("new/estimates.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let estimates = parse(&text, &path.display().to_string())?;
    Ok(number(&estimates["median"], "point_estimate")? * 1e-9)
}
