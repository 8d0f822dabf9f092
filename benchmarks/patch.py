"""Patch-based inference (MCUNetV2) benchmark: peak SRAM and MAC overhead of hilc's patch schedules.

1. MobileNetV2 1.0/224 (int8, random weights: memory does not depend on them). What is counted
   for the MCUNetV2 comparison is MCUNetV2's own activation count: the largest (input + output)
   of a single layer, depthwise convs in place (the larger of their input and output); with
   patches, a patch-stage layer counts its windows (largest over the patches) plus the whole
   split tensor, which stays allocated while the patches run. No weights, scratch or residual
   skip tensors held across a block. Printed next to MCUNetV2's published 1372 kB -> 172 kB.
   The 4x4 schedule shown is the one with the lowest such peak among those adding <= 15% MACs;
   MCUNet-in3 at 176x176 gets the same treatment.
   hilc's full static plan (arena + input + output + the DSP scratch column) is printed too.
2. MobileNetV2 0.35/144 on nucleo-f446re (128 KB SRAM): layer by layer does not fit, --patch
   auto does; the budget is the board's SRAM minus the firmware's own stack and frames.
3. The same schedule on qemu-mps2-an386 through the serial protocol: outputs bit-exact with the
   simulator and with the layer-by-layer build, and instructions measured (QEMU -icount) against
   the MAC overhead the scheduler predicted.

4. Operator order (hilc/compiler/schedule.py): peak SRAM with the ONNX file's node order and with
   the memory order, layer by layer and with --patch auto, for a branchy inception-like model,
   resnet8, MCUNet-in3 and MobileNetV2 (chains gain nothing; the figures show it).

Run from the repository root: python benchmarks/patch.py  (writes benchmarks/results/patch.json);
python benchmarks/patch.py order runs part 4 alone (benchmarks/results/patch_order.json).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from arch_models import mcunet_like, mobilenet_v2  # noqa: E402
from common import print_table, write_results  # noqa: E402

from hilc.compiler import patches as P  # noqa: E402
from hilc.compiler.pipeline import compile_model, write_artifacts  # noqa: E402
from hilc.errors import HilcError  # noqa: E402
from hilc.hil.boards import load_board  # noqa: E402
from hilc.hil.runner import profile_command, run_command  # noqa: E402

KB = 1024


def mbv2_1_0(d: Path, res: dict, rows: list) -> None:
    onnx.save(mobilenet_v2(1.0, 224), str(d / "mbv2_1.0.onnx"))
    calib = np.random.default_rng(0).uniform(0, 1, (2, 3, 224, 224)).astype(np.float32)
    q = compile_model(d / "mbv2_1.0.onnx", calib).graph
    lw = P.mcunet_peak(q)
    t = time.perf_counter()
    g = P.plan_patches(q, f"{best_4x4(q)[2]}:4")
    p = g.meta["patch"]
    search_s = time.perf_counter() - t
    t = time.perf_counter()
    auto = P.plan_patches(q, "auto")  # the full search: every split point and grid 2..8
    auto_s = time.perf_counter() - t
    t = time.perf_counter()
    P.plan_patches(q, "auto", 512 * KB)
    auto512_s = time.perf_counter() - t
    onnx_name = q.nodes[p["split_index"]].onnx_name
    res["mobilenet_v2_1.0_224"] = {
        "counted": "MCUNetV2: max over layers of input + output activation bytes (depthwise in place); "
                   "patch stage: one patch's windows + the whole split tensor",
        "mcunet_peak_bytes_layerwise": lw, "mcunet_peak_bytes_patched": p["mcunet_peak_bytes"],
        "reduction": lw / p["mcunet_peak_bytes"], "split_node": p["split_node"], "split_onnx": onnx_name,
        "split_shape": list(q.tensors[p["split"]].shape), "grid": p["grid"],
        "macs_layerwise": p["macs_layerwise"], "macs_patched": p["macs"], "mac_overhead": p["mac_overhead"],
        "full_plan_peak_bytes_layerwise": p["peak_sram_bytes_layerwise"],
        "full_plan_peak_bytes_patched": p["peak_sram_bytes"],
        "planner_seconds_4x4_split_search": round(search_s, 2), "planner_seconds_auto_full_search": round(auto_s, 2),
        "planner_seconds_auto_512kB": round(auto512_s, 2),
        "auto_lowest_peak": {"split_node": auto.meta["patch"]["split_node"], "grid": auto.meta["patch"]["grid"],
                             "peak_sram_bytes": auto.meta["patch"]["peak_sram_bytes"],
                             "mac_overhead": auto.meta["patch"]["mac_overhead"]},
        "published_mcunetv2": {"layerwise_kB": 1372, "patched_kB": 172},
    }
    r = res["mobilenet_v2_1.0_224"]
    rows += [
        ("MobileNetV2 1.0/224 int8, MCUNetV2 count, layer by layer", f"{lw / KB:,.1f} kB", "MCUNetV2: 1372 kB"),
        (f"  4x4 patches, split after {onnx_name} ({'x'.join(map(str, r['split_shape'][1:]))})",
         f"{p['mcunet_peak_bytes'] / KB:,.1f} kB ({r['reduction']:.2f}x)", "MCUNetV2: 172 kB (8.0x); >= 6x"),
        ("  MACs layer by layer -> patched", f"{p['macs_layerwise'] / 1e6:.1f}M -> {p['macs'] / 1e6:.1f}M "
         f"(+{p['mac_overhead']:.1%})", "<= 15%"),
        ("  hilc full plan (arena + I/O + scratch), layer by layer -> 4x4",
         f"{p['peak_sram_bytes_layerwise'] / KB:,.1f} -> {p['peak_sram_bytes'] / KB:,.1f} kB", ""),
        ("  planner: 4x4 split search / auto full search / auto at 512 kB",
         f"{search_s:.1f} / {auto_s:.1f} / {auto512_s:.1f} s", "<= 30 s"),
    ]


def best_4x4(q, max_overhead: float = 0.15) -> tuple[int, int, str]:
    """(MCUNetV2 peak, MACs, split node) of the 4x4 schedule with the lowest MCUNetV2 peak among
    those adding at most ``max_overhead`` MACs (ties: fewer MACs)."""
    layer_macs = P._layer_macs(q)
    cands = (P.build_candidate(q, k, 4, layer_macs) for k in P.split_points(q))
    return min((P.mcunet_peak(q, c.plan), c.macs, c.plan["split_node"]) for c in cands
               if c.macs <= (1 + max_overhead) * sum(layer_macs))


def mcunet(d: Path, res: dict, rows: list) -> None:
    """MCUNet-in3 (320 KB ImageNet model) at its native 176x176: the same 4x4 choice and count."""
    onnx.save(mcunet_like(176), str(d / "mcunet.onnx"))
    calib = np.random.default_rng(0).uniform(0, 1, (2, 3, 176, 176)).astype(np.float32)
    q = compile_model(d / "mcunet.onnx", calib).graph
    lw = P.mcunet_peak(q)
    layer_macs = P._layer_macs(q)
    peak, macs, split = best_4x4(q)
    res["mcunet_in3_176"] = {"mcunet_peak_bytes_layerwise": lw, "mcunet_peak_bytes_patched": peak,
                             "reduction": lw / peak, "split_node": split, "grid": [4, 4],
                             "macs_layerwise": sum(layer_macs), "macs_patched": macs,
                             "mac_overhead": macs / sum(layer_macs) - 1}
    rows.append(("MCUNet-in3 176x176, MCUNetV2 count, layer by layer -> 4x4",
                 f"{lw / KB:,.1f} -> {peak / KB:,.1f} kB ({lw / peak:.2f}x)",
                 f"MACs +{macs / sum(layer_macs) - 1:.1%}"))


def mbv2_035(d: Path, res: dict, rows: list) -> str:
    onnx.save(mobilenet_v2(0.35, 144, num_classes=10), str(d / "mbv2_0.35.onnx"))
    calib = np.random.default_rng(0).uniform(0, 1, (4, 3, 144, 144)).astype(np.float32)
    board = "nucleo-f446re"
    try:
        compile_model(d / "mbv2_0.35.onnx", calib, board=board)
        layerwise_error = None
    except HilcError as e:
        layerwise_error = str(e)
    r = compile_model(d / "mbv2_0.35.onnx", calib, board=board, patch="auto")
    write_artifacts(d / "nucleo", r)  # builds and links the board firmware
    rep = json.loads((d / "nucleo" / "report.json").read_text())
    p = rep["patch"]
    res["mobilenet_v2_0.35_144_nucleo_f446re"] = {
        "board_sram_bytes": load_board(board).ram_bytes,
        "firmware_ram_reserve_bytes": rep["firmware_ram_reserve_bytes"],
        "budget_bytes": p["budget_bytes"], "layerwise_peak_bytes": rep["peak_sram_bytes_layerwise"],
        "layerwise_error": layerwise_error, "patched_peak_bytes": rep["peak_sram_bytes"],
        "layerwise_over_budget_bytes": p["layerwise_over_budget_bytes"], "headroom_bytes": p["headroom_bytes"],
        "split_node": p["split_node"], "grid": p["grid"], "mac_overhead": p["mac_overhead"],
        "flash_bytes": rep["flash_bytes"], "planner_seconds": p["planner_seconds"],
    }
    rows += [
        (f"MobileNetV2 0.35/144 on {board}: layer by layer", f"{rep['peak_sram_bytes_layerwise']:,} B",
         f"over the {p['budget_bytes']:,} B budget by {p['layerwise_over_budget_bytes']:,} B"),
        (f"  --patch auto: split after {p['split_node']}, {p['grid'][0]}x{p['grid'][1]}",
         f"{rep['peak_sram_bytes']:,} B", f"{p['headroom_bytes']:,} B headroom, MACs +{p['mac_overhead']:.1%}"),
    ]
    return f"{p['split_node']}:{p['grid'][0]}"


def qemu(d: Path, mode: str, res: dict, rows: list) -> None:
    board = load_board("qemu-mps2-an386")
    calib = np.random.default_rng(0).uniform(0, 1, (4, 3, 144, 144)).astype(np.float32)
    x = np.random.default_rng(1).uniform(0, 1, (2, 3, 144, 144)).astype(np.float32)
    outs, bad = {}, {}
    for m in ("off", mode):
        o = d / f"qemu_{m.replace(':', '_')}"
        r = compile_model(d / "mbv2_0.35.onnx", calib, board=board.name, patch=m)
        write_artifacts(o, r)
        outs[m], bad[m] = run_command(o, board, r.graph, x, check=True, raw=True)
    prof = profile_command(d / f"qemu_{mode.replace(':', '_')}", board, r.graph, x[:1])["patch"]
    same = bool(np.array_equal(outs["off"], outs[mode]))
    res["mobilenet_v2_0.35_144_qemu_mps2_an386"] = {
        "schedule": mode, "samples": len(x), "mismatches_vs_simulator": bad, "patched_equals_layerwise_build": same,
        "instructions_patched": prof["patched"], "instructions_layerwise": prof["layerwise"],
        "measured_instruction_overhead": prof["measured_overhead"],
        "predicted_mac_overhead": prof["predicted_mac_overhead"],
        "stage_ticks_layerwise": prof["stage_ticks_layerwise"], "stage_ticks_patched": prof["stage_ticks_patched"],
        "stage_measured_overhead": prof["stage_measured_overhead"],
        "stage_predicted_mac_overhead": prof["stage_predicted_mac_overhead"],
    }
    rows += [
        (f"  same schedule on qemu-mps2-an386: run --check ({len(x)} samples)",
         f"{len(x) - bad[mode]}/{len(x)} bit-exact", f"== layer-by-layer build: {same}"),
        ("  instructions per inference, layer by layer -> patched",
         f"{prof['layerwise']:,} -> {prof['patched']:,}",
         f"{prof['measured_overhead']:+.1%} measured vs {prof['predicted_mac_overhead']:+.1%} MACs predicted"),
        ("  patch stage alone, ticks layer by layer -> patched",
         f"{prof['stage_ticks_layerwise']:,} -> {prof['stage_ticks_patched']:,}",
         f"{prof['stage_measured_overhead']:+.1%} measured vs {prof['stage_predicted_mac_overhead']:+.1%} "
         "MACs predicted"),
    ]


def inception_like(res_px: int = 64, seed: int = 0) -> onnx.ModelProto:
    """A stem and two inception blocks (1x1, 1x1 -> 3x3, 1x1 -> 3x3 -> 3x3, maxpool -> 1x1,
    concatenated), listed branch stage by branch stage as exporters often do: the import order
    keeps every branch's wide 1x1 output alive at once."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name: str, x: str, cin: int, cout: int, k: int = 1, stride: int = 1) -> str:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (cout, cin, k, k)).astype(np.float32), name + ".w"))
        inits.append(numpy_helper.from_array(np.zeros(cout, np.float32), name + ".b"))
        nodes.append(helper.make_node("Conv", [x, name + ".w", name + ".b"], [name + ".c"], name=name,
                                      kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride]))
        nodes.append(helper.make_node("Relu", [name + ".c"], [name], name=name + ".relu"))
        return name

    x = conv("stem", "x", 3, 32, 3, 2)
    for b in range(2):
        firsts = [conv(f"b{b}_1x1", x, 32, 16), conv(f"b{b}_r3", x, 32, 64), conv(f"b{b}_r5", x, 32, 64)]
        nodes.append(helper.make_node("MaxPool", [x], [f"b{b}_mp"], name=f"b{b}_mp", kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]))
        c3 = conv(f"b{b}_3x3", firsts[1], 64, 8, 3)
        c5a = conv(f"b{b}_5a", firsts[2], 64, 16, 3)
        c5 = conv(f"b{b}_5b", c5a, 16, 4, 3)
        pp = conv(f"b{b}_pp", f"b{b}_mp", 32, 4)
        nodes.append(helper.make_node("Concat", [firsts[0], c3, c5, pp], [f"b{b}_cat"], name=f"b{b}_cat", axis=1))
        x = f"b{b}_cat"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (32, 10)).astype(np.float32), "fc.w"))
    nodes.append(helper.make_node("MatMul", ["flat", "fc.w"], ["y"], name="fc"))
    graph = helper.make_graph(nodes, "inception_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, res_px, res_px])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def operator_order(d: Path, res: dict, rows: list) -> None:
    """What the memory order (hilc/compiler/schedule.py) saves against the ONNX file's order, layer
    by layer and with --patch auto (lowest peak, no budget), and how long the search takes."""
    from hilc.compiler.memory import plan_memory

    models = {
        "inception-like 64x64": (inception_like(), (3, 64)),
        "resnet8 (CIFAR-10)": (ROOT / "tests" / "data" / "resnet8_cifar10_fp32.onnx", (3, 32)),
        "MCUNet-in3 176x176": (mcunet_like(176), (3, 176)),
        "MobileNetV2 0.35/144": (mobilenet_v2(0.35, 144, num_classes=10), (3, 144)),
        "MobileNetV2 1.0/224": (mobilenet_v2(1.0, 224), (3, 224)),
    }
    out = res.setdefault("operator_order", {})
    for name, (model, (c, hw)) in models.items():
        path = model
        if not isinstance(model, Path):
            path = d / (name.split()[0] + ".onnx")
            onnx.save(model, str(path))
        calib = np.random.default_rng(0).uniform(0, 1, (2, c, hw, hw)).astype(np.float32)
        entry = {}
        for mode in ("off", "auto"):
            peaks = {}
            for order in ("import", "memory"):
                t = time.perf_counter()
                r = compile_model(path, calib, patch=mode, order=order)
                secs = time.perf_counter() - t
                g = r.graph
                if mode == "off":
                    peaks[order] = plan_memory(g).peak_sram_bytes + P.scratch_bytes(g)
                else:
                    peaks[order] = g.meta["patch"]["peak_sram_bytes"] if g.meta.get("patch") else None
                    if g.meta.get("patch"):
                        suffix = "" if order == "memory" else "_import_order"
                        entry["planner_seconds" + suffix] = g.meta["patch"]["planner_seconds"]
                if order == "memory":
                    entry[f"compile_seconds_{mode}"] = round(secs, 2)
                    entry["search_exact"] = g.meta["schedule"]["exact"]
                    entry["search_max_states"] = g.meta["schedule"]["max_states"]
                    entry["nodes_moved"] = g.meta["schedule"]["moved_nodes"]
            entry[f"peak_sram_bytes_{mode}_import_order"] = peaks["import"]
            entry[f"peak_sram_bytes_{mode}_memory_order"] = peaks["memory"]
        out[name] = entry
        lw_i, lw_m = entry["peak_sram_bytes_off_import_order"], entry["peak_sram_bytes_off_memory_order"]
        pa_i, pa_m = entry["peak_sram_bytes_auto_import_order"], entry["peak_sram_bytes_auto_memory_order"]
        rows.append((f"order {name}: layer by layer, import -> memory order",
                     f"{lw_i:,} -> {lw_m:,} B ({1 - lw_m / lw_i:.1%})",
                     f"patched (auto): {pa_i:,} -> {pa_m:,} B; exact={entry['search_exact']}, "
                     f"planner {entry.get('planner_seconds', 0):.1f} s "
                     f"({entry.get('planner_seconds_import_order', 0):.1f} s without reordering)"))


def main() -> None:
    res: dict = {}
    rows: list[tuple[str, str, str]] = []
    if sys.argv[1:] == ["order"]:  # only the operator-order figures (benchmarks/results/patch_order.json)
        with tempfile.TemporaryDirectory() as d:
            operator_order(Path(d), res, rows)
        _print(rows, res, "patch_order.json")
        return
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        operator_order(d, res, rows)
        mbv2_1_0(d, res, rows)
        mcunet(d, res, rows)
        mode = mbv2_035(d, res, rows)
        qemu(d, mode, res, rows)
    _print(rows, res, "patch.json")


def _print(rows: list, res: dict, fname: str) -> None:
    print_table(rows, 28)
    write_results(fname, res)


if __name__ == "__main__":
    main()
