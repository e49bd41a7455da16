"""Per-channel activation statistics: accurate in float64 whatever the tensor's float type."""
from __future__ import annotations

import numpy as np
import pytest

from onnxslim_yolo.analysis.activations import _Acc


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_channel_statistics_match_a_float64_reference_for_large_means(dtype):
    rng = np.random.default_rng(1)
    # a large mean next to a small spread is where unshifted sums lose the variance
    batches = [(rng.normal(size=(2, 6, 20, 20)) * 0.5 + 300.0 * np.arange(1, 7)[None, :, None, None])
               .astype(dtype) for _ in range(3)]
    acc = _Acc(6)
    for b in batches:
        acc.add(b)
    got = acc.result()
    x = np.concatenate([np.moveaxis(b, 1, 0).reshape(6, -1).astype(np.float64) for b in batches], axis=1)
    assert got.count == x.shape[1] == 2400
    np.testing.assert_allclose(got.mean, x.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(got.std, x.std(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(got.min, x.min(axis=1))
    np.testing.assert_array_equal(got.max, x.max(axis=1))
