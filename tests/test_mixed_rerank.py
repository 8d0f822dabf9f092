"""Re-ranking the ILP's K best allocations (hilc.compiler.rerank): the K best are the brute force's
K best, each within budget; the pick is deterministic; K=1 is the plain ILP; bad K is a usage error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_mixed import chain_sensitivity

from hilc.cli import main
from hilc.compiler import mixed, rerank
from hilc.compiler.costmodel import load_cost_model
from hilc.compiler.mixed import Budgets
from hilc.errors import HilcError


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("rerank")
    g, calib, sens = chain_sensitivity(d)
    return mixed.with_prepared(g, sens["prepared"]), calib, sens, d


def all_feasible_objectives(space, sens, budgets, cost) -> list[float]:
    """Every allocation's objective within the budgets, by enumeration."""
    return sorted(v for v, _ in mixed.feasible_allocations(mixed._Problem(space, sens, cost), budgets))


def test_top_k_are_the_k_best_distinct_allocations_within_budget(chain):
    g, _, sens, _ = chain
    space, cost, budgets = mixed.analyse(g), load_cost_model(), Budgets(bitops_ratio=1.7)
    top = mixed.allocate_top(space, sens, budgets, 6, cost)
    assert len(top) == 6
    one = mixed.allocate(space, sens, budgets, cost)
    assert (top[0].weight_bits, top[0].act_bits) == (one.weight_bits, one.act_bits)  # K=1 is the ILP
    assert len({json.dumps([a.weight_bits, a.act_bits], sort_keys=True) for a in top}) == 6
    ref = all_feasible_objectives(space, sens, budgets, cost)
    assert [a.objective for a in top] == pytest.approx(ref[:6], rel=1e-9, abs=1e-12)
    assert all(a.bitops <= a.bitops_int8 / 1.7 * (1 + 1e-9) for a in top)
    # fewer feasible allocations than asked: all of them, then stop (a budget near the most BitOps can shrink)
    p = mixed._Problem(space, sens, cost)
    most = p.bitops_int8 / (p.bitops_const + p.solve(p.bitops, [])[None] @ p.bitops)
    few = Budgets(bitops_ratio=float(most[0]) * 0.97)
    n = len(all_feasible_objectives(space, sens, few, cost))
    assert 1 < n < 20
    assert len(mixed.allocate_top(space, sens, few, 50, cost)) == n
    with pytest.raises(HilcError, match="--rerank K must be a whole number >= 1, got 0"):
        mixed.allocate_top(space, sens, budgets, 0, cost)


def test_rerank_pick_is_deterministic_and_k1_is_the_plain_ilp(chain):
    g, calib, sens, _ = chain
    space, cost = mixed.analyse(g), load_cost_model()
    cands = mixed.allocate_top(space, sens, Budgets(bitops_ratio=2.0), 3, cost)
    scorer = rerank.Scorer(g, calib)
    a, rows_a, ga = rerank.pick(scorer, cands, iterations=50)
    b, rows_b, gb = rerank.pick(rerank.Scorer(g, calib), cands, iterations=50)
    assert a == b and rows_a == rows_b and ga.content_hash() == gb.content_hash()
    chosen = rows_a[a]["measured"][rerank.METRIC]
    assert chosen == min(r["measured"][rerank.METRIC] for r in rows_a)
    assert all(set(r["measured"]) == {"mse_int8", "kl_float", "flips_float"} and r["measured"]["kl_float"] >= 0
               for r in rows_a)
    assert rerank.pick(scorer, cands[:1], iterations=50)[0] == 0
    for bad in ("x", "kl_float_aug"):  # the mirrored inputs' metrics need Scorer(augment=True)
        with pytest.raises(HilcError, match=f"unknown re-ranking metric '{bad}'"):
            rerank.pick(scorer, cands, metric=bad)


def test_compile_rerank_reports_candidates_and_keeps_the_budget(chain, tmp_path, capsys):
    _, calib, _, d = chain
    np.save(tmp_path / "calib.npy", calib)
    args = ["compile", str(d / "m.onnx"), "--calib", str(tmp_path / "calib.npy"), "-q", "--precision", "mixed",
            "--bitops-ratio", "2", "--finetune-steps", "0"]
    assert main(args + ["-o", str(tmp_path / "k3"), "--rerank", "3"]) == 0
    rep = json.loads((tmp_path / "k3" / "report.json").read_text())
    m = rep["mixed_precision"]
    rr = m["rerank"]
    assert rr["k"] == 3 and len(rr["candidates"]) == 3 and rr["metric"] == rerank.METRIC
    chosen = rr["candidates"][rr["chosen"]]
    assert (chosen["weight_bits"], chosen["act_bits"]) == (m["weight_bits"], m["act_bits"])
    assert all(c["predicted_perturbation"] >= rr["candidates"][0]["predicted_perturbation"] for c in rr["candidates"])
    assert rep["bitops_int8"] / rep["bitops"] >= 2.0
    # K=1: the plain ILP, no re-ranking section
    assert main(args + ["-o", str(tmp_path / "k1"), "--rerank", "1"]) == 0
    assert "rerank" not in json.loads((tmp_path / "k1" / "report.json").read_text())["mixed_precision"]
    capsys.readouterr()
    for bad in (["--rerank", "0"], ["--rerank", "-2"]):
        assert main(args + ["-o", str(tmp_path / "bad")] + bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--rerank K must be a whole number >= 1" in err
    assert main(["compile", str(d / "m.onnx"), "--calib", str(tmp_path / "calib.npy"), "-q", "-o",
                 str(tmp_path / "int8"), "--rerank", "3"]) == 2
    assert "add --precision mixed" in capsys.readouterr().err
