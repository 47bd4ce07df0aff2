"""`python -m bench` runs every workload and checks each result (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench._harness import Sitting, Spec, measure

ROOT = Path(__file__).resolve().parent.parent


def test_every_workload_runs_and_is_checked_on_the_memory_store(tmp_path: Path) -> None:
    from bench.__main__ import WORKLOADS

    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "bench", "--backend", "memory", "--n", "4", "--repeat", "2"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines
    assert [line["workload"] for line in lines] == list(WORKLOADS)
    for line in lines:
        assert line["backend"] == "memory" and line["n"] == 4, line
        if line.get("skipped"):
            # Only workloads that need other processes to open the store are left out.
            assert WORKLOADS[line["workload"]].shared and line["ok"] is None, line
            continue
        rounds = 1 if WORKLOADS[line["workload"]].once else 2  # a big store is built once
        assert line["ok"] is True and line["repeat"] == rounds, line
        assert line["seconds"] >= 0 and line["per_op_ms"] >= 0 and line["floor_ms"] > 0, line
        assert "ratio" in line, line


async def test_a_wrong_result_is_an_error_with_no_time(tmp_path: Path) -> None:
    calls = []

    async def half_right(s: Sitting) -> dict[str, Any]:
        calls.append(s.n)
        ok = len(calls) != 2
        return {"seconds": 1.0, "per_op_ms": 1.0, "ok": ok}

    (line,) = await measure("X", Spec(half_right, 3, "x"), "memory", 3, "process", 3, tmp_path)
    assert calls == [3, 3, 3]
    assert line["ok"] is False and line["wrong_rounds"] == 1
    assert "error" in line and not {"seconds", "per_op_ms", "ratio"} & set(line)

    async def raises(s: Sitting) -> dict[str, Any]:
        raise RuntimeError("store fell over")

    (line,) = await measure("X", Spec(raises, 3, "x"), "memory", 3, "process", 1, tmp_path)
    assert line["ok"] is False and "RuntimeError: store fell over" in line["error"]


def test_the_report_rewrites_only_the_table_between_its_markers(tmp_path: Path) -> None:
    from bench.report import END, START, regenerate

    rows = [
        {
            "workload": "W1",
            "backend": "sqlite",
            "n": 9,
            "per_op_ms": 0.05,
            "floor_ms": 0.01,
            "ratio": 5.0,
            "ok": True,
            "seconds": 1,
        },
        {"workload": "W2", "backend": "sqlite", "n": 9, "ok": False, "error": "wrong results"},
        {"workload": "W3e", "backend": "memory", "n": 9, "ok": None, "skipped": "shared"},
    ]
    doc = tmp_path / "B.md"
    doc.write_text(f"intro\n{START}\nold table\n{END}\nafter\n")
    svg = tmp_path / "b.svg"
    regenerate(rows, doc, svg)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\nafter\n")
    assert "old table" not in text
    assert "| W1 | ms/step | 9 | 0.0500 (5.00x) |" in text
    assert "**error**" in text and "wrong results" in text
    # One bar per right measurement: the wrong and the skipped ones are not drawn as times.
    assert svg.read_text().count("<rect") == 1
