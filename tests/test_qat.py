"""Quantization-aware fine-tuning (hilc/compiler/qat.py): each backward against finite
differences, the distillation loss goes down, the same inputs give the same integers, and the
result stays an integer-only graph whose weights are the trained ones."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from conftest import RESNET8, calibrated
from test_mixed import chain_model

from hilc.compiler import mixed, qat
from hilc.compiler.quantize import quantize
from hilc.errors import HilcError
from hilc.sim.simulator import to_physical


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("qat")
    onnx.save(chain_model(), str(d / "m.onnx"))
    calib = np.random.default_rng(2).uniform(-2, 2, (48, 3, 7, 9)).astype(np.float32)
    g = mixed.prepare_subbyte(calibrated(d / "m.onnx", calib), calib)
    return g, calib, to_physical(g, g.inputs[0], calib)


def _float64(p: qat.Params) -> qat.Params:
    return qat.Params({k: v.astype(np.float64) for k, v in p.w.items()},
                      {k: v.astype(np.float64) for k, v in p.b.items()}, p.scale, p.qmax)


def _check_gradients(g, x, temperature=2.0):
    """Every layer's weight and bias gradient (float forward) against central differences, at
    the entries with the largest gradients and at random ones."""
    p = _float64(qat.init_params(g))
    x = x.astype(np.float64)
    z, state = qat.forward(g, p, x, None, quant_weights=False, keep=True)
    target = np.random.default_rng(1).standard_normal(z.shape)
    _, dl = qat.distill_loss(z, target, temperature)
    grads = qat.backward(g, p, state, dl.astype(np.float64))
    assert set(grads) == set(p.w)
    rng = np.random.default_rng(0)
    for k in p.w:
        for which, arr in ((0, p.w[k]), (1, p.b[k])):
            gr = grads[k][which]
            picks = [np.unravel_index(np.argmax(np.abs(gr)), arr.shape)]
            picks += [tuple(int(rng.integers(0, s)) for s in arr.shape) for _ in range(2)]
            for i in picks:
                eps = 1e-9 * max(1.0, abs(float(arr[i])))
                old = arr[i]
                arr[i] = old + eps
                lp = qat.distill_loss(qat.forward(g, p, x, None, quant_weights=False)[0], target, temperature)[0]
                arr[i] = old - eps
                lm = qat.distill_loss(qat.forward(g, p, x, None, quant_weights=False)[0], target, temperature)[0]
                arr[i] = old
                num = (lp - lm) / (2 * eps)
                assert abs(gr[i] - num) <= 1e-4 + 1e-3 * abs(num), (k, which, i, gr[i], num)


def test_backward_matches_finite_differences_chain(chain):
    """conv, depthwise (grouped) conv, ReLU, global average pooling, flatten, dense."""
    g, _, x = chain
    _check_gradients(g, x[:4])


def test_backward_matches_finite_differences_resnet8(crops32):
    """Residual adds, strided convs with asymmetric padding, 8x8 average pooling, softmax end."""
    g = calibrated(RESNET8, crops32[:8])
    _check_gradients(g, to_physical(g, g.inputs[0], crops32[:2]))


def test_fake_quantization_straight_through():
    w = np.array([[0.26, -0.74, 1.3]], np.float32)
    s = np.array([[0.5]], np.float32)
    v, mask = qat.fake_weight(w, s, 1)  # 4 levels wide grid clipped at +-1 step
    assert np.allclose(v, [[0.5, -0.5, 0.5]]) and mask.tolist() == [[True, True, False]]
    a, am = qat.fake_act(np.array([-1.0, 0.12, 9.0], np.float32), (0.1, -8, -8, 7))
    assert np.allclose(a, [0.0, 0.1, 1.5]) and am.tolist() == [False, True, False]


def _lowered(g):
    layers = mixed.analyse(g).layers
    return mixed.assign_bitwidths(g, {la.name: 4 for la in layers[:3]} | {layers[0].name: 2},
                                  {mixed.analyse(g).roots[0]: 4})


def test_finetune_lowers_the_distillation_loss_and_is_deterministic(chain):
    g, calib, x = chain
    low = mixed.ptq_lowered(g, _lowered(g), calib, iterations=100)
    a, info = qat.finetune(g, low, x, steps=60, batch=16, augmentation=False)
    b, _ = qat.finetune(g, low, x, steps=60, batch=16, augmentation=False)
    assert info["loss_last"] < info["loss_first"]
    qa, qb = quantize(a), quantize(b)
    for na, nb in zip(qa.nodes, qb.nodes, strict=True):
        for p in na.params:
            assert np.array_equal(qa.param(na, p), qb.param(nb, p)), (na.name, p)
    # the integer model is closer to the float one on the training inputs than before
    teacher = qat.forward(g, qat.init_params(g), x, None, quant_weights=False)[0]
    kl = [qat.distill_loss(mixed._outputs(quantize(v), x), teacher)[0] for v in (low, a)]
    assert kl[1] < kl[0]
    # trained weights sit on their grid: quantize gives back exactly the fine-tuned integers
    for n in a.nodes:
        if n.op in ("conv2d", "dense"):
            s = np.asarray(n.attrs["w_scale"]).reshape((-1,) + (1,) * (a.param(n, "weight").ndim - 1))
            qn = next(m for m in qa.nodes if m.name == n.name)
            assert np.array_equal(np.rint(a.param(n, "weight") / s).astype(int), qa.param(qn, "weight").astype(int))


def test_finetune_off_and_unsupported_graphs_are_returned_as_they_are(chain):
    g, _, x = chain
    assert qat.finetune(g, g, x, steps=0)[0] is g
    h = g.copy()
    h.nodes[1].op = "maxpool"  # no backward for it here
    out, info = qat.finetune(h, h, x, steps=5)
    assert out is h and "maxpool" in info["skipped"]


def test_fake_quantized_forward_tracks_the_integer_model(chain):
    """The training model is the integer one up to rounding ties: weights, biases (on the
    accumulator's grid) and activations (learned scales included) on the grids ``quantize``
    gives them; the logits agree to within a fraction of the output's step on average."""
    g, calib, x = chain
    low = mixed.ptq_lowered(g, _lowered(g), calib, iterations=100)
    tuned, _ = qat.finetune(g, low, x, steps=30, batch=16, act_lr=0.05)
    root = mixed.analyse(g).roots[0]
    assert tuned.meta["subbyte_ranges"][root]["4"] != low.meta["subbyte_ranges"][root]["4"]  # learned
    for v in (low, tuned):
        q = quantize(v)
        fq = qat.forward(v, qat.init_params(v), x, qat.act_grids(v))[0]
        step = q.tensors[q.outputs[0]].quant.scale
        assert np.mean(np.abs(fq - mixed._outputs(q, x))) < 0.3 * step


def test_strong_augmentation_is_deterministic_and_stays_in_range():
    x = np.random.default_rng(3).uniform(0, 255, (6, 16, 12, 3)).astype(np.float32)
    a = qat.augment_strong(np.random.default_rng(0), x)
    b = qat.augment_strong(np.random.default_rng(0), x)
    assert a.shape == x.shape and np.array_equal(a, b)
    assert a.min() >= x.min() and a.max() <= x.max() and not np.allclose(a, x)
    # the identity box resamples the image exactly; CutMix alone pastes pixels of another image
    assert np.allclose(qat._resize_bilinear(x[0], 0, 0, 16, 12, 16, 12), x[0], atol=1e-4)
    flat = np.zeros_like(x) + np.arange(6, dtype=np.float32)[:, None, None, None]
    c = qat.augment_strong(np.random.default_rng(1), flat, min_area=1.0, jitter=0.0, cutout=0.0, cutmix=1.0)
    kinds = [set(np.unique(ci).tolist()) for ci in c]
    assert all(k <= {float(i), *map(float, range(6))} and float(i) in k for i, k in enumerate(kinds))
    assert sum(len(k) == 2 for k in kinds) >= 4  # its own value and its partner's


def test_separate_finetune_data_is_used_deterministic_and_bit_exact_on_host(tmp_path):
    """``finetune_data``: fine-tuning runs on those inputs (not the calibration ones), the same
    inputs give the same integers, and the fine-tuned build is bit-exact between the simulator
    and the host C kernels (portable and DSP)."""
    from conftest import host_vs_sim

    from hilc.compiler.mixed import Budgets
    from hilc.compiler.pipeline import compile_model

    onnx.save(chain_model(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(2)
    calib = rng.uniform(-2, 2, (48, 3, 7, 9)).astype(np.float32)
    extra = rng.uniform(-2, 2, (80, 3, 7, 9)).astype(np.float32)
    kw = {"precision": "mixed", "budgets": Budgets(bitops_ratio=2.0), "finetune_steps": 20,
          "sensitivity_cache": tmp_path / "sens.json"}
    a, (portable, dsp), sim = host_vs_sim(tmp_path / "m.onnx", calib, calib[:6], tmp_path / "out",
                                          finetune_data=extra, **kw)
    assert np.array_equal(portable, sim) and np.array_equal(dsp, sim)
    ft = a.report["mixed_precision"]["finetune"]
    assert ft["samples"] == 80 and ft["steps"] == 20
    b = compile_model(tmp_path / "m.onnx", calib, finetune_data=extra, **kw)
    c = compile_model(tmp_path / "m.onnx", calib, **kw)
    assert c.report["mixed_precision"]["finetune"]["samples"] == 48  # default: the calibration inputs

    def consts(r):
        return [r.graph.param(n, p) for n in r.graph.nodes for p in sorted(n.params)]

    assert all(np.array_equal(u, v) for u, v in zip(consts(a), consts(b), strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(consts(a), consts(c), strict=True))


def test_finetune_data_bad_file_or_shape_is_a_one_line_error(tmp_path, crops32, capsys):
    from hilc.cli import main
    from hilc.compiler.mixed import Budgets
    from hilc.compiler.pipeline import compile_model
    from hilc.errors import HilcError

    np.save(tmp_path / "calib.npy", crops32[:8])
    np.save(tmp_path / "bad.npy", crops32[:4, :, :16, :16])
    base = ["compile", str(RESNET8), "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "o"), "-q",
            "--precision", "mixed", "--bitops-ratio", "2", "--finetune-data"]
    for name, why in (("bad.npy", r"must have shape \['N', 3, 32, 32\]"), ("missing.npy", "no such file")):
        capsys.readouterr()
        assert main(base + [str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and re.search(why, err), err
    assert main(base[:7] + ["--finetune-data", str(tmp_path / "calib.npy")]) == 2  # without --precision mixed
    assert "hilc: error: --finetune-data needs --precision mixed" in capsys.readouterr().err
    with pytest.raises(HilcError, match=r"--finetune-data: input .* must have shape \['N', 3, 32, 32\]"):
        compile_model(RESNET8, crops32[:8], precision="mixed", budgets=Budgets(bitops_ratio=2.0),
                      finetune_data=crops32[:4, :, :16, :16])


def test_learned_weight_scale_gradient_matches_finite_differences(chain):
    """LSQ weight scales: d loss / d s = sum over the channel of d loss / d w_fake times
    ``rint(w/s) - w/s`` (inside the grid). Against central differences of the loss at fixed
    integers (a step of s too small to move any), which give sum d loss / d w_fake * rint(w/s):
    the two differ by sum grad_w * w/s, with grad_w the (straight-through) latent weight gradient."""
    g, calib, x = chain
    low = mixed.ptq_lowered(g, _lowered(g), calib, iterations=50)
    p = _float64(qat.init_params(low))
    p.scale = {k: v.astype(np.float64) for k, v in p.scale.items()}
    p.learn_scale = {k for k, q in p.qmax.items() if q < 127}
    assert p.learn_scale
    rng = np.random.default_rng(4)
    for k in p.learn_scale:  # off the grid (PTQ leaves them on it, where the residue is 0), some clipped
        p.w[k] = p.w[k] + rng.uniform(-0.7, 0.7, p.w[k].shape) * p.scale[k]
    xx = x[:4].astype(np.float64)
    z, state = qat.forward(low, p, xx, None, keep=True)
    target = np.random.default_rng(1).standard_normal(z.shape)
    _, dl = qat.distill_loss(z, target, 2.0)
    grads = qat.backward(low, p, state, dl.astype(np.float64))
    for k in p.learn_scale:
        gs = grads["wscale:" + k][0]
        ste = (grads[k][0] * p.w[k] / p.scale[k]).reshape(len(gs), -1).sum(axis=1)
        for c in range(len(gs)):
            s = p.scale[k]
            old = s[c].copy()
            eps = 1e-9 * float(old.reshape(-1)[0])
            s[c] = old + eps
            lp = qat.distill_loss(qat.forward(low, p, xx, None)[0], target, 2.0)[0]
            s[c] = old - eps
            lm = qat.distill_loss(qat.forward(low, p, xx, None)[0], target, 2.0)[0]
            s[c] = old
            num = (lp - lm) / (2 * eps)
            assert abs(gs[c] - (num - ste[c])) <= 1e-4 + 1e-3 * abs(num), (k, c, gs[c], num, ste[c])
    assert qat.fake_weight_scale_grad(np.array([0.26, -0.74, 1.3]), np.array(0.5), 1).tolist() == \
        pytest.approx([1 - 0.52, -1 + 1.48, 1.0])


@pytest.mark.parametrize("loss", ["hard", "margin", "kl+margin", "kl+hard"])
def test_decision_losses_match_finite_differences(loss):
    """The top-1 losses (hard distillation, margin hinge, and their sums with KL) against
    central differences of the logits, at every entry."""
    rng = np.random.default_rng(3)
    teacher = rng.standard_normal((6, 5)) * 2
    student = teacher + rng.standard_normal((6, 5))  # some samples past their margin, some not
    w = {"kl": 0.7, "margin": 1.3}
    _, grad = qat.output_loss(student, teacher, loss, 2.0, 0.5, w)
    eps = 1e-6
    for i in np.ndindex(student.shape):
        s = student.copy()
        s[i] += eps
        lp = qat.output_loss(s, teacher, loss, 2.0, 0.5, w)[0]
        s[i] -= 2 * eps
        lm = qat.output_loss(s, teacher, loss, 2.0, 0.5, w)[0]
        num = (lp - lm) / (2 * eps)
        assert abs(grad[i] - num) <= 1e-5 + 1e-4 * abs(num), (loss, i, grad[i], num)


def test_margin_loss_known_answers():
    teacher = np.array([[3.0, 1.0, 0.0], [0.0, 0.2, 0.1]])
    # sample 0: target margin 0.5 * 2 = 1, student margin 2 - 1.5 = 0.5 -> hinge 0.5;
    # sample 1: target 0.5 * 0.1 = 0.05, student beats its rival by 1 -> nothing
    student = np.array([[2.0, 1.5, -1.0], [0.0, 1.0, 0.0]])
    loss, grad = qat.margin_loss(student, teacher, 0.5)
    assert loss == pytest.approx(0.25 / 2)
    assert np.allclose(grad, [[-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert qat.hard_loss(np.zeros((1, 4)), np.eye(4)[2:3])[0] == pytest.approx(np.log(4))


def test_finetune_with_a_decision_loss_is_deterministic_and_rejects_unknown_terms(chain):
    g, calib, x = chain
    low = mixed.ptq_lowered(g, _lowered(g), calib, iterations=50)
    a, info = qat.finetune(g, low, x, steps=20, batch=16, augmentation=False, loss="kl+margin")
    b, _ = qat.finetune(g, low, x, steps=20, batch=16, augmentation=False, loss="kl+margin")
    assert info["loss"] == "kl+margin"
    qa, qb = quantize(a), quantize(b)
    for na, nb in zip(qa.nodes, qb.nodes, strict=True):
        for p in na.params:
            assert np.array_equal(qa.param(na, p), qb.param(nb, p)), (na.name, p)
    with pytest.raises(HilcError, match="unknown fine-tuning loss term 'mse'"):
        qat.finetune(g, low, x, steps=5, loss="kl+mse")
