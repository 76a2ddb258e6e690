"""numpy doing the reductions of shared/benches/aggregate.rs: 16 updates x 1M f32.
Prints one JSON object: reduction name -> median seconds over repeated runs."""
import json
import time

import numpy as np

PEERS, N, TRIM = 16, 1 << 20, 3
rng = np.random.default_rng(1)
x = rng.random((PEERS, N), dtype=np.float32) - 0.5


def trimmed_sort(a):
    return np.sort(a, axis=0)[TRIM:PEERS - TRIM].mean(axis=0)


def trimmed_partition(a):
    p = np.partition(a, (TRIM, PEERS - TRIM - 1), axis=0)
    return p[TRIM:PEERS - TRIM].mean(axis=0)


reductions = {
    "mean": lambda a: a.mean(axis=0),
    "median": lambda a: np.median(a, axis=0),
    "trimmed_mean_sort": trimmed_sort,
    "trimmed_mean_partition": trimmed_partition,
}
out = {"numpy": np.__version__}
for name, f in reductions.items():
    f(x)
    times = []
    for _ in range(9):
        t = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t)
    out[name] = float(np.median(times))
print(json.dumps(out))
