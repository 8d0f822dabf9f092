"""Minifloat formats: tables, rounding, saturation, and the integer cast against the float encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hilc.compiler import minifloat as mf
from hilc.errors import HilcError

NAMES = ["E4M3", "E5M2", "E3M2", "E2M3", "E2M1", "E1M1", "E3M4", "E2M5"]
FORMATS = [mf.parse(n) for n in NAMES] + [mf.MiniFloat(3, 2, subnormals=False), mf.MiniFloat(4, 3, bias=9)]


def test_known_formats():
    e4m3, e5m2, e3m2, e2m1 = (mf.parse(n) for n in ("E4M3", "E5M2", "E3M2", "E2M1"))
    assert (e4m3.max_value, e5m2.max_value, e3m2.max_value, e2m1.max_value) == (448.0, 57344.0, 28.0, 6.0)
    assert math.ldexp(1, e4m3.emin) == 2.0**-9 and math.ldexp(1, e2m1.emin) == 0.5
    # all 16 E2M1 codes are finite: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}
    assert sorted(set(mf.decode(e2m1, np.arange(16)).tolist())) == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1,
                                                                  1.5, 2, 3, 4, 6]
    assert np.isnan(mf.decode(e4m3, [0x7F, 0xFF])).all() and mf.decode(e4m3, [0x7E])[0] == 448
    assert mf.decode(e5m2, [0x7C])[0] == np.inf and np.isnan(mf.decode(e5m2, [0x7D]))[0]
    with pytest.raises(HilcError, match="ExMy"):
        mf.parse("fp8")
    with pytest.raises(HilcError, match="3..8 bits"):
        mf.parse("E5M5")


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.special}-{f.subnormals}-{f.b}")
def test_every_representable_value_round_trips(fmt):
    codes = fmt.valid_codes()
    vals = mf.decode(fmt, codes)
    assert np.isfinite(vals).all()
    assert np.array_equal(mf.encode(fmt, vals).astype(np.int64), codes)
    assert len(np.unique(vals)) == len(vals)  # canonical codes: one per value
    # the fixed-point view agrees with the float view
    if fmt.subnormals:
        assert np.array_equal(np.ldexp(mf.code_to_fix(fmt, codes).astype(np.float64), fmt.emin), vals)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f.name}-{f.special}-{f.subnormals}-{f.b}")
def test_ties_go_to_even_and_saturation(fmt):
    vals = np.sort(mf.decode(fmt, fmt.valid_codes()))
    vals = vals[vals >= 0]
    mids = (vals[:-1] + vals[1:]) / 2
    got = mf.encode(fmt, mids).astype(np.int64)
    lo_code = mf.encode(fmt, vals[:-1]).astype(np.int64)
    hi_code = mf.encode(fmt, vals[1:]).astype(np.int64)
    assert np.all((got == lo_code) | (got == hi_code))
    assert np.all(got[(got == hi_code) & (lo_code != 0)] % 2 == 0)  # the picked one is even
    assert np.all(got[(got == lo_code) & (hi_code % 2 == 0) & (lo_code % 2 == 1)] % 2 == 0)  # never
    top = fmt.max_value
    assert mf.decode(fmt, mf.encode(fmt, [top * 1.01, top * 1e6, np.inf, -top * 7]))[:4].tolist() == \
        [top, top, top, -top]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_no_nan_from_finite_inputs_and_nearest(name, x):
    fmt = mf.parse(name)
    v = mf.quantize_values(fmt, np.array([x]))[0]
    assert np.isfinite(v) and abs(v) <= fmt.max_value
    vals = mf.decode(fmt, fmt.valid_codes())
    xc = min(max(x, -fmt.max_value), fmt.max_value)  # saturating: nearest to the clipped input
    assert abs(v - xc) == np.min(np.abs(vals - xc))


@pytest.mark.parametrize("name", ["E4M3", "E3M2", "E2M1", "E2M3", "E5M2"])
@settings(max_examples=200, deadline=None)
@given(d=st.integers(-(2**20), 2**20), q=st.integers(-12, 14))
def test_integer_cast_equals_the_float_encoder(name, d, q):
    """cast_int (the simulator's and the HLS header's integer steps) rounds exactly as encode."""
    fmt = mf.parse(name)
    got = mf.cast_int(fmt, np.array([d]), q)
    want = mf.encode(fmt, np.array([math.ldexp(d, fmt.emin - q)]))
    assert mf.decode(fmt, got)[0] == mf.decode(fmt, want)[0]


def test_weight_quantizer_picks_per_channel_scales():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 8)) * np.array([1, 10, 0.1, 3])[:, None, None, None]
    w[0, 0, 0, 0] = 20  # an outlier channel: the search clips it
    for name in ("E4M3", "E3M2", "E2M1"):
        fmt = mf.parse(name)
        codes, s = mf.quantize_weights(fmt, w)
        assert codes.dtype == np.uint8 and codes.shape == w.shape and s.shape == (4,)
        wq = mf.decode(fmt, codes) * s[:, None, None, None]
        err = ((wq - w) ** 2).reshape(4, -1).sum(axis=1)
        plain = ((mf.grid_values(fmt, w, np.abs(w).reshape(4, -1).max(1) / fmt.max_value)
                  * (np.abs(w).reshape(4, -1).max(1) / fmt.max_value)[:, None, None, None] - w) ** 2)
        assert np.all(err <= plain.reshape(4, -1).sum(axis=1) + 1e-12)


def test_activation_cast_shift_search_minimises_the_squared_error():
    """Small integer inputs (most post-ReLU values) on E2M1: a finer power-of-two scale than the
    full-range one wins; the chosen shift's error is the least of every candidate."""
    fmt = mf.parse("E2M1")
    rng = np.random.default_rng(0)
    d = np.minimum(rng.exponential(6.0, 5000).astype(np.int64), 255)
    q, q0, e0, e = mf.best_act_shift(fmt, d, 255)
    assert q0 == mf.act_shift(fmt, 255) == 5 and q < q0 and e < 0.7 * e0
    values, counts = np.unique(d, return_counts=True)
    errs = [mf.cast_error(fmt, values, counts, k) for k in range(q0 - mf.ACT_Q_STEPS, q0 + 1)]
    assert e == min(errs) and e0 == errs[-1]
    # inputs that fill the range keep the full-range shift (a finer one would saturate them)
    q, q0, _, _ = mf.best_act_shift(fmt, np.arange(-255, 256), 255)
    assert q == q0
