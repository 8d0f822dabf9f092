"""Re-ranking the ILP's best allocations by a whole-model measurement on calibration data.

HAWQ-V3's objective adds per-layer perturbations measured one layer at a time; near the optimum
the sum can rank allocations differently from what the whole model does once every layer is
lowered together (and PTQ'd together). ``apply_precision(rerank=K)`` takes the K best ILP
solutions (``mixed.allocate_top``: no-good cuts, each still within every budget), gives each
the post-training quantization the compiler applies (``mixed.ptq_lowered``, the same AdaRound
steps, so the chosen candidate's graph is the one compiled), runs the integer model on the
calibration inputs and keeps the candidate with the least ``METRIC``; ties keep the ILP's order,
and K=1 is the ILP's optimum. benchmarks/mixed_rerank.py measured the choices on validation tiles
outside the held-out crops: the ILP's own objective and the metrics after a shortened AdaRound
(300 steps) ranked the candidates poorly; the KL divergence after the full PTQ ranked them best.
Each candidate costs one full PTQ (about 10 s for resnet8 on a quiet 2-core machine), so it is
opt-in (``--rerank K``; ``mixed.RERANK_K`` = 1 keeps the search within its time target).

Metrics (all on the calibration inputs, against the float model's logits, or the all-int8
model's for ``mse_int8``): ``kl_float``, the mean KL divergence of the softmax; ``flips_float``,
the fraction of inputs whose top-1 class differs; ``mse_int8``, the sensitivity's metric on the
whole model; ``*_aug`` (``Scorer(augment=True)``) the same on the inputs and their mirror
images (flipped along the width).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hilc.compiler.ir import Graph
from hilc.errors import HilcError

SCORE_ITERATIONS = 2000  # AdaRound steps per lowered layer when scoring (mixed.ADAROUND_ITERATIONS)
METRIC = "kl_float"  # what benchmarks/mixed_rerank.py measured to rank best against validation
METRICS = ("mse_int8", "kl_float", "flips_float", "kl_float_aug", "flips_float_aug")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _kl(ref: np.ndarray, z: np.ndarray) -> float:
    p, q = _softmax(ref), _softmax(z)
    return float(np.mean(np.sum(p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12))), axis=1)))


def float_logits(graph: Graph, x: np.ndarray) -> np.ndarray:
    """The float model's output on physical inputs ``x``; before a final softmax, its input."""
    from hilc.compiler.ops.softmax import final_softmax
    from hilc.sim.simulator import run_float

    sm = final_softmax(graph)
    want = sm.inputs[0] if sm is not None else graph.outputs[0]
    got: dict[str, np.ndarray] = {}

    def observe(name: str, v: np.ndarray) -> None:
        if name == want:
            got[name] = v

    run_float(graph, {graph.inputs[0]: x}, observe=observe)
    return got[want].reshape(len(x), -1).astype(np.float64)


class Scorer:
    """Scores allocations of the calibrated (and ``prepare_subbyte``'d) float ``graph`` on the
    calibration ``samples`` (the model's layout, as given to the compiler)."""

    def __init__(self, graph: Graph, samples: np.ndarray, max_samples: int = 128, engine: str = "numpy",
                 augment: bool = False) -> None:
        from hilc.compiler.mixed import _outputs
        from hilc.compiler.quantize import quantize
        from hilc.sim.simulator import to_physical

        self.graph, self.engine = graph, engine
        self.samples = np.asarray(samples, np.float32)[:max_samples]
        self.n = len(self.samples)
        self.augment = augment and self.samples.ndim == 4  # mirrored along the width (NCHW images)
        logical = np.concatenate([self.samples, self.samples[..., ::-1]]) if self.augment else self.samples
        self.x = to_physical(graph, graph.inputs[0], np.ascontiguousarray(logical))
        self.ref_float = float_logits(graph, self.x)
        self.ref_int8 = _outputs(quantize(graph), self.x, engine)
        self.scale = float(np.mean(self.ref_int8[:self.n] ** 2)) or 1.0

    def graph_for(self, alloc, iterations: int = SCORE_ITERATIONS) -> Graph:
        """``alloc``'s widths on the float graph with its PTQ (``iterations`` AdaRound steps)."""
        from hilc.compiler.mixed import assign_bitwidths, ptq_lowered

        g = assign_bitwidths(self.graph, alloc.weight_bits, alloc.act_bits)
        return ptq_lowered(self.graph, g, self.samples, len(self.samples), iterations=iterations)

    def metrics(self, assigned: Graph) -> dict[str, float]:
        from hilc.compiler.mixed import _outputs
        from hilc.compiler.quantize import quantize

        z = _outputs(quantize(assigned), self.x, self.engine).reshape(len(self.x), -1)
        n = self.n
        ref, top = self.ref_float, self.ref_float.argmax(1)
        out = {"mse_int8": float(np.mean((z[:n] - self.ref_int8[:n]) ** 2)) / self.scale,
               "kl_float": _kl(ref[:n], z[:n]), "flips_float": float(np.mean(z[:n].argmax(1) != top[:n]))}
        if self.augment:
            out.update(kl_float_aug=_kl(ref, z), flips_float_aug=float(np.mean(z.argmax(1) != top)))
        return out


def pick(scorer: Scorer, candidates: list, metric: str = METRIC,
         iterations: int = SCORE_ITERATIONS) -> tuple[int, list[dict[str, Any]], Graph]:
    """The index of the candidate with the least ``metric`` (the first of equals: the ILP's order),
    each candidate's row for ``report.json`` and the chosen candidate's PTQ'd graph."""
    if metric not in METRICS or (metric.endswith("_aug") and not scorer.augment):
        raise HilcError(f"unknown re-ranking metric '{metric}' (choose {', '.join(METRICS)})")
    rows, best, best_g = [], -1, None
    for i, a in enumerate(candidates):
        g = scorer.graph_for(a, iterations)
        m = scorer.metrics(g)
        rows.append({"rank": i, "predicted_perturbation": a.objective, "measured": m,
                     "bitops_reduction": a.bitops_int8 / max(1, a.bitops),
                     "weight_bits": a.weight_bits, "act_bits": a.act_bits})
        if best < 0 or m[metric] < rows[best]["measured"][metric]:  # strict: equals keep the ILP's order
            best, best_g = i, g
    return best, rows, best_g
