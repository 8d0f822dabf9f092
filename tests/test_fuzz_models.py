"""Model fuzzing: mutated ONNX files (truncation, bit flips, wrong dtypes, bad dimensions, cycles,
dangling inputs, wrong-sized initializers, NaN/Inf weights, bad attributes, dropped nodes) must each
end in a correct compile or a one-line error with exit code 2: never a traceback, a hang or a crash."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import random
import re
import signal

import numpy as np
import onnx
from conftest import AD01, DIGITS_CNN, RESNET8
from onnx import numpy_helper
from opmodels import cases

from hilc.cli import main

N_MODELS = int(os.environ.get("HILC_FUZZ_MODELS", "1000"))
SEED = int(os.environ.get("HILC_FUZZ_SEED", "0"))
KINDS = ("truncate", "bitflip", "nan_weights", "init_wrong_size", "wrong_dtype", "dims", "cycle", "dangling",
         "drop_node", "attr")


def mutate(kind: str, raw: bytes, rng: random.Random) -> bytes:
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))]
    if kind == "bitflip":
        b = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    m = onnx.load_from_string(raw)
    g = m.graph
    inits = list(g.initializer)
    if kind in ("nan_weights", "init_wrong_size", "wrong_dtype") and inits:
        i = rng.randrange(len(inits))
        a = numpy_helper.to_array(inits[i]).copy()
        if kind == "nan_weights" and a.dtype.kind == "f" and a.size:
            a.flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        elif kind == "init_wrong_size":
            a = a.reshape(-1)[: max(1, a.size // 2)].copy()
        elif kind == "wrong_dtype":
            a = a.astype(rng.choice([np.int32, np.float64, np.int8, np.float16]))
        g.initializer[i].CopyFrom(numpy_helper.from_array(a, inits[i].name))
    elif kind == "dims":
        dims = g.input[0].type.tensor_type.shape.dim
        dims[rng.randrange(1, len(dims))].dim_value = rng.choice([-5, 0, 10**9, 1, 7])
    elif kind == "cycle":
        n = g.node[rng.randrange(len(g.node))]
        n.input[0] = g.node[rng.randrange(len(g.node))].output[0]
    elif kind == "dangling":
        n = g.node[rng.randrange(len(g.node))]
        n.input[rng.randrange(len(n.input))] = "nowhere"
    elif kind == "drop_node":
        del g.node[rng.randrange(len(g.node))]
    elif kind == "attr":
        n = g.node[rng.randrange(len(g.node))]
        if n.attribute:
            a = n.attribute[rng.randrange(len(n.attribute))]
            if a.ints:
                a.ints[rng.randrange(len(a.ints))] = rng.choice([-1, 0, 1000, 3])
            elif a.type == onnx.AttributeProto.INT:
                a.i = rng.choice([-1, 0, 1000, 3])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = rng.choice([float("nan"), -1.0, 1e30])
    return m.SerializeToString()


class _Hang(Exception):
    pass


def _category(message: str) -> str:
    m = re.sub(r"\S*/\S*", "FILE", message.removeprefix("hilc: error: "))
    m = re.sub(r"'[^']*'|\[[^\]]*\]|\d+", "_", m)
    return " ".join(m.split()[:6])


def test_mutated_models_fail_cleanly(tmp_path):
    rng = random.Random(SEED)
    sources = {"digits": (DIGITS_CNN.read_bytes(), (8, 1, 8, 8)), "resnet8": (RESNET8.read_bytes(), (8, 3, 32, 32)),
               "ad01": (AD01.read_bytes(), (8, 640))}
    for c in cases()[:12]:
        sources[c.name] = (c.model.SerializeToString(), (8, *c.input_shape[1:]))
    for name, (_, shape) in sources.items():
        np.save(tmp_path / f"{name}.npy", np.random.default_rng(0).uniform(0, 10, shape).astype(np.float32))

    def on_alarm(*_):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    outcomes: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    failures = []
    try:
        for i in range(N_MODELS):
            name = rng.choice(list(sources))
            kind = rng.choice(KINDS)
            data = mutate(kind, sources[name][0], rng)
            path = tmp_path / "m.onnx"
            path.write_bytes(data)
            err = io.StringIO()
            signal.alarm(10)
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = main(["compile", str(path), "--calib", str(tmp_path / f"{name}.npy"), "-o",
                               str(tmp_path / "out"), "-q"])
            except _Hang:
                rc = "hang"
            except BaseException as e:  # noqa: BLE001 - anything escaping main is a crash
                rc = f"crash {type(e).__name__}"
            finally:
                signal.alarm(0)
            msg = err.getvalue().strip()
            if rc == 0:
                outcomes["compiled"] += 1
            elif rc == 2 and len(msg.splitlines()) == 1 and "Traceback" not in msg:
                outcomes["clean error"] += 1
                categories[_category(msg)] += 1
            else:
                outcomes[f"BAD ({rc})"] += 1
                failures.append((i, kind, name, rc, msg[:300]))
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"\n{N_MODELS} mutated models (seed {SEED}): {dict(outcomes)}")
    for cat, n in categories.most_common():
        print(f"  {n:5d}  {cat}")
    assert not failures, failures[:10]
