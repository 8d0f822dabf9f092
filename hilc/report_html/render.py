"""Build the report page: figures from report.json (and the memory plan of graph.json)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from hilc import __version__
from hilc.errors import HilcError

TEMPLATES = Path(__file__).parent / "templates"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _timeline(out_dir: Path, report: dict) -> dict[str, Any] | None:
    """Live activation bytes at each layer (int8, batch 1) from the compiled graph's memory plan."""
    from hilc.compiler.memory import plan_memory, tensor_bytes
    from hilc.compiler.pipeline import load_artifacts

    try:
        graph = load_artifacts(out_dir)
        plan = plan_memory(graph)
    except (HilcError, ValueError):
        return None
    n = len(graph.nodes)
    live = np.zeros(n, np.int64)
    arena_top = np.zeros(n, np.int64)
    for t, (s, e) in plan.lifetimes.items():
        size = tensor_bytes(graph, t)
        for step in range(s, min(e, n - 1) + 1):
            live[step] += size
            if t in plan.offsets:
                arena_top[step] = max(arena_top[step], plan.offsets[t] + size)
    inputs = sum(tensor_bytes(graph, t) for t in graph.inputs)
    return {"names": [nd.name for nd in graph.nodes], "live": (live + inputs).tolist(),
            "in_shapes": {nd.name: "×".join(map(str, graph.tensors[nd.inputs[0]].shape)) if nd.inputs else ""
                          for nd in graph.nodes},
            "arena_top": arena_top.tolist(), "input_bytes": inputs, "arena_bytes": plan.arena_bytes,
            "offsets": plan.offsets, "outputs": {nd.name: nd.outputs[0] for nd in graph.nodes},
            "sizes": {t: tensor_bytes(graph, t) for t in plan.offsets},
            # flash per layer: every constant the node reads (weights, bias, multipliers, tables)
            "const_bytes": {nd.name: int(sum(graph.constants[c].nbytes for c in nd.params.values()))
                            for nd in graph.nodes}}


def _memory_plot(tl: dict, report: dict) -> str:
    import matplotlib.pyplot as plt

    x = np.arange(len(tl["names"]))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    edges = np.arange(len(x) + 1) - 0.5  # one bin per layer
    ax.stairs(np.asarray(tl["live"]) / 1024, edges, label="live activations + input (layer by layer)",
              color="#1f6feb", linewidth=1.6, baseline=None)
    ax.stairs(np.asarray(tl["arena_top"]) / 1024, edges, label="arena high-water mark", color="#8250df",
              linestyle=":", linewidth=1.4, baseline=None)
    patch = report.get("patch") or {}
    if "peak_sram_bytes_layerwise" in patch:
        ax.axhline(patch["peak_sram_bytes_layerwise"] / 1024, color="#cf222e", linestyle="--",
                   label=f"peak SRAM layer by layer: {patch['peak_sram_bytes_layerwise']:,} B")
        pb = patch.get("peak_sram_bytes_patch", patch.get("peak_sram_bytes"))
        if pb is not None:
            ax.axhline(pb / 1024, color="#1a7f37", linestyle="--", label=f"peak SRAM patch-based: {pb:,} B")
        # the patch stage: nodes 0 .. split_index (hilc.compiler.patches), or named by split_node
        split = patch.get("split_index")
        if not isinstance(split, int) and patch.get("split_node") in tl["names"]:
            split = tl["names"].index(patch["split_node"])
        if isinstance(split, int) and 0 <= split < len(x):
            ax.axvspan(-0.5, split + 0.5, color="#1a7f37", alpha=0.08, label="patch stage")
    ax.set_xticks(x, tl["names"], rotation=70, fontsize=7)
    ax.set_ylabel("KiB")
    ax.set_title("Activation memory, layer by layer" + (" vs patch-based" if patch else ""))
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return _png(fig)


def _latency(report: dict) -> dict[str, Any] | None:
    prof = report.get("profile")
    if not prof:
        return None
    measured = {lay["name"]: lay["ticks"] for lay in prof["layers"]}
    layers = report["layers"]
    names = [lay["name"] for lay in layers if lay["name"] in measured]
    meas = np.array([measured[n] for n in names], np.float64)
    pred_field = next((k for k in ("predicted_cycles", "predicted_ticks") if all(k in lay for lay in layers)), None)
    by_name = {lay["name"]: lay for lay in layers}
    if pred_field is not None:
        pred = np.array([by_name[n][pred_field] for n in names], np.float64)
        pred_label = f"predicted ({pred_field})"
    else:
        # No latency model in report.json: spread the measured total over layers by MACs, so a
        # bar far from its estimate shows a layer slower or faster than its arithmetic suggests.
        macs = np.array([by_name[n]["macs"] for n in names], np.float64)
        pred = macs / max(macs.sum(), 1) * meas.sum()
        pred_label = "MAC-proportional share of the measured total"
    return {"names": names, "measured": meas, "predicted": pred, "pred_label": pred_label, "profile": prof}


def _latency_plot(lat: dict) -> str:
    import matplotlib.pyplot as plt

    x = np.arange(len(lat["names"]))
    prof = lat["profile"]
    unit, scale = "ticks", 1.0
    if "instructions_per_tick" in prof:
        unit, scale = "instructions (QEMU -icount)", float(prof["instructions_per_tick"])
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.bar(x - 0.2, lat["measured"] * scale, 0.4, label=f"measured on {prof['board']}", color="#1f6feb")
    ax.bar(x + 0.2, lat["predicted"] * scale, 0.4, label=lat["pred_label"], color="#d0d7de", edgecolor="#57606a")
    ax.set_xticks(x, lat["names"], rotation=70, fontsize=7)
    ax.set_ylabel(unit)
    ax.set_title("Per-layer latency")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def _bits_plot(report: dict) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    layers = report["layers"]
    names = [lay["name"] for lay in layers]
    w = [lay["weight_bits"] if lay["weight_bits"] else np.nan for lay in layers]
    a = [lay["act_bits"] for lay in layers]
    m = np.array([w, a], np.float64)
    fig, ax = plt.subplots(figsize=(10, 1.9))
    # one colour per width: the narrow ones (mixed precision) stand out against 8-bit blue
    widths = [2, 3, 4, 5, 6, 7, 8, 16, 32]
    colours = ["#cf222e", "#e16f24", "#fb8f44", "#d4a72c", "#bf8700", "#8250df", "#9ecbff", "#54aeff", "#d0d7de"]
    idx = np.full(m.shape, np.nan)
    for k, wdt in enumerate(widths):
        idx[m == wdt] = k
    idx[~np.isnan(m) & np.isnan(idx)] = len(widths) - 1
    cmap = ListedColormap(colours).with_extremes(bad="#f6f8fa")
    ax.imshow(np.ma.masked_invalid(idx), aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(widths) - 0.5,
              interpolation="nearest")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, "-" if np.isnan(v) else str(int(v)), ha="center", va="center", fontsize=7)
    ax.set_yticks([0, 1], ["weights", "activations"])
    ax.set_xticks(np.arange(len(names)), names, rotation=70, fontsize=7)
    ax.set_title("Bit-widths per layer")
    return _png(fig)


def _pareto_plot(cmp: dict) -> str:
    """report.json's ``minifloat`` comparison (benchmarks/minifloat.py): accuracy vs the FPGA cost
    model's LUT + 100 x DSP, one marker per variant kind, the Pareto front joined."""
    import matplotlib.pyplot as plt

    pts = cmp["points"]
    yk = cmp.get("y", "accuracy")  # "error" (lower is better): the compile's error proxy, log scale
    fig, ax = plt.subplots(figsize=(7, 3.6))
    styles = {"int": ("o", "#0969da", "integer"), "mf": ("s", "#bf8700", "minifloat weights"),
              "mfxmf": ("^", "#cf222e", "minifloat x minifloat"), "mixed": ("*", "#1a7f37", "mixed (picker)")}
    for kind, (marker, colour, label) in styles.items():
        sel = [p for p in pts if p["kind"] == kind]
        if sel:
            ax.scatter([p["lut"] + 100 * p["dsp"] for p in sel], [p[yk] for p in sel], marker=marker,
                       color=colour, label=label, s=60 if kind == "mixed" else 36)
            for p in sel:
                if yk == "error" and kind == "mixed" and p["label"] != cmp.get("chosen"):
                    continue  # the compile's ILP points crowd each other: only the pick is named
                ax.annotate(p["label"], (p["lut"] + 100 * p["dsp"], p[yk]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    front = sorted((p for p in pts if p["label"] in cmp.get("pareto", [])), key=lambda p: p["lut"] + 100 * p["dsp"])
    if front:
        ax.plot([p["lut"] + 100 * p["dsp"] for p in front], [p[yk] for p in front], color="#57606a",
                lw=1, ls="--", label="Pareto front")
    chosen = [p for p in pts if p["label"] == cmp.get("chosen")]
    if chosen:
        ax.scatter([chosen[0]["lut"] + 100 * chosen[0]["dsp"]], [chosen[0][yk]], s=220, facecolors="none",
                   edgecolors="#000000", lw=1.5, label="chosen")
    if yk == "error":
        ax.set_yscale("log")
        ax.invert_yaxis()  # better (lower error) is up, as with accuracy
    ax.set_xlabel("cost: LUT + 100 x DSP (analytical model)")
    ax.set_ylabel(cmp.get("metric", "accuracy"), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{'Error proxy' if yk == 'error' else 'Accuracy'} vs FPGA cost: integer, minifloat, mixed")
    return _png(fig)


def _patch_rows(patch: Any) -> list[tuple[str, str]]:
    """The scalar fields of report.json's ``patch`` entry (per-patch windows stay in the JSON)."""
    if not isinstance(patch, dict):
        return []
    rows = []
    for k, v in patch.items():
        if k == "grid" and isinstance(v, list):
            rows.append(("grid", "×".join(map(str, v))))
        elif k == "mac_overhead" and isinstance(v, float):
            rows.append(("MAC overhead", f"{v:+.1%}"))
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            rows.append((k.replace("_", " "), "-" if v is None else str(v)))
        elif isinstance(v, int):
            rows.append((k.replace("_", " "), f"{v:,}"))
        elif isinstance(v, float):
            rows.append((k.replace("_", " "), f"{v:g}"))
    return rows


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,} B"


_LAYER_FIELDS = {"name": str, "op": str, "macs": int, "act_bits": int, "out_shape": list}


def _check_layers(report: dict, path: Path) -> None:
    """The per-layer fields every page shows (what ``hilc compile`` writes), so a hand-edited
    report.json fails here in one line, not as a KeyError in a plot."""
    tables = [("layers", report["layers"], _LAYER_FIELDS)]
    if isinstance(report.get("profile"), dict):
        tables.append(("profile layers", report["profile"].get("layers"), {"name": str, "ticks": int}))
    for what, rows, fields in tables:
        if not isinstance(rows, list):
            raise HilcError(f"{path}: unreadable report ('{what}' is not a list)")
        for i, row in enumerate(rows):
            for key, kind in fields.items():
                if not isinstance(row, dict) or not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                    raise HilcError(f"{path}: unreadable report ({what} #{i}: '{key}' missing or not "
                                    f"{'a number' if kind is int else 'a ' + kind.__name__})")
            if what == "layers" and not (row.get("weight_bits") is None or isinstance(row["weight_bits"], int)):
                raise HilcError(f"{path}: unreadable report (layers #{i}: 'weight_bits' is not a number)")


def build_context(out_dir: str | Path, accuracy: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the template shows, plots included (as data: URIs)."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    path = out / "report.json"
    if not path.exists():
        raise HilcError(f"{out}: no report.json (run hilc compile -o {out} first)")
    try:
        report = json.loads(path.read_text())
        layers = report["layers"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HilcError(f"{path}: unreadable report ({e})") from None
    _check_layers(report, path)
    board = None
    if report.get("board"):
        from hilc.hil.boards import load_board

        try:
            board = load_board(report["board"])
        except HilcError:
            board = None
    tl = _timeline(out, report)
    lat = _latency(report)
    prof = report.get("profile")
    ticks = {lay["name"]: lay["ticks"] for lay in prof["layers"]} if prof else {}
    total_ticks = sum(ticks.values()) or 1
    per_tick = prof.get("instructions_per_tick") if prof else None
    rows = []
    for lay in layers:
        out_t = tl["outputs"].get(lay["name"]) if tl else None
        t = ticks.get(lay["name"])
        rows.append({
            "name": lay["name"], "op": lay["op"], "onnx": lay.get("onnx_name", ""),
            "in_shape": tl["in_shapes"].get(lay["name"], "") if tl else "",
            "shape": "×".join(map(str, lay["out_shape"])), "macs": f"{lay['macs']:,}",
            "wbits": lay["weight_bits"] or "-", "abits": lay["act_bits"],
            "offset": f"{tl['offsets'][out_t]:,}" if tl and out_t in tl["offsets"] else "-",
            "size": f"{tl['sizes'][out_t]:,}" if tl and out_t in tl["sizes"] else "-",
            "flash": f"{tl['const_bytes'][lay['name']]:,}" if tl and lay["name"] in tl["const_bytes"]
            else f"{lay.get('weights_bytes', 0):,}",
            "ticks": f"{t:,}" if t is not None else "-",
            "instr": f"{t * per_tick:,}" if t is not None and per_tick else "-",
            "share": t / total_ticks if t is not None else None,
        })
    summary = [("model", Path(report.get("model", "?")).name), ("target", report.get("target", "?")),
               ("board", report.get("board") or "-"), ("CPU", report.get("cpu") or "-"),
               ("precision", report.get("precision", "?")),
               ("MACs", f"{report.get('macs', 0):,}"), ("BitOps", f"{report.get('bitops', 0):,}"),
               ("weights", _fmt_bytes(report.get("weights_bytes"))),
               ("compiled in", f"{report.get('compile_seconds', '?')} s")]
    known = {k: v for k, v in report.items() if "accuracy" in k or "agreement" in k}
    for k, v in sorted(known.items()):  # figures other steps measured (a dict: one row per entry)
        for name, val in (v.items() if isinstance(v, dict) else [(None, v)]):
            if isinstance(val, int | float | str) and not isinstance(val, bool):
                label = k.replace("_", " ") + (f" ({name})" if name is not None else "")
                summary.append((label, f"{val:.2%}" if isinstance(val, float) and val <= 1 else str(val)))
    for k, v in (accuracy or {}).items():
        summary.append((k, f"{v:.2%}" if isinstance(v, float) and v <= 1 else str(v)))
    limits = []
    flash = report.get("flash_bytes")
    if flash is not None:
        limits.append(("flash", flash, board.flash_bytes if board else None))
    sram = report.get("peak_sram_bytes")
    if sram is not None:
        limits.append(("SRAM (arena + I/O + scratch)", sram, board.ram_bytes if board else None))
    limit_rows = [{"what": w, "used": f"{u:,} B", "limit": f"{lim:,} B" if lim else "-",
                   "frac": (u / lim) if lim else None} for w, u, lim in limits]
    plots = []
    if tl:
        plots.append(("memory", "Memory timeline", _memory_plot(tl, report)))
    if lat:
        plots.append(("latency", "Per-layer latency", _latency_plot(lat)))
    plots.append(("bits", "Bit-width map", _bits_plot(report)))
    if report.get("minifloat", {}).get("points"):
        plots.append(("pareto", "Accuracy vs FPGA cost (integer / minifloat / mixed)",
                      _pareto_plot(report["minifloat"])))
    elif report.get("fpga_precision", {}).get("pareto", {}).get("points"):  # --precision auto-fpga
        plots.append(("pareto", "Error proxy vs FPGA cost (integer / minifloat / mixed; the pick circled)",
                      _pareto_plot(report["fpga_precision"]["pareto"])))
    patch = report.get("patch")
    extra = []
    if "arena_bytes" in report:
        extra.append(f"arena {report['arena_bytes']:,} B (lower bound {report.get('arena_lower_bound_bytes', 0):,} B)")
    if prof:
        extra.append(f"profiled on {prof['board']}: {prof['total_ticks']:,} ticks at {prof['tick_hz']:,} Hz"
                     + (f" = {prof['total_instructions']:,} instructions" if "total_instructions" in prof else ""))
    fp = report.get("fpga_precision")
    if fp and fp.get("layers"):  # --precision auto-fpga: the pick, its price, the HLS estimate, the PTQ
        from hilc.targets.hls.cost import choice_label

        picks = ", ".join(f"{la['name']} {choice_label(la['choice'])} ({la['pe']}x{la['simd']})" for la in fp["layers"])
        extra.append(f"auto-fpga pick: {picks}; cost model {fp['cost']['lut']:,} LUT / {fp['cost']['dsp']} DSP "
                     f"(int8 {fp['int8_cost']['lut']:,} / {fp['int8_cost']['dsp']})")
        h = fp.get("hls_estimate")
        if h:
            extra.append(f"HLS estimate of the same conv/dense layers: {h['conv_dense']['lut']:,} LUT / "
                         f"{h['conv_dense']['dsp']} DSP (with their ROMs, line buffers and control)")
        pt = fp.get("ptq")
        if pt:
            extra.append(f"after the pick, {' + '.join(pt['methods'])} ({pt['adaround_iterations']} AdaRound steps): "
                         f"top-1 agreement with float {pt['before']['top1_agreement']:.1%} -> "
                         f"{pt['after']['top1_agreement']:.1%}, relative output MSE "
                         f"{pt['before']['relative_mse']:.3g} -> {pt['after']['relative_mse']:.3g}")
    return {"title": f"hilc report: {Path(report.get('model', 'model')).name}", "summary": summary,
            "limits": limit_rows, "rows": rows, "plots": plots, "profiled": bool(prof), "per_tick": per_tick,
            "patch": _patch_rows(patch),
            "extra": extra, "version": __version__}


def render_report(out_dir: str | Path, accuracy: dict[str, Any] | None = None) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**build_context(out_dir, accuracy))


def write_report(out_dir: str | Path, output: str | Path | None = None,
                 accuracy: dict[str, Any] | None = None) -> Path:
    """Write OUT/report.html (or ``output``) and return its path; ``accuracy`` adds figures
    measured elsewhere (name -> value; floats <= 1 show as percentages) to the summary."""
    page = render_report(out_dir, accuracy)
    dest = Path(output) if output else Path(out_dir) / "report.html"
    from hilc.fileio import atomic_write

    return atomic_write(dest, lambda tmp: tmp.write_text(page, encoding="utf-8"), "an .html file")


def short_summary(report: dict[str, Any], out: str | Path) -> str:
    """The last line of ``hilc compile``: the few numbers people look for, and where to look next."""
    parts = [f"{len(report['layers'])} layers", f"{report['macs']:,} MACs", f"{report['weights_bytes']:,} B weights"]
    if "peak_sram_bytes" in report:
        parts.append(f"peak SRAM {report['peak_sram_bytes']:,} B")
    if "flash_bytes" in report:
        parts.append(f"flash {report['flash_bytes']:,} B")
    if report.get("board"):
        parts.append(f"fits {report['board']}")
    return (f"summary: {Path(report['model']).name} -> {out} ({report['precision']}): {', '.join(parts)}; "
            f"details: hilc report {out}")
