"""The arithmetic contract: dyadic multipliers, rounding of ties, requantization paths."""

import numpy as np
import pytest

from hilc.compiler import arith


def test_rounding_shift_ties_to_even_known_answers():
    x = np.array([5, 7, -5, -7, 6, -6, 4, 3, -3, 1, -1], dtype=np.int64)
    # x / 2: 2.5->2, 3.5->4, -2.5->-2, -3.5->-4, 3, -3, 2, 1.5->2, -1.5->-2, 0.5->0, -0.5->0
    assert arith.rounding_shift(x, 1).tolist() == [2, 4, -2, -4, 3, -3, 2, 2, -2, 0, 0]
    # x / 4 with c = 2: 5/4 = 1.25 -> 1, 6/4 = 1.5 -> 2, 10/4 = 2.5 -> 2, -6/4 -> -2, -10/4 -> -2
    assert arith.rounding_shift(np.array([5, 6, 10, -6, -10, 14]), 2).tolist() == [1, 2, 2, -2, -2, 4]


def test_rounding_shift_matches_numpy_rint_on_random_values():
    rng = np.random.default_rng(0)
    x = rng.integers(-(2**40), 2**40, 100_000)
    for c in (1, 3, 17, 31):
        assert np.array_equal(arith.rounding_shift(x, c), np.rint(x / 2.0**c).astype(np.int64))


@pytest.mark.parametrize("m", [1e-9, 3.1e-5, 0.00390625, 0.25, 0.7071, 1.0, 3.5, 1234.5])
def test_dyadic_is_accurate_and_in_range(m):
    b, c = arith.dyadic(m)
    assert 0 < b[0] < 2**31 and 1 <= c[0] <= 62
    assert abs(b[0] / 2.0 ** c[0] - m) <= m * 2.0**-30


def test_dyadic_zero_and_invalid():
    b, c = arith.dyadic(0.0)
    assert b[0] == 0
    with pytest.raises(ValueError):
        arith.dyadic(-1.0)
    with pytest.raises(ValueError):
        arith.dyadic(float("nan"))


def test_requantize_float_path_is_bit_exact_with_integer_path():
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**21), 2**21, size=(64, 9, 7)).astype(np.int64)
    b, c = arith.dyadic(rng.uniform(1e-5, 1e-2, 7))
    fast = arith.requantize(acc.astype(np.float64), b, c, -3, -128, 127, acc_bound=2**21)
    slow = arith.requantize(acc, b, c, -3, -128, 127)
    assert np.array_equal(fast, slow)
    # exact halves are where the two roundings could differ: build some
    acc2 = (np.arange(-1000, 1000, dtype=np.int64) * 2 + 1) << 9  # odd multiples of 2^9
    fast2 = arith.requantize(acc2, np.array([1 << 30]), np.array([40]), 0, -128, 127, acc_bound=2**21)
    slow2 = arith.requantize(acc2, np.array([1 << 30]), np.array([40]), 0, -128, 127)
    assert np.array_equal(fast2, slow2)


def test_choose_qparams_holds_zero_exactly():
    scale, zp = arith.choose_qparams(0.0, 6.0)
    assert zp == -128 and scale == pytest.approx(6.0 / 255)
    scale, zp = arith.choose_qparams(-1.0, 3.0)
    q0 = arith.quantize_host(np.array([0.0]), scale, zp)
    assert arith.dequantize_host(q0, scale, zp)[0] == 0.0
    assert arith.choose_qparams(0.0, 0.0) == (1.0, 0)


def test_weights_symmetric_per_channel():
    w = np.array([[1.0, -2.0, 0.5], [0.01, 0.02, -0.04]])
    q, s = arith.quantize_weights_per_channel(w)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    assert np.abs(q).max(axis=1).tolist() == [127, 127]
    assert np.allclose(q * s[:, None], w, atol=s.max() / 2)


def test_accumulator_bound_is_tight_for_worst_case_input():
    w = np.array([[3, -4, 5], [-1, 1, -1]], dtype=np.int8)
    bound = arith.accumulator_bound(w, 255, np.array([10, -7]))
    assert bound == (3 + 4 + 5) * 255 + 10
    worst = np.array([255, -255, 255])  # x - zp at the extremes matching the signs of row 0
    assert abs(int(w[0].astype(np.int64) @ worst) + 10) == bound
