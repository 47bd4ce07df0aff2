"""Turn benchmark JSON lines into the table and plot of docs/BENCHMARKS.md.

``python -m bench.report results.jsonl > table.md`` prints a Markdown table
and writes ``docs/bench.svg``: per-operation time of each workload on each
backend (log scale), beside the storage floor measured in the same run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

SVG = Path(__file__).resolve().parent.parent / "docs" / "bench.svg"


def load(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| workload | backend | n | per op (ms) | floor (ms) | ratio | other | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    skip = {
        "workload",
        "backend",
        "n",
        "seconds",
        "per_op_ms",
        "floor_ms",
        "ratio",
        "ok",
        "note",
        "durability",
        "repeat",
        "ratio_range",
    }
    for r in rows:
        other = ", ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        out.append(
            f"| {r['workload']} | {r['backend']} | {r['n']} | {r['per_op_ms']} | "
            f"{r.get('floor_ms', '')} | {r.get('ratio', '')} | {other} | {r['ok']} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]]) -> str:
    bar_h, gap, left, width = 14, 6, 190, 520
    values = [max(float(r["per_op_ms"]), 1e-4) for r in rows]
    floors = [max(float(r.get("floor_ms") or 1e-4), 1e-4) for r in rows]
    lo = math.floor(math.log10(min(values + floors)))
    hi = math.ceil(math.log10(max(values + floors)))
    span = max(hi - lo, 1)

    def x(v: float) -> float:
        return left + (math.log10(v) - lo) / span * width

    height = len(rows) * (bar_h + gap) + 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 40}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="14">ms per operation (log scale); | = storage floor, same run</text>',
    ]
    for decade in range(lo, hi + 1):
        xd = x(10.0**decade)
        parts.append(
            f'<line x1="{xd:.1f}" y1="22" x2="{xd:.1f}" y2="{height - 30}" stroke="#ddd"/>'
        )
        parts.append(
            f'<text x="{xd:.1f}" y="{height - 16}" text-anchor="middle">{10.0**decade:g}</text>'
        )
    for i, (r, v, f) in enumerate(zip(rows, values, floors, strict=True)):
        y = 26 + i * (bar_h + gap)
        color = "#4a7" if r["ok"] else "#c44"
        parts.append(
            f'<text x="{left - 6}" y="{y + bar_h - 3}" text-anchor="end">'
            f"{r['workload']} {r['backend']}</text>"
        )
        parts.append(
            f'<rect x="{left}" y="{y}" width="{max(x(v) - left, 1):.1f}" '
            f'height="{bar_h}" fill="{color}"/>'
        )
        parts.append(
            f'<line x1="{x(f):.1f}" y1="{y - 2}" x2="{x(f):.1f}" y2="{y + bar_h + 2}" '
            'stroke="#000" stroke-width="2"/>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    rows = load(sys.argv[1:])
    SVG.write_text(plot(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
