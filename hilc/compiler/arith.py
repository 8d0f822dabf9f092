"""The arithmetic contract, written down once.

Every backend (numpy simulator, C runtime, HLS, TVM) must compute exactly this:

* Weights are signed and symmetric per output channel: int8 in [-127, 127] (the value -128 is
  never used, so negating a weight can never overflow).
* Activations are per tensor with a zero point: int8 in [-128, 127] by default.
* Biases are int32 at scale ``s_in * s_w[o]``.
* Products accumulate in int32; a static bound per layer proves no accumulator can overflow.
* A rescale by a real factor ``M`` is a *dyadic* multiply: ``M ≈ b / 2**c`` with integer
  ``b`` (``0 <= b < 2**31``) and shift ``1 <= c <= 62``, computed as

      p = acc * b                                   (int64 product)
      y = round_half_even(p / 2**c)                 (integer ops only, see ``rounding_shift``)

  Ties round to even (as onnxruntime's and numpy's rounding do, so averages carry no bias):
  5/2 -> 2, 7/2 -> 4, -5/2 -> -2. In integers: q = p >> c (arithmetic, i.e. floor),
  r = p - (q << c), then q += 1 when r > 2**(c-1), or when r == 2**(c-1) and q is odd.
  This is the only rounding rule on the inference path, and host-side quantization of inputs
  and every compile-time rounding (weights, biases, tables) use the same rule (``np.rint``).
* The result is offset by the output zero point and clamped to the activation bounds, which
  also carry fused ReLU / ReLU6 / Clip.

No float and no integer division appear on the inference path. Float is used only here, at
compile time, to choose the integers.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MAX = 2**31 - 1
# The simulator may compute exact integer results through float BLAS and float64 rounding
# where a static bound proves them exact. False forces plain int64 arithmetic everywhere
# (slow; used to check the proofs).
FAST_EXACT_PATHS = True
MULT_BITS = 31  # b < 2**MULT_BITS: an int32 multiplier, as SMULL / int64 products take it
MAX_SHIFT = 62


def dyadic(m: float | np.ndarray, mult_bits: int = MULT_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``(b, c)`` with ``b / 2**c ≈ m`` for each real ``m >= 0``.

    ``b`` is normalised into ``[2**(mult_bits-1), 2**mult_bits)`` so the relative error is at
    most ``2**-mult_bits``; factors too small to represent become ``b = 0`` (the output is then
    the zero point, which is the correct rounding of a vanishing product).
    """
    m = np.atleast_1d(np.asarray(m, dtype=np.float64))
    if np.any(~np.isfinite(m)) or np.any(m < 0):
        raise ValueError(f"dyadic multiplier must be finite and >= 0, got {m}")
    b = np.zeros(m.shape, dtype=np.int64)
    c = np.ones(m.shape, dtype=np.int64)
    for i, mi in np.ndenumerate(m):
        if mi == 0.0:
            continue
        exp = math.floor(math.log2(mi))
        ci = (mult_bits - 1) - exp
        bi = int(round(mi * 2.0**ci))
        if bi >= 2**mult_bits:  # rounding carried into the next power of two
            bi //= 2
            ci -= 1
        if ci > MAX_SHIFT:
            bi = int(round(mi * 2.0**MAX_SHIFT))
            ci = MAX_SHIFT
        if ci < 1:
            raise ValueError(f"rescale factor {mi:g} is too large for a dyadic multiplier")
        b[i], c[i] = bi, ci
    return b, c


def rounding_shift(x: np.ndarray, c: np.ndarray | int) -> np.ndarray:
    """``x / 2**c`` rounded to nearest, ties to even, on int64; ``c >= 1``.

    ``(x + 2**(c-1) - 1 + ((x >> c) & 1)) >> c``: the odd bit of the floor quotient tips an
    exact half upward only when that quotient is odd.
    """
    x = np.asarray(x, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    return (x + ((np.int64(1) << (c - 1)) - 1) + ((x >> c) & 1)) >> c


def requantize(acc: np.ndarray, b: np.ndarray | int, c: np.ndarray | int, zp_out: int,
               lo: int, hi: int, acc_bound: int | None = None, axis: int = -1,
               scratch: bool = False) -> np.ndarray:
    """Dyadic requantization of accumulators (per-channel ``b``, ``c`` along ``axis``) to int8.

    With ``acc_bound`` (a proven bound on |acc|) and ``acc_bound * b < 2**53``, the product
    ``acc * b`` is an exact float64 integer and scaling it by ``2**-c`` is exact too, so
    ``np.rint`` (ties to even) gives bit for bit the integer result, several times faster.
    ``scratch``: ``acc`` is a float64 temporary the function may overwrite.
    """
    b = np.asarray(b, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    if b.ndim == 1 and acc.ndim > 1:
        shape = [1] * acc.ndim
        shape[axis] = b.shape[0]
        b = b.reshape(shape)
        c = c.reshape(shape)
    if FAST_EXACT_PATHS and acc_bound is not None and acc_bound * int(b.max(initial=0)) < 2**53:
        y = acc if scratch and acc.dtype == np.float64 else acc.astype(np.float64)
        y *= b.astype(np.float64) * np.exp2(-c.astype(np.float64))
        np.rint(y, out=y)
    else:
        y = rounding_shift(acc.astype(np.int64) * b, c)
    y += zp_out
    np.clip(y, lo, hi, out=y)
    return y.astype(np.int8)


def qrange(bits: int = 8, signed: bool = True) -> tuple[int, int]:
    """The integer range of an activation of ``bits`` bits."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def choose_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """Asymmetric per-tensor scale and zero point for a real range ``[lo, hi]``.

    The range is widened to hold 0 so that real zero (padding, ReLU) is exactly representable.
    """
    qmin, qmax = qrange(bits)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-12:
        return 1.0, 0
    scale = (hi - lo) / (qmax - qmin)
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return scale, zp


def quantize_host(x: np.ndarray, scale: float, zp: int, bits: int = 8) -> np.ndarray:
    """Host-side quantization of real inputs (outside the integer graph): ties to even."""
    qmin, qmax = qrange(bits)
    q = np.rint(np.asarray(x, dtype=np.float64) / scale) + zp
    return np.clip(q, qmin, qmax).astype(np.int8 if bits <= 8 else np.int32)


def dequantize_host(q: np.ndarray, scale: float, zp: int) -> np.ndarray:
    return ((q.astype(np.float64) - zp) * scale).astype(np.float32)


def quantize_weights_per_channel(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel (axis 0) weights: int in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``."""
    qmax = 2 ** (bits - 1) - 1
    flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    scale = np.where(flat > 0, flat / qmax, 1.0)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_weights_subbyte(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel weights of ``bits`` < 8 with an MSE-optimal clip per channel:
    with 7 or 1 levels a side, clipping the largest weights beats stretching the grid over them."""
    qmax = 2 ** (bits - 1) - 1
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    absmax = np.abs(rows).max(axis=1)
    best = np.where(absmax > 0, absmax / qmax, 1.0)
    best_err = np.full(len(rows), np.inf)
    for alpha in np.linspace(0.3, 1.0, 36):
        s = np.where(absmax > 0, alpha * absmax / qmax, 1.0)
        q = np.clip(np.rint(rows / s[:, None]), -qmax, qmax)
        err = ((q * s[:, None] - rows) ** 2).sum(axis=1)
        better = err < best_err
        best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.rint(w / best.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, best


def accumulator_bound(w_int: np.ndarray, in_absmax: int, bias_int: np.ndarray | None) -> int:
    """Largest |accumulator| any input can produce: sum_k |w| * max|x - zp| + |bias|, per channel."""
    per_channel = np.abs(w_int.reshape(w_int.shape[0], -1).astype(np.int64)).sum(axis=1) * in_absmax
    if bias_int is not None:
        per_channel = per_channel + np.abs(bias_int.astype(np.int64))
    return int(per_channel.max()) if per_channel.size else 0


# --- sub-byte weights: packing in flash --------------------------------------------------------
#
# Weights of ``bits`` = 4 or 2 are stored ``8 // bits`` to a byte, row by row (one row per output
# channel, k = KH*KW*I/groups or in_features elements), each row padded with zeros to a whole
# number of 32-bit words. A word holds ``group = 32 // bits`` weights: byte i of the word carries
# weights i, 4 + i, 8 + i, 12 + i from its most significant bits down. So masking a word with
# 0xF0F0F0F0 (4-bit) or 0xC0C0C0C0 (2-bit), after shifting it left by 0, bits, 2*bits, ...,
# leaves four weights as int8 lanes scaled by 2**(8 - bits): exactly the int8 weight word the
# SMLAD kernel already unpacks with SXTB16. The scaled dot product is an exact multiple of
# 2**(8 - bits), so one arithmetic shift right recovers it (hilc_dsp.h, hilc_arith.h).

PACKED_WEIGHT_BITS = (4, 2)


def packed_group(bits: int) -> int:
    """Weights per 32-bit word of a packed row."""
    return 32 // bits


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of ``k`` weights (a whole number of words); ``k`` for int8."""
    if bits == 8:
        return k
    g = packed_group(bits)
    return -(-k // g) * 4


def pack_weights(w_int: np.ndarray, bits: int) -> np.ndarray:
    """[O, ...] integer weights in [-(2**(bits-1)-1), 2**(bits-1)-1] -> [O, row_bytes] uint8."""
    if bits not in PACKED_WEIGHT_BITS:
        raise ValueError(f"packed weights are 4 or 2 bits, not {bits}")
    rows = np.asarray(w_int, dtype=np.int64).reshape(w_int.shape[0], -1)
    qmax = 2 ** (bits - 1) - 1
    if rows.size and np.abs(rows).max() > qmax:
        raise ValueError(f"weights exceed the {bits}-bit range [-{qmax}, {qmax}]")
    o, k = rows.shape
    g = packed_group(bits)
    kp = -(-k // g) * g
    padded = np.zeros((o, kp), np.int64)
    padded[:, :k] = rows
    u = (padded & (2**bits - 1)).reshape(o, kp // g, 8 // bits, 4)  # [O, word, slot, byte]
    shifts = (8 - bits * (np.arange(8 // bits) + 1)).reshape(1, 1, -1, 1)
    return (u << shifts).sum(axis=2).astype(np.uint8).reshape(o, -1)


def unpack_weights(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of ``pack_weights``: [O, row_bytes] uint8 -> [O, k] int8."""
    o = packed.shape[0]
    b = packed.astype(np.int64).reshape(o, -1, 1, 4)
    shifts = (8 - bits * (np.arange(8 // bits) + 1)).reshape(1, 1, -1, 1)
    u = (b >> shifts) & (2**bits - 1)
    v = np.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return v.reshape(o, -1)[:, :k].astype(np.int8)


def packed_scaled_bound(w_int: np.ndarray, in_absmax: int, bits: int) -> int:
    """Bound on |sum (x - zp) * w * 2**(8-bits)|: the DSP kernel's scaled partial sum."""
    return accumulator_bound(w_int, in_absmax, None) << (8 - bits)
