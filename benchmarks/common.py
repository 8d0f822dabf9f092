"""What every benchmark script ends with: its rows printed as an aligned table, its JSON written.

Imported by the scripts in this folder (run from the repository root as ``python benchmarks/X.py``,
which puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def print_table(rows: Sequence[tuple[str, str, str]], value_width: int = 24,
                header: tuple[str, str, str] | None = None) -> None:
    """Rows of (measure, value, note or target): the measure left-aligned, the value right-aligned."""
    width = max(len(r[0]) for r in [*rows, *([header] if header else [])])
    for name, value, note in [*([header] if header else []), *rows]:
        print(f"{name:<{width}}  {value:>{value_width}}  {note}")


def write_results(file_name: str, results: dict[str, Any]) -> Path:
    """benchmarks/results/FILE_NAME, indented JSON; says where it went."""
    out = RESULTS / file_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out.relative_to(RESULTS.parents[1])}")
    return out
