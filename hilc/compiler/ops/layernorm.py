"""LayerNormalization over the last axis, integer-only (I-BERT style, no division, no float).

For one row of n int8 values with d_i = x_i - zp_in (all integers):

    s   = sum d_i
    c_i = n * d_i - s                      (= n * (d_i - mean), exact: no division by n)
    V   = sum c_i^2 + E                    (int64; E = max(1, round(n^3 * eps / s_in^2)) carries eps)
    so  (x_i - mean) / sqrt(var + eps) = sqrt(n) * c_i / sqrt(V)

1/sqrt(V) in fixed point: normalise V to Vn = V << 2k in [2^60, 2^62) (k from its bit length),
r = isqrt(Vn) in [2^30, 2^31) (digit by digit: shifts, adds and compares), then the softmax's
Newton-Raphson reciprocal y ~ 2^61 / r. With 2^k / r = 1 / sqrt(V):

    z_i = round(c_i * y / 2^(37 - k))      (Q24 of c_i / sqrt(V), |z_i| <= 2^24)
    q_i = clamp(round((z_i * M_i + B_i) / 2^C_i) + zp_out)

where M_i / 2^C_i ~ gamma_i * sqrt(n) / (s_out * 2^24) (signed multiplier: gamma may be negative)
and B_i = round(beta_i / s_out * 2^C_i) (int64): beta joins the one rounding, so it adds no error of
its own. All roundings are the contract's (ties to even).
"""

from __future__ import annotations

import numpy as np

from hilc.compiler import arith
from hilc.compiler.arith import rounding_shift
from hilc.compiler.ops.base import Op, in_quant, onnx_importer, out_quant, register
from hilc.compiler.ops.softmax import NR_C1, NR_C2, NR_STEPS, bit_length, reciprocal_q30
from hilc.errors import UnsupportedModelError

Z_BITS = 24


def isqrt62(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) of int64 values 0 <= v < 2^62, digit by digit (exact; a loop of 31 steps in C)."""
    v = v.astype(np.int64, copy=True)
    res = np.zeros_like(v)
    bit = np.int64(1) << 60
    for _ in range(31):
        t = res + bit
        ge = v >= t
        v = np.where(ge, v - t, v)
        res = np.where(ge, (res >> 1) + bit, res >> 1)
        bit >>= 2
    return res


def inv_sqrt_q(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, k) with y * 2^k / 2^61 ~ 1 / sqrt(v), for int64 1 <= v < 2^62."""
    k = (62 - bit_length(v)) >> 1
    r = isqrt62(v << (2 * k))
    y, _ = reciprocal_q30(r)  # r in [2^30, 2^31): y ~ 2^61 / r
    return y, k


@register
class LayerNorm(Op):
    name = "layernorm"

    def eval_float(self, node, graph, xs):
        x = xs[0].astype(np.float64)
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + node.attrs["epsilon"])
        y = y * graph.param(node, "scale").astype(np.float64) + graph.param(node, "bias").astype(np.float64)
        return [y.astype(np.float32)]

    def quantize(self, node, graph):
        qi, qo = in_quant(graph, node), out_quant(graph, node)
        n = graph.tensors[node.inputs[0]].shape[-1]
        dmax = max(qi.zero_point - qi.qmin, qi.qmax - qi.zero_point)
        eps_int = max(1, int(round(n**3 * node.attrs["epsilon"] / qi.scale**2)))
        if n * (2 * n * dmax) ** 2 + eps_int >= 2**62 or n >= 2**16:
            raise UnsupportedModelError(f"{node.onnx_name or node.name}: LayerNorm over {n} elements (epsilon "
                                        f"{node.attrs['epsilon']:g}) exceeds the int64 variance range")
        gamma = graph.param(node, "scale").astype(np.float64)
        beta = graph.param(node, "bias").astype(np.float64)
        m = gamma * np.sqrt(n) / (qo.scale * 2.0**Z_BITS)
        b, c = arith.dyadic(np.abs(m))
        # keep |B_i| < 2^60 (z * M stays below 2^55): only a vanishing gamma next to a large beta
        # needs a shorter shift, which costs that channel nothing it could show in 8 bits
        bq = np.minimum(np.abs(beta / qo.scale), 2.0**20)
        limit = np.floor(np.log2(2.0**60 / np.maximum(bq, 1.0))).astype(np.int64)
        for i in np.nonzero(c > limit)[0]:
            c[i] = max(1, int(limit[i]))
            b[i] = min(int(round(abs(m[i]) * 2.0 ** c[i])), 2**31 - 1)
        bias = np.rint(np.clip(beta / qo.scale, -(2.0**20), 2.0**20) * np.exp2(c.astype(np.float64)))
        node.params["mult"] = graph.add_constant(f"{node.name}.mult", (np.sign(m) * b).astype(np.int32))
        node.params["shift"] = graph.add_constant(f"{node.name}.shift", c.astype(np.int8))
        node.params["bias"] = graph.add_constant(f"{node.name}.bias", bias.astype(np.int64))
        node.params.pop("scale")
        node.attrs.update(zp_in=qi.zero_point, zp_out=qo.zero_point, eps_int=eps_int, lo=qo.qmin, hi=qo.qmax)

    def eval_int(self, node, graph, xs):
        a = node.attrs
        x = xs[0]
        n = x.shape[-1]
        d = x.astype(np.int64) - a["zp_in"]
        c = n * d - d.sum(axis=-1, keepdims=True)
        v = (c * c).sum(axis=-1, keepdims=True) + a["eps_int"]
        y, k = inv_sqrt_q(v)
        z = rounding_shift(c * y, 61 - Z_BITS - k)
        mult = graph.param(node, "mult").astype(np.int64)
        q = rounding_shift(z * mult + graph.param(node, "bias"), graph.param(node, "shift").astype(np.int64))
        q = q + a["zp_out"]
        return [np.clip(q, a["lo"], a["hi"]).astype(np.int8)]

    def lower_tvm(self, node, graph, tb):
        """eval_int in TE, one row (all axes but the last) at a time: the sums, the variance V, k
        from V's bit length, r = isqrt(V << 2k), the softmax's Newton-Raphson reciprocal, then
        the two rounding shifts. With the exact fast paths isqrt is float64 sqrt corrected by at
        most one either way with integer compares (the unique floor(sqrt), which isqrt62 yields);
        without them, isqrt62's digit steps."""
        from hilc.targets.tvm.engine import rounding_shift

        te, tx = tb.te, tb.tirx
        a = node.attrs
        x = tb.input(node)
        shape = tb.shape(node.inputs[0])
        n = int(shape[-1])
        rows = shape[:-1]
        i64 = "int64"

        def one(v):
            return tx.const(v, i64)

        # the quantization scalars: arguments of a parametric module (TVMBuilder.scalar)
        zp_in, eps, zp_out, lo, hi = (tb.scalar(node, k, a[k], i64) for k in ("zp_in", "eps_int", "zp_out", "lo", "hi"))

        def d(idx):
            return x[idx].astype(i64) - zp_in

        r1, r2 = te.reduce_axis((0, n), "r1"), te.reduce_axis((0, n), "r2")
        s = te.compute(rows, lambda *row: te.sum(d((*row, r1)), axis=r1), name=tb.name(node, "sum"))

        def c(idx):
            return one(n) * d(idx) - s[idx[:-1]]

        sq = te.compute(rows, lambda *row: te.sum(c((*row, r2)) * c((*row, r2)), axis=r2), name=tb.name(node, "sq"))
        var = te.compute(rows, lambda *row: sq[row] + eps, name=tb.name(node, "var"))

        def bits(v):
            return one(64) - tx.clz(v).astype(i64)

        k = te.compute(rows, lambda *row: (one(62) - bits(var[row])) >> one(1), name=tb.name(node, "k"))
        vn = te.compute(rows, lambda *row: var[row] << (one(2) * k[row]), name=tb.name(node, "vn"))
        if tb.fast:
            r0 = te.compute(rows, lambda *row: tx.sqrt(vn[row].astype("float64")).astype(i64),
                            name=tb.name(node, "r0"))
            r_lo = te.compute(rows, lambda *row: r0[row] - (r0[row] * r0[row] > vn[row]).astype(i64),
                              name=tb.name(node, "r1"))
            r = te.compute(rows, lambda *row: r_lo[row] + ((r_lo[row] + one(1)) * (r_lo[row] + one(1)) <= vn[row])
                           .astype(i64), name=tb.name(node, "isqrt"))
        else:  # plain integers: isqrt62's 31 digit steps, one stage each
            def digit(v, r, bit):  # TE compute functions take positional indices only
                nv = te.compute(rows, lambda *row: tx.if_then_else(v[row] >= r[row] + bit, v[row] - (r[row] + bit),
                                                                   v[row]), name=tb.name(node, "isqrt_v"))
                nr = te.compute(rows, lambda *row: tx.if_then_else(v[row] >= r[row] + bit, (r[row] >> one(1)) + bit,
                                                                   r[row] >> one(1)), name=tb.name(node, "isqrt_r"))
                return nv, nr

            v, r = vn, te.compute(rows, lambda *row: one(0), name=tb.name(node, "isqrt0"))
            for step in range(31):
                v, r = digit(v, r, one(1 << (60 - 2 * step)))

        def recip(*row):  # softmax.reciprocal_q30 on r in [2^30, 2^31)
            rr = r[row]
            aa = rr << (one(31) - bits(rr))
            y = one(NR_C1) - ((one(NR_C2) * aa) >> one(31))
            for _ in range(NR_STEPS):
                t = (aa * y) >> one(31)
                y = (y * (one(1 << 31) - t)) >> one(30)
            return y

        y = te.compute(rows, recip, name=tb.name(node, "recip"))
        mult = tb.const(node, "mult", graph.param(node, "mult").astype(np.int64))
        bias = tb.const(node, "bias", graph.param(node, "bias").astype(np.int64))
        shift = tb.const(node, "shift", graph.param(node, "shift").astype(np.int64))

        def out(*idx):
            row, ch = idx[:-1], idx[-1]
            z = rounding_shift(tx, c(idx) * y[row], one(61 - Z_BITS) - k[row])
            q = rounding_shift(tx, z * mult[ch] + bias[ch], shift[ch]) + zp_out
            return tx.max(tx.min(q, hi), lo).astype("int8")

        return [te.compute(shape, out, name=tb.name(node))]

    def macs(self, node, graph):
        return int(np.prod(graph.tensors[node.inputs[0]].shape[1:], dtype=np.int64))

    def weight_count(self, node, graph):
        return int(graph.param(node, "bias").size) * 2

    def lower_c(self, node, graph, em) -> str:
        a = node.attrs
        shape = graph.tensors[node.inputs[0]].shape
        p = em.struct("hilc_layernorm_params", node.name, dict(
            rows=int(np.prod(shape[1:-1], dtype=np.int64)), n=shape[-1], zp_in=a["zp_in"], zp_out=a["zp_out"],
            lo=a["lo"], hi=a["hi"], eps=a["eps_int"], mult=em.param(node, "mult"), shift=em.param(node, "shift"),
            bias=em.param(node, "bias")))
        return f"hilc_layernorm_s8({p}, {em.tensor(node.inputs[0])}, {em.tensor(node.outputs[0])});"

    def lower_hls(self, node, graph, ctx) -> dict:
        from hilc.targets.hls import lower as hl

        a = node.attrs
        shape = hl.tensor_shape(graph, node.inputs[0])
        n = shape[-1]
        return dict(kind="layernorm", rows=int(np.prod(shape[1:-1], dtype=np.int64)), len=n, zp_in=a["zp_in"],
                    zp_out=a["zp_out"], eps=a["eps_int"], lo=a["lo"], hi=a["hi"], z_shift=61 - Z_BITS,
                    mult=ctx.rom(f"{node.name}_mult", graph.param(node, "mult"), "ap_int<32>"),
                    shift=ctx.rom(f"{node.name}_shift", graph.param(node, "shift"), "ap_uint<6>"),
                    bias=ctx.rom(f"{node.name}_bias", graph.param(node, "bias"), "ap_int<64>"),
                    c1=NR_C1, c2=NR_C2, steps=NR_STEPS, n=hl.elems(shape),
                    act_bits=hl.tensor_bits(graph, node.inputs[0]),
                    doc=f"{node.name}: layer normalisation over {n} elements (integer, I-BERT style)")


@onnx_importer("LayerNormalization")
def import_layernorm(ctx, node) -> None:
    x = ctx.value(node.input[0])
    rank = len(ctx.layouts[x])
    axis = int(ctx.attr("axis", -1)) % rank
    if axis != rank - 1:
        raise ctx.fail(f"LayerNormalization over axes {axis}.. of a rank-{rank} tensor: "
                       "only the last axis is supported")
    if len(node.output) > 1 and any(ctx.onnx_uses.get(o, 0) for o in node.output[1:] if o):
        raise ctx.fail("LayerNormalization's mean / inverse-std outputs are used")
    xl = ctx.to_logical(x)
    n = ctx.graph.tensors[xl].shape[-1]
    gamma = ctx.require_const(node.input[1], "scale").astype(np.float64)
    beta = (ctx.require_const(node.input[2], "bias").astype(np.float64)
            if len(node.input) > 2 and node.input[2] else np.zeros(n))
    if gamma.size not in (1, n) or beta.size not in (1, n):
        raise ctx.fail(f"scale/bias of sizes {gamma.size}/{beta.size} do not match the normalised axis ({n})")
    ctx.emit("layernorm", [xl], {"epsilon": float(ctx.attr("epsilon", 1e-5))},
             {"scale": np.broadcast_to(gamma.reshape(-1), (n,)).astype(np.float32),
              "bias": np.broadcast_to(beta.reshape(-1), (n,)).astype(np.float32)}, onnx_out=node.output[0])
