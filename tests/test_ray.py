"""Scale-out on Ray (hilc[ray]): sharded calibration and evaluation equal the single-process results.

One local Ray instance (2 CPUs, loopback, no dashboard) is shared by the whole module: starting
Ray costs several seconds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA, RESNET8

import hilc
from hilc.compiler import calibrate, passes
from hilc.compiler.onnx_import import import_onnx
from hilc.errors import HilcError

ray = pytest.importorskip("ray")  # in the test extra; a plain install reports the error tested below


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def float_graph():
    g = import_onnx(RESNET8)
    for p in passes.FLOAT_PIPELINE:
        g = p(g)
    return g


@pytest.fixture(scope="module")
def resnet8(tmp_path_factory):
    return hilc.compile(RESNET8, tmp_path_factory.mktemp("r8") / "out", calib=DATA / "resnet8_calib.npy")


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_sharded_calibration_equals_single_process(ray_local, float_graph, crops32, method):
    one = calibrate.calibrate(float_graph, crops32, method, percentile=99.9)
    # shards of 128 and of one batch (64), an uneven tail (500 samples): the same ranges, bit for bit
    for shard, n in ((128, 512), (64, 500)):
        ref = one if n == 512 else calibrate.calibrate(float_graph, crops32[:n], method, percentile=99.9)
        dist = calibrate.calibrate(float_graph, crops32[:n], method, percentile=99.9, cluster="local", shard=shard)
        assert dist.meta["calibration"] == ref.meta["calibration"]
        assert dist.meta["calibration_method"] == ref.meta["calibration_method"]


def test_sharded_evaluation_is_bit_exact(ray_local, resnet8, crops32):
    single = hilc.evaluate(resnet8, crops32, raw=True)
    dist = hilc.evaluate(resnet8, crops32, raw=True, cluster="local", shard=100)  # uneven last shard
    assert dist.metrics["shards"] == 6
    assert dist.outputs.dtype == single.outputs.dtype and np.array_equal(dist.outputs, single.outputs)
    ref = resnet8.simulate(crops32)
    fl = hilc.evaluate(resnet8, crops32, reference=ref, cluster="local")
    assert np.array_equal(fl.outputs, ref)
    assert fl.metrics["top1_agreement"] == 1.0 and fl.metrics["max_abs_diff"] == 0.0
    labels = ref.argmax(axis=1)
    labels[:128] = (labels[:128] + 1) % 10
    assert hilc.evaluate(resnet8, crops32[:256], labels=labels[:256], cluster="local").metrics["top1"] == 0.5


def test_cli_evaluate_and_unreachable_cluster(resnet8, crops32, tmp_path):
    np.save(tmp_path / "x.npy", crops32[:40])
    np.save(tmp_path / "labels.npy", resnet8.simulate(crops32[:40]).argmax(axis=1))
    cmd = [sys.executable, "-m", "hilc.cli", "evaluate", str(resnet8.path), str(tmp_path / "x.npy"),
           "--labels", str(tmp_path / "labels.npy")]
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"top1": 1.0' in r.stdout
    # nothing listens on the discard port: one line naming the address, exit 2, quickly
    r = subprocess.run(cmd + ["--cluster", "127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in r.stderr


def test_missing_ray_is_one_line_with_the_install_command(monkeypatch, capsys, tmp_path):
    from hilc.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 32, 32), np.float32))
    assert main(["evaluate", str(tmp_path), str(tmp_path / "x.npy"), "--cluster", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hilc: error: --cluster needs Ray, which is not installed: pip install 'hilc[ray]'"
    with pytest.raises(HilcError, match="pip install 'hilc\\[ray\\]'"):
        calibrate.calibrate(import_onnx(RESNET8), np.zeros((2, 3, 32, 32), np.float32), cluster="local")
