"""``hilc report OUT``: one self-contained HTML page (inline CSS, plots as base64 PNG, no script)
from a compiled model's report.json, graph.json and, when present, its board profile."""

from hilc.report_html.render import build_context, render_report, write_report

__all__ = ["build_context", "render_report", "write_report"]
