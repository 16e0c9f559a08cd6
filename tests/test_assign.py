"""The metric -> decay maps on fixed inputs with known answers."""

import numpy as np
import pytest

from alphadecay.wd.assign import assign, layerwise_sigmoid, linear_map, log2_map, sqrt_map


def test_linear_map_endpoints_and_midpoint():
    out = linear_map(np.array([2.0, 3.0, 4.0]), 0.6666, 3.0)
    np.testing.assert_allclose(out, [0.6666, (0.6666 + 3.0) / 2, 3.0])


def test_linear_map_matches_numpy_interp_like_the_official_code():
    scores = np.array([2.11, 2.13, 2.99, 3.01, 2.5])
    expected = np.interp(scores, [scores.min(), scores.max()], [0.666, 5.0])
    np.testing.assert_allclose(linear_map(scores, 0.666, 5.0), expected)


def test_linear_map_degenerate_range_and_nan_keep_the_base_decay():
    np.testing.assert_array_equal(linear_map(np.array([3.0, 3.0]), 0.5, 2.0), [1.0, 1.0])
    np.testing.assert_allclose(linear_map(np.array([1.0, np.nan, 3.0]), 0.5, 2.0), [0.5, 1.0, 2.0])


def test_unit_ratios_reduce_to_uniform():
    np.testing.assert_array_equal(linear_map(np.array([1.0, 5.0, 2.0]), 1.0, 1.0), [1.0, 1.0, 1.0])


def test_sqrt_and_log2_maps():
    scores = np.array([1.0, 4.0, 16.0])
    np.testing.assert_allclose(sqrt_map(scores), np.array([1, 2, 4]) / (7 + 3e-8) * 3)
    scores = np.array([2.0, 4.0, 8.0])
    np.testing.assert_allclose(log2_map(scores), np.array([1, 2, 3]) / (6 + 3e-8) * 3)
    assert sqrt_map(np.array([2.0, 3.0, 9.0])).mean() == pytest.approx(1.0, abs=1e-7)


def test_layerwise_sigmoid_zscores_within_each_block():
    scores = np.array([1.0, 3.0, 10.0, 10.0, 20.0])
    blocks = [0, 0, 1, 1, 1]
    out = layerwise_sigmoid(scores, blocks, slope=4.0)
    # block 0: z = -1, +1 (population std 1); block 1: mean 40/3, std sqrt(200/9)
    z1 = (np.array([10.0, 10.0, 20.0]) - 40 / 3) / (np.sqrt(200 / 9) + 1e-8)
    np.testing.assert_allclose(out[:2], 2 / (1 + np.exp(-4 * np.array([-1.0, 1.0]) / (1 + 1e-8))))
    np.testing.assert_allclose(out[2:], 2 / (1 + np.exp(-4 * z1)))
    assert np.all((out > 0) & (out < 2))


def test_layerwise_sigmoid_equal_scores_give_uniform_decay():
    """AdaDecay's pass at initialisation: every gradient norm is the official placeholder 10."""
    np.testing.assert_allclose(layerwise_sigmoid(np.full(6, 10.0), [0, 0, 0, 1, 1, 1]), np.ones(6))


def test_assign_dispatch_and_unknown_name():
    np.testing.assert_allclose(assign("tb_linear_map", np.array([0.0, 1.0]), blocks=[0, 0], min_ratio=0.5, max_ratio=2),
                               [0.5, 2.0])
    with pytest.raises(ValueError):
        assign("nope", np.ones(2), blocks=[0, 0], min_ratio=1, max_ratio=1)
