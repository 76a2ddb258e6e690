"""Loads a swarmtrain checkpoint the way a PyTorch user would: with `safetensors` and numpy.

usage: read_checkpoint.py CHECKPOINT.safetensors EXPECTED.json
EXPECTED.json maps tensor names to {"shape": [...], "values": [...]} and has "__metadata__".
"""

import json
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def main() -> int:
    path, expected_path = sys.argv[1], sys.argv[2]
    with open(expected_path) as f:
        expected = json.load(f)
    metadata = expected.pop("__metadata__")
    tensors = load_file(path)
    assert set(tensors) == set(expected), f"names differ: {sorted(tensors)} vs {sorted(expected)}"
    for name, want in expected.items():
        got = tensors[name]
        assert got.dtype == np.float32, f"{name}: dtype {got.dtype}"
        assert list(got.shape) == want["shape"], f"{name}: shape {got.shape} vs {want['shape']}"
        assert np.array_equal(got, np.array(want["values"], dtype=np.float32).reshape(want["shape"])), f"{name}: values differ"
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == metadata, f"metadata {f.metadata()} vs {metadata}"
    total = sum(t.size for t in tensors.values())
    print(f"python safetensors read {len(tensors)} tensors, {total} values, round {metadata.get('round')}: all equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
